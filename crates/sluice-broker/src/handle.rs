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
        let crc = u32::from_str_radix(crc, 16).map_err(|_| bad("malformed checksum"))?;
        if crc32c::crc32c(body.as_bytes()) != crc {
            return Err(bad("checksum mismatch"));
        }
        let parts: Vec<&str> = body.split('~').collect();
        if parts.len() != 7 || parts[0] != "1" {
            return Err(bad("unknown format"));
        }
        Ok(ReceiptHandle {
            broker: parts[1].to_owned(),
            topic: parts[2].to_owned(),
            queue_id: parts[3].parse().map_err(|_| bad("queue id"))?,
            offset: parts[4].parse().map_err(|_| bad("offset"))?,
            attempt: parts[5].parse().map_err(|_| bad("attempt"))?,
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
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in ".{0,200}") {
            let _ = ReceiptHandle::decode(&s);
        }
    }
}
