//! Moat's certificate authority: authenticates workloads by their projected service-account
//! token and signs short-lived SPIFFE X.509 SVIDs for keys they generated themselves.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod authority;
pub mod csr;
pub mod guard;
mod ratelimit;
pub mod server;
