//! `sluice bench`: an OpenMessaging-Benchmark-style load generator for any RocketMQ 5 gRPC
//! endpoint, built on `sluice-client`.
//!
//! Method (after OMB and wrk2):
//! * Each producer sends on a fixed schedule: message batch `k` is *intended* at
//!   `start + k / rate`. Sends run concurrently (up to `--max-outstanding` per producer),
//!   so a slow response does not delay the next intended send; when the limit is reached,
//!   sending falls behind the schedule and the lag shows up as latency.
//! * **Publish latency** = acknowledgement time − intended send time;
//!   **publish delay** = actual send time − intended send time;
//!   **end-to-end latency** = receive time − intended send time, carried in the user
//!   property `sluice-bench-ts` (µs since the epoch). Measuring from the intended time is
//!   what keeps coordinated omission out of the figures.
//! * Latencies go into HdrHistograms (µs, 3 significant digits); the totals are reset after
//!   the warm-up.
//! * `--rate max` (or 0) probes the maximum sustainable rate: it starts at 10,000 msg/s and
//!   every 3 s raises the rate (by a factor that doubles while things go well, at most
//!   +100 % per step before the first back-off and +10 % after it) or lowers it to 95 % of
//!   what was actually achieved (halving the factor) when sends fail, the producers fall
//!   behind their schedule, or the consumers' backlog grows. When the rate changes, the
//!   schedule restarts at the current time (the probe forgives the old schedule's debt).
//!   The probe runs through warm-up and measurement, as in OMB.
//! * Messages carry a per-run id (`sluice-bench-run`); consumers acknowledge but do not
//!   count messages of other runs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use sluice_client::{
    ClientConfig, ConsumeResult, FilterExpression, Message, Producer, PushConsumer,
    ReceivedMessage, SimpleConsumer,
};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// User property with the intended send time, µs since the Unix epoch.
pub const TS_PROPERTY: &str = "sluice-bench-ts";
/// User property with the run id.
pub const RUN_PROPERTY: &str = "sluice-bench-run";
/// Rate the max-rate probe starts at (as OMB does).
const PROBE_START_RATE: f64 = 10_000.0;
const PROBE_PERIOD: Duration = Duration::from_secs(3);
/// Highest latency recorded (1 h in µs); larger values are clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Target publish rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// Messages per second, all producers together.
    Fixed(f64),
    /// Probe the maximum sustainable rate.
    Max,
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    let (num, mult) = match s.strip_suffix(['k', 'K']) {
        Some(n) => (n, 1_000.0),
        None => (s, 1.0),
    };
    match num.trim().parse::<f64>() {
        Ok(0.0) => Ok(Rate::Max),
        Ok(r) if r.is_finite() && r > 0.0 => Ok(Rate::Fixed(r * mult)),
        _ => Err(format!(
            "{s:?} is not a rate (messages per second, e.g. 10000 or 10k; 0 or max to probe)"
        )),
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let n = sluice_common::parse_bytes(s).map_err(|e| e.to_string())?;
    usize::try_from(n)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{s:?}: the size must be at least 1 byte"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    sluice_common::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConsumerMode {
    /// SimpleConsumer long-poll loops (receive, then acknowledge the batch).
    Simple,
    /// PushConsumer with a listener.
    Push,
}

/// Options of `sluice bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Topics to spread the load over (named PREFIX-0 … PREFIX-N-1).
    #[arg(long, default_value_t = 1)]
    pub topics: u32,
    /// Queues per topic, used with --create.
    #[arg(long, default_value_t = 1)]
    pub queues: u32,
    /// Producers per topic (each with its own connection).
    #[arg(long, default_value_t = 1)]
    pub producers: u32,
    /// Consumers per topic (each with its own connection); 0 publishes only.
    #[arg(long, default_value_t = 1)]
    pub consumers: u32,
    /// How consumers consume.
    #[arg(long, value_enum, default_value = "simple")]
    pub consumer_mode: ConsumerMode,
    /// Message body size (e.g. 1KiB).
    #[arg(long, default_value = "1KiB", value_parser = parse_size)]
    pub size: usize,
    /// Messages per send request.
    #[arg(long, default_value_t = 1)]
    pub batch: u32,
    /// Messages per second, all producers together; 0 or `max` probes the maximum
    /// sustainable rate.
    #[arg(long, default_value = "10000", value_parser = parse_rate)]
    pub rate: Rate,
    /// Measured time, after the warm-up.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Warm-up time, not counted in the totals.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Create the topics (normal, --queues each) and the group through the admin API
    /// (global --admin) first; existing ones are reused and the group is moved to now.
    #[arg(long)]
    pub create: bool,
    /// Topic name prefix.
    #[arg(long, default_value = "sluice-bench")]
    pub topic_prefix: String,
    /// Consumer group [default: PREFIX-group].
    #[arg(long)]
    pub group: Option<String>,
    /// Send requests a producer may have in flight.
    #[arg(long, default_value_t = 256)]
    pub max_outstanding: usize,
    /// Messages a consumer asks for per receive.
    #[arg(long, default_value_t = 32)]
    pub receive_batch: u32,
    /// Free text stored in the JSON result (e.g. the server's flush policy and hardware).
    #[arg(long, value_name = "TEXT")]
    pub flush_note: Option<String>,
    /// Write the result as JSON (OMB TestResult-like fields) to this file.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
}

// ------------------------------------------------------------------------------ stats

struct Pair {
    total: Histogram<u64>,
    period: Histogram<u64>,
}

impl Pair {
    fn new() -> Result<Pair> {
        Ok(Pair {
            total: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
            period: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
        })
    }

    fn record(&mut self, us: u64, n: u64) {
        let v = us.clamp(1, MAX_LATENCY_US);
        let _ = self.total.record_n(v, n);
        let _ = self.period.record_n(v, n);
    }
}

struct Hists {
    publish: Pair,
    delay: Pair,
    e2e: Pair,
}

/// State shared by producers, consumers and the reporter.
struct Shared {
    start: Instant,
    start_wall_us: u64,
    run_id: String,
    /// Target rate (msg/s, all producers) as f64 bits.
    rate_bits: AtomicU64,
    /// Bumped whenever the probe changes the rate.
    rate_epoch: AtomicU64,
    sent: AtomicU64,
    errors: AtomicU64,
    received: AtomicU64,
    hists: Mutex<Hists>,
    last_error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn wall_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl Shared {
    fn rate(&self) -> f64 {
        f64::from_bits(self.rate_bits.load(Ordering::Relaxed))
    }

    fn set_rate(&self, r: f64) {
        self.rate_bits.store(r.to_bits(), Ordering::Relaxed);
        self.rate_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Wall-clock µs of a monotonic instant of this run.
    fn instant_wall_us(&self, t: Instant) -> u64 {
        self.start_wall_us + t.saturating_duration_since(self.start).as_micros() as u64
    }

    fn on_received(&self, m: &ReceivedMessage, now_us: u64) -> bool {
        if m.properties.get(RUN_PROPERTY) != Some(&self.run_id) {
            return false;
        }
        if let Some(ts) = m
            .properties
            .get(TS_PROPERTY)
            .and_then(|v| v.parse::<u64>().ok())
        {
            lock(&self.hists).e2e.record(now_us.saturating_sub(ts), 1);
        }
        true
    }
}

// ----------------------------------------------------------------------- producers

async fn produce(
    shared: Arc<Shared>,
    producer: Arc<Producer>,
    topic: String,
    share: f64,
    args: Arc<BenchArgs>,
    mut stop: watch::Receiver<bool>,
) {
    let batch = args.batch.max(1) as usize;
    let permits = Arc::new(Semaphore::new(args.max_outstanding.max(1)));
    let payload: Arc<Vec<u8>> = Arc::new(
        (0..args.size)
            .map(|i| b'a' + (sluice_client::ids::random_u64().wrapping_add(i as u64) % 26) as u8)
            .collect(),
    );
    let mut next = Instant::now();
    let mut epoch = shared.rate_epoch.load(Ordering::Relaxed);
    loop {
        if *stop.borrow() {
            break;
        }
        let e = shared.rate_epoch.load(Ordering::Relaxed);
        if e != epoch {
            epoch = e;
            next = next.max(Instant::now());
        }
        let rate = (shared.rate() * share).max(0.001);
        let now = Instant::now();
        if next > now {
            // Wake at the next intended send (tokio timers have 1 ms resolution, so at
            // high rates several sends are due per wake-up; each keeps its own time).
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = stop.changed() => break,
            }
            continue;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.changed() => break,
        };
        let intended = next;
        next += Duration::from_secs_f64(batch as f64 / rate);
        let (shared, producer, topic, payload) = (
            shared.clone(),
            producer.clone(),
            topic.clone(),
            payload.clone(),
        );
        tokio::spawn(async move {
            let ts = shared.instant_wall_us(intended).to_string();
            let mut messages: Vec<Message> = (0..batch)
                .map(|_| {
                    Message::new(topic.as_str(), payload.as_slice())
                        .with_property(TS_PROPERTY, ts.as_str())
                        .with_property(RUN_PROPERTY, shared.run_id.as_str())
                })
                .collect();
            let sent_at = Instant::now();
            let result = if batch == 1 {
                match messages.pop() {
                    Some(m) => producer.send(m).await.map(|_| ()),
                    None => Ok(()),
                }
            } else {
                producer.send_batch(messages).await.map(|_| ())
            };
            let done = Instant::now();
            let n = batch as u64;
            match result {
                Ok(()) => {
                    {
                        let mut h = lock(&shared.hists);
                        h.delay
                            .record(sent_at.duration_since(intended).as_micros() as u64, n);
                        h.publish
                            .record(done.duration_since(intended).as_micros() as u64, n);
                    }
                    shared.sent.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    shared.errors.fetch_add(n, Ordering::Relaxed);
                    *lock(&shared.last_error) = Some(e.to_string());
                }
            }
            drop(permit);
        });
    }
    // Let the sends in flight finish.
    let all = args.max_outstanding.max(1).min(u32::MAX as usize) as u32;
    let _ = tokio::time::timeout(Duration::from_secs(30), permits.acquire_many(all)).await;
}

// ----------------------------------------------------------------------- consumers

async fn consume_simple(
    shared: Arc<Shared>,
    consumer: Arc<SimpleConsumer>,
    receive_batch: u32,
    mut stop: watch::Receiver<bool>,
) {
    let acks = Arc::new(Semaphore::new(8));
    loop {
        if *stop.borrow() {
            break;
        }
        let r = tokio::select! {
            r = consumer.receive(receive_batch, Duration::from_secs(30)) => r,
            _ = stop.changed() => break,
        };
        match r {
            Ok(messages) if messages.is_empty() => {}
            Ok(messages) => {
                let now = wall_us(SystemTime::now());
                let counted = messages
                    .iter()
                    .filter(|m| shared.on_received(m, now))
                    .count();
                shared.received.fetch_add(counted as u64, Ordering::Relaxed);
                let Ok(permit) = acks.clone().acquire_owned().await else {
                    break;
                };
                let c = consumer.clone();
                tokio::spawn(async move {
                    if let Err(e) = c.ack_batch(&messages).await {
                        tracing::debug!(error = %e, "ack failed");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "receive failed");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), acks.acquire_many(8)).await;
}

// -------------------------------------------------------------------- admin set-up

async fn admin_setup(
    admin: &str,
    token: Option<&str>,
    topics: &[String],
    group: &str,
    queues: u32,
) -> Result<()> {
    use sluice_admin::api::{CreateGroup, CreateTopic, MessageType, ResetOffset, Start};
    let http = crate::admin::http_client(Duration::from_secs(30), token)?;
    let base = admin.trim_end_matches('/');
    let post = |path: String, body: Value| {
        let req = http.post(format!("{base}{path}")).json(&body);
        async move {
            let resp = req
                .send()
                .await
                .with_context(|| format!("admin API at {base} (POST {path})"))?;
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            Ok::<_, anyhow::Error>((status, text))
        }
    };
    for t in topics {
        let body = serde_json::to_value(CreateTopic {
            name: t.clone(),
            message_type: MessageType::Normal,
            queues,
        })?;
        let (status, text) = post("/api/v1/topics".into(), body).await?;
        match status.as_u16() {
            200..=299 => eprintln!("created topic {t} ({queues} queues)"),
            409 => eprintln!("topic {t} exists; reusing it"),
            _ => bail!("creating topic {t}: HTTP {status}: {text}"),
        }
    }
    let body = serde_json::to_value(CreateGroup {
        name: group.to_owned(),
        fifo: false,
        max_attempts: None,
        backoff: None,
        start: Some(Start::Earliest),
    })?;
    let (status, text) = post("/api/v1/groups".into(), body).await?;
    match status.as_u16() {
        200..=299 => eprintln!("created group {group}"),
        409 => {
            // Skip whatever an earlier run left behind.
            let now = wall_us(SystemTime::now()) / 1000;
            for t in topics {
                let body = serde_json::to_value(ResetOffset {
                    topic: t.clone(),
                    timestamp_ms: now as i64,
                })?;
                let (status, text) =
                    post(format!("/api/v1/groups/{group}/reset-offset"), body).await?;
                if !status.is_success() {
                    bail!("resetting group {group} on {t}: HTTP {status}: {text}");
                }
            }
            eprintln!("group {group} exists; moved it to the end of the topics");
        }
        _ => bail!("creating group {group}: HTTP {status}: {text}"),
    }
    Ok(())
}

// -------------------------------------------------------------------------- report

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn quantiles(prefix: &str, h: &Histogram<u64>) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    let q = |p: f64| {
        if h.is_empty() {
            0.0
        } else {
            ms(h.value_at_quantile(p))
        }
    };
    m.insert(
        format!("{prefix}Avg"),
        json!(if h.is_empty() { 0.0 } else { h.mean() / 1000.0 }),
    );
    m.insert(format!("{prefix}50pct"), json!(q(0.5)));
    m.insert(format!("{prefix}75pct"), json!(q(0.75)));
    m.insert(format!("{prefix}95pct"), json!(q(0.95)));
    m.insert(format!("{prefix}99pct"), json!(q(0.99)));
    m.insert(format!("{prefix}999pct"), json!(q(0.999)));
    m.insert(format!("{prefix}9999pct"), json!(q(0.9999)));
    m.insert(
        format!("{prefix}Max"),
        json!(if h.is_empty() { 0.0 } else { ms(h.max()) }),
    );
    m
}

fn line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "avg {:.2}  p50 {:.2}  p75 {:.2}  p95 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms",
        h.mean() / 1000.0,
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.75)),
        ms(h.value_at_quantile(0.95)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max())
    )
}

#[derive(Default)]
struct Series {
    publish_rate: Vec<f64>,
    publish_error_rate: Vec<f64>,
    consume_rate: Vec<f64>,
    backlog: Vec<i64>,
    publish_p50: Vec<f64>,
    publish_p99: Vec<f64>,
    delay_p99: Vec<f64>,
    e2e_p50: Vec<f64>,
    e2e_p99: Vec<f64>,
    target_rate: Vec<f64>,
}

/// Max-rate probe: adjusts the target from what the last period achieved.
struct Probe {
    ramp: f64,
    /// Largest ramp: 100 % per period until the first back-off, then 10 %, so the probe
    /// finds the region fast and then creeps up instead of overshooting again.
    max_ramp: f64,
    last_at: Instant,
    last_sent: u64,
    last_received: u64,
    last_errors: u64,
}

impl Probe {
    fn step(&mut self, shared: &Shared, consumers: bool) -> Option<String> {
        let now = Instant::now();
        let dt = now.duration_since(self.last_at).as_secs_f64();
        if dt <= 0.0 {
            return None;
        }
        let sent = shared.sent.load(Ordering::Relaxed);
        let received = shared.received.load(Ordering::Relaxed);
        let errors = shared.errors.load(Ordering::Relaxed);
        let rate = shared.rate();
        let expected = rate * dt;
        let published = (sent - self.last_sent) as f64;
        let consumed = (received - self.last_received) as f64;
        let failed = errors - self.last_errors;
        let backlog = sent.saturating_sub(received) as f64;
        let backlog_limit = (rate * 0.5).max(1_000.0);
        (
            self.last_at,
            self.last_sent,
            self.last_received,
            self.last_errors,
        ) = (now, sent, received, errors);
        let (next, why) = if failed > 0 {
            (published / dt, "publish errors")
        } else if published < expected * 0.9 {
            (published / dt, "producers behind schedule")
        } else if consumers && backlog > backlog_limit && consumed < published {
            (consumed / dt, "consumer backlog")
        } else {
            self.ramp = (self.ramp * 2.0).min(self.max_ramp);
            shared.set_rate(rate * (1.0 + self.ramp));
            return None;
        };
        self.max_ramp = 0.1;
        self.ramp = (self.ramp / 2.0).clamp(0.01, self.max_ramp);
        let next = (next * 0.95).max(100.0);
        shared.set_rate(next);
        Some(format!("rate {rate:.0} → {next:.0} msg/s ({why})"))
    }
}

/// Runs the benchmark. `admin` is the admin API URL for --create; `json` prints the result
/// JSON on stdout instead of the summary.
pub async fn run(
    config: ClientConfig,
    admin: &str,
    admin_token: Option<&str>,
    json_stdout: bool,
    args: BenchArgs,
) -> Result<()> {
    let endpoint = config.endpoints.clone();
    if args.topics == 0 || args.producers == 0 {
        bail!("--topics and --producers must be at least 1");
    }
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    let args = Arc::new(args);
    let topics: Vec<String> = (0..args.topics)
        .map(|i| format!("{}-{i}", args.topic_prefix))
        .collect();
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| format!("{}-group", args.topic_prefix));
    if args.create {
        admin_setup(admin, admin_token, &topics, &group, args.queues).await?;
    }

    let start_rate = match args.rate {
        Rate::Fixed(r) => r,
        Rate::Max => PROBE_START_RATE,
    };
    let shared = Arc::new(Shared {
        start: Instant::now(),
        start_wall_us: wall_us(SystemTime::now()),
        run_id: format!("{:016x}", sluice_client::ids::random_u64()),
        rate_bits: AtomicU64::new(start_rate.to_bits()),
        rate_epoch: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        received: AtomicU64::new(0),
        hists: Mutex::new(Hists {
            publish: Pair::new()?,
            delay: Pair::new()?,
            e2e: Pair::new()?,
        }),
        last_error: Mutex::new(None),
    });

    // Consumers first, so they are polling when the first message arrives.
    let (stop_consuming, consume_rx) = watch::channel(false);
    let mut consumers = JoinSet::new();
    let mut push_consumers = Vec::new();
    let mut simple_consumers = Vec::new();
    for t in &topics {
        for _ in 0..args.consumers {
            match args.consumer_mode {
                ConsumerMode::Simple => {
                    let c = SimpleConsumer::builder(config.clone(), group.as_str())
                        .subscribe(t.as_str(), FilterExpression::all())
                        .await_duration(Duration::from_secs(5))
                        .start()
                        .await
                        .with_context(|| format!("starting a consumer of {t} in group {group}"))?;
                    let c = Arc::new(c);
                    simple_consumers.push(c.clone());
                    consumers.spawn(consume_simple(
                        shared.clone(),
                        c,
                        args.receive_batch,
                        consume_rx.clone(),
                    ));
                }
                ConsumerMode::Push => {
                    let s = shared.clone();
                    let c = PushConsumer::builder(config.clone(), group.as_str())
                        .subscribe(t.as_str(), FilterExpression::all())
                        .consumption_concurrency(64)
                        .listener(move |m| {
                            if s.on_received(m, wall_us(SystemTime::now())) {
                                s.received.fetch_add(1, Ordering::Relaxed);
                            }
                            ConsumeResult::Success
                        })
                        .start()
                        .await
                        .with_context(|| format!("starting a consumer of {t} in group {group}"))?;
                    push_consumers.push(c);
                }
            }
        }
    }

    let (stop_producing, produce_rx) = watch::channel(false);
    let mut producers = JoinSet::new();
    let mut producer_clients = Vec::new();
    let n_producers = (args.topics * args.producers) as f64;
    for t in &topics {
        for _ in 0..args.producers {
            let p = Producer::builder(config.clone())
                .topics([t.as_str()])
                .start()
                .await
                .with_context(|| format!("starting a producer of {t} (create it with --create)"))?;
            let p = Arc::new(p);
            producer_clients.push(p.clone());
            producers.spawn(produce(
                shared.clone(),
                p,
                t.clone(),
                1.0 / n_producers,
                args.clone(),
                produce_rx.clone(),
            ));
        }
    }

    // ----- live report and probe
    let total = args.warmup + args.duration;
    let pb = ProgressBar::with_draw_target(Some(total.as_secs()), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template("{prefix:>7} {bar:20} {pos:>4}/{len}s  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(if args.warmup.is_zero() {
        "measure"
    } else {
        "warm-up"
    });
    let consumers_on = args.consumers > 0;
    let mut probe = Probe {
        ramp: 0.5,
        max_ramp: 1.0,
        last_at: Instant::now(),
        last_sent: 0,
        last_received: 0,
        last_errors: 0,
    };
    let mut series = Series::default();
    let mut measuring = args.warmup.is_zero();
    let mut base = (0u64, 0u64, 0u64);
    let mut measure_start = Instant::now();
    let mut last = (Instant::now(), 0u64, 0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let started = Instant::now();
    let mut last_print = Instant::now();
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => {
                interrupted = true;
                break;
            }
        }
        let now = Instant::now();
        let dt = now.duration_since(last.0).as_secs_f64().max(1e-6);
        let sent = shared.sent.load(Ordering::Relaxed);
        let errors = shared.errors.load(Ordering::Relaxed);
        let received = shared.received.load(Ordering::Relaxed);
        let pub_rate = (sent - last.1) as f64 / dt;
        let err_rate = (errors - last.2) as f64 / dt;
        let cons_rate = (received - last.3) as f64 / dt;
        last = (now, sent, errors, received);
        let backlog = sent as i64 - received as i64;
        let (p50, p99, d99, e50, e99) = {
            let mut h = lock(&shared.hists);
            let q = |h: &Histogram<u64>, p: f64| {
                if h.is_empty() {
                    0.0
                } else {
                    ms(h.value_at_quantile(p))
                }
            };
            let r = (
                q(&h.publish.period, 0.5),
                q(&h.publish.period, 0.99),
                q(&h.delay.period, 0.99),
                q(&h.e2e.period, 0.5),
                q(&h.e2e.period, 0.99),
            );
            h.publish.period.reset();
            h.delay.period.reset();
            h.e2e.period.reset();
            r
        };
        let elapsed = now.duration_since(started);
        if !measuring && elapsed >= args.warmup {
            measuring = true;
            let mut h = lock(&shared.hists);
            h.publish.total.reset();
            h.delay.total.reset();
            h.e2e.total.reset();
            base = (sent, errors, received);
            measure_start = now;
            pb.set_prefix("measure");
        } else if measuring {
            series.publish_rate.push(pub_rate);
            series.publish_error_rate.push(err_rate);
            series.consume_rate.push(cons_rate);
            series.backlog.push(backlog);
            series.publish_p50.push(p50);
            series.publish_p99.push(p99);
            series.delay_p99.push(d99);
            series.e2e_p50.push(e50);
            series.e2e_p99.push(e99);
            series.target_rate.push(shared.rate());
        }
        let target = match args.rate {
            Rate::Max => format!("  target {:.0}/s", shared.rate()),
            Rate::Fixed(_) => String::new(),
        };
        let msg = format!(
            "pub {pub_rate:>8.0}/s  cons {cons_rate:>8.0}/s  backlog {backlog:>7}  pub p99 {p99:>7.2} ms  e2e p99 {e99:>7.2} ms  err {err_rate:.0}/s{target}"
        );
        pb.set_position(elapsed.as_secs().min(total.as_secs()));
        pb.set_message(msg.clone());
        if pb.is_hidden() && now.duration_since(last_print) >= Duration::from_secs(5) {
            eprintln!("[{:>4}s] {msg}", elapsed.as_secs());
            last_print = now;
        }
        if args.rate == Rate::Max && now.duration_since(probe.last_at) >= PROBE_PERIOD {
            if let Some(change) = probe.step(&shared, consumers_on) {
                pb.println(change);
            }
        }
        if elapsed >= total {
            break;
        }
    }
    let measure_end = Instant::now();
    let (sent_end, errors_end, received_end) = (
        shared.sent.load(Ordering::Relaxed),
        shared.errors.load(Ordering::Relaxed),
        shared.received.load(Ordering::Relaxed),
    );
    pb.finish_and_clear();

    // ----- stop: producers first, then let consumers drain for a while
    let _ = stop_producing.send(true);
    while producers.join_next().await.is_some() {}
    if consumers_on {
        let drain_until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < drain_until
            && shared.received.load(Ordering::Relaxed) < shared.sent.load(Ordering::Relaxed)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _ = stop_consuming.send(true);
    while consumers.join_next().await.is_some() {}
    for c in &push_consumers {
        let _ = c.shutdown().await;
    }
    for c in &simple_consumers {
        let _ = c.shutdown().await;
    }
    for p in &producer_clients {
        let _ = p.shutdown().await;
    }

    // ----- results
    let secs = measure_end
        .duration_since(measure_start)
        .as_secs_f64()
        .max(1e-6);
    let (published, failed, consumed) = if measuring {
        (
            sent_end - base.0,
            errors_end - base.1,
            received_end - base.2,
        )
    } else {
        (0, 0, 0)
    };
    let final_backlog =
        shared.sent.load(Ordering::Relaxed) as i64 - shared.received.load(Ordering::Relaxed) as i64;
    let h = lock(&shared.hists);
    let mut out = serde_json::Map::new();
    out.insert(
        "workload".into(),
        json!(format!(
            "{} topic(s) x {} queue(s), {} B, {} producer(s)/{} consumer(s) per topic, batch {}, rate {}",
            args.topics,
            args.queues,
            args.size,
            args.producers,
            args.consumers,
            args.batch,
            match args.rate {
                Rate::Fixed(r) => format!("{r:.0}/s"),
                Rate::Max => "max".into(),
            }
        )),
    );
    out.insert("driver".into(), json!("sluice-client (RocketMQ 5 gRPC)"));
    out.insert("endpoint".into(), json!(endpoint));
    out.insert("flushNote".into(), json!(args.flush_note));
    out.insert("topics".into(), json!(args.topics));
    out.insert("partitionsPerTopic".into(), json!(args.queues));
    out.insert("messageSize".into(), json!(args.size));
    out.insert("producersPerTopic".into(), json!(args.producers));
    out.insert("consumersPerTopic".into(), json!(args.consumers));
    out.insert(
        "consumerMode".into(),
        json!(match args.consumer_mode {
            ConsumerMode::Simple => "simple",
            ConsumerMode::Push => "push",
        }),
    );
    out.insert("batchSize".into(), json!(args.batch));
    out.insert(
        "maxOutstandingPerProducer".into(),
        json!(args.max_outstanding),
    );
    out.insert(
        "targetRate".into(),
        match args.rate {
            Rate::Fixed(r) => json!(r),
            Rate::Max => Value::Null,
        },
    );
    out.insert("maxRateProbe".into(), json!(args.rate == Rate::Max));
    out.insert("finalTargetRate".into(), json!(shared.rate()));
    out.insert("warmupSeconds".into(), json!(args.warmup.as_secs_f64()));
    out.insert("testDurationSeconds".into(), json!(secs));
    out.insert("interrupted".into(), json!(interrupted));
    out.insert("latencyUnit".into(), json!("ms"));
    out.insert("sampleRateMillis".into(), json!(1000));
    out.insert("publishRate".into(), json!(series.publish_rate));
    out.insert("publishErrorRate".into(), json!(series.publish_error_rate));
    out.insert("consumeRate".into(), json!(series.consume_rate));
    out.insert("backlog".into(), json!(series.backlog));
    out.insert("targetRateSeries".into(), json!(series.target_rate));
    out.insert("publishLatency50pct".into(), json!(series.publish_p50));
    out.insert("publishLatency99pct".into(), json!(series.publish_p99));
    out.insert("publishDelayLatency99pct".into(), json!(series.delay_p99));
    out.insert("endToEndLatency50pct".into(), json!(series.e2e_p50));
    out.insert("endToEndLatency99pct".into(), json!(series.e2e_p99));
    out.extend(quantiles("aggregatedPublishLatency", &h.publish.total));
    out.extend(quantiles("aggregatedPublishDelayLatency", &h.delay.total));
    out.extend(quantiles("aggregatedEndToEndLatency", &h.e2e.total));
    out.insert("totalPublished".into(), json!(published));
    out.insert("totalPublishErrors".into(), json!(failed));
    out.insert("totalConsumed".into(), json!(consumed));
    out.insert("publishRateAvg".into(), json!(published as f64 / secs));
    out.insert("consumeRateAvg".into(), json!(consumed as f64 / secs));
    out.insert("finalBacklog".into(), json!(final_backlog));
    out.insert(
        "lastPublishError".into(),
        json!(lock(&shared.last_error).clone()),
    );
    let result = Value::Object(out);
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&result)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json_stdout {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        println!(
            "workload      {}",
            result["workload"].as_str().unwrap_or("")
        );
        println!(
            "measured      {secs:.1} s after {} s warm-up{}",
            args.warmup.as_secs(),
            if interrupted { " (interrupted)" } else { "" }
        );
        println!(
            "publish       {:.0} msg/s ({published} messages, {failed} errors)",
            published as f64 / secs
        );
        if args.rate == Rate::Max {
            println!("probe         final target {:.0} msg/s", shared.rate());
        }
        println!(
            "consume       {:.0} msg/s ({consumed} messages), backlog at end {final_backlog}",
            consumed as f64 / secs
        );
        println!("publish lat.  {}", line(&h.publish.total));
        println!("publish delay {}", line(&h.delay.total));
        println!("end to end    {}", line(&h.e2e.total));
        if let Some(e) = lock(&shared.last_error).as_ref() {
            println!("last error    {e}");
        }
        if let Some(path) = &args.json_out {
            println!("json          {}", path.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("max"), Ok(Rate::Max));
        assert_eq!(parse_rate("0"), Ok(Rate::Max));
        assert_eq!(parse_rate("10000"), Ok(Rate::Fixed(10_000.0)));
        assert_eq!(parse_rate("2.5k"), Ok(Rate::Fixed(2_500.0)));
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert!(parse_size("0").is_err());
    }

    fn shared(rate: f64) -> Shared {
        Shared {
            start: Instant::now(),
            start_wall_us: 0,
            run_id: "r".into(),
            rate_bits: AtomicU64::new(rate.to_bits()),
            rate_epoch: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            received: AtomicU64::new(0),
            hists: Mutex::new(Hists {
                publish: Pair::new().expect("hist"),
                delay: Pair::new().expect("hist"),
                e2e: Pair::new().expect("hist"),
            }),
            last_error: Mutex::new(None),
        }
    }

    #[test]
    fn probe_ramps_up_when_healthy_and_backs_off_otherwise() {
        let s = shared(10_000.0);
        let mut p = Probe {
            ramp: 0.5,
            max_ramp: 1.0,
            last_at: Instant::now() - Duration::from_secs(1),
            last_sent: 0,
            last_received: 0,
            last_errors: 0,
        };
        // Kept up with 10k/s for a second, consumers too: ramp up by 100 %.
        s.sent.store(10_000, Ordering::Relaxed);
        s.received.store(10_000, Ordering::Relaxed);
        assert_eq!(p.step(&s, true), None);
        assert!((s.rate() - 20_000.0).abs() < 1.0, "{}", s.rate());
        // Only 5k published in the next second: back to what was achieved.
        p.last_at = Instant::now() - Duration::from_secs(1);
        s.sent.store(15_000, Ordering::Relaxed);
        s.received.store(15_000, Ordering::Relaxed);
        assert!(p.step(&s, true).is_some());
        assert!(s.rate() < 5_000.0 && s.rate() > 4_000.0, "{}", s.rate());
        assert!((p.ramp - 0.1).abs() < 1e-9);
        assert!((p.max_ramp - 0.1).abs() < 1e-9);
        // Errors back off too.
        p.last_at = Instant::now() - Duration::from_secs(1);
        s.errors.store(3, Ordering::Relaxed);
        assert!(p.step(&s, false).is_some());
    }

    #[test]
    fn end_to_end_only_counts_this_run() {
        let s = shared(1.0);
        let mut m = ReceivedMessage::default();
        assert!(!s.on_received(&m, 10));
        m.properties.insert(RUN_PROPERTY.into(), "r".into());
        m.properties.insert(TS_PROPERTY.into(), "4000".into());
        assert!(s.on_received(&m, 6000));
        let h = lock(&s.hists);
        assert_eq!(h.e2e.total.len(), 1);
        assert_eq!(h.e2e.total.max(), h.e2e.total.highest_equivalent(2000));
    }
}
