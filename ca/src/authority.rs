//! The signing authority: creating a root, creating an intermediate, loading whichever signs,
//! and issuing leaves and the CA's own serving certificate.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use moat_core::bundle::TrustBundle;
use moat_core::pem;
use moat_core::spiffe::{SpiffeId, TrustDomain};
use moat_core::x509;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::CertificateDer;

/// Leaves are back-dated this much so peers with a slightly slow clock accept them.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// Validity of a root created by `moat-ca init`.
pub const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// File names of the root layout written by `moat-ca init`.
pub const ROOT_CERT: &str = "ca.crt";
/// Private key of the root layout (mode 0600).
pub const ROOT_KEY: &str = "ca.key";
/// Trust bundle of the root layout.
pub const ROOT_BUNDLE: &str = "bundle.pem";
/// Signing certificate (plus chain) as a Kubernetes TLS Secret mounts it.
pub const SECRET_CERT: &str = "tls.crt";
/// Signing key as a Kubernetes TLS Secret mounts it.
pub const SECRET_KEY: &str = "tls.key";
/// Root bundle as a Kubernetes Secret mounts it.
pub const SECRET_BUNDLE: &str = "ca.crt";

/// Why the authority could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `init` would overwrite an existing key.
    #[error("{0} already exists; refusing to overwrite a CA key (move it away first)")]
    KeyExists(PathBuf),
    /// The directory holds neither layout.
    #[error("{0} holds neither ca.crt+ca.key+bundle.pem (root) nor tls.crt+tls.key+ca.crt (Kubernetes Secret)")]
    NoLayout(PathBuf),
    /// A certificate, key or bundle is unusable.
    #[error("{0}")]
    Invalid(String),
    /// rcgen failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    aws_lc_rs_fill(&mut b);
    SerialNumber::from_slice(&b)
}

/// Fills `buf` from the OS-seeded CSPRNG behind rustls' provider.
fn aws_lc_rs_fill(buf: &mut [u8]) {
    // The provider's RNG only fails if the OS entropy source is broken; a zero serial would
    // then be caught by uniqueness checks downstream, but we prefer to fall back loudly.
    if rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(buf)
        .is_err()
    {
        tracing::error!("system random generator failed; using fastrand for serial");
        for b in buf.iter_mut() {
            *b = fastrand::u8(..);
        }
    }
}

fn ca_params(
    td: &TrustDomain,
    cn: &str,
    validity: Duration,
) -> Result<CertificateParams, AuthorityError> {
    let now = SystemTime::now();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Moat");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // The CA carries the trust domain's own SPIFFE ID (no path), as the SVID spec suggests.
    // Deliberately no URI name constraints: rustls-webpki rejects every chain carrying them
    // (RUSTSEC-2026-0098); Moat's verifier enforces the trust domain instead.
    p.subject_alt_names = vec![SanType::URI(td.id().try_into()?)];
    p.not_before = (now - BACKDATE).into();
    p.not_after = (now + validity).into();
    p.serial_number = Some(random_serial());
    Ok(p)
}

/// Writes `contents` to a new file with `mode`, failing if it exists.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), AuthorityError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => AuthorityError::KeyExists(path.to_path_buf()),
            _ => AuthorityError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
    f.write_all(contents).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Writes several files, or none: on any failure the files already written are removed.
fn write_all_or_nothing(files: &[(PathBuf, &[u8], u32)]) -> Result<(), AuthorityError> {
    for (path, _, _) in files {
        if path.exists() {
            return Err(AuthorityError::KeyExists(path.clone()));
        }
    }
    let mut written = Vec::new();
    for (path, contents, mode) in files {
        if let Err(e) = write_new(path, contents, *mode) {
            for p in &written {
                let _ = std::fs::remove_file(p);
            }
            return Err(e);
        }
        written.push(path.clone());
    }
    Ok(())
}

/// `moat-ca init`: creates a long-lived ECDSA P-256 root in `dir`.
pub fn init_root(td: &TrustDomain, dir: &Path, validity: Duration) -> Result<(), AuthorityError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = ca_params(td, &format!("Moat root CA for {td}"), validity)?.self_signed(&key)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let cert_pem = cert.pem();
    write_all_or_nothing(&[
        (dir.join(ROOT_KEY), key.serialize_pem().as_bytes(), 0o600),
        (dir.join(ROOT_CERT), cert_pem.as_bytes(), 0o644),
        (dir.join(ROOT_BUNDLE), cert_pem.as_bytes(), 0o644),
    ])
}

/// `moat-ca intermediate`: issues an intermediate from the root in `root_dir` and writes it
/// as a Kubernetes TLS Secret would mount it (`tls.crt`, `tls.key`, `ca.crt`) in `out`.
pub fn init_intermediate(
    root_dir: &Path,
    out: &Path,
    validity: Duration,
) -> Result<(), AuthorityError> {
    let root = Authority::load_dir(root_dir, None)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(
        &root.trust_domain,
        &format!("Moat intermediate CA for {}", root.trust_domain),
        validity,
    )?;
    // pathLen 0: the intermediate signs leaves only. Were its key stolen, it could not mint
    // a further CA that verifiers would accept.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.use_authority_key_identifier_extension = true;
    let not_after = SystemTime::now() + validity;
    if not_after > root.not_after {
        return Err(AuthorityError::Invalid(format!(
            "intermediate validity {} outlives the root (expires {})",
            moat_core::duration::format(validity),
            moat_core::svid::rfc3339(root.not_after)
        )));
    }
    let cert = params.signed_by(&key, &root.issuer)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let bundle = root.bundle.to_pem();
    write_all_or_nothing(&[
        (out.join(SECRET_KEY), key.serialize_pem().as_bytes(), 0o600),
        (out.join(SECRET_CERT), cert.pem().as_bytes(), 0o644),
        (out.join(SECRET_BUNDLE), bundle.as_bytes(), 0o644),
    ])
}

/// A public key taken from a CSR, in the form rcgen signs.
#[derive(Debug, Clone)]
pub struct SubjectKey {
    /// Raw subjectPublicKey bits.
    pub raw: Vec<u8>,
    /// The key's algorithm (P-256 or Ed25519).
    pub alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for SubjectKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM chain: leaf, then intermediates.
    pub chain_pem: String,
    /// Serial, hex.
    pub serial_hex: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// The loaded signing authority.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates between the leaf and the root: the signing cert when it is not a root,
    /// and any further intermediates from its file.
    intermediates: Vec<CertificateDer<'static>>,
    bundle: TrustBundle,
    trust_domain: TrustDomain,
    not_after: SystemTime,
}

impl Authority {
    /// Loads from a directory holding the root layout or the Kubernetes Secret layout.
    pub fn load_dir(dir: &Path, td: Option<&TrustDomain>) -> Result<Self, AuthorityError> {
        let (cert, key, bundle) = if dir.join(ROOT_KEY).exists() {
            (
                dir.join(ROOT_CERT),
                dir.join(ROOT_KEY),
                dir.join(ROOT_BUNDLE),
            )
        } else if dir.join(SECRET_KEY).exists() {
            (
                dir.join(SECRET_CERT),
                dir.join(SECRET_KEY),
                dir.join(SECRET_BUNDLE),
            )
        } else {
            return Err(AuthorityError::NoLayout(dir.to_path_buf()));
        };
        Self::load_files(&cert, &key, &bundle, td)
    }

    /// Loads from explicit signing certificate, key and bundle files.
    pub fn load_files(
        cert: &Path,
        key: &Path,
        bundle: &Path,
        td: Option<&TrustDomain>,
    ) -> Result<Self, AuthorityError> {
        let cert_pem = std::fs::read(cert).map_err(io(cert))?;
        let key_pem = std::fs::read_to_string(key).map_err(io(key))?;
        let bundle_pem = std::fs::read(bundle).map_err(io(bundle))?;
        Self::from_pem(&cert_pem, &key_pem, &bundle_pem, td).map_err(|e| match e {
            AuthorityError::Invalid(m) => AuthorityError::Invalid(format!(
                "{m} (signing cert {}, key {}, bundle {})",
                cert.display(),
                key.display(),
                bundle.display()
            )),
            other => other,
        })
    }

    /// Loads from PEM contents and checks the whole set is coherent by issuing a test leaf
    /// and verifying it against the bundle.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &str,
        bundle_pem: &[u8],
        td: Option<&TrustDomain>,
    ) -> Result<Self, AuthorityError> {
        let invalid = |m: String| AuthorityError::Invalid(m);
        let bundle = TrustBundle::from_pem(bundle_pem).map_err(|e| invalid(e.to_string()))?;
        let certs =
            pem::parse_certs(cert_pem).map_err(|e| invalid(format!("signing certificate: {e}")))?;
        let signing = certs[0].clone();
        let info =
            x509::inspect(&signing).map_err(|e| invalid(format!("signing certificate: {e}")))?;
        if !info.is_ca {
            return Err(invalid(
                "signing certificate is not a CA (basicConstraints CA:true required)".into(),
            ));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| invalid(format!("signing key: {e}")))?;
        let trust_domain = match td {
            Some(td) => td.clone(),
            None => trust_domain_of(&signing)?,
        };
        let issuer = Issuer::from_ca_cert_der(&signing, key)
            .map_err(|e| invalid(format!("signing certificate: {e}")))?;
        let intermediates = certs.into_iter().filter(|c| !bundle.contains(c)).collect();
        let auth = Self {
            issuer,
            intermediates,
            bundle,
            trust_domain,
            not_after: info.not_after,
        };
        auth.self_test()?;
        Ok(auth)
    }

    /// Issues a throw-away leaf and verifies it against the bundle, proving the key matches
    /// the certificate and the chain leads to a root.
    fn self_test(&self) -> Result<(), AuthorityError> {
        use std::sync::Arc;
        let id = SpiffeId::parse(&format!("spiffe://{}/moat-ca/self-test", self.trust_domain))
            .map_err(|e| AuthorityError::Invalid(e.to_string()))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let subject = SubjectKey {
            raw: key.public_key_raw().to_vec(),
            alg: &rcgen::PKCS_ECDSA_P256_SHA256,
        };
        let issued = self.issue(&subject, &id, &[], Duration::from_secs(300))?;
        let chain = pem::parse_certs(issued.chain_pem.as_bytes())
            .map_err(|e| AuthorityError::Invalid(e.to_string()))?;
        let verifier = moat_core::tls::SpiffeVerifier::new(
            Arc::new(arc_swap::ArcSwap::from_pointee(self.bundle.clone())),
            self.trust_domain.clone(),
            moat_core::tls::provider(),
        );
        verifier
            .verify(
                &chain[0],
                &chain[1..],
                rustls_pki_types::UnixTime::now(),
                webpki::KeyUsage::client_auth(),
            )
            .map_err(|e| {
                AuthorityError::Invalid(format!(
                    "signing certificate, key and bundle do not form a valid chain: {e}"
                ))
            })?;
        Ok(())
    }

    /// The trust domain this authority issues for.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The root bundle.
    pub fn bundle(&self) -> &TrustBundle {
        &self.bundle
    }

    /// When the signing certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs a workload leaf for `id` over `key`, valid for `ttl` (capped at the signing
    /// certificate's own expiry) and back-dated by [`BACKDATE`].
    pub fn issue(
        &self,
        key: &SubjectKey,
        id: &SpiffeId,
        dns_names: &[String],
        ttl: Duration,
    ) -> Result<Issued, AuthorityError> {
        let now = SystemTime::now();
        // X.509 times have one-second resolution: round down here so that the expiry reported
        // to the client (`expires_at`) is exactly the certificate's notAfter, never later.
        let not_after = whole_seconds((now + ttl).min(self.not_after));
        let serial = random_serial();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        for name in dns_names {
            p.subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = (now - BACKDATE).into();
        p.not_after = not_after.into();
        p.serial_number = Some(serial);
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(key, &self.issuer)?;
        // The serial as encoded in the certificate (a DER INTEGER gains a leading 00 when its
        // top bit is set): the form moat-core reports, so audit lines match workload logs.
        let serial_hex = x509::inspect(cert.der())
            .map_err(|e| AuthorityError::Invalid(format!("issued certificate: {e}")))?
            .serial_hex;
        let mut chain_pem = pem::encode_certs([cert.der()]);
        chain_pem.push_str(&pem::encode_certs(&self.intermediates));
        Ok(Issued {
            chain_pem,
            serial_hex,
            not_after,
        })
    }

    /// Issues the CA's own TLS serving certificate (DNS and IP SANs, serverAuth).
    pub fn serving_cert(
        &self,
        sans: &[String],
        validity: Duration,
    ) -> Result<
        (
            Vec<CertificateDer<'static>>,
            rustls_pki_types::PrivateKeyDer<'static>,
        ),
        AuthorityError,
    > {
        let now = SystemTime::now();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(sans.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "moat-ca");
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = (now - BACKDATE).into();
        p.not_after = (now + validity).min(self.not_after).into();
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates.iter().cloned());
        let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok((chain, key_der))
    }
}

/// `t` with the sub-second part dropped.
fn whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => std::time::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

fn trust_domain_of(cert: &CertificateDer<'_>) -> Result<TrustDomain, AuthorityError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, c) = X509Certificate::from_der(cert)
        .map_err(|e| AuthorityError::Invalid(format!("signing certificate: {e}")))?;
    let san = c
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => u.strip_prefix("spiffe://").map(str::to_string),
                _ => None,
            })
        })
        .ok_or_else(|| {
            AuthorityError::Invalid(
                "signing certificate carries no spiffe://<trust-domain> URI SAN; pass --trust-domain"
                    .into(),
            )
        })?;
    TrustDomain::new(san.trim_end_matches('/'))
        .map_err(|e| AuthorityError::Invalid(format!("signing certificate trust domain: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_intermediate_may_sign_leaves_only() {
        let dir = std::env::temp_dir().join(format!("moat-ca-pathlen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let td = TrustDomain::new("cluster.local").unwrap();
        init_root(&td, &dir.join("root"), Duration::from_secs(86400 * 30)).unwrap();
        init_intermediate(
            &dir.join("root"),
            &dir.join("signing"),
            Duration::from_secs(86400),
        )
        .unwrap();
        let basic_constraints = |path: &Path| {
            let pem = std::fs::read(path).unwrap();
            let der = moat_core::pem::parse_certs(&pem).unwrap().remove(0);
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let bc = cert.basic_constraints().unwrap().unwrap();
            assert!(bc.critical, "basicConstraints is critical");
            (bc.value.ca, bc.value.path_len_constraint)
        };
        assert_eq!(
            basic_constraints(&dir.join("signing").join(SECRET_CERT)),
            (true, Some(0))
        );
        // The offline root itself stays unconstrained: it may sign further intermediates.
        assert_eq!(
            basic_constraints(&dir.join("root").join(ROOT_CERT)),
            (true, None)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
