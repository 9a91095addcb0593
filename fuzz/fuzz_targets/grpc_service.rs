//! The gRPC access point end to end: arbitrary requests sent to a real server (proxy,
//! broker and store in this process, on 127.0.0.1).
//!
//! The first input byte picks one of the RPCs of `MessagingService`, the rest is decoded
//! with prost as that RPC's request (inputs that do not decode are skipped: `grpc_request`
//! fuzzes the decoding). The request goes through a tonic client with the headers an
//! official client sends and a 300 ms deadline; streaming responses are read to their end
//! or the deadline. The server holds topics of every type (`t` normal, `f` FIFO, `d` delay,
//! `x` transaction) and the groups `g` and `gf` (FIFO), so requests naming them reach the
//! broker.
//!
//! What must hold, whatever the request: no panic anywhere in the process (the panic hook
//! aborts, so a panic in a server task counts as a crash too), an answer or a clean error
//! before the deadline, and a server that still serves: every 64 inputs a QueryRoute of
//! `t` must succeed.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sluice_broker::meta::MessageType;
use sluice_proto::prost::Message as _;
use sluice_proto::v2;
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use tonic::transport::Channel;

struct Env {
    rt: tokio::runtime::Runtime,
    client: MessagingServiceClient<Channel>,
}

static ENV: OnceLock<Env> = OnceLock::new();
static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        let (rt, broker) = sluice_fuzz::server_env("sluice-fuzz-grpc");
        for (name, ty) in [
            ("t", MessageType::Normal),
            ("f", MessageType::Fifo),
            ("d", MessageType::Delay),
            ("x", MessageType::Transaction),
        ] {
            broker.create_topic(name, ty, 4).expect("topic");
        }
        broker
            .create_group("g", false, Some(2), None, None)
            .expect("group");
        broker
            .create_group("gf", true, Some(2), None, None)
            .expect("group");
        let (_, client) = sluice_fuzz::grpc_server(&rt, broker);
        Env { rt, client }
    })
}

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let md = r.metadata_mut();
    md.insert("x-mq-client-id", "fuzz@1@1@1".parse().expect("header"));
    md.insert("x-mq-language", "RUST".parse().expect("header"));
    md.insert("x-mq-protocol", "v2".parse().expect("header"));
    md.insert("x-mq-client-version", "5.0.0".parse().expect("header"));
    r.set_timeout(Duration::from_millis(300));
    r
}

/// Reads a server stream to its end, an error or the deadline.
async fn drain<T>(s: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>) {
    if let Ok(r) = s {
        let mut s = r.into_inner();
        let _ = tokio::time::timeout(Duration::from_millis(400), async {
            while let Ok(Some(_)) = s.message().await {}
        })
        .await;
    }
}

const RPCS: u8 = 16;

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let env = env();
    let mut c = env.client.clone();
    macro_rules! unary {
        ($ty:ty, $call:ident) => {{
            let Ok(m) = <$ty>::decode(body) else {
                return;
            };
            let _ = c.$call(request(m)).await;
        }};
    }
    macro_rules! streaming {
        ($ty:ty, $call:ident) => {{
            let Ok(m) = <$ty>::decode(body) else {
                return;
            };
            drain(c.$call(request(m)).await).await;
        }};
    }
    // The timer must be created inside the runtime.
    let answered = env.rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            match which % RPCS {
                0 => unary!(v2::QueryRouteRequest, query_route),
                1 => unary!(v2::HeartbeatRequest, heartbeat),
                2 => unary!(v2::SendMessageRequest, send_message),
                3 => unary!(v2::QueryAssignmentRequest, query_assignment),
                4 => streaming!(v2::ReceiveMessageRequest, receive_message),
                5 => unary!(v2::AckMessageRequest, ack_message),
                6 => unary!(
                    v2::ForwardMessageToDeadLetterQueueRequest,
                    forward_message_to_dead_letter_queue
                ),
                7 => streaming!(v2::PullMessageRequest, pull_message),
                8 => unary!(v2::UpdateOffsetRequest, update_offset),
                9 => unary!(v2::GetOffsetRequest, get_offset),
                10 => unary!(v2::QueryOffsetRequest, query_offset),
                11 => unary!(v2::EndTransactionRequest, end_transaction),
                12 => unary!(
                    v2::NotifyClientTerminationRequest,
                    notify_client_termination
                ),
                13 => unary!(
                    v2::ChangeInvisibleDurationRequest,
                    change_invisible_duration
                ),
                14 => unary!(v2::RecallMessageRequest, recall_message),
                _ => {
                    let Ok(m) = v2::TelemetryCommand::decode(body) else {
                        return;
                    };
                    let out = tokio_stream::iter(vec![m]);
                    drain(c.telemetry(request(out)).await).await;
                }
            }
        })
        .await
    });
    assert!(
        answered.is_ok(),
        "no answer within 5 s to RPC {}",
        which % RPCS
    );
    if RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 64 == 0 {
        let route = env
            .rt
            .block_on(c.query_route(request(v2::QueryRouteRequest {
                topic: Some(v2::Resource {
                    resource_namespace: String::new(),
                    name: "t".into(),
                }),
                endpoints: None,
            })));
        let code = route.map(|r| r.into_inner().status.map(|s| s.code));
        assert!(
            matches!(code, Ok(Some(20000))),
            "the server stopped serving: QueryRoute of t gave {code:?}"
        );
    }
});
