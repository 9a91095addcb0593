//! `MessagingService` implementation.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_broker::filter::{Filter, FilterKind};
use sluice_broker::{BrokerError, GroupConfig, Messaging, ReceiveRequest};
use sluice_proto::v2::messaging_service_server::MessagingService;
use sluice_proto::v2::{self, Code, receive_message_response, settings, telemetry_command};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::metadata::{Ascii, MetadataKey};
use tonic::{Request, Response, Status, Streaming};

use crate::ProxyConfig;
use crate::auth::{Action, AuthError, SharedAcl, User};
use crate::clients::{Clients, Renewal};
use crate::codes::{Dialect, error_status, ok, status};
use crate::convert::{delivery_to_pb, dur, from_pb, ms_to_ts, pb_message_type, to_pb_duration};
use crate::namespace;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What the request headers say about the caller.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ctx {
    pub client_id: Option<String>,
    pub dialect: Dialect,
    /// Time left before the client gives up (gRPC deadline).
    pub timeout: Option<Duration>,
    pub local: Option<std::net::SocketAddr>,
    /// The `x-mq-namespace` header (empty when absent; see [`crate::namespace`]).
    pub namespace: String,
    /// Who the request is from, when authentication is on.
    pub auth: Auth,
}

/// The outcome of authenticating a request.
#[derive(Debug, Clone, Default)]
pub(crate) enum Auth {
    /// No ACL configured: everything is allowed.
    #[default]
    Off,
    User(Arc<User>),
    Refused(AuthError),
}

impl Ctx {
    /// The broker's name of a resource of the request.
    pub(crate) fn resolve(&self, r: &Option<v2::Resource>) -> Result<String, BrokerError> {
        namespace::resolve(&self.namespace, r)
    }

    /// Whether the request may do all of `actions` (none: only be authenticated);
    /// otherwise UNAUTHORIZED or FORBIDDEN with the reason.
    pub(crate) fn allow(&self, actions: &[Action<'_>]) -> Result<(), (Code, String)> {
        match &self.auth {
            Auth::Off => Ok(()),
            Auth::Refused(e) => Err((Code::Unauthorized, e.to_string())),
            Auth::User(u) => actions
                .iter()
                .try_for_each(|a| u.check(*a))
                .map_err(|m| (Code::Forbidden, m)),
        }
    }

    /// Whether requests are checked against an ACL.
    pub(crate) fn checks_access(&self) -> bool {
        !matches!(self.auth, Auth::Off)
    }

    /// The namespace a resource of the request is in.
    pub(crate) fn namespace_of<'a>(&'a self, r: Option<&'a v2::Resource>) -> &'a str {
        namespace::of(&self.namespace, r)
    }
}

/// Parses a `grpc-timeout` header value (`<digits><H|M|S|m|u|n>`).
pub(crate) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The request headers every call reads, parsed once (a lookup by `&str` parses the name
/// on every call).
struct Keys {
    authorization: MetadataKey<Ascii>,
    date_time: MetadataKey<Ascii>,
    client_id: MetadataKey<Ascii>,
    language: MetadataKey<Ascii>,
    timeout: MetadataKey<Ascii>,
    namespace: MetadataKey<Ascii>,
}

fn keys() -> &'static Keys {
    static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| Keys {
        authorization: MetadataKey::from_static("authorization"),
        date_time: MetadataKey::from_static("x-mq-date-time"),
        client_id: MetadataKey::from_static("x-mq-client-id"),
        language: MetadataKey::from_static("x-mq-language"),
        timeout: MetadataKey::from_static("grpc-timeout"),
        namespace: MetadataKey::from_static("x-mq-namespace"),
    })
}

fn ctx<T>(req: &Request<T>, acl: Option<&SharedAcl>) -> Ctx {
    let md = req.metadata();
    let k = keys();
    let auth = match acl {
        None => Auth::Off,
        Some(acl) => match acl.authenticate(
            md.get(&k.authorization).map(|v| v.as_bytes()),
            md.get(&k.date_time).map(|v| v.as_bytes()),
        ) {
            Ok(u) => Auth::User(u),
            Err(e) => Auth::Refused(e),
        },
    };
    let get = |k: &MetadataKey<Ascii>| md.get(k).and_then(|v| v.to_str().ok());
    Ctx {
        client_id: get(&k.client_id)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        dialect: match get(&k.language) {
            Some(l) if l.eq_ignore_ascii_case("rust") => Dialect::Rust,
            _ => Dialect::Any,
        },
        timeout: get(&k.timeout).and_then(parse_grpc_timeout),
        local: req.local_addr(),
        namespace: get(&k.namespace).unwrap_or_default().to_owned(),
        auth,
    }
}

/// Fails a request that may not do all of the given actions (none: that is not
/// authenticated), with UNAUTHORIZED or FORBIDDEN.
macro_rules! authorize {
    ($ctx:expr, $resp:expr $(, $a:expr)*) => {
        if let Err((code, msg)) = $ctx.allow(&[$($a),*]) {
            #[allow(clippy::field_reassign_with_default)]
            let r = {
                let mut r = $resp;
                r.status = Some(status($ctx.dialect, code, msg));
                r
            };
            return Ok(Response::new(r));
        }
    };
}

/// The broker's name of a resource, or the request's answer with the error status.
macro_rules! resolve {
    ($ctx:expr, $res:expr, $resp:expr) => {
        match $ctx.resolve($res) {
            Ok(n) => n,
            Err(e) => {
                #[allow(clippy::field_reassign_with_default)]
                let r = {
                    let mut r = $resp;
                    r.status = Some(error_status($ctx.dialect, &e));
                    r
                };
                return Ok(Response::new(r));
            }
        }
    };
}

pub struct Service<M: Messaging> {
    pub(crate) m: Arc<M>,
    pub(crate) cfg: ProxyConfig,
    pub(crate) clients: Arc<Clients>,
}

/// Fails a request that carries no client id.
macro_rules! require_client {
    ($ctx:expr, $resp:expr) => {
        match &$ctx.client_id {
            Some(id) => id.clone(),
            None => {
                #[allow(clippy::field_reassign_with_default)]
                let r = {
                    let mut r = $resp;
                    r.status = Some(status(
                        $ctx.dialect,
                        Code::ClientIdRequired,
                        "x-mq-client-id header is required",
                    ));
                    r
                };
                return Ok(Response::new(r));
            }
        }
    };
}

/// Commands queued per Telemetry stream.
const TELEMETRY_QUEUE: usize = 2 * sluice_broker::transaction::MAX_CHECKS_PER_RUN;

impl<M: Messaging> Service<M> {
    fn group_settings(&self, g: &GroupConfig) -> v2::RetryPolicy {
        v2::RetryPolicy {
            max_attempts: g.max_attempts as i32,
            strategy: Some(v2::retry_policy::Strategy::ExponentialBackoff(
                v2::ExponentialBackoff {
                    initial: Some(to_pb_duration(Duration::from_millis(g.backoff.initial_ms))),
                    max: Some(to_pb_duration(Duration::from_millis(g.backoff.max_ms))),
                    multiplier: g.backoff.multiplier as f32,
                },
            )),
        }
    }

    /// The settings echoed to a client: its own plus what the server decides.
    /// `ns`: the client's namespace header.
    pub(crate) fn merged_settings(&self, mut s: v2::Settings, ns: &str) -> v2::Settings {
        match &mut s.pub_sub {
            Some(settings::PubSub::Publishing(p)) => {
                p.max_body_size = self.cfg.max_body_size as i32;
                p.validate_message_type = true;
                s.backoff_policy = Some(v2::RetryPolicy {
                    max_attempts: 3,
                    strategy: Some(v2::retry_policy::Strategy::ExponentialBackoff(
                        v2::ExponentialBackoff {
                            initial: Some(to_pb_duration(Duration::from_millis(10))),
                            max: Some(to_pb_duration(Duration::from_secs(1))),
                            multiplier: 2.0,
                        },
                    )),
                });
            }
            Some(settings::PubSub::Subscription(sub)) => {
                let group = namespace::resolve(ns, &sub.group).unwrap_or_default();
                let g = self.m.group_config(&group).ok();
                sub.fifo = Some(g.as_ref().is_some_and(|g| g.fifo));
                if sub.receive_batch_size.is_none_or(|b| b <= 0) {
                    sub.receive_batch_size = Some(32);
                }
                let poll = sub
                    .long_polling_timeout
                    .as_ref()
                    .and_then(dur)
                    .filter(|d| !d.is_zero())
                    .unwrap_or(self.cfg.max_long_poll)
                    .min(self.cfg.max_long_poll);
                sub.long_polling_timeout = Some(to_pb_duration(poll));
                let policy = match &g {
                    Some(g) => self.group_settings(g),
                    None => self.group_settings(&GroupConfig {
                        name: group,
                        fifo: false,
                        max_attempts: 17,
                        backoff: Default::default(),
                        start: sluice_broker::StartPosition::Latest,
                        created_at_ms: 0,
                    }),
                };
                s.backoff_policy = Some(policy);
            }
            None => {}
        }
        s.metric = Some(v2::Metric {
            on: false,
            endpoints: None,
        });
        s
    }

    async fn renew_once(&self, now: Instant) {
        let alive = Duration::from_secs(120);
        for (client, handle, r) in self.clients.due(now, alive) {
            match self
                .m
                .change_invisible(&r.group, &r.topic, &handle, self.cfg.auto_renew_invisible)
                .await
            {
                Ok(_) => self.clients.reschedule(
                    &client,
                    &handle,
                    now + self.cfg.auto_renew_invisible / 3,
                ),
                Err(_) => self.clients.remove_renewal(&client, &handle),
            }
        }
    }

    /// Keeps auto-renewed receipts invisible while their clients live.
    pub(crate) async fn renew_loop(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => self.renew_once(Instant::now()).await,
                _ = stop.changed() => return,
            }
        }
    }
}

fn endpoints_or_local(
    e: Option<v2::Endpoints>,
    local: Option<std::net::SocketAddr>,
) -> Option<v2::Endpoints> {
    match e {
        Some(mut e) if !e.addresses.is_empty() => {
            if e.scheme == v2::AddressScheme::Unspecified as i32 {
                let ip = e.addresses[0].host.parse::<std::net::IpAddr>();
                e.scheme = match ip {
                    Ok(std::net::IpAddr::V4(_)) => v2::AddressScheme::IPv4,
                    Ok(std::net::IpAddr::V6(_)) => v2::AddressScheme::IPv6,
                    Err(_) => v2::AddressScheme::DomainName,
                } as i32;
            }
            Some(e)
        }
        _ => local.map(|a| v2::Endpoints {
            scheme: if a.is_ipv4() {
                v2::AddressScheme::IPv4
            } else {
                v2::AddressScheme::IPv6
            } as i32,
            addresses: vec![v2::Address {
                host: a.ip().to_string(),
                port: a.port() as i32,
            }],
        }),
    }
}

/// The common status of several per-entry statuses.
fn combined<'a>(mut statuses: impl Iterator<Item = &'a v2::Status>) -> v2::Status {
    match statuses.next() {
        None => ok(),
        Some(first) if statuses.all(|s| s.code == first.code) => first.clone(),
        Some(_) => sluice_proto::status(Code::MultipleResults, "entries have different results"),
    }
}

#[tonic::async_trait]
impl<M: Messaging> MessagingService for Service<M> {
    async fn query_route(
        &self,
        req: Request<v2::QueryRouteRequest>,
    ) -> Result<Response<v2::QueryRouteResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let _id = require_client!(c, v2::QueryRouteResponse::default());
        let r = req.into_inner();
        let topic = resolve!(c, &r.topic, v2::QueryRouteResponse::default());
        authorize!(c, v2::QueryRouteResponse::default(), Action::Use(&topic));
        let client_topic = namespace::resource(c.namespace_of(r.topic.as_ref()), &topic);
        let mut resp = v2::QueryRouteResponse::default();
        match self.m.route(&topic) {
            Ok(route) => {
                let Some(endpoints) = endpoints_or_local(r.endpoints, c.local) else {
                    resp.status = Some(status(
                        c.dialect,
                        Code::IllegalAccessPoint,
                        "no access point in the request",
                    ));
                    return Ok(Response::new(resp));
                };
                let broker = v2::Broker {
                    name: route.broker_name.clone(),
                    id: 0,
                    endpoints: Some(endpoints),
                };
                resp.message_queues =
                    (0..route.topic.queues)
                        .map(|q| v2::MessageQueue {
                            topic: Some(client_topic.clone()),
                            id: q as i32,
                            permission: v2::Permission::ReadWrite as i32,
                            broker: Some(broker.clone()),
                            accept_message_types: vec![
                                pb_message_type(route.topic.message_type) as i32
                            ],
                        })
                        .collect();
                resp.status = Some(ok());
            }
            Err(e) => resp.status = Some(error_status(c.dialect, &e)),
        }
        Ok(Response::new(resp))
    }

    async fn heartbeat(
        &self,
        req: Request<v2::HeartbeatRequest>,
    ) -> Result<Response<v2::HeartbeatResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let id = require_client!(c, v2::HeartbeatResponse::default());
        authorize!(c, v2::HeartbeatResponse::default());
        self.clients.touch(&id);
        Ok(Response::new(v2::HeartbeatResponse { status: Some(ok()) }))
    }

    async fn send_message(
        &self,
        req: Request<v2::SendMessageRequest>,
    ) -> Result<Response<v2::SendMessageResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let client = require_client!(c, v2::SendMessageResponse::default());
        let mut r = req.into_inner();
        // Topics resolved up front, in place (no copy without a namespace): a request with
        // a topic its user may not publish to is refused as a whole, before anything is
        // stored.
        let mut unresolved: Vec<(usize, BrokerError)> = Vec::new();
        for (i, m) in r.messages.iter_mut().enumerate() {
            if let Err(e) = namespace::resolve_in_place(&c.namespace, &mut m.topic) {
                unresolved.push((i, e));
            }
        }
        if c.checks_access() {
            let topics: Vec<Action<'_>> = r
                .messages
                .iter()
                .enumerate()
                .filter(|(i, _)| !unresolved.iter().any(|(j, _)| j == i))
                .map(|(_, m)| Action::Publish(m.topic.as_ref().map_or("", |t| t.name.as_str())))
                .collect();
            if let Err((code, msg)) = c.allow(&topics) {
                return Ok(Response::new(v2::SendMessageResponse {
                    status: Some(status(c.dialect, code, msg)),
                    entries: vec![],
                }));
            }
        }
        if r.messages.is_empty() {
            return Ok(Response::new(v2::SendMessageResponse {
                status: Some(status(c.dialect, Code::BadRequest, "no messages")),
                entries: vec![],
            }));
        }
        // A failed entry still names its message; a successful one gets the id back from
        // the broker.
        let ids: Vec<String> = r
            .messages
            .iter()
            .map(|m| {
                m.system_properties
                    .as_ref()
                    .map(|s| s.message_id.clone())
                    .unwrap_or_default()
            })
            .collect();
        let n = r.messages.len();
        let mut results: Vec<Option<Result<sluice_broker::SendReceipt, BrokerError>>> =
            Vec::with_capacity(n);
        let mut valid = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        let mut unresolved = unresolved.into_iter().peekable();
        for (i, m) in r.messages.into_iter().enumerate() {
            if let Some((_, e)) = unresolved.next_if(|(j, _)| *j == i) {
                results.push(Some(Err(e)));
                continue;
            }
            if m.body.len() > self.cfg.max_body_size.max(1) * 2 {
                results.push(Some(Err(BrokerError::BodyTooLarge {
                    size: m.body.len(),
                    max: self.cfg.max_body_size,
                })));
                continue;
            }
            match from_pb(m, self.cfg.max_body_size) {
                Ok(mut m) => {
                    m.producer_client_id = Some(client.clone());
                    valid.push(m);
                    slots.push(i);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        for (i, res) in slots.into_iter().zip(self.m.send(valid).await) {
            results[i] = Some(res);
        }
        let entries: Vec<v2::SendResultEntry> = results
            .into_iter()
            .zip(ids)
            .map(|(r, id)| match r {
                Some(Ok(rec)) => v2::SendResultEntry {
                    status: Some(ok()),
                    message_id: rec.message_id,
                    transaction_id: rec.transaction_id,
                    offset: rec.offset as i64,
                    recall_handle: rec.recall_handle,
                },
                Some(Err(e)) => v2::SendResultEntry {
                    status: Some(error_status(c.dialect, &e)),
                    message_id: id,
                    ..Default::default()
                },
                None => v2::SendResultEntry {
                    status: Some(status(c.dialect, Code::InternalError, "no result")),
                    message_id: id,
                    ..Default::default()
                },
            })
            .collect();
        Ok(Response::new(v2::SendMessageResponse {
            status: Some(combined(entries.iter().filter_map(|e| e.status.as_ref()))),
            entries,
        }))
    }

    async fn query_assignment(
        &self,
        req: Request<v2::QueryAssignmentRequest>,
    ) -> Result<Response<v2::QueryAssignmentResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let id = require_client!(c, v2::QueryAssignmentResponse::default());
        self.clients.touch(&id);
        let r = req.into_inner();
        let mut resp = v2::QueryAssignmentResponse::default();
        let group = resolve!(c, &r.group, v2::QueryAssignmentResponse::default());
        let topic = resolve!(c, &r.topic, v2::QueryAssignmentResponse::default());
        authorize!(
            c,
            v2::QueryAssignmentResponse::default(),
            Action::Subscribe(&topic),
            Action::Group(&group)
        );
        let client_topic = namespace::resource(c.namespace_of(r.topic.as_ref()), &topic);
        let group = match self.m.group_config(&group) {
            Ok(g) => g,
            Err(e) => {
                resp.status = Some(error_status(c.dialect, &e));
                return Ok(Response::new(resp));
            }
        };
        match self.m.route(&topic) {
            Ok(route) => {
                let endpoints = endpoints_or_local(r.endpoints, c.local);
                let broker = v2::Broker {
                    name: route.broker_name.clone(),
                    id: 0,
                    endpoints,
                };
                let mq = |id: i32| v2::Assignment {
                    message_queue: Some(v2::MessageQueue {
                        topic: Some(client_topic.clone()),
                        id,
                        permission: v2::Permission::ReadWrite as i32,
                        broker: Some(broker.clone()),
                        accept_message_types: vec![pb_message_type(route.topic.message_type) as i32],
                    }),
                };
                // Message-level load balancing: every consumer of a group may pop from every
                // queue, so one assignment per broker (queue id -1) is enough; FIFO groups
                // get one per queue.
                resp.assignments = if group.fifo {
                    (0..route.topic.queues as i32).map(mq).collect()
                } else {
                    vec![mq(-1)]
                };
                resp.status = Some(ok());
            }
            Err(e) => resp.status = Some(error_status(c.dialect, &e)),
        }
        Ok(Response::new(resp))
    }

    type ReceiveMessageStream = BoxStream<v2::ReceiveMessageResponse>;

    async fn receive_message(
        &self,
        req: Request<v2::ReceiveMessageRequest>,
    ) -> Result<Response<Self::ReceiveMessageStream>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let frames =
            |st: v2::Status, msgs: Vec<v2::Message>| -> Response<Self::ReceiveMessageStream> {
                let mut out: Vec<Result<v2::ReceiveMessageResponse, Status>> =
                    Vec::with_capacity(msgs.len() + 2);
                out.push(Ok(v2::ReceiveMessageResponse {
                    content: Some(receive_message_response::Content::Status(st)),
                }));
                for m in msgs {
                    out.push(Ok(v2::ReceiveMessageResponse {
                        content: Some(receive_message_response::Content::Message(m)),
                    }));
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                out.push(Ok(v2::ReceiveMessageResponse {
                    content: Some(receive_message_response::Content::DeliveryTimestamp(
                        ms_to_ts(now),
                    )),
                }));
                Response::new(Box::pin(tokio_stream::iter(out)))
            };
        let Some(client) = c.client_id.clone() else {
            return Ok(frames(
                status(
                    c.dialect,
                    Code::ClientIdRequired,
                    "x-mq-client-id header is required",
                ),
                vec![],
            ));
        };
        self.clients.touch(&client);
        let r = req.into_inner();
        let topic_res = r.message_queue.as_ref().and_then(|q| q.topic.clone());
        let (topic, group) = match (c.resolve(&topic_res), c.resolve(&r.group)) {
            (Ok(t), Ok(g)) => (t, g),
            (Err(e), _) | (_, Err(e)) => return Ok(frames(error_status(c.dialect, &e), vec![])),
        };
        if let Err((code, msg)) = c.allow(&[Action::Subscribe(&topic), Action::Group(&group)]) {
            return Ok(frames(status(c.dialect, code, msg), vec![]));
        }
        let ns = c.namespace_of(topic_res.as_ref());
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
            Err(e) => {
                return Ok(frames(
                    error_status(c.dialect, &BrokerError::IllegalFilter(e)),
                    vec![],
                ));
            }
        };
        let invisible = if r.auto_renew {
            self.cfg.auto_renew_invisible
        } else {
            match r.invisible_duration.as_ref().and_then(dur) {
                Some(d) => d,
                None => {
                    return Ok(frames(
                        status(
                            c.dialect,
                            Code::IllegalInvisibleTime,
                            "invisible_duration is required unless auto_renew is set",
                        ),
                        vec![],
                    ));
                }
            }
        };
        let requested = r
            .long_polling_timeout
            .as_ref()
            .and_then(dur)
            .unwrap_or(self.cfg.max_long_poll);
        let mut poll = requested.min(self.cfg.max_long_poll);
        if let Some(t) = c.timeout {
            // Answer before the client's deadline, with room for the response to travel.
            let reserve = (t / 10).max(Duration::from_millis(300));
            poll = poll.min(t.saturating_sub(reserve));
        }
        let batch = r.batch_size.clamp(1, 1024) as u32;
        let res = self
            .m
            .receive(ReceiveRequest {
                group: group.clone(),
                topic: topic.clone(),
                filter,
                max_messages: batch,
                invisible,
                long_poll: poll,
            })
            .await;
        match res {
            Ok(ds) if ds.is_empty() => Ok(frames(
                status(c.dialect, Code::MessageNotFound, "no new message"),
                vec![],
            )),
            Ok(ds) => {
                let host = c.local.map(|a| a.to_string()).unwrap_or_default();
                if r.auto_renew {
                    let next = Instant::now() + self.cfg.auto_renew_invisible / 3;
                    for d in &ds {
                        self.clients.add_renewal(
                            &client,
                            d.receipt_handle.clone(),
                            Renewal {
                                group: group.clone(),
                                topic: topic.clone(),
                                next,
                            },
                        );
                    }
                }
                let msgs = ds
                    .iter()
                    .map(|d| delivery_to_pb(d, &host, invisible, ns))
                    .collect();
                Ok(frames(ok(), msgs))
            }
            Err(e) => Ok(frames(error_status(c.dialect, &e), vec![])),
        }
    }

    async fn ack_message(
        &self,
        req: Request<v2::AckMessageRequest>,
    ) -> Result<Response<v2::AckMessageResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let id = require_client!(c, v2::AckMessageResponse::default());
        let r = req.into_inner();
        let group = resolve!(c, &r.group, v2::AckMessageResponse::default());
        let topic = resolve!(c, &r.topic, v2::AckMessageResponse::default());
        authorize!(
            c,
            v2::AckMessageResponse::default(),
            Action::Subscribe(&topic),
            Action::Group(&group)
        );
        let handles: Vec<String> = r.entries.iter().map(|e| e.receipt_handle.clone()).collect();
        for h in &handles {
            self.clients.remove_renewal(&id, h);
        }
        let results = self.m.ack_many(&group, &topic, &handles).await;
        let entries: Vec<v2::AckMessageResultEntry> = r
            .entries
            .into_iter()
            .zip(results)
            .map(|(e, res)| v2::AckMessageResultEntry {
                message_id: e.message_id,
                receipt_handle: e.receipt_handle,
                status: Some(match res {
                    Ok(()) => ok(),
                    Err(err) => error_status(c.dialect, &err),
                }),
            })
            .collect();
        let st = if entries.is_empty() {
            status(c.dialect, Code::BadRequest, "no entries")
        } else {
            combined(entries.iter().filter_map(|e| e.status.as_ref()))
        };
        Ok(Response::new(v2::AckMessageResponse {
            status: Some(st),
            entries,
        }))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        req: Request<v2::ForwardMessageToDeadLetterQueueRequest>,
    ) -> Result<Response<v2::ForwardMessageToDeadLetterQueueResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let id = require_client!(c, v2::ForwardMessageToDeadLetterQueueResponse::default());
        let r = req.into_inner();
        let resp = v2::ForwardMessageToDeadLetterQueueResponse::default;
        let group = resolve!(c, &r.group, resp());
        let topic = resolve!(c, &r.topic, resp());
        authorize!(c, resp(), Action::Subscribe(&topic), Action::Group(&group));
        self.clients.remove_renewal(&id, &r.receipt_handle);
        let st = match self
            .m
            .forward_to_dead_letter(&group, &topic, &r.receipt_handle)
            .await
        {
            Ok(()) => ok(),
            Err(e) => error_status(c.dialect, &e),
        };
        Ok(Response::new(v2::ForwardMessageToDeadLetterQueueResponse {
            status: Some(st),
        }))
    }

    type PullMessageStream = BoxStream<v2::PullMessageResponse>;

    async fn pull_message(
        &self,
        req: Request<v2::PullMessageRequest>,
    ) -> Result<Response<Self::PullMessageStream>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let frames = self.pull_impl(&c, req.into_inner()).await;
        Ok(Response::new(Box::pin(tokio_stream::iter(
            frames.into_iter().map(Ok),
        ))))
    }

    async fn update_offset(
        &self,
        req: Request<v2::UpdateOffsetRequest>,
    ) -> Result<Response<v2::UpdateOffsetResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let _id = require_client!(c, v2::UpdateOffsetResponse::default());
        Ok(Response::new(
            self.update_offset_impl(&c, req.into_inner()).await,
        ))
    }

    async fn get_offset(
        &self,
        req: Request<v2::GetOffsetRequest>,
    ) -> Result<Response<v2::GetOffsetResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let _id = require_client!(c, v2::GetOffsetResponse::default());
        Ok(Response::new(self.get_offset_impl(&c, req.into_inner())))
    }

    async fn query_offset(
        &self,
        req: Request<v2::QueryOffsetRequest>,
    ) -> Result<Response<v2::QueryOffsetResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let _id = require_client!(c, v2::QueryOffsetResponse::default());
        Ok(Response::new(self.query_offset_impl(&c, req.into_inner())))
    }

    async fn end_transaction(
        &self,
        req: Request<v2::EndTransactionRequest>,
    ) -> Result<Response<v2::EndTransactionResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let _id = require_client!(c, v2::EndTransactionResponse::default());
        Ok(Response::new(
            self.end_transaction_impl(&c, req.into_inner()).await,
        ))
    }

    type TelemetryStream = BoxStream<v2::TelemetryCommand>;

    async fn telemetry(
        &self,
        req: Request<Streaming<v2::TelemetryCommand>>,
    ) -> Result<Response<Self::TelemetryStream>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        if let Err((_, msg)) = c.allow(&[]) {
            return Err(Status::unauthenticated(msg));
        }
        let client = c.client_id.clone().unwrap_or_default();
        // Room for a full run of transaction checks (sluice_broker::MAX_CHECKS_PER_RUN)
        // plus settings replies: a check that does not fit is dropped, not waited for.
        let (tx, rx) = mpsc::channel(TELEMETRY_QUEUE);
        let sid = self.clients.set_telemetry(&client, tx.clone());
        let mut inbound = req.into_inner();
        let clients = self.clients.clone();
        let this = Service {
            m: self.m.clone(),
            cfg: self.cfg.clone(),
            clients: self.clients.clone(),
        };
        tokio::spawn(async move {
            while let Ok(Some(cmd)) = inbound.message().await {
                if let Some(telemetry_command::Command::Settings(s)) = cmd.command {
                    clients.set_settings(&client, s.clone(), &c.namespace);
                    let reply = v2::TelemetryCommand {
                        status: Some(ok()),
                        command: Some(telemetry_command::Command::Settings(
                            this.merged_settings(s, &c.namespace),
                        )),
                    };
                    if tx.send(Ok(reply)).await.is_err() {
                        break;
                    }
                } else {
                    clients.touch(&client);
                }
            }
            clients.drop_telemetry(&client, sid);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn notify_client_termination(
        &self,
        req: Request<v2::NotifyClientTerminationRequest>,
    ) -> Result<Response<v2::NotifyClientTerminationResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let id = require_client!(c, v2::NotifyClientTerminationResponse::default());
        authorize!(c, v2::NotifyClientTerminationResponse::default());
        self.clients.remove(&id);
        Ok(Response::new(v2::NotifyClientTerminationResponse {
            status: Some(ok()),
        }))
    }

    async fn change_invisible_duration(
        &self,
        req: Request<v2::ChangeInvisibleDurationRequest>,
    ) -> Result<Response<v2::ChangeInvisibleDurationResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let id = require_client!(c, v2::ChangeInvisibleDurationResponse::default());
        let r = req.into_inner();
        let group = resolve!(c, &r.group, v2::ChangeInvisibleDurationResponse::default());
        let topic = resolve!(c, &r.topic, v2::ChangeInvisibleDurationResponse::default());
        authorize!(
            c,
            v2::ChangeInvisibleDurationResponse::default(),
            Action::Subscribe(&topic),
            Action::Group(&group)
        );
        self.clients.remove_renewal(&id, &r.receipt_handle);
        let Some(d) = r.invisible_duration.as_ref().and_then(dur) else {
            return Ok(Response::new(v2::ChangeInvisibleDurationResponse {
                status: Some(status(
                    c.dialect,
                    Code::IllegalInvisibleTime,
                    "invisible_duration is required",
                )),
                receipt_handle: String::new(),
            }));
        };
        let resp = match self
            .m
            .change_invisible(&group, &topic, &r.receipt_handle, d)
            .await
        {
            Ok(h) => v2::ChangeInvisibleDurationResponse {
                status: Some(ok()),
                receipt_handle: h,
            },
            Err(e) => v2::ChangeInvisibleDurationResponse {
                status: Some(error_status(c.dialect, &e)),
                receipt_handle: String::new(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn recall_message(
        &self,
        req: Request<v2::RecallMessageRequest>,
    ) -> Result<Response<v2::RecallMessageResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        let r = req.into_inner();
        let topic = resolve!(c, &r.topic, v2::RecallMessageResponse::default());
        authorize!(
            c,
            v2::RecallMessageResponse::default(),
            Action::Publish(&topic)
        );
        let resp = match self.m.recall(&topic, &r.recall_handle).await {
            Ok(message_id) => v2::RecallMessageResponse {
                status: Some(ok()),
                message_id,
            },
            Err(e) => v2::RecallMessageResponse {
                status: Some(error_status(c.dialect, &e)),
                message_id: String::new(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn sync_lite_subscription(
        &self,
        req: Request<v2::SyncLiteSubscriptionRequest>,
    ) -> Result<Response<v2::SyncLiteSubscriptionResponse>, Status> {
        let c = ctx(&req, self.cfg.acl.as_deref());
        Ok(Response::new(v2::SyncLiteSubscriptionResponse {
            status: Some(status(
                c.dialect,
                Code::NotImplemented,
                "lite topics are not supported",
            )),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(
            parse_grpc_timeout("2999m"),
            Some(Duration::from_millis(2999))
        );
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout("12X"), None);
        assert_eq!(parse_grpc_timeout("1234567890S"), None);
    }
}
