//! The README demo's story, with the real binaries on loopback: a CA, two sample apps behind a
//! sidecar (`api`), a caller the policy admits (`web`), one it does not (`batch`), and an
//! impostor with a certificate from a self-made CA. The `moat-demo` binary drives it; the
//! pieces are here so other suites can tell the same story: [`lab_setup`] and [`lab_drive`]
//! tell it in the mesh lab ([`crate::lab`], root), with pods made by the injector in network
//! namespaces.
//!
//! Nothing in the report is assumed: identities come from each sidecar's `/identity`, the
//! denying rule and the handshake-failure reason from their `/metrics`, latencies and outcomes
//! from the demo's own clients. [`evaluate`] turns those observations into report lines and a
//! list of failed expectations.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::TokioIo;
use moat_core::tls::{CurrentCert, SpiffeVerifier};
use moat_core::{SpiffeId, TrustBundle, TrustDomain};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::ca::{CaFixture, CaOptions};
use crate::lab::{LabOptions, MeshLab, PodHandle};
use crate::mesh::{ProxyFixture, ProxyOptions};
use crate::net::Metrics;
use crate::netns::Netns;

/// Namespace of every demo workload.
pub const NAMESPACE: &str = "shop";
/// Name of the rule in `api`'s policy that admits `web`.
pub const ALLOW_RULE: &str = "web-to-api";
/// The policy file of the `api` sidecar: only `shop/web` may call, everyone else is denied.
pub const API_POLICY: &str = "apiVersion: moat.dev/v1
kind: Policy
default: deny
rules:
  - name: web-to-api
    from:
      - serviceAccount: shop/web
";
/// The service account whose identity the forged certificate claims.
pub const FORGED_CLAIM: &str = "web";
/// HTTP requests per second each of the `web` client connections sends.
pub const WEB_RATE_PER_CONN: u32 = 50;
/// Concurrent keep-alive connections of the `web` HTTP client.
pub const WEB_CONNS: u32 = 2;
/// Deadline for any single request, echo or handshake of the demo's clients.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

const HEADER_DENIED_BY: &str = "x-moat-denied-by";
const M_AUTHZ: &str = "moat_proxy_authz_decisions_total";
const M_HS_FAIL: &str = "moat_proxy_tls_handshake_failures_total";
const M_HS: &str = "moat_proxy_tls_handshakes_total";
const M_HTTP: &str = "moat_proxy_http_requests_total";

/// A sample app serving on loopback; stopped when dropped.
#[derive(Debug)]
pub struct App {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl App {
    /// Where the app listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const ITEMS: &[&str] = &[
    "coffee beans",
    "teapot",
    "espresso cups",
    "milk frother",
    "grinder",
];

/// The "orders" HTTP API (HTTP/1.1 and h2c): `GET /orders/<id>` answers a small JSON order,
/// `GET /` says how to use it, anything else is 404.
pub async fn orders_app() -> anyhow::Result<App> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the orders app on 127.0.0.1")?;
    let addr = l.local_addr().context("orders app address")?;
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        Ok::<_, Infallible>(orders_answer(req.method(), req.uri().path()))
                    },
                );
                crate::mesh::backend::serve_app_connection(s, svc).await;
            });
        }
    });
    Ok(App { addr, task })
}

/// The orders API's answer to `method path` (also served by the mesh lab's app server).
pub fn orders_answer(method: &http::Method, path: &str) -> http::Response<Full<Bytes>> {
    let (status, ctype, body) = match (method, path.strip_prefix("/orders/")) {
        (&http::Method::GET, Some(id)) => match id.parse::<u64>() {
            Ok(id) => {
                let item = ITEMS[usize::try_from(id % ITEMS.len() as u64).unwrap_or(0)];
                (
                    http::StatusCode::OK,
                    "application/json",
                    format!("{{\"id\":{id},\"item\":\"{item}\",\"status\":\"shipped\"}}\n"),
                )
            }
            Err(_) => (
                http::StatusCode::NOT_FOUND,
                "text/plain",
                "no such order\n".into(),
            ),
        },
        (&http::Method::GET, None) if path == "/" => (
            http::StatusCode::OK,
            "text/plain",
            "orders API: GET /orders/<id>\n".into(),
        ),
        _ => (
            http::StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".into(),
        ),
    };
    let mut r = http::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(ctype),
    );
    r
}

/// A TCP echo service: sends back every byte it receives.
pub async fn echo_app() -> anyhow::Result<App> {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the echo app on 127.0.0.1")?;
    let addr = l.local_addr().context("echo app address")?;
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(App { addr, task })
}

/// `spiffe://<td>/ns/shop/sa/<sa>` as text.
pub fn spiffe_id(ca: &CaFixture, sa: &str) -> anyhow::Result<String> {
    Ok(ca.spiffe_id(NAMESPACE, sa)?.to_string())
}

/// Options of the demo's CA: the binary's defaults, with a short shutdown grace so Ctrl-C is
/// quick.
pub fn ca_options() -> CaOptions {
    CaOptions::default().args(["--shutdown-grace", "1s"])
}

/// Sidecar flags that make stopping quick: no drain delay, a short grace.
const QUICK_STOP: [&str; 4] = ["--drain-delay", "0s", "--shutdown-grace", "2s"];

/// The two app-facing listeners a caller's sidecar opens towards `api`.
#[derive(Debug, Clone, Copy)]
pub struct Routes {
    /// Plain HTTP listener routed to the orders app behind `api`.
    pub http: SocketAddr,
    /// Plain TCP listener routed to the echo app behind `api`.
    pub tcp: SocketAddr,
}

/// Starts the `api` sidecar in front of the apps (exposing exactly their ports), with
/// [`API_POLICY`].
pub fn start_api(ca: &CaFixture, apps: &[SocketAddr]) -> anyhow::Result<ProxyFixture> {
    let ports: Vec<u16> = apps.iter().map(SocketAddr::port).collect();
    ProxyFixture::start(
        ca,
        ProxyOptions::new(NAMESPACE, "api")
            .expose(&ports)
            .policy(API_POLICY)
            .args(QUICK_STOP),
    )
    .context("starting the api sidecar")
}

/// Starts a caller sidecar `<sa>` whose routes lead to `api`'s apps, requiring `api`'s identity.
pub fn start_caller(
    ca: &CaFixture,
    sa: &str,
    api: &ProxyFixture,
    orders: SocketAddr,
    echo: SocketAddr,
) -> anyhow::Result<(ProxyFixture, Routes)> {
    let api_id = spiffe_id(ca, "api")?;
    let routes = Routes {
        http: crate::net::free_addr(),
        tcp: crate::net::free_addr(),
    };
    let p = ProxyFixture::start(
        ca,
        ProxyOptions::new(NAMESPACE, sa)
            .route(routes.http, api.inbound(), orders.port(), Some(&api_id))
            .route(routes.tcp, api.inbound(), echo.port(), Some(&api_id))
            .args(QUICK_STOP),
    )
    .with_context(|| format!("starting the {sa} sidecar"))?;
    Ok((p, routes))
}

/// What a sidecar's `/identity` says.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// SPIFFE ID of its current certificate.
    pub spiffe_id: String,
    /// Serial number, hex.
    pub serial: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
}

/// Reads a sidecar's `/identity`.
pub fn identity(p: &ProxyFixture) -> anyhow::Result<Identity> {
    identity_from(&p.identity()?, &p.admin())
}

/// Reads an `/identity` answer (`who` names the sidecar in errors).
pub fn identity_from(v: &serde_json::Value, who: &str) -> anyhow::Result<Identity> {
    let field = |k: &str| -> anyhow::Result<String> {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .with_context(|| format!("/identity of {who} has no {k:?}: {v}"))
    };
    Ok(Identity {
        spiffe_id: field("spiffe_id")?,
        serial: field("serial")?,
        not_after: field("not_after")?,
    })
}

/// Scrapes `/metrics` without blocking the async runtime.
pub async fn scrape(admin: String) -> anyhow::Result<Metrics> {
    tokio::task::spawn_blocking(move || crate::net::scrape(&admin))
        .await
        .context("metrics scrape task failed")?
}

/// Client-side results of the `web` HTTP load.
#[derive(Debug, Clone, Default)]
pub struct HttpLoad {
    /// Requests sent.
    pub sent: usize,
    /// Answered 200 with the expected order.
    pub ok: usize,
    /// Time from sending each request to having its whole answer (answered requests only).
    pub latencies: Vec<Duration>,
    /// Status codes of the answers.
    pub statuses: BTreeMap<u16, usize>,
    /// Values of `x-moat-denied-by` seen on answers.
    pub denied_by: BTreeSet<String>,
    /// The first few errors (connection failures, timeouts, unexpected bodies).
    pub errors: Vec<String>,
    /// Number of errors.
    pub error_count: usize,
}

impl HttpLoad {
    fn error(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < 3 {
            self.errors.push(e);
        }
    }

    fn merge(&mut self, o: HttpLoad) {
        self.sent += o.sent;
        self.ok += o.ok;
        self.latencies.extend(o.latencies);
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.denied_by.extend(o.denied_by);
        self.error_count += o.error_count;
        for e in o.errors {
            if self.errors.len() < 3 {
                self.errors.push(e);
            }
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn http_connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .with_context(|| format!("HTTP handshake with {addr}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn get(
    send: &mut Sender,
    path: &str,
) -> anyhow::Result<(http::StatusCode, http::HeaderMap, Bytes)> {
    send.ready().await.context("connection closed")?;
    let req = http::Request::get(path)
        .header(http::header::HOST, "orders.shop")
        .body(Empty::new())
        .context("building the request")?;
    let resp = send.send_request(req).await.context("request failed")?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.context("reading the body")?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// Requests that `rate` per second for `duration` make.
pub fn request_count(rate: u32, duration: Duration) -> usize {
    (f64::from(rate) * duration.as_secs_f64()).round().max(1.0) as usize
}

/// Sends `count` requests `GET /orders/<n>` (n counting up from `first_id + 1`) on one
/// keep-alive connection to `addr`, `rate` per second; reconnects after an error or a
/// `Connection: close` (the sidecar closes a denied caller's connection). An answer
/// counts as ok when it is 200 with order `n`.
pub async fn http_load(addr: SocketAddr, rate: u32, count: usize, first_id: u64) -> HttpLoad {
    let mut out = HttpLoad::default();
    let period = Duration::from_secs(1) / rate.max(1);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<Sender> = None;
    let mut id = first_id;
    while out.sent < count {
        tick.tick().await;
        let send = match conn.as_mut() {
            Some(s) => s,
            None => match tokio::time::timeout(IO_TIMEOUT, http_connect(addr)).await {
                Ok(Ok(s)) => conn.insert(s),
                Ok(Err(e)) => {
                    out.sent += 1;
                    out.error(format!("{e:#}"));
                    continue;
                }
                Err(_) => {
                    out.sent += 1;
                    out.error(format!("connecting to {addr} timed out"));
                    continue;
                }
            },
        };
        id += 1;
        out.sent += 1;
        let started = Instant::now();
        match tokio::time::timeout(IO_TIMEOUT, get(send, &format!("/orders/{id}"))).await {
            Ok(Ok((status, headers, body))) => {
                out.latencies.push(started.elapsed());
                // As any HTTP/1.1 client: the server said this connection ends (a denial does).
                let closing = headers
                    .get(http::header::CONNECTION)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                if closing {
                    conn = None;
                }
                *out.statuses.entry(status.as_u16()).or_default() += 1;
                if let Some(v) = headers.get(HEADER_DENIED_BY) {
                    out.denied_by
                        .insert(String::from_utf8_lossy(v.as_bytes()).into_owned());
                }
                let expected = format!("\"id\":{id},");
                if status == http::StatusCode::OK && contains(&body, expected.as_bytes()) {
                    out.ok += 1;
                } else if status == http::StatusCode::OK {
                    out.error(format!(
                        "GET /orders/{id}: unexpected body {:?}",
                        String::from_utf8_lossy(&body)
                    ));
                }
            }
            Ok(Err(e)) => {
                out.error(format!("GET /orders/{id}: {e:#}"));
                conn = None;
            }
            Err(_) => {
                out.error(format!("GET /orders/{id}: no answer within {IO_TIMEOUT:?}"));
                conn = None;
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// How one TCP exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpOutcome {
    /// The bytes came back unchanged.
    Echoed,
    /// The connection was reset (what a refusing sidecar does).
    Reset,
    /// Closed without data and without a reset.
    Closed,
    /// Data came back, but not the bytes sent.
    Garbled(usize),
    /// Nothing happened within [`IO_TIMEOUT`].
    Timeout,
    /// Any other error.
    Error(String),
}

impl TcpOutcome {
    /// Short description.
    pub fn describe(&self) -> String {
        match self {
            Self::Echoed => "echoed".into(),
            Self::Reset => "reset".into(),
            Self::Closed => "closed without a reset".into(),
            Self::Garbled(n) => format!("{n} unexpected bytes came back"),
            Self::Timeout => format!("no answer within {IO_TIMEOUT:?}"),
            Self::Error(e) => e.clone(),
        }
    }
}

fn io_outcome(e: &std::io::Error) -> TcpOutcome {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => TcpOutcome::Reset,
        _ => TcpOutcome::Error(e.to_string()),
    }
}

/// Connects to `addr`, sends `msg`, half-closes, and reads until the other side closes.
pub async fn tcp_exchange(addr: SocketAddr, msg: &[u8]) -> TcpOutcome {
    let fut = async {
        let mut s = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => return TcpOutcome::Error(format!("cannot connect to {addr}: {e}")),
        };
        if let Err(e) = s.write_all(msg).await {
            return io_outcome(&e);
        }
        if let Err(e) = s.shutdown().await {
            return io_outcome(&e);
        }
        let mut back = Vec::new();
        match s.read_to_end(&mut back).await {
            Ok(_) if back == msg => TcpOutcome::Echoed,
            Ok(0) => TcpOutcome::Closed,
            Ok(n) => TcpOutcome::Garbled(n),
            Err(e) => io_outcome(&e),
        }
    };
    tokio::time::timeout(IO_TIMEOUT, fut)
        .await
        .unwrap_or(TcpOutcome::Timeout)
}

/// `count` TCP exchanges with `addr`, one every `every`.
pub async fn tcp_series(addr: SocketAddr, count: usize, every: Duration) -> Vec<TcpOutcome> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        if i > 0 {
            tokio::time::sleep(every).await;
        }
        let msg = format!("hello over plain TCP #{i}, sealed in mTLS by the sidecars\n");
        out.push(tcp_exchange(addr, msg.as_bytes()).await);
    }
    out
}

/// What happened to the impostor.
#[derive(Debug, Clone, Default)]
pub struct Forged {
    /// The identity the certificate claimed.
    pub claimed: String,
    /// `None` when the impostor got a working connection (a failure of the mesh); otherwise
    /// what the impostor's TLS client saw.
    pub refused: Option<String>,
    /// Increase of `api`'s inbound handshake failures during the attempt, by reason.
    pub reasons: BTreeMap<String, f64>,
}

/// A certificate chain `[leaf, self-made CA]` claiming `claimed`, with the leaf's key.
pub fn forge(
    claimed: &str,
) -> anyhow::Result<(
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rcgen::KeyPair,
)> {
    let now = std::time::SystemTime::now();
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate the forged CA key")?;
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "cluster.local root CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    ca.not_before = (now - Duration::from_secs(60)).into();
    ca.not_after = (now + Duration::from_secs(3600)).into();
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key)
        .context("cannot self-sign the forged CA")?;

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("cannot generate the forged leaf key")?;
    let mut leaf = rcgen::CertificateParams::default();
    leaf.distinguished_name = rcgen::DistinguishedName::new();
    let uri = rcgen::string::Ia5String::try_from(claimed.to_string())
        .map_err(|e| anyhow::anyhow!("{claimed:?} is not a valid URI SAN: {e}"))?;
    leaf.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    leaf.is_ca = rcgen::IsCa::ExplicitNoCa;
    leaf.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.not_before = (now - Duration::from_secs(60)).into();
    leaf.not_after = (now + Duration::from_secs(3600)).into();
    let leaf = leaf
        .signed_by(&key, &ca)
        .context("cannot sign the forged leaf")?;
    Ok((vec![leaf.der().clone(), ca.der().clone()], key))
}

fn inbound_failures(m: &Metrics) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in m
        .series(M_HS_FAIL)
        .filter(|s| s.has_labels(&[("direction", "inbound")]))
    {
        *out.entry(s.label("reason").unwrap_or("?").to_string())
            .or_default() += s.value;
    }
    out
}

/// Connects to `api`'s inbound port like a sidecar would (TLS 1.3, ALPN `moat/1`, verifying
/// `api`'s real certificate) but presents a certificate claiming `claimed` from a self-made CA.
/// Records what the impostor saw and which handshake failures `api` counted meanwhile.
pub async fn forged_attempt(
    api_inbound: SocketAddr,
    api_admin: String,
    bundle: Arc<ArcSwap<TrustBundle>>,
    trust_domain: TrustDomain,
    api_id: SpiffeId,
    claimed: String,
) -> anyhow::Result<Forged> {
    let before = inbound_failures(&scrape(api_admin.clone()).await?);
    let provider = moat_core::tls::provider();
    let (chain, key) = forge(&claimed)?;
    let signing = provider
        .key_provider
        .load_private_key(rustls_pki_types::PrivateKeyDer::Pkcs8(
            key.serialize_der().into(),
        ))
        .context("cannot load the forged key")?;
    let cert = Arc::new(CurrentCert::default());
    cert.set(Arc::new(rustls::sign::CertifiedKey::new(chain, signing)));
    let verifier =
        SpiffeVerifier::new(bundle, trust_domain, provider.clone()).expecting(Some(api_id));
    let cfg = moat_core::tls::mesh_client_config(cert, verifier, provider)
        .context("impostor TLS configuration")?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = rustls_pki_types::ServerName::try_from("api.shop")
        .context("server name")?
        .to_owned();

    let attempt = async {
        let tcp = TcpStream::connect(api_inbound)
            .await
            .with_context(|| format!("cannot connect to {api_inbound}"))?;
        // In TLS 1.3 the client finishes its side of the handshake before the server has
        // judged the client certificate; the verdict arrives as an alert on the first read.
        let mut tls = match connector.connect(name, tcp).await {
            Ok(t) => t,
            Err(e) => return Ok::<_, anyhow::Error>(Some(e.to_string())),
        };
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buf)).await {
            Ok(Err(e)) => Ok(Some(e.to_string())),
            Ok(Ok(0)) => Ok(Some("connection closed by api".into())),
            // Data, or a server patiently waiting for our first stream: accepted.
            Ok(Ok(_)) | Err(_) => Ok(None),
        }
    };
    let refused = tokio::time::timeout(IO_TIMEOUT * 2, attempt)
        .await
        .context("the forged-certificate attempt did not finish")??;

    // The failure is counted as the handshake fails; give the scrape a moment to see it.
    let deadline = Instant::now() + Duration::from_secs(2);
    let reasons = loop {
        let after = inbound_failures(&scrape(api_admin.clone()).await?);
        let delta: BTreeMap<String, f64> = after
            .iter()
            .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, d)| *d > 0.0)
            .collect();
        if !delta.is_empty() || refused.is_none() || Instant::now() >= deadline {
            break delta;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok(Forged {
        claimed,
        refused,
        reasons,
    })
}

/// How long and how hard to drive traffic.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Length of the traffic phase.
    pub duration: Duration,
}

impl Plan {
    /// TCP exchanges per caller: two per second.
    pub fn tcp_count(&self) -> usize {
        usize::try_from((self.duration.as_millis() / 500).max(1)).unwrap_or(1)
    }
}

/// Everything the demo's own clients observed.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    /// `web` → `api` HTTP.
    pub web_http: HttpLoad,
    /// `web` → `api` TCP echo.
    pub web_tcp: Vec<TcpOutcome>,
    /// `batch` → `api` HTTP.
    pub batch_http: HttpLoad,
    /// `batch` → `api` TCP.
    pub batch_tcp: Vec<TcpOutcome>,
    /// The impostor.
    pub forged: Forged,
}

/// Where the traffic goes.
#[derive(Debug, Clone)]
pub struct Targets {
    /// `web`'s routes.
    pub web: Routes,
    /// `batch`'s routes.
    pub batch: Routes,
    /// `api`'s inbound (mTLS) listener.
    pub api_inbound: SocketAddr,
    /// `api`'s admin listener.
    pub api_admin: String,
    /// `api`'s identity.
    pub api_id: SpiffeId,
    /// The identity the impostor claims.
    pub forged_claim: String,
    /// The mesh's trust bundle (the impostor checks it is talking to the real `api`).
    pub bundle: Arc<ArcSwap<TrustBundle>>,
    /// Trust domain.
    pub trust_domain: TrustDomain,
}

/// Runs every client at once for `plan.duration`.
pub async fn drive(plan: Plan, t: Targets) -> anyhow::Result<Traffic> {
    let d = plan.duration;
    let web_http = async {
        let mut all = HttpLoad::default();
        let n = request_count(WEB_RATE_PER_CONN, d);
        // Each connection on its own task, so the two share the runtime's workers.
        let runs: Vec<_> = (0..WEB_CONNS)
            .map(|i| {
                tokio::spawn(http_load(
                    t.web.http,
                    WEB_RATE_PER_CONN,
                    n,
                    u64::from(i) * 1_000_000,
                ))
            })
            .collect();
        for r in runs {
            match r.await {
                Ok(load) => all.merge(load),
                Err(e) => {
                    all.sent += n;
                    all.error(format!("an HTTP client task failed: {e}"));
                }
            }
        }
        all
    };
    let batch_http = http_load(t.batch.http, 4, request_count(4, d), 9_000_000);
    let web_tcp = tcp_series(t.web.tcp, plan.tcp_count(), Duration::from_millis(500));
    let batch_tcp = tcp_series(
        t.batch.tcp,
        plan.tcp_count().div_ceil(2),
        Duration::from_secs(1),
    );
    let forged = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        forged_attempt(
            t.api_inbound,
            t.api_admin.clone(),
            t.bundle.clone(),
            t.trust_domain.clone(),
            t.api_id.clone(),
            t.forged_claim.clone(),
        )
        .await
    };
    let (web_http, batch_http, web_tcp, batch_tcp, forged) =
        tokio::join!(web_http, batch_http, web_tcp, batch_tcp, forged);
    Ok(Traffic {
        web_http,
        web_tcp,
        batch_http,
        batch_tcp,
        forged: forged?,
    })
}

/// Nearest-rank quantile `q` (0..=1) of `sorted`.
pub fn percentile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len() as f64;
    let rank = (q.clamp(0.0, 1.0) * n).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

/// Milliseconds with a precision that suits the value.
pub fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// Everything read from the sidecars after the traffic.
#[derive(Debug, Clone)]
pub struct SidecarView {
    /// `/identity`.
    pub identity: Identity,
    /// `/metrics`.
    pub metrics: Metrics,
    /// Admin address, `host:port`.
    pub admin: String,
}

/// What the sidecars and the clients reported, together.
#[derive(Debug, Clone)]
pub struct Observed {
    /// Client-side observations.
    pub traffic: Traffic,
    /// The `api` sidecar.
    pub api: SidecarView,
    /// The `web` sidecar.
    pub web: SidecarView,
    /// The `batch` sidecar.
    pub batch: SidecarView,
    /// The identities each sidecar should have (`api`, `web`, `batch`).
    pub expected_ids: [String; 3],
}

/// Colours for the report (none when not on a terminal).
#[derive(Debug, Clone, Copy, Default)]
pub struct Style {
    /// Use ANSI colours.
    pub color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    /// Green (an expected outcome).
    pub fn good(&self, s: &str) -> String {
        self.paint("1;32", s)
    }
    /// Red (a failed expectation).
    pub fn bad(&self, s: &str) -> String {
        self.paint("1;31", s)
    }
    /// Bold.
    pub fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
    /// Dim.
    pub fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
}

/// The report's lines and every expectation that did not hold.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    /// Report lines, ready to print.
    pub lines: Vec<String>,
    /// Failed expectations, each a sentence (empty: the demo passed).
    pub failures: Vec<String>,
}

fn rules_with(m: &Metrics, decision: &str) -> BTreeSet<String> {
    m.series(M_AUTHZ)
        .filter(|s| s.has_labels(&[("decision", decision)]) && s.value > 0.0)
        .filter_map(|s| s.label("rule").map(str::to_string))
        .collect()
}

/// `spiffe://td/ns/x/sa/name` shortened to `.../sa/name`.
pub fn short_id(id: &str) -> String {
    match id.rfind("/sa/") {
        Some(i) => format!("...{}", &id[i..]),
        None => id.to_string(),
    }
}

/// Time left until an RFC 3339 instant, when it parses.
fn until(rfc3339: &str) -> Option<Duration> {
    let t = time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .ok()?;
    let left = t - time::OffsetDateTime::now_utc();
    left.try_into().ok()
}

/// One report line and the expectations behind it that did not hold.
struct Part {
    line: String,
    problems: Vec<String>,
}

impl Part {
    /// `ok` as the outcome when every expectation held, a loud FAILED otherwise.
    fn new(who: String, ok: String, problems: Vec<String>, s: Style) -> Self {
        let outcome = if problems.is_empty() {
            s.good(&ok)
        } else {
            s.bad("FAILED (see below)")
        };
        Self {
            line: format!("{who}   {outcome}"),
            problems,
        }
    }
}

fn inbound_http(o: &Observed, peer: &str, class: &str) -> f64 {
    o.api.metrics.value(
        M_HTTP,
        &[
            ("direction", "inbound"),
            ("peer", peer),
            ("status_class", class),
        ],
    )
}

fn first_error(h: &HttpLoad) -> String {
    h.errors
        .first()
        .map(|e| format!(", first error: {e}"))
        .unwrap_or_default()
}

fn others(outcomes: &[TcpOutcome], want: &TcpOutcome) -> String {
    outcomes
        .iter()
        .filter(|x| *x != want)
        .map(TcpOutcome::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Identities and proof that mutual TLS happened at all.
fn check_mesh(o: &Observed) -> Vec<String> {
    let mut problems = Vec::new();
    let [api_id, web_id, batch_id] = &o.expected_ids;
    for (name, view, want) in [
        ("api", &o.api, api_id),
        ("web", &o.web, web_id),
        ("batch", &o.batch, batch_id),
    ] {
        if view.identity.spiffe_id != *want {
            problems.push(format!(
                "the {name} sidecar holds identity {:?}, expected {want:?}",
                view.identity.spiffe_id
            ));
        }
    }
    let web_hs = o.web.metrics.value(M_HS, &[("direction", "outbound")]);
    let batch_hs = o.batch.metrics.value(M_HS, &[("direction", "outbound")]);
    let api_hs = o.api.metrics.value(M_HS, &[("direction", "inbound")]);
    if web_hs < 1.0 || batch_hs < 1.0 || api_hs < 2.0 {
        problems.push(format!(
            "mutual TLS handshakes missing: web made {web_hs}, batch made {batch_hs}, api accepted {api_hs}"
        ));
    }
    problems
}

/// `web` → `api`: every request and echo went through, and `api` saw them come from `web`.
fn check_web(o: &Observed, s: Style) -> Part {
    let web_id = &o.expected_ids[1];
    let wh = &o.traffic.web_http;
    let tcp = &o.traffic.web_tcp;
    let api_2xx = inbound_http(o, web_id, "2xx");
    let api_4xx = inbound_http(o, web_id, "4xx");
    let tcp_ok = tcp.iter().filter(|x| **x == TcpOutcome::Echoed).count();
    let mut problems = Vec::new();
    if wh.sent == 0 || wh.ok != wh.sent {
        problems.push(format!(
            "web -> api HTTP: {} of {} requests succeeded (statuses {:?}{})",
            wh.ok,
            wh.sent,
            wh.statuses,
            first_error(wh)
        ));
    }
    if !wh.denied_by.is_empty() || api_4xx > 0.0 {
        problems.push(format!(
            "web was DENIED by api (rules {:?}, {api_4xx} requests answered 4xx) although the policy admits shop/web",
            wh.denied_by
        ));
    }
    if (api_2xx as usize) < wh.ok {
        problems.push(format!(
            "api's sidecar counted only {api_2xx} successful requests from {web_id}, the client got {}",
            wh.ok
        ));
    }
    if tcp.is_empty() || tcp_ok != tcp.len() {
        problems.push(format!(
            "web -> api TCP echo: {tcp_ok} of {} came back ({})",
            tcp.len(),
            others(tcp, &TcpOutcome::Echoed)
        ));
    }
    Part::new(
        format!(
            "  {:<5} ({})   ->  api ({})",
            "web", o.web.identity.spiffe_id, o.api.identity.spiffe_id
        ),
        format!("{} HTTP requests ok, {tcp_ok} TCP echoes ok", wh.ok),
        problems,
        s,
    )
}

/// `batch` → `api`: 403 naming the rule that `api`'s metrics count, resets on TCP.
fn check_batch(o: &Observed, s: Style) -> Part {
    let batch_id = &o.expected_ids[2];
    let bh = &o.traffic.batch_http;
    let tcp = &o.traffic.batch_tcp;
    let deny_rules = rules_with(&o.api.metrics, "deny");
    let api_4xx = inbound_http(o, batch_id, "4xx");
    let api_2xx = inbound_http(o, batch_id, "2xx");
    let got_403 = bh.statuses.get(&403).copied().unwrap_or(0);
    let resets = tcp.iter().filter(|x| **x == TcpOutcome::Reset).count();
    let mut problems = Vec::new();
    if bh.sent == 0 || got_403 != bh.sent {
        problems.push(format!(
            "batch -> api HTTP: expected every request to be answered 403, got {:?} of {} sent{}",
            bh.statuses,
            bh.sent,
            first_error(bh)
        ));
    }
    if bh.ok > 0 || api_2xx > 0.0 {
        problems.push(format!(
            "batch REACHED the orders app ({} answers with an order) although api's policy does not admit it",
            bh.ok.max(api_2xx as usize)
        ));
    }
    if bh.denied_by.is_empty() {
        problems.push(format!(
            "batch's answers carry no {HEADER_DENIED_BY} header"
        ));
    }
    if deny_rules.is_empty() {
        problems.push("api's /metrics count no deny decision".into());
    } else if !bh.denied_by.is_empty() && bh.denied_by != deny_rules {
        problems.push(format!(
            "{HEADER_DENIED_BY} says {:?} but api's metrics count denials by {deny_rules:?}",
            bh.denied_by
        ));
    }
    if (api_4xx as usize) < got_403 {
        problems.push(format!(
            "api's sidecar counted {api_4xx} refused requests from {batch_id}, the client got {got_403}"
        ));
    }
    if tcp.is_empty() || resets != tcp.len() {
        problems.push(format!(
            "batch -> api TCP: expected a reset every time, got {resets} of {} ({})",
            tcp.len(),
            others(tcp, &TcpOutcome::Reset)
        ));
    }
    let rules: Vec<String> = deny_rules.iter().map(|r| format!("{r:?}")).collect();
    let statuses: Vec<String> = bh.statuses.keys().map(u16::to_string).collect();
    Part::new(
        format!("  {:<5} ({}) ->  api", "batch", o.batch.identity.spiffe_id),
        format!(
            "DENIED by rule {}: HTTP {}, TCP reset",
            rules.join(", "),
            statuses.join("/")
        ),
        problems,
        s,
    )
}

/// The impostor: refused during the handshake, because its CA is not trusted.
fn check_forged(o: &Observed, s: Style) -> Part {
    let f = &o.traffic.forged;
    let reasons: Vec<&str> = f.reasons.keys().map(String::as_str).collect();
    let mut problems = Vec::new();
    match &f.refused {
        None => problems.push(format!(
            "a certificate from a self-made CA claiming {} was ACCEPTED by api (the handshake succeeded)",
            f.claimed
        )),
        Some(_) if reasons.is_empty() => problems.push(
            "api refused the forged certificate but its /metrics count no inbound handshake failure".into(),
        ),
        Some(_) if reasons != ["untrusted_issuer"] => problems.push(format!(
            "api refused the forged certificate for {reasons:?}, expected untrusted_issuer (a certificate from an unknown CA)"
        )),
        Some(_) => {}
    }
    let mut part = Part::new(
        format!(
            "  forged certificate (self-made CA, claims {}) -> api",
            short_id(&f.claimed)
        ),
        format!("REFUSED in handshake: {}", reasons.join(", ")),
        problems,
        s,
    );
    if let Some(seen) = &f.refused {
        part.line.push('\n');
        part.line
            .push_str(&s.dim(&format!("      the impostor's TLS client saw: {seen}")));
    }
    part
}

/// Latency, where to scrape, and the certificate in use.
fn facts(o: &Observed) -> Vec<String> {
    let mut lines = Vec::new();
    let mut lat = o.traffic.web_http.latencies.clone();
    lat.sort();
    match (percentile(&lat, 0.5), percentile(&lat, 0.99), percentile(&lat, 0.999)) {
        (Some(p50), Some(p99), Some(p999)) => lines.push(format!(
            "Request latency through both sidecars (client-side, {} requests): p50 {}  p99 {}  p99.9 {}",
            lat.len(),
            ms(p50),
            ms(p99),
            ms(p999)
        )),
        _ => lines.push("Request latency: no request was answered".into()),
    }
    lines.push(format!(
        "Sidecar metrics (what SREs scrape): web http://{}/metrics   api http://{}/metrics   batch http://{}/metrics",
        o.web.admin, o.api.admin, o.batch.admin
    ));
    let id = &o.api.identity;
    let serial = match id.serial.get(..12) {
        Some(head) if id.serial.len() > 12 => format!("{head}…"),
        _ => id.serial.clone(),
    };
    let left = until(&id.not_after)
        .map(|d| {
            format!(
                "in {}",
                moat_core::duration::format(Duration::from_secs(d.as_secs()))
            )
        })
        .unwrap_or_else(|| "?".into());
    lines.push(format!(
        "Certificates: api serial {serial}  expires {} ({left}; the sidecar renews it automatically)",
        id.not_after
    ));
    lines
}

/// Checks the observations against the story and writes the report.
pub fn evaluate(o: &Observed, style: Style) -> Verdict {
    let mut v = Verdict {
        lines: vec![
            style.bold("Moat demo — everything below went over mutual TLS 1.3 between sidecars")
        ],
        failures: check_mesh(o),
    };
    for part in [
        check_web(o, style),
        check_batch(o, style),
        check_forged(o, style),
    ] {
        v.lines.push(part.line);
        v.failures.extend(part.problems);
    }
    v.lines.extend(facts(o));
    v
}

/// Writes `lines` and `failures` as one block of text.
pub fn render(v: &Verdict, style: Style) -> String {
    let mut out = String::new();
    for l in &v.lines {
        let _ = writeln!(out, "{l}");
    }
    if !v.failures.is_empty() {
        let _ = writeln!(
            out,
            "\n{}",
            style.bad("DEMO FAILED — the mesh did not behave as described:")
        );
        for f in &v.failures {
            let _ = writeln!(out, "  {} {f}", style.bad("✗"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The same story in the mesh lab (root): pods made by the injector, in network namespaces.

/// The demo's pods in the mesh lab; dropping it tears everything down.
pub struct LabStory {
    /// The lab (CA, injector, namespaces, pods).
    pub lab: MeshLab,
    /// The `api` pod (the lab's app server: orders API on 8080, TCP echo on 9000).
    pub api: PodHandle,
    /// The `web` pod (client, admitted by the policy).
    pub web: PodHandle,
    /// The `batch` pod (client, denied).
    pub batch: PodHandle,
    /// A bare namespace on the bridge, outside the mesh, where the impostor runs.
    pub impostor: Netns,
}

/// Builds the lab and deploys `api`, `web` and `batch` through the injector, with
/// [`API_POLICY`] as the namespace's `moat-policy` ConfigMap. `say` gets one line per step.
pub fn lab_setup(say: &mut dyn FnMut(String)) -> anyhow::Result<LabStory> {
    let mut lab = MeshLab::start(LabOptions::new("dm", [10, 90, 0]))?;
    say(format!(
        "[1/3] control  moat-ca {} and moat-injector https://{}:{}/inject in node namespace {}",
        lab.ca_url(),
        lab.gateway(),
        crate::lab::INJECTOR_PORT,
        lab.node()?.name
    ));
    lab.set_policy(API_POLICY)?;
    say("[2/3] pods     each spec admitted by the injector (AdmissionReview over HTTPS), then run like a kubelet would:".into());
    let mut pods = Vec::new();
    for (name, pod) in [
        ("api", crate::lab::server_pod("api", "api")),
        ("web", crate::lab::client_pod("web", "web")),
        ("batch", crate::lab::client_pod("batch", "batch")),
    ] {
        let h = lab
            .deploy(pod)
            .with_context(|| format!("deploying pod {name}"))?;
        let id = identity_from(&h.identity()?, &h.name)?;
        let role = match name {
            "api" => format!(
                "orders HTTP :{} and TCP echo :{}; policy (ConfigMap moat-policy): admit shop/web, deny the rest",
                crate::lab::HTTP_PORT,
                crate::lab::ECHO_PORT
            ),
            _ => "client: the demo sends its traffic from this pod's namespace".into(),
        };
        say(format!(
            "      {name:<6} {:<11} injected ({} patch operations), sidecar {}; {role}",
            h.ip.to_string(),
            h.admission.operations,
            id.spiffe_id
        ));
        pods.push(h);
    }
    let impostor = lab.add_host("impostor")?;
    let (Some(batch), Some(web), Some(api)) = (pods.pop(), pods.pop(), pods.pop()) else {
        anyhow::bail!("internal error: expected three pods");
    };
    Ok(LabStory {
        lab,
        api,
        web,
        batch,
        impostor,
    })
}

/// Sends the story's traffic in the lab — `web` and `batch` from their pods' namespaces to
/// `api`'s IP, the impostor from a namespace outside the mesh — and reads the sidecars.
pub fn lab_drive(story: &LabStory, plan: Plan) -> anyhow::Result<Observed> {
    let d = plan.duration;
    let http_addr = story.api.addr(crate::lab::HTTP_PORT);
    let tcp_addr = story.api.addr(crate::lab::ECHO_PORT);
    let web = crate::lab::spawn_in(&story.web.netns, move || async move {
        let n = request_count(WEB_RATE_PER_CONN, d);
        let runs: Vec<_> = (0..WEB_CONNS)
            .map(|i| {
                tokio::spawn(http_load(
                    http_addr,
                    WEB_RATE_PER_CONN,
                    n,
                    u64::from(i) * 1_000_000,
                ))
            })
            .collect();
        let tcp = tcp_series(tcp_addr, plan.tcp_count(), Duration::from_millis(500)).await;
        let mut all = HttpLoad::default();
        for r in runs {
            match r.await {
                Ok(load) => all.merge(load),
                Err(e) => {
                    all.sent += n;
                    all.error(format!("an HTTP client task failed: {e}"));
                }
            }
        }
        Ok((all, tcp))
    });
    let batch = crate::lab::spawn_in(&story.batch.netns, move || async move {
        let http = http_load(http_addr, 4, request_count(4, d), 9_000_000);
        let tcp = tcp_series(
            tcp_addr,
            plan.tcp_count().div_ceil(2),
            Duration::from_secs(1),
        );
        Ok(tokio::join!(http, tcp))
    });
    let bundle = Arc::new(ArcSwap::from_pointee(
        TrustBundle::from_pem(&std::fs::read(story.lab.bundle_path()).context("bundle")?)
            .context("trust bundle")?,
    ));
    let trust_domain = TrustDomain::new(crate::lab::TRUST_DOMAIN)
        .map_err(|e| anyhow::anyhow!("trust domain: {e}"))?;
    let api_id: SpiffeId = story
        .api
        .spiffe_id
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", story.api.spiffe_id))?;
    let claim = crate::lab::spiffe_id(FORGED_CLAIM);
    let api_admin = story.api.addr(crate::lab::ADMIN_PORT).to_string();
    let forged = crate::lab::spawn_in(&story.impostor, move || async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        forged_attempt(http_addr, api_admin, bundle, trust_domain, api_id, claim).await
    });
    let (web_http, web_tcp) = join_thread(web, "web")?;
    let (batch_http, batch_tcp) = join_thread(batch, "batch")?;
    let forged = join_thread(forged, "impostor")?;
    let traffic = Traffic {
        web_http,
        web_tcp,
        batch_http,
        batch_tcp,
        forged,
    };
    // The sidecars count an answer as it goes out; give the last ones a moment.
    let want = traffic.web_http.ok as f64;
    let web_id = story.web.spiffe_id.clone();
    let deadline = Instant::now() + Duration::from_secs(2);
    let api_metrics = loop {
        let m = story.api.metrics()?;
        let seen = m.value(
            M_HTTP,
            &[
                ("direction", "inbound"),
                ("peer", &web_id),
                ("status_class", "2xx"),
            ],
        );
        if seen >= want || Instant::now() >= deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let view = |p: &PodHandle, metrics: Option<Metrics>| -> anyhow::Result<SidecarView> {
        Ok(SidecarView {
            identity: identity_from(&p.identity()?, &p.name)?,
            metrics: match metrics {
                Some(m) => m,
                None => p.metrics()?,
            },
            admin: p.addr(crate::lab::ADMIN_PORT).to_string(),
        })
    };
    Ok(Observed {
        api: view(&story.api, Some(api_metrics))?,
        web: view(&story.web, None)?,
        batch: view(&story.batch, None)?,
        traffic,
        expected_ids: [
            story.api.spiffe_id.clone(),
            story.web.spiffe_id.clone(),
            story.batch.spiffe_id.clone(),
        ],
    })
}

fn join_thread<T>(h: std::thread::JoinHandle<anyhow::Result<T>>, who: &str) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("the {who} client thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=300).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.5), Some(Duration::from_millis(150)));
        assert_eq!(percentile(&v, 0.99), Some(Duration::from_millis(297)));
        assert_eq!(percentile(&v, 0.999), Some(Duration::from_millis(300)));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&v[..1], 0.0), Some(Duration::from_millis(1)));
    }

    #[test]
    fn orders_api_answers() {
        let r = orders_answer(&http::Method::GET, "/orders/7");
        assert_eq!(r.status(), http::StatusCode::OK);
        assert_eq!(orders_answer(&http::Method::GET, "/orders/x").status(), 404);
        assert_eq!(
            orders_answer(&http::Method::POST, "/orders/7").status(),
            404
        );
        assert_eq!(
            short_id("spiffe://cluster.local/ns/shop/sa/web"),
            ".../sa/web"
        );
    }

    const TD: &str = "spiffe://cluster.local/ns/shop/sa";

    fn view(metrics: &str) -> SidecarView {
        SidecarView {
            identity: Identity::default(),
            metrics: Metrics::parse(metrics),
            admin: "127.0.0.1:1".into(),
        }
    }

    /// Observations of a mesh that behaved.
    fn good() -> Observed {
        let (api, web, batch) = (
            format!("{TD}/api"),
            format!("{TD}/web"),
            format!("{TD}/batch"),
        );
        let api_metrics = format!(
            "moat_proxy_tls_handshakes_total{{direction=\"inbound\"}} 3\n\
             moat_proxy_http_requests_total{{direction=\"inbound\",status_class=\"2xx\",peer=\"{web}\",local=\"{api}\"}} 300\n\
             moat_proxy_http_requests_total{{direction=\"inbound\",status_class=\"4xx\",peer=\"{batch}\",local=\"{api}\"}} 12\n\
             moat_proxy_authz_decisions_total{{decision=\"allow\",rule=\"web-to-api\"}} 8\n\
             moat_proxy_authz_decisions_total{{decision=\"deny\",rule=\"default\"}} 4\n"
        );
        let caller = "moat_proxy_tls_handshakes_total{direction=\"outbound\"} 1\n";
        let mut o = Observed {
            traffic: Traffic {
                web_http: HttpLoad {
                    sent: 300,
                    ok: 300,
                    latencies: vec![Duration::from_micros(500); 300],
                    statuses: BTreeMap::from([(200, 300)]),
                    ..HttpLoad::default()
                },
                web_tcp: vec![TcpOutcome::Echoed; 6],
                batch_http: HttpLoad {
                    sent: 12,
                    statuses: BTreeMap::from([(403, 12)]),
                    denied_by: BTreeSet::from(["default".to_string()]),
                    ..HttpLoad::default()
                },
                batch_tcp: vec![TcpOutcome::Reset; 3],
                forged: Forged {
                    claimed: web.clone(),
                    refused: Some("received fatal alert: CertificateUnknown".into()),
                    reasons: BTreeMap::from([("untrusted_issuer".to_string(), 1.0)]),
                },
            },
            api: view(&api_metrics),
            web: view(caller),
            batch: view(caller),
            expected_ids: [api.clone(), web.clone(), batch.clone()],
        };
        o.api.identity.spiffe_id = api;
        o.web.identity.spiffe_id = web;
        o.batch.identity.spiffe_id = batch;
        o
    }

    #[test]
    fn a_mesh_that_behaves_passes_with_measured_facts() {
        let v = evaluate(&good(), Style::default());
        assert!(v.failures.is_empty(), "{:?}", v.failures);
        let text = render(&v, Style::default());
        assert!(
            text.contains("300 HTTP requests ok, 6 TCP echoes ok"),
            "{text}"
        );
        assert!(
            text.contains("DENIED by rule \"default\": HTTP 403, TCP reset"),
            "{text}"
        );
        assert!(
            text.contains("REFUSED in handshake: untrusted_issuer"),
            "{text}"
        );
        assert!(text.contains("p50 0.50 ms"), "{text}");
    }

    #[test]
    fn every_misbehaviour_fails_loudly() {
        type Breakage = Box<dyn Fn(&mut Observed)>;
        let cases: Vec<(&str, Breakage)> = vec![
            ("ACCEPTED", Box::new(|o| o.traffic.forged.refused = None)),
            (
                "expected untrusted_issuer",
                Box::new(|o| o.traffic.forged.reasons = BTreeMap::from([("not_svid".into(), 1.0)])),
            ),
            (
                "web was DENIED",
                Box::new(|o| {
                    o.traffic.web_http.denied_by.insert("default".into());
                }),
            ),
            (
                "batch REACHED",
                Box::new(|o| {
                    o.traffic.batch_http.ok = 12;
                    o.traffic.batch_http.statuses = BTreeMap::from([(200, 12)]);
                }),
            ),
            (
                "expected a reset",
                Box::new(|o| o.traffic.batch_tcp[1] = TcpOutcome::Echoed),
            ),
            (
                "TCP echo: 5 of 6",
                Box::new(|o| o.traffic.web_tcp[0] = TcpOutcome::Reset),
            ),
            (
                "holds identity",
                Box::new(|o| o.web.identity.spiffe_id = format!("{TD}/other")),
            ),
            (
                "handshakes missing",
                Box::new(|o| o.web.metrics = Metrics::default()),
            ),
            (
                "counted only",
                Box::new(|o| {
                    o.api
                        .metrics
                        .samples
                        .retain(|s| s.label("status_class") != Some("2xx"))
                }),
            ),
        ];
        for (want, break_it) in cases {
            let mut o = good();
            break_it(&mut o);
            let v = evaluate(&o, Style::default());
            let text = render(&v, Style::default());
            assert!(text.contains("DEMO FAILED"), "{want}: {text}");
            assert!(
                v.failures.iter().any(|f| f.contains(want)),
                "{want}: {:?}",
                v.failures
            );
        }
    }

    #[test]
    fn forged_chain_claims_the_identity_but_is_not_from_the_ca() {
        let (chain, _key) = forge("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(chain.len(), 2);
        let id = moat_core::x509::svid_identity(&chain[0]).unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/shop/sa/web");
    }
}
