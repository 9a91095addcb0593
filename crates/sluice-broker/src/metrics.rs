//! Broker metrics: messages and bytes in and out per topic, consumer lag and in-flight
//! counts per group (computed at scrape time).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::RwLock;
use sluice_common::metrics::{self, Counter};

use crate::broker::Broker;

#[derive(Clone)]
struct TopicCounters {
    msgs_in: Counter,
    bytes_in: Counter,
    msgs_out: Counter,
    bytes_out: Counter,
}

#[derive(Default)]
pub(crate) struct BrokerMetrics {
    topics: RwLock<HashMap<String, TopicCounters>>,
}

impl BrokerMetrics {
    fn topic(&self, topic: &str) -> TopicCounters {
        if let Some(c) = self.topics.read().get(topic) {
            return c.clone();
        }
        let r = metrics::global();
        let l = [("topic", topic)];
        let c = TopicCounters {
            msgs_in: r.counter(
                "sluice_broker_messages_in_total",
                "Messages stored, per topic.",
                &l,
            ),
            bytes_in: r.counter(
                "sluice_broker_bytes_in_total",
                "Body bytes stored, per topic.",
                &l,
            ),
            msgs_out: r.counter(
                "sluice_broker_messages_out_total",
                "Messages delivered to consumers, per topic.",
                &l,
            ),
            bytes_out: r.counter(
                "sluice_broker_bytes_out_total",
                "Body bytes delivered to consumers, per topic.",
                &l,
            ),
        };
        self.topics.write().insert(topic.to_owned(), c.clone());
        c
    }

    pub fn sent(&self, topic: &str, bytes: usize) {
        let c = self.topic(topic);
        c.msgs_in.inc();
        c.bytes_in.inc_by(bytes as u64);
    }

    pub fn delivered(&self, topic: &str, n: usize, bytes: usize) {
        let c = self.topic(topic);
        c.msgs_out.inc_by(n as u64);
        c.bytes_out.inc_by(bytes as u64);
    }
}

/// Lag and in-flight gauges per (group, topic), read at scrape time.
pub(crate) fn register_collector(broker: Weak<Broker>) {
    metrics::global().collector(move || {
        let Some(b): Option<Arc<Broker>> = broker.upgrade() else {
            return vec![];
        };
        let mut out = vec![(
            "sluice_broker_pending_transactions".to_string(),
            "Half messages waiting for commit or rollback.".to_string(),
            "gauge",
            vec![],
            b.pending_transactions() as f64,
        )];
        out.push((
            "sluice_broker_pending_timers".to_string(),
            "Delay messages waiting for their delivery time (a recalled one may count until then)."
                .to_string(),
            "gauge",
            vec![],
            b.timer().pending() as f64,
        ));
        for g in b.groups() {
            let Ok(st) = b.group_status(&g.name) else {
                continue;
            };
            let mut per_topic: HashMap<String, (u64, u64)> = HashMap::new();
            for q in st.queues {
                let e = per_topic.entry(q.topic).or_default();
                e.0 += q.lag;
                e.1 += q.inflight;
            }
            for (topic, (lag, inflight)) in per_topic {
                let l = vec![
                    ("group".to_string(), g.name.clone()),
                    ("topic".to_string(), topic),
                ];
                out.push((
                    "sluice_broker_consumer_lag_messages".to_string(),
                    "Messages not yet handed out to the group.".to_string(),
                    "gauge",
                    l.clone(),
                    lag as f64,
                ));
                out.push((
                    "sluice_broker_inflight_messages".to_string(),
                    "Messages handed out and not yet acknowledged.".to_string(),
                    "gauge",
                    l,
                    inflight as f64,
                ));
            }
        }
        out
    });
}
