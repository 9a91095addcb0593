//! The broker: topic and group metadata, sends, POP receives with long polling, acks,
//! invisibility changes, retries and dead letters, on top of one [`Store`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sluice_common::{Clock, validate_resource_name};
use sluice_store::{
    AppendMessage, PROP_KEYS, PROP_MSG_ID, PROP_TAGS, ReadStatus, Store, StoredMessage, tag_hash,
};
use tokio::sync::Notify;

use crate::error::BrokerError;
use crate::filter::{Filter, MessageView};
use crate::handle::ReceiptHandle;
use crate::messaging::{Delivery, Message, Messaging, ReceiveRequest, SendReceipt, TopicRoute};
use crate::meta::{
    Backoff, DEFAULT_MAX_ATTEMPTS, GroupConfig, MessageType, Metadata, StartPosition, TopicConfig,
    dlq_topic, write_atomic,
};
use crate::pop::{InFlight, POP_LOG_TOPIC, PopEvent, PopTable, QueueKey};

/// System property keys stored with a message; user properties may not use them.
pub mod keys {
    pub const BORN_HOST: &str = "BORN_HOST";
    pub const MESSAGE_GROUP: &str = "__SHARDINGKEY";
    pub const DELIVER_AT: &str = "TIMER_DELIVER_MS";
    pub const DLQ_ORIGIN_TOPIC: &str = "DLQ_ORIGIN_TOPIC";
    pub const DLQ_ORIGIN_MSG_ID: &str = "DLQ_ORIGIN_MESSAGE_ID";
    pub const DLQ_ORIGIN_GROUP: &str = "DLQ_ORIGIN_GROUP";
}

/// Property names reserved for the system (ours and RocketMQ's well-known ones).
pub const RESERVED_PROPERTIES: &[&str] = &[
    sluice_store::PROP_MSG_ID,
    sluice_store::PROP_TAGS,
    sluice_store::PROP_KEYS,
    keys::BORN_HOST,
    keys::MESSAGE_GROUP,
    keys::DELIVER_AT,
    keys::DLQ_ORIGIN_TOPIC,
    keys::DLQ_ORIGIN_MSG_ID,
    keys::DLQ_ORIGIN_GROUP,
    "DELAY",
    "WAIT",
    "RETRY_TOPIC",
    "REAL_TOPIC",
    "REAL_QID",
    "TRAN_MSG",
    "PGROUP",
    "MIN_OFFSET",
    "MAX_OFFSET",
    "BUYER_ID",
    "ORIGIN_MESSAGE_ID",
    "TRANSFER_FLAG",
    "CORRECTION_FLAG",
    "MQ2_FLAG",
    "RECONSUME_TIME",
    "MSG_REGION",
    "TRACE_ON",
    "MAX_RECONSUME_TIMES",
    "CONSUME_START_TIME",
    "__STARTDELIVERTIME",
    "TIMER_DELAY_SEC",
    "TIMER_DELAY_MS",
    "TIMER_OUT_MS",
    "INNER_MULTI_DISPATCH",
    "INNER_MULTI_QUEUE_OFFSET",
    "TRAN_PREPARED_QUEUE_OFFSET",
    "TRANSACTION_CHECK_TIMES",
    "CHECK_IMMUNITY_TIME_IN_SECONDS",
    "SHARDING_KEY",
    "__transactionId__",
    "UNIQ_KEY",
];

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    pub broker_name: String,
    pub max_body_size: usize,
    pub max_properties: usize,
    pub max_properties_bytes: usize,
    pub max_message_group_len: usize,
    pub max_tag_len: usize,
    pub max_key_len: usize,
    pub max_message_id_len: usize,
    /// Invisible durations accepted by receive and change-invisible.
    pub min_invisible: Duration,
    pub max_invisible: Duration,
    pub max_receive_batch: u32,
    /// How often the POP state is snapshotted (the log after it is replayed on start).
    pub pop_snapshot_interval: Duration,
    /// How often retention runs.
    pub retention_interval: Duration,
    /// Latest delivery time accepted for a delay message, from now.
    pub max_delay: Duration,
    /// The timer task of delay messages.
    pub timer: crate::timer::TimerConfig,
    /// A transaction neither committed nor rolled back for this long is checked with its
    /// producer, and again after each further interval.
    pub transaction_check_interval: Duration,
    /// Unanswered checks before `transaction_default_resolution` is applied.
    pub transaction_max_checks: u32,
    pub transaction_default_resolution: crate::transaction::TransactionResolution,
}

impl BrokerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        BrokerConfig {
            data_dir: data_dir.into(),
            broker_name: "sluice-0".into(),
            max_body_size: 4 << 20,
            max_properties: 128,
            max_properties_bytes: 16 << 10,
            max_message_group_len: 64,
            max_tag_len: 256,
            max_key_len: 256,
            max_message_id_len: 128,
            min_invisible: Duration::from_secs(1),
            max_invisible: Duration::from_secs(12 * 3600),
            max_receive_batch: 1024,
            pop_snapshot_interval: Duration::from_secs(60),
            retention_interval: Duration::from_secs(60),
            max_delay: Duration::from_secs(40 * 86_400),
            timer: crate::timer::TimerConfig::default(),
            transaction_check_interval: Duration::from_secs(30),
            transaction_max_checks: 15,
            transaction_default_resolution: crate::transaction::TransactionResolution::Rollback,
        }
    }
}

/// Per-queue view of a topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueStatus {
    pub queue_id: u32,
    pub min_offset: u64,
    pub max_offset: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TopicStatus {
    #[serde(flatten)]
    pub config: TopicConfig,
    pub queue_status: Vec<QueueStatus>,
}

/// Progress of a group on one queue.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupQueueStatus {
    pub topic: String,
    pub queue_id: u32,
    /// Next offset never handed out.
    pub cursor: u64,
    pub max_offset: u64,
    /// Messages not yet handed out.
    pub lag: u64,
    /// Handed out and not yet acknowledged.
    pub inflight: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupStatus {
    #[serde(flatten)]
    pub config: GroupConfig,
    pub queues: Vec<GroupQueueStatus>,
}

/// A stored message with where it is, for admin look-ups.
#[derive(Debug, Clone)]
pub struct StoredView {
    pub message: Message,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub store_timestamp_ms: i64,
    pub physical_offset: u64,
}

#[derive(Serialize, Deserialize)]
struct PopSnapshot {
    /// Offset in the `%POP%` log after the last event the snapshot contains.
    log_offset: u64,
    table: Vec<(QueueKey, crate::pop::QueuePop)>,
}

/// Names of the groups and topics that exist, for filtering replayed consumption state.
/// State of a deleted group or topic is dropped from memory and from the snapshots at once
/// (see `delete_group`); this filter covers a crash between the delete and that snapshot,
/// so a group created again under the same name starts fresh.
struct Live {
    groups: std::collections::HashSet<String>,
    topics: std::collections::HashSet<String>,
}

impl Live {
    fn new(meta: &Metadata) -> Live {
        Live {
            groups: meta.groups().into_iter().map(|g| g.name).collect(),
            topics: meta.topics().into_iter().map(|t| t.name).collect(),
        }
    }

    fn contains(&self, k: &QueueKey) -> bool {
        self.groups.contains(&k.group) && self.topics.contains(&k.topic)
    }
}

/// The broker. Share it behind an `Arc`.
pub struct Broker {
    store: Arc<Store>,
    meta: Metadata,
    config: BrokerConfig,
    clock: Arc<dyn Clock>,
    pop: Mutex<PopTable>,
    /// Offset of the next record of the `%POP%` log already reflected in `pop` on start.
    pop_log_applied: AtomicU64,
    waiters: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    nonce_seed: u64,
    nonce_counter: AtomicU64,
    round_robin: AtomicU64,
    pub(crate) timer: Arc<crate::timer::Timer>,
    metrics: crate::metrics::BrokerMetrics,
    pub(crate) tx: crate::transaction::Transactions,
    pub(crate) offsets: crate::offsets::Offsets,
}

pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

pub(crate) fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    u64::from_le_bytes(b) ^ t ^ ((std::process::id() as u64) << 32)
}

pub(crate) struct View<'a>(pub(crate) &'a StoredMessage);

impl MessageView for View<'_> {
    fn tag(&self) -> Option<&str> {
        self.0.tag()
    }
    fn property(&self, key: &str) -> Option<&str> {
        if RESERVED_PROPERTIES.contains(&key) && key != "TAGS" {
            return None;
        }
        self.0.property(key)
    }
}

/// Converts a stored record back into a message.
pub fn to_message(m: &StoredMessage) -> Message {
    let mut user = BTreeMap::new();
    for (k, v) in &m.properties {
        if !RESERVED_PROPERTIES.contains(&k.as_str()) {
            user.insert(k.clone(), v.clone());
        }
    }
    Message {
        topic: m.topic.clone(),
        message_id: m.msg_id().unwrap_or_default().to_owned(),
        tag: m.tag().map(str::to_owned),
        keys: m.keys().map(str::to_owned).collect(),
        user_properties: user,
        body: m.body.clone(),
        message_type: Some(MessageType::from_flag(m.flags)),
        message_group: m.property(keys::MESSAGE_GROUP).map(str::to_owned),
        delivery_timestamp_ms: m.property(keys::DELIVER_AT).and_then(|v| v.parse().ok()),
        born_timestamp_ms: m.born_ts,
        born_host: m.property(keys::BORN_HOST).unwrap_or_default().to_owned(),
        queue_id: Some(m.queue_id),
        producer_client_id: None,
    }
}

impl Broker {
    /// Opens the broker over a store that is already open: loads metadata and rebuilds the
    /// POP state from its snapshot and the `%POP%` log.
    pub fn open(
        config: BrokerConfig,
        store: Arc<Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Broker>, BrokerError> {
        let meta = Metadata::open(config.data_dir.join("meta"))?;
        let live = Live::new(&meta);
        let snap_path = config.data_dir.join("meta").join("pop-snapshot.json");
        // Snapshot entries of deleted groups or topics, dropped here.
        let mut dropped = 0usize;
        let (mut table, mut log_offset) = match std::fs::read(&snap_path) {
            Ok(b) => {
                let s: PopSnapshot = serde_json::from_slice(&b).map_err(|e| {
                    BrokerError::Internal(format!("{} is damaged: {e}", snap_path.display()))
                })?;
                let mut t = PopTable::default();
                for (k, q) in s.table {
                    // A group or topic deleted just before a crash (see `Live`).
                    if live.contains(&k) {
                        t.insert(k, q);
                    } else {
                        dropped += 1;
                    }
                }
                (t, s.log_offset)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (PopTable::default(), 0),
            Err(e) => {
                return Err(BrokerError::Internal(format!(
                    "reading {}: {e}",
                    snap_path.display()
                )));
            }
        };
        // Replay the POP log written after the snapshot.
        let mut replayed = 0u64;
        let (min, _) = store.queue_offsets(POP_LOG_TOPIC, 0);
        log_offset = log_offset.max(min);
        loop {
            let b = store.read(POP_LOG_TOPIC, 0, log_offset, 1024, 16 << 20, |_| true)?;
            if b.status != ReadStatus::Found {
                break;
            }
            for m in &b.messages {
                match serde_json::from_slice::<Vec<PopEvent>>(&m.body) {
                    Ok(events) => {
                        for e in &events {
                            if live.contains(e.key()) {
                                table.apply(e);
                            }
                            replayed += 1;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(offset = m.queue_offset, error = %e, "skipping unreadable POP log record")
                    }
                }
            }
            log_offset = b.next_offset;
        }
        tracing::info!(events = replayed, "POP state restored");
        let waiters: Arc<Mutex<HashMap<String, Arc<Notify>>>> = Arc::default();
        let w = waiters.clone();
        store.set_arrival_listener(move |topic, _q, _max| {
            if let Some(n) = w.lock().get(topic) {
                n.notify_waiters();
            }
        });
        let tx = crate::transaction::Transactions::open(&config, store.clone(), clock.clone())?;
        let offsets = crate::offsets::Offsets::open(&config, store.clone(), |k| live.contains(k))?;
        let timer = Arc::new(crate::timer::Timer::open(
            config.data_dir.join("timer"),
            store.clone(),
            clock.clone(),
            config.timer.clone(),
        )?);
        Ok(Arc::new(Broker {
            store,
            meta,
            config,
            clock,
            pop: Mutex::new(table),
            pop_log_applied: AtomicU64::new(log_offset),
            waiters,
            nonce_seed: random_seed(),
            nonce_counter: AtomicU64::new(0),
            round_robin: AtomicU64::new(0),
            timer,
            metrics: Default::default(),
            tx,
            offsets,
        }))
        .inspect(|b| crate::metrics::register_collector(Arc::downgrade(b)))
        .and_then(|b| {
            // Snapshot right away when the log had to be replayed, so that repeated crashes
            // do not make every start replay a longer log, and when deleted state was
            // dropped, so that it cannot come back once the name is used again.
            if replayed > 0 || dropped > 0 {
                b.snapshot_pop()?;
            }
            Ok(b)
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    pub(crate) fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn nonce(&self) -> u64 {
        splitmix(self.nonce_seed ^ self.nonce_counter.fetch_add(1, Ordering::Relaxed))
    }

    pub(crate) fn notifier(&self, topic: &str) -> Arc<Notify> {
        self.waiters
            .lock()
            .entry(topic.to_owned())
            .or_default()
            .clone()
    }

    // ---------------------------------------------------------------- admin

    pub fn create_topic(
        &self,
        name: &str,
        message_type: MessageType,
        queues: u32,
    ) -> Result<TopicConfig, BrokerError> {
        if name.starts_with('%') {
            return Err(BrokerError::IllegalTopic(format!(
                "{name:?}: names starting with '%' are reserved"
            )));
        }
        self.meta.put_topic(
            TopicConfig {
                name: name.to_owned(),
                message_type,
                queues,
                created_at_ms: self.now(),
            },
            false,
        )
    }

    /// Changes a topic's type or grows its queue count.
    pub fn update_topic(
        &self,
        name: &str,
        message_type: Option<MessageType>,
        queues: Option<u32>,
    ) -> Result<TopicConfig, BrokerError> {
        let mut t = self
            .meta
            .topic(name)
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_owned()))?;
        if let Some(mt) = message_type {
            t.message_type = mt;
        }
        if let Some(q) = queues {
            t.queues = q;
        }
        self.meta.put_topic(t, true)
    }

    /// Deletes a topic's metadata and its consumption state; stored messages age out with
    /// retention.
    pub fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        self.meta.delete_topic(name)?;
        self.pop.lock().retain(|k| k.topic != name);
        self.offsets.retain(|k| k.topic != name);
        self.snapshot_after_delete();
        Ok(())
    }

    /// After a delete, the snapshots stop carrying the deleted state, and the logs are
    /// replayed only from after it, so a group created again under the same name starts
    /// fresh. If the process dies first, start-up drops the state anyway (see `Live`).
    fn snapshot_after_delete(&self) {
        if let Err(e) = self.snapshot_pop() {
            tracing::warn!(error = %e, "snapshot after a delete failed; start-up will filter");
        }
    }

    pub fn topics(&self) -> Vec<TopicConfig> {
        self.meta.topics()
    }

    pub fn topic_status(&self, name: &str) -> Result<TopicStatus, BrokerError> {
        let config = self
            .meta
            .topic(name)
            .ok_or_else(|| BrokerError::TopicNotFound(name.to_owned()))?;
        let queue_status = (0..config.queues)
            .map(|q| {
                let (min_offset, max_offset) = self.store.queue_offsets(name, q);
                QueueStatus {
                    queue_id: q,
                    min_offset,
                    max_offset,
                }
            })
            .collect();
        Ok(TopicStatus {
            config,
            queue_status,
        })
    }

    pub fn create_group(
        &self,
        name: &str,
        fifo: bool,
        max_attempts: Option<u32>,
        backoff: Option<Backoff>,
        start: Option<StartPosition>,
    ) -> Result<GroupConfig, BrokerError> {
        self.meta.put_group(
            GroupConfig {
                name: name.to_owned(),
                fifo,
                max_attempts: max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS),
                backoff: backoff.unwrap_or_default(),
                start: start.unwrap_or(StartPosition::Latest),
                created_at_ms: self.now(),
            },
            false,
        )
    }

    pub fn update_group(&self, g: GroupConfig) -> Result<GroupConfig, BrokerError> {
        if self.meta.group(&g.name).is_none() {
            return Err(BrokerError::GroupNotFound(g.name));
        }
        self.meta.put_group(g, true)
    }

    pub fn delete_group(&self, name: &str) -> Result<(), BrokerError> {
        self.meta.delete_group(name)?;
        self.pop.lock().retain(|k| k.group != name);
        self.offsets.retain(|k| k.group != name);
        self.snapshot_after_delete();
        Ok(())
    }

    pub fn groups(&self) -> Vec<GroupConfig> {
        self.meta.groups()
    }

    pub fn group_status(&self, name: &str) -> Result<GroupStatus, BrokerError> {
        let config = self
            .meta
            .group(name)
            .ok_or_else(|| BrokerError::GroupNotFound(name.to_owned()))?;
        let pop = self.pop.lock();
        let mut queues: Vec<GroupQueueStatus> = pop
            .iter()
            .filter(|(k, _)| k.group == name)
            .map(|(k, q)| {
                let (_, max) = self.store.queue_offsets(&k.topic, k.queue);
                GroupQueueStatus {
                    topic: k.topic.clone(),
                    queue_id: k.queue,
                    cursor: q.cursor,
                    max_offset: max,
                    lag: max.saturating_sub(q.cursor),
                    inflight: q.inflight.len() as u64,
                }
            })
            .collect();
        queues.sort_by(|a, b| (&a.topic, a.queue_id).cmp(&(&b.topic, b.queue_id)));
        Ok(GroupStatus { config, queues })
    }

    /// Moves a group's cursor on every queue of a topic to the first message stored at or
    /// after `ts_ms`. In-flight messages below the new cursor are dropped.
    pub async fn reset_offset(
        &self,
        group: &str,
        topic: &str,
        ts_ms: i64,
    ) -> Result<Vec<(u32, u64)>, BrokerError> {
        self.meta
            .group(group)
            .ok_or_else(|| BrokerError::GroupNotFound(group.to_owned()))?;
        let t = self
            .meta
            .topic(topic)
            .ok_or_else(|| BrokerError::TopicNotFound(topic.to_owned()))?;
        let mut events = Vec::new();
        let mut out = Vec::new();
        for q in 0..t.queues {
            let cursor = self.store.offset_for_timestamp(topic, q, ts_ms)?;
            events.push(PopEvent::Reset {
                k: key(group, topic, q),
                cursor,
            });
            out.push((q, cursor));
        }
        {
            let mut pop = self.pop.lock();
            for e in &events {
                pop.apply(e);
            }
        }
        self.persist(events).await?;
        Ok(out)
    }

    /// Looks a message up by id.
    pub fn message_by_id(&self, id: &str) -> Result<Option<StoredView>, BrokerError> {
        Ok(self
            .store
            .lookup_message_id(id)?
            .filter(|m| !m.topic.starts_with('%') || m.topic.starts_with("%DLQ%"))
            .map(|m| view(&m)))
    }

    /// Messages of a topic carrying a key, stored in `[begin, end]`.
    pub fn messages_by_key(
        &self,
        topic: &str,
        key: &str,
        begin: i64,
        end: i64,
        max: usize,
    ) -> Result<Vec<StoredView>, BrokerError> {
        Ok(self
            .store
            .lookup_key(topic, key, begin, end, max)?
            .iter()
            .map(view)
            .collect())
    }

    /// Messages of a queue from an offset.
    pub fn messages_at(
        &self,
        topic: &str,
        queue: u32,
        offset: u64,
        max: u32,
    ) -> Result<Vec<StoredView>, BrokerError> {
        let b = self
            .store
            .read(topic, queue, offset, max, 16 << 20, |_| true)?;
        Ok(b.messages.iter().map(view).collect())
    }

    /// Re-sends dead-lettered messages of a group to their original topics. Returns how
    /// many were re-sent. Messages are copied; the dead-letter topic keeps its records.
    pub async fn resend_dead_letters(&self, group: &str, max: u32) -> Result<u32, BrokerError> {
        let dlq = dlq_topic(group);
        let rgroup = format!("%RESEND%{group}");
        // A private cursor over the DLQ remembers what was already re-sent.
        let k = key(&rgroup, &dlq, 0);
        let cursor = self.pop.lock().get(&k).map(|q| q.cursor).unwrap_or(0);
        let b = self.store.read(&dlq, 0, cursor, max, 64 << 20, |_| true)?;
        let mut sent = 0;
        let mut out = Vec::new();
        for m in &b.messages {
            let mut msg = to_message(m);
            let Some(origin) = m.property(keys::DLQ_ORIGIN_TOPIC) else {
                continue;
            };
            msg.topic = origin.to_owned();
            msg.queue_id = None;
            out.push(msg);
        }
        for r in self.send(out).await {
            r?;
            sent += 1;
        }
        let next = if b.status == ReadStatus::Found {
            b.next_offset
        } else {
            cursor
        };
        let e = PopEvent::Reset { k, cursor: next };
        self.pop.lock().apply(&e);
        self.persist(vec![e]).await?;
        Ok(sent)
    }

    // ---------------------------------------------------------------- internals

    /// Appends POP events to the log; resolves once they are durable per the flush policy.
    async fn persist(&self, events: Vec<PopEvent>) -> Result<(), BrokerError> {
        if events.is_empty() {
            return Ok(());
        }
        let body = serde_json::to_vec(&events).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let m = AppendMessage {
            topic: POP_LOG_TOPIC.into(),
            queue_id: 0,
            flags: 0,
            born_ts: self.now(),
            properties: vec![],
            body: Bytes::from(body),
        };
        self.store.append(vec![m]).await?;
        Ok(())
    }

    /// Writes a snapshot of the POP state (and of the transaction and committed-offset
    /// tables), so that start-up replays only the logs after it.
    pub fn snapshot_pop(&self) -> Result<(), BrokerError> {
        // Take the log position first: every event below it is already applied in memory
        // (events are applied before they are appended).
        let (_, log_offset) = self.store.queue_offsets(POP_LOG_TOPIC, 0);
        let table: Vec<(QueueKey, crate::pop::QueuePop)> = self
            .pop
            .lock()
            .iter()
            .map(|(k, q)| (k.clone(), q.clone()))
            .collect();
        let s = PopSnapshot { log_offset, table };
        let b = serde_json::to_vec(&s).map_err(|e| BrokerError::Internal(e.to_string()))?;
        write_atomic(
            &self.config.data_dir.join("meta").join("pop-snapshot.json"),
            &b,
        )?;
        self.pop_log_applied.store(log_offset, Ordering::Relaxed);
        // The transaction and committed-offset tables are event-sourced the same way.
        self.tx.snapshot()?;
        self.offsets.snapshot()
    }

    /// Background upkeep until `shutdown` fires: POP snapshots, retention and checks of
    /// orphaned transactions.
    pub async fn run_maintenance(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut snap = tokio::time::interval(self.config.pop_snapshot_interval);
        let mut ret = tokio::time::interval(self.config.retention_interval);
        let mut txc = tokio::time::interval(
            (self.config.transaction_check_interval / 2)
                .clamp(Duration::from_millis(50), Duration::from_secs(1)),
        );
        txc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        snap.tick().await;
        ret.tick().await;
        let timers = tokio::spawn(self.timer.clone().run(shutdown.clone()));
        loop {
            tokio::select! {
                _ = snap.tick() => {
                    let b = self.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || b.snapshot_pop()).await {
                        tracing::warn!(error = %e, "POP snapshot failed");
                    }
                }
                _ = ret.tick() => {
                    let s = self.store.clone();
                    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.run_retention()).await {
                        tracing::warn!(error = %e, "retention failed");
                    }
                }
                _ = txc.tick() => {
                    if let Err(e) = self.check_transactions().await {
                        tracing::warn!(error = %e, "transaction check failed");
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
        if let Err(e) = timers.await {
            tracing::warn!(error = %e, "the timer task failed");
        }
        if let Err(e) = self.snapshot_pop() {
            tracing::warn!(error = %e, "final POP snapshot failed");
        }
    }

    fn validate(&self, m: &Message, topic: &TopicConfig) -> Result<(), BrokerError> {
        let c = &self.config;
        if m.body.is_empty() {
            return Err(BrokerError::BodyEmpty);
        }
        if m.body.len() > c.max_body_size {
            return Err(BrokerError::BodyTooLarge {
                size: m.body.len(),
                max: c.max_body_size,
            });
        }
        if m.message_id.is_empty()
            || m.message_id.len() > c.max_message_id_len
            || m.message_id.chars().any(|ch| ch.is_control() || ch == ' ')
        {
            return Err(BrokerError::IllegalMessageId(format!(
                "{:.140?}",
                m.message_id
            )));
        }
        if let Some(tag) = &m.tag {
            if tag.trim().is_empty()
                || tag.len() > c.max_tag_len
                || tag.contains('|')
                || tag.chars().any(char::is_control)
            {
                return Err(BrokerError::IllegalTag(format!("{tag:.300?}")));
            }
        }
        for k in &m.keys {
            if k.trim().is_empty()
                || k.len() > c.max_key_len
                || k.contains(' ')
                || k.chars().any(char::is_control)
            {
                return Err(BrokerError::IllegalKey(format!("{k:.300?}")));
            }
        }
        if m.user_properties.len() > c.max_properties {
            return Err(BrokerError::PropertiesTooLarge(format!(
                "{} properties, at most {}",
                m.user_properties.len(),
                c.max_properties
            )));
        }
        let mut bytes = 0;
        for (k, v) in &m.user_properties {
            if k.is_empty()
                || RESERVED_PROPERTIES.contains(&k.as_str())
                || k.chars().any(char::is_control)
            {
                return Err(BrokerError::IllegalPropertyKey(format!("{k:.100}")));
            }
            if v.contains('\0') {
                return Err(BrokerError::IllegalPropertyKey(format!(
                    "{k:.100} (value contains NUL)"
                )));
            }
            bytes += k.len() + v.len();
        }
        if bytes > c.max_properties_bytes {
            return Err(BrokerError::PropertiesTooLarge(format!(
                "{bytes} bytes, at most {}",
                c.max_properties_bytes
            )));
        }
        let mt = m
            .message_type
            .unwrap_or(match (&m.message_group, m.delivery_timestamp_ms) {
                (Some(_), _) => MessageType::Fifo,
                (None, Some(_)) => MessageType::Delay,
                _ => MessageType::Normal,
            });
        if mt != topic.message_type {
            return Err(BrokerError::MessageTypeMismatch {
                topic: topic.name.clone(),
                expected: topic.message_type.as_str().into(),
                got: mt.as_str().into(),
            });
        }
        match mt {
            MessageType::Fifo => match &m.message_group {
                Some(g)
                    if !g.is_empty()
                        && g.len() <= c.max_message_group_len
                        && !g.chars().any(char::is_control) => {}
                Some(g) => return Err(BrokerError::IllegalMessageGroup(format!("{g:.100?}"))),
                None => {
                    return Err(BrokerError::IllegalMessageGroup(
                        "a FIFO message needs a message group".into(),
                    ));
                }
            },
            MessageType::Delay => {
                crate::timer::check_delivery_time(m.delivery_timestamp_ms, self.now(), c.max_delay)?
            }
            MessageType::Normal | MessageType::Transaction => {}
        }
        Ok(())
    }

    fn to_append(&self, m: &Message, topic: &TopicConfig, queue: u32) -> AppendMessage {
        let mut props = Vec::with_capacity(m.user_properties.len() + 5);
        props.push((PROP_MSG_ID.to_owned(), m.message_id.clone()));
        if let Some(t) = &m.tag {
            props.push((PROP_TAGS.to_owned(), t.clone()));
        }
        if !m.keys.is_empty() {
            props.push((PROP_KEYS.to_owned(), m.keys.join(" ")));
        }
        if !m.born_host.is_empty() {
            props.push((keys::BORN_HOST.to_owned(), m.born_host.clone()));
        }
        if let Some(g) = &m.message_group {
            props.push((keys::MESSAGE_GROUP.to_owned(), g.clone()));
        }
        if let Some(at) = m.delivery_timestamp_ms {
            props.push((keys::DELIVER_AT.to_owned(), at.to_string()));
        }
        for (k, v) in &m.user_properties {
            props.push((k.clone(), v.clone()));
        }
        AppendMessage {
            topic: m.topic.clone(),
            queue_id: queue,
            flags: topic.message_type.flag(),
            born_ts: m.born_timestamp_ms,
            properties: props,
            body: m.body.clone(),
        }
    }

    fn start_cursor(&self, g: &GroupConfig, topic: &str, queue: u32) -> Result<u64, BrokerError> {
        let (min, _) = self.store.queue_offsets(topic, queue);
        Ok(match g.start {
            StartPosition::Earliest => min,
            StartPosition::Latest => self
                .store
                .offset_for_timestamp(topic, queue, g.created_at_ms)?
                .max(min),
            StartPosition::Timestamp(ts) => {
                self.store.offset_for_timestamp(topic, queue, ts)?.max(min)
            }
        })
    }

    /// One non-blocking POP attempt: picks visible messages, records them as in flight.
    /// Returns the deliveries, the events to persist, messages to dead-letter, and when the
    /// next in-flight message becomes visible.
    #[allow(clippy::type_complexity)]
    fn try_pop(
        &self,
        req: &ReceiveRequest,
        topic: &TopicConfig,
        group: &GroupConfig,
    ) -> Result<
        (
            Vec<Delivery>,
            Vec<PopEvent>,
            Vec<(QueueKey, u64, StoredMessage)>,
            Option<i64>,
        ),
        BrokerError,
    > {
        let now = self.now();
        let visible_at = now + req.invisible.as_millis() as i64;
        let mut out = Vec::new();
        let mut events = Vec::new();
        let mut dead = Vec::new();
        let mut next_wake: Option<i64> = None;
        let tag_hashes: Option<Vec<u64>> = match &req.filter {
            Filter::Tags(set) => Some(set.tags().map(tag_hash).collect()),
            _ => None,
        };
        let n = topic.queues.max(1);
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed) % n as u64;
        let mut pop = self.pop.lock();
        for i in 0..n {
            if out.len() as u32 >= req.max_messages {
                break;
            }
            let q = ((start + i as u64) % n as u64) as u32;
            let k = key(&group.name, &topic.name, q);
            if pop.get(&k).is_none() {
                let cursor = self.start_cursor(group, &topic.name, q)?;
                pop.insert(
                    k.clone(),
                    crate::pop::QueuePop {
                        cursor,
                        ..Default::default()
                    },
                );
            }
            let Some(state) = pop.get_mut(&k) else {
                continue;
            };
            let mut entries = Vec::new();
            // 1. Redeliver expired in-flight messages, oldest offset first.
            let expired: Vec<(u64, InFlight)> = state
                .inflight
                .iter()
                .filter(|(_, f)| f.visible_at <= now)
                .map(|(o, f)| (*o, *f))
                .collect();
            for (off, f) in expired {
                if out.len() as u32 >= req.max_messages {
                    break;
                }
                let b = self
                    .store
                    .read(&topic.name, q, off, 1, u64::MAX, |_| true)?;
                let Some(m) = b
                    .messages
                    .into_iter()
                    .next()
                    .filter(|m| m.queue_offset == off)
                else {
                    // Deleted by retention: nothing left to deliver.
                    state.inflight.remove(&off);
                    events.push(PopEvent::Removed {
                        k: k.clone(),
                        offset: off,
                    });
                    continue;
                };
                if f.attempt >= group.max_attempts {
                    // Keep it invisible while it is moved to the dead-letter topic.
                    if let Some(x) = state.inflight.get_mut(&off) {
                        x.visible_at = i64::MAX;
                    }
                    dead.push((k.clone(), off, m));
                    continue;
                }
                let inf = InFlight {
                    attempt: f.attempt + 1,
                    nonce: self.nonce(),
                    visible_at,
                    group: f.group,
                };
                out.push(self.delivery(&m, q, off, inf));
                entries.push((off, inf));
            }
            // 2. New messages from the cursor. The scan per call is bounded so that a long run
            // of filtered-out messages cannot hold the lock for long.
            let mut cursor = state.cursor;
            if group.fifo {
                cursor = self.scan_fifo(
                    req,
                    &topic.name,
                    q,
                    state,
                    visible_at,
                    &mut out,
                    &mut entries,
                )?;
            } else {
                for _ in 0..64 {
                    if out.len() as u32 >= req.max_messages {
                        break;
                    }
                    let want = req.max_messages - out.len() as u32;
                    let b = self
                        .store
                        .read(&topic.name, q, cursor, want, 16 << 20, |e| {
                            tag_hashes.as_ref().is_none_or(|h| h.contains(&e.tag_hash))
                        })?;
                    match b.status {
                        ReadStatus::Found => {}
                        ReadStatus::OffsetTooSmall => {
                            cursor = b.next_offset;
                            continue;
                        }
                        _ => break,
                    }
                    let mut stopped_at = None;
                    for m in &b.messages {
                        // After an offset reset the cursor can be behind in-flight messages.
                        if state.inflight.contains_key(&m.queue_offset)
                            || !req.filter.matches(&View(m))
                        {
                            continue;
                        }
                        let inf = InFlight {
                            attempt: 1,
                            nonce: self.nonce(),
                            visible_at,
                            group: 0,
                        };
                        out.push(self.delivery(m, q, m.queue_offset, inf));
                        entries.push((m.queue_offset, inf));
                        if out.len() as u32 >= req.max_messages {
                            // Messages after this one stay for the next receive.
                            stopped_at = Some(m.queue_offset + 1);
                            break;
                        }
                    }
                    let before = cursor;
                    cursor = stopped_at.unwrap_or(b.next_offset);
                    if cursor <= before {
                        break;
                    }
                }
            }
            if !entries.is_empty() || cursor != state.cursor {
                let e = PopEvent::Popped {
                    k: k.clone(),
                    cursor,
                    entries,
                };
                pop.apply(&e);
                events.push(e);
            }
            if let Some(state) = pop.get(&k) {
                for f in state.inflight.values() {
                    if f.visible_at > now && f.visible_at != i64::MAX {
                        next_wake =
                            Some(next_wake.map_or(f.visible_at, |w: i64| w.min(f.visible_at)));
                    }
                }
            }
        }
        Ok((out, events, dead, next_wake))
    }

    /// FIFO scan of one queue: hands out the oldest message of every message group that has
    /// nothing in flight, in offset order, and returns the new cursor (which only passes
    /// finished messages, never one that is still waiting behind its group).
    #[allow(clippy::too_many_arguments)]
    fn scan_fifo(
        &self,
        req: &ReceiveRequest,
        topic: &str,
        q: u32,
        state: &crate::pop::QueuePop,
        visible_at: i64,
        out: &mut Vec<Delivery>,
        entries: &mut Vec<(u64, InFlight)>,
    ) -> Result<u64, BrokerError> {
        let mut blocked: std::collections::HashSet<u64> = state
            .inflight
            .values()
            .map(|f| f.group)
            .filter(|g| *g != 0)
            .collect();
        let mut cursor = state.cursor;
        let mut scan = cursor;
        let mut prefix = true;
        // A bounded look-ahead window past the cursor: messages of other groups beyond it
        // wait until the groups ahead of them move. This keeps a long run of one blocked
        // group from being re-read on every receive.
        const WINDOW: u64 = 512;
        let mut blocked_run = 0u32;
        for _ in 0..16 {
            if out.len() as u32 >= req.max_messages || scan >= cursor + WINDOW {
                break;
            }
            let b = self.store.read(topic, q, scan, 64, 16 << 20, |_| true)?;
            match b.status {
                ReadStatus::Found => {}
                ReadStatus::OffsetTooSmall => {
                    cursor = cursor.max(b.next_offset);
                    scan = b.next_offset;
                    continue;
                }
                _ => break,
            }
            for m in &b.messages {
                let off = m.queue_offset;
                let finished = state.inflight.contains_key(&off) || state.done.contains(&off);
                if finished || !req.filter.matches(&View(m)) {
                    if prefix {
                        cursor = off + 1;
                    }
                    continue;
                }
                let g = m.property(keys::MESSAGE_GROUP).map(tag_hash).unwrap_or(0);
                if g != 0 && blocked.contains(&g) {
                    prefix = false;
                    blocked_run += 1;
                    // Once something was found, a long run of blocked messages ends the scan.
                    if blocked_run >= 64 && !out.is_empty() {
                        return Ok(cursor);
                    }
                    continue;
                }
                blocked_run = 0;
                let inf = InFlight {
                    attempt: 1,
                    nonce: self.nonce(),
                    visible_at,
                    group: g,
                };
                out.push(self.delivery(m, q, off, inf));
                entries.push((off, inf));
                if g != 0 {
                    blocked.insert(g);
                }
                if prefix {
                    cursor = off + 1;
                }
                if out.len() as u32 >= req.max_messages {
                    return Ok(cursor);
                }
            }
            if b.next_offset <= scan {
                break;
            }
            scan = b.next_offset;
        }
        Ok(cursor)
    }

    fn delivery(&self, m: &StoredMessage, q: u32, off: u64, inf: InFlight) -> Delivery {
        let handle = ReceiptHandle {
            broker: self.config.broker_name.clone(),
            topic: m.topic.clone(),
            queue_id: q,
            offset: off,
            attempt: inf.attempt,
            nonce: inf.nonce,
        };
        Delivery {
            message: to_message(m),
            queue_id: q,
            queue_offset: off,
            store_timestamp_ms: m.store_ts,
            receipt_handle: handle.encode(),
            delivery_attempt: inf.attempt,
            invisible_until_ms: inf.visible_at,
        }
    }

    /// Copies a message into the group's dead-letter topic (created on first use).
    async fn dead_letter(&self, group: &str, m: &StoredMessage) -> Result<(), BrokerError> {
        let dlq = dlq_topic(group);
        let t = match self.meta.topic(&dlq) {
            Some(t) => t,
            None => match self.meta.put_topic(
                TopicConfig {
                    name: dlq.clone(),
                    message_type: MessageType::Normal,
                    queues: 1,
                    created_at_ms: self.now(),
                },
                false,
            ) {
                Ok(t) => t,
                Err(BrokerError::TopicExists(_)) => self
                    .meta
                    .topic(&dlq)
                    .ok_or_else(|| BrokerError::TopicNotFound(dlq.clone()))?,
                Err(e) => return Err(e),
            },
        };
        let mut msg = to_message(m);
        msg.topic = dlq.clone();
        msg.user_properties.remove(keys::DLQ_ORIGIN_TOPIC);
        let mut a = self.to_append(&msg, &t, 0);
        a.flags = MessageType::Normal.flag();
        if m.property(keys::DLQ_ORIGIN_TOPIC).is_none() {
            a.properties
                .push((keys::DLQ_ORIGIN_TOPIC.into(), m.topic.clone()));
            a.properties
                .push((keys::DLQ_ORIGIN_GROUP.into(), group.to_owned()));
        }
        self.store.append(vec![a]).await?;
        tracing::info!(group, topic = %m.topic, queue = m.queue_id, offset = m.queue_offset, "message moved to the dead-letter topic");
        Ok(())
    }

    fn checked_handle(
        &self,
        group: &str,
        topic: &str,
        handle: &str,
    ) -> Result<(ReceiptHandle, QueueKey, InFlight), BrokerError> {
        self.meta
            .group(group)
            .ok_or_else(|| BrokerError::GroupNotFound(group.to_owned()))?;
        let h = ReceiptHandle::decode(handle)?;
        if h.topic != topic {
            return Err(BrokerError::InvalidReceiptHandle(format!(
                "handle is for topic {}, not {topic}",
                h.topic
            )));
        }
        let k = key(group, topic, h.queue_id);
        let pop = self.pop.lock();
        match pop.get(&k).and_then(|q| q.inflight.get(&h.offset)) {
            Some(f) if f.nonce == h.nonce => {
                let f = *f;
                drop(pop);
                Ok((h, k, f))
            }
            _ => Err(BrokerError::InvalidReceiptHandle(
                "not in flight: already acknowledged, redelivered since, or unknown".into(),
            )),
        }
    }
}

fn key(group: &str, topic: &str, queue: u32) -> QueueKey {
    QueueKey {
        group: group.to_owned(),
        topic: topic.to_owned(),
        queue,
    }
}

fn view(m: &StoredMessage) -> StoredView {
    StoredView {
        message: to_message(m),
        queue_id: m.queue_id,
        queue_offset: m.queue_offset,
        store_timestamp_ms: m.store_ts,
        physical_offset: m.physical_offset,
    }
}

impl Messaging for Broker {
    fn route(&self, topic: &str) -> Result<TopicRoute, BrokerError> {
        let t = self
            .meta
            .topic(topic)
            .ok_or_else(|| BrokerError::TopicNotFound(topic.to_owned()))?;
        Ok(TopicRoute {
            topic: t,
            broker_name: self.config.broker_name.clone(),
        })
    }

    fn group_config(&self, group: &str) -> Result<GroupConfig, BrokerError> {
        self.meta
            .group(group)
            .ok_or_else(|| BrokerError::GroupNotFound(group.to_owned()))
    }

    async fn send(&self, messages: Vec<Message>) -> Vec<Result<SendReceipt, BrokerError>> {
        let mut results: Vec<Option<Result<SendReceipt, BrokerError>>> =
            Vec::with_capacity(messages.len());
        let mut batch = Vec::with_capacity(messages.len());
        let mut slots = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let r = (|| {
                validate_resource_name(&m.topic)
                    .map_err(|e| BrokerError::IllegalTopic(format!("{:?}: {e}", m.topic)))?;
                let t = self
                    .meta
                    .topic_shared(&m.topic)
                    .ok_or_else(|| BrokerError::TopicNotFound(m.topic.clone()))?;
                self.validate(m, &t)?;
                let q = match m.queue_id {
                    Some(q) if q < t.queues => q,
                    _ => {
                        (self.round_robin.fetch_add(1, Ordering::Relaxed) % t.queues as u64) as u32
                    }
                };
                let a = self.to_append(m, &t, q);
                Ok::<_, BrokerError>(match t.message_type {
                    // Stored as a half message until the transaction ends.
                    MessageType::Transaction => self.tx.half(a, m.producer_client_id.as_deref()),
                    // Kept in the timer log until its delivery time (timer.rs).
                    MessageType::Delay => self.timer.route(a),
                    _ => a,
                })
            })();
            match r {
                Ok(a) => {
                    batch.push(a);
                    slots.push(i);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        if !batch.is_empty() {
            // What the receipts need of each append (taken before the batch moves into the
            // store): its queue as the client sees it, its transaction id, and whether it
            // went to the timer log.
            let receipts: Vec<(u32, String, bool)> = batch
                .iter()
                .map(|a| {
                    let (q, timed) = crate::timer::receipt_queue(a);
                    let (q, txid) = crate::transaction::Transactions::receipt(a)
                        .unwrap_or_else(|| (q, String::new()));
                    (q, txid, timed)
                })
                .collect();
            match self.store.append(batch).await {
                Ok(stored) => {
                    for ((i, r), (q, txid, timed)) in slots.iter().zip(stored).zip(receipts) {
                        self.metrics
                            .sent(&messages[*i].topic, messages[*i].body.len());
                        results[*i] = Some(Ok(SendReceipt {
                            message_id: messages[*i].message_id.clone(),
                            queue_id: q,
                            offset: r.queue_offset,
                            transaction_id: txid,
                            recall_handle: self.timer.accepted(timed, &messages[*i], &r),
                        }));
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    let code = e.code();
                    for i in &slots {
                        results[*i] = Some(Err(BrokerError::Internal(format!(
                            "store error {code}: {msg}"
                        ))));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BrokerError::Internal("lost result".into()))))
            .collect()
    }

    async fn receive(&self, req: ReceiveRequest) -> Result<Vec<Delivery>, BrokerError> {
        let topic = self
            .meta
            .topic(&req.topic)
            .ok_or_else(|| BrokerError::TopicNotFound(req.topic.clone()))?;
        let group = self
            .meta
            .group(&req.group)
            .ok_or_else(|| BrokerError::GroupNotFound(req.group.clone()))?;
        if req.invisible < self.config.min_invisible || req.invisible > self.config.max_invisible {
            return Err(BrokerError::IllegalInvisibleTime(format!(
                "{:?} is outside [{:?}, {:?}]",
                req.invisible, self.config.min_invisible, self.config.max_invisible
            )));
        }
        if req.max_messages == 0 || req.max_messages > self.config.max_receive_batch {
            return Err(BrokerError::BadRequest(format!(
                "batch size must be between 1 and {}",
                self.config.max_receive_batch
            )));
        }
        let deadline = tokio::time::Instant::now() + req.long_poll;
        let notify = self.notifier(&topic.name);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (out, events, dead, next_wake) = self.try_pop(&req, &topic, &group)?;
            for (k, off, m) in dead {
                match self.dead_letter(&group.name, &m).await {
                    Ok(()) => {
                        let e = PopEvent::Removed { k, offset: off };
                        self.pop.lock().apply(&e);
                        self.persist(vec![e]).await?;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "dead-lettering failed; will retry");
                        if let Some(f) = self
                            .pop
                            .lock()
                            .get_mut(&k)
                            .and_then(|q| q.inflight.get_mut(&off))
                        {
                            f.visible_at = self.now() + 1000;
                        }
                    }
                }
            }
            self.persist(events).await?;
            if !out.is_empty() {
                let bytes = out.iter().map(|d| d.message.body.len()).sum();
                self.metrics.delivered(&topic.name, out.len(), bytes);
                return Ok(out);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(vec![]);
            }
            let mut wake = deadline;
            if let Some(at) = next_wake {
                let ms = (at - self.now()).max(0) as u64;
                wake = wake.min(now + Duration::from_millis(ms));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn ack_many(
        &self,
        group: &str,
        topic: &str,
        handles: &[String],
    ) -> Vec<Result<(), BrokerError>> {
        let mut results = Vec::with_capacity(handles.len());
        let mut events = Vec::new();
        let mut undo = Vec::new();
        for handle in handles {
            let r = self
                .checked_handle(group, topic, handle)
                .and_then(|(h, k, f)| {
                    let e = PopEvent::Acked {
                        k: k.clone(),
                        offset: h.offset,
                        nonce: h.nonce,
                    };
                    if !self.pop.lock().apply(&e) {
                        return Err(BrokerError::InvalidReceiptHandle(
                            "not in flight any more".into(),
                        ));
                    }
                    events.push(e);
                    undo.push((k, h.offset, f, results.len()));
                    Ok(())
                });
            results.push(r);
        }
        if let Err(err) = self.persist(events).await {
            // Not durable: put them back so they are redelivered rather than dropped.
            let mut pop = self.pop.lock();
            let msg = err.to_string();
            for (k, offset, f, i) in undo {
                if let Some(q) = pop.get_mut(&k) {
                    q.inflight.entry(offset).or_insert(f);
                }
                results[i] = Err(BrokerError::Internal(format!("ack not stored: {msg}")));
            }
        }
        // FIFO consumers waiting behind an acked message of their group can go on.
        if results.iter().any(|r| r.is_ok()) {
            self.notifier(topic).notify_waiters();
        }
        results
    }

    async fn change_invisible(
        &self,
        group: &str,
        topic: &str,
        receipt_handle: &str,
        invisible: Duration,
    ) -> Result<String, BrokerError> {
        if invisible > self.config.max_invisible {
            return Err(BrokerError::IllegalInvisibleTime(format!(
                "{invisible:?} exceeds {:?}",
                self.config.max_invisible
            )));
        }
        let (h, k, _) = self.checked_handle(group, topic, receipt_handle)?;
        let e = PopEvent::Changed {
            k,
            offset: h.offset,
            nonce: h.nonce,
            visible_at: self.now() + invisible.as_millis() as i64,
        };
        if !self.pop.lock().apply(&e) {
            return Err(BrokerError::InvalidReceiptHandle(
                "not in flight any more".into(),
            ));
        }
        self.persist(vec![e]).await?;
        // A waiting long poll re-checks now: the message may be visible again (a nack).
        self.notifier(topic).notify_waiters();
        Ok(h.encode())
    }

    async fn forward_to_dead_letter(
        &self,
        group: &str,
        topic: &str,
        receipt_handle: &str,
    ) -> Result<(), BrokerError> {
        let (h, k, _) = self.checked_handle(group, topic, receipt_handle)?;
        let b = self
            .store
            .read(topic, h.queue_id, h.offset, 1, u64::MAX, |_| true)?;
        if let Some(m) = b.messages.first().filter(|m| m.queue_offset == h.offset) {
            self.dead_letter(group, m).await?;
        }
        let e = PopEvent::Removed {
            k,
            offset: h.offset,
        };
        self.pop.lock().apply(&e);
        self.persist(vec![e]).await
    }

    // Transactions (transaction.rs) and stream reads (pull.rs).

    async fn end_transaction(&self, req: crate::EndTransaction) -> Result<(), BrokerError> {
        self.tx.end(req).await
    }

    fn subscribe_transaction_checks(
        &self,
    ) -> tokio::sync::broadcast::Receiver<crate::TransactionCheck> {
        self.tx.subscribe()
    }

    async fn pull(&self, req: crate::PullRequest) -> Result<crate::PullResult, BrokerError> {
        self.pull_queue(req).await
    }

    async fn update_offset(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> Result<(), BrokerError> {
        self.commit_offset(group, topic, queue, offset).await
    }

    fn get_offset(&self, group: &str, topic: &str, queue: u32) -> Result<Option<u64>, BrokerError> {
        self.committed_offset(group, topic, queue)
    }

    fn query_offset(
        &self,
        topic: &str,
        queue: u32,
        query: crate::OffsetQuery,
    ) -> Result<u64, BrokerError> {
        self.lookup_offset(topic, queue, query)
    }

    // Delay messages (timer.rs).

    async fn recall(&self, topic: &str, recall_handle: &str) -> Result<String, BrokerError> {
        self.timer.recall(topic, recall_handle).await
    }
}
