//! The REST API against its own OpenAPI description, fuzzed by Schemathesis
//! (PyPI, installed into the test venv by `scripts/test`) on a real daemon:
//! every check it has (no 5xx, answers and statuses as described, requests
//! the description allows accepted, requests it forbids refused), from the
//! description's examples, its boundaries and random data.
//!
//! `mount` and `unmount` are fuzzed too: the daemon runs with
//! `--api-mount-root` below its own directory, so no generated path mounts
//! anything elsewhere on this host (and the test checks that the limit
//! holds and that a path below it mounts). Not fuzzed: `DELETE
//! /v1/nodes/{name}` (removing the only node ends the run).

use cairn_tests::*;
use std::process::Command;

fn schemathesis() -> String {
    std::env::var("CAIRN_SCHEMATHESIS")
        .unwrap_or_else(|_| "/opt/cairn-test-venv/bin/schemathesis".into())
}

#[test]
fn the_api_matches_its_openapi_description_under_fuzzing() {
    let mut node = TestNode::prepare("fuzz", "127.0.0.1", "512MiB", &[]);
    let root = node.dir.join("mnt");
    node.extra_args.extend([
        "--api-mount-root".into(),
        root.to_string_lossy().into_owned(),
    ]);
    node.start_prepared();
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/schemathesis.toml");
    let out = Command::new(schemathesis())
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/v1/openapi.json", node.api_url()))
        .args([
            "--checks",
            "all",
            "--exclude-operation-id",
            "removeNode",
            "--max-examples",
            "30",
            "--generation-deterministic",
            "--phases",
            "examples,coverage,fuzzing",
            "--no-color",
        ])
        .current_dir(&node.dir)
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}); scripts/test installs it",
                schemathesis()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found mismatches:\n{text}"
    );
    assert!(text.contains("passed"), "{text}");
    // Every operation but removeNode was fuzzed (mount and unmount too).
    let selected = text
        .split("Selected: ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.split_once('/'))
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
    assert!(
        matches!(selected, Some((a, b)) if a + 1 == b),
        "operations left out besides removeNode:\n{text}"
    );
    // The limit holds, and a path below it mounts.
    node.cli_ok(&["volume", "create", "rooted", "--size", "16MiB"]);
    let (st, v) = node.api(
        "POST",
        "/v1/volumes/rooted/mount",
        Some(&serde_json::json!({ "path": node.dir.join("elsewhere").to_string_lossy() })),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("InvalidPath")),
        "{v}"
    );
    let inside = root.join("rooted");
    let inside_s = inside.to_string_lossy().into_owned();
    for path in [
        format!("{}/../x", root.display()),
        root.to_string_lossy().into_owned(),
    ] {
        let (st, v) = node.api(
            "POST",
            "/v1/volumes/rooted/mount",
            Some(&serde_json::json!({ "path": path })),
        );
        assert_eq!(st, 400, "{path}: {v}");
    }
    node.cli_ok(&["volume", "mount", "rooted", &inside_s]);
    assert!(cairn_node::sys::mount::is_mount_point(&inside));
    node.cli_ok(&["volume", "unmount", "rooted", &inside_s]);
    assert!(!cairn_node::sys::mount::is_mount_point(&inside));
    // The daemon is still answering and logged no panic.
    let (st, _) = node.api("GET", "/v1/node", None);
    assert_eq!(st, 200);
    assert!(!node.log().contains("panicked"), "{}", node.log());
}
