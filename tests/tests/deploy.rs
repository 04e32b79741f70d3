//! What operators apply: the Kubernetes manifests validate against the
//! Kubernetes schemas offline, and the image they reference builds offline
//! and runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_tests::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn validator() -> String {
    std::env::var("CAIRN_K8S_VALIDATE")
        .unwrap_or_else(|_| "/opt/cairn-test-venv/bin/kubernetes-validate".into())
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    Command::new(validator())
        .arg("--strict")
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); scripts/test installs it", validator()))
}

#[test]
fn kubernetes_manifests_validate_offline() {
    let dir = repo().join("deploy/kubernetes");
    let kustomization =
        std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    for f in &files {
        let name = f.file_name().expect("name").to_string_lossy().into_owned();
        assert!(
            kustomization.contains(&format!("- {name}")),
            "{name} is not listed in kustomization.yaml"
        );
    }
    files.push(dir.join("examples/statefulset.yaml"));
    let out = validate(&files);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for kind in [
        "namespace/cairn-system",
        "csidriver/csi.cairn.dev",
        "daemonset/cairn-node",
        "deployment/cairn-csi-controller",
        "storageclass/cairn-replicated",
        "statefulset/cairn-demo",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}")),
            "{kind}: {text}"
        );
    }

    // Snapshots: the sidecar and its RBAC are in the manifests; the
    // example's core objects (PVCs restored from a snapshot and cloned from
    // a PVC) validate, its snapshot objects name this driver (their CRDs
    // are a cluster add-on the validator has no schema for).
    let controller = std::fs::read_to_string(dir.join("controller.yaml")).expect("controller");
    assert!(
        controller.contains("csi-snapshotter"),
        "no snapshot sidecar"
    );
    let rbac = std::fs::read_to_string(dir.join("rbac.yaml")).expect("rbac");
    assert!(
        rbac.contains("volumesnapshotcontents/status"),
        "no snapshotter RBAC"
    );
    let example = std::fs::read_to_string(dir.join("examples/snapshot.yaml")).expect("example");
    assert!(
        example.contains(
            "kind: VolumeSnapshotClass\nmetadata:\n  name: cairn-snapshots\ndriver: csi.cairn.dev"
        ),
        "{example}"
    );
    let core: Vec<&str> = example
        .split("\n---\n")
        .filter(|d| d.contains("\napiVersion: v1\n") || d.starts_with("apiVersion: v1\n"))
        .collect();
    assert_eq!(core.len(), 2, "{core:?}");
    let core_dir = test_root().join(format!("deploy-snap-{}", std::process::id()));
    std::fs::create_dir_all(&core_dir).expect("dir");
    let core_file = core_dir.join("pvcs.yaml");
    std::fs::write(&core_file, core.join("\n---\n")).expect("write");
    let out = validate(std::slice::from_ref(&core_file));
    std::fs::remove_dir_all(&core_dir).ok();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for pvc in ["cairn-demo-restored", "cairn-demo-clone"] {
        assert!(
            text.contains(&format!("persistentvolumeclaim/{pvc}")),
            "{text}"
        );
    }

    // The validator does catch mistakes (so the pass above means something).
    let bad_dir = test_root().join(format!("deploy-bad-{}", std::process::id()));
    std::fs::create_dir_all(&bad_dir).expect("dir");
    let bad = bad_dir.join("bad.yaml");
    let daemonset = std::fs::read_to_string(dir.join("node-daemonset.yaml")).expect("read");
    std::fs::write(
        &bad,
        daemonset.replace(
            "mountPropagation: Bidirectional",
            "mountPropagation: [Bidirectional]",
        ),
    )
    .expect("write");
    let out = validate(std::slice::from_ref(&bad));
    std::fs::remove_dir_all(&bad_dir).ok();
    assert!(!out.status.success(), "a broken manifest passed");
}

#[test]
fn the_image_builds_offline_and_runs() {
    let tag = format!("cairn-test/cairn:{}", std::process::id());
    let out = Command::new(repo().join("deploy/kubernetes/image/build.sh"))
        .arg(&tag)
        .env("CAIRN_BIN", cairn_bin())
        .output()
        .expect("run build.sh");
    assert!(
        out.status.success(),
        "build.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = |args: &[&str]| {
        Command::new("docker")
            .args(["run", "--rm", "--network", "none"])
            .args(args)
            .output()
            .expect("docker run")
    };
    let version = run(&[&tag, "--version"]);
    let shell = run(&[
        "--entrypoint",
        "/bin/sh",
        &tag,
        "-c",
        "mkfs.xfs -V && mkfs.ext4 -V 2>&1 | head -1 && command -v blkid resize2fs xfs_growfs",
    ]);
    let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
    assert!(
        version.status.success()
            && String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")),
        "{version:?}"
    );
    let text = String::from_utf8_lossy(&shell.stdout);
    assert!(shell.status.success(), "{shell:?}");
    assert!(
        text.contains("mkfs.xfs version") && text.contains("/blkid"),
        "{text}"
    );
}
