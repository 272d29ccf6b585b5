//! Discovery client: learns from `moat-destination` who must answer at each address the app
//! dials, so outbound can pin the exact identity in the handshake (or pick a Service's
//! endpoint) instead of accepting any identity of the trust domain.
//!
//! Subscriptions are on demand: the first connection to an address registers it and waits
//! (bounded) for its first answer; one long-poll (`POST /v1/watch`, HTTP/2, mutual TLS with
//! the server's identity pinned) keeps every registered address current. When the service is
//! unreachable the last answers stay in force and `moat_proxy_discovery_connected` says 0;
//! an address never answered is refused by outbound (`unknown_destination`), never guessed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use moat_core::discovery::{
    server_identity, Known, Resolution, WatchRequest, WatchResponse, MAX_TARGETS, WATCH_PATH,
};
use moat_core::spiffe::TrustDomain;
use moat_core::tls::{self, CurrentCert, SpiffeVerifier};
use moat_core::TrustBundle;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

/// Gauge: 1 while the last exchange with the discovery service succeeded.
pub const CONNECTED: &str = "moat_proxy_discovery_connected";
/// Gauge: destination addresses kept current.
pub const TARGETS: &str = "moat_proxy_discovery_targets";
/// Counter: resolutions received.
pub const UPDATES: &str = "moat_proxy_discovery_updates_total";
/// Counter: failed exchanges with the discovery service, by `reason`.
pub const ERRORS: &str = "moat_proxy_discovery_errors_total";
/// Counter: lookups by outbound, by `result` (`cached`, `fetched`, `unanswered`).
pub const LOOKUPS: &str = "moat_proxy_discovery_lookups_total";

/// How long the server may hold a watch; well under the h2 keepalive so a dead server is
/// noticed by the keepalive, not by a stuck request.
const WAIT_S: u64 = 30;
/// An address nobody dialed for this long stops being watched.
const IDLE: Duration = Duration::from_secs(600);
/// Largest answer accepted (a Service with thousands of endpoints fits easily).
const MAX_BODY: usize = 16 << 20;

#[derive(Debug)]
struct Entry {
    version: u64,
    resolution: Option<Arc<Resolution>>,
    used: Instant,
}

/// The addresses being watched and what is known about each.
#[derive(Debug)]
pub struct Resolver {
    targets: Mutex<HashMap<SocketAddr, Entry>>,
    /// Bumped whenever an answer is applied: wakes lookups waiting for their first answer.
    answered: watch::Sender<u64>,
    /// A new address was registered: the held watch is re-issued to include it.
    wanted: Notify,
}

impl Default for Resolver {
    fn default() -> Self {
        Self {
            targets: Mutex::new(HashMap::new()),
            answered: watch::channel(0).0,
            wanted: Notify::new(),
        }
    }
}

impl Resolver {
    /// What is known about `target`, waiting up to `wait` for a first answer. `None`: the
    /// discovery service has not answered for it (unreachable, or slower than `wait`).
    pub async fn resolve(&self, target: SocketAddr, wait: Duration) -> Option<Arc<Resolution>> {
        let mut answered = self.answered.subscribe();
        if let Some(r) = self.lookup(target) {
            metrics::counter!(LOOKUPS, "result" => "cached").increment(1);
            return Some(r);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, answered.changed()).await {
                Ok(Ok(())) => {
                    if let Some(r) = self.current(target) {
                        metrics::counter!(LOOKUPS, "result" => "fetched").increment(1);
                        return Some(r);
                    }
                }
                _ => {
                    metrics::counter!(LOOKUPS, "result" => "unanswered").increment(1);
                    return None;
                }
            }
        }
    }

    /// The answer held for `target` now, without waiting or registering it: for a connection
    /// that already resolved it and re-reads it per request.
    pub fn current(&self, target: SocketAddr) -> Option<Arc<Resolution>> {
        let mut map = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.get_mut(&target)?;
        // In use: a long-lived connection keeps its Service watched.
        e.used = Instant::now();
        e.resolution.clone()
    }

    /// The current answer for `target`; registers it (and wakes the watch) when new.
    fn lookup(&self, target: SocketAddr) -> Option<Arc<Resolution>> {
        let mut map = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some(e) = map.get_mut(&target) {
            e.used = now;
            return e.resolution.clone();
        }
        if map.len() >= MAX_TARGETS {
            // Bounded state: the least recently dialed address makes room.
            if let Some(oldest) = map.iter().min_by_key(|(_, e)| e.used).map(|(a, _)| *a) {
                map.remove(&oldest);
            }
        }
        map.insert(
            target,
            Entry {
                version: 0,
                resolution: None,
                used: now,
            },
        );
        metrics::gauge!(TARGETS).set(map.len() as f64);
        drop(map);
        self.wanted.notify_one();
        None
    }

    /// The next watch request: every address dialed recently, with the version held.
    fn request(&self) -> WatchRequest {
        let mut map = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, e| now.duration_since(e.used) < IDLE);
        metrics::gauge!(TARGETS).set(map.len() as f64);
        WatchRequest {
            targets: map
                .iter()
                .map(|(t, e)| Known {
                    target: *t,
                    version: e.version,
                })
                .collect(),
            wait_s: WAIT_S,
        }
    }

    fn apply(&self, answer: WatchResponse) {
        if answer.updates.is_empty() {
            return;
        }
        let mut map = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        for u in answer.updates {
            // An answer for an address dropped meanwhile is not resurrected.
            if let Some(e) = map.get_mut(&u.target) {
                metrics::counter!(UPDATES).increment(1);
                e.version = u.version;
                e.resolution = Some(Arc::new(u.resolution));
            }
        }
        drop(map);
        self.answered.send_modify(|g| *g += 1);
    }

    /// Keeps every registered address current until `stop` turns true.
    pub async fn run(self: Arc<Self>, server: Server, mut stop: watch::Receiver<bool>) {
        let mut conn: Option<SendRequest<Full<Bytes>>> = None;
        let mut backoff = Backoff::default();
        let mut outage = false;
        metrics::gauge!(CONNECTED).set(0.0);
        loop {
            if *stop.borrow() {
                return;
            }
            let req = self.request();
            if req.targets.is_empty() {
                tokio::select! {
                    _ = self.wanted.notified() => continue,
                    _ = stop.changed() => return,
                }
            }
            let sender = match conn.take().filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => match server.connect().await {
                    Ok(c) => c,
                    Err(e) => {
                        self.failed(&mut outage, &e, &server);
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next()) => continue,
                            _ = stop.changed() => return,
                        }
                    }
                },
            };
            let started = Instant::now();
            tokio::select! {
                r = watch_once(sender.clone(), &req) => match r {
                    Ok(answer) => {
                        if outage {
                            tracing::info!(server = %server.addr, "discovery service reachable again");
                            outage = false;
                        }
                        metrics::gauge!(CONNECTED).set(1.0);
                        backoff.reset();
                        let empty = answer.updates.is_empty();
                        self.apply(answer);
                        conn = Some(sender);
                        // A server that answers "nothing changed" at once would make this spin.
                        if empty && started.elapsed() < Duration::from_millis(100) {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                    Err(e) => {
                        self.failed(&mut outage, &e, &server);
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next()) => {}
                            _ = stop.changed() => return,
                        }
                    }
                },
                // A new address: drop the held request (the stream is reset) and ask again.
                _ = self.wanted.notified() => conn = Some(sender),
                _ = stop.changed() => return,
            }
        }
    }

    fn failed(&self, outage: &mut bool, e: &Error, server: &Server) {
        metrics::gauge!(CONNECTED).set(0.0);
        metrics::counter!(ERRORS, "reason" => e.reason()).increment(1);
        if !*outage {
            // Once per outage: the last answers stay in force, new addresses are refused.
            tracing::warn!(server = %server.addr, error = %e, "discovery service unreachable; keeping the last answers, refusing destinations never resolved");
            *outage = true;
        } else {
            tracing::debug!(server = %server.addr, error = %e, "discovery service still unreachable");
        }
    }
}

/// Why an exchange with the discovery service failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name did not resolve or the TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The handshake failed (including a server that is not the discovery service).
    #[error("mTLS handshake failed ({reason}): {source}")]
    Handshake {
        /// Bounded label.
        reason: &'static str,
        /// The TLS error.
        source: std::io::Error,
    },
    /// TCP connect plus handshake took too long.
    #[error("timed out connecting")]
    Timeout,
    /// HTTP/2 failed.
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    /// The server answered with an error status.
    #[error("server answered {status}: {body}")]
    Status {
        /// The status.
        status: http::StatusCode,
        /// The start of its body.
        body: String,
    },
    /// The answer was not a watch response.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// No workload certificate yet.
    #[error("no workload certificate yet")]
    NoIdentity,
}

impl Error {
    /// Bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect_failed",
            Self::Handshake { reason, .. } => reason,
            Self::Timeout => "timeout",
            Self::Http(_) => "http",
            Self::Status { .. } => "status",
            Self::Malformed(_) => "malformed",
            Self::NoIdentity => "no_identity",
        }
    }
}

/// Where the discovery service is, and how to prove it is the one.
#[derive(Debug, Clone)]
pub struct Server {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
    cert: Arc<CurrentCert>,
    connect_timeout: Duration,
}

impl Server {
    /// `addr` (`host:port`, resolved at every connect), answering with the discovery
    /// service's SVID in `td`, verified against `bundle`; we present `cert`.
    pub fn new(
        addr: String,
        td: &TrustDomain,
        cert: Arc<CurrentCert>,
        bundle: Arc<arc_swap::ArcSwap<TrustBundle>>,
        provider: Arc<CryptoProvider>,
        connect_timeout: Duration,
    ) -> Result<Self, rustls::Error> {
        let verifier = SpiffeVerifier::new(bundle, td.clone(), provider.clone())
            .expecting(Some(server_identity(td)));
        let mut cfg = tls::mesh_client_config(cert.clone(), verifier, provider)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            addr,
            tls: Arc::new(cfg),
            cert,
            connect_timeout,
        })
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Error> {
        if self.cert.get().is_none() {
            return Err(Error::NoIdentity);
        }
        let dial = async {
            let tcp = TcpStream::connect(&self.addr)
                .await
                .map_err(|source| Error::Connect {
                    addr: self.addr.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let peer = tcp.peer_addr().map_err(|source| Error::Connect {
                addr: self.addr.clone(),
                source,
            })?;
            // SNI is off and the verifier checks the SPIFFE ID; the name only fills the API.
            let name = rustls_pki_types::ServerName::IpAddress(peer.ip().into());
            tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|source| Error::Handshake {
                    reason: tls::failure_reason(&source),
                    source,
                })
        };
        let tls = tokio::time::timeout(self.connect_timeout, dial)
            .await
            .map_err(|_| Error::Timeout)??;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "discovery connection closed");
            }
        });
        Ok(sender)
    }
}

async fn watch_once(
    mut sender: SendRequest<Full<Bytes>>,
    req: &WatchRequest,
) -> Result<WatchResponse, Error> {
    let body = serde_json::to_vec(req).map_err(|e| Error::Malformed(e.to_string()))?;
    let request = http::Request::post(WATCH_PATH)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Error::Malformed(e.to_string()))?;
    sender.ready().await?;
    let resp = sender.send_request(request).await?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| Error::Malformed(format!("reading the answer: {e}")))?
        .to_bytes();
    if !status.is_success() {
        let body = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
        return Err(Error::Status { status, body });
    }
    serde_json::from_slice(&bytes).map_err(|e| Error::Malformed(e.to_string()))
}

/// Exponential backoff with jitter, 100 ms to 10 s.
#[derive(Debug, Default)]
struct Backoff {
    attempt: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = 100u64 << self.attempt.min(7);
        self.attempt = self.attempt.saturating_add(1);
        let capped = base.min(10_000);
        // Up to 50 % jitter, so restarted replicas don't reconnect in lockstep.
        Duration::from_millis(capped / 2 + fastrand::u64(0..=capped / 2))
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::discovery::Update;
    use moat_core::SpiffeId;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pod(sa: &str) -> Resolution {
        Resolution::Pod {
            pod: format!("shop/{sa}-0"),
            identity: SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap(),
            meshed: true,
        }
    }

    #[tokio::test]
    async fn a_first_lookup_registers_and_waits_for_the_answer() {
        let r = Arc::new(Resolver::default());
        let t = addr("10.0.0.7:8080");
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move { r.resolve(t, Duration::from_secs(5)).await })
        };
        // The watch loop would now send this request.
        let req = loop {
            let req = r.request();
            if !req.targets.is_empty() {
                break req;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(
            req.targets,
            vec![Known {
                target: t,
                version: 0
            }]
        );
        let res = pod("api");
        r.apply(WatchResponse {
            updates: vec![Update {
                target: t,
                version: res.version(),
                resolution: res.clone(),
            }],
        });
        assert_eq!(waiter.await.unwrap().as_deref(), Some(&res));
        // Now cached, and the next request says which version is held.
        assert_eq!(r.resolve(t, Duration::ZERO).await.as_deref(), Some(&res));
        assert_eq!(r.request().targets[0].version, res.version());
    }

    #[tokio::test]
    async fn an_unanswered_lookup_gives_up_after_the_bounded_wait() {
        let r = Resolver::default();
        let started = Instant::now();
        assert!(r
            .resolve(addr("10.0.0.9:80"), Duration::from_millis(150))
            .await
            .is_none());
        assert!(started.elapsed() >= Duration::from_millis(150));
        // Answers for addresses nobody asked about are ignored.
        r.apply(WatchResponse {
            updates: vec![Update {
                target: addr("10.0.0.10:80"),
                version: 3,
                resolution: Resolution::Unknown,
            }],
        });
        assert!(r.current(addr("10.0.0.10:80")).is_none());
    }

    #[test]
    fn state_is_bounded() {
        let r = Resolver::default();
        for i in 0..(MAX_TARGETS + 10) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i as u32);
            r.lookup(SocketAddr::new(ip.into(), 80));
        }
        assert_eq!(r.request().targets.len(), MAX_TARGETS);
    }

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::default();
        let first = b.next();
        assert!(first <= Duration::from_millis(100));
        for _ in 0..20 {
            assert!(b.next() <= Duration::from_secs(10));
        }
        assert!(b.next() >= Duration::from_secs(5));
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
