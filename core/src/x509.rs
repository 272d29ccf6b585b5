//! Reading X.509 certificates: the fields Moat cares about, and the SPIFFE X509-SVID leaf rules.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Why a certificate is not an acceptable X509-SVID leaf.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// The DER does not parse as an X.509 certificate.
    #[error("certificate does not parse: {0}")]
    Malformed(String),
    /// The leaf has no URI SAN.
    #[error("certificate has no URI SAN (a SPIFFE ID is required)")]
    NoUriSan,
    /// The leaf has more than one URI SAN, which the SPIFFE standard forbids.
    #[error("certificate has {0} URI SANs; an X509-SVID must have exactly one")]
    MultipleUriSans(usize),
    /// The URI SAN is not a valid SPIFFE ID with a path.
    #[error("URI SAN is not a valid workload SPIFFE ID: {0}")]
    BadSpiffeId(#[from] SpiffeIdError),
    /// The leaf claims to be a CA or may sign certificates.
    #[error("a leaf SVID must not be a CA or carry keyCertSign/cRLSign")]
    LeafIsCa,
    /// The leaf lacks the digitalSignature key usage.
    #[error("a leaf SVID must have the digitalSignature key usage")]
    NoDigitalSignature,
}

/// What Moat reads from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The SPIFFE ID from the single URI SAN, when there is one.
    pub spiffe_id: Option<SpiffeId>,
    /// Serial number as lowercase hex.
    pub serial_hex: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether basicConstraints says CA:true.
    pub is_ca: bool,
}

impl CertInfo {
    /// Time left before expiry (zero when expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }

    /// Total validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, SvidError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok(_) => Err(SvidError::Malformed(
            "trailing bytes after certificate".into(),
        )),
        Err(e) => Err(SvidError::Malformed(e.to_string())),
    }
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Vec<&'a str> {
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    out.push(*uri);
                }
            }
        }
    }
    out
}

/// Reads the fields of any certificate (leaf or CA) without applying SVID rules.
pub fn inspect(der: &[u8]) -> Result<CertInfo, SvidError> {
    let cert = parse(der)?;
    let uris = uri_sans(&cert);
    let spiffe_id = match uris.as_slice() {
        [one] => SpiffeId::parse(one).ok(),
        _ => None,
    };
    Ok(CertInfo {
        spiffe_id,
        serial_hex: hex(cert.raw_serial()),
        not_before: to_system_time(cert.validity().not_before),
        not_after: to_system_time(cert.validity().not_after),
        is_ca: cert.is_ca(),
    })
}

/// Applies the SPIFFE X509-SVID leaf rules and returns the leaf's SPIFFE ID.
///
/// Chain and validity checks are webpki's job; this checks what webpki does not know about.
pub fn svid_identity(der: &[u8]) -> Result<SpiffeId, SvidError> {
    let cert = parse(der)?;
    let uris = uri_sans(&cert);
    let id = match uris.as_slice() {
        [] => return Err(SvidError::NoUriSan),
        [one] => SpiffeId::parse(one)?,
        many => return Err(SvidError::MultipleUriSans(many.len())),
    };
    if cert.is_ca() {
        return Err(SvidError::LeafIsCa);
    }
    match cert.key_usage() {
        Ok(Some(ku)) => {
            if ku.value.key_cert_sign() || ku.value.crl_sign() {
                return Err(SvidError::LeafIsCa);
            }
            if !ku.value.digital_signature() {
                return Err(SvidError::NoDigitalSignature);
            }
        }
        Ok(None) => return Err(SvidError::NoDigitalSignature),
        Err(e) => return Err(SvidError::Malformed(e.to_string())),
    }
    Ok(id)
}

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}
