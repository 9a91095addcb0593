//! System-test driver for the official RocketMQ 5 Rust client (crates.io
//! `rocketmq` 5.0.0) against Sluice.
//!
//! ```text
//! rmq-rust-client send    --endpoint H:P --topic T [--count N] [--tag TAG] [--run-id ID]
//! rmq-rust-client receive --endpoint H:P --topic T --group G --expect-file SENT.json
//!                         [--expect-count N] [--wait S] [--invisible S] [--batch N]
//! rmq-rust-client fifo-consume / fifo-no-group ...   (see fifo.rs)
//! ```
//!
//! All print exactly one JSON document on stdout (the manifest format shared
//! with the Python and Node.js programs) and diagnostics on stderr.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::exit;
use std::time::{Duration, Instant};

use rocketmq::conf::{ClientOption, ProducerOption, SimpleConsumerOption};
use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::MessageBuilder;
use rocketmq::{Producer, SimpleConsumer};
use serde_json::{json, Value};

const LANG: &str = "rust";

macro_rules! log {
    ($($arg:tt)*) => {{
        let s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() % 86400)
            .unwrap_or(0);
        eprintln!("[{} {:02}:{:02}:{:02}Z] {}", LANG, s / 3600, s / 60 % 60, s % 60, format!($($arg)*))
    }};
}

// FIFO consumers and the no-message-group check; uses the helpers below.
mod fifo;

struct Args {
    cmd: String,
    opts: HashMap<String, String>,
}

impl Args {
    fn parse() -> Args {
        let mut it = std::env::args().skip(1);
        let cmd = it.next().unwrap_or_default();
        let mut opts = HashMap::new();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                usage(&format!("unexpected argument {a:?}"));
            };
            match name {
                "allow-duplicates" => {
                    opts.insert(name.to_string(), "1".to_string());
                }
                _ => match it.next() {
                    Some(v) => {
                        opts.insert(name.to_string(), v);
                    }
                    None => usage(&format!("--{name} needs a value")),
                },
            }
        }
        Args { cmd, opts }
    }

    fn get(&self, name: &str, env: Option<&str>) -> Option<String> {
        self.opts
            .get(name)
            .cloned()
            .or_else(|| env.and_then(|e| std::env::var(e).ok()))
            .filter(|v| !v.is_empty())
    }

    fn required(&self, name: &str, env: Option<&str>) -> String {
        self.get(name, env)
            .unwrap_or_else(|| usage(&format!("missing required argument --{name}")))
    }

    fn num(&self, name: &str, default: u64) -> u64 {
        match self.opts.get(name) {
            None => default,
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| usage(&format!("--{name}: not a number: {v:?}"))),
        }
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("error: {msg}");
    eprintln!(
        "usage:\n  rmq-rust-client send --endpoint H:P --topic T [--count N] [--tag TAG] [--run-id ID] [--timeout S]\n  \
         rmq-rust-client receive --endpoint H:P --topic T --group G (--expect-file F | --expect-count N)\n      \
         [--wait S] [--invisible S] [--batch N] [--filter EXPR] [--expect-attempt N] [--allow-duplicates]\n      \
         [--long-polling S] [--timeout S]\n  \
         rmq-rust-client fifo-consume --endpoint H:P --topic T --group G --name NAME --events FILE --stop-file F\n      \
         [--invisible S] [--batch N] [--work-ms MS] [--retry-group MG --retry-seq N] [--long-polling S]\n  \
         rmq-rust-client fifo-no-group --endpoint H:P --topic T\n\
         every subcommand takes --access-key K --secret-key S to sign its requests\n\
         endpoint/topic/group default to env SLUICE_ENDPOINT / SLUICE_TOPIC / SLUICE_GROUP"
    );
    exit(2)
}

/// Client errors as text, without anyhow's captured stack backtrace.
fn err_text(e: &impl std::fmt::Debug) -> String {
    let s = format!("{e:?}");
    match s.find("\n\nStack backtrace:") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn emit(v: &Value) {
    println!("{v}");
}

fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:012x}",
        (nanos ^ ((std::process::id() as u128) << 40)) & 0xffff_ffff_ffff
    )
}

/// Same content scheme as the Python and Node.js programs.
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

/// Creates and starts a Producer for `topic`; the error is the text to report.
async fn start_producer(
    endpoint: &str,
    topic: &str,
    request_timeout: u64,
) -> Result<Producer, String> {
    let mut popt = ProducerOption::default();
    popt.set_topics(vec![topic.to_string()]);
    let copt = client_option(endpoint, request_timeout, None);
    let mut producer =
        Producer::new(popt, copt).map_err(|e| format!("Producer::new: {}", err_text(&e)))?;
    producer
        .start()
        .await
        .map_err(|e| format!("producer start: {}", err_text(&e)))?;
    Ok(producer)
}

/// Creates and starts a SimpleConsumer of `group` for `topic`; the error is the text to report.
async fn start_consumer(
    endpoint: &str,
    topic: &str,
    group: &str,
    request_timeout: u64,
    long_polling: Option<u64>,
) -> Result<SimpleConsumer, String> {
    let mut copt_c = SimpleConsumerOption::default();
    copt_c.set_topics(vec![topic.to_string()]);
    copt_c.set_consumer_group(group.to_string());
    let copt = client_option(endpoint, request_timeout, long_polling);
    let mut consumer = SimpleConsumer::new(copt_c, copt)
        .map_err(|e| format!("SimpleConsumer::new: {}", err_text(&e)))?;
    consumer
        .start()
        .await
        .map_err(|e| format!("consumer start: {}", err_text(&e)))?;
    Ok(consumer)
}

/// `--access-key` / `--secret-key`: every request is signed with them (for a server with an
/// ACL).
static CREDENTIALS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

fn client_option(endpoint: &str, request_timeout: u64, long_polling: Option<u64>) -> ClientOption {
    let mut o = ClientOption::default();
    o.set_access_url(endpoint);
    if let Some((key, secret)) = CREDENTIALS.get() {
        o.set_access_key(key.as_str());
        o.set_secret_key(secret.as_str());
    }
    o.set_enable_tls(false);
    o.set_timeout(Duration::from_secs(request_timeout));
    if let Some(lp) = long_polling {
        o.set_long_polling_timeout(Duration::from_secs(lp));
    }
    o
}

async fn send(args: &Args) -> (Value, bool) {
    let endpoint = args.required("endpoint", Some("SLUICE_ENDPOINT"));
    let topic = args.required("topic", Some("SLUICE_TOPIC"));
    let count = args.num("count", 10) as usize;
    let tag = args.get("tag", None).unwrap_or_else(|| "TagA".to_string());
    let run_id = args.get("run-id", None).unwrap_or_else(new_run_id);
    let mut errors: Vec<String> = Vec::new();
    let mut sent: Vec<Value> = Vec::new();

    let producer = match start_producer(&endpoint, &topic, args.num("request-timeout", 5)).await {
        Ok(p) => p,
        Err(e) => return (json!({"client": LANG, "ok": false, "errors": [e]}), false),
    };
    for i in 0..count {
        let mut spec = message_spec(&run_id, i, &tag);
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
        let message = MessageBuilder::builder()
            .set_topic(topic.clone())
            .set_tag(tag.clone())
            .set_keys(keys)
            .set_properties(props)
            .set_body(
                spec["body"]
                    .as_str()
                    .unwrap_or_default()
                    .as_bytes()
                    .to_vec(),
            )
            .build();
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                errors.push(format!("build message #{i}: {}", err_text(&e)));
                break;
            }
        };
        match producer.send(message).await {
            Ok(receipt) => {
                if receipt.message_id().is_empty() {
                    errors.push(format!("send #{i}: empty message id in receipt"));
                }
                spec["message_id"] = json!(receipt.message_id());
                sent.push(spec);
            }
            Err(e) => {
                errors.push(format!("send #{i}: {}", err_text(&e)));
                break;
            }
        }
    }
    if let Err(e) = producer.shutdown().await {
        // NotifyClientTermination failures surface here.
        errors.push(format!("producer shutdown: {}", err_text(&e)));
    }
    log!("sent {} message(s) to {topic}", sent.len());
    let ok = errors.is_empty();
    (
        json!({"client": LANG, "ok": ok, "topic": topic, "run_id": run_id, "messages": sent, "errors": errors}),
        ok,
    )
}

fn view_to_json(m: &rocketmq::model::message::MessageView) -> Value {
    let mut keys: Vec<String> = m.keys().to_vec();
    keys.sort();
    let props: BTreeMap<&String, &String> = m.properties().iter().collect();
    json!({
        "message_id": m.message_id(),
        "body": String::from_utf8_lossy(m.body()),
        "tag": m.tag(),
        "keys": keys,
        "properties": props,
        "delivery_attempt": m.delivery_attempt(),
        "topic": m.topic(),
    })
}

fn compare(expected: &Value, got: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    let mid = expected["message_id"].as_str().unwrap_or_default();
    if got["message_id"] != expected["message_id"] {
        errs.push(format!(
            "{mid}: message_id {} != {}",
            got["message_id"], expected["message_id"]
        ));
    }
    if got["body"] != expected["body"] {
        let g = got["body"].as_str().unwrap_or_default();
        let w = expected["body"].as_str().unwrap_or_default();
        errs.push(format!(
            "{mid}: body differs (got {:?}..., want {:?}...)",
            g.chars().take(80).collect::<String>(),
            w.chars().take(80).collect::<String>()
        ));
    }
    let norm_tag = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
    if norm_tag(&got["tag"]) != norm_tag(&expected["tag"]) {
        errs.push(format!("{mid}: tag {} != {}", got["tag"], expected["tag"]));
    }
    let sorted = |v: &Value| {
        let mut k: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        k.sort();
        k
    };
    if sorted(&got["keys"]) != sorted(&expected["keys"]) {
        errs.push(format!(
            "{mid}: keys {:?} != {:?}",
            sorted(&got["keys"]),
            sorted(&expected["keys"])
        ));
    }
    let empty = serde_json::Map::new();
    let gp = got["properties"].as_object().unwrap_or(&empty);
    let ep = expected["properties"].as_object().unwrap_or(&empty);
    if gp != ep {
        errs.push(format!(
            "{mid}: properties {} != {}",
            got["properties"], expected["properties"]
        ));
    }
    errs
}

async fn receive(args: &Args) -> (Value, bool) {
    let endpoint = args.required("endpoint", Some("SLUICE_ENDPOINT"));
    let topic = args.required("topic", Some("SLUICE_TOPIC"));
    let group = args.required("group", Some("SLUICE_GROUP"));
    let expected: Vec<Value> = match args.get("expect-file", None) {
        Some(path) => {
            let text =
                std::fs::read_to_string(&path).unwrap_or_else(|e| usage(&format!("{path}: {e}")));
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| usage(&format!("{path}: {e}")));
            v["messages"]
                .as_array()
                .cloned()
                .unwrap_or_else(|| usage(&format!("{path}: no \"messages\"")))
        }
        None => Vec::new(),
    };
    if args.get("expect-file", None).is_none() && args.get("expect-count", None).is_none() {
        usage("need --expect-file or --expect-count");
    }
    let want: HashMap<String, Value> = expected
        .iter()
        .map(|m| {
            (
                m["message_id"].as_str().unwrap_or_default().to_string(),
                m.clone(),
            )
        })
        .collect();
    let expect_count = args.num("expect-count", want.len() as u64) as usize;
    let wait = Duration::from_secs(args.num("wait", 60));
    let invisible = Duration::from_secs(args.num("invisible", 30));
    let batch = args.num("batch", 16) as i32;
    let expect_attempt = args.num("expect-attempt", 1) as i64;
    let filter = args.get("filter", None).unwrap_or_else(|| "*".to_string());
    let long_polling = args
        .get("long-polling", None)
        .map(|_| args.num("long-polling", 40));

    let mut errors: Vec<String> = Vec::new();
    let mut received: Vec<Value> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut unexpected: Vec<Value> = Vec::new();
    let mut duplicates: Vec<String> = Vec::new();

    let consumer = match start_consumer(
        &endpoint,
        &topic,
        &group,
        args.num("request-timeout", 5),
        long_polling,
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return (json!({"client": LANG, "ok": false, "errors": [e]}), false),
    };
    let expr = FilterExpression::new(FilterType::Tag, filter);
    let deadline = Instant::now() + wait;
    while seen.len() < expect_count && Instant::now() < deadline {
        let msgs = match consumer
            .receive_with(topic.clone(), &expr, batch, invisible)
            .await
        {
            Ok(m) => m,
            Err(e) => {
                log!("receive failed: {}; retrying in 1s", err_text(&e));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        for m in msgs {
            let d = view_to_json(&m);
            let mid = m.message_id().to_string();
            if seen.contains(&mid) {
                duplicates.push(mid);
            } else if !want.is_empty() && !want.contains_key(&mid) {
                unexpected.push(d);
            } else {
                seen.insert(mid);
                received.push(d);
            }
            if let Err(e) = consumer.ack(&m).await {
                errors.push(format!("ack {}: {}", m.message_id(), err_text(&e)));
            }
        }
    }
    if seen.len() < expect_count {
        let missing: Vec<&String> = want
            .keys()
            .filter(|k| !seen.contains(*k))
            .take(10)
            .collect();
        errors.push(format!(
            "received {} of {expect_count} expected message(s) within {}s; missing ids (first 10): {missing:?}",
            seen.len(),
            wait.as_secs()
        ));
    }
    for d in &received {
        let mid = d["message_id"].as_str().unwrap_or_default();
        if let Some(exp) = want.get(mid) {
            errors.extend(compare(exp, d));
        }
        if expect_attempt != 0 && d["delivery_attempt"].as_i64() != Some(expect_attempt) {
            errors.push(format!(
                "{mid}: delivery_attempt {} != {expect_attempt}",
                d["delivery_attempt"]
            ));
        }
    }
    if let Some(u) = unexpected.first() {
        errors.push(format!(
            "{} unexpected message(s), e.g. {}",
            unexpected.len(),
            u["message_id"]
        ));
    }
    if !duplicates.is_empty() && args.get("allow-duplicates", None).is_none() {
        errors.push(format!(
            "{} duplicate deliveries of already received message(s): {:?}",
            duplicates.len(),
            &duplicates[..duplicates.len().min(5)]
        ));
    }
    if let Err(e) = consumer.shutdown().await {
        errors.push(format!("consumer shutdown: {}", err_text(&e)));
    }
    log!(
        "received {} message(s) from {topic} as {group}",
        received.len()
    );
    let ok = errors.is_empty();
    (
        json!({"client": LANG, "ok": ok, "topic": topic, "group": group, "received": received, "errors": errors}),
        ok,
    )
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match (args.get("access-key", None), args.get("secret-key", None)) {
        (Some(k), Some(s)) => {
            let _ = CREDENTIALS.set((k, s));
        }
        (None, None) => {}
        _ => usage("--access-key and --secret-key go together"),
    }
    let timeout = Duration::from_secs(args.num("timeout", 120));
    let work = async {
        match args.cmd.as_str() {
            "send" => send(&args).await,
            "receive" => receive(&args).await,
            "fifo-consume" => fifo::consume(&args).await,
            "fifo-no-group" => fifo::no_group(&args).await,
            other => usage(&format!(
                "unknown subcommand {other:?} (expected send, receive, fifo-consume or fifo-no-group)"
            )),
        }
    };
    let (report, ok) = match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => (
            json!({"client": LANG, "ok": false, "errors": [format!("timeout after {}s", timeout.as_secs())]}),
            false,
        ),
    };
    if let Some(errs) = report["errors"].as_array() {
        for e in errs {
            log!("FAIL: {}", e.as_str().unwrap_or_default());
        }
    }
    emit(&report);
    // Do not wait for the client's background tasks.
    exit(if ok { 0 } else { 1 });
}
