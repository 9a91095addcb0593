//! Stream reads: pulling a queue by offset (with filters and long polling), committed
//! offsets of pull consumers (kept in [`crate::offsets`]) and offset queries.
//!
//! Unlike POP, a pull hands out no receipt handles and keeps no per-message state: the
//! consumer says where to read and remembers (or commits) how far it got.

use std::time::Duration;

use sluice_store::{ReadStatus, tag_hash};

use crate::broker::{Broker, View, to_message};
use crate::error::BrokerError;
use crate::filter::Filter;
use crate::messaging::{Delivery, Messaging};
use crate::meta::TopicConfig;
use crate::pop::QueueKey;

/// A pull of one queue.
#[derive(Debug, Clone)]
pub struct PullRequest {
    pub group: String,
    pub topic: String,
    pub queue: u32,
    pub offset: u64,
    pub max_messages: u32,
    pub filter: Filter,
    /// How long to wait for a matching message when none is there.
    pub long_poll: Duration,
}

/// What a pull found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullStatus {
    /// Messages were found.
    Found,
    /// No matching message arrived before the long poll ended.
    NoNewMessage,
    /// The offset is below the oldest stored message; `next_offset` is the oldest.
    OffsetTooSmall,
    /// The offset is beyond the end of the queue; `next_offset` is the end.
    OffsetOverflow,
}

#[derive(Debug, Clone)]
pub struct PullResult {
    pub status: PullStatus,
    /// Pulled messages, in offset order; their receipt handles are empty.
    pub messages: Vec<Delivery>,
    /// Where the next pull should start (past messages skipped by the filter, too).
    pub next_offset: u64,
    pub min_offset: u64,
    pub max_offset: u64,
}

/// Which offset of a queue to look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetQuery {
    /// The oldest stored message.
    Beginning,
    /// The end (the offset the next message will get).
    End,
    /// The first message stored at or after a time (ms since the epoch); the end if none.
    Timestamp(i64),
}

/// Messages read per store call, and store calls per pull attempt (bounds the time a
/// run of filtered-out messages can take).
const SCAN_CALLS: usize = 16;

impl Broker {
    fn queue_of(&self, topic: &str, queue: u32) -> Result<TopicConfig, BrokerError> {
        let t = self.route(topic)?.topic;
        if queue >= t.queues {
            return Err(BrokerError::BadRequest(format!(
                "topic {topic} has {} queue(s); queue {queue} does not exist",
                t.queues
            )));
        }
        Ok(t)
    }

    pub(crate) async fn pull_queue(&self, req: PullRequest) -> Result<PullResult, BrokerError> {
        let topic = self.queue_of(&req.topic, req.queue)?;
        self.group_config(&req.group)?;
        let limit = self.config().max_receive_batch;
        if req.max_messages == 0 || req.max_messages > limit {
            return Err(BrokerError::BadRequest(format!(
                "batch size must be between 1 and {limit}"
            )));
        }
        let tag_hashes: Option<Vec<u64>> = match &req.filter {
            Filter::Tags(set) => Some(set.tags().map(tag_hash).collect()),
            _ => None,
        };
        let store = self.store().clone();
        let q = req.queue;
        let deadline = tokio::time::Instant::now() + req.long_poll;
        let notify = self.notifier(&topic.name);
        let mut offset = req.offset;
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (min, max) = store.queue_offsets(&topic.name, q);
            let result = |status, messages, next_offset| PullResult {
                status,
                messages,
                next_offset,
                min_offset: min,
                max_offset: max,
            };
            if offset < min {
                return Ok(result(PullStatus::OffsetTooSmall, vec![], min));
            }
            if offset > max {
                return Ok(result(PullStatus::OffsetOverflow, vec![], max));
            }
            let start = offset;
            let mut out = Vec::new();
            'scan: for _ in 0..SCAN_CALLS {
                let want = req.max_messages - out.len() as u32;
                let b = store.read(&topic.name, q, offset, want, 16 << 20, |e| {
                    tag_hashes.as_ref().is_none_or(|h| h.contains(&e.tag_hash))
                })?;
                match b.status {
                    ReadStatus::Found => {}
                    // Retention deleted what we were about to read.
                    ReadStatus::OffsetTooSmall => {
                        return Ok(result(PullStatus::OffsetTooSmall, vec![], b.next_offset));
                    }
                    _ => break,
                }
                for m in &b.messages {
                    if !req.filter.matches(&View(m)) {
                        continue;
                    }
                    out.push(Delivery {
                        message: to_message(m),
                        queue_id: q,
                        queue_offset: m.queue_offset,
                        store_timestamp_ms: m.store_ts,
                        receipt_handle: String::new(),
                        delivery_attempt: 1,
                        invisible_until_ms: 0,
                    });
                    if out.len() as u32 >= req.max_messages {
                        offset = m.queue_offset + 1;
                        break 'scan;
                    }
                }
                if b.next_offset <= offset {
                    break;
                }
                offset = b.next_offset;
            }
            if !out.is_empty() {
                return Ok(result(PullStatus::Found, out, offset));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(result(PullStatus::NoNewMessage, vec![], offset));
            }
            if offset > start && offset < store.queue_offsets(&topic.name, q).1 {
                // More to scan (a long run of filtered-out messages): go on at once.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    pub(crate) async fn commit_offset(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> Result<(), BrokerError> {
        self.group_config(group)?;
        let t = self.queue_of(topic, queue)?;
        let (_, max) = self.store().queue_offsets(&t.name, queue);
        if offset > max {
            return Err(BrokerError::IllegalOffset(format!(
                "offset {offset} is beyond the end of {topic}/{queue} ({max})"
            )));
        }
        let k = QueueKey {
            group: group.to_owned(),
            topic: topic.to_owned(),
            queue,
        };
        self.offsets.commit(k, offset, self.now()).await
    }

    pub(crate) fn committed_offset(
        &self,
        group: &str,
        topic: &str,
        queue: u32,
    ) -> Result<Option<u64>, BrokerError> {
        self.group_config(group)?;
        self.queue_of(topic, queue)?;
        Ok(self.offsets.get(&QueueKey {
            group: group.to_owned(),
            topic: topic.to_owned(),
            queue,
        }))
    }

    pub(crate) fn lookup_offset(
        &self,
        topic: &str,
        queue: u32,
        query: OffsetQuery,
    ) -> Result<u64, BrokerError> {
        let t = self.queue_of(topic, queue)?;
        let (min, max) = self.store().queue_offsets(&t.name, queue);
        Ok(match query {
            OffsetQuery::Beginning => min,
            OffsetQuery::End => max,
            OffsetQuery::Timestamp(ts) => self
                .store()
                .offset_for_timestamp(&t.name, queue, ts)?
                .clamp(min, max),
        })
    }
}
