//! Receipt handles: `ReceiptHandle::decode` on arbitrary UTF-8 (what a client sends back in
//! Ack / ChangeInvisibleDuration).
//!
//! Each input is tried as is and "sealed" (with its correct CRC32C appended), so the
//! fields behind the checksum gate get fuzzed too. A decoded handle must survive
//! `encode()` then `decode()` unchanged, and its encoding is a fixed point (except for
//! the known over-length case pinned in `check`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_broker::BrokerError;
use sluice_broker::handle::ReceiptHandle;

// Longest string `ReceiptHandle::decode` accepts.

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    check(&s);
    let sealed = format!("{s}~{:08x}", crc32c::crc32c(s.as_bytes()));
    check(&sealed);
});

fn check(s: &str) {
    match ReceiptHandle::decode(s) {
        Ok(h) => {
            assert!(!h.broker.contains('~') && !h.topic.contains('~'), "{h:?}");
            let enc = h.encode();
            // Only canonical spellings decode, so the encoding is the input itself.
            assert_eq!(enc, s, "decoded handle does not re-encode to its input");
            let again = ReceiptHandle::decode(&enc)
                .unwrap_or_else(|e| panic!("re-encoded handle {enc:?} does not decode: {e}"));
            assert_eq!(again, h, "round trip through {enc:?}");
            assert_eq!(again.encode(), enc);
        }
        Err(e) => {
            assert!(matches!(e, BrokerError::InvalidReceiptHandle(_)), "{e:?}");
            let _ = e.to_string();
        }
    }
}
