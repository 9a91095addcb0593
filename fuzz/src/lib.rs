//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! Nothing here is fuzzed itself; these are small reference implementations and adapters
//! the targets use to state properties about the code under test.

use sluice_broker::filter::MessageView;

/// An in-memory message for evaluating filters.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub tag: Option<String>,
    pub props: Vec<(String, String)>,
}

impl View {
    pub fn with_tag(tag: &str) -> View {
        View {
            tag: Some(tag.to_owned()),
            props: Vec::new(),
        }
    }
}

impl MessageView for View {
    fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    fn property(&self, key: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Independent encoder of the commit-log record layout documented in
/// `sluice_store::record` (the store's own encoder is crate-private). Used to check that a
/// successfully decoded record carries every byte of the input: re-encoding the decoded
/// fields must give the input back.
#[allow(clippy::too_many_arguments)]
pub fn encode_record(
    flags: u32,
    queue_id: u32,
    queue_offset: u64,
    physical_offset: u64,
    born_ts: i64,
    store_ts: i64,
    topic: &str,
    props: &[(String, String)],
    body: &[u8],
) -> Vec<u8> {
    let props_len: usize = props.iter().map(|(k, v)| 4 + k.len() + v.len()).sum();
    let total = sluice_store::record::FIXED_OVERHEAD + topic.len() + props_len + body.len();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_le_bytes());
    out.extend_from_slice(&sluice_store::record::MAGIC.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&queue_id.to_le_bytes());
    out.extend_from_slice(&queue_offset.to_le_bytes());
    out.extend_from_slice(&physical_offset.to_le_bytes());
    out.extend_from_slice(&born_ts.to_le_bytes());
    out.extend_from_slice(&store_ts.to_le_bytes());
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&(props_len as u32).to_le_bytes());
    for (k, v) in props {
        out.extend_from_slice(&(k.len() as u16).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out[12..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}
