//! Storage-engine benchmark: append, read and recovery throughput, each reported next to
//! the disk's own limits measured in the same run.
//!
//! ```text
//! cargo run --release -p sluice-store --example store_bench -- [--dir PATH] [--seconds N]
//!     [--repeats N] [--recovery-mib N] [--quick] [--fsync-delay-ms N]
//!     [--flush sync|async] [--inflight N] [--size BYTES]
//!                            (only those runs, no reads/recovery: profiling)
//!     [--zero-ahead BYTES]   (the store's `zero_ahead`; default its own, 0 turns it off)
//!     [--inline-sync N]      (the store's `inline_sync_max`; default its own, 0 turns it off)
//!     [--group-commit-wait-us N]  (the store's `group_commit_wait`; default its own)
//!     [--inline-sync-spin-us N]   (the store's `inline_sync_spin`; default its own, 0 turns it off)
//!     [--segment-mib N]      (the store's `segment_size`; default its own, 1 GiB)
//!     [--syncer-nice N]      (the store's `syncer_nice`; default its own, 0 leaves it)
//!     [--queues N]           (only the many-queues run, below)
//!     [--batch K]            (each appender sends K messages per append, so N in flight
//!                             are N / K appenders; default 1)
//! ```
//!
//! Many queues (`--queues N`): one 128 B message to each of N queues (8 per topic), then 1
//! more to each, with 4,096 appenders in flight and the shipped Async flush; then the store
//! is closed and opened again, and opened once more as after a crash (its checkpoint from
//! before the close put back, so every queue is checked). Reports appends/s of each round, the reopen time, the
//! process's open file descriptors and resident memory: what a broker with that many
//! queues costs, and that its descriptors stay bounded (`open_queue_files`).
//!
//! Baselines (same file system, same run): buffered sequential write bandwidth of a file of
//! the same size with one fdatasync at the end; the latency of a 4 KiB append + fdatasync.
//! Async figures are given as a fraction of the bandwidth; Sync figures as a fraction of the
//! group-commit bound `min(bandwidth, in_flight × record size ÷ fdatasync latency)`.
//! Before Sync runs, the disk alone doing a group commit's I/O with no CPU work around it
//! (`pwrite` + fdatasync of one group of 1 KiB records in a loop, at 16 to 4,096 records
//! per group): what one fdatasync in flight can make durable per second at each size.
//! A third baseline is the load generator's own ceiling: the same appender tasks, messages
//! and latency records with no store behind them, which every figure shares the 2 cores with.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_store::{
    AppendMessage, FlushPolicy, FsSync, PROP_MSG_ID, StdFs, Store, StoreConfig, VFile, Vfs,
};

/// The allocator the `sluice` binary ships with, so the store is measured as it runs there
/// (with glibc's malloc, allocation and free were ≈ 15% of this benchmark's CPU).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Args {
    dir: PathBuf,
    seconds: f64,
    repeats: usize,
    recovery_mib: u64,
    quick: bool,
    /// How each measured store is set up.
    setup: Setup,
    /// Only this flush policy / in-flight count (for profiling).
    only_flush: Option<String>,
    only_inflight: Option<usize>,
    /// Only this message size.
    only_size: Option<usize>,
    /// Messages per append (`--batch`); in flight counts messages.
    batch: usize,
    /// The many-queues run instead: this many queues.
    queues: Option<u32>,
}

/// The file system and store settings of every measured store: the defaults unless a flag
/// overrides them (for A/B runs of one binary).
#[derive(Default)]
struct Setup {
    /// Emulates a slower disk: every fdatasync of the store (and of the probe) takes at
    /// least this long.
    fsync_delay_ms: u64,
    zero_ahead: Option<u64>,
    inline_sync_max: Option<usize>,
    group_commit_wait: Option<Duration>,
    inline_sync_spin: Option<Duration>,
    segment_size: Option<u64>,
    syncer_nice: Option<i32>,
}

impl Setup {
    fn open(&self, dir: &Path, flush: FlushPolicy) -> anyhow::Result<Store> {
        let mut cfg = StoreConfig::new(dir);
        cfg.flush = flush;
        cfg.min_free_space = 0;
        cfg.retention = None;
        cfg.index_slots = 1 << 16;
        cfg.index_entries = 1 << 20;
        cfg.zero_ahead = self.zero_ahead.unwrap_or(cfg.zero_ahead);
        cfg.inline_sync_max = self.inline_sync_max.unwrap_or(cfg.inline_sync_max);
        cfg.group_commit_wait = self.group_commit_wait.unwrap_or(cfg.group_commit_wait);
        cfg.inline_sync_spin = self.inline_sync_spin.unwrap_or(cfg.inline_sync_spin);
        cfg.segment_size = self.segment_size.unwrap_or(cfg.segment_size);
        cfg.syncer_nice = self.syncer_nice.unwrap_or(cfg.syncer_nice);
        if self.fsync_delay_ms == 0 {
            return Ok(Store::open(cfg)?);
        }
        let vfs = Arc::new(SlowSyncFs(Duration::from_millis(self.fsync_delay_ms)));
        Ok(Store::open_with(
            cfg,
            vfs,
            Arc::new(sluice_common::clock::SystemClock),
        )?)
    }
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        dir: PathBuf::from("target/store-bench"),
        seconds: 2.0,
        repeats: 3,
        recovery_mib: 1024,
        quick: false,
        setup: Setup::default(),
        only_flush: None,
        only_inflight: None,
        batch: 1,
        only_size: None,
        queues: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))
        };
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(v()?),
            "--seconds" => a.seconds = v()?.parse()?,
            "--repeats" => a.repeats = v()?.parse()?,
            "--recovery-mib" => a.recovery_mib = v()?.parse()?,
            "--quick" => a.quick = true,
            "--fsync-delay-ms" => a.setup.fsync_delay_ms = v()?.parse()?,
            "--flush" => a.only_flush = Some(v()?),
            "--inflight" => a.only_inflight = Some(v()?.parse()?),
            "--size" => a.only_size = Some(v()?.parse()?),
            "--queues" => a.queues = Some(v()?.parse()?),
            "--batch" => a.batch = v()?.parse::<usize>()?.max(1),
            "--zero-ahead" => a.setup.zero_ahead = Some(v()?.parse()?),
            "--inline-sync" => a.setup.inline_sync_max = Some(v()?.parse()?),
            "--group-commit-wait-us" => {
                a.setup.group_commit_wait = Some(Duration::from_micros(v()?.parse()?))
            }
            "--inline-sync-spin-us" => {
                a.setup.inline_sync_spin = Some(Duration::from_micros(v()?.parse()?))
            }
            "--segment-mib" => a.setup.segment_size = Some(v()?.parse::<u64>()? << 20),
            "--syncer-nice" => a.setup.syncer_nice = Some(v()?.parse()?),
            "--help" | "-h" => {
                println!(
                    "store_bench [--dir PATH] [--seconds N] [--repeats N] [--recovery-mib N] [--quick]\n    \
                     [--fsync-delay-ms N] [--flush sync|async] [--inflight N] [--size BYTES]\n    \
                     [--zero-ahead BYTES] [--inline-sync N] [--group-commit-wait-us N]\n    \
                     [--inline-sync-spin-us N] [--segment-mib N] [--syncer-nice N] [--queues N] [--batch K]\n\
                     (see the header of crates/sluice-store/examples/store_bench.rs and docs/benchmarks.md)"
                );
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other} (--help for usage)"),
        }
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn fresh(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p)?;
    Ok(p)
}

/// Buffered sequential write of `bytes` in 1 MiB writes, one fdatasync at the end.
fn disk_bandwidth(dir: &Path, bytes: u64) -> anyhow::Result<f64> {
    let path = dir.join("baseline.dat");
    let f = std::fs::File::create(&path)?;
    let buf = vec![0x5Au8; 1 << 20];
    let t = Instant::now();
    let mut off = 0;
    while off < bytes {
        f.write_all_at(&buf, off)?;
        off += buf.len() as u64;
    }
    f.sync_data()?;
    let secs = t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(bytes as f64 / secs)
}

/// The disk alone doing what a Sync group commit does, with no CPU work around it: for each
/// of `groups` (in bytes), a `pwrite` of that many bytes and an fdatasync, one after another
/// for `seconds`, into a file zero-filled beforehand (as the store's segments are; the
/// writes wrap around inside it). Returns (durable bytes per second, seconds per write +
/// fdatasync) per group size: with one fdatasync in flight, the most a group commit of that
/// size can make durable per second on this disk.
fn group_commit_probe(
    dir: &Path,
    groups: &[usize],
    seconds: f64,
) -> anyhow::Result<Vec<(f64, f64)>> {
    const FILE: u64 = 256 << 20;
    let path = dir.join("group.dat");
    let f = std::fs::File::create(&path)?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < FILE {
        f.write_all_at(&zeros, off)?;
        off += zeros.len() as u64;
    }
    f.sync_data()?;
    let mut out = Vec::new();
    for &group in groups {
        let buf = vec![0x5Au8; group];
        let (mut off, mut ops) = (0u64, 0u64);
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < seconds {
            if off + group as u64 > FILE {
                off = 0;
            }
            f.write_all_at(&buf, off)?;
            f.sync_data()?;
            off += group as u64;
            ops += 1;
        }
        let secs = t.elapsed().as_secs_f64();
        out.push((ops as f64 * group as f64 / secs, secs / ops as f64));
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(out)
}

/// Median time of an fdatasync after a 4 KiB append. With `delay` (the emulated slower
/// disk) each fdatasync goes through the same [`slow_sync`] as the store's.
fn fsync_latency(dir: &Path, n: usize, delay: Duration) -> anyhow::Result<f64> {
    let path = dir.join("fsync.dat");
    let f = std::fs::File::create(&path)?;
    let buf = vec![1u8; 4096];
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        f.write_all_at(&buf, (i * 4096) as u64)?;
        let t = Instant::now();
        slow_sync(|| f.sync_data(), delay)?;
        lat.push(t.elapsed().as_secs_f64());
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(median(lat))
}

/// Bytes in the log of one of [`message`]'s records with a body of `size` bytes.
fn record_len(size: usize) -> usize {
    message(size, 0, &Bytes::from(vec![0u8; size])).encoded_len()
}

fn message(size: usize, n: u64, body: &Bytes) -> AppendMessage {
    AppendMessage {
        topic: "bench".into(),
        queue_id: (n % 8) as u32,
        flags: 0,
        born_ts: 0,
        properties: vec![(PROP_MSG_ID.into(), hex16(n))],
        body: body.slice(..size),
    }
}

/// `format!("{n:016x}")` without the formatting machinery (≈ 3% of the CPU of a run).
fn hex16(n: u64) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(16);
    for i in (0..16).rev() {
        s.push(DIGITS[((n >> (i * 4)) & 0xF) as usize] as char);
    }
    s
}

/// `--fsync-delay-ms`: the real file system, with every fdatasync (and directory fsync)
/// taking at least that long, as on a disk whose cache flush does. Nothing else is changed
/// or recorded, so the store pays only the emulated latency. (The fault-injection file
/// system is not used for this: it keeps an undo copy of every overwritten range for its
/// power-loss simulation, a read and a copy per write that no real disk charges.)
struct SlowSyncFs(Duration);

/// Runs a real sync, then sleeps for what is left of `floor`. A floor, not a sleep added
/// after it: on this VM a real fdatasync issued after a few idle milliseconds takes 0.3 to
/// 1.3 ms (≈ 0.07 ms back to back), so a sleep added to every fdatasync made the emulated
/// disk slower by a varying amount, more for the probe (the CPU idle meanwhile) than for
/// the store. With the floor both take `floor` plus the sleep's overshoot (≈ 0.06-0.09 ms).
fn slow_sync(sync: impl FnOnce() -> std::io::Result<()>, floor: Duration) -> std::io::Result<()> {
    let t = Instant::now();
    let r = sync();
    if let Some(left) = floor.checked_sub(t.elapsed()) {
        std::thread::sleep(left);
    }
    r
}

struct SlowSyncFile(Arc<dyn VFile>, Duration);

impl VFile for SlowSyncFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        slow_sync(|| self.0.sync_data(), self.1)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn allocate(&self, len: u64) -> std::io::Result<bool> {
        self.0.allocate(len)
    }
    fn write_back(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.write_back(offset, len)
    }
    fn start_write_back(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.start_write_back(offset, len)
    }
}

struct SlowFsSync(Arc<dyn FsSync>, Duration);

impl FsSync for SlowFsSync {
    fn sync(&self) -> std::io::Result<()> {
        slow_sync(|| self.0.sync(), self.1)
    }
}

impl Vfs for SlowSyncFs {
    fn open(&self, path: &Path, create: bool) -> std::io::Result<Arc<dyn VFile>> {
        Ok(Arc::new(SlowSyncFile(StdFs.open(path, create)?, self.0)))
    }
    fn remove_file(&self, path: &Path) -> std::io::Result<()> {
        StdFs.remove_file(path)
    }
    fn create_dir_all(&self, path: &Path) -> std::io::Result<()> {
        StdFs.create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> std::io::Result<Vec<String>> {
        StdFs.list_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> std::io::Result<()> {
        slow_sync(|| StdFs.sync_dir(path), self.0)
    }
    fn open_fs_sync(&self, path: &Path) -> std::io::Result<Arc<dyn FsSync>> {
        Ok(Arc::new(SlowFsSync(StdFs.open_fs_sync(path)?, self.0)))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        StdFs.rename(from, to)
    }
    fn exists(&self, path: &Path) -> bool {
        StdFs.exists(path)
    }
    fn file_len(&self, path: &Path) -> std::io::Result<u64> {
        StdFs.file_len(path)
    }
    fn available_space(&self, path: &Path) -> std::io::Result<u64> {
        StdFs.available_space(path)
    }
}

struct Run {
    msgs_per_s: f64,
    bytes_per_s: f64,
    p50_us: u64,
    p99_us: u64,
    fsyncs_per_s: f64,
    fsync_avg_us: f64,
    per_batch: f64,
    per_fsync: f64,
}

#[allow(clippy::too_many_arguments)]
fn append_run(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    flush: FlushPolicy,
    size: usize,
    in_flight: usize,
    batch: usize,
    seconds: f64,
    setup: &Setup,
) -> anyhow::Result<Run> {
    let store = Arc::new(setup.open(dir, flush)?);
    let t0 = Instant::now();
    let (hists, _) = drive(rt, size, in_flight, batch, seconds, Some(store.clone()));
    let secs = t0.elapsed().as_secs_f64();
    let st = store.stats();
    drop(store);
    Ok(Run {
        msgs_per_s: st.appended_messages as f64 / secs,
        bytes_per_s: st.appended_bytes as f64 / secs,
        p50_us: hists.value_at_quantile(0.5),
        p99_us: hists.value_at_quantile(0.99),
        fsyncs_per_s: st.fsyncs as f64 / secs,
        fsync_avg_us: st.fsync_nanos as f64 / st.fsyncs.max(1) as f64 / 1e3,
        per_batch: st.appended_messages as f64 / st.batches.max(1) as f64,
        per_fsync: st.appended_messages as f64 / st.fsyncs.max(1) as f64,
    })
}

/// Runs `in_flight / batch` appender tasks on `rt` for `seconds`, each appending `batch`
/// messages at a time and waiting for the answer, so `in_flight` messages are in flight.
/// Without a store each "append" drops the messages and yields to the runtime once: the
/// generator's own cost, measured as a ceiling. Returns the latency histogram (one value
/// per append) and the number of appends made.
fn drive(
    rt: &tokio::runtime::Runtime,
    size: usize,
    in_flight: usize,
    batch: usize,
    seconds: f64,
    store: Option<Arc<Store>>,
) -> (hdrhistogram::Histogram<u64>, u64) {
    let appenders = (in_flight / batch).max(1);
    // Set when the run ends: one clock read per append fewer than comparing with a deadline.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    rt.block_on(async {
        let mut tasks = Vec::new();
        for a in 0..appenders {
            let store = store.clone();
            // A body buffer per appender, as each producer's messages arrive in their own
            // buffers: one shared `Bytes` made every append bump the same reference count
            // from both cores.
            let body = Bytes::from(vec![0xA5u8; size]);
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                // Latencies in µs, appended to the task's own vector and put into one
                // histogram at the end: shared histograms under locks (or 4,096 private
                // ones of tens of KiB each) made the generator's cache misses and lock
                // hand-offs ≈ 7% of the CPU of a run.
                let mut lat: Vec<u32> = Vec::new();
                let mut n = a as u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    let msgs: Vec<AppendMessage> = (0..batch as u64)
                        .map(|i| message(size, n * batch as u64 + i, &body))
                        .collect();
                    match &store {
                        Some(s) => {
                            s.append(msgs).await.expect("append");
                        }
                        None => {
                            drop(std::hint::black_box(msgs));
                            tokio::task::yield_now().await;
                        }
                    }
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    n += appenders as u64;
                }
                lat
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut made = 0;
        let mut all = hdrhistogram::Histogram::<u64>::new(3).expect("histogram");
        for t in tasks {
            let lat = t.await.expect("task");
            made += lat.len() as u64;
            for us in lat {
                let _ = all.record(us as u64);
            }
        }
        (all, made)
    })
}

/// Open file descriptors and resident memory (KiB) of this process.
fn process_usage() -> (usize, u64) {
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0);
    (fds, rss)
}

/// `--queues N`: see the module header.
fn many_queues(rt: &tokio::runtime::Runtime, args: &Args, queues: u32) -> anyhow::Result<()> {
    let dir = fresh(&args.dir, "many-queues")?;
    let flush = FlushPolicy::Async {
        interval: Duration::from_millis(500),
        bytes: 4 << 20,
    };
    let store = Arc::new(args.setup.open(&dir, flush)?);
    let body = Bytes::from(vec![b'q'; 128]);
    println!("# sluice-store: {queues} queues");
    println!();
    for round in 0..2 {
        let t = Instant::now();
        let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
        rt.block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..4096.min(queues) {
                let (store, next, body) = (store.clone(), next.clone(), body.clone());
                tasks.push(tokio::spawn(async move {
                    loop {
                        let q = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if q >= queues {
                            return anyhow::Ok(());
                        }
                        let m = AppendMessage {
                            topic: format!("t{}", q / 8),
                            queue_id: q % 8,
                            ..message(128, u64::from(q), &body)
                        };
                        store.append(vec![m]).await?;
                    }
                }));
            }
            for t in tasks {
                t.await??;
            }
            anyhow::Ok(())
        })?;
        let secs = t.elapsed().as_secs_f64();
        let (fds, rss) = process_usage();
        let st = store.stats();
        println!(
            "round {}: {queues} appends (one per queue) in {secs:.1} s, {:.0} appends/s; \
             {fds} descriptors open ({} consume-queue files), RSS {} MiB, {} queue files opened so far",
            round + 1,
            f64::from(queues) / secs,
            st.open_queue_files,
            rss >> 10,
            st.queue_files_opened
        );
        anyhow::ensure!(store.fenced().is_none(), "fenced: {:?}", store.fenced());
    }
    let t = Instant::now();
    store.close();
    drop(store);
    let closed = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let store = args.setup.open(&dir, flush)?;
    let opened = t.elapsed().as_secs_f64();
    let (fds, rss) = process_usage();
    let st = store.stats();
    println!(
        "close (every tail written, checkpoint) {closed:.1} s; reopen {opened:.1} s with {} queues; \
         {fds} descriptors open, RSS {} MiB",
        st.queues,
        rss >> 10
    );
    anyhow::ensure!(
        st.queues == u64::from(queues),
        "{} queues after reopen",
        st.queues
    );
    anyhow::ensure!(store.recovery_report().clean_shutdown);
    // The checkpoint of a store at work (written as it opened): put back after the next
    // close, the open after it is the one after a crash, which checks every queue.
    let at_work = std::fs::read(dir.join("checkpoint"))?;
    drop(store);
    std::fs::write(dir.join("checkpoint"), at_work)?;
    let t = Instant::now();
    let store = args.setup.open(&dir, flush)?;
    let opened = t.elapsed().as_secs_f64();
    let (fds, rss) = process_usage();
    anyhow::ensure!(!store.recovery_report().clean_shutdown);
    println!(
        "reopen as after a crash (no clean close: every queue's last entry read) {opened:.1} s; \
         {fds} descriptors open, RSS {} MiB",
        rss >> 10
    );
    drop(store);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if let Some(q) = args.queues {
        return many_queues(&rt, &args, q);
    }
    let bw_bytes: u64 = if args.quick { 256 << 20 } else { 1 << 30 };
    let bw = median(
        (0..args.repeats)
            .map(|_| disk_bandwidth(&args.dir, bw_bytes))
            .collect::<anyhow::Result<_>>()?,
    );
    let probes = if args.quick { 50 } else { 200 };
    let delay = Duration::from_millis(args.setup.fsync_delay_ms);
    let fsync = fsync_latency(&args.dir, probes, delay)?;
    if !delay.is_zero() {
        let real = fsync_latency(&args.dir, probes, Duration::ZERO)?;
        println!(
            "emulated slower disk: every fdatasync (store and probe) takes at least {} ms (a sleep after \
             the real one for the rest); the probe below is measured that way (with no emulation: {:.2} ms)",
            args.setup.fsync_delay_ms,
            real * 1e3
        );
    }
    println!("# sluice-store benchmark");
    println!();
    println!(
        "disk: buffered sequential write {:.0} MB/s ({} MiB, one fdatasync); 4 KiB append+fdatasync median {:.2} ms ({:.0}/s)",
        bw / 1e6,
        bw_bytes >> 20,
        fsync * 1e3,
        1.0 / fsync
    );
    println!(
        "runs: {} s each, median of {}; 2-thread tokio runtime drives the appenders on the same 2 cores",
        args.seconds, args.repeats
    );
    println!(
        "in flight counts messages: \"256 (16 × 16)\" is 16 appenders each sending 16 messages per \
         append (latencies are per append); a plain number, one message per append"
    );
    // The load generator's own ceiling: its tasks, messages and histograms with no store.
    // Every figure below shares the 2 cores with this much work per append. (Not in the
    // single-run modes, which are for profiling the store.)
    let single =
        args.only_flush.is_some() || args.only_inflight.is_some() || args.only_size.is_some();
    if !single {
        let (_, made) = drive(&rt, 1024, 4096, 1, args.seconds, None);
        let gen_rate = made as f64 / args.seconds;
        println!(
            "load generator alone (no store; 1 KiB, 4096 appenders): {:.0} appends/s, {:.2} µs of the 2 cores per append; \
         80% of the disk probe is {:.0} appends/s of 1 KiB",
            gen_rate,
            2e6 / gen_rate,
            0.8 * bw / record_len(1024) as f64
        );
    }
    // The disk alone at the group sizes of the Sync rows (1 KiB records, one per
    // appender in flight): what a group commit could make durable with no CPU work at all.
    let sync_runs = args.only_flush.as_deref().is_none_or(|f| f == "sync");
    if sync_runs && args.setup.fsync_delay_ms == 0 {
        let groups = [16usize, 128, 256, 2048, 4096];
        let bytes: Vec<usize> = groups.iter().map(|n| n * record_len(1024)).collect();
        let probed = group_commit_probe(&args.dir, &bytes, if args.quick { 0.5 } else { 1.0 })?;
        let parts: Vec<String> = groups
            .iter()
            .zip(probed)
            .map(|(n, (rate, per))| {
                format!(
                    "{n} → {:.0} MB/s ({:.0} µs each, {:.0}% of the buffered bandwidth)",
                    rate / 1e6,
                    per * 1e6,
                    100.0 * rate / bw
                )
            })
            .collect();
        println!(
            "disk alone, pwrite + fdatasync of one group of 1 KiB records in a loop, by records per group: {}",
            parts.join("; ")
        );
    }
    println!();
    println!(
        "| flush | size | in flight | msgs/s | MB/s | fraction of bound | bound | of Async rate | append p50 | append p99 | fdatasync/s | fdatasync avg | msgs per write | msgs per fdatasync |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // Async rate per (size, in flight): what the CPU allows the same appenders without
    // any fdatasync, the ceiling of a Sync figure however fast the disk.
    let mut async_rate: std::collections::HashMap<(usize, usize, usize), f64> = Default::default();
    let sizes: &[usize] = if args.quick {
        &[1024]
    } else {
        &[128, 1024, 16384]
    };
    for &(flush_name, flush) in &[
        (
            "async",
            // The shipped defaults (`[store] flush_interval` and `flush_bytes`).
            FlushPolicy::Async {
                interval: Duration::from_millis(500),
                bytes: 4 << 20,
            },
        ),
        ("sync", FlushPolicy::Sync),
    ] {
        if args.setup.fsync_delay_ms > 0 && flush != FlushPolicy::Sync {
            continue;
        }
        if args.only_flush.as_deref().is_some_and(|f| f != flush_name) {
            continue;
        }
        let inflight: &[usize] = &[1, 16, 256, 4096];
        for &size in sizes {
            if args.only_size.is_some_and(|s| s != size) {
                continue;
            }
            // A full run adds 1 KiB rows with 16-message appends: what the per-request
            // work costs (see `--batch`).
            let batches: &[usize] = if args.batch == 1 && !single && size == 1024 {
                &[1, 16]
            } else {
                std::slice::from_ref(&args.batch)
            };
            for (&batch, &n) in batches
                .iter()
                .flat_map(|b| inflight.iter().map(move |n| (b, n)))
            {
                // A batch larger than the in-flight count would put more in flight.
                if args.only_inflight.is_some_and(|i| i != n) || n < batch {
                    continue;
                }
                let mut runs = Vec::new();
                for r in 0..args.repeats {
                    let dir = fresh(&args.dir, &format!("run-{flush_name}-{size}-{n}-{r}"))?;
                    runs.push(append_run(
                        &rt,
                        &dir,
                        flush,
                        size,
                        n,
                        batch,
                        args.seconds,
                        &args.setup,
                    )?);
                    std::fs::remove_dir_all(&dir)?;
                }
                runs.sort_by(|a, b| a.msgs_per_s.total_cmp(&b.msgs_per_s));
                let m = &runs[runs.len() / 2];
                let rec = record_len(size) as f64;
                let (bound, bound_name) = if flush == FlushPolicy::Sync {
                    let b = (n as f64 * rec / fsync).min(bw);
                    (b, format!("{:.1} MB/s (fsync)", b / 1e6))
                } else {
                    (bw, format!("{:.0} MB/s (disk)", bw / 1e6))
                };
                if flush != FlushPolicy::Sync {
                    async_rate.insert((size, n, batch), m.msgs_per_s);
                }
                let of_async = match async_rate.get(&(size, n, batch)) {
                    Some(a) if flush == FlushPolicy::Sync => {
                        format!("{:.0}%", 100.0 * m.msgs_per_s / a)
                    }
                    _ => "-".to_string(),
                };
                let in_flight = if batch == 1 {
                    n.to_string()
                } else {
                    format!("{n} ({} × {batch})", n / batch)
                };
                println!(
                    "| {flush_name} | {size} B | {in_flight} | {:.0} | {:.1} | {:.0}% | {bound_name} | {of_async} | {} µs | {} µs | {:.0} | {:.0} µs | {:.1} | {} |",
                    m.msgs_per_s,
                    m.bytes_per_s / 1e6,
                    100.0 * m.bytes_per_s / bound,
                    m.p50_us,
                    m.p99_us,
                    m.fsyncs_per_s,
                    m.fsync_avg_us,
                    m.per_batch,
                    if flush == FlushPolicy::Sync {
                        format!("{:.1}", m.per_fsync)
                    } else {
                        "-".to_string()
                    }
                );
                std::io::stdout().flush()?;
            }
        }
    }
    if args.only_flush.is_some() || args.only_inflight.is_some() {
        return Ok(());
    }
    // Reads and recovery over one larger log.
    let dir = fresh(&args.dir, "recovery")?;
    let mib = if args.quick { 256 } else { args.recovery_mib };
    let mut cfg = StoreConfig::new(&dir);
    cfg.flush = FlushPolicy::Async {
        interval: Duration::from_millis(500),
        bytes: 256 << 20,
    };
    cfg.min_free_space = 0;
    cfg.retention = None;
    cfg.index_slots = 1 << 16;
    cfg.index_entries = 1 << 20;
    let store = Store::open(cfg.clone())?;
    let body = Bytes::from(vec![7u8; 1024]);
    let mut n = 0u64;
    let mut batch = Vec::new();
    while store.stats().written_offset < mib << 20 {
        batch.clear();
        for _ in 0..256 {
            batch.push(message(1024, n, &body));
            n += 1;
        }
        store.append_blocking(std::mem::take(&mut batch))?;
    }
    let written = store.stats().written_offset;
    println!();
    // 256 as a replaying reader takes them; 32, the batch a RocketMQ consumer asks for.
    for batch in [256u32, 32] {
        let t = Instant::now();
        let mut read_msgs = 0u64;
        let mut read_bytes = 0u64;
        for q in 0..8 {
            let mut off = 0;
            loop {
                let b = store.read("bench", q, off, batch, 4 << 20, |_| true)?;
                if b.messages.is_empty() {
                    break;
                }
                read_msgs += b.messages.len() as u64;
                read_bytes += b.messages.iter().map(|m| m.body.len() as u64).sum::<u64>();
                off = b.next_offset;
            }
        }
        let rs = t.elapsed().as_secs_f64();
        println!(
            "reads (page cache, 8 queues, batches of {batch}): {:.0} msgs/s, {:.0} MB/s of bodies ({read_msgs} messages)",
            read_msgs as f64 / rs,
            read_bytes as f64 / 1e6 / rs
        );
    }
    drop(store);
    // Worst case: no checkpoint, so every record is verified by CRC and re-dispatched.
    let mut times = Vec::new();
    for _ in 0..args.repeats {
        std::fs::remove_file(dir.join("checkpoint"))?;
        let t = Instant::now();
        let s = Store::open(cfg.clone())?;
        let took = t.elapsed().as_secs_f64();
        assert_eq!(s.recovery_report().valid_end, written);
        times.push(took);
        drop(s);
    }
    let full = median(times);
    let t = Instant::now();
    drop(Store::open(cfg)?);
    let ckpt = t.elapsed().as_secs_f64();
    let gib = written as f64 / (1u64 << 30) as f64;
    println!(
        "recovery of {:.2} GiB ({} records): full verification {:.2} s ({:.2} s per GiB); from a checkpoint {:.3} s",
        gib,
        n,
        full,
        full / gib,
        ckpt
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
