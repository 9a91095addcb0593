//! Transactional messages: half messages, their resolution, and checks of orphans.
//!
//! # Model
//!
//! A message sent to a `transaction` topic is a *half message*: it is stored, durably, in
//! the internal topic `%HALF%` (queue 0) instead of its real topic, so no consumer can see
//! it. The send receipt carries a transaction id generated here. The producer then ends the
//! transaction: COMMIT appends a copy of the half message (same message id, properties and
//! body) to the real topic and queue, where consumers see it; ROLLBACK discards it. A half
//! message that is neither committed nor rolled back within `transaction_check_interval`
//! is *orphaned*: the broker publishes a [`TransactionCheck`] that a protocol edge forwards
//! to a live producer, which answers with an ordinary end-transaction call. Checks repeat
//! every interval; after `transaction_max_checks` unanswered checks the configured default
//! resolution (rollback unless configured otherwise) is applied.
//!
//! # Persisted formats
//!
//! Two internal topics of the commit log, plus one snapshot file.
//!
//! * `%HALF%` queue 0 — one record per half message: the message exactly as it would have
//!   been stored on its topic (flags, born time, properties, body) with the topic and queue
//!   rewritten and these properties added (all reserved, so no producer can set them):
//!
//!   | key                 | value                                             |
//!   |---------------------|---------------------------------------------------|
//!   | `REAL_TOPIC`        | the topic it belongs to                           |
//!   | `REAL_QID`          | the queue chosen for it, decimal                  |
//!   | `__transactionId__` | the transaction id (32 upper-case hex digits)     |
//!   | `PGROUP`            | client id of the producer that sent it, if known  |
//!   | `TRAN_MSG`          | `true`                                            |
//!
//!   The record *is* the "prepared" event: there is no separate write, so a half message
//!   is pending exactly when its record exists and no resolution was logged for it. Its
//!   store timestamp is the time the transaction began.
//! * `%TXOP%` queue 0 — the op log: each record's body is a JSON array of [`TxOp`]s,
//!   `{"op":"Checked","txid":…,"count":n,"at":ms}` (the n-th check was published) or
//!   `{"op":"Resolved","txid":…,"resolution":"commit"|"rollback","source":…,"at":ms}`.
//! * `<data>/meta/tx-snapshot.json` — `{half_scanned, op_offset, pending:[…],
//!   resolved:[[txid, outcome], …]}`: the table after every half record below
//!   `half_scanned` and every op below `op_offset` was applied (ops at or after it may be
//!   applied too; replaying them again changes nothing). Written through a temporary file,
//!   fsync and rename ([`write_atomic`]).
//!
//! # Invariants
//!
//! * A commit appends the copy and its `Resolved` op in one store call, copy first. The
//!   records of one call are contiguous and become durable together in log order, so a
//!   durable `Resolved(commit)` op implies a durable copy; the reverse gap (a torn tail that
//!   kept the copy and lost the op) is closed at start-up: a pending half message whose
//!   message id already resolves to a copy carrying its transaction id on its real topic is
//!   marked committed.
//! * A resolution becomes part of the in-memory table only after its op is durable; while
//!   it is in flight the transaction is marked `resolving` (not persisted), so a second end
//!   call or the checker cannot resolve it twice. Checks are counted in memory first (a
//!   lost `Checked` op only means one more check).
//! * Every writer of ops registers the op log's end offset before it appends; a snapshot
//!   records `op_offset = min(log end, oldest registered writer)`, so an op whose effect is
//!   not yet in the snapshot is always replayed.
//! * Replay is idempotent: half records already known (pending or remembered as resolved)
//!   are skipped, `Checked` takes the maximum count, `Resolved` of an unknown or resolved
//!   transaction is ignored.
//!
//! # Procedures
//!
//! * *Write*: [`Transactions::half`] rewrites the append of a send; ends and checks append
//!   ops (and copies) through [`Store::append`], durable per the flush policy.
//! * *Read*: the table catches up with new `%HALF%` records under its lock before every
//!   end and check, so a transaction id is known as soon as its send was acknowledged.
//! * *Recover*: load the snapshot, scan `%HALF%` from `half_scanned`, replay `%TXOP%` from
//!   `op_offset`, then repair torn commits as described above.
//! * *Delete*: retention removes old segments like any other; a pending transaction whose
//!   half record is gone is rolled back (there is nothing left to deliver). Resolved
//!   transaction ids are remembered for [`RESOLVED_MEMORY`] transactions (to tell "already
//!   resolved" from "unknown"); older ones are forgotten.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sluice_common::Clock;
use sluice_store::{AppendMessage, ReadStatus, Store, StoredMessage};
use tokio::sync::broadcast;

/// Most checks one run publishes; the broker runs checks every half interval (at most every
/// second), so a backlog drains at this many per run. Proxies give each producer's
/// Telemetry stream room for more than this.
pub const MAX_CHECKS_PER_RUN: usize = 256;

use crate::broker::{Broker, BrokerConfig, random_seed, splitmix, to_message};
use crate::error::BrokerError;
use crate::messaging::Message;
use crate::meta::write_atomic;

/// Internal topic holding half messages.
pub const HALF_TOPIC: &str = "%HALF%";
/// Internal topic holding transaction ops (checks and resolutions).
pub const TX_OP_TOPIC: &str = "%TXOP%";
/// How many resolved transaction ids are remembered to answer "already resolved".
pub const RESOLVED_MEMORY: usize = 16_384;

/// Property keys of half records (all in the reserved property list).
pub mod props {
    pub const REAL_TOPIC: &str = "REAL_TOPIC";
    pub const REAL_QID: &str = "REAL_QID";
    pub const TRANSACTION_ID: &str = "__transactionId__";
    /// In RocketMQ 4 the producer group; here the producer's client id.
    pub const PRODUCER: &str = "PGROUP";
    pub const HALF: &str = "TRAN_MSG";
}

/// How a transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransactionResolution {
    Commit,
    Rollback,
}

impl TransactionResolution {
    pub fn as_str(&self) -> &'static str {
        match self {
            TransactionResolution::Commit => "commit",
            TransactionResolution::Rollback => "rollback",
        }
    }

    pub fn parse(s: &str) -> Option<TransactionResolution> {
        match s.trim().to_ascii_lowercase().as_str() {
            "commit" => Some(TransactionResolution::Commit),
            "rollback" => Some(TransactionResolution::Rollback),
            _ => None,
        }
    }
}

/// Who ended a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransactionSource {
    /// The producer, on its own.
    Client,
    /// The producer, answering a check.
    Check,
    /// The broker, after the last unanswered check (or because the half message is gone).
    Default,
    /// Found committed at start-up (the op was lost in a torn write).
    Recovery,
}

impl TransactionSource {
    fn as_str(&self) -> &'static str {
        match self {
            TransactionSource::Client => "by the producer",
            TransactionSource::Check => "by the producer answering a check",
            TransactionSource::Default => "by the broker after unanswered checks",
            TransactionSource::Recovery => "before the last restart",
        }
    }
}

/// An end-transaction request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndTransaction {
    /// Topic of the message; checked when not empty.
    pub topic: String,
    /// Message id; checked when not empty.
    pub message_id: String,
    pub transaction_id: String,
    pub resolution: TransactionResolution,
    pub source: TransactionSource,
}

/// A request to ask a producer how an orphaned transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionCheck {
    pub topic: String,
    pub transaction_id: String,
    /// The half message as sent (on its real topic and queue).
    pub message: Message,
    pub store_timestamp_ms: i64,
    /// The producer that sent it, when known; prefer it over other producers of the topic.
    pub producer_client_id: Option<String>,
    /// 1 for the first check.
    pub attempt: u32,
}

/// A transaction waiting for its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    txid: String,
    /// Offset of the half record in `%HALF%` queue 0.
    offset: u64,
    topic: String,
    queue: u32,
    message_id: String,
    producer: Option<String>,
    /// Store time of the half record.
    prepared_at: i64,
    /// Checks published so far.
    checks: u32,
    /// Time of the last check (0 = none yet).
    last_check_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Outcome {
    resolution: TransactionResolution,
    source: TransactionSource,
}

/// One entry of the op log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op")]
enum TxOp {
    Checked {
        txid: String,
        count: u32,
        at: i64,
    },
    Resolved {
        txid: String,
        resolution: TransactionResolution,
        source: TransactionSource,
        at: i64,
    },
}

#[derive(Serialize, Deserialize)]
struct TxSnapshot {
    half_scanned: u64,
    op_offset: u64,
    pending: Vec<Pending>,
    resolved: Vec<(String, Outcome)>,
}

/// The transaction table: pending transactions and recently resolved ones.
#[derive(Debug, Default)]
struct TxTable {
    pending: HashMap<String, Pending>,
    resolved: HashMap<String, Outcome>,
    resolved_order: VecDeque<String>,
    /// Next `%HALF%` offset to scan.
    half_scanned: u64,
    /// Being resolved right now (not persisted).
    resolving: HashSet<String>,
    /// Op writers in flight: token -> op log end offset when they started.
    writers: BTreeMap<u64, u64>,
    next_token: u64,
}

/// Parses a half record; `None` if it lacks what a half record must carry.
fn parse_half(m: &StoredMessage) -> Option<Pending> {
    Some(Pending {
        txid: m.property(props::TRANSACTION_ID)?.to_owned(),
        offset: m.queue_offset,
        topic: m.property(props::REAL_TOPIC)?.to_owned(),
        queue: m.property(props::REAL_QID)?.parse().ok()?,
        message_id: m.msg_id()?.to_owned(),
        producer: m
            .property(props::PRODUCER)
            .filter(|p| !p.is_empty())
            .map(str::to_owned),
        prepared_at: m.store_ts,
        checks: 0,
        last_check_at: 0,
    })
}

impl TxTable {
    /// Adds a scanned half record unless its transaction is already known.
    fn add_half(&mut self, m: &StoredMessage) {
        self.add_parsed(m.queue_offset, parse_half(m));
    }

    fn add_parsed(&mut self, offset: u64, half: Option<Pending>) {
        match half {
            Some(p) => {
                if !self.pending.contains_key(&p.txid) && !self.resolved.contains_key(&p.txid) {
                    self.pending.insert(p.txid.clone(), p);
                }
            }
            None => {
                tracing::warn!(
                    offset,
                    "skipping a half message record without transaction properties"
                )
            }
        }
        self.half_scanned = self.half_scanned.max(offset + 1);
    }

    fn remember(&mut self, txid: String, o: Outcome) {
        if self.resolved.insert(txid.clone(), o).is_none() {
            self.resolved_order.push_back(txid);
        }
        while self.resolved_order.len() > RESOLVED_MEMORY {
            if let Some(old) = self.resolved_order.pop_front() {
                self.resolved.remove(&old);
            }
        }
    }

    /// Applies one op; idempotent.
    fn apply(&mut self, op: &TxOp) {
        match op {
            TxOp::Checked { txid, count, at } => {
                if let Some(p) = self.pending.get_mut(txid) {
                    if *count > p.checks {
                        p.checks = *count;
                        p.last_check_at = p.last_check_at.max(*at);
                    }
                }
            }
            TxOp::Resolved {
                txid,
                resolution,
                source,
                ..
            } => {
                if self.pending.remove(txid).is_some() {
                    self.remember(
                        txid.clone(),
                        Outcome {
                            resolution: *resolution,
                            source: *source,
                        },
                    );
                }
            }
        }
    }

    fn begin_write(&mut self, log_end: u64) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        self.writers.insert(t, log_end);
        t
    }
}

/// Transaction settings.
#[derive(Debug, Clone)]
struct TxConfig {
    interval_ms: i64,
    max_checks: u32,
    default_resolution: TransactionResolution,
    snapshot_path: PathBuf,
}

/// Transactional-message state of a broker.
pub(crate) struct Transactions {
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    cfg: TxConfig,
    table: Mutex<TxTable>,
    checks: broadcast::Sender<TransactionCheck>,
    id_seed: u64,
    id_counter: AtomicU64,
    /// Ops decided at start-up that still have to be logged.
    unlogged: Mutex<Vec<TxOp>>,
}

/// Reads queue 0 of an internal topic from `from` to its end, calling `f` per record.
/// Returns the offset after the last record read.
fn scan(
    store: &Store,
    topic: &str,
    mut from: u64,
    mut f: impl FnMut(&StoredMessage),
) -> Result<u64, BrokerError> {
    loop {
        let b = store.read(topic, 0, from, 256, 16 << 20, |_| true)?;
        match b.status {
            ReadStatus::Found => {
                for m in &b.messages {
                    f(m);
                }
                if b.next_offset <= from {
                    return Ok(from);
                }
                from = b.next_offset;
            }
            // Deleted by retention: continue at the oldest record left.
            ReadStatus::OffsetTooSmall if b.next_offset > from => from = b.next_offset,
            _ => return Ok(from),
        }
    }
}

fn op_record(ops: &[TxOp], now: i64) -> Result<AppendMessage, BrokerError> {
    let body = serde_json::to_vec(ops).map_err(|e| BrokerError::Internal(e.to_string()))?;
    Ok(AppendMessage {
        topic: TX_OP_TOPIC.into(),
        queue_id: 0,
        flags: 0,
        born_ts: now,
        properties: vec![],
        body: Bytes::from(body),
    })
}

/// The committed copy of a half record, on its real topic and queue.
fn committed_copy(half: &StoredMessage, p: &Pending) -> AppendMessage {
    let properties = half
        .properties
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                props::REAL_TOPIC | props::REAL_QID | props::PRODUCER | props::HALF
            )
        })
        .cloned()
        .collect();
    AppendMessage {
        topic: p.topic.clone(),
        queue_id: p.queue,
        flags: half.flags,
        born_ts: half.born_ts,
        properties,
        body: half.body.clone(),
    }
}

impl Transactions {
    /// Loads the snapshot and replays the logs after it (see the module header).
    pub(crate) fn open(
        config: &BrokerConfig,
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Transactions, BrokerError> {
        let snapshot_path = config.data_dir.join("meta").join("tx-snapshot.json");
        let mut t = TxTable::default();
        let mut op_offset = 0;
        match std::fs::read(&snapshot_path) {
            Ok(b) => {
                let s: TxSnapshot = serde_json::from_slice(&b).map_err(|e| {
                    BrokerError::Internal(format!("{} is damaged: {e}", snapshot_path.display()))
                })?;
                t.half_scanned = s.half_scanned;
                op_offset = s.op_offset;
                for p in s.pending {
                    t.pending.insert(p.txid.clone(), p);
                }
                for (txid, o) in s.resolved {
                    t.remember(txid, o);
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
        let from = t.half_scanned;
        t.half_scanned = scan(&store, HALF_TOPIC, from, |m| t.add_half(m))?;
        let mut ops = 0u64;
        scan(
            &store,
            TX_OP_TOPIC,
            op_offset,
            |m| match serde_json::from_slice::<Vec<TxOp>>(&m.body) {
                Ok(v) => {
                    for op in &v {
                        t.apply(op);
                        ops += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(offset = m.queue_offset, error = %e, "skipping unreadable transaction op record")
                }
            },
        )?;
        // A torn tail may have kept a commit's copy and lost its op: such a transaction is
        // committed already and must not be checked (and committed) again.
        let mut unlogged = Vec::new();
        let pending: Vec<Pending> = t.pending.values().cloned().collect();
        for p in pending {
            let copied = store.lookup_message_id(&p.message_id)?.is_some_and(|m| {
                m.topic == p.topic && m.property(props::TRANSACTION_ID) == Some(p.txid.as_str())
            });
            if copied {
                let op = TxOp::Resolved {
                    txid: p.txid.clone(),
                    resolution: TransactionResolution::Commit,
                    source: TransactionSource::Recovery,
                    at: clock.now_ms(),
                };
                t.apply(&op);
                unlogged.push(op);
            }
        }
        tracing::info!(
            pending = t.pending.len(),
            ops_replayed = ops,
            repaired = unlogged.len(),
            "transaction state restored"
        );
        let (checks, _) = broadcast::channel(1024);
        Ok(Transactions {
            store,
            clock,
            cfg: TxConfig {
                interval_ms: config.transaction_check_interval.as_millis().max(1) as i64,
                max_checks: config.transaction_max_checks,
                default_resolution: config.transaction_default_resolution,
                snapshot_path,
            },
            table: Mutex::new(t),
            checks,
            id_seed: random_seed(),
            id_counter: AtomicU64::new(0),
            unlogged: Mutex::new(unlogged),
        })
    }

    fn new_txid(&self) -> String {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        let a = splitmix(self.id_seed ^ n);
        let b = splitmix(a ^ n.rotate_left(32));
        format!("{a:016X}{b:016X}")
    }

    /// Turns the append of a message to a transaction topic into its half record.
    pub(crate) fn half(&self, mut a: AppendMessage, producer: Option<&str>) -> AppendMessage {
        let real = std::mem::replace(&mut a.topic, HALF_TOPIC.to_owned());
        a.properties.push((props::REAL_TOPIC.into(), real));
        a.properties
            .push((props::REAL_QID.into(), a.queue_id.to_string()));
        a.properties
            .push((props::TRANSACTION_ID.into(), self.new_txid()));
        if let Some(p) = producer.filter(|p| !p.is_empty()) {
            a.properties.push((props::PRODUCER.into(), p.to_owned()));
        }
        a.properties.push((props::HALF.into(), "true".into()));
        a.queue_id = 0;
        a
    }

    /// The queue and transaction id a send receipt reports for an append; `None` for an
    /// append that is not a half record.
    pub(crate) fn receipt(a: &AppendMessage) -> Option<(u32, String)> {
        if a.topic != HALF_TOPIC {
            return None;
        }
        Some((
            a.property(props::REAL_QID)?.parse().ok()?,
            a.property(props::TRANSACTION_ID)?.to_owned(),
        ))
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<TransactionCheck> {
        self.checks.subscribe()
    }

    /// Number of transactions waiting for their end.
    pub(crate) fn pending_count(&self) -> usize {
        if let Err(e) = self.catch_up() {
            tracing::warn!(error = %e, "reading new half messages failed");
        }
        self.table.lock().pending.len()
    }

    fn op_log_end(&self) -> u64 {
        self.store.queue_offsets(TX_OP_TOPIC, 0).1
    }

    /// Adds half records stored since the last scan. The store is read without holding
    /// the table lock; each record is applied once, in order (only records at or above
    /// `half_scanned` are applied, and it only grows).
    fn catch_up(&self) -> Result<(), BrokerError> {
        let from = self.table.lock().half_scanned;
        let mut found = Vec::new();
        let end = scan(&self.store, HALF_TOPIC, from, |m| {
            found.push((m.queue_offset, parse_half(m)))
        })?;
        let mut t = self.table.lock();
        for (offset, half) in found {
            if offset >= t.half_scanned {
                t.add_parsed(offset, half);
            }
        }
        t.half_scanned = t.half_scanned.max(end);
        Ok(())
    }

    fn read_half(&self, p: &Pending) -> Result<Option<StoredMessage>, BrokerError> {
        let b = self
            .store
            .read(HALF_TOPIC, 0, p.offset, 1, u64::MAX, |_| true)?;
        Ok(b.messages.into_iter().find(|m| m.queue_offset == p.offset))
    }

    /// Ends a transaction on a producer's request.
    pub(crate) async fn end(&self, req: EndTransaction) -> Result<(), BrokerError> {
        let txid = &req.transaction_id;
        if txid.is_empty() {
            return Err(BrokerError::InvalidTransaction(
                "the transaction id is empty".into(),
            ));
        }
        self.catch_up()?;
        let p = {
            let mut t = self.table.lock();
            if let Some(o) = t.resolved.get(txid) {
                return Err(BrokerError::InvalidTransaction(format!(
                    "transaction {txid} was already {} {}",
                    match o.resolution {
                        TransactionResolution::Commit => "committed",
                        TransactionResolution::Rollback => "rolled back",
                    },
                    o.source.as_str()
                )));
            }
            let Some(p) = t.pending.get(txid).cloned() else {
                return Err(BrokerError::InvalidTransaction(format!(
                    "unknown transaction id {txid:.80?}"
                )));
            };
            if !req.topic.is_empty() && req.topic != p.topic {
                return Err(BrokerError::InvalidTransaction(format!(
                    "transaction {txid} belongs to topic {}, not {:.100}",
                    p.topic, req.topic
                )));
            }
            if !req.message_id.is_empty() && req.message_id != p.message_id {
                return Err(BrokerError::InvalidTransaction(format!(
                    "transaction {txid} is for message {}, not {:.140}",
                    p.message_id, req.message_id
                )));
            }
            if !t.resolving.insert(txid.clone()) {
                return Err(BrokerError::InvalidTransaction(format!(
                    "transaction {txid} is being ended by another request"
                )));
            }
            p
        };
        self.resolve(p, req.resolution, req.source).await
    }

    /// Resolves a transaction marked `resolving`: appends the copy (commit) and the op,
    /// then records the outcome. The mark is always cleared.
    async fn resolve(
        &self,
        p: Pending,
        resolution: TransactionResolution,
        source: TransactionSource,
    ) -> Result<(), BrokerError> {
        let token = {
            let log_end = self.op_log_end();
            self.table.lock().begin_write(log_end)
        };
        let r = self.write_resolution(&p, resolution, source).await;
        let mut t = self.table.lock();
        t.writers.remove(&token);
        t.resolving.remove(&p.txid);
        match r {
            Ok((op, gone)) => {
                t.apply(&op);
                drop(t);
                if gone {
                    return Err(BrokerError::InvalidTransaction(format!(
                        "the half message of transaction {} is no longer stored (deleted by \
                         retention); the transaction was rolled back",
                        p.txid
                    )));
                }
                tracing::debug!(txid = %p.txid, topic = %p.topic, resolution = resolution.as_str(), ?source, "transaction ended");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Returns the op written and whether the half record was missing (then rolled back).
    async fn write_resolution(
        &self,
        p: &Pending,
        mut resolution: TransactionResolution,
        mut source: TransactionSource,
    ) -> Result<(TxOp, bool), BrokerError> {
        let mut batch = Vec::with_capacity(2);
        let mut gone = false;
        if resolution == TransactionResolution::Commit {
            match self.read_half(p)? {
                Some(m) => batch.push(committed_copy(&m, p)),
                None => {
                    tracing::warn!(txid = %p.txid, topic = %p.topic, "half message deleted before its commit; rolling back");
                    resolution = TransactionResolution::Rollback;
                    source = TransactionSource::Default;
                    gone = true;
                }
            }
        }
        let now = self.clock.now_ms();
        let op = TxOp::Resolved {
            txid: p.txid.clone(),
            resolution,
            source,
            at: now,
        };
        // Copy first, then its op, in one call: the op is durable only with the copy.
        batch.push(op_record(std::slice::from_ref(&op), now)?);
        self.store.append(batch).await?;
        Ok((op, gone))
    }

    /// Publishes checks (at most [`MAX_CHECKS_PER_RUN`]) for transactions left pending for
    /// a check interval and applies
    /// the default resolution to those checked the maximum number of times. Returns the
    /// number of checks published.
    pub(crate) async fn check_due(&self) -> Result<usize, BrokerError> {
        let now = self.clock.now_ms();
        let mut ops = std::mem::take(&mut *self.unlogged.lock());
        let mut to_check = Vec::new();
        let mut to_default = Vec::new();
        self.catch_up()?;
        let token = {
            let mut guard = self.table.lock();
            let t = &mut *guard;
            for p in t.pending.values_mut() {
                if t.resolving.contains(&p.txid) {
                    continue;
                }
                let due = p.prepared_at.max(p.last_check_at) + self.cfg.interval_ms;
                if due > now {
                    continue;
                }
                if p.checks >= self.cfg.max_checks {
                    to_default.push(p.clone());
                } else if to_check.len() >= MAX_CHECKS_PER_RUN {
                    // Paced: the rest are due at the next run (and do not count yet), so a
                    // burst never overflows the producers' telemetry streams.
                    continue;
                } else {
                    p.checks += 1;
                    p.last_check_at = now;
                    ops.push(TxOp::Checked {
                        txid: p.txid.clone(),
                        count: p.checks,
                        at: now,
                    });
                    to_check.push(p.clone());
                }
            }
            for p in &to_default {
                t.resolving.insert(p.txid.clone());
            }
            let log_end = self.op_log_end();
            (!ops.is_empty()).then(|| t.begin_write(log_end))
        };
        if let Some(token) = token {
            let r = match op_record(&ops, now) {
                Ok(rec) => self
                    .store
                    .append(vec![rec])
                    .await
                    .map(|_| ())
                    .map_err(BrokerError::from),
                Err(e) => Err(e),
            };
            self.table.lock().writers.remove(&token);
            if let Err(e) = r {
                // Counted in memory; a lost Checked op only means one more check later.
                tracing::warn!(error = %e, "transaction check ops not stored");
            }
        }
        let mut published = 0;
        for p in to_check {
            match self.read_half(&p) {
                Ok(Some(m)) => {
                    let mut message = to_message(&m);
                    message.topic = p.topic.clone();
                    message.queue_id = Some(p.queue);
                    let check = TransactionCheck {
                        topic: p.topic.clone(),
                        transaction_id: p.txid.clone(),
                        message,
                        store_timestamp_ms: m.store_ts,
                        producer_client_id: p.producer.clone(),
                        attempt: p.checks,
                    };
                    // No subscriber (no protocol edge running) is not an error: the check
                    // still counts towards the default resolution.
                    let _ = self.checks.send(check);
                    published += 1;
                    tracing::debug!(txid = %p.txid, topic = %p.topic, attempt = p.checks, "transaction check published");
                }
                Ok(None) => {
                    // Nothing left to deliver: roll back now.
                    if self.table.lock().resolving.insert(p.txid.clone()) {
                        to_default.push(p);
                    }
                }
                // Checked again after the next interval.
                Err(e) => {
                    tracing::warn!(txid = %p.txid, error = %e, "reading a half message for its check failed")
                }
            }
        }
        for p in to_default {
            let resolution = match self.read_half(&p) {
                Ok(Some(_)) => self.cfg.default_resolution,
                Ok(None) => TransactionResolution::Rollback,
                Err(e) => {
                    tracing::warn!(txid = %p.txid, error = %e, "reading a half message failed; default resolution postponed");
                    self.table.lock().resolving.remove(&p.txid);
                    continue;
                }
            };
            tracing::info!(txid = %p.txid, topic = %p.topic, checks = p.checks, resolution = resolution.as_str(), "transaction ended by default");
            match self
                .resolve(p, resolution, TransactionSource::Default)
                .await
            {
                Ok(()) | Err(BrokerError::InvalidTransaction(_)) => {}
                Err(e) => tracing::warn!(error = %e, "default transaction resolution failed"),
            }
        }
        Ok(published)
    }

    /// Writes the snapshot, so that start-up replays only what came after it.
    pub(crate) fn snapshot(&self) -> Result<(), BrokerError> {
        let s = {
            let t = self.table.lock();
            let end = self.op_log_end();
            let op_offset = t.writers.values().copied().min().unwrap_or(end).min(end);
            TxSnapshot {
                half_scanned: t.half_scanned,
                op_offset,
                pending: t.pending.values().cloned().collect(),
                resolved: t
                    .resolved_order
                    .iter()
                    .filter_map(|id| t.resolved.get(id).map(|o| (id.clone(), *o)))
                    .collect(),
            }
        };
        let b = serde_json::to_vec(&s).map_err(|e| BrokerError::Internal(e.to_string()))?;
        write_atomic(&self.cfg.snapshot_path, &b)
    }
}

impl Broker {
    /// Publishes checks of orphaned transactions that are due and applies the default
    /// resolution to those checked too often. Run periodically by
    /// [`Broker::run_maintenance`]; tests call it after moving their clock. Returns the
    /// number of checks published.
    pub async fn check_transactions(&self) -> Result<usize, BrokerError> {
        self.tx.check_due().await
    }

    /// Number of transactions waiting for their end (half messages not yet resolved).
    pub fn pending_transactions(&self) -> usize {
        self.tx.pending_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn half_record(txid: &str, offset: u64) -> StoredMessage {
        StoredMessage {
            topic: HALF_TOPIC.into(),
            queue_id: 0,
            queue_offset: offset,
            physical_offset: 0,
            flags: 3,
            born_ts: 1,
            store_ts: 100,
            properties: vec![
                (sluice_store::PROP_MSG_ID.into(), format!("m-{txid}")),
                (props::REAL_TOPIC.into(), "t".into()),
                (props::REAL_QID.into(), "2".into()),
                (props::TRANSACTION_ID.into(), txid.into()),
            ],
            body: Bytes::from_static(b"x"),
            record_size: 0,
        }
    }

    fn resolved(txid: &str, r: TransactionResolution) -> TxOp {
        TxOp::Resolved {
            txid: txid.into(),
            resolution: r,
            source: TransactionSource::Client,
            at: 1,
        }
    }

    #[test]
    fn replay_is_idempotent() {
        let mut t = TxTable::default();
        t.add_half(&half_record("a", 0));
        t.add_half(&half_record("b", 1));
        let ops = vec![
            TxOp::Checked {
                txid: "a".into(),
                count: 1,
                at: 5,
            },
            resolved("b", TransactionResolution::Commit),
        ];
        for op in &ops {
            t.apply(op);
        }
        assert_eq!(t.half_scanned, 2);
        assert_eq!(t.pending["a"].checks, 1);
        assert_eq!(t.pending["a"].queue, 2);
        assert!(t.resolved.contains_key("b"));
        // Everything again, as after a snapshot older than part of the logs.
        t.add_half(&half_record("a", 0));
        t.add_half(&half_record("b", 1));
        for op in &ops {
            t.apply(op);
        }
        t.apply(&TxOp::Checked {
            txid: "a".into(),
            count: 1,
            at: 9,
        });
        assert_eq!(t.pending.len(), 1);
        assert_eq!(t.pending["a"].checks, 1);
        assert_eq!(t.pending["a"].last_check_at, 5);
        assert_eq!(t.resolved.len(), 1);
    }

    #[test]
    fn records_without_transaction_properties_are_skipped() {
        let mut t = TxTable::default();
        let mut m = half_record("a", 4);
        m.properties.retain(|(k, _)| k != props::REAL_QID);
        t.add_half(&m);
        assert!(t.pending.is_empty());
        assert_eq!(t.half_scanned, 5);
    }

    #[test]
    fn resolved_memory_is_bounded() {
        let mut t = TxTable::default();
        for i in 0..RESOLVED_MEMORY + 10 {
            t.remember(
                format!("{i}"),
                Outcome {
                    resolution: TransactionResolution::Rollback,
                    source: TransactionSource::Client,
                },
            );
        }
        assert_eq!(t.resolved.len(), RESOLVED_MEMORY);
        assert!(!t.resolved.contains_key("0"));
        assert!(t.resolved.contains_key(&format!("{}", RESOLVED_MEMORY + 9)));
    }

    #[test]
    fn committed_copy_drops_half_properties_and_keeps_the_id() {
        let m = half_record("a", 0);
        let p = parse_half(&m).expect("half");
        let c = committed_copy(&m, &p);
        assert_eq!((c.topic.as_str(), c.queue_id), ("t", 2));
        assert_eq!(c.property(sluice_store::PROP_MSG_ID), Some("m-a"));
        assert_eq!(c.property(props::TRANSACTION_ID), Some("a"));
        assert_eq!(c.property(props::REAL_TOPIC), None);
        assert_eq!(c.flags, 3);
    }

    #[test]
    fn resolutions_parse() {
        assert_eq!(
            TransactionResolution::parse(" Commit"),
            Some(TransactionResolution::Commit)
        );
        assert_eq!(
            TransactionResolution::parse("rollback"),
            Some(TransactionResolution::Rollback)
        );
        assert_eq!(TransactionResolution::parse("maybe"), None);
    }

    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Action {
        Half,
        Check(usize),
        Resolve(usize, bool),
    }

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            Just(Action::Half),
            (0usize..8).prop_map(Action::Check),
            (0usize..8, any::<bool>()).prop_map(|(i, c)| Action::Resolve(i, c)),
        ]
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Model {
        Pending(u32),
        Done(TransactionResolution),
    }

    fn state(t: &TxTable) -> HashMap<String, Model> {
        let mut m: HashMap<String, Model> = t
            .pending
            .iter()
            .map(|(k, p)| (k.clone(), Model::Pending(p.checks)))
            .collect();
        for (k, o) in &t.resolved {
            m.insert(k.clone(), Model::Done(o.resolution));
        }
        m
    }

    proptest! {
        /// The table agrees with a simple model of each transaction, and so does a restart
        /// from a snapshot taken at any point: all half records after the snapshot are
        /// scanned first, then the ops from an op offset at or before the snapshot's (ops
        /// that were in flight are replayed twice).
        #[test]
        fn table_matches_model_across_snapshots(
            actions in proptest::collection::vec(action(), 1..60),
            cut in any::<proptest::sample::Index>(),
            back in 0usize..4,
        ) {
            let mut halves: Vec<StoredMessage> = Vec::new();
            let mut ops: Vec<TxOp> = Vec::new();
            let mut events: Vec<(bool, usize)> = Vec::new(); // (is_half, index)
            let mut model: HashMap<String, Model> = HashMap::new();
            for a in actions {
                let pending: Vec<String> = {
                    let mut v: Vec<String> = model.iter()
                        .filter(|(_, s)| matches!(s, Model::Pending(_)))
                        .map(|(k, _)| k.clone()).collect();
                    v.sort();
                    v
                };
                match a {
                    Action::Half => {
                        let txid = format!("tx{}", halves.len());
                        halves.push(half_record(&txid, halves.len() as u64));
                        events.push((true, halves.len() - 1));
                        model.insert(txid, Model::Pending(0));
                    }
                    Action::Check(i) if !pending.is_empty() => {
                        let txid = pending[i % pending.len()].clone();
                        let Some(Model::Pending(n)) = model.get(&txid).copied() else { continue };
                        ops.push(TxOp::Checked { txid: txid.clone(), count: n + 1, at: 1 });
                        events.push((false, ops.len() - 1));
                        model.insert(txid, Model::Pending(n + 1));
                    }
                    Action::Resolve(i, commit) if !pending.is_empty() => {
                        let txid = pending[i % pending.len()].clone();
                        let r = if commit { TransactionResolution::Commit } else { TransactionResolution::Rollback };
                        ops.push(resolved(&txid, r));
                        events.push((false, ops.len() - 1));
                        model.insert(txid, Model::Done(r));
                    }
                    _ => {}
                }
            }
            let apply = |t: &mut TxTable, (is_half, i): (bool, usize)| {
                if is_half { t.add_half(&halves[i]) } else { t.apply(&ops[i]) }
            };
            let mut live = TxTable::default();
            for e in &events { apply(&mut live, *e); }
            prop_assert_eq!(state(&live), model.clone());

            let k = cut.index(events.len() + 1);
            let mut snap = TxTable::default();
            for e in &events[..k] { apply(&mut snap, *e); }
            let ops_before = events[..k].iter().filter(|(h, _)| !h).count();
            let from_op = ops_before.saturating_sub(back);
            let from_half = snap.half_scanned as usize;
            for m in &halves[from_half..] { snap.add_half(m); }
            for op in &ops[from_op..] { snap.apply(op); }
            prop_assert_eq!(state(&snap), model);
        }
    }
}
