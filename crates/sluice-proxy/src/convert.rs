//! Translation between protocol messages and broker messages.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use md5::{Digest as _, Md5};
use sluice_broker::{BrokerError, Delivery, Message, MessageType};
use sluice_proto::prost_types;
use sluice_proto::v2;

pub fn ts_to_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add((t.nanos / 1_000_000) as i64)
}

pub fn ms_to_ts(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn dur(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

pub fn to_pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn message_type(t: i32) -> Option<MessageType> {
    match v2::MessageType::try_from(t).ok()? {
        v2::MessageType::Normal => Some(MessageType::Normal),
        v2::MessageType::Fifo => Some(MessageType::Fifo),
        v2::MessageType::Delay => Some(MessageType::Delay),
        v2::MessageType::Transaction => Some(MessageType::Transaction),
        _ => None,
    }
}

pub fn pb_message_type(t: MessageType) -> v2::MessageType {
    match t {
        MessageType::Normal => v2::MessageType::Normal,
        MessageType::Fifo => v2::MessageType::Fifo,
        MessageType::Delay => v2::MessageType::Delay,
        MessageType::Transaction => v2::MessageType::Transaction,
    }
}

fn md5_upper(body: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let d = Md5::digest(body);
    let mut s = String::with_capacity(2 * d.len());
    for b in d {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xF)]));
    }
    s
}

/// Converts a message of a SendMessage request. GZIP bodies are inflated (bounded by
/// `max_body`); an MD5 body digest is verified.
pub fn from_pb(m: v2::Message, max_body: usize) -> Result<Message, BrokerError> {
    let sp = m.system_properties.unwrap_or_default();
    let topic = m.topic.map(|t| t.name).unwrap_or_default();
    let mut body = m.body;
    if sp.body_encoding == v2::Encoding::Gzip as i32 {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .take(max_body as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| BrokerError::BadRequest(format!("body is not valid gzip: {e}")))?;
        if out.len() > max_body {
            return Err(BrokerError::BodyTooLarge {
                size: out.len(),
                max: max_body,
            });
        }
        body = Bytes::from(out);
    }
    if let Some(d) = &sp.body_digest {
        if d.r#type == v2::DigestType::Md5 as i32
            && !d.checksum.eq_ignore_ascii_case(&md5_upper(&body))
        {
            return Err(BrokerError::BadRequest(
                "body digest does not match the body".into(),
            ));
        }
    }
    Ok(Message {
        topic,
        message_id: sp.message_id,
        tag: sp.tag,
        keys: sp.keys,
        user_properties: m.user_properties.into_iter().collect::<BTreeMap<_, _>>(),
        body,
        message_type: message_type(sp.message_type),
        message_group: sp.message_group,
        delivery_timestamp_ms: sp.delivery_timestamp.as_ref().map(ts_to_ms),
        born_timestamp_ms: sp.born_timestamp.as_ref().map(ts_to_ms).unwrap_or(0),
        born_host: sp.born_host,
        queue_id: u32::try_from(sp.queue_id).ok(),
        producer_client_id: None,
    })
}

/// Builds the protocol message of a delivery.
/// `ns`: the namespace of the client it goes to (see [`crate::namespace`]).
pub fn delivery_to_pb(
    d: &Delivery,
    store_host: &str,
    invisible: Duration,
    ns: &str,
) -> v2::Message {
    let m = &d.message;
    let sp = v2::SystemProperties {
        tag: m.tag.clone(),
        keys: m.keys.clone(),
        message_id: m.message_id.clone(),
        body_digest: Some(v2::Digest {
            r#type: v2::DigestType::Md5 as i32,
            checksum: md5_upper(&m.body),
        }),
        body_encoding: v2::Encoding::Identity as i32,
        message_type: pb_message_type(m.message_type.unwrap_or(MessageType::Normal)) as i32,
        born_timestamp: Some(ms_to_ts(m.born_timestamp_ms)),
        born_host: m.born_host.clone(),
        store_timestamp: Some(ms_to_ts(d.store_timestamp_ms)),
        store_host: store_host.to_owned(),
        delivery_timestamp: m.delivery_timestamp_ms.map(ms_to_ts),
        receipt_handle: Some(d.receipt_handle.clone()),
        queue_id: d.queue_id as i32,
        queue_offset: Some(d.queue_offset as i64),
        invisible_duration: Some(to_pb_duration(invisible)),
        delivery_attempt: Some(d.delivery_attempt as i32),
        message_group: m.message_group.clone(),
        ..Default::default()
    };
    v2::Message {
        topic: Some(crate::namespace::resource(ns, &m.topic)),
        user_properties: m.user_properties.clone().into_iter().collect(),
        system_properties: Some(sp),
        body: m.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn timestamps_round_trip() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1] {
            assert_eq!(ts_to_ms(&ms_to_ts(ms)), ms);
        }
    }

    #[test]
    fn gzip_bodies_are_inflated_with_a_bound() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&vec![b'a'; 10_000]).expect("gzip");
        let gz = enc.finish().expect("gzip");
        let m = v2::Message {
            system_properties: Some(v2::SystemProperties {
                body_encoding: v2::Encoding::Gzip as i32,
                message_id: "x".into(),
                ..Default::default()
            }),
            body: gz.into(),
            ..Default::default()
        };
        assert_eq!(
            from_pb(m.clone(), 20_000).expect("inflates").body.len(),
            10_000
        );
        assert!(matches!(
            from_pb(m, 5_000),
            Err(BrokerError::BodyTooLarge { .. })
        ));
    }

    #[test]
    fn digest_is_upper_md5_and_checked() {
        assert_eq!(md5_upper(b""), "D41D8CD98F00B204E9800998ECF8427E");
        let m = v2::Message {
            system_properties: Some(v2::SystemProperties {
                body_digest: Some(v2::Digest {
                    r#type: v2::DigestType::Md5 as i32,
                    checksum: "00".into(),
                }),
                ..Default::default()
            }),
            body: b"x".to_vec().into(),
            ..Default::default()
        };
        assert!(from_pb(m, 100).is_err());
    }
}
