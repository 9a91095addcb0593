//! The producer: normal, FIFO, delay and transactional messages, with retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice_proto::v2::{self, MessageType, settings};

use crate::config::{ClientConfig, RetryPolicy};
use crate::core::{Core, TransactionChecker, TransactionResolution};
use crate::error::{ClientError, check};
use crate::ids::queue_index_for_group;
use crate::message::{Message, ReceivedMessage, SendReceipt};

/// Body size limit used until the server announces its own.
const DEFAULT_MAX_BODY: usize = 4 << 20;

/// Builds a [`Producer`].
pub struct ProducerBuilder {
    config: ClientConfig,
    topics: Vec<String>,
    retry_policy: RetryPolicy,
    checker: Option<Arc<TransactionChecker>>,
    attempts_cap: Option<u32>,
}

impl ProducerBuilder {
    /// Caps the attempts of every send at `n` (at least 1), whatever the server's retry
    /// policy says. With 1 a send is never re-sent by the SDK, so the caller learns the
    /// outcome of each attempt (a status error then means the message was not stored).
    pub fn max_send_attempts(mut self, n: u32) -> Self {
        self.attempts_cap = Some(n.max(1));
        self
    }

    /// Topics to look up at start (others are looked up on first send).
    pub fn topics<S: Into<String>>(mut self, topics: impl IntoIterator<Item = S>) -> Self {
        self.topics.extend(topics.into_iter().map(Into::into));
        self
    }

    /// The retry policy used until the server's settings arrive (the server's policy
    /// replaces it: 3 attempts, 10 ms doubling up to 1 s on Sluice and RocketMQ).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry_policy = policy;
        self
    }

    /// Answers the server's checks of transactions left open (for instance because this
    /// process crashed between sending a half message and committing it).
    pub fn transaction_checker(
        mut self,
        checker: impl Fn(&ReceivedMessage) -> TransactionResolution + Send + Sync + 'static,
    ) -> Self {
        self.checker = Some(Arc::new(checker));
        self
    }

    /// Starts the producer: opens the Telemetry session and looks up the configured
    /// topics. An unreachable server is not an error here (sends retry and report it); a
    /// topic the server does not know is.
    pub async fn start(self) -> Result<Producer, ClientError> {
        let publishing = v2::Publishing {
            topics: Vec::new(),
            max_body_size: DEFAULT_MAX_BODY as i32,
            validate_message_type: true,
        };
        let core = Core::new(
            self.config,
            v2::ClientType::Producer,
            None,
            Some(settings::PubSub::Publishing(publishing)),
            Some(self.retry_policy.to_pb()),
            self.checker,
        )?;
        for t in &self.topics {
            core.add_publishing_topic(t);
        }
        core.start();
        let producer = Producer {
            core,
            next_queue: AtomicUsize::new(crate::ids::random_u64() as usize),
            retry_policy: self.retry_policy,
            attempts_cap: self.attempts_cap,
        };
        for t in &self.topics {
            match producer.core.refresh_route(t).await {
                Ok(_) => {}
                Err(e @ ClientError::Status { .. }) => {
                    producer.core.stop();
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(topic = %t, error = %e, "route look-up failed; will retry on send")
                }
            }
        }
        Ok(producer)
    }
}

/// Sends messages. Cheap to share behind an `Arc`; all sends use one HTTP/2 connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), sluice_client::ClientError> {
/// use sluice_client::{ClientConfig, Message, Producer};
/// let producer = Producer::builder(ClientConfig::new("127.0.0.1:8081")).start().await?;
/// let receipt = producer.send(Message::new("orders", "hello").with_tag("created")).await?;
/// println!("{}", receipt.message_id);
/// producer.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Producer {
    core: Arc<Core>,
    next_queue: AtomicUsize,
    retry_policy: RetryPolicy,
    attempts_cap: Option<u32>,
}

impl Producer {
    pub fn builder(config: ClientConfig) -> ProducerBuilder {
        ProducerBuilder {
            config,
            topics: Vec::new(),
            retry_policy: RetryPolicy::default(),
            checker: None,
            attempts_cap: None,
        }
    }

    /// The `x-mq-client-id` this producer sends.
    pub fn client_id(&self) -> &str {
        &self.core.client_id
    }

    /// Sends one message and waits until the server stored it.
    pub async fn send(&self, message: Message) -> Result<SendReceipt, ClientError> {
        let mut r = self.send_inner(vec![message], false).await?;
        r.pop()
            .ok_or_else(|| ClientError::Protocol("no send result".into()))
    }

    /// Sends several messages of one topic in one request (FIFO messages must share their
    /// message group). Either every message gets a receipt or an error is returned; after
    /// an error some of them may have been stored.
    pub async fn send_batch(
        &self,
        messages: Vec<Message>,
    ) -> Result<Vec<SendReceipt>, ClientError> {
        self.send_inner(messages, false).await
    }

    /// Starts a transaction: its messages stay invisible until [`Transaction::commit`].
    pub fn begin_transaction(&self) -> Transaction<'_> {
        Transaction {
            producer: self,
            receipts: Vec::new(),
        }
    }

    /// Stops background work and tells the server this producer is gone.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.core.shutdown().await
    }

    fn policy(&self) -> RetryPolicy {
        self.core
            .server_settings()
            .and_then(|s| s.retry_policy.clone())
            .unwrap_or_else(|| self.retry_policy.clone())
    }

    async fn send_inner(
        &self,
        messages: Vec<Message>,
        transactional: bool,
    ) -> Result<Vec<SendReceipt>, ClientError> {
        if self.core.is_stopped() {
            return Err(ClientError::Shutdown);
        }
        let Some(first) = messages.first() else {
            return Err(ClientError::InvalidArgument("nothing to send".into()));
        };
        let topic = first.topic.clone();
        let kind = first.message_type(transactional);
        let group = first.message_group.clone();
        let settings = self.core.server_settings();
        let max_body = settings
            .as_ref()
            .and_then(|s| s.max_body_size)
            .unwrap_or(DEFAULT_MAX_BODY);
        let validate_type = settings.as_ref().is_none_or(|s| s.validate_message_type);
        for m in &messages {
            m.validate(max_body, transactional)?;
            if m.topic != topic {
                return Err(ClientError::InvalidArgument(
                    "a batch must have one topic".into(),
                ));
            }
            if m.message_type(transactional) != kind || m.message_group != group {
                return Err(ClientError::InvalidArgument(
                    "a batch must have one message type (and one message group)".into(),
                ));
            }
        }
        let policy = self.policy();
        // A half message is never re-sent: a duplicate would be a second transaction.
        let max_attempts = if transactional {
            1
        } else {
            policy
                .max_attempts
                .min(self.attempts_cap.unwrap_or(u32::MAX))
                .max(1)
        };
        self.core.add_publishing_topic(&topic);
        let ns = self.core.namespace().to_owned();
        let mut pb: Vec<v2::Message> = messages
            .iter()
            .map(|m| m.to_pb(&ns, transactional))
            .collect();
        let rotation = self.next_queue.fetch_add(1, Ordering::Relaxed);
        let mut attempt = 1;
        loop {
            let r = self
                .try_send(
                    &topic,
                    &mut pb,
                    kind,
                    group.as_deref(),
                    rotation.wrapping_add(attempt as usize - 1),
                    validate_type,
                )
                .await;
            match r {
                Ok(receipts) => return Ok(receipts),
                Err(e) if attempt < max_attempts && e.is_retryable() && !self.core.is_stopped() => {
                    let wait = policy.delay(attempt);
                    tracing::debug!(%topic, attempt, error = %e, ?wait, "send failed; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn try_send(
        &self,
        topic: &str,
        pb: &mut [v2::Message],
        kind: MessageType,
        group: Option<&str>,
        rotation: usize,
        validate_type: bool,
    ) -> Result<Vec<SendReceipt>, ClientError> {
        let route = self.core.route(topic).await?;
        let n = route.writable.len();
        if n == 0 {
            return Err(ClientError::NoQueue {
                topic: topic.to_owned(),
                access: "writable",
            });
        }
        // FIFO: one message group always goes to the same queue (in the server's order).
        let q = &route.writable[match group {
            Some(g) => queue_index_for_group(g, n),
            None => rotation % n,
        }];
        if validate_type
            && !q.accept_message_types.is_empty()
            && !q.accept_message_types.contains(&(kind as i32))
        {
            let accepted: Vec<&str> = q
                .accept_message_types
                .iter()
                .filter_map(|t| MessageType::try_from(*t).ok())
                .map(|t| t.as_str_name())
                .collect();
            return Err(ClientError::InvalidArgument(format!(
                "topic {topic} accepts {} messages, not {}",
                accepted.join("/"),
                kind.as_str_name()
            )));
        }
        for m in pb.iter_mut() {
            if let Some(sp) = m.system_properties.as_mut() {
                sp.queue_id = q.id;
            }
        }
        let t = self.core.config.request_timeout;
        let req = self.core.request(
            v2::SendMessageRequest {
                messages: pb.to_vec(),
            },
            Some(t),
        );
        let resp = self
            .core
            .unary(t, self.core.rpc().send_message(req))
            .await?;
        check(resp.status.as_ref())?;
        if resp.entries.len() != pb.len() {
            return Err(ClientError::Protocol(format!(
                "{} results for {} messages",
                resp.entries.len(),
                pb.len()
            )));
        }
        let mut receipts = Vec::with_capacity(pb.len());
        for (entry, m) in resp.entries.into_iter().zip(pb.iter()) {
            check(entry.status.as_ref())?;
            let sent_id = m
                .system_properties
                .as_ref()
                .map(|s| s.message_id.clone())
                .unwrap_or_default();
            receipts.push(SendReceipt {
                topic: topic.to_owned(),
                message_id: if entry.message_id.is_empty() {
                    sent_id
                } else {
                    entry.message_id
                },
                queue_id: q.id,
                offset: entry.offset,
                transaction_id: entry.transaction_id,
                recall_handle: entry.recall_handle,
            });
        }
        Ok(receipts)
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.core.stop();
    }
}

/// Messages sent as half messages, invisible to consumers until committed.
///
/// Dropping a transaction without ending it leaves the decision to the server's check
/// (answered by the producer's transaction checker, if any).
pub struct Transaction<'a> {
    producer: &'a Producer,
    receipts: Vec<SendReceipt>,
}

impl Transaction<'_> {
    /// Sends a half message (never retried: a duplicate would be a second transaction).
    pub async fn send(&mut self, message: Message) -> Result<SendReceipt, ClientError> {
        let r = self
            .producer
            .send_inner(vec![message], true)
            .await?
            .pop()
            .ok_or_else(|| ClientError::Protocol("no send result".into()))?;
        if r.transaction_id.is_empty() {
            return Err(ClientError::Protocol(
                "the server returned no transaction id for a half message".into(),
            ));
        }
        self.receipts.push(r.clone());
        Ok(r)
    }

    /// The half messages sent so far.
    pub fn receipts(&self) -> &[SendReceipt] {
        &self.receipts
    }

    /// Makes every message of the transaction visible.
    pub async fn commit(self) -> Result<(), ClientError> {
        self.end(TransactionResolution::Commit).await
    }

    /// Discards every message of the transaction.
    pub async fn rollback(self) -> Result<(), ClientError> {
        self.end(TransactionResolution::Rollback).await
    }

    async fn end(self, resolution: TransactionResolution) -> Result<(), ClientError> {
        let policy = self.producer.policy();
        let core = &self.producer.core;
        let mut first_error = None;
        for r in &self.receipts {
            let mut attempt = 1;
            loop {
                let res = core
                    .end_transaction(
                        &r.topic,
                        &r.message_id,
                        &r.transaction_id,
                        resolution,
                        v2::TransactionSource::SourceClient,
                    )
                    .await;
                match res {
                    Ok(()) => break,
                    Err(e) if attempt < policy.max_attempts && e.is_retryable() => {
                        tokio::time::sleep(policy.delay(attempt)).await;
                        attempt += 1;
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                        break;
                    }
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
