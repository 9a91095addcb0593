//! The engine: writer (group commit), flusher thread (background durability,
//! checkpoints), recovery, reads, lookups and retention.
//!
//! In Sync mode appends go to a writer thread as drawn below. In Async mode nothing waits
//! for a disk, so the appenders write themselves: whoever finds the writer free writes every
//! queued request as one batch (flat combining, see [`Combiner`]); the drawing's writer
//! column is then run by an appender, with a helper thread taking over what a combiner
//! leaves queued.
//!
//! ```text
//!  append() ──► channel ──► writer thread                  syncer thread (Sync only)
//!                            drain every queued request      take every written batch
//!                            assign queue offsets            one fdatasync up to the last
//!                            encode, one pwrite per batch    mark durable, make visible,
//!                            write consume-queue entries     complete the appends
//!                            add index entries
//!                            Sync:  hand over to the syncer  flusher thread
//!                                   (small group, syncer idle:
//!                                   the writer syncs it itself)
//!                            Async: complete now,              Async: fdatasync every
//!                                   kick the flusher           interval / N bytes; always:
//!                                                              checkpoints (queues + index
//!                                                              synced first)
//! ```
//!
//! Group commit never sleeps on a timer: the writer takes whatever is queued when it becomes
//! free, and in Sync mode the syncer syncs whatever was written when it becomes free. The
//! two run in a pipeline: while one fdatasync runs, the writer already encodes and writes
//! the appends that arrived meanwhile, and the next fdatasync covers all of them. Batch
//! sizes adapt to the load. A pipeline pays a thread hand-off per group commit, which a
//! small group cannot hide: with few appenders nothing is written during the fdatasync
//! anyway. So when the syncer holds nothing and the group has at most `inline_sync_max`
//! appends, the writer waits for the cohort (below) and runs the fdatasync itself; after
//! answering it polls for the next append for up to `inline_sync_spin` before it sleeps,
//! because the appenders just answered come back within about that long and waking a
//! sleeping thread would cost as much again. The syncer is fed only by the writer, so in
//! Sync mode the commit log is synced by the syncer or by the writer while the syncer is
//! idle, and at most one fdatasync of it is ever in flight.
//!
//! Cohorts. With a fixed set of appenders that each wait for their answer, syncs split the
//! appenders into cohorts that take turns: the ones answered last come back a few
//! microseconds after the syncer has already started the next fdatasync with whatever was
//! written, and every sync carries only part of the appenders. So the syncer remembers how
//! many requests it knows to be in the loop (the ones it just answered plus the ones that
//! arrived during its sync) and, while it holds fewer than that, keeps receiving for at most
//! `group_commit_wait` (and never longer than a quarter of the last fdatasync). The wait
//! ends the moment the count is reached, so a steady load never pays it; a load that shrinks
//! pays it once. This is the `commit_delay` idea of PostgreSQL with the count learnt. Readers only see records below
//! the visibility line of their queue, which in Sync mode moves after the fdatasync, so a
//! consumer never reads a record that a crash could take back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use sluice_common::{Clock, SystemClock, metrics, validate_resource_name};
use tokio::sync::oneshot;

use crate::checkpoint::Checkpoint;
use crate::commitlog::{CommitLog, RollError, Segment};
use crate::consume_queue::{ConsumeQueue, CqEntry, tag_hash};
use crate::file_cache::FileCache;
use crate::fs::{FsSync, StdFs, Vfs};
use crate::index::{Index, id_hash, key_hash};
use crate::record::{
    self, AppendMessage, PROP_KEYS, PROP_MSG_ID, PROP_TAGS, Placement, StoredMessage,
};
use crate::zero_ahead::ZeroAhead;
use crate::{FlushPolicy, StoreConfig, StoreError};

/// Where an appended message was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    pub queue_offset: u64,
    pub physical_offset: u64,
    pub store_ts: i64,
    pub size: u32,
}

/// Outcome of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStatus {
    /// Messages (possibly none after filtering) were scanned; continue at `next_offset`.
    Found,
    /// `offset` is the end of the queue.
    NoNewMessage,
    /// `offset` is below the queue's minimum (deleted by retention).
    OffsetTooSmall,
    /// `offset` is beyond the end of the queue.
    OffsetOverflow,
    /// The queue has never been written.
    NoSuchQueue,
}

#[derive(Debug, Clone)]
pub struct ReadBatch {
    pub status: ReadStatus,
    pub messages: Vec<StoredMessage>,
    /// Offset to read from next.
    pub next_offset: u64,
    pub min_offset: u64,
    pub max_offset: u64,
}

/// What opening the store found and did.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Commit-log offset the replay started from.
    pub replayed_from: u64,
    pub records_replayed: u64,
    /// End of the valid commit log.
    pub valid_end: u64,
    /// Bytes of torn or invalid tail that were cut off.
    pub dropped_bytes: u64,
    /// File, offset and reason of the cut.
    pub truncated_at: Option<(String, u64, String)>,
    /// Consume queues were damaged or missing entries and were rebuilt from the whole log.
    pub full_rebuild: bool,
    /// The store had been closed cleanly and its commit log ended where it did then: the
    /// consume queues were taken as they are, without reading each queue's last entry.
    pub clean_shutdown: bool,
    pub duration: Duration,
}

/// What a retention pass deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub segments_deleted: u32,
    pub bytes_deleted: u64,
    pub min_offset: u64,
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct StoreStats {
    pub appended_messages: u64,
    pub appended_bytes: u64,
    pub batches: u64,
    pub fsyncs: u64,
    pub fsync_nanos: u64,
    /// Most fdatasyncs ever in flight at once on commit-log segments.
    pub max_syncs_in_flight: u64,
    /// Sync: group commits the writer synced itself (small groups, syncer idle); the others
    /// went to the syncer thread.
    pub writer_group_commits: u64,
    pub written_offset: u64,
    pub durable_offset: u64,
    pub min_offset: u64,
    pub disk_bytes: u64,
    pub queues: u64,
    /// Consume-queue files open now (at most `open_queue_files`).
    pub open_queue_files: u64,
    /// Consume-queue files opened since the store was (cache misses).
    pub queue_files_opened: u64,
}

type Listener = Arc<dyn Fn(&str, u32, u64) + Send + Sync>;
type Reply = oneshot::Sender<Result<Vec<AppendResult>, StoreError>>;

struct Request {
    msgs: Vec<AppendMessage>,
    reply: Reply,
    /// When it was submitted: the append-latency metric is observed where the answer is
    /// sent, with one clock read per batch there (one per append fewer than timing it in
    /// `append`, and no two runtime threads adding to the histogram at once).
    at: Instant,
}

/// An answer waiting to be sent: the reply, its request's submit time, the result.
type Pending = (Reply, Instant, Result<Vec<AppendResult>, StoreError>);

/// Sends the answers of a batch, observing the append latency of the successful ones.
fn answer(shared: &Shared, replies: Vec<Pending>) {
    let now = Instant::now();
    for (reply, at, r) in replies {
        if r.is_ok() {
            shared.metrics.append.observe_duration(now - at);
        }
        let _ = reply.send(r);
    }
}

/// Writer → flusher: enough unflushed bytes have accumulated (Async).
struct Kick;

/// Writer → syncer (Sync): a written batch waiting for its fdatasync.
struct SyncJob {
    /// Commit-log end after the batch.
    end: u64,
    /// Queues and the offsets that become visible once the batch is durable.
    visible: Vec<(Arc<ConsumeQueue>, u64)>,
    replies: Vec<Pending>,
}

struct Shared {
    config: StoreConfig,
    vfs: Arc<dyn Vfs>,
    clock: Arc<dyn Clock>,
    clog: CommitLog,
    cq_root: PathBuf,
    /// `syncfs` of the file system holding the data, opened with the store (see [`FsSync`]).
    fs_sync: Arc<dyn FsSync>,
    /// Open consume-queue files, at most `open_queue_files`.
    cq_files: Arc<FileCache>,
    queues: RwLock<HashMap<String, HashMap<u32, Arc<ConsumeQueue>>>>,
    index: Index,
    written: AtomicU64,
    durable: AtomicU64,
    fenced: Mutex<Option<String>>,
    is_fenced: AtomicBool,
    dirty_queues: Mutex<Vec<Arc<ConsumeQueue>>>,
    listener: RwLock<Option<Listener>>,
    appended_messages: AtomicU64,
    appended_bytes: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
    fsync_nanos: AtomicU64,
    syncs_in_flight: AtomicU64,
    max_syncs_in_flight: AtomicU64,
    /// Requests submitted and not yet taken by the writer.
    queued: AtomicU64,
    /// Requests written and handed to the syncer, not yet taken by it.
    awaiting_sync: AtomicU64,
    /// Duration of the last commit-log fdatasync, in nanoseconds.
    last_fsync_nanos: AtomicU64,
    /// Set by the syncer from taking a batch until it has answered it. The writer is the
    /// only sender to the syncer, so while this is clear and `awaiting_sync` is zero the
    /// syncer holds nothing and the writer may sync the commit log itself.
    syncer_busy: AtomicBool,
    /// Sync: appends known to be in the group-commit loop, learnt at the end of each group
    /// commit (the ones just answered plus the ones that arrived meanwhile); see *Cohorts*.
    cohort: AtomicU64,
    writer_group_commits: AtomicU64,
    /// Queue-file handles the cache had closed when a checkpoint last synced the file
    /// system (`checkpoint`).
    synced_evictions: AtomicU64,
    metrics: StoreMetrics,
}

struct StoreMetrics {
    append: metrics::Histogram,
    fsync: metrics::Histogram,
    checkpoint: metrics::Histogram,
}

impl StoreMetrics {
    fn new() -> Self {
        let r = metrics::global();
        StoreMetrics {
            append: r.histogram(
                "sluice_store_append_seconds",
                "Time from append to completion per the flush policy.",
                &[],
                metrics::LATENCY_BUCKETS,
            ),
            fsync: r.histogram(
                "sluice_store_fsync_seconds",
                "Duration of commit-log fdatasync calls.",
                &[],
                metrics::LATENCY_BUCKETS,
            ),
            checkpoint: r.histogram(
                "sluice_store_checkpoint_seconds",
                "Duration of checkpoints (queue tails written and synced, checkpoint file).",
                &[],
                metrics::LATENCY_BUCKETS,
            ),
        }
    }
}

/// Exposes store figures at scrape time; holds the store weakly.
fn register_collector(shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    metrics::global().collector(move || {
        let Some(s) = weak.upgrade() else {
            return vec![];
        };
        let g =
            |name: &str, help: &str, v: f64| (name.to_owned(), help.to_owned(), "gauge", vec![], v);
        let free = s.vfs.available_space(&s.config.data_dir).unwrap_or(0) as f64;
        vec![
            g(
                "sluice_store_disk_bytes",
                "Bytes of commit-log segments on disk.",
                s.clog.disk_bytes() as f64,
            ),
            g(
                "sluice_store_disk_free_bytes",
                "Free bytes on the data file system.",
                free,
            ),
            g(
                "sluice_store_written_offset_bytes",
                "Commit-log offset written.",
                s.written.load(Ordering::Acquire) as f64,
            ),
            g(
                "sluice_store_durable_offset_bytes",
                "Commit-log offset known durable.",
                s.durable.load(Ordering::Acquire) as f64,
            ),
            (
                "sluice_store_appended_messages_total".into(),
                "Messages appended since start.".into(),
                "counter",
                vec![],
                s.appended_messages.load(Ordering::Relaxed) as f64,
            ),
            (
                "sluice_store_write_batches_total".into(),
                "Batches written to the commit log (appended messages / batches = mean batch size).".into(),
                "counter",
                vec![],
                s.batches.load(Ordering::Relaxed) as f64,
            ),
            g(
                "sluice_store_open_queue_files",
                "Consume-queue files open now (at most [store] open_queue_files).",
                s.cq_files.len() as f64,
            ),
            (
                "sluice_store_queue_files_opened_total".into(),
                "Consume-queue files opened (a file not among the open ones was needed).".into(),
                "counter",
                vec![],
                s.cq_files.opened() as f64,
            ),
            (
                "sluice_store_queue_files_evicted_total".into(),
                "Consume-queue file handles closed to make room for others.".into(),
                "counter",
                vec![],
                s.cq_files.evicted() as f64,
            ),
            (
                "sluice_store_fenced".into(),
                "1 when the store refuses writes after a failed fsync or write.".into(),
                "gauge",
                vec![],
                if s.is_fenced.load(Ordering::Acquire) {
                    1.0
                } else {
                    0.0
                },
            ),
        ]
    });
}

impl Shared {
    fn fence(&self, why: String) {
        let mut f = self.fenced.lock();
        if f.is_none() {
            tracing::error!(reason = %why, "store fenced: refusing writes");
            *f = Some(why);
        }
        self.is_fenced.store(true, Ordering::Release);
    }

    fn fenced_error(&self) -> Option<StoreError> {
        if !self.is_fenced.load(Ordering::Acquire) {
            return None;
        }
        Some(StoreError::Fenced(
            self.fenced.lock().clone().unwrap_or_default(),
        ))
    }

    /// Every queue of the store (a snapshot).
    fn all_queues(&self) -> Vec<Arc<ConsumeQueue>> {
        self.queues
            .read()
            .values()
            .flat_map(|m| m.values().cloned())
            .collect()
    }

    fn queue(&self, topic: &str, queue_id: u32) -> Option<Arc<ConsumeQueue>> {
        self.queues
            .read()
            .get(topic)
            .and_then(|m| m.get(&queue_id))
            .cloned()
    }

    fn get_or_create_queue(
        &self,
        topic: &str,
        queue_id: u32,
    ) -> Result<(Arc<ConsumeQueue>, bool), StoreError> {
        if let Some(q) = self.queue(topic, queue_id) {
            return Ok((q, false));
        }
        let mut all = self.queues.write();
        if let Some(q) = all.get(topic).and_then(|m| m.get(&queue_id)) {
            return Ok((q.clone(), false));
        }
        let (q, damaged) = ConsumeQueue::open(
            self.vfs.as_ref(),
            &self.cq_root,
            topic,
            queue_id,
            self.config.cq_entries_per_file,
            self.cq_files.clone(),
        )
        .map_err(|e| {
            StoreError::io(
                "open consume queue",
                &ConsumeQueue::dir_for(&self.cq_root, topic, queue_id),
                e,
            )
        })?;
        let q = Arc::new(q);
        all.entry(topic.to_owned())
            .or_default()
            .insert(queue_id, q.clone());
        Ok((q, damaged))
    }

    fn notify(&self, q: &ConsumeQueue, max: u64) {
        if let Some(l) = self.listener.read().clone() {
            l(&q.topic, q.queue_id, max);
        }
    }

    /// fdatasyncs every segment holding bytes in `[from, to)`, oldest first.
    fn sync_clog(&self, from: u64, to: u64) -> Result<(), StoreError> {
        // Only the segments the range touches (one, or two across a roll): a scan of every
        // segment cost a copy of the list and an fstat per segment on every group commit.
        for seg in self.clog.segments_overlapping(from, to) {
            let n = self.syncs_in_flight.fetch_add(1, Ordering::AcqRel) + 1;
            self.max_syncs_in_flight.fetch_max(n, Ordering::AcqRel);
            let t = Instant::now();
            // The durability point of the commit log: appends below `to` are acknowledged
            // (Sync) or counted as durable (Async, checkpoint) only after this returns.
            let r = seg.file.sync_data();
            self.syncs_in_flight.fetch_sub(1, Ordering::AcqRel);
            let took = t.elapsed();
            self.fsync_nanos
                .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
            self.last_fsync_nanos
                .store(took.as_nanos() as u64, Ordering::Relaxed);
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.metrics.fsync.observe_duration(took);
            r.map_err(|e| StoreError::io("fdatasync segment", &seg.path, e))?;
        }
        Ok(())
    }

    /// Writes a checkpoint. `closing`: the last one, after the store's last write (it is
    /// marked clean when everything written is durable).
    fn checkpoint(&self, closing: bool) -> Result<(), StoreError> {
        let started = Instant::now();
        let r = self.write_checkpoint(closing);
        if r.is_ok() {
            self.metrics.checkpoint.observe_duration(started.elapsed());
        }
        r
    }

    fn write_checkpoint(&self, closing: bool) -> Result<(), StoreError> {
        // Everything below `written` already has consume-queue entries in the files.
        let dispatched = self.written.load(Ordering::Acquire);
        let dirty = std::mem::take(&mut *self.dirty_queues.lock());
        // Past a few dozen queues, one syncfs costs less than an fdatasync per queue file
        // (each its own journal commit): a checkpoint after writes to 20,000 queues took
        // seconds that way, and a million queues would have kept it from ever finishing
        // within its interval.
        //
        // Also after the cache closed a queue file's handle: the kernel may have dropped the
        // file's inode since, and with it a writeback error that only `syncfs` still
        // reports (see `file_cache`).
        let evicted = self.cq_files.evicted();
        let one_sync =
            dirty.len() > SYNCFS_QUEUES || evicted != self.synced_evictions.load(Ordering::Acquire);
        let mut dirs = std::collections::BTreeSet::new();
        for q in dirty {
            q.sync(self.vfs.as_ref(), &self.cq_root, &mut dirs, !one_sync)
                .map_err(|e| StoreError::io("sync consume queue", &self.cq_root, e))?;
        }
        if one_sync {
            // Consume-queue files and their new directories, the written commit log with
            // them: durable before the checkpoint below claims their entries.
            self.fs_sync
                .sync()
                .map_err(|e| StoreError::io("sync file system", &self.cq_root, e))?;
            self.synced_evictions.store(evicted, Ordering::Release);
        } else {
            // Each directory with new queue files or directories once (the 8 queues of a
            // new topic share their topic directory, and every new queue the root).
            for d in &dirs {
                self.vfs
                    .sync_dir(d)
                    .map_err(|e| StoreError::io("sync directory", d, e))?;
            }
        }
        self.index
            .persist()
            .map_err(|e| StoreError::io("persist index", &self.config.data_dir, e))?;
        let durable = self.durable.load(Ordering::Acquire);
        let c = Checkpoint {
            clog_durable: durable,
            dispatched: dispatched.min(durable),
            clean: closing && dispatched == durable,
        };
        c.store(self.vfs.as_ref(), &self.config.data_dir)
            .map_err(|e| StoreError::io("write checkpoint", &self.config.data_dir, e))
    }
}

/// The storage engine. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Store {
    shared: Arc<Shared>,
    /// Sync: requests go to the writer thread.
    tx: RwLock<Option<mpsc::Sender<Request>>>,
    /// Async: appenders write themselves (see [`Combiner`]).
    inline: Option<Arc<Combiner>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    recovery: RecoveryReport,
    _lock: Option<std::fs::File>,
}

fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::io("open lock file", &path, e))?;
    // SAFETY: flock on a valid, open file descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StoreError::Locked(dir.display().to_string()));
    }
    Ok(f)
}

impl Store {
    /// Opens (recovering if needed) the store in `config.data_dir` on the real file system.
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        Self::open_with(config, Arc::new(StdFs), Arc::new(SystemClock))
    }

    /// Opens the store over a given file system and clock.
    pub fn open_with(
        config: StoreConfig,
        vfs: Arc<dyn Vfs>,
        clock: Arc<dyn Clock>,
    ) -> Result<Store, StoreError> {
        let started = Instant::now();
        if config.max_record_size as u64 > config.segment_size {
            return Err(StoreError::InvalidMessage(format!(
                "max_record_size {} exceeds segment_size {}",
                config.max_record_size, config.segment_size
            )));
        }
        let root = config.data_dir.clone();
        vfs.create_dir_all(&root)
            .map_err(|e| StoreError::io("create data dir", &root, e))?;
        let lock = lock_dir(&root)?;
        let ckpt = match Checkpoint::load(vfs.as_ref(), &root) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint unreadable; verifying the whole commit log");
                None
            }
        };
        let clog = CommitLog::open(vfs.clone(), root.join("commitlog"), config.segment_size)
            .map_err(|e| StoreError::io("open commit log", &root.join("commitlog"), e))?;
        let cq_root = root.join("consumequeue");
        let cq_files = Arc::new(FileCache::new(config.open_queue_files));
        vfs.create_dir_all(&cq_root)
            .map_err(|e| StoreError::io("create dir", &cq_root, e))?;
        // Before anything is written: it reports the writeback errors from here on.
        let fs_sync = vfs
            .open_fs_sync(&cq_root)
            .map_err(|e| StoreError::io("open", &cq_root, e))?;
        // The 8 (or so) queues of a topic share its name: a million queues are not a
        // million strings more while they open.
        let mut found: Vec<(Arc<str>, u32)> = Vec::new();
        for topic in vfs
            .list_dir(&cq_root)
            .map_err(|e| StoreError::io("list", &cq_root, e))?
        {
            if validate_resource_name(&topic).is_err() {
                continue;
            }
            let tdir = cq_root.join(&topic);
            let qnames = match vfs.list_dir(&tdir) {
                Ok(n) => n,
                // A file where topic directories are (copied in, left by a tool): it
                // cannot hold queues, and refusing to start over it would help no one.
                Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                    tracing::warn!(path = %tdir.display(), "ignoring a file among the consume-queue directories");
                    continue;
                }
                Err(e) => return Err(StoreError::io("list", &tdir, e)),
            };
            let topic: Arc<str> = topic.into();
            for qname in qnames {
                if let Ok(qid) = qname.parse::<u32>() {
                    found.push((topic.clone(), qid));
                }
            }
        }
        let opened = on_threads(&found, |(topic, qid)| {
            ConsumeQueue::open(
                vfs.as_ref(),
                &cq_root,
                topic,
                *qid,
                config.cq_entries_per_file,
                cq_files.clone(),
            )
            // Boxed here, and the error is an `io::Error` (one word): the results of a
            // million queues stay small.
            .map(|(q, d)| (Arc::new(q), d))
        });
        let mut queues: HashMap<String, HashMap<u32, Arc<ConsumeQueue>>> = HashMap::new();
        let mut damaged = false;
        for ((topic, qid), r) in found.into_iter().zip(opened) {
            let (q, d) = r.map_err(|e| {
                let dir = ConsumeQueue::dir_for(&cq_root, &topic, qid);
                StoreError::io("open consume queue", &dir, e)
            })?;
            if d {
                tracing::warn!(topic = %topic, queue = qid, "consume queue damaged; rebuilding from the commit log");
            }
            damaged |= d;
            match queues.get_mut(&*topic) {
                Some(m) => {
                    m.insert(qid, q);
                }
                None => {
                    queues.insert(topic.to_string(), HashMap::from([(qid, q)]));
                }
            }
        }
        let (index, idx_from) = Index::open(
            vfs.clone(),
            root.join("index"),
            config.index_slots,
            config.index_entries,
        )
        .map_err(|e| StoreError::io("open index", &root.join("index"), e))?;
        if clog.last().is_none() {
            clog.roll(0)
                .map_err(|e| StoreError::io("create segment", &clog.dir, e))?;
        }
        let first = clog.segments().first().map(|s| s.start).unwrap_or(0);
        let shared = Arc::new(Shared {
            vfs,
            clock,
            clog,
            cq_root,
            fs_sync,
            cq_files,
            queues: RwLock::new(queues),
            index,
            written: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            fenced: Mutex::new(None),
            is_fenced: AtomicBool::new(false),
            dirty_queues: Mutex::new(Vec::new()),
            listener: RwLock::new(None),
            appended_messages: AtomicU64::new(0),
            appended_bytes: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            fsync_nanos: AtomicU64::new(0),
            syncs_in_flight: AtomicU64::new(0),
            max_syncs_in_flight: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            awaiting_sync: AtomicU64::new(0),
            last_fsync_nanos: AtomicU64::new(0),
            syncer_busy: AtomicBool::new(false),
            cohort: AtomicU64::new(0),
            writer_group_commits: AtomicU64::new(0),
            synced_evictions: AtomicU64::new(0),
            metrics: StoreMetrics::new(),
            config,
        });
        register_collector(&shared);
        let durable = ckpt.map(|c| c.clog_durable).unwrap_or(0);
        let from = if damaged || ckpt.is_none() {
            first
        } else {
            ckpt.map(|c| c.dispatched).unwrap_or(first).min(idx_from)
        };
        // A store closed cleanly: its queues point no further than where the commit log
        // ended then (see the checkpoint module).
        let clean_end = ckpt.filter(|c| c.clean && !damaged).map(|c| c.clog_durable);
        let mut report = Self::recover(&shared, from, durable, clean_end)?;
        if report.full_rebuild && from > first {
            // A queue is missing entries from before the checkpoint: rebuild from the start.
            tracing::warn!("consume queue gap found; replaying the whole commit log");
            report = Self::recover(&shared, first, durable, None)?;
            report.full_rebuild = true;
        }
        report.full_rebuild |= damaged;
        // Retention may have deleted segments that queue files still point into.
        let clog_min = shared.clog.min_offset.load(Ordering::Acquire);
        let all = shared.all_queues();
        on_threads(&all, |q| {
            q.advance_min(shared.vfs.as_ref(), clog_min)
                .map_err(|e| StoreError::io("trim consume queue", &shared.cq_root, e))
        })
        .into_iter()
        .collect::<Result<Vec<u64>, StoreError>>()?;
        report.duration = started.elapsed();
        if report.dropped_bytes > 0 {
            tracing::warn!(
                dropped_bytes = report.dropped_bytes,
                at = ?report.truncated_at,
                "recovery cut a torn or invalid commit-log tail"
            );
        }
        tracing::info!(valid_end = report.valid_end, replayed = report.records_replayed, took = ?report.duration, "store recovered");

        let (tx, rx) = mpsc::channel::<Request>();
        let (ftx, frx) = mpsc::channel::<Kick>();
        let mut threads = Vec::new();
        let syncer = if shared.config.flush == FlushPolicy::Sync {
            let (stx, srx) = mpsc::channel::<SyncJob>();
            let s = shared.clone();
            // Holds a flusher handle so the final checkpoint comes after the last sync.
            let f = ftx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("sluice-store-syncer".into())
                    .spawn(move || syncer(s, srx, f))
                    .map_err(|e| StoreError::io("spawn syncer", Path::new("."), e))?,
            );
            Some(stx)
        } else {
            None
        };
        let zero =
            (shared.config.flush == FlushPolicy::Sync && shared.config.zero_ahead > 0).then(|| {
                ZeroAhead::new(
                    shared.vfs.clone(),
                    shared.config.segment_size,
                    shared.config.zero_ahead,
                )
            });
        if let Some(z) = zero.clone() {
            threads.push(
                std::thread::Builder::new()
                    .name("sluice-store-zero".into())
                    .spawn(move || z.run())
                    .map_err(|e| StoreError::io("spawn zeroer", Path::new("."), e))?,
            );
        }
        let s = shared.clone();
        let (tx, inline) = if shared.config.flush == FlushPolicy::Sync {
            threads.push(
                std::thread::Builder::new()
                    .name("sluice-store-writer".into())
                    .spawn(move || Writer::new(s, ftx, syncer, zero).run(rx))
                    .map_err(|e| StoreError::io("spawn writer", Path::new("."), e))?,
            );
            (Some(tx), None)
        } else {
            let (ktx, krx) = mpsc::channel::<()>();
            let c = Arc::new(Combiner {
                queue: Mutex::new(Vec::new()),
                writer: Mutex::new(Some(Writer::new(s, ftx, None, None))),
                helper: Mutex::new(Some(ktx)),
                helper_kicked: AtomicBool::new(false),
            });
            let h = c.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("sluice-store-writer".into())
                    .spawn(move || {
                        while krx.recv().is_ok() {
                            h.helper_kicked.store(false, Ordering::Release);
                            h.combine(usize::MAX);
                        }
                    })
                    .map_err(|e| StoreError::io("spawn writer", Path::new("."), e))?,
            );
            (None, Some(c))
        };
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("sluice-store-flusher".into())
                .spawn(move || flusher(s, frx))
                .map_err(|e| StoreError::io("spawn flusher", Path::new("."), e))?,
        );
        Ok(Store {
            shared,
            tx: RwLock::new(tx),
            inline,
            threads: Mutex::new(threads),
            recovery: report,
            _lock: Some(lock),
        })
    }

    /// Replays the commit log from `from`, rebuilding consume-queue and index entries, and
    /// cuts an invalid tail.
    fn recover(
        shared: &Arc<Shared>,
        from: u64,
        durable: u64,
        clean_end: Option<u64>,
    ) -> Result<RecoveryReport, StoreError> {
        let mut pending: HashMap<(String, u32), (u64, Vec<CqEntry>)> = HashMap::new();
        let mut idx_items = Vec::new();
        let mut gap = false;
        let vfs = shared.vfs.clone();
        let flush_pending =
            |key: &(String, u32), first: u64, entries: &[CqEntry]| -> Result<bool, StoreError> {
                let (q, _) = shared.get_or_create_queue(&key.0, key.1)?;
                let gap = first > q.written.load(Ordering::Acquire);
                q.write(vfs.as_ref(), first, entries)
                    .map_err(|e| StoreError::io("rebuild consume queue", &shared.cq_root, e))?;
                Ok(gap)
            };
        let outcome = shared.clog.recover(
            from,
            durable,
            shared.config.max_record_size as usize,
            |off, s, rec| {
                let topic = s.topic(rec).map_err(|e| shared.clog.corrupt(off, e))?;
                let props = s.properties(rec).map_err(|e| shared.clog.corrupt(off, e))?;
                let tag = record::property(&props, PROP_TAGS)
                    .map(tag_hash)
                    .unwrap_or(0);
                let entry = CqEntry {
                    clog_offset: off,
                    size: s.size,
                    tag_hash: tag,
                    store_ts: s.store_ts,
                };
                let key = (topic.to_owned(), s.queue_id);
                let slot = pending
                    .entry(key.clone())
                    .or_insert((s.queue_offset, Vec::new()));
                if slot.0 + slot.1.len() as u64 != s.queue_offset || slot.1.len() >= 4096 {
                    let (first, entries) = std::mem::replace(slot, (s.queue_offset, Vec::new()));
                    if !entries.is_empty() {
                        gap |= flush_pending(&key, first, &entries)?;
                    }
                }
                slot.1.push(entry);
                index_items(&props, topic, off, s.store_ts, &mut idx_items);
                Ok(())
            },
        )?;
        for (key, (first, entries)) in pending {
            if !entries.is_empty() {
                gap |= flush_pending(&key, first, &entries)?;
            }
        }
        let end = outcome.valid_end;
        let clean_shutdown = clean_end == Some(end) && outcome.records_scanned == 0;
        if clean_shutdown {
            // Closed cleanly, and the commit log ends where it did then: no queue entry
            // points past it and none was replayed, so no queue needs reading or syncing.
            tracing::debug!("clean shutdown: consume queues taken as they are");
        } else {
            Self::cut_queues(shared, end)?;
        }
        shared.index.truncate(end);
        shared
            .index
            .add(&idx_items, end)
            .map_err(|e| StoreError::io("rebuild index", &shared.config.data_dir, e))?;
        shared.written.store(end, Ordering::Release);
        // After a process crash the recovered tail may still sit in the page cache only.
        shared.sync_clog(durable.min(end), end)?;
        shared.durable.store(end, Ordering::Release);
        // Not clean (whatever the last one was): appends follow.
        shared.checkpoint(false)?;
        Ok(RecoveryReport {
            replayed_from: from,
            records_replayed: outcome.records_scanned,
            valid_end: end,
            dropped_bytes: outcome.dropped_bytes,
            truncated_at: outcome.truncated_at,
            full_rebuild: gap,
            clean_shutdown,
            duration: Duration::ZERO,
        })
    }

    /// Recovery: cuts consume-queue entries that point past the valid end of the commit log
    /// (or are holes at the tail), and marks every queue for the next checkpoint's sync
    /// (entries written before a crash may sit in the page cache only).
    fn cut_queues(shared: &Arc<Shared>, end: u64) -> Result<(), StoreError> {
        let vfs = shared.vfs.clone();
        let all = shared.all_queues();
        // One read per queue, on a few threads when there are many (see `on_threads`).
        let cut = on_threads(&all, |q| -> Result<(), StoreError> {
            let written = q.written.load(Ordering::Acquire);
            let mut n = written;
            while n > q.min_offset.load(Ordering::Acquire) {
                match q.entry_written(vfs.as_ref(), n - 1) {
                    // Entries come from disk: a corrupt one may point anywhere.
                    Ok(Some(e))
                        if !e.is_hole()
                            && e.clog_offset
                                .checked_add(e.size as u64)
                                .is_some_and(|x| x <= end) =>
                    {
                        break;
                    }
                    Ok(_) => n -= 1,
                    Err(e) => return Err(StoreError::io("read consume queue", &shared.cq_root, e)),
                }
            }
            if n < written {
                q.truncate(vfs.as_ref(), n)
                    .map_err(|e| StoreError::io("truncate consume queue", &shared.cq_root, e))?;
            }
            q.visible.store(n, Ordering::Release);
            if !q.dirty.swap(true, Ordering::AcqRel) {
                shared.dirty_queues.lock().push(q.clone());
            }
            Ok(())
        });
        cut.into_iter().collect::<Result<(), StoreError>>()?;
        Ok(())
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn config(&self) -> &StoreConfig {
        &self.shared.config
    }

    /// Appends messages; resolves once they are stored according to the flush policy. The
    /// messages of one call are stored contiguously and in order.
    pub async fn append(&self, msgs: Vec<AppendMessage>) -> Result<Vec<AppendResult>, StoreError> {
        let rx = match &self.inline {
            Some(c) => {
                let (rx, leader) = self.queue_inline(c, msgs)?;
                // The appender that finds the queue empty leads the batch: it lets the
                // appenders that are ready in this turn of the runtime queue theirs, and one
                // turn later writes them all with one `pwrite` (and one consume-queue write
                // per queue). Without the wait, appenders on one runtime thread ran one after
                // another and every append was a batch of one. The others only wait for
                // their reply: the leader, or a combiner that found the writer busy and
                // whose holder re-checks the queue, takes their requests with the rest. If
                // the leader's future is dropped while it waits, the guard writes instead.
                if leader {
                    let guard = CombineOnDrop(c);
                    YieldOnce(false).await;
                    drop(guard);
                }
                rx
            }
            None => self.submit(msgs)?,
        };
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Blocking form of [`Store::append`] for threads outside an async runtime.
    pub fn append_blocking(
        &self,
        msgs: Vec<AppendMessage>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        let rx = self.submit(msgs)?;
        rx.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    fn submit(
        &self,
        msgs: Vec<AppendMessage>,
    ) -> Result<oneshot::Receiver<Result<Vec<AppendResult>, StoreError>>, StoreError> {
        if let Some(c) = &self.inline {
            let (rx, _) = self.queue_inline(c, msgs)?;
            c.combine(1);
            return Ok(rx);
        }
        if let Some(e) = self.shared.fenced_error() {
            return Err(e);
        }
        let (reply, rx) = oneshot::channel();
        let tx = self.tx.read();
        let tx = tx.as_ref().ok_or(StoreError::Closed)?;
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        let req = Request {
            msgs,
            reply,
            at: Instant::now(),
        };
        if tx.send(req).is_err() {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(StoreError::Closed);
        }
        Ok(rx)
    }

    /// Async mode: queues a request for a combiner, and says whether the queue was empty
    /// (the caller then has to run the combiner; otherwise whoever queued the first request
    /// of the queue does).
    #[allow(clippy::type_complexity)]
    fn queue_inline(
        &self,
        c: &Combiner,
        msgs: Vec<AppendMessage>,
    ) -> Result<
        (
            oneshot::Receiver<Result<Vec<AppendResult>, StoreError>>,
            bool,
        ),
        StoreError,
    > {
        if let Some(e) = self.shared.fenced_error() {
            return Err(e);
        }
        let (reply, rx) = oneshot::channel();
        let mut q = c.queue.lock();
        let leader = q.is_empty();
        q.push(Request {
            msgs,
            reply,
            at: Instant::now(),
        });
        Ok((rx, leader))
    }

    /// Called with (topic, queue id, new max offset) whenever records become visible.
    pub fn set_arrival_listener(&self, f: impl Fn(&str, u32, u64) + Send + Sync + 'static) {
        *self.shared.listener.write() = Some(Arc::new(f));
    }

    /// (min, max) offsets of a queue; (0, 0) for a queue never written.
    pub fn queue_offsets(&self, topic: &str, queue_id: u32) -> (u64, u64) {
        self.shared
            .queue(topic, queue_id)
            .map(|q| (q.min_offset.load(Ordering::Acquire), q.max_offset()))
            .unwrap_or((0, 0))
    }

    /// Every (topic, queue id) with a consume queue.
    pub fn queues(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .shared
            .queues
            .read()
            .iter()
            .flat_map(|(t, m)| m.keys().map(move |q| (t.clone(), *q)))
            .collect();
        v.sort();
        v
    }

    /// Reads up to `max_msgs` messages (and about `max_bytes` of bodies, at least one
    /// message) from a queue starting at `offset`. Entries for which `filter` returns false
    /// are skipped without reading their records; at most `max(max_msgs * 16, 1024)` entries
    /// are scanned per call.
    pub fn read(
        &self,
        topic: &str,
        queue_id: u32,
        offset: u64,
        max_msgs: u32,
        max_bytes: u64,
        filter: impl Fn(&CqEntry) -> bool,
    ) -> Result<ReadBatch, StoreError> {
        let Some(q) = self.shared.queue(topic, queue_id) else {
            return Ok(ReadBatch {
                status: ReadStatus::NoSuchQueue,
                messages: vec![],
                next_offset: 0,
                min_offset: 0,
                max_offset: 0,
            });
        };
        let clog_min = self.shared.clog.min_offset.load(Ordering::Acquire);
        let (min, max) = (q.min_offset.load(Ordering::Acquire), q.max_offset());
        let mut batch = ReadBatch {
            status: ReadStatus::Found,
            messages: vec![],
            next_offset: offset,
            min_offset: min,
            max_offset: max,
        };
        if offset < min {
            batch.status = ReadStatus::OffsetTooSmall;
            batch.next_offset = min;
            return Ok(batch);
        }
        if offset == max {
            batch.status = ReadStatus::NoNewMessage;
            return Ok(batch);
        }
        if offset > max {
            batch.status = ReadStatus::OffsetOverflow;
            batch.next_offset = max;
            return Ok(batch);
        }
        let scan = (max_msgs as u64 * 16).max(1024);
        let mut chosen: Vec<(u64, CqEntry)> = Vec::new();
        let mut bytes = 0u64;
        let mut next = offset;
        // Entries are read `max_msgs` at first and twice as many each time after, up to
        // `scan`: a read that takes every entry reads no more of them than it returns, and
        // one that filters most out still gets to the scan limit in a few reads.
        let (mut scanned, mut chunk) = (0u64, (max_msgs as u64).clamp(1, scan));
        'scan: while scanned < scan {
            let want = chunk.min(scan - scanned);
            let entries = q
                .read(self.shared.vfs.as_ref(), offset + scanned, want)
                .map_err(|e| StoreError::io("read consume queue", &self.shared.cq_root, e))?;
            for (i, e) in entries.iter().enumerate() {
                if chosen.len() as u32 >= max_msgs || (bytes >= max_bytes && !chosen.is_empty()) {
                    break 'scan;
                }
                let qoff = offset + scanned + i as u64;
                next = qoff + 1;
                if e.is_hole() || e.clog_offset < clog_min || !filter(e) {
                    continue;
                }
                bytes += e.size as u64;
                chosen.push((qoff, *e));
            }
            if (entries.len() as u64) < want {
                break;
            }
            scanned += want;
            chunk = chunk.saturating_mul(2);
        }
        // Retention moved the queue's minimum past `offset` since it was checked above
        // (its files end the entries read, see `ConsumeQueue::read`): say so, as if it had
        // moved before.
        let min_now = q.min_offset.load(Ordering::Acquire);
        if next == offset && offset < min_now {
            batch.status = ReadStatus::OffsetTooSmall;
            batch.next_offset = min_now;
            batch.min_offset = min_now;
            return Ok(batch);
        }
        // Retention may delete segments after `clog_min` was read: their records are gone
        // as if they had been below it, so they are dropped and the rest read again (each
        // retry drops at least the record that was gone, so this ends).
        batch.messages = loop {
            let clog_min = || self.shared.clog.min_offset.load(Ordering::Acquire);
            match self.read_records(&chosen) {
                Err(StoreError::OffsetGone(gone)) if gone < clog_min() => {
                    let min = clog_min();
                    chosen.retain(|(_, e)| e.clog_offset >= min);
                }
                r => break r?,
            }
        };
        for (m, (qoff, _)) in batch.messages.iter().zip(&chosen) {
            if m.topic != topic || m.queue_id != queue_id || m.queue_offset != *qoff {
                return Err(self.shared.clog.corrupt(
                    m.physical_offset,
                    format!(
                        "consume queue {topic}/{queue_id}@{qoff} points at {}/{}@{}",
                        m.topic, m.queue_id, m.queue_offset
                    ),
                ));
            }
        }
        batch.next_offset = next;
        Ok(batch)
    }

    /// Reads records, one `pread` per run of nearby records in the same segment.
    fn read_records(&self, chosen: &[(u64, CqEntry)]) -> Result<Vec<StoredMessage>, StoreError> {
        // Records at most this far apart share a `pread`, which copies the bytes between
        // them too. A page: a `pread` costs about as much as copying a few KiB, so a wider
        // gap is cheaper skipped. A queue's records are interleaved with every other
        // queue's in the log; with 64 KiB, reading one of 8 busy queues copied all 8
        // (`store_bench` reads: 0.62–0.67M msgs/s, against 1.03–1.07M with 4 KiB).
        const GAP: u64 = 4 << 10;
        let clog = &self.shared.clog;
        let mut out = Vec::with_capacity(chosen.len());
        let written = self.shared.written.load(Ordering::Acquire);
        let mut i = 0;
        while i < chosen.len() {
            let first = chosen[i].1;
            let seg = clog
                .segment_for(first.clog_offset)
                .ok_or(StoreError::OffsetGone(first.clog_offset))?;
            let seg_end = clog.next_start(seg.start).unwrap_or(u64::MAX);
            // Consume-queue entries come from disk: before one sizes a read it must lie in
            // the written part of one segment, as every record does.
            let data_end = seg_end.min(written);
            let end_of = |qoff: u64, e: &CqEntry| -> Result<u64, StoreError> {
                match e.clog_offset.checked_add(e.size as u64) {
                    Some(end) if end <= data_end => Ok(end),
                    _ => Err(clog.corrupt(
                        e.clog_offset,
                        format!(
                            "consume-queue entry at queue offset {qoff} gives {} bytes at {}, \
                             past the end of the segment's data ({data_end})",
                            e.size, e.clog_offset
                        ),
                    )),
                }
            };
            let mut end = end_of(chosen[i].0, &first)?;
            let mut j = i + 1;
            while j < chosen.len() {
                let (qoff, e) = chosen[j];
                if e.clog_offset < end
                    || e.clog_offset > end + GAP
                    || e.clog_offset >= seg_end
                    || e.clog_offset < seg.start
                {
                    break;
                }
                end = end_of(qoff, &e)?;
                j += 1;
            }
            let span = clog.read_bytes(first.clog_offset, (end - first.clog_offset) as usize)?;
            for (_, e) in &chosen[i..j] {
                let at = (e.clog_offset - first.clog_offset) as usize;
                let rec: Bytes = span.slice(at..at + e.size as usize);
                out.push(
                    record::decode(&rec, e.clog_offset)
                        .map_err(|err| clog.corrupt(e.clog_offset, err))?,
                );
            }
            i = j;
        }
        Ok(out)
    }

    /// Reads the record at a commit-log offset.
    pub fn read_at(&self, offset: u64) -> Result<StoredMessage, StoreError> {
        if offset >= self.shared.written.load(Ordering::Acquire) {
            return Err(StoreError::OffsetGone(offset));
        }
        self.shared.clog.read_record(offset, None)
    }

    /// Finds a message by its id (newest first if an id was reused).
    pub fn lookup_message_id(&self, id: &str) -> Result<Option<StoredMessage>, StoreError> {
        let cands = self
            .shared
            .index
            .lookup(id_hash(id), i64::MIN, i64::MAX, 64)
            .map_err(|e| StoreError::io("read index", &self.shared.config.data_dir, e))?;
        for off in cands {
            if let Ok(m) = self.read_at(off) {
                if m.msg_id() == Some(id) {
                    return Ok(Some(m));
                }
            }
        }
        Ok(None)
    }

    /// Messages of `topic` carrying `key`, stored within `[begin_ts, end_ts]`, newest first.
    pub fn lookup_key(
        &self,
        topic: &str,
        key: &str,
        begin_ts: i64,
        end_ts: i64,
        max: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let cands = self
            .shared
            .index
            .lookup(
                key_hash(topic, key),
                begin_ts,
                end_ts,
                max.saturating_mul(2).max(16),
            )
            .map_err(|e| StoreError::io("read index", &self.shared.config.data_dir, e))?;
        let mut out = Vec::new();
        for off in cands {
            if out.len() >= max {
                break;
            }
            if let Ok(m) = self.read_at(off) {
                if m.topic == topic
                    && m.keys().any(|k| k == key)
                    && m.store_ts >= begin_ts
                    && m.store_ts <= end_ts
                {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }

    /// First queue offset whose message was stored at or after `ts`.
    pub fn offset_for_timestamp(
        &self,
        topic: &str,
        queue_id: u32,
        ts: i64,
    ) -> Result<u64, StoreError> {
        match self.shared.queue(topic, queue_id) {
            None => Ok(0),
            Some(q) => q
                .offset_for_time(self.shared.vfs.as_ref(), ts)
                .map_err(|e| StoreError::io("read consume queue", &self.shared.cq_root, e)),
        }
    }

    /// Deletes segments past the retention age or beyond the disk budget, oldest first,
    /// and moves queue minimum offsets past them. The active segment is never deleted.
    pub fn run_retention(&self) -> Result<RetentionReport, StoreError> {
        let s = &self.shared;
        let now = s.clock.now_ms();
        let mut report = RetentionReport::default();
        loop {
            let segs = s.clog.segments();
            if segs.len() < 2 {
                break;
            }
            let total: u64 = segs.iter().map(|x| x.file.len().unwrap_or(0)).sum();
            let over_budget = s.config.disk_budget.is_some_and(|b| total > b);
            let expired = match s.config.retention {
                Some(age) => {
                    // Every record of segment 0 is older than the first record of segment 1.
                    let mut h = [0u8; 52];
                    segs[1].file.read_exact_at(&mut h, 0).is_ok()
                        && i64::from_le_bytes(h[44..52].try_into().unwrap_or([0; 8]))
                            < now - age.as_millis() as i64
                }
                None => false,
            };
            if !(over_budget || expired) {
                break;
            }
            let len = segs[0].file.len().unwrap_or(0);
            match s
                .clog
                .remove_oldest()
                .map_err(|e| StoreError::io("delete segment", &segs[0].path, e))?
            {
                Some(_) => {
                    report.segments_deleted += 1;
                    report.bytes_deleted += len;
                }
                None => break,
            }
        }
        let min = s.clog.min_offset.load(Ordering::Acquire);
        report.min_offset = min;
        if report.segments_deleted > 0 {
            let all = s.all_queues();
            for q in all {
                q.advance_min(s.vfs.as_ref(), min)
                    .map_err(|e| StoreError::io("trim consume queue", &s.cq_root, e))?;
            }
            s.index
                .drop_below(min)
                .map_err(|e| StoreError::io("trim index", &s.config.data_dir, e))?;
            tracing::info!(
                segments = report.segments_deleted,
                bytes = report.bytes_deleted,
                min_offset = min,
                "retention deleted segments"
            );
        }
        Ok(report)
    }

    pub fn stats(&self) -> StoreStats {
        let s = &self.shared;
        StoreStats {
            appended_messages: s.appended_messages.load(Ordering::Relaxed),
            appended_bytes: s.appended_bytes.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            fsync_nanos: s.fsync_nanos.load(Ordering::Relaxed),
            max_syncs_in_flight: s.max_syncs_in_flight.load(Ordering::Relaxed),
            writer_group_commits: s.writer_group_commits.load(Ordering::Relaxed),
            written_offset: s.written.load(Ordering::Acquire),
            durable_offset: s.durable.load(Ordering::Acquire),
            min_offset: s.clog.min_offset.load(Ordering::Acquire),
            disk_bytes: s.clog.disk_bytes(),
            queues: s.queues.read().values().map(|m| m.len() as u64).sum(),
            open_queue_files: s.cq_files.len() as u64,
            queue_files_opened: s.cq_files.opened(),
        }
    }

    /// Why the store refuses writes, if it does.
    pub fn fenced(&self) -> Option<String> {
        self.shared.fenced.lock().clone()
    }

    /// Stops accepting appends, completes those in flight, syncs everything and writes a
    /// final checkpoint.
    pub fn close(&self) {
        self.tx.write().take();
        if let Some(c) = &self.inline {
            // Waits for a combiner at work; appends from now on are answered `Closed`.
            // Dropping the writer lets the flusher finish with a final sync and checkpoint.
            c.writer.lock().take();
            c.helper.lock().take();
            c.combine(usize::MAX);
        }
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

/// Runs `f` on every item, on a few threads when there are many; the results keep the
/// items' order.
///
/// For the per-queue work of opening a store: with a million queues that is a million
/// directories listed and files sized and read, most of it path lookups in the kernel,
/// which run in parallel.
fn on_threads<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    if items.len() < 4096 || threads < 2 {
        return items.iter().map(&f).collect();
    }
    let f = &f;
    std::thread::scope(|s| {
        let parts: Vec<_> = items
            .chunks(items.len().div_ceil(threads))
            .map(|part| s.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    })
}

fn index_items(
    props: &[(String, String)],
    topic: &str,
    off: u64,
    ts: i64,
    out: &mut Vec<(u64, u64, i64)>,
) {
    if let Some(id) = record::property(props, PROP_MSG_ID) {
        out.push((id_hash(id), off, ts));
    }
    if let Some(keys) = record::property(props, PROP_KEYS) {
        for k in keys.split(' ').filter(|k| !k.is_empty()) {
            out.push((key_hash(topic, k), off, ts));
        }
    }
}

/// Async mode: appenders write themselves instead of handing requests to a thread
/// (flat combining). An appender queues its request and, if the writer is free, takes it
/// and writes everything queued (its own request and any that arrived meanwhile) as one
/// batch; if the writer is busy, the holder writes its request. So a lone append costs no
/// thread switch, and concurrent ones still share one `pwrite`. The writes go to the page
/// cache (nothing waits for a disk here), which is why this runs on the caller's thread.
///
/// A combiner writes at most `rounds` batches and then leaves what is still queued to the
/// helper thread, so an appender on a runtime worker never keeps writing for others
/// indefinitely. Every exit re-checks the queue after releasing the writer: a request
/// queued while the writer was held is either seen there or by the holder.
struct Combiner {
    queue: Mutex<Vec<Request>>,
    /// None once the store is closed.
    writer: Mutex<Option<Writer>>,
    helper: Mutex<Option<mpsc::Sender<()>>>,
    helper_kicked: AtomicBool,
}

impl Combiner {
    fn combine(&self, rounds: usize) {
        let mut done = 0;
        loop {
            let Some(mut w) = self.writer.try_lock() else {
                return;
            };
            loop {
                let batch = std::mem::take(&mut *self.queue.lock());
                if batch.is_empty() {
                    break;
                }
                match w.as_mut() {
                    Some(w) => {
                        let max = w.shared.config.max_batch_bytes;
                        let mut part = Vec::new();
                        let mut bytes = 0;
                        for r in batch {
                            bytes += request_bytes(&r);
                            part.push(r);
                            if bytes >= max {
                                w.process(std::mem::take(&mut part));
                                bytes = 0;
                            }
                        }
                        if !part.is_empty() {
                            w.process(part);
                        }
                    }
                    None => {
                        for r in batch {
                            let _ = r.reply.send(Err(StoreError::Closed));
                        }
                    }
                }
                done += 1;
                if done >= rounds {
                    break;
                }
            }
            drop(w);
            if self.queue.lock().is_empty() {
                return;
            }
            if done >= rounds {
                // Hand the rest to the helper thread (once per wake-up of it).
                if !self.helper_kicked.swap(true, Ordering::AcqRel) {
                    match self.helper.lock().as_ref() {
                        Some(k) if k.send(()).is_ok() => return,
                        // Closed: finish here.
                        _ => self.helper_kicked.store(false, Ordering::Release),
                    }
                } else {
                    return;
                }
            }
        }
    }
}

/// Runs one combining round when dropped (see [`Store::append`]).
struct CombineOnDrop<'a>(&'a Combiner);

impl Drop for CombineOnDrop<'_> {
    fn drop(&mut self) {
        self.0.combine(1);
    }
}

/// Pending once (waking its task at once), then ready: gives the other tasks that are ready
/// to run a turn first. Runtime-agnostic, unlike `tokio::task::yield_now`.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}

/// Per-queue state owned by the writer.
struct WriterQueue {
    cq: Arc<ConsumeQueue>,
    next: u64,
    pending_first: u64,
    pending: Vec<CqEntry>,
}

fn request_bytes(r: &Request) -> usize {
    r.msgs.iter().map(|m| m.encoded_len()).sum()
}

struct Writer {
    shared: Arc<Shared>,
    flush: mpsc::Sender<Kick>,
    /// Sync mode: where written batches go to be synced and completed.
    syncer: Option<mpsc::Sender<SyncJob>>,
    /// Sync mode: the zero-filling helper working in front of the writer.
    zero: Option<Arc<ZeroAhead>>,
    /// Sync mode: batches written and not yet synced or handed to the syncer.
    jobs: Vec<SyncJob>,
    pos: u64,
    last_ts: i64,
    queues: Vec<WriterQueue>,
    by_name: HashMap<String, HashMap<u32, usize>>,
    buf: Vec<u8>,
    /// Scratch: the queue slot of each message of the request being written.
    slots: Vec<usize>,
    unflushed: u64,
    /// Consume-queue entries written since the tails were last written out (an upper bound
    /// of what all tails hold; checkpoints also empty them).
    cq_buffered: usize,
    last_space_check: Option<Instant>,
    space_error: Option<(u64, u64)>,
    /// Sync: the commit log is being written back (or is durable) below this offset.
    write_back_from: u64,
}

/// Dirty queues beyond which a checkpoint syncs the file system once (`syncfs`) instead of
/// each queue's files.
const SYNCFS_QUEUES: usize = 64;

/// Sync: written bytes beyond the durable end past which the writer starts their writeback
/// itself (see [`Writer::start_write_back`]). Small group commits (a few appenders, small
/// messages) stay below it and make no extra call.
const EARLY_WRITE_BACK: u64 = 256 << 10;

/// Bound on the consume-queue entries all queues' tails hold in memory (≈ 1.8 MiB): past
/// it the writer writes every tail out, so a million queues cannot each keep a full tail.
const CQ_TAIL_BUDGET: usize = 1 << 16;

impl Writer {
    fn new(
        shared: Arc<Shared>,
        flush: mpsc::Sender<Kick>,
        syncer: Option<mpsc::Sender<SyncJob>>,
        zero: Option<Arc<ZeroAhead>>,
    ) -> Writer {
        let pos = shared.written.load(Ordering::Acquire);
        if let (Some(z), Some(seg)) = (&zero, shared.clog.last()) {
            z.set_segment(seg, pos);
        }
        Writer {
            shared,
            flush,
            syncer,
            zero,
            jobs: Vec::new(),
            pos,
            last_ts: 0,
            queues: Vec::new(),
            by_name: HashMap::new(),
            buf: Vec::with_capacity(1 << 20),
            slots: Vec::new(),
            unflushed: 0,
            cq_buffered: 0,
            last_space_check: None,
            space_error: None,
            write_back_from: 0,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Request>) {
        let max = self.shared.config.max_batch_bytes;
        let mut synced_here = false;
        loop {
            // After a group commit synced here, its appenders come back within tens of
            // microseconds: poll for them a little before sleeping (see `inline_sync_spin`).
            let next = if synced_here {
                spin_recv(&rx, self.shared.config.inline_sync_spin)
            } else {
                None
            };
            let Some(first) = next.or_else(|| rx.recv().ok()) else {
                break;
            };
            self.take(first, &rx, max);
            synced_here = !self.jobs.is_empty() && self.dispatch(&rx, max);
        }
        if let Some(z) = &self.zero {
            z.stop();
        }
        // Dropping `self.syncer` lets the syncer finish the last batches; dropping
        // `self.flush` lets the flusher finish with a final sync and checkpoint.
    }

    /// Writes `buf` at commit-log offset `at` of `seg`.
    fn write_at(&self, seg: &Segment, buf: &[u8], at: u64) -> Result<(), StoreError> {
        if let Some(z) = &self.zero {
            z.before_write(at, at + buf.len() as u64);
        }
        seg.file
            .write_all_at(buf, at - seg.start)
            .map_err(|e| StoreError::io("write segment", &seg.path, e))
    }

    /// Writes `first` and every request queued behind it (up to `max` bytes) as one batch.
    fn take(&mut self, first: Request, rx: &mpsc::Receiver<Request>, max: usize) {
        let mut bytes = request_bytes(&first);
        let mut batch = vec![first];
        self.drain(rx, &mut batch, &mut bytes, max);
        self.shared
            .queued
            .fetch_sub(batch.len() as u64, Ordering::AcqRel);
        self.process(batch);
    }

    /// Sync: makes the written batches durable, here or on the syncer thread.
    ///
    /// Inline when the syncer holds nothing and the group is small: then this thread
    /// waits for the rest of the cohort as the syncer would (see *Cohorts*), writing what
    /// arrives, and runs the one fdatasync itself. The syncer is fed only from here, so it
    /// stays idle meanwhile and at most one fdatasync of the commit log is in flight.
    /// Returns whether the group was synced here.
    fn dispatch(&mut self, rx: &mpsc::Receiver<Request>, max: usize) -> bool {
        let limit = self.shared.config.inline_sync_max;
        let count = |jobs: &[SyncJob]| jobs.iter().map(|j| j.replies.len()).sum::<usize>();
        let mut n = count(&self.jobs);
        let queued = self.shared.queued.load(Ordering::Acquire) as usize;
        let expected = self.shared.cohort.load(Ordering::Acquire) as usize;
        let idle = self.shared.awaiting_sync.load(Ordering::SeqCst) == 0
            && !self.shared.syncer_busy.load(Ordering::SeqCst);
        if !(idle && n + queued <= limit && expected <= limit) {
            for job in std::mem::take(&mut self.jobs) {
                self.hand_over(job);
            }
            return false;
        }
        if n < expected {
            let last = Duration::from_nanos(self.shared.last_fsync_nanos.load(Ordering::Relaxed));
            let deadline = Instant::now() + self.shared.config.group_commit_wait.min(last / 4);
            while n < expected {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(r) => {
                        self.take(r, rx, max);
                        n = count(&self.jobs);
                    }
                    Err(_) => break,
                }
            }
        }
        let jobs = std::mem::take(&mut self.jobs);
        self.shared
            .writer_group_commits
            .fetch_add(1, Ordering::Relaxed);
        sync_and_answer(&self.shared, jobs);
        let next = n + self.shared.queued.load(Ordering::Acquire) as usize;
        self.shared.cohort.store(next as u64, Ordering::Release);
        true
    }

    /// Sync: starts writing back what was written beyond the durable end, once that is at
    /// least [`EARLY_WRITE_BACK`], without waiting for it.
    ///
    /// An fdatasync writes back every dirty page and then waits for them: with large group
    /// commits its time was mostly the transfer of pages written long before (a 2 MiB
    /// group took ≈ 1.8 ms). Started here, while the syncer is busy with the group before,
    /// the transfer overlaps that fdatasync, which then waits for less (docs/benchmarks.md).
    /// Only a hint: it makes nothing durable, and since it does not wait it neither reports
    /// nor consumes a writeback error, which the syncer's fdatasync still gets.
    fn start_write_back(&mut self, seg: &Segment) {
        let from = self
            .write_back_from
            .max(seg.start)
            .max(self.shared.durable.load(Ordering::Acquire));
        if self.pos < from + EARLY_WRITE_BACK {
            return;
        }
        // A failure is left to the fdatasync, which writes back whatever is still dirty.
        let _ = seg.file.start_write_back(from - seg.start, self.pos - from);
        self.write_back_from = self.pos;
    }

    /// Sync: hands a written batch to the syncer thread.
    fn hand_over(&mut self, job: SyncJob) {
        let n = job.replies.len() as u64;
        self.shared.awaiting_sync.fetch_add(n, Ordering::SeqCst);
        let sent = match &self.syncer {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        };
        if let Err(job) = sent {
            // Only when the syncer thread is gone (it panicked): never acknowledge.
            self.shared.awaiting_sync.fetch_sub(n, Ordering::AcqRel);
            self.shared.fence("the syncer thread stopped".into());
            for (reply, _, _) in job.replies {
                let _ = reply.send(Err(StoreError::Fenced("the syncer thread stopped".into())));
            }
        }
    }

    /// Moves every request already queued into `batch`, up to `max` bytes.
    fn drain(
        &self,
        rx: &mpsc::Receiver<Request>,
        batch: &mut Vec<Request>,
        bytes: &mut usize,
        max: usize,
    ) {
        while *bytes < max {
            match rx.try_recv() {
                Ok(r) => {
                    *bytes += request_bytes(&r);
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
    }

    fn queue_slot(&mut self, topic: &str, queue_id: u32) -> Result<usize, StoreError> {
        if let Some(&i) = self.by_name.get(topic).and_then(|m| m.get(&queue_id)) {
            return Ok(i);
        }
        let (cq, _) = self.shared.get_or_create_queue(topic, queue_id)?;
        let next = cq.written.load(Ordering::Acquire);
        self.queues.push(WriterQueue {
            cq,
            next,
            pending_first: next,
            pending: Vec::new(),
        });
        let i = self.queues.len() - 1;
        self.by_name
            .entry(topic.to_owned())
            .or_default()
            .insert(queue_id, i);
        Ok(i)
    }

    fn check_space(&mut self) -> Option<StoreError> {
        let threshold = self.shared.config.min_free_space;
        if threshold == 0 && !cfg!(any(test, feature = "fault-injection")) {
            return None;
        }
        let due = self
            .last_space_check
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
        if due {
            self.last_space_check = Some(Instant::now());
            let dir = &self.shared.config.data_dir;
            self.space_error = match self.shared.vfs.available_space(dir) {
                Ok(avail) if avail < threshold => Some((avail, threshold)),
                _ => None,
            };
        }
        self.space_error
            .map(|(available, threshold)| StoreError::DiskFull {
                available,
                threshold,
            })
    }

    fn process(&mut self, batch: Vec<Request>) {
        if let Some(e) = self.shared.fenced_error() {
            for r in batch {
                let _ = r.reply.send(Err(StoreError::Fenced(e.to_string())));
            }
            return;
        }
        if let Some(e) = self.check_space() {
            for r in batch {
                let _ = r.reply.send(Err(StoreError::DiskFull {
                    available: match e {
                        StoreError::DiskFull { available, .. } => available,
                        _ => 0,
                    },
                    threshold: self.shared.config.min_free_space,
                }));
            }
            return;
        }
        match self.write_batch(&batch) {
            Ok(results) => self.complete(batch, results),
            Err(e) => {
                self.shared.fence(e.to_string());
                for r in batch {
                    let _ = r.reply.send(Err(StoreError::Fenced(e.to_string())));
                }
            }
        }
    }

    /// Encodes and writes a batch; per request either its results or a validation error.
    #[allow(clippy::type_complexity)]
    fn write_batch(
        &mut self,
        batch: &[Request],
    ) -> Result<(Vec<Result<Vec<AppendResult>, StoreError>>, Vec<usize>), StoreError> {
        let cfg_seg = self.shared.config.segment_size;
        let max_record = self.shared.config.max_record_size as usize;
        let mut seg = self.shared.clog.last().ok_or(StoreError::Closed)?;
        self.buf.clear();
        let mut buf_start = self.pos;
        let mut results = Vec::with_capacity(batch.len());
        let mut touched: Vec<usize> = Vec::new();
        let mut idx_items = Vec::new();
        // One clock read per batch: the records of a batch are stored in the same few
        // microseconds, and the clock read per record was ≈ 1% of the CPU of an append.
        let now_ms = self.shared.clock.now_ms();
        for req in batch {
            if let Err(e) = req.msgs.iter().try_for_each(|m| {
                validate_resource_name(&m.topic)
                    .map_err(|e| format!("topic {:?}: {e}", m.topic))?;
                record::validate(m, max_record)
            }) {
                results.push(Err(StoreError::InvalidMessage(e)));
                continue;
            }
            // Every queue of the request is opened before anything of it is encoded: a
            // queue that cannot be opened (out of file descriptors or disk space) fails
            // this request alone and leaves the store as it was.
            let mut slots = std::mem::take(&mut self.slots);
            slots.clear();
            if let Err(e) = req.msgs.iter().try_for_each(|m| {
                slots.push(self.queue_slot(&m.topic, m.queue_id)?);
                Ok::<(), StoreError>(())
            }) {
                self.slots = slots;
                results.push(Err(e));
                continue;
            }
            let mut res = Vec::with_capacity(req.msgs.len());
            // Where the request starts, to undo what of it was encoded if the segment it
            // needs cannot be created.
            let mark = (self.buf.len(), self.pos, idx_items.len(), touched.len());
            let mut rolled = false;
            let mut refused = None;
            for (i, (m, &qi)) in req.msgs.iter().zip(&slots).enumerate() {
                let size = m.encoded_len() as u64;
                if self.pos - seg.start + size > cfg_seg && self.pos > seg.start {
                    // The next segment is created before anything is written or cut: out
                    // of descriptors or inodes, the appends that need it fail and the store
                    // goes on (it used to fence itself until a restart).
                    let next = match self.shared.clog.create(self.pos) {
                        Ok(next) => next,
                        Err(RollError::Create(e)) if !rolled => {
                            refused = Some((i, e));
                            break;
                        }
                        // Part of the request is in the segment before: it cannot be taken
                        // back (only a request larger than a segment gets here).
                        Err(RollError::Create(e)) => {
                            return Err(StoreError::io("create segment", &self.shared.clog.dir, e));
                        }
                        Err(RollError::SyncDir(e)) => {
                            return Err(StoreError::io("sync directory", &self.shared.clog.dir, e));
                        }
                    };
                    self.write_at(&seg, &self.buf, buf_start)?;
                    self.buf.clear();
                    if let Some(z) = &self.zero {
                        z.leave_segment();
                    }
                    self.shared
                        .clog
                        .seal(&seg, self.pos)
                        .map_err(|e| StoreError::io("cut segment", &seg.path, e))?;
                    self.shared.clog.install(next.clone());
                    seg = next;
                    if let Some(z) = &self.zero {
                        z.set_segment(seg.clone(), self.pos);
                    }
                    buf_start = self.pos;
                    rolled = true;
                }
                let wq = &mut self.queues[qi];
                if wq.pending.is_empty() {
                    wq.pending_first = wq.next;
                    touched.push(qi);
                }
                let queue_offset = wq.next;
                wq.next += 1;
                let store_ts = now_ms.max(self.last_ts);
                self.last_ts = store_ts;
                let at = Placement {
                    queue_offset,
                    physical_offset: self.pos,
                    store_ts,
                };
                record::encode(m, at, &mut self.buf);
                let tag = m.property(PROP_TAGS).map(tag_hash).unwrap_or(0);
                wq.pending.push(CqEntry {
                    clog_offset: self.pos,
                    size: size as u32,
                    tag_hash: tag,
                    store_ts,
                });
                index_items(&m.properties, &m.topic, self.pos, store_ts, &mut idx_items);
                res.push(AppendResult {
                    queue_offset,
                    physical_offset: self.pos,
                    store_ts,
                    size: size as u32,
                });
                self.pos += size;
            }
            if let Some((encoded, e)) = refused {
                // Nothing of the request was written: take back what of it was encoded,
                // and refuse it and the rest of the batch. The next batch tries again.
                for &qi in slots[..encoded].iter().rev() {
                    let wq = &mut self.queues[qi];
                    wq.next -= 1;
                    wq.pending.pop();
                }
                let (buf_len, pos, idx_len, touched_len) = mark;
                self.buf.truncate(buf_len);
                self.pos = pos;
                idx_items.truncate(idx_len);
                touched.truncate(touched_len);
                self.slots = slots;
                let dir = &self.shared.clog.dir;
                tracing::warn!(dir = %dir.display(), error = %e, "cannot create the next commit-log segment; appends that need it fail until it can be");
                while results.len() < batch.len() {
                    let e = std::io::Error::new(e.kind(), e.to_string());
                    results.push(Err(StoreError::io("create segment", dir, e)));
                }
                break;
            }
            self.slots = slots;
            results.push(Ok(res));
        }
        if !self.buf.is_empty() {
            self.write_at(&seg, &self.buf, buf_start)?;
        }
        if self.syncer.is_some() {
            self.start_write_back(&seg);
        }
        let vfs = self.shared.vfs.clone();
        for &qi in &touched {
            let wq = &mut self.queues[qi];
            self.cq_buffered += wq.pending.len();
            wq.cq
                .write(vfs.as_ref(), wq.pending_first, &wq.pending)
                .map_err(|e| StoreError::io("write consume queue", &self.shared.cq_root, e))?;
            wq.pending.clear();
            if !wq.cq.dirty.swap(true, Ordering::AcqRel) {
                self.shared.dirty_queues.lock().push(wq.cq.clone());
            }
        }
        if self.cq_buffered > CQ_TAIL_BUDGET {
            for wq in &self.queues {
                wq.cq
                    .flush_tail(vfs.as_ref())
                    .map_err(|e| StoreError::io("write consume queue", &self.shared.cq_root, e))?;
            }
            self.cq_buffered = 0;
        }
        self.shared
            .index
            .add(&idx_items, self.pos)
            .map_err(|e| StoreError::io("write index", &self.shared.config.data_dir, e))?;
        let before = self.shared.written.swap(self.pos, Ordering::AcqRel);
        self.shared
            .appended_bytes
            .fetch_add(self.pos - before, Ordering::Relaxed);
        self.shared.batches.fetch_add(1, Ordering::Relaxed);
        Ok((results, touched))
    }

    fn complete(
        &mut self,
        batch: Vec<Request>,
        (results, touched): (Vec<Result<Vec<AppendResult>, StoreError>>, Vec<usize>),
    ) {
        let n: usize = results
            .iter()
            .map(|r| r.as_ref().map(|v| v.len()).unwrap_or(0))
            .sum();
        self.shared
            .appended_messages
            .fetch_add(n as u64, Ordering::Relaxed);
        let visible: Vec<(Arc<ConsumeQueue>, u64)> = touched
            .iter()
            .map(|&qi| (self.queues[qi].cq.clone(), self.queues[qi].next))
            .collect();
        let replies: Vec<Pending> = batch
            .into_iter()
            .zip(results)
            .map(|(q, r)| (q.reply, q.at, r))
            .collect();
        match self.shared.config.flush {
            FlushPolicy::Async { bytes, .. } => {
                for (q, next) in &visible {
                    q.visible.fetch_max(*next, Ordering::AcqRel);
                    self.shared.notify(q, *next);
                }
                answer(&self.shared, replies);
                self.unflushed += self.buf.len() as u64;
                if self.unflushed >= bytes {
                    self.unflushed = 0;
                    let _ = self.flush.send(Kick);
                }
            }
            FlushPolicy::Sync => self.jobs.push(SyncJob {
                end: self.pos,
                visible,
                replies,
            }),
        }
    }
}

/// Polls `rx` for up to `spin`; None when nothing arrived (or the channel closed).
fn spin_recv<T>(rx: &mpsc::Receiver<T>, spin: Duration) -> Option<T> {
    if spin.is_zero() {
        return None;
    }
    let until = Instant::now() + spin;
    loop {
        match rx.try_recv() {
            Ok(v) => return Some(v),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if Instant::now() >= until => return None,
            Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
}

/// Sync mode: makes written batches durable with one fdatasync per group, then publishes
/// and acknowledges them (see *Cohorts* in the module docs for the wait).
fn syncer(shared: Arc<Shared>, rx: mpsc::Receiver<SyncJob>, _flusher: mpsc::Sender<Kick>) {
    set_thread_nice(shared.config.syncer_nice, "syncer");
    let count = |jobs: &[SyncJob]| jobs.iter().map(|j| j.replies.len()).sum::<usize>();
    while let Ok(first) = rx.recv() {
        // Before `awaiting_sync` drops: the writer checks both to know the syncer is idle.
        shared.syncer_busy.store(true, Ordering::SeqCst);
        let mut jobs = vec![first];
        while let Ok(j) = rx.try_recv() {
            jobs.push(j);
        }
        let mut n = count(&jobs);
        let expected = shared.cohort.load(Ordering::Acquire) as usize;
        if n < expected {
            let last = Duration::from_nanos(shared.last_fsync_nanos.load(Ordering::Relaxed));
            // A quarter of an fdatasync: when syncs cost about as much as the appenders'
            // own round trip (fast disks), waiting longer idles the disk for no gain.
            let deadline = Instant::now() + shared.config.group_commit_wait.min(last / 4);
            while n < expected {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(j) => {
                        jobs.push(j);
                        while let Ok(j) = rx.try_recv() {
                            jobs.push(j);
                        }
                        n = count(&jobs);
                    }
                    Err(_) => break,
                }
            }
        }
        shared.awaiting_sync.fetch_sub(n as u64, Ordering::AcqRel);
        sync_and_answer(&shared, jobs);
        let expected = n
            + shared.queued.load(Ordering::Acquire) as usize
            + shared.awaiting_sync.load(Ordering::Acquire) as usize;
        shared.cohort.store(expected as u64, Ordering::Release);
        shared.syncer_busy.store(false, Ordering::SeqCst);
    }
}

/// Sets the nice value of the calling thread (Linux schedules threads one by one); zero
/// leaves it alone. A refusal (no `CAP_SYS_NICE`) is logged once and otherwise ignored.
fn set_thread_nice(nice: i32, thread: &str) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid has no preconditions; setpriority takes plain integers.
    let tid = unsafe { libc::gettid() };
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        tracing::info!(thread, nice, error = %e, "cannot change the thread's priority (needs CAP_SYS_NICE); it keeps the process's");
    }
}

/// Sync mode: one fdatasync covering `jobs`, then their records become visible and their
/// appends are answered; after a failed fdatasync the store is fenced and nothing is
/// acknowledged.
fn sync_and_answer(shared: &Shared, jobs: Vec<SyncJob>) {
    let end = jobs.iter().map(|j| j.end).max().unwrap_or(0);
    // Group commit: this one fdatasync covers every batch in `jobs`. In Sync mode only
    // the syncer, or the writer while the syncer holds nothing, syncs the commit log, so
    // at most one fdatasync of it is in flight.
    let durable = shared.durable.load(Ordering::Acquire);
    let synced = match shared.fenced_error() {
        Some(e) => Err(e),
        None if end > durable => shared.sync_clog(durable, end),
        None => Ok(()),
    };
    match synced {
        Ok(()) => {
            shared.durable.fetch_max(end, Ordering::AcqRel);
            for j in jobs {
                for (q, next) in &j.visible {
                    q.visible.fetch_max(*next, Ordering::AcqRel);
                    shared.notify(q, *next);
                }
                answer(shared, j.replies);
            }
        }
        Err(e) => {
            // fsyncgate: after a failed fsync the page cache may have dropped the dirty
            // pages, so a retry could "succeed" without the data. Never acknowledge
            // after it.
            shared.fence(e.to_string());
            let why = shared.fenced.lock().clone().unwrap_or_default();
            for j in jobs {
                for (reply, _, r) in j.replies {
                    let _ = reply.send(r.and(Err(StoreError::Fenced(why.clone()))));
                }
            }
        }
    }
}

/// Background durability: in Async mode syncs the commit log every interval or when kicked;
/// in both modes writes checkpoints (queue and index files synced first).
fn flusher(shared: Arc<Shared>, rx: mpsc::Receiver<Kick>) {
    let ckpt_every = shared.config.checkpoint_interval;
    let wake_every = match shared.config.flush {
        FlushPolicy::Sync => ckpt_every,
        FlushPolicy::Async { interval, .. } => interval.min(ckpt_every),
    };
    // Checkpoints run on a thread of their own: one over many dirty queues can take seconds
    // (a file write per queue tail, then `syncfs`), and the Async commit log must still be
    // synced every `interval` meanwhile, or the window an Async power loss can take grows
    // with the number of queues. At most one checkpoint waits behind the running one.
    let (ckpt_tx, ckpt_rx) = mpsc::sync_channel::<bool>(1);
    let s = shared.clone();
    let checkpointer = std::thread::Builder::new()
        .name("sluice-store-ckpt".into())
        .spawn(move || checkpointer(s, ckpt_rx));
    let checkpointer = match checkpointer {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "no checkpoint thread; checkpoints run on the flusher");
            None
        }
    };
    let mut last_ckpt = Instant::now();
    let mut stop = false;
    loop {
        match rx.recv_timeout(wake_every) {
            Ok(Kick) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => stop = true,
        }
        while let Ok(Kick) = rx.try_recv() {}
        // In Sync mode the writer syncs the commit log itself, before acknowledging.
        if let FlushPolicy::Async { .. } = shared.config.flush {
            let durable = shared.durable.load(Ordering::Acquire);
            let target = shared.written.load(Ordering::Acquire);
            if target > durable && !shared.is_fenced.load(Ordering::Acquire) {
                match shared.sync_clog(durable, target) {
                    Ok(()) => shared.durable.store(target, Ordering::Release),
                    // fsyncgate: after a failed fsync the page cache may have dropped the
                    // dirty pages, so a retry could "succeed" without the data.
                    Err(e) => shared.fence(e.to_string()),
                }
            }
        }
        let fenced = shared.fenced_error();
        if (stop || last_ckpt.elapsed() >= ckpt_every) && fenced.is_none() {
            last_ckpt = Instant::now();
            match &checkpointer {
                // The closing one waits for a place: it comes after the final sync above.
                Some(_) if stop => {
                    let _ = ckpt_tx.send(true);
                }
                // Skipped while one is already waiting: that one covers this interval.
                Some(_) => {
                    let _ = ckpt_tx.try_send(false);
                }
                None => {
                    if let Err(e) = shared.checkpoint(stop) {
                        shared.fence(e.to_string());
                    }
                }
            }
        }
        if stop {
            break;
        }
    }
    drop(ckpt_tx);
    if let Some(h) = checkpointer {
        // The store's close waits for this thread, so for the closing checkpoint too.
        let _ = h.join();
    }
}

/// Writes the checkpoints the flusher asks for (`true`: the closing one).
fn checkpointer(shared: Arc<Shared>, rx: mpsc::Receiver<bool>) {
    while let Ok(closing) = rx.recv() {
        if shared.fenced_error().is_some() {
            continue;
        }
        if let Err(e) = shared.checkpoint(closing) {
            shared.fence(e.to_string());
        }
    }
}

#[cfg(test)]
mod spin_tests {
    use super::*;

    #[test]
    fn spin_recv_takes_what_arrives_during_the_spin_and_gives_up_after_it() {
        let (tx, rx) = mpsc::channel::<u32>();
        // Nothing spins with a zero budget, even when something is queued.
        tx.send(1).expect("send");
        assert_eq!(spin_recv(&rx, Duration::ZERO), None);
        assert_eq!(spin_recv(&rx, Duration::from_millis(1)), Some(1));
        // Empty: gives up once the budget is spent.
        let t = Instant::now();
        assert_eq!(spin_recv(&rx, Duration::from_millis(2)), None);
        assert!(t.elapsed() >= Duration::from_millis(2));
        // A value sent by another thread during the spin is taken.
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            tx.send(7).expect("send");
            tx
        });
        assert_eq!(spin_recv(&rx, Duration::from_secs(60)), Some(7));
        // Closed: no wait.
        drop(sender.join().expect("join"));
        let t = Instant::now();
        assert_eq!(spin_recv(&rx, Duration::from_secs(60)), None);
        assert!(t.elapsed() < Duration::from_secs(60));
    }
}
