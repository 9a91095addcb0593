//! Authentication input: the `authorization` and `x-mq-date-time` headers of a request
//! (`Acl::authenticate`) and the ACL file (`Acl::from_toml`).
//!
//! The first byte picks the decoder. For headers, the rest up to the first newline is the
//! `authorization` value and the remainder the date. Whatever the input: no panic; a
//! header only authenticates as the one configured user; and a header the way a client
//! signs it, over the input's date, always authenticates.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_proxy::auth::{Acl, sign};

fn acl() -> &'static Acl {
    static ACL: OnceLock<Acl> = OnceLock::new();
    ACL.get_or_init(|| {
        Acl::from_toml(
            "[[users]]\naccess_key = \"fuzz\"\nsecret_key = \"fuzz-secret\"\npublish = [\"*\"]\n",
        )
        .expect("acl")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(acl) = Acl::from_toml(&String::from_utf8_lossy(rest)) {
            let _ = acl.authenticate(
                Some(b"MQv2-HMAC-SHA1 Credential=a, Signature=00"),
                Some(b"d"),
            );
        }
        return;
    }
    let (header, date) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    if let Ok(u) = acl().authenticate(Some(header), Some(date)) {
        assert_eq!(u.access_key, "fuzz");
    }
    let _ = acl().authenticate(Some(header), None);
    let date = String::from_utf8_lossy(date);
    let signed = sign("fuzz", "fuzz-secret", &date);
    assert!(
        acl()
            .authenticate(Some(signed.as_bytes()), Some(date.as_bytes()))
            .is_ok(),
        "a correctly signed header was refused: {signed:?} over {date:?}"
    );
    let wrong = sign("fuzz", "other-secret", &date);
    assert!(
        acl()
            .authenticate(Some(wrong.as_bytes()), Some(date.as_bytes()))
            .is_err()
    );
});
