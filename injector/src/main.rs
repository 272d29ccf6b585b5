//! `moat-injector`: Moat's sidecar injector (`serve`: the admission webhook; `inject -f`:
//! offline injection of manifests).

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use clap::{Args, Parser, Subcommand};
use moat_core::client::CaClient;
use moat_core::daemon::{self, DaemonArgs, Lifecycle};
use moat_core::manager::{IdentityManager, Schedule};
use moat_core::telemetry;
use moat_core::tls::CurrentCert;
use moat_core::watch::FileWatch;
use moat_core::TrustBundle;
use moat_injector::cert::{self, FileCert};
use moat_injector::config::{self, ConfigArgs, FailureMode, TOKEN_FILE};
use moat_injector::kube::{self, KubeClient};
use moat_injector::syntax::format_list;
use moat_injector::webhook::Webhook;
use moat_injector::{metrics, offline};
use tokio::sync::watch;

/// Moat's sidecar injector.
#[derive(Parser)]
#[command(name = "moat-injector", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the mutating admission webhook (POST /inject) over HTTPS.
    Serve(Box<ServeArgs>),
    /// Inject manifests offline (GitOps): read YAML, write injected YAML to stdout.
    Inject(Box<InjectArgs>),
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// HTTPS webhook listen address.
    #[arg(long, env = "MOAT_INJECTOR_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Admin listen address (/metrics, /ready, /live).
    #[arg(
        long,
        env = "MOAT_INJECTOR_ADMIN_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    admin_listen: SocketAddr,
    /// Serving certificate chain (PEM), reloaded when it changes.
    #[arg(
        long,
        requires = "tls_key",
        required_unless_present = "tls_from_ca",
        conflicts_with = "tls_from_ca"
    )]
    tls_cert: Option<PathBuf>,
    /// Serving certificate key (PEM), reloaded when it changes.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Obtain and renew the serving certificate from moat-ca, and keep the webhook
    /// configuration's caBundle equal to the trust bundle.
    #[arg(long)]
    tls_from_ca: bool,
    /// MutatingWebhookConfiguration whose caBundle is kept in sync (with --tls-from-ca).
    #[arg(long, default_value = "moat-injector", value_parser = parse_object_name)]
    webhook_config_name: String,
    /// When the injector fails on a pod (an internal error, or a request or pod it cannot
    /// read): closed refuses the pod, open admits it unmodified with a warning.
    #[arg(long, value_enum, default_value_t = FailureMode::Closed)]
    failure_mode: FailureMode,
    /// Projected service-account token (audience moat-ca), with --tls-from-ca.
    #[arg(long, default_value = TOKEN_FILE)]
    token_file: PathBuf,
    /// How often certificate and trust bundle files are checked for changes.
    #[arg(long, default_value = "5s", value_parser = moat_core::duration::parse)]
    reload_interval: Duration,
    /// How often the webhook caBundle is checked (with --tls-from-ca).
    #[arg(long, default_value = "30s", value_parser = moat_core::duration::parse)]
    ca_bundle_sync_interval: Duration,
    /// Most connections open at once. At the limit the oldest connection without a request in
    /// progress is closed to make room; when all are busy, new ones are refused.
    #[arg(long, default_value_t = moat_injector::webhook::MAX_CONNECTIONS, value_parser = parse_max_connections)]
    max_connections: usize,
    #[command(flatten)]
    connections: moat_core::https::ConnectionArgs,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Args)]
struct InjectArgs {
    /// Manifest file (YAML, multi-document and kind: List allowed), or - for stdin.
    #[arg(short = 'f', long = "filename")]
    file: String,
    #[command(flatten)]
    config: ConfigArgs,
}

fn parse_max_connections(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive number of connections")),
    }
}

fn parse_object_name(s: &str) -> Result<String, String> {
    kube::validate_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve(args) => serve(*args),
        Cmd::Inject(args) => inject(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat-injector: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn inject(args: InjectArgs) -> anyhow::Result<()> {
    let cfg = args.config.load()?;
    let mut input = String::new();
    if args.file == "-" {
        std::io::stdin()
            .read_to_string(&mut input)
            .context("cannot read stdin")?;
    } else {
        input = std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file))?;
    }
    let (out, reports) = offline::inject_yaml(&input, &cfg)?;
    for r in &reports {
        eprintln!("moat-injector: {}: {}", r.object, r.result);
        for w in &r.warnings {
            eprintln!("moat-injector:   warning: {w}");
        }
    }
    print!("{out}");
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let daemon = args.daemon.clone();
    daemon::block_on("moat-injector", &daemon, run(args))?
}

async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let metrics_handle = telemetry::install_metrics()?;
    metrics::describe();
    let cfg = args.config.load()?;
    let provider = moat_core::tls::provider();
    let lifecycle = Lifecycle::new("moat-injector");
    let shutdown_rx = lifecycle.stopping();

    // Serving certificate, and whether it is currently valid.
    let (serving, cert_valid): (Arc<CurrentCert>, Box<dyn Fn() -> bool + Send + Sync>) = if args
        .tls_from_ca
    {
        let bundle_bytes = std::fs::read(&args.config.trust_bundle).with_context(|| {
            format!(
                "cannot read trust bundle {}",
                args.config.trust_bundle.display()
            )
        })?;
        let bundle = Arc::new(ArcSwap::from_pointee(
            TrustBundle::from_pem(&bundle_bytes).context("trust bundle")?,
        ));
        let ca_cfg = cert::ca_client_config(
            &args.config.ca_url,
            &args.token_file,
            &args.config.trust_domain,
        )?;
        let identity = ca_cfg.identity.clone();
        let client =
            CaClient::new(ca_cfg, bundle.clone(), provider.clone()).context("CA client")?;
        let (manager, handle) = IdentityManager::new(
            client,
            bundle.clone(),
            Some((args.config.trust_bundle.clone(), bundle_bytes)),
            provider.clone(),
            Schedule::default(),
        );
        tokio::spawn(manager.run(shutdown_rx.clone()));
        let kube = KubeClient::in_cluster().context(
            "--tls-from-ca keeps the webhook caBundle in sync and needs the Kubernetes API",
        )?;
        tokio::spawn(cert::sync_ca_bundle(
            kube,
            args.webhook_config_name.clone(),
            handle.bundle.clone(),
            args.ca_bundle_sync_interval,
            shutdown_rx.clone(),
        ));
        tracing::info!(spiffe_id = %identity, dns_name = cert::SERVICE_DNS_NAME, webhook_config = %args.webhook_config_name, "serving certificate from moat-ca");
        (
            handle.cert.clone(),
            Box::new(move || handle.has_valid_cert()),
        )
    } else {
        let (Some(c), Some(k)) = (&args.tls_cert, &args.tls_key) else {
            bail!("give --tls-cert and --tls-key, or --tls-from-ca");
        };
        let serving = Arc::new(CurrentCert::default());
        let files = FileCert::load(c, k, &serving, &provider).context("serving certificate")?;
        tokio::spawn(files.run(
            serving.clone(),
            provider.clone(),
            args.reload_interval,
            shutdown_rx.clone(),
        ));
        tracing::info!(cert = %c.display(), key = %k.display(), "serving certificate from files");
        (serving, Box::new(|| true))
    };

    let limits = args.connections.apply(moat_core::https::Limits {
        max_connections: args.max_connections,
        ..moat_injector::webhook::default_limits()
    });
    let webhook_state = Arc::new(Webhook::new(cfg, args.failure_mode).with_limits(limits));
    spawn_bundle_reload(
        webhook_state.clone(),
        args.config.trust_bundle.clone(),
        args.reload_interval,
        shutdown_rx.clone(),
    );

    let tls =
        Arc::new(moat_core::https::server_config(serving.clone()).context("TLS configuration")?);
    let listener = daemon::listen(args.listen, "webhook").await?;
    let admin_listener = daemon::listen(args.admin_listen, "admin").await?;

    let admin_local = admin_listener.local_addr().unwrap_or(args.admin_listen);
    lifecycle.serve_admin(admin_listener, metrics_handle);
    {
        // Ready while a valid serving certificate is installed.
        let health = lifecycle.health().clone();
        let serving = serving.clone();
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => health.set_ready(serving.get().is_some() && cert_valid()),
                    _ = moat_core::shutdown::signalled(&mut stop) => return,
                }
            }
        });
    }
    let local = listener.local_addr().unwrap_or(args.listen);
    let injected = webhook_state.config();
    tracing::info!(
        listen = %local,
        admin = %admin_local,
        failure_mode = ?args.failure_mode,
        sidecar_mode = args.config.sidecar_mode.as_str(),
        proxy_image = %args.config.proxy_image,
        skip_outbound_cidrs = %format_list(&injected.skip_outbound_cidrs),
        skip_outbound_endpoints = %moat_injector::inject::format_endpoints(&injected.skip_outbound_endpoints),
        allow_opt_out = %injected.enforcement.describe(),
        allow_skip_inbound_ports = %format_list(&injected.enforcement.skip_inbound_ports),
        allow_skip_outbound_ports = %format_list(&injected.enforcement.skip_outbound_ports),
        allow_skip_outbound_cidrs = %format_list(&injected.enforcement.skip_outbound_cidrs),
        version = config::VERSION,
        "moat-injector serving POST /inject"
    );
    lifecycle
        .serve_until_signal(listener, tls, webhook_state, args.daemon.shutdown_grace)
        .await;
    Ok(())
}

/// Reloads the trust bundle written into sidecars when its file changes.
fn spawn_bundle_reload(
    webhook: Arc<Webhook>,
    path: PathBuf,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let current = webhook.config().trust_bundle_pem.clone().into_bytes();
    let mut w = FileWatch::new(path.clone(), None);
    tokio::spawn(async move {
        let mut last = current;
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = moat_core::shutdown::signalled(&mut shutdown) => return,
            }
            match w.poll().await {
                Ok(Some(bytes)) => match config::parse_bundle(&path, &bytes) {
                    Ok(pem) if pem.as_bytes() != last.as_slice() => {
                        let mut cfg = (*webhook.config()).clone();
                        cfg.trust_bundle_pem = pem.clone();
                        webhook.set_config(cfg);
                        last = pem.into_bytes();
                        tracing::info!(path = %path.display(), "trust bundle for new sidecars reloaded");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "new trust bundle rejected; sidecars keep getting the previous one")
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read trust bundle; keeping the previous one")
                }
            }
        }
    });
}
