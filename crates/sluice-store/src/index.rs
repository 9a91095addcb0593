//! Hash index: message id → record, and (topic, key) → records.
//!
//! Index files live in `index/`, named by sequence number (20 digits). Each is a fixed-size
//! hash table with chained entries, in the spirit of RocketMQ's IndexFile:
//!
//! ```text
//!  header (64 bytes, little-endian)
//!    0  4  magic "SLIX" (0x534C_4958)     4  4  version (1)
//!    8  4  slot_count                     12  4  max_entries
//!   16  4  entry_count                    20  4  reserved
//!   24  8  begin_ts   28.. see below      32  8  end_ts
//!   40  8  end_offset: commit-log offset up to which records are indexed (exclusive)
//!   48 16  reserved
//!  slots: slot_count × u32: 1-based number of the newest entry of the slot's chain, 0 = empty
//!  entries: max_entries × 28 bytes: u64 key hash, u64 commit-log offset, i64 store_ts,
//!           u32 previous entry of the chain (1-based, 0 = end)
//! ```
//!
//! Write: the writer thread adds entries to the active file, which is kept in memory; the
//! checkpoint writes out its new entries, then the header that counts them. The active
//! file's slots are not written then (recovery rebuilds them from the entries, below), so a
//! checkpoint writes what was added, not the whole slot table (4 MiB with the default
//! 2^20 slots). A file that is full is sealed: written out whole, slots included, before the
//! next one is created, so every file but the newest has its slots on disk. Read: chains are walked newest first; sealed files are read with
//! `pread`. A hash match is only a candidate: callers read the record and compare the key.
//! Recover: the active file is loaded, its slots rebuilt from its entries, and records after
//! `end_offset` are indexed again from the commit log. Delete: retention drops sealed files
//! whose `end_offset` lies below the commit log's minimum offset.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::fs::{VFile, Vfs, join, offset_name, parse_offset_name};

const MAGIC: u32 = 0x534C_4958;
const HEADER: u64 = 64;
const ENTRY: u64 = 28;

/// FNV-1a, 64 bit.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_parts(&[bytes])
}

/// FNV-1a of the concatenation of `parts`, without building it (the hashes are part of
/// the index files, so this must equal `fnv1a` of the joined bytes).
fn fnv1a_parts(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Hash of a message id in the index.
pub fn id_hash(id: &str) -> u64 {
    fnv1a_parts(&[b"U\0", id.as_bytes()])
}

/// Hash of a (topic, key) pair in the index.
pub fn key_hash(topic: &str, key: &str) -> u64 {
    fnv1a_parts(&[b"K\0", topic.as_bytes(), b"\0", key.as_bytes()])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdxEntry {
    pub hash: u64,
    pub offset: u64,
    pub ts: i64,
    pub prev: u32,
}

/// The entry list of an active file, reserved for all `max_entries` at once: growing it by
/// doubling copied the whole list under the lock the writer takes for every batch (at 2M
/// entries, 64 MiB copied and 128 MiB first touched, a stall of tens of milliseconds for
/// every append). Only the pages written become resident.
fn full_capacity(max_entries: u32, at_least: u32) -> Vec<IdxEntry> {
    Vec::with_capacity(max_entries.max(at_least) as usize)
}

struct Active {
    seq: u64,
    file: Arc<dyn VFile>,
    slots: Vec<u32>,
    entries: Vec<IdxEntry>,
    persisted_entries: usize,
    begin_ts: i64,
    end_ts: i64,
    end_offset: u64,
    dirty: bool,
}

struct Sealed {
    seq: u64,
    file: Arc<dyn VFile>,
    slot_count: u32,
    entry_count: u32,
    begin_ts: i64,
    end_ts: i64,
    end_offset: u64,
}

pub(crate) struct Index {
    dir: PathBuf,
    vfs: Arc<dyn Vfs>,
    slot_count: u32,
    max_entries: u32,
    sealed: RwLock<Vec<Sealed>>,
    active: Mutex<Active>,
    /// Held while an index file is written out. Lock order: `active` before `io`, and
    /// `persist` never waits for `active` while holding `io`.
    io: Mutex<()>,
}

/// What `persist` writes, copied under the `active` lock and encoded and written without
/// it.
struct Image {
    seq: u64,
    file: Arc<dyn VFile>,
    first_entry: usize,
    entry_count: usize,
    entries: Vec<IdxEntry>,
    /// Only when the file is sealed.
    slots: Option<Vec<u32>>,
    header: [u8; HEADER as usize],
    end_offset: u64,
}

fn read_header(f: &dyn VFile) -> io::Result<[u8; HEADER as usize]> {
    let mut h = [0u8; HEADER as usize];
    f.read_exact_at(&mut h, 0)?;
    Ok(h)
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}
fn decode_entry(b: &[u8]) -> IdxEntry {
    IdxEntry {
        hash: u64_at(b, 0),
        offset: u64_at(b, 8),
        ts: u64_at(b, 16) as i64,
        prev: u32_at(b, 24),
    }
}

impl Index {
    /// Opens the index directory. Returns the index and the commit-log offset from which
    /// records still need indexing.
    pub fn open(
        vfs: Arc<dyn Vfs>,
        dir: PathBuf,
        slot_count: u32,
        max_entries: u32,
    ) -> io::Result<(Index, u64)> {
        vfs.create_dir_all(&dir)?;
        let seqs: Vec<u64> = vfs
            .list_dir(&dir)?
            .iter()
            .filter_map(|n| parse_offset_name(n))
            .collect();
        let mut sealed = Vec::new();
        let mut active = None;
        for (i, &seq) in seqs.iter().enumerate() {
            let f = vfs.open(&join(&dir, &offset_name(seq)), false)?;
            let h = match read_header(f.as_ref()) {
                Ok(h) if u32_at(&h, 0) == MAGIC => h,
                _ => {
                    // Never checkpointed (or damaged): it is rebuilt from the commit log.
                    tracing::warn!(file = %offset_name(seq), "index file without a valid header; rebuilding it");
                    vfs.remove_file(&join(&dir, &offset_name(seq)))?;
                    continue;
                }
            };
            let (sc, me, ec) = (u32_at(&h, 8), u32_at(&h, 12), u32_at(&h, 16));
            let (begin_ts, end_ts, end_offset) =
                (u64_at(&h, 24) as i64, u64_at(&h, 32) as i64, u64_at(&h, 40));
            if i + 1 == seqs.len() && ec < me {
                // The newest file stays active: load its entries and rebuild its slots. Only
                // a file of the configured shape that holds what its header claims (the
                // sizes below come from disk); any other is rebuilt from the commit log.
                let holds = HEADER + sc as u64 * 4 + ec as u64 * ENTRY;
                if sc != slot_count || me != max_entries || f.len()? < holds {
                    tracing::warn!(
                        file = %offset_name(seq),
                        slots = sc,
                        max_entries = me,
                        entries = ec,
                        "newest index file of another shape than configured, or shorter than its header says; rebuilding it"
                    );
                    drop(f);
                    vfs.remove_file(&join(&dir, &offset_name(seq)))?;
                    continue;
                }
                let mut buf = vec![0u8; (ec as u64 * ENTRY) as usize];
                f.read_exact_at(&mut buf, HEADER + sc as u64 * 4)?;
                let mut slots = vec![0u32; sc as usize];
                let mut entries = full_capacity(max_entries, ec);
                for (n, c) in buf.chunks_exact(ENTRY as usize).enumerate() {
                    let mut e = decode_entry(c);
                    let slot = (e.hash % sc as u64) as usize;
                    e.prev = slots[slot];
                    slots[slot] = n as u32 + 1;
                    entries.push(e);
                }
                active = Some(Active {
                    seq,
                    file: f,
                    slots,
                    persisted_entries: entries.len(),
                    entries,
                    begin_ts,
                    end_ts,
                    end_offset,
                    dirty: true,
                });
            } else {
                sealed.push(Sealed {
                    seq,
                    file: f,
                    slot_count: sc,
                    entry_count: ec,
                    begin_ts,
                    end_ts,
                    end_offset,
                });
            }
        }
        let active = match active {
            Some(a) => a,
            None => {
                let seq = seqs.last().map(|s| s + 1).unwrap_or(0);
                let end_offset = sealed.last().map(|s| s.end_offset).unwrap_or(0);
                Self::new_active(vfs.as_ref(), &dir, seq, slot_count, max_entries, end_offset)?
            }
        };
        let from = active.end_offset;
        Ok((
            Index {
                dir,
                vfs,
                slot_count,
                max_entries,
                sealed: RwLock::new(sealed),
                active: Mutex::new(active),
                io: Mutex::new(()),
            },
            from,
        ))
    }

    fn new_active(
        vfs: &dyn Vfs,
        dir: &std::path::Path,
        seq: u64,
        slot_count: u32,
        max_entries: u32,
        end_offset: u64,
    ) -> io::Result<Active> {
        let file = vfs.open(&join(dir, &offset_name(seq)), true)?;
        Ok(Active {
            seq,
            file,
            slots: vec![0; slot_count as usize],
            entries: full_capacity(max_entries, 0),
            persisted_entries: 0,
            begin_ts: 0,
            end_ts: 0,
            end_offset,
            dirty: true,
        })
    }

    /// Commit-log offset up to which records are indexed.
    #[cfg(test)]
    pub fn end_offset(&self) -> u64 {
        self.active.lock().end_offset
    }

    /// Adds entries for records ending before `end_offset`. Called by the writer thread.
    pub fn add(&self, items: &[(u64, u64, i64)], end_offset: u64) -> io::Result<()> {
        let mut a = self.active.lock();
        for &(hash, offset, ts) in items {
            if offset < a.end_offset {
                continue; // already indexed (replay after recovery)
            }
            if a.entries.len() as u32 >= self.max_entries {
                // Items come in commit-log order: the records before this one are all
                // indexed, here or in older files (set before the seal, or a file filled
                // in the middle of a batch would claim less than it holds, and retention
                // would drop it while its last records are still in the commit log).
                a.end_offset = a.end_offset.max(offset);
                // Sealed (slots and all) before its successor exists: a file that is not
                // the newest is never missing its slots (see the module docs).
                self.write_out(&mut a)?;
                let seq = a.seq + 1;
                let next = Self::new_active(
                    self.vfs.as_ref(),
                    &self.dir,
                    seq,
                    self.slot_count,
                    self.max_entries,
                    a.end_offset,
                )?;
                let old = std::mem::replace(&mut *a, next);
                self.seal(old)?;
            }
            if a.entries.is_empty() {
                a.begin_ts = ts;
            }
            let slot = (hash % self.slot_count as u64) as usize;
            let prev = a.slots[slot];
            a.entries.push(IdxEntry {
                hash,
                offset,
                ts,
                prev,
            });
            let n = a.entries.len() as u32;
            a.slots[slot] = n;
            a.end_ts = a.end_ts.max(ts);
        }
        a.end_offset = a.end_offset.max(end_offset);
        a.dirty = true;
        Ok(())
    }

    /// Copies what is not yet persisted of the active file (and, with `slots`, its slot
    /// table), with the header that describes it. Plain copies: the encoding is done by
    /// `write_image`, outside the lock the writer needs for every batch.
    fn image(&self, a: &Active, slots: bool) -> Image {
        let mut h = [0u8; HEADER as usize];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..12].copy_from_slice(&self.slot_count.to_le_bytes());
        h[12..16].copy_from_slice(&self.max_entries.to_le_bytes());
        h[16..20].copy_from_slice(&(a.entries.len() as u32).to_le_bytes());
        h[24..32].copy_from_slice(&a.begin_ts.to_le_bytes());
        h[32..40].copy_from_slice(&a.end_ts.to_le_bytes());
        h[40..48].copy_from_slice(&a.end_offset.to_le_bytes());
        Image {
            seq: a.seq,
            file: a.file.clone(),
            first_entry: a.persisted_entries,
            entry_count: a.entries.len(),
            entries: a.entries[a.persisted_entries..].to_vec(),
            slots: slots.then(|| a.slots.clone()),
            header: h,
            end_offset: a.end_offset,
        }
    }

    fn write_image(&self, img: &Image) -> io::Result<()> {
        let sc = self.slot_count as u64;
        let mut entries = Vec::with_capacity(img.entries.len() * ENTRY as usize);
        for e in &img.entries {
            entries.extend_from_slice(&e.hash.to_le_bytes());
            entries.extend_from_slice(&e.offset.to_le_bytes());
            entries.extend_from_slice(&e.ts.to_le_bytes());
            entries.extend_from_slice(&e.prev.to_le_bytes());
        }
        img.file
            .write_all_at(&entries, HEADER + sc * 4 + img.first_entry as u64 * ENTRY)?;
        if let Some(slots) = &img.slots {
            let bytes: Vec<u8> = slots.iter().flat_map(|s| s.to_le_bytes()).collect();
            img.file.write_all_at(&bytes, HEADER)?;
        }
        // Entries (and slots) must be durable before the header that counts them.
        img.file.sync_data()?;
        img.file.write_all_at(&img.header, 0)?;
        // The header is what recovery trusts; make it durable before the checkpoint.
        img.file.sync_data()
    }

    /// Writes the whole active file out (sealing; the caller holds `active`).
    fn write_out(&self, a: &mut Active) -> io::Result<()> {
        let img = self.image(a, true);
        let _io = self.io.lock();
        self.write_image(&img)?;
        a.persisted_entries = img.entry_count;
        a.dirty = false;
        Ok(())
    }

    /// Lists a file written out whole (`write_out`) as sealed.
    fn seal(&self, a: Active) -> io::Result<()> {
        self.sealed.write().push(Sealed {
            seq: a.seq,
            file: a.file,
            slot_count: self.slot_count,
            entry_count: a.entries.len() as u32,
            begin_ts: a.begin_ts,
            end_ts: a.end_ts,
            end_offset: a.end_offset,
        });
        // The successor was just created: its directory entry (and the sealed file's, if
        // that one is new too) must be durable before a checkpoint counts on them.
        self.vfs.sync_dir(&self.dir)
    }

    /// Persists the active file (checkpoint). Returns the offset up to which the index is
    /// durable.
    ///
    /// The appends of the writer are not held up by the file writes and fdatasyncs: what
    /// is to be written is copied under the lock, written without it, and only then
    /// counted as persisted (if the file is sealed meanwhile, the seal writes it whole
    /// after this write, as it waits for `io`).
    pub fn persist(&self) -> io::Result<u64> {
        let (img, io) = {
            let mut a = self.active.lock();
            if !a.dirty {
                return Ok(a.end_offset);
            }
            // Entries added from here on mark the file dirty again.
            a.dirty = false;
            // A file filled to the last entry is full on disk too, and a full newest file
            // is opened as sealed: its slots must be there, as a seal would write them.
            let full = a.entries.len() as u32 >= self.max_entries;
            let img = self.image(&a, full);
            // Taken before `active` is let go (never waits: only holders of `active` take
            // it), so a seal cannot come between this copy and its write and then have its
            // header overwritten by this older one.
            (img, self.io.lock())
        };
        let written = self.write_image(&img);
        drop(io);
        let mut a = self.active.lock();
        match written {
            Ok(()) => {
                if a.seq == img.seq {
                    a.persisted_entries = a.persisted_entries.max(img.entry_count);
                }
                Ok(img.end_offset)
            }
            Err(e) => {
                a.dirty = true;
                Err(e)
            }
        }
    }

    /// Candidate commit-log offsets for `hash` with store time in `[begin, end]`, newest first.
    pub fn lookup(&self, hash: u64, begin: i64, end: i64, max: usize) -> io::Result<Vec<u64>> {
        let mut out = Vec::new();
        let active_seq;
        {
            let a = self.active.lock();
            active_seq = a.seq;
            let mut n = a.slots[(hash % self.slot_count as u64) as usize];
            while n != 0 && out.len() < max {
                let Some(e) = a.entries.get(n as usize - 1) else {
                    break;
                };
                if e.hash == hash && e.ts >= begin && e.ts <= end {
                    out.push(e.offset);
                }
                if e.prev >= n {
                    break; // chains only point backwards; anything else is damage
                }
                n = e.prev;
            }
        }
        let sealed = self.sealed.read();
        for s in sealed.iter().rev() {
            if out.len() >= max {
                break;
            }
            // Sealed after its entries were read above as the active file (the writer can
            // seal between the two locks): read once, not twice.
            if s.seq >= active_seq {
                continue;
            }
            if s.end_ts < begin || s.begin_ts > end || s.slot_count == 0 {
                continue;
            }
            let mut b4 = [0u8; 4];
            s.file
                .read_exact_at(&mut b4, HEADER + (hash % s.slot_count as u64) * 4)?;
            let mut n = u32::from_le_bytes(b4);
            let mut eb = [0u8; ENTRY as usize];
            let mut steps = 0u32;
            while n != 0 && n <= s.entry_count && out.len() < max && steps <= s.entry_count {
                s.file.read_exact_at(
                    &mut eb,
                    HEADER + s.slot_count as u64 * 4 + (n as u64 - 1) * ENTRY,
                )?;
                let e = decode_entry(&eb);
                if e.hash == hash && e.ts >= begin && e.ts <= end {
                    out.push(e.offset);
                }
                if e.prev >= n {
                    break;
                }
                n = e.prev;
                steps += 1;
            }
        }
        Ok(out)
    }

    /// Retention: deletes sealed files that only index records below `clog_min`.
    pub fn drop_below(&self, clog_min: u64) -> io::Result<()> {
        let mut sealed = self.sealed.write();
        while sealed.first().is_some_and(|s| s.end_offset <= clog_min) {
            let s = sealed.remove(0);
            self.vfs
                .remove_file(&join(&self.dir, &offset_name(s.seq)))?;
        }
        Ok(())
    }

    /// Forgets every entry at or after `offset` (recovery cut the commit log there).
    pub fn truncate(&self, offset: u64) {
        let mut a = self.active.lock();
        if a.end_offset <= offset {
            return;
        }
        let keep = a.entries.iter().take_while(|e| e.offset < offset).count();
        a.entries.truncate(keep);
        a.persisted_entries = a.persisted_entries.min(keep);
        let sc = self.slot_count as u64;
        let mut slots = vec![0u32; sc as usize];
        for (n, e) in a.entries.iter_mut().enumerate() {
            let slot = (e.hash % sc) as usize;
            e.prev = slots[slot];
            slots[slot] = n as u32 + 1;
        }
        a.slots = slots;
        a.end_offset = offset;
        a.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::StdFs;

    #[test]
    fn hashes_are_those_of_the_index_format() {
        // Written to index files: these values must never change.
        assert_eq!(id_hash("MSG-1"), 0xffb1_a0a6_dbc8_a6ef);
        assert_eq!(key_hash("orders", "k1"), 0x201b_07ad_dd75_5219);
        assert_eq!(id_hash("MSG-1"), fnv1a(b"U\0MSG-1"));
        assert_eq!(key_hash("orders", "k1"), fnv1a(b"K\0orders\0k1"));
    }

    #[test]
    fn sealed_files_are_complete_without_a_checkpoint() {
        // Files fill up and are sealed between checkpoints; a crash then (no `persist`)
        // must leave every sealed file with its slots, while the active file, never
        // checkpointed, is rebuilt from the commit log (`from`).
        let dir = tempfile::tempdir().expect("tempdir");
        let vfs: Arc<dyn Vfs> = Arc::new(StdFs);
        let (idx, _) = Index::open(vfs.clone(), dir.path().to_path_buf(), 16, 5).expect("open");
        let k = key_hash("t", "k");
        let items: Vec<_> = (0..12u64).map(|i| (k, i * 100, 1000 + i as i64)).collect();
        idx.add(&items, 1200).expect("add");
        drop(idx);
        let (idx, from) = Index::open(vfs, dir.path().to_path_buf(), 16, 5).expect("reopen");
        assert_eq!(
            from, 1000,
            "indexed up to the end of the second sealed file"
        );
        assert_eq!(
            idx.lookup(k, 0, i64::MAX, 100).expect("lookup"),
            vec![900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
        );
    }

    #[test]
    fn a_file_checkpointed_exactly_full_keeps_its_slots() {
        // Filled to the last entry and checkpointed before the next add would seal it: on
        // reopen it is the newest file and full, so it is opened as sealed and read from disk.
        let dir = tempfile::tempdir().expect("tempdir");
        let vfs: Arc<dyn Vfs> = Arc::new(StdFs);
        let (idx, _) = Index::open(vfs.clone(), dir.path().to_path_buf(), 16, 5).expect("open");
        let k = key_hash("t", "k");
        let items: Vec<_> = (0..5u64).map(|i| (k, i * 100, 1000 + i as i64)).collect();
        idx.add(&items, 500).expect("add");
        idx.persist().expect("persist");
        drop(idx);
        let (idx, from) = Index::open(vfs, dir.path().to_path_buf(), 16, 5).expect("reopen");
        assert_eq!(from, 500);
        assert_eq!(
            idx.lookup(k, 0, i64::MAX, 100).expect("lookup"),
            vec![400, 300, 200, 100, 0]
        );
    }

    #[test]
    fn a_newest_file_of_another_shape_or_too_short_is_rebuilt() {
        // Reopened with more slots than the file was written with (a changed
        // `index_slots`): its slot table would be indexed out of bounds, so the file is
        // rebuilt from the commit log instead. The same for a file shorter than its header
        // claims (the entry count comes from disk and sizes a read).
        let k = key_hash("t", "k");
        let items: Vec<_> = (0..3u64).map(|i| (k, i * 100, 1000 + i as i64)).collect();
        for damage in ["slots", "max_entries", "short"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let vfs: Arc<dyn Vfs> = Arc::new(StdFs);
            let (idx, _) = Index::open(vfs.clone(), dir.path().to_path_buf(), 16, 5).expect("open");
            idx.add(&items, 300).expect("add");
            idx.persist().expect("persist");
            drop(idx);
            let (slots, max) = match damage {
                "slots" => (64, 5),
                "max_entries" => (16, 8),
                _ => {
                    let f = vfs
                        .open(&join(dir.path(), &offset_name(0)), false)
                        .expect("open file");
                    let len = f.len().expect("len");
                    f.set_len(len - 1).expect("truncate");
                    (16, 5)
                }
            };
            let (idx, from) =
                Index::open(vfs, dir.path().to_path_buf(), slots, max).expect("reopen");
            assert_eq!(
                from, 0,
                "{damage}: rebuilt from the start of the commit log"
            );
            assert!(idx.lookup(k, 0, i64::MAX, 100).expect("lookup").is_empty());
            idx.add(&items, 300).expect("replay");
            assert_eq!(
                idx.lookup(k, 0, i64::MAX, 100).expect("lookup"),
                vec![200, 100, 0],
                "{damage}"
            );
        }
    }

    #[test]
    fn lookups_survive_seal_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vfs: Arc<dyn Vfs> = Arc::new(StdFs);
        let (idx, from) = Index::open(vfs.clone(), dir.path().to_path_buf(), 16, 5).expect("open");
        assert_eq!(from, 0);
        let k = key_hash("t", "order-1");
        let other = key_hash("t", "order-2");
        let mut items = Vec::new();
        for i in 0..12u64 {
            items.push((if i % 3 == 0 { k } else { other }, i * 100, 1000 + i as i64));
        }
        idx.add(&items, 1200).expect("add");
        assert_eq!(
            idx.lookup(k, 0, i64::MAX, 100).expect("lookup"),
            vec![900, 600, 300, 0]
        );
        assert_eq!(
            idx.lookup(k, 1003, 1006, 100).expect("lookup"),
            vec![600, 300]
        );
        idx.persist().expect("persist");
        drop(idx);
        let (idx, from) = Index::open(vfs, dir.path().to_path_buf(), 16, 5).expect("reopen");
        assert_eq!(from, 1200);
        assert_eq!(
            idx.lookup(k, 0, i64::MAX, 100).expect("lookup"),
            vec![900, 600, 300, 0]
        );
        idx.truncate(650);
        // Sealed files keep stale candidates; callers verify every candidate by reading it.
        assert_eq!(
            idx.lookup(k, 0, i64::MAX, 100).expect("lookup"),
            vec![900, 600, 300, 0]
        );
        assert_eq!(idx.end_offset(), 650);
        idx.drop_below(10_000).expect("drop");
        assert_eq!(
            idx.lookup(k, 0, i64::MAX, 100).expect("lookup"),
            Vec::<u64>::new()
        );
    }
}
