//! Receipt handles.
//!
//! A handle names one delivery of one message and carries everything needed to ack it, so
//! an ack is accepted after a broker restart or through any proxy:
//!
//! ```text
//! 1~<broker>~<topic>~<queue id>~<queue offset>~<delivery attempt>~<nonce, 16 hex>~<crc32c, 8 hex>
//! ```
//!
//! `~` cannot occur in topic or broker names. The CRC covers everything before it and
//! rejects garbage and typos; the nonce, drawn per delivery and kept in the persisted POP
//! state, rejects forged handles and handles of an earlier delivery (stale).

use crate::error::BrokerError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptHandle {
    pub broker: String,
    pub topic: String,
    pub queue_id: u32,
    pub offset: u64,
    pub attempt: u32,
    pub nonce: u64,
}

impl ReceiptHandle {
    pub fn encode(&self) -> String {
        let body = format!(
            "1~{}~{}~{}~{}~{}~{:016x}",
            self.broker, self.topic, self.queue_id, self.offset, self.attempt, self.nonce
        );
        let crc = crc32c::crc32c(body.as_bytes());
        format!("{body}~{crc:08x}")
    }

    pub fn decode(s: &str) -> Result<ReceiptHandle, BrokerError> {
        let bad = |why: &str| BrokerError::InvalidReceiptHandle(format!("{why}: {:.80}", s));
        if s.len() > 512 {
            return Err(bad("too long"));
        }
        let (body, crc) = s.rsplit_once('~').ok_or_else(|| bad("malformed"))?;
        if crc.len() != 8 || !crc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad("malformed checksum"));
        }
        let crc = u32::from_str_radix(crc, 16).map_err(|_| bad("malformed checksum"))?;
        if crc32c::crc32c(body.as_bytes()) != crc {
            return Err(bad("checksum mismatch"));
        }
        let parts: Vec<&str> = body.split('~').collect();
        if parts.len() != 7 || parts[0] != "1" {
            return Err(bad("unknown format"));
        }
        // Only the canonical spelling is accepted, so a handle has exactly one form.
        let num = |p: &str, what: &str| -> Result<u64, BrokerError> {
            let canonical = !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p == "0" || !p.starts_with('0'));
            if !canonical {
                return Err(bad(what));
            }
            p.parse().map_err(|_| bad(what))
        };
        if parts[6].len() != 16
            || !parts[6]
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad("nonce"));
        }
        Ok(ReceiptHandle {
            broker: parts[1].to_owned(),
            topic: parts[2].to_owned(),
            queue_id: u32::try_from(num(parts[3], "queue id")?).map_err(|_| bad("queue id"))?,
            offset: num(parts[4], "offset")?,
            attempt: u32::try_from(num(parts[5], "attempt")?).map_err(|_| bad("attempt"))?,
            nonce: u64::from_str_radix(parts[6], 16).map_err(|_| bad("nonce"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_rejects_tampering() {
        let h = ReceiptHandle {
            broker: "b0".into(),
            topic: "orders".into(),
            queue_id: 3,
            offset: 42,
            attempt: 2,
            nonce: 0xdead_beef,
        };
        let s = h.encode();
        assert_eq!(ReceiptHandle::decode(&s).expect("decodes"), h);
        let tampered = s.replace("~42~", "~43~");
        assert!(ReceiptHandle::decode(&tampered).is_err());
        assert!(ReceiptHandle::decode("").is_err());
        assert!(ReceiptHandle::decode("garbage").is_err());
        assert!(ReceiptHandle::decode(&"x~".repeat(400)).is_err());
        // Non-canonical spellings of the same handle are refused.
        let seal = |body: &str| format!("{body}~{:08x}", crc32c::crc32c(body.as_bytes()));
        assert!(ReceiptHandle::decode(&seal("1~b0~orders~3~042~2~00000000deadbeef")).is_err());
        assert!(ReceiptHandle::decode(&seal("1~b0~orders~3~42~2~deadbeef")).is_err());
        assert!(ReceiptHandle::decode(&seal("1~b0~orders~+3~42~2~00000000deadbeef")).is_err());
        assert!(ReceiptHandle::decode(&seal("1~b0~orders~3~42~2~00000000deadbeef")).is_ok());
        // The checksum too has one spelling: 8 lower-case hex digits.
        let ok = seal("1~b0~orders~3~42~2~00000000deadbeef");
        let (body, crc) = ok.rsplit_once('~').expect("sealed");
        assert!(
            ReceiptHandle::decode(&format!("{body}~{}", crc.to_uppercase())).is_err()
                || crc == crc.to_uppercase()
        );
    }

    proptest! {
        #[test]
        fn decoded_handles_reencode_to_themselves(s in "1~[a-z]{1,4}~[a-z]{1,4}~[0-9]{1,3}~[0-9]{1,5}~[0-9]{1,2}~[0-9a-f]{16}") {
            let sealed = format!("{s}~{:08x}", crc32c::crc32c(s.as_bytes()));
            if let Ok(h) = ReceiptHandle::decode(&sealed) {
                prop_assert_eq!(h.encode(), sealed);
            }
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in ".{0,200}") {
            let _ = ReceiptHandle::decode(&s);
        }
    }
}
