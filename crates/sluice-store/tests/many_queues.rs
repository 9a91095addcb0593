//! More queues than the process may open files: the store must neither fence itself nor
//! fail to reopen.
//!
//! This test binary lowers its own file-descriptor limit (`RLIMIT_NOFILE`) to 256, so it
//! holds this one test only. Every queue gets its own consume-queue file (a checkpoint
//! writes every queue's tail out), 2,000 of them: with a descriptor per queue file the
//! writer ran out of descriptors and the store fenced itself ("Too many open files"), and
//! a reopen failed the same way.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use sluice_store::{AppendMessage, FlushPolicy, ReadStatus, Store, StoreConfig};

const QUEUES: u32 = 2_000;
const FD_LIMIT: u64 = 256;

fn config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::small(dir);
    c.flush = FlushPolicy::Sync;
    c.open_queue_files = 64;
    c
}

fn message(q: u32, round: u32) -> AppendMessage {
    AppendMessage {
        topic: format!("topic-{}", q / 8),
        queue_id: q % 8,
        flags: 0,
        born_ts: 0,
        properties: vec![],
        body: Bytes::from(format!("queue {q} round {round}")),
    }
}

fn check_all(store: &Store, rounds: u32) -> anyhow::Result<()> {
    for q in 0..QUEUES {
        let m = message(q, 0);
        let b = store.read(&m.topic, m.queue_id, 0, 100, 1 << 20, |_| true)?;
        anyhow::ensure!(b.status == ReadStatus::Found, "queue {q}: {:?}", b.status);
        let bodies: Vec<Bytes> = b.messages.iter().map(|m| m.body.clone()).collect();
        let want: Vec<Bytes> = (0..rounds).map(|r| message(q, r).body).collect();
        anyhow::ensure!(bodies == want, "queue {q}: {bodies:?}");
    }
    Ok(())
}

#[test]
fn more_queues_than_file_descriptors() -> anyhow::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: FD_LIMIT,
        rlim_max: FD_LIMIT,
    };
    // SAFETY: plain system call on a valid struct; this test binary holds this test only.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    anyhow::ensure!(rc == 0, "setrlimit: {}", std::io::Error::last_os_error());
    let dir = tempfile::tempdir()?;
    let store = Store::open(config(dir.path()))?;
    for round in 0..2 {
        for q in 0..QUEUES {
            store.append_blocking(vec![message(q, round)])?;
        }
        // A checkpoint (every 100 ms here) writes every queue's tail to its file.
        std::thread::sleep(Duration::from_millis(300));
    }
    anyhow::ensure!(store.fenced().is_none(), "fenced: {:?}", store.fenced());
    let stats = store.stats();
    anyhow::ensure!(stats.queues == u64::from(QUEUES));
    anyhow::ensure!(
        stats.open_queue_files <= 64,
        "{} queue files open",
        stats.open_queue_files
    );
    anyhow::ensure!(stats.queue_files_opened > 0);
    check_all(&store, 2)?;
    drop(store);
    // Reopened: every queue directory is opened and checked again, under the same limit.
    let store = Store::open(config(dir.path()))?;
    check_all(&store, 2)?;
    for q in 0..QUEUES {
        store.append_blocking(vec![message(q, 2)])?;
    }
    check_all(&store, 3)?;
    anyhow::ensure!(store.fenced().is_none(), "fenced: {:?}", store.fenced());
    Ok(())
}
