//! The push consumer: receives in the background and calls a listener per message.
//!
//! Per subscribed topic a task asks the server for its assignments every 5 s and keeps one
//! receive loop per assigned queue (Sluice and the RocketMQ proxy assign one pseudo queue
//! to a normal group and every queue to a FIFO group). Receives use `auto_renew`: the
//! server keeps the messages invisible until they are acknowledged, so a slow listener
//! does not cause redeliveries. A loop only receives while a consumption slot is free.
//!
//! Results:
//! * `Success` → AckMessage with the original receipt handle;
//! * `Failure` (or a panic, or a corrupted body) → ChangeInvisibleDuration with the
//!   group's backoff for this attempt (a "nack"); after the group's max attempts the
//!   message goes to the dead-letter queue with ForwardMessageToDeadLetterQueue.
//!
//! FIFO groups: the messages of one message group are consumed one after another; a
//! failure is retried locally after the backoff (the server keeps the group blocked
//! meanwhile), and after max attempts the message is dead-lettered and the next one
//! consumed.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::v2;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::{ClientConfig, RetryPolicy};
use crate::consumer::{self, ReceiveArgs};
use crate::core::{Core, ServerSettings, lock};
use crate::error::ClientError;
use crate::message::{FilterExpression, ReceivedMessage};

/// What a listener reports for a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeResult {
    /// Consumed: acknowledge it.
    Success,
    /// Not consumed: deliver it again later (with backoff), up to the group's max attempts.
    Failure,
}

/// The per-message callback of a [`PushConsumer`]. It runs on a blocking-capable thread,
/// so it may block.
pub type MessageListener = dyn Fn(&ReceivedMessage) -> ConsumeResult + Send + Sync;

const ASSIGNMENT_INTERVAL: Duration = Duration::from_secs(5);
const ERROR_PAUSE: Duration = Duration::from_secs(1);
/// How long shutdown waits for listeners that are still running.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Builds a [`PushConsumer`].
pub struct PushConsumerBuilder {
    config: ClientConfig,
    group: String,
    subscriptions: Vec<(String, FilterExpression)>,
    listener: Option<Arc<MessageListener>>,
    concurrency: usize,
    settings_timeout: Duration,
    long_polling_timeout: Option<Duration>,
}

impl PushConsumerBuilder {
    /// Adds (or replaces) the filter for `topic`.
    pub fn subscribe(mut self, topic: impl Into<String>, filter: FilterExpression) -> Self {
        let topic = topic.into();
        self.subscriptions.retain(|(t, _)| *t != topic);
        self.subscriptions.push((topic, filter));
        self
    }

    /// The callback consuming each message.
    pub fn listener(
        mut self,
        f: impl Fn(&ReceivedMessage) -> ConsumeResult + Send + Sync + 'static,
    ) -> Self {
        self.listener = Some(Arc::new(f));
        self
    }

    /// How many listener calls may run at once (default 20).
    pub fn consumption_concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How long one receive waits for messages (default: what the server's settings say,
    /// 20 s on Sluice and the RocketMQ proxy).
    pub fn long_polling_timeout(mut self, d: Duration) -> Self {
        self.long_polling_timeout = Some(d);
        self
    }

    /// How long start waits for the server's settings (default 5 s).
    pub fn settings_timeout(mut self, d: Duration) -> Self {
        self.settings_timeout = d;
        self
    }

    /// Starts consuming. Fails if the server does not answer the settings handshake in
    /// time (the group's FIFO flag and retry policy come from it) or a topic is unknown.
    pub async fn start(self) -> Result<PushConsumer, ClientError> {
        let listener = self
            .listener
            .ok_or_else(|| ClientError::InvalidArgument("no listener set".into()))?;
        if self.group.is_empty() {
            return Err(ClientError::InvalidArgument(
                "the consumer group is empty".into(),
            ));
        }
        if self.subscriptions.is_empty() {
            return Err(ClientError::InvalidArgument("no subscription".into()));
        }
        let pub_sub = consumer::subscription_settings(
            &self.config.namespace,
            &self.group,
            &self.subscriptions,
            self.long_polling_timeout,
        );
        let core = Core::new(
            self.config,
            v2::ClientType::PushConsumer,
            Some(self.group),
            Some(pub_sub),
            None,
            None,
        )?;
        core.start();
        if core
            .wait_for_settings(self.settings_timeout)
            .await
            .is_none()
        {
            core.stop();
            return Err(ClientError::Timeout(self.settings_timeout));
        }
        for (t, _) in &self.subscriptions {
            if let Err(e) = core.refresh_route(t).await {
                core.stop();
                return Err(e);
            }
        }
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            core,
            listener,
            permits: Arc::new(Semaphore::new(self.concurrency)),
            concurrency: self.concurrency,
            stop,
        });
        let loops = self
            .subscriptions
            .into_iter()
            .map(|(topic, filter)| tokio::spawn(inner.clone().topic_loop(topic, filter)))
            .collect();
        Ok(PushConsumer {
            inner,
            loops: std::sync::Mutex::new(loops),
        })
    }
}

/// Consumes messages in the background with a listener.
///
/// ```no_run
/// # async fn demo() -> Result<(), sluice_client::ClientError> {
/// use sluice_client::{ClientConfig, ConsumeResult, FilterExpression, PushConsumer};
/// let consumer = PushConsumer::builder(ClientConfig::new("127.0.0.1:8081"), "billing")
///     .subscribe("orders", FilterExpression::all())
///     .listener(|m| {
///         println!("{}", m.body_str());
///         ConsumeResult::Success
///     })
///     .start()
///     .await?;
/// // ...
/// consumer.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct PushConsumer {
    inner: Arc<Inner>,
    loops: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl PushConsumer {
    pub fn builder(config: ClientConfig, group: impl Into<String>) -> PushConsumerBuilder {
        PushConsumerBuilder {
            config,
            group: group.into(),
            subscriptions: Vec::new(),
            listener: None,
            concurrency: 20,
            settings_timeout: Duration::from_secs(5),
            long_polling_timeout: None,
        }
    }

    /// The `x-mq-client-id` this consumer sends.
    pub fn client_id(&self) -> &str {
        &self.inner.core.client_id
    }

    /// What the server's settings say about the group (FIFO flag, retry policy).
    pub fn server_settings(&self) -> Option<Arc<ServerSettings>> {
        self.inner.core.server_settings()
    }

    /// Stops receiving, lets running and already received messages finish (up to 30 s),
    /// then tells the server this consumer is gone. Messages of a receive cut short by
    /// the shutdown become visible again when their invisible time ends.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.inner.stop.send_replace(true);
        let loops: Vec<JoinHandle<()>> = lock(&self.loops).drain(..).collect();
        for l in loops {
            let _ = l.await;
        }
        let all = self.inner.concurrency.min(u32::MAX as usize) as u32;
        if tokio::time::timeout(SHUTDOWN_GRACE, self.inner.permits.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("listeners still running after the shutdown grace period");
        }
        self.inner.core.shutdown().await
    }
}

impl Drop for PushConsumer {
    fn drop(&mut self) {
        self.inner.stop.send_replace(true);
        self.inner.core.stop();
    }
}

struct Inner {
    core: Arc<Core>,
    listener: Arc<MessageListener>,
    permits: Arc<Semaphore>,
    concurrency: usize,
    stop: watch::Sender<bool>,
}

/// Stops one receive loop.
type WorkerStop = watch::Sender<bool>;

impl Inner {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    fn policy(&self) -> RetryPolicy {
        self.core
            .server_settings()
            .and_then(|s| s.retry_policy.clone())
            .unwrap_or_else(|| {
                RetryPolicy::exponential(17, Duration::from_secs(1), Duration::from_secs(60), 2.0)
            })
    }

    /// Keeps one receive loop per assigned queue of `topic`.
    async fn topic_loop(self: Arc<Self>, topic: String, filter: FilterExpression) {
        let mut workers: HashMap<(String, i32), (WorkerStop, JoinHandle<()>)> = HashMap::new();
        loop {
            let mut pause = ASSIGNMENT_INTERVAL;
            match self.core.query_assignment(&topic).await {
                Ok(queues) => {
                    let key = |q: &v2::MessageQueue| {
                        (
                            q.broker
                                .as_ref()
                                .map(|b| b.name.clone())
                                .unwrap_or_default(),
                            q.id,
                        )
                    };
                    let wanted: HashMap<(String, i32), v2::MessageQueue> =
                        queues.into_iter().map(|q| (key(&q), q)).collect();
                    workers.retain(|k, (stop, _)| {
                        let keep = wanted.contains_key(k);
                        if !keep {
                            stop.send_replace(true);
                        }
                        keep
                    });
                    for (k, q) in wanted {
                        workers.entry(k).or_insert_with(|| {
                            let (stop, rx) = watch::channel(false);
                            let h = tokio::spawn(self.clone().receive_loop(q, filter.clone(), rx));
                            (stop, h)
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "query assignment failed");
                    if workers.is_empty() {
                        pause = ERROR_PAUSE;
                    }
                }
            }
            tokio::select! {
                _ = self.stopped() => break,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        for (_, (_, h)) in workers {
            let _ = h.await;
        }
    }

    async fn receive_loop(
        self: Arc<Self>,
        queue: v2::MessageQueue,
        filter: FilterExpression,
        mut worker_stop: watch::Receiver<bool>,
    ) {
        loop {
            if self.stopping() || *worker_stop.borrow() {
                return;
            }
            // Receive only while a consumption slot is free.
            let slot = tokio::select! {
                p = self.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = self.stopped() => return,
                _ = worker_stop.changed() => return,
            };
            drop(slot);
            let settings = self.core.server_settings().unwrap_or_default();
            let batch = settings.receive_batch_size.unwrap_or(32);
            let long_poll = settings
                .long_polling_timeout
                .unwrap_or(Duration::from_secs(20));
            let fifo = settings.fifo.unwrap_or(false);
            let received = tokio::select! {
                r = consumer::receive(&self.core, ReceiveArgs {
                    queue: queue.clone(),
                    filter: &filter,
                    batch,
                    invisible: None,
                    auto_renew: true,
                    long_poll,
                }) => r,
                _ = self.stopped() => return,
                _ = worker_stop.changed() => return,
            };
            match received {
                Ok(messages) if fifo => self.consume_fifo(messages).await,
                Ok(messages) => {
                    for m in messages {
                        let Ok(permit) = self.permits.clone().acquire_owned().await else {
                            return;
                        };
                        tokio::spawn(self.clone().consume_one(m, permit));
                    }
                }
                Err(e) => {
                    tracing::debug!(topic = ?queue.topic, error = %e, "receive failed");
                    tokio::select! {
                        _ = tokio::time::sleep(ERROR_PAUSE) => {}
                        _ = self.stopped() => return,
                    }
                }
            }
        }
    }

    /// Runs the listener on a blocking thread; a panic counts as a failure.
    async fn call_listener(&self, m: &ReceivedMessage) -> ConsumeResult {
        if m.corrupted {
            tracing::warn!(message_id = %m.message_id, "body does not match its digest; not consumed");
            return ConsumeResult::Failure;
        }
        let listener = self.listener.clone();
        let m = m.clone();
        match tokio::task::spawn_blocking(move || listener(&m)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "the listener panicked");
                ConsumeResult::Failure
            }
        }
    }

    async fn consume_one(self: Arc<Self>, m: ReceivedMessage, _permit: OwnedSemaphorePermit) {
        match self.call_listener(&m).await {
            ConsumeResult::Success => self.ack(&m).await,
            ConsumeResult::Failure => {
                let policy = self.policy();
                if m.delivery_attempt >= policy.max_attempts {
                    self.dead_letter(&m, policy.max_attempts).await;
                } else {
                    let wait = policy.delay(m.delivery_attempt);
                    if let Err(e) = consumer::change_invisible(&self.core, &m, wait).await {
                        tracing::warn!(message_id = %m.message_id, error = %e, "nack failed; the message comes back when its invisible time ends");
                    }
                }
            }
        }
    }

    /// FIFO: message groups in parallel, each group's messages in order.
    async fn consume_fifo(self: &Arc<Self>, messages: Vec<ReceivedMessage>) {
        let mut groups: BTreeMap<String, Vec<ReceivedMessage>> = BTreeMap::new();
        for m in messages {
            groups
                .entry(m.message_group.clone().unwrap_or_default())
                .or_default()
                .push(m);
        }
        let mut set = JoinSet::new();
        for (_, ms) in groups {
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                return;
            };
            let this = self.clone();
            set.spawn(async move {
                let _permit = permit;
                for m in ms {
                    this.consume_in_order(m).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
    }

    async fn consume_in_order(&self, m: ReceivedMessage) {
        let policy = self.policy();
        let mut attempt = m.delivery_attempt.max(1);
        loop {
            match self.call_listener(&m).await {
                ConsumeResult::Success => return self.ack(&m).await,
                ConsumeResult::Failure if attempt >= policy.max_attempts => {
                    let mut m = m;
                    m.delivery_attempt = attempt;
                    return self.dead_letter(&m, policy.max_attempts).await;
                }
                ConsumeResult::Failure => {
                    tokio::time::sleep(policy.delay(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn ack(&self, m: &ReceivedMessage) {
        for attempt in 1..=3u32 {
            match consumer::ack(&self.core, &m.topic, &[m]).await {
                Ok(()) => return,
                Err(e) if e.is_retryable() && attempt < 3 => {
                    tokio::time::sleep(Duration::from_millis(100) * attempt).await;
                }
                Err(e) => {
                    tracing::warn!(message_id = %m.message_id, error = %e, "ack failed; the message may be delivered again");
                    return;
                }
            }
        }
    }

    async fn dead_letter(&self, m: &ReceivedMessage, max_attempts: u32) {
        if let Err(e) = consumer::forward_to_dead_letter_queue(&self.core, m, max_attempts).await {
            tracing::warn!(message_id = %m.message_id, error = %e, "forwarding to the dead-letter queue failed");
        }
    }
}
