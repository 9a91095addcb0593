//! FIFO order per message group with the official Rust client (issue #4).
//!
//! ```text
//! rmq-rust-client fifo-consume --endpoint H:P --topic T --group G --name NAME --events FILE
//!                 --stop-file F [--invisible S] [--batch N] [--work-ms MS]
//!                 [--retry-group MG --retry-seq N] [--long-polling S]
//! rmq-rust-client fifo-no-group --endpoint H:P --topic T
//! ```
//!
//! `fifo-consume` is a SimpleConsumer recording, for every delivery, message group,
//! sequence (user property `seq`), delivery attempt, wall-clock receive time (after
//! `receive_with` returned) and ack time (just before `ack` was called, and when it
//! returned), as one JSON line per delivery in `--events` and in the final JSON document,
//! in the format `python/fifo.py verify` checks. The first delivery of the message
//! (`--retry-group`, `--retry-seq`) is not acked; this client has no
//! ChangeInvisibleDuration, so its `--invisible` time runs out. Stops when `--stop-file`
//! exists.
//!
//! `fifo-no-group` sends a message without a message group to the FIFO topic. This client
//! does not check message types itself, so the server's answer is visible: it must be
//! refused with MESSAGE_PROPERTY_CONFLICT_WITH_TYPE (40014).

use std::io::Write;
use std::time::{Duration, Instant};

use rocketmq::model::common::{FilterExpression, FilterType};
use rocketmq::model::message::MessageBuilder;
use serde_json::{json, Value};

use crate::{err_text, start_consumer, start_producer, Args, LANG};

/// Wall clock, milliseconds since the epoch, with microseconds (same clock as the Python
/// and Node.js consumers).
fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as f64 / 1000.0)
        .unwrap_or(0.0)
}

fn append_event(path: &str, v: &Value) {
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| writeln!(f, "{v}"));
    if let Err(e) = res {
        log!("cannot append to {path}: {e}");
    }
}

pub async fn consume(args: &Args) -> (Value, bool) {
    let endpoint = args.required("endpoint", Some("SLUICE_ENDPOINT"));
    let topic = args.required("topic", Some("SLUICE_TOPIC"));
    let group = args.required("group", Some("SLUICE_GROUP"));
    let name = args.get("name", None).unwrap_or_else(|| LANG.to_string());
    let events = args.required("events", None);
    let stop_file = args.required("stop-file", None);
    let invisible = Duration::from_secs(args.num("invisible", 8));
    let batch = args.num("batch", 2) as i32;
    let work = Duration::from_millis(args.num("work-ms", 30));
    let wait = Duration::from_secs(args.num("wait", 90));
    let retry_group = args.get("retry-group", None);
    let retry_seq = args
        .get("retry-seq", None)
        .map(|_| args.num("retry-seq", 0) as i64);
    // Keep the long poll short: the loop checks the stop file between polls. This client's
    // ReceiveMessage deadline is the long polling timeout itself.
    let long_polling = Some(args.num("long-polling", 5));

    let mut errors: Vec<String> = Vec::new();
    let mut deliveries: Vec<Value> = Vec::new();
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
    append_event(
        &events,
        &json!({"event": "ready", "consumer": name, "lang": LANG}),
    );
    log!("{name}: consuming {topic} as {group}");
    let expr = FilterExpression::new(FilterType::Tag, "*");
    let deadline = Instant::now() + wait;
    while !std::path::Path::new(&stop_file).exists() && Instant::now() < deadline {
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
        let recv = now_ms();
        for m in msgs {
            let seq = m
                .properties()
                .get("seq")
                .and_then(|s| s.parse::<i64>().ok());
            let mut d = json!({
                "consumer": name, "lang": LANG,
                "message_id": m.message_id(), "message_group": m.message_group(),
                "seq": seq, "attempt": m.delivery_attempt(), "recv_ms": recv,
                "ack_ms": null, "ack_done_ms": null, "acked": false, "held": null,
            });
            let is_retry = retry_group.is_some()
                && m.message_group() == retry_group.as_deref()
                && seq.is_some()
                && seq == retry_seq;
            if is_retry && m.delivery_attempt() == 1 {
                // The forced retry: not acked on its first delivery.
                d["held"] = json!(format!("expire:{}", invisible.as_millis()));
                log!(
                    "{name}: holding {}#{} (attempt 1) unacked: {}",
                    m.message_group().unwrap_or_default(),
                    seq.unwrap_or(-1),
                    d["held"]
                );
            } else {
                if !work.is_zero() {
                    tokio::time::sleep(work).await;
                }
                d["ack_ms"] = json!(now_ms());
                match consumer.ack(&m).await {
                    Ok(()) => d["acked"] = json!(true),
                    Err(e) => d["ack_error"] = json!(err_text(&e)),
                }
                d["ack_done_ms"] = json!(now_ms());
            }
            let mut ev = d.clone();
            ev["event"] = json!("delivery");
            append_event(&events, &ev);
            deliveries.push(d);
        }
    }
    if let Err(e) = consumer.shutdown().await {
        errors.push(format!("consumer shutdown: {}", err_text(&e)));
    }
    let acked = deliveries
        .iter()
        .filter(|d| d["acked"] == json!(true))
        .count();
    log!("{name}: {} deliveries, {acked} acked", deliveries.len());
    let ok = errors.is_empty();
    (
        json!({"client": LANG, "ok": ok, "topic": topic, "group": group, "name": name,
               "deliveries": deliveries, "errors": errors}),
        ok,
    )
}

pub async fn no_group(args: &Args) -> (Value, bool) {
    let endpoint = args.required("endpoint", Some("SLUICE_ENDPOINT"));
    let topic = args.required("topic", Some("SLUICE_TOPIC"));
    let mut errors: Vec<String> = Vec::new();
    let mut out = json!({"client": LANG, "topic": topic});

    let producer = match start_producer(&endpoint, &topic, args.num("request-timeout", 5)).await {
        Ok(p) => p,
        Err(e) => return (json!({"client": LANG, "ok": false, "errors": [e]}), false),
    };
    let message = MessageBuilder::builder()
        .set_topic(topic.clone())
        .set_tag("fifo")
        .set_body(b"fifo message without a message group".to_vec())
        .build();
    match message {
        Err(e) => errors.push(format!("build message: {}", err_text(&e))),
        Ok(message) => match producer.send(message).await {
            Ok(receipt) => errors.push(format!(
                "send without message group to a FIFO topic succeeded: {}",
                receipt.message_id()
            )),
            Err(e) => {
                // Display carries the status code name in its context.
                let text = e.to_string();
                let code = "MESSAGE_PROPERTY_CONFLICT_WITH_TYPE";
                out["error"] = json!(text);
                out["code"] = json!(if text.contains(code) { code } else { "" });
                log!("refused: {text}");
                if !text.contains(code) {
                    errors.push(format!("refused, but not with {code} (40014): {text}"));
                }
            }
        },
    }
    if let Err(e) = producer.shutdown().await {
        errors.push(format!("producer shutdown: {}", err_text(&e)));
    }
    let ok = errors.is_empty();
    out["ok"] = json!(ok);
    out["errors"] = json!(errors);
    (out, ok)
}
