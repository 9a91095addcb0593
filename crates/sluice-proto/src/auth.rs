//! The request signature of the RocketMQ 5 clients:
//!
//! ```text
//! authorization: MQv2-HMAC-SHA1 Credential=<access key>, SignedHeaders=x-mq-date-time, Signature=<hex>
//! ```
//!
//! The signature is HMAC-SHA1, keyed with the secret key, over the bytes of the request's
//! `x-mq-date-time` header. The access point checks it (`sluice-proxy`); clients make it.

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// The `authorization` scheme.
pub const SCHEME: &str = "MQv2-HMAC-SHA1";

/// HMAC-SHA1 of `date_time` keyed with `secret_key`.
pub fn signature(secret_key: &[u8], date_time: &[u8]) -> [u8; 20] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret_key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(date_time);
    mac.finalize().into_bytes().into()
}

/// Whether `sig` is the signature of `date_time` with `secret_key` (constant time).
pub fn verify(secret_key: &[u8], date_time: &[u8], sig: &[u8]) -> bool {
    match <Hmac<Sha1> as Mac>::new_from_slice(secret_key) {
        Ok(mut mac) => {
            mac.update(date_time);
            mac.verify_slice(sig).is_ok()
        }
        Err(_) => false,
    }
}

/// The `authorization` header value for a request sent at `date_time` (upper-case hex,
/// as the Java and Node.js clients write it).
pub fn authorization(access_key: &str, secret_key: &str, date_time: &str) -> String {
    let sig: String = signature(secret_key.as_bytes(), date_time.as_bytes())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    format!("{SCHEME} Credential={access_key}, SignedHeaders=x-mq-date-time, Signature={sig}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // RFC 2202 test case 2 for HMAC-SHA1.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        let hex: String = sig.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79");
        assert!(verify(b"Jefe", b"what do ya want for nothing?", &sig));
        assert!(!verify(b"Jeff", b"what do ya want for nothing?", &sig));
        let h = authorization("ak", "Jefe", "what do ya want for nothing?");
        assert!(h.ends_with("Signature=EFFCDF6AE5EB2FA2D27416D5F184DF9C259A7C79"));
        assert!(h.starts_with("MQv2-HMAC-SHA1 Credential=ak, "));
    }
}
