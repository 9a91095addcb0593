//! Delay messages with the official Rust client (crates.io `rocketmq` 5.0.0,
//! `MessageBuilder::delay_message_builder`, which sends whole seconds) against Sluice.
//!
//! ```text
//! rmq-rust-delay --endpoint H:P --topic T [--count N] [--delay S] [--timeout S]
//! ```
//!
//! Sends N delay messages due S seconds from now (whole seconds) and prints the manifest
//! (stdout, one JSON document) in the format `python/delay.py --mode receive` checks:
//! each message with its `delivery_timestamp_ms` and `recalled: false` (this client
//! version has no recall).

use std::collections::HashMap;
use std::process::exit;
use std::time::Duration;

use rocketmq::conf::{ClientOption, ProducerOption};
use rocketmq::model::message::MessageBuilder;
use rocketmq::Producer;
use serde_json::{json, Value};

const LANG: &str = "rust";

fn log(msg: &str) {
    eprintln!("[{LANG} delay] {msg}");
}

fn usage(msg: &str) -> ! {
    eprintln!("error: {msg}");
    eprintln!(
        "usage: rmq-rust-delay --endpoint H:P --topic T [--count N] [--delay S] [--timeout S]"
    );
    exit(2)
}

fn err_text(e: &impl std::fmt::Debug) -> String {
    let s = format!("{e:?}");
    match s.find("\n\nStack backtrace:") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Same content scheme as the other test programs (see main.rs).
fn message_spec(run_id: &str, index: usize) -> Value {
    json!({
        "body": format!("sluice-test {LANG} run={run_id} index={index} unicode=h\u{e9}llo-\u{2713}"),
        "tag": "delay",
        "keys": [format!("key-{run_id}-{index}"), format!("order-{index}")],
        "properties": {
            "index": index.to_string(),
            "lang": LANG,
            "run": run_id,
            "note": "\u{fc}nicode \u{2713} value",
        },
    })
}

async fn run(endpoint: String, topic: String, count: usize, delay: i64) -> (Value, bool) {
    let run_id = format!(
        "{:012x}",
        (now_s() as u64 ^ ((std::process::id() as u64) << 24))
    );
    let fail = |what: &str, e: &dyn std::fmt::Debug| {
        (
            json!({"client": LANG, "ok": false, "errors": [format!("{what}: {}", err_text(&e))]}),
            false,
        )
    };
    let mut popt = ProducerOption::default();
    popt.set_topics(vec![topic.clone()]);
    let mut copt = ClientOption::default();
    copt.set_access_url(&endpoint);
    copt.set_enable_tls(false);
    copt.set_timeout(Duration::from_secs(5));
    let mut producer = match Producer::new(popt, copt) {
        Ok(p) => p,
        Err(e) => return fail("Producer::new", &e),
    };
    if let Err(e) = producer.start().await {
        return fail("producer start", &e);
    }
    let at = now_s() + delay;
    let mut errors = Vec::new();
    let mut sent = Vec::new();
    for i in 0..count {
        let mut spec = message_spec(&run_id, i);
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
        let body = spec["body"]
            .as_str()
            .unwrap_or_default()
            .as_bytes()
            .to_vec();
        let message = MessageBuilder::delay_message_builder(topic.clone(), body, at)
            .set_tag("delay".to_string())
            .set_keys(keys)
            .set_properties(props)
            .build();
        let message = match message {
            Ok(m) => m,
            Err(e) => return fail("build message", &e),
        };
        match producer.send(message).await {
            Ok(r) => {
                spec["message_id"] = json!(r.message_id());
                spec["delivery_timestamp_ms"] = json!(at * 1000);
                spec["recall_handle"] = json!("");
                spec["recalled"] = json!(false);
                sent.push(spec);
            }
            Err(e) => errors.push(format!("send #{i}: {}", err_text(&e))),
        }
    }
    log(&format!("sent {} delay message(s) due at {at}", sent.len()));
    if let Err(e) = producer.shutdown().await {
        errors.push(format!("producer shutdown: {}", err_text(&e)));
    }
    let ok = errors.is_empty();
    (
        json!({"client": LANG, "ok": ok, "topic": topic, "messages": sent, "errors": errors}),
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
    let get = |k: &str| {
        opts.get(k)
            .cloned()
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
    let timeout = Duration::from_secs(num("timeout", 60));
    let work = run(
        get("endpoint"),
        get("topic"),
        num("count", 3) as usize,
        num("delay", 5) as i64,
    );
    let (report, ok) = match tokio::time::timeout(timeout, work).await {
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
