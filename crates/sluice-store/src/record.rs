//! Commit-log record format.
//!
//! Every message of every queue is one record in the commit log. A record never spans two
//! segment files. All integers are little-endian.
//!
//! ```text
//!  offset  size  field
//!  ------  ----  -----------------------------------------------------------------
//!       0     4  total_size      bytes of the whole record, this field included
//!       4     4  magic           0x534C_4331 ("SLC1")
//!       8     4  crc32c          CRC32C of bytes [12, total_size)
//!      12     4  flags           opaque to the store (message type bits of the broker)
//!      16     4  queue_id
//!      20     8  queue_offset    logical offset of the record in its consume queue
//!      28     8  physical_offset commit-log offset of byte 0 of this record
//!      36     8  born_ts         producer timestamp, ms since the Unix epoch
//!      44     8  store_ts        broker timestamp, ms since the Unix epoch (monotonic)
//!      52     2  topic_len       T
//!      54     T  topic           UTF-8
//!   54+T      4  props_len       P
//!   58+T      P  properties      repeated { u16 key_len, key, u16 value_len, value }
//! 58+T+P      4  body_len        B
//! 62+T+P      B  body
//! ```
//!
//! Invariants: `total_size == 62 + T + P + B`; `physical_offset` equals the position the
//! record was found at (a record copied or replayed elsewhere is detected); the CRC covers
//! every field after itself, so a torn or zero-filled tail never decodes.

use bytes::{BufMut, Bytes};

pub const MAGIC: u32 = 0x534C_4331;
/// Bytes of a record before the topic.
pub const FIXED_HEADER: usize = 54;
/// Bytes of a record that do not depend on topic, properties or body.
pub const FIXED_OVERHEAD: usize = FIXED_HEADER + 4 + 4;

/// Property key holding the message id (RocketMQ's unique key).
pub const PROP_MSG_ID: &str = "UNIQ_KEY";
/// Property key holding the tag.
pub const PROP_TAGS: &str = "TAGS";
/// Property key holding the business keys, separated by a single space.
pub const PROP_KEYS: &str = "KEYS";

/// A message as given to [`crate::Store::append`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppendMessage {
    pub topic: String,
    pub queue_id: u32,
    pub flags: u32,
    pub born_ts: i64,
    pub properties: Vec<(String, String)>,
    pub body: Bytes,
}

impl AppendMessage {
    pub fn property(&self, key: &str) -> Option<&str> {
        property(&self.properties, key)
    }

    /// Size of the encoded record.
    pub fn encoded_len(&self) -> usize {
        FIXED_OVERHEAD + self.topic.len() + props_len(&self.properties) + self.body.len()
    }
}

pub(crate) fn property<'a>(props: &'a [(String, String)], key: &str) -> Option<&'a str> {
    props
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn props_len(props: &[(String, String)]) -> usize {
    props.iter().map(|(k, v)| 4 + k.len() + v.len()).sum()
}

/// A record read back from the commit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub topic: String,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub physical_offset: u64,
    pub flags: u32,
    pub born_ts: i64,
    pub store_ts: i64,
    pub properties: Vec<(String, String)>,
    /// A slice of the buffer the record was read into (no further copy).
    pub body: Bytes,
    /// Size of the whole record on disk.
    pub record_size: u32,
}

impl StoredMessage {
    pub fn property(&self, key: &str) -> Option<&str> {
        property(&self.properties, key)
    }
    pub fn msg_id(&self) -> Option<&str> {
        self.property(PROP_MSG_ID)
    }
    pub fn tag(&self) -> Option<&str> {
        self.property(PROP_TAGS)
    }
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.property(PROP_KEYS)
            .into_iter()
            .flat_map(|k| k.split(' '))
            .filter(|k| !k.is_empty())
    }
}

/// Why bytes did not decode as a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("need {needed} bytes, {available} available")]
    Short { needed: usize, available: usize },
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("bad total size {0}")]
    BadSize(u32),
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    #[error("record claims physical offset {claimed}, found at {actual}")]
    WrongOffset { claimed: u64, actual: u64 },
    #[error("malformed field: {0}")]
    Malformed(&'static str),
}

/// Header fields assigned by the writer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Placement {
    pub queue_offset: u64,
    pub physical_offset: u64,
    pub store_ts: i64,
}

/// Appends the encoded record to `out`. The caller checked the sizes (u16/u32 limits) with
/// [`validate`].
pub(crate) fn encode(msg: &AppendMessage, at: Placement, out: &mut Vec<u8>) {
    let start = out.len();
    let total = msg.encoded_len();
    out.reserve(total);
    out.put_u32_le(total as u32);
    out.put_u32_le(MAGIC);
    out.put_u32_le(0); // crc, patched below
    out.put_u32_le(msg.flags);
    out.put_u32_le(msg.queue_id);
    out.put_u64_le(at.queue_offset);
    out.put_u64_le(at.physical_offset);
    out.put_i64_le(msg.born_ts);
    out.put_i64_le(at.store_ts);
    out.put_u16_le(msg.topic.len() as u16);
    out.put_slice(msg.topic.as_bytes());
    out.put_u32_le(props_len(&msg.properties) as u32);
    for (k, v) in &msg.properties {
        out.put_u16_le(k.len() as u16);
        out.put_slice(k.as_bytes());
        out.put_u16_le(v.len() as u16);
        out.put_slice(v.as_bytes());
    }
    out.put_u32_le(msg.body.len() as u32);
    out.put_slice(&msg.body);
    let crc = crc32c::crc32c(&out[start + 12..]);
    out[start + 8..start + 12].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(out.len() - start, total);
}

/// Checks that a message can be encoded at all.
pub(crate) fn validate(msg: &AppendMessage, max_record: usize) -> Result<(), String> {
    if msg.topic.len() > u16::MAX as usize {
        return Err("topic longer than 65535 bytes".into());
    }
    for (k, v) in &msg.properties {
        if k.len() > u16::MAX as usize || v.len() > u16::MAX as usize {
            return Err(format!("property {k:.32} longer than 65535 bytes"));
        }
    }
    let len = msg.encoded_len();
    if len > max_record {
        return Err(format!(
            "record of {len} bytes exceeds the limit of {max_record}"
        ));
    }
    Ok(())
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Reads the total size of a record from its first bytes, checking the magic.
pub fn peek_size(b: &[u8]) -> Result<usize, DecodeError> {
    if b.len() < 8 {
        return Err(DecodeError::Short {
            needed: 8,
            available: b.len(),
        });
    }
    let size = u32_at(b, 0);
    let magic = u32_at(b, 4);
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if (size as usize) < FIXED_OVERHEAD {
        return Err(DecodeError::BadSize(size));
    }
    Ok(size as usize)
}

/// Verifies the record at the start of `buf` (CRC, sizes, position) without decoding
/// properties or body. Returns the record size and its header summary.
pub fn verify(buf: &[u8], expected_offset: u64) -> Result<RecordSummary, DecodeError> {
    let size = peek_size(buf)?;
    if buf.len() < size {
        return Err(DecodeError::Short {
            needed: size,
            available: buf.len(),
        });
    }
    let rec = &buf[..size];
    let stored = u32_at(rec, 8);
    let computed = crc32c::crc32c(&rec[12..]);
    if stored != computed {
        return Err(DecodeError::Crc { stored, computed });
    }
    let physical = u64_at(rec, 28);
    if physical != expected_offset {
        return Err(DecodeError::WrongOffset {
            claimed: physical,
            actual: expected_offset,
        });
    }
    let topic_len = u16_at(rec, 52) as usize;
    let props_at = FIXED_HEADER + topic_len;
    if props_at + 4 > size {
        return Err(DecodeError::Malformed("topic length"));
    }
    let props_len = u32_at(rec, props_at) as usize;
    let body_len_at = props_at + 4 + props_len;
    if body_len_at + 4 > size {
        return Err(DecodeError::Malformed("properties length"));
    }
    let body_len = u32_at(rec, body_len_at) as usize;
    if body_len_at + 4 + body_len != size {
        return Err(DecodeError::Malformed("body length"));
    }
    Ok(RecordSummary {
        size: size as u32,
        queue_id: u32_at(rec, 16),
        queue_offset: u64_at(rec, 20),
        store_ts: u64_at(rec, 44) as i64,
        topic_range: (FIXED_HEADER, FIXED_HEADER + topic_len),
        props_range: (props_at + 4, body_len_at),
    })
}

/// Header fields of a verified record, and where its variable parts are.
#[derive(Debug, Clone, Copy)]
pub struct RecordSummary {
    pub size: u32,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub store_ts: i64,
    topic_range: (usize, usize),
    props_range: (usize, usize),
}

impl RecordSummary {
    pub fn topic<'a>(&self, rec: &'a [u8]) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(&rec[self.topic_range.0..self.topic_range.1])
            .map_err(|_| DecodeError::Malformed("topic is not UTF-8"))
    }
    pub fn properties(&self, rec: &[u8]) -> Result<Vec<(String, String)>, DecodeError> {
        decode_props(&rec[self.props_range.0..self.props_range.1])
    }
}

fn decode_props(mut b: &[u8]) -> Result<Vec<(String, String)>, DecodeError> {
    let mut out = Vec::new();
    let take = |b: &mut &[u8]| -> Result<String, DecodeError> {
        if b.len() < 2 {
            return Err(DecodeError::Malformed("property length"));
        }
        let n = u16_at(b, 0) as usize;
        if b.len() < 2 + n {
            return Err(DecodeError::Malformed("property length"));
        }
        let s = std::str::from_utf8(&b[2..2 + n])
            .map_err(|_| DecodeError::Malformed("property is not UTF-8"))?
            .to_owned();
        *b = &b[2 + n..];
        Ok(s)
    };
    while !b.is_empty() {
        let k = take(&mut b)?;
        let v = take(&mut b)?;
        out.push((k, v));
    }
    Ok(out)
}

/// Decodes the record at the start of `buf`, which was read from commit-log offset
/// `offset`. The body is a slice of `buf`.
pub fn decode(buf: &Bytes, offset: u64) -> Result<StoredMessage, DecodeError> {
    let s = verify(buf, offset)?;
    let rec = &buf[..s.size as usize];
    let body_start = s.props_range.1 + 4;
    Ok(StoredMessage {
        topic: s.topic(rec)?.to_owned(),
        queue_id: s.queue_id,
        queue_offset: s.queue_offset,
        physical_offset: offset,
        flags: u32_at(rec, 12),
        born_ts: u64_at(rec, 36) as i64,
        store_ts: s.store_ts,
        properties: s.properties(rec)?,
        body: buf.slice(body_start..s.size as usize),
        record_size: s.size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AppendMessage {
        AppendMessage {
            topic: "orders".into(),
            queue_id: 3,
            flags: 7,
            born_ts: 1_700_000_000_000,
            properties: vec![
                (PROP_TAGS.into(), "paid".into()),
                (PROP_KEYS.into(), "k1 k2".into()),
                ("user".into(), "ü".into()),
            ],
            body: Bytes::from_static(b"hello body"),
        }
    }

    fn encoded(at: u64) -> Vec<u8> {
        let mut out = Vec::new();
        encode(
            &sample(),
            Placement {
                queue_offset: 42,
                physical_offset: at,
                store_ts: 1_700_000_000_005,
            },
            &mut out,
        );
        out
    }

    #[test]
    fn round_trip() {
        let buf = Bytes::from(encoded(4096));
        assert_eq!(buf.len(), sample().encoded_len());
        let m = decode(&buf, 4096).expect("decodes");
        assert_eq!(m.topic, "orders");
        assert_eq!(m.queue_id, 3);
        assert_eq!(m.queue_offset, 42);
        assert_eq!(m.flags, 7);
        assert_eq!(m.store_ts, 1_700_000_000_005);
        assert_eq!(m.tag(), Some("paid"));
        assert_eq!(m.keys().collect::<Vec<_>>(), vec!["k1", "k2"]);
        assert_eq!(m.property("user"), Some("ü"));
        assert_eq!(&m.body[..], b"hello body");
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let good = encoded(0);
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    decode(&Bytes::from(bad), 0).is_err(),
                    "flip at {byte}:{bit}"
                );
            }
        }
    }

    #[test]
    fn truncation_and_position_are_detected() {
        let good = encoded(100);
        for len in 0..good.len() {
            assert!(decode(&Bytes::copy_from_slice(&good[..len]), 100).is_err());
        }
        assert!(matches!(
            decode(&Bytes::from(good), 0),
            Err(DecodeError::WrongOffset {
                claimed: 100,
                actual: 0
            })
        ));
        assert!(decode(&Bytes::from(vec![0u8; 128]), 0).is_err());
    }

    #[test]
    fn oversized_fields_are_refused() {
        let mut m = sample();
        assert!(validate(&m, 1 << 20).is_ok());
        assert!(validate(&m, 10).is_err());
        m.properties.push(("big".into(), "x".repeat(70_000)));
        assert!(validate(&m, 1 << 20).is_err());
    }
}
