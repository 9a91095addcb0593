//! The checkpoint file: where recovery may start.
//!
//! ```text
//!  0  4  magic "SLCP" (0x534C_4350)
//!  4  8  clog_durable: every commit-log byte below it was fdatasync'ed
//! 12  8  dispatched:   every record below it has durable consume-queue entries
//! 20  4  crc32c of bytes [0, 20)
//! ```
//!
//! Written to `checkpoint.tmp`, synced, renamed over `checkpoint`, and the directory synced,
//! so a crash leaves either the old or the new checkpoint, never a torn one.

use std::io;
use std::path::Path;

use crate::fs::Vfs;

const MAGIC: u32 = 0x534C_4350;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Checkpoint {
    pub clog_durable: u64,
    pub dispatched: u64,
}

impl Checkpoint {
    fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..12].copy_from_slice(&self.clog_durable.to_le_bytes());
        b[12..20].copy_from_slice(&self.dispatched.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Checkpoint> {
        if b.len() != 24 || b[0..4] != MAGIC.to_le_bytes() {
            return None;
        }
        let crc = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
        if crc32c::crc32c(&b[0..20]) != crc {
            return None;
        }
        let u = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        Some(Checkpoint {
            clog_durable: u(4),
            dispatched: u(12),
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
        let c = Checkpoint {
            clog_durable: 77,
            dispatched: 55,
        };
        c.store(&StdFs, dir.path()).expect("store");
        assert_eq!(Checkpoint::load(&StdFs, dir.path()).expect("load"), Some(c));
        let mut b = std::fs::read(dir.path().join("checkpoint")).expect("read");
        b[5] ^= 1;
        std::fs::write(dir.path().join("checkpoint"), b).expect("write");
        assert!(Checkpoint::load(&StdFs, dir.path()).is_err());
    }
}
