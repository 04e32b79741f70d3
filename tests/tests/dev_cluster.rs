//! `cairn dev up` starts a local cluster on 127.0.0.x; `cairn dev down`
//! stops it and removes everything it created.

use std::process::Command;

use cairn_tests::*;

#[test]
fn dev_up_and_down() {
    let dir = test_root().join(format!("dev-{}", std::process::id()));
    cleanup_dir(&dir);
    let d = dir.to_string_lossy().into_owned();
    let up = Command::new(cairn_bin())
        .args([
            "dev",
            "up",
            "--nodes",
            "3",
            "--dir",
            &d,
            "--disk-size",
            "128MiB",
        ])
        .output()
        .expect("dev up");
    let out = String::from_utf8_lossy(&up.stdout).into_owned();
    let ok = up.status.success();
    let status = Command::new(cairn_bin())
        .args([
            "--api",
            "http://127.0.0.12:7400",
            "-o",
            "json",
            "cluster",
            "status",
        ])
        .output()
        .expect("status");
    let down = Command::new(cairn_bin())
        .args(["dev", "down", "--dir", &d])
        .output()
        .expect("dev down");
    let left = dir.exists();
    cleanup_dir(&dir);
    assert!(
        ok,
        "dev up failed: {out}{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(
        out.contains("export CAIRN_API=http://127.0.0.11:7400"),
        "{out}"
    );
    let s: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(s["members"].as_array().map(|m| m.len()), Some(3), "{s}");
    assert!(
        down.status.success(),
        "dev down failed: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!left, "dev down left {} behind", dir.display());
    let procs = sh(&format!("pgrep -af '[n]ode run --data-dir {d}'"));
    assert!(
        procs.stdout.is_empty(),
        "daemons left: {}",
        String::from_utf8_lossy(&procs.stdout)
    );
}
