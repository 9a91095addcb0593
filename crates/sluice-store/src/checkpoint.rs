//! The checkpoint file: where recovery may start.
//!
//! ```text
//!  0  4  magic "SLCQ" (0x534C_4351); "SLCP" (0x534C_4350) for the older 24-byte form
//!  4  8  clog_durable: every commit-log byte below it was fdatasync'ed
//! 12  8  dispatched:   every record below it has durable consume-queue entries
//! 20  4  flags (SLCQ only): bit 0 `clean`
//! 24  4  crc32c of the bytes before it
//! ```
//!
//! `clean` is set only by the checkpoint a store writes as it closes, after its last write:
//! nothing was appended after it, so no consume-queue entry points past `clog_durable`, and
//! an opening store whose commit log still ends there can skip reading the last entry of
//! every queue (seconds with a million queues). The first checkpoint an opened store writes,
//! before it accepts any append, clears it. The older form reads as not clean.
//!
//! Written to `checkpoint.tmp`, synced, renamed over `checkpoint`, and the directory synced,
//! so a crash leaves either the old or the new checkpoint, never a torn one.

use std::io;
use std::path::Path;

use crate::fs::Vfs;

const MAGIC: u32 = 0x534C_4351;
const MAGIC_V1: u32 = 0x534C_4350;
const LEN: usize = 28;
const LEN_V1: usize = 24;
const CLEAN: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Checkpoint {
    pub clog_durable: u64,
    pub dispatched: u64,
    /// Written by a closing store after its last write (see the module docs).
    pub clean: bool,
}

impl Checkpoint {
    fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..12].copy_from_slice(&self.clog_durable.to_le_bytes());
        b[12..20].copy_from_slice(&self.dispatched.to_le_bytes());
        let flags = if self.clean { CLEAN } else { 0 };
        b[20..24].copy_from_slice(&flags.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..24]);
        b[24..28].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Checkpoint> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = match b.len() {
            LEN | LEN_V1 => u32_at(0),
            _ => return None,
        };
        let crc_at = match (magic, b.len()) {
            (MAGIC, LEN) => 24,
            (MAGIC_V1, LEN_V1) => 20,
            _ => return None,
        };
        if crc32c::crc32c(&b[0..crc_at]) != u32_at(crc_at) {
            return None;
        }
        let u = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let flags = if magic == MAGIC { u32_at(20) } else { 0 };
        Some(Checkpoint {
            clog_durable: u(4),
            dispatched: u(12),
            clean: flags & CLEAN != 0,
        })
    }

    /// Loads the checkpoint; a missing file is `Ok(None)`, a damaged one an error.
    pub fn load(vfs: &dyn Vfs, dir: &Path) -> io::Result<Option<Checkpoint>> {
        let path = dir.join("checkpoint");
        if !vfs.exists(&path) {
            return Ok(None);
        }
        let f = vfs.open(&path, false)?;
        let mut b = vec![0u8; f.len()? as usize];
        f.read_exact_at(&mut b, 0)?;
        Checkpoint::decode(&b).map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is damaged", path.display()),
            )
        })
    }

    pub fn store(&self, vfs: &dyn Vfs, dir: &Path) -> io::Result<()> {
        let tmp = dir.join("checkpoint.tmp");
        let f = vfs.open(&tmp, true)?;
        f.set_len(0)?;
        f.write_all_at(&self.encode(), 0)?;
        // The new checkpoint must be complete on disk before it replaces the old one.
        f.sync_data()?;
        vfs.rename(&tmp, &dir.join("checkpoint"))?;
        // Make the rename itself durable.
        vfs.sync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::StdFs;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Checkpoint::load(&StdFs, dir.path()).expect("load"), None);
        for clean in [false, true] {
            let c = Checkpoint {
                clog_durable: 77,
                dispatched: 55,
                clean,
            };
            c.store(&StdFs, dir.path()).expect("store");
            assert_eq!(Checkpoint::load(&StdFs, dir.path()).expect("load"), Some(c));
        }
        let mut b = std::fs::read(dir.path().join("checkpoint")).expect("read");
        b[5] ^= 1;
        std::fs::write(dir.path().join("checkpoint"), b).expect("write");
        assert!(Checkpoint::load(&StdFs, dir.path()).is_err());
    }

    #[test]
    fn the_older_form_still_loads_and_is_not_clean() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC_V1.to_le_bytes());
        b.extend_from_slice(&9u64.to_le_bytes());
        b.extend_from_slice(&8u64.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        std::fs::write(dir.path().join("checkpoint"), &b).expect("write");
        assert_eq!(
            Checkpoint::load(&StdFs, dir.path()).expect("load"),
            Some(Checkpoint {
                clog_durable: 9,
                dispatched: 8,
                clean: false,
            })
        );
        // Neither form is accepted with the other's length.
        let mut long = b.clone();
        long.extend_from_slice(&[0; 4]);
        std::fs::write(dir.path().join("checkpoint"), &long).expect("write");
        assert!(Checkpoint::load(&StdFs, dir.path()).is_err());
    }
}
