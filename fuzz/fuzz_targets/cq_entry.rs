//! Consume-queue entries: `CqEntry::decode` on arbitrary bytes.
//!
//! Decoding succeeds exactly for 28-byte inputs, and then the documented little-endian
//! layout (`consume_queue` module docs) encodes the entry back to the same bytes. The
//! entry encoder of the store is crate-private, so the layout is re-stated here. The
//! input is also read as a whole consume-queue file (entry after entry), as readers do.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_store::CqEntry;
use sluice_store::consume_queue::CQ_ENTRY_SIZE;

const N: usize = CQ_ENTRY_SIZE as usize;

fn encode(e: &CqEntry) -> [u8; N] {
    let mut b = [0u8; N];
    b[0..8].copy_from_slice(&e.clog_offset.to_le_bytes());
    b[8..12].copy_from_slice(&e.size.to_le_bytes());
    b[12..20].copy_from_slice(&e.tag_hash.to_le_bytes());
    b[20..28].copy_from_slice(&e.store_ts.to_le_bytes());
    b
}

fn check_entry(bytes: &[u8]) {
    let decoded = CqEntry::decode(bytes);
    assert_eq!(decoded.is_some(), bytes.len() == N, "len {}", bytes.len());
    if let Some(e) = decoded {
        assert_eq!(&encode(&e)[..], bytes, "round trip of {e:?}");
        assert_eq!(e.is_hole(), e.size == 0);
    }
}

fuzz_target!(|data: &[u8]| {
    check_entry(data);
    let mut chunks = data.chunks_exact(N);
    for c in &mut chunks {
        check_entry(c);
    }
    check_entry(chunks.remainder());
    // Tag hashes reserve 0 for "no tag".
    assert_ne!(sluice_store::tag_hash(&String::from_utf8_lossy(data)), 0);
});
