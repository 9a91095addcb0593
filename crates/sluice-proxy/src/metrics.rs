//! Request latency per RPC, as a tower layer around the gRPC routes.

use std::collections::HashMap;
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
    latency: HashMap<&'static str, (Histogram, Counter)>,
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
                    (*rpc, (h, c))
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
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = req.uri().path().rsplit('/').next().unwrap_or_default();
        let m = rpc_metrics();
        let hist = match m.latency.get(rpc) {
            Some((h, c)) => {
                c.inc();
                Some(h.clone())
            }
            None => {
                m.other.inc();
                None
            }
        };
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            if let Some(h) = hist {
                h.observe_duration(start.elapsed());
            }
            r
        })
    }
}
