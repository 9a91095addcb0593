//! Operation history and the checks run over it after the final drain.
//!
//! Every operation is recorded as it is invoked and as it completes. A send is `Ok` (the
//! server acknowledged it), `Fail` (the server answered with an error code: it definitely
//! did not store it) or `Unknown` (transport error or timeout: it may or may not have been
//! stored). Deliveries and acks carry the message id, queue, offset and time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone)]
pub enum Event {
    SendOk {
        id: String,
        queue: i32,
        offset: i64,
    },
    SendFail {
        id: String,
        code: i32,
    },
    SendUnknown {
        id: String,
    },
    Delivered {
        id: String,
        queue: i32,
        offset: i64,
        attempt: i32,
        at_ms: u128,
    },
    AckOk {
        id: String,
        at_ms: u128,
    },
    AckFail {
        id: String,
    },
    Skipped {
        id: String,
    },
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub sent: u64,
    pub send_ok: u64,
    pub send_failed: u64,
    pub send_unknown: u64,
    /// Sends with an unknown outcome that turned out to be stored (informational).
    pub unknown_delivered: u64,
    pub received_unique: u64,
    pub deliveries: u64,
    /// Acknowledged sends never received after the final drain.
    pub lost: u64,
    /// Sends that definitely failed but were delivered.
    pub phantom: u64,
    /// (queue, offset) positions holding two different messages.
    pub inconsistent_offsets: u64,
    /// Acknowledged sends delivered at another position than the send reported.
    pub misplaced: u64,
    /// Deliveries after a successful ack of the same message.
    pub redelivered_after_ack: u64,
    /// Redeliveries before the invisible time of the previous delivery ran out.
    pub redelivered_early: u64,
    /// Messages delivered more than once (allowed: at-least-once), by cause.
    pub duplicates: u64,
    pub duplicates_after_skipped_ack: u64,
    pub duplicates_after_failed_ack: u64,
    pub duplicates_other: u64,
    pub examples: Vec<String>,
}

impl Report {
    /// Safety violations: must all be zero with Sync flush.
    pub fn violations(&self) -> u64 {
        self.lost
            + self.phantom
            + self.inconsistent_offsets
            + self.misplaced
            + self.redelivered_after_ack
            + self.redelivered_early
    }
}

pub fn check(events: &[Event], invisible: Duration, slack: Duration) -> Report {
    let mut r = Report::default();
    let mut send_ok: HashMap<&str, (i32, i64)> = HashMap::new();
    let mut send_fail: HashMap<&str, i32> = HashMap::new();
    let mut send_unknown: HashSet<&str> = HashSet::new();
    let mut deliveries: HashMap<&str, Vec<(u128, i32, i64, i32)>> = HashMap::new();
    let mut acked_at: HashMap<&str, u128> = HashMap::new();
    let mut ack_failed: HashSet<&str> = HashSet::new();
    let mut skipped: HashSet<&str> = HashSet::new();
    let mut positions: BTreeMap<(i32, i64), HashSet<&str>> = BTreeMap::new();
    let example = |r: &mut Report, s: String| {
        if r.examples.len() < 20 {
            r.examples.push(s);
        }
    };
    for e in events {
        match e {
            Event::SendOk { id, queue, offset } => {
                r.sent += 1;
                r.send_ok += 1;
                send_ok.insert(id, (*queue, *offset));
            }
            Event::SendFail { id, code } => {
                r.sent += 1;
                r.send_failed += 1;
                send_fail.insert(id, *code);
            }
            Event::SendUnknown { id } => {
                r.sent += 1;
                r.send_unknown += 1;
                send_unknown.insert(id);
            }
            Event::Delivered {
                id,
                queue,
                offset,
                attempt,
                at_ms,
            } => {
                r.deliveries += 1;
                deliveries
                    .entry(id)
                    .or_default()
                    .push((*at_ms, *queue, *offset, *attempt));
                positions.entry((*queue, *offset)).or_default().insert(id);
                if let Some(t) = acked_at.get(id.as_str()) {
                    if at_ms > t {
                        r.redelivered_after_ack += 1;
                        example(
                            &mut r,
                            format!("{id} delivered at {at_ms} after ack at {t}"),
                        );
                    }
                }
            }
            Event::AckOk { id, at_ms } => {
                acked_at.entry(id).or_insert(*at_ms);
            }
            Event::AckFail { id } => {
                ack_failed.insert(id);
            }
            Event::Skipped { id } => {
                skipped.insert(id);
            }
        }
    }
    r.received_unique = deliveries.len() as u64;
    for (id, pos) in &send_ok {
        match deliveries.get(id) {
            None => {
                r.lost += 1;
                example(
                    &mut r,
                    format!("lost: {id} acknowledged at {pos:?}, never delivered"),
                );
            }
            Some(ds) => {
                // A send result without a queue (-1) is checked by offset only.
                let differs = |q: i32, o: i64| {
                    if pos.0 < 0 {
                        o != pos.1
                    } else {
                        (q, o) != *pos
                    }
                };
                if ds.iter().any(|(_, q, o, _)| differs(*q, *o)) {
                    r.misplaced += 1;
                    example(
                        &mut r,
                        format!("misplaced: {id} sent to {pos:?}, delivered at {:?}", ds[0]),
                    );
                }
            }
        }
    }
    for (id, code) in &send_fail {
        if deliveries.contains_key(id) {
            r.phantom += 1;
            example(
                &mut r,
                format!("phantom: {id} failed to send (code {code}) but was delivered"),
            );
        }
    }
    r.unknown_delivered = send_unknown
        .iter()
        .filter(|id| deliveries.contains_key(*id))
        .count() as u64;
    for (pos, ids) in &positions {
        if ids.len() > 1 {
            r.inconsistent_offsets += 1;
            example(&mut r, format!("inconsistent: {pos:?} holds {ids:?}"));
        }
    }
    let inv = invisible.as_millis();
    let slack = slack.as_millis();
    for (id, ds) in &deliveries {
        if ds.len() > 1 {
            r.duplicates += 1;
            if skipped.contains(id) {
                r.duplicates_after_skipped_ack += 1;
            } else if ack_failed.contains(id) {
                r.duplicates_after_failed_ack += 1;
            } else {
                r.duplicates_other += 1;
            }
            let mut ds = ds.clone();
            ds.sort();
            for w in ds.windows(2) {
                if w[1].0 + slack < w[0].0 + inv {
                    r.redelivered_early += 1;
                    example(
                        &mut r,
                        format!(
                            "early: {id} redelivered {} ms after the previous delivery",
                            w[1].0 - w[0].0
                        ),
                    );
                }
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(id: &str, q: i32, o: i64, at: u128) -> Event {
        Event::Delivered {
            id: id.into(),
            queue: q,
            offset: o,
            attempt: 1,
            at_ms: at,
        }
    }

    #[test]
    fn detects_each_violation() {
        let ev = vec![
            Event::SendOk {
                id: "a".into(),
                queue: 0,
                offset: 0,
            },
            Event::SendOk {
                id: "b".into(),
                queue: 0,
                offset: 1,
            },
            Event::SendFail {
                id: "c".into(),
                code: 40000,
            },
            Event::SendOk {
                id: "e".into(),
                queue: 1,
                offset: 0,
            },
            d("a", 0, 0, 10),
            Event::AckOk {
                id: "a".into(),
                at_ms: 11,
            },
            d("a", 0, 0, 20_000),
            d("c", 0, 2, 30),
            d("x", 0, 2, 40),
            d("e", 1, 0, 50),
            d("e", 1, 0, 60),
        ];
        let r = check(&ev, Duration::from_secs(5), Duration::from_millis(100));
        assert_eq!(r.lost, 1, "{r:?}");
        assert_eq!(r.phantom, 1);
        assert_eq!(r.inconsistent_offsets, 1);
        assert_eq!(r.redelivered_after_ack, 1);
        assert_eq!(r.redelivered_early, 1);
        assert_eq!(r.duplicates, 2);
        assert_eq!(r.violations(), 5);
    }

    #[test]
    fn clean_history_has_no_violations() {
        let ev = vec![
            Event::SendOk {
                id: "a".into(),
                queue: 0,
                offset: 0,
            },
            Event::SendUnknown { id: "u".into() },
            d("a", 0, 0, 10),
            Event::Skipped { id: "a".into() },
            d("a", 0, 0, 6_000),
            Event::AckOk {
                id: "a".into(),
                at_ms: 6_001,
            },
        ];
        let r = check(&ev, Duration::from_secs(5), Duration::from_millis(100));
        assert_eq!(r.violations(), 0, "{r:?}");
        assert_eq!(r.duplicates_after_skipped_ack, 1);
    }
}
