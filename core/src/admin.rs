//! The admin listener every Moat binary exposes: `/metrics`, `/ready`, `/live`, plus
//! binary-specific routes. Plain HTTP/1.1, separate from the data path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Readiness and liveness as reported to the kubelet.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    /// Marks the process ready (or not) to receive traffic.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether the process is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// A response being computed by an extra route.
pub type RouteFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Response<Full<Bytes>>> + Send>>;

/// An extra admin route: given method, path and caller, returns the (possibly async) response
/// when it handles the request.
pub type Route = Arc<dyn Fn(&Method, &str, Caller) -> Option<RouteFuture> + Send + Sync>;

/// Builds a small text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Builds a JSON response.
pub fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Who is calling an admin endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// A TCP client at this address (IPv4-mapped addresses shown as IPv4).
    Tcp(SocketAddr),
    /// A process in this pod, over the local control socket.
    Local,
}

impl Caller {
    /// Whether the caller is on this host's loopback, or on the local socket.
    pub fn is_local(&self) -> bool {
        match self {
            Caller::Tcp(a) => a.ip().is_loopback(),
            Caller::Local => true,
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Tcp(a) => write!(f, "{a}"),
            Caller::Local => f.write_str("local socket"),
        }
    }
}

/// Serves the admin endpoints on TCP until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    extra: Option<Route>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::signalled(&mut shutdown) => return,
        };
        // A dual-stack listener shows IPv4 callers as `::ffff:a.b.c.d`: routes see them as
        // IPv4 (a loopback check must accept 127.0.0.1 either way).
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let conn = connection(stream, Caller::Tcp(peer), &metrics, &health, &extra);
        tokio::spawn(conn);
    }
}

/// Serves the admin endpoints on a Unix socket (callers are [`Caller::Local`]) until
/// `shutdown` turns true.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    extra: Option<Route>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::signalled(&mut shutdown) => return,
        };
        tokio::spawn(connection(stream, Caller::Local, &metrics, &health, &extra));
    }
}

/// One admin connection: extra routes first, then the built-in ones.
fn connection<IO>(
    stream: IO,
    caller: Caller,
    metrics: &PrometheusHandle,
    health: &Arc<Health>,
    extra: &Option<Route>,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (metrics, health, extra) = (metrics.clone(), health.clone(), extra.clone());
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let pending = extra
            .as_ref()
            .and_then(|f| f(req.method(), req.uri().path(), caller));
        let resp = match pending {
            Some(_) => None,
            None => Some(route(&req, &metrics, &health)),
        };
        async move {
            Ok::<_, Infallible>(match (resp, pending) {
                (Some(r), _) => r,
                (None, Some(fut)) => fut.await,
                (None, None) => text(StatusCode::NOT_FOUND, "not found\n"),
            })
        }
    });
    async move {
        let _ = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    }
}

fn route(
    req: &http::Request<Incoming>,
    metrics: &PrometheusHandle,
    health: &Health,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, metrics.render());
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") if health.is_ready() => text(StatusCode::OK, "ready\n"),
        (&Method::GET, "/ready") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
