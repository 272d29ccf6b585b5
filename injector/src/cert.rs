//! The webhook's serving certificate, from one of two sources:
//!
//! * files (`--tls-cert`, `--tls-key`), polled with [`FileWatch`] and swapped in when they
//!   change (a pair that does not match is refused and the previous certificate kept);
//! * moat-ca (`--tls-from-ca`): the injector's SPIFFE identity with DNS SAN
//!   `moat-injector.moat-system.svc`, renewed by [`moat_core::manager::IdentityManager`] like a
//!   sidecar's; the webhook configuration's `caBundle` is then kept equal to the trust bundle.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use moat_core::client::{CaClientConfig, KeyAlgorithm};
use moat_core::svid::SvidKeyError;
use moat_core::tls::CurrentCert;
use moat_core::watch::FileWatch;
use moat_core::{SpiffeId, TrustBundle, TrustDomain};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::config::CONTROL_PLANE_NAMESPACE;
use crate::kube::KubeClient;
use crate::metrics;

/// The injector's service account (its SPIFFE identity's last segment).
pub const SERVICE_ACCOUNT: &str = "moat-injector";
/// DNS name the API server calls the webhook at.
pub const SERVICE_DNS_NAME: &str = "moat-injector.moat-system.svc";

/// Why a serving certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The PEM is unusable.
    #[error("{0}")]
    Pem(String),
    /// The key does not belong to the certificate.
    #[error("the private key does not match the certificate: {0}")]
    Mismatch(String),
}

/// Builds a TLS identity from PEM, checking the key matches the leaf certificate.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = moat_core::pem::parse_certs(cert_pem)
        .map_err(|e| CertError::Pem(format!("certificate: {e}")))?;
    let key =
        moat_core::pem::parse_key(key_pem).map_err(|e| CertError::Pem(format!("key: {e}")))?;
    moat_core::svid::certified_key(chain, key, provider).map_err(|e| match e {
        SvidKeyError::Key(e) => CertError::Pem(format!("key: {e}")),
        SvidKeyError::Mismatch(e) => CertError::Mismatch(e.to_string()),
    })
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A certificate and key pair kept fresh from files.
#[derive(Debug)]
pub struct FileCert {
    cert: FileWatch,
    key: FileWatch,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl FileCert {
    /// Loads the pair (failing if it is unusable) and installs it into `current`.
    pub fn load(
        cert_path: &Path,
        key_path: &Path,
        current: &CurrentCert,
        provider: &CryptoProvider,
    ) -> Result<Self, CertError> {
        let (cert_pem, key_pem) = (read(cert_path)?, read(key_path)?);
        current.set(certified_key(&cert_pem, &key_pem, provider)?);
        Ok(Self {
            cert: FileWatch::new(cert_path, Some(cert_pem.clone())),
            key: FileWatch::new(key_path, Some(key_pem.clone())),
            cert_pem,
            key_pem,
        })
    }

    /// Checks the files once; installs a changed, valid pair. Returns whether it reloaded.
    pub async fn poll(&mut self, current: &CurrentCert, provider: &CryptoProvider) -> bool {
        let mut changed = false;
        for (w, slot) in [
            (&mut self.cert, &mut self.cert_pem),
            (&mut self.key, &mut self.key_pem),
        ] {
            match w.poll().await {
                Ok(Some(bytes)) => {
                    *slot = bytes;
                    changed = true;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(path = %w.path().display(), error = %e, "cannot read serving certificate file; keeping the current one");
                }
            }
        }
        if !changed {
            return false;
        }
        match certified_key(&self.cert_pem, &self.key_pem, provider) {
            Ok(ck) => {
                current.set(ck);
                ::metrics::counter!(metrics::CERT_RELOADS, "result" => "ok").increment(1);
                tracing::info!(cert = %self.cert.path().display(), "serving certificate reloaded");
                true
            }
            Err(e) => {
                // Often the first half of an update (new cert, old key): the next change of
                // the other file completes it.
                ::metrics::counter!(metrics::CERT_RELOADS, "result" => "error").increment(1);
                tracing::warn!(error = %e, "new serving certificate not usable yet; keeping the current one");
                false
            }
        }
    }

    /// Polls every `interval` until `shutdown`.
    pub async fn run(
        mut self,
        current: Arc<CurrentCert>,
        provider: Arc<CryptoProvider>,
        interval: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => { self.poll(&current, &provider).await; }
                _ = moat_core::shutdown::signalled(&mut shutdown) => return,
            }
        }
    }
}

/// Why the injector's CA client could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum CaClientConfigError {
    /// `--ca-url` is not a URL.
    #[error("--ca-url {url:?}: {source}")]
    CaUrl {
        /// The flag's value.
        url: String,
        /// Why it does not parse.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// The trust domain makes no valid injector identity.
    #[error("the injector's identity: {0}")]
    Identity(#[from] moat_core::spiffe::SpiffeIdError),
}

/// How the injector asks moat-ca for its serving certificate: its own SPIFFE identity plus
/// the DNS SAN the API server verifies ([`SERVICE_DNS_NAME`]; moat-ca grants it to this
/// identity only, `moat-ca serve --dns-san`).
pub fn ca_client_config(
    ca_url: &str,
    token_file: &Path,
    td: &TrustDomain,
) -> Result<CaClientConfig, CaClientConfigError> {
    Ok(CaClientConfig {
        url: ca_url
            .parse()
            .map_err(|source| CaClientConfigError::CaUrl {
                url: ca_url.to_string(),
                source,
            })?,
        token_file: token_file.to_path_buf(),
        identity: injector_identity(td)?,
        key_algorithm: KeyAlgorithm::default(),
        dns_names: vec![SERVICE_DNS_NAME.to_string()],
        timeout: Duration::from_secs(10),
    })
}

/// The injector's SPIFFE identity in `td`.
pub fn injector_identity(td: &TrustDomain) -> Result<SpiffeId, moat_core::spiffe::SpiffeIdError> {
    SpiffeId::workload(td, CONTROL_PLANE_NAMESPACE, SERVICE_ACCOUNT)
}

/// Keeps the caBundle of webhook configuration `name` equal to `bundle`, checking every
/// `interval` (which also repairs manual edits) until `shutdown`.
pub async fn sync_ca_bundle(
    client: KubeClient,
    name: String,
    bundle: Arc<ArcSwap<TrustBundle>>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = moat_core::shutdown::signalled(&mut shutdown) => return,
        }
        let pem = bundle.load().to_pem();
        match client.sync_ca_bundle(&name, &pem).await {
            Ok(true) => {
                ::metrics::counter!(metrics::CA_BUNDLE_SYNCS, "result" => "updated").increment(1);
                tracing::info!(webhook_config = %name, roots = bundle.load().certs().len(), "webhook caBundle updated to the trust bundle");
                last_error = None;
            }
            Ok(false) => {
                if last_error.take().is_some() {
                    tracing::info!(webhook_config = %name, "webhook caBundle in sync again");
                }
            }
            Err(e) => {
                ::metrics::counter!(metrics::CA_BUNDLE_SYNCS, "result" => "error").increment(1);
                let msg = e.to_string();
                // Log each distinct error once, not every interval.
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(webhook_config = %name, error = %msg, "cannot sync webhook caBundle; retrying");
                }
                last_error = Some(msg);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_request_names_the_injector_and_its_service() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let c = ca_client_config(
            "https://moat-ca.moat-system.svc:8443",
            Path::new("/var/run/secrets/moat/token"),
            &td,
        )
        .unwrap();
        assert_eq!(
            c.identity.as_str(),
            "spiffe://cluster.local/ns/moat-system/sa/moat-injector"
        );
        assert_eq!(c.dns_names, ["moat-injector.moat-system.svc"]);
        assert_eq!(c.url.port_u16(), Some(8443));
        assert!(ca_client_config("not a url", Path::new("t"), &td).is_err());
    }

    #[test]
    fn mismatched_pairs_are_refused() {
        let provider = moat_core::tls::provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let ok = certified_key(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            &provider,
        );
        assert!(ok.is_ok());
        let other = rcgen::KeyPair::generate().unwrap();
        let bad = certified_key(
            cert.pem().as_bytes(),
            other.serialize_pem().as_bytes(),
            &provider,
        );
        assert!(matches!(bad, Err(CertError::Mismatch(_))));
        assert!(matches!(
            certified_key(b"junk", b"junk", &provider),
            Err(CertError::Pem(_))
        ));
    }
}
