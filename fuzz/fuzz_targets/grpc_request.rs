//! gRPC request bodies: arbitrary bytes decoded with prost as each of the main
//! `apache.rocketmq.v2` request messages the access point accepts.
//!
//! A decoded message must re-encode to exactly `encoded_len()` bytes and decode back to an
//! equal value (skipped when the value contains a NaN float, which is never equal to
//! itself). Then the public broker-side pieces the access point applies to requests run
//! on the decoded fields: receipt handles of Ack / ChangeInvisibleDuration are decoded,
//! the filter expression of a Receive is parsed and evaluated, and each message of a
//! SendMessage is evaluated by filters as a consumer would see it.
//!
//! The proxy's conversion and validation of a `SendMessageRequest`
//! (`sluice_proxy::convert::from_pb`) is crate-private, so it is not exercised here.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_broker::filter::{Filter, FilterKind};
use sluice_broker::handle::ReceiptHandle;
use sluice_fuzz::View;
use sluice_proto::prost::Message;
use sluice_proto::v2;

fuzz_target!(|data: &[u8]| {
    if let Some(req) = round_trip::<v2::SendMessageRequest>(data) {
        send(&req);
    }
    if let Some(req) = round_trip::<v2::ReceiveMessageRequest>(data) {
        receive(&req);
    }
    if let Some(req) = round_trip::<v2::AckMessageRequest>(data) {
        for e in &req.entries {
            receipt_handle(&e.receipt_handle);
        }
    }
    if let Some(req) = round_trip::<v2::ChangeInvisibleDurationRequest>(data) {
        receipt_handle(&req.receipt_handle);
    }
    let _ = round_trip::<v2::QueryRouteRequest>(data);
    let _ = round_trip::<v2::TelemetryCommand>(data);
});

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<M> {
    let m = M::decode(data).ok()?;
    let bytes = m.encode_to_vec();
    assert_eq!(bytes.len(), m.encoded_len());
    let again = M::decode(bytes.as_slice()).expect("re-encoded message must decode");
    assert_eq!(again.encoded_len(), bytes.len());
    #[allow(clippy::eq_op)]
    let comparable = m == m;
    if comparable {
        assert_eq!(again, m, "round trip changed the message");
    }
    Some(m)
}

fn receipt_handle(s: &str) {
    if let Ok(h) = ReceiptHandle::decode(s) {
        let enc = h.encode();
        // Over-long canonical encodings are a known issue (see the receipt_handle target).
        if enc.len() <= 512 {
            assert_eq!(ReceiptHandle::decode(&enc).ok(), Some(h));
        }
    }
}

fn view_of(m: &v2::Message) -> View {
    let sp = m.system_properties.as_ref();
    let mut props: Vec<(String, String)> = m
        .user_properties
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    props.sort();
    View {
        tag: sp.and_then(|s| s.tag.clone()),
        props,
    }
}

/// Filters a consumer might subscribe with; evaluated on every sent message.
const SUBSCRIPTIONS: &[(FilterKind, &str)] = &[
    (FilterKind::Tag, "*"),
    (FilterKind::Tag, "TagA || TagB"),
    (
        FilterKind::Sql,
        "TAGS IS NOT NULL AND TAGS IN ('TagA', 'TagB')",
    ),
    (
        FilterKind::Sql,
        "a > 1 AND b IN ('x', 'y') OR c LIKE '%_z%' OR d BETWEEN -1.5 AND 2e3",
    ),
    (
        FilterKind::Sql,
        "NOT (a <> b) OR c CONTAINS 'é' OR d STARTSWITH '' OR e = TRUE",
    ),
];

fn send(req: &v2::SendMessageRequest) {
    let filters: Vec<Filter> = SUBSCRIPTIONS
        .iter()
        .map(|(k, s)| Filter::parse(*k, s).expect("fixed subscriptions parse"))
        .collect();
    for m in req.messages.iter().take(16) {
        let v = view_of(m);
        for f in &filters {
            let _ = f.matches(&v);
        }
        if let Some(sp) = &m.system_properties {
            // What the edge reads from the system properties must not panic either.
            let _ = (sp.message_type(), sp.body_encoding());
            if let Some(d) = &sp.body_digest {
                let _ = d.r#type();
            }
        }
    }
}

fn receive(req: &v2::ReceiveMessageRequest) {
    let Some(fe) = &req.filter_expression else {
        return;
    };
    let kind = match v2::FilterType::try_from(fe.r#type) {
        Ok(v2::FilterType::Sql) => FilterKind::Sql,
        _ => FilterKind::Tag,
    };
    if let Ok(f) = Filter::parse(kind, &fe.expression) {
        let _ = f.matches(&View::default());
        let _ = f.matches(&View {
            tag: Some("TagA".to_owned()),
            props: vec![
                ("a".to_owned(), "2".to_owned()),
                ("b".to_owned(), "x".to_owned()),
            ],
        });
    }
}
