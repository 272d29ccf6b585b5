//! The discovery API between `moat-destination` and the sidecars: a sidecar names the
//! destination addresses its app dials; it learns who must answer at each.
//!
//! One call, `POST /v1/watch`, over HTTP/2 with mutual TLS (the sidecar's SVID; the server
//! pinned as [`SERVICE_ACCOUNT`] in the control-plane namespace). The request lists every
//! target with the version the sidecar holds; the server answers at once with the targets
//! whose version differs, or holds the request until one changes (at most
//! [`WatchRequest::wait_s`]) and then answers with an empty list. Each answer is a complete
//! resolution, never a delta, and its version is a hash of its content, so any replica
//! answers any sidecar and a lost answer can't leave a sidecar inconsistent.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::spiffe::{SpiffeId, TrustDomain};

/// The watch endpoint.
pub const WATCH_PATH: &str = "/v1/watch";
/// The discovery service's service account in the control-plane namespace: its SVID is the
/// only identity a sidecar accepts as the discovery server.
pub const SERVICE_ACCOUNT: &str = "moat-destination";
/// The control-plane namespace.
pub const CONTROL_PLANE_NAMESPACE: &str = "moat-system";
/// The port the discovery service listens on.
pub const PORT: u16 = 8086;
/// Most targets one request may name.
pub const MAX_TARGETS: usize = 4096;
/// Longest a request may be held.
pub const MAX_WAIT_S: u64 = 60;

/// The discovery server's SPIFFE identity in `td`.
pub fn server_identity(td: &TrustDomain) -> SpiffeId {
    // Both segments are constants that satisfy the SPIFFE path rules.
    SpiffeId::workload(td, CONTROL_PLANE_NAMESPACE, SERVICE_ACCOUNT)
        .unwrap_or_else(|_| unreachable!("constant identity segments are valid"))
}

/// What a sidecar asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    /// Every target the sidecar wants kept current, with the version it holds (0: none).
    pub targets: Vec<Known>,
    /// How long the server may hold the request when nothing changed.
    pub wait_s: u64,
}

/// A target and the version the sidecar holds for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    /// The address the app dials: a pod IP and port, or a Service's cluster IP and port.
    pub target: SocketAddr,
    /// The version held (0 when the sidecar knows nothing yet).
    #[serde(default)]
    pub version: u64,
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WatchResponse {
    /// The targets whose resolution differs from the version the sidecar holds.
    pub updates: Vec<Update>,
}

/// A target's current resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Update {
    /// The address asked about.
    pub target: SocketAddr,
    /// Version of `resolution` ([`Resolution::version`]).
    pub version: u64,
    /// Who answers there.
    pub resolution: Resolution,
}

/// Who answers at an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resolution {
    /// A running pod's IP.
    Pod {
        /// `namespace/name`.
        pod: String,
        /// Its SPIFFE identity (from its service account).
        identity: SpiffeId,
        /// Whether it runs Moat's sidecar.
        meshed: bool,
    },
    /// A Service's cluster IP and port: its endpoints, ready ones first.
    Service {
        /// `namespace/name`.
        service: String,
        /// The endpoints that serve the port, with the port to dial on each.
        endpoints: Vec<Endpoint>,
    },
    /// Neither a known pod nor a known Service port.
    Unknown,
}

/// One endpoint of a Service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// Pod IP and target port.
    pub addr: SocketAddr,
    /// `namespace/name` of the pod, when the endpoint names one.
    pub pod: Option<String>,
    /// The pod's identity; `None` when the endpoint is not a known pod.
    pub identity: Option<SpiffeId>,
    /// Whether the pod runs Moat's sidecar.
    pub meshed: bool,
    /// The endpoint's zone (`topology.kubernetes.io/zone`), if known.
    pub zone: Option<String>,
    /// Relative weight for load balancing (1 unless the endpoint says otherwise).
    pub weight: u32,
}

impl Resolution {
    /// A Service's endpoints; none for anything else.
    pub fn endpoints(&self) -> &[Endpoint] {
        match self {
            Resolution::Service { endpoints, .. } => endpoints,
            _ => &[],
        }
    }

    /// A stable hash of the content: equal resolutions have equal versions on every replica of
    /// the same build. Never 0 (which means "nothing held").
    pub fn version(&self) -> u64 {
        // SipHash with fixed keys: deterministic, unlike RandomState.
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn versions_follow_content_and_are_never_zero() {
        let id = SpiffeId::workload(&td(), "shop", "api").unwrap();
        let a = Resolution::Pod {
            pod: "shop/api-0".into(),
            identity: id.clone(),
            meshed: true,
        };
        let b = Resolution::Pod {
            pod: "shop/api-0".into(),
            identity: id,
            meshed: false,
        };
        assert_eq!(a.version(), a.clone().version());
        assert_ne!(a.version(), b.version());
        assert_ne!(Resolution::Unknown.version(), 0);
    }

    #[test]
    fn wire_format_is_tagged_json_and_rejects_bad_identities() {
        let u = Update {
            target: "10.96.0.10:80".parse().unwrap(),
            version: 7,
            resolution: Resolution::Service {
                service: "shop/api".into(),
                endpoints: vec![Endpoint {
                    addr: "10.244.0.5:8080".parse().unwrap(),
                    pod: Some("shop/api-0".into()),
                    identity: Some(SpiffeId::workload(&td(), "shop", "api").unwrap()),
                    meshed: true,
                    zone: None,
                    weight: 1,
                }],
            },
        };
        let json = serde_json::to_string(&u).unwrap();
        assert!(json.contains(r#""kind":"service""#), "{json}");
        assert_eq!(serde_json::from_str::<Update>(&json).unwrap(), u);
        let bad = json.replace("spiffe://cluster.local/ns/shop/sa/api", "spiffe://x/../y");
        assert!(serde_json::from_str::<Update>(&bad).is_err());
        assert_eq!(
            server_identity(&td()).as_str(),
            "spiffe://cluster.local/ns/moat-system/sa/moat-destination"
        );
    }
}
