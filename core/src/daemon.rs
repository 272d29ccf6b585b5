//! Start-up and shutdown of a control-plane server (`moat-ca serve`, `moat-injector serve`):
//! logging and runtime, listeners, the admin endpoints, and the stop sequence on SIGTERM
//! (not ready at once, stop accepting, drain, exit).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{self, Health};
use crate::https::{self, Handler};
use crate::telemetry::{self, LogFormat};

/// Flags every control-plane server takes.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// On SIGTERM, how long open connections may take to finish.
    #[arg(long, default_value = "10s", value_parser = crate::duration::parse)]
    pub shutdown_grace: Duration,
    /// Log format: auto (JSON unless on a terminal), json or pretty.
    #[arg(long, default_value = "auto", env = "MOAT_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Log filter, e.g. info, or info,moat_core=debug for more from one crate.
    #[arg(long, default_value = "info", env = "MOAT_LOG_LEVEL")]
    pub log_level: String,
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Logging could not be set up.
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    /// The runtime could not start.
    #[error("cannot start runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What it is for: `API`, `admin`...
        what: String,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
}

/// Installs logging as `args` say, then runs `main` to completion on a multi-threaded runtime
/// whose threads are named `name`.
pub fn block_on<F: Future>(
    name: &str,
    args: &DaemonArgs,
    main: F,
) -> Result<F::Output, StartError> {
    telemetry::init_logging(args.log_format, &args.log_level)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name(name)
        .build()
        .map_err(StartError::Runtime)?;
    Ok(rt.block_on(main))
}

/// Binds a TCP listener; the error names the address and what it is for (`API`, `admin`).
pub async fn listen(addr: SocketAddr, what: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen {
            addr,
            what: what.to_string(),
            source,
        })
}

/// A running server's lifecycle: its readiness and the stop signal its tasks watch.
#[derive(Debug)]
pub struct Lifecycle {
    name: &'static str,
    health: Arc<Health>,
    stop_tx: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
}

impl Lifecycle {
    /// A lifecycle for the program `name` (as logged when it stops), not ready yet.
    pub fn new(name: &'static str) -> Self {
        let (stop_tx, stop_rx) = watch::channel(false);
        Self {
            name,
            health: Arc::new(Health::default()),
            stop_tx,
            stop_rx,
        }
    }

    /// Turns `true` when the server starts stopping; tasks end on it.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop_rx.clone()
    }

    /// Readiness as reported on `/ready`.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Serves `/metrics`, `/ready` and `/live` on `listener` until the server stops.
    pub fn serve_admin(&self, listener: TcpListener, metrics: PrometheusHandle) {
        tokio::spawn(admin::serve(
            listener,
            metrics,
            self.health.clone(),
            None,
            self.stopping(),
        ));
    }

    /// Serves HTTPS on `listener` with `handler` ([`https::serve`]) until SIGTERM or SIGINT,
    /// then stops: not ready at once, the stop signal to every task, and open connections
    /// drained for up to `grace`.
    pub async fn serve_until_signal<H: Handler>(
        self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        handler: Arc<H>,
        grace: Duration,
    ) {
        let server = tokio::spawn(https::serve(listener, tls, handler, self.stopping(), grace));
        crate::shutdown::os_signal().await;
        tracing::info!("shutting down: not ready, draining connections");
        self.health.set_ready(false);
        let _ = self.stop_tx.send(true);
        let _ = server.await;
        tracing::info!("{} stopped", self.name);
    }
}
