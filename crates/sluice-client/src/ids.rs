//! Identifiers: message ids in the official RocketMQ 5 format, client ids, request ids,
//! and the SipHash-2-4 used to map a FIFO message group onto a queue.
//!
//! A message id is 17 bytes written as 34 upper-case hex digits:
//!
//! ```text
//! | 0x01 | host id (6 B, a MAC address) | pid (2 B, low bits) | seconds since 2021-01-01T00:00:00Z (4 B) | sequence (4 B) |
//! ```
//!
//! all big-endian, the same layout the official clients generate, so brokers and tools
//! that decode ids (to find the producer host, or the send time) read ours too. The host id
//! is the first non-zero MAC address under `/sys/class/net`; hosts without one (containers
//! with only a loopback device) get bytes derived from the host name, pid and start time.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// 2021-01-01T00:00:00Z in seconds since the Unix epoch.
const ID_EPOCH_SECS: u64 = 1_609_459_200;

struct IdPrefix {
    /// "01" + host id + pid, 18 hex digits.
    hex: String,
}

static PREFIX: OnceLock<IdPrefix> = OnceLock::new();
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

fn prefix() -> &'static IdPrefix {
    PREFIX.get_or_init(|| {
        let mac = mac_address().unwrap_or_else(fallback_host_id);
        let pid = (std::process::id() & 0xffff) as u16;
        let mut hex = String::with_capacity(18);
        hex.push_str("01");
        for b in mac.iter().chain(pid.to_be_bytes().iter()) {
            push_hex(&mut hex, *b);
        }
        IdPrefix { hex }
    })
}

fn push_hex(out: &mut String, b: u8) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    out.push(DIGITS[(b >> 4) as usize] as char);
    out.push(DIGITS[(b & 0xf) as usize] as char);
}

/// A new message id (34 upper-case hex digits).
pub fn next_message_id() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        .saturating_sub(ID_EPOCH_SECS) as u32;
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let mut id = String::with_capacity(34);
    id.push_str(&prefix().hex);
    for b in secs.to_be_bytes().iter().chain(seq.to_be_bytes().iter()) {
        push_hex(&mut id, *b);
    }
    id
}

fn mac_address() -> Option<[u8; 6]> {
    let mut names: Vec<_> = std::fs::read_dir("/sys/class/net")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names.into_iter().find_map(|n| {
        let text = std::fs::read_to_string(
            std::path::Path::new("/sys/class/net")
                .join(n)
                .join("address"),
        )
        .ok()?;
        parse_mac(text.trim())
    })
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    if parts.next().is_some() || out == [0; 6] {
        return None;
    }
    Some(out)
}

fn fallback_host_id() -> [u8; 6] {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut h = siphash24(hostname().as_bytes()) ^ nanos ^ u64::from(std::process::id());
    h = splitmix64(&mut h);
    let b = h.to_be_bytes();
    // Locally administered, unicast: cannot collide with a real MAC address.
    [(b[0] | 0x02) & 0xfe, b[1], b[2], b[3], b[4], b[5]]
}

/// The host name (from the kernel), or `localhost`.
pub fn hostname() -> String {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "localhost".to_owned())
    })
    .clone()
}

static CLIENT_INDEX: AtomicU32 = AtomicU32::new(0);

/// A client id in the shape the official clients use: `host@pid@index`, unique among the
/// clients of this process.
pub fn next_client_id() -> String {
    let n = CLIENT_INDEX.fetch_add(1, Ordering::Relaxed);
    // It travels in a header: printable ASCII only, and '@' separates the parts.
    let host: String = hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '@' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{host}@{}@{n}", std::process::id())
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

static RANDOM_STATE: AtomicU64 = AtomicU64::new(0);

/// A non-cryptographic random number (request ids, attempt ids, jitter).
pub fn random_u64() -> u64 {
    let mut s = RANDOM_STATE.load(Ordering::Relaxed);
    if s == 0 {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (u64::from(std::process::id()) << 32);
        let _ = RANDOM_STATE.compare_exchange(0, seed | 1, Ordering::Relaxed, Ordering::Relaxed);
    }
    s = RANDOM_STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    splitmix64(&mut s)
}

/// A random UUID-shaped string (version 4 layout).
pub fn random_uuid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// SipHash-2-4 with the key bytes `00 01 02 … 0f` (the default key of Guava's
/// `Hashing.sipHash24()`, which the Java client uses to place message groups).
pub fn siphash24(data: &[u8]) -> u64 {
    let k0 = 0x0706_0504_0302_0100u64;
    let k1 = 0x0f0e_0d0c_0b0a_0908u64;
    let mut v0 = k0 ^ 0x736f_6d65_7073_6575;
    let mut v1 = k1 ^ 0x646f_7261_6e64_6f6d;
    let mut v2 = k0 ^ 0x6c79_6765_6e65_7261;
    let mut v3 = k1 ^ 0x7465_6462_7974_6573;
    let round = |v0: &mut u64, v1: &mut u64, v2: &mut u64, v3: &mut u64| {
        *v0 = v0.wrapping_add(*v1);
        *v1 = v1.rotate_left(13) ^ *v0;
        *v0 = v0.rotate_left(32);
        *v2 = v2.wrapping_add(*v3);
        *v3 = v3.rotate_left(16) ^ *v2;
        *v0 = v0.wrapping_add(*v3);
        *v3 = v3.rotate_left(21) ^ *v0;
        *v2 = v2.wrapping_add(*v1);
        *v1 = v1.rotate_left(17) ^ *v2;
        *v2 = v2.rotate_left(32);
    };
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let m = u64::from_le_bytes(w);
        v3 ^= m;
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        round(&mut v0, &mut v1, &mut v2, &mut v3);
        v0 ^= m;
    }
    let rest = chunks.remainder();
    let mut last = [0u8; 8];
    last[..rest.len()].copy_from_slice(rest);
    let m = u64::from_le_bytes(last) | ((data.len() as u64 & 0xff) << 56);
    v3 ^= m;
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    round(&mut v0, &mut v1, &mut v2, &mut v3);
    v0 ^= m;
    v2 ^= 0xff;
    for _ in 0..4 {
        round(&mut v0, &mut v1, &mut v2, &mut v3);
    }
    v0 ^ v1 ^ v2 ^ v3
}

/// Index of the queue a message group goes to among `n` queues: the SipHash-2-4 of the
/// group read as a signed 64-bit number, floor-modulo `n` (what the Java client computes).
pub fn queue_index_for_group(group: &str, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    (siphash24(group.as_bytes()) as i64).rem_euclid(n as i64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_layout() {
        let a = next_message_id();
        let b = next_message_id();
        assert_eq!(a.len(), 34);
        assert!(a.starts_with("01"));
        assert!(
            a.chars()
                .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
        );
        assert_ne!(a, b);
        // Same host and process prefix, increasing sequence.
        assert_eq!(a[..18], b[..18]);
        let seq = |s: &str| u32::from_str_radix(&s[26..], 16).expect("hex");
        assert_eq!(seq(&b), seq(&a).wrapping_add(1));
        // Seconds since 2021 are plausible (after 2024, before 2100).
        let secs = u32::from_str_radix(&a[18..26], 16).expect("hex");
        assert!(secs > 94_000_000 && secs < 2_500_000_000, "{secs}");
        let pid = u16::from_str_radix(&a[14..18], 16).expect("hex");
        assert_eq!(pid, (std::process::id() & 0xffff) as u16);
    }

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("02:42:ac:11:00:02"),
            Some([0x02, 0x42, 0xac, 0x11, 0x00, 0x02])
        );
        assert_eq!(parse_mac("00:00:00:00:00:00"), None);
        assert_eq!(parse_mac("02:42:ac:11:00"), None);
        assert_eq!(parse_mac("02:42:ac:11:00:02:01"), None);
        assert_eq!(parse_mac("zz:42:ac:11:00:02"), None);
        let f = fallback_host_id();
        assert_eq!(f[0] & 0x03, 0x02);
    }

    #[test]
    fn siphash_reference_vectors() {
        // From the SipHash paper's test vectors (key 00..0f, message 00 01 02 ...).
        assert_eq!(siphash24(b""), 0x726f_db47_dd0e_0e31);
        assert_eq!(siphash24(&[0]), 0x74f8_39c5_93dc_67fd);
        let msg: Vec<u8> = (0u8..15).collect();
        assert_eq!(siphash24(&msg), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn group_placement_is_stable_and_in_range() {
        for n in 1..20 {
            for g in ["a", "order-1", "order-2", "顧客"] {
                let i = queue_index_for_group(g, n);
                assert!(i < n);
                assert_eq!(i, queue_index_for_group(g, n));
            }
        }
        assert_eq!(queue_index_for_group("x", 0), 0);
    }

    #[test]
    fn ids_are_distinct() {
        let a = next_client_id();
        let b = next_client_id();
        assert_ne!(a, b);
        assert_eq!(a.split('@').count(), 3);
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_ne!(u, random_uuid());
    }
}
