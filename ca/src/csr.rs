//! CSR admission: what a workload may ask for.
//!
//! The identity in the issued certificate always comes from the verified token, never from the
//! CSR. The CSR only contributes its public key; anything it asks for beyond the caller's own
//! identity is refused rather than silently dropped, so a confused or malicious client learns
//! exactly why.

use moat_core::spiffe::SpiffeId;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::authority::SubjectKey;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not a PEM `CERTIFICATE REQUEST`, or not DER PKCS#10 inside.
    #[error("csr is not a PEM-encoded PKCS#10 certificate request: {0}")]
    Malformed(String),
    /// The CSR's self-signature does not verify.
    #[error("csr signature does not verify with its own public key")]
    BadSignature,
    /// Key type other than ECDSA P-256 or Ed25519.
    #[error("unsupported key {0}: use ECDSA P-256 or Ed25519")]
    UnsupportedKey(String),
    /// A SAN other than the caller's own SPIFFE ID.
    #[error("csr asks for {asked}, but the token proves {proven}; a workload may only request its own identity")]
    ForeignIdentity {
        /// What the CSR asked for.
        asked: String,
        /// The identity the token proves.
        proven: String,
    },
    /// A CA certificate or signing key usage was requested.
    #[error("csr asks for a CA certificate or certificate-signing key usage; only leaf certificates are issued")]
    CaRequested,
}

impl CsrError {
    /// HTTP status for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            Self::ForeignIdentity { .. } | Self::CaRequested => 403,
            _ => 400,
        }
    }

    /// Machine-readable error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "invalid_csr",
            Self::BadSignature => "invalid_csr_signature",
            Self::UnsupportedKey(_) => "unsupported_key",
            Self::ForeignIdentity { .. } => "identity_mismatch",
            Self::CaRequested => "ca_not_allowed",
        }
    }
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_ED25519: &str = "1.3.101.112";

/// What an admitted CSR contributes to the certificate.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The public key to certify.
    pub key: SubjectKey,
    /// DNS SANs requested and allowed for this identity.
    pub dns_names: Vec<String>,
}

/// Checks `pem` against the identity `proven` by the token; `allowed_dns` are the DNS names
/// this identity may additionally hold (usually none).
pub fn admit(pem: &str, proven: &SpiffeId, allowed_dns: &[String]) -> Result<Admitted, CsrError> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(
            "trailing bytes after the request".into(),
        ));
    }
    let key = subject_key(&csr)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let mut dns_names = Vec::new();

    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::URI(u) if *u == proven.as_str() => {}
                            GeneralName::DNSName(d) if allowed_dns.iter().any(|a| a == d) => {
                                dns_names.push(d.to_string());
                            }
                            other => {
                                return Err(CsrError::ForeignIdentity {
                                    asked: describe(other),
                                    proven: proven.to_string(),
                                })
                            }
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(CsrError::CaRequested)
                }
                ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                    return Err(CsrError::CaRequested)
                }
                _ => {}
            }
        }
    }
    Ok(Admitted { key, dns_names })
}

fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(u) => format!("URI {u:?}"),
        GeneralName::DNSName(d) => format!("DNS name {d:?}"),
        GeneralName::IPAddress(_) => "an IP address SAN".into(),
        GeneralName::RFC822Name(e) => format!("email {e:?}"),
        other => format!("SAN {other:?}"),
    }
}

fn subject_key(csr: &X509CertificationRequest<'_>) -> Result<SubjectKey, CsrError> {
    let spki = &csr.certification_request_info.subject_pki;
    let alg = spki.algorithm.algorithm.to_id_string();
    let raw = spki.subject_public_key.data.to_vec();
    match alg.as_str() {
        OID_EC_PUBLIC_KEY => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .unwrap_or_default();
            if curve != OID_P256 {
                return Err(CsrError::UnsupportedKey(format!("ECDSA on curve {curve}")));
            }
            Ok(SubjectKey {
                raw,
                alg: &rcgen::PKCS_ECDSA_P256_SHA256,
            })
        }
        OID_ED25519 => Ok(SubjectKey {
            raw,
            alg: &rcgen::PKCS_ED25519,
        }),
        "1.2.840.113549.1.1.1" => Err(CsrError::UnsupportedKey("RSA".into())),
        other => Err(CsrError::UnsupportedKey(format!("algorithm {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, SanType};

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap()
    }

    fn csr(key: &KeyPair, sans: Vec<SanType>, ca: bool) -> String {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = sans;
        if ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        p.serialize_request(key).unwrap().pem().unwrap()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn admits_own_identity_or_no_san_with_p256_and_ed25519() {
        let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(admit(&csr(&p256, vec![uri(id().as_str())], false), &id(), &[]).is_ok());
        assert!(admit(&csr(&p256, vec![], false), &id(), &[]).is_ok());
        let k = admit(&csr(&ed, vec![uri(id().as_str())], false), &id(), &[]).unwrap();
        assert_eq!(k.key.alg, &rcgen::PKCS_ED25519);
    }

    #[test]
    fn refuses_other_identities_and_cas() {
        let k = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        for sans in [
            vec![uri("spiffe://cluster.local/ns/shop/sa/admin")],
            vec![uri("spiffe://evil.example/ns/shop/sa/web")],
            vec![
                uri(id().as_str()),
                SanType::DnsName("web.shop.svc".try_into().unwrap()),
            ],
        ] {
            let e = admit(&csr(&k, sans, false), &id(), &[]).unwrap_err();
            assert_eq!(e.status(), 403, "{e}");
        }
        assert_eq!(
            admit(&csr(&k, vec![uri(id().as_str())], true), &id(), &[]).unwrap_err(),
            CsrError::CaRequested
        );
    }

    #[test]
    fn grants_dns_names_only_when_allowed_for_the_identity() {
        let k = KeyPair::generate().unwrap();
        let dns = SanType::DnsName("moat-injector.moat-system.svc".try_into().unwrap());
        let pem = csr(&k, vec![uri(id().as_str()), dns], false);
        let allowed = vec!["moat-injector.moat-system.svc".to_string()];
        assert_eq!(admit(&pem, &id(), &allowed).unwrap().dns_names, allowed);
        assert_eq!(admit(&pem, &id(), &[]).unwrap_err().status(), 403);
    }

    #[test]
    fn refuses_rsa_other_curves_and_garbage() {
        let rsa =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        assert!(matches!(
            admit(&csr(&rsa, vec![], false), &id(), &[]),
            Err(CsrError::UnsupportedKey(_))
        ));
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            admit(&csr(&p384, vec![], false), &id(), &[]),
            Err(CsrError::UnsupportedKey(_))
        ));
        assert!(matches!(
            admit("not pem", &id(), &[]),
            Err(CsrError::Malformed(_))
        ));
        let good = csr(&KeyPair::generate().unwrap(), vec![], false);
        // Flip a byte inside the signature: still parses, no longer verifies.
        let der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap();
        let mut bytes = der.as_ref().to_vec();
        let n = bytes.len();
        bytes[n - 5] ^= 0x01;
        let tampered = moat_core::pem::encode_block("CERTIFICATE REQUEST", &bytes);
        assert_eq!(
            admit(&tampered, &id(), &[]).unwrap_err(),
            CsrError::BadSignature
        );
    }
}
