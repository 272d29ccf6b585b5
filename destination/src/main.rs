//! `moat-destination serve`: the discovery service (see the library docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::{Args, Parser, Subcommand};
use moat_core::client::{CaClient, CaClientConfig, KeyAlgorithm};
use moat_core::daemon::{self, DaemonArgs, Lifecycle};
use moat_core::discovery;
use moat_core::manager::{IdentityManager, Schedule};
use moat_core::tls::SpiffeVerifier;
use moat_core::{telemetry, TrustBundle, TrustDomain};
use moat_destination::api::Api;
use moat_destination::index::Index;
use moat_destination::watch::{self, Shared};

#[derive(Parser)]
#[command(name = "moat-destination", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Watch the cluster and answer sidecars' discovery requests.
    Serve(Box<ServeArgs>),
}

#[derive(Args)]
struct ServeArgs {
    /// The discovery API (HTTP/2, mutual TLS with sidecars' SVIDs).
    #[arg(long, env = "MOAT_DESTINATION_LISTEN", default_value = "0.0.0.0:8086")]
    listen: SocketAddr,
    /// Metrics, /ready and /live.
    #[arg(
        long,
        env = "MOAT_DESTINATION_ADMIN_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    admin_listen: SocketAddr,
    /// Trust domain of the identities it hands out (and of its own).
    #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: TrustDomain,
    /// moat-ca's URL, for this service's own SVID.
    #[arg(
        long,
        env = "MOAT_CA_URL",
        default_value = "https://moat-ca.moat-system.svc:8443"
    )]
    ca_url: String,
    /// The trust bundle (PEM roots); watched for changes.
    #[arg(
        long,
        env = "MOAT_TRUST_BUNDLE",
        default_value = "/var/run/moat/trust/bundle.pem"
    )]
    trust_bundle: PathBuf,
    /// Projected service-account token (audience moat-ca) proving this service's identity.
    #[arg(long, default_value = "/var/run/secrets/moat/token")]
    token_file: PathBuf,
    /// Most sidecar connections open at once.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    #[command(flatten)]
    connections: moat_core::https::ConnectionArgs,
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    let Cmd::Serve(args) = Cli::parse().cmd;
    let daemon = args.daemon.clone();
    match daemon::block_on("moat-destination", &daemon, run(*args)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!(error = format!("{e:#}"), "moat-destination failed");
            eprintln!("moat-destination: error: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("moat-destination: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let metrics_handle = telemetry::install_metrics()?;
    moat_destination::metrics::describe();
    let provider = moat_core::tls::provider();
    let lifecycle = Lifecycle::new("moat-destination");
    let stop = lifecycle.stopping();
    let td = args.trust_domain.clone();

    // Its own SVID, like any workload's: sidecars pin this identity.
    let bundle_bytes = std::fs::read(&args.trust_bundle)
        .with_context(|| format!("cannot read trust bundle {}", args.trust_bundle.display()))?;
    let bundle = Arc::new(ArcSwap::from_pointee(
        TrustBundle::from_pem(&bundle_bytes).context("trust bundle")?,
    ));
    let identity = discovery::server_identity(&td);
    let client = CaClient::new(
        CaClientConfig {
            url: args
                .ca_url
                .parse()
                .with_context(|| format!("--ca-url {:?}", args.ca_url))?,
            token_file: args.token_file.clone(),
            identity: identity.clone(),
            key_algorithm: KeyAlgorithm::default(),
            dns_names: Vec::new(),
            timeout: Duration::from_secs(10),
        },
        bundle.clone(),
        provider.clone(),
    )
    .context("CA client")?;
    let (manager, handle) = IdentityManager::new(
        client,
        bundle.clone(),
        Some((args.trust_bundle.clone(), bundle_bytes)),
        provider.clone(),
        Schedule::default(),
    );
    tokio::spawn(manager.run(stop.clone()));

    let kube = kube::Client::try_default().await.context(
        "cannot configure the Kubernetes client (in-cluster service account or KUBECONFIG)",
    )?;
    let shared = Shared::new(Index::new(td.clone()));
    tokio::spawn(watch::run(kube, shared.clone(), stop.clone()));

    // Sidecars authenticate with their SVIDs: any identity of the trust domain may ask.
    let verifier = SpiffeVerifier::new(handle.bundle.clone(), td.clone(), provider.clone());
    let mut tls = moat_core::tls::mesh_server_config(handle.cert.clone(), verifier, provider)
        .context("TLS configuration")?;
    tls.alpn_protocols = vec![b"h2".to_vec()];

    let listener = daemon::listen(args.listen, "discovery API").await?;
    let admin_listener = daemon::listen(args.admin_listen, "admin").await?;
    lifecycle.serve_admin(admin_listener, metrics_handle);
    {
        // Ready once every kind was listed and while a valid certificate is held.
        let health = lifecycle.health().clone();
        let (shared, handle, mut stop) = (shared.clone(), handle.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut was = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = moat_core::shutdown::signalled(&mut stop) => return,
                }
                let ready = shared.is_synced() && handle.has_valid_cert();
                if ready != was {
                    tracing::info!(
                        ready,
                        synced = shared.is_synced(),
                        certificate = handle.has_valid_cert(),
                        "readiness changed"
                    );
                    was = ready;
                }
                health.set_ready(ready);
            }
        });
    }
    let limits = args.connections.apply(moat_core::https::Limits {
        max_connections: args.max_connections as usize,
        ..Api::default_limits()
    });
    let api = Arc::new(Api::new(shared, stop.clone(), limits));
    tracing::info!(listen = %args.listen, admin = %args.admin_listen, spiffe_id = %identity, trust_domain = %td, "moat-destination serving POST {}", discovery::WATCH_PATH);
    lifecycle
        .serve_until_signal(listener, Arc::new(tls), api, args.daemon.shutdown_grace)
        .await;
    Ok(())
}
