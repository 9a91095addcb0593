//! Topic and consumer-group metadata, persisted as JSON files in `<data>/meta/`.
//!
//! Each file is rewritten whole through a temporary file, fsync and rename, so a crash
//! leaves the old or the new version. Metadata changes are rare (admin operations); the hot
//! path only reads the in-memory copy.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sluice_common::validate_resource_name;

use crate::error::BrokerError;

/// What a topic accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Normal,
    Fifo,
    Delay,
    Transaction,
}

impl MessageType {
    pub fn as_str(&self) -> &'static str {
        match self {
            MessageType::Normal => "normal",
            MessageType::Fifo => "fifo",
            MessageType::Delay => "delay",
            MessageType::Transaction => "transaction",
        }
    }

    pub fn parse(s: &str) -> Option<MessageType> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Some(MessageType::Normal),
            "fifo" => Some(MessageType::Fifo),
            "delay" => Some(MessageType::Delay),
            "transaction" => Some(MessageType::Transaction),
            _ => None,
        }
    }

    /// Flag bits stored with each record.
    pub fn flag(&self) -> u32 {
        match self {
            MessageType::Normal => 0,
            MessageType::Fifo => 1,
            MessageType::Delay => 2,
            MessageType::Transaction => 3,
        }
    }

    pub fn from_flag(f: u32) -> MessageType {
        match f & 3 {
            1 => MessageType::Fifo,
            2 => MessageType::Delay,
            3 => MessageType::Transaction,
            _ => MessageType::Normal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    pub message_type: MessageType,
    pub queues: u32,
    pub created_at_ms: i64,
}

/// Where a group starts reading a queue it has never read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "at_ms")]
pub enum StartPosition {
    /// The oldest stored message.
    Earliest,
    /// Messages stored after the group was created (the default).
    Latest,
    /// Messages stored at or after a time (ms since the epoch).
    Timestamp(i64),
}

/// Retry backoff of a group: the delay before delivery attempt n+1 after a nack.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial_ms: 1_000,
            max_ms: 60_000,
            multiplier: 2.0,
        }
    }
}

/// Longest retry delay a group may configure (7 days).
pub const MAX_BACKOFF_MS: u64 = 7 * 24 * 3600 * 1000;

impl Backoff {
    /// Checks the ranges: delays up to [`MAX_BACKOFF_MS`], `initial_ms ≤ max_ms`, and a
    /// finite multiplier between 1 and 100.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_ms > MAX_BACKOFF_MS {
            return Err(format!(
                "backoff max_ms {} exceeds {MAX_BACKOFF_MS}",
                self.max_ms
            ));
        }
        if self.initial_ms > self.max_ms {
            return Err(format!(
                "backoff initial_ms {} exceeds max_ms {}",
                self.initial_ms, self.max_ms
            ));
        }
        if !(1.0..=100.0).contains(&self.multiplier) {
            return Err(format!(
                "backoff multiplier {} is not between 1 and 100",
                self.multiplier
            ));
        }
        Ok(())
    }

    /// Delay after the `attempt`-th failed delivery (1-based).
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        ((self.initial_ms as f64 * exp) as u64).min(self.max_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    /// Consume message groups in order (FIFO consumption mode).
    pub fifo: bool,
    /// Deliveries before a message moves to the dead-letter topic.
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub start: StartPosition,
    pub created_at_ms: i64,
}

impl GroupConfig {
    /// Name of the group's dead-letter topic.
    pub fn dlq_topic(&self) -> String {
        dlq_topic(&self.name)
    }
}

pub fn dlq_topic(group: &str) -> String {
    format!("%DLQ%{group}")
}

pub const DEFAULT_MAX_ATTEMPTS: u32 = 17;
pub const MAX_QUEUES: u32 = 1024;

pub(crate) struct Metadata {
    dir: PathBuf,
    /// Shared, so a lookup on the send path is a reference count, not a copy.
    topics: RwLock<BTreeMap<String, Arc<TopicConfig>>>,
    groups: RwLock<BTreeMap<String, GroupConfig>>,
}

fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, BrokerError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| BrokerError::Internal(format!("{} is damaged: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BrokerError::Internal(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

/// Writes a file atomically and durably.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BrokerError> {
    let err = |e: std::io::Error| BrokerError::Internal(format!("writing {}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    // The new content must be on disk before it replaces the old file.
    f.sync_data().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        // Make the rename durable.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
    }
    Ok(())
}

fn check_topic(t: &TopicConfig) -> Result<(), BrokerError> {
    validate_resource_name(&t.name)
        .map_err(|e| BrokerError::IllegalTopic(format!("{:?}: {e}", t.name)))?;
    if t.queues == 0 || t.queues > MAX_QUEUES {
        return Err(BrokerError::BadRequest(format!(
            "queues must be between 1 and {MAX_QUEUES}"
        )));
    }
    Ok(())
}

fn check_group(g: &GroupConfig) -> Result<(), BrokerError> {
    validate_resource_name(&g.name)
        .map_err(|e| BrokerError::IllegalGroup(format!("{:?}: {e}", g.name)))?;
    if g.max_attempts == 0 || g.max_attempts > 1000 {
        return Err(BrokerError::BadRequest(
            "max_attempts must be between 1 and 1000".into(),
        ));
    }
    g.backoff.validate().map_err(BrokerError::BadRequest)
}

impl Metadata {
    pub fn open(dir: PathBuf) -> Result<Metadata, BrokerError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| BrokerError::Internal(format!("creating {}: {e}", dir.display())))?;
        let topics: Vec<TopicConfig> = load(&dir.join("topics.json"))?.unwrap_or_default();
        let groups: Vec<GroupConfig> = load(&dir.join("groups.json"))?.unwrap_or_default();
        // What the files hold passed these checks when it was written; anything else is
        // damage (or a hand edit), refused here with the file and entry named rather than
        // met later as a division by a zero queue count or an overflowing deadline.
        for t in &topics {
            check_topic(t).map_err(|e| {
                BrokerError::Internal(format!(
                    "{} is damaged: topic {:?}: {e}",
                    dir.join("topics.json").display(),
                    t.name
                ))
            })?;
        }
        for g in &groups {
            check_group(g).map_err(|e| {
                BrokerError::Internal(format!(
                    "{} is damaged: group {:?}: {e}",
                    dir.join("groups.json").display(),
                    g.name
                ))
            })?;
        }
        Ok(Metadata {
            topics: RwLock::new(
                topics
                    .into_iter()
                    .map(|t| (t.name.clone(), Arc::new(t)))
                    .collect(),
            ),
            groups: RwLock::new(groups.into_iter().map(|g| (g.name.clone(), g)).collect()),
            dir,
        })
    }

    fn save_topics(&self, t: &BTreeMap<String, Arc<TopicConfig>>) -> Result<(), BrokerError> {
        let v: Vec<&TopicConfig> = t.values().map(|t| &**t).collect();
        let b = serde_json::to_vec_pretty(&v).map_err(|e| BrokerError::Internal(e.to_string()))?;
        write_atomic(&self.dir.join("topics.json"), &b)
    }

    fn save_groups(&self, g: &BTreeMap<String, GroupConfig>) -> Result<(), BrokerError> {
        let v: Vec<&GroupConfig> = g.values().collect();
        let b = serde_json::to_vec_pretty(&v).map_err(|e| BrokerError::Internal(e.to_string()))?;
        write_atomic(&self.dir.join("groups.json"), &b)
    }

    pub fn topic(&self, name: &str) -> Option<TopicConfig> {
        self.topics.read().get(name).map(|t| (**t).clone())
    }

    /// [`Metadata::topic`] without the copy, for the send path.
    pub fn topic_shared(&self, name: &str) -> Option<Arc<TopicConfig>> {
        self.topics.read().get(name).cloned()
    }

    pub fn topics(&self) -> Vec<TopicConfig> {
        self.topics.read().values().map(|t| (**t).clone()).collect()
    }

    pub fn group(&self, name: &str) -> Option<GroupConfig> {
        self.groups.read().get(name).cloned()
    }

    pub fn groups(&self) -> Vec<GroupConfig> {
        self.groups.read().values().cloned().collect()
    }

    /// Creates a topic, or updates it when `upsert` is set.
    pub fn put_topic(&self, t: TopicConfig, upsert: bool) -> Result<TopicConfig, BrokerError> {
        check_topic(&t)?;
        let mut all = self.topics.write();
        if let Some(old) = all.get(&t.name) {
            if !upsert {
                return Err(BrokerError::TopicExists(t.name));
            }
            if t.queues < old.queues {
                return Err(BrokerError::BadRequest(format!(
                    "queue count can only grow ({} → {})",
                    old.queues, t.queues
                )));
            }
        }
        let mut next = all.clone();
        next.insert(t.name.clone(), Arc::new(t.clone()));
        self.save_topics(&next)?;
        *all = next;
        Ok(t)
    }

    pub fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        let mut all = self.topics.write();
        if !all.contains_key(name) {
            return Err(BrokerError::TopicNotFound(name.to_owned()));
        }
        let mut next = all.clone();
        next.remove(name);
        self.save_topics(&next)?;
        *all = next;
        Ok(())
    }

    pub fn put_group(&self, g: GroupConfig, upsert: bool) -> Result<GroupConfig, BrokerError> {
        check_group(&g)?;
        let mut all = self.groups.write();
        if all.contains_key(&g.name) && !upsert {
            return Err(BrokerError::GroupExists(g.name));
        }
        let mut next = all.clone();
        next.insert(g.name.clone(), g.clone());
        self.save_groups(&next)?;
        *all = next;
        Ok(g)
    }

    pub fn delete_group(&self, name: &str) -> Result<(), BrokerError> {
        let mut all = self.groups.write();
        if !all.contains_key(name) {
            return Err(BrokerError::GroupNotFound(name.to_owned()));
        }
        let mut next = all.clone();
        next.remove(name);
        self.save_groups(&next)?;
        *all = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> TopicConfig {
        TopicConfig {
            name: name.into(),
            message_type: MessageType::Normal,
            queues: 4,
            created_at_ms: 1,
        }
    }

    #[test]
    fn persisted_and_validated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Metadata::open(dir.path().to_path_buf()).expect("open");
        m.put_topic(topic("a"), false).expect("create");
        assert!(matches!(
            m.put_topic(topic("a"), false),
            Err(BrokerError::TopicExists(_))
        ));
        assert!(matches!(
            m.put_topic(topic("../x"), false),
            Err(BrokerError::IllegalTopic(_))
        ));
        assert!(matches!(
            m.put_topic(
                TopicConfig {
                    queues: 0,
                    ..topic("b")
                },
                false
            ),
            Err(BrokerError::BadRequest(_))
        ));
        assert!(matches!(
            m.put_topic(
                TopicConfig {
                    queues: 2,
                    ..topic("a")
                },
                true
            ),
            Err(BrokerError::BadRequest(_))
        ));
        let g = GroupConfig {
            name: "g".into(),
            fifo: true,
            max_attempts: 3,
            backoff: Backoff::default(),
            start: StartPosition::Timestamp(5),
            created_at_ms: 1,
        };
        m.put_group(g.clone(), false).expect("group");
        drop(m);
        let m = Metadata::open(dir.path().to_path_buf()).expect("reopen");
        assert_eq!(m.topic("a"), Some(topic("a")));
        assert_eq!(m.group("g"), Some(g));
        m.delete_topic("a").expect("delete");
        assert!(m.topic("a").is_none());
    }

    #[test]
    fn damaged_files_are_refused_with_the_entry_named() {
        // Found by the `broker_open` fuzz target: a topic with 0 queues in topics.json made
        // the first send divide by zero.
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Metadata::open(dir.path().to_path_buf()).expect("open");
        m.put_topic(topic("a"), false).expect("create");
        drop(m);
        let path = dir.path().join("topics.json");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace("\"queues\": 4", "\"queues\": 0")).expect("write");
        match Metadata::open(dir.path().to_path_buf()) {
            Err(BrokerError::Internal(why)) => {
                assert!(why.contains("topics.json is damaged: topic \"a\""), "{why}")
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        std::fs::remove_file(&path).expect("rm");
        let bad = |backoff: Backoff| GroupConfig {
            name: "g".into(),
            fifo: false,
            max_attempts: 3,
            backoff,
            start: StartPosition::Latest,
            created_at_ms: 1,
        };
        let m = Metadata::open(dir.path().to_path_buf()).expect("open");
        for b in [
            Backoff {
                max_ms: u64::MAX,
                ..Backoff::default()
            },
            Backoff {
                initial_ms: 2,
                max_ms: 1,
                multiplier: 2.0,
            },
            Backoff {
                multiplier: f64::NAN,
                ..Backoff::default()
            },
            Backoff {
                multiplier: 0.5,
                ..Backoff::default()
            },
        ] {
            assert!(
                matches!(m.put_group(bad(b), false), Err(BrokerError::BadRequest(_))),
                "{b:?}"
            );
        }
        assert!(m.groups().is_empty());
    }

    #[test]
    fn backoff_grows_to_the_cap() {
        let b = Backoff {
            initial_ms: 100,
            max_ms: 1000,
            multiplier: 2.0,
        };
        assert_eq!(b.delay_ms(1), 100);
        assert_eq!(b.delay_ms(3), 400);
        assert_eq!(b.delay_ms(10), 1000);
    }
}
