//! Transactions at the gRPC edge: `EndTransaction`, and forwarding the broker's checks of
//! orphaned transactions to a producer as `RecoverOrphanedTransactionCommand` on its
//! Telemetry stream (the producer answers with `EndTransaction(SOURCE_SERVER_CHECK)`).

use std::sync::Arc;
use std::time::Duration;

use sluice_broker::{
    Delivery, EndTransaction, Messaging, TransactionCheck, TransactionResolution, TransactionSource,
};
use sluice_proto::v2::{self, Code, telemetry_command};
use tokio::sync::broadcast::error::RecvError;

use crate::codes::{error_status, ok, status};
use crate::convert::delivery_to_pb;
use crate::service::{Ctx, Service};

/// The message of a check as the clients expect it: the half message with its system
/// properties (message id, body digest, type TRANSACTION, times), without consumer fields.
/// `ns`: the namespace of the producer it goes to.
pub(crate) fn check_message_to_pb(c: &TransactionCheck, ns: &str) -> v2::Message {
    let d = Delivery {
        message: c.message.clone(),
        queue_id: c.message.queue_id.unwrap_or(0),
        queue_offset: 0,
        store_timestamp_ms: c.store_timestamp_ms,
        receipt_handle: String::new(),
        delivery_attempt: 1,
        invisible_until_ms: 0,
    };
    let mut m = delivery_to_pb(&d, "", Duration::ZERO, ns);
    if let Some(sp) = m.system_properties.as_mut() {
        sp.receipt_handle = None;
        sp.invisible_duration = None;
        sp.delivery_attempt = None;
        sp.queue_offset = None;
        sp.message_type = v2::MessageType::Transaction as i32;
    }
    m
}

impl<M: Messaging> Service<M> {
    pub(crate) async fn end_transaction_impl(
        &self,
        c: &Ctx,
        r: v2::EndTransactionRequest,
    ) -> v2::EndTransactionResponse {
        let resolution = match v2::TransactionResolution::try_from(r.resolution) {
            Ok(v2::TransactionResolution::Commit) => TransactionResolution::Commit,
            Ok(v2::TransactionResolution::Rollback) => TransactionResolution::Rollback,
            // A checker that does not know yet (Rust's UNKNOWN, Python's UNSPECIFIED):
            // nothing changes and the server asks again after the next interval.
            Ok(v2::TransactionResolution::Unspecified) => {
                tracing::debug!(txid = %r.transaction_id, "transaction state unknown to the producer");
                return v2::EndTransactionResponse { status: Some(ok()) };
            }
            Err(_) => {
                return v2::EndTransactionResponse {
                    status: Some(status(
                        c.dialect,
                        Code::BadRequest,
                        format!("unknown transaction resolution {}", r.resolution),
                    )),
                };
            }
        };
        let source = if r.source == v2::TransactionSource::SourceServerCheck as i32 {
            TransactionSource::Check
        } else {
            TransactionSource::Client
        };
        let topic = match c.resolve(&r.topic) {
            Ok(t) => t,
            Err(e) => {
                return v2::EndTransactionResponse {
                    status: Some(error_status(c.dialect, &e)),
                };
            }
        };
        if let Err((code, msg)) = c.allow(&[crate::auth::Action::Publish(&topic)]) {
            return v2::EndTransactionResponse {
                status: Some(status(c.dialect, code, msg)),
            };
        }
        let req = EndTransaction {
            topic,
            message_id: r.message_id,
            transaction_id: r.transaction_id,
            resolution,
            source,
        };
        let st = match self.m.end_transaction(req).await {
            Ok(()) => ok(),
            Err(e) => error_status(c.dialect, &e),
        };
        v2::EndTransactionResponse { status: Some(st) }
    }

    /// Sends one check to a live producer of its topic. Repeated checks of the same
    /// transaction rotate among the producers when the sender itself is gone.
    fn forward_check(&self, check: TransactionCheck) {
        let targets = self
            .clients
            .transaction_checkers(check.producer_client_id.as_deref(), &check.topic);
        if targets.is_empty() {
            tracing::debug!(txid = %check.transaction_id, topic = %check.topic, "no producer connected to answer a transaction check");
            return;
        }
        let (tx, ns) = &targets[(check.attempt as usize).saturating_sub(1) % targets.len()];
        let cmd = v2::TelemetryCommand {
            status: Some(ok()),
            command: Some(
                telemetry_command::Command::RecoverOrphanedTransactionCommand(
                    v2::RecoverOrphanedTransactionCommand {
                        message: Some(check_message_to_pb(&check, ns)),
                        transaction_id: check.transaction_id.clone(),
                    },
                ),
            ),
        };
        // Never wait on a slow client: a check that does not fit is repeated later.
        match tx.try_send(Ok(cmd)) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(txid = %check.transaction_id, "telemetry stream full (the producer is not reading); check dropped, asked again later");
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!(txid = %check.transaction_id, "telemetry stream closed; check dropped, asked again later");
            }
        }
    }

    /// Forwards the broker's transaction checks until `stop` turns true.
    pub(crate) async fn forward_transaction_checks(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut checks = self.m.subscribe_transaction_checks();
        loop {
            tokio::select! {
                r = checks.recv() => match r {
                    Ok(check) => self.forward_check(check),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(skipped = n, "transaction checks skipped (forwarding fell behind); they are repeated later");
                    }
                    Err(RecvError::Closed) => return,
                },
                _ = stop.changed() => return,
            }
        }
    }
}
