//! The CA client: proves the workload's identity with its projected service-account token and
//! exchanges a freshly generated key's CSR for an SVID.
//!
//! The private key is generated in memory for every request and never written anywhere. The
//! returned chain is verified against the local trust bundle before it is handed out.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;

use crate::api::{ApiError, CertificateRequest, CertificateResponse, CERTIFICATES_PATH};
use crate::bundle::TrustBundle;
use crate::pem;
use crate::spiffe::SpiffeId;
use crate::svid::Svid;
use crate::tls::SpiffeVerifier;
use crate::x509;

/// Key algorithm of the workload key pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256 (the default, and what every peer supports).
    #[default]
    #[value(name = "ecdsa-p256")]
    EcdsaP256,
    /// Ed25519.
    Ed25519,
}

/// Where and how to reach the CA.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// Base URL, e.g. `https://moat-ca.moat-system.svc:8443`.
    pub url: http::Uri,
    /// Projected service-account token file, re-read on every request (kubelet rotates it).
    pub token_file: PathBuf,
    /// The identity this workload expects to receive.
    pub identity: SpiffeId,
    /// Key algorithm for new key pairs.
    pub key_algorithm: KeyAlgorithm,
    /// DNS names to request besides the SPIFFE ID (granted only to identities the CA allows,
    /// e.g. the injector's webhook serving name).
    pub dns_names: Vec<String>,
    /// Deadline for one whole request (connect, handshake, answer).
    pub timeout: Duration,
}

/// Why an SVID could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The CA URL is unusable.
    #[error("CA URL {0:?} must be https://host[:port]")]
    BadUrl(String),
    /// The token file could not be read.
    #[error("cannot read service-account token {path}: {source}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Key or CSR generation failed.
    #[error("cannot generate key pair or CSR: {0}")]
    Csr(String),
    /// TCP connect or DNS failed.
    #[error("cannot reach CA at {addr}: {source}")]
    Connect {
        /// host:port tried.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake with the CA failed (including an untrusted CA certificate).
    #[error("TLS handshake with CA failed: {0}")]
    Tls(std::io::Error),
    /// HTTP transport failure.
    #[error("HTTP exchange with CA failed: {0}")]
    Http(String),
    /// The CA refused the request.
    #[error("CA refused the request ({status}): {} - {}", .body.error, .body.message)]
    Refused {
        /// HTTP status.
        status: u16,
        /// The CA's error body.
        body: ApiError,
    },
    /// The CA answered something unusable.
    #[error("CA answer is invalid: {0}")]
    BadResponse(String),
    /// The returned certificate does not verify against the local trust bundle or is not ours.
    #[error("issued certificate rejected: {0}")]
    Verification(String),
    /// The whole request took too long.
    #[error("CA request timed out after {0:?}")]
    Timeout(Duration),
}

impl ClientError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadUrl(_) => "bad_url",
            Self::Token { .. } => "token",
            Self::Csr(_) => "csr",
            Self::Connect { .. } => "connect",
            Self::Tls(_) => "tls",
            Self::Http(_) => "http",
            Self::Refused { .. } => "refused",
            Self::BadResponse(_) => "bad_response",
            Self::Verification(_) => "verification",
            Self::Timeout(_) => "timeout",
        }
    }
}

/// A client of `moat-ca`.
pub struct CaClient {
    cfg: CaClientConfig,
    host: String,
    port: u16,
    bundle: Arc<ArcSwap<TrustBundle>>,
    provider: Arc<CryptoProvider>,
}

impl CaClient {
    /// Creates a client; `bundle` is the local trust bundle, used both to authenticate the CA
    /// and to verify what it issues.
    pub fn new(
        cfg: CaClientConfig,
        bundle: Arc<ArcSwap<TrustBundle>>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, ClientError> {
        let bad = || ClientError::BadUrl(cfg.url.to_string());
        if cfg.url.scheme_str() != Some("https") {
            return Err(bad());
        }
        let host = cfg
            .url
            .host()
            .ok_or_else(bad)?
            .trim_matches(['[', ']'])
            .to_string();
        let port = cfg.url.port_u16().unwrap_or(443);
        Ok(Self {
            cfg,
            host,
            port,
            bundle,
            provider,
        })
    }

    /// The identity this client asks for.
    pub fn identity(&self) -> &SpiffeId {
        &self.cfg.identity
    }

    /// Requests a new SVID.
    pub async fn fetch(&self) -> Result<Svid, ClientError> {
        self.fetch_with_bundle().await.map(|(svid, _)| svid)
    }

    /// Requests a new SVID; also returns the CA's current trust bundle when it differs from
    /// ours and the new certificate verifies against it too (how root rotation reaches
    /// workloads that have no bundle file).
    pub async fn fetch_with_bundle(&self) -> Result<(Svid, Option<TrustBundle>), ClientError> {
        tokio::time::timeout(self.cfg.timeout, self.fetch_inner())
            .await
            .map_err(|_| ClientError::Timeout(self.cfg.timeout))?
    }

    async fn fetch_inner(&self) -> Result<(Svid, Option<TrustBundle>), ClientError> {
        let token = tokio::fs::read_to_string(&self.cfg.token_file)
            .await
            .map_err(|source| ClientError::Token {
                path: self.cfg.token_file.clone(),
                source,
            })?;
        let (key_der, csr_pem) = make_csr(
            &self.cfg.identity,
            &self.cfg.dns_names,
            self.cfg.key_algorithm,
        )?;
        let body = serde_json::to_vec(&CertificateRequest { csr: csr_pem })
            .map_err(|e| ClientError::Csr(e.to_string()))?;

        let (status, bytes) = self.post(token.trim(), body).await?;
        if status != 200 {
            let body = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| ApiError {
                error: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            });
            return Err(ClientError::Refused { status, body });
        }
        let resp: CertificateResponse = serde_json::from_slice(&bytes)
            .map_err(|e| ClientError::BadResponse(format!("not a certificate response: {e}")))?;
        let svid = self.verify_issued(&resp, key_der)?;
        let bundle = self.newer_bundle(&resp.trust_bundle, &svid);
        Ok((svid, bundle))
    }

    /// The response's bundle, if it differs from ours and also validates the new leaf.
    fn newer_bundle(&self, pem: &str, svid: &Svid) -> Option<TrustBundle> {
        let offered = TrustBundle::from_pem(pem.as_bytes()).ok()?;
        if offered.certs() == self.bundle.load().certs() {
            return None;
        }
        let td = crate::TrustDomain::new(self.cfg.identity.trust_domain_str()).ok()?;
        let check = SpiffeVerifier::new(
            Arc::new(ArcSwap::from_pointee(offered.clone())),
            td,
            self.provider.clone(),
        );
        check
            .verify(
                &svid.chain[0],
                &svid.chain[1..],
                UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .ok()?;
        Some(offered)
    }

    fn verify_issued(
        &self,
        resp: &CertificateResponse,
        key_der: Vec<u8>,
    ) -> Result<Svid, ClientError> {
        let chain = pem::parse_certs(resp.certificate_chain.as_bytes())
            .map_err(|e| ClientError::BadResponse(format!("certificate_chain: {e}")))?;
        let verifier = SpiffeVerifier::new(
            self.bundle.clone(),
            crate::TrustDomain::new(self.cfg.identity.trust_domain_str())
                .map_err(|e| ClientError::Verification(e.to_string()))?,
            self.provider.clone(),
        )
        .expecting(Some(self.cfg.identity.clone()));
        let now = UnixTime::now();
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            verifier
                .verify(&chain[0], &chain[1..], now, usage)
                .map_err(|e| ClientError::Verification(e.to_string()))?;
        }
        let info =
            x509::inspect(&chain[0]).map_err(|e| ClientError::Verification(e.to_string()))?;
        if info.not_after <= SystemTime::now() {
            return Err(ClientError::Verification(
                "certificate already expired".into(),
            ));
        }
        let svid = Svid {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            id: self.cfg.identity.clone(),
            info,
        };
        // Proves the CA certified our key and not some other one.
        svid.certified_key(&self.provider)
            .map_err(|e| ClientError::Verification(e.to_string()))?;
        Ok(svid)
    }

    async fn post(&self, token: &str, body: Vec<u8>) -> Result<(u16, Bytes), ClientError> {
        let addr = format!("{}:{}", self.host, self.port);
        let tcp = TcpStream::connect(&addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let roots = Arc::new(self.bundle.load().root_store());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            self.provider.clone(),
        )
        .build()
        .map_err(|e| ClientError::Tls(std::io::Error::other(e.to_string())))?;
        let mut tls_cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Tls(std::io::Error::other(e)))?
            .with_webpki_verifier(verifier)
            .with_no_client_auth();
        tls_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| ClientError::BadUrl(self.cfg.url.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg))
            .connect(name, tcp)
            .await
            .map_err(ClientError::Tls)?;

        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let conn_task = tokio::spawn(conn);
        let authority = match self.port {
            443 => self.host.clone(),
            p => format!("{}:{p}", self.host),
        };
        let req = http::Request::post(CERTIFICATES_PATH)
            .header(http::header::HOST, authority)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), 1024 * 1024)
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        conn_task.abort();
        Ok((status, bytes))
    }
}

/// Generates a key pair and a CSR carrying `id` (and `dns_names`) as SANs; returns
/// (PKCS#8 key, CSR PEM).
pub fn make_csr(
    id: &SpiffeId,
    dns_names: &[String],
    alg: KeyAlgorithm,
) -> Result<(Vec<u8>, String), ClientError> {
    let err = |e: rcgen::Error| ClientError::Csr(e.to_string());
    let key = match alg {
        KeyAlgorithm::EcdsaP256 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        KeyAlgorithm::Ed25519 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519),
    }
    .map_err(err)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(id.as_str().try_into().map_err(err)?)];
    for name in dns_names {
        params.subject_alt_names.push(rcgen::SanType::DnsName(
            name.as_str().try_into().map_err(err)?,
        ));
    }
    let csr = params.serialize_request(&key).map_err(err)?;
    Ok((key.serialize_der(), csr.pem().map_err(err)?))
}
