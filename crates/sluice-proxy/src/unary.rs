//! The request router in front of the generated gRPC server, with a direct path for the
//! unary RPCs (SendMessage, AckMessage, ChangeInvisibleDuration, Heartbeat, …: every
//! producer and consumer makes some of them for every message).
//!
//! tonic's generic unary handling (a streaming decoder with an 8 KiB buffer per request,
//! an encoding body, a `Status` turned into a trailer map) costs about as much CPU as a
//! send's handler itself. The direct path does what it does for a known message type:
//! collect the request body (no copy when it arrived as one chunk), check the gRPC message
//! prefix with tonic's rules and messages, decode with prost, call the same
//! [`MessagingService`] handler, and answer with one ready body (headers, message,
//! `grpc-status: 0`). The streaming RPCs (ReceiveMessage, PullMessage, Telemetry) go to
//! tonic unchanged.
//!
//! Same answers as through tonic, for good and bad input alike: a compressed or
//! oversized message, an empty body or a message that does not decode get tonic's status
//! codes and messages (UNIMPLEMENTED, OUT_OF_RANGE, INTERNAL).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use sluice_broker::Messaging;
use sluice_proto::v2::messaging_service_server::{MessagingService, MessagingServiceServer};
use tonic::Status;

use crate::conn::RecvBody;
use crate::service::Service;

/// The prefix of every path of the service.
const SERVICE: &str = "/apache.rocketmq.v2.MessagingService/";

/// Routes requests: the unary RPCs directly, the streaming ones through tonic.
pub struct Router<M: Messaging> {
    svc: Arc<Service<M>>,
    tonic: MessagingServiceServer<Service<M>>,
    max_message: usize,
}

impl<M: Messaging> Clone for Router<M> {
    fn clone(&self) -> Self {
        Router {
            svc: self.svc.clone(),
            tonic: self.tonic.clone(),
            max_message: self.max_message,
        }
    }
}

impl<M: Messaging> Router<M> {
    pub fn new(
        svc: Arc<Service<M>>,
        tonic: MessagingServiceServer<Service<M>>,
        max_message: usize,
    ) -> Self {
        Router {
            svc,
            tonic,
            max_message,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// A response of either path.
pub enum RouterFuture {
    Tonic(BoxFuture<Result<http::Response<tonic::body::Body>, Infallible>>),
    Direct(BoxFuture<http::Response<RespBody>>),
}

impl Future for RouterFuture {
    type Output = Result<http::Response<RespBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            RouterFuture::Tonic(f) => match std::task::ready!(f.as_mut().poll(cx)) {
                Ok(r) => Poll::Ready(Ok(r.map(RespBody::Tonic))),
                Err(never) => match never {},
            },
            RouterFuture::Direct(f) => f.as_mut().poll(cx).map(Ok),
        }
    }
}

/// A response body: tonic's, or one that is complete from the start.
pub enum RespBody {
    Tonic(tonic::body::Body),
    Ready {
        data: Option<Bytes>,
        trailers: Option<http::HeaderMap>,
    },
}

impl http_body::Body for RespBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        match self.get_mut() {
            RespBody::Tonic(b) => Pin::new(b).poll_frame(cx),
            RespBody::Ready { data, trailers } => Poll::Ready(match data.take() {
                Some(d) => Some(Ok(http_body::Frame::data(d))),
                None => trailers.take().map(|t| Ok(http_body::Frame::trailers(t))),
            }),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Tonic(b) => b.is_end_stream(),
            RespBody::Ready { data, trailers } => data.is_none() && trailers.is_none(),
        }
    }
}

impl<M: Messaging> tower::Service<http::Request<RecvBody>> for Router<M> {
    type Response = http::Response<RespBody>;
    type Error = Infallible;
    type Future = RouterFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<RecvBody>) -> RouterFuture {
        let svc = self.svc.clone();
        let max = self.max_message;
        macro_rules! direct {
            ($method:ident) => {
                RouterFuture::Direct(Box::pin(unary(req, max, move |r| async move {
                    svc.$method(r).await
                })))
            };
        }
        let rpc = req.uri().path().strip_prefix(SERVICE).unwrap_or_default();
        match rpc {
            "SendMessage" => direct!(send_message),
            "AckMessage" => direct!(ack_message),
            "ChangeInvisibleDuration" => direct!(change_invisible_duration),
            "Heartbeat" => direct!(heartbeat),
            "QueryRoute" => direct!(query_route),
            "QueryAssignment" => direct!(query_assignment),
            "ForwardMessageToDeadLetterQueue" => direct!(forward_message_to_dead_letter_queue),
            "UpdateOffset" => direct!(update_offset),
            "GetOffset" => direct!(get_offset),
            "QueryOffset" => direct!(query_offset),
            "EndTransaction" => direct!(end_transaction),
            "NotifyClientTermination" => direct!(notify_client_termination),
            "RecallMessage" => direct!(recall_message),
            "SyncLiteSubscription" => direct!(sync_lite_subscription),
            // Streaming RPCs, and paths tonic answers with UNIMPLEMENTED.
            _ => RouterFuture::Tonic(tower::Service::call(&mut self.tonic, req)),
        }
    }
}

/// One unary call: the request message decoded from the body, `handler` called with it,
/// its answer (or its error status, trailers-only) as the response.
async fn unary<Req, Resp, F, Fut>(
    req: http::Request<RecvBody>,
    max_message: usize,
    handler: F,
) -> http::Response<RespBody>
where
    Req: sluice_proto::prost::Message + Default,
    Resp: sluice_proto::prost::Message,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    match unary_inner(req, max_message, handler).await {
        Ok(r) => r,
        Err(status) => status.into_http::<()>().map(|()| RespBody::Ready {
            data: None,
            trailers: None,
        }),
    }
}

async fn unary_inner<Req, Resp, F, Fut>(
    req: http::Request<RecvBody>,
    max_message: usize,
    handler: F,
) -> Result<http::Response<RespBody>, Status>
where
    Req: sluice_proto::prost::Message + Default,
    Resp: sluice_proto::prost::Message,
    F: FnOnce(tonic::Request<Req>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let (parts, body) = req.into_parts();
    if let Some(enc) = parts.headers.get("grpc-encoding") {
        if enc.as_bytes() != b"identity" {
            return Err(Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(enc.as_bytes())
            )));
        }
    }
    let message = read_message(body, max_message).await?;
    let message = Req::decode(message).map_err(|e| Status::internal(e.to_string()))?;
    let request = tonic::Request::from_parts(
        tonic::metadata::MetadataMap::from_headers(parts.headers),
        parts.extensions,
        message,
    );
    let answer = handler(request).await?.into_inner();
    let len = answer.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    answer
        .encode(&mut out)
        .map_err(|e| Status::internal(e.to_string()))?;
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
    let mut resp = http::Response::new(RespBody::Ready {
        data: Some(out.freeze()),
        trailers: Some(trailers),
    });
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

/// The one gRPC message of a unary request body: the 5-byte prefix checked as tonic
/// checks it, the message returned without a copy when the body arrived in one chunk.
async fn read_message(body: RecvBody, max_message: usize) -> Result<Bytes, Status> {
    let mut body = std::pin::pin!(body);
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    // The message's length once the prefix is in: stop reading there.
    let mut want: Option<usize> = None;
    loop {
        let have = more
            .as_ref()
            .map_or(first.as_ref().map_or(0, Bytes::len), BytesMut::len);
        if want.is_none() && have >= 5 {
            let head: &[u8] = match (&more, &first) {
                (Some(m), _) => m,
                (None, Some(f)) => f,
                (None, None) => &[],
            };
            match head[0] {
                0 => {}
                1 => {
                    return Err(Status::internal(
                        "protocol error: received message with compressed-flag but no grpc-encoding was specified",
                    ));
                }
                f => {
                    return Err(Status::internal(format!(
                        "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1), while sending request"
                    )));
                }
            }
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            if len > max_message {
                return Err(Status::out_of_range(format!(
                    "Error, decoded message length too large: found {len} bytes, the limit is: {max_message} bytes"
                )));
            }
            want = Some(5 + len);
        }
        if let Some(w) = want {
            if have >= w {
                let all = match (more, first) {
                    (Some(m), _) => m.freeze(),
                    (None, Some(f)) => f,
                    (None, None) => Bytes::new(),
                };
                return Ok(all.slice(5..w));
            }
        }
        match std::future::poll_fn(|cx| http_body::Body::poll_frame(body.as_mut(), cx)).await {
            None => {
                return Err(Status::internal(if have == 0 {
                    "Missing request message."
                } else {
                    "Unexpected EOF decoding stream."
                }));
            }
            Some(Err(e)) => return Err(Status::internal(e.to_string())),
            Some(Ok(frame)) => {
                let Ok(chunk) = frame.into_data() else {
                    continue;
                };
                match (&mut more, first.take()) {
                    (Some(m), _) => m.extend_from_slice(&chunk),
                    (None, None) => first = Some(chunk),
                    (None, Some(f)) => {
                        let mut m = BytesMut::with_capacity(f.len() + chunk.len());
                        m.extend_from_slice(&f);
                        m.extend_from_slice(&chunk);
                        more = Some(m);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flag: u8, msg: &[u8]) -> Vec<u8> {
        let mut out = vec![flag];
        out.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        out.extend_from_slice(msg);
        out
    }

    async fn read(chunks: Vec<&[u8]>, max: usize) -> Result<Bytes, Status> {
        let body = RecvBody::ready(chunks.into_iter().map(Bytes::copy_from_slice).collect());
        read_message(body, max).await
    }

    #[tokio::test]
    async fn a_message_in_any_number_of_chunks_reads_whole() {
        let msg: Vec<u8> = (0..100u8).collect();
        let all = framed(0, &msg);
        assert_eq!(read(vec![&all], 1000).await.ok().as_deref(), Some(&msg[..]));
        let parts: Vec<&[u8]> = all.chunks(3).collect();
        assert_eq!(read(parts, 1000).await.ok().as_deref(), Some(&msg[..]));
        // Bytes after the message (a second message) are not part of it.
        let mut two = all.clone();
        two.extend_from_slice(&framed(0, b"x"));
        assert_eq!(read(vec![&two], 1000).await.ok().as_deref(), Some(&msg[..]));
    }

    #[tokio::test]
    async fn bad_prefixes_get_the_codes_tonic_gives() {
        let code = |r: Result<Bytes, Status>| r.err().map(|s| s.code());
        assert_eq!(code(read(vec![], 10).await), Some(tonic::Code::Internal));
        assert_eq!(
            code(read(vec![&[0, 0, 0]], 10).await),
            Some(tonic::Code::Internal)
        );
        let big = framed(0, &[0; 11]);
        assert_eq!(
            code(read(vec![&big[..5]], 10).await),
            Some(tonic::Code::OutOfRange)
        );
        let compressed = framed(1, b"abc");
        assert_eq!(
            code(read(vec![&compressed], 10).await),
            Some(tonic::Code::Internal)
        );
        let odd = framed(7, b"abc");
        assert_eq!(
            code(read(vec![&odd], 10).await),
            Some(tonic::Code::Internal)
        );
        let short = framed(0, b"abcdef");
        assert_eq!(
            code(read(vec![&short[..8]], 10).await),
            Some(tonic::Code::Internal)
        );
    }
}
