//! A bounded set of open file handles, shared by every consume queue of a store.
//!
//! A broker with a million queues must not hold a descriptor per queue file: the process
//! limit is often 1,024 (and rarely above a million), the proxy's connections share it,
//! and a writer that cannot open a queue file fails its batch, which fences the store.
//! So consume-queue files are opened on demand and the least recently used handle is
//! closed once `capacity` are open (`[store] open_queue_files`).
//!
//! Closing a handle loses no data: written bytes are in the page cache of the file, and
//! an `fdatasync` through a handle opened later writes back every dirty page of the file,
//! whichever handle wrote it (Linux tracks dirty pages per file, not per descriptor). It
//! can lose a writeback error: the error is kept with the file's in-memory inode, and once
//! no descriptor holds the file the kernel may drop that inode, error and all, so an
//! `fdatasync` through a new descriptor succeeds. The file system keeps its own record of
//! the error, which `syncfs` reports, so a checkpoint after any eviction syncs the file
//! system rather than single files ([`FileCache::evicted`]). A handle taken out of the cache stays usable after its eviction; its
//! descriptor closes when the last clone is dropped, so the open count can exceed
//! `capacity` by the operations in flight.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::fs::VFile;

/// A file of the cache: (owner, file start), the owner being a number given to each
/// consume queue by [`FileCache::owner`].
pub(crate) type Key = (u64, u64);

pub(crate) struct FileCache {
    capacity: usize,
    owners: AtomicU64,
    inner: Mutex<Inner>,
    opened: AtomicU64,
    evicted: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// Handle and the tick of its last use.
    open: HashMap<Key, (Arc<dyn VFile>, u64)>,
    /// Last-use tick → key, oldest first.
    by_use: BTreeMap<u64, Key>,
    tick: u64,
}

impl FileCache {
    /// A cache of at most `capacity` (at least 1) open handles.
    pub fn new(capacity: usize) -> FileCache {
        FileCache {
            capacity: capacity.max(1),
            owners: AtomicU64::new(0),
            inner: Mutex::new(Inner::default()),
            opened: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    /// A number no other owner of this cache has.
    pub fn owner(&self) -> u64 {
        self.owners.fetch_add(1, Ordering::Relaxed)
    }

    /// The handle of `key`, opened with `open` unless it is in the cache (which may close
    /// the least recently used one).
    pub fn get_or_open(
        &self,
        key: Key,
        open: impl FnOnce() -> io::Result<Arc<dyn VFile>>,
    ) -> io::Result<Arc<dyn VFile>> {
        if let Some(f) = self.get(key) {
            return Ok(f);
        }
        let f = open()?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.insert(key, f.clone());
        Ok(f)
    }

    /// The handle of `key` if it is open, marked as just used.
    pub fn get(&self, key: Key) -> Option<Arc<dyn VFile>> {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        inner.tick += 1;
        let tick = inner.tick;
        let (f, used) = inner.open.get_mut(&key)?;
        inner.by_use.remove(used);
        *used = tick;
        inner.by_use.insert(tick, key);
        Some(f.clone())
    }

    /// Keeps `f` open as `key` (replacing a handle already there), closing the least
    /// recently used handles beyond the capacity.
    pub fn insert(&self, key: Key, f: Arc<dyn VFile>) {
        let mut closed = Vec::new();
        {
            let mut g = self.inner.lock();
            let inner = &mut *g;
            inner.tick += 1;
            let tick = inner.tick;
            if let Some((old, used)) = inner.open.insert(key, (f, tick)) {
                inner.by_use.remove(&used);
                closed.push(old);
            }
            inner.by_use.insert(tick, key);
            while inner.open.len() > self.capacity {
                let Some((_, oldest)) = inner.by_use.pop_first() else {
                    break;
                };
                if let Some((f, _)) = inner.open.remove(&oldest) {
                    closed.push(f);
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // The descriptors close here, outside the lock.
        drop(closed);
    }

    /// Forgets `key` (its file was deleted or is about to be).
    pub fn remove(&self, key: Key) {
        let f = {
            let mut g = self.inner.lock();
            let inner = &mut *g;
            let f = inner.open.remove(&key);
            if let Some((_, used)) = &f {
                inner.by_use.remove(used);
            }
            f
        };
        drop(f);
    }

    /// Handles open now.
    pub fn len(&self) -> usize {
        self.inner.lock().open.len()
    }

    /// Files opened since the cache was made (cache misses).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Handles closed to make room since the cache was made (see the module docs for why a
    /// checkpoint asks).
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{StdFs, Vfs};
    use proptest::prelude::*;

    /// Distinct open handles of files in a temporary directory.
    fn opener(dir: &std::path::Path, name: u64) -> io::Result<Arc<dyn VFile>> {
        StdFs.open(&dir.join(name.to_string()), true)
    }

    #[test]
    fn closes_the_least_recently_used_handle_beyond_the_capacity() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let c = FileCache::new(2);
        let a = c.owner();
        c.get_or_open((a, 0), || opener(dir.path(), 0))?;
        c.get_or_open((a, 1), || opener(dir.path(), 1))?;
        // 0 used again: 1 is now the least recently used.
        anyhow::ensure!(c.get((a, 0)).is_some());
        c.get_or_open((a, 2), || opener(dir.path(), 2))?;
        anyhow::ensure!(c.len() == 2);
        anyhow::ensure!(c.get((a, 1)).is_none(), "1 should have been closed");
        anyhow::ensure!(c.get((a, 0)).is_some() && c.get((a, 2)).is_some());
        anyhow::ensure!(c.opened() == 3);
        c.remove((a, 0));
        anyhow::ensure!(c.len() == 1 && c.get((a, 0)).is_none());
        Ok(())
    }

    #[test]
    fn a_handle_stays_usable_after_its_eviction() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let c = FileCache::new(1);
        let f = c.get_or_open((0, 0), || opener(dir.path(), 0))?;
        c.get_or_open((0, 1), || opener(dir.path(), 1))?;
        anyhow::ensure!(c.get((0, 0)).is_none());
        f.write_all_at(b"still open", 0)?;
        f.sync_data()?;
        anyhow::ensure!(std::fs::read(dir.path().join("0"))? == b"still open");
        Ok(())
    }

    proptest! {
        /// Against a model: an LRU list of keys. The cache never holds more than its
        /// capacity, holds exactly the model's keys, and opens a file only on a miss.
        #[test]
        fn behaves_like_an_lru_list(cap in 1usize..5, ops in prop::collection::vec((0u8..3, 0u64..8), 1..200)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let c = FileCache::new(cap);
            let mut model: Vec<u64> = Vec::new(); // most recently used last
            let mut misses = 0;
            for (op, k) in ops {
                match op {
                    0 | 1 => {
                        let hit = model.contains(&k);
                        c.get_or_open((7, k), || opener(dir.path(), k)).expect("open");
                        model.retain(|&x| x != k);
                        model.push(k);
                        if model.len() > cap {
                            model.remove(0);
                        }
                        if !hit {
                            misses += 1;
                        }
                    }
                    _ => {
                        c.remove((7, k));
                        model.retain(|&x| x != k);
                    }
                }
                prop_assert_eq!(c.len(), model.len());
                prop_assert_eq!(c.opened(), misses);
                let inner = c.inner.lock();
                let order: Vec<u64> = inner.by_use.values().map(|&(_, k)| k).collect();
                prop_assert_eq!(&order, &model);
            }
        }
    }
}
