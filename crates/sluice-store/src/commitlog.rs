//! The commit log: one append-only stream of records for every queue of the broker.
//!
//! Segment files in `commitlog/` are named by the commit-log offset of their first byte (20
//! digits). Offsets are dense: a segment ends where the next begins. A segment is rolled when
//! the next record would make it exceed `segment_size`, so a record never spans two files.
//!
//! Write (writer thread only): records are encoded into one buffer per group of appends and
//! written with one `pwrite`. Sync: segments are `fdatasync`ed in order, oldest first, so a
//! later segment is never more durable than an earlier one. Read: any thread, by `pread` of
//! the exact byte range. Recover: see [`CommitLog::recover`]. Delete: whole segments,
//! oldest first, never the active one.
//!
//! Preallocation. A new segment file gets its full size reserved at once (`fallocate`), so
//! appends overwrite reserved blocks instead of growing the file: a write then never waits
//! for the file system to allocate blocks (on ext4 such a write can wait for the journal
//! commit of a concurrent fdatasync), and an fdatasync has no size change to commit. The reserved space reads as zeros, so the active segment is longer than its data:
//! its data ends at the first record header that is all zeros (no valid record starts with
//! eight zero bytes: the size field of a record is never zero). When the next segment is
//! started the full one is cut to its data length, so sealed segments are exact; recovery
//! also accepts a sealed segment whose cut was lost in a crash. After recovery the active
//! segment is cut to the end of its data, dropping anything a torn write left in the
//! reserved space, and reserved again.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;

use crate::StoreError;
use crate::fs::{VFile, Vfs, join, offset_name, parse_offset_name};
use crate::record::{self, RecordSummary};

/// Why [`CommitLog::create`] failed.
#[derive(Debug)]
pub(crate) enum RollError {
    /// The file could not be created or opened: nothing changed, a later try may work.
    Create(io::Error),
    /// Syncing the directory failed: whether its entries are durable is unknown.
    SyncDir(io::Error),
}

pub(crate) struct Segment {
    pub start: u64,
    pub file: Arc<dyn VFile>,
    pub path: PathBuf,
}

pub(crate) struct CommitLog {
    pub dir: PathBuf,
    vfs: Arc<dyn Vfs>,
    pub segment_size: u64,
    segments: RwLock<Vec<Arc<Segment>>>,
    /// First readable offset (moved by retention).
    pub min_offset: AtomicU64,
}

/// What recovery found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanOutcome {
    /// End of the last valid record.
    pub valid_end: u64,
    /// Bytes cut off after `valid_end` because a record there was invalid (for a
    /// preallocated segment this includes its reserved, never-written space).
    pub dropped_bytes: u64,
    /// Where the cut happened and why, when one did.
    pub truncated_at: Option<(String, u64, String)>,
    pub records_scanned: u64,
}

impl CommitLog {
    pub fn open(vfs: Arc<dyn Vfs>, dir: PathBuf, segment_size: u64) -> io::Result<CommitLog> {
        vfs.create_dir_all(&dir)?;
        let mut segments = Vec::new();
        for name in vfs.list_dir(&dir)? {
            if let Some(start) = parse_offset_name(&name) {
                let path = join(&dir, &name);
                let file = vfs.open(&path, false)?;
                segments.push(Arc::new(Segment { start, file, path }));
            }
        }
        let min = segments.first().map(|s| s.start).unwrap_or(0);
        Ok(CommitLog {
            dir,
            vfs,
            segment_size,
            segments: RwLock::new(segments),
            min_offset: AtomicU64::new(min),
        })
    }

    pub fn segments(&self) -> Vec<Arc<Segment>> {
        self.segments.read().clone()
    }

    pub fn last(&self) -> Option<Arc<Segment>> {
        self.segments.read().last().cloned()
    }

    /// The segments holding any byte of `[from, to)`, oldest first. Segment *i* holds
    /// `[start_i, start_i+1)`, the last one everything from its start.
    pub fn segments_overlapping(&self, from: u64, to: u64) -> Vec<Arc<Segment>> {
        let segs = self.segments.read();
        let first = segs.partition_point(|s| s.start <= from).saturating_sub(1);
        segs[first..]
            .iter()
            .take_while(|s| s.start < to)
            .cloned()
            .collect()
    }

    /// The segment holding `offset`.
    pub fn segment_for(&self, offset: u64) -> Option<Arc<Segment>> {
        let segs = self.segments.read();
        let i = segs.partition_point(|s| s.start <= offset);
        if i == 0 {
            None
        } else {
            Some(segs[i - 1].clone())
        }
    }

    /// Start of the segment after the one that starts at `start` (None for the last one).
    pub fn next_start(&self, start: u64) -> Option<u64> {
        let segs = self.segments.read();
        let i = segs.partition_point(|s| s.start <= start);
        segs.get(i).map(|s| s.start)
    }

    /// Creates the segment starting at `start` and makes it the last one.
    pub fn roll(&self, start: u64) -> io::Result<Arc<Segment>> {
        let seg = self.create(start).map_err(|e| match e {
            RollError::Create(e) | RollError::SyncDir(e) => e,
        })?;
        self.install(seg.clone());
        Ok(seg)
    }

    /// The file of the segment starting at `start`, created and its directory entry
    /// durable, but not part of the log yet ([`CommitLog::install`]). The writer creates it
    /// before it writes anything that needs it: a file that cannot be created (out of
    /// descriptors or inodes) then fails the appends that need it, and nothing else.
    pub fn create(&self, start: u64) -> Result<Arc<Segment>, RollError> {
        let path = join(&self.dir, &offset_name(start));
        let file = self.vfs.open(&path, true).map_err(RollError::Create)?;
        self.reserve(file.as_ref(), &path);
        // The new file's directory entry must be durable before records in it are
        // acknowledged; recovery finds segments by listing the directory.
        self.vfs.sync_dir(&self.dir).map_err(RollError::SyncDir)?;
        Ok(Arc::new(Segment { start, file, path }))
    }

    /// Makes a segment from [`CommitLog::create`] the last one (writer thread).
    pub fn install(&self, seg: Arc<Segment>) {
        self.segments.write().push(seg);
    }

    /// Reserves the full segment size for `file` (see *Preallocation*). Failing to reserve
    /// is not an error: the file then grows as it is written.
    fn reserve(&self, file: &dyn VFile, path: &std::path::Path) {
        match file.allocate(self.segment_size) {
            Ok(true) => {}
            Ok(false) => tracing::debug!(path = %path.display(), "file system cannot preallocate"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "preallocating a segment failed")
            }
        }
    }

    /// Cuts the full segment `seg` to its data, `end` (the writer, before it starts the
    /// next segment).
    pub fn seal(&self, seg: &Segment, end: u64) -> io::Result<()> {
        if seg.file.len()? > end - seg.start {
            seg.file.set_len(end - seg.start)?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset`, which must lie within one segment.
    pub fn read_bytes(&self, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        if offset < self.min_offset.load(Ordering::Acquire) {
            return Err(StoreError::OffsetGone(offset));
        }
        let seg = self
            .segment_for(offset)
            .ok_or(StoreError::OffsetGone(offset))?;
        let mut buf = BytesMut::zeroed(len);
        seg.file
            .read_exact_at(&mut buf, offset - seg.start)
            .map_err(|e| StoreError::io("read commit log", &seg.path, e))?;
        Ok(buf.freeze())
    }

    /// Reads and decodes the record at `offset`.
    pub fn read_record(
        &self,
        offset: u64,
        size_hint: Option<u32>,
    ) -> Result<record::StoredMessage, StoreError> {
        let size = match size_hint {
            Some(s) => s as usize,
            None => {
                let head = self.read_bytes(offset, 8)?;
                record::peek_size(&head).map_err(|e| self.corrupt(offset, e))?
            }
        };
        let buf = self.read_bytes(offset, size)?;
        record::decode(&buf, offset).map_err(|e| self.corrupt(offset, e))
    }

    pub fn corrupt(&self, offset: u64, e: impl std::fmt::Display) -> StoreError {
        let file = self
            .segment_for(offset)
            .map(|s| s.path.display().to_string())
            .unwrap_or_else(|| self.dir.display().to_string());
        StoreError::Corrupt {
            file,
            offset,
            reason: e.to_string(),
        }
    }

    /// Scans from `from` to the end, verifying every record by CRC, calling `on_record` for
    /// each valid one with the offset, its summary and its bytes. At the first invalid record
    /// the log is cut: the segment is truncated there and every later segment deleted. A cut
    /// below `durable` (bytes the checkpoint says were synced) is corruption of acknowledged
    /// data and returns an error instead, changing nothing.
    pub fn recover(
        &self,
        from: u64,
        durable: u64,
        max_record: usize,
        mut on_record: impl FnMut(u64, &RecordSummary, &[u8]) -> Result<(), StoreError>,
    ) -> Result<ScanOutcome, StoreError> {
        let segs = self.segments();
        let mut out = ScanOutcome::default();
        let Some(first) = segs.first() else {
            return Ok(out);
        };
        let mut pos = from.max(first.start);
        let mut cut: Option<(usize, u64, String)> = None;
        // (segment index, end of its data) when the last segment's data ends before its file.
        let mut tail: Option<(usize, u64)> = None;
        const CHUNK: usize = 8 << 20;
        let mut buf: Vec<u8> = Vec::new();
        'segments: for (i, seg) in segs.iter().enumerate() {
            let len = seg
                .file
                .len()
                .map_err(|e| StoreError::io("stat segment", &seg.path, e))?;
            let end = seg.start + len;
            let next_start = segs.get(i + 1).map(|s| s.start);
            if let Some(n) = next_start.filter(|&n| n <= pos && end >= n) {
                // Entirely before the starting point. A sealed segment reaches the next one;
                // one whose cut was lost in a crash reaches past it with reserved zeros,
                // which nothing ever reads (offsets from `n` on live in the next segment).
                if end > n {
                    self.seal(seg, n)
                        .map_err(|e| StoreError::io("cut segment", &seg.path, e))?;
                }
                continue;
            }
            if seg.start > pos {
                cut = Some((
                    i,
                    pos,
                    format!(
                        "gap: segment starts at {} but the log ends at {pos}",
                        seg.start
                    ),
                ));
                break;
            }
            if end < pos {
                cut = Some((
                    i,
                    end,
                    format!("segment ends at {end}, before offset {pos}"),
                ));
                break;
            }
            let mut chunk_start = pos;
            buf.clear();
            // Set when the data of this segment ends before its file does (preallocated).
            let mut data_end: Option<u64> = None;
            while pos < end {
                let at = (pos - chunk_start) as usize;
                let avail = buf.len() - at;
                if avail >= 8 && buf[at..at + 8] == [0u8; 8] {
                    data_end = Some(pos);
                    break;
                }
                let need = if avail >= 8 {
                    match record::peek_size(&buf[at..]) {
                        Ok(s) if s <= max_record => s,
                        Ok(s) => {
                            cut = Some((
                                i,
                                pos,
                                format!("record size {s} exceeds the limit {max_record}"),
                            ));
                            break 'segments;
                        }
                        Err(e) => {
                            cut = Some((i, pos, e.to_string()));
                            break 'segments;
                        }
                    }
                } else {
                    8
                };
                if pos + need as u64 > end {
                    if avail < 8 {
                        // Fewer than 8 bytes before the end of the file: zeros there are the
                        // rest of the reserved space, anything else a torn header.
                        let mut rest = vec![0u8; (end - pos) as usize];
                        seg.file
                            .read_exact_at(&mut rest, pos - seg.start)
                            .map_err(|e| StoreError::io("read segment", &seg.path, e))?;
                        if rest.iter().all(|b| *b == 0) {
                            data_end = Some(pos);
                            break;
                        }
                    }
                    cut = Some((
                        i,
                        pos,
                        format!("record of {need} bytes runs past the end of the file"),
                    ));
                    break 'segments;
                }
                if avail < need {
                    let have_end = chunk_start + buf.len() as u64;
                    buf.drain(..at);
                    chunk_start = pos;
                    let want = (need - avail).max(CHUNK).min((end - have_end) as usize);
                    let old = buf.len();
                    buf.resize(old + want, 0);
                    seg.file
                        .read_exact_at(&mut buf[old..], have_end - seg.start)
                        .map_err(|e| StoreError::io("read segment", &seg.path, e))?;
                    continue;
                }
                let rec = &buf[at..at + need];
                match record::verify(rec, pos) {
                    Ok(summary) => {
                        on_record(pos, &summary, rec)?;
                        out.records_scanned += 1;
                        pos += need as u64;
                    }
                    Err(e) => {
                        cut = Some((i, pos, e.to_string()));
                        break 'segments;
                    }
                }
            }
            let seg_end = data_end.unwrap_or(end);
            if let Some(n) = next_start {
                if n != seg_end {
                    cut = Some((
                        i,
                        pos,
                        format!("segment ends at {seg_end} but the next starts at {n}"),
                    ));
                    break;
                }
                if data_end.is_some() {
                    // A sealed segment whose cut to its data length was lost in a crash.
                    self.seal(seg, seg_end)
                        .map_err(|e| StoreError::io("cut segment", &seg.path, e))?;
                }
            } else if data_end.is_some() {
                tail = Some((i, seg_end));
            }
        }
        out.valid_end = pos;
        // The reserved space after the data of the active segment: cut it (dropping whatever
        // a torn write may have left there) and reserve it again. Not counted as dropped.
        if let (None, Some((i, at))) = (&cut, tail) {
            let seg = &segs[i];
            if at < durable {
                return Err(StoreError::Corrupt {
                    file: seg.path.display().to_string(),
                    offset: at,
                    reason: format!(
                        "the data ends at {at}, below the checkpointed durable offset {durable}"
                    ),
                });
            }
            seg.file
                .set_len(at - seg.start)
                .map_err(|e| StoreError::io("truncate segment", &seg.path, e))?;
            // The cut must be durable before new records are written after it.
            seg.file
                .sync_data()
                .map_err(|e| StoreError::io("sync segment", &seg.path, e))?;
            self.reserve(seg.file.as_ref(), &seg.path);
        }
        if let Some((i, at, reason)) = cut {
            let seg = &segs[i];
            if at < durable {
                return Err(StoreError::Corrupt {
                    file: seg.path.display().to_string(),
                    offset: at,
                    reason: format!("{reason} (below the checkpointed durable offset {durable})"),
                });
            }
            let mut dropped = 0;
            let mut keep = 0;
            for s in segs.iter().skip(i) {
                let len = s
                    .file
                    .len()
                    .map_err(|e| StoreError::io("stat segment", &s.path, e))?;
                if at <= s.start {
                    dropped += len;
                    self.vfs
                        .remove_file(&s.path)
                        .map_err(|e| StoreError::io("remove segment", &s.path, e))?;
                } else {
                    keep += 1;
                    dropped += (s.start + len).saturating_sub(at);
                    s.file
                        .set_len(at - s.start)
                        .map_err(|e| StoreError::io("truncate segment", &s.path, e))?;
                    // The truncation must be durable before new records are written after it.
                    s.file
                        .sync_data()
                        .map_err(|e| StoreError::io("sync segment", &s.path, e))?;
                    // It is the active segment now: reserve its space again.
                    self.reserve(s.file.as_ref(), &s.path);
                }
            }
            let none_left = {
                let mut segs = self.segments.write();
                segs.truncate(i + keep);
                segs.is_empty()
            };
            if none_left {
                // The cut removed every segment: start a fresh one where the log now ends.
                self.roll(at)
                    .map_err(|e| StoreError::io("create segment", &self.dir, e))?;
                self.min_offset.store(at, Ordering::Release);
            }
            // Removed segment files must stay removed after a crash.
            self.vfs
                .sync_dir(&self.dir)
                .map_err(|e| StoreError::io("sync dir", &self.dir, e))?;
            out.dropped_bytes = dropped;
            out.truncated_at = Some((seg.path.display().to_string(), at, reason));
        }
        Ok(out)
    }

    /// Removes the oldest segment (retention). Returns the new minimum offset.
    pub fn remove_oldest(&self) -> io::Result<Option<u64>> {
        let mut segs = self.segments.write();
        if segs.len() < 2 {
            return Ok(None);
        }
        let next = segs[1].start;
        // Readers check the minimum before touching a segment.
        self.min_offset.store(next, Ordering::Release);
        let old = segs.remove(0);
        drop(segs);
        self.vfs.remove_file(&old.path)?;
        // The removal must be durable: a segment that came back after a crash would sit
        // below the queues' moved minimum offsets.
        self.vfs.sync_dir(&self.dir)?;
        Ok(Some(next))
    }

    /// Bytes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments()
            .iter()
            .map(|s| s.file.len().unwrap_or(0))
            .sum()
    }
}
