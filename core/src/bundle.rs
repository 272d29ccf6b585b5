//! The trust bundle: the set of root certificates a trust domain's SVIDs must chain to.
//!
//! A bundle may hold several roots at once, which is how a root is rotated: publish old and new,
//! switch the issuer, then drop the old root once no live SVID chains to it.

use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::pem::{self, PemError};
use crate::x509;

/// Why a trust bundle was rejected.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The PEM could not be read.
    #[error("trust bundle: {0}")]
    Pem(#[from] PemError),
    /// A certificate in the bundle does not parse.
    #[error("trust bundle certificate #{index}: {reason}")]
    BadCert {
        /// Zero-based position in the bundle.
        index: usize,
        /// What was wrong.
        reason: String,
    },
    /// A certificate in the bundle is not a CA.
    #[error(
        "trust bundle certificate #{index} is not a CA (basicConstraints CA:true is required)"
    )]
    NotCa {
        /// Zero-based position in the bundle.
        index: usize,
    },
}

/// A validated set of root certificates.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// Parses a PEM bundle; every certificate must be a CA certificate.
    pub fn from_pem(pem_bytes: &[u8]) -> Result<Self, BundleError> {
        Self::from_certs(pem::parse_certs(pem_bytes)?)
    }

    /// Builds a bundle from DER certificates; every certificate must be a CA certificate.
    pub fn from_certs(certs: Vec<CertificateDer<'static>>) -> Result<Self, BundleError> {
        if certs.is_empty() {
            return Err(BundleError::Pem(PemError::NoCertificates));
        }
        let mut anchors = Vec::with_capacity(certs.len());
        for (index, cert) in certs.iter().enumerate() {
            let info = x509::inspect(cert).map_err(|e| BundleError::BadCert {
                index,
                reason: e.to_string(),
            })?;
            if !info.is_ca {
                return Err(BundleError::NotCa { index });
            }
            let anchor =
                webpki::anchor_from_trusted_cert(cert).map_err(|e| BundleError::BadCert {
                    index,
                    reason: e.to_string(),
                })?;
            anchors.push(anchor.to_owned());
        }
        Ok(Self { certs, anchors })
    }

    /// The root certificates, in bundle order.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    /// The roots as webpki trust anchors.
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }

    /// The bundle as PEM.
    pub fn to_pem(&self) -> String {
        pem::encode_certs(&self.certs)
    }

    /// A rustls root store holding the bundle, for verifying ordinary (DNS-named) servers.
    pub fn root_store(&self) -> rustls::RootCertStore {
        rustls::RootCertStore {
            roots: self.anchors.clone(),
        }
    }

    /// Whether `der` is one of the roots.
    pub fn contains(&self, der: &[u8]) -> bool {
        self.certs.iter().any(|c| c.as_ref() == der)
    }
}
