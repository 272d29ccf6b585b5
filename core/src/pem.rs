//! PEM reading and writing for certificates and private keys.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a PEM document could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The text has no `CERTIFICATE` block at all.
    #[error("no PEM \"CERTIFICATE\" block found")]
    NoCertificates,
    /// A block is malformed (bad base64, missing END line...).
    #[error("malformed PEM: {0}")]
    Malformed(String),
    /// The text has no private key block.
    #[error("no PEM private key block (PKCS#8, SEC1 or PKCS#1) found")]
    NoKey,
}

/// Parses every `CERTIFICATE` block, in order. Other block types are ignored.
pub fn parse_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates);
    }
    Ok(certs)
}

/// Parses the first private key block.
pub fn parse_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, PemError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => PemError::NoKey,
        other => PemError::Malformed(other.to_string()),
    })
}

/// Encodes DER certificates as concatenated PEM `CERTIFICATE` blocks.
pub fn encode_certs<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    let mut out = String::new();
    for c in certs {
        out.push_str(&encode_block("CERTIFICATE", c.as_ref()));
    }
    out
}

/// Encodes one PEM block with 64-column base64 lines.
pub fn encode_block(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_certificates() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.test".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = encode_certs([cert.der(), cert.der()]);
        let back = parse_certs(pem.as_bytes()).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].as_ref(), cert.der().as_ref());
        assert_eq!(
            pem,
            format!("{}{}", cert.pem(), cert.pem()).replace("\r\n", "\n")
        );
    }

    #[test]
    fn reports_missing_and_malformed_blocks() {
        assert!(matches!(
            parse_certs(b"hello"),
            Err(PemError::NoCertificates)
        ));
        assert!(matches!(
            parse_certs(b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n"),
            Err(PemError::Malformed(_))
        ));
        assert!(matches!(parse_key(b"nothing here"), Err(PemError::NoKey)));
    }
}
