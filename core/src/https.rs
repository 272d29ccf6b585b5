//! The HTTPS server of Moat's control plane (the CA's API, the injector's webhook): TLS 1.3
//! with a hot-swappable certificate, HTTP/1.1 and HTTP/2, a connection limit, handshake and
//! header deadlines, and a graceful drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::ResolvesServerCert;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// Answers the requests of an HTTPS server.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request.
    fn handle(&self, req: Request<Incoming>) -> impl Future<Output = Response<Full<Bytes>>> + Send;

    /// The server's limits.
    fn limits(&self) -> Limits {
        Limits::default()
    }
}

/// Limits of an HTTPS server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; further ones are dropped at accept.
    pub max_connections: usize,
    /// Deadline for a client to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// HTTP/1.1: deadline for a request's headers to arrive.
    pub header_read_timeout: Duration,
    /// HTTP/1.1: most bytes buffered for one request's head (hyper's default when `None`).
    pub max_buf: Option<usize>,
    /// HTTP/2: streams open at once per connection.
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_buf: None,
            max_concurrent_streams: 64,
        }
    }
}

/// TLS 1.3 server configuration (Moat's provider) presenting whatever `cert` currently
/// resolves to, offering HTTP/2 and HTTP/1.1.
pub fn server_config(
    cert: Arc<dyn ResolvesServerCert>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Accepts TLS connections on `listener` and answers their requests with `handler` (within
/// its [`Handler::limits`]) until `shutdown`; then stops accepting and lets open connections
/// finish for up to `grace`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let limits = handler.limits();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let mut http1 = builder.http1();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    if let Some(max) = limits.max_buf {
        http1.max_buf_size(max);
    }
    builder
        .http2()
        .max_concurrent_streams(limits.max_concurrent_streams);
    let builder = Arc::new(builder);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; dropping connection");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            let tls =
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(handler.handle(req).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(tls), service);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!(grace_s = grace.as_secs(), "grace period over; closing remaining connections"),
    }
}
