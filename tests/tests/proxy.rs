//! The real `moat-proxy` on loopback: two sidecars with explicit routes, identities from the
//! real `moat-ca`, real backends, and curl/openssl as independent peers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use moat_e2e::mesh::{backend, ProxyFixture, ProxyOptions};
use moat_e2e::net::{free_addr, Metrics};
use moat_e2e::tools::{require_tool, run};
use moat_e2e::{CaFixture, CaOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TD: &str = "cluster.local";

fn id(sa: &str) -> String {
    format!("spiffe://{TD}/ns/shop/sa/{sa}")
}

/// Policy on the `api` side: `web` may reach everything; nobody else.
fn api_policy(default: &str) -> String {
    format!(
        "apiVersion: moat.dev/v1\nkind: Policy\ndefault: {default}\nrules:\n  - name: web-to-api\n    from:\n      - serviceAccount: shop/web\n"
    )
}

fn curl(args: &[&str]) -> (String, String) {
    let curl = require_tool("curl");
    let out = run(&curl, args).expect("curl runs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn counter(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.series(name)
        .filter(|s| s.has_labels(labels))
        .map(|s| s.value)
        .sum()
}

async fn tcp_roundtrip(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(msg).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    Ok(out)
}

struct Mesh {
    ca: CaFixture,
    api: ProxyFixture,
    web: ProxyFixture,
    http_route: SocketAddr,
    echo_route: SocketAddr,
    greeter_route: SocketAddr,
}

async fn mesh(ca_opts: CaOptions, api_policy_yaml: String) -> Mesh {
    let http = backend::http().await;
    let echo = backend::echo().await;
    let greeter = backend::greeter().await;
    let ca = CaFixture::start(ca_opts).expect("CA starts");
    let api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api")
            .expose(&[http.port(), echo.port(), greeter.port()])
            .policy(&api_policy_yaml),
    )
    .expect("api proxy starts");
    let (http_route, echo_route, greeter_route) = (free_addr(), free_addr(), free_addr());
    let web = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "web")
            .route(http_route, api.inbound(), http.port(), Some(&id("api")))
            .route(echo_route, api.inbound(), echo.port(), Some(&id("api")))
            .route(
                greeter_route,
                api.inbound(),
                greeter.port(),
                Some(&id("api")),
            ),
    )
    .expect("web proxy starts");
    Mesh {
        ca,
        api,
        web,
        http_route,
        echo_route,
        greeter_route,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_http2_and_tcp_pass_over_mtls_and_are_counted() {
    let m = mesh(CaOptions::default(), api_policy("deny")).await;

    // HTTP/1.1 through the pair, with curl as the app.
    let url = format!("http://{}/", m.http_route);
    let (body, err) = curl(&["-sS", "--max-time", "10", &url]);
    assert_eq!(body, backend::HELLO, "curl: {err}");
    // HTTP/2 with prior knowledge.
    let (body, err) = curl(&["-sS", "--max-time", "10", "--http2-prior-knowledge", &url]);
    assert_eq!(body, backend::HELLO, "curl h2: {err}");
    // Several requests on one keep-alive connection.
    let (body, err) = curl(&["-sS", "--max-time", "10", &url, &url, &url]);
    assert_eq!(body, backend::HELLO.repeat(3), "{err}");
    // Opaque TCP.
    let echoed = tcp_roundtrip(m.echo_route, b"opaque bytes \x00\x01\x02")
        .await
        .unwrap();
    assert_eq!(echoed, b"opaque bytes \x00\x01\x02");
    // Server speaks first: the greeting arrives at once, not after the detection timeout.
    let start = Instant::now();
    let mut s = TcpStream::connect(m.greeter_route).await.unwrap();
    let mut buf = vec![0u8; backend::GREETING.len()];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf))
        .await
        .expect("greeting before the 3 s detection timeout")
        .unwrap();
    assert_eq!(buf, backend::GREETING);
    assert!(start.elapsed() < Duration::from_secs(2));
    s.write_all(b"EHLO x\r\n").await.unwrap();
    let mut echo = vec![0u8; 8];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(echo, b"EHLO x\r\n");
    drop(s);

    // Both sides counted the HTTP requests with the right peer identities.
    let web_m = m.web.metrics().unwrap();
    let out_reqs = counter(
        &web_m,
        "moat_proxy_http_requests_total",
        &[
            ("direction", "outbound"),
            ("peer", &id("api")),
            ("local", &id("web")),
            ("status_class", "2xx"),
        ],
    );
    assert!(out_reqs >= 5.0, "outbound requests counted: {out_reqs}");
    let api_m = m
        .api
        .wait_metrics(Duration::from_secs(2), |mm| {
            counter(
                mm,
                "moat_proxy_http_requests_total",
                &[("direction", "inbound"), ("peer", &id("web"))],
            ) >= 5.0
        })
        .unwrap();
    let in_reqs = counter(
        &api_m,
        "moat_proxy_http_requests_total",
        &[
            ("direction", "inbound"),
            ("peer", &id("web")),
            ("local", &id("api")),
            ("status_class", "2xx"),
        ],
    );
    assert!(in_reqs >= 5.0, "inbound requests counted: {in_reqs}");
    let hist = api_m
        .histogram(
            "moat_proxy_http_request_duration_seconds",
            &[("direction", "inbound"), ("peer", &id("web"))],
        )
        .expect("latency histogram");
    assert!(hist.count >= 5.0);
    assert!(
        counter(
            &api_m,
            "moat_proxy_bytes_total",
            &[("direction", "inbound")]
        ) > 0.0
    );
    assert!(
        counter(
            &api_m,
            "moat_proxy_authz_decisions_total",
            &[("decision", "allow"), ("rule", "web-to-api")]
        ) >= 1.0
    );
    // Pooling: fewer handshakes than app connections.
    let handshakes = counter(
        &web_m,
        "moat_proxy_tls_handshakes_total",
        &[("direction", "outbound")],
    );
    let reuses = counter(&web_m, "moat_proxy_tunnel_reuses_total", &[]);
    assert!(
        reuses >= 1.0,
        "pooled connections were reused (handshakes {handshakes}, reuses {reuses})"
    );
    drop(m.ca);
}

/// Blocking HTTP/1.0 GET on a fresh connection (runs off the async workers).
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<moat_e2e::net::HttpReply> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || {
        moat_e2e::net::http_get(&addr.to_string(), &path, Duration::from_secs(10))
    })
    .await?
}

/// Signs a leaf with the fixture CA's root key, for peers that must look almost legitimate.
fn forge_leaf(ca: &CaFixture, uri: &str, expired: bool) -> (String, String) {
    let root = ca.root_dir();
    let ca_pem = std::fs::read_to_string(root.join("ca.crt")).unwrap();
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(root.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let now = std::time::SystemTime::now();
    if expired {
        p.not_before = (now - Duration::from_secs(7200)).into();
        p.not_after = (now - Duration::from_secs(3600)).into();
    } else {
        p.not_before = (now - Duration::from_secs(60)).into();
        p.not_after = (now + Duration::from_secs(3600)).into();
    }
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A TLS 1.3 server speaking ALPN moat/1 with the given certificate: `openssl s_server`.
fn openssl_peer(
    dir: &std::path::Path,
    name: &str,
    cert: &str,
    key: &str,
) -> (moat_e2e::Proc, SocketAddr) {
    let openssl = require_tool("openssl");
    let c = dir.join(format!("{name}.crt"));
    let k = dir.join(format!("{name}.key"));
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    let addr = free_addr();
    let mut cmd = std::process::Command::new(openssl);
    cmd.args([
        "s_server",
        "-accept",
        &addr.to_string(),
        "-tls1_3",
        "-alpn",
        "moat/1",
        "-quiet",
        "-naccept",
        "100",
    ])
    .arg("-cert")
    .arg(&c)
    .arg("-key")
    .arg(&k);
    let p = moat_e2e::Proc::spawn(name, cmd, dir).unwrap();
    // Wait until it listens.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    (p, addr)
}

async fn app_connection_is_refused(route: SocketAddr) {
    // The sidecar resets the app's connection: the app reads an error or EOF, never data.
    let r = tcp_roundtrip(route, b"secret request").await;
    match r {
        Ok(data) => assert!(
            data.is_empty(),
            "app got data from a refused peer: {data:?}"
        ),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "unexpected error {e}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_counted_by_reason() {
    let ca = CaFixture::start(CaOptions::default()).unwrap();
    let rogue_ca = CaFixture::start(CaOptions::default()).unwrap();
    let echo = backend::echo().await;
    let api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api")
            .expose(&[echo.port()])
            .policy(&api_policy("deny")),
    )
    .unwrap();
    let rogue_api = ProxyFixture::start(
        &rogue_ca,
        ProxyOptions::new("shop", "api").expose(&[echo.port()]),
    )
    .unwrap();
    let dir = moat_e2e::temp_dir("peers").unwrap();
    let (exp_cert, exp_key) = forge_leaf(&ca, &id("api"), true);
    let (_expired_peer, expired_addr) = openssl_peer(dir.path(), "expired", &exp_cert, &exp_key);
    let (td_cert, td_key) = forge_leaf(&ca, "spiffe://other.example/ns/shop/sa/api", false);
    let (_td_peer, td_addr) = openssl_peer(dir.path(), "other-td", &td_cert, &td_key);

    let routes = [
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
        free_addr(),
    ];
    let web = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "web")
            .route(
                routes[0],
                rogue_api.inbound(),
                echo.port(),
                Some(&id("api")),
            )
            .route(routes[1], expired_addr, echo.port(), Some(&id("api")))
            .route(routes[2], td_addr, echo.port(), None)
            .route(routes[3], api.inbound(), echo.port(), Some(&id("admin")))
            .route(routes[4], api.inbound(), echo.port(), Some(&id("api"))),
    )
    .unwrap();
    // The legitimate route works, so refusals below are about the peer, not the setup.
    assert_eq!(tcp_roundtrip(routes[4], b"ping").await.unwrap(), b"ping");
    for r in &routes[..4] {
        app_connection_is_refused(*r).await;
    }
    let m = web.metrics().unwrap();
    let failures = |reason| {
        counter(
            &m,
            "moat_proxy_tls_handshake_failures_total",
            &[("direction", "outbound"), ("reason", reason)],
        )
    };
    assert!(failures("untrusted_issuer") >= 1.0, "another CA");
    assert!(failures("expired") >= 1.0, "expired certificate");
    assert!(failures("wrong_trust_domain") >= 1.0, "wrong trust domain");
    assert!(failures("wrong_identity") >= 1.0, "wrong expected identity");
    let logs = web.json_logs();
    assert!(
        !moat_e2e::logs::matching(&logs, &[("reason", "wrong_identity")]).is_empty(),
        "refusal logged with its reason"
    );

    // Inbound: no client certificate, a client certificate from another CA, and plaintext.
    let openssl = require_tool("openssl");
    let connect = api.inbound().to_string();
    // openssl's own exit status says little here (TLS 1.3 client auth fails after its
    // handshake completes); the server's metrics below are the verdict.
    let _ = std::process::Command::new(&openssl)
        .args([
            "s_client", "-connect", &connect, "-tls1_3", "-alpn", "moat/1",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let (rc, rk) = forge_leaf(&rogue_ca, &id("web"), false);
    std::fs::write(dir.path().join("rogue.crt"), &rc).unwrap();
    std::fs::write(dir.path().join("rogue.key"), &rk).unwrap();
    let _ = std::process::Command::new(&openssl)
        .args([
            "s_client", "-connect", &connect, "-tls1_3", "-alpn", "moat/1",
        ])
        .arg("-cert")
        .arg(dir.path().join("rogue.crt"))
        .arg("-key")
        .arg(dir.path().join("rogue.key"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let (_, err) = curl(&["-sS", "--max-time", "5", &format!("http://{connect}/")]);
    assert!(!err.is_empty(), "plaintext to the inbound port must fail");
    let m = api
        .wait_metrics(Duration::from_secs(3), |mm| {
            counter(
                mm,
                "moat_proxy_tls_handshake_failures_total",
                &[("reason", "untrusted_issuer")],
            ) >= 1.0
        })
        .unwrap();
    let inbound = |reason| {
        counter(
            &m,
            "moat_proxy_tls_handshake_failures_total",
            &[("direction", "inbound"), ("reason", reason)],
        )
    };
    assert!(
        inbound("no_client_certificate") >= 1.0,
        "no client certificate"
    );
    assert!(
        inbound("untrusted_issuer") >= 1.0,
        "client certificate from another CA"
    );
    assert!(
        counter(
            &m,
            "moat_proxy_connections_refused_total",
            &[
                ("direction", "inbound"),
                ("reason", "no_original_destination")
            ]
        ) >= 1.0,
        "plaintext refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_allows_denies_and_audits() {
    let http = backend::http().await;
    let echo = backend::echo().await;
    let ca = CaFixture::start(CaOptions::default()).unwrap();
    let api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api")
            .expose(&[http.port(), echo.port()])
            .policy(&api_policy("deny")),
    )
    .unwrap();
    let (web_http, web_tcp, batch_http, batch_tcp) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let web = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "web")
            .route(web_http, api.inbound(), http.port(), Some(&id("api")))
            .route(web_tcp, api.inbound(), echo.port(), Some(&id("api"))),
    )
    .unwrap();
    let batch = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "batch")
            .route(batch_http, api.inbound(), http.port(), Some(&id("api")))
            .route(batch_tcp, api.inbound(), echo.port(), Some(&id("api"))),
    )
    .unwrap();

    // Allowed.
    assert_eq!(get(web_http, "/").await.unwrap().body, backend::HELLO);
    assert_eq!(tcp_roundtrip(web_tcp, b"hi").await.unwrap(), b"hi");
    // Denied: HTTP 403 naming the rule, and the connection ends (`Connection: close`): a
    // denied caller cannot hold it open for free. curl has to connect again for the second.
    let url = format!("http://{batch_http}/");
    let (out, err) = curl(&[
        "-sS",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-D",
        "-",
        "-w",
        "%{num_connects}\n",
        &url,
        &url,
    ]);
    assert!(out.contains(" 403"), "{out} {err}");
    assert!(
        out.to_ascii_lowercase()
            .contains("x-moat-denied-by: default"),
        "{out}"
    );
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{out}"
    );
    let connects: Vec<&str> = out
        .lines()
        .filter(|l| l.trim().chars().all(|c| c.is_ascii_digit()) && !l.trim().is_empty())
        .collect();
    assert_eq!(
        connects,
        vec!["1", "1"],
        "the denied connection was kept open: {out}"
    );
    // Denied: opaque TCP is reset.
    app_connection_is_refused(batch_tcp).await;
    let m = api.metrics().unwrap();
    assert!(
        counter(
            &m,
            "moat_proxy_authz_decisions_total",
            &[("decision", "deny"), ("rule", "default")]
        ) >= 2.0
    );
    assert!(
        counter(
            &m,
            "moat_proxy_authz_decisions_total",
            &[("decision", "allow"), ("rule", "web-to-api")]
        ) >= 2.0
    );
    assert!(
        !moat_e2e::logs::matching(&api.json_logs(), &[("caller", &id("batch"))]).is_empty(),
        "denial logged with the caller's identity"
    );

    // Audit: batch gets through, and the would-deny is counted.
    api.set_policy(&api_policy("audit")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(batch_http, "/").await.unwrap();
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "audit policy never took effect");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(tcp_roundtrip(batch_tcp, b"audit").await.unwrap(), b"audit");
    let m = api.metrics().unwrap();
    assert!(
        counter(
            &m,
            "moat_proxy_authz_decisions_total",
            &[("decision", "audit_deny"), ("rule", "default")]
        ) >= 2.0
    );
    drop(web);
    drop(batch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_policy_edit_closes_revoked_connections_and_keeps_allowed_ones() {
    let echo = backend::echo().await;
    let ca = CaFixture::start(CaOptions::default()).unwrap();
    let api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api")
            .expose(&[echo.port()])
            .policy(&api_policy("audit")),
    )
    .unwrap();
    let (web_tcp, batch_tcp) = (free_addr(), free_addr());
    let _web = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "web").route(
            web_tcp,
            api.inbound(),
            echo.port(),
            Some(&id("api")),
        ),
    )
    .unwrap();
    let _batch = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "batch").route(
            batch_tcp,
            api.inbound(),
            echo.port(),
            Some(&id("api")),
        ),
    )
    .unwrap();

    let mut w = TcpStream::connect(web_tcp).await.unwrap();
    let mut b = TcpStream::connect(batch_tcp).await.unwrap();
    for s in [&mut w, &mut b] {
        s.write_all(b"one").await.unwrap();
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"one");
    }
    // An invalid edit is rejected and changes nothing.
    api.set_policy("apiVersion: moat.dev/v1\nkind: Policy\ndefault: maybe\n")
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = api.metrics().unwrap();
    assert!(
        counter(
            &m,
            "moat_proxy_policy_reloads_total",
            &[("result", "error")]
        ) >= 1.0
    );
    assert_eq!(counter(&m, "moat_proxy_policy_valid", &[]), 0.0);
    b.write_all(b"two").await.unwrap();
    let mut buf = [0u8; 3];
    b.read_exact(&mut buf).await.unwrap();

    // Now deny batch: its open tunnel is closed; web's keeps working.
    api.set_policy(&api_policy("deny")).unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(10), b.read(&mut buf))
        .await
        .expect("revoked connection closed");
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "revoked connection must not deliver data: {closed:?}"
    );
    w.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    w.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    let m = api.metrics().unwrap();
    assert!(counter(&m, "moat_proxy_authz_revoked_connections_total", &[]) >= 1.0);
    assert_eq!(counter(&m, "moat_proxy_policy_valid", &[]), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_under_traffic_fails_no_request() {
    let http = backend::http().await;
    let ca = CaFixture::start(CaOptions::default().short_ttl("6s")).unwrap();
    let api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api")
            .expose(&[http.port()])
            .policy(&api_policy("deny")),
    )
    .unwrap();
    let route = free_addr();
    let web = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "web").route(route, api.inbound(), http.port(), Some(&id("api"))),
    )
    .unwrap();
    let first_api = api.identity().unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    let first_web = web.identity().unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    let start = Instant::now();
    let mut ok = 0;
    while start.elapsed() < Duration::from_secs(14) {
        let r = get(route, "/")
            .await
            .unwrap_or_else(|e| panic!("request {ok} failed during rotation: {e:#}"));
        assert_eq!(r.status, 200, "request {ok}: {}", r.body);
        ok += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let api_now = api.identity().unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    let web_now = web.identity().unwrap()["serial"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(api_now, first_api, "api rotated its certificate");
    assert_ne!(web_now, first_web, "web rotated its certificate");
    assert!(ok > 100, "{ok} requests");
}

/// A pooled tunnel carries two certificates: the client's may expire first (it was issued
/// earlier), and the server refuses new streams from then on. The client must stop reusing the
/// tunnel before either expires, or a request hits the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_tunnel_retires_before_the_client_certificate_expires() {
    let http = backend::http().await;
    let ca = CaFixture::start(CaOptions::default().short_ttl("10s")).unwrap();
    let api_inbound = free_addr();
    let route = free_addr();
    // The client's certificate is issued ~3 s before the server's and expires ~3 s earlier; it
    // renews only after 5-7 s, so the first tunnel is opened with the older certificate.
    let web = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "web").route(route, api_inbound, http.port(), Some(&id("api"))),
    )
    .unwrap();
    let web_serial = web.identity().unwrap()["serial"].clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api")
            .expose(&[http.port()])
            .policy(&api_policy("deny"))
            .inbound(api_inbound),
    )
    .unwrap();
    let start = Instant::now();
    let mut ok = 0;
    // Past the client's first certificate's expiry (~7 s from here) by a few seconds.
    while start.elapsed() < Duration::from_secs(10) {
        let r = get(route, "/")
            .await
            .unwrap_or_else(|e| panic!("request {ok} failed: {e:#}"));
        assert_eq!(r.status, 200, "request {ok}: {}", r.body);
        ok += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(
        web.identity().unwrap()["serial"],
        web_serial,
        "web rotated its certificate"
    );
    let m = web.metrics().unwrap();
    assert!(
        counter(&m, "moat_proxy_tunnel_reuses_total", &[]) > 50.0,
        "the tunnel was pooled, so the scenario exercised reuse"
    );
    let m = api.metrics().unwrap();
    assert!(ok > 100, "{ok} requests");
    assert_eq!(
        counter(
            &m,
            "moat_proxy_connections_refused_total",
            &[("reason", "peer_cert_expired")]
        ),
        0.0,
        "the server never had to refuse a stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let http = backend::http().await;
    let ca = CaFixture::start(CaOptions::default()).unwrap();
    let mut api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api")
            .expose(&[http.port()])
            .policy(&api_policy("deny"))
            .args(["--drain-delay", "500ms", "--shutdown-grace", "10s"]),
    )
    .unwrap();
    let route = free_addr();
    let mut web = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "web")
            .route(route, api.inbound(), http.port(), Some(&id("api")))
            .args(["--drain-delay", "500ms"]),
    )
    .unwrap();
    let slow: Vec<_> = (0..4)
        .map(|_| tokio::spawn(get(route, "/slow?ms=2000")))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.proc().signal(moat_e2e::proc::SIGTERM).unwrap();
    web.proc().signal(moat_e2e::proc::SIGTERM).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = moat_e2e::net::http_get(&api.admin(), "/ready", Duration::from_secs(1)).unwrap();
    assert_eq!(ready.status, 503, "not ready at once after SIGTERM");
    for s in slow {
        let r = s.await.unwrap().expect("in-flight request completed");
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let status = api
        .proc()
        .wait_timeout(Duration::from_secs(15))
        .unwrap()
        .expect("api exited");
    assert!(status.success(), "{status}");
    let status = web
        .proc()
        .wait_timeout(Duration::from_secs(15))
        .unwrap()
        .expect("web exited");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_stays_false_for_the_whole_drain_delay() {
    let ca = CaFixture::start(CaOptions::default()).unwrap();
    let mut api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api").args(["--drain-delay", "3s"]),
    )
    .unwrap();
    let admin = api.admin();
    api.proc().signal(moat_e2e::proc::SIGTERM).unwrap();
    let start = Instant::now();
    // Not ready once the signal is handled...
    while moat_e2e::net::http_get(&admin, "/ready", Duration::from_millis(500))
        .is_ok_and(|r| r.status == 200)
    {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "still ready after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...and for the rest of the delay: the readiness task ticks every second in between.
    let mut looks = 0;
    while start.elapsed() < Duration::from_millis(2700) {
        let r = moat_e2e::net::http_get(&admin, "/ready", Duration::from_millis(500))
            .expect("the admin port stays up while draining");
        assert_eq!(
            r.status,
            503,
            "/ready said {} {:.1} s into the drain",
            r.status,
            start.elapsed().as_secs_f64()
        );
        looks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(looks >= 20, "only {looks} looks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_keep_alive_connections_at_once() {
    let http = backend::http().await;
    let ca = CaFixture::start(CaOptions::default()).unwrap();
    let api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api")
            .expose(&[http.port()])
            .policy(&api_policy("deny")),
    )
    .unwrap();
    let route = free_addr();
    let mut web = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "web")
            .route(route, api.inbound(), http.port(), Some(&id("api")))
            .args(["--drain-delay", "0s", "--shutdown-grace", "15s"]),
    )
    .unwrap();
    // One keep-alive connection that has finished its request and sits idle...
    let mut idle = TcpStream::connect(route).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains(backend::HELLO) {
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
            .await
            .expect("response")
            .unwrap();
        assert!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    // ...and one request still in flight, which must finish.
    let slow = tokio::spawn(get(route, "/slow?ms=1500"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    web.proc().signal(moat_e2e::proc::SIGTERM).unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
        .await
        .expect("the idle connection was held past the drain")
        .unwrap_or(0);
    assert_eq!(n, 0, "unexpected bytes on the idle connection");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let r = slow.await.unwrap().expect("the in-flight request finished");
    assert_eq!(r.status, 200);
    // With nothing else in flight the proxy exits long before the 15 s grace period.
    let deadline = Instant::now() + Duration::from_secs(6);
    while web.proc().try_status().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the proxy waited for the grace period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
