//! The proxy's Prometheus metrics: names, labels, and cheap per-connection handles.
//!
//! Labels are bounded: direction, reason and decision enums, rule names, and SPIFFE IDs —
//! never IP addresses, paths or hosts.

use metrics::{counter, gauge, Counter, Gauge};
use moat_core::manager::metric as identity;

/// Gauge: open proxied connections, by `direction`.
pub const CONNECTIONS_OPEN: &str = "moat_proxy_connections_open";
/// Counter: accepted connections, by `direction`.
pub const CONNECTIONS_TOTAL: &str = "moat_proxy_connections_total";
/// Counter: proxied bytes, by `direction` and `flow` (`rx` from the caller, `tx` to it).
pub const BYTES_TOTAL: &str = "moat_proxy_bytes_total";
/// Counter: failed mutual-TLS handshakes, by `direction` and `reason`.
pub const HANDSHAKE_FAILURES: &str = "moat_proxy_tls_handshake_failures_total";
/// Counter: completed mutual-TLS handshakes, by `direction`.
pub const HANDSHAKES: &str = "moat_proxy_tls_handshakes_total";
/// Counter: app connections that reused a pooled mTLS connection.
pub const POOL_REUSE: &str = "moat_proxy_tunnel_reuses_total";
/// Counter: streams replayed on a fresh tunnel connection after the peer's app refused them
/// (`retry.rs`).
pub const STREAM_RETRIES: &str = "moat_proxy_stream_retries_total";
/// Counter: authorization decisions, by `decision` and `rule`.
pub const AUTHZ: &str = "moat_proxy_authz_decisions_total";
/// Counter: open connections closed because a new policy no longer allows them.
pub const REVOKED: &str = "moat_proxy_authz_revoked_connections_total";
/// Counter: connections refused before forwarding, by `direction` and `reason`.
pub const REFUSED: &str = "moat_proxy_connections_refused_total";
/// Counter: HTTP requests, by `direction`, `status_class`, `peer`, `local`.
pub const HTTP_REQUESTS: &str = "moat_proxy_http_requests_total";
/// Histogram: HTTP request latency to response headers, seconds, by `direction`, `peer`, `local`.
pub const HTTP_DURATION: &str = "moat_proxy_http_request_duration_seconds";
/// Histogram: protocol detection time, seconds, by `direction` and `protocol`.
pub const DETECT_DURATION: &str = "moat_proxy_protocol_detect_duration_seconds";
/// Histogram: time to connect to the upstream (app or peer sidecar), seconds, by `direction`.
pub const CONNECT_DURATION: &str = "moat_proxy_connect_duration_seconds";

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

/// Every metric the sidecar exports, with its HELP text. [`describe`] registers them at
/// start-up, and tests check docs/proxy.md and every metric name in the source against it, so
/// a new metric cannot ship undocumented.
pub const ALL: &[(&str, Kind, &str)] = &[
    (CONNECTIONS_OPEN, Kind::Gauge, "Open proxied connections, by direction"),
    (CONNECTIONS_TOTAL, Kind::Counter, "Accepted connections, by direction"),
    (BYTES_TOTAL, Kind::Counter, "Proxied bytes, by direction and flow (rx from the caller, tx to it)"),
    (REFUSED, Kind::Counter, "Connections refused before forwarding, by direction and reason"),
    (HANDSHAKES, Kind::Counter, "Completed mutual-TLS handshakes, by direction"),
    (HANDSHAKE_FAILURES, Kind::Counter, "Failed mutual-TLS handshakes, by direction and reason (who was refused and why)"),
    (POOL_REUSE, Kind::Counter, "App connections that reused a pooled mTLS connection to a peer sidecar"),
    (STREAM_RETRIES, Kind::Counter, "Streams replayed on a fresh tunnel connection after the peer's app refused them, nothing delivered"),
    (AUTHZ, Kind::Counter, "Authorization decisions, by decision (allow, deny, audit_deny) and rule"),
    (REVOKED, Kind::Counter, "Open connections closed because a new policy no longer allows them"),
    (HTTP_REQUESTS, Kind::Counter, "HTTP requests, by direction, status class, peer and local identity"),
    (HTTP_DURATION, Kind::Histogram, "HTTP request latency to the response headers, seconds, by direction, peer and local identity"),
    (DETECT_DURATION, Kind::Histogram, "Protocol detection time, seconds, by direction and protocol"),
    (CONNECT_DURATION, Kind::Histogram, "Time to connect to the upstream (app or peer sidecar, handshake included), seconds, by direction"),
    (ADMIN_REFUSED, Kind::Counter, "Admin requests refused because of who asked, by route"),
    (crate::policy::watch::METRIC_RELOADS, Kind::Counter, "Policy file reloads, by result (error = rejected, the previous policy stays in force)"),
    (crate::policy::watch::METRIC_VALID, Kind::Gauge, "1 when the policy file on disk is the policy in force, 0 when it was rejected or has vanished"),
    (crate::policy::watch::METRIC_RULES, Kind::Gauge, "Rules in the policy in force"),
    (crate::discovery::CONNECTED, Kind::Gauge, "1 while the last exchange with the discovery service succeeded (0: the last answers stay in force)"),
    (crate::discovery::TARGETS, Kind::Gauge, "Destination addresses kept current through discovery"),
    (crate::discovery::UPDATES, Kind::Counter, "Discovery answers received that changed a destination"),
    (crate::discovery::ERRORS, Kind::Counter, "Failed exchanges with the discovery service, by reason"),
    (crate::discovery::LOOKUPS, Kind::Counter, "Outbound lookups in discovery, by result (cached, fetched, unanswered)"),
    (identity::EXPIRY_TIMESTAMP, Kind::Gauge, "Unix time at which the workload certificate expires"),
    (identity::TIME_TO_EXPIRY, Kind::Gauge, "Seconds left before the workload certificate expires (0 when none or expired)"),
    (identity::RENEWALS, Kind::Counter, "Certificate requests to the CA, by result and reason"),
    (identity::BUNDLE_RELOADS, Kind::Counter, "Trust bundle reloads, by result"),
];

/// Registers the HELP text of every metric in [`ALL`] with the installed recorder.
pub fn describe() {
    for &(name, kind, help) in ALL {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

/// Which side of the pod a connection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Into the pod (from another workload to our app).
    Inbound,
    /// Out of the pod (from our app to another workload).
    Outbound,
}

impl Direction {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Handles held for the life of one proxied connection.
pub struct ConnMetrics {
    /// Bytes from the caller.
    pub rx: Counter,
    /// Bytes to the caller.
    pub tx: Counter,
    open: Gauge,
}

impl ConnMetrics {
    /// Counts a new connection and keeps it counted as open until dropped.
    pub fn open(dir: Direction) -> Self {
        let d = dir.as_str();
        counter!(CONNECTIONS_TOTAL, "direction" => d).increment(1);
        let open = gauge!(CONNECTIONS_OPEN, "direction" => d);
        open.increment(1.0);
        Self {
            rx: counter!(BYTES_TOTAL, "direction" => d, "flow" => "rx"),
            tx: counter!(BYTES_TOTAL, "direction" => d, "flow" => "tx"),
            open,
        }
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

/// Why a connection was refused before anything was forwarded: the `reason` label of
/// `moat_proxy_connections_refused_total` and of the log line that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    /// The direction's connection budget is used up.
    MaxConnections,
    /// The caller's source IP holds its share of the inbound budget.
    MaxConnectionsPerSource,
    /// The connection was not redirected (no `SO_ORIGINAL_DST`) and no explicit route names a
    /// destination.
    NoOriginalDestination,
    /// The original destination is one of the proxy's own listeners.
    Loop,
    /// An inbound stream asked for another port than the one its connection was redirected
    /// from.
    PortMismatch,
    /// The port is not among `--inbound-ports` (explicit-route mode).
    PortNotExposed,
    /// An inbound stream named no port and the connection has no original destination.
    NoDestinationPort,
    /// An inbound stream asked for one of the proxy's own ports.
    ProxyPort,
    /// The original destination is not a pod address (loopback, unspecified, link-local).
    NotPodAddress,
    /// The local app refused or did not answer.
    AppUnreachable,
    /// The peer's certificate expired while its tunnel was open.
    PeerCertExpired,
    /// Outbound to a destination outside the mesh networks that no egress rule allows.
    EgressDenied,
    /// An allowed egress destination could not be reached.
    EgressUnreachable,
    /// Discovery does not know who answers at a mesh destination (or has not said in time).
    UnknownDestination,
    /// Discovery says the destination pod runs no sidecar: no plaintext fallback.
    NotMeshed,
    /// The Service has no ready endpoint.
    NoEndpoints,
    /// The peer sidecar could not be reached.
    ConnectFailed,
    /// The peer sidecar did not answer in time.
    Timeout,
    /// No workload certificate yet, so no mTLS connection can be made.
    NoIdentity,
    /// The peer failed the mTLS handshake or its identity check; the handshake's own reason
    /// (`wrong_identity`, `untrusted_issuer`, ...: [`moat_core::tls::rustls_reason`]).
    Handshake(&'static str),
}

impl RefuseReason {
    /// Every reason but [`RefuseReason::Handshake`], whose labels are the handshake's (the
    /// docs are checked against it).
    #[cfg(test)]
    pub const ALL: &[RefuseReason] = &[
        Self::MaxConnections,
        Self::MaxConnectionsPerSource,
        Self::NoOriginalDestination,
        Self::Loop,
        Self::PortMismatch,
        Self::PortNotExposed,
        Self::NoDestinationPort,
        Self::ProxyPort,
        Self::NotPodAddress,
        Self::AppUnreachable,
        Self::PeerCertExpired,
        Self::EgressDenied,
        Self::EgressUnreachable,
        Self::UnknownDestination,
        Self::NotMeshed,
        Self::NoEndpoints,
        Self::ConnectFailed,
        Self::Timeout,
        Self::NoIdentity,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::MaxConnectionsPerSource => "max_connections_per_source",
            Self::NoOriginalDestination => "no_original_destination",
            Self::Loop => "loop",
            Self::PortMismatch => "port_mismatch",
            Self::PortNotExposed => "port_not_exposed",
            Self::NoDestinationPort => "no_destination_port",
            Self::ProxyPort => "proxy_port",
            Self::NotPodAddress => "not_pod_address",
            Self::AppUnreachable => "app_unreachable",
            Self::PeerCertExpired => "peer_cert_expired",
            Self::EgressDenied => "egress_denied",
            Self::EgressUnreachable => "egress_unreachable",
            Self::UnknownDestination => "unknown_destination",
            Self::NotMeshed => "not_meshed",
            Self::NoEndpoints => "no_endpoints",
            Self::ConnectFailed => "connect_failed",
            Self::Timeout => "timeout",
            Self::NoIdentity => "no_identity",
            Self::Handshake(reason) => reason,
        }
    }
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts a refused connection.
pub fn refused(dir: Direction, reason: RefuseReason) {
    counter!(REFUSED, "direction" => dir.as_str(), "reason" => reason.as_str()).increment(1);
}

/// Admin requests refused because of who asked, by route.
pub const ADMIN_REFUSED: &str = "moat_proxy_admin_requests_refused_total";

/// Counts an admin request refused for its caller.
pub fn admin_refused(route: &'static str) {
    counter!(ADMIN_REFUSED, "route" => route).increment(1);
}

/// Counts a failed handshake.
pub fn handshake_failed(dir: Direction, reason: &'static str) {
    counter!(HANDSHAKE_FAILURES, "direction" => dir.as_str(), "reason" => reason).increment(1);
}

/// The series of authorization decisions `verdict` by `rule`, registered (at 0) now: a policy
/// registers one per rule when it is parsed, so a rule that never matched shows as 0 and a
/// decision only increments a handle.
pub fn authz_counter(verdict: crate::policy::Verdict, rule: &str) -> Counter {
    counter!(AUTHZ, "decision" => verdict.label(), "rule" => rule.to_string())
}

/// A recorder for tests: keeps the latest value of every counter and gauge.
#[cfg(test)]
pub(crate) mod test_recorder {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};

    /// Records the latest value of every counter and gauge, keyed `name{k=v,...}`.
    #[derive(Default)]
    pub(crate) struct TestRecorder {
        values: Values,
        registered: Arc<Mutex<BTreeSet<String>>>,
    }

    type Values = Arc<Mutex<BTreeMap<String, f64>>>;

    struct Cell(Values, String);

    impl Cell {
        fn update(&self, f: impl FnOnce(f64) -> f64) {
            let mut m = self.0.lock().unwrap();
            let v = m.entry(self.1.clone()).or_insert(0.0);
            *v = f(*v);
        }
    }

    impl metrics::CounterFn for Cell {
        fn increment(&self, n: u64) {
            self.update(|v| v + n as f64)
        }
        fn absolute(&self, n: u64) {
            self.update(|v| v.max(n as f64))
        }
    }

    impl metrics::GaugeFn for Cell {
        fn increment(&self, n: f64) {
            self.update(|v| v + n)
        }
        fn decrement(&self, n: f64) {
            self.update(|v| v - n)
        }
        fn set(&self, n: f64) {
            self.update(|_| n)
        }
    }

    impl TestRecorder {
        fn cell(&self, key: &metrics::Key) -> Arc<Cell> {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = if labels.is_empty() {
                key.name().to_string()
            } else {
                format!("{}{{{}}}", key.name(), labels.join(","))
            };
            self.registered.lock().unwrap().insert(name.clone());
            Arc::new(Cell(self.values.clone(), name))
        }

        /// The last value of series `name{k=v,...}`, if it ever changed.
        pub(crate) fn get(&self, name: &str) -> Option<f64> {
            self.values.lock().unwrap().get(name).copied()
        }

        /// Every series registered so far, changed or not.
        pub(crate) fn registered(&self) -> BTreeSet<String> {
            self.registered.lock().unwrap().clone()
        }
    }

    impl metrics::Recorder for TestRecorder {
        fn describe_counter(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_gauge(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn describe_histogram(
            &self,
            _: metrics::KeyName,
            _: Option<metrics::Unit>,
            _: metrics::SharedString,
        ) {
        }
        fn register_counter(
            &self,
            key: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Counter {
            metrics::Counter::from_arc(self.cell(key))
        }
        fn register_gauge(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::from_arc(self.cell(key))
        }
        fn register_histogram(
            &self,
            _: &metrics::Key,
            _: &metrics::Metadata<'_>,
        ) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_reason_is_documented_once() {
        let docs = documented();
        let row = docs
            .lines()
            .find(|l| l.starts_with(&format!("| `{REFUSED}`")))
            .expect("docs/proxy.md has a row for the refusal counter");
        let mut seen = std::collections::BTreeSet::new();
        for r in RefuseReason::ALL {
            assert!(seen.insert(r.as_str()), "{r} is listed twice");
            assert!(
                row.contains(&format!("`{r}`")),
                "docs/proxy.md does not list {r}"
            );
        }
    }

    fn documented() -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/proxy.md");
        std::fs::read_to_string(path).expect("docs/proxy.md")
    }

    /// Every `moat_..._name` token in `text`.
    fn names_in(text: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("moat_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            out.insert(tail[..end].trim_end_matches('_').to_string());
            rest = &tail[end..];
        }
        out
    }

    #[test]
    fn the_metric_list_and_docs_proxy_md_name_the_same_metrics() {
        let listed: std::collections::BTreeSet<String> =
            ALL.iter().map(|(n, _, _)| n.to_string()).collect();
        assert_eq!(listed.len(), ALL.len(), "a metric is listed twice");
        let docs = documented();
        let documented: std::collections::BTreeSet<String> = names_in(&docs)
            .into_iter()
            .filter(|n| {
                n.starts_with("moat_proxy_")
                    || n.starts_with("moat_identity_")
                    || n.starts_with("moat_trust_bundle_")
            })
            .collect();
        let undocumented: Vec<_> = listed.difference(&documented).collect();
        let unknown: Vec<_> = documented.difference(&listed).collect();
        assert!(
            undocumented.is_empty(),
            "exported but not in docs/proxy.md: {undocumented:?}"
        );
        assert!(
            unknown.is_empty(),
            "in docs/proxy.md but not exported: {unknown:?}"
        );
    }

    #[test]
    fn every_metric_name_in_the_source_is_listed() {
        let listed: Vec<&str> = ALL.iter().map(|(n, _, _)| *n).collect();
        let mut dirs = vec![std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")];
        let mut seen = 0;
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("read src") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("read source");
                // Quoted names only: a metric is created from a string constant.
                for name in names_in(&text) {
                    if !text.contains(&format!("\"{name}\"")) || !name.starts_with("moat_proxy_") {
                        continue;
                    }
                    seen += 1;
                    assert!(
                        listed.contains(&name.as_str()),
                        "{} defines {name}, which metrics::ALL does not list",
                        path.display()
                    );
                }
            }
        }
        assert!(
            seen >= 20,
            "only {seen} metric names found in the source: is the scan broken?"
        );
    }

    #[test]
    fn every_listed_metric_is_exported_with_its_help_text() {
        let recorder = moat_core::telemetry::recorder().expect("a recorder");
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            for &(name, kind, _) in ALL {
                match kind {
                    Kind::Counter => counter!(name).increment(1),
                    Kind::Gauge => gauge!(name).set(1.0),
                    Kind::Histogram => metrics::histogram!(name).record(0.001),
                }
            }
        });
        let text = handle.render();
        for &(name, kind, help) in ALL {
            assert!(
                text.contains(&format!("# HELP {name} {help}")),
                "no HELP for {name}:\n{text}"
            );
            let kind = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            assert!(
                text.contains(&format!("# TYPE {name} {kind}")),
                "{name} is not a {kind}"
            );
        }
    }
}
