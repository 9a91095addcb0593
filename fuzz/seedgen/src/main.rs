//! Writes the seed corpora of the fuzz targets: `fuzz/corpus/<target>/seed-*`.
//!
//! Run from anywhere with `cargo run --manifest-path fuzz/Cargo.toml -p sluice-fuzz-seedgen`
//! (an optional argument overrides the output directory). Existing `seed-*` files of a
//! target are replaced; other files (inputs libFuzzer added) are left alone. Every seed is
//! produced by the real encoders (the store's commit log and consume queues, the broker's
//! receipt handles, prost) and checked to decode or parse before it is written.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sluice_broker::filter::{Filter, FilterKind};
use sluice_broker::handle::ReceiptHandle;
use sluice_proto::prost::Message as _;
use sluice_proto::{prost_types, v2};
use sluice_store::record::{self, PROP_KEYS, PROP_MSG_ID, PROP_TAGS};
use sluice_store::{AppendMessage, CqEntry, Store, StoreConfig};

#[path = "../../src/layout.rs"]
mod layout;

use layout::{BROKER_OPEN_FILES, LATER_SEGMENT, STORE_OPEN_FILES, push_entry, store_open_config};

type Seeds = Vec<(String, Vec<u8>)>;

fn main() {
    let out = std::env::args_os().nth(1).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus"),
        PathBuf::from,
    );
    let (records, entries) = store_seeds();
    write(&out, "record_decode", records);
    write(&out, "cq_entry", entries);
    write(&out, "receipt_handle", receipt_handle_seeds());
    write(&out, "sql_filter", sql_filter_seeds());
    write(&out, "grpc_request", grpc_request_seeds());
    write(&out, "store_open", store_open_seeds());
    write(&out, "broker_open", broker_open_seeds());
    write(&out, "grpc_service", grpc_service_seeds());
    write(&out, "admin_api", admin_api_seeds());
    write(&out, "http2_frames", http2_frames_seeds());
}

fn write(root: &Path, target: &str, seeds: Seeds) {
    let dir = root.join(target);
    fs::create_dir_all(&dir).expect("create corpus dir");
    for e in fs::read_dir(&dir).expect("list corpus dir") {
        let e = e.expect("dir entry");
        if e.file_name().to_string_lossy().starts_with("seed-") {
            fs::remove_file(e.path()).expect("remove old seed");
        }
    }
    let mut bytes = 0;
    for (name, data) in &seeds {
        bytes += data.len();
        fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
    }
    println!("{target}: {} seeds, {bytes} bytes", seeds.len());
}

fn msg(topic: &str, queue_id: u32, props: &[(&str, &str)], body: &[u8]) -> AppendMessage {
    AppendMessage {
        topic: topic.to_owned(),
        queue_id,
        flags: 0,
        born_ts: 1_700_000_000_000,
        properties: props
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        body: Bytes::copy_from_slice(body),
    }
}

/// Records and consume-queue entries exactly as a real store writes them to disk.
fn store_seeds() -> (Seeds, Seeds) {
    let dir = std::env::temp_dir().join(format!("sluice-fuzz-seedgen-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let store = Store::open(StoreConfig::small(&dir)).expect("open store");
    let mut fifo = msg("orders", 1, &[("MSG_GROUP", "g1")], b"second");
    fifo.flags = 1;
    let batch = vec![
        msg(
            "orders",
            3,
            &[
                (PROP_MSG_ID, "01E2031531CDD364F67E27B72000000004"),
                (PROP_TAGS, "TagA"),
                (PROP_KEYS, "k1 k2"),
                ("color", "blue"),
            ],
            b"hello body",
        ),
        fifo,
        msg("t", 0, &[], b""),
        msg(
            "%RETRY%g-1|x_y",
            7,
            &[("", ""), ("k\u{00e9}y", "v\u{2603}")],
            &[0, 1, 2, 255],
        ),
        msg("orders", 3, &[(PROP_TAGS, "TagB")], &[b'x'; 64]),
    ];
    let results = store.append_blocking(batch).expect("append");
    store.close();
    drop(store);

    let clog = read_single_file(&dir.join("commitlog"));
    let mut records = Seeds::new();
    for (i, r) in results.iter().enumerate() {
        let at = usize::try_from(r.physical_offset).expect("offset fits");
        let rec = &clog[at..at + r.size as usize];
        let decoded = record::decode(&Bytes::copy_from_slice(rec), r.physical_offset)
            .expect("stored record decodes");
        assert_eq!(decoded.record_size, r.size);
        records.push((format!("record-{i}"), rec.to_vec()));
    }
    // Two records back to back (decode reads the first), and a torn record.
    let first_two = (results[0].size + results[1].size) as usize;
    records.push(("two-records".to_owned(), clog[..first_two].to_vec()));
    records.push((
        "torn-record".to_owned(),
        clog[..results[0].size as usize - 5].to_vec(),
    ));

    let mut entries = Seeds::new();
    for (topic, queue) in [("orders", 3), ("orders", 1)] {
        let cq = read_single_file(&dir.join("consumequeue").join(topic).join(queue.to_string()));
        for (i, chunk) in cq.chunks_exact(28).take(2).enumerate() {
            let e = CqEntry::decode(chunk).expect("28-byte entry decodes");
            assert!(
                results
                    .iter()
                    .any(|r| r.physical_offset == e.clog_offset && r.size == e.size)
            );
            entries.push((format!("{topic}-{queue}-{i}"), chunk.to_vec()));
        }
    }
    entries.push(("hole".to_owned(), vec![0; 28]));
    entries.push((
        "two-entries".to_owned(),
        [&entries[0].1[..], &entries[1].1[..]].concat(),
    ));
    entries.push(("short".to_owned(), entries[0].1[..27].to_vec()));

    fs::remove_dir_all(&dir).expect("remove temp store");
    (records, entries)
}

/// The only file of a directory, without trailing preallocated zeros.
fn read_single_file(dir: &Path) -> Vec<u8> {
    let files: Vec<_> = fs::read_dir(dir)
        .expect("list store dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    assert_eq!(files.len(), 1, "expected one file in {}", dir.display());
    fs::read(&files[0]).expect("read store file")
}

/// Packs the files of a data directory that the target knows into its archive format:
/// `[which: u8][len: u32 LE][bytes]` per file. Trailing zeros (the reserved end of an
/// active segment or queue file) are left out: they read the same as a shorter file.
fn pack(dir: &Path, skip: &[usize], cut: Option<(usize, usize)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, rel) in STORE_OPEN_FILES.iter().enumerate() {
        let (path, prefix) = if *rel == LATER_SEGMENT {
            // The second segment, named by its start offset: the offset goes first.
            let mut names: Vec<String> = fs::read_dir(dir.join("commitlog"))
                .expect("list segments")
                .map(|e| {
                    e.expect("dir entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            names.sort();
            let Some(second) = names.get(1) else {
                continue;
            };
            let start: u64 = second.parse().expect("segment name is an offset");
            (
                dir.join("commitlog").join(second),
                start.to_le_bytes().to_vec(),
            )
        } else {
            (dir.join(rel), Vec::new())
        };
        let Ok(mut b) = fs::read(path) else {
            continue;
        };
        if skip.contains(&i) {
            continue;
        }
        let end = b.iter().rposition(|x| *x != 0).map_or(0, |p| p + 1);
        b.truncate(end);
        if let Some((which, keep)) = cut
            && which == i
        {
            b.truncate(keep.min(b.len()));
        }
        push_entry(&mut out, i, &[prefix, b].concat());
    }
    out
}

/// Whole data directories written by a real store: two segments, two consume-queue files
/// of one queue, index entries for ids and keys, a checkpoint; and damaged variants.
fn store_open_seeds() -> Seeds {
    let dir = std::env::temp_dir().join(format!("sluice-fuzz-seedgen-open-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let store = Store::open(store_open_config(&dir)).expect("open store");
    let body = vec![b'b'; 300];
    for i in 0..100u32 {
        let (topic, queue) = match i % 5 {
            0 => ("u", 3),
            1 => ("t", 1),
            _ => ("t", 0),
        };
        let id = format!("id-{i}");
        let key = format!("k{}", i % 4);
        store
            .append_blocking(vec![msg(
                topic,
                queue,
                &[(PROP_MSG_ID, &id), (PROP_KEYS, &key), (PROP_TAGS, "TagA")],
                &body[..(i as usize * 37) % 300],
            )])
            .expect("append");
    }
    store.close();
    drop(store);
    let segments = fs::read_dir(dir.join("commitlog")).expect("list").count();
    assert_eq!(
        segments, 2,
        "the seed store should span exactly two segments"
    );
    for rel in &STORE_OPEN_FILES[..9] {
        let seen = *rel == LATER_SEGMENT;
        assert!(
            seen || dir.join(rel).is_file(),
            "the seed store wrote no {rel}"
        );
    }
    let seeds = vec![
        ("clean".to_owned(), pack(&dir, &[], None)),
        ("no-checkpoint".to_owned(), pack(&dir, &[0], None)),
        (
            "commit-log-only".to_owned(),
            pack(&dir, &[0, 3, 4, 5, 6, 7, 8], None),
        ),
        ("torn-tail".to_owned(), pack(&dir, &[], Some((2, 1000)))),
        (
            "short-queue-file".to_owned(),
            pack(&dir, &[], Some((3, 100))),
        ),
        ("short-index".to_owned(), pack(&dir, &[], Some((7, 70)))),
    ];
    fs::remove_dir_all(&dir).expect("remove temp store");
    seeds
}

/// The persisted state of a real broker: topics of every type, groups, messages in flight
/// and acknowledged, committed offsets, a pending transaction and pending delay messages.
fn broker_open_seeds() -> Seeds {
    use sluice_broker::broker::{Broker, BrokerConfig};
    use sluice_broker::filter::FilterKind;
    use sluice_broker::messaging::{Message, Messaging, ReceiveRequest};
    use sluice_broker::meta::MessageType;
    use std::sync::Arc;
    use std::time::Duration;

    let dir =
        std::env::temp_dir().join(format!("sluice-fuzz-seedgen-broker-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let store = Arc::new(Store::open(StoreConfig::small(dir.join("store"))).expect("store"));
    let clock = Arc::new(sluice_common::clock::SystemClock);
    let broker = Broker::open(BrokerConfig::new(&dir), store.clone(), clock).expect("broker");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    rt.block_on(async {
        for (name, ty, queues) in [
            ("orders", MessageType::Normal, 4),
            ("seq", MessageType::Fifo, 2),
            ("later", MessageType::Delay, 2),
            ("tx", MessageType::Transaction, 2),
        ] {
            broker.create_topic(name, ty, queues).expect("topic");
        }
        broker
            .create_group("g1", false, Some(3), None, None)
            .expect("group");
        broker
            .create_group("gf", true, None, None, None)
            .expect("group");
        let m = |topic: &str, i: u32, ty: MessageType| Message {
            topic: topic.into(),
            message_id: format!("01SEED{i:022}"),
            tag: Some("TagA".into()),
            keys: vec![format!("k{i}")],
            body: Bytes::from(format!("body {i}")),
            message_type: Some(ty),
            message_group: (ty == MessageType::Fifo).then(|| "grp".into()),
            delivery_timestamp_ms: (ty == MessageType::Delay)
                .then_some(now + if i % 2 == 0 { 3_600_000 } else { 172_800_000 }),
            born_timestamp_ms: now,
            born_host: "seed".into(),
            ..Message::default()
        };
        let mut batch = Vec::new();
        for i in 0..10 {
            batch.push(m("orders", i, MessageType::Normal));
        }
        for i in 10..14 {
            batch.push(m("seq", i, MessageType::Fifo));
        }
        for i in 14..17 {
            batch.push(m("later", i, MessageType::Delay));
        }
        batch.push(m("tx", 17, MessageType::Transaction));
        for r in broker.send(batch).await {
            r.expect("send");
        }
        for (group, topic) in [("g1", "orders"), ("gf", "seq"), ("g1", "seq")] {
            let got = broker
                .receive(ReceiveRequest {
                    group: group.into(),
                    topic: topic.into(),
                    filter: sluice_broker::filter::Filter::parse(FilterKind::Tag, "*")
                        .expect("filter"),
                    max_messages: 4,
                    invisible: Duration::from_secs(60),
                    long_poll: Duration::ZERO,
                })
                .await
                .expect("receive");
            let handles: Vec<String> = got
                .iter()
                .take(2)
                .map(|d| d.receipt_handle.clone())
                .collect();
            for r in broker.ack_many(group, topic, &handles).await {
                r.expect("ack");
            }
        }
        broker.snapshot_pop().expect("snapshot");
    });
    drop(broker);
    store.close();
    let mut out = Vec::new();
    for (i, rel) in BROKER_OPEN_FILES.iter().enumerate() {
        if let Ok(b) = fs::read(dir.join(rel)) {
            push_entry(&mut out, i, &b);
        }
    }
    for rel in &BROKER_OPEN_FILES[..5] {
        assert!(dir.join(rel).is_file(), "the seed broker wrote no {rel}");
    }
    let meta_only: Vec<u8> = {
        let mut v = Vec::new();
        for (i, rel) in BROKER_OPEN_FILES[..2].iter().enumerate() {
            let b = fs::read(dir.join(rel)).expect("read");
            push_entry(&mut v, i, &b);
        }
        v
    };
    fs::remove_dir_all(&dir).expect("remove temp broker");
    vec![
        ("state".to_owned(), out),
        ("metadata-only".to_owned(), meta_only),
    ]
}

fn receipt_handle_seeds() -> Seeds {
    let handles = [
        ReceiptHandle {
            broker: "broker-0".into(),
            topic: "orders".into(),
            queue_id: 3,
            offset: 42,
            attempt: 1,
            nonce: 0x0123_4567_89ab_cdef,
        },
        ReceiptHandle {
            broker: String::new(),
            topic: "%RETRY%group".into(),
            queue_id: u32::MAX,
            offset: u64::MAX,
            attempt: 17,
            nonce: u64::MAX,
        },
        ReceiptHandle {
            broker: "b\u{00e9}".into(),
            topic: "t\u{2603}".into(),
            queue_id: 0,
            offset: 0,
            attempt: 0,
            nonce: 0,
        },
    ];
    let mut seeds = Seeds::new();
    for (i, h) in handles.iter().enumerate() {
        let s = h.encode();
        assert_eq!(ReceiptHandle::decode(&s).ok().as_ref(), Some(h));
        seeds.push((format!("handle-{i}"), s.clone().into_bytes()));
        if i == 0 {
            // Without its checksum: the target seals inputs itself.
            let (body, _) = s.rsplit_once('~').expect("has a checksum");
            seeds.push(("unsealed".to_owned(), body.as_bytes().to_vec()));
        }
    }
    seeds
}

fn sql_filter_seeds() -> Seeds {
    let sql = [
        "a > 1 AND b IN ('x','y')",
        "TAGS IN ('TagA', 'TagB') OR TAGS IS NULL",
        "a IS NULL OR b IS NOT NULL",
        "price BETWEEN 1.5 AND 2e3 AND qty NOT BETWEEN -10 AND 10",
        "name LIKE 'a%b_c' OR name NOT LIKE '!%%' ESCAPE '!'",
        "NOT (x = 'it''s') AND y <> 'z'",
        "a <> b OR a = b OR a >= b OR a.b$c != c_d",
        "color CONTAINS 'bl' AND color NOT STARTSWITH 'x' AND color ENDSWITH 'e'",
        "flag = TRUE OR flag <> FALSE OR TRUE",
        "n >= -12 OR n < 3.25 OR n <= 9223372036854775807 OR 5 > n",
        "((((a = 'a'))) and not (b in ('b')) or c is null)",
    ];
    let mut seeds = Seeds::new();
    for (i, s) in sql.iter().enumerate() {
        Filter::parse(FilterKind::Sql, s).unwrap_or_else(|e| panic!("seed {s:?}: {e}"));
        seeds.push((format!("sql-{i}"), s.as_bytes().to_vec()));
    }
    // With an explicit message: properties and a tag after a NUL byte.
    seeds.push((
        "sql-with-message".to_owned(),
        b"a > 1 AND b IN ('x','y') AND TAGS = 'TagA'\0a=5\nb=y\nTagA".to_vec(),
    ));
    for (i, s) in ["TagA||TagB", "*", " a || b||a ||||  c ", "a|||b"]
        .iter()
        .enumerate()
    {
        seeds.push((format!("tag-{i}"), s.as_bytes().to_vec()));
    }
    seeds.push(("syntax-error".to_owned(), b"a = 1 )".to_vec()));
    seeds
}

fn resource(name: &str) -> Option<v2::Resource> {
    Some(v2::Resource {
        resource_namespace: String::new(),
        name: name.to_owned(),
    })
}

/// Requests for the `grpc_service` target: `[rpc: u8][request]`, the RPC numbered as in
/// the target, naming the topics and groups its server holds (`t`, `f`, `d`, `x`; `g`, `gf`).
fn grpc_service_seeds() -> Seeds {
    let dur = |seconds: i64| Some(prost_types::Duration { seconds, nanos: 0 });
    let queue = |topic: &str, id: i32| {
        Some(v2::MessageQueue {
            topic: resource(topic),
            id,
            ..Default::default()
        })
    };
    let message =
        |topic: &str, ty: v2::MessageType, group: Option<&str>, at: Option<i64>| v2::Message {
            topic: resource(topic),
            user_properties: HashMap::from([("a".to_owned(), "5".to_owned())]),
            system_properties: Some(v2::SystemProperties {
                tag: Some("TagA".to_owned()),
                keys: vec!["k1".to_owned()],
                message_id: format!("01SEED{topic}0000000000000000000000"),
                message_type: ty as i32,
                message_group: group.map(str::to_owned),
                delivery_timestamp: at.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
                born_timestamp: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                }),
                born_host: "10.0.0.1".to_owned(),
                ..Default::default()
            }),
            body: b"hello".to_vec().into(),
        };
    let handle = ReceiptHandle {
        broker: "sluice".into(),
        topic: "t".into(),
        queue_id: 1,
        offset: 0,
        attempt: 1,
        nonce: 7,
    }
    .encode();
    let receive =
        |group: &str, topic: &str, kind: v2::FilterType, expr: &str| v2::ReceiveMessageRequest {
            group: resource(group),
            message_queue: queue(topic, 0),
            filter_expression: Some(v2::FilterExpression {
                r#type: kind as i32,
                expression: expr.to_owned(),
            }),
            batch_size: 8,
            invisible_duration: dur(30),
            auto_renew: false,
            long_polling_timeout: dur(1),
            attempt_id: None,
        };
    let mut seeds: Vec<(String, u8, Vec<u8>)> = vec![
        (
            "route".into(),
            0,
            v2::QueryRouteRequest {
                topic: resource("t"),
                endpoints: None,
            }
            .encode_to_vec(),
        ),
        (
            "heartbeat".into(),
            1,
            v2::HeartbeatRequest {
                group: resource("g"),
                client_type: v2::ClientType::SimpleConsumer as i32,
            }
            .encode_to_vec(),
        ),
        (
            "send".into(),
            2,
            v2::SendMessageRequest {
                messages: vec![
                    message("t", v2::MessageType::Normal, None, None),
                    message("t", v2::MessageType::Normal, None, None),
                ],
            }
            .encode_to_vec(),
        ),
        (
            "send-fifo".into(),
            2,
            v2::SendMessageRequest {
                messages: vec![message("f", v2::MessageType::Fifo, Some("grp"), None)],
            }
            .encode_to_vec(),
        ),
        (
            "send-delay".into(),
            2,
            v2::SendMessageRequest {
                messages: vec![message(
                    "d",
                    v2::MessageType::Delay,
                    None,
                    Some(4_000_000_000),
                )],
            }
            .encode_to_vec(),
        ),
        (
            "send-transaction".into(),
            2,
            v2::SendMessageRequest {
                messages: vec![message("x", v2::MessageType::Transaction, None, None)],
            }
            .encode_to_vec(),
        ),
        (
            "assignment".into(),
            3,
            v2::QueryAssignmentRequest {
                topic: resource("t"),
                group: resource("g"),
                endpoints: None,
            }
            .encode_to_vec(),
        ),
        (
            "receive".into(),
            4,
            receive("g", "t", v2::FilterType::Tag, "*").encode_to_vec(),
        ),
        (
            "receive-sql".into(),
            4,
            receive(
                "g",
                "t",
                v2::FilterType::Sql,
                "a > 1 AND (b IS NULL OR b IN ('x'))",
            )
            .encode_to_vec(),
        ),
        (
            "receive-fifo".into(),
            4,
            receive("gf", "f", v2::FilterType::Tag, "TagA||TagB").encode_to_vec(),
        ),
        (
            "ack".into(),
            5,
            v2::AckMessageRequest {
                group: resource("g"),
                topic: resource("t"),
                entries: vec![v2::AckMessageEntry {
                    message_id: "m".into(),
                    receipt_handle: handle.clone(),
                    lite_topic: None,
                }],
            }
            .encode_to_vec(),
        ),
        (
            "dead-letter".into(),
            6,
            v2::ForwardMessageToDeadLetterQueueRequest {
                group: resource("g"),
                topic: resource("t"),
                receipt_handle: handle.clone(),
                message_id: "m".into(),
                delivery_attempt: 2,
                max_delivery_attempts: 2,
                lite_topic: None,
            }
            .encode_to_vec(),
        ),
        (
            "pull".into(),
            7,
            v2::PullMessageRequest {
                group: resource("g"),
                message_queue: queue("t", 1),
                offset: 0,
                batch_size: 8,
                filter_expression: None,
                long_polling_timeout: dur(1),
            }
            .encode_to_vec(),
        ),
        (
            "update-offset".into(),
            8,
            v2::UpdateOffsetRequest {
                group: resource("g"),
                message_queue: queue("t", 1),
                offset: 1,
            }
            .encode_to_vec(),
        ),
        (
            "get-offset".into(),
            9,
            v2::GetOffsetRequest {
                group: resource("g"),
                message_queue: queue("t", 1),
            }
            .encode_to_vec(),
        ),
        (
            "query-offset".into(),
            10,
            v2::QueryOffsetRequest {
                message_queue: queue("t", 1),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "end-transaction".into(),
            11,
            v2::EndTransactionRequest {
                topic: resource("x"),
                message_id: "01SEEDx0000000000000000000000".into(),
                transaction_id: "tx-1".into(),
                resolution: v2::TransactionResolution::Commit as i32,
                source: v2::TransactionSource::SourceClient as i32,
                trace_context: String::new(),
            }
            .encode_to_vec(),
        ),
        (
            "terminate".into(),
            12,
            v2::NotifyClientTerminationRequest {
                group: resource("g"),
            }
            .encode_to_vec(),
        ),
        (
            "change-invisible".into(),
            13,
            v2::ChangeInvisibleDurationRequest {
                group: resource("g"),
                topic: resource("t"),
                receipt_handle: handle,
                invisible_duration: dur(10),
                message_id: "m".into(),
                lite_topic: None,
                suspend: None,
            }
            .encode_to_vec(),
        ),
        (
            "recall".into(),
            14,
            v2::RecallMessageRequest {
                topic: resource("d"),
                recall_handle: "garbage".into(),
            }
            .encode_to_vec(),
        ),
    ];
    let settings = v2::TelemetryCommand {
        status: None,
        command: Some(v2::telemetry_command::Command::Settings(v2::Settings {
            client_type: Some(v2::ClientType::SimpleConsumer as i32),
            pub_sub: Some(v2::settings::PubSub::Subscription(v2::Subscription {
                group: resource("g"),
                subscriptions: vec![v2::SubscriptionEntry {
                    topic: resource("t"),
                    expression: Some(v2::FilterExpression {
                        r#type: v2::FilterType::Tag as i32,
                        expression: "*".into(),
                    }),
                }],
                ..Default::default()
            })),
            ..Default::default()
        })),
    };
    seeds.push(("telemetry".into(), 15, settings.encode_to_vec()));
    seeds
        .into_iter()
        .map(|(name, rpc, body)| (name, [vec![rpc], body].concat()))
        .collect()
}

/// Requests for the `admin_api` target: `[method: u8]path\nbody`, method 0 GET, 1 POST,
/// 2 PUT, 3 DELETE; they name the topics `t`, `f` and the group `g` its broker holds.
fn admin_api_seeds() -> Seeds {
    let reqs: [(&str, u8, &str, &str); 20] = [
        ("healthz", 0, "/healthz", ""),
        ("metrics", 0, "/metrics", ""),
        ("broker", 0, "/api/v1/broker", ""),
        ("topics", 0, "/api/v1/topics", ""),
        ("topic", 0, "/api/v1/topics/t", ""),
        (
            "create-topic",
            1,
            "/api/v1/topics",
            r#"{"name":"n1","type":"delay","queues":2}"#,
        ),
        (
            "update-topic",
            2,
            "/api/v1/topics/t",
            r#"{"type":"normal","queues":8}"#,
        ),
        ("delete-topic", 3, "/api/v1/topics/f", ""),
        (
            "messages-by-key",
            0,
            "/api/v1/topics/t/messages?key=k&begin_ms=0&end_ms=9999999999999",
            "",
        ),
        (
            "messages-at",
            0,
            "/api/v1/topics/t/messages?queue=1&offset=0&max=4&preview_bytes=8",
            "",
        ),
        ("groups", 0, "/api/v1/groups", ""),
        ("group", 0, "/api/v1/groups/g", ""),
        (
            "create-group",
            1,
            "/api/v1/groups",
            r#"{"name":"g2","fifo":true,"max_attempts":3,"backoff":{"initial_ms":10,"max_ms":100,"multiplier":2.0},"start":{"timestamp_ms":5}}"#,
        ),
        (
            "update-group",
            2,
            "/api/v1/groups/g",
            r#"{"max_attempts":5,"start":"earliest"}"#,
        ),
        ("delete-group", 3, "/api/v1/groups/g2", ""),
        (
            "reset-offset",
            1,
            "/api/v1/groups/g/reset-offset",
            r#"{"topic":"t","timestamp_ms":0}"#,
        ),
        (
            "resend",
            1,
            "/api/v1/groups/g/dead-letters/resend",
            r#"{"max":10}"#,
        ),
        (
            "message-by-id",
            0,
            "/api/v1/messages/01FUZZADMIN00000000000000000",
            "",
        ),
        ("not-found", 0, "/api/v2/nothing", ""),
        ("bad-json", 1, "/api/v1/topics", r#"{"name":"#),
    ];
    reqs.iter()
        .map(|(name, m, path, body)| {
            (
                (*name).to_owned(),
                [&[*m][..], path.as_bytes(), b"\n", body.as_bytes()].concat(),
            )
        })
        .collect()
}

fn grpc_request_seeds() -> Seeds {
    let handle = ReceiptHandle {
        broker: "broker-0".into(),
        topic: "orders".into(),
        queue_id: 3,
        offset: 42,
        attempt: 1,
        nonce: 0x0123_4567_89ab_cdef,
    }
    .encode();
    let send = v2::SendMessageRequest {
        messages: vec![v2::Message {
            topic: resource("orders"),
            user_properties: HashMap::from([("a".to_owned(), "5".to_owned())]),
            system_properties: Some(v2::SystemProperties {
                tag: Some("TagA".to_owned()),
                keys: vec!["k1".to_owned()],
                message_id: "01E2031531CDD364F67E27B72000000004".to_owned(),
                body_digest: Some(v2::Digest {
                    r#type: v2::DigestType::Md5 as i32,
                    // MD5 of "hello"
                    checksum: "5D41402ABC4B2A76B9719D911017C592".to_owned(),
                }),
                message_type: v2::MessageType::Normal as i32,
                born_timestamp: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5_000_000,
                }),
                born_host: "10.0.0.1".to_owned(),
                queue_id: 3,
                ..Default::default()
            }),
            body: b"hello".to_vec().into(),
        }],
    };
    let send_fifo = v2::SendMessageRequest {
        messages: vec![v2::Message {
            topic: resource("fifo-topic"),
            user_properties: HashMap::new(),
            system_properties: Some(v2::SystemProperties {
                message_id: "m2".to_owned(),
                message_type: v2::MessageType::Fifo as i32,
                message_group: Some("g1".to_owned()),
                body_encoding: v2::Encoding::Gzip as i32,
                ..Default::default()
            }),
            body: vec![0x1f, 0x8b, 0x08, 0x00].into(),
        }],
    };
    let receive = v2::ReceiveMessageRequest {
        group: resource("group-a"),
        message_queue: None,
        filter_expression: Some(v2::FilterExpression {
            r#type: v2::FilterType::Sql as i32,
            expression: "a > 1 AND b IN ('x','y')".to_owned(),
        }),
        batch_size: 16,
        invisible_duration: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        auto_renew: false,
        long_polling_timeout: Some(prost_types::Duration {
            seconds: 20,
            nanos: 0,
        }),
        attempt_id: Some("attempt-1".to_owned()),
    };
    let ack = v2::AckMessageRequest {
        group: resource("group-a"),
        topic: resource("orders"),
        entries: vec![v2::AckMessageEntry {
            message_id: "m1".to_owned(),
            receipt_handle: handle.clone(),
            lite_topic: None,
        }],
    };
    let change = v2::ChangeInvisibleDurationRequest {
        group: resource("group-a"),
        topic: resource("orders"),
        receipt_handle: handle,
        invisible_duration: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
        message_id: "m1".to_owned(),
        lite_topic: None,
        suspend: Some(false),
    };
    let route = v2::QueryRouteRequest {
        topic: resource("orders"),
        endpoints: None,
    };
    let telemetry = v2::TelemetryCommand {
        status: None,
        command: Some(v2::telemetry_command::Command::Settings(v2::Settings {
            client_type: Some(v2::ClientType::Producer as i32),
            backoff_policy: Some(v2::RetryPolicy {
                max_attempts: 3,
                strategy: Some(v2::retry_policy::Strategy::ExponentialBackoff(
                    v2::ExponentialBackoff {
                        initial: Some(prost_types::Duration {
                            seconds: 0,
                            nanos: 10_000_000,
                        }),
                        max: Some(prost_types::Duration {
                            seconds: 1,
                            nanos: 0,
                        }),
                        multiplier: 2.0,
                    },
                )),
            }),
            ..Default::default()
        })),
    };
    let seeds = vec![
        ("send".to_owned(), send.encode_to_vec()),
        ("send-fifo-gzip".to_owned(), send_fifo.encode_to_vec()),
        ("receive".to_owned(), receive.encode_to_vec()),
        ("ack".to_owned(), ack.encode_to_vec()),
        ("change-invisible".to_owned(), change.encode_to_vec()),
        ("query-route".to_owned(), route.encode_to_vec()),
        ("telemetry-settings".to_owned(), telemetry.encode_to_vec()),
    ];
    assert_eq!(
        v2::SendMessageRequest::decode(seeds[0].1.as_slice()).expect("decodes"),
        send
    );
    seeds
}

/// An HTTP/2 frame: 24-bit length, type, flags, stream id, payload (RFC 9113 §4.1).
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The HPACK header block of a gRPC call to `rpc`: `:method POST` and `:scheme http` from
/// the static table, the rest literals without indexing and without Huffman coding.
fn h2_request_headers(rpc: &str) -> Vec<u8> {
    fn literal(out: &mut Vec<u8>, static_name: u8, name: &str, value: &str) {
        if static_name == 0 {
            out.push(0x00);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
        } else if static_name < 15 {
            out.push(static_name);
        } else {
            out.extend_from_slice(&[0x0f, static_name - 15]);
        }
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    let mut h = vec![0x83, 0x86];
    literal(
        &mut h,
        4,
        "",
        &format!("/apache.rocketmq.v2.MessagingService/{rpc}"),
    );
    literal(&mut h, 31, "", "application/grpc");
    literal(&mut h, 0, "te", "trailers");
    literal(&mut h, 0, "x-mq-client-id", "fuzz@1@1@1");
    h
}

/// A gRPC length-prefixed message.
fn grpc_message(m: &impl sluice_proto::prost::Message) -> Vec<u8> {
    let pb = m.encode_to_vec();
    let mut out = vec![0];
    out.extend_from_slice(&(pb.len() as u32).to_be_bytes());
    out.extend_from_slice(&pb);
    out
}

/// Frames sent after the client preface: whole gRPC calls, and the frames around them
/// (SETTINGS, WINDOW_UPDATE, PING, CONTINUATION, RST_STREAM, GOAWAY).
fn http2_frames_seeds() -> Seeds {
    const HEADERS: u8 = 1;
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;
    let settings = h2_frame(4, 0, 0, &[]);
    let route = grpc_message(&v2::QueryRouteRequest {
        topic: resource("t"),
        endpoints: None,
    });
    let send = grpc_message(&v2::SendMessageRequest {
        messages: vec![v2::Message {
            topic: resource("t"),
            user_properties: HashMap::from([("a".to_owned(), "1".to_owned())]),
            system_properties: Some(v2::SystemProperties {
                message_id: "01FUZZ".to_owned(),
                tag: Some("TagA".to_owned()),
                ..Default::default()
            }),
            body: b"hello".to_vec().into(),
        }],
    });
    let route_headers = h2_request_headers("QueryRoute");
    let call = |stream: u32, headers: &[u8], body: &[u8]| {
        let mut out = h2_frame(HEADERS, END_HEADERS, stream, headers);
        out.extend(h2_frame(0, END_STREAM, stream, body));
        out
    };
    let mut seeds = Seeds::new();
    let mut s = settings.clone();
    s.extend(call(1, &route_headers, &route));
    seeds.push(("query_route".into(), s));
    let mut s = settings.clone();
    s.extend(call(1, &h2_request_headers("SendMessage"), &send));
    s.extend(call(3, &h2_request_headers("SendMessage"), &send));
    seeds.push(("send_message_twice".into(), s));
    // A small initial window, a connection WINDOW_UPDATE, a PING, a header block split
    // into HEADERS + CONTINUATION, and a body in two DATA frames with a stream
    // WINDOW_UPDATE between them.
    let mut s = h2_frame(4, 0, 0, &[0, 4, 0, 0, 0, 16]);
    s.extend(h2_frame(8, 0, 0, &1000u32.to_be_bytes()));
    s.extend(h2_frame(6, 0, 0, b"12345678"));
    s.extend(h2_frame(HEADERS, 0, 3, &route_headers[..10]));
    s.extend(h2_frame(9, END_HEADERS, 3, &route_headers[10..]));
    s.extend(h2_frame(0, 0, 3, &route[..4]));
    s.extend(h2_frame(8, 0, 3, &5u32.to_be_bytes()));
    s.extend(h2_frame(0, END_STREAM, 3, &route[4..]));
    seeds.push(("continuation_and_windows".into(), s));
    // A call reset by the client (CANCEL), another one, then GOAWAY.
    let mut s = settings;
    s.extend(h2_frame(HEADERS, END_HEADERS, 1, &route_headers));
    s.extend(h2_frame(3, 0, 1, &8u32.to_be_bytes()));
    s.extend(call(3, &route_headers, &route));
    let mut goaway = 3u32.to_be_bytes().to_vec();
    goaway.extend_from_slice(&0u32.to_be_bytes());
    s.extend(h2_frame(7, 0, 0, &goaway));
    seeds.push(("reset_then_goaway".into(), s));
    seeds
}
