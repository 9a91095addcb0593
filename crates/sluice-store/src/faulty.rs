//! A failure-injecting file system for fault tests.
//!
//! Wraps a real [`Vfs`] and can: fail fsyncs with EIO, fail or shorten writes (ENOSPC, torn
//! writes), slow fsyncs down, report little free space, and simulate power loss by cutting
//! every file back to what was last synced (the LazyFS idea). Behaviour is switched through
//! a shared [`Faults`] handle while the store runs.
//!
//! Power loss is modelled per file: bytes written since the file's last successful
//! `sync_data` are undone (their previous contents, zeros in allocated space, are put
//! back, in reverse order) and the file is cut to its length at that sync. Allocations
//! and truncations count as durable at once (metadata). A file created since the last
//! sync of its directory (or the last `syncfs`) disappears: its directory entry was not
//! durable. New directories, and renames and removals of older files, count as durable
//! at once.
//!
//! Writeback errors follow Linux's `errseq_t`: an error is reported once to each open
//! handle of the file, by the next call that waits for writeback through it (`sync_data`,
//! `write_back`), and a handle opened while an error nobody has seen yet is pending reports
//! it too. Two threads sharing one handle therefore share one report: whichever waits first
//! consumes it.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::fs::{FsSync, VFile, Vfs};

/// Bytes at an offset before an un-synced write replaced them.
type Overwritten = (u64, Vec<u8>);

/// Switches shared by a [`FaultyFs`] and the test driving it.
#[derive(Default)]
pub struct Faults {
    /// Every `sync_data` fails with EIO while set.
    pub fail_sync: AtomicBool,
    /// Every write fails with ENOSPC while set.
    pub fail_write: AtomicBool,
    /// The next write persists only this many bytes and then fails (0 = off).
    pub torn_write_bytes: AtomicU64,
    /// Each `sync_data` sleeps this many milliseconds first.
    pub sync_delay_ms: AtomicU64,
    /// `available_space` reports this (u64::MAX = ask the real file system).
    pub available_space: AtomicU64,
    /// Creating a new file in this directory fails with EMFILE while set (opening existing
    /// files still works).
    pub fail_create_in: Mutex<Option<PathBuf>>,
    /// Each file-system sync (`syncfs`) sleeps this many milliseconds first (on top of
    /// `sync_delay_ms`).
    pub fs_sync_delay_ms: AtomicU64,
    /// Number of `sync_data` calls that succeeded.
    pub syncs: AtomicU64,
    /// Number of `start_write_back` calls (writeback hints).
    pub write_back_hints: AtomicU64,
    /// Bytes returned by reads of any file.
    pub read_bytes: AtomicU64,
    synced_len: Mutex<HashMap<PathBuf, u64>>,
    /// Per file, writeback errors injected so far and whether the latest was reported.
    wb_errors: Mutex<HashMap<PathBuf, (u64, bool)>>,
    /// The same for the whole file system (what `syncfs` reports).
    fs_wb_errors: Mutex<(u64, bool)>,
    /// Per file, what un-synced writes overwrote inside the synced length.
    undo: Mutex<HashMap<PathBuf, Vec<Overwritten>>>,
    /// Files created since their directory (or the file system) was last synced.
    new_entries: Mutex<HashSet<PathBuf>>,
}

impl Faults {
    pub fn new() -> Arc<Self> {
        let f = Self::default();
        f.available_space.store(u64::MAX, Ordering::SeqCst);
        Arc::new(f)
    }

    /// What every sync does first: the configured delay, then the configured failure.
    fn before_sync(&self) -> io::Result<()> {
        let delay = self.sync_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    /// Writing back a page of `path` failed (as a failing disk does, long after the write
    /// that dirtied the page returned). Every handle of the file reports EIO once.
    pub fn inject_writeback_error(&self, path: &Path) {
        let mut errs = self.wb_errors.lock();
        let e = errs.entry(path.to_path_buf()).or_insert((0, false));
        *e = (e.0 + 1, false);
        let mut fs = self.fs_wb_errors.lock();
        *fs = (fs.0 + 1, false);
    }

    /// The kernel dropped the in-memory inode of `path`, which no descriptor held: the
    /// file's writeback errors go with it (a descriptor opened later reports none), while
    /// the file system's record of them, which `syncfs` reports, stays.
    pub fn evict_inode(&self, path: &Path) {
        self.wb_errors.lock().remove(path);
    }
}

/// A [`Vfs`] that injects the faults switched on in its [`Faults`].
pub struct FaultyFs<F: Vfs> {
    inner: F,
    faults: Arc<Faults>,
}

impl<F: Vfs> FaultyFs<F> {
    pub fn new(inner: F, faults: Arc<Faults>) -> Self {
        Self { inner, faults }
    }

    /// Simulates power loss: cuts every file written through this file system back to the
    /// length it had at its last successful sync. Call it with the store closed or dropped.
    pub fn lose_unsynced(&self) -> io::Result<()> {
        // Created without a durable directory entry: gone.
        for path in std::mem::take(&mut *self.faults.new_entries.lock()) {
            self.faults.synced_len.lock().remove(&path);
            self.faults.undo.lock().remove(&path);
            match self.inner.remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        let synced = self.faults.synced_len.lock().clone();
        let mut undo = std::mem::take(&mut *self.faults.undo.lock());
        for (path, len) in synced {
            if let Ok(f) = self.inner.open(&path, false) {
                for (offset, old) in undo.remove(&path).unwrap_or_default().iter().rev() {
                    f.write_all_at(old, *offset)?;
                }
                if f.len()? > len {
                    f.set_len(len)?;
                }
            }
        }
        Ok(())
    }
}

struct FaultyFile {
    inner: Arc<dyn VFile>,
    path: PathBuf,
    faults: Arc<Faults>,
    /// The writeback errors of the file this handle has reported (its `errseq_t` cursor).
    wb_seen: AtomicU64,
}

impl VFile for FaultyFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.faults.fail_write.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let torn = self.faults.torn_write_bytes.swap(0, Ordering::SeqCst) as usize;
        let n = if torn > 0 && torn < buf.len() {
            torn
        } else {
            buf.len()
        };
        self.remember(offset, n)?;
        self.inner.write_all_at(&buf[..n], offset)?;
        if n < buf.len() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        self.faults.read_bytes.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.faults.before_sync()?;
        self.check_writeback()?;
        self.inner.sync_data()?;
        let len = self.inner.len()?;
        self.faults.synced_len.lock().insert(self.path.clone(), len);
        self.faults.undo.lock().remove(&self.path);
        self.faults.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)?;
        // A truncation is metadata; treat it as immediately durable for the model.
        let mut synced = self.faults.synced_len.lock();
        let e = synced.entry(self.path.clone()).or_insert(len);
        *e = (*e).min(len);
        drop(synced);
        if let Some(u) = self.faults.undo.lock().get_mut(&self.path) {
            u.retain(|(o, _)| *o < len);
        }
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        // Not durable in this model either: power loss still undoes these bytes.
        self.check_writeback()?;
        self.inner.write_back(offset, len)
    }
    fn start_write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        // Does not wait, so it reports no writeback error (nor consumes one), and it makes
        // nothing durable: power loss still undoes these bytes.
        self.faults.write_back_hints.fetch_add(1, Ordering::SeqCst);
        self.inner.start_write_back(offset, len)
    }
    fn allocate(&self, len: u64) -> io::Result<bool> {
        let before = self.inner.len()?;
        let done = self.inner.allocate(len)?;
        // Metadata: durable at once in this model (the space reads as zeros).
        let mut synced = self.faults.synced_len.lock();
        let e = synced.entry(self.path.clone()).or_insert(before);
        if *e == before {
            *e = self.inner.len()?;
        }
        Ok(done)
    }
}

/// `errseq_t` in small: `errs` is (errors so far, whether the latest was reported) of a file
/// or a file system, `seen` a handle's cursor. Reports EIO once per handle per new error.
fn report_once(errs: &mut (u64, bool), seen: &AtomicU64) -> io::Result<()> {
    if errs.0 > seen.load(Ordering::SeqCst) {
        seen.store(errs.0, Ordering::SeqCst);
        errs.1 = true;
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }
    Ok(())
}

/// Where a new handle's cursor starts: past the errors already reported, but before one
/// nobody has seen yet (Linux's `errseq_sample`).
fn first_unseen(errs: Option<(u64, bool)>) -> u64 {
    match errs {
        Some((count, true)) => count,
        Some((count, false)) => count.saturating_sub(1),
        None => 0,
    }
}

impl FaultyFile {
    /// Reports a writeback error of the file that this handle has not reported yet.
    fn check_writeback(&self) -> io::Result<()> {
        match self.faults.wb_errors.lock().get_mut(&self.path) {
            Some(errs) => report_once(errs, &self.wb_seen),
            None => Ok(()),
        }
    }

    /// Keeps what a write at `offset` of `n` bytes overwrites inside the synced length.
    fn remember(&self, offset: u64, n: usize) -> io::Result<()> {
        let synced = self
            .faults
            .synced_len
            .lock()
            .get(&self.path)
            .copied()
            .unwrap_or(0);
        if offset >= synced || n == 0 {
            return Ok(());
        }
        let end = (offset + n as u64).min(synced);
        let mut old = vec![0u8; (end - offset) as usize];
        let mut got = 0;
        while got < old.len() {
            let r = self.inner.read_at(&mut old[got..], offset + got as u64)?;
            if r == 0 {
                break; // past the real end: nothing there to put back
            }
            got += r;
        }
        old.truncate(got);
        self.faults
            .undo
            .lock()
            .entry(self.path.clone())
            .or_default()
            .push((offset, old));
        Ok(())
    }
}

struct FaultyFsSync<F: Vfs> {
    fs: F,
    inner: Arc<dyn FsSync>,
    faults: Arc<Faults>,
    /// The file system's writeback errors this handle has reported.
    wb_seen: AtomicU64,
}

impl<F: Vfs + Clone> FsSync for FaultyFsSync<F> {
    fn sync(&self) -> io::Result<()> {
        let delay = self.faults.fs_sync_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        self.faults.before_sync()?;
        report_once(&mut self.faults.fs_wb_errors.lock(), &self.wb_seen)?;
        self.inner.sync()?;
        // Every file written through this file system is now synced as it is.
        let mut synced = self.faults.synced_len.lock();
        for (p, len) in synced.iter_mut() {
            if let Ok(f) = self.fs.open(p, false) {
                *len = f.len()?;
            }
        }
        drop(synced);
        self.faults.undo.lock().clear();
        self.faults.new_entries.lock().clear();
        self.faults.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl<F: Vfs + Clone> Vfs for FaultyFs<F> {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VFile>> {
        let existed = self.inner.exists(path);
        if create && !existed && self.faults.fail_create_in.lock().as_deref() == path.parent() {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let inner = self.inner.open(path, create)?;
        if !existed {
            self.faults.new_entries.lock().insert(path.to_path_buf());
        }
        let mut synced = self.faults.synced_len.lock();
        // A file that existed before we saw it counts as synced as it is.
        let len = if existed { inner.len()? } else { 0 };
        synced.entry(path.to_path_buf()).or_insert(len);
        drop(synced);
        // A new handle starts past the errors already reported, but reports one nobody has
        // seen yet.
        let wb_seen = first_unseen(self.faults.wb_errors.lock().get(path).copied());
        Ok(Arc::new(FaultyFile {
            inner,
            path: path.to_path_buf(),
            faults: self.faults.clone(),
            wb_seen: AtomicU64::new(wb_seen),
        }))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.faults.new_entries.lock().remove(path);
        self.faults.synced_len.lock().remove(path);
        self.faults.undo.lock().remove(path);
        self.inner.remove_file(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner.create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        self.inner.list_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        if self.faults.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.sync_dir(path)?;
        self.faults
            .new_entries
            .lock()
            .retain(|p| p.parent() != Some(path));
        Ok(())
    }
    fn open_fs_sync(&self, path: &Path) -> io::Result<Arc<dyn FsSync>> {
        Ok(Arc::new(FaultyFsSync {
            fs: self.inner.clone(),
            inner: self.inner.open_fs_sync(path)?,
            faults: self.faults.clone(),
            // Like `FaultyFile`: starts past the errors already reported.
            wb_seen: AtomicU64::new(first_unseen(Some(*self.faults.fs_wb_errors.lock()))),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        {
            let mut new = self.faults.new_entries.lock();
            if new.remove(from) {
                new.insert(to.to_path_buf());
            }
        }
        let mut synced = self.faults.synced_len.lock();
        if let Some(len) = synced.remove(from) {
            synced.insert(to.to_path_buf(), len);
        }
        drop(synced);
        let mut undo = self.faults.undo.lock();
        if let Some(u) = undo.remove(from) {
            undo.insert(to.to_path_buf(), u);
        }
        drop(undo);
        self.inner.rename(from, to)
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn available_space(&self, path: &Path) -> io::Result<u64> {
        match self.faults.available_space.load(Ordering::SeqCst) {
            u64::MAX => self.inner.available_space(path),
            n => Ok(n),
        }
    }
}
