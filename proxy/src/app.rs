//! Wiring of `moat-proxy run`: identity, policy, listeners, admin, and the shutdown sequence.
//!
//! Start: bind every listener, obtain the first certificate (readiness stays false until then),
//! then serve. Stop (SIGTERM or `POST /shutdown`): report not-ready at once, keep proxying for
//! the drain delay while the app finishes, stop accepting, let in-flight connections complete
//! within the grace period, exit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use moat_core::admin::{self, Health};
use moat_core::bundle::TrustBundle;
use moat_core::client::{CaClient, CaClientConfig, KeyAlgorithm};
use moat_core::manager::{IdentityHandle, IdentityManager, Schedule};
use moat_core::tls::{self, SpiffeVerifier};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify, Semaphore};

use crate::config::{Config, RunArgs};
use crate::conns::Registry;
use crate::policy::Policy;
use crate::pool::Pool;
use crate::{admin_routes, inbound, outbound, probes};

/// Everything a connection handler needs.
pub struct Ctx {
    /// Validated configuration.
    pub cfg: Config,
    /// Our SPIFFE ID, as a metric label.
    pub local_label: Arc<str>,
    policy: watch::Receiver<Arc<Policy>>,
    /// Live connections (revocation, drain).
    pub conns: Arc<Registry>,
    /// Inbound mTLS configuration (client certificate mandatory).
    pub server_tls: Arc<rustls::ServerConfig>,
    /// Outbound mTLS connections to peer sidecars.
    pub pool: Arc<Pool>,
    /// Connection limit.
    pub limit: Arc<Semaphore>,
}

impl Ctx {
    /// The policy in force right now.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.borrow().clone()
    }
}

/// Runs the sidecar until it is told to stop.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    moat_core::telemetry::init_logging(args.log_format, &args.log_level)
        .map_err(anyhow::Error::msg)?;
    let cfg = Config::from_args(&args).map_err(anyhow::Error::msg)?;
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

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .with_context(|| format!("cannot create {what} socket"))?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr)
        .with_context(|| format!("cannot listen on {addr} ({what})"))?;
    sock.listen(4096)
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

async fn serve(args: RunArgs, cfg: Config) -> anyhow::Result<()> {
    let metrics = moat_core::telemetry::install_metrics().map_err(anyhow::Error::msg)?;
    let provider = tls::provider();
    let (bundle, bundle_file) = load_bundle(&args)?;
    let bundle = Arc::new(ArcSwap::from_pointee(bundle));
    let key_algorithm = match args.key_algorithm.as_str() {
        "ecdsa-p256" => KeyAlgorithm::EcdsaP256,
        "ed25519" => KeyAlgorithm::Ed25519,
        other => anyhow::bail!("--key-algorithm {other:?}: use ecdsa-p256 or ed25519"),
    };
    let client = CaClient::new(
        CaClientConfig {
            url: args.ca_url.clone(),
            token_file: args.token_file.clone(),
            identity: cfg.identity.clone(),
            key_algorithm,
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
    let probes =
        probes::AppProbes::parse(args.app_probes.as_deref()).map_err(anyhow::Error::msg)?;

    // Bind everything first: a port conflict is a start-up error, not a silent half-proxy.
    let inbound_l = bind(cfg.inbound_listen, "inbound").await?;
    let outbound_l = match cfg.outbound_listen {
        Some(a) => Some(bind(a, "outbound").await?),
        None => None,
    };
    let mut route_ls = Vec::new();
    for r in &cfg.routes {
        route_ls.push((bind(r.listen, "route").await?, Arc::new(r.clone())));
    }
    let admin_l = bind(cfg.admin_listen, "admin").await?;

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
        cfg.connect_timeout.max(cfg.handshake_timeout),
        cfg.pool_idle_timeout,
        cfg.pool_max_idle,
    ));
    let conns = Arc::new(Registry::default());
    let ctx = Arc::new(Ctx {
        local_label: Arc::from(cfg.identity.as_str()),
        limit: Arc::new(Semaphore::new(cfg.max_connections)),
        cfg,
        policy: policy.clone(),
        conns: conns.clone(),
        server_tls,
        pool: pool.clone(),
    });

    spawn_revoker(policy, conns.clone(), admin_stop_rx.clone());
    spawn_pool_evictor(pool, admin_stop_rx.clone());

    let health = Arc::new(Health::default());
    let shutdown_now = Arc::new(Notify::new());
    let routes = admin_routes::routes(identity.clone(), shutdown_now.clone(), probes);
    tokio::spawn(admin::serve(
        admin_l,
        metrics,
        health.clone(),
        Some(routes),
        admin_stop_rx,
    ));

    tracing::info!(identity = %ctx.cfg.identity, ca = %args.ca_url, "waiting for the first certificate");
    tokio::select! {
        _ = identity.ready() => {}
        _ = moat_core::shutdown::os_signal() => {
            tracing::info!("stopped before obtaining an identity");
            return Ok(());
        }
    }
    tracing::info!(
        identity = %ctx.cfg.identity,
        inbound = %ctx.cfg.inbound_listen,
        outbound = ?ctx.cfg.outbound_listen,
        routes = ctx.cfg.routes.len(),
        admin = %ctx.cfg.admin_listen,
        "moat-proxy ready"
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(inbound::serve(inbound_l, ctx.clone(), stop_rx.clone()));
    if let Some(l) = outbound_l {
        tasks.spawn(outbound::serve(l, None, ctx.clone(), stop_rx.clone()));
    }
    for (l, r) in route_ls {
        tasks.spawn(outbound::serve(l, Some(r), ctx.clone(), stop_rx.clone()));
    }
    spawn_readiness(identity, health.clone());

    let immediate = tokio::select! {
        _ = moat_core::shutdown::os_signal() => false,
        _ = shutdown_now.notified() => true,
    };
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

/// Readiness follows the identity: ready while a valid certificate is held.
fn spawn_readiness(identity: IdentityHandle, health: Arc<Health>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            health.set_ready(identity.has_valid_cert());
            tick.tick().await;
        }
    });
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
