//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! Nothing here is fuzzed itself; these are small reference implementations and adapters
//! the targets use to state properties about the code under test.

pub mod layout;

use sluice_broker::filter::MessageView;

/// An in-memory message for evaluating filters.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub tag: Option<String>,
    pub props: Vec<(String, String)>,
}

impl View {
    pub fn with_tag(tag: &str) -> View {
        View {
            tag: Some(tag.to_owned()),
            props: Vec::new(),
        }
    }
}

impl MessageView for View {
    fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    fn property(&self, key: &str) -> Option<&str> {
        self.props
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Independent encoder of the commit-log record layout documented in
/// `sluice_store::record` (the store's own encoder is crate-private). Used to check that a
/// successfully decoded record carries every byte of the input: re-encoding the decoded
/// fields must give the input back.
#[allow(clippy::too_many_arguments)]
pub fn encode_record(
    flags: u32,
    queue_id: u32,
    queue_offset: u64,
    physical_offset: u64,
    born_ts: i64,
    store_ts: i64,
    topic: &str,
    props: &[(String, String)],
    body: &[u8],
) -> Vec<u8> {
    let props_len: usize = props.iter().map(|(k, v)| 4 + k.len() + v.len()).sum();
    let total = sluice_store::record::FIXED_OVERHEAD + topic.len() + props_len + body.len();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_le_bytes());
    out.extend_from_slice(&sluice_store::record::MAGIC.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&queue_id.to_le_bytes());
    out.extend_from_slice(&queue_offset.to_le_bytes());
    out.extend_from_slice(&physical_offset.to_le_bytes());
    out.extend_from_slice(&born_ts.to_le_bytes());
    out.extend_from_slice(&store_ts.to_le_bytes());
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&(props_len as u32).to_le_bytes());
    for (k, v) in props {
        out.extend_from_slice(&(k.len() as u16).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out[12..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

/// A fresh, not yet existing directory for one run of a target that builds files from its
/// input: under `/dev/shm` where it exists (fdatasync costs nothing there), else the system
/// temporary directory. Unique per process and call.
pub fn scratch_dir(prefix: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static RUN: AtomicU64 = AtomicU64::new(0);
    let shm = std::path::Path::new("/dev/shm");
    let root = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    // Targets that keep one server for the whole run cannot remove its directory (libFuzzer
    // ends the process with `exit`): the first call of a process removes those of
    // processes that are gone.
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("sluice-fuzz-")
                .and_then(|r| r.split('-').nth(1))
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let dir = root.join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Splits an input into the files of the start-up targets' archive format: repeated
/// `[which: u8][len: u32 LE][bytes]`, the length cut to what is left. Yields
/// `(which, bytes)`; a trailing piece shorter than a header is ignored.
pub fn archive_entries(data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.len() < 5 {
            return None;
        }
        let which = rest[0];
        let len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let len = len.min(rest.len() - 5);
        let bytes = &rest[5..5 + len];
        rest = &rest[5 + len..];
        Some((which, bytes))
    })
}

/// Writes `bytes` to `dir/rel`, creating the directories on the way; errors (a path that
/// an earlier entry made a file) are ignored, as the target only needs some directory.
pub fn put_file(dir: &std::path::Path, rel: &str, bytes: &[u8]) {
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::write(&path, bytes);
}

/// Makes a panic in any thread (a server task included) abort the process, so libFuzzer
/// reports it as a crash; tokio would otherwise catch it in the task.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        std::process::abort();
    }));
}

/// A broker over a small store (Async flush) in `dir`, for targets that keep one for the
/// whole run.
pub fn scratch_broker(dir: &std::path::Path) -> std::sync::Arc<sluice_broker::broker::Broker> {
    use std::sync::Arc;
    let mut cfg = sluice_store::StoreConfig::small(dir.join("store"));
    cfg.flush = sluice_store::FlushPolicy::Async {
        interval: std::time::Duration::from_millis(200),
        bytes: 1 << 20,
    };
    let store = Arc::new(sluice_store::Store::open(cfg).expect("store"));
    sluice_broker::broker::Broker::open(
        sluice_broker::broker::BrokerConfig::new(dir),
        store,
        Arc::new(sluice_common::clock::SystemClock),
    )
    .expect("broker")
}

/// Serves the gRPC API of `broker` on 127.0.0.1 (a free port) in `rt`, with long polls cut
/// to 200 ms, and returns its address and a client connected to it.
pub fn grpc_server(
    rt: &tokio::runtime::Runtime,
    broker: std::sync::Arc<sluice_broker::broker::Broker>,
) -> (
    std::net::SocketAddr,
    sluice_proto::v2::messaging_service_client::MessagingServiceClient<tonic::transport::Channel>,
) {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = sluice_proxy::ProxyConfig {
        max_long_poll: std::time::Duration::from_millis(200),
        ..sluice_proxy::ProxyConfig::default()
    };
    rt.spawn(sluice_proxy::run(
        listener,
        broker,
        config,
        std::future::pending::<()>(),
    ));
    let client = rt
        .block_on(async {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .connect()
                .await?;
            Ok::<_, tonic::transport::Error>(
                sluice_proto::v2::messaging_service_client::MessagingServiceClient::new(ch),
            )
        })
        .expect("connect");
    (addr, client)
}

/// For targets that run a server for the whole run: panics abort the process, and a
/// one-worker runtime with a scratch broker (directory named after `prefix`).
pub fn server_env(
    prefix: &str,
) -> (
    tokio::runtime::Runtime,
    std::sync::Arc<sluice_broker::broker::Broker>,
) {
    abort_on_panic();
    let dir = scratch_dir(prefix);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let broker = scratch_broker(&dir);
    (rt, broker)
}
