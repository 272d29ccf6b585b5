//! A workload's X.509 SVID: its certificate chain and the private key that never leaves memory.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::spiffe::SpiffeId;
use crate::x509::{self, CertInfo};

/// A certificate chain (leaf first) with its private key and what was read from the leaf.
#[derive(Debug)]
pub struct Svid {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// The leaf's SPIFFE ID.
    pub id: SpiffeId,
    /// Serial, validity and the rest of the leaf's fields.
    pub info: CertInfo,
}

/// Why an SVID could not be turned into a TLS identity.
#[derive(Debug, thiserror::Error)]
pub enum SvidKeyError {
    /// The provider cannot load the key.
    #[error("private key unusable: {0}")]
    Key(rustls::Error),
    /// The key does not belong to the leaf certificate.
    #[error("private key does not match the certificate: {0}")]
    Mismatch(rustls::Error),
}

impl Svid {
    /// The chain and key as a rustls [`CertifiedKey`], after checking the key matches the leaf.
    pub fn certified_key(
        &self,
        provider: &CryptoProvider,
    ) -> Result<Arc<CertifiedKey>, SvidKeyError> {
        certified_key(self.chain.clone(), self.key.clone_key(), provider)
    }
}

/// A chain (leaf first) and its private key as a rustls [`CertifiedKey`], after checking the
/// key matches the leaf.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, SvidKeyError> {
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(SvidKeyError::Key)?;
    let ck = CertifiedKey::new(chain, signing);
    ck.keys_match().map_err(SvidKeyError::Mismatch)?;
    Ok(Arc::new(ck))
}

/// Public summary of the identity in use, as shown by the admin `/identity` endpoint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IdentitySummary {
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// Serial, hex.
    pub serial: String,
    /// RFC 3339 start of validity.
    pub not_before: String,
    /// RFC 3339 end of validity.
    pub not_after: String,
}

impl IdentitySummary {
    /// Summarises an SVID.
    pub fn of(svid: &Svid) -> Self {
        Self {
            spiffe_id: svid.id.to_string(),
            serial: svid.info.serial_hex.clone(),
            not_before: rfc3339(svid.info.not_before),
            not_after: rfc3339(svid.info.not_after),
        }
    }
}

/// Formats a time as RFC 3339 (UTC).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "invalid-time".to_string())
}

/// Reads an SVID's leaf fields, requiring a valid SPIFFE identity.
pub fn leaf_info(chain: &[CertificateDer<'_>]) -> Result<(SpiffeId, CertInfo), x509::SvidError> {
    let leaf = chain.first().ok_or(x509::SvidError::NoUriSan)?;
    let id = x509::svid_identity(leaf)?;
    let info = x509::inspect(leaf)?;
    Ok((id, info))
}
