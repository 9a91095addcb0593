//! The accept loop in front of the gRPC server.
//!
//! Bounds what a connection can cost before it proves to be an HTTP/2 client: at most
//! `max_connections` are open at once (further ones are closed at accept), and a
//! connection is handed to the gRPC server only after the 24-byte HTTP/2 client preface
//! arrived within `handshake_timeout`; idle, slow (slowloris) and silent connections are
//! closed. Nagle is switched off on every accepted stream, and writes are coalesced
//! ([`Coalesced`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sluice_common::metrics;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::transport::server::{Connected, TcpConnectInfo};

const PREFACE_LEN: usize = 24;

/// What an accepted connection holds until it closes: one of the `max_connections`
/// permits, and its place in the open-connections gauge.
pub struct ConnGuard {
    _permit: OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.open.add(-1);
    }
}

/// An accepted connection as the gRPC server gets it.
pub type Guarded = Coalesced<TcpStream, ConnGuard>;

impl<G> Connected for Coalesced<TcpStream, G> {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

/// A stream whose writes are coalesced across the tasks of one runtime turn.
///
/// The first write after a flush is put off by one turn of the runtime: the task wakes
/// itself and returns `Pending`, and the write goes through when it is polled again. An
/// HTTP/2 connection task is woken by every request task that finishes a response, and
/// tokio runs a task woken that way right after the waker (its LIFO slot), so without the
/// extra turn each response left in a `writev` of its own: with 64 unary calls in flight,
/// 0.9 `writev` per call and ≈ 30% of the server's CPU in the loopback/TCP send path. With
/// it, the responses finished in the same turn share one `writev`. The cost is one more
/// poll of the connection task per flush; nothing waits on a timer.
///
/// `G` is whatever must live exactly as long as the stream (the server's connection
/// permit); it is dropped with it.
pub struct Coalesced<S, G = ()> {
    inner: S,
    /// Nothing written since the last flush: the next write waits one turn first.
    hold_next_write: bool,
    _guard: G,
}

impl<S> Coalesced<S> {
    pub fn new(inner: S) -> Coalesced<S> {
        Coalesced::with_guard(inner, ())
    }
}

impl<S, G> Coalesced<S, G> {
    pub fn with_guard(inner: S, guard: G) -> Coalesced<S, G> {
        Coalesced {
            inner,
            hold_next_write: true,
            _guard: guard,
        }
    }

    /// True for the first write since a flush, which then waits one turn (the task is
    /// woken at once); the next write goes through.
    fn hold(&mut self, cx: &Context<'_>) -> bool {
        let hold = std::mem::take(&mut self.hold_next_write);
        if hold {
            cx.waker().wake_by_ref();
        }
        hold
    }
}

impl<S: AsyncRead + Unpin, G: Unpin> AsyncRead for Coalesced<S, G> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, G: Unpin> AsyncWrite for Coalesced<S, G> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.hold(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if r.is_ready() {
            self.hold_next_write = true;
        }
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.hold(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Waits until the whole client preface is readable (without consuming it).
async fn preface_arrived(s: &TcpStream) -> bool {
    let mut b = [0u8; PREFACE_LEN];
    loop {
        if s.readable().await.is_err() {
            return false;
        }
        match s.peek(&mut b).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if n >= PREFACE_LEN => return true,
            // Part of it: wait a little for the rest instead of spinning on readiness.
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Accepts connections from `listener` and yields those that pass the handshake check.
/// The returned task must be aborted when the server stops.
pub fn incoming(
    listener: TcpListener,
    max_connections: usize,
    handshake_timeout: Duration,
) -> (
    tokio_stream::wrappers::ReceiverStream<Guarded>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel::<Guarded>(256);
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let r = metrics::global();
    let refused = r.counter(
        "sluice_proxy_connections_refused_total",
        "Connections closed at accept: over the limit.",
        &[],
    );
    let timed_out = r.counter(
        "sluice_proxy_handshake_timeouts_total",
        "Connections closed because the HTTP/2 preface did not arrive in time.",
        &[],
    );
    let accepted = r.counter(
        "sluice_proxy_connections_accepted_total",
        "Connections accepted.",
        &[],
    );
    let open = r.gauge(
        "sluice_proxy_connections_open",
        "Connections currently open.",
        &[],
    );
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                refused.inc();
                drop(stream);
                continue;
            };
            accepted.inc();
            let _ = stream.set_nodelay(true);
            let tx = tx.clone();
            let timed_out = timed_out.clone();
            let open = open.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, preface_arrived(&stream)).await {
                    Ok(true) => {
                        open.add(1);
                        let _ = tx
                            .send(Guarded::with_guard(
                                stream,
                                ConnGuard {
                                    _permit: permit,
                                    open,
                                },
                            ))
                            .await;
                    }
                    Ok(false) => {}
                    Err(_) => timed_out.inc(),
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn first_write_after_flush_waits_one_turn_and_wakes() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut w = Coalesced::new(a);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let write = |w: &mut Coalesced<_>, cx: &mut Context<'_>, data: &[u8]| {
            Pin::new(w).poll_write(cx, data)
        };
        // Held once, with the task woken so it is polled again.
        assert!(write(&mut w, &mut cx, b"ab").is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        // The retry and further writes before a flush go through at once.
        assert!(matches!(write(&mut w, &mut cx, b"ab"), Poll::Ready(Ok(2))));
        assert!(matches!(write(&mut w, &mut cx, b"cd"), Poll::Ready(Ok(2))));
        assert!(Pin::new(&mut w).poll_flush(&mut cx).is_ready());
        // After a flush the next write is held again; vectored writes too.
        let bufs = [io::IoSlice::new(b"ef")];
        assert!(
            Pin::new(&mut w)
                .poll_write_vectored(&mut cx, &bufs)
                .is_pending()
        );
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert!(matches!(
            Pin::new(&mut w).poll_write_vectored(&mut cx, &bufs),
            Poll::Ready(Ok(2))
        ));
        drop(w);
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b, &mut got)
            .await
            .expect("read");
        assert_eq!(got, b"abcdef");
    }
}
