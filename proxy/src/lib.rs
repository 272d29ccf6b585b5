//! `moat-proxy`: the Moat sidecar. It captures a pod's inbound and outbound TCP, wraps
//! pod-to-pod traffic in mutual TLS 1.3, verifies who is on the other end, enforces identity
//! allow lists, and exports latency and traffic metrics.
//!
//! A connection's path: [`inbound`] / [`outbound`] accept → [`detect`] → [`tunnel`] (mTLS
//! between sidecars, pooled by [`pool`]) → [`policy`] → [`http`] (per request) or [`forward`]
//! (opaque bytes).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin_routes;
pub mod app;
pub mod balance;
pub mod bufio;
pub mod config;
pub mod conns;
pub mod detect;
pub mod discovery;
pub mod forward;
pub mod http;
pub mod inbound;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod observe;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod probes;
pub mod redirect;
pub mod retry;
pub mod tunnel;
