//! `moat-proxy`: the Moat sidecar. It captures a pod's inbound and outbound TCP, wraps
//! pod-to-pod traffic in mutual TLS 1.3, verifies who is on the other end, enforces identity
//! allow lists, and exports latency and traffic metrics.
//!
//! A connection's path: [`inbound`] / [`outbound`] accept → [`detect`] → [`tunnel`] (mTLS
//! between sidecars, pooled by [`pool`]) → [`policy`] → [`http`] (per request) or [`forward`]
//! (opaque bytes).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod accept;
pub(crate) mod admin_routes;
pub mod app;
pub(crate) mod balance;
pub(crate) mod bufio;
pub mod config;
pub(crate) mod conns;
pub mod detect;
pub mod discovery;
pub(crate) mod forward;
pub(crate) mod http;
pub(crate) mod inbound;
pub(crate) mod limits;
pub(crate) mod metrics;
pub(crate) mod net;
pub mod observe;
pub(crate) mod outbound;
pub mod policy;
pub(crate) mod pool;
pub(crate) mod probes;
pub mod redirect;
pub(crate) mod retry;
pub mod tunnel;
