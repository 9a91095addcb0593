//! Shared setup for the broker tests: a broker over a small store in a temporary
//! directory, on a manual clock.

use std::path::Path;
use std::sync::Arc;

use sluice_broker::{Broker, BrokerConfig};
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
