//! Transactional messages with the official Rust client (crates.io `rocketmq` 5.0.0,
//! `Producer::new_transaction_producer`) against Sluice.
//!
//! ```text
//! rmq-rust-tx --endpoint H:P --topic T [--check-wait S] [--timeout S]
//! ```
//!
//! Sends five transactional messages: A committed, B rolled back, C, D and E never ended.
//! The checker answers COMMIT for C, ROLLBACK for D and UNKNOWN for E. Waits until the
//! server checked C and D once and E at least twice, checking what the server sent.
//! Prints (stdout, one JSON document) the send manifest of what must be delivered (A and
//! C) plus "never": the ids that must never be delivered (B, D, E).

use std::collections::HashMap;
use std::process::exit;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rocketmq::conf::{ClientOption, ProducerOption};
use rocketmq::model::message::MessageBuilder;
use rocketmq::model::transaction::{Transaction, TransactionResolution};
use rocketmq::Producer;
use serde_json::{json, Value};

const LANG: &str = "rust";

fn log(msg: &str) {
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() % 86400)
        .unwrap_or(0);
    eprintln!(
        "[{LANG} {:02}:{:02}:{:02}Z] {msg}",
        s / 3600,
        s / 60 % 60,
        s % 60
    );
}

fn usage(msg: &str) -> ! {
    eprintln!("error: {msg}");
    eprintln!("usage: rmq-rust-tx --endpoint H:P --topic T [--check-wait S] [--timeout S]");
    exit(2)
}

fn err_text(e: &impl std::fmt::Debug) -> String {
    let s = format!("{e:?}");
    match s.find("\n\nStack backtrace:") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Same content scheme as the other test programs (see main.rs).
fn message_spec(run_id: &str, index: usize, tag: &str) -> Value {
    let mut body =
        format!("sluice-test {LANG} run={run_id} index={index} unicode=h\u{e9}llo-\u{2713}");
    if index % 5 == 4 {
        body.push(' ');
        body.push_str(&"0123456789abcdef".repeat(512));
    }
    json!({
        "body": body,
        "tag": tag,
        "keys": [format!("key-{run_id}-{index}"), format!("order-{index}")],
        "properties": {
            "index": index.to_string(),
            "lang": LANG,
            "run": run_id,
            "note": "\u{fc}nicode \u{2713} value",
        },
    })
}

#[derive(Default)]
struct CheckerState {
    answers: HashMap<String, TransactionResolution>,
    bodies: HashMap<String, String>,
    calls: HashMap<String, u32>,
    errors: Vec<String>,
}

fn answer_name(r: &TransactionResolution) -> &'static str {
    match r {
        TransactionResolution::COMMIT => "COMMIT",
        TransactionResolution::ROLLBACK => "ROLLBACK",
        TransactionResolution::UNKNOWN => "UNKNOWN",
    }
}

fn copy(r: &TransactionResolution) -> TransactionResolution {
    match r {
        TransactionResolution::COMMIT => TransactionResolution::COMMIT,
        TransactionResolution::ROLLBACK => TransactionResolution::ROLLBACK,
        TransactionResolution::UNKNOWN => TransactionResolution::UNKNOWN,
    }
}

async fn run(endpoint: String, topic: String, check_wait: Duration) -> (Value, bool) {
    let run_id = {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!(
            "{:012x}",
            (n ^ ((std::process::id() as u128) << 40)) & 0xffff_ffff_ffff
        )
    };
    let state = Arc::new(Mutex::new(CheckerState::default()));
    let st = state.clone();
    let expected_topic = topic.clone();
    let checker = Box::new(
        move |_txid: String, m: rocketmq::model::message::MessageView| {
            let mut s = match st.lock() {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
            let id = m.message_id().to_string();
            *s.calls.entry(id.clone()).or_default() += 1;
            let Some(answer) = s.answers.get(&id).map(copy) else {
                s.errors.push(format!("checked unknown message id {id}"));
                return TransactionResolution::ROLLBACK;
            };
            if m.topic() != expected_topic {
                s.errors
                    .push(format!("{id}: check carries topic {:?}", m.topic()));
            }
            let body = String::from_utf8_lossy(m.body()).to_string();
            if s.bodies.get(&id).is_some_and(|b| *b != body) {
                s.errors
                    .push(format!("{id}: check carries a different body"));
            }
            log(&format!(
                "checked {id} (call {}): answering {}",
                s.calls[&id],
                answer_name(&answer)
            ));
            answer
        },
    );

    let mut popt = ProducerOption::default();
    popt.set_topics(vec![topic.clone()]);
    let mut copt = ClientOption::default();
    copt.set_access_url(&endpoint);
    copt.set_enable_tls(false);
    copt.set_timeout(Duration::from_secs(5));
    let fail = |what: &str, e: &dyn std::fmt::Debug| {
        (
            json!({"client": LANG, "ok": false, "errors": [format!("{what}: {}", err_text(&e))]}),
            false,
        )
    };
    let mut producer = match Producer::new_transaction_producer(popt, copt, checker) {
        Ok(p) => p,
        Err(e) => return fail("Producer::new_transaction_producer", &e),
    };
    if let Err(e) = producer.start().await {
        return fail("producer start", &e);
    }

    let mut errors = Vec::new();
    let mut specs: Vec<Value> = Vec::new();
    let mut txs = Vec::new();
    for (i, name) in ["A", "B", "C", "D", "E"].iter().enumerate() {
        let mut spec = message_spec(&run_id, i, &format!("Tx{name}"));
        let props: HashMap<String, String> = spec["properties"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let keys: Vec<String> = spec["keys"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let body = spec["body"].as_str().unwrap_or_default().to_string();
        let message =
            MessageBuilder::transaction_message_builder(topic.clone(), body.clone().into_bytes())
                .set_tag(format!("Tx{name}"))
                .set_keys(keys)
                .set_properties(props)
                .build();
        let message = match message {
            Ok(m) => m,
            Err(e) => return fail("build message", &e),
        };
        let tx = match producer.send_transaction_message(message).await {
            Ok(tx) => tx,
            Err(e) => return fail(&format!("send {name}"), &e),
        };
        if tx.transaction_id().is_empty() {
            errors.push(format!("{name}: empty transaction id"));
        }
        spec["message_id"] = json!(tx.message_id());
        if let Ok(mut s) = state.lock() {
            s.bodies.insert(tx.message_id().to_string(), body);
        }
        specs.push(spec);
        txs.push(tx);
    }
    let ids: Vec<String> = specs
        .iter()
        .map(|s| s["message_id"].as_str().unwrap_or_default().to_string())
        .collect();
    if let Ok(mut s) = state.lock() {
        s.answers
            .insert(ids[2].clone(), TransactionResolution::COMMIT);
        s.answers
            .insert(ids[3].clone(), TransactionResolution::ROLLBACK);
        s.answers
            .insert(ids[4].clone(), TransactionResolution::UNKNOWN);
    }
    let mut txs = txs.into_iter();
    if let Some(a) = txs.next() {
        if let Err(e) = a.commit().await {
            errors.push(format!("commit A: {}", err_text(&e)));
        }
    }
    if let Some(b) = txs.next() {
        if let Err(e) = b.rollback().await {
            errors.push(format!("rollback B: {}", err_text(&e)));
        }
    }
    log("A committed, B rolled back; C, D, E left to the server's checks");
    let count = |id: &str| {
        state
            .lock()
            .map(|s| s.calls.get(id).copied().unwrap_or(0))
            .unwrap_or(0)
    };
    let deadline = Instant::now() + check_wait;
    let done = || count(&ids[2]) >= 1 && count(&ids[3]) >= 1 && count(&ids[4]) >= 2;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !done() {
        errors.push(format!(
            "server checks within {}s: C={} D={} E={} (want C>=1, D>=1, E>=2)",
            check_wait.as_secs(),
            count(&ids[2]),
            count(&ids[3]),
            count(&ids[4])
        ));
    }
    for (n, id) in ["A", "B"].iter().zip(&ids) {
        if count(id) > 0 {
            errors.push(format!("{n} ({id}) was checked although it was ended"));
        }
    }
    // Let the answers (EndTransaction calls made after the checker returned) complete.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Ok(s) = state.lock() {
        errors.extend(s.errors.iter().cloned());
    }
    drop(txs);
    if let Err(e) = producer.shutdown().await {
        errors.push(format!("producer shutdown: {}", err_text(&e)));
    }
    let checks: HashMap<&String, u32> = ids.iter().map(|id| (id, count(id))).collect();
    let ok = errors.is_empty();
    (
        json!({
            "client": LANG, "ok": ok, "topic": topic, "run_id": run_id,
            "messages": [specs[0].clone(), specs[2].clone()],
            "never": [ids[1].clone(), ids[3].clone(), ids[4].clone()],
            "checks": checks,
            "errors": errors,
        }),
        ok,
    )
}

#[tokio::main]
async fn main() {
    let mut opts: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--") else {
            usage(&format!("unexpected argument {a:?}"));
        };
        match it.next() {
            Some(v) => {
                opts.insert(name.to_string(), v);
            }
            None => usage(&format!("--{name} needs a value")),
        }
    }
    let get = |k: &str, env: &str| {
        opts.get(k)
            .cloned()
            .or_else(|| std::env::var(env).ok())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| usage(&format!("missing required argument --{k}")))
    };
    let num = |k: &str, d: u64| {
        opts.get(k)
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| usage(&format!("--{k}: not a number")))
            })
            .unwrap_or(d)
    };
    let endpoint = get("endpoint", "SLUICE_ENDPOINT");
    let topic = get("topic", "SLUICE_TOPIC");
    let timeout = Duration::from_secs(num("timeout", 120));
    let check_wait = Duration::from_secs(num("check-wait", 45));
    let (report, ok) = match tokio::time::timeout(timeout, run(endpoint, topic, check_wait)).await {
        Ok(r) => r,
        Err(_) => (
            json!({"client": LANG, "ok": false, "errors": [format!("timeout after {}s", timeout.as_secs())]}),
            false,
        ),
    };
    if let Some(errs) = report["errors"].as_array() {
        for e in errs {
            log(&format!("FAIL: {}", e.as_str().unwrap_or_default()));
        }
    }
    println!("{report}");
    // Do not wait for the client's background tasks.
    exit(if ok { 0 } else { 1 });
}
