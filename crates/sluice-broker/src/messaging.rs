//! The protocol-neutral interface between protocol edges (the gRPC proxy, later the
//! remoting protocol, the event bus and pipes) and the broker.
//!
//! *API boundary*: nothing here knows gRPC or HTTP; edges translate their requests into
//! these types and [`BrokerError`](crate::BrokerError)s into their codes.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;

use crate::error::BrokerError;
use crate::filter::Filter;
use crate::meta::{GroupConfig, MessageType, TopicConfig};

/// A message as produced by a client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    pub topic: String,
    /// Client-generated, opaque, case-sensitive.
    pub message_id: String,
    pub tag: Option<String>,
    pub keys: Vec<String>,
    pub user_properties: BTreeMap<String, String>,
    pub body: Bytes,
    pub message_type: Option<MessageType>,
    /// FIFO message group.
    pub message_group: Option<String>,
    /// Absolute delivery time for delay messages, ms since the epoch.
    pub delivery_timestamp_ms: Option<i64>,
    pub born_timestamp_ms: i64,
    pub born_host: String,
    /// Queue the client picked (honoured when valid).
    pub queue_id: Option<u32>,
    /// Client id of the producer that sent it, when the edge knows it (transaction checks
    /// go to this producer first). Not stored for other messages.
    pub producer_client_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    pub message_id: String,
    pub queue_id: u32,
    pub offset: u64,
    /// Non-empty for transactional messages.
    pub transaction_id: String,
    /// Non-empty for delay messages still waiting: cancels them with [`Messaging::recall`].
    pub recall_handle: String,
}

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub message: Message,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub store_timestamp_ms: i64,
    pub receipt_handle: String,
    /// 1 on the first delivery.
    pub delivery_attempt: u32,
    pub invisible_until_ms: i64,
}

#[derive(Debug, Clone)]
pub struct ReceiveRequest {
    pub group: String,
    pub topic: String,
    pub filter: Filter,
    pub max_messages: u32,
    pub invisible: Duration,
    /// How long to wait for a message when none is ready.
    pub long_poll: Duration,
}

/// Route information of a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRoute {
    pub topic: TopicConfig,
    pub broker_name: String,
}

/// What every protocol edge needs from a broker.
pub trait Messaging: Send + Sync + 'static {
    fn route(&self, topic: &str) -> Result<TopicRoute, BrokerError>;
    fn group_config(&self, group: &str) -> Result<GroupConfig, BrokerError>;
    /// Stores messages. Each result says where the message went or why it was refused;
    /// a refused message changes nothing.
    fn send(
        &self,
        messages: Vec<Message>,
    ) -> impl Future<Output = Vec<Result<SendReceipt, BrokerError>>> + Send;
    /// POP receive: hands out up to `max_messages` visible messages, waiting up to
    /// `long_poll` for one to arrive.
    fn receive(
        &self,
        req: ReceiveRequest,
    ) -> impl Future<Output = Result<Vec<Delivery>, BrokerError>> + Send;
    /// Acknowledges deliveries; one result per handle. The acks of one call share one
    /// durable write.
    fn ack_many(
        &self,
        group: &str,
        topic: &str,
        receipt_handles: &[String],
    ) -> impl Future<Output = Vec<Result<(), BrokerError>>> + Send;
    fn ack(
        &self,
        group: &str,
        topic: &str,
        receipt_handle: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send {
        async move {
            let handles = [receipt_handle.to_owned()];
            self.ack_many(group, topic, &handles)
                .await
                .pop()
                .unwrap_or_else(|| Err(BrokerError::Internal("no ack result".into())))
        }
    }
    /// Changes when an in-flight message becomes visible again; returns the handle to use
    /// from now on.
    fn change_invisible(
        &self,
        group: &str,
        topic: &str,
        receipt_handle: &str,
        invisible: Duration,
    ) -> impl Future<Output = Result<String, BrokerError>> + Send;
    fn forward_to_dead_letter(
        &self,
        group: &str,
        topic: &str,
        receipt_handle: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Cancels a delay message that is still waiting, named by the recall handle its send
    /// returned, for good (also across restarts). Returns its message id. A message
    /// already delivered, or an unknown one, is `NoPendingMessage`.
    fn recall(
        &self,
        topic: &str,
        recall_handle: &str,
    ) -> impl Future<Output = Result<String, BrokerError>> + Send;

    /// Commits (the message becomes visible on its topic) or rolls back a transaction's
    /// half message. Unknown and already ended transactions are `InvalidTransaction`.
    fn end_transaction(
        &self,
        req: crate::EndTransaction,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;
    /// Checks of orphaned transactions, for the edge to forward to a live producer of the
    /// topic (which answers with [`Messaging::end_transaction`]).
    fn subscribe_transaction_checks(
        &self,
    ) -> tokio::sync::broadcast::Receiver<crate::TransactionCheck>;
    /// Reads a queue from an offset, waiting up to `long_poll` for a matching message.
    fn pull(
        &self,
        req: crate::PullRequest,
    ) -> impl Future<Output = Result<crate::PullResult, BrokerError>> + Send;
    /// Sets a group's committed offset of a queue; resolves once it is durable.
    fn update_offset(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;
    /// A group's committed offset of a queue; `None` if it never committed one.
    fn get_offset(&self, group: &str, topic: &str, queue: u32) -> Result<Option<u64>, BrokerError>;
    /// The beginning, end, or first offset at or after a time, of a queue.
    fn query_offset(
        &self,
        topic: &str,
        queue: u32,
        query: crate::OffsetQuery,
    ) -> Result<u64, BrokerError>;
}
