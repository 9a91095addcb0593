//! `sluice-harness soak`: runs real `sluice server` processes on loopback, drives producers
//! and consumers (the Rust SDK) through a TCP fault proxy, injects process faults (SIGKILL,
//! SIGSTOP / SIGCONT pauses, graceful restarts) and network faults (latency, blackhole,
//! reset, lost answers) under load, drains, and checks the recorded history (lost, phantom,
//! inconsistent offsets, redelivery after ack or before the invisible time, FIFO order,
//! delay times, transaction outcomes). Exit status 1 when a safety check fails.

mod abuse;
mod faultproxy;
mod history;
mod soak;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
#[command(
    name = "sluice-harness",
    about = "Fault-injection soak tests for sluice"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Faults of the soak. `process` draws from kill, pause and restart; `net` from latency,
/// drop, reset and drop-response; `mixed` from all seven, each once per round.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Fault {
    Kill,
    Pause,
    Restart,
    Latency,
    Drop,
    Reset,
    DropResponse,
    Process,
    Net,
    Mixed,
}

#[derive(Subcommand)]
enum Cmd {
    /// Kill/pause/restart the server and break the network repeatedly under load, then
    /// check the history.
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
        /// FIFO message groups, one sequential producer each (0: no FIFO traffic).
        #[arg(long, default_value_t = 4)]
        fifo_groups: usize,
        /// Producers of delay messages (0: none).
        #[arg(long, default_value_t = 1)]
        delay_producers: usize,
        /// Transactional producers (0: none).
        #[arg(long, default_value_t = 1)]
        tx_producers: usize,
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
    /// Extra environment of the server process (configuration overrides).
    env: Vec<(String, String)>,
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
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
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

pub const TOPIC: &str = "soak";

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
        env: Vec::new(),
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
            fifo_groups,
            delay_producers,
            tx_producers,
            json_out,
            keep,
        } => rt.block_on(soak::soak(soak::SoakArgs {
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
            fifo_groups,
            delay_producers,
            tx_producers,
            json_out,
            keep,
        }))?,
    };
    if ok {
        println!("1 passed, 0 failed");
        Ok(())
    } else {
        println!("0 passed, 1 failed");
        std::process::exit(1);
    }
}
