//! Broker semantics of Sluice: topics and consumer groups, sends with validation, POP
//! consumption (receipt handles, invisible time, ack, redelivery, dead letters), tag and
//! SQL92 filters and long polling, transactional messages, and pull reads with committed
//! offsets, on top of `sluice-store`.
//!
//! *Architecture invariant*: no gRPC or HTTP types here. Protocol edges talk to the broker
//! through [`Messaging`] and map [`BrokerError`] to their own codes.

pub mod broker;
pub mod error;
pub mod filter;
pub mod handle;
pub mod messaging;
pub mod meta;
mod metrics;
pub mod offsets;
pub mod pop;
pub mod pull;
pub mod timer;
pub mod transaction;

pub use broker::{
    Broker, BrokerConfig, GroupQueueStatus, GroupStatus, QueueStatus, StoredView, TopicStatus,
};
pub use error::BrokerError;
pub use messaging::{Delivery, Message, Messaging, ReceiveRequest, SendReceipt, TopicRoute};
pub use meta::{Backoff, GroupConfig, MessageType, StartPosition, TopicConfig};
pub use pull::{OffsetQuery, PullRequest, PullResult, PullStatus};
pub use timer::{TimerConfig, TimerReport};
pub use transaction::{EndTransaction, TransactionCheck, TransactionResolution, TransactionSource};
