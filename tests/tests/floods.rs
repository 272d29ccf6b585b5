//! Floods against the control plane, performed for real against the release `moat-ca` and
//! `moat-injector` on loopback: the whole connection budget held by idle TLS connections
//! from several source addresses (issuance and admission must still succeed within seconds),
//! connections that never send a request or stop sending (closed on the server's clock), and
//! bogus service-account tokens (the API server sees at most the configured TokenReview rate).
//!
//! The budgets are lowered (`--max-connections 256`) to keep the tests quick; the mechanism
//! is the one that protects the defaults.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use http_body_util::Full;
use moat_e2e::flood::{loopback_sources, raise_nofile, Held, HeldConn, Idle};
use moat_e2e::https::{self, Http1Client};
use moat_e2e::kube_api::FakeApiServer;
use moat_e2e::net::{self, Metrics};
use moat_e2e::token::{TokenIssuer, TokenSpec};
use moat_e2e::{logs, CaFixture, CaOptions, Proc};
use serde_json::{json, Value};

type TestResult = anyhow::Result<()>;

const BUDGET: usize = 256;
const PER_SOURCE: usize = 32;
/// Legitimate work must complete within this while the budget is held.
const PROMPT: Duration = Duration::from_secs(3);

/// The budget flags, with timeouts long enough that only making room can save the server.
fn budget_args() -> Vec<String> {
    [
        "--max-connections",
        &BUDGET.to_string(),
        "--max-connections-per-source",
        &PER_SOURCE.to_string(),
        "--handshake-timeout",
        "120s",
        "--first-byte-timeout",
        "120s",
        "--idle-timeout",
        "120s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn closed(m: &Metrics, prefix: &str, reason: &str) -> f64 {
    m.value(
        &format!("{prefix}_connections_closed_total"),
        &[("reason", reason)],
    )
}

/// Waits until the server reports `want` open connections.
fn wait_open(admin: &str, prefix: &str, want: usize) -> anyhow::Result<()> {
    let name = format!("{prefix}_connections_open");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open = net::scrape(admin)?.value(&name, &[]);
        if open == want as f64 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{name} is {open}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Holds the whole budget: `BUDGET / PER_SOURCE` source addresses, each at its per-source
/// limit, idling in every way (TCP only, silent TLS, unfinished request head, HTTP/2 preface).
async fn hold_budget(
    server: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    admin: &str,
    prefix: &str,
) -> anyhow::Result<Held> {
    raise_nofile(4 * BUDGET as u64 + 1024)?;
    let sources = loopback_sources(BUDGET / PER_SOURCE);
    let held = Held::open(server, tls, &sources, PER_SOURCE, &Idle::ALL).await?;
    ensure!(held.len() == BUDGET);
    wait_open(admin, prefix, BUDGET)?;
    Ok(held)
}

/// After the legitimate work: the room was made by closing the oldest idle connections (not
/// by any timeout), each logged with the closed client's address.
async fn check_made_room(
    held: &mut Held,
    before: &Metrics,
    m: &Metrics,
    prefix: &str,
    log_lines: &[Value],
) -> TestResult {
    // Sequential clients: the first needs room, then each one's slot is freed when it is done
    // and taken by the next, and so on.
    let evicted = closed(m, prefix, "evicted") - closed(before, prefix, "evicted");
    ensure!(
        evicted >= 1.0,
        "{evicted} connections closed to make room for the legitimate ones"
    );
    for reason in [
        "handshake_timeout",
        "first_byte_timeout",
        "request_timeout",
        "idle_timeout",
    ] {
        ensure!(
            closed(m, prefix, reason) == 0.0,
            "no connection was closed for {reason}: making room did it"
        );
    }
    ensure!(
        m.value(&format!("{prefix}_connections_refused_total"), &[]) == 0.0,
        "no connection was refused"
    );
    let lines = logs::matching(log_lines, &[("level", "WARN")])
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("closed the oldest idle connection"))
        })
        .collect::<Vec<_>>();
    ensure!(!lines.is_empty(), "an eviction log line");
    for l in &lines {
        let client = l["client"].as_str().unwrap_or("");
        ensure!(
            client.starts_with("127.0.0.") && !client.starts_with("127.0.0.1:"),
            "the closed connection was an attacker's, named by address: {l}"
        );
        ensure!(
            l["admitted"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "the line names who was admitted: {l}"
        );
    }
    // The oldest connections went first; the rest are still held.
    // A close that already happened is in the socket: a few milliseconds show it.
    let open = held.still_open(Duration::from_millis(5)).await;
    ensure!(
        open == BUDGET - evicted as usize,
        "{open} attacker connections still open after {evicted} evictions"
    );
    let mut first_closed = 0;
    for c in held.conns.iter_mut().take(64) {
        if !c.is_open(Duration::from_millis(5)).await {
            first_closed += 1;
        }
    }
    ensure!(
        first_closed == evicted as usize,
        "the closed connections are among the oldest ({first_closed} of the first 64)"
    );
    Ok(())
}

/// One address at its per-source limit: its own oldest idle connection is closed to admit its
/// next one, and nobody else's.
async fn check_per_source(
    server: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    logs_of: impl Fn() -> Vec<Value>,
) -> TestResult {
    let src = loopback_sources(200)[199];
    let other = loopback_sources(201)[200];
    let mut bystander = HeldConn::open(other, server, tls.clone(), Idle::Tls).await?;
    // One at a time (Held::open is concurrent): the server then accepts them in this order,
    // so the first is the source's oldest idle connection.
    let mut mine = Held::default();
    for _ in 0..PER_SOURCE {
        mine.conns
            .push(HeldConn::open(src, server, tls.clone(), Idle::Tls).await?);
    }
    let mut extra = HeldConn::open(src, server, tls, Idle::Tls).await?;
    ensure!(
        !mine.conns[0].is_open(Duration::from_secs(2)).await,
        "the source's oldest connection was closed to admit its {}th",
        PER_SOURCE + 1
    );
    ensure!(extra.is_open(Duration::from_millis(100)).await);
    ensure!(
        bystander.is_open(Duration::from_millis(100)).await,
        "another address's (older) connection was left alone"
    );
    ensure!(mine.still_open(Duration::from_millis(20)).await == PER_SOURCE - 1);
    let lines = logs_of();
    ensure!(
        lines.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("--max-connections-per-source"))
            && l["client"]
                .as_str()
                .is_some_and(|c| c.starts_with(&format!("{src}:")))),
        "a log line names the address at its limit"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_issues_while_its_whole_connection_budget_is_held_idle() -> TestResult {
    raise_nofile(4 * BUDGET as u64 + 1024)?;
    let ca = CaFixture::start(CaOptions::default().unlimited().args(budget_args()))?;
    let admin = ca.admin_addr().to_string();
    check_per_source(ca.addr(), ca.tls_config(), || ca.json_logs()).await?;
    wait_open(&admin, "moat_ca", 0)?;

    let mut held = hold_budget(ca.addr(), ca.tls_config(), &admin, "moat_ca").await?;
    let before = ca.metrics()?;
    // Real issuances (CSR -> SVID, verified by the client) for three workloads.
    let mut slowest = Duration::ZERO;
    for sa in ["web", "cart", "api"] {
        let client = ca.client(ca.client_config("shop", sa)?)?;
        let t = Instant::now();
        let svid = tokio::time::timeout(PROMPT, client.fetch())
            .await
            .with_context(|| format!("issuance for shop/{sa} took over {PROMPT:?}"))??;
        slowest = slowest.max(t.elapsed());
        ensure!(svid.id == ca.spiffe_id("shop", sa)?);
    }
    ensure!(slowest < PROMPT, "slowest issuance {slowest:?}");
    eprintln!("issuance with {BUDGET} idle connections held: slowest {slowest:?}");
    let m = ca.metrics()?;
    ensure!(m.value("moat_ca_certificates_issued_total", &[]) == 3.0);
    check_made_room(&mut held, &before, &m, "moat_ca", &ca.json_logs()).await?;
    Ok(())
}

/// A test PKI for the injector: a CA and a serving certificate for 127.0.0.1.
fn injector_pki(dir: &Path) -> anyhow::Result<String> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "webhook test CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("tls.crt"), cert.pem())?;
    std::fs::write(dir.join("tls.key"), key.serialize_pem())?;
    std::fs::write(dir.join("bundle.pem"), ca_cert.pem())?;
    Ok(ca_cert.pem())
}

fn admission_review(uid: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "web",
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"containers": [{"name": "app", "image": "nginx:1.27",
                                         "ports": [{"containerPort": 8080}]}]},
            },
            "oldObject": null,
            "dryRun": false,
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injector_admits_while_its_whole_connection_budget_is_held_idle() -> TestResult {
    raise_nofile(4 * BUDGET as u64 + 1024)?;
    let dir = moat_e2e::temp_dir("injector-flood")?;
    let ca_pem = injector_pki(dir.path())?;
    let (listen, admin) = (net::free_addr(), net::free_addr());
    let bin = moat_e2e::bin::try_binary("moat-injector")?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("serve")
        .args(["--listen", &listen.to_string()])
        .args(["--admin-listen", &admin.to_string()])
        .arg("--tls-cert")
        .arg(dir.path().join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("tls.key"))
        .arg("--trust-bundle")
        .arg(dir.path().join("bundle.pem"))
        .args(["--log-format", "json"])
        .args(budget_args());
    let mut injector = Proc::spawn("moat-injector", cmd, &dir.path().join("logs"))?;
    net::wait_for_http(&admin.to_string(), "/ready", Duration::from_secs(15))?;
    injector.ensure_running()?;
    let tls = https::client_config(ca_pem.as_bytes())?;
    let admin_s = admin.to_string();

    check_per_source(listen, tls.clone(), || injector.json_logs()).await?;
    wait_open(&admin_s, "moat_injector", 0)?;
    let mut held = hold_budget(listen, tls.clone(), &admin_s, "moat_injector").await?;
    let before = net::scrape(&admin_s)?;
    let mut slowest = Duration::ZERO;
    for i in 0..3 {
        let uid = format!("flood-{i}");
        let t = Instant::now();
        let reply = tokio::time::timeout(PROMPT, async {
            let mut c = Http1Client::connect(listen, tls.clone()).await?;
            let req = http::Request::post("/inject")
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(admission_review(&uid).to_string())))?;
            c.send(req).await
        })
        .await
        .with_context(|| format!("admission {i} took over {PROMPT:?}"))??;
        slowest = slowest.max(t.elapsed());
        ensure!(reply.status == 200, "{} {}", reply.status, reply.text());
        let review: Value = reply.json()?;
        ensure!(
            review["response"]["uid"] == uid.as_str()
                && review["response"]["allowed"] == true
                && review["response"]["patchType"] == "JSONPatch",
            "the pod was admitted and injected: {review}"
        );
    }
    ensure!(slowest < PROMPT, "slowest admission {slowest:?}");
    eprintln!("admission with {BUDGET} idle connections held: slowest {slowest:?}");
    let m = net::scrape(&admin_s)?;
    check_made_room(
        &mut held,
        &before,
        &m,
        "moat_injector",
        &injector.json_logs(),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_closed_on_the_servers_clock() -> TestResult {
    let ca = CaFixture::start(CaOptions::default().unlimited().args([
        "--handshake-timeout",
        "1s",
        "--first-byte-timeout",
        "1s",
        "--idle-timeout",
        "2s",
        "--max-connection-age",
        "12s",
    ]))?;
    let src = loopback_sources(1)[0];
    let tls = ca.tls_config();
    let m = || ca.metrics();

    // Never sends a ClientHello; completes TLS and says nothing; starts a request and stalls
    // (first byte sent, so only the request deadline (10s) applies to it).
    let t = Instant::now();
    let mut tcp = HeldConn::open(src, ca.addr(), tls.clone(), Idle::Tcp).await?;
    let mut silent = HeldConn::open(src, ca.addr(), tls.clone(), Idle::Tls).await?;
    let mut h2 = HeldConn::open(src, ca.addr(), tls.clone(), Idle::Http2Preface).await?;
    ensure!(!tcp.is_open(Duration::from_secs(4)).await, "TCP-only kept");
    ensure!(
        !silent.is_open(Duration::from_secs(2)).await,
        "silent TLS kept"
    );
    let first = t.elapsed();
    ensure!(
        first < Duration::from_millis(3500),
        "closed after {first:?}, want ~1s"
    );
    // The HTTP/2 preface counts as a first byte but opens no stream: closed at the request
    // deadline, not kept for as long as pings keep it alive.
    ensure!(
        !h2.is_open(Duration::from_secs(12)).await,
        "HTTP/2 connection without a stream kept"
    );
    let after = m()?;
    ensure!(closed(&after, "moat_ca", "handshake_timeout") == 1.0);
    ensure!(closed(&after, "moat_ca", "first_byte_timeout") == 1.0);
    ensure!(closed(&after, "moat_ca", "request_timeout") == 1.0);

    // Keep-alive HTTP/1.1 after a request: kept while used, closed 2s after the last one.
    let get = || {
        http::Request::get(moat_core::api::TRUST_BUNDLE_PATH)
            .body(Full::new(Bytes::new()))
            .context("request")
    };
    let mut c = Http1Client::connect(ca.addr(), tls.clone()).await?;
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        ensure!(c.send(get()?).await?.status == 200);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ensure!(c.is_open(), "a connection in use is not idle");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    ensure!(
        !c.is_open(),
        "idle keep-alive connection kept beyond --idle-timeout"
    );
    ensure!(closed(&m()?, "moat_ca", "idle_timeout") == 1.0);

    // Busy all the time: drained once it is 12 s old.
    let started = Instant::now();
    let mut c = Http1Client::connect(ca.addr(), tls).await?;
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(15) {
        match c.send(get()?).await {
            Ok(r) if r.status == 200 => served += 1,
            _ => break,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let age = started.elapsed();
    ensure!(
        !c.is_open() && age >= Duration::from_secs(12) && age < Duration::from_secs(14),
        "connection drained after {age:?} ({served} requests), want ~12s"
    );
    ensure!(closed(&m()?, "moat_ca", "max_age") == 1.0);
    Ok(())
}

/// The fake API server trusting its own issuer, and a CA using TokenReview against it.
fn token_review_ca(
    extra: &[&str],
) -> anyhow::Result<(tempfile::TempDir, TokenIssuer, FakeApiServer, CaFixture)> {
    let dir = moat_e2e::temp_dir("issuer")?;
    let issuer = TokenIssuer::es256(dir.path().join("jwks.json"))?;
    let api = FakeApiServer::start(&issuer)?;
    let ca = CaFixture::start(
        CaOptions::default()
            .unlimited()
            .token_review(&api)
            .args(extra.iter().copied()),
    )?;
    Ok((dir, issuer, api, ca))
}

fn csr_for(ca: &CaFixture, sa: &str) -> anyhow::Result<String> {
    let id = ca.spiffe_id("shop", sa)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.subject_alt_names = vec![rcgen::SanType::URI(id.as_str().try_into()?)];
    Ok(params.serialize_request(&key)?.pem()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_requires_a_bound_pod_and_caches_answers() -> TestResult {
    let (_dir, issuer, api, ca) = token_review_ca(&[])?;
    let csr = csr_for(&ca, "web")?;
    let bound = issuer.token("shop", "web")?;

    // A bound token: issued, with the pod from the TokenReview in the audit line.
    for _ in 0..3 {
        let r = ca.request_certificate(&bound, &csr).await?;
        ensure!(r.status == 200, "{} {}", r.status, r.text());
    }
    ensure!(
        api.reviews() == 1,
        "the same token was reviewed {} times",
        api.reviews()
    );
    let log_lines = ca.json_logs();
    let issued = logs::matching(&log_lines, &[("event", "issued")]);
    ensure!(
        issued.len() == 3 && issued[0]["pod"] == "web-0",
        "{issued:?}"
    );

    // Not bound to a pod: the API server authenticates it, the CA refuses it.
    let unbound = issuer.mint(&TokenSpec::new("shop", "web").unbound())?;
    let r = ca.request_certificate(&unbound, &csr).await?;
    ensure!(r.status == 401, "{} {}", r.status, r.text());
    let err = r.api_error()?;
    ensure!(err.error == "unbound_token", "{err:?}");
    ensure!(err.message.contains("not bound to a pod"), "{err:?}");
    let line = logs::matching(&ca.json_logs(), &[("reason", "unbound_token")])[0].clone();
    ensure!(
        line["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "the refusal's audit line names the client: {line}"
    );

    // A bogus token repeated: one review, then the cached refusal.
    let before = api.reviews();
    for _ in 0..10 {
        let r = ca.request_certificate("bogus.token.value", &csr).await?;
        ensure!(r.status == 401 && r.api_error()?.error == "rejected_token");
    }
    ensure!(
        api.reviews() == before + 1,
        "{} reviews",
        api.reviews() - before
    );
    let m = ca.metrics()?;
    ensure!(m.value("moat_ca_token_cache_lookups_total", &[("result", "hit")]) >= 11.0);
    ensure!(
        m.value(
            "moat_ca_certificate_refusals_total",
            &[("reason", "unbound_token")]
        ) == 1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_token_flood_reaches_the_api_server_at_most_at_the_configured_rate() -> TestResult {
    const RATE: f64 = 5.0;
    const BURST: f64 = 5.0;
    let (_dir, issuer, api, ca) = token_review_ca(&[
        "--token-review-rate",
        "5",
        "--token-review-burst",
        "5",
        // Every flood request comes from 127.0.0.1: the global limit is what is tested here.
        "--token-review-source-rate",
        "1e9",
        "--token-review-source-burst",
        "1e9",
    ])?;
    let csr = csr_for(&ca, "web")?;
    let body = https::csr_body(&csr);

    let started = Instant::now();
    let flood = Duration::from_secs(3);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let (addr, tls, body) = (ca.addr(), ca.tls_config(), body.clone());
        tasks.spawn(async move {
            let mut c = Http1Client::connect(addr, tls.clone()).await?;
            let (mut rejected, mut overloaded, mut other) = (0u32, 0u32, 0u32);
            let mut i = 0;
            while started.elapsed() < flood {
                i += 1;
                let token = format!("bogus-{worker}-{i}");
                let r = c
                    .send(https::certificate_request(Some(&token), body.clone())?)
                    .await?;
                match (
                    r.status,
                    r.api_error().map(|e| e.error).unwrap_or_default().as_str(),
                ) {
                    (401, "rejected_token") => rejected += 1,
                    (503, "auth_overloaded") => {
                        ensure!(r.header("retry-after").is_some(), "503 without Retry-After");
                        overloaded += 1;
                    }
                    _ => other += 1,
                }
            }
            anyhow::Ok((rejected, overloaded, other))
        });
    }
    let (mut rejected, mut overloaded, mut other) = (0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        let (a, b, c) = r??;
        rejected += a;
        overloaded += b;
        other += c;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let reviews = api.reviews();
    eprintln!(
        "{} bogus tokens in {elapsed:.1}s: {reviews} TokenReviews, {rejected} rejected, {overloaded} throttled",
        rejected + overloaded + other
    );
    ensure!(other == 0, "{other} unexpected answers");
    let allowed = BURST + RATE * elapsed + 1.0;
    ensure!(
        (reviews as f64) <= allowed,
        "{reviews} TokenReviews reached the API server in {elapsed:.1}s, at most {allowed:.0} allowed"
    );
    ensure!(
        rejected as usize == reviews,
        "every review was one rejected token"
    );
    ensure!(
        overloaded > 10 * rejected,
        "the flood was mostly throttled: {overloaded} vs {rejected}"
    );
    let m = ca.metrics()?;
    ensure!(
        m.value(
            "moat_ca_token_reviews_throttled_total",
            &[("scope", "global")]
        ) == f64::from(overloaded)
    );
    ensure!(
        m.value(
            "moat_ca_certificate_refusals_total",
            &[("reason", "auth_overloaded")]
        ) == f64::from(overloaded)
    );
    ensure!(m.value("moat_ca_token_reviews_total", &[("result", "refused")]) == reviews as f64);

    // The flood over, a legitimate workload is served again after Retry-After.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = ca
        .request_certificate(&issuer.token("shop", "web")?, &csr)
        .await?;
    ensure!(r.status == 200, "{} {}", r.status, r.text());
    Ok(())
}
