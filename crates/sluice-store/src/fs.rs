//! The file-system seam.
//!
//! All store I/O goes through [`Vfs`] and [`VFile`], so fault suites can swap in
//! [`FaultyFs`](crate::faulty::FaultyFs), which fails fsyncs, tears writes or forgets
//! un-synced data. [`StdFs`] is the real thing: positional reads and writes (`pread`/`pwrite`),
//! `fdatasync` for data and `fsync` on directories.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One open file.
#[allow(clippy::len_without_is_empty)]
pub trait VFile: Send + Sync {
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`; returns how many (0 at end of file).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Makes written data durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    /// Reserves disk blocks for the file up to `len` bytes (the file's size becomes at
    /// least `len`; the new bytes read as zeros). Returns `Ok(false)` where the file system
    /// cannot do it, so the file simply grows as it is written.
    fn allocate(&self, len: u64) -> io::Result<bool>;
    /// Writes back the dirty pages of `[offset, offset + len)` and waits for them
    /// (`sync_file_range`). Not a durability point: no metadata is committed and no disk
    /// cache flushed. Since it waits, it reports a writeback error of the file, once per
    /// open descriptor: a caller sharing a descriptor with whoever runs the fdatasync takes
    /// the report from it (see `zero_ahead.rs`). The default does nothing.
    fn write_back(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Starts writing back the dirty pages of `[offset, offset + len)` and returns without
    /// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`). Only a hint: nothing becomes
    /// durable, and since it does not wait it reports (and so consumes) no writeback error.
    /// The default does nothing.
    fn start_write_back(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes or fails with `UnexpectedEof`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.read_at(buf, offset)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
            }
            buf = &mut buf[n..];
            offset += n as u64;
        }
        Ok(())
    }
}

/// Syncs a whole file system, data and metadata (`syncfs`): one call where thousands of
/// files would each need a sync.
///
/// Linux (5.8 and later) reports a writeback error of the file system to a `syncfs`
/// through a descriptor only if the error came after the descriptor was opened (or nobody
/// had seen it yet). A descriptor opened for each call would miss a page that failed
/// writeback in the background before it; one handle kept from the store's start does not.
pub trait FsSync: Send + Sync {
    fn sync(&self) -> io::Result<()>;
}

/// A file system.
pub trait Vfs: Send + Sync + 'static {
    /// Opens a file for reading and writing, creating it when `create` is set.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VFile>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory (not paths), sorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Makes a directory's entries (created, removed, renamed files) durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// A handle that makes every file and directory of the file system holding `path`
    /// durable (`syncfs`). Open it once and keep it: see [`FsSync`].
    fn open_fs_sync(&self, path: &Path) -> io::Result<Arc<dyn FsSync>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// Length of a regular file, without keeping it open (one `statx` instead of an open,
    /// an `fstat` and a close: a store with a million queues sizes a million files when it
    /// opens).
    fn file_len(&self, path: &Path) -> io::Result<u64> {
        self.open(path, false)?.len()
    }
    /// Bytes available to unprivileged writers on the file system holding `path`.
    fn available_space(&self, path: &Path) -> io::Result<u64>;
}

/// The operating system's file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

struct StdFile(File);

impl VFile for StdFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(&self.0, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn allocate(&self, len: u64) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "allocation too large"))?;
        // SAFETY: fallocate on a descriptor this struct owns; no memory is passed.
        let r = unsafe { libc::fallocate(self.0.as_raw_fd(), 0, 0, len) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
            _ => Err(e),
        }
    }
    fn write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        sync_file_range(&self.0, offset, len, flags)
    }
    fn start_write_back(&self, offset: u64, len: u64) -> io::Result<()> {
        sync_file_range(&self.0, offset, len, libc::SYNC_FILE_RANGE_WRITE)
    }
}

fn sync_file_range(f: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    // SAFETY: sync_file_range on an open descriptor; no memory is passed.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), off, n, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

struct StdFsSync(File);

impl FsSync for StdFsSync {
    fn sync(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs takes an open descriptor, which `self` owns. It reports writeback
        // errors of the file system since Linux 5.8.
        if unsafe { libc::syncfs(self.0.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Vfs for StdFs {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn VFile>> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .open(path)?;
        Ok(Arc::new(StdFile(f)))
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(path)? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        // A directory fsync makes file creations, removals and renames durable.
        File::open(path)?.sync_all()
    }
    fn open_fs_sync(&self, path: &Path) -> io::Result<Arc<dyn FsSync>> {
        Ok(Arc::new(StdFsSync(File::open(path)?)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn file_len(&self, path: &Path) -> io::Result<u64> {
        let m = std::fs::metadata(path)?;
        if !m.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(m.len())
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn available_space(&self, path: &Path) -> io::Result<u64> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: `c` is a valid NUL-terminated string and `st` a properly sized out-pointer.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// Joins a directory and a file name.
pub(crate) fn join(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Segment-style file name: the start offset as 20 zero-padded digits.
pub(crate) fn offset_name(offset: u64) -> String {
    format!("{offset:020}")
}

/// Parses a name produced by [`offset_name`]; other names give `None`.
pub(crate) fn parse_offset_name(name: &str) -> Option<u64> {
    if name.len() == 20 && name.bytes().all(|b| b.is_ascii_digit()) {
        name.parse().ok()
    } else {
        None
    }
}
