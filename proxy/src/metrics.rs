//! The proxy's Prometheus metrics: names, labels, and cheap per-connection handles.
//!
//! Labels are bounded: direction, reason and decision enums, rule names, and SPIFFE IDs —
//! never IP addresses, paths or hosts.

use metrics::{counter, gauge, Counter, Gauge};

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
