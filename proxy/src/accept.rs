//! What every connection handler shares: the accept loop (connection budget, drain registry,
//! one task per connection) and [`Ctx`], the proxy's state as a handler sees it. [`inbound`]
//! and [`outbound`] build on it; [`app`] creates it.
//!
//! [`inbound`]: crate::inbound
//! [`outbound`]: crate::outbound
//! [`app`]: crate::app

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::balance::Balancer;
use crate::config::Config;
use crate::conns::Registry;
use crate::discovery::Resolver;
use crate::limits::Budget;
use crate::metrics::Direction;
use crate::net;
use crate::policy::Policy;
use crate::pool::Pool;

/// The caller's address, as the proxy's listener saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Where the caller was going before the nat table redirected it to the proxy
/// (`SO_ORIGINAL_DST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddr);

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One accepted connection: the socket, who connected, and where they were going.
#[derive(Debug)]
pub(crate) struct Accepted {
    /// The socket.
    pub tcp: TcpStream,
    /// Who connected.
    pub client: ClientAddr,
    /// Where the caller was going; `None` when the connection was not redirected (made
    /// straight to the listener).
    pub orig_dst: Option<OrigDstAddr>,
}

/// Accepts connections on `listener` until `stop` turns true and runs `handle` for each in its
/// own task, holding a connection permit (over the limit: refused with RST and counted) and an
/// entry in the drain registry while it runs.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    dir: Direction,
    ctx: Arc<Ctx>,
    mut stop: watch::Receiver<bool>,
    handle: F,
) where
    F: Fn(Accepted, Arc<Ctx>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let (tcp, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "{} accept failed", dir.as_str());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = moat_core::shutdown::signalled(&mut stop) => return,
        };
        let budget = match dir {
            Direction::Inbound => &ctx.inbound_limit,
            Direction::Outbound => &ctx.outbound_limit,
        };
        let permit = match budget.try_admit(remote.ip()) {
            Ok(p) => p,
            Err(refusal) => {
                crate::metrics::refused(dir, refusal.reason());
                tracing::warn!(%remote, reason = %refusal.reason(), "{} connection refused: connection limit reached", dir.as_str());
                net::reset(tcp);
                continue;
            }
        };
        let active = ctx.conns.active();
        let accepted = Accepted {
            orig_dst: net::original_dst(&tcp).map(OrigDstAddr),
            client: ClientAddr(remote),
            tcp,
        };
        let conn = handle(accepted, ctx.clone());
        tokio::spawn(async move {
            let (_permit, _active) = (permit, active);
            conn.await;
        });
    }
}

/// Everything a connection handler needs.
pub struct Ctx {
    /// Validated configuration.
    pub cfg: Config,
    /// Our SPIFFE ID, as a metric label.
    pub local_label: Arc<str>,
    pub(crate) policy: watch::Receiver<Arc<Policy>>,
    /// Live connections (revocation, drain).
    pub conns: Arc<Registry>,
    /// Inbound mTLS configuration (client certificate mandatory).
    pub server_tls: Arc<rustls::ServerConfig>,
    /// Outbound mTLS connections to peer sidecars.
    pub pool: Arc<Pool>,
    /// Inbound connection budget (per source, too).
    pub inbound_limit: Budget,
    /// Outbound connection budget, apart so inbound floods cannot take it.
    pub outbound_limit: Budget,
    /// Who answers at each destination, when the discovery service is configured.
    pub discovery: Option<Arc<Resolver>>,
    /// Endpoint choice for Service destinations.
    pub balancer: Arc<Balancer>,
}

impl Ctx {
    /// The policy in force right now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.borrow().clone()
    }
}
