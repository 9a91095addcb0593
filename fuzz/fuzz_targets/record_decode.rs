//! Commit-log records: `record::peek_size`, `record::verify` and `record::decode` on
//! arbitrary bytes (what recovery and reads do with whatever is on disk).
//!
//! Every input is tried twice: as is, and with its framing repaired (size, magic and CRC
//! rewritten) so that the variable part behind the CRC gate (topic, property and body
//! lengths) is what the fuzzer explores. A successful decode must account for every byte
//! of the record: re-encoding the decoded fields with an independent encoder gives the
//! input back.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_store::StoredMessage;
use sluice_store::record::{self, DecodeError, FIXED_OVERHEAD, MAGIC, RecordSummary};

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(fixed) = repair_framing(data) {
        check(&fixed);
    }
});

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Rewrites magic, total size (kept if plausible, else the input length) and CRC.
fn repair_framing(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < FIXED_OVERHEAD {
        return None;
    }
    let mut v = data.to_vec();
    let stored = u32_at(&v, 0)? as usize;
    let size = if (FIXED_OVERHEAD..=v.len()).contains(&stored) {
        stored
    } else {
        v.len()
    };
    v[0..4].copy_from_slice(&u32::try_from(size).ok()?.to_le_bytes());
    v[4..8].copy_from_slice(&MAGIC.to_le_bytes());
    let crc = crc32c::crc32c(&v[12..size]);
    v[8..12].copy_from_slice(&crc.to_le_bytes());
    Some(v)
}

fn check(data: &[u8]) {
    let peek = record::peek_size(data);
    if let Ok(size) = peek {
        assert!(size >= FIXED_OVERHEAD, "peek_size accepted {size}");
    }
    // The offset the record claims (so the position check can pass), and a wrong one.
    let claimed = u64_at(data, 28).unwrap_or(0);
    for offset in [claimed, claimed.wrapping_add(1)] {
        let verified = record::verify(data, offset);
        let decoded = record::decode(&Bytes::copy_from_slice(data), offset);
        match (&peek, &verified) {
            (Err(e), v) => assert_eq!(v.as_ref().err(), Some(e), "verify disagrees with peek"),
            (Ok(size), Ok(s)) => assert_eq!(s.size as usize, *size),
            (Ok(_), Err(_)) => {}
        }
        match (&verified, &decoded) {
            (Err(e), d) => assert_eq!(d.as_ref().err(), Some(e), "decode disagrees with verify"),
            (Ok(_), Err(e)) => assert!(
                matches!(e, DecodeError::Malformed(_)),
                "verified record failed to decode with {e:?}"
            ),
            (Ok(s), Ok(m)) => check_decoded(data, offset, s, m),
        }
        if offset != claimed && data.len() >= 36 {
            assert!(decoded.is_err(), "record decoded at the wrong offset");
        }
    }
}

fn check_decoded(data: &[u8], offset: u64, s: &RecordSummary, m: &StoredMessage) {
    let size = m.record_size as usize;
    assert_eq!(s.size, m.record_size);
    assert!(
        size >= FIXED_OVERHEAD && size <= data.len(),
        "size {size} of {}",
        data.len()
    );
    assert_eq!(m.physical_offset, offset);
    assert_eq!(
        (s.queue_id, s.queue_offset, s.store_ts),
        (m.queue_id, m.queue_offset, m.store_ts)
    );
    let rec = &data[..size];
    assert_eq!(s.topic(rec).ok(), Some(m.topic.as_str()));
    assert_eq!(s.properties(rec).ok().as_ref(), Some(&m.properties));

    // The body is the tail of the record.
    assert!(m.body.len() <= size - FIXED_OVERHEAD);
    assert_eq!(&m.body[..], &rec[size - m.body.len()..]);
    let props_len: usize = m
        .properties
        .iter()
        .map(|(k, v)| 4 + k.len() + v.len())
        .sum();
    assert_eq!(
        FIXED_OVERHEAD + m.topic.len() + props_len + m.body.len(),
        size
    );

    // Nothing was lost or invented: re-encoding gives the record back byte for byte.
    let again = sluice_fuzz::encode_record(
        m.flags,
        m.queue_id,
        m.queue_offset,
        m.physical_offset,
        m.born_ts,
        m.store_ts,
        &m.topic,
        &m.properties,
        &m.body,
    );
    assert_eq!(again, rec, "re-encoded record differs");

    // Accessors and the broker's conversion of a stored record.
    let _ = (m.msg_id(), m.tag(), m.keys().count());
    let msg = sluice_broker::broker::to_message(m);
    assert_eq!(msg.topic, m.topic);
    assert_eq!(msg.body, m.body);
    assert_eq!(msg.tag.as_deref(), m.tag());
    assert_eq!(msg.queue_id, Some(m.queue_id));
    assert!(msg.keys.iter().all(|k| !k.is_empty() && !k.contains(' ')));
}
