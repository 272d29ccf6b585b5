//! End-to-end test harness: runs the real Moat release binaries on loopback and talks to them
//! like a workload would.
//!
//! * [`bin`]: finds `target/release/moat-*` next to the running test or benchmark executable.
//! * [`proc`]: [`Proc`], a child process guard that logs stderr to a file and is stopped on drop.
//! * [`net`]: free ports, plain-HTTP polling of admin endpoints, Prometheus scraping.
//! * [`token`]: a fake service-account issuer that writes a JWK Set and mints
//!   Kubernetes-shaped projected tokens (valid and deliberately broken ones).
//! * [`https`]: a TLS 1.3 HTTP/1.1 client for the CA's API, plus raw request writing for
//!   malformed traffic.
//! * [`ca`]: [`CaFixture`], a running `moat-ca` with its own root, ports and token issuer.
//! * [`cluster`]: a live Kubernetes cluster (`tests/cluster/up.sh`) driven with its own kubectl.
//! * [`kube_api`]: a stand-in for the Kubernetes API server's TokenReview endpoint.
//! * [`flood`]: an attacker's connection flood (idle TLS connections from many loopback
//!   addresses) and the file-descriptor limit it needs.
//! * [`logs`]: capturing the test process' own `tracing` output, reading a child's JSON logs.
//! * [`tools`]: external tools (`openssl`, `curl`) that a test requires.
//! * [`discovery`]: the lab's discovery service (moat-destination's API and index, fed by
//!   the lab).
//! * [`pki`]: an in-process CA issuing SVIDs, for tests and benchmarks without moat-ca.
//! * [`lab`]: the mesh lab — pods produced through the real injector and run like a kubelet
//!   would, in network namespaces (root), plus sniffing and man-in-the-middle tools.
//! * [`demo`]: the README demo's story (sample apps, three sidecars, traffic, checks), run by
//!   the `moat-demo` binary.
//!
//! Everything here is meant to be reused by the other end-to-end suites (proxy, mesh lab) and
//! by `moat-bench`.
#![warn(missing_docs)]

pub mod attack;
pub mod bin;
pub mod ca;
pub mod cluster;
pub mod demo;
pub mod discovery;
pub mod flood;
pub mod https;
pub mod kube_api;
pub mod lab;
pub mod logs;
pub mod mesh;
pub mod net;
pub mod netns;
pub mod pki;
pub mod proc;
pub mod token;
pub mod tools;

pub use bin::binary;
pub use ca::{CaFixture, CaOptions};
pub use net::{free_port, scrape_metric, wait_for_http};
pub use proc::Proc;
pub use token::{SigningKey, TokenIssuer, TokenSpec};

/// Whether `MOAT_E2E_KEEP` is set: fixtures then keep their temporary directories (keys,
/// tokens, logs) after the test and print where they are.
pub fn keep_requested() -> bool {
    std::env::var_os("MOAT_E2E_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A fresh temporary directory, removed when dropped.
pub fn temp_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    use anyhow::Context as _;
    tempfile::Builder::new()
        .prefix(&format!("moat-e2e-{prefix}-"))
        .tempdir()
        .context("cannot create a temporary directory")
}
