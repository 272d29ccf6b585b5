//! Moat's sidecar injector: a mutating admission webhook (and an offline `inject -f` mode
//! sharing the same code) that adds the `moat-init` redirection step and the `moat-proxy`
//! sidecar to pods.
//!
//! Modules, one concept each:
//! * [`webhook`]: the HTTPS server (`POST /inject`);
//! * [`admission`]: AdmissionReview in, AdmissionReview out;
//! * [`inject`]: the decision and the patch;
//! * [`enforce`]: what enforcing namespaces refuse, what the platform allows, and the removal
//!   of Moat's parts before (re-)injection;
//! * [`patch`]: JSON Patch and JSON Pointer helpers;
//! * [`annotations`]: the `moat.dev/` per-pod settings;
//! * [`probes`]: app probe rewriting;
//! * [`syntax`]: value formats (ports, CIDRs, quantities, log levels);
//! * [`offline`]: `inject -f`;
//! * [`cert`]: the serving certificate (files, or issued by moat-ca) and caBundle sync;
//! * [`kube`]: the minimal in-cluster Kubernetes API client;
//! * [`config`]: flags and pinned names;
//! * [`metrics`]: metric names.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admission;
pub mod annotations;
pub mod cert;
pub mod config;
pub mod enforce;
pub mod inject;
pub mod kube;
pub mod metrics;
pub mod offline;
pub mod patch;
pub mod probes;
pub mod syntax;
pub mod webhook;
