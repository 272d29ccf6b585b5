//! `moat-ca`: Moat's in-cluster certificate authority.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use moat_ca::auth::{Jwks, TokenReview, TokenVerifier};
use moat_ca::authority::{self, Authority};
use moat_ca::guard::{CacheConfig, Guarded, ReviewLimits};
use moat_ca::server::{CaService, Limits};
use moat_core::daemon::{self, DaemonArgs, Lifecycle};
use moat_core::https::ConnectionArgs;
use moat_core::spiffe::TrustDomain;
use moat_core::telemetry;
use moat_core::tls::CurrentCert;

/// Moat's certificate authority: short-lived SPIFFE X.509 SVIDs for workloads that prove who
/// they are with their projected service-account token.
#[derive(Parser)]
#[command(name = "moat-ca", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a new root CA (ECDSA P-256) in DIR: ca.crt, ca.key (0600) and bundle.pem.
    Init {
        /// Trust domain, e.g. cluster.local.
        #[arg(long)]
        trust_domain: TrustDomain,
        /// Directory to write into (created if missing). Refuses to overwrite a key.
        #[arg(long)]
        dir: PathBuf,
        /// Root validity.
        #[arg(long, default_value = "87600h", value_parser = moat_core::duration::parse)]
        validity: Duration,
    },
    /// Issue an intermediate signing CA from a root, written as a Kubernetes TLS Secret mounts
    /// it (tls.crt, tls.key, ca.crt), so the root can stay offline.
    Intermediate {
        /// Directory holding the root (as written by `init`).
        #[arg(long)]
        root_dir: PathBuf,
        /// Directory to write the intermediate into.
        #[arg(long)]
        out: PathBuf,
        /// Intermediate validity.
        #[arg(long, default_value = "8760h", value_parser = moat_core::duration::parse)]
        validity: Duration,
    },
    /// Serve the issuance API over HTTPS.
    Serve(Box<ServeArgs>),
}

#[derive(Args)]
struct ServeArgs {
    /// Directory with the signing material: a root (ca.crt, ca.key, bundle.pem) or a mounted
    /// Kubernetes Secret (tls.crt, tls.key, ca.crt).
    #[arg(long, required_unless_present = "signing_cert", env = "MOAT_CA_DIR")]
    dir: Option<PathBuf>,
    /// Signing certificate (PEM, chain allowed), instead of --dir.
    #[arg(long, requires_all = ["signing_key", "bundle"], conflicts_with = "dir")]
    signing_cert: Option<PathBuf>,
    /// Signing key (PEM), with --signing-cert.
    #[arg(long)]
    signing_key: Option<PathBuf>,
    /// Trust bundle (PEM roots, several allowed for rotation), with --signing-cert.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Trust domain; by default read from the signing certificate's spiffe:// URI SAN.
    #[arg(long, env = "MOAT_TRUST_DOMAIN")]
    trust_domain: Option<TrustDomain>,
    /// API listen address.
    #[arg(long, default_value = "0.0.0.0:8443", env = "MOAT_CA_LISTEN")]
    listen: SocketAddr,
    /// Admin listen address (/metrics, /ready, /live).
    #[arg(long, default_value = "0.0.0.0:9090", env = "MOAT_CA_ADMIN_LISTEN")]
    admin_listen: SocketAddr,
    /// DNS names and IPs of the CA's serving certificate (repeat or comma-separate).
    #[arg(long = "san", value_delimiter = ',', default_values = ["moat-ca.moat-system.svc", "localhost", "127.0.0.1"])]
    sans: Vec<String>,
    /// Lets an identity also request DNS SANs: `SPIFFE_ID=NAME[,NAME...]` (repeatable). Used
    /// for the injector's webhook serving certificate.
    #[arg(long = "dns-san", value_parser = parse_dns_san)]
    dns_sans: Vec<(moat_core::SpiffeId, Vec<String>)>,
    /// Lifetime of issued certificates (5m to 24h).
    #[arg(long, default_value = "1h", value_parser = moat_core::duration::parse, env = "MOAT_CA_CERT_TTL")]
    cert_ttl: Duration,
    /// Testing only: allow --cert-ttl below 5 minutes (down to 1s). Logged loudly.
    #[arg(long, hide = true)]
    test_allow_short_ttl: bool,
    /// Verify tokens offline against this JWK Set (the service-account issuer's keys) instead
    /// of the Kubernetes TokenReview API.
    #[arg(long, requires = "token_issuer")]
    jwks_file: Option<PathBuf>,
    /// Expected token issuer (`iss`), with --jwks-file.
    #[arg(long)]
    token_issuer: Option<String>,
    /// Expected token audience.
    #[arg(long, default_value = "moat-ca", env = "MOAT_CA_TOKEN_AUDIENCE")]
    token_audience: String,
    /// Sustained requests per second allowed per workload identity.
    #[arg(long, default_value_t = 5.0)]
    rate_limit: f64,
    /// Burst allowed per workload identity.
    #[arg(long, default_value_t = 20.0)]
    rate_burst: f64,
    /// Deadline for one request.
    #[arg(long, default_value = "10s", value_parser = moat_core::duration::parse)]
    request_timeout: Duration,
    /// Maximum concurrent connections.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
    #[command(flatten)]
    connections: ConnectionArgs,
    /// Directory of the CA's own service-account credentials (token, ca.crt), used to call
    /// the TokenReview API.
    #[arg(long, default_value = moat_ca::auth::SA_DIR, env = "MOAT_CA_SERVICE_ACCOUNT_DIR")]
    service_account_dir: PathBuf,
    /// TokenReview: how long a verified token is remembered (never beyond its expiry; 0s: no
    /// cache).
    #[arg(long, default_value = "60s", value_parser = moat_core::duration::parse)]
    token_cache_ttl: Duration,
    /// TokenReview: how long a refused token is remembered (0s: not at all).
    #[arg(long, default_value = "10s", value_parser = moat_core::duration::parse)]
    token_cache_negative_ttl: Duration,
    /// TokenReview: most tokens remembered.
    #[arg(long, default_value_t = 10_000)]
    token_cache_size: usize,
    /// TokenReview: most reviews per second sent to the Kubernetes API server, all clients
    /// together; beyond it requests get 503 auth_overloaded with Retry-After.
    #[arg(long, default_value_t = 50.0, value_parser = parse_rate)]
    token_review_rate: f64,
    /// TokenReview: burst above --token-review-rate.
    #[arg(long, default_value_t = 100.0, value_parser = parse_rate)]
    token_review_burst: f64,
    /// TokenReview: most reviews per second for tokens from one client address.
    #[arg(long, default_value_t = 5.0, value_parser = parse_rate)]
    token_review_source_rate: f64,
    /// TokenReview: burst above --token-review-source-rate.
    #[arg(long, default_value_t = 20.0, value_parser = parse_rate)]
    token_review_source_burst: f64,
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

fn parse_dns_san(s: &str) -> Result<(moat_core::SpiffeId, Vec<String>), String> {
    let (id, names) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected SPIFFE_ID=NAME[,NAME...]"))?;
    let id = moat_core::SpiffeId::parse(id).map_err(|e| format!("{id:?}: {e}"))?;
    let names: Vec<String> = names.split(',').map(|n| n.trim().to_string()).collect();
    for n in &names {
        let ok = !n.is_empty()
            && n.len() <= 253
            && n.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(format!("{n:?} is not a valid DNS name"));
        }
    }
    Ok((id, names))
}

fn check_ttl(ttl: Duration, allow_short: bool) -> anyhow::Result<()> {
    let min = if allow_short {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(300)
    };
    if ttl < min || ttl > Duration::from_secs(86400) {
        bail!(
            "--cert-ttl {} is outside the allowed 5m..24h",
            moat_core::duration::format(ttl)
        );
    }
    if allow_short && ttl < Duration::from_secs(300) {
        tracing::warn!(
            cert_ttl = %moat_core::duration::format(ttl),
            "TESTING MODE: issuing certificates shorter than 5 minutes (--test-allow-short-ttl)"
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Init {
            trust_domain,
            dir,
            validity,
        } => authority::init_root(&trust_domain, &dir, validity)
            .map(|()| {
                println!(
                    "created root CA for {trust_domain} in {}: ca.crt, ca.key (0600), bundle.pem",
                    dir.display()
                )
            })
            .map_err(anyhow::Error::from),
        Cmd::Intermediate {
            root_dir,
            out,
            validity,
        } => authority::init_intermediate(&root_dir, &out, validity)
            .map(|()| {
                println!(
                    "created intermediate CA in {}: tls.crt, tls.key (0600), ca.crt",
                    out.display()
                )
            })
            .map_err(anyhow::Error::from),
        Cmd::Serve(args) => serve(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat-ca: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let daemon = args.daemon.clone();
    daemon::block_on("moat-ca", &daemon, run(args))?
}

async fn run(args: ServeArgs) -> anyhow::Result<()> {
    check_ttl(args.cert_ttl, args.test_allow_short_ttl)?;
    let metrics = telemetry::install_metrics()?;
    let authority = match (
        &args.dir,
        &args.signing_cert,
        &args.signing_key,
        &args.bundle,
    ) {
        (Some(dir), None, _, _) => Authority::load_dir(dir, args.trust_domain.as_ref())?,
        (None, Some(c), Some(k), Some(b)) => {
            Authority::load_files(c, k, b, args.trust_domain.as_ref())?
        }
        _ => bail!("give either --dir or --signing-cert, --signing-key and --bundle"),
    };
    let trust_domain = authority.trust_domain().clone();

    let verifier: Arc<dyn TokenVerifier> = match &args.jwks_file {
        Some(path) => {
            let issuer = args.token_issuer.clone().unwrap_or_default();
            let jwks = Arc::new(Jwks::load(
                path.clone(),
                issuer.clone(),
                args.token_audience.clone(),
            )?);
            tracing::info!(jwks = %path.display(), %issuer, audience = %args.token_audience, "verifying tokens offline against the issuer's JWK Set");
            spawn_jwks_reload(jwks.clone());
            jwks
        }
        None => {
            let review = TokenReview::in_cluster_with(
                args.token_audience.clone(),
                &args.service_account_dir,
            )?;
            tracing::info!(
                audience = %args.token_audience,
                cache_ttl = %moat_core::duration::format(args.token_cache_ttl),
                review_rate = args.token_review_rate,
                "verifying tokens with the Kubernetes TokenReview API"
            );
            Arc::new(Guarded::new(
                review,
                CacheConfig {
                    ttl: args.token_cache_ttl,
                    negative_ttl: args.token_cache_negative_ttl,
                    max_entries: args.token_cache_size,
                },
                ReviewLimits {
                    rate: args.token_review_rate,
                    burst: args.token_review_burst,
                    per_source_rate: args.token_review_source_rate,
                    per_source_burst: args.token_review_source_burst,
                },
            ))
        }
    };

    let serving = Arc::new(CurrentCert::default());
    install_serving_cert(&authority, &args.sans, &serving)?;
    let tls = moat_core::https::server_config(serving.clone())?;

    let listener = daemon::listen(args.listen, "API").await?;
    let admin_listener = daemon::listen(args.admin_listen, "admin").await?;

    let limits = Limits {
        cert_ttl: args.cert_ttl,
        rate_per_identity: args.rate_limit,
        burst_per_identity: args.rate_burst,
        request_timeout: args.request_timeout,
        server: args.connections.apply(moat_core::https::Limits {
            max_connections: args.max_connections,
            ..Limits::default().server
        }),
        dns_sans: args.dns_sans.iter().cloned().collect(),
    };
    let svc = Arc::new(CaService::new(authority, verifier, limits));
    let svc_for_renewal = svc.clone();
    let sans = args.sans.clone();
    let serving_for_renewal = serving.clone();
    tokio::spawn(async move {
        // Serving certificates live 24h and are replaced every 12h.
        let mut tick = tokio::time::interval(Duration::from_secs(12 * 3600));
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) =
                install_serving_cert(svc_for_renewal.authority(), &sans, &serving_for_renewal)
            {
                tracing::error!(error = %e, "cannot renew the CA's serving certificate");
            }
        }
    });

    let lifecycle = Lifecycle::new("moat-ca");
    lifecycle.serve_admin(admin_listener, metrics);
    lifecycle.health().set_ready(true);
    tracing::info!(
        listen = %args.listen,
        admin = %args.admin_listen,
        %trust_domain,
        cert_ttl = %moat_core::duration::format(args.cert_ttl),
        "moat-ca serving"
    );

    lifecycle
        .serve_until_signal(listener, Arc::new(tls), svc, args.daemon.shutdown_grace)
        .await;
    Ok(())
}

fn install_serving_cert(
    authority: &Authority,
    sans: &[String],
    serving: &CurrentCert,
) -> anyhow::Result<()> {
    let (chain, key) = authority
        .serving_cert(sans, Duration::from_secs(24 * 3600))
        .context("cannot issue the CA's serving certificate")?;
    let key = moat_core::svid::certified_key(chain, key, &moat_core::tls::provider())
        .context("cannot load serving key")?;
    serving.set(key);
    Ok(())
}

fn spawn_jwks_reload(jwks: Arc<Jwks>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        loop {
            tick.tick().await;
            match jwks.reload() {
                Ok(true) => tracing::info!(path = %jwks.path().display(), "issuer keys reloaded"),
                Ok(false) => {}
                Err(e) => {
                    let error = format!("{:#}", anyhow::Error::from(e));
                    tracing::error!(%error, "new issuer keys rejected; keeping the previous ones")
                }
            }
        }
    });
}
