//! What every client type shares: the channel and request headers, the Telemetry session
//! (settings handshake, server commands), heartbeats, the route cache and termination.
//!
//! Each client owns one [`Core`] with one HTTP/2 channel to the access point. Every RPC,
//! including those for queues whose route names other broker endpoints, goes to the access
//! point: that is how Sluice and the RocketMQ proxy are deployed (the proxy routes to its
//! brokers itself). Background tasks (telemetry, heartbeat, route refresh) stop when the
//! client is shut down or dropped.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use sluice_proto::v2::{self, settings, telemetry_command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};

use crate::config::{ClientConfig, RetryPolicy, from_pb_duration, to_pb_duration};
use crate::error::{ClientError, check};
use crate::ids;
use crate::message::{ReceivedMessage, resource};

/// Value of `x-mq-language`. `RUST` is a language every RocketMQ proxy knows.
const LANGUAGE: &str = "RUST";
const CLIENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Extra time granted on top of a deadline before the client gives up locally.
const DEADLINE_MARGIN: Duration = Duration::from_millis(500);
/// Longest wait before the Telemetry stream is opened again after it failed.
const TELEMETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// `d` spread over ±25%, so clients cut off together do not reconnect in step.
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    // A fraction in [0.75, 1.25) from the clock's nanoseconds.
    d.mul_f64(0.75 + f64::from(nanos % 1000) / 2000.0)
}

/// Settings are announced again this often on a live Telemetry stream.
const SETTINGS_RESYNC: Duration = Duration::from_secs(300);

/// How a producer resolves a transaction when the server asks (orphaned half message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionResolution {
    Commit,
    Rollback,
    /// Not decided yet: the server asks again later.
    Unknown,
}

/// A transaction checker: called with the half message when the server asks.
pub type TransactionChecker = dyn Fn(&ReceivedMessage) -> TransactionResolution + Send + Sync;

/// What the server decided in its Settings reply, in the form the clients use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerSettings {
    /// Producers: send retries. Consumers: the group's redelivery policy.
    pub retry_policy: Option<RetryPolicy>,
    pub max_body_size: Option<usize>,
    pub validate_message_type: bool,
    /// Consumers: whether the group delivers message groups in order.
    pub fifo: Option<bool>,
    pub receive_batch_size: Option<u32>,
    pub long_polling_timeout: Option<Duration>,
}

impl ServerSettings {
    fn from_pb(s: &v2::Settings) -> Self {
        let mut out = ServerSettings {
            retry_policy: s.backoff_policy.as_ref().and_then(RetryPolicy::from_pb),
            ..Default::default()
        };
        match &s.pub_sub {
            Some(settings::PubSub::Publishing(p)) => {
                out.max_body_size = usize::try_from(p.max_body_size).ok().filter(|n| *n > 0);
                out.validate_message_type = p.validate_message_type;
            }
            Some(settings::PubSub::Subscription(sub)) => {
                out.fifo = sub.fifo;
                out.receive_batch_size = sub
                    .receive_batch_size
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|n| *n > 0);
                out.long_polling_timeout = sub
                    .long_polling_timeout
                    .as_ref()
                    .and_then(from_pb_duration)
                    .filter(|d| !d.is_zero());
            }
            None => {}
        }
        out
    }
}

/// Queues of a topic as the server routes them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Route {
    /// Writable queues of leader brokers, in the server's order.
    pub writable: Vec<v2::MessageQueue>,
    /// Readable queues of leader brokers, in the server's order.
    pub readable: Vec<v2::MessageQueue>,
}

impl Route {
    fn new(queues: Vec<v2::MessageQueue>) -> Self {
        use v2::Permission as P;
        let leader = |q: &v2::MessageQueue| q.broker.as_ref().is_none_or(|b| b.id == 0);
        let writable = queues
            .iter()
            .filter(|q| leader(q))
            .filter(|q| q.permission == P::Write as i32 || q.permission == P::ReadWrite as i32)
            .cloned()
            .collect();
        let readable = queues
            .iter()
            .filter(|q| leader(q))
            .filter(|q| q.permission == P::Read as i32 || q.permission == P::ReadWrite as i32)
            .cloned()
            .collect();
        Route { writable, readable }
    }
}

/// Locks a mutex, ignoring poisoning (the data stays consistent: every critical section
/// here is a plain read or write).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Parses `host:port[;host:port…]` (also `,`-separated) into channel URIs and the
/// protocol's access point.
fn parse_endpoints(s: &str) -> Result<(Vec<String>, v2::Endpoints), ClientError> {
    let bad = |reason: &str| ClientError::Connect {
        endpoint: s.to_owned(),
        reason: reason.to_owned(),
    };
    let mut uris = Vec::new();
    let mut addresses = Vec::new();
    let mut scheme = v2::AddressScheme::Unspecified;
    for part in s.split([';', ',']).map(str::trim).filter(|p| !p.is_empty()) {
        let hostport = match part.split_once("://") {
            Some(("http", rest)) => rest.trim_end_matches('/'),
            Some((other, _)) => {
                return Err(bad(&format!(
                    "scheme {other}:// is not supported (plaintext only)"
                )));
            }
            None => part,
        };
        let (host, port) = hostport
            .rsplit_once(':')
            .ok_or_else(|| bad("expected host:port"))?;
        let port: u16 = port.parse().map_err(|_| bad("the port is not a number"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.is_empty() {
            return Err(bad("the host is empty"));
        }
        let this = match bare.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => v2::AddressScheme::IPv4,
            Ok(std::net::IpAddr::V6(_)) => v2::AddressScheme::IPv6,
            Err(_) => v2::AddressScheme::DomainName,
        };
        if scheme == v2::AddressScheme::Unspecified {
            scheme = this;
        }
        uris.push(if this == v2::AddressScheme::IPv6 {
            format!("http://[{bare}]:{port}")
        } else {
            format!("http://{bare}:{port}")
        });
        addresses.push(v2::Address {
            host: bare.to_owned(),
            port: i32::from(port),
        });
    }
    if uris.is_empty() {
        return Err(bad("no endpoint given"));
    }
    Ok((
        uris,
        v2::Endpoints {
            scheme: scheme as i32,
            addresses,
        },
    ))
}

fn channel(config: &ClientConfig, uris: &[String]) -> Result<Channel, ClientError> {
    let mut endpoints = Vec::new();
    for uri in uris {
        let e = Endpoint::from_shared(uri.clone())
            .map_err(|e| ClientError::Connect {
                endpoint: uri.clone(),
                reason: e.to_string(),
            })?
            .tcp_nodelay(true)
            .connect_timeout(config.request_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        endpoints.push(e);
    }
    Ok(match endpoints.len() {
        1 => endpoints.remove(0).connect_lazy(),
        _ => Channel::balance_list(endpoints.into_iter()),
    })
}

pub(crate) struct Core {
    pub config: ClientConfig,
    pub client_id: String,
    client_id_header: AsciiMetadataValue,
    namespace_header: Option<AsciiMetadataValue>,
    pub client_type: v2::ClientType,
    /// Consumer group, for consumers.
    pub group: Option<String>,
    rpc: MessagingServiceClient<Channel>,
    pub access_point: v2::Endpoints,
    /// The settings this client announces.
    local_settings: Mutex<v2::Settings>,
    server_settings: watch::Sender<Option<Arc<ServerSettings>>>,
    routes: Mutex<HashMap<String, Arc<Route>>>,
    telemetry_tx: Mutex<Option<mpsc::Sender<v2::TelemetryCommand>>>,
    checker: Option<Arc<TransactionChecker>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Core {
    /// Sets up a client (no I/O yet: the channel connects on first use).
    pub fn new(
        config: ClientConfig,
        client_type: v2::ClientType,
        group: Option<String>,
        pub_sub: Option<settings::PubSub>,
        backoff_policy: Option<v2::RetryPolicy>,
        checker: Option<Arc<TransactionChecker>>,
    ) -> Result<Arc<Self>, ClientError> {
        let (uris, access_point) = parse_endpoints(&config.endpoints)?;
        let rpc = MessagingServiceClient::new(channel(&config, &uris)?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let client_id = ids::next_client_id();
        let client_id_header = header_value(&client_id)?;
        let namespace_header = if config.namespace.is_empty() {
            None
        } else {
            Some(header_value(&config.namespace)?)
        };
        let local_settings = v2::Settings {
            client_type: Some(client_type as i32),
            access_point: Some(access_point.clone()),
            backoff_policy,
            request_timeout: Some(to_pb_duration(config.request_timeout)),
            pub_sub,
            user_agent: Some(v2::Ua {
                language: v2::Language::Rust as i32,
                version: CLIENT_VERSION.to_owned(),
                platform: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
                hostname: ids::hostname(),
            }),
            ..Default::default()
        };
        Ok(Arc::new(Core {
            config,
            client_id,
            client_id_header,
            namespace_header,
            client_type,
            group,
            rpc,
            access_point,
            local_settings: Mutex::new(local_settings),
            server_settings: watch::channel(None).0,
            routes: Mutex::new(HashMap::new()),
            telemetry_tx: Mutex::new(None),
            checker,
            stop: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        }))
    }

    /// Starts the background tasks: Telemetry session, heartbeats, route refresh.
    pub fn start(self: &Arc<Self>) {
        let mut tasks = lock(&self.tasks);
        tasks.push(tokio::spawn(self.clone().telemetry_loop()));
        tasks.push(tokio::spawn(self.clone().heartbeat_loop()));
        tasks.push(tokio::spawn(self.clone().route_refresh_loop()));
    }

    pub fn namespace(&self) -> &str {
        &self.config.namespace
    }

    pub fn resource(&self, name: &str) -> v2::Resource {
        resource(&self.config.namespace, name)
    }

    pub fn group_resource(&self) -> Option<v2::Resource> {
        self.group.as_deref().map(|g| self.resource(g))
    }

    /// A clone of the RPC stub (cheap: it shares the channel).
    pub fn rpc(&self) -> MessagingServiceClient<Channel> {
        self.rpc.clone()
    }

    pub fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves when the client is being shut down.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stop.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// What the server answered in its last Settings reply, if any yet.
    pub fn server_settings(&self) -> Option<Arc<ServerSettings>> {
        self.server_settings.borrow().clone()
    }

    /// Waits up to `timeout` for the server's Settings reply.
    pub async fn wait_for_settings(&self, timeout: Duration) -> Option<Arc<ServerSettings>> {
        let mut rx = self.server_settings.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| s.is_some())).await;
        self.server_settings()
    }

    /// Builds a request with the headers the official clients send.
    pub fn request<T>(&self, msg: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some(t) = timeout {
            r.set_timeout(t);
        }
        self.add_headers(r.metadata_mut());
        r
    }

    fn add_headers(&self, md: &mut MetadataMap) {
        md.insert("x-mq-client-id", self.client_id_header.clone());
        md.insert("x-mq-language", AsciiMetadataValue::from_static(LANGUAGE));
        md.insert("x-mq-protocol", AsciiMetadataValue::from_static("v2"));
        md.insert(
            "x-mq-client-version",
            AsciiMetadataValue::from_static(CLIENT_VERSION),
        );
        let now = jiff::Timestamp::now()
            .strftime("%Y%m%dT%H%M%SZ")
            .to_string();
        if let Some(c) = &self.config.credentials {
            let h = sluice_proto::auth::authorization(&c.access_key, &c.secret_key, &now);
            if let Ok(v) = AsciiMetadataValue::try_from(h) {
                md.insert("authorization", v);
            }
        }
        if let Ok(v) = AsciiMetadataValue::try_from(now) {
            md.insert("x-mq-date-time", v);
        }
        if let Ok(v) = AsciiMetadataValue::try_from(ids::random_uuid()) {
            md.insert("x-mq-request-id", v);
        }
        if let Some(ns) = &self.namespace_header {
            md.insert("x-mq-namespace", ns.clone());
        }
    }

    /// Runs one unary call with a local deadline slightly past the gRPC one.
    pub async fn unary<R>(
        &self,
        timeout: Duration,
        call: impl Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    ) -> Result<R, ClientError> {
        match tokio::time::timeout(timeout + DEADLINE_MARGIN, call).await {
            Err(_) => Err(ClientError::Timeout(timeout)),
            Ok(Err(s)) => Err(ClientError::from(s)),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    // ------------------------------------------------------------------ routes

    /// The route of `topic`, from the cache or the server.
    pub async fn route(&self, topic: &str) -> Result<Arc<Route>, ClientError> {
        if let Some(r) = lock(&self.routes).get(topic) {
            return Ok(r.clone());
        }
        self.refresh_route(topic).await
    }

    /// Asks the server for the route of `topic` and caches it.
    pub async fn refresh_route(&self, topic: &str) -> Result<Arc<Route>, ClientError> {
        let t = self.config.request_timeout;
        let req = self.request(
            v2::QueryRouteRequest {
                topic: Some(self.resource(topic)),
                endpoints: Some(self.access_point.clone()),
            },
            Some(t),
        );
        let resp = self.unary(t, self.rpc().query_route(req)).await?;
        check(resp.status.as_ref())?;
        let route = Arc::new(Route::new(resp.message_queues));
        lock(&self.routes).insert(topic.to_owned(), route.clone());
        Ok(route)
    }

    /// The queues assigned to this push consumer for `topic`.
    pub async fn query_assignment(
        &self,
        topic: &str,
    ) -> Result<Vec<v2::MessageQueue>, ClientError> {
        let t = self.config.request_timeout;
        let req = self.request(
            v2::QueryAssignmentRequest {
                topic: Some(self.resource(topic)),
                group: self.group_resource(),
                endpoints: Some(self.access_point.clone()),
            },
            Some(t),
        );
        let resp = self.unary(t, self.rpc().query_assignment(req)).await?;
        check(resp.status.as_ref())?;
        Ok(resp
            .assignments
            .into_iter()
            .filter_map(|a| a.message_queue)
            .collect())
    }

    async fn route_refresh_loop(self: Arc<Self>) {
        let stopped = self.stopped();
        tokio::pin!(stopped);
        let mut tick = tokio::time::interval(self.config.route_refresh_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tick.tick() => {}
            }
            let topics: Vec<String> = lock(&self.routes).keys().cloned().collect();
            for topic in topics {
                if let Err(e) = self.refresh_route(&topic).await {
                    tracing::debug!(%topic, error = %e, "route refresh failed; keeping the old route");
                }
            }
        }
    }

    // --------------------------------------------------------------- heartbeat

    async fn heartbeat_loop(self: Arc<Self>) {
        let stopped = self.stopped();
        tokio::pin!(stopped);
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tick.tick() => {}
            }
            let t = self.config.request_timeout;
            let req = self.request(
                v2::HeartbeatRequest {
                    group: self.group_resource(),
                    client_type: self.client_type as i32,
                },
                Some(t),
            );
            match self.unary(t, self.rpc().heartbeat(req)).await {
                Ok(r) => {
                    if let Err(e) = check(r.status.as_ref()) {
                        tracing::debug!(error = %e, "heartbeat refused");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "heartbeat failed"),
            }
        }
    }

    // --------------------------------------------------------------- telemetry

    fn settings_command(&self) -> v2::TelemetryCommand {
        v2::TelemetryCommand {
            status: None,
            command: Some(telemetry_command::Command::Settings(
                lock(&self.local_settings).clone(),
            )),
        }
    }

    /// Adds a topic to a producer's announced settings (and announces them again when it
    /// is new).
    pub fn add_publishing_topic(&self, topic: &str) {
        let changed = {
            let mut s = lock(&self.local_settings);
            match &mut s.pub_sub {
                Some(settings::PubSub::Publishing(p)) => {
                    if p.topics.iter().any(|t| t.name == topic) {
                        false
                    } else {
                        p.topics.push(resource(&self.config.namespace, topic));
                        true
                    }
                }
                _ => false,
            }
        };
        if changed {
            self.send_telemetry(self.settings_command());
        }
    }

    /// Replaces a consumer's announced subscriptions (and announces them again).
    pub fn set_subscriptions(&self, entries: Vec<v2::SubscriptionEntry>) {
        {
            let mut s = lock(&self.local_settings);
            if let Some(settings::PubSub::Subscription(sub)) = &mut s.pub_sub {
                sub.subscriptions = entries;
            }
        }
        self.send_telemetry(self.settings_command());
    }

    fn send_telemetry(&self, cmd: v2::TelemetryCommand) {
        if let Some(tx) = lock(&self.telemetry_tx).as_ref() {
            if tx.try_send(cmd).is_err() {
                tracing::debug!("telemetry stream busy or closed; command dropped");
            }
        }
    }

    async fn telemetry_loop(self: Arc<Self>) {
        let stopped = self.stopped();
        tokio::pin!(stopped);
        let mut backoff = Duration::from_millis(200);
        loop {
            if self.is_stopped() {
                return;
            }
            let (tx, rx) = mpsc::channel(64);
            // The settings go first: the server answers them on the same stream.
            let _ = tx.try_send(self.settings_command());
            *lock(&self.telemetry_tx) = Some(tx.clone());
            let req = self.request(tokio_stream::wrappers::ReceiverStream::new(rx), None);
            let mut rpc = self.rpc();
            let opened = tokio::select! {
                _ = &mut stopped => return,
                r = rpc.telemetry(req) => r,
            };
            match opened {
                Ok(resp) => {
                    let mut inbound = resp.into_inner();
                    let mut resync = tokio::time::interval(SETTINGS_RESYNC);
                    resync.tick().await;
                    loop {
                        tokio::select! {
                            _ = &mut stopped => return,
                            _ = resync.tick() => {
                                let _ = tx.try_send(self.settings_command());
                            }
                            msg = inbound.message() => match msg {
                                Ok(Some(cmd)) => {
                                    backoff = Duration::from_millis(200);
                                    self.on_command(cmd);
                                }
                                Ok(None) => {
                                    tracing::debug!("telemetry stream ended by the server");
                                    break;
                                }
                                Err(e) => {
                                    tracing::debug!(error = %e, "telemetry stream failed");
                                    break;
                                }
                            }
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot open the telemetry stream"),
            }
            *lock(&self.telemetry_tx) = None;
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(jittered(backoff)) => {}
            }
            // Capped low: while the stream is down the server cannot send transaction
            // checks or settings to this client.
            backoff = (backoff * 2).min(TELEMETRY_BACKOFF_MAX);
        }
    }

    fn on_command(self: &Arc<Self>, cmd: v2::TelemetryCommand) {
        use telemetry_command::Command;
        match cmd.command {
            Some(Command::Settings(s)) => {
                // A reply without a status still carries the settings.
                if let Some(st) = cmd
                    .status
                    .as_ref()
                    .filter(|s| s.code != v2::Code::Ok as i32)
                {
                    let e = ClientError::from_status(st);
                    tracing::warn!(error = %e, "the server refused this client's settings");
                    return;
                }
                let parsed = ServerSettings::from_pb(&s);
                tracing::debug!(settings = ?parsed, "settings from the server");
                self.server_settings.send_replace(Some(Arc::new(parsed)));
            }
            Some(Command::RecoverOrphanedTransactionCommand(c)) => {
                let this = self.clone();
                tokio::spawn(async move { this.check_transaction(c).await });
            }
            Some(Command::PrintThreadStackTraceCommand(c)) => {
                self.send_telemetry(v2::TelemetryCommand {
                    status: Some(sluice_proto::status_ok()),
                    command: Some(Command::ThreadStackTrace(v2::ThreadStackTrace {
                        nonce: c.nonce,
                        thread_stack_trace: Some("(not available from a Rust client)".into()),
                    })),
                });
            }
            Some(Command::VerifyMessageCommand(c)) => {
                self.send_telemetry(v2::TelemetryCommand {
                    status: Some(sluice_proto::status(
                        v2::Code::NotImplemented,
                        "message verification is not supported by sluice-client",
                    )),
                    command: Some(Command::VerifyMessageResult(v2::VerifyMessageResult {
                        nonce: c.nonce,
                    })),
                });
            }
            Some(other) => tracing::debug!(command = ?other, "telemetry command ignored"),
            None => {}
        }
    }

    /// Answers a transaction check with the checker's verdict.
    async fn check_transaction(self: Arc<Self>, c: v2::RecoverOrphanedTransactionCommand) {
        let Some(checker) = self.checker.clone() else {
            tracing::debug!("transaction check received but no checker is set");
            return;
        };
        let Some(message) = c.message else {
            return;
        };
        let view = ReceivedMessage::from_pb(message);
        let (topic, message_id) = (view.topic.clone(), view.message_id.clone());
        let verdict = match tokio::task::spawn_blocking(move || checker(&view)).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "the transaction checker panicked");
                return;
            }
        };
        if verdict == TransactionResolution::Unknown {
            return;
        }
        if let Err(e) = self
            .end_transaction(
                &topic,
                &message_id,
                &c.transaction_id,
                verdict,
                v2::TransactionSource::SourceServerCheck,
            )
            .await
        {
            tracing::warn!(%topic, %message_id, error = %e, "answering a transaction check failed");
        }
    }

    /// Commits or rolls back a half message.
    pub async fn end_transaction(
        &self,
        topic: &str,
        message_id: &str,
        transaction_id: &str,
        resolution: TransactionResolution,
        source: v2::TransactionSource,
    ) -> Result<(), ClientError> {
        let resolution = match resolution {
            TransactionResolution::Commit => v2::TransactionResolution::Commit,
            TransactionResolution::Rollback => v2::TransactionResolution::Rollback,
            TransactionResolution::Unknown => {
                return Err(ClientError::InvalidArgument(
                    "a transaction ends with commit or rollback".into(),
                ));
            }
        };
        let t = self.config.request_timeout;
        let req = self.request(
            v2::EndTransactionRequest {
                topic: Some(self.resource(topic)),
                message_id: message_id.to_owned(),
                transaction_id: transaction_id.to_owned(),
                resolution: resolution as i32,
                source: source as i32,
                trace_context: String::new(),
            },
            Some(t),
        );
        let resp = self.unary(t, self.rpc().end_transaction(req)).await?;
        check(resp.status.as_ref())
    }

    // ---------------------------------------------------------------- shutdown

    /// Stops the background tasks and tells the server this client is gone. Idempotent.
    pub async fn shutdown(&self) -> Result<(), ClientError> {
        if self.stop.send_replace(true) {
            return Ok(());
        }
        let t = self.config.request_timeout;
        let req = self.request(
            v2::NotifyClientTerminationRequest {
                group: self.group_resource(),
            },
            Some(t),
        );
        let result = self
            .unary(t, self.rpc().notify_client_termination(req))
            .await
            .and_then(|r| check(r.status.as_ref()));
        *lock(&self.telemetry_tx) = None;
        let tasks: Vec<JoinHandle<()>> = lock(&self.tasks).drain(..).collect();
        for task in tasks {
            task.abort();
        }
        result
    }

    /// Stops the background tasks without telling the server (used on drop).
    pub fn stop(&self) {
        self.stop.send_replace(true);
        *lock(&self.telemetry_tx) = None;
    }
}

fn header_value(s: &str) -> Result<AsciiMetadataValue, ClientError> {
    AsciiMetadataValue::try_from(s)
        .map_err(|_| ClientError::InvalidArgument(format!("{s:?} cannot be sent as a gRPC header")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..1000 {
            let j = jittered(Duration::from_millis(800));
            assert!(
                j >= Duration::from_millis(600) && j < Duration::from_millis(1000),
                "{j:?}"
            );
        }
    }

    #[test]
    fn endpoint_parsing() {
        let (uris, ep) = parse_endpoints("127.0.0.1:8081").expect("parse");
        assert_eq!(uris, vec!["http://127.0.0.1:8081"]);
        assert_eq!(ep.scheme, v2::AddressScheme::IPv4 as i32);
        assert_eq!(ep.addresses[0].port, 8081);

        let (uris, ep) = parse_endpoints("mq.example:1;mq2.example:2").expect("parse");
        assert_eq!(uris.len(), 2);
        assert_eq!(ep.scheme, v2::AddressScheme::DomainName as i32);
        assert_eq!(ep.addresses[1].host, "mq2.example");

        let (uris, ep) = parse_endpoints("[::1]:8081").expect("parse");
        assert_eq!(uris, vec!["http://[::1]:8081"]);
        assert_eq!(ep.scheme, v2::AddressScheme::IPv6 as i32);
        assert_eq!(ep.addresses[0].host, "::1");

        assert!(parse_endpoints("http://h:1").is_ok());
        for bad in ["", "h", "h:x", ":1", "https://h:1", "h:99999"] {
            assert!(parse_endpoints(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routes_keep_leader_queues_by_permission() {
        let q = |id, perm: v2::Permission, broker_id| v2::MessageQueue {
            id,
            permission: perm as i32,
            broker: Some(v2::Broker {
                id: broker_id,
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = Route::new(vec![
            q(0, v2::Permission::ReadWrite, 0),
            q(1, v2::Permission::Read, 0),
            q(2, v2::Permission::Write, 0),
            q(3, v2::Permission::ReadWrite, 1),
            q(4, v2::Permission::None, 0),
        ]);
        let ids = |v: &[v2::MessageQueue]| v.iter().map(|q| q.id).collect::<Vec<_>>();
        assert_eq!(ids(&r.writable), vec![0, 2]);
        assert_eq!(ids(&r.readable), vec![0, 1]);
    }

    #[test]
    fn server_settings_are_read() {
        let s = v2::Settings {
            backoff_policy: Some(RetryPolicy::default().to_pb()),
            pub_sub: Some(settings::PubSub::Subscription(v2::Subscription {
                fifo: Some(true),
                receive_batch_size: Some(16),
                long_polling_timeout: Some(to_pb_duration(Duration::from_secs(20))),
                ..Default::default()
            })),
            ..Default::default()
        };
        let p = ServerSettings::from_pb(&s);
        assert_eq!(p.fifo, Some(true));
        assert_eq!(p.receive_batch_size, Some(16));
        assert_eq!(p.long_polling_timeout, Some(Duration::from_secs(20)));
        assert_eq!(p.retry_policy, Some(RetryPolicy::default()));
    }
}
