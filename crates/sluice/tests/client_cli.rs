//! End to end: `sluice send`, `sluice consume` and `sluice bench` against a real
//! `sluice server` process, through the gRPC API.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{BIN, free_port, http_status};

struct Server {
    child: Child,
    endpoint: String,
    admin: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(data: &Path) -> Server {
    start_with_env(data, &[])
}

/// [`start`] with extra environment variables for the server.
fn start_with_env(data: &Path, env: &[(&str, &std::ffi::OsStr)]) -> Server {
    let (grpc_port, admin_port) = (free_port(), free_port());
    let log = File::create(data.with_extension("log")).expect("log file");
    let mut cmd = common::server_command(&["--flush", "async"], data, grpc_port, admin_port, log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn server");
    let s = Server {
        child,
        endpoint: format!("127.0.0.1:{grpc_port}"),
        admin: format!("http://127.0.0.1:{admin_port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_status(admin_port, "/readyz") != Some(200) {
        assert!(Instant::now() < deadline, "server not ready in time");
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

fn sluice(s: &Server, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("SLUICE_ENDPOINT", &s.endpoint)
        .env("SLUICE_ADMIN", &s.admin)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    if let Some(mut pipe) = child.stdin.take() {
        if let Some(input) = stdin {
            pipe.write_all(input).expect("stdin");
        }
    }
    let out = child.wait_with_output().expect("run sluice");
    assert!(
        out.status.success(),
        "sluice {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn send_consume_and_bench_through_the_grpc_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = start(&dir.path().join("data"));
    sluice(
        &s,
        &[
            "topic", "create", "orders", "--type", "normal", "--queues", "2",
        ],
        None,
    );
    sluice(
        &s,
        &["group", "create", "billing", "--start", "earliest"],
        None,
    );

    let sent = stdout(&sluice(
        &s,
        &[
            "send",
            "orders",
            "hello",
            "--tag",
            "created",
            "--key",
            "k1",
            "--property",
            "region=eu",
            "--count",
            "2",
        ],
        None,
    ));
    let ids: Vec<&str> = sent.lines().collect();
    assert_eq!(ids.len(), 2, "{sent}");
    assert!(ids.iter().all(|id| id.len() == 34), "{sent}");
    let piped = stdout(&sluice(
        &s,
        &["--json", "send", "orders", "--tag", "other"],
        Some(b"from stdin"),
    ));
    let receipt: serde_json::Value = serde_json::from_str(piped.trim()).expect("json receipt");
    assert_eq!(receipt["topic"], "orders");

    // Only the tagged ones, as JSON lines; acknowledged.
    let got = stdout(&sluice(
        &s,
        &[
            "--json", "consume", "orders", "--group", "billing", "--filter", "created", "--wait",
            "1s",
        ],
        None,
    ));
    let msgs: Vec<serde_json::Value> = got
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(msgs.len(), 2, "{got}");
    for m in &msgs {
        assert_eq!(m["body"], "hello");
        assert_eq!(m["tag"], "created");
        assert_eq!(m["properties"]["region"], "eu");
        assert_eq!(m["keys"][0], "k1");
        assert!(ids.contains(&m["messageId"].as_str().unwrap_or("")));
    }
    let again = stdout(&sluice(
        &s,
        &[
            "consume", "orders", "--group", "billing", "--filter", "created", "--wait", "1s",
        ],
        None,
    ));
    assert!(again.is_empty(), "acknowledged messages came back: {again}");

    // A short benchmark that creates its own topic and group.
    let result = dir.path().join("bench.json");
    let out = stdout(&sluice(
        &s,
        &[
            "bench",
            "--create",
            "--topic-prefix",
            "b",
            "--queues",
            "2",
            "--rate",
            "300",
            "--warmup",
            "1s",
            "--duration",
            "2s",
            "--flush-note",
            "async, test",
            "--json-out",
            result.to_str().expect("utf-8 path"),
        ],
        None,
    ));
    assert!(out.contains("publish"), "{out}");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&result).expect("result file")).expect("json");
    assert_eq!(r["flushNote"], "async, test");
    assert_eq!(r["partitionsPerTopic"], 2);
    let published = r["totalPublished"].as_u64().expect("published");
    assert!((300..=1200).contains(&published), "{published}");
    assert_eq!(r["totalPublishErrors"], 0);
    assert!(r["totalConsumed"].as_u64().expect("consumed") > 0);
    assert!(r["aggregatedPublishLatency99pct"].as_f64().expect("p99") > 0.0);
    assert!(r["aggregatedEndToEndLatency50pct"].as_f64().expect("p50") > 0.0);
    assert!(!r["publishRate"].as_array().expect("series").is_empty());
}

/// Runs `sluice` with extra environment variables; the output whether it succeeds or not.
fn sluice_env(s: &Server, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("SLUICE_ENDPOINT", &s.endpoint)
        .env("SLUICE_ADMIN", &s.admin)
        .env_remove("SLUICE_ACCESS_KEY")
        .env_remove("SLUICE_SECRET_KEY")
        .env_remove("SLUICE_NAMESPACE")
        .env_remove("SLUICE_ADMIN_TOKEN")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run sluice")
}

#[test]
fn client_commands_sign_requests_and_take_a_namespace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let acl = dir.path().join("acl.toml");
    std::fs::write(
        &acl,
        "[[users]]\naccess_key = \"cli\"\nsecret_key = \"cli-secret\"\n\
         publish = [\"prod%*\"]\nsubscribe = [\"prod%*\"]\ngroups = [\"prod%*\"]\n",
    )
    .expect("acl");
    let s = start_with_env(
        &dir.path().join("data"),
        &[
            ("SLUICE_PROXY__ACL_FILE", acl.as_os_str()),
            ("SLUICE_ADMIN_TOKEN", "admin-t0ken".as_ref()),
        ],
    );
    // The admin API wants its token too.
    let admin = [("SLUICE_ADMIN_TOKEN", "admin-t0ken")];
    let refused = sluice_env(&s, &["topic", "list"], &[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("UNAUTHORIZED"), "{err}");
    for args in [
        &["topic", "create", "prod%orders", "--type", "normal"][..],
        &["group", "create", "prod%billing", "--start", "earliest"][..],
    ] {
        let o = sluice_env(&s, args, &admin);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Admin commands take the namespace too: names are the namespace's, lists show only
    // its topics and groups.
    for args in [
        &[
            "--namespace",
            "prod",
            "topic",
            "create",
            "payments",
            "--type",
            "normal",
        ][..],
        &["topic", "create", "outside", "--type", "normal"][..],
    ] {
        let o = sluice_env(&s, args, &admin);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let listed: serde_json::Value = serde_json::from_str(&stdout(&sluice_env(
        &s,
        &["--json", "--namespace", "prod", "topic", "list"],
        &admin,
    )))
    .expect("json");
    let mut names: Vec<&str> = listed["topics"]
        .as_array()
        .expect("topics")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["prod%orders", "prod%payments"]);
    let all = stdout(&sluice_env(&s, &["topic", "list"], &admin));
    assert!(
        all.contains("outside") && all.contains("prod%payments"),
        "{all}"
    );
    let described = sluice_env(
        &s,
        &["--namespace", "prod", "group", "describe", "billing"],
        &admin,
    );
    assert!(
        described.status.success(),
        "{}",
        String::from_utf8_lossy(&described.stderr)
    );
    let bad = sluice_env(&s, &["--namespace", "a b", "topic", "list"], &admin);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--namespace"));

    let creds = [
        ("SLUICE_ACCESS_KEY", "cli"),
        ("SLUICE_SECRET_KEY", "cli-secret"),
    ];

    let unsigned = sluice_env(&s, &["--namespace", "prod", "send", "orders", "x"], &[]);
    assert!(!unsigned.status.success());
    let err = String::from_utf8_lossy(&unsigned.stderr);
    assert!(err.contains("UNAUTHORIZED"), "{err}");

    let sent = sluice_env(
        &s,
        &["--namespace", "prod", "send", "orders", "signed"],
        &creds,
    );
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    // Without the namespace the user may not touch "orders".
    let outside = sluice_env(&s, &["send", "orders", "x"], &creds);
    assert!(!outside.status.success());

    let got = sluice_env(
        &s,
        &[
            "--json",
            "--namespace",
            "prod",
            "consume",
            "orders",
            "--group",
            "billing",
            "--wait",
            "1s",
        ],
        &creds,
    );
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout(&got)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["body"], "signed");
    let topic: serde_json::Value = serde_json::from_str(&stdout(&sluice_env(
        &s,
        &["--json", "topic", "describe", "prod%orders"],
        &admin,
    )))
    .expect("json");
    assert_eq!(topic["stored_messages"], 1);

    let half = sluice_env(
        &s,
        &["--access-key", "cli", "send", "prod%orders", "x"],
        &[],
    );
    assert_eq!(half.status.code(), Some(2));
}

/// Sends one message as the given user; whether the server took it.
fn send_as(s: &Server, key: &str, secret: &str, body: &str) -> Output {
    sluice_env(
        s,
        &["send", "orders", body],
        &[("SLUICE_ACCESS_KEY", key), ("SLUICE_SECRET_KEY", secret)],
    )
}

/// Retries `f` until it holds (the server rereads the file in the background).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not in time");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn acl_file_changes_apply_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let acl = dir.path().join("acl.toml");
    let user = |k: &str| {
        format!(
            "[[users]]\naccess_key = \"{k}\"\nsecret_key = \"{k}-secret\"\npublish = [\"orders\"]\n"
        )
    };
    std::fs::write(&acl, user("first")).expect("acl");
    let s = start_with_env(
        &dir.path().join("data"),
        &[("SLUICE_PROXY__ACL_FILE", acl.as_os_str())],
    );
    let o = sluice_env(&s, &["topic", "create", "orders", "--type", "normal"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(send_as(&s, "first", "first-secret", "1").status.success());
    assert!(!send_as(&s, "second", "second-secret", "x").status.success());

    // Rewritten: "second" replaces "first"; picked up by the file watch.
    std::fs::write(&acl, user("second")).expect("acl");
    eventually("the new user is accepted", || {
        send_as(&s, "second", "second-secret", "2").status.success()
    });
    let gone = send_as(&s, "first", "first-secret", "x");
    assert!(!gone.status.success());
    assert!(String::from_utf8_lossy(&gone.stderr).contains("UNAUTHORIZED"));

    // A broken file keeps the ACL in force; SIGHUP rereads it at once, and the server
    // stays up.
    std::fs::write(&acl, "[[users]]\naccess_key = \"broken\"\n").expect("acl");
    let hup = Command::new("kill")
        .args(["-HUP", &s.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    std::thread::sleep(Duration::from_millis(500));
    assert!(send_as(&s, "second", "second-secret", "3").status.success());
    let log = || std::fs::read_to_string(dir.path().join("data.log")).unwrap_or_default();
    eventually("the log says the file was refused", || {
        log().contains("ACL not reloaded")
    });
    // Fixed again, made known by SIGHUP alone.
    std::fs::write(&acl, user("third")).expect("acl");
    assert!(
        Command::new("kill")
            .args(["-HUP", &s.child.id().to_string()])
            .status()
            .expect("kill -HUP")
            .success()
    );
    eventually("the fixed file is in force", || {
        send_as(&s, "third", "third-secret", "4").status.success()
    });
    let topic: serde_json::Value = serde_json::from_str(&stdout(&sluice_env(
        &s,
        &["--json", "topic", "describe", "orders"],
        &[],
    )))
    .expect("json");
    assert_eq!(topic["stored_messages"], 4);
}
