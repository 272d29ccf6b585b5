//! Per-request balancing of an app's HTTP connection (HTTP/1, or HTTP/2 and so gRPC) over a
//! Service's endpoints.
//!
//! The app's connection is served by a hyper server. Each request takes the Service's endpoints
//! from discovery's latest answer, picks one with [`Balancer`] and goes out on that endpoint's
//! own connection: a tunnel stream pinned to the endpoint's identity, dialed on first use and
//! then reused by every later request of this app connection that picks the endpoint (HTTP/2
//! multiplexes them; HTTP/1 has one request at a time on an app connection, so one connection
//! per endpoint is enough). An HTTP/1 upgrade (WebSocket) stays on its endpoint's connection,
//! which then becomes a byte copy.
//!
//! * An endpoint that leaves the Service gets no new request; its connection is let go and
//!   closes once the requests on it have finished, so scaling down fails none.
//! * A request that could not be sent (the dial failed, or the endpoint's connection was
//!   closing) goes to another endpoint. A request that was sent is never replayed: it may not
//!   be idempotent, so the app gets a 502 marked [`PROXY_ERROR`](crate::http::PROXY_ERROR).
//! * An endpoint stays "in flight" for the balancer until its response head arrives.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ::http::{Request, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::TokioIo;
use moat_core::discovery::{Endpoint, Resolution};
use moat_core::spiffe::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use super::Balancer;
use crate::http::{self, Body, ReqMetrics};
use crate::metrics::{self as m, Direction, RefuseReason};

/// How many endpoints one request tries before the app gets a 503.
const MAX_ATTEMPTS: usize = 3;
/// How long an HTTP/1 request waits for its endpoint connection to finish the previous
/// response's end before another connection is dialed.
const READY_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// The HTTP version spoken with the app, and so with every endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// HTTP/1.1 (and 1.0).
    Http1,
    /// HTTP/2 (gRPC).
    Http2,
}

/// An endpoint connection's request sender.
enum Sender {
    Http1(http1::SendRequest<Incoming>),
    Http2(http2::SendRequest<Incoming>),
}

impl Sender {
    /// Whether a request may be sent on it now (HTTP/1: once the previous response ended).
    fn usable(&self) -> bool {
        match self {
            Sender::Http1(s) => !s.is_closed(),
            Sender::Http2(s) => s.is_ready(),
        }
    }

    async fn send(
        &mut self,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, TrySendError<Request<Incoming>>> {
        match self {
            Sender::Http1(s) => {
                // The app only sends its next request once it has our last response, whose end
                // the connection may not have processed yet.
                let _ = tokio::time::timeout(READY_WAIT, s.ready()).await;
                s.try_send_request(req).await
            }
            Sender::Http2(s) => s.try_send_request(req).await,
        }
    }
}

/// A dial in progress: the stream to an endpoint, and the identity it proved.
pub(crate) type Dialing<S> =
    Pin<Box<dyn Future<Output = Result<(S, SpiffeId), RefuseReason>> + Send>>;

/// Starts a dial to an endpoint.
pub(crate) type Dialer<S> = Box<dyn Fn(&Endpoint) -> Dialing<S> + Send + Sync>;

/// What a balanced connection needs from the rest of the proxy.
pub(crate) struct Service<S> {
    /// `namespace/name`, for logs.
    pub name: String,
    /// The Service's endpoints now (discovery's latest answer; cheap to call per request).
    pub endpoints: Box<dyn Fn() -> Arc<Resolution> + Send + Sync>,
    /// Opens a stream to an endpoint, verified as the endpoint's identity in the handshake.
    pub dial: Dialer<S>,
    /// Endpoint load, shared with the rest of the proxy.
    pub balancer: Arc<Balancer>,
    /// Our own identity, for metrics.
    pub local: Arc<str>,
}

/// One endpoint's connection. HTTP/2 ones are shared by the requests in flight (`sender` is
/// cloned); an HTTP/1 one is taken out of [`Conns`] for its request and put back after.
struct Upstream {
    sender: Sender,
    metrics: Arc<ReqMetrics>,
    /// Whether a request has gone out on it: the first also waits for the connection's set-up
    /// on the far side (the peer sidecar reaching its app, HTTP/2 settings), so its round
    /// trip says nothing about how fast the endpoint answers and is not sampled.
    used: Arc<AtomicBool>,
}

struct Conns {
    /// The answer `by_addr` was last pruned against.
    seen: Arc<Resolution>,
    by_addr: HashMap<SocketAddr, Upstream>,
}

struct Shared<S> {
    svc: Service<S>,
    version: Version,
    conns: Mutex<Conns>,
}

impl Upstream {
    /// A handle for one request: the same connection for HTTP/2.
    fn share(&self) -> Option<Upstream> {
        match &self.sender {
            Sender::Http2(s) => Some(Upstream {
                sender: Sender::Http2(s.clone()),
                metrics: self.metrics.clone(),
                used: self.used.clone(),
            }),
            Sender::Http1(_) => None,
        }
    }
}

impl<S> Shared<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current endpoints; connections to endpoints no longer listed are let go (their
    /// requests in flight finish, then the connection closes).
    fn endpoints(&self) -> Arc<Resolution> {
        let now = (self.svc.endpoints)();
        let mut conns = self.conns();
        if !Arc::ptr_eq(&conns.seen, &now) {
            let listed = now.endpoints();
            conns
                .by_addr
                .retain(|addr, _| listed.iter().any(|e| e.addr == *addr));
            conns.seen = now.clone();
        }
        now
    }

    /// The endpoint's connection for one request, dialed now if there is none usable.
    async fn upstream(&self, ep: &Endpoint) -> Result<Upstream, RefuseReason> {
        {
            let mut conns = self.conns();
            if let Some(up) = conns.by_addr.get(&ep.addr) {
                if up.sender.usable() {
                    match up.share() {
                        Some(shared) => return Ok(shared),
                        None => {
                            if let Some(up) = conns.by_addr.remove(&ep.addr) {
                                return Ok(up);
                            }
                        }
                    }
                }
            }
        }
        let (io, peer) = (self.svc.dial)(ep).await?;
        let up = self.attach(ep.addr, io, &peer).await?;
        Ok(match up.share() {
            Some(shared) => {
                self.conns().by_addr.insert(ep.addr, up);
                shared
            }
            None => up,
        })
    }

    /// Puts an HTTP/1 connection back after its request (HTTP/2 ones never left).
    fn give_back(&self, addr: SocketAddr, up: Upstream) {
        if let Sender::Http1(_) = up.sender {
            self.conns().by_addr.insert(addr, up);
        }
    }

    /// Starts HTTP over a dialed stream.
    async fn attach(
        &self,
        addr: SocketAddr,
        io: S,
        peer: &SpiffeId,
    ) -> Result<Upstream, RefuseReason> {
        let failed = |e: hyper::Error| {
            tracing::debug!(endpoint = %addr, error = %e, "HTTP handshake with the endpoint failed");
            RefuseReason::ConnectFailed
        };
        let sender = match self.version {
            Version::Http2 => {
                let (sender, conn) = http::http2_client()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(failed)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(endpoint = %addr, error = %e, "endpoint HTTP/2 connection ended");
                    }
                });
                Sender::Http2(sender)
            }
            Version::Http1 => {
                let (sender, conn) = http::http1_client()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(failed)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(endpoint = %addr, error = %e, "endpoint HTTP/1 connection ended");
                    }
                });
                Sender::Http1(sender)
            }
        };
        Ok(Upstream {
            sender,
            metrics: Arc::new(ReqMetrics::new(
                Direction::Outbound,
                peer.as_str(),
                &self.svc.local,
            )),
            used: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Drops `addr`'s connection if it is `broken` (an HTTP/1 one was already taken out).
    fn forget(&self, addr: SocketAddr, broken: &Upstream) {
        let mut conns = self.conns();
        if conns
            .by_addr
            .get(&addr)
            .is_some_and(|u| Arc::ptr_eq(&u.used, &broken.used))
        {
            conns.by_addr.remove(&addr);
        }
    }

    /// Sends one request to an endpoint the balancer picks, failing over while it was not
    /// sent.
    async fn forward(&self, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let current = self.endpoints();
        let mut tried = Vec::new();
        let mut last = RefuseReason::NoEndpoints;
        // Taken once: a request not sent to one endpoint keeps its upgrade for the next.
        let mut client_upgrade = (self.version == Version::Http1 && http::is_upgrade(&req))
            .then(|| hyper::upgrade::on(&mut req));
        while tried.len() < MAX_ATTEMPTS {
            let Some(pick) = self.svc.balancer.pick(current.endpoints(), &tried) else {
                break;
            };
            let addr = pick.endpoint.addr;
            let mut up = match self.upstream(&pick.endpoint).await {
                Ok(up) => up,
                Err(reason) => {
                    pick.failed();
                    tracing::info!(service = %self.svc.name, endpoint = %addr, %reason, "endpoint unavailable; trying another");
                    last = reason;
                    tried.push(addr);
                    continue;
                }
            };
            // The sample is the request's own round trip: a dial it waited for says how far
            // the endpoint is, not how fast it answers, and one slow handshake would otherwise
            // keep the endpoint out of the picks until its estimate decays.
            let sent = Instant::now();
            let first = !up.used.swap(true, Ordering::Relaxed);
            match up.sender.send(req).await {
                Ok(mut resp) => {
                    if !first {
                        pick.answered(sent.elapsed());
                    }
                    up.metrics.record(Some(resp.status()), start);
                    match client_upgrade.take() {
                        // The connection is the upgraded stream's now: it is not given back.
                        Some(client) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                            let upstream = hyper::upgrade::on(&mut resp);
                            tokio::spawn(http::splice_upgrade(client, upstream));
                        }
                        _ => self.give_back(addr, up),
                    }
                    return resp.map(Either::Left);
                }
                Err(mut e) => {
                    pick.failed();
                    self.forget(addr, &up);
                    match e.take_message() {
                        Some(unsent) => {
                            tracing::debug!(service = %self.svc.name, endpoint = %addr, error = %e.error(), "request not sent; trying another endpoint");
                            req = unsent;
                            last = RefuseReason::ConnectFailed;
                            tried.push(addr);
                        }
                        None => {
                            up.metrics.record(None, start);
                            return http::upstream_failed(e.error());
                        }
                    }
                }
            }
        }
        m::refused(Direction::Outbound, last);
        tracing::warn!(service = %self.svc.name, tried = tried.len(), reason = %last, "no endpoint of the Service could take the request");
        http::synthetic(
            StatusCode::SERVICE_UNAVAILABLE,
            http::PROXY_ERROR,
            last.as_str(),
            format!(
                "moat: no endpoint of {} could take the request ({last})\n",
                self.svc.name
            ),
        )
    }
}

/// Serves the app's connection `app` (speaking `version`), balancing each request over
/// `svc`'s endpoints, until either side closes or `drain` asks for a graceful stop. `first` is
/// a stream already open to one endpoint (the one that decided the protocol), used as that
/// endpoint's connection.
pub(crate) async fn serve<C, S>(
    app: C,
    version: Version,
    first: Option<(SocketAddr, S, SpiffeId)>,
    svc: Service<S>,
    drain: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let seen = (svc.endpoints)();
    let shared = Arc::new(Shared {
        svc,
        version,
        conns: Mutex::new(Conns {
            seen,
            by_addr: HashMap::new(),
        }),
    });
    if let Some((addr, io, peer)) = first {
        // A failure here only means the first request dials afresh.
        if let Ok(up) = shared.attach(addr, io, &peer).await {
            shared.conns().by_addr.insert(addr, up);
        }
    }
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(shared.forward(req).await) }
    });
    let io = TokioIo::new(app);
    match version {
        Version::Http2 => {
            let server = http::http2_server().serve_connection(io, svc);
            until_drained(server, |c| c.graceful_shutdown(), drain).await
        }
        Version::Http1 => {
            let server = http::http1_server(Direction::Outbound)
                .serve_connection(io, svc)
                .with_upgrades();
            until_drained(server, |c| c.graceful_shutdown(), drain).await
        }
    }
}

/// Runs a server connection until it ends, shutting it down gracefully (in-flight requests
/// finish) once `drain` is signalled.
async fn until_drained<F>(
    conn: F,
    graceful: fn(Pin<&mut F>),
    mut drain: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    F: Future<Output = Result<(), hyper::Error>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = moat_core::shutdown::signalled(&mut drain) => {
            graceful(conn.as_mut());
            conn.await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper_util::rt::TokioExecutor;
    use tokio::io::DuplexStream;

    const LOCAL: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn identity(sa: &str) -> SpiffeId {
        SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap()
    }

    fn endpoint(n: u8) -> Endpoint {
        Endpoint {
            addr: SocketAddr::from(([10, 0, 0, n], 8080)),
            pod: Some(format!("shop/api-{n}")),
            identity: Some(identity("api")),
            meshed: true,
            zone: None,
            weight: 1,
        }
    }

    fn service(endpoints: &[Endpoint]) -> Arc<Resolution> {
        Arc::new(Resolution::Service {
            service: "shop/api".into(),
            endpoints: endpoints.to_vec(),
        })
    }

    /// Endpoints served in memory: each answers with its own address; `/slow` waits for
    /// `release`. Dials to addresses in `down` fail.
    #[derive(Clone)]
    struct Fleet {
        answer: Arc<Mutex<Arc<Resolution>>>,
        down: Arc<Mutex<Vec<SocketAddr>>>,
        dials: Arc<AtomicUsize>,
        release: Arc<tokio::sync::Notify>,
    }

    impl Fleet {
        fn new(endpoints: &[Endpoint]) -> Self {
            Self {
                answer: Arc::new(Mutex::new(service(endpoints))),
                down: Arc::default(),
                dials: Arc::default(),
                release: Arc::default(),
            }
        }

        fn set(&self, endpoints: &[Endpoint]) {
            *self.answer.lock().unwrap() = service(endpoints);
        }

        fn service(&self) -> Service<DuplexStream> {
            let answer = self.answer.clone();
            let fleet = self.clone();
            Service {
                name: "shop/api".into(),
                endpoints: Box::new(move || answer.lock().unwrap().clone()),
                dial: Box::new(move |ep: &Endpoint| {
                    let (fleet, addr) = (fleet.clone(), ep.addr);
                    Box::pin(async move {
                        fleet.dials.fetch_add(1, Ordering::SeqCst);
                        if fleet.down.lock().unwrap().contains(&addr) {
                            return Err(RefuseReason::ConnectFailed);
                        }
                        let (ours, theirs) = tokio::io::duplex(64 * 1024);
                        tokio::spawn(endpoint_server(theirs, addr, fleet.release.clone()));
                        Ok((ours, identity("api")))
                    })
                }),
                balancer: Arc::new(Balancer::default()),
                local: Arc::from(LOCAL),
            }
        }
    }

    async fn endpoint_server(
        io: DuplexStream,
        addr: SocketAddr,
        release: Arc<tokio::sync::Notify>,
    ) {
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let release = release.clone();
            async move {
                if req.uri().path() == "/slow" {
                    release.notified().await;
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(addr.to_string()))))
            }
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(io), svc)
            .await;
    }

    /// The app's side of a balanced [`serve`] speaking `version`.
    fn connect(fleet: &Fleet, version: Version) -> DuplexStream {
        let (app, proxy_side) = tokio::io::duplex(64 * 1024);
        let (_never, drain) = watch::channel(false);
        let svc = fleet.service();
        tokio::spawn(async move {
            let _keep = _never;
            serve::<_, DuplexStream>(proxy_side, version, None, svc, drain).await
        });
        app
    }

    /// The app: one HTTP/2 connection to a balanced [`serve`].
    async fn app(fleet: &Fleet) -> http2::SendRequest<Empty<Bytes>> {
        let app = connect(fleet, Version::Http2);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(app))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    async fn get(sender: &http2::SendRequest<Empty<Bytes>>, path: &str) -> (StatusCode, String) {
        let req = Request::get(format!("http://api{path}"))
            .body(Empty::new())
            .unwrap();
        let resp = sender.clone().send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn requests_on_one_app_connection_spread_over_every_endpoint() {
        let eps = [endpoint(1), endpoint(2), endpoint(3)];
        let fleet = Fleet::new(&eps);
        let app = app(&fleet).await;
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..300 {
            let (status, by) = get(&app, "/").await;
            assert_eq!(status, StatusCode::OK);
            *counts.entry(by).or_default() += 1;
        }
        assert_spread(&fleet, &eps, &counts, 50);
    }

    /// Every endpoint answered at least `least` requests, each over one connection.
    fn assert_spread(
        fleet: &Fleet,
        eps: &[Endpoint],
        counts: &HashMap<String, usize>,
        least: usize,
    ) {
        for ep in eps {
            let n = counts.get(&ep.addr.to_string()).copied().unwrap_or(0);
            assert!(n >= least, "{} got {n}: {counts:?}", ep.addr);
        }
        // One connection per endpoint, reused by every later request.
        assert_eq!(fleet.dials.load(Ordering::SeqCst), eps.len());
    }

    #[tokio::test]
    async fn http1_requests_on_one_keep_alive_connection_spread_over_every_endpoint() {
        let eps = [endpoint(1), endpoint(2), endpoint(3)];
        let fleet = Fleet::new(&eps);
        let (mut app, conn) = http1::Builder::new()
            .handshake(TokioIo::new(connect(&fleet, Version::Http1)))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for _ in 0..150 {
            app.ready().await.unwrap();
            let req = Request::get("http://api/")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = app.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            *counts
                .entry(String::from_utf8_lossy(&body).into_owned())
                .or_default() += 1;
        }
        assert_spread(&fleet, &eps, &counts, 25);
    }

    #[tokio::test]
    async fn an_http1_request_followed_by_the_apps_fin_is_still_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let fleet = Fleet::new(&[endpoint(1)]);
        let mut app = connect(&fleet, Version::Http1);
        app.write_all(b"GET / HTTP/1.1\r\nhost: api\r\n\r\n")
            .await
            .unwrap();
        app.shutdown().await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut answer))
            .await
            .expect("answered and closed")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with(&endpoint(1).addr.to_string()), "{answer}");
    }

    #[tokio::test]
    async fn http1_header_names_keep_their_case_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<String>();
        let seen_tx = Arc::new(Mutex::new(Some(seen_tx)));
        let answer = service(&[endpoint(1)]);
        let svc = Service {
            name: "shop/api".into(),
            endpoints: Box::new(move || answer.clone()),
            // The endpoint reads the raw request and answers with its own header case.
            dial: Box::new(move |_ep: &Endpoint| {
                let seen_tx = seen_tx.clone();
                Box::pin(async move {
                    let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            if theirs.read(&mut byte).await.unwrap_or(0) == 0 {
                                return;
                            }
                            head.push(byte[0]);
                        }
                        if let Some(tx) = seen_tx.lock().unwrap().take() {
                            let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                        }
                        let reply =
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Reply-Case: y\r\n\r\nok";
                        let _ = theirs.write_all(reply).await;
                        let _ = theirs.read(&mut byte).await;
                    });
                    Ok((ours, identity("api")))
                })
            }),
            balancer: Arc::new(Balancer::default()),
            local: Arc::from(LOCAL),
        };
        let (mut app, proxy_side) = tokio::io::duplex(64 * 1024);
        let (_never, drain) = watch::channel(false);
        tokio::spawn(async move {
            let _keep = _never;
            serve::<_, DuplexStream>(proxy_side, Version::Http1, None, svc, drain).await
        });
        app.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nX-Mixed-Case: 1\r\n\r\n")
            .await
            .unwrap();
        let forwarded = tokio::time::timeout(Duration::from_secs(5), seen_rx)
            .await
            .expect("the endpoint got the request")
            .unwrap();
        assert!(forwarded.contains("X-Mixed-Case: 1\r\n"), "{forwarded}");
        let mut reply = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), app.read(&mut reply))
            .await
            .expect("answered")
            .unwrap();
        let reply = String::from_utf8_lossy(&reply[..n]);
        assert!(reply.contains("X-Reply-Case: y\r\n"), "{reply}");
    }

    #[tokio::test]
    async fn a_removed_endpoint_finishes_its_requests_and_gets_no_new_ones() {
        let (one, two) = (endpoint(1), endpoint(2));
        let fleet = Fleet::new(std::slice::from_ref(&one));
        let app = app(&fleet).await;
        // A slow request in flight on endpoint 1...
        let slow = tokio::spawn({
            let app = app.clone();
            async move { get(&app, "/slow").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...when discovery replaces it with endpoint 2.
        fleet.set(std::slice::from_ref(&two));
        for _ in 0..20 {
            assert_eq!(get(&app, "/").await, (StatusCode::OK, two.addr.to_string()));
        }
        fleet.release.notify_waiters();
        let finished = tokio::time::timeout(Duration::from_secs(5), slow)
            .await
            .expect("the request on the removed endpoint finishes")
            .unwrap();
        assert_eq!(finished, (StatusCode::OK, one.addr.to_string()));
    }

    #[tokio::test]
    async fn an_endpoint_that_cannot_be_dialed_is_skipped_without_failing_requests() {
        let eps = [endpoint(1), endpoint(2), endpoint(3)];
        let fleet = Fleet::new(&eps);
        fleet.down.lock().unwrap().push(eps[1].addr);
        let app = app(&fleet).await;
        for _ in 0..60 {
            let (status, by) = get(&app, "/").await;
            assert_eq!(status, StatusCode::OK);
            assert_ne!(by, eps[1].addr.to_string());
        }
    }

    #[tokio::test]
    async fn with_no_usable_endpoint_the_app_gets_503_marked_as_moats() {
        let mut unmeshed = endpoint(1);
        unmeshed.meshed = false;
        let fleet = Fleet::new(&[unmeshed]);
        let app = app(&fleet).await;
        let req = Request::get("http://api/").body(Empty::new()).unwrap();
        let resp = app.clone().send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[http::PROXY_ERROR], "no_endpoints");
        assert_eq!(fleet.dials.load(Ordering::SeqCst), 0);
    }
}
