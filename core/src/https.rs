//! The HTTPS server of Moat's control plane (the CA's API, the injector's webhook): TLS 1.3
//! with a hot-swappable certificate, HTTP/1.1 and HTTP/2, and a graceful drain on shutdown.
//!
//! Holding connections open is the cheapest attack on a server with a connection limit, so
//! every connection is on a clock from accept to close:
//!
//! * TLS handshake within [`Limits::handshake_timeout`];
//! * first request byte within [`Limits::first_byte_timeout`] of the handshake, first complete
//!   request within [`Limits::header_read_timeout`] (HTTP/1.1 and HTTP/2 alike);
//! * closed after [`Limits::idle_timeout`] without an open request (HTTP/2 keepalive pings do
//!   not count as activity; they only detect dead peers);
//! * drained (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY) after [`Limits::max_connection_age`].
//!
//! At the limits a new connection is not simply refused: the oldest connection that has no
//! request in progress (still handshaking, not yet sent a complete request, or idle between
//! requests) is closed to make room. A flood of idle connections therefore only churns its
//! own connections, while a client that sends its request promptly is always served. Only
//! when every connection is busy with a request is a new one refused.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::server::ResolvesServerCert;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

/// Answers the requests of an HTTPS server.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Its extensions carry the client's [`ClientAddr`].
    fn handle(&self, req: Request<Incoming>) -> impl Future<Output = Response<Full<Bytes>>> + Send;

    /// The server's limits.
    fn limits(&self) -> Limits {
        Limits::default()
    }
}

/// The TCP address of the client that sent a request (in the request's extensions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Limits of an HTTPS server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once. Beyond it the oldest connection without a request in
    /// progress is closed to make room; when every connection is busy, new ones are refused.
    pub max_connections: usize,
    /// Connections open at once from one client IP address, enforced the same way within
    /// that address.
    pub max_connections_per_source: usize,
    /// Deadline for a client to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Deadline, from the end of the handshake, for the first byte of the first request.
    pub first_byte_timeout: Duration,
    /// Deadline, from the end of the handshake, for the first complete request head; for
    /// HTTP/1.1 also the deadline for every later request's head once it started.
    pub header_read_timeout: Duration,
    /// A connection without a request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// A connection this old is drained: requests in progress finish, then it closes.
    pub max_connection_age: Duration,
    /// HTTP/2: interval of keepalive pings while the connection is open.
    pub http2_keep_alive_interval: Duration,
    /// HTTP/2: a connection whose ping is not acknowledged within this is closed.
    pub http2_keep_alive_timeout: Duration,
    /// HTTP/1.1: most bytes buffered for one request's head (hyper's default when `None`).
    pub max_buf: Option<usize>,
    /// HTTP/2: streams open at once per connection.
    pub max_concurrent_streams: u32,
    /// Prefix of the server's metric names, e.g. `moat_ca` for
    /// `moat_ca_connections_refused_total`.
    pub metrics_prefix: &'static str,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_connections_per_source: 256,
            handshake_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connection_age: Duration::from_secs(600),
            http2_keep_alive_interval: Duration::from_secs(20),
            http2_keep_alive_timeout: Duration::from_secs(10),
            max_buf: None,
            max_concurrent_streams: 64,
            metrics_prefix: "moat_https",
        }
    }
}

/// The connection flags shared by `moat-ca serve` and `moat-injector serve` (each binary
/// keeps its own `--max-connections`).
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Most connections open at once from one client IP address. At the limit the address's
    /// oldest idle connection is closed to make room; if none is idle, the new one is refused.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_source: u32,
    /// Deadline for a client to complete the TLS handshake.
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse)]
    pub handshake_timeout: Duration,
    /// After the TLS handshake, deadline for the first byte of the first request.
    #[arg(long, default_value = "5s", value_parser = crate::duration::parse)]
    pub first_byte_timeout: Duration,
    /// Close a connection that has had no request in progress for this long.
    #[arg(long, default_value = "60s", value_parser = crate::duration::parse)]
    pub idle_timeout: Duration,
    /// Drain a connection this old (finish its requests, then close; clients reconnect).
    #[arg(long, default_value = "10m", value_parser = crate::duration::parse)]
    pub max_connection_age: Duration,
    /// HTTP/2 keepalive ping interval.
    #[arg(long, default_value = "20s", value_parser = crate::duration::parse)]
    pub http2_keepalive_interval: Duration,
    /// Close an HTTP/2 connection whose keepalive ping is not answered within this.
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse)]
    pub http2_keepalive_timeout: Duration,
}

impl ConnectionArgs {
    /// `limits` with these flags applied.
    pub fn apply(&self, limits: Limits) -> Limits {
        Limits {
            max_connections_per_source: self.max_connections_per_source as usize,
            handshake_timeout: self.handshake_timeout,
            first_byte_timeout: self.first_byte_timeout,
            idle_timeout: self.idle_timeout,
            max_connection_age: self.max_connection_age,
            http2_keep_alive_interval: self.http2_keepalive_interval,
            http2_keep_alive_timeout: self.http2_keepalive_timeout,
            ..limits
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

/// How long a connection drained for its age may take to finish its requests.
const AGE_DRAIN: Duration = Duration::from_secs(30);
/// Linux `ENFILE` and `EMFILE`: out of file descriptors.
const OUT_OF_FDS: [i32; 2] = [23, 24];

/// Why the server closed a connection or refused one at accept (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Refused: at the connection limit and every connection busy with a request.
    ConnectionLimit,
    /// Refused: the client's address at its limit and each of its connections busy.
    SourceLimit,
    /// Closed to make room for a new connection (at the global or the per-source limit).
    Evicted,
    /// Closed: no TLS handshake within the deadline.
    HandshakeTimeout,
    /// Closed: no request byte within the deadline after the handshake.
    FirstByteTimeout,
    /// Closed: no complete first request within the deadline after the handshake.
    RequestTimeout,
    /// Closed: no request in progress for the idle timeout.
    IdleTimeout,
    /// Drained: the connection reached its maximum age.
    MaxAge,
}

impl Reason {
    /// The metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::ConnectionLimit => "connection_limit",
            Self::SourceLimit => "source_limit",
            Self::Evicted => "evicted",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::FirstByteTimeout => "first_byte_timeout",
            Self::RequestTimeout => "request_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::MaxAge => "max_age",
        }
    }
}

/// Metric names of one server.
struct Names {
    refused: String,
    closed: String,
    open: String,
}

impl Names {
    fn new(prefix: &str) -> Self {
        Self {
            refused: format!("{prefix}_connections_refused_total"),
            closed: format!("{prefix}_connections_closed_total"),
            open: format!("{prefix}_connections_open"),
        }
    }

    fn refused(&self, r: Reason) {
        metrics::counter!(self.refused.clone(), "reason" => r.as_str()).increment(1);
    }

    fn closed(&self, r: Reason) {
        metrics::counter!(self.closed.clone(), "reason" => r.as_str()).increment(1);
    }
}

/// At most `per_second` log lines a second for one kind of event; the first line after a
/// suppressed stretch says how many were left out. A flood must not become a log flood.
struct Throttle {
    per_second: u32,
    state: Mutex<(Instant, u32, u64)>,
}

impl Throttle {
    fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(suppressed since the last line)` when a line may be written now.
    fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(s.0) >= Duration::from_secs(1) {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < self.per_second {
            s.1 += 1;
            Some(std::mem::take(&mut s.2))
        } else {
            s.2 += 1;
            None
        }
    }
}

/// One open connection, as the registry and its own task see it.
#[derive(Debug)]
struct Conn {
    id: u64,
    peer: SocketAddr,
    ip: IpAddr,
    /// Nanoseconds since the server's epoch when the TLS handshake completed (0: not yet).
    established: AtomicU64,
    /// Nanoseconds since the server's epoch when the last request finished (or the
    /// connection was accepted).
    idle_since: AtomicU64,
    accepted: u64,
    first_byte: AtomicBool,
    requests: AtomicU64,
    in_flight: AtomicU32,
    /// Set (under the registry lock) when the connection was chosen to make room.
    evicted: AtomicBool,
    evict: Notify,
}

impl Conn {
    fn new(id: u64, peer: SocketAddr, now: u64) -> Self {
        Self {
            id,
            peer,
            ip: peer.ip().to_canonical(),
            established: AtomicU64::new(0),
            idle_since: AtomicU64::new(now),
            accepted: now,
            first_byte: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        }
    }

    /// Not busy with a request: may be closed to make room.
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }
}

/// A request in progress on a connection; the connection is busy until it is dropped.
struct InFlight {
    conn: Arc<Conn>,
    clock: Clock,
}

impl InFlight {
    fn begin(conn: Arc<Conn>, clock: Clock) -> Self {
        conn.requests.fetch_add(1, Ordering::Relaxed);
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        Self { conn, clock }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn
            .idle_since
            .store(self.clock.now(), Ordering::Release);
        self.conn.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Monotonic nanoseconds since the server started.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn instant(&self, nanos: u64) -> Instant {
        self.0 + Duration::from_nanos(nanos)
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The open connections, counted globally and per client address.
#[derive(Debug, Default)]
struct Registry {
    conns: HashMap<u64, Arc<Conn>>,
    per_source: HashMap<IpAddr, usize>,
    /// Connections not chosen for eviction.
    live: usize,
    next_id: u64,
}

/// A new connection was refused (nothing could be closed to make room).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refused {
    reason: Reason,
    /// Connections the limit counted against (global or from this address).
    held: usize,
}

/// A connection closed to admit another, and which limit it was closed for.
#[derive(Debug)]
struct Eviction {
    victim: Arc<Conn>,
    for_source: bool,
}

impl Registry {
    /// Registers a new connection from `peer`, choosing connections to close to make room.
    fn admit(
        &mut self,
        peer: SocketAddr,
        now: u64,
        limits: &Limits,
    ) -> Result<(Arc<Conn>, Vec<Eviction>), Refused> {
        let ip = peer.ip().to_canonical();
        let mut evictions = Vec::new();
        let from_source = self.per_source.get(&ip).copied().unwrap_or(0);
        if from_source >= limits.max_connections_per_source.max(1) {
            let victim = self.oldest_idle(Some(ip)).ok_or(Refused {
                reason: Reason::SourceLimit,
                held: from_source,
            })?;
            // One out, one in: the global count does not grow either.
            self.mark_evicted(&victim);
            evictions.push(Eviction {
                victim,
                for_source: true,
            });
        } else if self.live >= limits.max_connections.max(1) {
            let victim = self.oldest_idle(None).ok_or(Refused {
                reason: Reason::ConnectionLimit,
                held: self.live,
            })?;
            self.mark_evicted(&victim);
            evictions.push(Eviction {
                victim,
                for_source: false,
            });
        }
        self.next_id += 1;
        let conn = Arc::new(Conn::new(self.next_id, peer, now));
        self.conns.insert(conn.id, conn.clone());
        *self.per_source.entry(ip).or_insert(0) += 1;
        self.live += 1;
        Ok((conn, evictions))
    }

    /// The connection that has been without a request for longest (of `ip`, when given).
    fn oldest_idle(&self, ip: Option<IpAddr>) -> Option<Arc<Conn>> {
        self.conns
            .values()
            .filter(|c| !c.evicted.load(Ordering::Relaxed) && c.idle())
            .filter(|c| ip.is_none_or(|ip| c.ip == ip))
            .min_by_key(|c| (c.idle_since.load(Ordering::Acquire), c.id))
            .cloned()
    }

    fn mark_evicted(&mut self, c: &Conn) {
        c.evicted.store(true, Ordering::Relaxed);
        self.uncount(c.ip);
    }

    fn uncount(&mut self, ip: IpAddr) {
        self.live = self.live.saturating_sub(1);
        if let Some(n) = self.per_source.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&ip);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            if !c.evicted.load(Ordering::Relaxed) {
                self.uncount(c.ip);
            }
        }
    }
}

/// What the connection's clock says: close it now, or look again at `Ok(instant)`.
fn deadline(c: &Conn, now: u64, limits: &Limits) -> Result<u64, Reason> {
    let age_limit = c.accepted.saturating_add(nanos(limits.max_connection_age));
    if now >= age_limit {
        return Err(Reason::MaxAge);
    }
    let mut next = age_limit;
    let mut check = |at: u64, why: Reason| {
        if now >= at {
            Err(why)
        } else {
            next = next.min(at);
            Ok(())
        }
    };
    if c.idle() {
        let established = c.established.load(Ordering::Acquire);
        if c.requests.load(Ordering::Acquire) == 0 {
            if !c.first_byte.load(Ordering::Acquire) {
                check(
                    established.saturating_add(nanos(limits.first_byte_timeout)),
                    Reason::FirstByteTimeout,
                )?;
            }
            check(
                established.saturating_add(nanos(limits.header_read_timeout)),
                Reason::RequestTimeout,
            )?;
        } else {
            check(
                c.idle_since
                    .load(Ordering::Acquire)
                    .saturating_add(nanos(limits.idle_timeout)),
                Reason::IdleTimeout,
            )?;
        }
    } else {
        // Busy: the idle deadline starts only when the request ends, at least this far away.
        next = next.min(now.saturating_add(nanos(limits.idle_timeout)));
    }
    Ok(next)
}

/// Resolves when the connection's clock runs out, with the reason.
async fn watchdog(c: &Conn, clock: Clock, limits: &Limits) -> Reason {
    loop {
        match deadline(c, clock.now(), limits) {
            Err(why) => return why,
            Ok(at) => tokio::time::sleep_until(clock.instant(at).into()).await,
        }
    }
}

/// The TLS stream, noting when the first request byte arrives.
struct Watched<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.first_byte.store(true, Ordering::Release);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// State shared by the accept loop and every connection task.
struct Server<H> {
    handler: Arc<H>,
    limits: Limits,
    acceptor: tokio_rustls::TlsAcceptor,
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    registry: Mutex<Registry>,
    open: watch::Sender<usize>,
    clock: Clock,
    names: Names,
    refusal_logs: Throttle,
    eviction_logs: Throttle,
    timeout_logs: Throttle,
}

impl<H: Handler> Server<H> {
    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish_open(&self, n: usize) {
        self.open.send_replace(n);
        metrics::gauge!(self.names.open.clone()).set(n as f64);
    }

    /// Admits a new connection or refuses it; closes the connections chosen to make room.
    fn admit(&self, peer: SocketAddr) -> Option<Arc<Conn>> {
        let now = self.clock.now();
        let result = {
            let mut reg = self.registry();
            let r = reg.admit(peer, now, &self.limits);
            self.publish_open(reg.conns.len());
            r
        };
        match result {
            Ok((conn, evictions)) => {
                for e in evictions {
                    self.names.closed(Reason::Evicted);
                    let idle_s = Duration::from_nanos(
                        now.saturating_sub(e.victim.idle_since.load(Ordering::Acquire)),
                    )
                    .as_secs_f64();
                    if let Some(suppressed) = self.eviction_logs.allow() {
                        if e.for_source {
                            tracing::warn!(client = %e.victim.peer, admitted = %peer, idle_s, limit = self.limits.max_connections_per_source, suppressed, "closed this client's oldest idle connection to admit its new one: it holds --max-connections-per-source connections");
                        } else {
                            tracing::warn!(client = %e.victim.peer, admitted = %peer, idle_s, limit = self.limits.max_connections, suppressed, "closed the oldest idle connection to admit a new one: the server is at --max-connections; many idle connections suggest a flood, otherwise raise the limit");
                        }
                    }
                    e.victim.evict.notify_one();
                }
                Some(conn)
            }
            Err(refused) => {
                self.names.refused(refused.reason);
                if let Some(suppressed) = self.refusal_logs.allow() {
                    match refused.reason {
                        Reason::SourceLimit => {
                            tracing::warn!(client = %peer, held = refused.held, limit = self.limits.max_connections_per_source, suppressed, "connection refused: this address already holds --max-connections-per-source connections, each busy with a request")
                        }
                        _ => {
                            tracing::warn!(client = %peer, held = refused.held, limit = self.limits.max_connections, suppressed, "connection refused: all --max-connections connections are busy with requests; raise the limit or add replicas if this is legitimate load")
                        }
                    }
                }
                None
            }
        }
    }

    /// Closes the oldest idle connection to free a file descriptor.
    fn shed_for_fds(&self) {
        let victim = {
            let mut reg = self.registry();
            let v = reg.oldest_idle(None);
            if let Some(v) = &v {
                reg.mark_evicted(v);
            }
            v
        };
        if let Some(v) = victim {
            self.names.closed(Reason::Evicted);
            tracing::warn!(client = %v.peer, "out of file descriptors: closed the oldest idle connection; raise RLIMIT_NOFILE above --max-connections");
            v.evict.notify_one();
        }
    }

    fn remove(&self, id: u64) {
        let mut reg = self.registry();
        reg.remove(id);
        self.publish_open(reg.conns.len());
    }

    fn log_timeout(&self, peer: SocketAddr, why: Reason) {
        let l = &self.limits;
        let Some(suppressed) = self.timeout_logs.allow() else {
            return;
        };
        match why {
            Reason::HandshakeTimeout => {
                tracing::info!(client = %peer, timeout_s = l.handshake_timeout.as_secs_f64(), suppressed, "closed connection: TLS handshake not completed in time")
            }
            Reason::FirstByteTimeout => {
                tracing::info!(client = %peer, timeout_s = l.first_byte_timeout.as_secs_f64(), suppressed, "closed connection: no request within --first-byte-timeout of the TLS handshake")
            }
            Reason::RequestTimeout => {
                tracing::info!(client = %peer, timeout_s = l.header_read_timeout.as_secs_f64(), suppressed, "closed connection: first request incomplete after the header read timeout")
            }
            Reason::IdleTimeout => {
                tracing::debug!(client = %peer, timeout_s = l.idle_timeout.as_secs_f64(), "closed idle connection (--idle-timeout)")
            }
            Reason::MaxAge => {
                tracing::debug!(client = %peer, max_age_s = l.max_connection_age.as_secs_f64(), "draining connection: --max-connection-age reached")
            }
            _ => {}
        }
    }
}

/// Removes a connection from the registry when its task ends, however it ends.
struct Registered<H: Handler> {
    server: Arc<Server<H>>,
    id: u64,
}

impl<H: Handler> Drop for Registered<H> {
    fn drop(&mut self) {
        self.server.remove(self.id);
    }
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
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(limits.http2_keep_alive_interval)
        .keep_alive_timeout(limits.http2_keep_alive_timeout);
    let (open, mut open_rx) = watch::channel(0usize);
    let server = Arc::new(Server {
        handler,
        limits,
        acceptor: tokio_rustls::TlsAcceptor::from(tls),
        builder,
        registry: Mutex::new(Registry::default()),
        open,
        clock: Clock(Instant::now()),
        names: Names::new(limits.metrics_prefix),
        refusal_logs: Throttle::new(10),
        eviction_logs: Throttle::new(10),
        timeout_logs: Throttle::new(10),
    });
    server.publish_open(0);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    if e.raw_os_error().is_some_and(|n| OUT_OF_FDS.contains(&n)) {
                        server.shed_for_fds();
                    } else {
                        tracing::warn!(error = %e, "accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = crate::shutdown::signalled(&mut shutdown) => break,
        };
        let Some(conn) = server.admit(peer) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(
            server.clone(),
            conn,
            tcp,
            shutdown.clone(),
            grace,
        ));
    }
    drop(listener);
    let draining = Instant::now();
    let all_closed = tokio::select! {
        _ = open_rx.wait_for(|n| *n == 0) => true,
        _ = tokio::time::sleep(grace) => false,
    };
    // Each connection enforces the same grace itself, from the same signal: when the last ones
    // are cut at the deadline, the count can reach zero a moment before this timer fires.
    // That is still the grace running out, and the log must say so.
    if all_closed && draining.elapsed() + GRACE_SLACK < grace {
        tracing::info!("all connections closed");
    } else {
        tracing::warn!(
            grace_s = grace.as_secs(),
            "grace period over; closing remaining connections"
        );
    }
}

/// How close to the grace deadline the last connection may close and still count as cut by
/// it rather than finished.
const GRACE_SLACK: Duration = Duration::from_millis(100);

/// Serves one connection from accept to close.
async fn connection<H: Handler>(
    server: Arc<Server<H>>,
    conn: Arc<Conn>,
    tcp: TcpStream,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let _registered = Registered {
        server: server.clone(),
        id: conn.id,
    };
    let limits = server.limits;
    let peer = conn.peer;
    let tls = tokio::select! {
        _ = conn.evict.notified() => return,
        r = tokio::time::timeout(limits.handshake_timeout, server.acceptor.accept(tcp)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                server.names.closed(Reason::HandshakeTimeout);
                server.log_timeout(peer, Reason::HandshakeTimeout);
                return;
            }
        },
    };
    let clock = server.clock;
    conn.established.store(clock.now(), Ordering::Release);
    let io = TokioIo::new(Watched {
        inner: tls,
        conn: conn.clone(),
    });
    let handler = server.handler.clone();
    let for_service = conn.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(ClientAddr(peer));
        let busy = InFlight::begin(for_service.clone(), clock);
        let handler = handler.clone();
        async move {
            let resp = handler.handle(req).await;
            drop(busy);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let http = server.builder.serve_connection(io, service);
    tokio::pin!(http);
    let mut drain_until: Option<Instant> = None;
    loop {
        let hard_stop = drain_until.unwrap_or_else(|| Instant::now() + Duration::from_secs(86400));
        tokio::select! {
            _ = http.as_mut() => return,
            _ = conn.evict.notified() => return,
            why = watchdog(&conn, clock, &limits), if drain_until.is_none() => {
                server.names.closed(why);
                server.log_timeout(peer, why);
                if why != Reason::MaxAge {
                    return;
                }
                http.as_mut().graceful_shutdown();
                drain_until = Some(Instant::now() + AGE_DRAIN);
            }
            _ = crate::shutdown::signalled(&mut shutdown), if drain_until.is_none() => {
                http.as_mut().graceful_shutdown();
                drain_until = Some(Instant::now() + grace);
            }
            _ = tokio::time::sleep_until(hard_stop.into()), if drain_until.is_some() => return,
            // Draining, nothing in progress: the client had a moment to see the GOAWAY (an
            // HTTP/2 client that never answers its ping would otherwise hold on until the
            // hard stop).
            _ = tokio::time::sleep(Duration::from_secs(1)), if drain_until.is_some() => {
                if conn.idle() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn limits(max: usize, per_source: usize) -> Limits {
        Limits {
            max_connections: max,
            max_connections_per_source: per_source,
            ..Limits::default()
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn at_the_limit_the_oldest_idle_connection_makes_room() {
        let l = limits(3, 10);
        let mut reg = Registry::default();
        let (a, _) = reg.admit(addr("10.0.0.1:1"), SEC, &l).unwrap();
        let (b, _) = reg.admit(addr("10.0.0.2:1"), 2 * SEC, &l).unwrap();
        let (c, _) = reg.admit(addr("10.0.0.3:1"), 3 * SEC, &l).unwrap();
        // `a` is busy with a request: it is never the one closed.
        a.in_flight.store(1, Ordering::Release);
        let (d, ev) = reg.admit(addr("10.0.0.4:1"), 4 * SEC, &l).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(
            ev[0].victim.id, b.id,
            "the oldest idle connection goes first"
        );
        assert!(!ev[0].for_source);
        assert!(b.evicted.load(Ordering::Relaxed));
        assert_eq!(reg.live, 3);
        // `c` finished a request long ago, `d` is new: `c` goes next, even though it is
        // younger than the busy `a`.
        c.idle_since.store(3 * SEC + 1, Ordering::Release);
        let (_e, ev) = reg.admit(addr("10.0.0.5:1"), 5 * SEC, &l).unwrap();
        assert_eq!(ev[0].victim.id, c.id);
        // The closed connections' tasks leave; the counts do not change twice.
        reg.remove(b.id);
        reg.remove(c.id);
        assert_eq!(reg.live, 3);
        assert_eq!(reg.conns.len(), 3);
        assert!(!d.evicted.load(Ordering::Relaxed));
    }

    #[test]
    fn when_every_connection_is_busy_new_ones_are_refused() {
        let l = limits(2, 10);
        let mut reg = Registry::default();
        for i in 1..=2 {
            let (c, _) = reg
                .admit(addr(&format!("10.0.0.{i}:1")), i * SEC, &l)
                .unwrap();
            c.in_flight.store(1, Ordering::Release);
        }
        let r = reg.admit(addr("10.0.0.9:1"), 3 * SEC, &l).unwrap_err();
        assert_eq!(
            r,
            Refused {
                reason: Reason::ConnectionLimit,
                held: 2
            }
        );
        assert_eq!(reg.conns.len(), 2);
        assert_eq!(reg.live, 2);
    }

    #[test]
    fn per_source_limit_evicts_only_that_sources_connections() {
        let l = limits(100, 2);
        let mut reg = Registry::default();
        let (other, _) = reg.admit(addr("10.0.0.2:1"), SEC, &l).unwrap();
        let (a1, _) = reg.admit(addr("10.0.0.1:1"), 2 * SEC, &l).unwrap();
        let (a2, _) = reg.admit(addr("10.0.0.1:2"), 3 * SEC, &l).unwrap();
        let (_a3, ev) = reg.admit(addr("10.0.0.1:3"), 4 * SEC, &l).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(
            ev[0].victim.id, a1.id,
            "not the older connection of 10.0.0.2"
        );
        assert!(ev[0].for_source);
        assert!(!other.evicted.load(Ordering::Relaxed));
        assert_eq!(reg.per_source[&"10.0.0.1".parse::<IpAddr>().unwrap()], 2);
        // Both remaining connections of the source busy: refused, and nothing else closed.
        a2.in_flight.store(1, Ordering::Release);
        _a3.in_flight.store(1, Ordering::Release);
        let r = reg.admit(addr("10.0.0.1:4"), 5 * SEC, &l).unwrap_err();
        assert_eq!(r.reason, Reason::SourceLimit);
        assert_eq!(r.held, 2);
        // IPv4-mapped IPv6 is the same source.
        let r = reg
            .admit(addr("[::ffff:10.0.0.1]:5"), 6 * SEC, &l)
            .unwrap_err();
        assert_eq!(r.reason, Reason::SourceLimit);
    }

    #[test]
    fn a_per_source_victim_also_makes_room_globally() {
        let l = limits(2, 1);
        let mut reg = Registry::default();
        let (a, _) = reg.admit(addr("10.0.0.1:1"), SEC, &l).unwrap();
        let (b, _) = reg.admit(addr("10.0.0.2:1"), 2 * SEC, &l).unwrap();
        b.in_flight.store(1, Ordering::Release);
        // 10.0.0.1 is at its limit with an idle connection; the server is full and `a` is
        // the only idle one: `a` makes room for the source, then the global limit is met.
        let (_c, ev) = reg.admit(addr("10.0.0.1:2"), 3 * SEC, &l).unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].victim.id, a.id);
        assert_eq!(reg.live, 2);
    }

    #[test]
    fn the_clock_closes_silent_idle_and_old_connections() {
        let l = Limits {
            first_byte_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connection_age: Duration::from_secs(600),
            ..Limits::default()
        };
        let c = Conn::new(1, addr("10.0.0.1:1"), 0);
        c.established.store(SEC, Ordering::Release);
        assert_eq!(deadline(&c, 2 * SEC, &l), Ok(6 * SEC));
        assert_eq!(deadline(&c, 6 * SEC, &l), Err(Reason::FirstByteTimeout));
        // A first byte, but no complete request: the request deadline.
        c.first_byte.store(true, Ordering::Release);
        assert_eq!(deadline(&c, 6 * SEC, &l), Ok(11 * SEC));
        assert_eq!(deadline(&c, 11 * SEC, &l), Err(Reason::RequestTimeout));
        // Busy: never closed for idleness, looked at again later.
        c.requests.store(1, Ordering::Release);
        c.in_flight.store(1, Ordering::Release);
        assert_eq!(deadline(&c, 100 * SEC, &l), Ok(160 * SEC));
        // Idle since the request ended.
        c.in_flight.store(0, Ordering::Release);
        c.idle_since.store(100 * SEC, Ordering::Release);
        assert_eq!(deadline(&c, 120 * SEC, &l), Ok(160 * SEC));
        assert_eq!(deadline(&c, 160 * SEC, &l), Err(Reason::IdleTimeout));
        // Age applies busy or not.
        c.in_flight.store(1, Ordering::Release);
        assert_eq!(deadline(&c, 590 * SEC, &l), Ok(600 * SEC));
        assert_eq!(deadline(&c, 600 * SEC, &l), Err(Reason::MaxAge));
    }

    #[test]
    fn throttled_logs_report_what_they_left_out() {
        let t = Throttle::new(2);
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        if let Ok(mut s) = t.state.lock() {
            s.0 = Instant::now()
                .checked_sub(Duration::from_secs(2))
                .unwrap_or(s.0);
        }
        assert_eq!(t.allow(), Some(2));
    }
}
