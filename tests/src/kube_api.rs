//! [`FakeApiServer`]: the Kubernetes API server's TokenReview endpoint as `moat-ca` sees it
//! (HTTPS, `POST /apis/authentication.k8s.io/v1/tokenreviews`, bearer-authenticated), verifying
//! tokens against a [`TokenIssuer`]'s keys and answering like the real one: the service
//! account as `user.username`, and for tokens bound to a pod its name and uid in `user.extra`.
//! It records when each review arrived, so a test can see how many reached it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::token::TokenIssuer;

/// The bearer token `moat-ca` must present (its own service-account token).
pub const CA_SA_TOKEN: &str = "moat-ca-service-account-token";
/// The TokenReview path.
pub const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// A running fake API server, stopped when dropped.
pub struct FakeApiServer {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    reviews: Arc<Mutex<Vec<Instant>>>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeApiServer {
    /// Starts on a free loopback port, trusting `issuer`'s keys. Writes the CA's
    /// service-account directory (`token`, `ca.crt`) for `--service-account-dir`.
    pub fn start(issuer: &TokenIssuer) -> anyhow::Result<Self> {
        let dir = crate::temp_dir("kube-api")?;
        let ca_key = rcgen::KeyPair::generate().context("key")?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake kubernetes CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let key = rcgen::KeyPair::generate().context("key")?;
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?
            .signed_by(&key, &ca_issuer)?;
        std::fs::write(dir.path().join("ca.crt"), ca_cert.pem())?;
        std::fs::write(dir.path().join("token"), format!("{CA_SA_TOKEN}\n"))?;

        let chain = vec![cert.der().clone()];
        let key_der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow::anyhow!("key: {e}"))?;
        let tls = rustls::ServerConfig::builder_with_provider(moat_core::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let reviews = Arc::new(Mutex::new(Vec::new()));
        let (stop, stop_rx) = watch::channel(false);
        let keys = Arc::new(issuer.clone());
        let recorded = reviews.clone();
        let thread = std::thread::Builder::new()
            .name("fake-kube-api".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(serve(listener, Arc::new(tls), keys, recorded, stop_rx));
            })?;
        Ok(Self {
            addr,
            dir,
            reviews,
            stop,
            thread: Some(thread),
        })
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `KUBERNETES_SERVICE_HOST` and `_PORT` pointing at it.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KUBERNETES_SERVICE_HOST".into(), self.addr.ip().to_string()),
            (
                "KUBERNETES_SERVICE_PORT".into(),
                self.addr.port().to_string(),
            ),
        ]
    }

    /// The CA's service-account directory (`token`, `ca.crt`).
    pub fn service_account_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// How many TokenReviews arrived so far.
    pub fn reviews(&self) -> usize {
        self.review_times().len()
    }

    /// When each TokenReview arrived.
    pub fn review_times(&self) -> Vec<Instant> {
        self.reviews.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    issuer: Arc<TokenIssuer>,
    reviews: Arc<Mutex<Vec<Instant>>>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
            _ = stop.wait_for(|s| *s) => return,
        };
        let acceptor = acceptor.clone();
        let issuer = issuer.clone();
        let reviews = reviews.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let issuer = issuer.clone();
                let reviews = reviews.clone();
                async move { Ok::<_, Infallible>(answer(req, &issuer, &reviews).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn reply(status: u16, body: &Value) -> http::Response<Full<Bytes>> {
    let mut r = http::Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    r
}

async fn answer(
    req: http::Request<hyper::body::Incoming>,
    issuer: &TokenIssuer,
    reviews: &Mutex<Vec<Instant>>,
) -> http::Response<Full<Bytes>> {
    if req.method() != http::Method::POST || req.uri().path() != TOKEN_REVIEW_PATH {
        return reply(404, &json!({"kind": "Status", "code": 404}));
    }
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {CA_SA_TOKEN}"));
    if !authorized {
        return reply(401, &json!({"kind": "Status", "code": 401}));
    }
    if let Ok(mut r) = reviews.lock() {
        r.push(Instant::now());
    }
    let Ok(body) = req.into_body().collect().await else {
        return reply(400, &json!({"kind": "Status", "code": 400}));
    };
    let review: Value = serde_json::from_slice(&body.to_bytes()).unwrap_or_default();
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let audiences: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let status = match verify(issuer, token, &audiences) {
        Ok(claims) => {
            let k8s = &claims["kubernetes.io"];
            let mut extra = json!({
                "authentication.kubernetes.io/credential-id": [format!("JTI={}", claims["jti"].as_str().unwrap_or(""))],
            });
            if let Some(pod) = k8s.get("pod") {
                extra["authentication.kubernetes.io/pod-name"] = json!([pod["name"]]);
                extra["authentication.kubernetes.io/pod-uid"] = json!([pod["uid"]]);
            }
            json!({
                "authenticated": true,
                "user": {
                    "username": claims["sub"],
                    "uid": k8s["serviceaccount"]["uid"],
                    "groups": ["system:serviceaccounts", "system:authenticated"],
                    "extra": extra,
                },
                "audiences": audiences,
            })
        }
        Err(e) => json!({"authenticated": false, "error": e}),
    };
    reply(
        201,
        &json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": review["spec"],
            "status": status,
        }),
    )
}

/// What the API server checks: a signature by one of the issuer's keys, `iss`, `exp`, and an
/// audience among those asked for.
fn verify(issuer: &TokenIssuer, token: &str, audiences: &[String]) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("invalid token: {e}"))?;
    let mut last = "no key matches".to_string();
    for key in issuer.keys() {
        if header.kid.as_deref() != Some(key.kid()) {
            continue;
        }
        let Ok(decoding) = DecodingKey::from_jwk(key.jwk()) else {
            continue;
        };
        let mut v = Validation::new(key.algorithm());
        v.set_issuer(&[issuer.name()]);
        v.set_audience(audiences);
        match jsonwebtoken::decode::<Value>(token, &decoding, &v) {
            Ok(d) => return Ok(d.claims),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("invalid bearer token: {last}"))
}
