//! `sluice-harness soak`: runs real `sluice server` processes on loopback, drives producers
//! and consumers over the RocketMQ 5 gRPC API, injects process faults (SIGKILL, SIGSTOP /
//! SIGCONT pauses, graceful restarts) under load, drains, and checks the recorded history
//! (lost, phantom, inconsistent offsets, redelivery after ack or before the invisible time).
//! Exit status 1 when a safety check fails.

mod abuse;
mod history;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use sluice_proto::prost_types;
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::v2::{self, Code, receive_message_response::Content};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tonic::transport::Channel;

use history::Event;

#[derive(Parser)]
#[command(
    name = "sluice-harness",
    about = "Fault-injection soak tests for sluice"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
    Restart,
    Mixed,
}

#[derive(Subcommand)]
enum Cmd {
    /// Kill/pause/restart the server repeatedly under load, then check the history.
    Soak {
        /// Path of the sluice binary.
        #[arg(long, default_value = "target/debug/sluice")]
        sluice: PathBuf,
        /// Number of fault cycles.
        #[arg(long, default_value_t = 10)]
        cycles: u32,
        /// Seconds of load between faults (randomised ±50%).
        #[arg(long, default_value_t = 2.0)]
        cycle_secs: f64,
        #[arg(long, value_enum, default_value_t = Fault::Mixed)]
        fault: Fault,
        #[arg(long, default_value_t = 4)]
        producers: usize,
        #[arg(long, default_value_t = 2)]
        consumers: usize,
        #[arg(long, default_value_t = 4)]
        queues: u32,
        /// sync or async
        #[arg(long, default_value = "sync")]
        flush: String,
        /// Invisible time of receives, seconds.
        #[arg(long, default_value_t = 4)]
        invisible: u64,
        /// Fraction of first deliveries left unacknowledged on purpose (exercises redelivery).
        #[arg(long, default_value_t = 0.05)]
        skip_ack: f64,
        /// Write the report as JSON here.
        #[arg(long)]
        json_out: Option<PathBuf>,
        /// Keep the data directory afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Bad input against a server: idle and slow connections, garbage, oversized and
    /// malformed requests; the server must keep serving with bounded memory.
    Abuse {
        #[arg(long, default_value = "target/debug/sluice")]
        sluice: PathBuf,
        /// Idle connections to hold open.
        #[arg(long, default_value_t = 10_000)]
        idle: usize,
    },
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A tiny xorshift generator: the harness needs variety, not cryptography.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() % 1_000_000) as f64 / 1_000_000.0
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

struct Server {
    bin: PathBuf,
    data: PathBuf,
    grpc: u16,
    admin: u16,
    flush: String,
    child: Option<tokio::process::Child>,
    log: PathBuf,
}

impl Server {
    async fn start(&mut self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = tokio::process::Command::new(&self.bin)
            .args(["server", "--data-dir"])
            .arg(&self.data)
            .args(["--listen", &format!("127.0.0.1:{}", self.grpc)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin)])
            .args(["--flush", &self.flush])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if ready(self.admin).await {
                return Ok(t.elapsed());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!(
                        "server exited during start: {status} (log: {})",
                        self.log.display()
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("server not ready within 60 s (log: {})", self.log.display())
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await; // SIGKILL
        }
    }

    async fn terminate(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                // SAFETY: sending a signal to our own child process.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            let status = tokio::time::timeout(Duration::from_secs(30), c.wait()).await??;
            if !status.success() {
                bail!("graceful stop exited with {status}");
            }
        }
        Ok(())
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.child.as_ref().and_then(|c| c.id()) {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }

    fn cli(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = std::process::Command::new(&self.bin)
            .args(args)
            .args(["--admin", &format!("http://127.0.0.1:{}", self.admin)])
            .output()?;
        if !out.status.success() {
            bail!(
                "sluice {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

async fn ready(port: u16) -> bool {
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    else {
        return false;
    };
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = vec![0u8; 64];
    matches!(tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await, Ok(Ok(n)) if n >= 12 && &buf[9..12] == b"200")
}

fn req<T>(m: T, client: &str, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    if let Ok(v) = client.parse() {
        r.metadata_mut().insert("x-mq-client-id", v);
    }
    r.set_timeout(timeout);
    r
}

fn res(name: &str) -> Option<v2::Resource> {
    Some(v2::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    })
}

const TOPIC: &str = "soak";
const GROUP: &str = "soak-g";

async fn producer(
    p: usize,
    mut c: MessagingServiceClient<Channel>,
    running: Arc<AtomicBool>,
    hist: Arc<Mutex<Vec<Event>>>,
    sent: Arc<AtomicU64>,
) {
    let client = format!("harness-p{p}@1@1");
    let mut seq = 0u64;
    while running.load(Ordering::Relaxed) {
        let id = format!("P{p:02}S{seq:010}");
        seq += 1;
        let m = v2::Message {
            topic: res(TOPIC),
            user_properties: Default::default(),
            system_properties: Some(v2::SystemProperties {
                message_id: id.clone(),
                message_type: v2::MessageType::Normal as i32,
                queue_id: (seq % 64) as i32,
                ..Default::default()
            }),
            body: format!("body of {id}").into_bytes(),
        };
        let r = c
            .send_message(req(
                v2::SendMessageRequest { messages: vec![m] },
                &client,
                Duration::from_secs(3),
            ))
            .await;
        let ev = match r {
            Ok(resp) => {
                let resp = resp.into_inner();
                match (resp.status.as_ref().map(|s| s.code()), resp.entries.first()) {
                    // SendResultEntry carries the offset but not the queue: queue -1.
                    (Some(Code::Ok), Some(e)) => Event::SendOk {
                        id: id.clone(),
                        queue: -1,
                        offset: e.offset,
                    },
                    (Some(code), _) => Event::SendFail {
                        id: id.clone(),
                        code: code as i32,
                    },
                    (None, _) => Event::SendUnknown { id: id.clone() },
                }
            }
            Err(_) => Event::SendUnknown { id: id.clone() },
        };
        let failed = !matches!(ev, Event::SendOk { .. });
        sent.fetch_add(1, Ordering::Relaxed);
        hist.lock().await.push(ev);
        if failed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn consumer(
    n: usize,
    mut c: MessagingServiceClient<Channel>,
    running: Arc<AtomicBool>,
    hist: Arc<Mutex<Vec<Event>>>,
    invisible: u64,
    skip_ack: f64,
    last_delivery: Arc<AtomicU64>,
    seed: u64,
) {
    let client = format!("harness-c{n}@1@1");
    let mut rng = Rng(seed | 1);
    while running.load(Ordering::Relaxed) {
        let r = v2::ReceiveMessageRequest {
            group: res(GROUP),
            message_queue: Some(v2::MessageQueue {
                topic: res(TOPIC),
                id: -1,
                ..Default::default()
            }),
            filter_expression: None,
            batch_size: 16,
            invisible_duration: Some(prost_types::Duration {
                seconds: invisible as i64,
                nanos: 0,
            }),
            auto_renew: false,
            long_polling_timeout: Some(prost_types::Duration {
                seconds: 2,
                nanos: 0,
            }),
            attempt_id: None,
        };
        let stream = c
            .receive_message(req(r, &client, Duration::from_secs(4)))
            .await;
        let Ok(stream) = stream else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = stream.into_inner();
        let mut acks = Vec::new();
        while let Ok(Some(f)) = stream.message().await {
            if let Some(Content::Message(m)) = f.content {
                let sp = m.system_properties.unwrap_or_default();
                let at = now_ms();
                last_delivery.store(at as u64, Ordering::Relaxed);
                let mut h = hist.lock().await;
                h.push(Event::Delivered {
                    id: sp.message_id.clone(),
                    queue: sp.queue_id,
                    offset: sp.queue_offset.unwrap_or(-1),
                    attempt: sp.delivery_attempt.unwrap_or(0),
                    at_ms: at,
                });
                if sp.delivery_attempt == Some(1) && rng.unit() < skip_ack {
                    h.push(Event::Skipped {
                        id: sp.message_id.clone(),
                    });
                } else {
                    acks.push(v2::AckMessageEntry {
                        message_id: sp.message_id,
                        receipt_handle: sp.receipt_handle.unwrap_or_default(),
                        lite_topic: None,
                    });
                }
            }
        }
        if acks.is_empty() {
            continue;
        }
        let ids: Vec<String> = acks.iter().map(|a| a.message_id.clone()).collect();
        let r = c
            .ack_message(req(
                v2::AckMessageRequest {
                    group: res(GROUP),
                    topic: res(TOPIC),
                    entries: acks,
                },
                &client,
                Duration::from_secs(3),
            ))
            .await;
        let at = now_ms();
        let mut h = hist.lock().await;
        match r {
            Ok(resp) => {
                for e in resp.into_inner().entries {
                    if e.status.as_ref().is_some_and(|s| s.code() == Code::Ok) {
                        h.push(Event::AckOk {
                            id: e.message_id,
                            at_ms: at,
                        });
                    } else {
                        h.push(Event::AckFail { id: e.message_id });
                    }
                }
            }
            Err(_) => {
                for id in ids {
                    h.push(Event::AckFail { id });
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn soak(
    sluice: PathBuf,
    cycles: u32,
    cycle_secs: f64,
    fault: Fault,
    producers: usize,
    consumers: usize,
    queues: u32,
    flush: String,
    invisible: u64,
    skip_ack: f64,
    json_out: Option<PathBuf>,
    keep: bool,
) -> anyhow::Result<bool> {
    let work =
        std::env::temp_dir().join(format!("sluice-soak-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&work)?;
    let mut server = Server {
        bin: sluice
            .canonicalize()
            .with_context(|| format!("no sluice binary at {}", sluice.display()))?,
        data: work.join("data"),
        grpc: free_port()?,
        admin: free_port()?,
        flush: flush.clone(),
        child: None,
        log: work.join("server.log"),
    };
    println!(
        "soak: {} cycles of {fault:?}, {producers} producers, {consumers} consumers, {queues} queues, flush {flush}, work dir {}",
        cycles,
        work.display()
    );
    server.start().await?;
    server.cli(&[
        "topic",
        "create",
        TOPIC,
        "--type",
        "normal",
        "--queues",
        &queues.to_string(),
    ])?;
    server.cli(&[
        "group",
        "create",
        GROUP,
        "--max-attempts",
        "1000",
        "--start",
        "earliest",
    ])?;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", server.grpc))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy();
    let hist: Arc<Mutex<Vec<Event>>> = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let consuming = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicU64::new(0));
    let last_delivery = Arc::new(AtomicU64::new(now_ms() as u64));
    let mut tasks = Vec::new();
    for p in 0..producers {
        tasks.push(tokio::spawn(producer(
            p,
            MessagingServiceClient::new(ch.clone()),
            running.clone(),
            hist.clone(),
            sent.clone(),
        )));
    }
    let mut ctasks = Vec::new();
    for n in 0..consumers {
        ctasks.push(tokio::spawn(consumer(
            n,
            MessagingServiceClient::new(ch.clone()),
            consuming.clone(),
            hist.clone(),
            invisible,
            skip_ack,
            last_delivery.clone(),
            0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1),
        )));
    }
    let mut rng = Rng(now_ms() as u64 | 1);
    let mut recoveries = Vec::new();
    let mut faults_done = Vec::new();
    for cycle in 0..cycles {
        let wait = cycle_secs * (0.5 + rng.unit());
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        let kind = match fault {
            Fault::Mixed => match rng.next() % 4 {
                0 | 1 => Fault::Kill,
                2 => Fault::Pause,
                _ => Fault::Restart,
            },
            f => f,
        };
        match kind {
            Fault::Kill | Fault::Mixed => {
                server.kill().await;
                recoveries.push(server.start().await?);
            }
            Fault::Restart => {
                server.terminate().await?;
                recoveries.push(server.start().await?);
            }
            Fault::Pause => {
                server.signal(libc::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(500 + rng.next() % 1500)).await;
                server.signal(libc::SIGCONT);
            }
        }
        faults_done.push(format!("{kind:?}"));
        println!(
            "cycle {}/{cycles}: {kind:?} after {wait:.1} s; sent so far {}",
            cycle + 1,
            sent.load(Ordering::Relaxed)
        );
    }
    running.store(false, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    // Drain: stop when nothing was delivered for longer than an invisible time (so skipped
    // acks had their chance to come back) plus a margin.
    let quiet = Duration::from_millis(invisible * 1000 * 2 + 3000);
    let drain_start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let since = now_ms() as u64 - last_delivery.load(Ordering::Relaxed);
        if since > quiet.as_millis() as u64 || drain_start.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    consuming.store(false, Ordering::Relaxed);
    for t in ctasks {
        let _ = t.await;
    }
    server.terminate().await.context("final graceful stop")?;
    let events = hist.lock().await.clone();
    let report = history::check(
        &events,
        Duration::from_secs(invisible),
        Duration::from_millis(250),
    );
    recoveries.sort();
    let ms = |d: &Duration| d.as_millis();
    println!("faults: {}", faults_done.join(", "));
    println!(
        "recovery (restart to ready): median {} ms, max {} ms over {} restarts",
        recoveries.get(recoveries.len() / 2).map(ms).unwrap_or(0),
        recoveries.last().map(ms).unwrap_or(0),
        recoveries.len()
    );
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!(
        "totals: sent={} acked={} failed={} unknown={} received={} lost={} phantom={} inconsistent={} redelivered_after_ack={} early={} duplicated={}",
        report.sent,
        report.send_ok,
        report.send_failed,
        report.send_unknown,
        report.received_unique,
        report.lost,
        report.phantom,
        report.inconsistent_offsets,
        report.redelivered_after_ack,
        report.redelivered_early,
        report.duplicates
    );
    if let Some(p) = json_out {
        std::fs::write(&p, serde_json::to_vec_pretty(&report)?)?;
    }
    let ok = report.violations() == 0 || flush != "sync";
    if ok && !keep {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("work dir kept: {}", work.display());
    }
    Ok(ok)
}

async fn abuse_main(sluice: PathBuf, idle: usize) -> anyhow::Result<bool> {
    let work =
        std::env::temp_dir().join(format!("sluice-abuse-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&work)?;
    let mut server = Server {
        bin: sluice
            .canonicalize()
            .with_context(|| format!("no sluice binary at {}", sluice.display()))?,
        data: work.join("data"),
        grpc: free_port()?,
        admin: free_port()?,
        flush: "sync".into(),
        child: None,
        log: work.join("server.log"),
    };
    server.start().await?;
    server.cli(&[
        "topic", "create", TOPIC, "--type", "normal", "--queues", "2",
    ])?;
    let pid = server.child.as_ref().and_then(|c| c.id()).unwrap_or(0);
    let outcome = abuse::run(server.grpc, pid, idle).await?;
    let alive = server
        .child
        .as_mut()
        .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
    let stopped = server.terminate().await;
    let mut ok = outcome.checks.iter().all(|(_, ok, _)| *ok) && alive;
    if let Err(e) = stopped {
        println!("FAIL graceful stop: {e}");
        ok = false;
    } else {
        println!("ok   graceful stop: exit 0");
    }
    if ok {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("work dir kept: {}", work.display());
    }
    Ok(ok)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let ok = match cli.cmd {
        Cmd::Abuse { sluice, idle } => rt.block_on(abuse_main(sluice, idle))?,
        Cmd::Soak {
            sluice,
            cycles,
            cycle_secs,
            fault,
            producers,
            consumers,
            queues,
            flush,
            invisible,
            skip_ack,
            json_out,
            keep,
        } => rt.block_on(soak(
            sluice, cycles, cycle_secs, fault, producers, consumers, queues, flush, invisible,
            skip_ack, json_out, keep,
        ))?,
    };
    if ok {
        println!("1 passed, 0 failed");
        Ok(())
    } else {
        println!("0 passed, 1 failed");
        std::process::exit(1);
    }
}
