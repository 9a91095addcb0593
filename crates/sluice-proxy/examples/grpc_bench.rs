//! gRPC send/receive load generator, with the store's own append rate for the same
//! messages measured in the same run as the baseline.
//!
//! ```text
//! cargo run --release -p sluice-proxy --example grpc_bench -- [--seconds N] [--dir PATH]
//!     [--flush async|sync] [--only one|many|batched|paced|receive] [--rate R] [--tick-us N]
//!     [--connections N] [--workers N] [--client tonic|h2|raw] [--sign ACCESS_KEY:SECRET_KEY]
//!     [--serve ADDR | --target ADDR [--server-pid PID]]
//! ```
//!
//! For each flush policy it opens a fresh store and measures raw `Store::append`
//! throughput for 1 KiB messages with 64 appends in flight (median of three runs, on a
//! runtime with one worker per core), then drives a gRPC server with generated tonic
//! clients (or, with `--client h2`, gRPC calls made with the `h2` crate directly, which
//! leaves more of the 2 cores to the server; with `--client raw`, unbatched calls written
//! as HTTP/2 frames by hand, see `grpc_bench_support/raw.rs`; receive always uses tonic):
//! unbatched sends with 1 and 64 in flight, batched sends (100 × 1 KiB per
//! request), an open-loop run at half the unbatched maximum (latency measured from the
//! intended send time) and receive + ack throughput. `--rate R` sets the open-loop rate
//! instead; with `--only paced` too, the saturated run is then skipped. Each `--client raw`
//! connection warms up closed-loop for 300 ms (not counted) before it measures. The process
//! runs without transparent huge pages, as `sluice server` does by default.
//!
//! The server is, by default, store + broker + gRPC in this process on 127.0.0.1. With
//! `--serve ADDR` the process is only that server, until killed; with `--target ADDR` the
//! load goes to a server elsewhere (a `sluice server`, or another `grpc_bench --serve`)
//! that has the topic `bench` (8 queues) and the group `bench-group`, and `--server-pid`
//! adds that process's CPU time to the "CPU µs per request" column.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use sluice_broker::{Broker, BrokerConfig, MessageType};
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::v2::{self, receive_message_response::Content};
use sluice_store::{AppendMessage, FlushPolicy, Store, StoreConfig};
use tonic::transport::Channel;

#[path = "grpc_bench_support/raw.rs"]
mod raw;

/// The same allocator as the `sluice` binary: glibc's malloc showed up as ≈ 20% of the
/// CPU of this benchmark (arena lock contention between the runtime workers).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    seconds: f64,
    dir: std::path::PathBuf,
    /// Only this flush policy (`async` or `sync`).
    flush: Option<String>,
    /// Only this run: `one`, `many`, `batched`, `paced`, `receive` (for profiling).
    only: Option<String>,
    /// HTTP/2 connections the load generator spreads its requests over.
    connections: usize,
    /// Paced run at this rate instead of half the measured maximum.
    rate: Option<f64>,
    /// Only serve (broker + gRPC on this address) until killed: the server half of a
    /// two-process run, so each process's CPU time can be read separately.
    serve: Option<String>,
    /// Drive the server at this address instead of one started in this process.
    target: Option<String>,
    /// With `--target`: the server's process id, whose CPU time (from `/proc`) is added
    /// to this process's so "CPU µs per request" still covers server and generator.
    server_pid: Option<u32>,
    /// Runtime worker threads of this process (2 unless told).
    workers: usize,
    /// Load-generating client for the sends: `tonic`, `h2` (see `RawH2`) or `raw` (see
    /// `raw`; unbatched sends only, batches then go through `h2`).
    client: String,
    /// `--sign AK:SK`: the h2 client signs every send (for a server with an ACL).
    sign: Option<(String, String)>,
}

const USAGE: &str = "grpc_bench [--seconds N] [--dir PATH] [--flush async|sync]
    [--only one|many|batched|paced|receive] [--rate R] [--tick-us N]
    [--connections N] [--workers N] [--client tonic|h2|raw] [--sign ACCESS_KEY:SECRET_KEY]
    [--serve ADDR | --target ADDR [--server-pid PID]]
(see the header of crates/sluice-proxy/examples/grpc_bench.rs and docs/benchmarks.md)";

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        seconds: 5.0,
        dir: "target/grpc-bench".into(),
        flush: None,
        only: None,
        connections: 4,
        rate: None,
        serve: None,
        target: None,
        server_pid: None,
        workers: 2,
        client: "tonic".into(),
        sign: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--help" || k == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let v = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{k} needs a value (--help for usage)"))?;
        match k.as_str() {
            "--seconds" => a.seconds = v.parse()?,
            "--dir" => a.dir = v.into(),
            "--flush" => a.flush = Some(v),
            "--only" => a.only = Some(v),
            "--rate" => a.rate = Some(v.parse()?),
            "--tick-us" => {
                let t: u64 = v.parse()?;
                anyhow::ensure!((10..=1_000_000).contains(&t), "--tick-us: 10 to 1000000");
                let _ = TICK_US.set(t);
            }
            "--serve" => a.serve = Some(v),
            "--target" => a.target = Some(v),
            "--server-pid" => a.server_pid = Some(v.parse()?),
            "--workers" => a.workers = v.parse::<usize>()?.max(1),
            "--connections" => a.connections = v.parse::<usize>()?.max(1),
            "--client" if v == "tonic" || v == "h2" || v == "raw" => a.client = v,
            "--sign" => {
                let (k, s) = v
                    .split_once(':')
                    .ok_or_else(|| anyhow::anyhow!("--sign needs ACCESS_KEY:SECRET_KEY"))?;
                a.sign = Some((k.to_owned(), s.to_owned()));
            }
            _ => anyhow::bail!("unknown argument {k} (--help for usage)"),
        }
    }
    Ok(a)
}

fn res(name: &str) -> Option<v2::Resource> {
    Some(v2::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    })
}

fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("x-mq-client-id", "bench@1@1".parse().expect("header"));
    r
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn message(body: &Bytes) -> v2::Message {
    let id = SEQ.fetch_add(1, Ordering::Relaxed);
    v2::Message {
        topic: res("bench"),
        user_properties: Default::default(),
        system_properties: Some(v2::SystemProperties {
            message_id: format!("B{id:020}"),
            message_type: v2::MessageType::Normal as i32,
            queue_id: (id % 8) as i32,
            ..Default::default()
        }),
        body: body.to_vec().into(),
    }
}

/// A sender of `SendMessage` calls: the generated tonic client, or a lean one that speaks
/// gRPC over the `h2` crate directly (see `RawH2`).
#[derive(Clone)]
enum Sender {
    Tonic(MessagingServiceClient<Channel>),
    H2(RawH2),
}

impl Sender {
    async fn send(
        &mut self,
        messages: Vec<v2::Message>,
    ) -> anyhow::Result<v2::SendMessageResponse> {
        let r = v2::SendMessageRequest { messages };
        match self {
            Sender::Tonic(c) => Ok(c.send_message(req(r)).await?.into_inner()),
            Sender::H2(c) => c.send_message(&r).await,
        }
    }
}

/// gRPC unary `SendMessage` over one HTTP/2 connection with the `h2` crate and nothing
/// above it (no tower stack, no per-call channel machinery), as a C load generator like
/// h2load would do it: a real call that the server cannot tell apart from a tonic one
/// (same headers, length-prefixed protobuf, status read from the trailers), but with less
/// of this machine's 2 cores spent on the generating side.
#[derive(Clone)]
struct RawH2 {
    send: h2::client::SendRequest<Bytes>,
    uri: http::Uri,
    /// Access key and secret key that sign every request, as the official clients do.
    sign: Option<Arc<(String, String)>>,
}

impl RawH2 {
    async fn connect(
        addr: std::net::SocketAddr,
        sign: Option<Arc<(String, String)>>,
    ) -> anyhow::Result<RawH2> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        // Requests started in the same turn of the runtime leave in one write, as the
        // server's responses do.
        let tcp = sluice_proxy::Coalesced::new(tcp);
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .initial_connection_window_size(16 << 20)
            .handshake::<_, Bytes>(tcp)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                eprintln!("h2 connection: {e}");
            }
        });
        let uri =
            format!("http://{addr}/apache.rocketmq.v2.MessagingService/SendMessage").parse()?;
        Ok(RawH2 { send, uri, sign })
    }

    async fn send_message(
        &mut self,
        r: &v2::SendMessageRequest,
    ) -> anyhow::Result<v2::SendMessageResponse> {
        use sluice_proto::prost::Message as _;
        let len = r.encoded_len();
        let mut frame = bytes::BytesMut::with_capacity(5 + len);
        frame.extend_from_slice(&[0]); // not compressed
        frame.extend_from_slice(&u32::try_from(len)?.to_be_bytes());
        r.encode(&mut frame)?;
        let mut request = http::Request::post(self.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-mq-client-id", "bench@1@1");
        if let Some(k) = &self.sign {
            // Signed per request as the official clients do, over a date of whole
            // seconds as they send it (the server does not parse it; Unix seconds here).
            let date = format!(
                "{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            );
            request = request
                .header(
                    "authorization",
                    sluice_proto::auth::authorization(&k.0, &k.1, &date),
                )
                .header("x-mq-date-time", date);
        }
        let request = request.body(())?;
        let mut send = self.send.clone().ready().await?;
        let (response, mut stream) = send.send_request(request, false)?;
        stream.send_data(frame.freeze(), true)?;
        let response = response.await?;
        anyhow::ensure!(
            response.status() == 200,
            "HTTP status {}",
            response.status()
        );
        // A trailers-only answer (an error) carries grpc-status in the headers.
        if let Some(s) = response.headers().get("grpc-status") {
            anyhow::bail!("grpc-status {s:?} without a body");
        }
        let mut body = response.into_body();
        let mut buf = bytes::BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            buf.extend_from_slice(&chunk);
        }
        let trailers = body.trailers().await?;
        let status = trailers.as_ref().and_then(|t| t.get("grpc-status"));
        anyhow::ensure!(status.is_some_and(|s| s == "0"), "grpc-status {status:?}");
        anyhow::ensure!(buf.len() >= 5 && buf[0] == 0, "bad gRPC frame");
        let n = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        anyhow::ensure!(
            buf.len() == 5 + n,
            "gRPC frame length {n} != {}",
            buf.len() - 5
        );
        Ok(v2::SendMessageResponse::decode(&buf[5..])?)
    }
}

struct Result_ {
    msgs_per_s: f64,
    hist: Histogram<u64>,
    /// Share of the 2 cores this process used during the run (server and load generator).
    cpu_busy: f64,
    /// Share of the machine's CPU time the hypervisor gave to other guests during the run
    /// (`steal` in /proc/stat): how much of a slow run was a noisy neighbour.
    stolen: f64,
}

/// (steal, total) clock ticks of all CPUs so far, from the first line of /proc/stat.
fn steal_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, counted in user]
    let total = f.iter().take(8).sum();
    (f.get(7).copied().unwrap_or(0), total)
}

fn stolen_since((s0, t0): (u64, u64)) -> f64 {
    let (s1, t1) = steal_ticks();
    if t1 > t0 {
        (s1 - s0) as f64 / (t1 - t0) as f64
    } else {
        0.0
    }
}

/// CPU time (user + system) this process has used so far.
/// Process whose CPU time `cpu_time` adds (the server of a two-process run), 0 for none.
static SERVER_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// User + system CPU time of another process, from `/proc/<pid>/stat` (clock ticks).
fn proc_cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz)
}

fn cpu_time() -> Duration {
    let pid = SERVER_PID.load(Ordering::Relaxed);
    let other = if pid == 0 {
        Duration::ZERO
    } else {
        proc_cpu_time(pid)
    };
    other + own_cpu_time()
}

fn own_cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given; it is zero-initialised plain data.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Pacing tick in µs (`--tick-us`, 250 unless told).
static TICK_US: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn tick() -> Duration {
    Duration::from_micros(*TICK_US.get().unwrap_or(&250))
}

/// Open-loop arrivals: every tick (250 µs unless `--tick-us` says otherwise) releases the
/// sends the rate has made due since the last one (7 or 8 per tick at 30,000/s), and each
/// send's latency counts from its tick. With 1 ms ticks the sends of a millisecond left
/// together (30 at once at 30,000/s), a burst every client population spread over time
/// does not make, and the last of each burst waited for the 29 before it on both sides. Waking
/// the senders once per tick rather than once per send keeps the generator's own CPU (and
/// the scheduling noise it adds on a 2-core machine) down; the ticks come from a thread
/// that sleeps with the OS timer, since tokio timers round up to whole milliseconds.
fn pacer(
    sem: Arc<tokio::sync::Semaphore>,
    start: Instant,
    end: Instant,
    rate: f64,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut released = 0u64;
        let t = tick();
        for k in 1u32.. {
            let at = start + t * k;
            if at >= end {
                sem.close();
                return;
            }
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let due = (f64::from(k) * t.as_secs_f64() * rate) as u64;
            sem.add_permits((due - released) as usize);
            released = due;
        }
    })
}

/// When paced request `slot` (0-based) is due: the first tick by which the rate has
/// released it (see `pacer`).
fn slot_due(start: Instant, slot: u64, rate: f64) -> Instant {
    let t = tick();
    start + t * ((slot + 1) as f64 / (rate * t.as_secs_f64())).ceil() as u32
}

/// Sends for `secs` with `inflight` concurrent requests of `batch` messages each. With
/// `rate` set, requests start at fixed intervals and latency counts from the intended
/// start (no coordinated omission).
async fn send_load(
    clients: &[Sender],
    secs: f64,
    inflight: usize,
    batch: usize,
    rate: Option<f64>,
) -> anyhow::Result<Result_> {
    let body = Bytes::from(vec![b'x'; 1024]);
    let cpu0 = cpu_time();
    let steal0 = steal_ticks();
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let sent = Arc::new(AtomicU64::new(0));
    let next_slot = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(0));
    let pacing = rate.map(|r| pacer(sem.clone(), start, end, r));
    let mut tasks = Vec::new();
    for w in 0..inflight {
        let mut c = clients[w % clients.len()].clone();
        let body = body.clone();
        let sent = sent.clone();
        let next_slot = next_slot.clone();
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            loop {
                let intended = match rate {
                    Some(r) => {
                        match sem.acquire().await {
                            Ok(p) => p.forget(),
                            Err(_) => break, // closed: the run is over
                        }
                        let slot = next_slot.fetch_add(1, Ordering::Relaxed);
                        slot_due(start, slot, r)
                    }
                    None => {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        now
                    }
                };
                let msgs = (0..batch).map(|_| message(&body)).collect();
                match c.send(msgs).await {
                    Ok(r)
                        if r.status.as_ref().is_some_and(|s| s.code() == v2::Code::Ok)
                            && r.entries.len() == batch =>
                    {
                        sent.fetch_add(batch as u64, Ordering::Relaxed);
                        let _ = h.record(intended.elapsed().as_micros() as u64);
                    }
                    Ok(r) => eprintln!("send failed: {:?}", r.status),
                    Err(e) => eprintln!("send error: {e}"),
                }
            }
            h
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    for t in tasks {
        hist.add(t.await?)?;
    }
    if let Some(p) = pacing {
        p.join()
            .map_err(|_| anyhow::anyhow!("pacer thread panicked"))?;
    }
    let wall = start.elapsed().as_secs_f64();
    Ok(Result_ {
        msgs_per_s: sent.load(Ordering::Relaxed) as f64 / wall,
        hist,
        cpu_busy: (cpu_time() - cpu0).as_secs_f64() / wall / 2.0,
        stolen: stolen_since(steal0),
    })
}

/// [`send_load`] of unbatched sends with `--client raw`: a blocking thread per connection
/// (at most `inflight` of them), the in-flight calls and the rate shared among them.
fn raw_load(
    addr: std::net::SocketAddr,
    connections: usize,
    secs: f64,
    inflight: usize,
    rate: Option<f64>,
) -> anyhow::Result<Result_> {
    let conns = connections.min(inflight).max(1);
    let warmed = Arc::new(std::sync::Barrier::new(conns + 1));
    let threads: Vec<_> = (0..conns)
        .map(|i| {
            let share = inflight / conns + usize::from(i < inflight % conns);
            let pace = match rate {
                Some(r) => raw::Pace::Open {
                    rate: r * share as f64 / inflight as f64,
                    tick: tick(),
                },
                None => raw::Pace::Closed,
            };
            let first = SEQ.fetch_add(1 << 40, Ordering::Relaxed);
            let warmed = warmed.clone();
            std::thread::spawn(move || raw::run(addr, secs, share, pace, first, &warmed))
        })
        .collect();
    // Measured from the end of the warm-up on (a thread that failed before it never gets
    // there: its error then shows at the join, after this wait ends with the others).
    warmed.wait();
    let cpu0 = cpu_time();
    let steal0 = steal_ticks();
    let start = Instant::now();
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut calls, mut failures) = (0, 0);
    for t in threads {
        let o = t
            .join()
            .map_err(|_| anyhow::anyhow!("a raw client thread panicked"))??;
        calls += o.calls;
        failures += o.failures;
        hist.add(o.hist)?;
    }
    if failures > 0 {
        eprintln!("{failures} raw sends failed");
    }
    let wall = start.elapsed().as_secs_f64();
    Ok(Result_ {
        msgs_per_s: calls as f64 / wall,
        hist,
        cpu_busy: (cpu_time() - cpu0).as_secs_f64() / wall / 2.0,
        stolen: stolen_since(steal0),
    })
}

async fn receive_all(c: &mut MessagingServiceClient<Channel>, total: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut got = 0u64;
    while got < total && start.elapsed() < Duration::from_secs(120) {
        let r = v2::ReceiveMessageRequest {
            group: res("bench-group"),
            message_queue: Some(v2::MessageQueue {
                topic: res("bench"),
                id: -1,
                ..Default::default()
            }),
            filter_expression: None,
            batch_size: 64,
            invisible_duration: Some(sluice_proto::prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            auto_renew: false,
            long_polling_timeout: Some(sluice_proto::prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            attempt_id: None,
        };
        let mut stream = c.receive_message(req(r)).await?.into_inner();
        let mut entries = Vec::new();
        while let Some(f) = stream.message().await? {
            if let Some(Content::Message(m)) = f.content {
                let sp = m.system_properties.unwrap_or_default();
                entries.push(v2::AckMessageEntry {
                    message_id: sp.message_id,
                    receipt_handle: sp.receipt_handle.unwrap_or_default(),
                    lite_topic: None,
                });
            }
        }
        if entries.is_empty() {
            break;
        }
        got += entries.len() as u64;
        c.ack_message(req(v2::AckMessageRequest {
            group: res("bench-group"),
            topic: res("bench"),
            entries,
        }))
        .await?;
    }
    Ok(got as f64 / start.elapsed().as_secs_f64())
}

/// A store for this benchmark: no free-space floor, small index files.
fn open_store(dir: &std::path::Path, flush: FlushPolicy) -> anyhow::Result<Store> {
    let mut cfg = StoreConfig::new(dir);
    cfg.flush = flush;
    cfg.min_free_space = 0;
    cfg.index_slots = 1 << 16;
    cfg.index_entries = 1 << 20;
    Ok(Store::open(cfg)?)
}

/// Store + broker + gRPC server in this process, with the topic and group the load uses.
struct LocalServer {
    dir: std::path::PathBuf,
    store: Arc<Store>,
    broker: Arc<Broker>,
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl LocalServer {
    async fn start(
        dir: std::path::PathBuf,
        flush: FlushPolicy,
        bind: &str,
    ) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let store = Arc::new(open_store(&dir, flush)?);
        let broker = Broker::open(
            BrokerConfig::new(&dir),
            store.clone(),
            Arc::new(sluice_common::SystemClock),
        )?;
        broker.create_topic("bench", MessageType::Normal, 8)?;
        broker.create_group(
            "bench-group",
            false,
            None,
            None,
            Some(sluice_broker::StartPosition::Earliest),
        )?;
        let listener = tokio::net::TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sluice_proxy::run(
            listener,
            broker.clone(),
            sluice_proxy::ProxyConfig::default(),
            async {
                let _ = stop_rx.await;
            },
        ));
        Ok(LocalServer {
            dir,
            store,
            broker,
            addr,
            stop,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        let _ = self.task.await;
        drop(self.broker);
        // Connection tasks may still hold the broker (and so the store) for a moment after
        // the server returns: close the store explicitly so nothing writes into the
        // directory while it is removed.
        self.store.close();
        drop(self.store);
        std::fs::remove_dir_all(&self.dir)?;
        Ok(())
    }
}

/// Store baseline repetitions; the median is the 100% of the table.
const BASELINE_RUNS: usize = 3;

/// Runs the store baseline `BASELINE_RUNS` times, each in a fresh directory, on a runtime
/// of its own with one worker per core (whatever `--workers` says, so the baseline does not
/// change with the load generator's thread count). Returns the median and ": min–max".
fn baseline_median(
    dir: &std::path::Path,
    flush: FlushPolicy,
    secs: f64,
) -> anyhow::Result<(f64, String)> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let dir = dir.to_owned();
    let mut runs = std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores)
            .enable_all()
            .build()?;
        let mut runs = Vec::new();
        for i in 0..BASELINE_RUNS {
            let d = dir.join(format!("run{i}"));
            std::fs::create_dir_all(&d)?;
            runs.push(rt.block_on(store_baseline(&d, flush, secs))?);
            std::fs::remove_dir_all(&d)?;
        }
        Ok(runs)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the baseline thread panicked"))??;
    runs.sort_by(f64::total_cmp);
    let spread = format!(": {:.0}–{:.0}", runs[0], runs[runs.len() - 1]);
    Ok((runs[runs.len() / 2], spread))
}

async fn store_baseline(
    dir: &std::path::Path,
    flush: FlushPolicy,
    secs: f64,
) -> anyhow::Result<f64> {
    let store = Arc::new(open_store(dir, flush)?);
    let body = Bytes::from(vec![b'x'; 1024]);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..64u64 {
        let store = store.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                let m = AppendMessage {
                    topic: "bench".into(),
                    queue_id: (w % 8) as u32,
                    flags: 0,
                    born_ts: 0,
                    properties: vec![("UNIQ_KEY".into(), format!("S{w:04}{n:016}"))],
                    body: body.clone(),
                };
                store.append(vec![m]).await.expect("append");
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

/// The CPUs' own pauses: one thread per CPU, pinned to it, reads the clock in a loop for
/// `secs`; any gap between two reads is time the thread did not run (the hypervisor took
/// the vCPU, or an interrupt or another task did). Run with the machine otherwise idle.
/// Returns, per CPU, (share of time in gaps over 1 ms, gaps over 1 ms per second, longest
/// gap in ms). A request in flight during such a gap waits it out, so where gaps of over
/// 1 ms fill more than 1% of the time, a p99 under 1–2 ms is out of reach for any server.
fn hiccup_probe(secs: f64) -> Vec<(f64, f64, f64)> {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let threads: Vec<_> = (0..cpus)
        .map(|cpu| {
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
                // sched_setaffinity (0 = this thread) get valid pointers and size.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                let start = Instant::now();
                let (mut last, mut big, mut n, mut max) =
                    (start, Duration::ZERO, 0u64, Duration::ZERO);
                loop {
                    let now = Instant::now();
                    let gap = now - last;
                    if gap > Duration::from_millis(1) {
                        big += gap;
                        n += 1;
                    }
                    max = max.max(gap);
                    last = now;
                    if now - start >= Duration::from_secs_f64(secs) {
                        break;
                    }
                }
                let el = start.elapsed().as_secs_f64();
                (
                    big.as_secs_f64() / el,
                    n as f64 / el,
                    max.as_secs_f64() * 1e3,
                )
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap_or((f64::NAN, f64::NAN, f64::NAN)))
        .collect()
}

/// Fastest rate of the loopback echo probe (see `echo_probe`).
const ECHO_MAX_RATE: f64 = 5000.0;

/// The machine's own latency floor: a blocking TCP echo on 127.0.0.1 (1 KiB out, 16 bytes
/// back, one in flight) paced at `rate` like the gRPC run, latency from the intended send
/// time. Whatever the gRPC path adds is on top of this. Returns (round trips/s, latency).
fn echo_probe(rate: f64, secs: f64) -> anyhow::Result<(f64, Histogram<u64>)> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut c, _) = listener.accept()?;
        c.set_nodelay(true)?;
        let mut buf = vec![0u8; 1024];
        loop {
            if let Err(e) = c.read_exact(&mut buf) {
                // The client hung up: the probe is over.
                return if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            c.write_all(&buf[..16])?;
        }
    });
    let mut c = std::net::TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let out = vec![b'x'; 1024];
    let mut back = [0u8; 16];
    let mut h = Histogram::<u64>::new(3)?;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    loop {
        let intended = start + Duration::from_secs_f64(n as f64 / rate);
        if intended >= end {
            break;
        }
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        c.write_all(&out)?;
        c.read_exact(&mut back)?;
        let _ = h.record(intended.elapsed().as_micros() as u64);
        n += 1;
    }
    let wall = start.elapsed().as_secs_f64();
    drop(c);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("echo server panicked"))??;
    Ok((n as f64 / wall, h))
}

/// "busy% | µs per request" for a run whose requests carried `batch` messages each.
fn cpu(r: &Result_, batch: usize) -> String {
    let per_req = r.cpu_busy * 2.0 / (r.msgs_per_s / batch as f64) * 1e6;
    format!(
        "{:.0}% | {per_req:.0} | {:.0}%",
        100.0 * r.cpu_busy,
        100.0 * r.stolen
    )
}

fn lat(h: &Histogram<u64>) -> String {
    format!(
        "{:.2} / {:.2} / {:.2} ms",
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3
    )
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    // As `sluice server` does by default (`[server] transparent_huge_pages`): a huge-page
    // fault in this process would be a pause of the generator, counted as send latency.
    // SAFETY: PR_SET_THP_DISABLE takes one integer flag and no pointers.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1 as libc::c_ulong, 0, 0, 0) };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(a.workers)
        .enable_all()
        .build()?
        .block_on(bench(a))
}

async fn bench(a: Args) -> anyhow::Result<()> {
    if let Some(pid) = a.server_pid {
        SERVER_PID.store(pid, Ordering::Relaxed);
    }
    let layout = match (&a.target, &a.serve) {
        (Some(t), _) => format!(
            "load generator ({} workers) driving the server at {t}",
            a.workers
        ),
        (None, Some(_)) => format!("server only ({} workers)", a.workers),
        (None, None) => format!(
            "server and load generator in one process ({} workers)",
            a.workers
        ),
    };
    println!(
        "# gRPC benchmark (1 KiB messages on 127.0.0.1, {layout}, {} s per run)\n",
        a.seconds
    );
    println!(
        "| flush | run | msgs/s | of store rate | latency p50 / p99 / p99.9 | CPU busy (2 cores) | CPU µs per request | CPU stolen |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (fname, flush) in [
        (
            "async",
            FlushPolicy::Async {
                interval: Duration::from_millis(500),
                bytes: 256 << 20,
            },
        ),
        ("sync", FlushPolicy::Sync),
    ] {
        if a.flush.as_deref().is_some_and(|f| f != fname) {
            continue;
        }
        let want = |run: &str| a.only.as_deref().is_none_or(|o| o == run);
        let base_dir = a.dir.join(format!("{fname}-store"));
        let _ = std::fs::remove_dir_all(&base_dir);
        std::fs::create_dir_all(&base_dir)?;
        // With --only (profiling) the baseline is skipped: fractions print as NaN.
        let (base, spread) = if a.only.is_some() || a.serve.is_some() {
            (f64::NAN, String::new())
        } else {
            baseline_median(&base_dir, flush, a.seconds)?
        };
        std::fs::remove_dir_all(&base_dir)?;
        println!(
            "| {fname} | store append, 64 in flight (median of {BASELINE_RUNS}{spread}) | {base:.0} | 100% | | | | |"
        );

        let dir = a.dir.join(format!("{fname}-server"));
        // Against --target the load goes elsewhere: no server of our own.
        let local = match &a.target {
            Some(_) => None,
            None => {
                let bind = a.serve.as_deref().unwrap_or("127.0.0.1:0");
                Some(LocalServer::start(dir, flush, bind).await?)
            }
        };
        if a.serve.is_some()
            && let Some(l) = local
        {
            println!("serving on {} until killed", l.addr);
            l.task.await??;
            return Ok(());
        }
        let addr = match (&a.target, &local) {
            (Some(t), _) => t.parse()?,
            (None, Some(l)) => l.addr,
            (None, None) => unreachable!("a local server runs unless --target"),
        };
        let mut tonic_clients = Vec::new();
        for _ in 0..a.connections {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?;
            tonic_clients.push(MessagingServiceClient::new(ch).max_decoding_message_size(64 << 20));
        }
        let mut clients = Vec::new();
        for c in &tonic_clients {
            clients.push(match a.client.as_str() {
                "h2" | "raw" => {
                    Sender::H2(RawH2::connect(addr, a.sign.clone().map(Arc::new)).await?)
                }
                _ => Sender::Tonic(c.clone()),
            });
        }
        let raw = a.client == "raw";
        let (conns, secs) = (a.connections, a.seconds);
        let unbatched = |inflight: usize, rate: Option<f64>| {
            let clients = clients.clone();
            async move {
                if raw {
                    tokio::task::spawn_blocking(move || raw_load(addr, conns, secs, inflight, rate))
                        .await?
                } else {
                    send_load(&clients, secs, inflight, 1, rate).await
                }
            }
        };
        if want("one") {
            let one = unbatched(1, None).await?;
            println!(
                "| {fname} | send, 1 in flight | {:.0} | {:.0}% | {} | {} |",
                one.msgs_per_s,
                100.0 * one.msgs_per_s / base,
                lat(&one.hist),
                cpu(&one, 1)
            );
        }
        // The saturated run sets the paced run's rate, unless `--rate` gives it and only
        // the paced run was asked for.
        let max_rate = if a.only.as_deref() == Some("paced") && a.rate.is_some() {
            f64::NAN
        } else {
            let many = unbatched(64, None).await?;
            println!(
                "| {fname} | send, 64 in flight | {:.0} | {:.0}% | {} | {} |",
                many.msgs_per_s,
                100.0 * many.msgs_per_s / base,
                lat(&many.hist),
                cpu(&many, 1)
            );
            many.msgs_per_s
        };
        if want("batched") {
            let batched = send_load(&clients, a.seconds, 4, 100, None).await?;
            println!(
                "| {fname} | send, batches of 100, 4 in flight | {:.0} | {:.0}% | {} per batch | {} |",
                batched.msgs_per_s,
                100.0 * batched.msgs_per_s / base,
                lat(&batched.hist),
                cpu(&batched, 100)
            );
        }
        if want("paced") {
            let half = a.rate.unwrap_or(max_rate / 2.0);
            // One blocking round trip at a time keeps up with ≈ 5,000/s here (thread
            // wake-ups on both sides), so the probe runs at most that fast.
            let (secs, echo_rate) = (a.seconds, half.min(ECHO_MAX_RATE));
            let hiccups = tokio::task::spawn_blocking(move || hiccup_probe(secs)).await?;
            let per_cpu: Vec<String> = hiccups
                .iter()
                .map(|(share, rate, max)| {
                    format!("{:.2}% ({rate:.1}/s, max {max:.1} ms)", 100.0 * share)
                })
                .collect();
            println!(
                "| {fname} | baseline: CPU pauses (a pinned thread per CPU reading the clock, idle machine): time in gaps over 1 ms | | | {} | | | |",
                per_cpu.join(" / ")
            );
            let echo = tokio::task::spawn_blocking(move || echo_probe(echo_rate, secs)).await??;
            println!(
                "| {fname} | baseline: TCP echo on loopback (no gRPC), 1 KiB at {echo_rate:.0}/s, 1 in flight | {:.0} | | {} from intended send time | | | |",
                echo.0,
                lat(&echo.1),
            );
            let paced = unbatched(64, Some(half)).await?;
            println!(
                "| {fname} | send at {:.0}/s (half of max), 64 in flight | {:.0} | {:.0}% | {} from intended send time | {} |",
                half,
                paced.msgs_per_s,
                100.0 * paced.msgs_per_s / base,
                lat(&paced.hist),
                cpu(&paced, 1)
            );
        }
        // The backlog count comes from the in-process store, so not against --target.
        if let Some(l) = &local
            && want("receive")
        {
            let backlog = l.store.stats().appended_messages;
            let mut c = tonic_clients[0].clone();
            let rx = receive_all(&mut c, backlog).await?;
            println!(
                "| {fname} | receive + ack, batches of 64, 1 consumer | {rx:.0} | {:.0}% | | | | |",
                100.0 * rx / base
            );
        }
        if let Some(l) = local {
            l.stop().await?;
        }
    }
    Ok(())
}
