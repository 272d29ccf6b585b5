//! Outbound: connections from our app. Accept → decide where it may go → (mesh: pooled mTLS
//! to the peer sidecar, identity verified in the handshake) or (allowed egress: as-is) →
//! detect → forward. Anything else fails closed: the app's connection is reset, logged and
//! counted — never silently sent in plaintext.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use moat_core::discovery::Resolution;
use moat_core::spiffe::SpiffeId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::accept::{Accepted, Ctx, OrigDstAddr};
use crate::balance::{self, Pick};
use crate::config::Route;
use crate::detect::{self, Protocol};
use crate::discovery::Resolver;
use crate::forward::{copy_bidirectional, copy_observed, Counted, Observer, Rewind};
use crate::http::{self, Labels};
use crate::metrics::{self as m, ConnMetrics, Direction, RefuseReason};
use crate::net;
use crate::observe::Http1Observer;
use crate::pool::{DialError, Key};
use crate::retry::{Redial, Retrying};
use crate::tunnel::{self, Stream};

/// Where an app connection may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// To a peer sidecar over mTLS; `port` is the app port on the peer (0 = the dialed port).
    Mesh {
        /// Pool key: address to dial and expected identity.
        key: Key,
        /// Port named in the OPEN frame.
        port: u16,
    },
    /// A cluster IP in the service networks: resolved through discovery and balanced over the
    /// Service's endpoints.
    Service(SocketAddr),
    /// Outside the mesh, allowed by configuration: forwarded as-is.
    Egress(SocketAddr),
    /// Refused, with a bounded reason.
    Refused(RefuseReason),
}

/// Decides where a captured connection to `orig` may go. Pure, so it can be tested alone.
pub fn classify(ctx_cfg: &crate::config::Config, orig: Option<OrigDstAddr>) -> Destination {
    let Some(OrigDstAddr(dst)) = orig else {
        return Destination::Refused(RefuseReason::NoOriginalDestination);
    };
    if ctx_cfg.is_own_listener(dst) {
        return Destination::Refused(RefuseReason::Loop);
    }
    if ctx_cfg
        .service_networks
        .iter()
        .any(|n| n.contains(dst.ip()))
    {
        return Destination::Service(dst);
    }
    if ctx_cfg.mesh_networks.iter().any(|n| n.contains(dst.ip())) {
        return Destination::Mesh {
            key: Key {
                addr: dst,
                expected: ctx_cfg.expected_identity(dst),
            },
            port: 0,
        };
    }
    if ctx_cfg.allow_egress.iter().any(|n| n.contains(dst.ip())) {
        return Destination::Egress(dst);
    }
    Destination::Refused(RefuseReason::EgressDenied)
}

/// Accepts app connections on the transparent outbound listener, or on an explicit route's
/// listener when `route` is set, until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    route: Option<Arc<Route>>,
    ctx: Arc<Ctx>,
    stop: watch::Receiver<bool>,
) {
    let handle = move |conn, ctx| handle(conn, route.clone(), ctx);
    crate::accept::accept_loop(listener, Direction::Outbound, ctx, stop, handle).await;
}

async fn handle(conn: Accepted, route: Option<Arc<Route>>, ctx: Arc<Ctx>) {
    let app = conn.tcp;
    // The app is local (same pod, or a route's local client): no keepalive probes needed.
    net::tune(&app, None);
    // A route names its destination; only a captured connection has an original one.
    let orig = conn.orig_dst.filter(|_| route.is_none());
    let dest = match &route {
        Some(r) => Destination::Mesh {
            key: Key {
                addr: r.connect,
                expected: r.identity.clone(),
            },
            port: r.port,
        },
        None => classify(&ctx.cfg, orig),
    };
    let (upstream, port) = match dest {
        Destination::Refused(reason) => return refuse(app, orig, reason),
        Destination::Egress(dst) => return egress(app, dst, ctx).await,
        // A pinned identity (a route's or `--peer-identity`) is explicit configuration.
        Destination::Mesh { key, port } if key.expected.is_some() || route.is_some() => {
            (Upstream::Peer(key), port)
        }
        Destination::Mesh { key, port } => match &ctx.discovery {
            Some(d) => match discover(d, key.addr, &ctx).await {
                Ok(up) => (up, port),
                Err(reason) => return refuse(app, orig, reason),
            },
            // Without discovery, any identity of the trust domain (logged at start-up).
            None => (Upstream::Peer(key), port),
        },
        Destination::Service(dst) => match &ctx.discovery {
            Some(d) => match discover(d, dst, &ctx).await {
                Ok(up) => (up, 0),
                Err(reason) => return refuse(app, orig, reason),
            },
            None => return refuse(app, orig, RefuseReason::UnknownDestination),
        },
    };
    mesh(app, upstream, port, ctx).await
}

fn refuse(app: TcpStream, orig: Option<OrigDstAddr>, reason: RefuseReason) {
    m::refused(Direction::Outbound, reason);
    tracing::warn!(destination = ?orig.map(|o| o.0), %reason, "refused outbound connection (fail closed)");
    net::reset(app);
}

/// Who a mesh connection goes to once its destination is known.
#[derive(Debug)]
enum Upstream {
    /// One peer sidecar, with the identity it must prove (or any of the trust domain).
    Peer(Key),
    /// A Service: one of its endpoints, each with its own pinned identity.
    Service {
        /// The cluster IP and port the app dialed.
        target: SocketAddr,
        /// `namespace/name`, for logs.
        name: String,
        /// Its endpoints, as discovery last listed them (shared, not copied per connection).
        endpoints: Arc<Resolution>,
    },
}

/// Asks discovery who answers at `dst`. Fails closed: an address discovery does not know (or
/// has not answered for within `--discovery-wait`) is refused, never dialed with any identity.
async fn discover(d: &Resolver, dst: SocketAddr, ctx: &Ctx) -> Result<Upstream, RefuseReason> {
    let Some(res) = d.resolve(dst, ctx.cfg.discovery_wait).await else {
        tracing::warn!(destination = %dst, wait = ?ctx.cfg.discovery_wait, "discovery has not answered for this destination");
        return Err(RefuseReason::UnknownDestination);
    };
    match &*res {
        Resolution::Pod {
            identity,
            meshed: true,
            ..
        } => Ok(Upstream::Peer(Key {
            addr: dst,
            expected: Some(identity.clone()),
        })),
        Resolution::Pod { pod, .. } => {
            tracing::warn!(destination = %dst, pod, "destination pod runs no sidecar: refusing rather than sending plaintext");
            Err(RefuseReason::NotMeshed)
        }
        Resolution::Service { endpoints, .. } if endpoints.is_empty() => {
            Err(RefuseReason::NoEndpoints)
        }
        Resolution::Service { service, .. } => Ok(Upstream::Service {
            target: dst,
            name: service.clone(),
            endpoints: res.clone(),
        }),
        Resolution::Unknown => Err(RefuseReason::UnknownDestination),
    }
}

async fn egress(mut app: TcpStream, dst: SocketAddr, ctx: Arc<Ctx>) {
    let up = tokio::time::timeout(ctx.cfg.connect_timeout, TcpStream::connect(dst)).await;
    let mut up = match up {
        Ok(Ok(u)) => u,
        _ => {
            m::refused(Direction::Outbound, RefuseReason::EgressUnreachable);
            net::reset(app);
            return;
        }
    };
    net::tune(&up, Some(ctx.cfg.keepalive));
    let cm = ConnMetrics::open(Direction::Outbound);
    let _ = copy_bidirectional(&mut app, &mut up, &cm.rx, &cm.tx).await;
}

/// Logs and counts a failed dial to a peer sidecar.
fn dial_failed(key: &Key, e: &DialError) {
    let reason = e.reason();
    if let RefuseReason::Handshake(handshake) = reason {
        m::handshake_failed(Direction::Outbound, handshake);
    }
    tracing::warn!(
        peer_addr = %key.addr,
        expected = key.expected.as_ref().map(SpiffeId::as_str).unwrap_or("any identity of the trust domain"),
        %reason,
        error = %e,
        "the destination could not be verified or reached (fail closed)"
    );
}

/// How many of a Service's endpoints a connection tries before it is refused.
const MAX_ENDPOINT_ATTEMPTS: usize = 3;

/// Opens a stream to the upstream: the one peer, or a Service endpoint picked by the
/// balancer, failing over to another endpoint when one cannot be reached or verified.
async fn connect(
    upstream: &Upstream,
    port: u16,
    ctx: &Arc<Ctx>,
) -> Result<(Stream<crate::pool::TlsConn>, SpiffeId, Key, Option<Pick>), RefuseReason> {
    let (name, endpoints) = match upstream {
        Upstream::Peer(key) => {
            return match open_stream(key, port, ctx).await {
                Ok(o) => Ok((o.stream, o.peer, key.clone(), None)),
                Err(e) => {
                    dial_failed(key, &e);
                    Err(e.reason())
                }
            }
        }
        Upstream::Service {
            name, endpoints, ..
        } => (name, endpoints.endpoints()),
    };
    let mut tried = Vec::new();
    let mut last = RefuseReason::NotMeshed;
    while tried.len() < MAX_ENDPOINT_ATTEMPTS {
        let Some(pick) = ctx.balancer.pick(endpoints, &tried) else {
            break;
        };
        let key = Key {
            addr: pick.endpoint.addr,
            expected: pick.endpoint.identity.clone(),
        };
        let started = Instant::now();
        match open_stream(&key, port, ctx).await {
            Ok(o) => {
                // Only a dial says something about the endpoint: a pooled stream opens at once.
                if o.fresh {
                    pick.dialed(started.elapsed());
                }
                return Ok((o.stream, o.peer, key, Some(pick)));
            }
            Err(e) => {
                pick.failed();
                dial_failed(&key, &e);
                tracing::info!(service = %name, endpoint = %key.addr, "trying another endpoint");
                last = e.reason();
                tried.push(key.addr);
            }
        }
    }
    if tried.is_empty() {
        tracing::warn!(service = %name, "no endpoint of the Service runs a sidecar with a known identity");
    }
    Err(last)
}

async fn mesh(app: TcpStream, upstream: Upstream, port: u16, ctx: Arc<Ctx>) {
    let started = Instant::now();
    let (stream, peer, key, _pick) = match connect(&upstream, port, &ctx).await {
        Ok(x) => x,
        Err(reason) => {
            m::refused(Direction::Outbound, reason);
            net::reset(app);
            return;
        }
    };
    let app_port = if port != 0 { port } else { key.addr.port() };
    let opaque = ctx.cfg.is_opaque(app_port);
    let labels = Labels {
        dir: Direction::Outbound,
        peer: Arc::from(peer.as_str()),
        local: ctx.local_label.clone(),
    };
    let cm = ConnMetrics::open(Direction::Outbound);
    let mut stream = Retrying::new(stream, 1, redial(key.clone(), port, ctx.clone()));

    // The app's first bytes decide HTTP or not; a server that greets first makes it opaque.
    let mut upstream_first = Vec::new();
    let proto = tokio::select! {
        p = detect::peek(&app, ctx.cfg.detect_timeout, detect::http), if !opaque => p,
        _ = std::future::ready(()), if opaque => Protocol::Opaque,
        r = read_some(&mut stream, &mut upstream_first) => {
            if r.is_err() {
                tracing::debug!(peer = %peer, "peer sidecar closed the stream before any data");
            }
            Protocol::Opaque
        }
    };
    metrics::histogram!(m::DETECT_DURATION, "direction" => "outbound", "protocol" => proto.label())
        .record(started.elapsed().as_secs_f64());

    // HTTP to a Service is balanced per request: the endpoint this connection dialed (to
    // detect the protocol) is only the first. A server that spoke first is not HTTP.
    let version = match proto {
        Protocol::Http1 => Some(balance::requests::Version::Http1),
        Protocol::Http2 => Some(balance::requests::Version::Http2),
        _ => None,
    };
    if let (
        Some(version),
        true,
        Upstream::Service {
            target,
            name,
            endpoints,
        },
    ) = (version, upstream_first.is_empty(), upstream)
    {
        drop(_pick);
        let svc = balanced_service(target, name, endpoints, port, &ctx);
        let first = Some((key.addr, stream, peer));
        let drain = ctx.conns.drain_signal();
        let app = Counted::new(app, &cm);
        if let Err(e) = balance::requests::serve(app, version, first, svc, drain).await {
            tracing::debug!(error = %e, "balanced outbound HTTP connection ended with error");
        }
        return;
    }
    if proto == Protocol::Http2 && upstream_first.is_empty() {
        let app = Counted::new(app, &cm);
        if let Err(e) = http::proxy_http2(app, stream, labels, ctx.conns.drain_signal()).await {
            tracing::debug!(peer = %peer, error = %e, "outbound HTTP/2 connection ended with error");
        }
        return;
    }
    let mut up = Rewind::new(upstream_first, stream);
    let mut app = app;
    let mut req_metrics = (proto == Protocol::Http1)
        .then(|| http::ReqMetrics::new(labels.dir, &labels.peer, &labels.local));
    let observer = req_metrics.as_mut().map(|sink| Observer {
        http: Http1Observer::new(),
        sink,
        drain: Some(crate::forward::drain(ctx.conns.drain_signal())),
    });
    if let Err(e) = copy_observed(&mut app, &mut up, &cm.rx, &cm.tx, observer).await {
        if let Some(reset) = e
            .get_ref()
            .and_then(|x| x.downcast_ref::<tunnel::PeerReset>())
        {
            tracing::warn!(peer = %peer, code = reset.code.label(), reason = %reset.reason, "peer sidecar refused the stream");
        } else {
            tracing::debug!(peer = %peer, error = %e, "outbound stream ended with error");
        }
        // The app learns at once, as it would from a refusing server.
        net::reset(app);
    }
}

/// How a balanced HTTP connection reaches the Service `name` at `target`: discovery's
/// current endpoints (the answer it started with while discovery has none), and streams opened
/// like any other, each pinned to its endpoint's identity.
fn balanced_service(
    target: SocketAddr,
    name: String,
    first: Arc<Resolution>,
    port: u16,
    ctx: &Arc<Ctx>,
) -> balance::requests::Service<OutboundStream> {
    let resolver = ctx.discovery.clone();
    let dial_ctx = ctx.clone();
    balance::requests::Service {
        name,
        endpoints: Box::new(move || {
            resolver
                .as_ref()
                .and_then(|r| r.current(target))
                .unwrap_or_else(|| first.clone())
        }),
        dial: Box::new(move |ep| {
            let ctx = dial_ctx.clone();
            let key = Key {
                addr: ep.addr,
                expected: ep.identity.clone(),
            };
            Box::pin(async move {
                match open_stream(&key, port, &ctx).await {
                    Ok(o) => {
                        let stream = Retrying::new(o.stream, 1, redial(key, port, ctx));
                        Ok((stream, o.peer))
                    }
                    Err(e) => {
                        dial_failed(&key, &e);
                        Err(e.reason())
                    }
                }
            })
        }),
        balancer: ctx.balancer.clone(),
        local: ctx.local_label.clone(),
    }
}

/// A stream to a peer sidecar as outbound forwards over it: replayed once if the peer's app
/// refused it.
type OutboundStream = Retrying<Stream<crate::pool::TlsConn>, Redialer>;

/// Replays a refused stream ([`redial`]).
type Redialer =
    Box<dyn FnMut(Vec<u8>, bool) -> Redial<Stream<crate::pool::TlsConn>> + Send + Unpin>;

async fn read_some<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 1024];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// How a stream the peer's app refused is replayed: a new connection (never a pooled one),
/// the same OPEN, the bytes the app had sent, and its FIN if it had sent one.
fn redial(key: Key, port: u16, ctx: Arc<Ctx>) -> Redialer {
    Box::new(move |bytes, fin| {
        let (key, ctx) = (key.clone(), ctx.clone());
        Box::pin(async move {
            let co = ctx.pool.dial(&key).await.map_err(std::io::Error::other)?;
            let mut conn = co.conn;
            tunnel::write_open(&mut conn, port).await?;
            let home = ctx.pool.home(key, co.peer, co.expires);
            let mut stream = Stream::with_home(conn, Some(home));
            stream.write_all(&bytes).await?;
            if fin {
                stream.shutdown().await?;
            }
            Ok(stream)
        })
    })
}

/// Checks out a tunnel connection and opens a stream on it. A pooled connection that turns
/// out dead is replaced by a fresh one once.
/// A stream opened to a peer sidecar.
struct Opened {
    stream: Stream<crate::pool::TlsConn>,
    peer: SpiffeId,
    /// Over a connection dialed for it (TCP and handshake), not a pooled one.
    fresh: bool,
}

async fn open_stream(key: &Key, port: u16, ctx: &Arc<Ctx>) -> Result<Opened, DialError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut co = ctx.pool.get(key).await?;
        match tunnel::write_open(&mut co.conn, port).await {
            Ok(()) => {
                let home = ctx.pool.home(key.clone(), co.peer.clone(), co.expires);
                return Ok(Opened {
                    stream: Stream::with_home(co.conn, Some(home)),
                    peer: co.peer,
                    fresh: !co.reused,
                });
            }
            Err(e) if co.reused && attempts < 2 => {
                tracing::debug!(error = %e, "pooled connection was dead; dialing a fresh one");
            }
            Err(e) => {
                return Err(DialError::Connect {
                    addr: key.addr,
                    source: e,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_config as config;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A connection redirected from `s`.
    fn orig(s: &str) -> Option<OrigDstAddr> {
        Some(OrigDstAddr(addr(s)))
    }

    #[test]
    fn mesh_networks_go_over_mtls_with_the_pinned_identity_when_known() {
        let api = "spiffe://cluster.local/ns/shop/sa/api";
        let cfg = config(&[
            "--mesh-networks",
            "10.0.0.0/16,fd00::/64",
            "--peer-identity",
            &format!("10.0.0.7={api}"),
        ]);
        let pinned = classify(&cfg, orig("10.0.0.7:8080"));
        assert_eq!(
            pinned,
            Destination::Mesh {
                key: Key {
                    addr: addr("10.0.0.7:8080"),
                    expected: Some(SpiffeId::parse(api).unwrap()),
                },
                port: 0,
            }
        );
        let Destination::Mesh { key, .. } = classify(&cfg, orig("[fd00::9]:80")) else {
            panic!("IPv6 mesh destination not meshed");
        };
        assert_eq!(key.expected, None, "no identity was configured for it");
    }

    #[test]
    fn everything_else_fails_closed_unless_egress_allows_it() {
        let cfg = config(&["--mesh-networks", "10.0.0.0/16"]);
        assert_eq!(
            classify(&cfg, orig("192.0.2.1:443")),
            Destination::Refused(RefuseReason::EgressDenied)
        );
        assert_eq!(
            classify(&cfg, None),
            Destination::Refused(RefuseReason::NoOriginalDestination)
        );
        let cfg = config(&[
            "--mesh-networks",
            "10.0.0.0/16",
            "--allow-egress",
            "192.0.2.0/24",
        ]);
        assert_eq!(
            classify(&cfg, orig("192.0.2.1:443")),
            Destination::Egress(addr("192.0.2.1:443"))
        );
        // Inside both: the mesh wins, so an egress rule can't downgrade a pod to plaintext.
        let cfg = config(&[
            "--mesh-networks",
            "10.0.0.0/8",
            "--allow-egress",
            "10.0.0.0/8",
        ]);
        assert!(matches!(
            classify(&cfg, orig("10.1.2.3:80")),
            Destination::Mesh { .. }
        ));
    }

    #[test]
    fn the_proxys_own_listeners_are_refused_as_loops() {
        let cfg = config(&[
            "--mesh-networks",
            "0.0.0.0/0",
            "--allow-egress",
            "0.0.0.0/0",
        ]);
        for dst in [
            "127.0.0.1:15001",
            "10.0.0.5:15006",
            "127.0.0.1:15020",
            "10.0.0.5:15020",
        ] {
            assert_eq!(
                classify(&cfg, orig(dst)),
                Destination::Refused(RefuseReason::Loop),
                "{dst}"
            );
        }
        assert!(matches!(
            classify(&cfg, orig("10.0.0.5:8080")),
            Destination::Mesh { .. }
        ));
    }
}
