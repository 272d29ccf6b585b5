//! `moat-destination`: Moat's discovery service. It watches pods, Services and EndpointSlices
//! and tells each sidecar, for the addresses its app dials, who must answer there: a pod's
//! SPIFFE identity, or a Service's ready endpoints with theirs.

pub mod api;
pub mod index;
pub mod metrics;
pub mod watch;
