//! An attacker's sidecar: a valid SVID from the real CA, presented in a real mTLS handshake
//! with ALPN `moat/1`, then tunnel frames written by hand — what a compromised workload can
//! send to any other sidecar, without the rules a real `moat-proxy` follows.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use moat_core::client::{CaClient, CaClientConfig, KeyAlgorithm};
use moat_core::tls::{self, CurrentCert, SpiffeVerifier};
use moat_core::{SpiffeId, TrustBundle, TrustDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Frame types of the tunnel protocol (proxy/src/tunnel.rs).
const OPEN: u8 = 1;
const DATA: u8 = 2;
const FIN: u8 = 3;
const RESET: u8 = 4;

/// What came back after the attacker's OPEN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server sidecar refused the stream (RESET frame).
    Reset {
        /// Reset code.
        code: u8,
        /// The reason the server gave.
        reason: String,
    },
    /// Bytes from whatever the server sidecar connected the stream to.
    Data(Vec<u8>),
    /// The connection ended with nothing for the attacker.
    Closed,
    /// The mTLS handshake itself failed.
    Handshake(String),
}

impl Outcome {
    /// Whether the attacker got anything back from behind the sidecar.
    pub fn reached_something(&self) -> bool {
        matches!(self, Outcome::Data(d) if !d.is_empty())
    }
}

/// A workload identity held by the attacker.
pub struct Attacker {
    config: Arc<rustls::ClientConfig>,
    /// The identity the CA gave.
    pub id: SpiffeId,
}

impl Attacker {
    /// Obtains a real SVID for `namespace/service_account` from the CA at `ca_url` with the
    /// projected token in `token_file`, like any workload can for itself.
    pub async fn enroll(
        ca_url: &str,
        bundle_pem: &Path,
        token_file: &Path,
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<Self> {
        let td: TrustDomain = trust_domain.parse().context("trust domain")?;
        let id = SpiffeId::workload(&td, namespace, service_account).context("identity")?;
        let pem = std::fs::read(bundle_pem).context("trust bundle")?;
        let bundle = Arc::new(ArcSwap::from_pointee(
            TrustBundle::from_pem(&pem).context("trust bundle")?,
        ));
        let provider = tls::provider();
        let client = CaClient::new(
            CaClientConfig {
                url: ca_url.parse().context("CA URL")?,
                token_file: token_file.to_path_buf(),
                identity: id.clone(),
                key_algorithm: KeyAlgorithm::EcdsaP256,
                dns_names: Vec::new(),
                timeout: Duration::from_secs(10),
            },
            bundle.clone(),
            provider.clone(),
        )?;
        let svid = client
            .fetch()
            .await
            .context("the CA refused the attacker")?;
        let cert = Arc::new(CurrentCert::default());
        cert.set(svid.certified_key(&provider)?);
        let verifier = SpiffeVerifier::new(bundle, td, provider.clone());
        let config = tls::mesh_client_config(cert, verifier, provider)?;
        Ok(Self {
            config: Arc::new(config),
            id,
        })
    }

    /// Connects to `addr`, completes the mTLS handshake and sends `OPEN(port)` followed by
    /// `payload` and FIN; returns what the server sidecar answered within `timeout`.
    pub async fn open(
        &self,
        addr: SocketAddr,
        port: u16,
        payload: &[u8],
        timeout: Duration,
    ) -> anyhow::Result<Outcome> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let mut tls = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Ok(Outcome::Handshake(e.to_string())),
            Err(_) => return Ok(Outcome::Handshake("timed out".into())),
        };
        let mut frames = vec![OPEN, 0, 0, 2];
        frames.extend_from_slice(&port.to_be_bytes());
        if !payload.is_empty() {
            let len = (payload.len() as u32).to_be_bytes();
            frames.extend_from_slice(&[DATA, len[1], len[2], len[3]]);
            frames.extend_from_slice(payload);
        }
        frames.extend_from_slice(&[FIN, 0, 0, 0]);
        // A refusing server may close before reading it all; what it answered still counts.
        let _ = tls.write_all(&frames).await;
        let _ = tls.flush().await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(timeout, async {
            let mut buf = [0u8; 4096];
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
                // The server keeps the connection for the next stream: stop at its FIN/RESET.
                if stream_ended(&got) {
                    break;
                }
            }
        })
        .await;
        let _ = read; // a server that keeps the stream open: judge what arrived so far
        Ok(parse_frames(&got))
    }
}

/// Whether `b` holds a complete FIN or RESET frame.
fn stream_ended(mut b: &[u8]) -> bool {
    while b.len() >= 4 {
        let len = u32::from_be_bytes([0, b[1], b[2], b[3]]) as usize;
        if b.len() < 4 + len {
            return false;
        }
        if b[0] == FIN || b[0] == RESET {
            return true;
        }
        b = &b[4 + len..];
    }
    false
}

/// Decodes the server's frames into the attacker's view.
fn parse_frames(mut b: &[u8]) -> Outcome {
    let mut data = Vec::new();
    while b.len() >= 4 {
        let len = u32::from_be_bytes([0, b[1], b[2], b[3]]) as usize;
        let Some(payload) = b.get(4..4 + len) else {
            break;
        };
        match b[0] {
            DATA => data.extend_from_slice(payload),
            RESET => {
                return Outcome::Reset {
                    code: payload.first().copied().unwrap_or(0),
                    reason: String::from_utf8_lossy(payload.get(1..).unwrap_or_default())
                        .into_owned(),
                }
            }
            _ => {}
        }
        b = &b[4 + len..];
    }
    if data.is_empty() {
        Outcome::Closed
    } else {
        Outcome::Data(data)
    }
}
