//! HTTP with hyper: the HTTP/2 proxy (every request measured), the policy's deny answer for
//! HTTP callers, and the client and server settings the per-request balancer shares.
//!
//! HTTP/2 is served by a hyper server on the plaintext side; each request is sent on a hyper
//! client over the upstream I/O (the app socket on inbound, a tunnel stream on outbound).
//! HTTP/1 to a pod is a byte copy observed in passing (`observe`); HTTP/1 to a Service goes
//! through `balance::requests`, where upgrades (WebSocket) become a byte copy after the 101.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use metrics::{Counter, Histogram};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::detect::Protocol;
use crate::metrics::{self as m, Direction};

/// Body of every response we return: the upstream's, or one we made.
pub type Body = Either<Incoming, Full<Bytes>>;

/// Header naming the rule that denied a request.
pub const DENIED_BY: &str = "x-moat-denied-by";
/// Header set on responses Moat itself generated because the upstream failed.
pub const PROXY_ERROR: &str = "x-moat-error";

/// Largest request head accepted (HTTP/1 buffer, HTTP/2 header list).
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Per-connection request metrics, created once and cheap per request.
pub struct ReqMetrics {
    duration: Histogram,
    by_class: [Counter; 6],
}

impl ReqMetrics {
    /// Handles for one connection's requests.
    pub fn new(dir: Direction, peer: &str, local: &str) -> Self {
        let d = dir.as_str();
        let counter = |class: &'static str| metrics::counter!(m::HTTP_REQUESTS, "direction" => d, "status_class" => class, "peer" => peer.to_string(), "local" => local.to_string());
        Self {
            duration: metrics::histogram!(m::HTTP_DURATION, "direction" => d, "peer" => peer.to_string(), "local" => local.to_string()),
            by_class: [
                counter("1xx"),
                counter("2xx"),
                counter("3xx"),
                counter("4xx"),
                counter("5xx"),
                counter("error"),
            ],
        }
    }

    /// Records one request.
    pub fn record(&self, status: Option<StatusCode>, start: Instant) {
        self.duration.record(start.elapsed().as_secs_f64());
        let idx = match status.map(|s| s.as_u16()) {
            Some(100..=199) => 0,
            Some(200..=299) => 1,
            Some(300..=399) => 2,
            Some(400..=499) => 3,
            Some(500..=599) => 4,
            _ => 5,
        };
        self.by_class[idx].increment(1);
    }
}

impl crate::observe::Sink for ReqMetrics {
    fn response(&mut self, status: u16, started: Instant) {
        self.record(StatusCode::from_u16(status).ok(), started);
    }
    fn gave_up(&mut self, why: &'static str) {
        tracing::debug!(reason = why, "stopped following HTTP/1 on this connection");
    }
}

/// Who is on each side, for metrics.
#[derive(Clone)]
pub struct Labels {
    /// Which listener.
    pub dir: Direction,
    /// The remote workload's identity (or `unauthenticated`).
    pub peer: Arc<str>,
    /// Our own identity.
    pub local: Arc<str>,
}

pub(crate) fn synthetic(
    status: StatusCode,
    header_name: &'static str,
    value: &str,
    body: String,
) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(header_name, v);
    }
    h.insert(header::SERVER, HeaderValue::from_static("moat"));
    r
}

pub(crate) fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONNECTION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// HTTP/1 server settings. The request-head timeout (slowloris protection) is for callers
/// from the network; our own app on the outbound side is not held to it, which also saves a
/// timer per request on the busiest path.
pub(crate) fn http1_server(dir: Direction) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    // A client that shuts its write side after its request (`curl -T`, `nc -N`, scripts)
    // still gets its answer, as it would from the app itself.
    b.max_buf_size(MAX_HEADER_BYTES)
        .half_close(true)
        // Header names go on as the client wrote them (with `http1_client`): some apps match
        // them case-sensitively, as they could before the mesh.
        .preserve_header_case(true);
    if dir == Direction::Inbound {
        b.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
    }
    b
}

pub(crate) fn http2_server() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_concurrent_streams(1024);
    b
}

/// HTTP/1 client settings for the upstream side (a tunnel stream or the app).
pub(crate) fn http1_client() -> hyper::client::conn::http1::Builder {
    let mut b = hyper::client::conn::http1::Builder::new();
    b.max_buf_size(MAX_HEADER_BYTES).preserve_header_case(true);
    b
}

/// HTTP/2 client settings for the upstream side (a tunnel stream or the app).
pub(crate) fn http2_client() -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    b
}

/// Proxies HTTP/2 between `client` (the side that sends requests) and `upstream`, request
/// by request, until either side closes or `drain` asks for a graceful stop.
pub async fn proxy_http2<C, U>(
    client: C,
    upstream: U,
    labels: Labels,
    mut drain: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let metrics = Arc::new(ReqMetrics::new(labels.dir, &labels.peer, &labels.local));
    let (sender, conn) = http2_client().handshake(TokioIo::new(upstream)).await?;
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut sender = sender.clone();
        let metrics = metrics.clone();
        async move {
            let start = Instant::now();
            let resp = match sender.send_request(req).await {
                Ok(r) => r.map(Either::Left),
                Err(e) => upstream_failed(&e),
            };
            metrics.record(Some(resp.status()).filter(|_| !is_synthetic(&resp)), start);
            Ok::<_, Infallible>(resp)
        }
    });
    let server = http2_server().serve_connection(TokioIo::new(client), svc);
    // Both connections run in this task: no cross-task wake-up per request.
    let mut upstream = std::pin::pin!(conn);
    let mut server = std::pin::pin!(server);
    let mut draining = false;
    loop {
        tokio::select! {
            r = server.as_mut() => return r,
            r = upstream.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
                // The server side will see its requests fail and close.
                return server.await;
            }
            _ = moat_core::shutdown::signalled(&mut drain), if !draining => {
                draining = true;
                server.as_mut().graceful_shutdown();
            }
        }
    }
}

fn is_synthetic(resp: &Response<Body>) -> bool {
    resp.headers().contains_key(PROXY_ERROR)
}

pub(crate) fn upstream_failed(e: &hyper::Error) -> Response<Body> {
    tracing::debug!(error = %e, "upstream request failed");
    synthetic(
        StatusCode::BAD_GATEWAY,
        PROXY_ERROR,
        "upstream",
        format!("moat: upstream failed: {e}\n"),
    )
}

pub(crate) async fn splice_upgrade(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
    let (Ok(c), Ok(u)) = tokio::join!(client, upstream) else {
        return;
    };
    let mut c = TokioIo::new(c);
    let mut u = TokioIo::new(u);
    let noop = Counter::noop();
    let _ = crate::forward::copy_bidirectional(&mut c, &mut u, &noop, &noop).await;
}

/// Answers the first request on `client` with 403, naming the rule, then closes the
/// connection: HTTP/1 with `Connection: close`, HTTP/2 with GOAWAY. The decision covers the
/// whole connection (caller and port), so keeping it open would only let a denied caller hold
/// a connection slot for free.
pub async fn deny<C>(
    client: C,
    proto: Protocol,
    rule: Arc<str>,
    labels: Labels,
) -> Result<(), hyper::Error>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let metrics = Arc::new(ReqMetrics::new(labels.dir, &labels.peer, &labels.local));
    let answered = Arc::new(tokio::sync::Notify::new());
    let notify = answered.clone();
    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
        let start = Instant::now();
        let mut resp = synthetic(
            StatusCode::FORBIDDEN,
            DENIED_BY,
            &rule,
            format!("moat: denied by policy rule {rule}\n"),
        );
        if proto != Protocol::Http2 {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        metrics.record(Some(resp.status()), start);
        notify.notify_one();
        async move { Ok::<_, Infallible>(resp) }
    });
    if proto == Protocol::Http2 {
        let conn = http2_server().serve_connection(TokioIo::new(client), svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = answered.notified() => conn.as_mut().graceful_shutdown(),
        }
        conn.await
    } else {
        let mut b = http1_server(labels.dir);
        b.keep_alive(false);
        b.serve_connection(TokioIo::new(client), svc).await
    }
}
