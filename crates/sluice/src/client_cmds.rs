//! `sluice send` and `sluice consume`: produce and consume over the gRPC API with
//! `sluice-client`, like any RocketMQ 5 client would.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use sluice_client::{
    ClientConfig, FilterExpression, Message, Producer, ReceivedMessage, SimpleConsumer,
};

use crate::bench::parse_duration;

/// Options of `sluice send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Topic to send to.
    pub topic: String,
    /// Message body; without it, --file or standard input is read.
    #[arg(conflicts_with = "file")]
    pub body: Option<String>,
    /// Read the body from this file.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Tag (consumers filter on it).
    #[arg(long)]
    pub tag: Option<String>,
    /// Key for look-ups (repeatable).
    #[arg(long = "key", value_name = "KEY")]
    pub keys: Vec<String>,
    /// User property as key=value (repeatable).
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_property)]
    pub properties: Vec<(String, String)>,
    /// Deliver after this delay (e.g. 10s, 5m); the topic must be a delay topic.
    #[arg(long, value_parser = parse_duration, conflicts_with = "deliver_at")]
    pub delay: Option<Duration>,
    /// Deliver at this time (RFC 3339, e.g. 2030-01-01T12:00:00Z).
    #[arg(long, value_parser = parse_rfc3339, value_name = "TIME")]
    pub deliver_at: Option<SystemTime>,
    /// FIFO message group (the topic must be a FIFO topic).
    #[arg(long, value_name = "MESSAGE_GROUP", conflicts_with_all = ["delay", "deliver_at"])]
    pub group: Option<String>,
    /// Send the message this many times (each copy gets its own id).
    #[arg(long, default_value_t = 1)]
    pub count: u32,
}

/// Options of `sluice consume`.
#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to consume.
    pub topic: String,
    /// Consumer group (it must exist: `sluice group create`).
    #[arg(long)]
    pub group: String,
    /// Tag filter: `*` or `tagA||tagB`.
    #[arg(long, conflicts_with = "sql")]
    pub filter: Option<String>,
    /// SQL92 filter on properties, e.g. "a > 1 AND region = 'eu'".
    #[arg(long)]
    pub sql: Option<String>,
    /// Stop after this many messages.
    #[arg(long)]
    pub max: Option<u64>,
    /// Keep waiting for new messages until interrupted (Ctrl-C).
    #[arg(long)]
    pub follow: bool,
    /// Do not acknowledge: the messages are delivered again after --invisible.
    #[arg(long)]
    pub no_ack: bool,
    /// How long received messages stay invisible to other consumers.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub invisible: Duration,
    /// How long one receive waits for messages [default: 3s, 20s with --follow].
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,
}

fn parse_property(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    let ts: jiff::Timestamp = s
        .parse()
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))?;
    let ms = ts.as_millisecond();
    let ms = u64::try_from(ms).map_err(|_| format!("{s:?} is before 1970"))?;
    Ok(UNIX_EPOCH + Duration::from_millis(ms))
}

fn rfc3339(t: Option<SystemTime>) -> Option<String> {
    let d = t?.duration_since(UNIX_EPOCH).ok()?;
    let ts = jiff::Timestamp::from_millisecond(i64::try_from(d.as_millis()).ok()?).ok()?;
    Some(ts.to_string())
}

pub async fn send(config: ClientConfig, json: bool, args: SendArgs) -> Result<()> {
    let body = match (&args.body, &args.file) {
        (Some(b), _) => b.clone().into_bytes(),
        (None, Some(f)) => std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => {
            let mut b = Vec::new();
            std::io::stdin()
                .read_to_end(&mut b)
                .context("reading the body from standard input")?;
            b
        }
    };
    if body.is_empty() {
        bail!("the message body is empty");
    }
    let mut m = Message::new(args.topic.as_str(), body);
    m.tag = args.tag.clone();
    m.keys = args.keys.clone();
    m.properties = args.properties.iter().cloned().collect();
    m.message_group = args.group.clone();
    m.delivery_time = args
        .deliver_at
        .or_else(|| args.delay.map(|d| SystemTime::now() + d));
    let producer = Producer::builder(config)
        .start()
        .await
        .context("starting the producer")?;
    let mut out = std::io::stdout().lock();
    let mut result = Ok(());
    for _ in 0..args.count {
        match producer.send(m.clone()).await {
            Ok(r) => {
                if json {
                    let v = json!({
                        "messageId": r.message_id,
                        "topic": r.topic,
                        "queueId": r.queue_id,
                        "offset": r.offset,
                        "transactionId": (!r.transaction_id.is_empty()).then_some(&r.transaction_id),
                        "recallHandle": (!r.recall_handle.is_empty()).then_some(&r.recall_handle),
                    });
                    writeln!(out, "{v}")?;
                } else {
                    writeln!(out, "{}", r.message_id)?;
                }
            }
            Err(e) => {
                result = Err(anyhow::Error::new(e).context(format!("sending to {}", args.topic)));
                break;
            }
        }
    }
    out.flush()?;
    let closed = producer.shutdown().await;
    result?;
    closed.context("closing the producer")?;
    Ok(())
}

fn print_message(out: &mut impl Write, m: &ReceivedMessage, json: bool) -> Result<()> {
    if json {
        let (body, encoding) = match std::str::from_utf8(&m.body) {
            Ok(s) => (s.to_owned(), "utf-8"),
            Err(_) => (m.body.iter().map(|b| format!("{b:02x}")).collect(), "hex"),
        };
        let mut props: Vec<(&String, &String)> = m.properties.iter().collect();
        props.sort();
        let props: serde_json::Map<String, serde_json::Value> = props
            .into_iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        let v = json!({
            "messageId": m.message_id,
            "topic": m.topic,
            "tag": m.tag,
            "keys": m.keys,
            "properties": props,
            "messageGroup": m.message_group,
            "queueId": m.queue_id,
            "queueOffset": m.queue_offset,
            "deliveryAttempt": m.delivery_attempt,
            "bornTime": rfc3339(m.born_time),
            "bornHost": m.born_host,
            "storeTime": rfc3339(m.store_time),
            "deliveryTime": rfc3339(m.delivery_time),
            "body": body,
            "bodyEncoding": encoding,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    let mut head = format!(
        "--- {}  queue {}  offset {}  attempt {}",
        m.message_id,
        m.queue_id,
        m.queue_offset
            .map(|o| o.to_string())
            .unwrap_or_else(|| "-".into()),
        m.delivery_attempt
    );
    if let Some(t) = &m.tag {
        head.push_str(&format!("  tag {t}"));
    }
    if !m.keys.is_empty() {
        head.push_str(&format!("  keys {}", m.keys.join(",")));
    }
    if let Some(g) = &m.message_group {
        head.push_str(&format!("  group {g}"));
    }
    if let Some(t) = rfc3339(m.store_time) {
        head.push_str(&format!("  stored {t}"));
    }
    writeln!(out, "{head}")?;
    if !m.properties.is_empty() {
        let mut props: Vec<String> = m
            .properties
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        props.sort();
        writeln!(out, "    {}", props.join(" "))?;
    }
    writeln!(out, "{}", m.body_str())?;
    Ok(())
}

pub async fn consume(config: ClientConfig, json: bool, args: ConsumeArgs) -> Result<()> {
    let filter = match (&args.filter, &args.sql) {
        (_, Some(sql)) => FilterExpression::Sql(sql.clone()),
        (Some(tags), None) => FilterExpression::Tag(tags.clone()),
        (None, None) => FilterExpression::all(),
    };
    let wait = args.wait.unwrap_or(if args.follow {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(3)
    });
    let consumer = SimpleConsumer::builder(config, args.group.as_str())
        .subscribe(args.topic.as_str(), filter)
        .await_duration(wait)
        .start()
        .await
        .context("starting the consumer")?;
    let max = args.max.unwrap_or(u64::MAX);
    let mut seen = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let result: Result<()> = async {
        while seen < max {
            let want = (max - seen).min(32) as u32;
            let batch = tokio::select! {
                r = consumer.receive(want, args.invisible) => r?,
                _ = &mut ctrl_c => break,
            };
            if batch.is_empty() {
                if args.follow {
                    continue;
                }
                break;
            }
            {
                let mut out = std::io::stdout().lock();
                for m in &batch {
                    print_message(&mut out, m, json)?;
                }
                out.flush()?;
            }
            seen += batch.len() as u64;
            if !args.no_ack {
                consumer.ack_batch(&batch).await.context("acknowledging")?;
            }
        }
        Ok(())
    }
    .await;
    let closed = consumer.shutdown().await;
    result?;
    closed.context("closing the consumer")?;
    if !json {
        eprintln!("{seen} message(s)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_and_times() {
        assert_eq!(parse_property("a=1"), Ok(("a".into(), "1".into())));
        assert_eq!(parse_property("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_property("=1").is_err());
        assert!(parse_property("a").is_err());
        let t = parse_rfc3339("2030-01-01T00:00:00Z").expect("time");
        assert_eq!(
            t.duration_since(UNIX_EPOCH).expect("after epoch").as_secs(),
            1_893_456_000
        );
        assert_eq!(rfc3339(Some(t)).as_deref(), Some("2030-01-01T00:00:00Z"));
        assert!(parse_rfc3339("tomorrow").is_err());
    }

    #[test]
    fn human_output() {
        let m = ReceivedMessage {
            message_id: "01AB".into(),
            topic: "t".into(),
            tag: Some("x".into()),
            body: b"hello".to_vec(),
            queue_offset: Some(3),
            delivery_attempt: 1,
            properties: [("b".to_string(), "2".to_string()), ("a".into(), "1".into())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let mut out = Vec::new();
        print_message(&mut out, &m, false).expect("print");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.starts_with("--- 01AB  queue 0  offset 3  attempt 1  tag x\n"),
            "{text}"
        );
        assert!(text.contains("    a=1 b=2\nhello\n"), "{text}");
        let mut out = Vec::new();
        print_message(&mut out, &m, true).expect("print");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["body"], "hello");
        assert_eq!(v["properties"]["a"], "1");
    }
}
