//! POP consumption state: which messages of a queue a consumer group has been handed and
//! not yet acknowledged.
//!
//! Per (group, topic, queue) the state is a `cursor` (the next offset never handed out)
//! and the set of in-flight offsets, each with its delivery attempt, the nonce of its
//! current delivery (part of the receipt handle) and the time it becomes visible again.
//! An acked message simply leaves the set; an expired one is handed out again with
//! attempt + 1; one that reached the group's maximum goes to the dead-letter topic.
//!
//! The broker decides, expresses each decision as a [`PopEvent`], applies it to the
//! in-memory [`PopTable`] and appends it to the `%POP%` log topic in the commit log, so the
//! same group commit that makes messages durable makes acks durable. On start the table is
//! loaded from the last snapshot and the log after it is replayed through the same
//! [`PopTable::apply`]. Replay is idempotent.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// Topic of the POP event log.
pub const POP_LOG_TOPIC: &str = "%POP%";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InFlight {
    pub attempt: u32,
    pub nonce: u64,
    pub visible_at: i64,
    /// Hash of the FIFO message group (0 = none); a group with a message in flight is
    /// blocked for FIFO consumer groups.
    #[serde(default)]
    pub group: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePop {
    pub cursor: u64,
    pub inflight: BTreeMap<u64, InFlight>,
    /// Offsets at or above the cursor that are finished (acked or dead-lettered). Only
    /// FIFO consumption hands out messages above the cursor (when an earlier message of
    /// another message group is blocked), so only it fills this set.
    #[serde(default)]
    pub done: BTreeSet<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QueueKey {
    pub group: String,
    pub topic: String,
    pub queue: u32,
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "e")]
pub enum PopEvent {
    /// Messages handed out (new ones and redeliveries); the cursor moved to `cursor`.
    Popped {
        k: QueueKey,
        cursor: u64,
        entries: Vec<(u64, InFlight)>,
    },
    Acked {
        k: QueueKey,
        offset: u64,
        nonce: u64,
    },
    /// Invisible time changed (a nack, or a renewal).
    Changed {
        k: QueueKey,
        offset: u64,
        nonce: u64,
        visible_at: i64,
    },
    /// Left the in-flight set without an ack (moved to the dead-letter topic, or gone).
    Removed { k: QueueKey, offset: u64 },
    /// The cursor was set (offset reset); in-flight messages below it are dropped.
    Reset { k: QueueKey, cursor: u64 },
}

impl PopEvent {
    /// The queue of a group the event is about.
    pub fn key(&self) -> &QueueKey {
        match self {
            PopEvent::Popped { k, .. }
            | PopEvent::Acked { k, .. }
            | PopEvent::Changed { k, .. }
            | PopEvent::Removed { k, .. }
            | PopEvent::Reset { k, .. } => k,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PopTable {
    queues: HashMap<QueueKey, QueuePop>,
}

impl PopTable {
    pub fn get(&self, k: &QueueKey) -> Option<&QueuePop> {
        self.queues.get(k)
    }

    pub fn get_mut(&mut self, k: &QueueKey) -> Option<&mut QueuePop> {
        self.queues.get_mut(k)
    }

    pub fn insert(&mut self, k: QueueKey, q: QueuePop) {
        self.queues.insert(k, q);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&QueueKey, &QueuePop)> {
        self.queues.iter()
    }

    /// Forgets every queue of a topic (topic deleted) or of a group.
    pub fn retain(&mut self, f: impl Fn(&QueueKey) -> bool) {
        self.queues.retain(|k, _| f(k));
    }

    /// Applies one event. Events that no longer match (an ack of a message that is not in
    /// flight with that nonce) change nothing and return false.
    pub fn apply(&mut self, e: &PopEvent) -> bool {
        match e {
            PopEvent::Popped { k, cursor, entries } => {
                let q = self.queues.entry(k.clone()).or_default();
                q.cursor = q.cursor.max(*cursor);
                q.done = q.done.split_off(&q.cursor);
                for (off, f) in entries {
                    q.inflight.insert(*off, *f);
                }
                true
            }
            PopEvent::Acked { k, offset, nonce } => match self.queues.get_mut(k) {
                Some(q) if q.inflight.get(offset).is_some_and(|f| f.nonce == *nonce) => {
                    q.inflight.remove(offset);
                    if *offset >= q.cursor {
                        q.done.insert(*offset);
                    }
                    true
                }
                _ => false,
            },
            PopEvent::Changed {
                k,
                offset,
                nonce,
                visible_at,
            } => {
                match self
                    .queues
                    .get_mut(k)
                    .and_then(|q| q.inflight.get_mut(offset))
                {
                    Some(f) if f.nonce == *nonce => {
                        f.visible_at = *visible_at;
                        true
                    }
                    _ => false,
                }
            }
            PopEvent::Removed { k, offset } => self
                .queues
                .get_mut(k)
                .is_some_and(|q| q.inflight.remove(offset).is_some()),
            PopEvent::Reset { k, cursor } => {
                let q = self.queues.entry(k.clone()).or_default();
                q.cursor = *cursor;
                q.inflight = q.inflight.split_off(cursor);
                q.done.clear();
                true
            }
        }
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

    #[derive(Debug, Clone)]
    enum Op {
        Pop(u32, u8),
        Ack(u32, u8, bool),
        Change(u32, u8, i64),
        Remove(u32, u8),
        Reset(u32, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..2, 1u8..4).prop_map(|(q, n)| Op::Pop(q, n)),
            (0u32..2, 0u8..20, any::<bool>()).prop_map(|(q, o, good)| Op::Ack(q, o, good)),
            (0u32..2, 0u8..20, 0i64..100).prop_map(|(q, o, v)| Op::Change(q, o, v)),
            (0u32..2, 0u8..20).prop_map(|(q, o)| Op::Remove(q, o)),
            (0u32..2, 0u8..20).prop_map(|(q, o)| Op::Reset(q, o)),
        ]
    }

    proptest! {
        /// The table agrees with a naive model (a map of unacked deliveries), and replaying
        /// the event log onto a fresh table (restart) gives the same state.
        #[test]
        fn table_matches_model_and_replays(ops in proptest::collection::vec(op(), 1..60)) {
            let mut t = PopTable::default();
            let mut log = Vec::new();
            let mut model: HashMap<(u32, u64), u64> = HashMap::new(); // (queue, offset) -> nonce
            let mut cursors = [0u64; 2];
            let mut nonce = 0u64;
            for o in ops {
                let e = match o {
                    Op::Pop(q, n) => {
                        let start = cursors[q as usize];
                        let entries: Vec<(u64, InFlight)> = (start..start + n as u64).map(|off| {
                            nonce += 1;
                            model.insert((q, off), nonce);
                            (off, InFlight { attempt: 1, nonce, visible_at: 10, group: 0 })
                        }).collect();
                        cursors[q as usize] += n as u64;
                        PopEvent::Popped { k: k(q), cursor: cursors[q as usize], entries }
                    }
                    Op::Ack(q, o, good) => {
                        let real = model.get(&(q, o as u64)).copied();
                        let n = if good { real.unwrap_or(u64::MAX) } else { u64::MAX - 1 };
                        if good && real.is_some() { model.remove(&(q, o as u64)); }
                        PopEvent::Acked { k: k(q), offset: o as u64, nonce: n }
                    }
                    Op::Change(q, o, v) => {
                        let n = model.get(&(q, o as u64)).copied().unwrap_or(7);
                        PopEvent::Changed { k: k(q), offset: o as u64, nonce: n, visible_at: v }
                    }
                    Op::Remove(q, o) => {
                        model.remove(&(q, o as u64));
                        PopEvent::Removed { k: k(q), offset: o as u64 }
                    }
                    Op::Reset(q, c) => {
                        model.retain(|(mq, off), _| *mq != q || *off >= c as u64);
                        cursors[q as usize] = c as u64;
                        PopEvent::Reset { k: k(q), cursor: c as u64 }
                    }
                };
                t.apply(&e);
                log.push(e);
                let mut got: HashMap<(u32, u64), u64> = HashMap::new();
                for (key, qp) in t.iter() {
                    for (off, f) in &qp.inflight { got.insert((key.queue, *off), f.nonce); }
                    prop_assert_eq!(qp.cursor, cursors[key.queue as usize]);
                }
                prop_assert_eq!(&got, &model);
            }
            let mut replayed = PopTable::default();
            for e in &log { replayed.apply(e); }
            prop_assert_eq!(&replayed, &t);
            // Replaying twice (a snapshot older than part of the log) changes nothing more.
            let json = serde_json::to_string(&log).expect("json");
            let again: Vec<PopEvent> = serde_json::from_str(&json).expect("json");
            for e in &again { replayed.apply(e); }
            let mut a: Vec<_> = replayed.iter().map(|(k, v)| (k.clone(), v.inflight.clone())).collect();
            let mut b: Vec<_> = t.iter().map(|(k, v)| (k.clone(), v.inflight.clone())).collect();
            a.sort(); b.sort();
            prop_assert_eq!(a, b);
        }
    }
}
