//! One HTTP/2 connection of the gRPC listener: streams, flow control, settings, pings and
//! shutdown, on top of h2's frame codec.
//!
//! Reading frames (parsing, HPACK decoding, CONTINUATION, frame and header list size
//! limits) is h2's `Codec`, the layer under h2's own connection. Writing is done here:
//! frames go straight into the connection's buffer, header blocks through a minimal HPACK
//! encoder ([`hpack`]). What this module replaces is the general-purpose machinery above
//! the codec (h2's stream store and prioritisation queues, hyper's per-stream body pipes),
//! which cost more CPU per unary call than the whole broker and store together
//! (docs/benchmarks.md, "A connection state machine of our own"). It serves exactly what
//! gRPC needs:
//!
//! - Each request stream runs in a task of its own ([`respond`]): the service future,
//!   then its response body. The task hands the connection what it produced in
//!   [`Event`]s, as many frames per event as were ready at once (a unary answer is one
//!   event: headers, message, trailers).
//! - A request whose END_STREAM arrived in the same read as its HEADERS (every unary call
//!   of the official clients) gets a body that is already complete; only streams still
//!   open (Telemetry) get a channel.
//! - Flow control both ways. Inbound: streams and the connection start with the windows
//!   of [`Limits`]; credit goes back to the client as the handler *consumes* the body, so
//!   a client cannot make the server buffer more than the windows. Outbound: DATA waits
//!   for the client's windows, and a stream's task waits while more than
//!   [`QUEUED_LIMIT`] of its output sits in the connection.
//! - Concurrency: streams beyond `max_concurrent_streams` are refused (REFUSED_STREAM).
//! - Backpressure on the socket: nothing more is read, and no more output encoded, while
//!   [`WRITE_LIMIT`] of output waits for a client that does not read.
//! - Keep-alive: after `keep_alive_interval` without a frame from the client, a PING; no
//!   answer within `keep_alive_timeout` closes the connection.
//! - Shutdown: GOAWAY naming the last stream taken, new streams refused, the open ones
//!   finish, then the connection closes.
//! - Protocol errors the codec reports are answered as RFC 9113 says: RST_STREAM for a
//!   stream error, GOAWAY and close for a connection error. Nothing a client sends can
//!   panic the connection or block other connections.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::frame::{self, Frame, Reason, StreamId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio_stream::Stream as _;
use tonic::transport::server::TcpConnectInfo;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The initial window every stream and the connection have before any WINDOW_UPDATE.
const DEFAULT_WINDOW: i64 = 65_535;
/// Largest window RFC 9113 allows.
const MAX_WINDOW: i64 = (1 << 31) - 1;
/// A stream's task stops producing while more than this of its output waits in the
/// connection (for the client's flow-control window or the socket): with the stream limit,
/// what slow readers can make a connection hold (hyper's send buffer per stream had the
/// same size).
pub(crate) const QUEUED_LIMIT: usize = 400 << 10;
/// Frames read in one go before the connection turns to its streams' output.
const READ_BATCH: usize = 256;
/// Encoded output beyond which no more is encoded (and nothing more read) until the
/// socket has taken some.
const WRITE_LIMIT: usize = 64 << 10;
const FRAME_DATA: u8 = 0x0;
const FRAME_HEADERS: u8 = 0x1;
const FRAME_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
/// Payload of the keep-alive PING.
const KEEPALIVE_PING: [u8; 8] = *b"sluiceka";
/// After a GOAWAY for the client's error: how long, and how many bytes of the client's
/// input, the connection waits to be read before it is closed (see [`Conn::linger`]).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// What the connection offers and enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// Initial receive window of every stream (SETTINGS_INITIAL_WINDOW_SIZE).
    pub stream_window: u32,
    /// Receive window of the connection.
    pub conn_window: u32,
    /// Largest decoded header list of a request; larger ones are answered with
    /// RESOURCE_EXHAUSTED.
    pub max_header_list_size: u32,
    /// Streams the client may reset (RST_STREAM on a request not yet answered) or make the
    /// server reset (stream errors of its own making) within `reset_window`. One more and
    /// the connection is closed with GOAWAY(ENHANCE_YOUR_CALM): a reset stream leaves the
    /// stream limit at once, so without this budget a client could have the server set
    /// up requests and tasks without bound ("rapid reset", CVE-2023-44487).
    pub max_resets: u32,
    pub reset_window: Duration,
}

/// Why a connection ended other than by an orderly close.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client did not send the HTTP/2 connection preface")]
    Preface,
    #[error("HTTP/2 protocol error from the client: {0:?}")]
    Protocol(Reason),
    #[error("no answer to the keep-alive ping")]
    KeepAliveTimeout,
    #[error("the client reset more than {0} streams within {1:?}")]
    TooManyResets(u32, Duration),
}

/// One piece of a response, in the order it goes out.
enum Out {
    /// Response headers; `true`: nothing follows (a trailers-only gRPC answer).
    Head(http::response::Parts, bool),
    /// Body bytes; `true`: the last of the stream.
    Data(Bytes, bool),
    /// Trailers, the end of the stream.
    Trailers(http::HeaderMap),
    /// The stream fails.
    Reset(Reason),
}

/// What streams and bodies tell their connection.
enum Event {
    /// Output of stream `id`.
    Out(u32, Vec<Out>),
    /// The handler of stream `id` consumed `n` bytes of its request body: stream credit.
    Consumed(u32, u32),
    /// Connection credit crossed its threshold (the amount is in [`Shared::consumed`]).
    Credit,
}

/// Hashes the stream ids of one connection's map by a multiplication (they are at most
/// `max_concurrent_streams` odd numbers; SipHash cost more than the rest of a lookup).
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type StreamMap = HashMap<u32, Stream, std::hash::BuildHasherDefault<IdHasher>>;

/// Request paths seen on a connection, parsed once: clients call a handful of RPCs.
const PATH_CACHE: usize = 16;

/// State the connection shares with its streams' tasks and bodies.
struct Shared {
    events: mpsc::UnboundedSender<Event>,
    /// Request body bytes consumed by handlers, not yet returned as connection credit.
    consumed: AtomicUsize,
    /// Returned as credit once it reaches this.
    credit_threshold: usize,
}

/// Per-stream state shared with its task: output queued in the connection.
struct StreamShared {
    queued: AtomicUsize,
    drained: Notify,
}

/// The connection's view of one stream.
struct Stream {
    /// The client may still send DATA.
    recv_open: bool,
    /// Where request body chunks go once the task runs; `None` before it is spawned (they
    /// collect in `early`) and after END_STREAM.
    body_tx: Option<mpsc::UnboundedSender<Result<Bytes, Reason>>>,
    early: Option<Early>,
    recv_window: i64,
    send_window: i64,
    pending: VecDeque<Out>,
    /// In `Conn::ready` (has output that may go out now).
    scheduled: bool,
    task: Option<tokio::task::AbortHandle>,
    shared: Arc<StreamShared>,
}

/// A request received but not yet handed to a task.
struct Early {
    head: http::request::Parts,
    chunks: VecDeque<Bytes>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// The request body handed to the service.
pub struct RecvBody {
    chunks: VecDeque<Bytes>,
    rx: Option<mpsc::UnboundedReceiver<Result<Bytes, Reason>>>,
    id: u32,
    /// Consumed since the last stream credit.
    uncredited: u32,
    stream_threshold: u32,
    shared: Arc<Shared>,
}

/// The request stream failed (the client reset it or broke flow control).
#[derive(Debug, thiserror::Error)]
#[error("request stream reset: {0:?}")]
pub struct BodyError(Reason);

impl Shared {
    /// Connection credit for `n` bytes the client sent; the connection is woken once the
    /// credit not yet returned reaches its threshold.
    fn credit(&self, n: usize) {
        let before = self.consumed.fetch_add(n, Ordering::Relaxed);
        let t = self.credit_threshold;
        if before < t && before + n >= t {
            let _ = self.events.send(Event::Credit);
        }
    }
}

impl Drop for RecvBody {
    /// What the handler left unread still counts against the connection's window: it is
    /// credited back, or a client whose requests are not read to their end (an oversized
    /// message, bytes after a unary message) would run the connection out of window.
    fn drop(&mut self) {
        let mut n: usize = self.chunks.iter().map(Bytes::len).sum();
        if let Some(rx) = &mut self.rx {
            // No more chunks are queued after this (the connection credits those itself).
            rx.close();
            while let Ok(Ok(b)) = rx.try_recv() {
                n += b.len();
            }
        }
        if n > 0 {
            self.shared.credit(n);
        }
    }
}

impl RecvBody {
    fn consumed(&mut self, n: usize) {
        self.shared.credit(n);
        if self.rx.is_some() {
            self.uncredited = self.uncredited.saturating_add(n as u32);
            if self.uncredited >= self.stream_threshold {
                let n = std::mem::take(&mut self.uncredited);
                let _ = self.shared.events.send(Event::Consumed(self.id, n));
            }
        }
    }
}

#[cfg(test)]
impl RecvBody {
    /// A complete body of `chunks`, for tests of what reads bodies.
    pub(crate) fn ready(chunks: Vec<Bytes>) -> RecvBody {
        let (events, _) = mpsc::unbounded_channel();
        RecvBody {
            chunks: chunks.into(),
            rx: None,
            id: 1,
            uncredited: 0,
            stream_threshold: 1 << 15,
            shared: Arc::new(Shared {
                events,
                consumed: AtomicUsize::new(0),
                credit_threshold: 1 << 16,
            }),
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        if let Some(b) = self.chunks.pop_front() {
            self.consumed(b.len());
            return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        match rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(b))) => {
                self.consumed(b.len());
                Poll::Ready(Some(Ok(http_body::Frame::data(b))))
            }
            Poll::Ready(Some(Err(r))) => {
                self.rx = None;
                Poll::Ready(Some(Err(BodyError(r))))
            }
            Poll::Ready(None) => {
                self.rx = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.rx.is_none()
    }
}

/// Sends a stream's output to its connection; resets the stream if the task ends (panics,
/// is aborted) before the stream did.
struct StreamTx {
    id: u32,
    shared: Arc<Shared>,
    stream: Arc<StreamShared>,
    done: bool,
}

impl StreamTx {
    fn send(&mut self, out: Vec<Out>) {
        let queued: usize = out
            .iter()
            .map(|o| match o {
                Out::Data(b, _) => b.len(),
                _ => 0,
            })
            .sum();
        self.done |= out.iter().any(|o| {
            matches!(
                o,
                Out::Head(_, true) | Out::Data(_, true) | Out::Trailers(_) | Out::Reset(_)
            )
        });
        if queued > 0 {
            self.stream.queued.fetch_add(queued, Ordering::Relaxed);
        }
        let _ = self.shared.events.send(Event::Out(self.id, out));
    }

    /// Waits while too much of this stream's output is queued in the connection.
    async fn room(&self) {
        loop {
            let drained = self.stream.drained.notified();
            if self.stream.queued.load(Ordering::Relaxed) <= QUEUED_LIMIT {
                return;
            }
            drained.await;
        }
    }
}

impl Drop for StreamTx {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.shared.events.send(Event::Out(
                self.id,
                vec![Out::Reset(Reason::INTERNAL_ERROR)],
            ));
        }
    }
}

/// Runs one stream: the service's answer, then its body, handed to the connection.
async fn respond<F, B>(fut: F, mut tx: StreamTx)
where
    F: Future<Output = Result<http::Response<B>, std::convert::Infallible>>,
    B: http_body::Body<Data = Bytes>,
{
    let resp = match fut.await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (parts, body) = resp.into_parts();
    let mut body = std::pin::pin!(body);
    let mut head = Some(parts);
    let noop = std::task::Waker::noop();
    loop {
        // The first frame may have to be waited for; the ones ready right after it go in
        // the same event.
        let mut out = Vec::with_capacity(3);
        // `next` (which may hold the body's error type) does not live across the wait for
        // room below.
        let mut gathered = 0;
        let finished = {
            let mut next = if head.is_some() && body.is_end_stream() {
                Poll::Ready(None)
            } else {
                Poll::Ready(std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await)
            };
            loop {
                match next {
                    Poll::Pending => break false,
                    Poll::Ready(None) => break true,
                    Poll::Ready(Some(Err(_))) => {
                        out.push(Out::Reset(Reason::INTERNAL_ERROR));
                        tx.send(out);
                        return;
                    }
                    Poll::Ready(Some(Ok(f))) => {
                        if let Some(p) = head.take() {
                            out.push(Out::Head(p, false));
                        }
                        match f.into_data() {
                            Ok(d) => {
                                gathered += d.len();
                                out.push(Out::Data(d, false));
                                if tx.stream.queued.load(Ordering::Relaxed) + gathered
                                    > QUEUED_LIMIT
                                {
                                    // Enough for now: the rest once the connection took it.
                                    break false;
                                }
                            }
                            Err(f) => {
                                if let Ok(t) = f.into_trailers() {
                                    out.push(Out::Trailers(t));
                                    tx.send(out);
                                    return;
                                }
                            }
                        }
                    }
                }
                next = body.as_mut().poll_frame(&mut Context::from_waker(noop));
            }
        };
        if finished {
            match (head.take(), out.last_mut()) {
                (Some(p), _) => out.push(Out::Head(p, true)),
                (None, Some(Out::Data(_, end))) => *end = true,
                _ => out.push(Out::Data(Bytes::new(), true)),
            }
            tx.send(out);
            return;
        }
        if !out.is_empty() {
            tx.send(out);
        }
        tx.room().await;
    }
}

enum KeepAlive {
    /// Waiting for the next check; `heard`: a frame arrived since the last one.
    Idle { heard: bool },
    /// Our PING is out.
    Pinged,
}

/// What serves the requests of a connection: a cloneable service answering every request
/// (errors are gRPC statuses inside the response), its futures runnable on any thread.
pub trait GrpcService<B>:
    tower::Service<
        http::Request<RecvBody>,
        Response = http::Response<B>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> GrpcService<B> for S where
    S: tower::Service<
            http::Request<RecvBody>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Serves one connection (the preface not yet read) until it closes.
pub async fn serve_connection<IO, S, B>(
    mut io: IO,
    svc: S,
    info: TcpConnectInfo,
    limits: Limits,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ConnError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: GrpcService<B>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
{
    let mut preface = [0u8; 24];
    io.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(ConnError::Preface);
    }
    let mut codec: h2::Codec<IO, Bytes> = h2::Codec::new(io);
    codec.set_max_recv_header_list_size(limits.max_header_list_size as usize);
    let (events_tx, events) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        events: events_tx,
        consumed: AtomicUsize::new(0),
        credit_threshold: (limits.conn_window / 2).max(1) as usize,
    });
    let mut conn = Conn {
        codec,
        svc,
        info,
        limits,
        shared,
        events,
        streams: StreamMap::default(),
        paths: Vec::new(),
        to_spawn: Vec::new(),
        ready: VecDeque::new(),
        conn_blocked: Vec::new(),
        wbuf: BytesMut::with_capacity(WRITE_LIMIT),
        hbuf: Vec::new(),
        max_send_frame: 16_384,
        last_stream_id: 0,
        conn_recv_window: DEFAULT_WINDOW,
        conn_send_window: DEFAULT_WINDOW,
        peer_initial_window: DEFAULT_WINDOW,
        refusing: false,
        closing: None,
        reading: true,
        keep_alive: KeepAlive::Idle { heard: false },
        keep_alive_timer: Box::pin(tokio::time::sleep(limits.keep_alive_interval)),
        resets: 0,
        resets_since: tokio::time::Instant::now(),
    };
    let mut settings = frame::Settings::default();
    settings.set_max_concurrent_streams(Some(limits.max_concurrent_streams));
    settings.set_initial_window_size(Some(limits.stream_window));
    settings.set_max_header_list_size(Some(limits.max_header_list_size));
    conn.ctl(settings.into());
    let extra = i64::from(limits.conn_window) - DEFAULT_WINDOW;
    if extra > 0 {
        conn.ctl(frame::WindowUpdate::new(StreamId::zero(), extra as u32).into());
        conn.conn_recv_window += extra;
    }
    let mut stop = std::pin::pin!(stop);
    let mut stopped = false;
    let r = std::future::poll_fn(|cx| {
        if !stopped && stop.as_mut().poll(cx).is_ready() {
            stopped = true;
            conn.go_away(Reason::NO_ERROR, None);
        }
        conn.poll(cx)
    })
    .await;
    if let Err(ConnError::Protocol(_) | ConnError::TooManyResets(..)) = &r {
        let _ = tokio::time::timeout(LINGER, conn.linger()).await;
    }
    r
}

struct Conn<IO, S> {
    codec: h2::Codec<IO, Bytes>,
    svc: S,
    info: TcpConnectInfo,
    limits: Limits,
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Event>,
    streams: StreamMap,
    /// Parsed request paths (at most [`PATH_CACHE`]).
    paths: Vec<(Box<str>, http::Uri)>,
    /// Streams whose request arrived in this read, spawned once the read is done.
    to_spawn: Vec<u32>,
    /// Streams with output that may go out.
    ready: VecDeque<u32>,
    /// Streams waiting for connection send window.
    conn_blocked: Vec<u32>,
    /// Encoded frames not yet written to the socket (from `wpos` on).
    wbuf: BytesMut,
    /// HPACK scratch space for one header block.
    hbuf: Vec<u8>,
    /// Largest frame payload the client accepts (SETTINGS_MAX_FRAME_SIZE).
    max_send_frame: usize,
    last_stream_id: u32,
    conn_recv_window: i64,
    conn_send_window: i64,
    peer_initial_window: i64,
    /// GOAWAY sent (or received): no new streams.
    refusing: bool,
    /// Close once the streams are done and everything is written; `Some(Err)`: with this
    /// error, and without waiting for streams.
    closing: Option<Result<(), ConnError>>,
    reading: bool,
    keep_alive: KeepAlive,
    keep_alive_timer: Pin<Box<tokio::time::Sleep>>,
    /// Streams reset by or because of the client since `resets_since` (see
    /// [`Limits::max_resets`]).
    resets: u32,
    resets_since: tokio::time::Instant,
}

impl<IO, S, B> Conn<IO, S>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: tower::Service<
            http::Request<RecvBody>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + GrpcService<B>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        // Read what has arrived.
        let mut n = 0;
        // Nothing is read while the client does not take what we wrote: a client that
        // sends without reading cannot make the server buffer its answers without bound.
        while self.reading
            && self.closing.is_none()
            && n < READ_BATCH
            && self.wbuf.len() < WRITE_LIMIT
        {
            match Pin::new(&mut self.codec).poll_next(cx) {
                Poll::Pending => break,
                Poll::Ready(None) => {
                    // The client closed its side: nobody is left to answer.
                    self.reading = false;
                    self.streams.clear();
                    self.closing = Some(Ok(()));
                }
                Poll::Ready(Some(Ok(f))) => {
                    n += 1;
                    self.on_frame(f);
                }
                Poll::Ready(Some(Err(e))) => self.on_codec_error(e),
            }
        }
        if n == READ_BATCH {
            // More may be waiting: come back after the output.
            cx.waker().wake_by_ref();
        }
        if n > 0 {
            if let KeepAlive::Idle { heard } = &mut self.keep_alive {
                *heard = true;
            }
        }
        self.spawn_new();
        // What the streams produced.
        while let Poll::Ready(Some(ev)) = self.events.poll_recv(cx) {
            self.on_event(ev);
        }
        let consumed = self.shared.consumed.load(Ordering::Relaxed);
        if consumed >= self.shared.credit_threshold {
            self.shared.consumed.fetch_sub(consumed, Ordering::Relaxed);
            self.conn_recv_window += consumed as i64;
            self.ctl(frame::WindowUpdate::new(StreamId::zero(), consumed as u32).into());
        }
        if let Err(e) = self.poll_keep_alive(cx) {
            // The client does not answer: nothing more can be written to it either.
            return Poll::Ready(Err(e));
        }
        // Encode what may go out, then write it.
        let flushed = match self.write(cx) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
            Poll::Pending => false,
        };
        if matches!(self.closing, Some(Err(_))) {
            // GOAWAY went out if the socket took it; the connection closes either way.
            return Poll::Ready(self.closing.take().unwrap_or(Ok(())));
        }
        let done = self.streams.is_empty()
            && self.to_spawn.is_empty()
            && (self.refusing || self.closing.is_some());
        if done && flushed {
            let _ = Pin::new(self.codec.get_mut()).poll_shutdown(cx);
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }

    /// After a GOAWAY for the client's error: writes what is still buffered (the GOAWAY
    /// itself, which the write coalescing may have held back), closes our side, and reads
    /// what the client still sends (up to [`LINGER_BYTES`]; the caller bounds the time).
    /// Closing a socket with unread input resets the connection, and the client then loses
    /// what it had not read yet: the GOAWAY and its reason.
    async fn linger(&mut self) {
        let io = self.codec.get_mut();
        while !self.wbuf.is_empty() {
            match io.write(&self.wbuf).await {
                Ok(n) if n > 0 => bytes::Buf::advance(&mut self.wbuf, n),
                _ => return,
            }
        }
        if io.flush().await.is_err() || io.shutdown().await.is_err() {
            return;
        }
        // On the heap: a buffer in this future would make every connection's task that
        // much larger, lingering or not.
        let mut buf = vec![0u8; 8192];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(n) if n > 0 => left = left.saturating_sub(n),
                _ => return,
            }
        }
    }

    fn poll_keep_alive(&mut self, cx: &mut Context<'_>) -> Result<(), ConnError> {
        if self.keep_alive_timer.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        let wait = match self.keep_alive {
            KeepAlive::Idle { heard: true } => {
                self.keep_alive = KeepAlive::Idle { heard: false };
                self.limits.keep_alive_interval
            }
            KeepAlive::Idle { heard: false } => {
                self.ctl(frame::Ping::new(KEEPALIVE_PING).into());
                self.keep_alive = KeepAlive::Pinged;
                self.limits.keep_alive_timeout
            }
            KeepAlive::Pinged => return Err(ConnError::KeepAliveTimeout),
        };
        let at = tokio::time::Instant::now() + wait;
        self.keep_alive_timer.as_mut().reset(at);
        // Register the new deadline.
        let _ = self.keep_alive_timer.as_mut().poll(cx);
        Ok(())
    }

    /// Sends GOAWAY and takes no new streams; with an error reason the connection closes
    /// as soon as the frame is out.
    fn go_away(&mut self, reason: Reason, err: Option<ConnError>) {
        if !self.refusing || err.is_some() {
            self.ctl(frame::GoAway::new(StreamId::from(self.last_stream_id), reason).into());
        }
        self.refusing = true;
        if let Some(e) = err {
            self.streams.clear();
            self.closing = Some(Err(e));
        }
    }

    /// Resets stream `id` for an error of the client's making.
    fn reset(&mut self, id: u32, reason: Reason) {
        if let Some(s) = self.streams.remove(&id) {
            self.credit_unconsumed(&s);
        }
        self.to_spawn.retain(|&x| x != id);
        self.refuse(id, reason);
    }

    /// Sends RST_STREAM for a stream the client got wrong (it counts against
    /// [`Limits::max_resets`]).
    fn refuse(&mut self, id: u32, reason: Reason) {
        self.ctl(frame::Reset::new(StreamId::from(id), reason).into());
        self.count_reset();
    }

    /// Counts a stream reset by or because of the client; past the budget of the window
    /// the connection is closed.
    fn count_reset(&mut self) {
        let now = tokio::time::Instant::now();
        if now.duration_since(self.resets_since) >= self.limits.reset_window {
            self.resets_since = now;
            self.resets = 0;
        }
        self.resets += 1;
        if self.resets > self.limits.max_resets && self.closing.is_none() {
            let (max, window) = (self.limits.max_resets, self.limits.reset_window);
            tracing::warn!(
                peer = ?self.info.remote_addr,
                "closing an HTTP/2 connection whose client reset more than {max} streams within {window:?}"
            );
            self.go_away(
                Reason::ENHANCE_YOUR_CALM,
                Some(ConnError::TooManyResets(max, window)),
            );
        }
    }

    /// Connection credit for body bytes a removed stream never handed to its handler.
    fn credit_unconsumed(&mut self, s: &Stream) {
        if let Some(e) = &s.early {
            let n: usize = e.chunks.iter().map(Bytes::len).sum();
            self.shared.consumed.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn on_codec_error(&mut self, e: h2::proto::Error) {
        match e {
            h2::proto::Error::Reset(id, reason, _) => self.reset(id.into(), reason),
            h2::proto::Error::GoAway(_, reason, _) => {
                self.go_away(reason, Some(ConnError::Protocol(reason)))
            }
            h2::proto::Error::Io(kind, msg) => {
                let e = match msg {
                    Some(m) => std::io::Error::new(kind, m),
                    None => kind.into(),
                };
                self.streams.clear();
                self.reading = false;
                self.closing = Some(Err(e.into()));
            }
        }
    }

    fn on_frame(&mut self, f: Frame) {
        match f {
            Frame::Headers(h) => self.on_headers(h),
            Frame::Data(d) => self.on_data(d),
            Frame::WindowUpdate(w) => {
                let (id, inc) = (u32::from(w.stream_id()), i64::from(w.size_increment()));
                if id == 0 {
                    self.conn_send_window += inc;
                    if self.conn_send_window > MAX_WINDOW {
                        self.go_away(
                            Reason::FLOW_CONTROL_ERROR,
                            Some(ConnError::Protocol(Reason::FLOW_CONTROL_ERROR)),
                        );
                        return;
                    }
                    for id in std::mem::take(&mut self.conn_blocked) {
                        self.schedule(id);
                    }
                } else if let Some(s) = self.streams.get_mut(&id) {
                    s.send_window += inc;
                    if s.send_window > MAX_WINDOW {
                        self.reset(id, Reason::FLOW_CONTROL_ERROR);
                    } else {
                        self.schedule(id);
                    }
                }
            }
            Frame::Settings(s) => {
                if s.is_ack() {
                    return;
                }
                if let Some(w) = s.initial_window_size() {
                    let delta = i64::from(w) - self.peer_initial_window;
                    self.peer_initial_window = i64::from(w);
                    let mut over = Vec::new();
                    for (&id, st) in self.streams.iter_mut() {
                        st.send_window += delta;
                        if st.send_window > MAX_WINDOW {
                            over.push(id);
                        }
                    }
                    if !over.is_empty() {
                        self.go_away(
                            Reason::FLOW_CONTROL_ERROR,
                            Some(ConnError::Protocol(Reason::FLOW_CONTROL_ERROR)),
                        );
                        return;
                    }
                    if delta > 0 {
                        let ids: Vec<u32> = self.streams.keys().copied().collect();
                        for id in ids {
                            self.schedule(id);
                        }
                    }
                }
                if let Some(m) = s.max_frame_size() {
                    self.max_send_frame = m as usize;
                }
                // SETTINGS_HEADER_TABLE_SIZE needs nothing: our header blocks never use
                // the dynamic table.
                self.ctl(frame::Settings::ack().into());
            }
            Frame::Ping(p) => {
                if !p.is_ack() {
                    self.ctl(frame::Ping::pong(*p.payload()).into());
                } else if *p.payload() == KEEPALIVE_PING {
                    self.keep_alive = KeepAlive::Idle { heard: true };
                }
            }
            Frame::Reset(r) => {
                let id = u32::from(r.stream_id());
                if let Some(s) = self.streams.remove(&id) {
                    // A request given up before its answer was complete.
                    self.credit_unconsumed(&s);
                    self.count_reset();
                }
                self.to_spawn.retain(|&x| x != id);
            }
            Frame::GoAway(_) => {
                // The client opens no more streams; the open ones finish.
                self.refusing = true;
            }
            Frame::Priority(_) => {}
            Frame::PushPromise(_) => self.go_away(
                Reason::PROTOCOL_ERROR,
                Some(ConnError::Protocol(Reason::PROTOCOL_ERROR)),
            ),
        }
    }

    fn on_headers(&mut self, h: frame::Headers) {
        let id = u32::from(h.stream_id());
        let end = h.is_end_stream();
        if let Some(s) = self.streams.get_mut(&id) {
            // Trailers of a request: they must end it.
            if !end || !s.recv_open {
                self.reset(id, Reason::PROTOCOL_ERROR);
                return;
            }
            s.recv_open = false;
            s.body_tx = None;
            return;
        }
        if id % 2 == 1 && id <= self.last_stream_id {
            // A stream already closed on our side (answered, reset or refused).
            self.refuse(id, Reason::STREAM_CLOSED);
            return;
        }
        if id % 2 == 0 {
            // Streams of even number are the server's, and it opens none.
            self.go_away(
                Reason::PROTOCOL_ERROR,
                Some(ConnError::Protocol(Reason::PROTOCOL_ERROR)),
            );
            return;
        }
        self.last_stream_id = id;
        if self.refusing || self.streams.len() >= self.limits.max_concurrent_streams as usize {
            self.ctl(frame::Reset::new(StreamId::from(id), Reason::REFUSED_STREAM).into());
            return;
        }
        let over_size = h.is_over_size();
        let (pseudo, fields) = h.into_parts();
        let mut stream = Stream {
            recv_open: !end,
            body_tx: None,
            early: None,
            recv_window: i64::from(self.limits.stream_window),
            send_window: self.peer_initial_window,
            pending: VecDeque::new(),
            scheduled: false,
            task: None,
            shared: Arc::new(StreamShared {
                queued: AtomicUsize::new(0),
                drained: Notify::new(),
            }),
        };
        if over_size {
            stream.pending.push_back(Out::Head(
                grpc_error(
                    tonic::Code::ResourceExhausted,
                    "request headers larger than the server accepts",
                ),
                true,
            ));
            self.streams.insert(id, stream);
            self.schedule(id);
            return;
        }
        let Some(path) = pseudo.path else {
            self.refuse(id, Reason::PROTOCOL_ERROR);
            return;
        };
        let uri = match self.paths.iter().find(|(p, _)| **p == *path) {
            Some((_, u)) => u.clone(),
            None => match http::Uri::try_from(&*path) {
                Ok(u) => {
                    if self.paths.len() < PATH_CACHE {
                        self.paths.push((Box::from(&*path), u.clone()));
                    }
                    u
                }
                Err(_) => {
                    self.refuse(id, Reason::PROTOCOL_ERROR);
                    return;
                }
            },
        };
        let mut req = http::Request::new(());
        *req.method_mut() = pseudo.method.unwrap_or(http::Method::POST);
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_2;
        *req.headers_mut() = fields;
        req.extensions_mut().insert(self.info.clone());
        stream.early = Some(Early {
            head: req.into_parts().0,
            chunks: VecDeque::new(),
        });
        self.streams.insert(id, stream);
        self.to_spawn.push(id);
    }

    fn on_data(&mut self, d: frame::Data) {
        let id = u32::from(d.stream_id());
        let end = d.is_end_stream();
        // Padding counts against the windows (RFC 9113 §6.1); it is given back at once.
        let pad = if d.is_padded() { padding(&d) } else { 0 };
        let payload = d.into_payload();
        let len = payload.len() as i64;
        self.conn_recv_window -= len + pad as i64;
        if self.conn_recv_window < 0 {
            self.go_away(
                Reason::FLOW_CONTROL_ERROR,
                Some(ConnError::Protocol(Reason::FLOW_CONTROL_ERROR)),
            );
            return;
        }
        if pad > 0 {
            self.shared.credit(pad);
        }
        let Some(s) = self.streams.get_mut(&id) else {
            // A stream already gone (reset, or answered in full): its bytes are credited
            // back to the connection at once.
            self.shared
                .consumed
                .fetch_add(len as usize, Ordering::Relaxed);
            if id > self.last_stream_id {
                self.go_away(
                    Reason::PROTOCOL_ERROR,
                    Some(ConnError::Protocol(Reason::PROTOCOL_ERROR)),
                );
            }
            return;
        };
        if !s.recv_open {
            self.shared
                .consumed
                .fetch_add(len as usize, Ordering::Relaxed);
            self.reset(id, Reason::STREAM_CLOSED);
            return;
        }
        s.recv_window -= len + pad as i64;
        if s.recv_window < 0 {
            self.shared
                .consumed
                .fetch_add(len as usize, Ordering::Relaxed);
            self.reset(id, Reason::FLOW_CONTROL_ERROR);
            return;
        }
        let pad_back = pad > 0 && !end;
        if pad_back {
            s.recv_window += pad as i64;
        }
        if len > 0 {
            if let Some(e) = &mut s.early {
                e.chunks.push_back(payload);
            } else if let Some(tx) = &s.body_tx {
                if tx.send(Ok(payload)).is_err() {
                    // The handler no longer reads its body.
                    self.shared
                        .consumed
                        .fetch_add(len as usize, Ordering::Relaxed);
                }
            } else {
                self.shared
                    .consumed
                    .fetch_add(len as usize, Ordering::Relaxed);
            }
        }
        if end {
            s.recv_open = false;
            s.body_tx = None;
        }
        if pad_back {
            self.ctl(frame::WindowUpdate::new(StreamId::from(id), pad as u32).into());
        }
    }

    /// Hands the requests of this read to tasks.
    fn spawn_new(&mut self) {
        for id in std::mem::take(&mut self.to_spawn) {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            let Some(early) = s.early.take() else {
                continue;
            };
            let rx = if s.recv_open {
                let (tx, rx) = mpsc::unbounded_channel();
                s.body_tx = Some(tx);
                Some(rx)
            } else {
                None
            };
            let body = RecvBody {
                chunks: early.chunks,
                rx,
                id,
                uncredited: 0,
                stream_threshold: (self.limits.stream_window / 2).max(1),
                shared: self.shared.clone(),
            };
            let req = http::Request::from_parts(early.head, body);
            let tx = StreamTx {
                id,
                shared: self.shared.clone(),
                stream: s.shared.clone(),
                done: false,
            };
            let fut = self.svc.call(req);
            s.task = Some(tokio::spawn(respond(fut, tx)).abort_handle());
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Out(id, out) => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                s.pending.extend(out);
                self.schedule(id);
            }
            Event::Consumed(id, n) => {
                if let Some(s) = self.streams.get_mut(&id) {
                    if s.recv_open {
                        s.recv_window += i64::from(n);
                        self.ctl(frame::WindowUpdate::new(StreamId::from(id), n).into());
                    }
                }
            }
            Event::Credit => {}
        }
    }

    fn schedule(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.scheduled && !s.pending.is_empty() {
                s.scheduled = true;
                self.ready.push_back(id);
            }
        }
    }

    /// Encodes a connection-level frame (SETTINGS, PING, WINDOW_UPDATE, RST_STREAM,
    /// GOAWAY) into the write buffer.
    fn ctl(&mut self, f: Frame<Bytes>) {
        match f {
            Frame::Settings(f) => f.encode(&mut self.wbuf),
            Frame::Ping(f) => f.encode(&mut self.wbuf),
            Frame::WindowUpdate(f) => f.encode(&mut self.wbuf),
            Frame::Reset(f) => f.encode(&mut self.wbuf),
            Frame::GoAway(f) => f.encode(&mut self.wbuf),
            // Only the frames above are built by this module.
            f => tracing::warn!(frame = ?f, "HTTP/2 frame not sent"),
        }
    }

    /// Encodes the output that may go out now, then writes the buffer to the socket;
    /// `Ready(Ok)`: everything is written and flushed.
    fn write(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if !matches!(self.closing, Some(Err(_))) {
                while self.wbuf.len() < WRITE_LIMIT {
                    let Some(id) = self.ready.pop_front() else {
                        break;
                    };
                    if !self.write_stream(id) {
                        self.ready.push_front(id);
                    }
                }
            }
            let io = self.codec.get_mut();
            while !self.wbuf.is_empty() {
                let n = std::task::ready!(Pin::new(&mut *io).poll_write(cx, &self.wbuf))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                bytes::Buf::advance(&mut self.wbuf, n);
            }
            // Written in full: the buffer's space is reused from its start.
            self.wbuf.clear();
            if self.wbuf.capacity() < WRITE_LIMIT {
                self.wbuf.reserve(WRITE_LIMIT);
            }
            if self.ready.is_empty() || matches!(self.closing, Some(Err(_))) {
                return Pin::new(self.codec.get_mut()).poll_flush(cx);
            }
        }
    }

    /// A frame header (RFC 9113 §4.1).
    fn frame_head(&mut self, len: usize, kind: u8, flags: u8, id: u32) {
        self.wbuf.put_slice(&(len as u32).to_be_bytes()[1..]);
        self.wbuf.put_slice(&[kind, flags]);
        self.wbuf.put_slice(&id.to_be_bytes());
    }

    /// HEADERS (and CONTINUATION frames if the block is larger than a frame) carrying the
    /// header block in `self.hbuf`.
    fn put_header_block(&mut self, id: u32, end_stream: bool) {
        let block = std::mem::take(&mut self.hbuf);
        let mut chunks = block.chunks(self.max_send_frame.max(1)).peekable();
        let mut kind = FRAME_HEADERS;
        let mut flags = if end_stream { FLAG_END_STREAM } else { 0 };
        if chunks.peek().is_none() {
            self.frame_head(0, kind, flags | FLAG_END_HEADERS, id);
        }
        while let Some(c) = chunks.next() {
            if chunks.peek().is_none() {
                flags |= FLAG_END_HEADERS;
            }
            self.frame_head(c.len(), kind, flags, id);
            self.wbuf.put_slice(c);
            kind = FRAME_CONTINUATION;
            flags = 0;
        }
        self.hbuf = block;
    }

    /// Encodes what stream `id` may send now; `false`: the write buffer is full (the
    /// stream stays first in line).
    fn write_stream(&mut self, id: u32) -> bool {
        loop {
            let Some(s) = self.streams.get_mut(&id) else {
                return true;
            };
            if s.pending.is_empty() {
                s.scheduled = false;
                return true;
            }
            if self.wbuf.len() >= WRITE_LIMIT {
                return false;
            }
            let Some(front) = s.pending.front_mut() else {
                continue;
            };
            let (finished, reset) = match front {
                Out::Data(b, false) if b.is_empty() => {
                    s.pending.pop_front();
                    continue;
                }
                Out::Data(b, end) => {
                    let room = self
                        .conn_send_window
                        .min(s.send_window)
                        .min(self.max_send_frame as i64);
                    if !b.is_empty() && room <= 0 {
                        s.scheduled = false;
                        if self.conn_send_window <= 0 {
                            self.conn_blocked.push(id);
                        }
                        return true;
                    }
                    let take = (b.len() as i64).min(room.max(0)) as usize;
                    let chunk = b.split_to(take);
                    let last = b.is_empty();
                    let end = *end && last;
                    self.conn_send_window -= take as i64;
                    s.send_window -= take as i64;
                    if take > 0 {
                        let before = s.shared.queued.fetch_sub(take, Ordering::Relaxed);
                        if before > QUEUED_LIMIT && before - take <= QUEUED_LIMIT {
                            s.shared.drained.notify_one();
                        }
                    }
                    if last {
                        s.pending.pop_front();
                    }
                    let flags = if end { FLAG_END_STREAM } else { 0 };
                    self.frame_head(chunk.len(), FRAME_DATA, flags, id);
                    self.wbuf.put_slice(&chunk);
                    (end, false)
                }
                Out::Head(..) | Out::Trailers(..) | Out::Reset(..) => match s.pending.pop_front() {
                    Some(Out::Head(parts, end)) => {
                        self.hbuf.clear();
                        hpack::status(&mut self.hbuf, parts.status);
                        hpack::fields(&mut self.hbuf, &parts.headers);
                        self.put_header_block(id, end);
                        (end, false)
                    }
                    Some(Out::Trailers(t)) => {
                        self.hbuf.clear();
                        hpack::fields(&mut self.hbuf, &t);
                        self.put_header_block(id, true);
                        (true, false)
                    }
                    Some(Out::Reset(r)) => {
                        frame::Reset::new(StreamId::from(id), r).encode(&mut self.wbuf);
                        (true, true)
                    }
                    _ => continue,
                },
            };
            if finished {
                // Our side is closed: the stream is done. A client still sending is told
                // to stop (RFC 9113 §8.1).
                if let Some(s) = self.streams.remove(&id) {
                    if s.recv_open && !reset {
                        self.ctl(frame::Reset::new(StreamId::from(id), Reason::NO_ERROR).into());
                    }
                    self.credit_unconsumed(&s);
                }
                return true;
            }
        }
    }
}

/// The HPACK encoding of response header blocks (RFC 7541): `:status 200` from the static
/// table, every other field a literal without indexing and without Huffman coding. The
/// dynamic table is never used, so the client's table size setting needs nothing, and a
/// block never depends on an earlier one.
mod hpack {
    /// An integer with an `n`-bit prefix, the bits above it set to `flags` (§5.1).
    fn int(out: &mut Vec<u8>, flags: u8, n: u32, mut v: usize) {
        let max = (1usize << n) - 1;
        if v < max {
            out.push(flags | v as u8);
            return;
        }
        out.push(flags | max as u8);
        v -= max;
        while v >= 128 {
            out.push((v % 128) as u8 | 0x80);
            v /= 128;
        }
        out.push(v as u8);
    }

    /// A string literal, not Huffman-coded (§5.2).
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        int(out, 0, 7, s.len());
        out.extend_from_slice(s);
    }

    /// `:status`: indexed for 200 (static entry 8), else a literal with that entry's name.
    pub fn status(out: &mut Vec<u8>, status: http::StatusCode) {
        if status == http::StatusCode::OK {
            out.push(0x88);
        } else {
            int(out, 0, 4, 8);
            string(out, status.as_str().as_bytes());
        }
    }

    /// Every field of `headers`: literal without indexing (§6.2.2), or never indexed
    /// (§6.2.3) for sensitive values; `content-type` names static entry 31.
    pub fn fields(out: &mut Vec<u8>, headers: &http::HeaderMap) {
        for (name, value) in headers {
            let flags = if value.is_sensitive() { 0x10 } else { 0x00 };
            if name == http::header::CONTENT_TYPE {
                int(out, flags, 4, 31);
            } else {
                int(out, flags, 4, 0);
                string(out, name.as_str().as_bytes());
            }
            string(out, value.as_bytes());
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn integers_use_their_prefix_then_continuation_bytes() {
            // RFC 7541 §C.1: 10 and 1337 with a 5-bit prefix, 42 with an 8-bit one.
            let mut out = Vec::new();
            super::int(&mut out, 0, 5, 10);
            assert_eq!(out, [10]);
            out.clear();
            super::int(&mut out, 0, 5, 1337);
            assert_eq!(out, [31, 154, 10]);
            out.clear();
            super::int(&mut out, 0, 8, 42);
            assert_eq!(out, [42]);
        }
    }
}

/// The bytes of padding a DATA frame carried (its pad length field and the padding).
/// h2's frame type keeps the pad length private; its `Debug` output (h2 is pinned) shows
/// it. Only padded frames get here, and gRPC clients do not pad.
fn padding(d: &frame::Data) -> usize {
    let shown = format!("{d:?}");
    shown
        .split("pad_len: ")
        .nth(1)
        .and_then(|t| t.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<usize>().ok())
        .map_or(1, |p| p + 1)
}

/// A trailers-only gRPC answer with `code` and `message`.
fn grpc_error(code: tonic::Code, message: &str) -> http::response::Parts {
    let mut resp = http::Response::new(());
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", http::HeaderValue::from(code as i32));
    if let Ok(v) = http::HeaderValue::from_str(message) {
        h.insert("grpc-message", v);
    }
    resp.into_parts().0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::convert::Infallible;

    /// A response body of fixed chunks, then trailers.
    struct Chunks(VecDeque<Bytes>, Option<http::HeaderMap>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
            if let Some(b) = self.0.pop_front() {
                return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
            }
            Poll::Ready(self.1.take().map(|t| Ok(http_body::Frame::trailers(t))))
        }
    }

    /// Answers with the request body, read to its end, repeated `times` (from the path
    /// `/echo/N`), followed by trailers `x-len: <bytes read>`.
    #[derive(Clone)]
    struct Echo;

    impl tower::Service<http::Request<RecvBody>> for Echo {
        type Response = http::Response<Chunks>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<RecvBody>) -> Self::Future {
            Box::pin(async move {
                let req_path = req.uri().path().to_owned();
                if req_path == "/ignore" {
                    // Answers without reading the request body, after it has arrived.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    return Ok(http::Response::new(Chunks(VecDeque::new(), None)));
                }
                let times: usize = req
                    .uri()
                    .path()
                    .strip_prefix("/echo/")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(1);
                let mut body = std::pin::pin!(req.into_body());
                let mut all = Vec::new();
                while let Some(Ok(f)) =
                    std::future::poll_fn(|cx| http_body::Body::poll_frame(body.as_mut(), cx)).await
                {
                    if let Ok(d) = f.into_data() {
                        all.extend_from_slice(&d);
                    }
                }
                let mut trailers = http::HeaderMap::new();
                trailers.insert("x-len", http::HeaderValue::from(all.len()));
                // `/big/N`: a trailer of N bytes (header blocks over a frame).
                if let Some(n) = req_path.strip_prefix("/big/").and_then(|n| n.parse().ok()) {
                    let v = "v".repeat(n);
                    trailers.insert("x-big", http::HeaderValue::from_str(&v).expect("value"));
                }
                let all = Bytes::from(all);
                let chunks = (0..times).map(|_| all.clone()).collect();
                Ok(http::Response::new(Chunks(chunks, Some(trailers))))
            })
        }
    }

    fn limits() -> Limits {
        Limits {
            keep_alive_interval: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(10),
            max_concurrent_streams: 16,
            stream_window: 1 << 16,
            conn_window: 1 << 17,
            max_header_list_size: 4096,
            max_resets: 1000,
            reset_window: Duration::from_secs(10),
        }
    }

    /// A server connection on one end of an in-memory pipe; the other end is returned.
    fn server(
        limits: Limits,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Result<(), ConnError>>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve_connection(
            b,
            Echo,
            TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
            limits,
            async move {
                let _ = stop_rx.await;
            },
        ));
        (a, task, stop_tx)
    }

    async fn call(
        client: &mut h2::client::SendRequest<Bytes>,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(Vec<u8>, http::HeaderMap)> {
        let req = http::Request::post(path).body(())?;
        let (resp, mut send) = client.clone().ready().await?.send_request(req, false)?;
        // Sent as the windows allow.
        let mut rest = body;
        while !rest.is_empty() {
            send.reserve_capacity(rest.len());
            let cap = std::future::poll_fn(|cx| send.poll_capacity(cx))
                .await
                .ok_or_else(|| anyhow::anyhow!("stream closed"))??;
            let chunk = rest.split_to(cap.min(rest.len()));
            send.send_data(chunk, false)?;
        }
        send.send_data(Bytes::new(), true)?;
        let mut body = resp.await?.into_body();
        let mut got = Vec::new();
        while let Some(d) = body.data().await {
            let d = d?;
            got.extend_from_slice(&d);
            body.flow_control().release_capacity(d.len())?;
        }
        let trailers = body.trailers().await?.unwrap_or_default();
        Ok((got, trailers))
    }

    /// Makes `n` calls at once, call `i` with what `make(i)` gives (client, path, body,
    /// repeats), and checks every answer: the body `repeats` times, and its length in the
    /// trailers.
    async fn calls(
        n: u32,
        make: impl Fn(u32) -> (h2::client::SendRequest<Bytes>, &'static str, Bytes, usize),
    ) -> anyhow::Result<()> {
        let mut tasks = Vec::new();
        for i in 0..n {
            let (mut c, path, body, repeats) = make(i);
            tasks.push(tokio::spawn(async move {
                let (got, trailers) = call(&mut c, path, body.clone()).await?;
                anyhow::ensure!(
                    got.len() == repeats * body.len(),
                    "answer of {} bytes",
                    got.len()
                );
                anyhow::ensure!(got.chunks(body.len()).all(|c| c == &body[..]), "call {i}");
                let len = body.len().to_string();
                anyhow::ensure!(trailers.get("x-len").is_some_and(|v| v == len.as_str()));
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(20), t).await???;
        }
        Ok(())
    }

    #[tokio::test]
    async fn many_concurrent_calls_are_answered() -> anyhow::Result<()> {
        let (io, _task, _stop) = server(limits());
        let (client, conn) = h2::client::handshake(io).await?;
        tokio::spawn(conn);
        calls(200, |i| {
            (
                client.clone(),
                "/echo/1",
                Bytes::from(i.to_be_bytes().repeat(100)),
                1,
            )
        })
        .await
    }

    /// Request bodies far larger than the server's windows arrive whole (the server gives
    /// credit as the handler reads), and answers far larger than the client's windows wait
    /// for the client's WINDOW_UPDATEs (and, being larger than [`QUEUED_LIMIT`], make the
    /// stream's task wait for room in between).
    #[tokio::test]
    async fn flow_control_both_ways() -> anyhow::Result<()> {
        let (io, _task, _stop) = server(limits());
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(1000)
            .initial_connection_window_size(3000)
            .max_frame_size(16_384)
            .handshake::<_, Bytes>(io)
            .await?;
        tokio::spawn(conn);
        let body: Bytes = (0..300_000u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        calls(4, |_| (client.clone(), "/echo/3", body.clone(), 3)).await
    }

    /// A header block larger than a frame goes out as HEADERS + CONTINUATION frames, and
    /// the client's HPACK decoder reads it back.
    #[tokio::test]
    async fn large_header_blocks_are_split_into_continuation_frames() -> anyhow::Result<()> {
        let (io, _task, _stop) = server(limits());
        let (client, conn) = h2::client::Builder::new()
            .max_header_list_size(1 << 20)
            .handshake::<_, Bytes>(io)
            .await?;
        tokio::spawn(conn);
        let mut c = client.clone();
        let (got, trailers) = call(&mut c, "/big/40000", Bytes::from_static(b"abc")).await?;
        anyhow::ensure!(got == b"abc");
        let big = trailers.get("x-big").map(|v| v.len());
        anyhow::ensure!(big == Some(40_000), "x-big of {big:?} bytes");
        Ok(())
    }

    /// Request bodies their handlers never read are credited back to the connection: one
    /// connection serves such calls far beyond its receive window.
    #[tokio::test]
    async fn unread_request_bodies_do_not_use_up_the_connection_window() -> anyhow::Result<()> {
        let (io, _task, _stop) = server(limits()); // connection window 128 KiB
        let (client, conn) = h2::client::handshake(io).await?;
        tokio::spawn(conn);
        for i in 0..20 {
            // 50 KB each, sent whole (within the 64 KiB stream window), never read.
            let req = http::Request::post("/ignore").body(())?;
            let (resp, mut send) = client.clone().ready().await?.send_request(req, false)?;
            send.send_data(Bytes::from(vec![7u8; 50_000]), true)?;
            let resp = tokio::time::timeout(Duration::from_secs(5), resp)
                .await
                .map_err(|_| anyhow::anyhow!("call {i} got no answer"))??;
            anyhow::ensure!(resp.status() == http::StatusCode::OK);
        }
        // Whose request body must arrive whole: only if the window was given back.
        let mut c = client.clone();
        let body = Bytes::from(vec![9u8; 100_000]);
        let (got, _) = tokio::time::timeout(Duration::from_secs(5), call(&mut c, "/echo/1", body))
            .await
            .map_err(|_| anyhow::anyhow!("the connection ran out of window"))??;
        anyhow::ensure!(got.len() == 100_000);
        Ok(())
    }

    /// The frames in `seen` (a byte stream from the start of a frame): (type, stream,
    /// payload), the last one cut short if it is.
    fn frames(seen: &[u8]) -> impl Iterator<Item = (u8, u32, &[u8])> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let h = seen.get(at..at + 9)?;
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
            let payload = &seen[at + 9..(at + 9 + len).min(seen.len())];
            at += 9 + len;
            Some((h[3], stream, payload))
        })
    }

    /// What a raw client sends first: the preface and an empty SETTINGS frame.
    fn raw_start() -> Vec<u8> {
        let mut out = PREFACE.to_vec();
        out.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        out
    }

    /// Reads from `io` until `want` has been seen (5 s at most); returns all that was read.
    async fn read_until(
        io: &mut (impl tokio::io::AsyncRead + Unpin),
        want: &[u8],
    ) -> anyhow::Result<Vec<u8>> {
        use tokio::io::AsyncReadExt as _;
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !seen.windows(want.len()).any(|w| w == want) {
            let mut buf = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, io.read(&mut buf)).await??;
            anyhow::ensure!(n > 0, "connection closed before {want:?}");
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(seen)
    }

    /// Padding in DATA frames counts against the windows and is given back: the connection
    /// credit the server returns covers it, so a client that pads (and keeps to its
    /// windows) does not run out of window.
    #[tokio::test]
    async fn padding_is_given_back() -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (io, _task, _stop) = server(limits()); // windows: 64 KiB stream, 128 KiB connection
        let mut out = raw_start();
        // One stream (:method POST, :path /echo/1), then 1,000 DATA frames of one byte and
        // 200 bytes of padding each: 201 KB of flow-controlled data, 1,000 bytes of body.
        request(&mut out, 1, false, false);
        // The trailer `x-len: 1000` as our HPACK encoder writes it.
        const ECHOED: &[u8] = b"x-len\x041000";
        // The server's answers (window updates among them) are read meanwhile.
        let (mut rd, mut wr) = tokio::io::split(io);
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
                // The echo's trailers carry x-len: 1000.
                if seen.windows(ECHOED.len()).any(|w| w == ECHOED) {
                    break;
                }
            }
            seen
        });
        wr.write_all(&out).await?;
        for i in 0..1000 {
            let flags = 0x8 | if i == 999 { 0x1 } else { 0 }; // PADDED (| END_STREAM)
            let mut f = vec![0, 0, 202, 0, flags, 0, 0, 0, 1, 200, b'x'];
            f.extend_from_slice(&[0u8; 200]);
            wr.write_all(&f).await?;
        }
        let seen = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .map_err(|_| anyhow::anyhow!("the echo never came"))??;
        anyhow::ensure!(
            seen.windows(ECHOED.len()).any(|w| w == ECHOED),
            "no complete echo"
        );
        // The connection credit the server returned beyond its opening WINDOW_UPDATE: the
        // padding (200 KB) less what waits below the credit threshold (64 KiB).
        let credit: Vec<u32> = frames(&seen)
            .filter(|&(kind, stream, p)| kind == 8 && stream == 0 && p.len() >= 4)
            .map(|(_, _, p)| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
            .collect();
        let returned: u32 = credit.iter().skip(1).sum();
        anyhow::ensure!(
            returned >= 100_000,
            "connection credit returned: {credit:?}"
        );
        Ok(())
    }

    /// Streams beyond the limit are refused, and the ones within it still complete.
    #[tokio::test]
    async fn streams_beyond_the_limit_are_refused() -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let mut l = limits();
        l.max_concurrent_streams = 1;
        let (mut io, _task, _stop) = server(l);
        let mut out = raw_start();
        // Two requests (HEADERS without END_STREAM): :method POST, :path /echo/1.
        for id in [1, 3] {
            request(&mut out, id, false, false);
        }
        io.write_all(&out).await?;
        // Stream 3 is refused: RST_STREAM(REFUSED_STREAM) on stream 3.
        read_until(&mut io, &[0, 0, 4, 3, 0, 0, 0, 0, 3, 0, 0, 0, 7]).await?;
        Ok(())
    }

    /// A request whose header list is over the limit is answered with RESOURCE_EXHAUSTED
    /// (trailers-only), and the connection goes on serving.
    #[tokio::test]
    async fn oversized_header_lists_get_resource_exhausted() -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let (mut io, _task, _stop) = server(limits()); // header lists up to 4 KiB
        let mut out = raw_start();
        // :method POST, :path /echo/1, x-big: 5,000 bytes (length 5000 = 127 + 9 + 38 * 128).
        let mut block = vec![0x83, 0x04, 0x07];
        block.extend_from_slice(b"/echo/1");
        block.extend_from_slice(&[0x00, 0x05]);
        block.extend_from_slice(b"x-big");
        block.extend_from_slice(&[0x7f, 0x89, 0x26]);
        block.extend_from_slice(&[b'v'; 5000]);
        let len = (block.len() as u32).to_be_bytes();
        out.extend_from_slice(&[len[1], len[2], len[3], 1, 0x4 | 0x1, 0, 0, 0, 1]);
        out.extend_from_slice(&block);
        io.write_all(&out).await?;
        read_until(&mut io, b"grpc-status\x01\x38").await?;
        Ok(())
    }

    /// HEADERS of a request on stream `id` (:method POST, :path /echo/1; END_STREAM if
    /// `end`), and with `cancel` an RST_STREAM(CANCEL) of it right after.
    fn request(out: &mut Vec<u8>, id: u32, end: bool, cancel: bool) {
        let block = [0x83, 0x04, 0x07, b'/', b'e', b'c', b'h', b'o', b'/', b'1'];
        let i = id.to_be_bytes();
        let flags = 0x4 | if end { 0x1 } else { 0 };
        out.extend_from_slice(&[0, 0, block.len() as u8, 1, flags, i[0], i[1], i[2], i[3]]);
        out.extend_from_slice(&block);
        if cancel {
            out.extend_from_slice(&[0, 0, 4, 3, 0, i[0], i[1], i[2], i[3], 0, 0, 0, 8]);
        }
    }

    /// The error codes of the GOAWAY frames in `seen` (a byte stream of whole frames).
    fn goaway_codes(seen: &[u8]) -> Vec<u32> {
        frames(seen)
            .filter(|&(kind, _, p)| kind == 7 && p.len() >= 8)
            .map(|(_, _, p)| u32::from_be_bytes([p[4], p[5], p[6], p[7]]))
            .collect()
    }

    /// A client that opens and cancels streams faster than the budget allows ("rapid
    /// reset") gets GOAWAY(ENHANCE_YOUR_CALM) and the connection is closed.
    #[tokio::test]
    async fn rapid_resets_close_the_connection() -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut l = limits();
        l.max_resets = 50;
        let (mut io, task, _stop) = server(l);
        let mut out = raw_start();
        for i in 0..51 {
            request(&mut out, 1 + 2 * i, false, true);
        }
        io.write_all(&out).await?;
        let mut seen = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), io.read_to_end(&mut seen)).await??;
        let codes = goaway_codes(&seen);
        anyhow::ensure!(codes == [0xb], "GOAWAY codes {codes:?}");
        let r = task.await?;
        anyhow::ensure!(matches!(r, Err(ConnError::TooManyResets(50, _))), "{r:?}");
        Ok(())
    }

    /// Resets within the budget, and the budget of each new window, are tolerated: the
    /// connection goes on serving.
    #[tokio::test]
    async fn resets_within_the_budget_are_tolerated() -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let mut l = limits();
        l.max_resets = 50;
        l.reset_window = Duration::from_millis(200);
        let (mut io, _task, _stop) = server(l);
        let mut out = raw_start();
        for i in 0..40 {
            request(&mut out, 1 + 2 * i, false, true);
        }
        io.write_all(&out).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // 40 more in the next window, then a request (empty body) that must be answered.
        let mut out = Vec::new();
        for i in 40..80 {
            request(&mut out, 1 + 2 * i, false, true);
        }
        request(&mut out, 161, true, false);
        io.write_all(&out).await?;
        read_until(&mut io, b"x-len\x010").await?;
        Ok(())
    }

    #[tokio::test]
    async fn garbage_gets_a_goaway_and_a_close() -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut io, task, _stop) = server(limits());
        let mut out = raw_start();
        // A DATA frame on stream 0 is a connection error.
        out.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff]);
        io.write_all(&out).await?;
        let mut seen = Vec::new();
        io.read_to_end(&mut seen).await?;
        // A GOAWAY frame (type 7) with PROTOCOL_ERROR is among what was written.
        let goaway = seen
            .windows(4)
            .position(|w| w[3] == 7 && w[0] == 0 && w[1] == 0 && w[2] >= 8);
        anyhow::ensure!(goaway.is_some(), "no GOAWAY in {seen:?}");
        let r = task.await?;
        anyhow::ensure!(matches!(r, Err(ConnError::Protocol(_))), "{r:?}");
        Ok(())
    }

    #[tokio::test]
    async fn a_client_that_does_not_answer_pings_is_closed() -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let mut l = limits();
        l.keep_alive_interval = Duration::from_millis(50);
        l.keep_alive_timeout = Duration::from_millis(50);
        let (mut io, task, _stop) = server(l);
        io.write_all(&raw_start()).await?;
        let r = tokio::time::timeout(Duration::from_secs(5), task).await??;
        anyhow::ensure!(matches!(r, Err(ConnError::KeepAliveTimeout)), "{r:?}");
        Ok(())
    }

    #[tokio::test]
    async fn stop_lets_calls_in_flight_finish_then_closes() -> anyhow::Result<()> {
        let (io, task, stop) = server(limits());
        let (client, conn) = h2::client::handshake(io).await?;
        let conn = tokio::spawn(conn);
        // A call whose request is still open when the server is told to stop.
        let req = http::Request::post("/echo/1").body(())?;
        let (resp, mut send) = client.ready().await?.send_request(req, false)?;
        send.send_data(Bytes::from_static(b"abc"), false)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = stop.send(());
        tokio::time::sleep(Duration::from_millis(50)).await;
        send.send_data(Bytes::from_static(b"def"), true)?;
        let mut body = resp.await?.into_body();
        let mut got = Vec::new();
        while let Some(d) = body.data().await {
            got.extend_from_slice(&d?);
        }
        anyhow::ensure!(got == b"abcdef");
        tokio::time::timeout(Duration::from_secs(5), task).await???;
        let _ = conn.await;
        Ok(())
    }
}
