//! Broker errors. Each variant is one stable condition; the protocol edges map them to their
//! own codes in one place.

use sluice_store::StoreError;

use crate::filter::FilterError;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("topic {0} does not exist")]
    TopicNotFound(String),
    #[error("consumer group {0} does not exist")]
    GroupNotFound(String),
    #[error("topic {0} already exists")]
    TopicExists(String),
    #[error("consumer group {0} already exists")]
    GroupExists(String),
    #[error("invalid topic name: {0}")]
    IllegalTopic(String),
    #[error("invalid consumer group name: {0}")]
    IllegalGroup(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("topic {topic} accepts {expected} messages, not {got}")]
    MessageTypeMismatch {
        topic: String,
        expected: String,
        got: String,
    },
    #[error("message body is empty")]
    BodyEmpty,
    #[error("message body of {size} bytes exceeds the limit of {max}")]
    BodyTooLarge { size: usize, max: usize },
    #[error("message properties too large: {0}")]
    PropertiesTooLarge(String),
    #[error("property key {0:?} is reserved or invalid")]
    IllegalPropertyKey(String),
    #[error("invalid tag: {0}")]
    IllegalTag(String),
    #[error("invalid key: {0}")]
    IllegalKey(String),
    #[error("invalid message id: {0}")]
    IllegalMessageId(String),
    #[error("invalid message group: {0}")]
    IllegalMessageGroup(String),
    #[error("invalid delivery time: {0}")]
    IllegalDeliveryTime(String),
    #[error("invalid filter expression: {0}")]
    IllegalFilter(#[from] FilterError),
    #[error("invalid invisible duration: {0}")]
    IllegalInvisibleTime(String),
    #[error("invalid receipt handle: {0}")]
    InvalidReceiptHandle(String),
    #[error("invalid transaction: {0}")]
    InvalidTransaction(String),
    #[error("illegal offset: {0}")]
    IllegalOffset(String),
    #[error("no pending delay message: {0}")]
    NoPendingMessage(String),
    #[error("not implemented: {0}")]
    NotImplemented(String),
    #[error("too many requests: {0}")]
    TooManyRequests(String),
    #[error("storage error: {0}")]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl BrokerError {
    /// Whether the error is the caller's fault (4xx) rather than the server's (5xx).
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            BrokerError::Store(_) | BrokerError::Internal(_) | BrokerError::NotImplemented(_)
        )
    }
}
