//! The one error type of the SDK.

use std::time::Duration;

use sluice_proto::v2::{self, Code};

/// What went wrong in a client call.
///
/// Business errors keep the RocketMQ status code the server sent
/// ([`ClientError::Status`]); gRPC-level failures (connection refused, stream reset, the
/// server's own `UNAVAILABLE`) are [`ClientError::Transport`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with a non-OK RocketMQ status.
    #[error("{} ({code}): {message}", code_name(*.code))]
    Status {
        /// The RocketMQ `Code` number (e.g. 40402 for `TOPIC_NOT_FOUND`), kept even when
        /// this SDK does not know it.
        code: i32,
        message: String,
    },
    /// The call failed below the RocketMQ protocol: connection, HTTP/2 or gRPC status.
    #[error("transport error: {0}")]
    Transport(#[source] Box<tonic::Status>),
    /// The endpoint could not be parsed or the channel could not be set up.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    /// No answer within the deadline.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The caller passed something the protocol cannot carry (empty topic, body too large,
    /// a FIFO message with a delivery time, ...). Nothing was sent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The server's answer does not follow the protocol (missing status, wrong entry count).
    #[error("malformed response: {0}")]
    Protocol(String),
    /// The route of a topic has no queue this client can use.
    #[error("topic {topic} has no {access} queue")]
    NoQueue { topic: String, access: &'static str },
    /// The client was shut down.
    #[error("the client is shut down")]
    Shutdown,
}

fn code_name(code: i32) -> &'static str {
    Code::try_from(code)
        .map(|c| c.as_str_name())
        .unwrap_or("UNKNOWN_CODE")
}

impl ClientError {
    /// Builds a [`ClientError::Status`] from a protocol status.
    pub(crate) fn from_status(s: &v2::Status) -> Self {
        ClientError::Status {
            code: s.code,
            message: s.message.clone(),
        }
    }

    /// The RocketMQ code, if the server sent one and this SDK knows it.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status { code, .. } => Code::try_from(*code).ok(),
            _ => None,
        }
    }

    /// Whether trying the same call again may succeed: throttling, server-side internal
    /// errors and timeouts, and every transport failure.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Status { code, .. } => matches!(
                Code::try_from(*code),
                Ok(Code::TooManyRequests
                    | Code::InternalError
                    | Code::InternalServerError
                    | Code::ProxyTimeout
                    | Code::MasterPersistenceTimeout
                    | Code::SlavePersistenceTimeout
                    | Code::HaNotAvailable)
            ),
            ClientError::Transport(_) | ClientError::Timeout(_) => true,
            ClientError::Connect { .. }
            | ClientError::InvalidArgument(_)
            | ClientError::Protocol(_)
            | ClientError::NoQueue { .. }
            | ClientError::Shutdown => false,
        }
    }

    /// Whether the server asked the client to slow down.
    pub fn is_throttled(&self) -> bool {
        self.code() == Some(Code::TooManyRequests)
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Transport(Box::new(s))
    }
}

/// Turns a response's status into a result: `OK` and `MULTIPLE_RESULTS` (whose entries are
/// checked one by one) are success, a missing status is a protocol violation.
pub(crate) fn check(status: Option<&v2::Status>) -> Result<(), ClientError> {
    match status {
        None => Err(ClientError::Protocol("response without a status".into())),
        Some(s) if s.code == Code::Ok as i32 || s.code == Code::MultipleResults as i32 => Ok(()),
        Some(s) => Err(ClientError::from_status(s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_keeps_code_name_and_number() {
        let e = ClientError::from_status(&sluice_proto::status(Code::TopicNotFound, "no t"));
        assert_eq!(e.to_string(), "TOPIC_NOT_FOUND (40402): no t");
        assert_eq!(e.code(), Some(Code::TopicNotFound));
        let unknown = ClientError::Status {
            code: 49_999,
            message: "new".into(),
        };
        assert_eq!(unknown.to_string(), "UNKNOWN_CODE (49999): new");
        assert_eq!(unknown.code(), None);
    }

    #[test]
    fn retryable_codes() {
        for c in [
            Code::TooManyRequests,
            Code::InternalError,
            Code::ProxyTimeout,
        ] {
            assert!(ClientError::from_status(&sluice_proto::status(c, "")).is_retryable());
        }
        for c in [Code::BadRequest, Code::TopicNotFound, Code::NotImplemented] {
            assert!(!ClientError::from_status(&sluice_proto::status(c, "")).is_retryable());
        }
        assert!(ClientError::from(tonic::Status::unavailable("down")).is_retryable());
        assert!(!ClientError::InvalidArgument("x".into()).is_retryable());
    }

    #[test]
    fn check_statuses() {
        assert!(check(Some(&sluice_proto::status_ok())).is_ok());
        assert!(check(Some(&sluice_proto::status(Code::MultipleResults, ""))).is_ok());
        assert!(matches!(check(None), Err(ClientError::Protocol(_))));
        assert!(matches!(
            check(Some(&sluice_proto::status(Code::Forbidden, ""))),
            Err(ClientError::Status { code: 40300, .. })
        ));
    }
}
