//! A minimal in-cluster Kubernetes API client: just enough to keep the `caBundle` of Moat's
//! MutatingWebhookConfiguration equal to the trust bundle (`GET` the object, `PATCH` it with
//! an RFC 6902 JSON patch). In-cluster credentials come from `KUBERNETES_SERVICE_HOST/PORT`
//! and `/var/run/secrets/kubernetes.io/serviceaccount/{token,ca.crt}`; the token is re-read
//! for every request (kubelet rotates it). Needs RBAC `get` and `patch` on that one object.
//!
//! The request building and the caBundle patch are pure functions, tested against recorded
//! payloads; the HTTP exchange is tested against a local HTTPS server. Nothing here has been
//! run against a live API server.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// Service-account credentials directory of every pod.
pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// API path of the MutatingWebhookConfiguration collection.
pub const WEBHOOK_CONFIGS: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
/// Content type of an RFC 6902 patch.
pub const JSON_PATCH: &str = "application/json-patch+json";

/// Why a Kubernetes API call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Not running in a pod (no service host/credentials).
    #[error("not running in a Kubernetes pod: {0}")]
    NotInCluster(String),
    /// A credential file cannot be read.
    #[error("cannot read {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The object name is not a valid Kubernetes name.
    #[error("{0:?} is not a valid Kubernetes object name")]
    InvalidName(String),
    /// Connecting, TLS or HTTP failed.
    #[error("API server {addr}: {reason}")]
    Transport {
        /// host:port.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The API server answered with an error status.
    #[error("API server answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The `message` of the Status body (or the raw body).
        message: String,
    },
    /// The answer is not the expected JSON.
    #[error("unexpected API server answer: {0}")]
    BadResponse(String),
}

/// Checks a DNS-1123 subdomain (the syntax of cluster-scoped object names).
pub fn validate_name(name: &str) -> Result<(), KubeError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(KubeError::InvalidName(name.to_string()))
    }
}

/// Path of one MutatingWebhookConfiguration.
pub fn webhook_config_path(name: &str) -> Result<String, KubeError> {
    validate_name(name)?;
    Ok(format!("{WEBHOOK_CONFIGS}/{name}"))
}

fn request(
    method: http::Method,
    authority: &str,
    path: &str,
    token: &str,
    body: Option<(&str, Vec<u8>)>,
) -> Result<http::Request<Full<Bytes>>, KubeError> {
    let mut b = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, authority)
        .header(
            http::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        )
        .header(http::header::ACCEPT, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("moat-injector/", env!("CARGO_PKG_VERSION")),
        );
    let body = match body {
        Some((content_type, bytes)) => {
            b = b.header(http::header::CONTENT_TYPE, content_type);
            Bytes::from(bytes)
        }
        None => Bytes::new(),
    };
    b.body(Full::new(body))
        .map_err(|e| KubeError::BadResponse(format!("cannot build request: {e}")))
}

/// `GET` of MutatingWebhookConfiguration `name`.
pub fn get_request(
    authority: &str,
    name: &str,
    token: &str,
) -> Result<http::Request<Full<Bytes>>, KubeError> {
    request(
        http::Method::GET,
        authority,
        &webhook_config_path(name)?,
        token,
        None,
    )
}

/// `PATCH` (RFC 6902) of MutatingWebhookConfiguration `name`.
pub fn patch_request(
    authority: &str,
    name: &str,
    token: &str,
    patch: &Value,
) -> Result<http::Request<Full<Bytes>>, KubeError> {
    let body = serde_json::to_vec(patch).map_err(|e| KubeError::BadResponse(e.to_string()))?;
    request(
        http::Method::PATCH,
        authority,
        &webhook_config_path(name)?,
        token,
        Some((JSON_PATCH, body)),
    )
}

/// The JSON patch that sets every webhook's `clientConfig.caBundle` of `config` (a
/// MutatingWebhookConfiguration as returned by the API) to `bundle_pem`, or `None` when all
/// are already equal. Each change is guarded by `test` operations on the object's
/// `resourceVersion` and the webhook's name, so a concurrent edit makes the patch fail (and the
/// next sync retry) instead of writing to the wrong webhook.
pub fn ca_bundle_patch(config: &Value, bundle_pem: &str) -> Option<Value> {
    let wanted = base64::engine::general_purpose::STANDARD.encode(bundle_pem.as_bytes());
    let webhooks = config.get("webhooks")?.as_array()?;
    let mut ops = Vec::new();
    for (i, w) in webhooks.iter().enumerate() {
        let current = w.pointer("/clientConfig/caBundle").and_then(Value::as_str);
        if current == Some(wanted.as_str()) {
            continue;
        }
        let name = w.get("name").cloned().unwrap_or(Value::Null);
        ops.push(json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": name}));
        ops.push(json!({
            "op": "add",
            "path": format!("/webhooks/{i}/clientConfig/caBundle"),
            "value": wanted,
        }));
    }
    if ops.is_empty() {
        return None;
    }
    if let Some(rv) = config
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        ops.insert(
            0,
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}),
        );
    }
    Some(Value::Array(ops))
}

/// Where and how to reach the API server.
#[derive(Debug, Clone)]
pub struct KubeClient {
    host: String,
    port: u16,
    token_file: PathBuf,
    ca_file: PathBuf,
    timeout: Duration,
}

impl KubeClient {
    /// The client for the cluster this pod runs in.
    pub fn in_cluster() -> Result<Self, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST")
            .map_err(|_| KubeError::NotInCluster("KUBERNETES_SERVICE_HOST is not set".into()))?;
        let port = match std::env::var("KUBERNETES_SERVICE_PORT") {
            Ok(p) => p
                .parse()
                .map_err(|_| KubeError::NotInCluster(format!("KUBERNETES_SERVICE_PORT={p:?}")))?,
            Err(_) => 443,
        };
        let dir = Path::new(SA_DIR);
        Ok(Self::new(host, port, dir.join("token"), dir.join("ca.crt")))
    }

    /// A client for `host:port` with explicit credential files.
    pub fn new(host: String, port: u16, token_file: PathBuf, ca_file: PathBuf) -> Self {
        Self {
            host,
            port,
            token_file,
            ca_file,
            timeout: Duration::from_secs(10),
        }
    }

    /// `host:port` as used in the `Host` header (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    async fn token(&self) -> Result<String, KubeError> {
        tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|source| KubeError::Credentials {
                path: self.token_file.clone(),
                source,
            })
    }

    /// Reads MutatingWebhookConfiguration `name`.
    pub async fn get_webhook_config(&self, name: &str) -> Result<Value, KubeError> {
        let req = get_request(&self.authority(), name, &self.token().await?)?;
        self.send(req).await
    }

    /// Applies an RFC 6902 patch to MutatingWebhookConfiguration `name`.
    pub async fn patch_webhook_config(
        &self,
        name: &str,
        patch: &Value,
    ) -> Result<Value, KubeError> {
        let req = patch_request(&self.authority(), name, &self.token().await?, patch)?;
        self.send(req).await
    }

    /// Brings the caBundle of `name` to `bundle_pem`; returns whether it changed anything.
    pub async fn sync_ca_bundle(&self, name: &str, bundle_pem: &str) -> Result<bool, KubeError> {
        let config = self.get_webhook_config(name).await?;
        match ca_bundle_patch(&config, bundle_pem) {
            None => Ok(false),
            Some(patch) => self.patch_webhook_config(name, &patch).await.map(|_| true),
        }
    }

    async fn tls(&self) -> Result<tokio_rustls::TlsConnector, KubeError> {
        let ca = tokio::fs::read(&self.ca_file)
            .await
            .map_err(|source| KubeError::Credentials {
                path: self.ca_file.clone(),
                source,
            })?;
        let mut roots = rustls::RootCertStore::empty();
        let certs = moat_core::pem::parse_certs(&ca).map_err(|e| KubeError::Credentials {
            path: self.ca_file.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        for c in certs {
            roots
                .add(c)
                .map_err(|e| self.transport(format!("CA certificate: {e}")))?;
        }
        // The API server is not a Moat endpoint: TLS 1.2 and 1.3 with the default suites.
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| self.transport(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
    }

    fn transport(&self, reason: String) -> KubeError {
        KubeError::Transport {
            addr: self.authority(),
            reason,
        }
    }

    async fn send(&self, req: http::Request<Full<Bytes>>) -> Result<Value, KubeError> {
        tokio::time::timeout(self.timeout, self.send_inner(req))
            .await
            .map_err(|_| self.transport(format!("no answer within {:?}", self.timeout)))?
    }

    async fn send_inner(&self, req: http::Request<Full<Bytes>>) -> Result<Value, KubeError> {
        let connector = self.tls().await?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| self.transport(e.to_string()))?;
        let name = rustls_pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| self.transport(e.to_string()))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| self.transport(format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.transport(e.to_string()))?;
        let conn_task = tokio::spawn(conn);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.transport(e.to_string()));
        let result = match resp {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let body = Limited::new(resp.into_body(), 4 << 20)
                    .collect()
                    .await
                    .map_err(|e| self.transport(e.to_string()))
                    .map(|b| b.to_bytes());
                body.and_then(|body| interpret(status, &body))
            }
            Err(e) => Err(e),
        };
        conn_task.abort();
        result
    }
}

/// Turns an API answer into the object or a [`KubeError::Status`].
pub fn interpret(status: u16, body: &[u8]) -> Result<Value, KubeError> {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    if (200..300).contains(&status) {
        return json.ok_or_else(|| KubeError::BadResponse("body is not JSON".into()));
    }
    let message = json
        .as_ref()
        .and_then(|j| j.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
    Err(KubeError::Status { status, message })
}
