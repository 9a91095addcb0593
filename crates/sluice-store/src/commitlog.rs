//! The commit log: one append-only stream of records for every queue of the broker.
//!
//! Segment files in `commitlog/` are named by the commit-log offset of their first byte (20
//! digits). Offsets are dense: a segment ends where the next begins. A segment is rolled when
//! the next record would make it exceed `segment_size`, so a record never spans two files.
//!
//! Write (writer thread only): records are encoded into one buffer per group of appends and
//! written with one `pwrite`. Sync: the flusher thread `fdatasync`s segments in order, oldest
//! first, so a later segment is never more durable than an earlier one. Read: any thread, by
//! `pread` of the exact byte range. Recover: see [`CommitLog::recover`]. Delete: whole
//! segments, oldest first, never the active one.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;

use crate::StoreError;
use crate::fs::{VFile, Vfs, join, offset_name, parse_offset_name};
use crate::record::{self, RecordSummary};

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
    /// Bytes cut off after `valid_end`.
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

    /// Creates the segment starting at `start` (writer thread).
    pub fn roll(&self, start: u64) -> io::Result<Arc<Segment>> {
        let path = join(&self.dir, &offset_name(start));
        let file = self.vfs.open(&path, true)?;
        // The new file's directory entry must be durable before records in it are
        // acknowledged; recovery finds segments by listing the directory.
        self.vfs.sync_dir(&self.dir)?;
        let seg = Arc::new(Segment { start, file, path });
        self.segments.write().push(seg.clone());
        Ok(seg)
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
        const CHUNK: usize = 8 << 20;
        let mut buf: Vec<u8> = Vec::new();
        'segments: for (i, seg) in segs.iter().enumerate() {
            let len = seg
                .file
                .len()
                .map_err(|e| StoreError::io("stat segment", &seg.path, e))?;
            let end = seg.start + len;
            let next_start = segs.get(i + 1).map(|s| s.start);
            if end <= pos && next_start == Some(end) {
                continue; // entirely before the starting point
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
            while pos < end {
                let at = (pos - chunk_start) as usize;
                let avail = buf.len() - at;
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
            if let Some(n) = next_start {
                if n != end {
                    cut = Some((
                        i,
                        pos,
                        format!("segment ends at {end} but the next starts at {n}"),
                    ));
                    break;
                }
            }
        }
        out.valid_end = pos;
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
