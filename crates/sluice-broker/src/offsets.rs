//! Committed offsets of pull consumers: per (group, topic, queue), the offset the group
//! will read next, as last set by `UpdateOffset`.
//!
//! # Persisted formats
//!
//! * `%OFFSET%` queue 0 — the offset log: each record's body is a JSON array of
//!   [`OffsetEvent`]s `{"k":{"group":…,"topic":…,"queue":n},"offset":n,"seq":n}`. `seq` is
//!   a counter assigned under the table lock, strictly increasing over the life of the data
//!   directory.
//! * `<data>/meta/offsets-snapshot.json` — `{log_offset, seq, entries:[[key, offset, seq],
//!   …]}`: the table after every event below `log_offset` (and possibly some after it).
//!   Written through a temporary file, fsync and rename ([`write_atomic`]).
//!
//! # Invariants
//!
//! * An event sets a key only if its `seq` is greater than the one the key holds, so the
//!   last update wins whatever order concurrent updates reach the log in, and replaying an
//!   event twice (a snapshot taken while it was being written) changes nothing.
//! * An update is answered only once its event is durable (per the flush policy); if the
//!   write fails, the previous value is put back unless a later update replaced it.
//!
//! # Procedures
//!
//! *Write*: [`Offsets::commit`]. *Recover*: load the snapshot, replay the log from
//! `log_offset` through the same `apply`. *Delete*: the log is ordinary commit-log data
//! that retention removes; the snapshot carries the table past it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sluice_store::{AppendMessage, ReadStatus, Store};

use crate::broker::BrokerConfig;
use crate::error::BrokerError;
use crate::meta::write_atomic;
use crate::pop::QueueKey;

/// Topic of the offset log.
pub const OFFSET_LOG_TOPIC: &str = "%OFFSET%";

/// One committed-offset change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OffsetEvent {
    pub k: QueueKey,
    pub offset: u64,
    pub seq: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct OffsetTable {
    /// key -> (offset, seq of the event that set it)
    map: HashMap<QueueKey, (u64, u64)>,
    /// Highest seq seen.
    seq: u64,
}

impl OffsetTable {
    fn apply(&mut self, e: &OffsetEvent) -> bool {
        self.seq = self.seq.max(e.seq);
        match self.map.get(&e.k) {
            Some((_, s)) if *s >= e.seq => false,
            _ => {
                self.map.insert(e.k.clone(), (e.offset, e.seq));
                true
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct OffsetSnapshot {
    log_offset: u64,
    seq: u64,
    entries: Vec<(QueueKey, u64, u64)>,
}

/// The committed offsets of a broker.
pub(crate) struct Offsets {
    store: Arc<Store>,
    snapshot_path: PathBuf,
    table: Mutex<OffsetTable>,
}

impl Offsets {
    /// `live(key)` says whether an entry belongs to a group and topic that exist (state
    /// of deleted ones is dropped; see `Broker::open`).
    pub(crate) fn open(
        config: &BrokerConfig,
        store: Arc<Store>,
        live: impl Fn(&QueueKey) -> bool,
    ) -> Result<Offsets, BrokerError> {
        let snapshot_path = config.data_dir.join("meta").join("offsets-snapshot.json");
        let mut t = OffsetTable::default();
        let mut from = 0;
        match std::fs::read(&snapshot_path) {
            Ok(b) => {
                let s: OffsetSnapshot = serde_json::from_slice(&b).map_err(|e| {
                    BrokerError::Internal(format!("{} is damaged: {e}", snapshot_path.display()))
                })?;
                from = s.log_offset;
                t.seq = s.seq;
                for (k, offset, seq) in s.entries {
                    if live(&k) {
                        t.map.insert(k, (offset, seq));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(BrokerError::Internal(format!(
                    "reading {}: {e}",
                    snapshot_path.display()
                )));
            }
        }
        let mut events = 0u64;
        loop {
            let b = store.read(OFFSET_LOG_TOPIC, 0, from, 1024, 16 << 20, |_| true)?;
            match b.status {
                ReadStatus::Found => {}
                ReadStatus::OffsetTooSmall if b.next_offset > from => {
                    from = b.next_offset;
                    continue;
                }
                _ => break,
            }
            for m in &b.messages {
                match serde_json::from_slice::<Vec<OffsetEvent>>(&m.body) {
                    Ok(v) => {
                        for e in &v {
                            if live(&e.k) {
                                t.apply(e);
                            } else {
                                // Still advances `seq`, which must never go back.
                                t.seq = t.seq.max(e.seq);
                            }
                            events += 1;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(offset = m.queue_offset, error = %e, "skipping unreadable offset log record")
                    }
                }
            }
            if b.next_offset <= from {
                break;
            }
            from = b.next_offset;
        }
        tracing::info!(
            offsets = t.map.len(),
            events_replayed = events,
            "committed offsets restored"
        );
        Ok(Offsets {
            store,
            snapshot_path,
            table: Mutex::new(t),
        })
    }

    /// Forgets the committed offsets for which `keep` is false (group or topic deleted).
    pub(crate) fn retain(&self, keep: impl Fn(&QueueKey) -> bool) {
        self.table.lock().map.retain(|k, _| keep(k));
    }

    pub(crate) fn get(&self, k: &QueueKey) -> Option<u64> {
        self.table.lock().map.get(k).map(|(o, _)| *o)
    }

    /// Sets a committed offset; resolves once the change is durable.
    pub(crate) async fn commit(
        &self,
        k: QueueKey,
        offset: u64,
        now: i64,
    ) -> Result<(), BrokerError> {
        let (e, previous) = {
            let mut t = self.table.lock();
            let e = OffsetEvent {
                k: k.clone(),
                offset,
                seq: t.seq + 1,
            };
            let previous = t.map.get(&k).copied();
            t.apply(&e);
            (e, previous)
        };
        let body =
            serde_json::to_vec(&[&e]).map_err(|err| BrokerError::Internal(err.to_string()))?;
        let r = self
            .store
            .append(vec![AppendMessage {
                topic: OFFSET_LOG_TOPIC.into(),
                queue_id: 0,
                flags: 0,
                born_ts: now,
                properties: vec![],
                body: Bytes::from(body),
            }])
            .await;
        if let Err(err) = r {
            let mut t = self.table.lock();
            if t.map.get(&k).is_some_and(|(_, s)| *s == e.seq) {
                match previous {
                    Some(p) => t.map.insert(k, p),
                    None => t.map.remove(&k),
                };
            }
            return Err(err.into());
        }
        Ok(())
    }

    /// Writes the snapshot, so that start-up replays only the log after it.
    pub(crate) fn snapshot(&self) -> Result<(), BrokerError> {
        // The log position first: every event below it is already applied in memory
        // (events are applied before they are appended).
        let (_, log_offset) = self.store.queue_offsets(OFFSET_LOG_TOPIC, 0);
        let s = {
            let t = self.table.lock();
            OffsetSnapshot {
                log_offset,
                seq: t.seq,
                entries: t
                    .map
                    .iter()
                    .map(|(k, (o, s))| (k.clone(), *o, *s))
                    .collect(),
            }
        };
        let b = serde_json::to_vec(&s).map_err(|e| BrokerError::Internal(e.to_string()))?;
        write_atomic(&self.snapshot_path, &b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(q: u32) -> QueueKey {
        QueueKey {
            group: "g".into(),
            topic: "t".into(),
            queue: q,
        }
    }

    proptest! {
        /// Whatever order the events of concurrent updates are logged in, and however often
        /// a suffix is replayed, the table ends with the value of the highest seq per key.
        #[test]
        fn last_update_wins_in_any_order(
            values in proptest::collection::vec((0u32..3, 0u64..100), 1..40),
            order in any::<proptest::sample::Index>(),
            replay_from in any::<proptest::sample::Index>(),
        ) {
            let events: Vec<OffsetEvent> = values.iter().enumerate()
                .map(|(i, (q, o))| OffsetEvent { k: k(*q), offset: *o, seq: i as u64 + 1 })
                .collect();
            let mut model: HashMap<QueueKey, u64> = HashMap::new();
            for e in &events { model.insert(e.k.clone(), e.offset); }
            let mut shuffled = events.clone();
            let n = shuffled.len();
            shuffled.rotate_left(order.index(n));
            let mut t = OffsetTable::default();
            for e in &shuffled { t.apply(e); }
            let from = replay_from.index(n);
            for e in &shuffled[from..] { t.apply(e); }
            let got: HashMap<QueueKey, u64> = t.map.iter().map(|(k, (o, _))| (k.clone(), *o)).collect();
            prop_assert_eq!(got, model);
            prop_assert_eq!(t.seq, n as u64);
        }
    }
}
