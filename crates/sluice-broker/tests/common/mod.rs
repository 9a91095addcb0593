//! Shared setup for the broker tests: a broker over a small store in a temporary
//! directory, on a manual clock.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sluice_broker::filter::Filter;
use sluice_broker::{Broker, BrokerConfig, Delivery, Messaging, ReceiveRequest};
use sluice_common::ManualClock;
use sluice_store::{Store, StoreConfig};

/// Opens a small store and a broker in `dir`, both on `clock`.
pub fn open_broker(dir: &Path, clock: &ManualClock, config: BrokerConfig) -> Arc<Broker> {
    let store = Arc::new(
        Store::open_with(
            StoreConfig::small(dir),
            Arc::new(sluice_store::StdFs),
            Arc::new(clock.clone()),
        )
        .expect("store"),
    );
    Broker::open(config, store, Arc::new(clock.clone())).expect("broker")
}

/// A broker with the default config, its directory and its clock.
#[allow(dead_code)]
pub struct Env {
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
    pub broker: Arc<Broker>,
}

/// Opens the broker in `dir` with the default config.
#[allow(dead_code)]
pub fn open_at(dir: tempfile::TempDir, clock: ManualClock) -> Env {
    let broker = open_broker(dir.path(), &clock, BrokerConfig::new(dir.path()));
    Env { dir, clock, broker }
}

/// Takes up to 32 visible messages of `topic` for `group` (no long poll).
#[allow(dead_code)]
pub async fn receive_all(b: &Broker, group: &str, topic: &str) -> Vec<Delivery> {
    b.receive(ReceiveRequest {
        group: group.into(),
        topic: topic.into(),
        filter: Filter::All,
        max_messages: 32,
        invisible: Duration::from_secs(30),
        long_poll: Duration::ZERO,
    })
    .await
    .expect("receive")
}
