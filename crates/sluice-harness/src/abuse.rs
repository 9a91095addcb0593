//! `sluice-harness abuse`: bad input against a real server process. Thousands of idle
//! connections, slowloris clients, garbage bytes, oversized frames, malformed protobuf and
//! huge property maps, rapid stream resets; afterwards a normal client must still be served, the server's memory
//! must stay bounded, and a graceful stop must still exit 0.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Buf, BufMut};
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::v2::{self, Code};
use tokio::io::AsyncWriteExt;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// Sends raw bytes as a gRPC message body, whatever they are.
#[derive(Default, Clone)]
struct RawCodec;
struct RawEnc;
struct RawDec;

impl Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Self::Error> {
        let mut v = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

pub struct Outcome {
    pub checks: Vec<(String, bool, String)>,
}

impl Outcome {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        println!("{} {name}: {detail}", if ok { "ok  " } else { "FAIL" });
        self.checks.push((name.to_owned(), ok, detail));
    }
}

fn with_id<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    if let Ok(v) = "abuse@1@1".parse() {
        r.metadata_mut().insert("x-mq-client-id", v);
    }
    r.set_timeout(Duration::from_secs(10));
    r
}

fn msg(id: &str, body: Vec<u8>) -> v2::Message {
    v2::Message {
        topic: Some(v2::Resource {
            resource_namespace: String::new(),
            name: crate::TOPIC.into(),
        }),
        user_properties: Default::default(),
        system_properties: Some(v2::SystemProperties {
            message_id: id.into(),
            message_type: v2::MessageType::Normal as i32,
            ..Default::default()
        }),
        body: body.into(),
    }
}

async fn normal_send(
    c: &mut MessagingServiceClient<tonic::transport::Channel>,
    id: &str,
) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let r = c
        .send_message(with_id(v2::SendMessageRequest {
            messages: vec![msg(id, b"still served".to_vec())],
        }))
        .await?;
    let code = r.into_inner().status.map(|s| s.code());
    if code != Some(Code::Ok) {
        bail!("normal send answered {code:?}");
    }
    Ok(t.elapsed())
}

pub async fn run(grpc: u16, pid: u32, idle: usize) -> anyhow::Result<Outcome> {
    let mut out = Outcome { checks: vec![] };
    let addr = format!("127.0.0.1:{grpc}");
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut c = MessagingServiceClient::new(ch.clone()).max_encoding_message_size(64 << 20);
    let base = normal_send(&mut c, "ABUSE-BASE").await?;
    let rss0 = rss_kib(pid);
    out.check(
        "baseline send",
        true,
        format!("{} µs, server RSS {rss0} KiB", base.as_micros()),
    );

    // Idle connections: accepted and held, never speaking.
    let mut conns = Vec::with_capacity(idle);
    let t = Instant::now();
    for i in 0..idle {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(s) => conns.push(s),
            Err(e) => {
                out.check(
                    "idle connections",
                    false,
                    format!("connect {i} failed: {e}"),
                );
                break;
            }
        }
    }
    let lat = normal_send(&mut c, "ABUSE-IDLE").await?;
    let rss1 = rss_kib(pid);
    out.check(
        "idle connections",
        conns.len() == idle,
        format!("{} held (opened in {:.1} s); a normal send took {} µs; server RSS {rss1} KiB (+{} KiB, {:.1} KiB per connection)", conns.len(), t.elapsed().as_secs_f64(), lat.as_micros(), rss1.saturating_sub(rss0), rss1.saturating_sub(rss0) as f64 / idle.max(1) as f64),
    );

    // Connections that never send the HTTP/2 preface are closed after the handshake
    // timeout (10 s by default).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut closed = 0;
    for s in conns.iter_mut().take(200) {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::io::AsyncReadExt::read(s, &mut b),
        )
        .await
        {
            closed += 1;
        }
    }
    let rss_idle = rss_kib(pid);
    out.check(
        "idle connections closed after the handshake timeout",
        closed == 200,
        format!(
            "{closed} of 200 sampled connections closed by the server; server RSS {rss_idle} KiB"
        ),
    );

    // Slowloris: the HTTP/2 preface one byte at a time.
    let mut slow = Vec::new();
    for _ in 0..100 {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            slow.push(s);
        }
    }
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for b in preface.iter().take(10) {
        for s in slow.iter_mut() {
            let _ = s.write_all(&[*b]).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lat = normal_send(&mut c, "ABUSE-SLOW").await?;
    out.check(
        "slowloris",
        true,
        format!(
            "{} trickling connections; a normal send took {} µs",
            slow.len(),
            lat.as_micros()
        ),
    );

    // Garbage bytes.
    for i in 0..100u32 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await {
            let junk: Vec<u8> = (0..4096u32)
                .map(|j| (j.wrapping_mul(2654435761).wrapping_add(i) >> 13) as u8)
                .collect();
            let _ = s.write_all(&junk).await;
        }
    }
    let lat = normal_send(&mut c, "ABUSE-GARBAGE").await?;
    out.check(
        "garbage bytes",
        true,
        format!(
            "100 connections of junk; a normal send took {} µs",
            lat.as_micros()
        ),
    );

    // Oversized gRPC frame: larger than the server accepts.
    let big = c
        .send_message(with_id(v2::SendMessageRequest {
            messages: vec![msg("ABUSE-BIG", vec![7u8; 12 << 20])],
        }))
        .await;
    let detail = match &big {
        Ok(r) => format!(
            "in-band {:?}",
            r.get_ref().status.as_ref().map(|s| s.code())
        ),
        Err(s) => format!("gRPC {:?}: {}", s.code(), s.message()),
    };
    let refused = match &big {
        Ok(r) => r
            .get_ref()
            .status
            .as_ref()
            .is_some_and(|s| s.code() != Code::Ok),
        Err(_) => true,
    };
    out.check("oversized frame (12 MiB)", refused, detail);

    // Huge property map.
    let mut m = msg("ABUSE-PROPS", b"x".to_vec());
    for i in 0..100_000 {
        m.user_properties.insert(format!("k{i}"), "v".into());
    }
    let r = c
        .send_message(with_id(v2::SendMessageRequest { messages: vec![m] }))
        .await;
    let (ok, detail) = match r {
        Ok(r) => {
            let code = r.into_inner().status.map(|s| s.code());
            (
                code == Some(Code::MessagePropertiesTooLarge),
                format!("in-band {code:?}"),
            )
        }
        Err(s) => (true, format!("gRPC {:?}", s.code())),
    };
    out.check("100k properties", ok, detail);

    // Malformed protobuf bodies on several RPCs.
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    let mut malformed_ok = true;
    let mut details = Vec::new();
    for path in [
        "SendMessage",
        "AckMessage",
        "QueryRoute",
        "ChangeInvisibleDuration",
        "Heartbeat",
    ] {
        grpc.ready().await.context("channel ready")?;
        let p: http::uri::PathAndQuery =
            format!("/apache.rocketmq.v2.MessagingService/{path}").parse()?;
        let garbage = vec![0xFFu8, 0xFF, 0xFF, 0xFF, 0x0F, 0x12, 0x34, 0x0A, 0xFF, 0x01];
        let r = grpc.unary(with_id(garbage), p, RawCodec).await;
        match r {
            Err(s) => details.push(format!("{path}: gRPC {:?}", s.code())),
            Ok(_) => {
                malformed_ok = false;
                details.push(format!("{path}: accepted garbage"));
            }
        }
    }
    out.check("malformed protobuf", malformed_ok, details.join(", "));

    // Rapid reset (CVE-2023-44487): requests opened and cancelled at once, as fast as the
    // socket takes them. The server must close the connection after its reset budget
    // (1,000 per 10 s) with GOAWAY(ENHANCE_YOUR_CALM), not serve the flood.
    let flood = rapid_reset(&addr, Duration::from_secs(3)).await?;
    let lat = normal_send(&mut c, "ABUSE-RESET").await?;
    out.check(
        "rapid reset",
        flood.codes.contains(&0xb) && flood.closed,
        format!(
            "{} HEADERS+RST_STREAM pairs written in {:.2} s (most of them into the socket \
             buffers before the GOAWAY arrived); GOAWAY codes {:?}; closed by the server: {}; \
             a normal send took {} µs",
            flood.pairs,
            flood.secs,
            flood.codes,
            flood.closed,
            lat.as_micros()
        ),
    );

    drop(conns);
    drop(slow);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lat = normal_send(&mut c, "ABUSE-AFTER").await?;
    let rss2 = rss_kib(pid);
    out.check(
        "served afterwards",
        true,
        format!(
            "normal send {} µs; server RSS {rss2} KiB after closing the connections",
            lat.as_micros()
        ),
    );
    Ok(out)
}

/// What [`rapid_reset`] saw.
struct Flood {
    /// HEADERS + RST_STREAM pairs written.
    pairs: u32,
    /// How long they were written.
    secs: f64,
    /// Error codes of the GOAWAY frames received.
    codes: Vec<u32>,
    /// The server closed the connection (within 10 s of its last frame).
    closed: bool,
}

/// Opens a raw HTTP/2 connection and writes pairs of a SendMessage request's HEADERS and
/// its RST_STREAM(CANCEL), 100 pairs per write, for `limit` or until the server's GOAWAY
/// arrives (as a client would stop) or the socket fails, while reading what the server
/// sends.
async fn rapid_reset(addr: &str, limit: Duration) -> anyhow::Result<Flood> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::AsyncReadExt;
    let s = tokio::net::TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = s.into_split();
    let goaway = Arc::new(AtomicBool::new(false));
    let seen_goaway = goaway.clone();
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut codes = Vec::new();
        let mut at = 0;
        let mut buf = vec![0u8; 16 << 10];
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
            // Whole frames so far: the error codes of GOAWAYs.
            while at + 9 <= seen.len() {
                let len = u32::from_be_bytes([0, seen[at], seen[at + 1], seen[at + 2]]) as usize;
                if at + 9 + len > seen.len() {
                    break;
                }
                if seen[at + 3] == 7 && len >= 8 {
                    let c = &seen[at + 13..at + 17];
                    codes.push(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                    seen_goaway.store(true, Ordering::Release);
                }
                at += 9 + len;
            }
        };
        (codes, closed)
    });
    // :method POST, :scheme http, :path (literal, not indexed), content-type application/grpc.
    let path = b"/apache.rocketmq.v2.MessagingService/SendMessage";
    let mut block = vec![0x83, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x0f, 0x10, 16]);
    block.extend_from_slice(b"application/grpc");
    let mut start = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    start.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    wr.write_all(&start).await?;
    let mut pairs = 0u32;
    let t = Instant::now();
    while t.elapsed() < limit && !goaway.load(Ordering::Acquire) {
        let mut out = Vec::with_capacity(100 * (9 + block.len() + 13));
        for _ in 0..100 {
            let id = (1 + 2 * pairs).to_be_bytes();
            out.extend_from_slice(&[0, 0, block.len() as u8, 1, 0x4]);
            out.extend_from_slice(&id);
            out.extend_from_slice(&block);
            out.extend_from_slice(&[0, 0, 4, 3, 0]);
            out.extend_from_slice(&id);
            out.extend_from_slice(&[0, 0, 0, 8]);
            pairs += 1;
        }
        if wr.write_all(&out).await.is_err() {
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let (codes, closed) = reader.await?;
    drop(wr);
    Ok(Flood {
        pairs,
        secs,
        codes,
        closed,
    })
}
