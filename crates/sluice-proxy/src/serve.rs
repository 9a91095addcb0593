//! Serves HTTP/2 connections with the gRPC service, straight on hyper.
//!
//! tonic's own server puts a stack of general-purpose layers in front of every request
//! (a router, deadline and error-recovery wrappers, a boxed clone of the service, an
//! HTTP/1-or-2 connection sniffer). Sluice serves exactly one gRPC service on connections
//! that [`crate::incoming`] already checked for the HTTP/2 preface, and enforces its
//! deadlines itself (long polls answer before the client's `grpc-timeout`), so each
//! connection goes to hyper's HTTP/2 server directly and each request to the generated
//! `MessagingServiceServer` behind the metrics layer only. Measured with callgrind (same
//! load, same binary otherwise): see docs/benchmarks.md, "Serving connections on hyper".
//!
//! Shutdown: once `stop` resolves no connection is accepted any more; every open
//! connection gets a graceful shutdown (GOAWAY, in-flight streams finish) and [`serve`]
//! returns when the last one closed.

use std::future::Future;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// HTTP/2 settings of the gRPC listener.
#[derive(Debug, Clone, Copy)]
pub struct Http2Settings {
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    pub max_concurrent_streams: u32,
}

/// Puts the connection's addresses into every request, where
/// `tonic::Request::local_addr` finds them (routes name the address a client reached).
#[derive(Clone)]
struct WithConnInfo<S> {
    inner: S,
    info: TcpConnectInfo,
}

impl<S, B> tower::Service<http::Request<B>> for WithConnInfo<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.info.clone());
        self.inner.call(req)
    }
}

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
    S: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keep_alive_interval)
        .keep_alive_timeout(settings.keep_alive_timeout)
        .max_concurrent_streams(settings.max_concurrent_streams)
        // gRPC has no use for a `date` response header (hyper adds one by default): one
        // header less to build and encode per response.
        .auto_date_header(false);
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
        let svc = WithConnInfo {
            info: io.connect_info(),
            inner: svc.clone(),
        };
        let conn = builder.serve_connection(
            TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(svc),
        );
        let mut stopped = stop_rx.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                // The value changes once, to true (or the sender is gone: stopping too).
                _ = stopped.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
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
