//! Inbound: connections into the pod. Accept → detect → (mTLS handshake → streams) or
//! plaintext → authorize → connect the app → forward.
//!
//! Peer sidecars arrive as TLS offering the Moat ALPN and are terminated here with a mandatory
//! client certificate; anything else is an unauthenticated caller that only policy may admit.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moat_core::spiffe::SpiffeId;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use crate::accept::{Accepted, ClientAddr, Ctx, OrigDstAddr};
use crate::bufio::BufIo;
use crate::config::Config;
use crate::conns::Authorized;
use crate::detect::{self, Protocol};
use crate::forward::{copy_observed, Counted, Observer, Rewind};
use crate::http::{self, Labels};
use crate::metrics::{self as m, ConnMetrics, Direction, RefuseReason};
use crate::net;
use crate::observe::Http1Observer;
use crate::policy::{Decision, Policy};
use crate::tunnel::{self, ResetCode, Stream};

/// Server-side mTLS connection from a peer sidecar.
type TlsConn = tokio_rustls::server::TlsStream<BufIo<TcpStream>>;

/// Label used for callers without a verified identity.
pub const UNAUTHENTICATED: &str = "unauthenticated";

/// Accepts inbound connections until `stop` turns true.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, stop: watch::Receiver<bool>) {
    crate::accept::accept_loop(listener, Direction::Inbound, ctx, stop, handle).await;
}

async fn handle(conn: Accepted, ctx: Arc<Ctx>) {
    net::tune(&conn.tcp, Some(ctx.cfg.keepalive));
    let orig = conn.orig_dst;
    let started = Instant::now();

    // A silent caller may be waiting for a server-speaks-first app (MySQL, SMTP...). If
    // plaintext callers may reach this port anyway, connect the app after a short grace so
    // its greeting is not held behind the detection timeout. Peer sidecars always speak first.
    let early_target = orig.and_then(|_| resolve_target(&ctx.cfg, orig, 0).ok());
    let unauth_allowed =
        early_target.is_some_and(|t| ctx.policy().evaluate(None, t.port()).allowed());
    let greeting = async {
        let Some(target) = early_target.filter(|_| unauth_allowed) else {
            return std::future::pending().await;
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        match connect_app(&ctx, target).await {
            Ok(app) => match app.readable().await {
                Ok(()) => Some(app),
                Err(_) => None,
            },
            Err(_) => None,
        }
    };
    let proto = tokio::select! {
        p = detect::peek(&conn.tcp, ctx.cfg.detect_timeout, detect::inbound) => p,
        Some(app) = greeting => {
            record_detect(Protocol::Opaque, started);
            return plaintext(conn, Protocol::Opaque, Some(app), ctx).await;
        }
    };
    record_detect(proto, started);
    if proto == Protocol::MoatTls {
        mesh(conn, ctx).await;
    } else {
        plaintext(conn, proto, None, ctx).await;
    }
}

fn record_detect(p: Protocol, started: Instant) {
    metrics::histogram!(m::DETECT_DURATION, "direction" => "inbound", "protocol" => p.label())
        .record(started.elapsed().as_secs_f64());
}

/// Why an inbound stream may not go where it asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetRefusal {
    /// Capture mode, but the connection was not redirected: someone dialed the proxy's
    /// inbound port itself, so there is no app port it could legitimately be for.
    #[error("the connection was made to the inbound port itself (no original destination) and the proxy is not in explicit-route mode")]
    NoOriginalDestination,
    /// The stream named a port other than the one the caller dialed.
    #[error("the stream asked for port {requested}, but the caller dialed port {dialed}; a stream only reaches the port it was addressed to")]
    PortMismatch {
        /// Port in the OPEN frame.
        requested: u16,
        /// Port of the original destination.
        dialed: u16,
    },
    /// Explicit-route mode: the port is not in `--inbound-ports`.
    #[error("port {0} is not exposed to peers (--inbound-ports)")]
    NotExposed(u16),
    /// Explicit-route mode: the stream named no port and there is no original destination.
    #[error("the stream names no port and the connection has no original destination")]
    NoPort,
    /// The destination is one of the proxy's own ports.
    #[error("port {0} is one of the proxy's own ports")]
    ProxyPort(u16),
    /// The original destination is a loopback, unspecified or link-local address.
    #[error("the original destination {0} is not a pod address the mesh serves (loopback, unspecified or link-local)")]
    NotPodAddress(IpAddr),
}

impl TargetRefusal {
    /// Why the stream is refused.
    pub fn reason(&self) -> RefuseReason {
        match self {
            Self::NoOriginalDestination => RefuseReason::NoOriginalDestination,
            Self::PortMismatch { .. } => RefuseReason::PortMismatch,
            Self::NotExposed(_) => RefuseReason::PortNotExposed,
            Self::NoPort => RefuseReason::NoDestinationPort,
            Self::ProxyPort(_) => RefuseReason::ProxyPort,
            Self::NotPodAddress(_) => RefuseReason::NotPodAddress,
        }
    }
}

/// Where an inbound stream goes: the app address for a connection redirected from `orig`
/// (`None`: not redirected) whose stream asked for port `requested` (0: "the port I dialed").
///
/// With iptables (capture mode) a stream reaches exactly what its caller dialed: the pod
/// address and port of the original destination, never loopback and never the proxy's own
/// ports. In explicit-route mode (`--inbound-target`) it reaches the target IP on one of the
/// `--inbound-ports`. Pure, so the rules can be tested alone; policy is then evaluated
/// against the port returned here, the one actually reached.
pub fn resolve_target(
    cfg: &Config,
    orig: Option<OrigDstAddr>,
    requested: u16,
) -> Result<SocketAddr, TargetRefusal> {
    let orig = orig.map(|o| o.0);
    if let Some(ip) = cfg.inbound_target {
        let port = match (requested, orig) {
            (0, Some(o)) => o.port(),
            (0, None) => return Err(TargetRefusal::NoPort),
            (p, _) => p,
        };
        if cfg.is_proxy_port(port) {
            return Err(TargetRefusal::ProxyPort(port));
        }
        if !cfg.exposes(port) {
            return Err(TargetRefusal::NotExposed(port));
        }
        return Ok(SocketAddr::new(ip, port));
    }
    let Some(o) = orig else {
        return Err(TargetRefusal::NoOriginalDestination);
    };
    // Link-local: the mesh has no identity for it and no scope to dial it with.
    let link_local = matches!(o.ip(), IpAddr::V6(v6) if v6.is_unicast_link_local());
    if o.ip().is_loopback() || o.ip().is_unspecified() || link_local {
        return Err(TargetRefusal::NotPodAddress(o.ip()));
    }
    if requested != 0 && requested != o.port() {
        return Err(TargetRefusal::PortMismatch {
            requested,
            dialed: o.port(),
        });
    }
    if cfg.is_proxy_port(o.port()) {
        return Err(TargetRefusal::ProxyPort(o.port()));
    }
    Ok(o)
}

async fn connect_app(ctx: &Ctx, target: SocketAddr) -> std::io::Result<TcpStream> {
    let start = Instant::now();
    let tcp = tokio::time::timeout(ctx.cfg.connect_timeout, TcpStream::connect(target))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    metrics::histogram!(m::CONNECT_DURATION, "direction" => "inbound")
        .record(start.elapsed().as_secs_f64());
    // The app is in this pod: a local peer cannot vanish silently, so no keepalive probes.
    net::tune(&tcp, None);
    Ok(tcp)
}

/// A caller without a verified identity.
async fn plaintext(conn: Accepted, proto: Protocol, app: Option<TcpStream>, ctx: Arc<Ctx>) {
    let Accepted {
        tcp,
        client: remote,
        orig_dst: orig,
    } = conn;
    if orig.is_none() {
        m::refused(Direction::Inbound, RefuseReason::NoOriginalDestination);
        tracing::warn!(%remote, caller = UNAUTHENTICATED, protocol = proto.label(), "refused plaintext connection made directly to the inbound port (no original destination)");
        net::reset(tcp);
        return;
    }
    let target = match resolve_target(&ctx.cfg, orig, 0) {
        Ok(t) => t,
        Err(e) => {
            m::refused(Direction::Inbound, e.reason());
            tracing::warn!(%remote, caller = UNAUTHENTICATED, reason = %e.reason(), "refused plaintext connection: {e}");
            net::reset(tcp);
            return;
        }
    };
    let port = target.port();
    let policy = ctx.policy();
    let (guard, decision) = authorize(&ctx, &policy, None, remote, port);
    let labels = Labels {
        dir: Direction::Inbound,
        peer: Arc::from(UNAUTHENTICATED),
        local: ctx.local_label.clone(),
    };
    if !decision.allowed() {
        if proto.is_http() {
            let _ = http::deny(tcp, proto, Arc::from(decision.rule), labels).await;
        } else {
            net::reset(tcp);
        }
        return;
    }
    let app = match app {
        Some(a) => a,
        None => match connect_app(&ctx, target).await {
            Ok(a) => a,
            Err(e) => {
                m::refused(Direction::Inbound, RefuseReason::AppUnreachable);
                tracing::warn!(%remote, %target, error = %e, "cannot reach the app");
                net::reset(tcp);
                return;
            }
        },
    };
    let cm = ConnMetrics::open(Direction::Inbound);
    let forward = async {
        if proto == Protocol::Http2 {
            let tcp = Counted::new(tcp, &cm);
            let _ = http::proxy_http2(tcp, app, labels, ctx.conns.drain_signal()).await;
        } else {
            let (mut tcp, mut app) = (tcp, app);
            let drain = ctx.conns.drain_signal();
            let _ = forward_observed(&mut tcp, &mut app, proto, &labels, &cm, drain).await;
        }
    };
    unless_revoked(&guard, forward).await;
}

/// Registers a connection to `port` for revocation, then lets the policy in force decide
/// about `caller` (`None`: unauthenticated). The decision is counted; a denial or an audit
/// is logged with who asked.
fn authorize<'p>(
    ctx: &Ctx,
    policy: &'p Policy,
    caller: Option<&SpiffeId>,
    remote: ClientAddr,
    port: u16,
) -> (Authorized, Decision<'p>) {
    // Registered before the decision, so a policy published in between revokes it.
    let guard = ctx.conns.authorize(caller, port);
    let decision = policy.authorize(caller, port);
    let who = caller.map(SpiffeId::as_str).unwrap_or(UNAUTHENTICATED);
    if !decision.allowed() {
        tracing::warn!(%remote, caller = who, port, rule = decision.rule, "denied: policy does not admit this caller");
    } else if decision.label() == "audit_deny" {
        tracing::info!(%remote, caller = who, port, rule = decision.rule, "audit: would deny");
    }
    (guard, decision)
}

/// Runs `forward` to its end, unless a newer policy revokes the connection first.
async fn unless_revoked(guard: &Authorized, forward: impl std::future::Future<Output = ()>) {
    tokio::select! {
        _ = forward => {}
        _ = guard.revoked() => metrics::counter!(m::REVOKED).increment(1),
    }
}

/// A peer sidecar: terminate mTLS, then serve its streams one after another.
async fn mesh(conn: Accepted, ctx: Arc<Ctx>) {
    let Accepted {
        tcp,
        client: remote,
        orig_dst: orig,
    } = conn;
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.server_tls.clone());
    let tls =
        match tokio::time::timeout(ctx.cfg.handshake_timeout, acceptor.accept(BufIo::new(tcp)))
            .await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                let reason = moat_core::tls::failure_reason(&e);
                m::handshake_failed(Direction::Inbound, reason);
                tracing::warn!(%remote, reason, error = %e, "refused peer: mTLS handshake failed");
                return;
            }
            Err(_) => {
                m::handshake_failed(Direction::Inbound, "timeout");
                tracing::warn!(%remote, "refused peer: mTLS handshake timed out");
                return;
            }
        };
    let Some(peer) = moat_core::tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
        m::handshake_failed(Direction::Inbound, "not_svid");
        tracing::warn!(%remote, "refused peer: no SPIFFE identity after handshake");
        return;
    };
    metrics::counter!(m::HANDSHAKES, "direction" => "inbound").increment(1);
    if orig.is_none() && ctx.cfg.inbound_target.is_none() {
        let e = TargetRefusal::NoOriginalDestination;
        m::refused(Direction::Inbound, e.reason());
        tracing::warn!(%remote, caller = %peer, reason = %e.reason(), "refused peer: {e}");
        net::reset(tls.into_inner().0.into_inner());
        return;
    }
    // New streams only while the peer's certificate is valid: a tunnel must not outlive it.
    let expires = moat_core::x509::leaf_expiry(tls.get_ref().1.peer_certificates());
    let peer_label: Arc<str> = Arc::from(peer.as_str());
    let mut tls = tls;
    let mut drain = ctx.conns.drain_signal();
    loop {
        let next = tokio::select! {
            r = tokio::time::timeout(ctx.cfg.tunnel_idle_timeout, tunnel::read_open(&mut tls)) => r,
            _ = moat_core::shutdown::signalled(&mut drain) => return,
        };
        let target = match next {
            Ok(Ok(Some(_))) if std::time::SystemTime::now() >= expires => {
                m::refused(Direction::Inbound, RefuseReason::PeerCertExpired);
                tracing::warn!(%remote, peer = %peer, "refused a stream and closed the tunnel: the peer's certificate has expired");
                let _ =
                    tunnel::write_reset(&mut tls, ResetCode::Closed, "certificate expired").await;
                return;
            }
            Ok(Ok(Some(requested))) => match resolve_target(&ctx.cfg, orig, requested) {
                Ok(target) => target,
                Err(e) => {
                    m::refused(Direction::Inbound, e.reason());
                    tracing::warn!(%remote, caller = %peer, requested, reason = %e.reason(), "refused a stream and closed the tunnel: {e}");
                    let _ = tunnel::write_reset(&mut tls, ResetCode::Denied, &e.to_string()).await;
                    return;
                }
            },
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(%remote, peer = %peer, error = %e, "tunnel closed");
                return;
            }
            Err(_) => return, // idle: the client side's pool lets go first
        };
        let (tx, rx) = oneshot::channel();
        let stream = Stream::with_home(
            tls,
            Some(Box::new(move |io: TlsConn| {
                let _ = tx.send(io);
            })),
        );
        serve_stream(stream, &peer, &peer_label, remote, target, &ctx).await;
        match rx.await {
            Ok(io) => tls = io,
            Err(_) => return,
        }
    }
}

async fn serve_stream(
    mut stream: Stream<TlsConn>,
    peer: &SpiffeId,
    peer_label: &Arc<str>,
    remote: ClientAddr,
    target: SocketAddr,
    ctx: &Arc<Ctx>,
) {
    let port = target.port();
    let policy = ctx.policy();
    let (guard, decision) = authorize(ctx, &policy, Some(peer), remote, port);
    let labels = Labels {
        dir: Direction::Inbound,
        peer: peer_label.clone(),
        local: ctx.local_label.clone(),
    };
    if !decision.allowed() {
        let mut buf = Vec::new();
        let proto = read_detect(&mut stream, &mut buf, ctx.cfg.detect_timeout).await;
        if proto.is_http() {
            let _ = http::deny(
                Rewind::new(buf, stream),
                proto,
                Arc::from(decision.rule),
                labels,
            )
            .await;
        } else {
            let _ = stream
                .reset(
                    ResetCode::Denied,
                    &format!("denied by policy rule {}", decision.rule),
                )
                .await;
        }
        return;
    }
    let app = match connect_app(ctx, target).await {
        Ok(a) => a,
        Err(e) => {
            m::refused(Direction::Inbound, RefuseReason::AppUnreachable);
            tracing::warn!(%remote, caller = %peer, %target, error = %e, "cannot reach the app");
            let _ = stream
                .reset(ResetCode::ConnectFailed, &format!("app port {port}: {e}"))
                .await;
            return;
        }
    };
    let cm = ConnMetrics::open(Direction::Inbound);
    let started = Instant::now();
    let forward = async {
        // Whoever speaks first decides: the caller's first bytes are sniffed for HTTP; an app
        // that greets first makes it an opaque stream at once.
        // `buf` lives outside the race so bytes already read are never lost.
        let mut buf = Vec::new();
        let proto = if ctx.cfg.is_opaque(port) {
            Protocol::Opaque
        } else {
            tokio::select! {
                p = read_detect(&mut stream, &mut buf, ctx.cfg.detect_timeout) => p,
                _ = app.readable() => Protocol::Opaque,
            }
        };
        record_detect(proto, started);
        let mut client = Rewind::new(buf, stream);
        if proto == Protocol::Http2 {
            let client = Counted::new(client, &cm);
            let _ = http::proxy_http2(client, app, labels, ctx.conns.drain_signal()).await;
        } else {
            let mut app = app;
            let drain = ctx.conns.drain_signal();
            if let Err(e) =
                forward_observed(&mut client, &mut app, proto, &labels, &cm, drain).await
            {
                tracing::debug!(caller = %peer, error = %e, "inbound stream ended with error");
                net::reset(app);
            }
        }
    };
    unless_revoked(&guard, forward).await;
}

/// Copies both ways; HTTP/1 requests are observed in passing and measured, and an HTTP/1
/// connection ends between requests once draining starts.
async fn forward_observed<C, A>(
    client: &mut C,
    app: &mut A,
    proto: Protocol,
    labels: &Labels,
    cm: &ConnMetrics,
    drain: watch::Receiver<bool>,
) -> std::io::Result<(u64, u64)>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut sink = (proto == Protocol::Http1)
        .then(|| http::ReqMetrics::new(labels.dir, &labels.peer, &labels.local));
    let observer = sink.as_mut().map(|sink| Observer {
        http: Http1Observer::new(),
        sink,
        drain: Some(crate::forward::drain(drain)),
    });
    copy_observed(client, app, &cm.rx, &cm.tx, observer).await
}

/// Reads the first bytes of a stream into `buf` (consuming them) until HTTP detection decides
/// or the timeout passes. Cancel-safe: whatever was read stays in `buf`.
pub async fn read_detect<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Protocol {
    let fut = async {
        let mut chunk = [0u8; 512];
        loop {
            match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return Protocol::Opaque,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            match detect::http(buf) {
                Protocol::NeedMore if buf.len() < 64 => continue,
                Protocol::NeedMore => return Protocol::Opaque,
                p => return p,
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Protocol::Opaque)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_config;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn capture_mode_streams_reach_only_the_dialed_pod_port() {
        let cfg = test_config(&[]);
        let orig = Some(OrigDstAddr(addr("10.0.0.7:8080")));
        assert_eq!(resolve_target(&cfg, orig, 0), Ok(addr("10.0.0.7:8080")));
        assert_eq!(resolve_target(&cfg, orig, 8080), Ok(addr("10.0.0.7:8080")));
        // The attack: dial an allowed port, then name another one in OPEN.
        assert_eq!(
            resolve_target(&cfg, orig, 9090),
            Err(TargetRefusal::PortMismatch {
                requested: 9090,
                dialed: 8080
            })
        );
        // Straight to :15006 (nothing redirected): no port could be legitimate.
        for requested in [0, 22, 15020] {
            assert_eq!(
                resolve_target(&cfg, None, requested),
                Err(TargetRefusal::NoOriginalDestination)
            );
        }
        // Never the proxy's own ports, never loopback or link-local.
        for port in moat_core::contract::PROXY_PORTS {
            let o = Some(OrigDstAddr(SocketAddr::new(
                "10.0.0.7".parse().unwrap(),
                port,
            )));
            assert_eq!(
                resolve_target(&cfg, o, 0),
                Err(TargetRefusal::ProxyPort(port))
            );
        }
        for ip in [
            "127.0.0.1:8080",
            "[::1]:8080",
            "[fe80::1]:8080",
            "0.0.0.0:8080",
        ] {
            let o = addr(ip);
            assert_eq!(
                resolve_target(&cfg, Some(OrigDstAddr(o)), 0),
                Err(TargetRefusal::NotPodAddress(o.ip())),
                "{ip}"
            );
        }
    }

    #[test]
    fn route_mode_streams_reach_only_exposed_ports() {
        let cfg = test_config(&[
            "--inbound-target",
            "127.0.0.1",
            "--inbound-ports",
            "8080,9000-9001",
            "--admin-listen",
            "127.0.0.1:19020",
        ]);
        assert_eq!(resolve_target(&cfg, None, 8080), Ok(addr("127.0.0.1:8080")));
        assert_eq!(resolve_target(&cfg, None, 9001), Ok(addr("127.0.0.1:9001")));
        assert_eq!(
            resolve_target(&cfg, None, 22),
            Err(TargetRefusal::NotExposed(22))
        );
        assert_eq!(resolve_target(&cfg, None, 0), Err(TargetRefusal::NoPort));
        for port in [15001, 15006, 15020, 19020] {
            assert_eq!(
                resolve_target(&cfg, None, port),
                Err(TargetRefusal::ProxyPort(port))
            );
        }
    }
}
