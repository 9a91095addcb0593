//! Consume queues: the per-(topic, queue) index into the commit log.
//!
//! A consumer reads a queue by logical offset. Each queue is a directory
//! `consumequeue/<topic>/<queue_id>/` of files holding `entries_per_file` fixed-size entries,
//! each file named by the queue offset of its first entry (20 digits).
//!
//! ```text
//!  entry (28 bytes, little-endian)
//!   0  8  commit-log offset of the record
//!   8  4  record size
//!  12  8  tag hash (FNV-1a 64 of the tag, 0 = no tag)
//!  20  8  store timestamp, ms
//! ```
//!
//! Invariants: entry `n` of a queue lives at byte `(n - file_start) * 28` of its file; a
//! queue's commit-log offsets increase with the queue offset; an all-zero entry is a hole
//! (skipped by readers). Write: only the store's writer appends. New entries at the end are
//! collected in an in-memory tail and written to the file `TAIL_ENTRIES` at a time (or when
//! the store checkpoints, closes or bounds the memory of all tails), so appends do not pay a
//! `pwrite` per queue per batch; losing the tail in a crash is what recovery repairs anyway
//! (the checkpoint is written only after the tails below it are in the files). Read:
//! readers see entries below `visible`, which moves after the record is durable (Sync) or
//! written (Async), from the files or from the tail.
//! Recover: entries that point past the valid end of the commit log are cut off, and missing
//! ones are written again by replaying the commit log. Delete: retention drops files whose
//! every entry points below the commit log's minimum offset.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::file_cache::FileCache;
use crate::fs::{VFile, Vfs, join, offset_name, parse_offset_name};

pub const CQ_ENTRY_SIZE: u64 = 28;

/// Entries a queue collects in memory before writing them out (just under 4 KiB).
pub const TAIL_ENTRIES: usize = 146;

/// One consume-queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CqEntry {
    pub clog_offset: u64,
    pub size: u32,
    pub tag_hash: u64,
    pub store_ts: i64,
}

impl CqEntry {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.clog_offset.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.tag_hash.to_le_bytes());
        out.extend_from_slice(&self.store_ts.to_le_bytes());
    }

    /// Decodes one entry from exactly 28 bytes.
    pub fn decode(b: &[u8]) -> Option<CqEntry> {
        if b.len() != CQ_ENTRY_SIZE as usize {
            return None;
        }
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        Some(CqEntry {
            clog_offset: u64_at(0),
            size: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            tag_hash: u64_at(12),
            store_ts: u64_at(20) as i64,
        })
    }

    pub fn is_hole(&self) -> bool {
        self.size == 0
    }
}

/// FNV-1a 64 of a tag; 0 is reserved for "no tag".
pub fn tag_hash(tag: &str) -> u64 {
    let h = crate::index::fnv1a(tag.as_bytes());
    if h == 0 { 1 } else { h }
}

/// Entries at the end of a queue that are not in its files yet.
struct Tail {
    /// Queue offset of the first; everything below it is in the files.
    first: u64,
    bytes: Vec<u8>,
}

impl Tail {
    fn len(&self) -> u64 {
        self.bytes.len() as u64 / CQ_ENTRY_SIZE
    }
}

pub(crate) struct ConsumeQueue {
    pub topic: String,
    pub queue_id: u32,
    dir: PathBuf,
    entries_per_file: u64,
    /// Start offsets of the queue's files. Their handles are in `cache` while open.
    files: RwLock<BTreeSet<u64>>,
    cache: Arc<FileCache>,
    /// This queue's owner number in `cache`.
    owner: u64,
    /// Lowest offset still readable (moved by retention).
    pub min_offset: AtomicU64,
    /// Entries written, to the files or the tail (next offset to assign). Writer only.
    pub written: AtomicU64,
    /// Entries not yet in the files, encoded, for offsets `tail.first..written`.
    tail: Mutex<Tail>,
    /// Entries readers may see.
    pub visible: AtomicU64,
    /// Entries known durable on disk.
    synced: AtomicU64,
    /// Set when the writer added entries since the last checkpoint.
    pub dirty: AtomicBool,
    /// Set when a file or directory was created since the last checkpoint.
    new_files: AtomicBool,
}

impl ConsumeQueue {
    pub fn dir_for(root: &Path, topic: &str, queue_id: u32) -> PathBuf {
        root.join(topic).join(queue_id.to_string())
    }

    /// Opens (or creates) a queue directory. A trailing partial entry is cut off; the
    /// returned flag says whether the files looked damaged (partial entry or a short file
    /// in the middle), in which case the caller rebuilds from the commit log. Files are
    /// sized here, not opened: their handles go into `cache` (which bounds how many are
    /// open at once) when they are first read or written.
    pub fn open(
        vfs: &dyn Vfs,
        root: &Path,
        topic: &str,
        queue_id: u32,
        entries_per_file: u64,
        cache: Arc<FileCache>,
    ) -> io::Result<(ConsumeQueue, bool)> {
        let dir = Self::dir_for(root, topic, queue_id);
        // Listed first: a store with a million queues opens a million existing directories,
        // and only a new queue needs the checks and the `mkdir` of `create_dir_all`.
        let (names, created) = match vfs.list_dir(&dir) {
            Ok(names) => (names, false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                vfs.create_dir_all(&dir)?;
                (Vec::new(), true)
            }
            Err(e) => return Err(e),
        };
        let owner = cache.owner();
        let mut files = BTreeSet::new();
        let mut damaged = false;
        let mut next = 0u64;
        let starts: Vec<u64> = names.iter().filter_map(|n| parse_offset_name(n)).collect();
        for (i, &start) in starts.iter().enumerate() {
            // Sized without opening: the files are opened (through `cache`) when read or
            // written.
            let path = join(&dir, &offset_name(start));
            let len = vfs.file_len(&path)?;
            let whole = len / CQ_ENTRY_SIZE * CQ_ENTRY_SIZE;
            if whole != len {
                damaged = true;
                vfs.open(&path, false)?.set_len(whole)?;
            }
            let n = whole / CQ_ENTRY_SIZE;
            if i + 1 < starts.len() && n != entries_per_file {
                damaged = true;
            }
            if start % entries_per_file != 0 {
                damaged = true;
            }
            next = start + n;
            files.insert(start);
        }
        let min = starts.first().copied().unwrap_or(0);
        let q = ConsumeQueue {
            topic: topic.to_owned(),
            queue_id,
            dir,
            entries_per_file,
            files: RwLock::new(files),
            cache,
            owner,
            min_offset: AtomicU64::new(min),
            written: AtomicU64::new(next),
            tail: Mutex::new(Tail {
                first: next,
                bytes: Vec::new(),
            }),
            visible: AtomicU64::new(next),
            synced: AtomicU64::new(next),
            dirty: AtomicBool::new(false),
            new_files: AtomicBool::new(created),
        };
        Ok((q, damaged))
    }

    fn file_for(
        &self,
        vfs: &dyn Vfs,
        start: u64,
        create: bool,
    ) -> io::Result<Option<Arc<dyn VFile>>> {
        let path = || join(&self.dir, &offset_name(start));
        if !self.files.read().contains(&start) {
            if !create {
                return Ok(None);
            }
            let mut files = self.files.write();
            if !files.contains(&start) {
                let f = vfs.open(&path(), true)?;
                files.insert(start);
                self.cache.insert((self.owner, start), f.clone());
                self.new_files.store(true, Ordering::Release);
                return Ok(Some(f));
            }
        }
        match self
            .cache
            .get_or_open((self.owner, start), || vfs.open(&path(), false))
        {
            Ok(f) => Ok(Some(f)),
            // Deleted by retention since it was looked up: as if it had been gone before.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && !self.files.read().contains(&start) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes entries for offsets `first..first + entries.len()`. Entries that continue the
    /// queue go to the tail (written out once it holds `TAIL_ENTRIES`); any other position
    /// (recovery rewriting or leaving a hole) is written to the files at once.
    pub fn write(&self, vfs: &dyn Vfs, first: u64, entries: &[CqEntry]) -> io::Result<()> {
        let mut tail = self.tail.lock();
        if first == tail.first + tail.len() {
            for e in entries {
                e.encode(&mut tail.bytes);
            }
            if tail.len() >= TAIL_ENTRIES as u64 {
                self.write_tail(vfs, &mut tail)?;
            }
        } else {
            self.write_tail(vfs, &mut tail)?;
            let mut buf = Vec::with_capacity(entries.len() * CQ_ENTRY_SIZE as usize);
            for e in entries {
                e.encode(&mut buf);
            }
            self.write_files(vfs, first, &buf)?;
            tail.first = tail.first.max(first + entries.len() as u64);
        }
        self.written
            .fetch_max(first + entries.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    /// Writes the tail to the files (the store's checkpoint, close and memory bound).
    pub fn flush_tail(&self, vfs: &dyn Vfs) -> io::Result<()> {
        self.write_tail(vfs, &mut self.tail.lock())
    }

    /// Entries in the tail.
    #[cfg(test)]
    pub fn tail_len(&self) -> u64 {
        self.tail.lock().len()
    }

    fn write_tail(&self, vfs: &dyn Vfs, tail: &mut Tail) -> io::Result<()> {
        if tail.bytes.is_empty() {
            return Ok(());
        }
        self.write_files(vfs, tail.first, &tail.bytes)?;
        tail.first += tail.len();
        tail.bytes.clear();
        Ok(())
    }

    /// Writes encoded entries for offsets from `first` into the files, creating them as
    /// needed.
    fn write_files(&self, vfs: &dyn Vfs, first: u64, mut rest: &[u8]) -> io::Result<()> {
        let mut off = first;
        while !rest.is_empty() {
            let start = off / self.entries_per_file * self.entries_per_file;
            let room = ((start + self.entries_per_file - off) * CQ_ENTRY_SIZE) as usize;
            let (now, later) = rest.split_at(room.min(rest.len()));
            let f = self
                .file_for(vfs, start, true)?
                .ok_or_else(|| io::Error::other("no file"))?;
            f.write_all_at(now, (off - start) * CQ_ENTRY_SIZE)?;
            off += now.len() as u64 / CQ_ENTRY_SIZE;
            rest = later;
        }
        Ok(())
    }

    /// Copies the tail's entries for `from..end` (those at or above the tail's first) into
    /// `out`, and returns the tail's first offset: entries below it are in the files.
    fn read_tail(&self, from: u64, end: u64, out: &mut Vec<CqEntry>) -> u64 {
        let tail = self.tail.lock();
        let lo = from.max(tail.first);
        let hi = end.min(tail.first + tail.len());
        if lo < hi {
            let a = ((lo - tail.first) * CQ_ENTRY_SIZE) as usize;
            let b = ((hi - tail.first) * CQ_ENTRY_SIZE) as usize;
            for c in tail.bytes[a..b].chunks_exact(CQ_ENTRY_SIZE as usize) {
                out.push(CqEntry::decode(c).unwrap_or_default());
            }
        }
        tail.first
    }

    /// Reads up to `max` entries from `from`, stopping at `visible` (or at a file that
    /// retention removed, see [`Self::read_files`]): entry `i` is the one at `from + i`.
    pub fn read(&self, vfs: &dyn Vfs, from: u64, max: u64) -> io::Result<Vec<CqEntry>> {
        let end = self
            .visible
            .load(Ordering::Acquire)
            .min(from.saturating_add(max));
        let mut from_tail = Vec::new();
        let in_files = self.read_tail(from, end, &mut from_tail);
        let files_end = end.min(in_files).max(from);
        let mut out = self.read_files(vfs, from, files_end)?;
        if out.len() as u64 == files_end - from {
            out.append(&mut from_tail);
        }
        Ok(out)
    }

    /// Reads the entries `from..end` from the files. Entry `i` of the result is the entry
    /// at offset `from + i`: at a file that retention removed (only ever below the queue's
    /// minimum, which a reader may have checked just before it moved) the result ends.
    fn read_files(&self, vfs: &dyn Vfs, from: u64, end: u64) -> io::Result<Vec<CqEntry>> {
        let mut out = Vec::new();
        let mut off = from;
        let mut buf = Vec::new();
        while off < end {
            let start = off / self.entries_per_file * self.entries_per_file;
            let stop = end.min(start + self.entries_per_file);
            let Some(f) = self.file_for(vfs, start, false)? else {
                break;
            };
            buf.resize(((stop - off) * CQ_ENTRY_SIZE) as usize, 0);
            f.read_exact_at(&mut buf, (off - start) * CQ_ENTRY_SIZE)?;
            for c in buf.chunks_exact(CQ_ENTRY_SIZE as usize) {
                out.push(CqEntry::decode(c).unwrap_or_default());
            }
            off = stop;
        }
        Ok(out)
    }

    pub fn entry(&self, vfs: &dyn Vfs, offset: u64) -> io::Result<Option<CqEntry>> {
        Ok(self.read(vfs, offset, 1)?.into_iter().next())
    }

    /// Reads an entry below `written` regardless of visibility (recovery only).
    pub fn entry_written(&self, vfs: &dyn Vfs, offset: u64) -> io::Result<Option<CqEntry>> {
        if offset >= self.written.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut from_tail = Vec::new();
        if offset >= self.read_tail(offset, offset + 1, &mut from_tail) {
            return Ok(from_tail.into_iter().next());
        }
        let start = offset / self.entries_per_file * self.entries_per_file;
        let Some(f) = self.file_for(vfs, start, false)? else {
            return Ok(None);
        };
        let mut b = [0u8; CQ_ENTRY_SIZE as usize];
        f.read_exact_at(&mut b, (offset - start) * CQ_ENTRY_SIZE)?;
        Ok(CqEntry::decode(&b))
    }

    /// Drops entries at and after `next` (recovery).
    pub fn truncate(&self, vfs: &dyn Vfs, next: u64) -> io::Result<()> {
        let mut tail = self.tail.lock();
        self.write_tail(vfs, &mut tail)?;
        tail.first = next;
        let starts: Vec<u64> = self.files.read().iter().copied().collect();
        for start in starts {
            let only = self.files.read().len() == 1;
            if start >= next && !(start == 0 && next == 0 && only) {
                if self.files.write().remove(&start) {
                    self.cache.remove((self.owner, start));
                    vfs.remove_file(&join(&self.dir, &offset_name(start)))?;
                }
            } else if start + self.entries_per_file > next {
                if let Some(f) = self.file_for(vfs, start, false)? {
                    f.set_len((next - start) * CQ_ENTRY_SIZE)?;
                }
            }
        }
        self.written.store(next, Ordering::Release);
        self.visible.store(next, Ordering::Release);
        self.synced.store(
            next.min(self.synced.load(Ordering::Acquire)),
            Ordering::Release,
        );
        if self.min_offset.load(Ordering::Acquire) > next {
            self.min_offset.store(next, Ordering::Release);
        }
        Ok(())
    }

    /// Number of entries visible to readers.
    pub fn max_offset(&self) -> u64 {
        self.visible.load(Ordering::Acquire)
    }

    /// Makes written entries durable, and adds to `dirs` the directories to sync for its new
    /// files to be durable too (the caller syncs each once, however many queues share it);
    /// called by the checkpoint. With `files` false the tail is written out but nothing is
    /// synced: the caller syncs the whole file system instead, before it relies on them.
    pub fn sync(
        &self,
        vfs: &dyn Vfs,
        root: &Path,
        dirs: &mut BTreeSet<PathBuf>,
        files: bool,
    ) -> io::Result<()> {
        // Clear the flag before reading `written`: entries the writer adds from now on mark
        // the queue dirty again, so no checkpoint can miss them.
        self.dirty.store(false, Ordering::Release);
        self.flush_tail(vfs)?;
        let written = self.tail.lock().first;
        let synced = self.synced.load(Ordering::Acquire);
        if written > synced && files {
            let starts: Vec<u64> = self
                .files
                .read()
                .range(synced / self.entries_per_file * self.entries_per_file..)
                .copied()
                .collect();
            for start in starts {
                let Some(f) = self.file_for(vfs, start, false)? else {
                    continue;
                };
                // Consume-queue data is derived, but syncing it lets recovery start from the
                // checkpoint instead of replaying the whole commit log. (The handle may be
                // newer than the writes: an fdatasync covers the file's dirty pages,
                // whichever descriptor wrote them.)
                f.sync_data()?;
            }
        }
        if written > synced {
            self.synced.store(written, Ordering::Release);
        }
        if self.new_files.swap(false, Ordering::AcqRel) {
            // New queue files and directories must survive a crash before the checkpoint
            // claims their entries.
            dirs.insert(self.dir.clone());
            if let Some(topic_dir) = self.dir.parent() {
                dirs.insert(topic_dir.to_path_buf());
            }
            dirs.insert(root.to_path_buf());
        }
        Ok(())
    }

    /// First offset whose store timestamp is at or after `ts` (`max_offset` if none).
    pub fn offset_for_time(&self, vfs: &dyn Vfs, ts: i64) -> io::Result<u64> {
        let (mut lo, mut hi) = (self.min_offset.load(Ordering::Acquire), self.max_offset());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.entry(vfs, mid)? {
                Some(e) if !e.is_hole() && e.store_ts < ts => lo = mid + 1,
                _ => hi = mid,
            }
        }
        // Retention may have moved the minimum meanwhile (its removed files read as no
        // entry, which sends the search down): never answer below it.
        Ok(lo.max(self.min_offset.load(Ordering::Acquire)))
    }

    /// Retention: moves the minimum offset past entries below `clog_min` and deletes files
    /// whose every entry lies there.
    pub fn advance_min(&self, vfs: &dyn Vfs, clog_min: u64) -> io::Result<u64> {
        let (mut lo, mut hi) = (self.min_offset.load(Ordering::Acquire), self.max_offset());
        // Nothing lies below a commit log that still starts at 0: no entry to read (the
        // store runs this for every queue when it opens).
        if clog_min == 0 {
            return Ok(lo);
        }
        // Usually the first entry is above it already: one read, not a binary search.
        if lo < hi
            && self
                .entry(vfs, lo)?
                .is_none_or(|e| e.clog_offset >= clog_min)
        {
            return Ok(lo);
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.entry(vfs, mid)? {
                Some(e) if e.clog_offset < clog_min => lo = mid + 1,
                _ => hi = mid,
            }
        }
        self.min_offset.fetch_max(lo, Ordering::AcqRel);
        let mut files = self.files.write();
        let doomed: Vec<u64> = files
            .iter()
            .copied()
            .filter(|&s| s + self.entries_per_file <= lo)
            .collect();
        for s in doomed {
            files.remove(&s);
            self.cache.remove((self.owner, s));
            vfs.remove_file(&join(&self.dir, &offset_name(s)))?;
        }
        Ok(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::StdFs;

    /// Room for a single handle: every test below also runs with files closed and opened
    /// again between operations.
    fn cache() -> Arc<FileCache> {
        Arc::new(FileCache::new(1))
    }

    fn e(i: u64) -> CqEntry {
        CqEntry {
            clog_offset: i * 100,
            size: 100,
            tag_hash: i,
            store_ts: 1000 + i as i64,
        }
    }

    #[test]
    fn write_read_across_files_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = StdFs;
        let (q, damaged) = ConsumeQueue::open(&fs, dir.path(), "t", 0, 4, cache()).expect("open");
        assert!(!damaged);
        let entries: Vec<_> = (0..10).map(e).collect();
        q.write(&fs, 0, &entries).expect("write");
        q.visible.store(10, Ordering::SeqCst);
        assert_eq!(q.read(&fs, 0, 100).expect("read"), entries);
        assert_eq!(q.read(&fs, 3, 4).expect("read"), entries[3..7].to_vec());
        assert_eq!(q.offset_for_time(&fs, 1005).expect("time"), 5);
        assert_eq!(q.offset_for_time(&fs, 99_999).expect("time"), 10);
        q.flush_tail(&fs).expect("flush");
        drop(q);
        let (q, damaged) = ConsumeQueue::open(&fs, dir.path(), "t", 0, 4, cache()).expect("reopen");
        assert!(!damaged);
        assert_eq!(q.max_offset(), 10);
        assert_eq!(q.read(&fs, 8, 100).expect("read"), entries[8..].to_vec());
        q.truncate(&fs, 5).expect("truncate");
        assert_eq!(q.max_offset(), 5);
        assert_eq!(q.advance_min(&fs, 450).expect("advance"), 5);
        q.write(&fs, 5, &entries[5..]).expect("write");
        q.visible.store(10, Ordering::SeqCst);
        assert_eq!(q.advance_min(&fs, 450).expect("advance"), 5);
        // The file holding entries 0..4 is gone; the next file starts at entry 4.
        assert_eq!(q.read(&fs, 4, 100).expect("read")[0], e(4));
        assert!(!dir.path().join("t").join("0").join(offset_name(0)).exists());
        // A reader that looked at the minimum before retention moved it asks for entries
        // the removed file held: it gets none, never a later entry in their place.
        assert_eq!(q.read(&fs, 2, 4).expect("read"), vec![]);
        assert_eq!(q.read(&fs, 0, 100).expect("read"), vec![]);
    }

    #[test]
    fn partial_entry_is_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = StdFs;
        let (q, _) = ConsumeQueue::open(&fs, dir.path(), "t", 1, 8, cache()).expect("open");
        q.write(&fs, 0, &[e(0), e(1)]).expect("write");
        q.flush_tail(&fs).expect("flush");
        drop(q);
        let path = dir.path().join("t").join("1").join(offset_name(0));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open file");
        f.set_len(40).expect("truncate");
        let (q, damaged) = ConsumeQueue::open(&fs, dir.path(), "t", 1, 8, cache()).expect("reopen");
        assert!(damaged);
        assert_eq!(q.written.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn opening_a_queue_sizes_its_files_without_opening_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = StdFs;
        let (q, _) = ConsumeQueue::open(&fs, dir.path(), "t", 3, 4, cache()).expect("open");
        let entries: Vec<_> = (0..10).map(e).collect();
        q.write(&fs, 0, &entries).expect("write");
        q.flush_tail(&fs).expect("flush");
        drop(q);
        let files = Arc::new(FileCache::new(16));
        let (q, damaged) =
            ConsumeQueue::open(&fs, dir.path(), "t", 3, 4, files.clone()).expect("reopen");
        assert!(!damaged);
        assert_eq!(q.written.load(Ordering::SeqCst), 10);
        assert_eq!((files.len(), files.opened()), (0, 0));
        // Nothing below a commit log that starts at 0: no file is read for it either.
        assert_eq!(q.advance_min(&fs, 0).expect("advance"), 0);
        assert_eq!(files.opened(), 0);
        q.visible.store(10, Ordering::SeqCst);
        assert_eq!(q.read(&fs, 8, 2).expect("read"), entries[8..].to_vec());
        assert_eq!(files.opened(), 1);
    }

    #[test]
    fn a_directory_where_a_queue_file_belongs_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("t").join("4").join(offset_name(0)))
            .expect("mkdir");
        assert!(ConsumeQueue::open(&StdFs, dir.path(), "t", 4, 4, cache()).is_err());
    }

    fn file_entries(dir: &Path) -> u64 {
        std::fs::read_dir(dir.join("t").join("2"))
            .expect("dir")
            .map(|f| f.expect("entry").metadata().expect("meta").len() / CQ_ENTRY_SIZE)
            .sum()
    }

    #[test]
    fn tail_collects_entries_until_full_and_is_readable_meanwhile() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = StdFs;
        let (q, _) = ConsumeQueue::open(&fs, dir.path(), "t", 2, 100, cache()).expect("open");
        let n = TAIL_ENTRIES as u64;
        let entries: Vec<_> = (0..2 * n + 5).map(e).collect();
        // One short of a full tail: nothing in the files yet, all of it readable.
        for (i, x) in entries[..n as usize - 1].iter().enumerate() {
            q.write(&fs, i as u64, std::slice::from_ref(x))
                .expect("write");
        }
        assert_eq!(file_entries(dir.path()), 0);
        assert_eq!(q.tail_len(), n - 1);
        q.visible.store(n - 1, Ordering::SeqCst);
        assert_eq!(
            q.read(&fs, 0, 1000).expect("read"),
            entries[..n as usize - 1]
        );
        assert_eq!(q.entry_written(&fs, 7).expect("entry"), Some(e(7)));
        // The entry that fills it writes the tail out (across the 100-entry files).
        q.write(&fs, n - 1, &entries[n as usize - 1..n as usize + 5])
            .expect("write");
        assert_eq!(file_entries(dir.path()), n + 5);
        assert_eq!(q.tail_len(), 0);
        q.write(&fs, n + 5, &entries[n as usize + 5..])
            .expect("write");
        q.visible.store(2 * n + 5, Ordering::SeqCst);
        // A read spanning files and tail, and one inside each.
        assert_eq!(q.read(&fs, 0, 1000).expect("read"), entries);
        assert_eq!(
            q.read(&fs, n, 10).expect("read"),
            entries[n as usize..n as usize + 10]
        );
        assert_eq!(
            q.read(&fs, 2 * n, 3).expect("read"),
            entries[2 * n as usize..2 * n as usize + 3]
        );
        assert_eq!(
            q.offset_for_time(&fs, 1000 + 2 * n as i64).expect("time"),
            2 * n
        );
        // Dropped without a sync, the tail is gone (recovery rebuilds it from the commit
        // log); a sync writes it first.
        q.sync(&fs, dir.path(), &mut BTreeSet::new(), true)
            .expect("sync");
        assert_eq!(file_entries(dir.path()), 2 * n + 5);
        q.write(&fs, 2 * n + 5, &[e(2 * n + 5)]).expect("write");
        drop(q);
        let (q, damaged) =
            ConsumeQueue::open(&fs, dir.path(), "t", 2, 100, cache()).expect("reopen");
        assert!(!damaged);
        assert_eq!(q.max_offset(), 2 * n + 5);
        assert_eq!(q.read(&fs, 0, 1000).expect("read"), entries);
    }

    #[test]
    fn writes_out_of_sequence_go_to_the_files_after_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = StdFs;
        let (q, _) = ConsumeQueue::open(&fs, dir.path(), "t", 2, 100, cache()).expect("open");
        q.write(&fs, 0, &[e(0), e(1)]).expect("write");
        // A hole (recovery of a queue with a gap): the tail goes first, then the entry.
        q.write(&fs, 5, &[e(5)]).expect("write");
        assert_eq!(q.tail_len(), 0);
        q.write(&fs, 6, &[e(6)]).expect("write");
        assert_eq!(q.tail_len(), 1);
        // Rewriting below the end (recovery replaying entries it already has).
        q.write(&fs, 1, &[e(1)]).expect("write");
        q.visible.store(7, Ordering::SeqCst);
        let got = q.read(&fs, 0, 100).expect("read");
        assert_eq!(got.len(), 7);
        assert_eq!((got[0], got[1], got[5], got[6]), (e(0), e(1), e(5), e(6)));
        assert!(got[2].is_hole() && got[4].is_hole());
        q.truncate(&fs, 6).expect("truncate");
        assert_eq!(q.entry_written(&fs, 6).expect("entry"), None);
        q.write(&fs, 6, &[e(9)]).expect("write");
        q.visible.store(7, Ordering::SeqCst);
        assert_eq!(q.entry(&fs, 6).expect("entry"), Some(e(9)));
    }
}
