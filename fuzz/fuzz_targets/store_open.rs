//! Recovery over arbitrary data directories: `Store::open` on files built from the input.
//!
//! The input is a little archive of store files: repeated `[which: u8][len: u32 LE][bytes]`,
//! where `which` picks one of the paths of `STORE_OPEN_FILES` (checkpoint, commit-log segments,
//! consume-queue files, index files) and a path given twice keeps the last bytes. A later
//! segment is named by its start offset, which only its writer knows: for that entry the
//! first 8 bytes (LE) are the offset and the rest the file. The
//! directory is built in a fresh temporary directory (under `/dev/shm` where it exists, so
//! the store's fdatasyncs cost nothing) and opened with the tiny settings of
//! `store_open_config`; both live in `sluice_fuzz::layout`, shared with the seed generator.
//!
//! What must hold, whatever the bytes: `open` returns (an error or a store) and never
//! panics, aborts or runs out of memory; an opened store answers reads, index lookups and
//! an append without panicking, and closes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_fuzz::layout::{LATER_SEGMENT, STORE_OPEN_FILES, store_open_config};
use sluice_store::{AppendMessage, PROP_KEYS, PROP_MSG_ID, Store, StoreConfig};

fn name(n: u64) -> String {
    format!("{n:020}")
}

fuzz_target!(|data: &[u8]| {
    let paths = STORE_OPEN_FILES;
    let dir = sluice_fuzz::scratch_dir("sluice-fuzz-store");
    for (which, bytes) in sluice_fuzz::archive_entries(data) {
        let which = which as usize % paths.len();
        if paths[which] == LATER_SEGMENT {
            let Some((start, file)) = bytes.split_first_chunk::<8>() else {
                continue;
            };
            // Below 2^40, as a real store's offsets would be.
            let start = u64::from_le_bytes(*start) % (1 << 40);
            sluice_fuzz::put_file(&dir, &format!("commitlog/{}", name(start)), file);
        } else {
            sluice_fuzz::put_file(&dir, paths[which], bytes);
        }
    }
    std::fs::create_dir_all(&dir).expect("scratch dir");
    exercise(store_open_config(&dir));
    let _ = std::fs::remove_dir_all(&dir);
});

fn exercise(cfg: StoreConfig) {
    let Ok(store) = Store::open(cfg) else {
        return;
    };
    for (topic, queue) in store.queues() {
        let (min, max) = store.queue_offsets(&topic, queue);
        assert!(min <= max, "queue {topic}/{queue}: min {min} > max {max}");
        for from in [min, max.saturating_sub(3), max] {
            if let Ok(batch) = store.read(&topic, queue, from, 16, 1 << 20, |_| true) {
                for m in &batch.messages {
                    assert_eq!(m.topic, topic, "read from {topic}/{queue}");
                    assert_eq!(m.queue_id, queue, "read from {topic}/{queue}");
                }
            }
        }
        let _ = store.offset_for_timestamp(&topic, queue, 0);
        let _ = store.offset_for_timestamp(&topic, queue, i64::MAX);
        let _ = store.lookup_key(&topic, "k", 0, i64::MAX, 8);
    }
    let _ = store.lookup_message_id("id-0");
    let _ = store.append_blocking(vec![AppendMessage {
        topic: "t".into(),
        queue_id: 0,
        flags: 0,
        born_ts: 1,
        properties: vec![
            (PROP_MSG_ID.into(), "id-after-recovery".into()),
            (PROP_KEYS.into(), "k".into()),
        ],
        body: Bytes::from_static(b"after recovery"),
    }]);
    store.close();
}
