//! The gRPC access point: serves `apache.rocketmq.v2.MessagingService` so the official
//! RocketMQ 5 clients work unchanged, translating every request into calls on the
//! protocol-neutral [`Messaging`] interface of a broker.
//!
//! *Architecture invariant*: stateless apart from soft, per-connection client state
//! (settings, auto-renewed receipts); it never touches the store.

pub mod auth;
mod clients;
pub mod codes;
mod conn;
mod convert;
mod incoming;
mod metrics;
pub mod namespace;
mod pull;
mod serve;
mod service;
mod transactions;
mod unary;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sluice_broker::Messaging;

pub use incoming::Coalesced;

/// Settings of the access point.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Largest message body accepted (announced to clients in the settings).
    pub max_body_size: usize,
    /// Longest long poll granted to a receive.
    pub max_long_poll: Duration,
    /// Invisible time used for auto-renewed (PushConsumer) receives.
    pub auto_renew_invisible: Duration,
    /// Largest gRPC message accepted.
    pub max_decoding_message_size: usize,
    /// Connections open at once; further ones are closed at accept.
    pub max_connections: usize,
    /// Time a new connection has to send the HTTP/2 preface before it is closed.
    pub handshake_timeout: Duration,
    /// Users and their permissions, replaceable while serving; `None`: no authentication
    /// (see [`auth`]).
    pub acl: Option<Arc<auth::SharedAcl>>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            max_body_size: 4 << 20,
            max_long_poll: Duration::from_secs(20),
            auto_renew_invisible: Duration::from_secs(60),
            max_decoding_message_size: 8 << 20,
            max_connections: 16_384,
            handshake_timeout: Duration::from_secs(10),
            acl: None,
        }
    }
}

/// Serves the gRPC API on `listener` until `shutdown` resolves, then stops accepting and
/// finishes in-flight requests.
pub async fn run<M: Messaging>(
    listener: tokio::net::TcpListener,
    messaging: Arc<M>,
    config: ProxyConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use sluice_proto::v2::messaging_service_server::MessagingServiceServer;

    let max_msg = config.max_decoding_message_size;
    let (max_conns, handshake_timeout) = (config.max_connections, config.handshake_timeout);
    let svc = Arc::new(service::Service {
        m: messaging,
        cfg: config,
        clients: Arc::default(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let renew = tokio::spawn(svc.clone().renew_loop(stop_rx.clone()));
    let checks = tokio::spawn(svc.clone().forward_transaction_checks(stop_rx.clone()));
    let mut stop_wait = stop_rx;
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let server = MessagingServiceServer::from_arc(svc.clone())
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(64 << 20);
    // The unary RPCs directly, the streaming ones through tonic (unary.rs).
    let router = unary::Router::new(svc, server, max_msg);
    // Our own accept loop: connection cap, handshake timeout, Nagle off per stream (or small
    // responses wait for the peer's delayed ACK, ~40 ms).
    let (incoming, acceptor) = incoming::incoming(listener, max_conns, handshake_timeout);
    serve::serve(
        incoming,
        tower::Layer::layer(&metrics::MetricsLayer, router),
        serve::Http2Settings {
            keep_alive_interval: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 1024,
            // As hyper's server had them: 1 MiB per stream and for the connection.
            stream_window: 1 << 20,
            conn_window: 1 << 20,
            max_header_list_size: 16 << 10,
            // About 100 cancelled requests a second, far more than clients give up on
            // (long polls that time out, abandoned calls), far less than a flood.
            max_resets: 1000,
            reset_window: Duration::from_secs(10),
        },
        async move {
            let _ = stop_wait.wait_for(|s| *s).await;
            // The listening socket closes now, not after the open connections drained:
            // new clients are refused at once instead of waiting for their deadline.
            acceptor.abort();
        },
    )
    .await;
    renew.abort();
    checks.abort();
    Ok(())
}
