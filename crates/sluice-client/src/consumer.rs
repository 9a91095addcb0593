//! Consumption RPCs shared by both consumers, and the [`SimpleConsumer`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_proto::v2::{self, receive_message_response::Content, settings};

use crate::config::{ClientConfig, to_pb_duration};
use crate::core::{Core, lock};
use crate::error::{ClientError, check};
use crate::ids;
use crate::message::{FilterExpression, ReceivedMessage};

/// Extra time a receive may take beyond its long poll before the client gives up.
const RECEIVE_MARGIN: Duration = Duration::from_secs(3);

pub(crate) fn subscription_entries(
    core_ns: &str,
    subs: &[(String, FilterExpression)],
) -> Vec<v2::SubscriptionEntry> {
    subs.iter()
        .map(|(topic, filter)| v2::SubscriptionEntry {
            topic: Some(crate::message::resource(core_ns, topic)),
            expression: Some(filter.to_pb()),
        })
        .collect()
}

pub(crate) fn subscription_settings(
    namespace: &str,
    group: &str,
    subs: &[(String, FilterExpression)],
    long_poll: Option<Duration>,
) -> settings::PubSub {
    settings::PubSub::Subscription(v2::Subscription {
        group: Some(crate::message::resource(namespace, group)),
        subscriptions: subscription_entries(namespace, subs),
        long_polling_timeout: long_poll.map(to_pb_duration),
        ..Default::default()
    })
}

/// One ReceiveMessage call: waits up to `long_poll` for messages.
pub(crate) struct ReceiveArgs<'a> {
    pub queue: v2::MessageQueue,
    pub filter: &'a FilterExpression,
    pub batch: u32,
    /// `None` with `auto_renew` (push consumers): the server picks and keeps renewing it.
    pub invisible: Option<Duration>,
    pub auto_renew: bool,
    pub long_poll: Duration,
}

pub(crate) async fn receive(
    core: &Core,
    args: ReceiveArgs<'_>,
) -> Result<Vec<ReceivedMessage>, ClientError> {
    let deadline = args.long_poll + core.config.request_timeout;
    let req = core.request(
        v2::ReceiveMessageRequest {
            group: core.group_resource(),
            message_queue: Some(args.queue),
            filter_expression: Some(args.filter.to_pb()),
            batch_size: args.batch.clamp(1, i32::MAX as u32) as i32,
            invisible_duration: args.invisible.map(to_pb_duration),
            auto_renew: args.auto_renew,
            long_polling_timeout: Some(to_pb_duration(args.long_poll)),
            attempt_id: Some(ids::random_uuid()),
        },
        Some(deadline),
    );
    let call = async {
        let mut stream = core.rpc().receive_message(req).await?.into_inner();
        let mut status = None;
        let mut messages = Vec::new();
        while let Some(frame) = stream.message().await? {
            match frame.content {
                Some(Content::Status(s)) => status = Some(s),
                Some(Content::Message(m)) => messages.push(m),
                Some(Content::DeliveryTimestamp(_)) | None => {}
            }
        }
        Ok::<_, tonic::Status>((status, messages))
    };
    let (status, messages) = match tokio::time::timeout(deadline + RECEIVE_MARGIN, call).await {
        Err(_) => return Err(ClientError::Timeout(deadline)),
        Ok(Err(s)) => return Err(ClientError::from(s)),
        Ok(Ok(r)) => r,
    };
    match status {
        Some(s) if s.code == v2::Code::MessageNotFound as i32 => Ok(Vec::new()),
        s => {
            check(s.as_ref())?;
            Ok(messages.into_iter().map(ReceivedMessage::from_pb).collect())
        }
    }
}

/// Acknowledges deliveries of one topic in one request.
pub(crate) async fn ack(
    core: &Core,
    topic: &str,
    messages: &[&ReceivedMessage],
) -> Result<(), ClientError> {
    if messages.is_empty() {
        return Ok(());
    }
    let t = core.config.request_timeout;
    let req = core.request(
        v2::AckMessageRequest {
            group: core.group_resource(),
            topic: Some(core.resource(topic)),
            entries: messages
                .iter()
                .map(|m| v2::AckMessageEntry {
                    message_id: m.message_id.clone(),
                    receipt_handle: m.receipt_handle.clone(),
                    lite_topic: None,
                })
                .collect(),
        },
        Some(t),
    );
    let resp = core.unary(t, core.rpc().ack_message(req)).await?;
    check(resp.status.as_ref())?;
    for e in &resp.entries {
        if e.status.is_some() {
            check(e.status.as_ref())?;
        }
    }
    Ok(())
}

/// Changes when a delivery becomes visible again; returns the new receipt handle.
pub(crate) async fn change_invisible(
    core: &Core,
    m: &ReceivedMessage,
    invisible: Duration,
) -> Result<String, ClientError> {
    let t = core.config.request_timeout;
    let req = core.request(
        v2::ChangeInvisibleDurationRequest {
            group: core.group_resource(),
            topic: Some(core.resource(&m.topic)),
            receipt_handle: m.receipt_handle.clone(),
            invisible_duration: Some(to_pb_duration(invisible)),
            message_id: m.message_id.clone(),
            lite_topic: None,
            suspend: None,
        },
        Some(t),
    );
    let resp = core
        .unary(t, core.rpc().change_invisible_duration(req))
        .await?;
    check(resp.status.as_ref())?;
    Ok(resp.receipt_handle)
}

/// Moves a delivery to the group's dead-letter queue.
pub(crate) async fn forward_to_dead_letter_queue(
    core: &Core,
    m: &ReceivedMessage,
    max_attempts: u32,
) -> Result<(), ClientError> {
    let t = core.config.request_timeout;
    let req = core.request(
        v2::ForwardMessageToDeadLetterQueueRequest {
            group: core.group_resource(),
            topic: Some(core.resource(&m.topic)),
            receipt_handle: m.receipt_handle.clone(),
            message_id: m.message_id.clone(),
            delivery_attempt: m.delivery_attempt as i32,
            max_delivery_attempts: max_attempts as i32,
            lite_topic: None,
        },
        Some(t),
    );
    let resp = core
        .unary(t, core.rpc().forward_message_to_dead_letter_queue(req))
        .await?;
    check(resp.status.as_ref())
}

/// Builds a [`SimpleConsumer`].
pub struct SimpleConsumerBuilder {
    config: ClientConfig,
    group: String,
    subscriptions: Vec<(String, FilterExpression)>,
    await_duration: Duration,
}

impl SimpleConsumerBuilder {
    /// Adds (or replaces) the filter for `topic`.
    pub fn subscribe(mut self, topic: impl Into<String>, filter: FilterExpression) -> Self {
        let topic = topic.into();
        self.subscriptions.retain(|(t, _)| *t != topic);
        self.subscriptions.push((topic, filter));
        self
    }

    /// How long a receive waits for messages (long polling; servers clamp it, Sluice and
    /// the RocketMQ proxy to 20 s). Default 20 s.
    pub fn await_duration(mut self, d: Duration) -> Self {
        self.await_duration = d;
        self
    }

    /// Starts the consumer and looks up the subscribed topics. An unreachable server is
    /// not an error here; an unknown topic is.
    pub async fn start(self) -> Result<SimpleConsumer, ClientError> {
        if self.group.is_empty() {
            return Err(ClientError::InvalidArgument(
                "the consumer group is empty".into(),
            ));
        }
        let pub_sub = subscription_settings(
            &self.config.namespace,
            &self.group,
            &self.subscriptions,
            Some(self.await_duration),
        );
        let core = Core::new(
            self.config,
            v2::ClientType::SimpleConsumer,
            Some(self.group.clone()),
            Some(pub_sub),
            None,
            None,
        )?;
        core.start();
        for (t, _) in &self.subscriptions {
            match core.refresh_route(t).await {
                Ok(_) => {}
                Err(e @ ClientError::Status { .. }) => {
                    core.stop();
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(topic = %t, error = %e, "route look-up failed; will retry on receive")
                }
            }
        }
        Ok(SimpleConsumer {
            core,
            group: self.group,
            subscriptions: Mutex::new(self.subscriptions),
            next: AtomicUsize::new(0),
            await_duration: self.await_duration,
        })
    }
}

/// Receives messages when asked to and acknowledges each one explicitly (POP
/// consumption): a message not acknowledged within its invisible duration is delivered
/// again.
///
/// ```no_run
/// # async fn demo() -> Result<(), sluice_client::ClientError> {
/// use std::time::Duration;
/// use sluice_client::{ClientConfig, FilterExpression, SimpleConsumer};
/// let consumer = SimpleConsumer::builder(ClientConfig::new("127.0.0.1:8081"), "billing")
///     .subscribe("orders", FilterExpression::Tag("created||paid".into()))
///     .start()
///     .await?;
/// for m in consumer.receive(16, Duration::from_secs(30)).await? {
///     println!("{}", m.body_str());
///     consumer.ack(&m).await?;
/// }
/// consumer.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct SimpleConsumer {
    core: Arc<Core>,
    group: String,
    subscriptions: Mutex<Vec<(String, FilterExpression)>>,
    next: AtomicUsize,
    await_duration: Duration,
}

impl SimpleConsumer {
    pub fn builder(config: ClientConfig, group: impl Into<String>) -> SimpleConsumerBuilder {
        SimpleConsumerBuilder {
            config,
            group: group.into(),
            subscriptions: Vec::new(),
            await_duration: Duration::from_secs(20),
        }
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// The `x-mq-client-id` this consumer sends.
    pub fn client_id(&self) -> &str {
        &self.core.client_id
    }

    /// Adds or replaces a subscription (the topic must exist).
    pub async fn subscribe(
        &self,
        topic: impl Into<String>,
        filter: FilterExpression,
    ) -> Result<(), ClientError> {
        let topic = topic.into();
        self.core.refresh_route(&topic).await?;
        let entries = {
            let mut subs = lock(&self.subscriptions);
            subs.retain(|(t, _)| *t != topic);
            subs.push((topic, filter));
            subscription_entries(self.core.namespace(), &subs)
        };
        self.core.set_subscriptions(entries);
        Ok(())
    }

    /// Removes a subscription.
    pub fn unsubscribe(&self, topic: &str) {
        let entries = {
            let mut subs = lock(&self.subscriptions);
            subs.retain(|(t, _)| t != topic);
            subscription_entries(self.core.namespace(), &subs)
        };
        self.core.set_subscriptions(entries);
    }

    /// Receives up to `max` messages of one subscribed topic (topics take turns), waiting
    /// up to the await duration for the first. Each stays invisible to other consumers for
    /// `invisible` (servers require at least 10 s) unless acknowledged. An empty vector
    /// means nothing arrived in time.
    pub async fn receive(
        &self,
        max: u32,
        invisible: Duration,
    ) -> Result<Vec<ReceivedMessage>, ClientError> {
        if self.core.is_stopped() {
            return Err(ClientError::Shutdown);
        }
        let (topic, filter) = {
            let subs = lock(&self.subscriptions);
            if subs.is_empty() {
                return Err(ClientError::InvalidArgument(
                    "the consumer has no subscription".into(),
                ));
            }
            subs[self.next.fetch_add(1, Ordering::Relaxed) % subs.len()].clone()
        };
        let route = self.core.route(&topic).await?;
        if route.readable.is_empty() {
            return Err(ClientError::NoQueue {
                topic,
                access: "readable",
            });
        }
        let queue =
            route.readable[self.next.load(Ordering::Relaxed) % route.readable.len()].clone();
        receive(
            &self.core,
            ReceiveArgs {
                queue,
                filter: &filter,
                batch: max,
                invisible: Some(invisible),
                auto_renew: false,
                long_poll: self.await_duration,
            },
        )
        .await
    }

    /// Acknowledges a message: it is not delivered again.
    pub async fn ack(&self, message: &ReceivedMessage) -> Result<(), ClientError> {
        ack(&self.core, &message.topic, &[message]).await
    }

    /// Acknowledges several messages, one request per topic.
    pub async fn ack_batch(&self, messages: &[ReceivedMessage]) -> Result<(), ClientError> {
        let mut topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            let of_topic: Vec<&ReceivedMessage> =
                messages.iter().filter(|m| m.topic == topic).collect();
            ack(&self.core, topic, &of_topic).await?;
        }
        Ok(())
    }

    /// Makes the message visible again after `invisible` from now (zero-ish values act as
    /// a negative acknowledgement). The message's receipt handle is replaced by the new one
    /// the server returns, which is the one to acknowledge with afterwards.
    pub async fn change_invisible_duration(
        &self,
        message: &mut ReceivedMessage,
        invisible: Duration,
    ) -> Result<(), ClientError> {
        let handle = change_invisible(&self.core, message, invisible).await?;
        if !handle.is_empty() {
            message.receipt_handle = handle;
        }
        Ok(())
    }

    /// Stops background work and tells the server this consumer is gone.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        self.core.shutdown().await
    }
}

impl Drop for SimpleConsumer {
    fn drop(&mut self) {
        self.core.stop();
    }
}
