//! Client configuration and retry policies.

use std::time::Duration;

use sluice_proto::prost_types;
use sluice_proto::v2;

/// Where and how to reach the access point. Shared by every client type.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of the access point, or several separated by `;` (requests are then
    /// balanced over them). The official clients take the same syntax.
    pub endpoints: String,
    /// Namespace sent in `x-mq-namespace` and every `Resource`; empty for none.
    pub namespace: String,
    /// Deadline of one unary call (long polls get theirs on top).
    pub request_timeout: Duration,
    /// How often a heartbeat tells the server the client is alive.
    pub heartbeat_interval: Duration,
    /// How often cached routes are refreshed.
    pub route_refresh_interval: Duration,
    /// Access key and secret key that sign every request (`authorization` header, as the
    /// official clients do); `None` for an access point without authentication.
    pub credentials: Option<Credentials>,
}

/// An access key and its secret key.
#[derive(Clone)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

impl ClientConfig {
    /// Defaults: 3 s request timeout, heartbeat every 10 s, routes refreshed every 30 s
    /// (the timings of the official clients).
    pub fn new(endpoints: impl Into<String>) -> Self {
        ClientConfig {
            endpoints: endpoints.into(),
            namespace: String::new(),
            request_timeout: Duration::from_secs(3),
            heartbeat_interval: Duration::from_secs(10),
            route_refresh_interval: Duration::from_secs(30),
            credentials: None,
        }
    }

    /// Signs every request with this access key and secret key.
    pub fn with_credentials(
        mut self,
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
    ) -> Self {
        self.credentials = Some(Credentials {
            access_key: access_key.into(),
            secret_key: secret_key.into(),
        });
        self
    }

    /// Sets the namespace.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Sets the per-request deadline.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

/// How long to wait between attempts.
#[derive(Debug, Clone, PartialEq)]
pub enum Backoff {
    /// `initial × multiplierⁿ⁻¹`, capped at `max`.
    Exponential {
        initial: Duration,
        max: Duration,
        multiplier: f64,
    },
    /// The n-th retry waits `delays[n-1]` (the last entry repeats).
    Customized(Vec<Duration>),
}

/// Attempts and the backoff between them. Producers get theirs from the server's settings
/// (3 attempts, 10 ms doubling to 1 s on Sluice and the RocketMQ proxy); push consumers get
/// the group's redelivery policy the same way.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Total attempts including the first (at least 1).
    pub max_attempts: u32,
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::Exponential {
                initial: Duration::from_millis(10),
                max: Duration::from_secs(1),
                multiplier: 2.0,
            },
        }
    }
}

impl RetryPolicy {
    /// An exponential policy.
    pub fn exponential(
        max_attempts: u32,
        initial: Duration,
        max: Duration,
        multiplier: f64,
    ) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            backoff: Backoff::Exponential {
                initial,
                max,
                multiplier,
            },
        }
    }

    /// The wait before retry number `retry` (1 = the wait after the first failed attempt).
    pub fn delay(&self, retry: u32) -> Duration {
        let retry = retry.max(1);
        match &self.backoff {
            Backoff::Exponential {
                initial,
                max,
                multiplier,
            } => {
                let m = if multiplier.is_finite() && *multiplier >= 1.0 {
                    *multiplier
                } else {
                    1.0
                };
                let factor = m.powi(retry.saturating_sub(1).min(64) as i32);
                let secs = initial.as_secs_f64() * factor;
                if !secs.is_finite() || secs >= max.as_secs_f64() {
                    *max
                } else {
                    Duration::from_secs_f64(secs.max(0.0))
                }
            }
            Backoff::Customized(delays) => delays
                .get(retry as usize - 1)
                .or(delays.last())
                .copied()
                .unwrap_or(Duration::from_secs(1)),
        }
    }

    /// Reads a policy from the protocol; `None` if it carries no strategy.
    pub(crate) fn from_pb(p: &v2::RetryPolicy) -> Option<Self> {
        use v2::retry_policy::Strategy;
        let backoff = match p.strategy.as_ref()? {
            Strategy::ExponentialBackoff(e) => Backoff::Exponential {
                initial: e
                    .initial
                    .as_ref()
                    .and_then(from_pb_duration)
                    .unwrap_or_default(),
                max: e
                    .max
                    .as_ref()
                    .and_then(from_pb_duration)
                    .unwrap_or(Duration::from_secs(1)),
                multiplier: f64::from(e.multiplier),
            },
            Strategy::CustomizedBackoff(c) => {
                Backoff::Customized(c.next.iter().filter_map(from_pb_duration).collect())
            }
        };
        Some(RetryPolicy {
            max_attempts: u32::try_from(p.max_attempts).unwrap_or(1).max(1),
            backoff,
        })
    }

    pub(crate) fn to_pb(&self) -> v2::RetryPolicy {
        use v2::retry_policy::Strategy;
        v2::RetryPolicy {
            max_attempts: self.max_attempts as i32,
            strategy: Some(match &self.backoff {
                Backoff::Exponential {
                    initial,
                    max,
                    multiplier,
                } => Strategy::ExponentialBackoff(v2::ExponentialBackoff {
                    initial: Some(to_pb_duration(*initial)),
                    max: Some(to_pb_duration(*max)),
                    multiplier: *multiplier as f32,
                }),
                Backoff::Customized(d) => Strategy::CustomizedBackoff(v2::CustomizedBackoff {
                    next: d.iter().map(|d| to_pb_duration(*d)).collect(),
                }),
            }),
        }
    }
}

pub(crate) fn to_pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs().min(i64::MAX as u64) as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

pub(crate) fn from_pb_duration(d: &prost_types::Duration) -> Option<Duration> {
    if d.seconds < 0 || d.nanos < 0 {
        return None;
    }
    Some(Duration::new(d.seconds as u64, d.nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_delays_are_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1), Duration::from_millis(10));
        assert_eq!(p.delay(2), Duration::from_millis(20));
        assert_eq!(p.delay(4), Duration::from_millis(80));
        assert_eq!(p.delay(8), Duration::from_secs(1));
        assert_eq!(p.delay(1000), Duration::from_secs(1));
    }

    #[test]
    fn customized_delays_repeat_the_last() {
        let p = RetryPolicy {
            max_attempts: 5,
            backoff: Backoff::Customized(vec![Duration::from_secs(1), Duration::from_secs(5)]),
        };
        assert_eq!(p.delay(1), Duration::from_secs(1));
        assert_eq!(p.delay(2), Duration::from_secs(5));
        assert_eq!(p.delay(9), Duration::from_secs(5));
    }

    #[test]
    fn protocol_round_trip() {
        let p = RetryPolicy::exponential(17, Duration::from_secs(1), Duration::from_secs(60), 2.0);
        assert_eq!(RetryPolicy::from_pb(&p.to_pb()), Some(p));
        let c = RetryPolicy {
            max_attempts: 2,
            backoff: Backoff::Customized(vec![Duration::from_millis(1500)]),
        };
        assert_eq!(RetryPolicy::from_pb(&c.to_pb()), Some(c));
        assert_eq!(RetryPolicy::from_pb(&v2::RetryPolicy::default()), None);
    }
}
