//! The Sluice storage engine.
//!
//! Every message of every queue is appended to one commit log ([`commitlog`]); per-queue
//! consume queues ([`consume_queue`]) index it by logical offset, and a hash index
//! ([`index`]) finds records by message id or key. One writer thread batches concurrent
//! appends into one write (group commit); one flusher thread makes them durable according to
//! the [`FlushPolicy`] and writes checkpoints ([`checkpoint`]) from which recovery starts.
//!
//! *Architecture invariant*: no network or protocol types here; the broker calls
//! [`Store`] and nothing else.

pub mod checkpoint;
pub mod commitlog;
pub mod consume_queue;
#[cfg(any(test, feature = "fault-injection"))]
pub mod faulty;
mod file_cache;
pub mod fs;
pub mod index;
pub mod record;
mod store;
mod zero_ahead;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use commitlog::ScanOutcome;
pub use consume_queue::{CqEntry, tag_hash};
pub use fs::{FsSync, StdFs, VFile, Vfs};
pub use record::{AppendMessage, PROP_KEYS, PROP_MSG_ID, PROP_TAGS, StoredMessage};
pub use store::{
    AppendResult, ReadBatch, ReadStatus, RecoveryReport, RetentionReport, Store, StoreStats,
};

/// When appended records become durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// An append completes only after its bytes were `fdatasync`ed, sharing the sync with
    /// every append that was written with it (group commit).
    Sync,
    /// An append completes once written to the page cache; a background flush runs every
    /// `interval` or after `bytes` unflushed bytes, whichever comes first. A crash of the
    /// machine (not of the process) can lose up to that window.
    Async { interval: Duration, bytes: u64 },
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub data_dir: PathBuf,
    /// Maximum size of a commit-log segment file.
    pub segment_size: u64,
    pub flush: FlushPolicy,
    /// Largest encoded record accepted.
    pub max_record_size: u32,
    /// Entries per consume-queue file.
    pub cq_entries_per_file: u64,
    /// Consume-queue files kept open at once (least recently used closed first): bounds the
    /// store's file descriptors however many queues it holds.
    pub open_queue_files: usize,
    /// Hash slots per index file.
    pub index_slots: u32,
    /// Entries per index file.
    pub index_entries: u32,
    /// Segments whose every record is older than this are deleted.
    pub retention: Option<Duration>,
    /// Oldest segments are deleted while the commit log is larger than this.
    pub disk_budget: Option<u64>,
    /// Appends are refused while the file system has less free space than this.
    pub min_free_space: u64,
    /// How often the flusher writes a checkpoint.
    pub checkpoint_interval: Duration,
    /// Most bytes one group commit writes at once.
    pub max_batch_bytes: usize,
    /// Sync only: longest the writer waits for appenders that are expected back before it
    /// starts an fdatasync with a smaller batch than the previous one (never longer than a
    /// quarter of the last fdatasync). Zero turns the wait off.
    pub group_commit_wait: Duration,
    /// Sync only: bytes of the active segment kept zero-filled and written back in front of
    /// the writer, so that appends overwrite ordinary blocks and an fdatasync commits no
    /// extent change (see `zero_ahead.rs`). Zero turns it off.
    pub zero_ahead: u64,
    /// Sync only: while the syncer thread is idle and a group commit holds at most this
    /// many appends, the writer runs the fdatasync itself instead of handing the batch over
    /// (one thread wake-up fewer per group commit). Larger groups go to the syncer, so that
    /// writing the next group overlaps the fdatasync of this one. Zero turns it off.
    pub inline_sync_max: usize,
    /// Sync only: after a group commit it synced itself, how long the writer polls for the
    /// next append before it sleeps. The appenders just answered come back within tens of
    /// microseconds, while waking a sleeping thread costs about as much again on a VM; the
    /// spin takes at most this much of one core per group commit. Zero sleeps at once.
    pub inline_sync_spin: Duration,
    /// Sync only: nice value of the syncer thread, on which every large group commit waits
    /// (its fdatasync, then answering the appenders). When it became runnable it often
    /// queued behind the writer and the runtime's threads; a negative value lets it run
    /// first. Lowering it needs `CAP_SYS_NICE` (or root): without, the thread keeps the
    /// process's priority and the store says so once. Zero leaves it alone.
    pub syncer_nice: i32,
}

impl StoreConfig {
    /// Production defaults rooted at `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            segment_size: 1 << 30,
            flush: FlushPolicy::Sync,
            max_record_size: 4 << 20 | 64 << 10,
            cq_entries_per_file: 300_000,
            open_queue_files: 4096,
            index_slots: 1 << 20,
            index_entries: 4 << 20,
            retention: Some(Duration::from_secs(72 * 3600)),
            disk_budget: None,
            min_free_space: 1 << 30,
            checkpoint_interval: Duration::from_secs(1),
            max_batch_bytes: 4 << 20,
            group_commit_wait: Duration::from_millis(1),
            zero_ahead: 8 << 20,
            inline_sync_max: 64,
            inline_sync_spin: Duration::from_micros(20),
            syncer_nice: -10,
        }
    }

    /// Small files for tests.
    pub fn small(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            segment_size: 1 << 20,
            max_record_size: 256 << 10,
            cq_entries_per_file: 1000,
            // Few, so that tests also run with queue files closed and reopened.
            open_queue_files: 8,
            index_slots: 1024,
            index_entries: 4096,
            min_free_space: 0,
            checkpoint_interval: Duration::from_millis(100),
            zero_ahead: 256 << 10,
            ..StoreConfig::new(data_dir)
        }
    }
}

/// Stable error codes: never reuse a number.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("I/O error during {op} on {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("corrupt data in {file} at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        offset: u64,
        reason: String,
    },
    #[error("the store refuses writes after a failed fsync or write ({0}); restart to recover")]
    Fenced(String),
    #[error("only {available} bytes free, below the threshold of {threshold}; writes are refused")]
    DiskFull { available: u64, threshold: u64 },
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    #[error("offset {0} is no longer stored")]
    OffsetGone(u64),
    #[error("the store is closed")]
    Closed,
    #[error("data directory {0} is locked by another process")]
    Locked(String),
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }

    /// Stable numeric code for logs and protocol edges.
    pub fn code(&self) -> u32 {
        match self {
            StoreError::Io { .. } => 1001,
            StoreError::Corrupt { .. } => 1002,
            StoreError::Fenced(_) => 1003,
            StoreError::DiskFull { .. } => 1004,
            StoreError::InvalidMessage(_) => 1005,
            StoreError::OffsetGone(_) => 1006,
            StoreError::Closed => 1007,
            StoreError::Locked(_) => 1008,
        }
    }
}

#[cfg(test)]
mod tests;
