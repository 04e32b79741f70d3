//! Holding a program the daemon runs, to reach a state between two of its
//! steps deterministically: [`Gate::install`] shadows one program (e.g.
//! `mkfs.ext4`) on one node's PATH (its `bin` directory comes first there)
//! with a script that, while the gate is closed, says so and waits before it
//! runs the real program. Nothing else changes: the real program runs with
//! the daemon's arguments once the gate opens, and an open gate passes
//! every call straight through.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::{wait_for, TestNode};

pub struct Gate {
    dir: PathBuf,
}

impl Gate {
    /// Shadows `program` for `node`'s daemon (already running or not).
    pub fn install(node: &TestNode, program: &str) -> Gate {
        let real = crate::sh_ok(&format!("command -v {program}"))
            .trim()
            .to_string();
        assert!(real.starts_with('/'), "{program} is not installed");
        let dir = node.dir.join(format!("gate-{program}"));
        std::fs::create_dir_all(&dir).expect("gate dir");
        let bin = node.bin_dir();
        std::fs::create_dir_all(&bin).expect("bin dir");
        let script = format!(
            "#!/bin/sh\n\
             # Test gate: wait (at most 120 s) while {d}/hold exists.\n\
             if [ -e {d}/hold ]; then\n\
             \ttouch {d}/held\n\
             \ti=0\n\
             \twhile [ -e {d}/hold ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done\n\
             fi\n\
             exec {real} \"$@\"\n",
            d = dir.display()
        );
        let path = bin.join(program);
        std::fs::write(&path, script).expect("gate script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("gate mode");
        Gate { dir }
    }

    /// The next run of the program waits until [`Gate::open`].
    pub fn close(&self) {
        let _ = std::fs::remove_file(self.dir.join("held"));
        std::fs::write(self.dir.join("hold"), b"").expect("hold");
    }

    /// Waits until a run of the program is waiting at the closed gate.
    pub fn wait_held(&self, timeout: Duration) {
        wait_for("the program to reach the gate", timeout, || {
            self.dir.join("held").exists()
        });
    }

    pub fn open(&self) {
        let _ = std::fs::remove_file(self.dir.join("hold"));
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
    }
}
