//! Broker start-up over arbitrary persisted state: `Broker::open` on files built from the
//! input, next to an empty store.
//!
//! The input is an archive as in `store_open`: repeated `[which: u8][len: u32 LE][bytes]`,
//! `which` picking one of the paths of `sluice_fuzz::layout::BROKER_OPEN_FILES` (the metadata and snapshot JSON files and
//! the timer checkpoint, all read by `open`); a path given twice keeps the last bytes. The seed
//! generator (`fuzz/seedgen`) writes seeds from a real broker that holds topics of every
//! type, groups, in-flight and acknowledged messages, committed offsets, a pending
//! transaction and pending delay messages.
//!
//! What must hold, whatever the bytes: `open` returns (an error or a broker) and never
//! panics, aborts, hangs or runs out of memory; an opened broker describes its topics and
//! groups, serves a receive, a send and a POP snapshot per topic without panicking.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_broker::broker::{Broker, BrokerConfig};
use sluice_broker::filter::{Filter, FilterKind};
use sluice_broker::messaging::{Message, Messaging, ReceiveRequest};
use sluice_common::clock::SystemClock;
use sluice_fuzz::layout::BROKER_OPEN_FILES;
use sluice_store::{Store, StoreConfig};

fuzz_target!(|data: &[u8]| {
    let dir = sluice_fuzz::scratch_dir("sluice-fuzz-broker");
    for (which, bytes) in sluice_fuzz::archive_entries(data) {
        sluice_fuzz::put_file(
            &dir,
            BROKER_OPEN_FILES[which as usize % BROKER_OPEN_FILES.len()],
            bytes,
        );
    }
    std::fs::create_dir_all(&dir).expect("scratch dir");
    exercise(&dir);
    let _ = std::fs::remove_dir_all(&dir);
});

fn exercise(dir: &std::path::Path) {
    let store = Arc::new(Store::open(StoreConfig::small(dir.join("store"))).expect("store"));
    let Ok(broker) = Broker::open(BrokerConfig::new(dir), store.clone(), Arc::new(SystemClock))
    else {
        store.close();
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let groups = broker.groups();
        for g in &groups {
            let _ = broker.group_status(&g.name);
        }
        for t in broker.topics().into_iter().take(8) {
            let _ = broker.topic_status(&t.name);
            let _ = broker.route(&t.name);
            let _ = broker
                .send(vec![Message {
                    topic: t.name.clone(),
                    message_id: "01FUZZ0000000000000000000000".into(),
                    body: Bytes::from_static(b"x"),
                    message_type: Some(t.message_type),
                    message_group: Some("g".into()),
                    born_timestamp_ms: 1,
                    ..Message::default()
                }])
                .await;
            for g in groups.iter().take(4) {
                let _ = broker
                    .receive(ReceiveRequest {
                        group: g.name.clone(),
                        topic: t.name.clone(),
                        filter: Filter::parse(FilterKind::Tag, "*").expect("filter"),
                        max_messages: 4,
                        invisible: Duration::from_secs(10),
                        long_poll: Duration::ZERO,
                    })
                    .await;
            }
        }
        let _ = broker.snapshot_pop();
    });
    drop(broker);
    store.close();
}
