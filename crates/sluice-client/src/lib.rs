//! # sluice-client
//!
//! A Rust SDK for the RocketMQ 5 gRPC protocol (`apache.rocketmq.v2.MessagingService`),
//! usable against Sluice and any RocketMQ 5 access point (proxy):
//!
//! * [`Producer`] — normal, FIFO ([`Message::with_message_group`]), delay
//!   ([`Message::with_delay`]) and transactional ([`Producer::begin_transaction`]) messages,
//!   batches, retries with the server's backoff policy;
//! * [`SimpleConsumer`] — receive (long polling), ack, change invisible duration;
//! * [`PushConsumer`] — a listener per message with bounded concurrency, ack on success,
//!   nack with the group's backoff on failure, dead-lettering after max attempts.
//!
//! Every client speaks to one access point (`host:port`, several separated by `;`), sends
//! the headers the official clients send (`x-mq-client-id` as `host@pid@n`,
//! `x-mq-language: RUST`, `x-mq-protocol: v2`, `x-mq-client-version`, `x-mq-date-time`,
//! `x-mq-request-id`, `x-mq-namespace`), keeps a Telemetry stream open (settings
//! handshake, server commands such as transaction checks), heartbeats every 10 s,
//! refreshes routes every 30 s and says goodbye with NotifyClientTermination on shutdown.
//!
//! Not supported (yet): TLS, access-key authentication, message recall, pull consumers,
//! lite topics.
//!
//! *Architecture invariant*: depends on `sluice-proto` only, never on the server crates; the
//! server crates appear in dev-dependencies for the end-to-end tests.

mod config;
mod consumer;
mod core;
mod error;
pub mod ids;
mod message;
mod producer;
mod push;

pub use crate::config::{Backoff, ClientConfig, Credentials, RetryPolicy};
pub use crate::consumer::{SimpleConsumer, SimpleConsumerBuilder};
pub use crate::core::{ServerSettings, TransactionChecker, TransactionResolution};
pub use crate::error::ClientError;
pub use crate::message::{FilterExpression, Message, ReceivedMessage, SendReceipt, md5_upper_hex};
pub use crate::producer::{Producer, ProducerBuilder, Transaction};
pub use crate::push::{ConsumeResult, MessageListener, PushConsumer, PushConsumerBuilder};
pub use sluice_proto::v2::{Code, MessageType};
