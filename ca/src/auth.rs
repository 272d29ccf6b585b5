//! Workload authentication: who is calling, proven by a projected service-account token.
//!
//! Two verifiers sit behind [`TokenVerifier`]:
//! * [`TokenReview`]: asks the Kubernetes API server (production, in-cluster).
//! * [`Jwks`]: verifies the JWT offline against the cluster's service-account issuer keys
//!   (RS256 and ES256), checking `exp`, `nbf`, `iss`, `aud` and the `kubernetes.io` claims.
//!
//! Either way only tokens bound to a pod are accepted: a token the kubelet projected into a
//! pod names it (and the API server stops accepting it once that pod is gone), while a token
//! minted with `kubectl create token` for the bare service account would let anyone holding
//! it obtain the workload's identity from anywhere for as long as it is valid.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// The workload a valid token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// Pod name, when the token is bound to a pod.
    pub pod: Option<String>,
}

/// Why a token was refused. Every variant maps to HTTP 401 except [`AuthError::Unavailable`]
/// and [`AuthError::Overloaded`] (503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No usable `Authorization: Bearer` header.
    #[error("missing bearer token: send the projected service-account token as 'Authorization: Bearer <token>'")]
    Missing,
    /// The token is expired or not yet valid.
    #[error("token is expired or not yet valid: kubelet refreshes projected tokens; re-read the token file")]
    Expired,
    /// Audience mismatch.
    #[error("token audience is not {0:?}: project the token with 'audience: {0}'")]
    WrongAudience(String),
    /// Issuer mismatch.
    #[error("token issuer is not the cluster's service-account issuer {0:?}")]
    WrongIssuer(String),
    /// Signature or key problems, malformed JWT.
    #[error("token is not valid: {0}")]
    Invalid(String),
    /// The API server said the token is not authenticated.
    #[error("token rejected by the Kubernetes API server: {0}")]
    Rejected(String),
    /// The token is valid but not bound to a pod.
    #[error("token is not bound to a pod ({0}): use the projected service-account token the kubelet mounts into the pod, not one created for the bare service account")]
    Unbound(String),
    /// Too many tokens to verify: the CA protects the API server from floods.
    #[error("too many token verifications, retry after {}s: {message}", retry_after.as_secs().max(1))]
    Overloaded {
        /// What limit was reached.
        message: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// The verifier itself could not do its job (API server down...).
    #[error("cannot verify token right now: {0}")]
    Unavailable(String),
}

impl AuthError {
    /// Short label for metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::Expired => "expired_token",
            Self::WrongAudience(_) => "wrong_audience",
            Self::WrongIssuer(_) => "wrong_issuer",
            Self::Invalid(_) => "invalid_token",
            Self::Rejected(_) => "rejected_token",
            Self::Unbound(_) => "unbound_token",
            Self::Unavailable(_) => "auth_unavailable",
            Self::Overloaded { .. } => "auth_overloaded",
        }
    }
}

/// Verifies a bearer token and says which workload it belongs to.
pub trait TokenVerifier: Send + Sync + 'static {
    /// Verifies `token`.
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Workload, AuthError>> + Send + 'a>>;

    /// Verifies `token` sent by a client at `source`; verifiers that limit clients use it.
    fn verify_from<'a>(
        &'a self,
        token: &'a str,
        source: Option<std::net::IpAddr>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Workload, AuthError>> + Send + 'a>>
    {
        let _ = source;
        self.verify(token)
    }
}

/// Splits `system:serviceaccount:<ns>:<sa>`.
fn parse_sa_username(user: &str) -> Option<(String, String)> {
    let rest = user.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    if ns.is_empty() || sa.is_empty() || sa.contains(':') {
        return None;
    }
    Some((ns.to_string(), sa.to_string()))
}

#[derive(Debug, Deserialize)]
struct K8sClaims {
    sub: Option<String>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<K8sInfo>,
}

#[derive(Debug, Deserialize)]
struct K8sInfo {
    namespace: String,
    serviceaccount: NamedRef,
    pod: Option<ObjectRef>,
}

#[derive(Debug, Deserialize)]
struct NamedRef {
    name: String,
}

#[derive(Debug, Deserialize)]
struct ObjectRef {
    #[serde(default)]
    name: String,
    #[serde(default)]
    uid: String,
}

/// Offline JWT verification against the service-account issuer's public keys.
pub struct Jwks {
    keys: ArcSwap<JwkSet>,
    path: PathBuf,
    issuer: String,
    audience: String,
    leeway: Duration,
}

/// Why a token verifier cannot be set up (at start-up, or on a key reload).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The JWK Set file cannot be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a JWK Set.
    #[error("{}: not a JWK Set", .path.display())]
    NotJwks {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// The JWK Set has no keys.
    #[error("{}: the JWK Set holds no keys", .path.display())]
    NoKeys {
        /// The file.
        path: PathBuf,
    },
    /// A key of the set cannot verify signatures.
    #[error("{}: key #{index} unusable", .path.display())]
    BadKey {
        /// The file.
        path: PathBuf,
        /// Position of the key in the set.
        index: usize,
        /// Why.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    /// Not inside a cluster: no API server to send TokenReviews to.
    #[error("KUBERNETES_SERVICE_HOST is not set: not running in a cluster? Use --jwks-file for offline verification")]
    NotInCluster,
    /// The CA pod's own service-account credentials are missing.
    #[error("{} is missing: the CA pod needs its service-account token mounted", .0.display())]
    NoCredentials(PathBuf),
}

impl Jwks {
    /// Loads `jwks_file` (a JWK Set, as served at the issuer's `/openid/v1/jwks`).
    pub fn load(jwks_file: PathBuf, issuer: String, audience: String) -> Result<Self, SetupError> {
        let keys = read_jwks(&jwks_file)?;
        Ok(Self {
            keys: ArcSwap::from_pointee(keys),
            path: jwks_file,
            issuer,
            audience,
            leeway: Duration::from_secs(10),
        })
    }

    /// Re-reads the key file; keeps the old keys if the new file is invalid.
    pub fn reload(&self) -> Result<bool, SetupError> {
        let keys = read_jwks(&self.path)?;
        let changed =
            serde_json::to_string(&keys).ok() != serde_json::to_string(&**self.keys.load()).ok();
        if changed {
            self.keys.store(Arc::new(keys));
        }
        Ok(changed)
    }

    /// The key file.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn verify_sync(&self, token: &str) -> Result<Workload, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("malformed JWT: {e}")))?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(AuthError::Invalid(format!(
                "JWT algorithm {:?} is not accepted (RS256 or ES256 only)",
                header.alg
            )));
        }
        let keys = self.keys.load();
        let candidates: Vec<_> = keys
            .keys
            .iter()
            .filter(|k| match (&header.kid, &k.common.key_id) {
                (Some(want), Some(have)) => want == have,
                (Some(_), None) => false,
                (None, _) => true,
            })
            .collect();
        if candidates.is_empty() {
            return Err(AuthError::Invalid(format!(
                "no issuer key matches the token's key id {:?}",
                header.kid.unwrap_or_default()
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.validate_nbf = true;
        validation.leeway = self.leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let mut last = AuthError::Invalid("no key verified the token".into());
        for jwk in candidates {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match jsonwebtoken::decode::<K8sClaims>(token, &key, &validation) {
                Ok(data) => return workload_from_claims(data.claims),
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::ExpiredSignature | K::ImmatureSignature => AuthError::Expired,
                        K::InvalidAudience => AuthError::WrongAudience(self.audience.clone()),
                        K::InvalidIssuer => AuthError::WrongIssuer(self.issuer.clone()),
                        K::InvalidSignature => {
                            AuthError::Invalid("signature does not verify".into())
                        }
                        other => AuthError::Invalid(format!("{other:?}")),
                    };
                    // Claim errors mean the signature verified: no other key will do better.
                    if !matches!(last, AuthError::Invalid(_)) {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn read_jwks(path: &std::path::Path) -> Result<JwkSet, SetupError> {
    let text = std::fs::read_to_string(path).map_err(|source| SetupError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|source| SetupError::NotJwks {
        path: path.to_path_buf(),
        source,
    })?;
    if set.keys.is_empty() {
        return Err(SetupError::NoKeys {
            path: path.to_path_buf(),
        });
    }
    for (index, k) in set.keys.iter().enumerate() {
        DecodingKey::from_jwk(k).map_err(|source| SetupError::BadKey {
            path: path.to_path_buf(),
            index,
            source,
        })?;
    }
    Ok(set)
}

fn workload_from_claims(c: K8sClaims) -> Result<Workload, AuthError> {
    let k = c.kubernetes.ok_or_else(|| {
        AuthError::Invalid(
            "token has no kubernetes.io claims: use a projected service-account token".into(),
        )
    })?;
    // The subject must agree with the structured claims: a token minted for one account can
    // not be relabelled by a confused issuer.
    if let Some(sub) = c.sub.as_deref() {
        match parse_sa_username(sub) {
            Some((ns, sa)) if ns == k.namespace && sa == k.serviceaccount.name => {}
            _ => {
                return Err(AuthError::Invalid(format!(
                    "token subject {sub:?} does not match its kubernetes.io claims"
                )))
            }
        }
    }
    let pod = match k.pod {
        Some(p) if !p.name.is_empty() && !p.uid.is_empty() => p.name,
        Some(_) => {
            return Err(AuthError::Unbound(
                "its kubernetes.io.pod claim lacks the pod's name or uid".into(),
            ))
        }
        None => return Err(AuthError::Unbound("no kubernetes.io.pod claim".into())),
    };
    Ok(Workload {
        namespace: k.namespace,
        service_account: k.serviceaccount.name,
        pod: Some(pod),
    })
}

impl TokenVerifier for Jwks {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Workload, AuthError>> + Send + 'a>>
    {
        Box::pin(async move { self.verify_sync(token) })
    }
}

/// In-cluster Kubernetes TokenReview verification.
pub struct TokenReview {
    host: String,
    port: u16,
    ca_file: PathBuf,
    token_file: PathBuf,
    audience: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// Default paths of the CA's own service-account credentials.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl TokenReview {
    /// Uses the in-cluster configuration (`KUBERNETES_SERVICE_HOST`/`_PORT` and the mounted
    /// service-account token and CA).
    pub fn in_cluster(audience: String) -> Result<Self, SetupError> {
        Self::in_cluster_with(audience, std::path::Path::new(SA_DIR))
    }

    /// Like [`TokenReview::in_cluster`], with the CA's own service-account credentials
    /// (`token`, `ca.crt`) in `sa_dir`.
    pub fn in_cluster_with(audience: String, sa_dir: &std::path::Path) -> Result<Self, SetupError> {
        let host =
            std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| SetupError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(443);
        let ca_file = sa_dir.join("ca.crt");
        if !ca_file.exists() {
            return Err(SetupError::NoCredentials(ca_file));
        }
        Ok(Self {
            host,
            port,
            ca_file,
            token_file: sa_dir.join("token"),
            audience,
            provider: moat_core::tls::provider(),
        })
    }

    async fn review(&self, token: &str) -> Result<Workload, AuthError> {
        use k8s_openapi::api::authentication::v1 as authn;
        let unavailable = |e: String| AuthError::Unavailable(e);
        let review = authn::TokenReview {
            spec: authn::TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let body = serde_json::to_vec(&review).map_err(|e| unavailable(e.to_string()))?;
        let own_token = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| unavailable(format!("{}: {e}", self.token_file.display())))?;
        let ca = tokio::fs::read(&self.ca_file)
            .await
            .map_err(|e| unavailable(format!("{}: {e}", self.ca_file.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in moat_core::pem::parse_certs(&ca).map_err(|e| unavailable(e.to_string()))? {
            roots.add(c).map_err(|e| unavailable(e.to_string()))?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| unavailable(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unavailable(format!("API server {}:{}: {e}", self.host, self.port)))?;
        let name = rustls_pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| unavailable(e.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| unavailable(format!("TLS to API server: {e}")))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let task = tokio::spawn(conn);
        let req = http::Request::post("/apis/authentication.k8s.io/v1/tokenreviews")
            .header(http::header::HOST, self.host.as_str())
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", own_token.trim()),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unavailable(e.to_string()))?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .to_bytes();
        task.abort();
        if !status.is_success() {
            return Err(unavailable(format!(
                "TokenReview answered {status}: {}",
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(200)
                    .collect::<String>()
            )));
        }
        let review: authn::TokenReview = serde_json::from_slice(&bytes)
            .map_err(|e| unavailable(format!("TokenReview answer: {e}")))?;
        workload_from_review(review, &self.audience)
    }
}

/// Interprets a TokenReview answer.
pub fn workload_from_review(
    review: k8s_openapi::api::authentication::v1::TokenReview,
    audience: &str,
) -> Result<Workload, AuthError> {
    let status = review
        .status
        .ok_or_else(|| AuthError::Unavailable("TokenReview has no status".into()))?;
    if status.authenticated != Some(true) {
        return Err(AuthError::Rejected(
            status.error.unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    if !status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == audience))
    {
        return Err(AuthError::WrongAudience(audience.to_string()));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = parse_sa_username(&username)
        .ok_or_else(|| AuthError::Rejected(format!("{username:?} is not a service account")))?;
    // The API server only reports these for tokens bound to a pod that still exists.
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let (Some(pod), Some(_uid)) = (
        extra("authentication.kubernetes.io/pod-name"),
        extra("authentication.kubernetes.io/pod-uid"),
    ) else {
        return Err(AuthError::Unbound(
            "the TokenReview names no pod (authentication.kubernetes.io/pod-name and pod-uid)"
                .into(),
        ));
    };
    Ok(Workload {
        namespace,
        service_account,
        pod: Some(pod),
    })
}

impl TokenVerifier for TokenReview {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Workload, AuthError>> + Send + 'a>>
    {
        Box::pin(async move {
            tokio::time::timeout(Duration::from_secs(5), self.review(token))
                .await
                .map_err(|_| AuthError::Unavailable("TokenReview timed out after 5s".into()))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::TokenReview as Review;

    #[test]
    fn an_unusable_key_file_is_refused_with_what_is_wrong_and_its_cause() {
        let dir = std::env::temp_dir().join(format!("moat-jwks-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |name: &str, content: Option<&str>| {
            let path = dir.join(name);
            if let Some(c) = content {
                std::fs::write(&path, c).unwrap();
            }
            Jwks::load(path, "iss".into(), "moat-ca".into())
                .err()
                .unwrap()
        };
        let missing = load("missing.json", None);
        assert!(matches!(missing, SetupError::Read { .. }), "{missing:?}");
        assert!(
            std::error::Error::source(&missing).is_some(),
            "the I/O cause is kept"
        );
        let not_json = load("garbage.json", Some("not json"));
        assert!(
            matches!(not_json, SetupError::NotJwks { .. }),
            "{not_json:?}"
        );
        assert!(not_json
            .to_string()
            .ends_with("garbage.json: not a JWK Set"));
        let empty = load("empty.json", Some(r#"{"keys":[]}"#));
        assert!(matches!(empty, SetupError::NoKeys { .. }), "{empty:?}");
        let bad_key = load(
            "bad-key.json",
            Some(r#"{"keys":[{"kty":"RSA","n":"!!not base64!!","e":"AQAB"}]}"#),
        );
        assert!(
            matches!(bad_key, SetupError::BadKey { index: 0, .. }),
            "{bad_key:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_a_token_review_answer_as_the_api_server_sends_it() {
        let answer = r#"{"kind":"TokenReview","apiVersion":"authentication.k8s.io/v1",
          "metadata":{"creationTimestamp":null},
          "spec":{"token":"x","audiences":["moat-ca"]},
          "status":{"authenticated":true,
            "user":{"username":"system:serviceaccount:shop:web","uid":"6c0f",
              "groups":["system:serviceaccounts","system:serviceaccounts:shop","system:authenticated"],
              "extra":{"authentication.kubernetes.io/credential-id":["JTI=1"],
                       "authentication.kubernetes.io/node-name":["node-1"],
                       "authentication.kubernetes.io/pod-name":["web-7d9f"],
                       "authentication.kubernetes.io/pod-uid":["a1"]}},
            "audiences":["moat-ca"]}}"#;
        let review: Review = serde_json::from_str(answer).unwrap();
        let w = workload_from_review(review, "moat-ca").unwrap();
        assert_eq!(w.namespace, "shop");
        assert_eq!(w.service_account, "web");
        assert_eq!(w.pod.as_deref(), Some("web-7d9f"));
    }

    #[test]
    fn refuses_unauthenticated_wrong_audience_and_non_service_accounts() {
        let r: Review = serde_json::from_str(
            r#"{"spec":{},"status":{"authenticated":false,"error":"token expired"}}"#,
        )
        .unwrap();
        assert!(
            matches!(workload_from_review(r, "moat-ca"), Err(AuthError::Rejected(m)) if m == "token expired")
        );
        let r: Review = serde_json::from_str(
            r#"{"spec":{},"status":{"authenticated":true,"audiences":["other"],"user":{"username":"system:serviceaccount:a:b"}}}"#,
        )
        .unwrap();
        assert!(matches!(
            workload_from_review(r, "moat-ca"),
            Err(AuthError::WrongAudience(_))
        ));
        let r: Review = serde_json::from_str(
            r#"{"spec":{},"status":{"authenticated":true,"audiences":["moat-ca"],"user":{"username":"alice"}}}"#,
        )
        .unwrap();
        assert!(matches!(
            workload_from_review(r, "moat-ca"),
            Err(AuthError::Rejected(_))
        ));
    }

    #[test]
    fn a_token_review_without_a_pod_is_unbound() {
        let answer = |extra: &str| {
            format!(
                r#"{{"spec":{{}},"status":{{"authenticated":true,"audiences":["moat-ca"],
                  "user":{{"username":"system:serviceaccount:shop:web","extra":{{{extra}}}}}}}}}"#
            )
        };
        for extra in [
            "",
            r#""authentication.kubernetes.io/credential-id":["JTI=1"]"#,
            r#""authentication.kubernetes.io/pod-name":["web-0"]"#,
            r#""authentication.kubernetes.io/pod-name":["web-0"],"authentication.kubernetes.io/pod-uid":[""]"#,
        ] {
            let r: Review = serde_json::from_str(&answer(extra)).unwrap();
            let got = workload_from_review(r, "moat-ca");
            assert!(
                matches!(got, Err(AuthError::Unbound(_))),
                "{extra}: {got:?}"
            );
            assert_eq!(got.unwrap_err().reason(), "unbound_token");
        }
        let bound = r#""authentication.kubernetes.io/pod-name":["web-0"],"authentication.kubernetes.io/pod-uid":["a1"]"#;
        let r: Review = serde_json::from_str(&answer(bound)).unwrap();
        assert_eq!(
            workload_from_review(r, "moat-ca").unwrap().pod.as_deref(),
            Some("web-0")
        );
    }

    #[test]
    fn jwt_claims_without_a_pod_are_unbound() {
        let claims = |pod: &str| -> K8sClaims {
            serde_json::from_str(&format!(
                r#"{{"sub":"system:serviceaccount:shop:web","kubernetes.io":{{"namespace":"shop",
                   "serviceaccount":{{"name":"web","uid":"1"}}{pod}}}}}"#
            ))
            .unwrap()
        };
        for pod in ["", r#","pod":{"name":"web-0"}"#, r#","pod":{"uid":"2"}"#] {
            let got = workload_from_claims(claims(pod));
            assert!(matches!(got, Err(AuthError::Unbound(_))), "{pod}: {got:?}");
        }
        let w = workload_from_claims(claims(r#","pod":{"name":"web-0","uid":"2"}"#)).unwrap();
        assert_eq!(w.pod.as_deref(), Some("web-0"));
    }

    #[test]
    fn parses_service_account_usernames_strictly() {
        assert_eq!(
            parse_sa_username("system:serviceaccount:ns:sa"),
            Some(("ns".into(), "sa".into()))
        );
        for bad in [
            "system:serviceaccount:ns",
            "system:serviceaccount::sa",
            "system:serviceaccount:ns:",
            "user:ns:sa",
            "system:serviceaccount:a:b:c",
        ] {
            assert_eq!(parse_sa_username(bad), None, "{bad}");
        }
    }
}
