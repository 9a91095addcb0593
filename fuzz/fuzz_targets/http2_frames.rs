//! The HTTP/2 connection of the gRPC listener: arbitrary bytes after the client
//! connection preface, sent to a real server (proxy, broker and store in this process, on
//! 127.0.0.1) over a new TCP connection per input.
//!
//! The input is written as it is (the seeds are well-formed frames: SETTINGS, HEADERS of
//! a gRPC call, DATA, WINDOW_UPDATE, PING, RST_STREAM, GOAWAY, CONTINUATION), followed by
//! a PING, then whatever the server answers is read until the PING's ACK, the server
//! closing the connection, or 300 ms; after 30 ms without a byte from the server our side
//! of the connection is closed (the server then closes too).
//!
//! What must hold, whatever the bytes: no panic anywhere in the process (the panic hook
//! aborts), no hang of the input, and a server that still serves: every 32 inputs a
//! QueryRoute over a separate, well-behaved client must succeed.
#![no_main]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sluice_proto::v2;
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use tonic::transport::Channel;

struct Env {
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    client: MessagingServiceClient<Channel>,
}

static ENV: OnceLock<Env> = OnceLock::new();
static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// PING (type 6) on stream 0 with the payload `fuzzdone`, and its ACK (flag 1).
const PING: [u8; 17] = *b"\0\0\x08\x06\0\0\0\0\0fuzzdone";
const PONG: [u8; 17] = *b"\0\0\x08\x06\x01\0\0\0\0fuzzdone";

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        let (rt, broker) = sluice_fuzz::server_env("sluice-fuzz-http2");
        broker
            .create_topic("t", sluice_broker::meta::MessageType::Normal, 4)
            .expect("topic");
        let (addr, client) = sluice_fuzz::grpc_server(&rt, broker);
        Env { rt, addr, client }
    })
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let mut s = TcpStream::connect(env.addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let until = Instant::now() + Duration::from_millis(300);
    s.set_read_timeout(Some(Duration::from_millis(10)))
        .expect("timeout");
    // The input, then a PING: its ACK says the server has handled every frame before it,
    // and the input is done with (when the input leaves a frame unfinished, the PING is
    // swallowed by it, and the input ends at the time limit instead).
    let mut out = PREFACE.to_vec();
    out.extend_from_slice(data);
    out.extend_from_slice(&PING);
    // The server may close (GOAWAY) before it has read everything: write errors are fine.
    let _ = s.write_all(&out);
    let mut seen = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let mut heard = Instant::now();
    let mut half_closed = false;
    while Instant::now() < until {
        if !half_closed && heard.elapsed() > Duration::from_millis(30) {
            // Quiet for a while (say, waiting for the rest of a frame the input left
            // unfinished): our end of the stream, after which the server closes.
            let _ = s.shutdown(std::net::Shutdown::Write);
            half_closed = true;
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                heard = Instant::now();
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(PONG.len()).any(|w| w == PONG) {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    drop(s);
    if RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 32 == 0 {
        let mut c = env.client.clone();
        let route = env.rt.block_on(async move {
            let mut r = tonic::Request::new(v2::QueryRouteRequest {
                topic: Some(v2::Resource {
                    resource_namespace: String::new(),
                    name: "t".into(),
                }),
                endpoints: None,
            });
            r.metadata_mut()
                .insert("x-mq-client-id", "fuzz@1@1@1".parse().expect("header"));
            r.set_timeout(Duration::from_secs(5));
            c.query_route(r).await
        });
        let code = route.map(|r| r.into_inner().status.map(|s| s.code));
        assert!(
            matches!(code, Ok(Some(20000))),
            "the server stopped serving: QueryRoute of t gave {code:?}"
        );
    }
});
