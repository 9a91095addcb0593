//! Shared setup for the gRPC tests: a broker over a store in a temporary directory,
//! served on 127.0.0.1, and a client for it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use sluice_broker::{Broker, BrokerConfig};
use sluice_common::Clock;
use sluice_proto::v2;
use sluice_proto::v2::messaging_service_client::MessagingServiceClient;
use sluice_proxy::ProxyConfig;
use sluice_store::{Store, StoreConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// A broker served over gRPC. Dropping it drops the stop sender, which also stops the
/// server.
#[allow(dead_code)]
pub struct Server {
    _dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub broker: Arc<Broker>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

#[allow(dead_code)]
impl Server {
    /// Tells the server to stop, without waiting for it.
    pub fn stop(self) {
        let _ = self.stop.send(());
    }

    /// Tells the server to stop and waits until it has.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Opens a small store and a broker in `dir`, both on `clock`.
pub fn open_broker(
    dir: &Path,
    config: BrokerConfig,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Arc<Broker>> {
    let store = Arc::new(Store::open_with(
        StoreConfig::small(dir),
        Arc::new(sluice_store::StdFs),
        clock.clone(),
    )?);
    Ok(Broker::open(config, store, clock)?)
}

/// Serves `broker` over gRPC on a free port of 127.0.0.1; `dir` lives as long as the
/// returned server.
#[allow(dead_code)]
pub async fn serve(dir: tempfile::TempDir, broker: Arc<Broker>) -> anyhow::Result<Server> {
    serve_with(dir, broker, ProxyConfig::default()).await
}

/// [`serve`] with settings of the access point.
pub async fn serve_with(
    dir: tempfile::TempDir,
    broker: Arc<Broker>,
    config: ProxyConfig,
) -> anyhow::Result<Server> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let b = broker.clone();
    let task = tokio::spawn(async move {
        let _ = sluice_proxy::run(listener, b, config, async {
            let _ = rx.await;
        })
        .await;
    });
    Ok(Server {
        _dir: dir,
        addr,
        broker,
        stop: tx,
        task,
    })
}

pub async fn client(addr: SocketAddr) -> anyhow::Result<MessagingServiceClient<Channel>> {
    Ok(MessagingServiceClient::connect(format!("http://{addr}")).await?)
}

/// A request carrying the client id header `id`.
pub fn with_id<T>(id: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("x-mq-client-id", id.parse().expect("header"));
    r
}

pub fn res(name: &str) -> Option<v2::Resource> {
    Some(v2::Resource {
        resource_namespace: String::new(),
        name: name.into(),
    })
}

/// A receive of up to 32 messages of `topic` as `group`, invisible for 30 s, with a short
/// long poll (200 ms).
#[allow(dead_code)]
pub fn receive_request(
    group: Option<v2::Resource>,
    topic: Option<v2::Resource>,
) -> v2::ReceiveMessageRequest {
    v2::ReceiveMessageRequest {
        group,
        message_queue: Some(v2::MessageQueue {
            topic,
            id: -1,
            ..Default::default()
        }),
        filter_expression: None,
        batch_size: 32,
        invisible_duration: Some(sluice_proto::prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
        auto_renew: false,
        long_polling_timeout: Some(sluice_proto::prost_types::Duration {
            seconds: 0,
            nanos: 200_000_000,
        }),
        attempt_id: None,
    }
}

/// Sends a receive and collects its status code and messages.
#[allow(dead_code)]
pub async fn receive_all(
    c: &mut MessagingServiceClient<Channel>,
    req: tonic::Request<v2::ReceiveMessageRequest>,
) -> anyhow::Result<(Option<v2::Code>, Vec<v2::Message>)> {
    use v2::receive_message_response::Content;
    let mut stream = c.receive_message(req).await?.into_inner();
    let (mut code, mut msgs) = (None, Vec::new());
    while let Some(f) = stream.message().await? {
        match f.content {
            Some(Content::Status(s)) => code = Some(s.code()),
            Some(Content::Message(m)) => msgs.push(m),
            _ => {}
        }
    }
    Ok((code, msgs))
}
