//! Certificates for unit tests, made with rcgen: honest CAs and SVID leaves that each test then
//! bends into what an attacker or a broken CA could present.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

/// A CA certificate with its signing key.
pub(crate) type Ca = CertifiedIssuer<'static, KeyPair>;

/// What a Moat CA certificate looks like; `constraints` sets how deep it may delegate.
pub(crate) fn ca_params(name: &str, constraints: BasicConstraints) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(constraints);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// A self-signed root; two roots with the same name are still different issuers.
pub(crate) fn ca(name: &str) -> Ca {
    let p = ca_params(name, BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// An intermediate of `root` that may only sign leaves.
pub(crate) fn intermediate(root: &Ca) -> Ca {
    let p = ca_params("moat intermediate", BasicConstraints::Constrained(0));
    CertifiedIssuer::signed_by(p, KeyPair::generate().unwrap(), root).unwrap()
}

/// A well-formed SVID for `uris`, valid now, for client and server use.
pub(crate) fn leaf_params(uris: &[&str]) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::minutes(5);
    p.not_after = now + Duration::hours(1);
    p
}

/// Issues `p` from `by` for a fresh key.
pub(crate) fn sign(p: CertificateParams, by: &Ca) -> CertificateDer<'static> {
    p.signed_by(&KeyPair::generate().unwrap(), by)
        .unwrap()
        .der()
        .clone()
}
