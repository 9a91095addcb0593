//! `--client raw`: unary `SendMessage` calls written as HTTP/2 frames by hand, one blocking
//! thread per connection, as a C load generator (h2load, wrk2) does it.
//!
//! The request is encoded once (a `SendMessageRequest` with one 1 KiB message) and only
//! its message id and the stream id change per call; the header block uses the HPACK
//! static table and literals that are never indexed, so no HPACK state is kept. Responses
//! are checked where the answer is: each stream must end with a DATA frame holding a
//! `SendMessageResponse` whose status is OK with one entry; a stream reset, a trailers-only
//! answer (a gRPC error) or a bad body counts as a failed call. Response headers and
//! trailers are skipped, not decoded (their HPACK state is the server's alone). Flow
//! control is honoured both ways: the connection send window from the server's
//! WINDOW_UPDATEs, and ours opened wide at the start and topped up as answers arrive.
//!
//! Every connection first runs closed-loop for `WARMUP` without counting, and the
//! connections of a run then start measuring together.
//!
//! Each thread writes every request it may start in one `write` and reads whatever has
//! arrived in one `read`, so a call costs the generator little more than its share of two
//! system calls.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sluice_proto::prost::Message as _;
use sluice_proto::v2;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
/// Our receive windows (connection and streams): opened to this at the start.
const OUR_WINDOW: u32 = 1 << 30;
/// How long each connection runs closed-loop, uncounted, before its measured run.
const WARMUP: Duration = Duration::from_millis(300);
/// The placeholder message id patched per call (same length as every real one).
const ID_PLACEHOLDER: &[u8] = b"R00000000000000000000";

/// What one connection's thread measured.
pub struct Outcome {
    pub calls: u64,
    pub failures: u64,
    pub hist: Histogram<u64>,
}

/// How a thread starts calls: as soon as one finishes (closed loop) or on a schedule.
#[derive(Clone, Copy)]
pub enum Pace {
    /// Keep `inflight` calls open.
    Closed,
    /// Calls become due at `rate` per second, released in ticks of `tick`, with at most
    /// `inflight` open; latency counts from the tick that released the call.
    Open { rate: f64, tick: Duration },
}

fn frame_header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// HPACK: a literal header field never indexed, with its name given by a static-table
/// index (`name_index` > 0) or as a literal; no Huffman coding.
fn literal(out: &mut Vec<u8>, name_index: u8, name: &str, value: &str) {
    fn string(out: &mut Vec<u8>, s: &str) {
        assert!(s.len() < 127, "short strings only");
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
    if name_index == 0 {
        out.push(0x10);
        string(out, name);
    } else if name_index < 15 {
        out.push(0x10 | name_index);
    } else {
        out.push(0x1f);
        out.push(name_index - 15);
    }
    string(out, value);
}

/// The pre-encoded parts of one call.
struct Template {
    headers: Vec<u8>,
    /// gRPC length prefix + the encoded request.
    body: Vec<u8>,
    id_at: usize,
    /// The one-byte varint of the message's queue id (spread over 8 queues, as the other
    /// clients of this benchmark do).
    queue_at: usize,
}

fn request(queue_id: i32) -> anyhow::Result<Vec<u8>> {
    let req = v2::SendMessageRequest {
        messages: vec![v2::Message {
            topic: Some(v2::Resource {
                resource_namespace: String::new(),
                name: "bench".into(),
            }),
            user_properties: Default::default(),
            system_properties: Some(v2::SystemProperties {
                message_id: String::from_utf8(ID_PLACEHOLDER.to_vec())?,
                message_type: v2::MessageType::Normal as i32,
                queue_id,
                ..Default::default()
            }),
            body: vec![b'x'; 1024].into(),
        }],
    };
    let pb = req.encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(pb.len())?.to_be_bytes());
    body.extend_from_slice(&pb);
    Ok(body)
}

impl Template {
    fn new(addr: SocketAddr) -> anyhow::Result<Template> {
        let mut h = Vec::new();
        h.push(0x83); // :method POST (static 3)
        h.push(0x86); // :scheme http (static 6)
        literal(
            &mut h,
            4,
            "",
            "/apache.rocketmq.v2.MessagingService/SendMessage",
        );
        literal(&mut h, 1, "", &addr.to_string());
        literal(&mut h, 31, "", "application/grpc");
        literal(&mut h, 0, "te", "trailers");
        literal(&mut h, 0, "x-mq-client-id", "bench-raw@1@1");
        // Encoded with queue ids 1 and 2: the one byte that differs is the queue id's.
        let (body, other) = (request(1)?, request(2)?);
        let mut diff = (0..body.len().min(other.len())).filter(|&i| body[i] != other[i]);
        let queue_at = match (body.len() == other.len(), diff.next(), diff.next()) {
            (true, Some(i), None) => i,
            _ => anyhow::bail!("the queue id is not one byte of the encoded request"),
        };
        let id_at = body
            .windows(ID_PLACEHOLDER.len())
            .position(|w| w == ID_PLACEHOLDER)
            .ok_or_else(|| anyhow::anyhow!("message id not found in the encoded request"))?
            + 1; // keep the leading 'R', number the 20 digits
        Ok(Template {
            headers: h,
            body,
            id_at,
            queue_at,
        })
    }

    /// Appends the frames of call `seq` on `stream` to `out`.
    fn write(&self, out: &mut Vec<u8>, stream: u32, seq: u64) {
        frame_header(out, self.headers.len(), HEADERS, 0x4, stream); // END_HEADERS
        out.extend_from_slice(&self.headers);
        frame_header(out, self.body.len(), DATA, END_STREAM, stream);
        let at = out.len();
        out.extend_from_slice(&self.body);
        out[at + self.queue_at] = (seq % 8) as u8;
        let mut n = seq;
        for d in out[at + self.id_at..at + self.id_at + 20].iter_mut().rev() {
            *d = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
}

/// The barrier every connection of a run passes after its warm-up; a thread that fails
/// before then still passes it (on drop), so the others and the caller are not left
/// waiting.
struct Gate<'a> {
    barrier: &'a std::sync::Barrier,
    passed: bool,
}

impl Gate<'_> {
    fn pass(&mut self) {
        if !std::mem::replace(&mut self.passed, true) {
            self.barrier.wait();
        }
    }
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        self.pass();
    }
}

/// A call in flight: when it counts from, and what of its answer has arrived.
struct Open {
    from: Instant,
    body: Vec<u8>,
}

fn answer_ok(body: &[u8]) -> bool {
    if body.len() < 5 || body[0] != 0 {
        return false;
    }
    let n = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() != 5 + n {
        return false;
    }
    match v2::SendMessageResponse::decode(&body[5..]) {
        Ok(r) => r.status.is_some_and(|s| s.code() == v2::Code::Ok) && r.entries.len() == 1,
        Err(_) => false,
    }
}

/// Waits until the socket is readable or `until` passes (`None`: no limit).
fn wait_readable(s: &TcpStream, until: Option<Instant>) -> std::io::Result<bool> {
    let mut fd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = until.map(|u| {
        let d = u.saturating_duration_since(Instant::now());
        libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        }
    });
    let tsp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: one valid pollfd, a timespec that outlives the call (or null), no signal mask.
    let r = unsafe { libc::ppoll(&mut fd, 1, tsp, std::ptr::null()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(e)
        };
    }
    Ok(r > 0)
}

/// Runs one connection for `secs` with at most `inflight` calls open; `first_seq` keeps the
/// message ids of the threads apart. After its warm-up the thread waits at `warmed` (with
/// the other connections of the run and the caller) before it starts measuring.
pub fn run(
    addr: SocketAddr,
    secs: f64,
    inflight: usize,
    pace: Pace,
    first_seq: u64,
    warmed: &std::sync::Barrier,
) -> anyhow::Result<Outcome> {
    let mut gate = Gate {
        barrier: warmed,
        passed: false,
    };
    let t = Template::new(addr)?;
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut out = Vec::with_capacity(64 << 10);
    out.extend_from_slice(PREFACE);
    // SETTINGS: ENABLE_PUSH 0, INITIAL_WINDOW_SIZE = OUR_WINDOW; then open the connection
    // window as wide.
    frame_header(&mut out, 12, SETTINGS, 0, 0);
    out.extend_from_slice(&[0, 2, 0, 0, 0, 0, 0, 4]);
    out.extend_from_slice(&OUR_WINDOW.to_be_bytes());
    frame_header(&mut out, 4, WINDOW_UPDATE, 0, 0);
    out.extend_from_slice(&(OUR_WINDOW - 65_535).to_be_bytes());
    s.write_all(&out)?;
    out.clear();

    let mut hist = Histogram::<u64>::new(3)?;
    let (mut calls, mut failures) = (0u64, 0u64);
    let mut open: HashMap<u32, Open> = HashMap::with_capacity(inflight * 2);
    let mut next_stream = 1u32;
    let mut seq = first_seq;
    let mut send_window: i64 = 65_535; // the connection's, until the server says more
    let mut unacked_rx = 0u32; // DATA bytes received since our last WINDOW_UPDATE
    let mut buf = vec![0u8; 256 << 10];
    let (mut have, mut at) = (0usize, 0usize);
    // A closed-loop warm-up first (its calls are not counted), so the measured run starts
    // on a connection whose windows, server-side state and caches are settled.
    let mut warming = true;
    let mut start = Instant::now();
    let mut end = start + WARMUP;
    // Open loop: calls released so far, and the tick of each still waiting to start.
    let mut released = 0u64;
    let mut waiting: std::collections::VecDeque<Instant> = Default::default();
    let mut tick_no = 0u32;
    let mut running = true;
    loop {
        let now = Instant::now();
        if now >= end {
            running = false;
        }
        // Start what may start.
        if running {
            if let (false, Pace::Open { rate, tick }) = (warming, pace) {
                while start + tick * (tick_no + 1) <= now {
                    tick_no += 1;
                    let due = (f64::from(tick_no) * tick.as_secs_f64() * rate) as u64;
                    for _ in released..due {
                        waiting.push_back(start + tick * tick_no);
                    }
                    released = released.max(due);
                }
            }
            while open.len() < inflight && send_window >= t.body.len() as i64 {
                let from = match pace {
                    // Closed loop, and the warm-up of an open-loop run.
                    Pace::Open { .. } if !warming => match waiting.pop_front() {
                        Some(f) => f,
                        None => break,
                    },
                    _ => now,
                };
                t.write(&mut out, next_stream, seq);
                send_window -= t.body.len() as i64;
                open.insert(
                    next_stream,
                    Open {
                        from,
                        body: Vec::new(),
                    },
                );
                next_stream += 2;
                seq += 1;
            }
        }
        if !out.is_empty() {
            s.write_all(&out)?;
            out.clear();
        }
        if !running && open.is_empty() {
            if !warming {
                break;
            }
            warming = false;
            running = true;
            // Every connection of the run starts measuring at the same moment.
            gate.pass();
            start = Instant::now();
            end = start + Duration::from_secs_f64(secs);
            (calls, failures, released, tick_no) = (0, 0, 0, 0);
            hist.reset();
            continue;
        }
        // Read what has arrived (waiting at most until the next tick when pacing).
        let until = match pace {
            Pace::Open { tick, .. } if running && !warming => Some(start + tick * (tick_no + 1)),
            _ => Some(end.max(now) + Duration::from_secs(10)),
        };
        if !wait_readable(&s, until)? {
            if !running && Instant::now() > end + Duration::from_secs(10) {
                anyhow::bail!("{} calls still open 10 s after the end", open.len());
            }
            continue;
        }
        if at > 0 {
            buf.copy_within(at..have, 0);
            have -= at;
            at = 0;
        }
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = s.read(&mut buf[have..])?;
        anyhow::ensure!(n > 0, "the server closed the connection");
        have += n;
        // Whole frames only.
        while have - at >= 9 {
            let h = &buf[at..at + 9];
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let (kind, flags) = (h[3], h[4]);
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            if have - at < 9 + len {
                break;
            }
            let payload = &buf[at + 9..at + 9 + len];
            match kind {
                DATA => {
                    unacked_rx += len as u32;
                    if let Some(o) = open.get_mut(&stream) {
                        o.body.extend_from_slice(payload);
                    }
                }
                HEADERS if flags & END_STREAM != 0 => {
                    // Trailers (or a trailers-only error): the call is over.
                    if let Some(o) = open.remove(&stream) {
                        if answer_ok(&o.body) {
                            calls += 1;
                            let _ = hist.record(o.from.elapsed().as_micros() as u64);
                        } else {
                            failures += 1;
                        }
                    }
                }
                RST_STREAM if open.remove(&stream).is_some() => failures += 1,
                SETTINGS if flags & ACK == 0 => frame_header(&mut out, 0, SETTINGS, ACK, 0),
                PING if flags & ACK == 0 && len == 8 => {
                    frame_header(&mut out, 8, PING, ACK, 0);
                    out.extend_from_slice(payload);
                }
                WINDOW_UPDATE if stream == 0 && len == 4 => {
                    let inc = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]])
                        & 0x7fff_ffff;
                    send_window += i64::from(inc);
                }
                GOAWAY => anyhow::bail!("the server sent GOAWAY"),
                _ => {}
            }
            at += 9 + len;
        }
        if unacked_rx >= OUR_WINDOW / 2 {
            frame_header(&mut out, 4, WINDOW_UPDATE, 0, 0);
            out.extend_from_slice(&unacked_rx.to_be_bytes());
            unacked_rx = 0;
        }
    }
    Ok(Outcome {
        calls,
        failures,
        hist,
    })
}
