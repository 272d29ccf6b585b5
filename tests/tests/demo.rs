//! The README demo as a check: `moat-demo --once` must pass and say what it saw.
//!
//! Needs the release binaries next to `moat-demo` (`cargo build --release --workspace`).

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn the_readme_demo_passes_and_reports_what_it_measured() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_moat-demo"))
        .args(["--once", "--duration", "3"])
        .env("NO_COLOR", "1")
        .output()
        .expect("moat-demo runs");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "moat-demo failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    let line = |needle: &str| -> &str {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stdout}"))
    };
    let web = line("->  api (spiffe://cluster.local/ns/shop/sa/api)");
    assert!(
        web.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{web}"
    );
    assert!(
        web.contains("HTTP requests ok") && web.contains("TCP echoes ok"),
        "{web}"
    );
    let batch = line("spiffe://cluster.local/ns/shop/sa/batch) ->");
    assert!(
        batch.contains("DENIED by rule \"default\": HTTP 403, TCP reset"),
        "{batch}"
    );
    let forged = line("forged certificate (self-made CA");
    assert!(
        forged.contains("REFUSED in handshake: untrusted_issuer"),
        "{forged}"
    );
    assert!(line("Request latency").contains("p99.9"));
    assert!(line("Sidecar metrics").contains("/metrics"));
    assert!(line("Certificates: api serial").contains("expires"));
    // Everything it started is stopped and its temporary files are gone.
    let logs = line("Logs (JSON")
        .split_whitespace()
        .find(|w| w.starts_with('/'))
        .expect("the logs directory is printed");
    assert!(
        !std::path::Path::new(logs).exists(),
        "{logs} is left behind after --once"
    );
    assert!(line("Stopped 4 processes").contains("removed the temporary files"));
    assert!(
        !stdout.contains("FAILED") && !stderr.contains("FAILED"),
        "{stdout}{stderr}"
    );
    assert!(
        elapsed < Duration::from_secs(20),
        "moat-demo --once --duration 3 took {elapsed:?}"
    );
}

/// `moat-demo --lab --once` (root): the same story with pods made by the injector in network
/// namespaces; everything it built is gone afterwards.
#[test]
fn the_lab_demo_passes_in_network_namespaces() {
    moat_e2e::require_netns!();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_moat-demo"))
        .args(["--lab", "--once", "--duration", "2"])
        .env("NO_COLOR", "1")
        .output()
        .expect("moat-demo runs");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "moat-demo --lab failed\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
    );
    let line = |needle: &str| -> &str {
        stdout
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{stdout}"))
    };
    for pod in ["api", "web", "batch"] {
        let l = line(&format!("sidecar spiffe://cluster.local/ns/shop/sa/{pod};"));
        assert!(l.contains("injected ("), "{l}");
    }
    let web = line("->  api (spiffe://cluster.local/ns/shop/sa/api)");
    assert!(
        web.contains("HTTP requests ok") && web.contains("TCP echoes ok"),
        "{web}"
    );
    let batch = line("spiffe://cluster.local/ns/shop/sa/batch) ->");
    assert!(
        batch.contains("DENIED by rule \"default\": HTTP 403, TCP reset"),
        "{batch}"
    );
    let forged = line("forged certificate (self-made CA");
    assert!(
        forged.contains("REFUSED in handshake: untrusted_issuer"),
        "{forged}"
    );
    let node = line("[1/3] control")
        .split_whitespace()
        .find(|w| w.ends_with("-node"))
        .expect("the node namespace is named");
    let prefix = node.trim_end_matches("node");
    let left: Vec<String> = moat_e2e::netns::list_namespaces()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(line("Stopped 5 processes, removed 5 namespaces").contains("temporary files"));
    let logs = line("Logs (JSON")
        .split_whitespace()
        .find(|w| w.starts_with('/'))
        .expect("the logs directory is printed");
    let logs = logs.split("/pods/").next().unwrap_or(logs);
    assert!(
        !std::path::Path::new(logs).exists(),
        "{logs} is left behind after --once"
    );
    assert!(
        !stdout.contains("FAILED") && !stderr.contains("FAILED"),
        "{stdout}{stderr}"
    );
    assert!(
        elapsed < Duration::from_secs(60),
        "moat-demo --lab --once --duration 2 took {elapsed:?}"
    );
}
