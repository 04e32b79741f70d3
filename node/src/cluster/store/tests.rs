use super::*;
use crate::types::{FsType, Id128};

use super::super::driver::SNAPSHOT_EVERY;

/// Opens a sled db, waiting (bounded) for a just-dropped handle's
/// background flusher to release the directory lock.
pub(crate) fn open_db(dir: &std::path::Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return db,
            Err(e) if Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("db {}: {e}", dir.display()),
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("rt")
    })
}

fn opts(bootstrap: Option<Id128>) -> StoreOptions {
    StoreOptions {
        raft_id: 1,
        bootstrap,
        cluster_id: None,
        advertise: "127.0.0.1:1".into(),
        handle: runtime().handle().clone(),
    }
}

fn create(name: &str) -> Command {
    Command::CreateVolume {
        id: Id128::random(),
        name: name.into(),
        size_bytes: 1 << 20,
        fs: FsType::Ext4,
        replica_node: Id128::random(),
        more_replicas: vec![],
        created_unix_ms: 0,
        csi_name: None,
    }
}

#[test]
fn an_entry_of_an_unknown_version_stops_the_state_machine() {
    use super::super::state::{encode_command, ENTRY_VERSION};
    let dir = std::env::temp_dir().join(format!("cairn-store-{}", Id128::random()));
    {
        let db = open_db(&dir);
        let store = ClusterStore::open(&db, opts(Some(Id128::random()))).expect("bootstrap");
        store.propose(create("before")).expect("accepted");
        let mut data = encode_command(&create("after"));
        data[1] = ENTRY_VERSION + 1;
        let (reply, rx) = mpsc::sync_channel(1);
        store
            .tx
            .send(Msg::ProposeRaw { data, reply })
            .expect("driver runs");
        let r = rx.recv_timeout(Duration::from_secs(10)).expect("answered");
        assert!(
            matches!(&r, Err(StoreError::Storage(m)) if m.contains("newer than this node understands")),
            "{r:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(
            store.wait_until(deadline, |_, st| st.role == "stopped"),
            "the state machine did not stop"
        );
        let s = store.read().clone();
        assert!(s.volume_by_name("before").is_some() && s.volume_by_name("after").is_none());
        assert!(
            store.propose(create("later")).is_err(),
            "a stopped group took a proposal"
        );
    }
    // Never skipped: the next start meets the entry again and stops.
    let db = open_db(&dir);
    assert!(ClusterStore::open(&db, opts(None)).is_err());
    drop(db);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn commands_survive_restart_and_compaction() {
    let dir = std::env::temp_dir().join(format!("cairn-store-{}", Id128::random()));
    let open = || open_db(&dir);
    let n = SNAPSHOT_EVERY + 50;
    {
        let db = open();
        let store = ClusterStore::open(&db, opts(Some(Id128::random()))).expect("bootstrap");
        for i in 0..n {
            let s = store.propose(create(&format!("v{i}"))).expect("accepted");
            assert_eq!(s.volumes.len() as u64, i + 1);
        }
        // Refused commands answer with the state machine's error.
        assert!(matches!(
            store.propose(create("v0")),
            Err(StoreError::Refused(StateError::VolumeExists(_)))
        ));
        let snap = SledStorage::open(&db).unwrap().latest_snapshot().unwrap();
        assert!(
            snap.get_metadata().index >= SNAPSHOT_EVERY,
            "the log was never compacted"
        );
    }
    let db = open();
    let store = ClusterStore::open(&db, opts(None)).expect("reopen");
    let s = store.read().clone();
    assert_eq!(s.volumes.len() as u64, n);
    assert!(s.volume_by_name(&format!("v{}", n - 1)).is_some());
    drop(store);
    drop(db);
    std::fs::remove_dir_all(&dir).ok();
}
