//! The REST API against its own OpenAPI description, fuzzed by Schemathesis
//! (PyPI, installed into the test venv by `scripts/test`) on a real daemon:
//! every check it has (no 5xx, answers and statuses as described, requests
//! the description allows accepted, requests it forbids refused), from the
//! description's examples, its boundaries and random data.
//!
//! Not fuzzed: `mount` and `unmount` (they mount at any absolute path the
//! request names, on this host) and `DELETE /v1/nodes/{name}` (removing the
//! only node ends the run); their bodies are the same typed, strict kind.

use cairn_tests::*;
use std::process::Command;

fn schemathesis() -> String {
    std::env::var("CAIRN_SCHEMATHESIS")
        .unwrap_or_else(|_| "/opt/cairn-test-venv/bin/schemathesis".into())
}

#[test]
fn the_api_matches_its_openapi_description_under_fuzzing() {
    let node = TestNode::start("fuzz", "512MiB");
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/schemathesis.toml");
    let out = Command::new(schemathesis())
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/v1/openapi.json", node.api_url()))
        .args([
            "--checks",
            "all",
            "--exclude-path-regex",
            "/(mount|unmount)$",
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
    // The daemon is still answering and logged no panic.
    let (st, _) = node.api("GET", "/v1/node", None);
    assert_eq!(st, 200);
    assert!(!node.log().contains("panicked"), "{}", node.log());
}
