//! Zero-filling ahead of the writer (Sync mode).
//!
//! A preallocated segment's blocks are reserved but *unwritten*: the first write into them
//! makes ext4 convert the extent to written, a metadata change that the next fdatasync has
//! to commit through the journal (on ext4 without a journal, as on the development machine,
//! by writing the extent blocks and the inode synchronously, one wait after the other).
//! Sync mode runs an fdatasync after every group commit, so every group commit paid for
//! that metadata on top of its data. Blocks that were once
//! written (here: with zeros) and written back are ordinary blocks: overwriting them
//! changes no metadata, and the fdatasync is only the data write and the cache flush. On the
//! development disk, write + fdatasync of 4 KiB took 139 µs into zero-filled blocks against
//! 245 µs into reserved ones, 505 µs against 913 µs for 256 KiB (docs/benchmarks.md).
//!
//! A helper thread keeps the region in front of the writer zero-filled and written back. It
//! claims a chunk beyond the end of the writer's last write, writes zeros there, writes them
//! back with `sync_file_range` (not a durability point: it commits no metadata and flushes no
//! cache; the syncer's fdatasync stays the only one on the commit log) and releases the
//! claim. The writer publishes the end of each write before making it and never writes into a
//! claimed range (it waits for the claim to end, which the zeroer's distance makes rare);
//! the zeroer never claims below the writer's published end. So zeros never overwrite a
//! record. They are what the reserved space reads as anyway: recovery sees no difference.
//!
//! The zeroer writes through a descriptor of its own. Linux reports a writeback error once
//! per open file (`errseq_t`), to the first call that waits for writeback through it, and
//! `sync_file_range` waits. On the writer's descriptor the zeroer would take the report of
//! a failed record page from the syncer, whose next fdatasync would then succeed and
//! acknowledge records the disk did not keep. With its own descriptor each side gets the
//! report: the zeroer stops, the syncer fences the store.
//!
//! Only Sync mode uses it, and only while group commits are small (under 256 KiB on
//! average): in Async mode nothing waits for the fdatasync, and for large commits the data
//! dominates the fdatasync while the zeros would double the bytes written.

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::commitlog::Segment;
use crate::fs::{VFile, Vfs};

const PAGE: u64 = 4096;
/// Distance the zeroer keeps from the writer's last write, so the two rarely meet.
const GUARD: u64 = 64 << 10;
/// Writes (group commits) of this size on average stop the zeroing: their fdatasync is
/// dominated by the data, so the saved journal commit is a small gain, while the zeros
/// would double the bytes written when the disk and the CPU are busiest.
const LARGE_WRITE: u64 = 256 << 10;
/// Bytes zero-filled and written back at a time.
const PIECE: u64 = 64 << 10;

struct State {
    /// The active segment and the zeroer's own handle of its file (None while the writer
    /// rolls to the next one, or when the file could not be opened again).
    seg: Option<(Arc<Segment>, Arc<dyn VFile>)>,
    /// End (commit-log offset) of the writer's last write.
    written_end: u64,
    /// Everything from `written_end` up to here is zero-filled and written back.
    zeroed_to: u64,
    /// The range the zeroer is writing now.
    claim: Option<(u64, u64)>,
    /// Moving average of the writer's write sizes.
    avg_write: u64,
    stop: bool,
}

pub(crate) struct ZeroAhead {
    vfs: Arc<dyn Vfs>,
    st: Mutex<State>,
    cv: Condvar,
    segment_size: u64,
    /// Bytes kept zero-filled in front of the writer.
    ahead: u64,
    chunk: u64,
}

impl ZeroAhead {
    pub fn new(vfs: Arc<dyn Vfs>, segment_size: u64, ahead: u64) -> Arc<ZeroAhead> {
        Arc::new(ZeroAhead {
            vfs,
            st: Mutex::new(State {
                seg: None,
                written_end: 0,
                zeroed_to: 0,
                claim: None,
                avg_write: 0,
                stop: false,
            }),
            cv: Condvar::new(),
            segment_size,
            ahead,
            chunk: (ahead / 4).clamp(PAGE, 1 << 20),
        })
    }

    /// The writer writes into `seg` from `pos` on.
    pub fn set_segment(&self, seg: Arc<Segment>, pos: u64) {
        let file = match self.vfs.open(&seg.path, false) {
            Ok(f) => Some(f),
            Err(e) => {
                // Only a lost optimisation: appends land in reserved blocks.
                tracing::warn!(path = %seg.path.display(), error = %e, "cannot open the segment for zero-filling; not zero-filling it");
                None
            }
        };
        let mut st = self.st.lock();
        while st.claim.is_some() {
            self.cv.wait(&mut st);
        }
        st.seg = file.map(|f| (seg, f));
        st.written_end = pos;
        st.zeroed_to = pos;
        self.cv.notify_all();
    }

    /// Before the writer cuts the active segment: waits for the zeroer to leave it.
    pub fn leave_segment(&self) {
        let mut st = self.st.lock();
        while st.claim.is_some() {
            self.cv.wait(&mut st);
        }
        st.seg = None;
    }

    /// Before the writer writes `[from, to)` of the commit log.
    pub fn before_write(&self, from: u64, to: u64) {
        let mut st = self.st.lock();
        while st.claim.is_some_and(|(a, b)| a < to && from < b) {
            self.cv.wait(&mut st);
        }
        st.written_end = st.written_end.max(to);
        st.avg_write = st.avg_write - st.avg_write / 8 + (to - from) / 8;
        if st.zeroed_to < to + self.ahead / 2 && st.avg_write < LARGE_WRITE {
            self.cv.notify_all();
        }
    }

    pub fn stop(&self) {
        self.st.lock().stop = true;
        self.cv.notify_all();
    }

    /// The zeroer thread.
    pub fn run(&self) {
        let zeros = vec![0u8; PIECE as usize];
        loop {
            let (seg, file, from, to) = {
                let mut st = self.st.lock();
                loop {
                    if st.stop {
                        return;
                    }
                    if let Some((seg, file)) = st.seg.clone() {
                        let seg_end = seg.start + self.segment_size;
                        let from = st
                            .zeroed_to
                            .max((st.written_end + GUARD).div_ceil(PAGE) * PAGE);
                        if from < seg_end
                            && from < st.written_end + self.ahead
                            && st.avg_write < LARGE_WRITE
                        {
                            let to = (from + self.chunk).min(seg_end);
                            st.claim = Some((from, to));
                            break (seg, file, from, to);
                        }
                    }
                    self.cv.wait(&mut st);
                }
            };
            // In pieces, each written back at once: the syncer's fdatasync waits for every
            // page of the file under writeback, so a piece in flight may delay it by the
            // time one piece takes to write, never by a whole chunk.
            let mut r = Ok(());
            let mut at = from;
            while at < to && r.is_ok() {
                let n = (to - at).min(PIECE);
                r = file
                    .write_all_at(&zeros[..n as usize], at - seg.start)
                    .and_then(|()| file.write_back(at - seg.start, n));
                at += n;
            }
            let mut st = self.st.lock();
            st.claim = None;
            match r {
                Ok(()) => {
                    if st.seg.as_ref().is_some_and(|(s, _)| Arc::ptr_eq(s, &seg)) {
                        st.zeroed_to = to;
                    }
                }
                Err(e) => {
                    // Only a lost optimisation: appends still land in reserved blocks. A real
                    // disk error also reaches the syncer's next fdatasync (through its own
                    // descriptor, see the module docs), which fences.
                    tracing::warn!(path = %seg.path.display(), error = %e, "zero-filling ahead failed; stopped");
                    st.stop = true;
                }
            }
            self.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faulty::{Faults, FaultyFs};
    use crate::fs::StdFs;

    /// A zeroer running over a fresh segment file of `size` bytes in `dir`.
    fn start(
        dir: &std::path::Path,
        size: u64,
        ahead: u64,
    ) -> (Arc<ZeroAhead>, Arc<Segment>, std::thread::JoinHandle<()>) {
        start_on(Arc::new(StdFs), dir, size, ahead)
    }

    fn start_on(
        vfs: Arc<dyn Vfs>,
        dir: &std::path::Path,
        size: u64,
        ahead: u64,
    ) -> (Arc<ZeroAhead>, Arc<Segment>, std::thread::JoinHandle<()>) {
        let path = dir.join(format!("{:020}", 0));
        let file = vfs.open(&path, true).expect("open");
        let seg = Arc::new(Segment {
            start: 0,
            file,
            path,
        });
        let z = ZeroAhead::new(vfs, size, ahead);
        z.set_segment(seg.clone(), 0);
        let zz = z.clone();
        (z, seg, std::thread::spawn(move || zz.run()))
    }

    #[test]
    fn zeros_never_overwrite_written_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 8 << 20;
        let (z, seg, t) = start(dir.path(), size, 1 << 20);
        // The writer writes 0xAB records of odd sizes while the zeroer runs ahead of it.
        let mut pos = 0u64;
        let rec = vec![0xABu8; 3001];
        while pos + rec.len() as u64 <= size {
            z.before_write(pos, pos + rec.len() as u64);
            seg.file.write_all_at(&rec, pos).expect("write");
            pos += rec.len() as u64;
        }
        z.stop();
        t.join().expect("join");
        let mut back = vec![0u8; pos as usize];
        seg.file.read_exact_at(&mut back, 0).expect("read");
        assert!(back.iter().all(|b| *b == 0xAB), "a record was zeroed");
    }

    #[test]
    fn zeroer_fills_ahead_and_stops_at_the_segment_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 1 << 20;
        let (z, seg, t) = start(dir.path(), size, 4 << 20);
        z.before_write(0, 100);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while z.st.lock().zeroed_to < size && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(z.st.lock().zeroed_to, size);
        assert_eq!(
            seg.file.len().expect("len"),
            size,
            "zeros stay inside the segment"
        );
        z.stop();
        t.join().expect("join");
    }

    /// A page of the segment fails writeback while the zeroer runs: the zeroer's
    /// `sync_file_range` sees the error, and the writer's descriptor, through which the
    /// syncer runs its fdatasync, must still report it. On a shared descriptor the zeroer
    /// would consume the only report and the next fdatasync would succeed.
    #[test]
    fn a_writeback_error_the_zeroer_sees_still_reaches_the_syncer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let faults = Faults::new();
        let vfs: Arc<dyn Vfs> = Arc::new(FaultyFs::new(StdFs, faults.clone()));
        let size = 8 << 20;
        let (z, seg, t) = start_on(vfs, dir.path(), size, 1 << 20);
        seg.file.write_all_at(&[0xAB; 100], 0).expect("write");
        faults.inject_writeback_error(&seg.path);
        z.before_write(0, 100);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !z.st.lock().stop && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(z.st.lock().stop, "the zeroer saw the error and stopped");
        assert!(
            seg.file.sync_data().is_err(),
            "the fdatasync after the error must fail"
        );
        assert!(seg.file.sync_data().is_ok(), "reported once per descriptor");
        t.join().expect("join");
    }
}
