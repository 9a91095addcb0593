//! End to end: the real `sluice` binary as a server and as the admin CLI.

use std::fs::File;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, free_port, http_status};

struct Server {
    child: Child,
    admin_port: u16,
    log: std::path::PathBuf,
}

impl Server {
    fn start(data: &Path, log: &Path) -> Server {
        Server::start_with_env(data, log, &[])
    }

    /// [`Server::start`] with extra environment variables for the server.
    fn start_with_env(data: &Path, log: &Path, env: &[(&str, &str)]) -> Server {
        let (grpc_port, admin_port) = (free_port(), free_port());
        let log_file = File::create(log).expect("log file");
        let child = common::server_command(&[], data, grpc_port, admin_port, log_file)
            .env("RUST_LOG", "info")
            .env_remove("SLUICE_ADMIN")
            .env_remove("SLUICE_TRANSPARENT_HUGE_PAGES")
            .envs(env.iter().copied())
            .spawn()
            .expect("spawn server");
        let mut s = Server {
            child,
            admin_port,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http_status(admin_port, "/readyz") == Some(200) {
                break;
            }
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!(
                    "server exited with {status} before ready:\n{}",
                    s.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not ready in time:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Ready also means the gRPC port is bound.
        assert!(TcpStream::connect(("127.0.0.1", grpc_port)).is_ok());
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(["--admin", &format!("http://127.0.0.1:{}", self.admin_port)])
            .args(args)
            .output()
            .expect("run cli")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.ok(&all);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {text}"))
    }

    /// Sends SIGTERM and waits for the exit status.
    fn terminate(mut self) -> (ExitStatus, String) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, self.log_text());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("server did not stop after SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn server_and_admin_cli_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let s = Server::start(&data, &dir.path().join("first.log"));

    let out = s.ok(&[
        "topic", "create", "orders", "--type", "fifo", "--queues", "4",
    ]);
    assert!(out.contains("orders"), "{out}");
    let list = s.json(&["topic", "list"]);
    let topics = list["topics"].as_array().expect("topics array");
    assert_eq!(topics.len(), 1, "{list}");
    assert_eq!(topics[0]["name"], "orders");
    assert_eq!(topics[0]["type"], "fifo");
    assert_eq!(topics[0]["queues"], 4);

    // The human table names the topic too.
    let table = s.ok(&["topic", "list"]);
    assert!(
        table.contains("orders") && table.contains("fifo"),
        "{table}"
    );
    let described = s.json(&["topic", "describe", "orders"]);
    assert_eq!(described["queue_status"].as_array().map(Vec::len), Some(4));

    // API errors: message on stderr, exit status 1.
    let dup = s.cli(&["topic", "create", "orders", "--type", "fifo"]);
    assert_eq!(dup.status.code(), Some(1));
    let err = String::from_utf8_lossy(&dup.stderr);
    assert!(
        err.contains("already exists") && err.contains("TOPIC_EXISTS"),
        "{err}"
    );
    let missing = s.cli(&["topic", "describe", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
    // Usage errors: exit status 2.
    let usage = s.cli(&["topic", "create", "x", "--type", "bogus"]);
    assert_eq!(usage.status.code(), Some(2));

    s.ok(&[
        "group",
        "create",
        "billing",
        "--fifo",
        "--max-attempts",
        "5",
        "--start",
        "earliest",
    ]);
    let g = s.json(&["group", "describe", "billing"]);
    assert_eq!(g["name"], "billing");
    assert_eq!(g["fifo"], true);
    assert_eq!(g["max_attempts"], 5);
    assert_eq!(g["start"], "earliest");
    assert_eq!(g["total_lag"], 0);
    assert_eq!(g["total_inflight"], 0);
    let human = s.ok(&["group", "describe", "billing"]);
    assert!(
        human.contains("billing") && human.contains("In flight"),
        "{human}"
    );

    let reset = s.json(&[
        "group",
        "reset-offset",
        "billing",
        "--topic",
        "orders",
        "--to",
        "2024-01-01T00:00:00Z",
    ]);
    assert_eq!(reset["timestamp_ms"], 1_704_067_200_000_i64);
    assert_eq!(reset["queues"].as_array().map(Vec::len), Some(4));
    let resent = s.json(&["group", "resend-dead-letters", "billing"]);
    assert_eq!(resent["resent"], 0);
    let status = s.json(&["status"]);
    assert_eq!(status["flush_policy"], "sync");
    assert_eq!(status["topics"], 1);

    let (exit, log) = s.terminate();
    assert_eq!(exit.code(), Some(0), "{log}");
    for needle in ["store recovery report", "ready", "SIGTERM", "stopped"] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }

    // A restart on the same data keeps topics and groups.
    let s = Server::start(&data, &dir.path().join("second.log"));
    let list = s.json(&["topic", "list"]);
    assert_eq!(list["topics"][0]["name"], "orders", "{list}");
    let groups = s.json(&["group", "list"]);
    assert_eq!(groups["groups"][0]["name"], "billing", "{groups}");
    s.ok(&["topic", "delete", "orders"]);
    assert_eq!(
        s.json(&["topic", "list"])["topics"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    let (exit, log) = s.terminate();
    assert_eq!(exit.code(), Some(0), "{log}");
}

#[test]
fn config_show_and_strict_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("custom.toml");
    std::fs::write(
        &file,
        "[store]\nsegment_size = \"64MiB\"\nflush = \"async\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["config", "show", "--config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:9999"])
        .env("SLUICE_BROKER__NAME", "from-env")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "segment_size = \"64MiB\"",
        "flush = \"async\"",
        "listen = \"127.0.0.1:9999\"",
        "name = \"from-env\"",
        "admin_listen = \"127.0.0.1:8080\"",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }

    std::fs::write(
        &file,
        "[store]\nsegmnt_size = \"64MiB\"\nretention = \"3 weeks\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["server", "--config"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("segmnt_size") && err.contains("retention"),
        "{err}"
    );
}

/// `[server] transparent_huge_pages`: the server process runs without them unless the
/// setting says `true` (Linux reports the process's flag as `THP_enabled` in
/// `/proc/PID/status`).
#[cfg(target_os = "linux")]
#[test]
fn transparent_huge_pages_are_off_unless_configured() {
    for (setting, want) in [(None, "0"), (Some("true"), "1"), (Some("false"), "0")] {
        let dir = tempfile::tempdir().expect("tempdir");
        let env: Vec<(&str, &str)> = setting
            .map(|v| ("SLUICE_TRANSPARENT_HUGE_PAGES", v))
            .into_iter()
            .collect();
        let server = Server::start_with_env(
            &dir.path().join("data"),
            &dir.path().join("server.log"),
            &env,
        );
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))
            .expect("read /proc status");
        drop(server);
        let got = status
            .lines()
            .find_map(|l| l.strip_prefix("THP_enabled:"))
            .map(str::trim)
            .expect("the kernel reports THP_enabled");
        assert_eq!(got, want, "transparent_huge_pages = {setting:?}");
    }
}
