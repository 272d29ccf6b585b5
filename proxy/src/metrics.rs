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

/// Counts a refused connection.
pub fn refused(dir: Direction, reason: &'static str) {
    counter!(REFUSED, "direction" => dir.as_str(), "reason" => reason).increment(1);
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

/// Counts an authorization decision.
pub fn authz(decision: &'static str, rule: &str) {
    counter!(AUTHZ, "decision" => decision, "rule" => rule.to_string()).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

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
