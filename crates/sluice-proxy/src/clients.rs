//! Soft per-client state: the last settings a client sent, its telemetry stream, and the
//! receipts of auto-renewed (PushConsumer) receives that the access point keeps invisible
//! while the client lives. Losing this state (a restart) is harmless: renewals stop and the
//! messages come back after their invisible time.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sluice_proto::v2;
use tokio::sync::mpsc;

use crate::namespace;

pub type TelemetrySender = mpsc::Sender<Result<v2::TelemetryCommand, tonic::Status>>;

#[derive(Debug, Clone)]
pub struct Renewal {
    pub group: String,
    pub topic: String,
    pub next: Instant,
}

#[derive(Default)]
struct Client {
    settings: Option<v2::Settings>,
    /// The `x-mq-namespace` header of its Telemetry stream.
    namespace: String,
    telemetry: Option<(u64, TelemetrySender)>,
    last_seen: Option<Instant>,
    renewals: HashMap<String, Renewal>,
}

#[derive(Default)]
pub struct Clients {
    inner: Mutex<HashMap<String, Client>>,
    stream_ids: std::sync::atomic::AtomicU64,
}

impl Clients {
    pub fn touch(&self, id: &str) {
        self.inner
            .lock()
            .entry(id.to_owned())
            .or_default()
            .last_seen = Some(Instant::now());
    }

    pub fn set_settings(&self, id: &str, s: v2::Settings, namespace: &str) {
        let mut all = self.inner.lock();
        let c = all.entry(id.to_owned()).or_default();
        c.settings = Some(s);
        c.namespace = namespace.to_owned();
        c.last_seen = Some(Instant::now());
    }

    /// Registers a telemetry stream; returns its id for [`Clients::drop_telemetry`].
    pub fn set_telemetry(&self, id: &str, tx: TelemetrySender) -> u64 {
        let sid = self
            .stream_ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut all = self.inner.lock();
        let c = all.entry(id.to_owned()).or_default();
        c.telemetry = Some((sid, tx));
        c.last_seen = Some(Instant::now());
        sid
    }

    pub fn drop_telemetry(&self, id: &str, sid: u64) {
        if let Some(c) = self.inner.lock().get_mut(id) {
            if c.telemetry.as_ref().is_some_and(|(s, _)| *s == sid) {
                c.telemetry = None;
            }
        }
    }

    pub fn remove(&self, id: &str) {
        self.inner.lock().remove(id);
    }

    pub fn add_renewal(&self, id: &str, handle: String, r: Renewal) {
        self.inner
            .lock()
            .entry(id.to_owned())
            .or_default()
            .renewals
            .insert(handle, r);
    }

    pub fn remove_renewal(&self, id: &str, handle: &str) {
        if let Some(c) = self.inner.lock().get_mut(id) {
            c.renewals.remove(handle);
        }
    }

    /// Renewals due now, for clients seen within `alive`. Clients silent for longer are
    /// forgotten with their renewals.
    pub fn due(&self, now: Instant, alive: Duration) -> Vec<(String, String, Renewal)> {
        let mut all = self.inner.lock();
        all.retain(|_, c| {
            c.telemetry.is_some() || c.last_seen.is_some_and(|t| now.duration_since(t) < alive)
        });
        let mut out = Vec::new();
        for (id, c) in all.iter() {
            for (h, r) in &c.renewals {
                if r.next <= now {
                    out.push((id.clone(), h.clone(), r.clone()));
                }
            }
        }
        out
    }

    pub fn reschedule(&self, id: &str, handle: &str, next: Instant) {
        if let Some(r) = self
            .inner
            .lock()
            .get_mut(id)
            .and_then(|c| c.renewals.get_mut(handle))
        {
            r.next = next;
        }
    }

    /// Telemetry streams that may answer a transaction check of `topic` (the broker's
    /// name), each with the namespace its client names the topic in: the `preferred`
    /// client's (the producer that sent the message) if it is connected, else those of
    /// every connected producer whose settings publish to the topic, ordered by client id.
    pub fn transaction_checkers(
        &self,
        preferred: Option<&str>,
        topic: &str,
    ) -> Vec<(TelemetrySender, String)> {
        let all = self.inner.lock();
        let live = |c: &Client| {
            c.telemetry
                .as_ref()
                .filter(|(_, tx)| !tx.is_closed())
                .map(|(_, tx)| tx.clone())
        };
        // The publishing topic of a client's settings that is `topic`, if any.
        let publishes = |c: &Client| -> Option<String> {
            match c.settings.as_ref().and_then(|s| s.pub_sub.as_ref()) {
                Some(v2::settings::PubSub::Publishing(p)) => p.topics.iter().find_map(|t| {
                    let ns = namespace::of(&c.namespace, Some(t));
                    (namespace::check(ns).is_ok() && namespace::wrap(ns, &t.name) == topic)
                        .then(|| ns.to_owned())
                }),
                _ => None,
            }
        };
        if let Some(c) = preferred.and_then(|id| all.get(id)) {
            if let Some(tx) = live(c) {
                let ns = publishes(c).unwrap_or_else(|| c.namespace.clone());
                return vec![(tx, ns)];
            }
        }
        let mut found: Vec<(&String, TelemetrySender, String)> = all
            .iter()
            .filter_map(|(id, c)| {
                let ns = publishes(c)?;
                Some((id, live(c)?, ns))
            })
            .collect();
        found.sort_by(|a, b| a.0.cmp(b.0));
        found.into_iter().map(|(_, tx, ns)| (tx, ns)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publishing(topics: &[(&str, &str)]) -> v2::Settings {
        v2::Settings {
            pub_sub: Some(v2::settings::PubSub::Publishing(v2::Publishing {
                topics: topics
                    .iter()
                    .map(|(ns, name)| v2::Resource {
                        resource_namespace: (*ns).into(),
                        name: (*name).into(),
                    })
                    .collect(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn transaction_checks_go_to_producers_of_the_namespaced_topic() {
        let c = Clients::default();
        let (tx, _rx1) = mpsc::channel(4);
        let (tx2, _rx2) = mpsc::channel(4);
        let (tx3, _rx3) = mpsc::channel(4);
        // Namespace in the header only (Node.js), in the resource only, and none.
        c.set_telemetry("node", tx);
        c.set_settings("node", publishing(&[("", "t")]), "prod");
        c.set_telemetry("py", tx2);
        c.set_settings("py", publishing(&[("prod", "t")]), "");
        c.set_telemetry("rust", tx3);
        c.set_settings("rust", publishing(&[("", "t")]), "");
        let ns =
            |v: Vec<(TelemetrySender, String)>| v.into_iter().map(|(_, n)| n).collect::<Vec<_>>();
        assert_eq!(
            ns(c.transaction_checkers(None, "prod%t")),
            vec!["prod", "prod"]
        );
        assert_eq!(ns(c.transaction_checkers(None, "t")), vec![""]);
        assert!(c.transaction_checkers(None, "dev%t").is_empty());
        // The producer that sent the message is asked first, in its namespace.
        assert_eq!(
            ns(c.transaction_checkers(Some("py"), "prod%t")),
            vec!["prod"]
        );
    }
}
