//! Moat's TLS posture and its SPIFFE-aware certificate verification.
//!
//! * TLS 1.3 only, AEAD suites only, X25519MLKEM768 (post-quantum hybrid) preferred, X25519 as
//!   fallback, aws-lc-rs underneath.
//! * Peers are verified by [`SpiffeVerifier`]: webpki checks the chain against the trust bundle
//!   (webpki has no URI-SAN API), then Moat checks the SPIFFE X509-SVID rules, the trust domain
//!   and, when known, the exact expected identity. The checks run inside the handshake, so a
//!   wrong peer never completes one.
//! * Session resumption is off: sidecars pool connections instead, and a resumed session would
//!   skip the identity check on the peer's current certificate.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::bundle::TrustBundle;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::x509::{self, SvidError};

/// ALPN protocol that marks a connection between two Moat sidecars.
pub const MOAT_ALPN: &[u8] = b"moat/1";

/// The crypto provider every Moat TLS endpoint uses.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{self, kx_group};
    let mut p = aws_lc_rs::default_provider();
    p.cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    p.kx_groups = vec![kx_group::X25519MLKEM768, kx_group::X25519];
    Arc::new(p)
}

/// Why a peer certificate was refused. Carried inside rustls errors so callers can label
/// metrics by reason (see [`failure_reason`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerRejection {
    /// The chain does not lead to a root in the trust bundle (another CA, or a forgery).
    #[error("certificate is not issued by a trusted root: {0}")]
    UntrustedIssuer(String),
    /// The certificate (or its chain) is expired or not yet valid.
    #[error("certificate is expired or not yet valid: {0}")]
    Expired(String),
    /// The leaf breaks the SPIFFE X509-SVID rules.
    #[error("certificate is not a valid X509-SVID: {0}")]
    NotSvid(SvidError),
    /// The SPIFFE ID belongs to another trust domain.
    #[error("peer identity {peer} is outside trust domain {expected}")]
    WrongTrustDomain {
        /// The peer's SPIFFE ID.
        peer: String,
        /// The trust domain required.
        expected: String,
    },
    /// The SPIFFE ID is valid but not the one this destination must have.
    #[error("peer identity {peer} is not the expected {expected}")]
    WrongIdentity {
        /// The peer's SPIFFE ID.
        peer: String,
        /// The identity required.
        expected: String,
    },
    /// Any other chain validation failure (bad encoding, unsupported algorithm...).
    #[error("certificate rejected: {0}")]
    Invalid(String),
}

impl PeerRejection {
    /// Short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::UntrustedIssuer(_) => "untrusted_issuer",
            Self::Expired(_) => "expired",
            Self::NotSvid(_) => "not_svid",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::WrongIdentity { .. } => "wrong_identity",
            Self::Invalid(_) => "invalid_certificate",
        }
    }
}

impl From<PeerRejection> for rustls::Error {
    fn from(r: PeerRejection) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(r))))
    }
}

/// Maps a TLS handshake error to a short, bounded metric label.
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            std::io::ErrorKind::InvalidData => "not_tls",
            _ => "io",
        };
    };
    rustls_reason(tls)
}

/// Maps a rustls error to a short, bounded metric label.
pub fn rustls_reason(tls: &rustls::Error) -> &'static str {
    use rustls::Error as E;
    match tls {
        E::InvalidCertificate(CertificateError::Other(OtherError(inner))) => inner
            .downcast_ref::<PeerRejection>()
            .map(PeerRejection::reason)
            .unwrap_or("invalid_certificate"),
        E::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        E::InvalidCertificate(_) => "invalid_certificate",
        E::NoCertificatesPresented => "no_client_certificate",
        E::AlertReceived(_) => "peer_alert",
        E::InvalidMessage(_) => "not_tls",
        E::NoApplicationProtocol => "wrong_alpn",
        E::PeerIncompatible(_) => "incompatible_peer",
        E::PeerMisbehaved(_) => "peer_misbehaved",
        _ => "tls_error",
    }
}

/// Extracts our [`PeerRejection`] from a handshake error, if that is what failed.
pub fn peer_rejection(err: &std::io::Error) -> Option<&PeerRejection> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<PeerRejection>()
        }
        _ => None,
    }
}

/// Verifies peer SVIDs: chain to the (hot-swappable) bundle, SVID rules, trust domain and,
/// optionally, one exact identity.
pub struct SpiffeVerifier {
    bundle: Arc<ArcSwap<TrustBundle>>,
    trust_domain: TrustDomain,
    expected: Option<SpiffeId>,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier")
            .field("trust_domain", &self.trust_domain)
            .field("expected", &self.expected)
            .finish()
    }
}

impl SpiffeVerifier {
    /// A verifier that accepts any SVID of `trust_domain` chaining to `bundle`.
    pub fn new(
        bundle: Arc<ArcSwap<TrustBundle>>,
        trust_domain: TrustDomain,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            bundle,
            trust_domain,
            expected: None,
            provider,
        }
    }

    /// Restricts the verifier to exactly one peer identity.
    pub fn expecting(mut self, id: Option<SpiffeId>) -> Self {
        self.expected = id;
        self
    }

    /// Full verification of a presented chain; returns the peer's SPIFFE ID.
    pub fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, PeerRejection> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| PeerRejection::Invalid(e.to_string()))?;
        let bundle = self.bundle.load();
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            bundle.anchors(),
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(classify_webpki)?;
        let id = x509::svid_identity(end_entity).map_err(PeerRejection::NotSvid)?;
        if !id.is_member_of(&self.trust_domain) {
            return Err(PeerRejection::WrongTrustDomain {
                peer: id.to_string(),
                expected: self.trust_domain.to_string(),
            });
        }
        if let Some(expected) = &self.expected {
            if *expected != id {
                return Err(PeerRejection::WrongIdentity {
                    peer: id.to_string(),
                    expected: expected.to_string(),
                });
            }
        }
        Ok(id)
    }
}

fn classify_webpki(e: webpki::Error) -> PeerRejection {
    use webpki::Error as W;
    match e {
        W::CertExpired { .. } | W::CertNotValidYet { .. } => PeerRejection::Expired(e.to_string()),
        W::UnknownIssuer | W::InvalidSignatureForPublicKey | W::IssuerNotCrlSigner => {
            PeerRejection::UntrustedIssuer(e.to_string())
        }
        other => PeerRejection::Invalid(other.to_string()),
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls12_signature(self, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}

/// The workload's current certificate, swapped in place on rotation: new handshakes pick up
/// the new certificate, established connections keep theirs.
#[derive(Debug, Default)]
pub struct CurrentCert(arc_swap::ArcSwapOption<CertifiedKey>);

impl CurrentCert {
    /// Publishes a new certificate.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        self.0.store(Some(key));
    }

    /// The certificate in use, if one has been obtained.
    pub fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
}

impl rustls::client::ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        self.0.load().is_some()
    }
}

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// Client configuration for a sidecar-to-sidecar connection expecting `expected` (or any
/// identity of the trust domain when `None`).
pub fn mesh_client_config(
    cert: Arc<CurrentCert>,
    verifier: SpiffeVerifier,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(cert);
    cfg.alpn_protocols = vec![MOAT_ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_sni = false;
    Ok(cfg)
}

/// Server configuration for the inbound side: a client certificate is mandatory.
pub fn mesh_server_config(
    cert: Arc<CurrentCert>,
    verifier: SpiffeVerifier,
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![MOAT_ALPN.to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// The verified SPIFFE ID of the peer of an established connection.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    x509::svid_identity(leaf).ok()
}

#[cfg(test)]
mod tests {
    //! The verifier against chains an attacker could present, made with rcgen.

    use super::*;
    use crate::testcerts::{ca, intermediate, leaf_params, sign, Ca};
    use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
    use time::{Duration, OffsetDateTime};

    const ME: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn verifier(roots: &[&Ca]) -> (SpiffeVerifier, Arc<ArcSwap<TrustBundle>>) {
        let bundle =
            TrustBundle::from_certs(roots.iter().map(|c| c.der().clone()).collect()).unwrap();
        let bundle = Arc::new(ArcSwap::from_pointee(bundle));
        let td = TrustDomain::new("cluster.local").unwrap();
        (SpiffeVerifier::new(bundle.clone(), td, provider()), bundle)
    }

    fn check(v: &SpiffeVerifier, leaf: &CertificateDer<'_>) -> Result<SpiffeId, PeerRejection> {
        v.verify(leaf, &[], UnixTime::now(), webpki::KeyUsage::client_auth())
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    #[test]
    fn accepts_an_svid_of_the_trust_domain() {
        let root = ca("moat root");
        let (v, _) = verifier(&[&root]);
        assert_eq!(check(&v, &sign(leaf_params(&[ME]), &root)).unwrap(), id(ME));
        let v = v.expecting(Some(id(ME)));
        assert_eq!(check(&v, &sign(leaf_params(&[ME]), &root)).unwrap(), id(ME));
    }

    #[test]
    fn a_valid_certificate_of_another_identity_is_refused_when_one_is_expected() {
        let root = ca("moat root");
        let (v, _) = verifier(&[&root]);
        let v = v.expecting(Some(id("spiffe://cluster.local/ns/shop/sa/api")));
        let err = check(&v, &sign(leaf_params(&[ME]), &root)).unwrap_err();
        assert_eq!(err.reason(), "wrong_identity", "{err}");
    }

    #[test]
    fn another_trust_domain_is_refused_even_from_a_trusted_root() {
        let root = ca("moat root");
        let (v, _) = verifier(&[&root]);
        let leaf = sign(
            leaf_params(&["spiffe://evil.example/ns/shop/sa/web"]),
            &root,
        );
        assert_eq!(check(&v, &leaf).unwrap_err().reason(), "wrong_trust_domain");
    }

    #[test]
    fn an_untrusted_issuer_is_refused_and_a_swapped_bundle_applies_at_once() {
        let (root, other) = (ca("moat root"), ca("moat root"));
        let (v, bundle) = verifier(&[&root]);
        let forged = sign(leaf_params(&[ME]), &other);
        assert_eq!(check(&v, &forged).unwrap_err().reason(), "untrusted_issuer");
        let good = sign(leaf_params(&[ME]), &root);
        assert!(check(&v, &good).is_ok());
        // Rotating the trust bundle to the other root: the old root's leaves stop verifying.
        bundle.store(Arc::new(
            TrustBundle::from_certs(vec![other.der().clone()]).unwrap(),
        ));
        assert_eq!(check(&v, &good).unwrap_err().reason(), "untrusted_issuer");
        assert!(check(&v, &forged).is_ok());
    }

    #[test]
    fn a_chain_through_an_intermediate_needs_the_intermediate() {
        let root = ca("moat root");
        let mid = intermediate(&root);
        let (v, _) = verifier(&[&root]);
        let leaf = sign(leaf_params(&[ME]), &mid);
        let chain = [mid.der().clone()];
        let ok = v.verify(
            &leaf,
            &chain,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        );
        assert_eq!(ok.unwrap(), id(ME));
        assert_eq!(check(&v, &leaf).unwrap_err().reason(), "untrusted_issuer");
    }

    #[test]
    fn expired_and_not_yet_valid_leaves_are_refused() {
        let root = ca("moat root");
        let (v, _) = verifier(&[&root]);
        let now = OffsetDateTime::now_utc();
        let mut old = leaf_params(&[ME]);
        old.not_before = now - Duration::hours(2);
        old.not_after = now - Duration::hours(1);
        assert_eq!(
            check(&v, &sign(old, &root)).unwrap_err().reason(),
            "expired"
        );
        let mut future = leaf_params(&[ME]);
        future.not_before = now + Duration::hours(1);
        future.not_after = now + Duration::hours(2);
        assert_eq!(
            check(&v, &sign(future, &root)).unwrap_err().reason(),
            "expired"
        );
    }

    #[test]
    fn a_ca_certificate_is_not_a_workload() {
        let root = ca("moat root");
        let (v, _) = verifier(&[&root]);
        // A CA certificate with a SPIFFE ID, issued by the trusted root.
        let mut p = leaf_params(&[ME]);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        assert!(check(&v, &sign(p, &root)).is_err());
        // Not marked CA, but allowed to sign certificates: still not an SVID.
        let mut p = leaf_params(&[ME]);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        let err = check(&v, &sign(p, &root)).unwrap_err();
        assert_eq!(err, PeerRejection::NotSvid(SvidError::LeafIsCa));
    }

    #[test]
    fn a_leaf_must_allow_digital_signatures() {
        let root = ca("moat root");
        let (v, _) = verifier(&[&root]);
        let mut p = leaf_params(&[ME]);
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        let err = check(&v, &sign(p, &root)).unwrap_err();
        assert_eq!(err, PeerRejection::NotSvid(SvidError::NoDigitalSignature));
    }

    #[test]
    fn the_extended_key_usage_is_enforced() {
        let root = ca("moat root");
        let (v, _) = verifier(&[&root]);
        let mut p = leaf_params(&[ME]);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_only = sign(p, &root);
        assert_eq!(
            check(&v, &server_only).unwrap_err().reason(),
            "invalid_certificate",
            "a server-only certificate used as a client certificate"
        );
        let as_server = v.verify(
            &server_only,
            &[],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
        );
        assert!(as_server.is_ok());
    }

    #[test]
    fn exactly_one_uri_san() {
        let root = ca("moat root");
        let (v, _) = verifier(&[&root]);
        let two = sign(
            leaf_params(&[ME, "spiffe://cluster.local/ns/kube-system/sa/admin"]),
            &root,
        );
        assert_eq!(
            check(&v, &two).unwrap_err(),
            PeerRejection::NotSvid(SvidError::MultipleUriSans(2))
        );
        let mut dns_only = leaf_params(&[]);
        dns_only.subject_alt_names = vec![SanType::DnsName("web.shop".try_into().unwrap())];
        assert_eq!(
            check(&v, &sign(dns_only, &root)).unwrap_err(),
            PeerRejection::NotSvid(SvidError::NoUriSan)
        );
    }

    #[test]
    fn odd_encodings_of_the_spiffe_id_are_refused() {
        let root = ca("moat root");
        let (v, _) = verifier(&[&root]);
        for uri in [
            // A NUL that a C-string comparison would stop at.
            "spiffe://cluster.local/ns/shop/sa/web\0.evil",
            "spiffe://cluster.local\0.evil/ns/shop/sa/web",
            // Percent-encoding, case and dot segments that could alias another identity.
            "spiffe://cluster.local/ns/shop/sa/w%65b",
            "spiffe://Cluster.Local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/../sa/admin",
            "SPIFFE://cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/web/",
            "spiffe://user@cluster.local/ns/shop/sa/web",
            "spiffe://cluster.local:443/ns/shop/sa/web",
            "spiffe://cluster.local/ns/shop/sa/web?x=1",
            "spiffe://cluster.local/ns/shop/sa/web#x",
        ] {
            let err = check(&v, &sign(leaf_params(&[uri]), &root))
                .expect_err(&format!("accepted {uri:?}"));
            assert_eq!(err.reason(), "not_svid", "{uri:?}: {err}");
        }
    }

    #[test]
    fn rustls_sees_the_reason_as_a_metric_label() {
        let root = ca("moat root");
        let (v, _) = verifier(&[&root]);
        let v = v.expecting(Some(id("spiffe://cluster.local/ns/shop/sa/api")));
        let leaf = sign(leaf_params(&[ME]), &root);
        let name = ServerName::try_from("peer.moat").unwrap();
        let err = v
            .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert_eq!(rustls_reason(&err), "wrong_identity");
        let err = v
            .verify_client_cert(&sign(leaf_params(&[]), &root), &[], UnixTime::now())
            .unwrap_err();
        assert_eq!(rustls_reason(&err), "not_svid");
    }
}
