//! Serves HTTP/2 connections with the gRPC service.
//!
//! Sluice serves exactly one gRPC service on connections that [`crate::incoming`] already
//! checked for the HTTP/2 preface, and enforces its deadlines itself (long polls answer
//! before the client's `grpc-timeout`). Each connection is run by [`crate::conn`] (a
//! connection state machine on h2's frame codec) and each request goes to the router of
//! [`crate::unary`] (the unary RPCs directly, the streaming ones through the generated
//! `MessagingServiceServer`) behind the metrics layer only. Measured with callgrind (same
//! load, same binary otherwise): see docs/benchmarks.md, "Serving connections on hyper"
//! and "A connection state machine of our own".
//!
//! Shutdown: once `stop` resolves no connection is accepted any more; every open
//! connection gets a graceful shutdown (GOAWAY, in-flight streams finish) and [`serve`]
//! returns when the last one closed.

use std::future::Future;

use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, TcpConnectInfo};

pub use crate::conn::Limits as Http2Settings;

/// Serves every connection of `incoming` with `svc` until `stop` resolves, then shuts the
/// open connections down gracefully and waits for them.
pub async fn serve<I, IO, S, B>(
    incoming: I,
    svc: S,
    settings: Http2Settings,
    stop: impl Future<Output = ()>,
) where
    I: tokio_stream::Stream<Item = IO>,
    IO: tokio::io::AsyncRead
        + tokio::io::AsyncWrite
        + Connected<ConnectInfo = TcpConnectInfo>
        + Unpin
        + Send
        + 'static,
    S: crate::conn::GrpcService<B>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
{
    // Each connection task holds a receiver: `closed()` on the sender resolves when the
    // last connection is gone.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut incoming = std::pin::pin!(incoming);
    let mut stop = std::pin::pin!(stop);
    loop {
        let io = tokio::select! {
            _ = &mut stop => break,
            io = incoming.next() => match io {
                Some(io) => io,
                None => break,
            },
        };
        let info = io.connect_info();
        let svc = svc.clone();
        let mut stopped = stop_rx.clone();
        tokio::spawn(async move {
            // The value changes once, to true (or the sender is gone: stopping too).
            let stopping = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = crate::conn::serve_connection(io, svc, info, settings, stopping).await {
                tracing::debug!(error = %e, "gRPC connection ended with an error");
            }
        });
    }
    // No more accepts (`stop` has resolved or the accept loop ended): drain the open
    // connections.
    let _ = stop_tx.send(true);
    drop(stop_rx);
    stop_tx.closed().await;
}
