//! An in-process CA for tests and benchmarks that need SVIDs without running moat-ca: a
//! self-signed root (fresh, or one `moat-ca init` wrote) and X509-SVIDs for any
//! `namespace/service account`, valid now.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use moat_core::tls::{self, CurrentCert};
use moat_core::TrustBundle;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// A root that signs SVIDs of one trust domain.
pub struct TestCa {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The trust bundle holding the root, as verifiers take it.
    pub bundle: Arc<ArcSwap<TrustBundle>>,
}

impl TestCa {
    /// A fresh root for `trust_domain`.
    pub fn new(trust_domain: &str) -> anyhow::Result<Self> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let root = p.self_signed(&key)?;
        let bundle = TrustBundle::from_certs(vec![root.der().clone()])?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(p, key),
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
        })
    }

    /// The root in `cert_pem` with its private key `key_pem` (as `moat-ca init` writes them),
    /// so that SVIDs made here are trusted by a deployed mesh using that root.
    pub fn from_pem(trust_domain: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("root key")?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).context("root certificate")?;
        let bundle = TrustBundle::from_pem(cert_pem.as_bytes())?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer,
            bundle: Arc::new(ArcSwap::from_pointee(bundle)),
        })
    }

    /// A [`CurrentCert`] holding an SVID for `spiffe://<td>/ns/<ns>/sa/<sa>`, valid for the
    /// next hour.
    pub fn svid(&self, ns: &str, sa: &str) -> anyhow::Result<Arc<CurrentCert>> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let id = format!("spiffe://{}/ns/{ns}/sa/{sa}", self.trust_domain);
        p.subject_alt_names = vec![SanType::URI(
            id.clone()
                .try_into()
                .with_context(|| format!("{id:?} is not a valid URI SAN"))?,
        )];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        let now = std::time::SystemTime::now();
        p.not_before = (now - Duration::from_secs(300)).into();
        p.not_after = (now + Duration::from_secs(3600)).into();
        let cert = p.signed_by(&key, &self.issuer)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let ck = moat_core::svid::certified_key(vec![cert.der().clone()], der, &tls::provider())?;
        let current = Arc::new(CurrentCert::default());
        current.set(ck);
        Ok(current)
    }
}
