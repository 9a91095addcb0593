//! Request latency per RPC, as a tower layer around the gRPC routes.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use sluice_common::metrics::{self, Counter, Histogram};

const RPCS: &[&str] = &[
    "QueryRoute",
    "Heartbeat",
    "SendMessage",
    "QueryAssignment",
    "ReceiveMessage",
    "AckMessage",
    "ForwardMessageToDeadLetterQueue",
    "PullMessage",
    "UpdateOffset",
    "GetOffset",
    "QueryOffset",
    "EndTransaction",
    "Telemetry",
    "NotifyClientTermination",
    "ChangeInvisibleDuration",
    "RecallMessage",
    "SyncLiteSubscription",
];

struct RpcMetrics {
    /// Latency and count of each of [`RPCS`], in its order.
    latency: Vec<(Histogram, Counter)>,
    other: Counter,
}

fn rpc_metrics() -> &'static RpcMetrics {
    static M: OnceLock<RpcMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let r = metrics::global();
        RpcMetrics {
            latency: RPCS
                .iter()
                .map(|rpc| {
                    let h = r.histogram(
                        "sluice_grpc_request_seconds",
                        "Time to the response headers (for ReceiveMessage: includes the long poll).",
                        &[("rpc", rpc)],
                        metrics::LATENCY_BUCKETS,
                    );
                    let c = r.counter("sluice_grpc_requests_total", "gRPC requests received.", &[("rpc", rpc)]);
                    (h, c)
                })
                .collect(),
            other: r.counter("sluice_grpc_requests_total", "gRPC requests received.", &[("rpc", "unknown")]),
        }
    })
}

#[derive(Clone, Copy, Debug, Default)]
pub struct MetricsLayer;

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>>,
    // tonic's generated services return boxed futures: polled in place, no second box.
    S::Future: Send + Unpin + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Timed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = req.uri().path().rsplit('/').next().unwrap_or_default();
        let m = rpc_metrics();
        let hist = match RPCS.iter().position(|r| *r == rpc) {
            Some(i) => {
                let (h, c) = &m.latency[i];
                c.inc();
                Some(h)
            }
            None => {
                m.other.inc();
                None
            }
        };
        Timed {
            start: Instant::now(),
            hist,
            fut: self.inner.call(req),
        }
    }
}

/// A request's future that records its latency when it completes.
pub struct Timed<F> {
    fut: F,
    hist: Option<&'static Histogram>,
    start: Instant,
}

impl<F: Future + Unpin> Future for Timed<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let r = std::task::ready!(Pin::new(&mut self.fut).poll(cx));
        if let Some(h) = self.hist {
            h.observe_duration(self.start.elapsed());
        }
        Poll::Ready(r)
    }
}
