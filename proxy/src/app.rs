//! Wiring of `moat-proxy run`: identity, policy, listeners, admin, and the shutdown sequence.
//!
//! Start: bind every listener, obtain the first certificate (readiness stays false until then),
//! then serve. Stop (SIGTERM or `POST /shutdown`): report not-ready at once, keep proxying for
//! the drain delay while the app finishes, stop accepting, let in-flight connections complete
//! within the grace period, exit.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use moat_core::admin::{self, Health};
use moat_core::bundle::TrustBundle;
use moat_core::client::{CaClient, CaClientConfig};
use moat_core::manager::{IdentityHandle, IdentityManager, Schedule};
use moat_core::tls::{self, SpiffeVerifier};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};

use crate::accept::Ctx;
use crate::balance::Balancer;
use crate::config::{Config, RunArgs};
use crate::conns::Registry;
use crate::discovery::{self, Resolver};
use crate::limits::Budget;
use crate::policy::Policy;
use crate::pool::{Pool, PoolSettings};
use crate::{admin_routes, inbound, net, outbound, probes};

/// Runs the sidecar until it is told to stop.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    moat_core::telemetry::init_logging(args.log_format, &args.log_level)?;
    let cfg = Config::from_args(&args)?;
    let rt = match args.worker_threads {
        0 => anyhow::bail!("--worker-threads must be at least 1"),
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .thread_name("moat-proxy")
            .build(),
    }
    .context("cannot start the runtime")?;
    rt.block_on(serve(args, cfg))
}

/// A bundle file to watch, with the contents already loaded.
type WatchedFile = Option<(std::path::PathBuf, Vec<u8>)>;

fn load_bundle(args: &RunArgs) -> anyhow::Result<(TrustBundle, WatchedFile)> {
    if let Some(path) = &args.trust_bundle {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read trust bundle {}", path.display()))?;
        let b = TrustBundle::from_pem(&bytes)
            .with_context(|| format!("trust bundle {}", path.display()))?;
        return Ok((b, Some((path.clone(), bytes))));
    }
    let pem = args.trust_bundle_pem.as_deref().unwrap_or_default();
    let b = TrustBundle::from_pem(pem.as_bytes()).context("MOAT_TRUST_BUNDLE_PEM")?;
    Ok((b, None))
}

/// Binds exactly `addr`.
fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    net::listen(addr, false).with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// Binds a listener that traffic redirected by `moat-proxy init` reaches, on IPv6 as well:
///
/// * `0.0.0.0:P` is served by one dual-stack socket on `[::]:P` (IPv4 connections arrive
///   IPv4-mapped), or by `0.0.0.0:P` when the host has no IPv6;
/// * with `loopback6`, `127.0.0.1:P` is also bound on `[::1]:P` (where the IPv6 rules redirect
///   outbound traffic) when IPv6 loopback exists;
/// * any other address exactly.
///
/// A port already taken on the IPv6 side is an error, like on IPv4: another process would
/// receive the captured traffic.
fn bind_captured(
    addr: SocketAddr,
    what: &str,
    loopback6: bool,
) -> anyhow::Result<Vec<TcpListener>> {
    let SocketAddr::V4(v4) = addr else {
        return Ok(vec![bind(addr, what)?]);
    };
    if v4.ip().is_unspecified() {
        let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, v4.port()));
        return match net::listen(any6, true) {
            Ok(l) => Ok(vec![l]),
            Err(e) if net::is_no_ipv6(&e) => {
                tracing::debug!(error = %e, "no IPv6: {what} listener on IPv4 only");
                Ok(vec![bind(addr, what)?])
            }
            Err(e) => Err(e).with_context(|| format!("cannot listen on {any6} ({what})")),
        };
    }
    let first = bind(addr, what)?;
    if !loopback6 || *v4.ip() != Ipv4Addr::LOCALHOST {
        return Ok(vec![first]);
    }
    // The same port as the IPv4 side, also when it was chosen by the kernel (port 0).
    let port = first.local_addr().map_or(v4.port(), |a| a.port());
    let lo6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    match net::listen(lo6, false) {
        Ok(l) => Ok(vec![first, l]),
        Err(e) if net::is_no_ipv6(&e) => {
            tracing::debug!(error = %e, "no IPv6 loopback: {what} listener on {addr} only");
            Ok(vec![first])
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {lo6} ({what})")),
    }
}

/// The addresses `listeners` are bound to, for the log.
fn addresses(listeners: &[TcpListener]) -> Vec<String> {
    listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect()
}

async fn serve(args: RunArgs, cfg: Config) -> anyhow::Result<()> {
    let metrics = moat_core::telemetry::install_metrics()?;
    crate::metrics::describe();
    let provider = tls::provider();
    let (bundle, bundle_file) = load_bundle(&args)?;
    let bundle = Arc::new(ArcSwap::from_pointee(bundle));
    let client = CaClient::new(
        CaClientConfig {
            url: args.ca_url.clone(),
            token_file: args.token_file.clone(),
            identity: cfg.identity.clone(),
            key_algorithm: args.key_algorithm,
            dns_names: Vec::new(),
            timeout: Duration::from_secs(10),
        },
        bundle.clone(),
        provider.clone(),
    )?;
    let (manager, identity) = IdentityManager::new(
        client,
        bundle.clone(),
        bundle_file,
        provider.clone(),
        Schedule::default(),
    );

    let policy0 = crate::policy::watch::load_initial(&args.policy, &cfg.trust_domain)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let probes = probes::AppProbes::parse(args.app_probes.as_deref())?;

    // Bind everything first: a port conflict is a start-up error, not a silent half-proxy.
    let inbound_ls = bind_captured(cfg.inbound_listen, "inbound", false)?;
    let outbound_ls = match cfg.outbound_listen {
        Some(a) => bind_captured(a, "outbound", true)?,
        None => Vec::new(),
    };
    let mut route_ls = Vec::new();
    for r in &cfg.routes {
        route_ls.push((bind(r.listen, "route")?, Arc::new(r.clone())));
    }
    // Kubelet probes of an IPv6 pod reach the admin port over IPv6.
    let admin_ls = bind_captured(cfg.admin_listen, "admin", false)?;
    let admin_socket = match &cfg.admin_socket {
        Some(path) => Some(net::listen_unix(path)?),
        None => None,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    tokio::spawn(manager.run(admin_stop_rx.clone()));
    let policy = crate::policy::watch::spawn_watcher(
        args.policy.clone(),
        cfg.trust_domain.clone(),
        policy0,
        Duration::from_secs(2),
        admin_stop_rx.clone(),
    );

    let verifier = SpiffeVerifier::new(bundle.clone(), cfg.trust_domain.clone(), provider.clone());
    let server_tls = Arc::new(tls::mesh_server_config(
        identity.cert.clone(),
        verifier,
        provider.clone(),
    )?);
    let pool = Arc::new(Pool::new(
        identity.cert.clone(),
        bundle.clone(),
        cfg.trust_domain.clone(),
        provider.clone(),
        PoolSettings {
            connect_timeout: cfg.connect_timeout.max(cfg.handshake_timeout),
            idle_timeout: cfg.pool_idle_timeout,
            max_idle_per_key: cfg.pool_max_idle,
            keepalive: cfg.keepalive,
        },
    ));
    let discovery = match &cfg.destination_addr {
        Some(addr) => {
            let server = discovery::Server::new(
                addr.to_string(),
                &cfg.trust_domain,
                identity.cert.clone(),
                bundle.clone(),
                provider.clone(),
                cfg.connect_timeout.max(cfg.handshake_timeout),
            )?;
            let resolver = Arc::new(Resolver::default());
            tokio::spawn(resolver.clone().run(server, admin_stop_rx.clone()));
            tracing::info!(server = %addr, identity = %moat_core::discovery::server_identity(&cfg.trust_domain), "mesh destinations pinned from discovery");
            Some(resolver)
        }
        None => {
            tracing::warn!("no --destination-addr: mesh destinations without --peer-identity accept any identity of the trust domain");
            None
        }
    };
    let conns = Arc::new(Registry::default());
    let ctx = Arc::new(Ctx {
        discovery,
        balancer: Arc::new(Balancer::default()),
        local_label: Arc::from(cfg.identity.as_str()),
        inbound_limit: Budget::new(cfg.limits.inbound, Some(cfg.limits.per_source)),
        outbound_limit: Budget::new(cfg.limits.outbound, None),
        cfg,
        policy: policy.clone(),
        conns: conns.clone(),
        server_tls,
        pool: pool.clone(),
    });

    spawn_revoker(policy.clone(), conns.clone(), admin_stop_rx.clone());
    spawn_pool_evictor(pool, admin_stop_rx.clone());

    let health = Arc::new(Health::default());
    let shutdown_now = Arc::new(Notify::new());
    let gateways = net::default_gateways();
    let access = admin_routes::Access {
        probes: gateways
            .iter()
            .map(|ip| moat_core::netaddr::Cidr::host(*ip))
            .chain(ctx.cfg.probe_allow.iter().copied())
            .collect(),
        metrics: ctx.cfg.metrics_allow.clone(),
    };
    tracing::info!(probe_callers = ?access.probes, metrics_callers = ?access.metrics, "admin port access (loopback always)");
    let routes = admin_routes::routes(
        identity.clone(),
        shutdown_now.clone(),
        probes,
        access,
        policy,
    );
    if let (Some(path), Some(l)) = (&ctx.cfg.admin_socket, admin_socket) {
        tokio::spawn(admin::serve_unix(
            l,
            metrics.clone(),
            health.clone(),
            Some(routes.clone()),
            admin_stop_rx.clone(),
        ));
        tracing::info!(path = %path.display(), "local control socket (POST /shutdown)");
    }
    let admin_addrs = addresses(&admin_ls);
    for l in admin_ls {
        tokio::spawn(admin::serve(
            l,
            metrics.clone(),
            health.clone(),
            Some(routes.clone()),
            admin_stop_rx.clone(),
        ));
    }

    if ctx.cfg.inbound_target.is_some() && ctx.cfg.inbound_ports.is_empty() {
        tracing::warn!(
            "explicit-route mode without --inbound-ports: peers can reach no app port here"
        );
    }
    tracing::info!(identity = %ctx.cfg.identity, pod = %args.pod_name, ca = %args.ca_url, "waiting for the first certificate");
    tokio::select! {
        _ = identity.ready() => {}
        _ = moat_core::shutdown::os_signal() => {
            tracing::info!("stopped before obtaining an identity");
            return Ok(());
        }
    }
    tracing::info!(
        identity = %ctx.cfg.identity,
        pod = %args.pod_name,
        pod_ip = ?args.pod_ip,
        inbound = ?addresses(&inbound_ls),
        outbound = ?addresses(&outbound_ls),
        routes = ctx.cfg.routes.len(),
        admin = ?admin_addrs,
        "moat-proxy ready"
    );
    let mut tasks = tokio::task::JoinSet::new();
    for l in inbound_ls {
        tasks.spawn(inbound::serve(l, ctx.clone(), stop_rx.clone()));
    }
    for l in outbound_ls {
        tasks.spawn(outbound::serve(l, None, ctx.clone(), stop_rx.clone()));
    }
    for (l, r) in route_ls {
        tasks.spawn(outbound::serve(l, Some(r), ctx.clone(), stop_rx.clone()));
    }
    let (stop_readiness, readiness_stopped) = watch::channel(false);
    let readiness = spawn_readiness(identity, health.clone(), readiness_stopped);

    let immediate = tokio::select! {
        _ = moat_core::shutdown::os_signal() => false,
        _ = shutdown_now.notified() => true,
    };
    // Stop the readiness task before saying not-ready, or its next tick says ready again.
    let _ = stop_readiness.send(true);
    let _ = readiness.await;
    health.set_ready(false);
    let delay = if immediate {
        Duration::ZERO
    } else {
        ctx.cfg.drain_delay
    };
    tracing::info!(
        drain_delay_s = delay.as_secs_f64(),
        grace_s = ctx.cfg.shutdown_grace.as_secs_f64(),
        "shutting down: not ready; still proxying while the app finishes"
    );
    tokio::time::sleep(delay).await;
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    conns.start_drain();
    let left = conns.wait_idle(ctx.cfg.shutdown_grace).await;
    if left > 0 {
        tracing::warn!(
            connections = left,
            "grace period over; closing remaining connections"
        );
    }
    let _ = admin_stop_tx.send(true);
    tracing::info!("moat-proxy stopped");
    Ok(())
}

/// Readiness follows the identity (ready while a valid certificate is held) until `stop`.
fn spawn_readiness(
    identity: IdentityHandle,
    health: Arc<Health>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            health.set_ready(identity.has_valid_cert());
            tokio::select! {
                _ = tick.tick() => {}
                _ = moat_core::shutdown::signalled(&mut stop) => return,
            }
        }
    })
}

fn spawn_revoker(
    mut policy: watch::Receiver<Arc<Policy>>,
    conns: Arc<Registry>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = policy.changed() => if r.is_err() { return },
                _ = moat_core::shutdown::signalled(&mut stop) => return,
            }
            let p = policy.borrow_and_update().clone();
            let n = conns.revoke_denied(&p);
            if n > 0 {
                tracing::warn!(connections = n, "new policy revoked open connections");
            }
        }
    });
}

fn spawn_pool_evictor(pool: Arc<Pool>, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => pool.evict_expired(),
                _ = moat_core::shutdown::signalled(&mut stop) => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captured_listeners_cover_ipv6() {
        let any = bind_captured("0.0.0.0:0".parse().unwrap(), "test", false).unwrap();
        assert_eq!(any.len(), 1);
        let addr = any[0].local_addr().unwrap();
        if addr.is_ipv6() {
            // One dual-stack socket: an IPv4 caller arrives IPv4-mapped, is seen as IPv4, and
            // (not redirected) has no original destination.
            let client = tokio::net::TcpStream::connect(("127.0.0.1", addr.port()))
                .await
                .unwrap();
            let (server, peer) = any[0].accept().await.unwrap();
            assert!(peer.is_ipv6(), "{peer}");
            assert_eq!(net::canonical(peer), client.local_addr().unwrap());
            assert_eq!(net::original_dst(&server), None);
        }

        let lo = bind_captured("127.0.0.1:0".parse().unwrap(), "test", true).unwrap();
        let addrs: Vec<SocketAddr> = lo.iter().map(|l| l.local_addr().unwrap()).collect();
        assert!(
            addrs[0].ip().is_loopback() && addrs[0].is_ipv4(),
            "{addrs:?}"
        );
        if let Some(v6) = addrs.get(1) {
            assert_eq!(v6.ip(), Ipv6Addr::LOCALHOST);
            assert_eq!(v6.port(), addrs[0].port(), "both loopbacks on one port");
        }
        // The IPv6 loopback port taken by someone else is a start-up error, not a skip.
        if addrs.len() == 2 {
            let taken = SocketAddr::from((Ipv4Addr::LOCALHOST, addrs[0].port()));
            drop(lo);
            let _squatter =
                net::listen(SocketAddr::from((Ipv6Addr::LOCALHOST, taken.port())), false).unwrap();
            let err = bind_captured(taken, "test", true).unwrap_err();
            assert!(format!("{err:#}").contains("[::1]"), "{err:#}");
        }

        let exact = bind_captured("127.0.0.1:0".parse().unwrap(), "test", false).unwrap();
        assert_eq!(exact.len(), 1);
    }
}
