//! Operation history and the checks run over it after the final drain.
//!
//! Every send attempt is recorded with its outcome: `Ok` (the server acknowledged it and
//! said where it is stored), `Fail` (the server answered with an error code: that attempt
//! did not store it) or `Unknown` (transport error, reset, timeout, lost answer: it may or
//! may not have been stored). A message keeps its harness id across re-sends, so one id can
//! be stored more than once; each stored *copy* is identified by (id, queue, offset).
//! Deliveries and acks carry the id, the copy's position and the time.
//!
//! Ids start with a letter naming their topic: `N` normal, `F` FIFO, `D` delay,
//! `T` transactional; positions are compared within a topic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::Serialize;

/// What a transactional producer intends to do with a half message. The transaction
/// checker answers with the same intent, so a commit whose answer was lost is committed
/// by the check, and a rollback stays a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxIntent {
    /// The producer commits.
    Commit,
    /// The producer rolls back.
    Rollback,
    /// Left open; the checker commits.
    CheckCommit,
    /// Left open; the checker rolls back.
    CheckRollback,
}

impl TxIntent {
    pub fn commits(self) -> bool {
        matches!(self, TxIntent::Commit | TxIntent::CheckCommit)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    /// Message `seq` of FIFO message group `group` (sent one after the other).
    Fifo {
        group: u32,
        seq: u64,
    },
    /// Delivery time in ms since the epoch.
    Delay {
        at_ms: u128,
    },
    Tx(TxIntent),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok { queue: i32, offset: i64 },
    Fail { code: i32 },
    Unknown,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// One send attempt (a re-send after an unknown outcome is another event, same id).
    Send {
        id: String,
        kind: Kind,
        outcome: Outcome,
    },
    /// The producer ended a transaction; `at_ms` is when the request was issued.
    TxEnd {
        id: String,
        commit: bool,
        ok: bool,
        at_ms: u128,
    },
    /// The transaction checker was asked and answered.
    Checked {
        id: String,
        commit: bool,
        at_ms: u128,
    },
    /// `at_ms` is when the harness got it; `requested_ms` when it asked (the server's
    /// invisible time starts in between: an answer can be held up by a pause or latency).
    Delivered {
        id: String,
        queue: i32,
        offset: i64,
        attempt: i32,
        requested_ms: u128,
        at_ms: u128,
    },
    /// Ack answered OK: issued at `issued_ms`, answered at `at_ms`.
    AckOk {
        id: String,
        queue: i32,
        offset: i64,
        issued_ms: u128,
        at_ms: u128,
    },
    /// Ack failed or its answer was lost (it may have been applied).
    AckFail {
        id: String,
        queue: i32,
        offset: i64,
        issued_ms: u128,
    },
    /// A delivery deliberately left unacknowledged.
    Skipped { id: String, queue: i32, offset: i64 },
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Send attempts, by outcome.
    pub sent: u64,
    pub send_ok: u64,
    pub send_failed: u64,
    pub send_unknown: u64,
    /// Attempts that re-sent an id after an unknown (or failed) outcome.
    pub resends: u64,
    /// Distinct message ids sent, and of those acknowledged at least once.
    pub messages: u64,
    pub acked: u64,
    /// Ids whose every attempt had an unknown (or failed) outcome, with at least one
    /// unknown; and how many of them turned out to be stored (allowed either way).
    pub unknown: u64,
    pub unknown_delivered: u64,
    pub received_unique: u64,
    pub deliveries: u64,
    /// Acknowledged (and, for transactions, committed) messages never received.
    pub lost: u64,
    /// Messages whose every send attempt definitely failed, delivered anyway.
    pub phantom: u64,
    /// (topic, queue, offset) positions holding two different messages.
    pub inconsistent_offsets: u64,
    /// Acknowledged copies whose reported position was never delivered although the
    /// message was delivered elsewhere.
    pub misplaced: u64,
    /// Deliveries of a copy after a successful ack of that copy.
    pub redelivered_after_ack: u64,
    /// Redeliveries before the invisible time of the previous delivery ran out.
    pub redelivered_early: u64,
    /// Messages delivered more than once (allowed: at-least-once), by cause.
    pub duplicates: u64,
    /// Stored twice: re-sent after an unknown outcome.
    pub duplicates_after_resend: u64,
    pub duplicates_after_skipped_ack: u64,
    /// Redelivered after an ack that failed or whose answer was lost (kill, network fault).
    pub duplicates_after_failed_ack: u64,
    pub duplicates_other: u64,
    /// FIFO: message k+1 of a message group delivered before message k was acked.
    pub fifo_messages: u64,
    pub reordered: u64,
    /// Delay messages delivered before their delivery time.
    pub delay_messages: u64,
    pub early: u64,
    /// Lateness of the first delivery after the delivery time, ms.
    pub lateness_p50_ms: u64,
    pub lateness_p99_ms: u64,
    pub lateness_max_ms: u64,
    /// Transactions: half messages by intent, deliveries that must not happen.
    pub tx_messages: u64,
    pub tx_committed_delivered: u64,
    pub tx_checks: u64,
    /// Commits and rollbacks whose answer was an error or never came.
    pub tx_end_failed: u64,
    /// Transactions to be committed by the checker (left open, or the client's commit
    /// failed) that were never delivered: the server ended them by its default resolution
    /// (rollback) because no check was answered. Reported, not a safety violation.
    pub tx_check_unanswered: u64,
    /// Rolled-back or never-committed messages delivered, or delivered before the commit.
    pub tx_violations: u64,
    /// Up to 5 examples of each kind of finding.
    pub examples: Vec<String>,
    #[serde(skip)]
    example_counts: HashMap<String, u32>,
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
            + self.reordered
            + self.early
            + self.tx_violations
    }

    fn example(&mut self, s: String) {
        let kind = s.split(':').next().unwrap_or("").to_owned();
        let n = self.example_counts.entry(kind).or_insert(0);
        *n += 1;
        if *n <= 5 {
            self.examples.push(s);
        }
    }
}

type Copy<'a> = (&'a str, i32, i64);
/// Deliveries of one copy: (time, attempt, requested).
type Times = Vec<(u128, i32, u128)>;

#[derive(Default)]
struct Msg {
    kind: Option<Kind>,
    ok: Vec<(i32, i64)>,
    failed: bool,
    unknown: bool,
    attempts: u64,
    tx_end_commit_ms: Option<u128>,
    tx_end_commit_ok: bool,
    checked_commit_ms: Option<u128>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn check(events: &[Event], invisible: Duration, slack: Duration) -> Report {
    let mut r = Report::default();
    let mut msgs: HashMap<&str, Msg> = HashMap::new();
    // Deliveries per copy: (at, attempt).
    let mut deliveries: HashMap<Copy<'_>, Times> = HashMap::new();
    let mut first_delivery: HashMap<&str, u128> = HashMap::new();
    let mut acked_at: HashMap<Copy<'_>, u128> = HashMap::new();
    // Ack issue times (answered or not) per copy.
    let mut ack_issued: HashMap<Copy<'_>, Vec<u128>> = HashMap::new();
    let mut ack_failed: HashSet<&str> = HashSet::new();
    let mut skipped: HashSet<Copy<'_>> = HashSet::new();
    let mut positions: BTreeMap<(char, i32, i64), HashSet<&str>> = BTreeMap::new();
    for e in events {
        match e {
            Event::Send { id, kind, outcome } => {
                r.sent += 1;
                let m = msgs.entry(id).or_default();
                m.kind = Some(*kind);
                m.attempts += 1;
                match outcome {
                    Outcome::Ok { queue, offset } => {
                        r.send_ok += 1;
                        m.ok.push((*queue, *offset));
                    }
                    Outcome::Fail { .. } => {
                        r.send_failed += 1;
                        m.failed = true;
                    }
                    Outcome::Unknown => {
                        r.send_unknown += 1;
                        m.unknown = true;
                    }
                }
            }
            Event::TxEnd {
                id,
                commit,
                ok,
                at_ms,
            } => {
                if !ok {
                    r.tx_end_failed += 1;
                }
                if *commit {
                    let m = msgs.entry(id).or_default();
                    m.tx_end_commit_ms.get_or_insert(*at_ms);
                    m.tx_end_commit_ok |= *ok;
                }
            }
            Event::Checked { id, commit, at_ms } => {
                r.tx_checks += 1;
                if *commit {
                    let m = msgs.entry(id).or_default();
                    m.checked_commit_ms.get_or_insert(*at_ms);
                }
            }
            Event::Delivered {
                id,
                queue,
                offset,
                attempt,
                requested_ms,
                at_ms,
            } => {
                r.deliveries += 1;
                let c = (id.as_str(), *queue, *offset);
                deliveries
                    .entry(c)
                    .or_default()
                    .push((*at_ms, *attempt, *requested_ms));
                first_delivery.entry(id).or_insert(*at_ms);
                let topic = id.chars().next().unwrap_or('?');
                positions
                    .entry((topic, *queue, *offset))
                    .or_default()
                    .insert(id);
                if let Some(t) = acked_at.get(&c) {
                    if at_ms > t {
                        r.redelivered_after_ack += 1;
                        r.example(format!(
                            "after ack: {id} at ({queue}, {offset}) delivered at {at_ms} after ack at {t}"
                        ));
                    }
                }
            }
            Event::AckOk {
                id,
                queue,
                offset,
                issued_ms,
                at_ms,
            } => {
                let c = (id.as_str(), *queue, *offset);
                acked_at.entry(c).or_insert(*at_ms);
                ack_issued.entry(c).or_default().push(*issued_ms);
            }
            Event::AckFail {
                id,
                queue,
                offset,
                issued_ms,
            } => {
                ack_failed.insert(id);
                ack_issued
                    .entry((id.as_str(), *queue, *offset))
                    .or_default()
                    .push(*issued_ms);
            }
            Event::Skipped { id, queue, offset } => {
                skipped.insert((id, *queue, *offset));
            }
        }
    }
    // Positions delivered per id.
    let mut delivered_at: HashMap<&str, Vec<(i32, i64)>> = HashMap::new();
    for (id, q, o) in deliveries.keys() {
        delivered_at.entry(id).or_default().push((*q, *o));
    }
    r.received_unique = delivered_at.len() as u64;
    r.messages = msgs.len() as u64;
    let mut lateness = Vec::new();
    let mut ids: Vec<&&str> = msgs.keys().collect();
    ids.sort();
    for id in ids {
        let id: &str = id;
        let Some(m) = msgs.get(id) else { continue };
        r.resends += m.attempts.saturating_sub(1);
        let delivered = delivered_at.get(id);
        if !m.ok.is_empty() {
            r.acked += 1;
        } else if m.unknown {
            r.unknown += 1;
            if delivered.is_some() {
                r.unknown_delivered += 1;
            }
        } else if m.failed && delivered.is_some() {
            r.phantom += 1;
            r.example(format!(
                "phantom: {id} failed on every attempt but was delivered"
            ));
        }
        let kind = m.kind.unwrap_or(Kind::Normal);
        match kind {
            Kind::Tx(intent) => {
                r.tx_messages += 1;
                if let Some(first) = first_delivery.get(id) {
                    if !intent.commits() {
                        r.tx_violations += 1;
                        r.example(format!("tx: {id} ({intent:?}) delivered"));
                    } else {
                        r.tx_committed_delivered += 1;
                        let committed = [m.tx_end_commit_ms, m.checked_commit_ms]
                            .into_iter()
                            .flatten()
                            .min();
                        match committed {
                            Some(c) if c <= *first => {}
                            _ => {
                                r.tx_violations += 1;
                                r.example(format!(
                                    "tx: {id} ({intent:?}) delivered at {first} before any commit ({committed:?})"
                                ));
                            }
                        }
                    }
                } else if !m.ok.is_empty() && intent.commits() && !m.tx_end_commit_ok {
                    r.tx_check_unanswered += 1;
                    r.example(format!(
                        "tx unanswered: {id} ({intent:?}) half message stored, its commit depended on a check, never delivered"
                    ));
                } else if !m.ok.is_empty() && intent.commits() {
                    r.lost += 1;
                    r.example(format!(
                        "lost: {id} ({intent:?}) half message stored, never delivered"
                    ));
                }
            }
            _ => {
                for pos in &m.ok {
                    match delivered {
                        None => {
                            r.lost += 1;
                            r.example(format!(
                                "lost: {id} acknowledged at {pos:?}, never delivered"
                            ));
                            break;
                        }
                        // The send result of a delay message names its position in the
                        // schedule, not in the topic: checked by id only.
                        Some(_) if matches!(kind, Kind::Delay { .. }) => {}
                        Some(ds) if !ds.contains(pos) => {
                            r.misplaced += 1;
                            r.example(format!(
                                "misplaced: {id} acknowledged at {pos:?}, delivered at {ds:?}"
                            ));
                        }
                        Some(_) => {}
                    }
                }
            }
        }
        if let Kind::Delay { at_ms } = kind {
            r.delay_messages += 1;
            if let Some(first) = first_delivery.get(id) {
                if *first < at_ms {
                    r.early += 1;
                    r.example(format!(
                        "early: {id} delivered at {first}, {} ms before its delivery time",
                        at_ms - first
                    ));
                } else {
                    lateness.push((first - at_ms) as u64);
                }
            }
        }
        if let Kind::Fifo { .. } = kind {
            r.fifo_messages += 1;
        }
    }
    lateness.sort_unstable();
    r.lateness_p50_ms = percentile(&lateness, 0.5);
    r.lateness_p99_ms = percentile(&lateness, 0.99);
    r.lateness_max_ms = lateness.last().copied().unwrap_or(0);
    for (pos, ids) in &positions {
        if ids.len() > 1 {
            r.inconsistent_offsets += 1;
            r.example(format!("inconsistent: {pos:?} holds {ids:?}"));
        }
    }
    let inv = invisible.as_millis();
    let slack = slack.as_millis();
    let mut copies: Vec<_> = deliveries.iter().collect();
    copies.sort();
    for ((id, q, o), ds) in copies {
        let mut ds = ds.clone();
        ds.sort();
        // The previous delivery's invisible time started after it was requested.
        for w in ds.windows(2) {
            if w[1].0 + slack < w[0].2 + inv {
                r.redelivered_early += 1;
                r.example(format!(
                    "early redelivery: {id} at ({q}, {o}) {} ms after the previous delivery was requested",
                    w[1].0.saturating_sub(w[0].2)
                ));
            }
        }
    }
    let mut dup_ids: Vec<&&str> = delivered_at.keys().collect();
    dup_ids.sort();
    for id in dup_ids {
        let pos = &delivered_at[*id];
        let count: usize = pos
            .iter()
            .map(|(q, o)| deliveries.get(&(*id, *q, *o)).map_or(0, Vec::len))
            .sum();
        if count > 1 {
            r.duplicates += 1;
            if pos.len() > 1 {
                r.duplicates_after_resend += 1;
            } else if pos.iter().any(|(q, o)| skipped.contains(&(*id, *q, *o))) {
                r.duplicates_after_skipped_ack += 1;
            } else if ack_failed.contains(*id) {
                r.duplicates_after_failed_ack += 1;
            } else {
                r.duplicates_other += 1;
                r.example(format!("duplicate without a known cause: {id} at {pos:?}"));
            }
        }
    }
    check_fifo(&mut r, &msgs, &deliveries, &ack_issued);
    r
}

/// FIFO: every delivery of message k+1 of a group must come after each delivered copy of
/// message k stored before it was delivered and then acked (the ack issued; its answer may
/// have been lost). A copy of k stored after k+1 (an attempt with an unknown outcome that
/// the server executed late, after the re-send and the next message) is exempt.
fn check_fifo(
    r: &mut Report,
    msgs: &HashMap<&str, Msg>,
    deliveries: &HashMap<Copy<'_>, Times>,
    ack_issued: &HashMap<Copy<'_>, Vec<u128>>,
) {
    let mut by_seq: HashMap<(u32, u64), &str> = HashMap::new();
    for (id, m) in msgs {
        if let Some(Kind::Fifo { group, seq }) = m.kind {
            by_seq.insert((group, seq), id);
        }
    }
    let mut copies_of: HashMap<&str, Vec<(i32, i64, &Times)>> = HashMap::new();
    for ((id, q, o), ds) in deliveries {
        copies_of.entry(id).or_default().push((*q, *o, ds));
    }
    let mut keys: Vec<&(u32, u64)> = by_seq.keys().collect();
    keys.sort();
    for &(group, seq) in keys {
        if seq == 0 {
            continue;
        }
        let (Some(next), Some(prev)) = (by_seq.get(&(group, seq)), by_seq.get(&(group, seq - 1)))
        else {
            continue;
        };
        let Some(next_copies) = copies_of.get(next) else {
            continue;
        };
        let prev_copies = copies_of.get(prev).cloned().unwrap_or_default();
        'next: for (nq, no, nds) in next_copies {
            for (at, _, _) in nds.iter() {
                let mut seen_prev = false;
                for (pq, po, pds) in &prev_copies {
                    if pq != nq || po > no {
                        continue;
                    }
                    // The last delivery of this copy before `at`, and an ack after it.
                    let Some(last) = pds.iter().map(|(t, _, _)| *t).filter(|t| t <= at).max()
                    else {
                        continue;
                    };
                    seen_prev = true;
                    let acked = ack_issued
                        .get(&(*prev, *pq, *po))
                        .is_some_and(|v| v.iter().any(|t| *t >= last && t <= at));
                    if !acked {
                        r.reordered += 1;
                        r.example(format!(
                            "reordered: group {group} message {seq} ({next}) delivered at {at} while message {} at ({pq}, {po}) delivered at {last} was not acked",
                            seq - 1
                        ));
                        break 'next;
                    }
                }
                if !seen_prev {
                    r.reordered += 1;
                    r.example(format!(
                        "reordered: group {group} message {seq} ({next}) delivered at {at} before message {} was delivered",
                        seq - 1
                    ));
                    break 'next;
                }
            }
        }
    }
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
            requested_ms: at,
            at_ms: at,
        }
    }

    fn sent(id: &str, kind: Kind, outcome: Outcome) -> Event {
        Event::Send {
            id: id.into(),
            kind,
            outcome,
        }
    }

    fn ok(id: &str, q: i32, o: i64) -> Event {
        sent(
            id,
            Kind::Normal,
            Outcome::Ok {
                queue: q,
                offset: o,
            },
        )
    }

    fn ack(id: &str, q: i32, o: i64, at: u128) -> Event {
        Event::AckOk {
            id: id.into(),
            queue: q,
            offset: o,
            issued_ms: at,
            at_ms: at,
        }
    }

    fn check5(ev: &[Event]) -> Report {
        check(ev, Duration::from_secs(5), Duration::from_millis(100))
    }

    #[test]
    fn detects_each_violation() {
        let ev = vec![
            ok("Na", 0, 0),
            ok("Nb", 0, 1),
            sent("Nc", Kind::Normal, Outcome::Fail { code: 40000 }),
            ok("Ne", 1, 0),
            ok("Nm", 2, 7),
            d("Na", 0, 0, 10),
            ack("Na", 0, 0, 11),
            d("Na", 0, 0, 20_000),
            d("Nc", 0, 2, 30),
            d("Nx", 0, 2, 40),
            d("Ne", 1, 0, 50),
            d("Ne", 1, 0, 60),
            d("Nm", 2, 8, 70),
        ];
        let r = check5(&ev);
        assert_eq!(r.lost, 1, "{r:?}");
        assert_eq!(r.phantom, 1);
        assert_eq!(r.inconsistent_offsets, 1);
        assert_eq!(r.misplaced, 1);
        assert_eq!(r.redelivered_after_ack, 1);
        assert_eq!(r.redelivered_early, 1);
        assert_eq!(r.duplicates, 2);
        assert_eq!(r.violations(), 6);
    }

    #[test]
    fn unknown_outcomes_and_resends_are_not_violations() {
        let ev = vec![
            ok("Na", 0, 0),
            sent("Nu", Kind::Normal, Outcome::Unknown),
            sent("Nv", Kind::Normal, Outcome::Unknown),
            // Stored twice: the first attempt's answer was lost.
            sent("Nr", Kind::Normal, Outcome::Unknown),
            ok("Nr", 0, 5),
            d("Na", 0, 0, 10),
            Event::Skipped {
                id: "Na".into(),
                queue: 0,
                offset: 0,
            },
            d("Na", 0, 0, 6_000),
            ack("Na", 0, 0, 6_001),
            d("Nu", 0, 3, 20),
            d("Nr", 0, 4, 30),
            ack("Nr", 0, 4, 31),
            d("Nr", 0, 5, 40),
            ack("Nr", 0, 5, 41),
        ];
        let r = check5(&ev);
        assert_eq!(r.violations(), 0, "{r:?}");
        assert_eq!(r.unknown, 2);
        assert_eq!(r.unknown_delivered, 1);
        assert_eq!(r.resends, 1);
        assert_eq!(r.duplicates_after_skipped_ack, 1);
        assert_eq!(r.duplicates_after_resend, 1);
    }

    fn fifo(id: &str, seq: u64, q: i32, o: i64) -> Event {
        sent(
            id,
            Kind::Fifo { group: 1, seq },
            Outcome::Ok {
                queue: q,
                offset: o,
            },
        )
    }

    #[test]
    fn fifo_order() {
        // In order, with an ack failure whose ack was applied anyway.
        let good = vec![
            fifo("F0", 0, 0, 0),
            fifo("F1", 1, 0, 1),
            fifo("F2", 2, 0, 2),
            d("F0", 0, 0, 10),
            Event::AckFail {
                id: "F0".into(),
                queue: 0,
                offset: 0,
                issued_ms: 11,
            },
            d("F1", 0, 1, 20),
            ack("F1", 0, 1, 21),
            d("F2", 0, 2, 30),
            ack("F2", 0, 2, 31),
        ];
        let r = check5(&good);
        assert_eq!(r.reordered, 0, "{r:?}");
        assert_eq!(r.violations(), 0, "{r:?}");
        // Message 1 delivered while message 0 is in flight.
        let bad = vec![
            fifo("F0", 0, 0, 0),
            fifo("F1", 1, 0, 1),
            d("F0", 0, 0, 10),
            d("F1", 0, 1, 12),
            ack("F0", 0, 0, 13),
            ack("F1", 0, 1, 14),
        ];
        assert_eq!(check5(&bad).reordered, 1);
        // Message 1 delivered before message 0 ever was.
        let bad2 = vec![
            fifo("F0", 0, 0, 0),
            fifo("F1", 1, 0, 1),
            d("F1", 0, 1, 12),
            ack("F1", 0, 1, 14),
            d("F0", 0, 0, 20),
            ack("F0", 0, 0, 21),
        ];
        assert_eq!(check5(&bad2).reordered, 1);
        // A late copy of message 0 stored after message 1 is exempt.
        let late = vec![
            sent("F0", Kind::Fifo { group: 1, seq: 0 }, Outcome::Unknown),
            fifo("F0", 0, 0, 0),
            fifo("F1", 1, 0, 1),
            d("F0", 0, 0, 10),
            ack("F0", 0, 0, 11),
            d("F1", 0, 1, 20),
            d("F0", 0, 2, 21),
            ack("F1", 0, 1, 22),
            ack("F0", 0, 2, 23),
        ];
        let r = check5(&late);
        assert_eq!(r.reordered, 0, "{r:?}");
        assert_eq!(r.duplicates_after_resend, 1);
    }

    #[test]
    fn delay_early_and_lateness() {
        let ev = vec![
            sent(
                "Da",
                Kind::Delay { at_ms: 1_000 },
                Outcome::Ok {
                    queue: 0,
                    offset: 0,
                },
            ),
            sent(
                "Db",
                Kind::Delay { at_ms: 2_000 },
                Outcome::Ok {
                    queue: 0,
                    offset: 1,
                },
            ),
            d("Da", 0, 0, 1_040),
            d("Db", 0, 1, 1_990),
        ];
        let r = check5(&ev);
        assert_eq!(r.early, 1, "{r:?}");
        assert_eq!(r.lateness_max_ms, 40);
        assert_eq!(r.misplaced, 0);
    }

    #[test]
    fn transactions() {
        let half = |id: &str, i: TxIntent, o: i64| {
            sent(
                id,
                Kind::Tx(i),
                Outcome::Ok {
                    queue: 0,
                    offset: o,
                },
            )
        };
        let end = |id: &str, commit: bool, at: u128| Event::TxEnd {
            id: id.into(),
            commit,
            ok: true,
            at_ms: at,
        };
        let ev = vec![
            half("Tc", TxIntent::Commit, 0),
            half("Tr", TxIntent::Rollback, 1),
            half("Tk", TxIntent::CheckCommit, 2),
            half("Tx", TxIntent::CheckRollback, 3),
            half("Te", TxIntent::Commit, 4),
            half("Tl", TxIntent::Commit, 5),
            half("Tq", TxIntent::CheckCommit, 6),
            end("Tc", true, 10),
            end("Tr", false, 10),
            end("Te", true, 50),
            end("Tl", true, 50),
            Event::Checked {
                id: "Tk".into(),
                commit: true,
                at_ms: 100,
            },
            Event::Checked {
                id: "Tx".into(),
                commit: false,
                at_ms: 100,
            },
            d("Tc", 0, 0, 20),
            d("Tk", 0, 1, 120),
            // Violations: rolled back, delivered before its commit.
            d("Tr", 0, 2, 30),
            d("Te", 0, 3, 40),
        ];
        let r = check5(&ev);
        assert_eq!(r.tx_violations, 2, "{r:?}");
        assert_eq!(r.lost, 1, "Tl committed but never delivered");
        assert_eq!(
            r.tx_check_unanswered, 1,
            "Tq left to a check that never came"
        );
        assert_eq!(r.tx_committed_delivered, 3);
    }
}
