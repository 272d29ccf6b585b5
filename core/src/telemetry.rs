//! Logging and metrics set-up shared by every Moat binary.

use std::io::IsTerminal;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// JSON lines when stderr is not a terminal (production), pretty otherwise.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable, coloured when on a terminal.
    Pretty,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "json" => Ok(Self::Json),
            "pretty" => Ok(Self::Pretty),
            other => Err(format!(
                "unknown log format {other:?}: use auto, json or pretty"
            )),
        }
    }
}

/// Why logging or metrics could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("invalid log level {filter:?}: {source}")]
    LogFilter {
        /// The filter as given.
        filter: String,
        /// What is wrong with it.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global logger is already installed.
    #[error("cannot install logger: {0}")]
    Logger(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The Prometheus exporter refused its configuration.
    #[error("cannot build the metrics recorder: {0}")]
    Recorder(#[source] metrics_exporter_prometheus::BuildError),
    /// A global metrics recorder is already installed.
    #[error("cannot install the metrics recorder: a recorder is already installed")]
    RecorderInstalled,
}

/// Installs the global tracing subscriber. `filter` uses `RUST_LOG` syntax (e.g. `info`,
/// `moat_proxy=debug`).
pub fn init_logging(format: LogFormat, filter: &str) -> Result<(), TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).map_err(|source| {
        TelemetryError::LogFilter {
            filter: filter.to_string(),
            source,
        }
    })?;
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let res = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    res.map_err(TelemetryError::Logger)
}

/// Latency buckets in seconds, fine enough for sub-millisecond proxy hops.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The Prometheus recorder every Moat binary exports through: `*_seconds` histograms with
/// [`LATENCY_BUCKETS`].
pub fn recorder() -> Result<metrics_exporter_prometheus::PrometheusRecorder, TelemetryError> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(TelemetryError::Recorder)?
        .build_recorder())
}

/// Installs the global Prometheus recorder and starts its upkeep task (histogram
/// maintenance). Every `*_seconds` histogram uses [`LATENCY_BUCKETS`].
pub fn install_metrics() -> Result<PrometheusHandle, TelemetryError> {
    let recorder = recorder()?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::RecorderInstalled)?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}
