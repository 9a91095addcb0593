//! Stream reads at the gRPC edge: `PullMessage` (status frame, messages, next-offset frame)
//! and the committed-offset RPCs `UpdateOffset`, `GetOffset`, `QueryOffset`.

use std::time::Duration;

use sluice_broker::filter::{Filter, FilterKind};
use sluice_broker::{BrokerError, Delivery, Messaging, OffsetQuery, PullRequest, PullStatus};
use sluice_proto::v2::{self, Code, pull_message_response::Content};

use crate::auth::Action;
use crate::codes::{error_status, ok, status};
use crate::convert::{delivery_to_pb, dur, ts_to_ms};
use crate::service::{Ctx, Service};

/// A pulled message: no receipt handle, invisible time or delivery attempt.
fn pulled_to_pb(d: &Delivery, host: &str, ns: &str) -> v2::Message {
    let mut m = delivery_to_pb(d, host, Duration::ZERO, ns);
    if let Some(sp) = m.system_properties.as_mut() {
        sp.receipt_handle = None;
        sp.invisible_duration = None;
        sp.delivery_attempt = None;
    }
    m
}

fn frames(st: v2::Status, msgs: Vec<v2::Message>, next: i64) -> Vec<v2::PullMessageResponse> {
    let mut out = Vec::with_capacity(msgs.len() + 2);
    out.push(v2::PullMessageResponse {
        content: Some(Content::Status(st)),
    });
    out.extend(msgs.into_iter().map(|m| v2::PullMessageResponse {
        content: Some(Content::Message(m)),
    }));
    out.push(v2::PullMessageResponse {
        content: Some(Content::NextOffset(next)),
    });
    out
}

/// Topic (the broker's name) and queue id of a request's message queue.
fn queue(c: &Ctx, q: &Option<v2::MessageQueue>) -> Result<(String, u32), BrokerError> {
    let q = q
        .as_ref()
        .ok_or_else(|| BrokerError::BadRequest("message_queue is required".into()))?;
    let topic = c.resolve(&q.topic)?;
    let id = u32::try_from(q.id)
        .map_err(|_| BrokerError::BadRequest(format!("queue id {} is not valid", q.id)))?;
    Ok((topic, id))
}

/// Why an offset request fails: the broker's error, or the ACL's.
enum Fail {
    Broker(BrokerError),
    Denied(Code, String),
}

impl From<BrokerError> for Fail {
    fn from(e: BrokerError) -> Fail {
        Fail::Broker(e)
    }
}

impl Fail {
    fn status(self, c: &Ctx) -> v2::Status {
        match self {
            Fail::Broker(e) => error_status(c.dialect, &e),
            Fail::Denied(code, msg) => status(c.dialect, code, msg),
        }
    }
}

fn allow(c: &Ctx, actions: &[Action<'_>]) -> Result<(), Fail> {
    c.allow(actions)
        .map_err(|(code, msg)| Fail::Denied(code, msg))
}

impl<M: Messaging> Service<M> {
    /// The frames of a PullMessage stream: status, messages, next offset (also after
    /// errors, where it is the requested offset).
    pub(crate) async fn pull_impl(
        &self,
        c: &Ctx,
        r: v2::PullMessageRequest,
    ) -> Vec<v2::PullMessageResponse> {
        let asked = r.offset;
        let Some(client) = c.client_id.clone() else {
            let st = status(
                c.dialect,
                Code::ClientIdRequired,
                "x-mq-client-id header is required",
            );
            return frames(st, vec![], asked);
        };
        self.clients.touch(&client);
        let fail = |e: BrokerError| frames(error_status(c.dialect, &e), vec![], asked);
        let (topic, q) = match queue(c, &r.message_queue) {
            Ok(x) => x,
            Err(e) => return fail(e),
        };
        let group = match c.resolve(&r.group) {
            Ok(g) => g,
            Err(e) => return fail(e),
        };
        if let Err((code, msg)) = c.allow(&[Action::Subscribe(&topic), Action::Group(&group)]) {
            return frames(status(c.dialect, code, msg), vec![], asked);
        }
        let ns = c.namespace_of(r.message_queue.as_ref().and_then(|q| q.topic.as_ref()));
        let offset = match u64::try_from(r.offset) {
            Ok(o) => o,
            Err(_) => {
                return fail(BrokerError::IllegalOffset(format!(
                    "{} is negative",
                    r.offset
                )));
            }
        };
        let filter = match &r.filter_expression {
            None => Ok(Filter::All),
            Some(f) => {
                let kind = if f.r#type == v2::FilterType::Sql as i32 {
                    FilterKind::Sql
                } else {
                    FilterKind::Tag
                };
                Filter::parse(kind, &f.expression)
            }
        };
        let filter = match filter {
            Ok(f) => f,
            Err(e) => return fail(BrokerError::IllegalFilter(e)),
        };
        let mut poll = r
            .long_polling_timeout
            .as_ref()
            .and_then(dur)
            .unwrap_or(Duration::ZERO)
            .min(self.cfg.max_long_poll);
        if let Some(t) = c.timeout {
            // Answer before the client's deadline, with room for the response to travel.
            let reserve = (t / 10).max(Duration::from_millis(300));
            poll = poll.min(t.saturating_sub(reserve));
        }
        let req = PullRequest {
            group,
            topic,
            queue: q,
            offset,
            max_messages: r.batch_size.clamp(1, 1024) as u32,
            filter,
            long_poll: poll,
        };
        let res = match self.m.pull(req).await {
            Ok(res) => res,
            Err(e) => return fail(e),
        };
        let next = res.next_offset as i64;
        match res.status {
            PullStatus::Found => {
                let host = c.local.map(|a| a.to_string()).unwrap_or_default();
                let msgs = res
                    .messages
                    .iter()
                    .map(|d| pulled_to_pb(d, &host, ns))
                    .collect();
                frames(ok(), msgs, next)
            }
            PullStatus::NoNewMessage => frames(
                status(c.dialect, Code::MessageNotFound, "no new message"),
                vec![],
                next,
            ),
            PullStatus::OffsetTooSmall => frames(
                status(
                    c.dialect,
                    Code::IllegalOffset,
                    format!(
                        "offset {offset} is below the oldest stored message ({}); continue at next_offset",
                        res.min_offset
                    ),
                ),
                vec![],
                next,
            ),
            PullStatus::OffsetOverflow => frames(
                status(
                    c.dialect,
                    Code::IllegalOffset,
                    format!(
                        "offset {offset} is beyond the end of the queue ({}); continue at next_offset",
                        res.max_offset
                    ),
                ),
                vec![],
                next,
            ),
        }
    }

    pub(crate) async fn update_offset_impl(
        &self,
        c: &Ctx,
        r: v2::UpdateOffsetRequest,
    ) -> v2::UpdateOffsetResponse {
        let res = async {
            let (topic, q) = queue(c, &r.message_queue)?;
            let group = c.resolve(&r.group)?;
            allow(c, &[Action::Subscribe(&topic), Action::Group(&group)])?;
            let offset = u64::try_from(r.offset)
                .map_err(|_| BrokerError::IllegalOffset(format!("{} is negative", r.offset)))?;
            Ok::<(), Fail>(self.m.update_offset(&group, &topic, q, offset).await?)
        }
        .await;
        v2::UpdateOffsetResponse {
            status: Some(match res {
                Ok(()) => ok(),
                Err(e) => e.status(c),
            }),
        }
    }

    pub(crate) fn get_offset_impl(
        &self,
        c: &Ctx,
        r: v2::GetOffsetRequest,
    ) -> v2::GetOffsetResponse {
        let res = queue(c, &r.message_queue)
            .map_err(Fail::from)
            .and_then(|(topic, q)| {
                let group = c.resolve(&r.group)?;
                allow(c, &[Action::Subscribe(&topic), Action::Group(&group)])?;
                Ok(self.m.get_offset(&group, &topic, q)?)
            });
        match res {
            Ok(Some(o)) => v2::GetOffsetResponse {
                status: Some(ok()),
                offset: o as i64,
            },
            Ok(None) => v2::GetOffsetResponse {
                status: Some(status(
                    c.dialect,
                    Code::OffsetNotFound,
                    "the group has not committed an offset for this queue",
                )),
                offset: 0,
            },
            Err(e) => v2::GetOffsetResponse {
                status: Some(e.status(c)),
                offset: 0,
            },
        }
    }

    pub(crate) fn query_offset_impl(
        &self,
        c: &Ctx,
        r: v2::QueryOffsetRequest,
    ) -> v2::QueryOffsetResponse {
        let res = queue(c, &r.message_queue)
            .map_err(Fail::from)
            .and_then(|(topic, q)| {
                allow(c, &[Action::Subscribe(&topic)])?;
                let query = match v2::QueryOffsetPolicy::try_from(r.query_offset_policy) {
                    Ok(v2::QueryOffsetPolicy::Beginning) => OffsetQuery::Beginning,
                    Ok(v2::QueryOffsetPolicy::End) => OffsetQuery::End,
                    Ok(v2::QueryOffsetPolicy::Timestamp) => match &r.timestamp {
                        Some(ts) => OffsetQuery::Timestamp(ts_to_ms(ts)),
                        None => {
                            return Err(BrokerError::BadRequest(
                                "a TIMESTAMP query needs a timestamp".into(),
                            )
                            .into());
                        }
                    },
                    Err(_) => {
                        return Err(BrokerError::BadRequest(format!(
                            "unknown query offset policy {}",
                            r.query_offset_policy
                        ))
                        .into());
                    }
                };
                Ok(self.m.query_offset(&topic, q, query)?)
            });
        match res {
            Ok(o) => v2::QueryOffsetResponse {
                status: Some(ok()),
                offset: o as i64,
            },
            Err(e) => v2::QueryOffsetResponse {
                status: Some(e.status(c)),
                offset: 0,
            },
        }
    }
}
