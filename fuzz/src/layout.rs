//! The archive format and file layouts of the start-up targets (`store_open`,
//! `broker_open`), shared with the seed generator, which includes this file by path
//! (`fuzz/seedgen` cannot link this crate: it pulls in libFuzzer).
//!
//! An input is repeated `[which: u8][len: u32 LE][bytes]`; `which` indexes the target's
//! path list.

use std::path::Path;

use sluice_store::StoreConfig;

/// `store_open`: placeholder for the later commit-log segment. A segment is named by its
/// start offset, which only its writer knows, so that entry's first 8 bytes (LE) are the
/// offset and the rest the file.
pub const LATER_SEGMENT: &str = "commitlog/<start>";

/// `store_open`: the paths an input can fill, relative to the data directory. The last
/// two are a stray file where a directory of queues is expected and a name that is no
/// offset: both must be tolerated or reported, not crash the open.
pub const STORE_OPEN_FILES: [&str; 11] = [
    "checkpoint",
    "commitlog/00000000000000000000",
    LATER_SEGMENT,
    "consumequeue/t/0/00000000000000000000",
    "consumequeue/t/1/00000000000000000000",
    // The second file of queue t/0: `cq_entries_per_file` of `store_open_config` is 32.
    "consumequeue/t/0/00000000000000000032",
    "consumequeue/u/3/00000000000000000000",
    "index/00000000000000000000",
    "index/00000000000000000001",
    "consumequeue/t/7",
    "commitlog/00000000000000000000.tmp",
];

/// `store_open`: small files, so whole data directories fit in an input.
pub fn store_open_config(dir: &Path) -> StoreConfig {
    let mut c = StoreConfig::small(dir);
    c.segment_size = 16 << 10;
    c.max_record_size = 4 << 10;
    c.cq_entries_per_file = 32;
    c.index_slots = 64;
    c.index_entries = 128;
    c.zero_ahead = 0;
    c
}

/// `broker_open`: the broker files read at start-up, relative to its data directory.
pub const BROKER_OPEN_FILES: [&str; 7] = [
    "meta/topics.json",
    "meta/groups.json",
    "meta/pop-snapshot.json",
    "meta/offsets-snapshot.json",
    "meta/tx-snapshot.json",
    "timer/checkpoint",
    "meta/topics.json.tmp",
];

/// Appends one archive entry.
pub fn push_entry(out: &mut Vec<u8>, which: usize, bytes: &[u8]) {
    out.push(which as u8);
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}
