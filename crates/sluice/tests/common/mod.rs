//! Shared setup for the end-to-end tests that run the real `sluice` binary.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Status code of a plain HTTP GET, or `None` if nothing answers.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split(' ').nth(1)?.parse().ok()
}

/// `sluice server` with `options` (placed right after `server`) on `data`, listening on
/// the given ports, with small store files; stdout is discarded, stderr goes to `log`.
/// Not yet spawned.
pub fn server_command(
    options: &[&str],
    data: &Path,
    grpc_port: u16,
    admin_port: u16,
    log: File,
) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("server")
        .args(options)
        .arg("--data-dir")
        .arg(data)
        .args(["--listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        // Small files for a test; also exercises the environment layer.
        .env("SLUICE_STORE__SEGMENT_SIZE", "16MiB")
        .env("SLUICE_STORE__MIN_FREE_SPACE", "0")
        .stdout(Stdio::null())
        .stderr(log);
    cmd
}
