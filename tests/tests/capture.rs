//! Transparent capture for real (root): pods are network namespaces on a bridge; each meshed pod
//! gets the real `moat-proxy init` nat rules and a real `moat-proxy run` as uid 7777; apps know
//! nothing about the mesh. Proves outbound/inbound capture, original-destination recovery,
//! strict mTLS for strangers and fail-closed for unverifiable destinations.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moat_e2e::mesh::backend;
use moat_e2e::netns::{Lab, Netns};
use moat_e2e::token::TokenIssuer;
use moat_e2e::{binary, require_netns, Proc};

const PROXY_UID: &str = "7777";

fn world_readable(dir: &Path) {
    // The proxy runs as uid 7777: it must read its token, bundle and policy, like kubelet
    // mounts make them readable in a pod.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let mode = if e.path().is_dir() { 0o755 } else { 0o644 };
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode));
        }
    }
}

fn wait_ready(ns: &Netns, admin: &'static str, proc: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(st)) = proc.try_status() {
            panic!("{} exited ({st}): {}", proc.name(), proc.stderr());
        }
        let ok = ns
            .within(move || {
                Ok(
                    moat_e2e::net::http_get(admin, "/ready", Duration::from_millis(500))?.status
                        == 200,
                )
            })
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready: {}",
            proc.name(),
            proc.stderr_tail(20)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(ns: &Netns) -> moat_e2e::net::Metrics {
    ns.within(|| moat_e2e::net::scrape("127.0.0.1:15020"))
        .expect("scrape")
}

fn sum(m: &moat_e2e::net::Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.series(name)
        .filter(|s| s.has_labels(labels))
        .map(|s| s.value)
        .sum()
}

struct Pod {
    ns: Netns,
    _proxy: Proc,
}

#[allow(clippy::too_many_arguments)]
fn meshed_pod(
    lab: &mut Lab,
    name: &str,
    dir: &Path,
    issuer: &TokenIssuer,
    ca_url: &str,
    bundle: &Path,
) -> Pod {
    let ns = lab.add_pod(name).expect("pod namespace");
    // The init step, exactly as the injected init container runs it.
    let out = ns
        .command(binary("moat-proxy"))
        .args(["init", "--proxy-uid", PROXY_UID, "--proxy-gid", PROXY_UID])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "moat-proxy init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = dir.join(format!("{name}.token"));
    std::fs::write(&token, issuer.token("shop", name).unwrap()).unwrap();
    world_readable(dir);
    let mut cmd = ns.command("setpriv");
    cmd.args(["--reuid", PROXY_UID, "--regid", PROXY_UID, "--clear-groups"])
        .arg(binary("moat-proxy"))
        .args([
            "run",
            "--namespace",
            "shop",
            "--service-account",
            name,
            "--ca-url",
            ca_url,
        ])
        .arg("--token-file")
        .arg(&token)
        .arg("--trust-bundle")
        .arg(bundle)
        .arg("--policy")
        .arg(dir.join("no-policy-file.yaml"))
        .args([
            "--mesh-networks",
            &lab.cidr(),
            "--log-format",
            "json",
            "--drain-delay",
            "0s",
        ]);
    let mut proxy = Proc::spawn(&format!("proxy-{name}"), cmd, dir).unwrap();
    wait_ready(&ns, "127.0.0.1:15020", &mut proxy);
    Pod { ns, _proxy: proxy }
}

fn curl_in(ns: &Netns, url: &str) -> (bool, String, String) {
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "10", "-D", "-", url])
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn transparent_capture_recovers_original_destinations_and_fails_closed() {
    require_netns!();
    moat_e2e::tools::require_tool("curl");
    moat_e2e::tools::require_tool("setpriv");
    let dir_guard = moat_e2e::temp_dir("capture").unwrap();
    let dir: PathBuf = dir_guard.path().to_path_buf();
    let mut lab = Lab::new("cap", [10, 77, 0]).unwrap();

    // The CA lives on the node, reachable from every pod (the proxy's own traffic is exempt
    // from redirection by its uid).
    let root = dir.join("root");
    moat_e2e::ca::run_ca_ok([
        "init".as_ref(),
        "--trust-domain".as_ref(),
        "cluster.local".as_ref(),
        "--dir".as_ref(),
        root.as_os_str(),
    ])
    .unwrap();
    let issuer = TokenIssuer::es256(dir.join("jwks.json")).unwrap();
    let gw = lab.gateway();
    let ca_listen = SocketAddr::from((gw, 8443));
    let mut ca_cmd = lab.node.command(binary("moat-ca"));
    ca_cmd
        .args([
            "serve",
            "--listen",
            &ca_listen.to_string(),
            "--admin-listen",
            &format!("{gw}:9090"),
        ])
        .arg("--dir")
        .arg(&root)
        .args([
            "--san",
            &gw.to_string(),
            "--token-issuer",
            issuer.name(),
            "--log-format",
            "json",
        ])
        .arg("--jwks-file")
        .arg(issuer.jwks_path());
    let mut ca = Proc::spawn("ca", ca_cmd, &dir).unwrap();
    let node = lab.node.clone();
    let admin: &'static str = Box::leak(format!("{gw}:9090").into_boxed_str());
    wait_ready(&node, admin, &mut ca);
    let bundle = root.join("bundle.pem");
    let ca_url = format!("https://{ca_listen}");

    let a = meshed_pod(&mut lab, "a", &dir, &issuer, &ca_url, &bundle);
    let b = meshed_pod(&mut lab, "b", &dir, &issuer, &ca_url, &bundle);
    let stranger = lab.add_pod("stranger").unwrap(); // no rules, no proxy: an unmeshed pod

    // The app in pod b: a plain HTTP server on 8080, knowing nothing about Moat.
    let _app = b.ns.enter(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            backend::http_on("0.0.0.0:8080".parse()?).await?;
            std::future::pending::<()>().await;
            Ok(())
        })
    });
    let b_ip = b.ns.ip.unwrap();
    let url = format!("http://{b_ip}:8080/");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (ok, out, err) = loop {
        let r = curl_in(&a.ns, &url);
        if r.0 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        ok,
        "pod a's plain curl to pod b through both sidecars: {out} {err}"
    );
    assert!(out.ends_with(backend::HELLO), "{out}");

    // Both sidecars saw it, with each other's verified identity: capture worked and the
    // original destination (b:8080) was recovered on both sides.
    let am = metrics(&a.ns);
    let bm = metrics(&b.ns);
    assert!(
        sum(
            &am,
            "moat_proxy_http_requests_total",
            &[
                ("direction", "outbound"),
                ("peer", "spiffe://cluster.local/ns/shop/sa/b")
            ]
        ) >= 1.0
    );
    assert!(
        sum(
            &bm,
            "moat_proxy_http_requests_total",
            &[
                ("direction", "inbound"),
                ("peer", "spiffe://cluster.local/ns/shop/sa/a")
            ]
        ) >= 1.0
    );

    // A stranger's plaintext is captured by b's inbound rules and refused (strict mTLS): HTTP
    // callers get a 403 naming the rule.
    let (_, out, _) = curl_in(&stranger, &url);
    assert!(out.starts_with("HTTP/1.1 403"), "stranger got: {out}");
    assert!(
        out.to_ascii_lowercase()
            .contains("x-moat-denied-by: default"),
        "{out}"
    );

    // Fail closed: the CA's admin port is inside the mesh networks but has no sidecar; a's app
    // cannot reach it (no silent plaintext), and the refusal is counted.
    let (ok, out, _) = curl_in(&a.ns, &format!("http://{gw}:9090/live"));
    assert!(
        !ok && !out.contains("live"),
        "unverifiable destination reached in plaintext: {out}"
    );
    let am = metrics(&a.ns);
    assert!(
        sum(
            &am,
            "moat_proxy_tls_handshake_failures_total",
            &[("direction", "outbound")]
        ) >= 1.0
    );
    // Outside the mesh networks with no egress allowed: refused as well.
    let (ok, _, _) = curl_in(&a.ns, "http://10.99.0.1:80/");
    assert!(!ok);
    let am = metrics(&a.ns);
    assert!(
        sum(
            &am,
            "moat_proxy_connections_refused_total",
            &[("direction", "outbound"), ("reason", "egress_denied")]
        ) >= 1.0
    );
}
