//! The admin subcommands: a thin HTTP client of the admin API that prints tables for people
//! or, with `--json`, the API's JSON for scripts.

use std::fmt;

use anyhow::{Context, Result, anyhow, bail};
use comfy_table::{CellAlignment, Table, presets};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_admin::api::*;

/// An error the API answered with: its message goes to stderr, the process exits with 1.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, HTTP {})",
            self.message,
            self.code,
            self.status.as_u16()
        )
    }
}

impl std::error::Error for ApiFailure {}

/// An HTTP client for the admin API that sends `token` as a bearer token on every request.
pub fn http_client(timeout: std::time::Duration, token: Option<&str>) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .context("the admin token must be printable ASCII")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .timeout(timeout)
        .default_headers(headers)
        .build()
        .context("building the HTTP client")
}

pub struct Admin {
    base: Url,
    http: reqwest::Client,
    json: bool,
    /// `--namespace`: lists show only its topics and groups (empty: all).
    namespace: String,
}

/// What an admin subcommand prints on success.
enum Reply<T> {
    Json(T, serde_json::Value),
    NoContent,
}

impl Admin {
    /// `token`: the admin API's bearer token (`[server] admin_token`), if it has one.
    pub fn new(base: &str, json: bool, token: Option<&str>) -> Result<Admin> {
        let base = Url::parse(base).with_context(|| format!("--admin {base:?} is not a URL"))?;
        match base.scheme() {
            "http" => {}
            "https" => bail!("--admin: https is not supported yet; use http://"),
            s => bail!("--admin: unsupported scheme {s:?}; use http://HOST:PORT"),
        }
        if base.cannot_be_a_base() {
            bail!("--admin {base} cannot take a path");
        }
        let http = http_client(std::time::Duration::from_secs(60), token)?;
        Ok(Admin {
            base,
            http,
            json,
            namespace: String::new(),
        })
    }

    /// Lists show only the topics and groups of namespace `ns` (checked by the caller).
    pub fn in_namespace(mut self, ns: &str) -> Admin {
        self.namespace = ns.to_owned();
        self
    }

    /// Whether a broker name belongs to the namespace of the lists (always without one).
    fn listed(&self, full: &str) -> bool {
        self.namespace.is_empty()
            || sluice_proxy::namespace::client_name(&self.namespace, full) != full
    }

    /// [`Admin::run`] for a list: filtered to the namespace, in both output forms.
    async fn list<T: DeserializeOwned + Serialize>(
        &self,
        segments: &[&str],
        keep: impl FnOnce(&mut T, &dyn Fn(&str) -> bool),
        human: impl FnOnce(T),
    ) -> Result<()> {
        if let Reply::Json(mut typed, raw) = self
            .call::<T>(Method::GET, segments, &[], None::<&()>)
            .await?
        {
            if self.namespace.is_empty() {
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&raw)?);
                    return Ok(());
                }
            } else {
                keep(&mut typed, &|n| self.listed(n));
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&typed)?);
                    return Ok(());
                }
            }
            human(typed);
        }
        Ok(())
    }

    /// The URL of `segments` below the base, each segment percent-encoded.
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Url> {
        let mut url = self.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| anyhow!("--admin {} cannot take a path", self.base))?;
            path.pop_if_empty();
            path.extend(segments);
        }
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        Ok(url)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&impl Serialize>,
    ) -> Result<Reply<T>> {
        let url = self.url(segments, query)?;
        let mut req = self.http.request(method, url.clone());
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.with_context(|| {
            format!(
                "cannot reach the admin API at {} (is `sluice server` running there? \
                     set --admin or SLUICE_ADMIN)",
                self.base
            )
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .with_context(|| format!("reading the reply from {url}"))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => ApiFailure {
                    status,
                    code: e.error.code,
                    message: e.error.message,
                }
                .into(),
                Err(_) => anyhow!(
                    "{url} answered HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes).trim()
                ),
            });
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(Reply::NoContent);
        }
        let raw: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("{url} did not answer JSON"))?;
        let typed = serde_json::from_value(raw.clone())
            .with_context(|| format!("unexpected reply from {url}"))?;
        Ok(Reply::Json(typed, raw))
    }

    /// Calls the API; prints the JSON in `--json` mode or hands the typed reply to `human`.
    async fn run<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&impl Serialize>,
        human: impl FnOnce(T),
    ) -> Result<()> {
        match self.call(method, segments, query, body).await? {
            Reply::Json(typed, raw) => {
                if self.json {
                    println!("{}", serde_json::to_string_pretty(&raw)?);
                } else {
                    human(typed);
                }
            }
            Reply::NoContent => {}
        }
        Ok(())
    }

    async fn delete(&self, segments: &[&str], done: String) -> Result<()> {
        if let Reply::NoContent = self
            .call::<serde_json::Value>(Method::DELETE, segments, &[], None::<&()>)
            .await?
        {
            if !self.json {
                println!("{done}");
            }
        }
        Ok(())
    }

    // ----------------------------------------------------------------------------- topics

    pub async fn topic_create(&self, req: CreateTopic) -> Result<()> {
        self.run(
            Method::POST,
            &["api", "v1", "topics"],
            &[],
            Some(&req),
            |t: Topic| {
                println!(
                    "Created topic {} ({}, {} queues).",
                    t.name,
                    t.message_type.as_str(),
                    t.queues
                );
            },
        )
        .await
    }

    pub async fn topic_list(&self) -> Result<()> {
        self.list(
            &["api", "v1", "topics"],
            |l: &mut TopicList, keep| l.topics.retain(|t| keep(&t.name)),
            |l: TopicList| {
                if l.topics.is_empty() {
                    println!("No topics.");
                    return;
                }
                let mut t = table(&["NAME", "TYPE", "QUEUES", "CREATED"]);
                for x in l.topics {
                    t.add_row(vec![
                        x.name,
                        x.message_type.as_str().to_owned(),
                        x.queues.to_string(),
                        time(x.created_at_ms),
                    ]);
                }
                right_align(&mut t, &[2]);
                println!("{t}");
            },
        )
        .await
    }

    pub async fn topic_describe(&self, name: &str) -> Result<()> {
        self.run(
            Method::GET,
            &["api", "v1", "topics", name],
            &[],
            None::<&()>,
            |d: TopicDetail| {
                println!("Topic:    {}", d.topic.name);
                println!("Type:     {}", d.topic.message_type.as_str());
                println!("Queues:   {}", d.topic.queues);
                println!("Created:  {}", time(d.topic.created_at_ms));
                println!("Stored:   {} messages", d.stored_messages);
                let mut t = table(&["QUEUE", "MIN OFFSET", "MAX OFFSET", "MESSAGES"]);
                for q in d.queue_status {
                    t.add_row(vec![
                        q.queue_id.to_string(),
                        q.min_offset.to_string(),
                        q.max_offset.to_string(),
                        q.max_offset.saturating_sub(q.min_offset).to_string(),
                    ]);
                }
                right_align(&mut t, &[0, 1, 2, 3]);
                println!("{t}");
            },
        )
        .await
    }

    pub async fn topic_update(&self, name: &str, req: UpdateTopic) -> Result<()> {
        self.run(
            Method::PUT,
            &["api", "v1", "topics", name],
            &[],
            Some(&req),
            |t: Topic| {
                println!(
                    "Updated topic {} ({}, {} queues).",
                    t.name,
                    t.message_type.as_str(),
                    t.queues
                );
            },
        )
        .await
    }

    pub async fn topic_delete(&self, name: &str) -> Result<()> {
        self.delete(
            &["api", "v1", "topics", name],
            format!("Deleted topic {name}."),
        )
        .await
    }

    // ----------------------------------------------------------------------------- groups

    pub async fn group_create(&self, req: CreateGroup) -> Result<()> {
        self.run(
            Method::POST,
            &["api", "v1", "groups"],
            &[],
            Some(&req),
            |g: Group| {
                println!(
                    "Created consumer group {} ({}, {} attempts, starts at {}).",
                    g.name,
                    if g.fifo { "FIFO" } else { "concurrent" },
                    g.max_attempts,
                    start(g.start)
                );
            },
        )
        .await
    }

    pub async fn group_list(&self) -> Result<()> {
        self.list(
            &["api", "v1", "groups"],
            |l: &mut GroupList, keep| l.groups.retain(|g| keep(&g.name)),
            |l: GroupList| {
                if l.groups.is_empty() {
                    println!("No consumer groups.");
                    return;
                }
                let mut t = table(&["NAME", "FIFO", "MAX ATTEMPTS", "START", "CREATED"]);
                for g in l.groups {
                    t.add_row(vec![
                        g.name,
                        yes_no(g.fifo).to_owned(),
                        g.max_attempts.to_string(),
                        start(g.start),
                        time(g.created_at_ms),
                    ]);
                }
                right_align(&mut t, &[2]);
                println!("{t}");
            },
        )
        .await
    }

    pub async fn group_describe(&self, name: &str) -> Result<()> {
        self.run(
            Method::GET,
            &["api", "v1", "groups", name],
            &[],
            None::<&()>,
            |d: GroupDetail| {
                let g = &d.group;
                println!("Group:         {}", g.name);
                println!("FIFO:          {}", yes_no(g.fifo));
                println!("Max attempts:  {}", g.max_attempts);
                println!(
                    "Backoff:       {}ms, times {} per attempt, at most {}ms",
                    g.backoff.initial_ms, g.backoff.multiplier, g.backoff.max_ms
                );
                println!("Start:         {}", start(g.start));
                println!("Dead letters:  {}", g.dead_letter_topic);
                println!("Created:       {}", time(g.created_at_ms));
                println!("Lag:           {}", d.total_lag);
                println!("In flight:     {}", d.total_inflight);
                if d.queues.is_empty() {
                    println!("(the group has not consumed from any queue yet)");
                    return;
                }
                let mut t = table(&["TOPIC", "QUEUE", "CURSOR", "MAX OFFSET", "LAG", "IN FLIGHT"]);
                for q in d.queues {
                    t.add_row(vec![
                        q.topic,
                        q.queue_id.to_string(),
                        q.cursor.to_string(),
                        q.max_offset.to_string(),
                        q.lag.to_string(),
                        q.inflight.to_string(),
                    ]);
                }
                right_align(&mut t, &[1, 2, 3, 4, 5]);
                println!("{t}");
            },
        )
        .await
    }

    pub async fn group_update(&self, name: &str, req: UpdateGroup) -> Result<()> {
        self.run(
            Method::PUT,
            &["api", "v1", "groups", name],
            &[],
            Some(&req),
            |g: Group| {
                println!(
                    "Updated consumer group {} ({}, {} attempts, starts at {}).",
                    g.name,
                    if g.fifo { "FIFO" } else { "concurrent" },
                    g.max_attempts,
                    start(g.start)
                );
            },
        )
        .await
    }

    pub async fn group_delete(&self, name: &str) -> Result<()> {
        self.delete(
            &["api", "v1", "groups", name],
            format!("Deleted consumer group {name}."),
        )
        .await
    }

    pub async fn group_reset_offset(&self, name: &str, req: ResetOffset) -> Result<()> {
        let path = ["api", "v1", "groups", name, "reset-offset"];
        self.run(
            Method::POST,
            &path,
            &[],
            Some(&req),
            |r: ResetOffsetResult| {
                println!(
                    "Reset consumer group {} on topic {} to {}.",
                    r.group,
                    r.topic,
                    time(r.timestamp_ms)
                );
                let mut t = table(&["QUEUE", "NEXT OFFSET"]);
                for q in r.queues {
                    t.add_row(vec![q.queue_id.to_string(), q.offset.to_string()]);
                }
                right_align(&mut t, &[0, 1]);
                println!("{t}");
            },
        )
        .await
    }

    pub async fn group_resend_dead_letters(
        &self,
        name: &str,
        req: ResendDeadLetters,
    ) -> Result<()> {
        let path = ["api", "v1", "groups", name, "dead-letters", "resend"];
        self.run(Method::POST, &path, &[], Some(&req), |r: ResendResult| {
            println!(
                "Re-sent {} dead-lettered message{} of consumer group {}.",
                r.resent,
                if r.resent == 1 { "" } else { "s" },
                r.group
            );
        })
        .await
    }

    // --------------------------------------------------------------------------- messages

    pub async fn message_get(&self, id: &str, preview_bytes: Option<usize>) -> Result<()> {
        let query: Vec<(&str, String)> = preview_bytes
            .map(|p| ("preview_bytes", p.to_string()))
            .into_iter()
            .collect();
        self.run(
            Method::GET,
            &["api", "v1", "messages", id],
            &query,
            None::<&()>,
            |m: StoredMessage| {
                println!("Message ID:  {}", m.message_id);
                println!("Topic:       {}", m.topic);
                println!("Queue:       {} at offset {}", m.queue_id, m.queue_offset);
                println!("Stored:      {}", time(m.store_timestamp_ms));
                println!(
                    "Born:        {} on {}",
                    time(m.born_timestamp_ms),
                    m.born_host
                );
                if let Some(t) = m.message_type {
                    println!("Type:        {}", t.as_str());
                }
                if let Some(tag) = &m.tag {
                    println!("Tag:         {tag}");
                }
                if !m.keys.is_empty() {
                    println!("Keys:        {}", m.keys.join(" "));
                }
                if let Some(g) = &m.message_group {
                    println!("Group:       {g}");
                }
                if let Some(d) = m.delivery_timestamp_ms {
                    println!("Deliver at:  {}", time(d));
                }
                for (k, v) in &m.properties {
                    println!("Property:    {k}={v}");
                }
                println!(
                    "Body:        {} bytes{}",
                    m.body_size,
                    if m.body_truncated {
                        " (preview below is cut)"
                    } else {
                        ""
                    }
                );
                println!("{}", m.body_preview);
            },
        )
        .await
    }

    pub async fn message_list(&self, topic: &str, q: MessageQuery) -> Result<()> {
        let mut query = Vec::new();
        if let Some(k) = q.key {
            query.push(("key", k));
        }
        for (name, v) in [
            ("begin_ms", q.begin_ms.map(|v| v.to_string())),
            ("end_ms", q.end_ms.map(|v| v.to_string())),
            ("queue", q.queue.map(|v| v.to_string())),
            ("offset", q.offset.map(|v| v.to_string())),
            ("max", q.max.map(|v| v.to_string())),
            ("preview_bytes", q.preview_bytes.map(|v| v.to_string())),
        ] {
            if let Some(v) = v {
                query.push((name, v));
            }
        }
        let path = ["api", "v1", "topics", topic, "messages"];
        self.run(Method::GET, &path, &query, None::<&()>, |l: MessageList| {
            if l.messages.is_empty() {
                println!("No messages.");
                return;
            }
            let mut t = table(&[
                "MESSAGE ID",
                "QUEUE",
                "OFFSET",
                "STORED",
                "TAG",
                "KEYS",
                "SIZE",
                "BODY",
            ]);
            for m in l.messages {
                t.add_row(vec![
                    m.message_id,
                    m.queue_id.to_string(),
                    m.queue_offset.to_string(),
                    time(m.store_timestamp_ms),
                    m.tag.unwrap_or_default(),
                    m.keys.join(" "),
                    m.body_size.to_string(),
                    one_line(&m.body_preview, 40),
                ]);
            }
            right_align(&mut t, &[1, 2, 6]);
            println!("{t}");
        })
        .await
    }

    // ----------------------------------------------------------------------------- broker

    pub async fn status(&self) -> Result<()> {
        self.run(
            Method::GET,
            &["api", "v1", "broker"],
            &[],
            None::<&()>,
            |s: BrokerStatus| {
                println!("Broker:        {}", s.name);
                println!("Version:       {}", s.version);
                println!("Started:       {}", time(s.started_at_ms));
                println!("Uptime:        {}", uptime(s.uptime_ms));
                println!("Flush:         {}", s.flush_policy);
                println!("Data dir:      {}", s.data_dir);
                println!(
                    "Disk used:     {}",
                    sluice_common::format_bytes(s.store.disk_bytes)
                );
                println!(
                    "Messages:      {} appended since start",
                    s.store.appended_messages
                );
                println!("Topics:        {}", s.topics);
                println!("Groups:        {}", s.groups);
                if let Some(f) = &s.fenced {
                    println!("FENCED:        {f}");
                }
            },
        )
        .await
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::UTF8_HORIZONTAL_ONLY)
        .set_header(header.to_vec());
    t
}

fn right_align(t: &mut Table, columns: &[usize]) {
    for &c in columns {
        if let Some(col) = t.column_mut(c) {
            col.set_cell_alignment(CellAlignment::Right);
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn start(s: Start) -> String {
    match s {
        Start::Timestamp(ms) => time(ms),
        other => other.to_string(),
    }
}

/// Milliseconds since the epoch as RFC 3339 in UTC, to the second.
pub fn time(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => format!("{t:.0}"),
        Err(_) => format!("{ms} ms"),
    }
}

fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, s) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m {s}s")
    } else {
        format!("{m}m {s}s")
    }
}

/// A body preview on one line, at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

/// Parses `--to` / `--start` times: RFC 3339 (`2024-05-01T12:00:00Z`,
/// `2024-05-01T14:00:00+02:00`) or milliseconds since the epoch.
pub fn parse_time_ms(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map_err(|_| format!("{s:?} is too large for milliseconds since the epoch"));
    }
    s.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|_| {
            format!(
                "{s:?} is neither an RFC 3339 time (2024-05-01T12:00:00Z) nor milliseconds \
                 since the epoch"
            )
        })
}

/// Parses `--start`: `earliest`, `latest`, or a time as in [`parse_time_ms`].
pub fn parse_start(s: &str) -> Result<Start, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "earliest" => Ok(Start::Earliest),
        "latest" => Ok(Start::Latest),
        _ => parse_time_ms(s)
            .map(Start::Timestamp)
            .map_err(|e| format!("expected earliest, latest or a time: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time_ms("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time_ms("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time_ms("2023-11-15T00:13:20+02:00"),
            Ok(1_700_000_000_000)
        );
        assert!(parse_time_ms("yesterday").is_err());
        assert!(parse_time_ms("").is_err());
        assert!(parse_time_ms("99999999999999999999999").is_err());
        assert_eq!(time(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(parse_start("Earliest"), Ok(Start::Earliest));
        assert_eq!(parse_start("latest"), Ok(Start::Latest));
        assert_eq!(parse_start("5"), Ok(Start::Timestamp(5)));
        assert!(parse_start("soon").is_err());
    }

    #[test]
    fn urls_encode_names() {
        let a = Admin::new("http://127.0.0.1:8080", false, None).expect("admin");
        let u = a
            .url(
                &["api", "v1", "topics", "%DLQ%g|x"],
                &[("key", "a b&c".into())],
            )
            .expect("url");
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:8080/api/v1/topics/%25DLQ%25g|x?key=a+b%26c"
        );
        let a = Admin::new("http://host:1/prefix/", false, None).expect("admin");
        let u = a.url(&["api"], &[]).expect("url");
        assert_eq!(u.as_str(), "http://host:1/prefix/api");
        assert!(Admin::new("https://host", false, None).is_err());
        assert!(Admin::new("nonsense", false, None).is_err());
    }

    #[test]
    fn previews_fit_one_line() {
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line("abcdef", 4), "abc…");
    }
}
