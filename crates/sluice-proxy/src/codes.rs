//! The one mapping from broker errors to RocketMQ status codes.

use sluice_broker::BrokerError;
use sluice_proto::v2::{Code, Status};

/// The status code for a broker error.
pub fn code_for(e: &BrokerError) -> Code {
    match e {
        BrokerError::TopicNotFound(_) => Code::TopicNotFound,
        BrokerError::GroupNotFound(_) => Code::ConsumerGroupNotFound,
        BrokerError::TopicExists(_) | BrokerError::GroupExists(_) | BrokerError::BadRequest(_) => {
            Code::BadRequest
        }
        BrokerError::IllegalTopic(_) => Code::IllegalTopic,
        BrokerError::IllegalGroup(_) => Code::IllegalConsumerGroup,
        BrokerError::MessageTypeMismatch { .. } => Code::MessagePropertyConflictWithType,
        BrokerError::BodyEmpty => Code::MessageBodyEmpty,
        BrokerError::BodyTooLarge { .. } => Code::MessageBodyTooLarge,
        BrokerError::PropertiesTooLarge(_) => Code::MessagePropertiesTooLarge,
        BrokerError::IllegalPropertyKey(_) => Code::IllegalMessagePropertyKey,
        BrokerError::IllegalTag(_) => Code::IllegalMessageTag,
        BrokerError::IllegalKey(_) => Code::IllegalMessageKey,
        BrokerError::IllegalMessageId(_) => Code::IllegalMessageId,
        BrokerError::IllegalMessageGroup(_) => Code::IllegalMessageGroup,
        BrokerError::IllegalDeliveryTime(_) => Code::IllegalDeliveryTime,
        BrokerError::IllegalFilter(_) => Code::IllegalFilterExpression,
        BrokerError::IllegalInvisibleTime(_) => Code::IllegalInvisibleTime,
        BrokerError::InvalidReceiptHandle(_) => Code::InvalidReceiptHandle,
        BrokerError::InvalidTransaction(_) => Code::InvalidTransactionId,
        BrokerError::IllegalOffset(_) => Code::IllegalOffset,
        // Not MESSAGE_NOT_FOUND: python treats that code as success (an empty receive).
        BrokerError::NoPendingMessage(_) => Code::NotFound,
        BrokerError::NotImplemented(_) => Code::NotImplemented,
        BrokerError::TooManyRequests(_) => Code::TooManyRequests,
        BrokerError::Store(_) | BrokerError::Internal(_) => Code::InternalError,
    }
}

/// Which client is asking, as far as it matters for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    #[default]
    Any,
    /// The crates.io `rocketmq` 5.0.0 client panics on codes it does not know.
    Rust,
}

/// A status carrying `code`, replaced by a code every client of this dialect understands.
pub fn status(dialect: Dialect, code: Code, message: impl Into<String>) -> Status {
    let code = match dialect {
        Dialect::Rust => sluice_proto::code_for_all_clients(code),
        Dialect::Any if code == Code::Unspecified => Code::InternalError,
        Dialect::Any => code,
    };
    sluice_proto::status(code, message)
}

pub fn error_status(dialect: Dialect, e: &BrokerError) -> Status {
    status(dialect, code_for(e), e.to_string())
}

pub fn ok() -> Status {
    sluice_proto::status_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_clients_never_see_unknown_codes() {
        let s = error_status(Dialect::Rust, &BrokerError::BodyEmpty);
        assert!(sluice_proto::code_known_to_all_clients(s.code()));
        let s = error_status(Dialect::Any, &BrokerError::BodyEmpty);
        assert_eq!(s.code(), Code::MessageBodyEmpty);
        assert_eq!(
            error_status(Dialect::Any, &BrokerError::TopicNotFound("t".into())).code(),
            Code::TopicNotFound
        );
    }
}
