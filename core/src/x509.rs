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
    // Not `is_ca()`: it reads a duplicated or garbled basicConstraints as "not a CA", so a
    // second extension saying CA:true would slip through here.
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => return Err(SvidError::LeafIsCa),
        Ok(_) => {}
        Err(e) => return Err(SvidError::Malformed(format!("basicConstraints: {e}"))),
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

/// When a chain's leaf certificate expires (now, if it cannot be read: never reuse).
pub fn leaf_expiry(certs: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> SystemTime {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| inspect(leaf).ok())
        .map(|i| i.not_after)
        .unwrap_or_else(SystemTime::now)
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

#[cfg(test)]
mod tests {
    //! The SVID leaf rules and field reading against certificates a CA or an attacker could
    //! produce, made with rcgen.

    use super::*;
    use crate::spiffe::SpiffeIdError;
    use crate::testcerts::{ca, ca_params, leaf_params, sign};
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, KeyUsagePurpose,
        SanType, SerialNumber,
    };
    use rustls_pki_types::CertificateDer;
    use time::macros::datetime;
    use time::OffsetDateTime;

    const ME: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn leaf(uris: &[&str]) -> CertificateDer<'static> {
        sign(leaf_params(uris), &ca("moat root"))
    }

    fn with(f: impl FnOnce(&mut CertificateParams)) -> CertificateDer<'static> {
        let mut p = leaf_params(&[ME]);
        f(&mut p);
        sign(p, &ca("moat root"))
    }

    fn at(t: OffsetDateTime) -> SystemTime {
        let secs = t.unix_timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
        }
    }

    fn bad_id(e: SpiffeIdError) -> Result<SpiffeId, SvidError> {
        Err(SvidError::BadSpiffeId(e))
    }

    #[test]
    fn a_well_formed_leaf_names_its_spiffe_id() {
        let der = leaf(&[ME]);
        assert_eq!(svid_identity(&der), Ok(SpiffeId::parse(ME).unwrap()));
        let info = inspect(&der).unwrap();
        assert_eq!(info.spiffe_id, Some(SpiffeId::parse(ME).unwrap()));
        assert!(!info.is_ca);
        // basicConstraints present and saying CA:false is as good as absent.
        let explicit = with(|p| p.is_ca = IsCa::ExplicitNoCa);
        assert_eq!(svid_identity(&explicit), Ok(SpiffeId::parse(ME).unwrap()));
    }

    #[test]
    fn dns_names_beside_the_uri_san_do_not_count_as_identities() {
        let der = with(|p| {
            p.subject_alt_names
                .push(SanType::DnsName("web.shop.svc".try_into().unwrap()))
        });
        assert_eq!(svid_identity(&der), Ok(SpiffeId::parse(ME).unwrap()));
    }

    #[test]
    fn a_leaf_without_a_uri_san_has_no_identity() {
        let der = with(|p| {
            p.subject_alt_names = vec![SanType::DnsName("web.shop.svc".try_into().unwrap())]
        });
        assert_eq!(svid_identity(&der), Err(SvidError::NoUriSan));
        assert_eq!(inspect(&der).unwrap().spiffe_id, None);
        assert_eq!(svid_identity(&leaf(&[])), Err(SvidError::NoUriSan));
    }

    #[test]
    fn two_uri_sans_are_refused_even_when_the_first_is_the_right_one() {
        let other = "spiffe://cluster.local/ns/kube-system/sa/admin";
        for uris in [[ME, other], [other, ME], [ME, ME]] {
            let der = leaf(&uris);
            assert_eq!(
                svid_identity(&der),
                Err(SvidError::MultipleUriSans(2)),
                "{uris:?}"
            );
            // Reading fields must not pick one of them either.
            assert_eq!(inspect(&der).unwrap().spiffe_id, None, "{uris:?}");
        }
        let three = leaf(&[ME, other, "https://example.com/"]);
        assert_eq!(svid_identity(&three), Err(SvidError::MultipleUriSans(3)));
    }

    #[test]
    fn a_uri_san_that_is_not_a_spiffe_id_is_refused() {
        for (uri, why) in [
            (
                "https://cluster.local/ns/shop/sa/web",
                SpiffeIdError::WrongScheme,
            ),
            (
                "SPIFFE://cluster.local/ns/shop/sa/web",
                SpiffeIdError::WrongScheme,
            ),
            (
                "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
                SpiffeIdError::WrongScheme,
            ),
            // The trust domain's own ID, as CAs carry: not a workload.
            (
                "spiffe://cluster.local",
                SpiffeIdError::BadSegment(String::new()),
            ),
            ("spiffe:///ns/shop/sa/web", SpiffeIdError::EmptyTrustDomain),
        ] {
            let der = leaf(&[uri]);
            assert_eq!(svid_identity(&der), bad_id(why), "{uri:?}");
            assert_eq!(inspect(&der).unwrap().spiffe_id, None, "{uri:?}");
        }
    }

    #[test]
    fn nul_bytes_and_percent_encoding_do_not_alias_another_identity() {
        for (uri, why) in [
            // A NUL that a C-string comparison would stop at, in the path and the trust domain.
            (
                "spiffe://cluster.local/ns/shop/sa/web\0.evil",
                SpiffeIdError::BadSegmentChar("web\0.evil".into()),
            ),
            (
                "spiffe://cluster.local\0.evil/ns/shop/sa/web",
                SpiffeIdError::BadTrustDomainChar("cluster.local\0.evil".into()),
            ),
            // Percent-encoding that a decoding comparison would read as the plain identity.
            (
                "spiffe://cluster.local/ns/shop/sa/w%65b",
                SpiffeIdError::BadSegmentChar("w%65b".into()),
            ),
            (
                "spiffe://cluster%2elocal/ns/shop/sa/web",
                SpiffeIdError::BadTrustDomainChar("cluster%2elocal".into()),
            ),
            (
                "spiffe://cluster.local/ns/shop/sa%2fweb",
                SpiffeIdError::BadSegmentChar("sa%2fweb".into()),
            ),
            (
                "spiffe://cluster.local/ns/shop/sa/%2e%2e",
                SpiffeIdError::BadSegmentChar("%2e%2e".into()),
            ),
        ] {
            assert_eq!(svid_identity(&leaf(&[uri])), bad_id(why), "{uri:?}");
        }
    }

    #[test]
    fn a_uri_san_with_bytes_outside_ia5_is_not_read_as_an_identity() {
        let der = leaf(&[ME]);
        let start = der
            .windows(ME.len())
            .position(|w| w == ME.as_bytes())
            .expect("the URI is stored verbatim");
        let end = start + ME.len();
        // Each patch keeps the length, so every DER length stays right and only the string
        // turns odd. The signature breaks too, which is webpki's concern, not this module's.
        let patched = |patch: &[u8]| {
            let mut odd = der.to_vec();
            odd[end - patch.len()..end].copy_from_slice(patch);
            odd
        };
        // Not UTF-8: the SAN extension does not parse, so there is no URI to trust.
        let not_utf8 = patched(&[0xff]);
        assert_eq!(svid_identity(&not_utf8), Err(SvidError::NoUriSan));
        assert_eq!(inspect(&not_utf8).unwrap().spiffe_id, None);
        // UTF-8 but not ASCII: read as a string, then refused by the SPIFFE ID rules.
        let not_ascii = patched("é".as_bytes());
        assert_eq!(
            svid_identity(&not_ascii),
            bad_id(SpiffeIdError::BadSegmentChar("wé".into()))
        );
        assert_eq!(inspect(&not_ascii).unwrap().spiffe_id, None);
    }

    #[test]
    fn a_ca_certificate_is_not_a_workload_even_with_a_spiffe_id() {
        let mut p = ca_params("moat root", BasicConstraints::Unconstrained);
        p.subject_alt_names = vec![SanType::URI(ME.try_into().unwrap())];
        let root = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        assert_eq!(svid_identity(root.der()), Err(SvidError::LeafIsCa));
        let info = inspect(root.der()).unwrap();
        assert!(info.is_ca);
        // inspect reads fields without judging them: the CA's URI is still reported.
        assert_eq!(info.spiffe_id, Some(SpiffeId::parse(ME).unwrap()));

        // A leaf that claims CA:true but not the signing key usages is still a CA.
        let ca_flag = with(|p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)));
        assert_eq!(svid_identity(&ca_flag), Err(SvidError::LeafIsCa));
        assert!(inspect(&ca_flag).unwrap().is_ca);

        // An ordinary root has no URI SAN, and that is reported first.
        let plain = ca("moat root");
        assert_eq!(svid_identity(plain.der()), Err(SvidError::NoUriSan));
        assert!(inspect(plain.der()).unwrap().is_ca);
    }

    #[test]
    fn a_second_basic_constraints_saying_ca_is_not_hidden_by_the_first() {
        // CA:false from rcgen, then a second basicConstraints with CA:true: RFC 5280 forbids
        // duplicates, and a reader that keeps the first one would take this CA for a leaf.
        let der = with(|p| {
            p.is_ca = IsCa::ExplicitNoCa;
            p.custom_extensions
                .push(rcgen::CustomExtension::from_oid_content(
                    &[2, 5, 29, 19],
                    vec![0x30, 0x03, 0x01, 0x01, 0xff],
                ));
        });
        assert!(
            matches!(svid_identity(&der), Err(SvidError::Malformed(ref m)) if m.contains("basicConstraints")),
            "{:?}",
            svid_identity(&der)
        );
    }

    #[test]
    fn a_leaf_that_may_sign_certificates_or_crls_is_a_ca() {
        for extra in [KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign] {
            let der = with(|p| p.key_usages.push(extra));
            assert_eq!(svid_identity(&der), Err(SvidError::LeafIsCa), "{extra:?}");
        }
    }

    #[test]
    fn a_leaf_must_carry_the_digital_signature_key_usage() {
        let without = with(|p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]);
        assert_eq!(svid_identity(&without), Err(SvidError::NoDigitalSignature));
        // No keyUsage extension at all is not a licence for every usage.
        let absent = with(|p| p.key_usages.clear());
        assert_eq!(svid_identity(&absent), Err(SvidError::NoDigitalSignature));
    }

    #[test]
    fn garbage_and_truncated_der_are_malformed_not_panics() {
        let good = leaf(&[ME]);
        let pem = leaf_params(&[ME])
            .signed_by(&KeyPair::generate().unwrap(), &ca("moat root"))
            .unwrap()
            .pem();
        let mut trailing = good.to_vec();
        trailing.push(0);
        let inputs: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("text", b"not a certificate".to_vec()),
            ("pem instead of der", pem.into_bytes()),
            ("sequence of an integer", vec![0x30, 0x03, 0x02, 0x01, 0x00]),
            ("truncated", good[..good.len() / 2].to_vec()),
            ("missing last byte", good[..good.len() - 1].to_vec()),
        ];
        for (what, der) in &inputs {
            assert!(
                matches!(svid_identity(der), Err(SvidError::Malformed(_))),
                "{what}: {:?}",
                svid_identity(der)
            );
            assert!(
                matches!(inspect(der), Err(SvidError::Malformed(_))),
                "{what}"
            );
        }
        // A valid certificate followed by anything is not that certificate.
        let want = SvidError::Malformed("trailing bytes after certificate".into());
        assert_eq!(svid_identity(&trailing).unwrap_err(), want);
        assert_eq!(inspect(&trailing).unwrap_err(), want);
    }

    #[test]
    fn inspect_reads_serial_and_validity_to_the_second() {
        let der = with(|p| {
            p.serial_number = Some(SerialNumber::from_slice(&[0x12, 0x34, 0xab]));
            p.not_before = datetime!(2024-01-02 03:04:05 UTC);
            p.not_after = datetime!(2024-01-03 03:04:05 UTC);
        });
        let info = inspect(&der).unwrap();
        assert_eq!(info.serial_hex, "1234ab");
        assert_eq!(info.not_before, at(datetime!(2024-01-02 03:04:05 UTC)));
        assert_eq!(info.not_after, at(datetime!(2024-01-03 03:04:05 UTC)));
        assert_eq!(info.lifetime(), Duration::from_secs(24 * 3600));
    }

    #[test]
    fn validity_before_1970_and_after_2049_reads_correctly() {
        // 1960 is a UTCTime before the Unix epoch; 2100 needs GeneralizedTime.
        let der = with(|p| {
            p.not_before = datetime!(1960-06-01 00:00:00 UTC);
            p.not_after = datetime!(2100-01-01 00:00:00 UTC);
        });
        let info = inspect(&der).unwrap();
        assert!(info.not_before < UNIX_EPOCH);
        assert_eq!(info.not_before, at(datetime!(1960-06-01 00:00:00 UTC)));
        assert_eq!(info.not_after, at(datetime!(2100-01-01 00:00:00 UTC)));
    }

    #[test]
    fn remaining_counts_down_to_zero_and_never_below() {
        let der = with(|p| {
            p.not_before = datetime!(2024-01-01 00:00:00 UTC);
            p.not_after = datetime!(2024-01-01 01:00:00 UTC);
        });
        let info = inspect(&der).unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(info.remaining(info.not_before), hour);
        assert_eq!(info.remaining(info.not_before + hour / 4), hour * 3 / 4);
        assert_eq!(info.remaining(info.not_after), Duration::ZERO);
        assert_eq!(info.remaining(info.not_after + hour), Duration::ZERO);
        // Before validity starts the whole lifetime and more is left; not a reason to trust it.
        assert_eq!(info.remaining(info.not_before - hour), hour * 2);
    }

    #[test]
    fn an_inverted_validity_period_has_no_lifetime() {
        let der = with(|p| {
            p.not_before = datetime!(2024-01-02 00:00:00 UTC);
            p.not_after = datetime!(2024-01-01 00:00:00 UTC);
        });
        let info = inspect(&der).unwrap();
        assert_eq!(info.lifetime(), Duration::ZERO);
        assert_eq!(info.remaining(info.not_before), Duration::ZERO);
    }

    #[test]
    fn svid_rules_leave_validity_to_webpki() {
        // Callers must verify the chain first: an expired or future leaf still names its
        // identity here, and only the validity fields say it is unusable.
        let now = SystemTime::now();
        let expired = with(|p| {
            p.not_before = OffsetDateTime::now_utc() - time::Duration::hours(2);
            p.not_after = OffsetDateTime::now_utc() - time::Duration::hours(1);
        });
        assert_eq!(svid_identity(&expired), Ok(SpiffeId::parse(ME).unwrap()));
        assert_eq!(inspect(&expired).unwrap().remaining(now), Duration::ZERO);
        let future = with(|p| {
            p.not_before = OffsetDateTime::now_utc() + time::Duration::hours(1);
            p.not_after = OffsetDateTime::now_utc() + time::Duration::hours(2);
        });
        assert_eq!(svid_identity(&future), Ok(SpiffeId::parse(ME).unwrap()));
        assert!(inspect(&future).unwrap().not_before > now);
    }

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }

    #[test]
    fn an_unreadable_chain_expires_now_so_it_is_never_reused() {
        let garbage = [rustls_pki_types::CertificateDer::from(vec![
            0x30, 0x03, 0x02, 0x01, 0x00,
        ])];
        for chain in [None, Some(&[][..]), Some(&garbage[..])] {
            let before = SystemTime::now();
            let got = leaf_expiry(chain);
            assert!(before <= got && got <= SystemTime::now(), "{chain:?}");
        }
    }
}
