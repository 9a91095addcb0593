//! A TCP fault proxy: listens on a loopback port, forwards every accepted connection to an
//! upstream address, and injects network faults that the soak switches at run time through
//! a cheap [`FaultHandle`]:
//!
//! * [`NetFault::Latency`]: every forwarded chunk waits this long (both directions);
//! * [`NetFault::Drop`]: nothing is forwarded in either direction, the bytes read are
//!   discarded and the sockets stay open (a blackhole: both ends see a half-open connection);
//! * [`NetFault::DropResponse`]: client → server bytes are forwarded, server → client bytes
//!   are discarded (a request arrives and is executed, its answer is lost);
//! * [`FaultHandle::reset_all`]: every current connection is closed with a TCP RST
//!   (`SO_LINGER` 0 before the close).
//!
//! A connection that lost bytes can never carry its protocol again (the streams are out of
//! step), so [`FaultHandle::heal`] ends a fault by returning to plain forwarding and
//! resetting exactly those connections, the way a peer that comes back after a partition
//! answers stale segments with RST. Connections that lost nothing keep working.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The fault applied to traffic from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetFault {
    /// Plain forwarding.
    None,
    /// Added latency per forwarded chunk.
    Latency(Duration),
    /// Blackhole in both directions, sockets kept open.
    Drop,
    /// Requests pass, answers are discarded.
    DropResponse,
}

const MODE_NONE: u8 = 0;
const MODE_LATENCY: u8 = 1;
const MODE_DROP: u8 = 2;
const MODE_DROP_RESPONSE: u8 = 3;

struct Conn {
    /// Set to true to close the connection with RST.
    reset: watch::Sender<bool>,
    /// Bytes were discarded on this connection.
    poisoned: Arc<AtomicBool>,
}

#[derive(Default)]
struct Shared {
    mode: AtomicU8,
    latency_ms: AtomicU32,
    next_id: AtomicU64,
    accepted: AtomicU64,
    resets: AtomicU64,
    conns: Mutex<HashMap<u64, Conn>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Conn>> {
        // A panic while holding this lock leaves a plain map behind; keep using it.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Switches the proxy's faults; cheap to clone and to call from any task.
#[derive(Clone)]
pub struct FaultHandle {
    shared: Arc<Shared>,
}

impl FaultHandle {
    pub fn set(&self, fault: NetFault) {
        let (mode, ms) = match fault {
            NetFault::None => (MODE_NONE, 0),
            NetFault::Latency(d) => (
                MODE_LATENCY,
                u32::try_from(d.as_millis()).unwrap_or(u32::MAX),
            ),
            NetFault::Drop => (MODE_DROP, 0),
            NetFault::DropResponse => (MODE_DROP_RESPONSE, 0),
        };
        self.shared.latency_ms.store(ms, Ordering::Relaxed);
        self.shared.mode.store(mode, Ordering::Release);
    }

    /// Closes every current connection with RST; returns how many.
    pub fn reset_all(&self) -> usize {
        self.reset_where(|_| true)
    }

    /// Back to plain forwarding; connections that lost bytes are reset. Returns how many.
    pub fn heal(&self) -> usize {
        self.set(NetFault::None);
        self.reset_where(|c| c.poisoned.load(Ordering::Relaxed))
    }

    fn reset_where(&self, pick: impl Fn(&Conn) -> bool) -> usize {
        let mut conns = self.shared.conns();
        let ids: Vec<u64> = conns
            .iter()
            .filter(|(_, c)| pick(c))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            if let Some(c) = conns.remove(id) {
                let _ = c.reset.send(true);
            }
        }
        self.shared
            .resets
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        ids.len()
    }

    /// Connections currently open through the proxy.
    pub fn open_connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections reset since the start.
    pub fn resets(&self) -> u64 {
        self.shared.resets.load(Ordering::Relaxed)
    }
}

/// The running proxy; dropping it stops accepting (open connections end with their peers).
pub struct FaultProxy {
    addr: SocketAddr,
    handle: FaultHandle,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let handle = FaultHandle {
            shared: Arc::default(),
        };
        let shared = handle.shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    // Out of descriptors or similar: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(shared.clone(), client, upstream));
            }
        });
        Ok(FaultProxy {
            addr,
            handle,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn handle(&self) -> FaultHandle {
        self.handle.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve(shared: Arc<Shared>, client: TcpStream, upstream: SocketAddr) {
    let _ = client.set_nodelay(true);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = watch::channel(false);
    let poisoned = Arc::new(AtomicBool::new(false));
    shared.conns().insert(
        id,
        Conn {
            reset: tx,
            poisoned: poisoned.clone(),
        },
    );
    // Connect upstream unless the network is down; a blackholed connection attempt gets
    // an open socket that never answers, like a SYN that is accepted by a middlebox.
    let server = if shared.mode.load(Ordering::Acquire) == MODE_DROP {
        None
    } else {
        let mut reset = rx.clone();
        tokio::select! {
            r = TcpStream::connect(upstream) => r.ok(),
            _ = reset_signal(&mut reset) => None,
        }
    };
    let Some(server) = server else {
        // No upstream (refused or blackholed): hold the client until it goes or is reset.
        poisoned.store(true, Ordering::Relaxed);
        let (mut cr, cw) = client.into_split();
        let sink = Pump {
            shared: shared.clone(),
            poisoned: poisoned.clone(),
            response: false,
        };
        if shared.mode.load(Ordering::Acquire) == MODE_DROP {
            sink.discard(&mut cr, rx, cw).await;
        } else {
            // Upstream refused: close the client abruptly, as the server's host would.
            rst(cw);
        }
        shared.conns().remove(&id);
        return;
    };
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = Pump {
        shared: shared.clone(),
        poisoned: poisoned.clone(),
        response: false,
    };
    let down = Pump {
        shared: shared.clone(),
        poisoned,
        response: true,
    };
    tokio::join!(up.run(cr, sw, rx.clone()), down.run(sr, cw, rx));
    shared.conns().remove(&id);
}

/// Makes the socket's close send RST: `SO_LINGER` 0, and no FIN first (dropping a write
/// half would shut it down gracefully; `forget` leaves the close to the read half's drop).
fn rst(w: OwnedWriteHalf) {
    let _ = w.as_ref().set_zero_linger();
    w.forget();
}

/// Resolves when the connection is to be reset (or its registry entry is gone).
async fn reset_signal(rx: &mut watch::Receiver<bool>) {
    let ok = rx.wait_for(|r| *r).await.is_ok();
    if !ok {
        // The sender went away without a reset: never resolve.
        std::future::pending::<()>().await;
    }
}

/// One direction of a connection.
struct Pump {
    shared: Arc<Shared>,
    poisoned: Arc<AtomicBool>,
    /// Server → client.
    response: bool,
}

impl Pump {
    /// Forwards until EOF, an error or a reset. On reset the socket written to gets
    /// `SO_LINGER` 0 so its close sends RST (the other direction does the same to its own).
    async fn run(
        self,
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        mut reset: watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => {
                        let _ = to.shutdown().await;
                        return;
                    }
                    Ok(n) => n,
                },
                _ = reset_signal(&mut reset) => break,
            };
            match self.shared.mode.load(Ordering::Acquire) {
                MODE_DROP => {
                    self.poisoned.store(true, Ordering::Relaxed);
                    continue;
                }
                MODE_DROP_RESPONSE if self.response => {
                    self.poisoned.store(true, Ordering::Relaxed);
                    continue;
                }
                MODE_LATENCY => {
                    let ms = self.shared.latency_ms.load(Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(ms.into())) => {}
                        _ = reset_signal(&mut reset) => break,
                    }
                }
                _ => {}
            }
            let written = tokio::select! {
                r = to.write_all(&buf[..n]) => r.is_ok(),
                _ = reset_signal(&mut reset) => false,
            };
            if !written {
                break;
            }
        }
        // Reset (or a failed write): close abruptly.
        let _ = from.as_ref().set_zero_linger();
        rst(to);
    }

    /// Reads and discards until EOF or reset (a client whose connection went nowhere).
    async fn discard(
        self,
        from: &mut OwnedReadHalf,
        mut reset: watch::Receiver<bool>,
        to: OwnedWriteHalf,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                r = from.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => self.poisoned.store(true, Ordering::Relaxed),
                },
                _ = reset_signal(&mut reset) => break,
            }
        }
        rst(to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// An echo server that also reports every chunk it received.
    async fn echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let _ = tx.send(buf[..n].to_vec());
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, rx)
    }

    async fn echo_once(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("read");
        got
    }

    /// Nothing arrives within a short window (the connection neither answers nor closes).
    async fn silent(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        tokio::time::timeout(Duration::from_millis(300), s.read(&mut b))
            .await
            .is_err()
    }

    async fn wait_reset(s: &mut TcpStream) -> std::io::ErrorKind {
        let mut b = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Err(e)) => e.kind(),
            Ok(Ok(n)) => panic!("expected a reset, read {n} bytes"),
            Err(_) => panic!("expected a reset, connection stayed silent"),
        }
    }

    #[tokio::test]
    async fn forwards_and_adds_latency() {
        let (up, _rx) = echo_server().await;
        let p = FaultProxy::start(up).await.expect("proxy");
        let mut c = TcpStream::connect(p.addr()).await.expect("connect");
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(echo_once(&mut c, &big).await, big);
        p.handle().set(NetFault::Latency(Duration::from_millis(40)));
        let t = std::time::Instant::now();
        assert_eq!(echo_once(&mut c, b"slow").await, b"slow");
        // Each direction waited at least once.
        assert!(
            t.elapsed() >= Duration::from_millis(80),
            "{:?}",
            t.elapsed()
        );
        p.handle().set(NetFault::None);
        assert_eq!(echo_once(&mut c, b"fast").await, b"fast");
        assert_eq!(p.handle().accepted(), 1);
    }

    #[tokio::test]
    async fn drop_blackholes_both_ways_and_heal_resets_only_damaged_connections() {
        let (up, mut rx) = echo_server().await;
        let p = FaultProxy::start(up).await.expect("proxy");
        let h = p.handle();
        let mut damaged = TcpStream::connect(p.addr()).await.expect("connect");
        let mut idle = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(echo_once(&mut damaged, b"a").await, b"a");
        assert_eq!(echo_once(&mut idle, b"b").await, b"b");
        while rx.try_recv().is_ok() {}
        h.set(NetFault::Drop);
        damaged.write_all(b"lost").await.expect("write");
        assert!(silent(&mut damaged).await, "blackholed connection answered");
        assert!(
            rx.try_recv().is_err(),
            "server received bytes through a blackhole"
        );
        assert_eq!(h.open_connections(), 2, "sockets stay open");
        assert_eq!(h.heal(), 1);
        assert_eq!(
            wait_reset(&mut damaged).await,
            std::io::ErrorKind::ConnectionReset
        );
        // The connection that lost nothing keeps working; new ones work too.
        assert_eq!(echo_once(&mut idle, b"still").await, b"still");
        let mut fresh = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(echo_once(&mut fresh, b"new").await, b"new");
    }

    #[tokio::test]
    async fn reset_closes_every_connection_with_rst() {
        let (up, _rx) = echo_server().await;
        let p = FaultProxy::start(up).await.expect("proxy");
        let h = p.handle();
        let mut a = TcpStream::connect(p.addr()).await.expect("connect");
        let mut b = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(echo_once(&mut a, b"1").await, b"1");
        assert_eq!(echo_once(&mut b, b"2").await, b"2");
        assert_eq!(h.reset_all(), 2);
        assert_eq!(
            wait_reset(&mut a).await,
            std::io::ErrorKind::ConnectionReset
        );
        assert_eq!(
            wait_reset(&mut b).await,
            std::io::ErrorKind::ConnectionReset
        );
        assert_eq!(h.resets(), 2);
        let mut c = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(echo_once(&mut c, b"3").await, b"3");
    }

    #[tokio::test]
    async fn drop_response_delivers_the_request_and_loses_the_answer() {
        let (up, mut rx) = echo_server().await;
        let p = FaultProxy::start(up).await.expect("proxy");
        let h = p.handle();
        let mut c = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(echo_once(&mut c, b"x").await, b"x");
        while rx.try_recv().is_ok() {}
        h.set(NetFault::DropResponse);
        c.write_all(b"request").await.expect("write");
        let mut got = Vec::new();
        while got.len() < 7 {
            let chunk = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("server got the request in time")
                .expect("server alive");
            got.extend(chunk);
        }
        assert_eq!(got, b"request");
        assert!(silent(&mut c).await, "the answer must be lost");
        assert_eq!(h.heal(), 1);
        assert_eq!(
            wait_reset(&mut c).await,
            std::io::ErrorKind::ConnectionReset
        );
    }

    #[tokio::test]
    async fn upstream_down_resets_and_drop_holds_new_connections() {
        let (up, _rx) = echo_server().await;
        let p = FaultProxy::start(up).await.expect("proxy");
        let h = p.handle();
        h.set(NetFault::Drop);
        let mut c = TcpStream::connect(p.addr()).await.expect("accepted");
        c.write_all(b"hello?").await.expect("write");
        assert!(silent(&mut c).await);
        assert_eq!(h.heal(), 1);
        assert_eq!(
            wait_reset(&mut c).await,
            std::io::ErrorKind::ConnectionReset
        );
        // An upstream that refuses: the client is reset at once.
        let gone = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead = gone.local_addr().expect("addr");
        drop(gone);
        let p2 = FaultProxy::start(dead).await.expect("proxy");
        let mut d = TcpStream::connect(p2.addr()).await.expect("accepted");
        let mut b = [0u8; 4];
        let r = tokio::time::timeout(Duration::from_secs(10), d.read(&mut b))
            .await
            .expect("closed in time");
        assert!(matches!(r, Err(_) | Ok(0)), "{r:?}");
    }
}
