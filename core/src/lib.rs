//! Code every Moat program shares: SPIFFE identity types, X.509 SVID checks, PEM helpers,
//! Moat's TLS posture and verifiers, the CA API contract and client, and telemetry plumbing.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod api;
pub mod bundle;
pub mod client;
pub mod contract;
pub mod daemon;
pub mod discovery;
pub mod duration;
pub mod https;
pub mod manager;
pub mod netaddr;
pub mod pem;
pub mod shutdown;
pub mod spiffe;
pub mod svid;
pub mod telemetry;
pub mod tls;
pub mod watch;
pub mod x509;

#[cfg(test)]
mod testcerts;

pub use bundle::TrustBundle;
pub use spiffe::{SpiffeId, TrustDomain};
