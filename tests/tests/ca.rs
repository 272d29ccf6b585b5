//! End-to-end tests of `moat-ca`: the real release binary on loopback, driven by the real
//! `moat-core` client, by `curl`, and by hand-made malformed traffic.
//!
//! Every test starts its own CA (own root, ports and token issuer) so tests run in parallel
//! and independently. Run with `cargo test --release -p moat-e2e` after
//! `cargo build --release --workspace`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use bytes::Bytes;
use moat_core::api::{CertificateResponse, CERTIFICATES_PATH, TRUST_BUNDLE_PATH};
use moat_core::client::{make_csr, KeyAlgorithm};
use moat_core::manager::{IdentityManager, Schedule};
use moat_core::{SpiffeId, TrustBundle};
use moat_e2e::ca::{run_ca, CaFixture, CaOptions};
use moat_e2e::https::{csr_body, Reply};
use moat_e2e::logs::{self, LogCapture};
use moat_e2e::proc::{Proc, SIGTERM};
use moat_e2e::token::{hs256_token, unsigned_token, SigningKey, TokenSpec};
use moat_e2e::tools::{require_tool, run_ok};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, UnixTime};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

type TestResult = anyhow::Result<()>;

const ISSUED: &str = "moat_ca_certificates_issued_total";
const REFUSED: &str = "moat_ca_certificate_refusals_total";

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_ED25519: &str = "1.3.101.112";
const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn parse_chain(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    Ok(moat_core::pem::parse_certs(pem.as_bytes())?)
}

/// A CSR over `key` with `sans`, adjusted by `tweak`.
fn csr_with(
    key: &KeyPair,
    sans: Vec<SanType>,
    tweak: impl FnOnce(&mut CertificateParams),
) -> anyhow::Result<String> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    tweak(&mut p);
    Ok(p.serialize_request(key)?.pem()?)
}

fn uri(s: &str) -> anyhow::Result<SanType> {
    Ok(SanType::URI(s.try_into()?))
}

fn dns(s: &str) -> anyhow::Result<SanType> {
    Ok(SanType::DnsName(s.try_into()?))
}

fn p256() -> anyhow::Result<KeyPair> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// A CSR as the real client makes it for `id`.
fn client_csr(id: &SpiffeId) -> anyhow::Result<String> {
    Ok(make_csr(id, &[], KeyAlgorithm::EcdsaP256)?.1)
}

/// Asserts a refusal: status, JSON content type, `{"error": code, "message": <non-empty>}`.
fn assert_refused(reply: &Reply, status: u16, code: &str, what: &str) -> TestResult {
    ensure!(
        reply.status == status,
        "{what}: expected {status} {code}, got {} {}",
        reply.status,
        reply.text()
    );
    ensure!(
        reply.header("content-type") == Some("application/json"),
        "{what}: content-type {:?}",
        reply.header("content-type")
    );
    let body: serde_json::Value = reply.json()?;
    let obj = body.as_object().context("error body is not an object")?;
    ensure!(
        obj.len() == 2,
        "{what}: error body has exactly error and message: {body}"
    );
    ensure!(
        body["error"] == code,
        "{what}: expected code {code}, got {body}"
    );
    ensure!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: empty message: {body}"
    );
    Ok(())
}

/// Expected refusals by reason, checked against the CA's metrics and audit log at the end.
#[derive(Default)]
struct Tally {
    by_reason: BTreeMap<String, u32>,
}

impl Tally {
    fn refused(&mut self, reply: &Reply, status: u16, code: &str, what: &str) -> TestResult {
        assert_refused(reply, status, code, what)?;
        *self.by_reason.entry(code.to_string()).or_default() += 1;
        Ok(())
    }

    /// Nothing issued beyond `issued_before + extra_issued`, every refusal counted by reason,
    /// and one audit line per refusal.
    fn check(&self, ca: &CaFixture, issued_before: f64, extra_issued: f64) -> TestResult {
        let m = ca.metrics()?;
        let issued = m.value(ISSUED, &[]);
        ensure!(
            issued == issued_before + extra_issued,
            "{ISSUED} went from {issued_before} to {issued}, expected +{extra_issued}"
        );
        let total: u32 = self.by_reason.values().sum();
        ensure!(
            m.value(REFUSED, &[]) == f64::from(total),
            "{REFUSED} total is {}, expected {total}: {:?}",
            m.value(REFUSED, &[]),
            m.series(REFUSED).collect::<Vec<_>>()
        );
        let audit = ca.json_logs();
        for (reason, n) in &self.by_reason {
            let counted = m.value(REFUSED, &[("reason", reason)]);
            ensure!(
                counted == f64::from(*n),
                "{REFUSED}{{reason={reason}}} is {counted}, expected {n}"
            );
            let lines = logs::matching(&audit, &[("event", "refused"), ("reason", reason)]);
            ensure!(
                lines.len() == *n as usize,
                "expected {n} audit lines for {reason}, found {}",
                lines.len()
            );
            for l in lines {
                ensure!(
                    l["target"] == "moat_ca::audit" && l["level"] == "WARN",
                    "audit line: {l}"
                );
                ensure!(
                    l["message"] == "certificate request refused"
                        && l["detail"].as_str().is_some_and(|d| !d.is_empty()),
                    "audit line carries the refusal detail: {l}"
                );
                ensure!(
                    l["client"]
                        .as_str()
                        .is_some_and(|c| c.starts_with("127.0.0.1:")),
                    "audit line names the client's address: {l}"
                );
            }
        }
        // Each audit line is well-formed JSON with unique keys (one "message").
        for raw in ca
            .logs()
            .lines()
            .filter(|l| l.contains("\"event\":\"refused\""))
        {
            ensure!(
                raw.matches("\"message\":").count() == 1,
                "duplicate keys in audit line: {raw}"
            );
        }
        let refused_lines = logs::matching(&audit, &[("event", "refused")]).len();
        ensure!(
            refused_lines == total as usize,
            "{refused_lines} refusal audit lines for {total} refusals"
        );
        Ok(())
    }
}

/// Verifies `chain` (leaf first) against `bundle` with rustls-webpki, for both usages.
fn webpki_verify(chain: &[CertificateDer<'static>], bundle: &TrustBundle) -> TestResult {
    let leaf = webpki::EndEntityCert::try_from(&chain[0])?;
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        leaf.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            bundle.anchors(),
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map_err(|e| anyhow::anyhow!("webpki rejects the chain: {e:?}"))?;
    }
    Ok(())
}

/// Verifies `chain` with `openssl verify -x509_strict` for both TLS purposes.
fn openssl_verify(dir: &Path, chain: &[CertificateDer<'static>], bundle: &Path) -> TestResult {
    let openssl = require_tool("openssl");
    let leaf = dir.join("leaf.pem");
    std::fs::write(&leaf, moat_core::pem::encode_certs(&chain[..1]))?;
    let mut args: Vec<String> = vec![
        "verify".into(),
        "-x509_strict".into(),
        "-CAfile".into(),
        bundle.display().to_string(),
    ];
    if chain.len() > 1 {
        let inter = dir.join("intermediates.pem");
        std::fs::write(&inter, moat_core::pem::encode_certs(&chain[1..]))?;
        args.extend(["-untrusted".into(), inter.display().to_string()]);
    }
    for purpose in ["sslserver", "sslclient"] {
        let mut a = args.clone();
        a.extend([
            "-purpose".into(),
            purpose.into(),
            leaf.display().to_string(),
        ]);
        let out = run_ok(&openssl, &a)?;
        ensure!(
            out.trim().ends_with(": OK"),
            "openssl verify ({purpose}): {out}"
        );
    }
    Ok(())
}

/// The subject key identifier of a certificate.
fn ski(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
}

/// What the profile check read from a leaf.
struct LeafFacts {
    serial: Vec<u8>,
    not_before: i64,
    not_after: i64,
    spki_alg: String,
    spki_curve: Option<String>,
}

/// Checks every field of Moat's X509-SVID profile on `leaf_der`, issued by `issuer_der`, for
/// `id` with exactly the DNS names `dns_names`.
fn check_profile(
    leaf_der: &[u8],
    issuer_der: &[u8],
    id: &SpiffeId,
    dns_names: &[&str],
) -> anyhow::Result<LeafFacts> {
    let (rest, cert) = X509Certificate::from_der(leaf_der)?;
    ensure!(rest.is_empty(), "trailing bytes after the leaf");
    let (_, issuer) = X509Certificate::from_der(issuer_der)?;
    ensure!(
        cert.version() == x509_parser::x509::X509Version::V3,
        "not v3"
    );
    ensure!(
        cert.issuer().as_raw() == issuer.subject().as_raw(),
        "issuer name is not the signer's subject"
    );

    // Empty subject; the identity lives in the SAN, which must then be critical.
    ensure!(
        cert.subject().iter().count() == 0,
        "subject is not empty: {}",
        cert.subject()
    );
    let san = cert.subject_alternative_name()?.context("no SAN")?;
    ensure!(san.critical, "SAN must be critical with an empty subject");
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    ensure!(uris == [id.as_str()], "URI SANs {uris:?}, expected [{id}]");
    let names: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    ensure!(
        names == dns_names,
        "DNS SANs {names:?}, expected {dns_names:?}"
    );
    ensure!(
        san.value.general_names.len() == 1 + dns_names.len(),
        "unexpected SAN kinds: {:?}",
        san.value.general_names
    );

    let bc = cert.basic_constraints()?.context("no basicConstraints")?;
    ensure!(bc.critical, "basicConstraints must be critical");
    ensure!(!bc.value.ca, "leaf must be CA:false");
    ensure!(bc.value.path_len_constraint.is_none(), "pathlen on a leaf");

    let ku = cert.key_usage()?.context("no keyUsage")?;
    ensure!(ku.critical, "keyUsage must be critical");
    ensure!(
        ku.value.digital_signature() && ku.value.flags == 1,
        "keyUsage must be digitalSignature only, got {}",
        ku.value
    );

    let eku = cert.extended_key_usage()?.context("no extendedKeyUsage")?;
    let e = eku.value;
    ensure!(
        e.server_auth
            && e.client_auth
            && !e.any
            && !e.code_signing
            && !e.email_protection
            && !e.time_stamping
            && !e.ocsp_signing
            && e.other.is_empty(),
        "EKU must be exactly serverAuth+clientAuth: {e:?}"
    );

    // 16 random bytes, encoded as a positive INTEGER.
    let raw = cert.raw_serial();
    ensure!(raw[0] & 0x80 == 0, "serial is negative: {raw:02x?}");
    let significant: Vec<u8> = raw.iter().copied().skip_while(|b| *b == 0).collect();
    ensure!(
        (15..=16).contains(&significant.len()),
        "serial has {} significant bytes: {raw:02x?}",
        significant.len()
    );

    let leaf_ski = ski(&cert).context("no subjectKeyIdentifier")?;
    ensure!(!leaf_ski.is_empty(), "empty SKI");
    let issuer_ski = ski(&issuer).context("issuer has no subjectKeyIdentifier")?;
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => Some(a),
            _ => None,
        })
        .context("no authorityKeyIdentifier")?;
    ensure!(
        aki.key_identifier.as_ref().map(|k| k.0.to_vec()) == Some(issuer_ski),
        "AKI does not match the issuer's SKI"
    );

    // Exactly the extensions above, nothing else.
    let mut oids: Vec<String> = cert
        .extensions()
        .iter()
        .map(|e| e.oid.to_id_string())
        .collect();
    oids.sort();
    ensure!(
        oids == [
            "2.5.29.14", // SKI
            "2.5.29.15", // keyUsage
            "2.5.29.17", // SAN
            "2.5.29.19", // basicConstraints
            "2.5.29.35", // AKI
            "2.5.29.37", // EKU
        ],
        "unexpected extension set {oids:?}"
    );

    ensure!(
        cert.signature_algorithm.algorithm.to_id_string() == OID_ECDSA_SHA256,
        "leaf not signed with ecdsa-with-SHA256"
    );
    cert.verify_signature(Some(issuer.public_key()))
        .map_err(|e| anyhow::anyhow!("leaf signature does not verify with the issuer key: {e}"))?;

    let spki = cert.public_key();
    Ok(LeafFacts {
        serial: raw.to_vec(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        spki_alg: spki.algorithm.algorithm.to_id_string(),
        spki_curve: spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string()),
    })
}

fn rfc3339_unix_nanos(s: &str) -> anyhow::Result<i128> {
    Ok(
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .with_context(|| format!("{s:?} is not RFC 3339"))?
            .unix_timestamp_nanos(),
    )
}

/// The root certificate (first of the bundle).
fn root_der(ca: &CaFixture) -> anyhow::Result<CertificateDer<'static>> {
    Ok(ca.bundle()?.certs()[0].clone())
}

// ---------------------------------------------------------------------------------------------
// Issuance
// ---------------------------------------------------------------------------------------------

/// A token and a CSR from the real client give a certificate whose every field matches the
/// profile, verifiable by webpki and OpenSSL, with `expires_at` and `trust_bundle` exact.
#[tokio::test]
async fn issues_the_exact_svid_profile() -> TestResult {
    let ca = CaFixture::start(CaOptions::default())?;
    let id = ca.spiffe_id("shop", "web")?;
    let token = ca.token("shop", "web")?;

    let before = now_secs();
    let reply = ca.request_certificate(&token, &client_csr(&id)?).await?;
    let after = now_secs();
    ensure!(reply.status == 200, "issuance failed: {}", reply.text());
    ensure!(reply.header("content-type") == Some("application/json"));
    let resp: CertificateResponse = reply.json()?;
    let chain = parse_chain(&resp.certificate_chain)?;
    ensure!(chain.len() == 1, "root-signed: the chain is the leaf alone");

    let facts = check_profile(&chain[0], &root_der(&ca)?, &id, &[])?;
    ensure!(
        facts.spki_alg == OID_EC_PUBLIC_KEY && facts.spki_curve.as_deref() == Some(OID_P256),
        "the client's default key is P-256"
    );
    // Back-dated by 60 s; valid for the default hour.
    ensure!(
        (before - 60 - 5..=after - 60 + 5).contains(&facts.not_before),
        "notBefore {} is not now-60s (now {before}..{after})",
        facts.not_before
    );
    let ttl = facts.not_after - after;
    ensure!(
        (3600 - 5..=3600 + 5).contains(&ttl),
        "notAfter is now+{ttl}s, expected 3600±5"
    );
    // The response's metadata is exact.
    ensure!(
        rfc3339_unix_nanos(&resp.expires_at)? == i128::from(facts.not_after) * 1_000_000_000,
        "expires_at {} is not notAfter {}",
        resp.expires_at,
        facts.not_after
    );
    ensure!(
        resp.trust_bundle == ca.bundle_pem()?,
        "trust_bundle differs from bundle.pem"
    );

    webpki_verify(&chain, &ca.bundle()?)?;
    openssl_verify(ca.dir(), &chain, &ca.bundle_path())?;

    // A second issuance gets a different serial.
    let again: CertificateResponse = ca
        .request_certificate(&token, &client_csr(&id)?)
        .await?
        .json()?;
    let chain2 = parse_chain(&again.certificate_chain)?;
    let facts2 = check_profile(&chain2[0], &root_der(&ca)?, &id, &[])?;
    ensure!(ca.metric(ISSUED, &[])? == 2.0);
    ensure!(ca.metric(REFUSED, &[])? == 0.0);

    // Serials are distinct, and the audit log names each one as the certificate encodes it
    // (and as moat-core reports it), whether or not its top bit is set.
    let mut serials = vec![facts.serial, facts2.serial];
    for _ in 0..10 {
        let r: CertificateResponse = ca
            .request_certificate(&token, &client_csr(&id)?)
            .await?
            .json()?;
        let chain = parse_chain(&r.certificate_chain)?;
        serials.push(check_profile(&chain[0], &root_der(&ca)?, &id, &[])?.serial);
        ensure!(
            moat_core::x509::inspect(&chain[0])?.serial_hex
                == moat_core::x509::hex(serials.last().context("serial")?)
        );
    }
    let distinct: std::collections::HashSet<_> = serials.iter().collect();
    ensure!(distinct.len() == serials.len(), "repeated serial");
    let audit = ca.json_logs();
    let issued = logs::matching(&audit, &[("event", "issued"), ("spiffe_id", id.as_str())]);
    ensure!(issued.len() == serials.len(), "audit lines: {issued:?}");
    for (line, serial) in issued.iter().zip(&serials) {
        ensure!(
            line["serial"] == moat_core::x509::hex(serial),
            "audit serial {} is not the certificate's {}",
            line["serial"],
            moat_core::x509::hex(serial)
        );
        ensure!(line["pod"] == "web-0" && line["namespace"] == "shop");
        ensure!(line["target"] == "moat_ca::audit" && line["level"] == "INFO");
    }
    Ok(())
}

/// The identity comes from the token: a CSR without any SAN still gets the token's SPIFFE ID,
/// and Ed25519 keys are accepted.
#[tokio::test]
async fn identity_comes_from_the_token_and_ed25519_is_accepted() -> TestResult {
    let ca = CaFixture::start(CaOptions::default())?;
    let id = ca.spiffe_id("billing", "worker")?;
    let token = ca.token("billing", "worker")?;

    let no_san = csr_with(&p256()?, vec![], |_| {})?;
    let reply = ca.request_certificate(&token, &no_san).await?;
    ensure!(reply.status == 200, "CSR without SAN: {}", reply.text());
    let resp: CertificateResponse = reply.json()?;
    let chain = parse_chain(&resp.certificate_chain)?;
    check_profile(&chain[0], &root_der(&ca)?, &id, &[])?;
    webpki_verify(&chain, &ca.bundle()?)?;

    let (_, ed_csr) = make_csr(&id, &[], KeyAlgorithm::Ed25519)?;
    let reply = ca.request_certificate(&token, &ed_csr).await?;
    ensure!(reply.status == 200, "Ed25519 CSR: {}", reply.text());
    let chain = parse_chain(&reply.json::<CertificateResponse>()?.certificate_chain)?;
    let facts = check_profile(&chain[0], &root_der(&ca)?, &id, &[])?;
    ensure!(facts.spki_alg == OID_ED25519, "leaf key is not Ed25519");
    webpki_verify(&chain, &ca.bundle()?)?;
    openssl_verify(ca.dir(), &chain, &ca.bundle_path())?;
    Ok(())
}

/// The real `moat_core` client obtains verified SVIDs, P-256 by default and Ed25519 on demand,
/// each with a fresh key.
#[tokio::test]
async fn the_core_client_obtains_verified_svids() -> TestResult {
    let ca = CaFixture::start(CaOptions::default())?;
    let cfg = ca.client_config("shop", "cart")?;
    ensure!(
        cfg.key_algorithm == KeyAlgorithm::EcdsaP256,
        "P-256 is the default"
    );
    let client = ca.client(cfg.clone())?;
    let svid = client.fetch().await?;
    ensure!(svid.id == ca.spiffe_id("shop", "cart")?);
    ensure!(svid.chain.len() == 1);
    let facts = check_profile(&svid.chain[0], &root_der(&ca)?, &svid.id, &[])?;
    ensure!(facts.spki_curve.as_deref() == Some(OID_P256));
    webpki_verify(&svid.chain, &ca.bundle()?)?;
    openssl_verify(ca.dir(), &svid.chain, &ca.bundle_path())?;
    ensure!(svid.certified_key(&moat_core::tls::provider()).is_ok());

    let ed = ca.client(moat_core::client::CaClientConfig {
        key_algorithm: KeyAlgorithm::Ed25519,
        ..cfg
    })?;
    let svid2 = ed.fetch().await?;
    let facts2 = check_profile(&svid2.chain[0], &root_der(&ca)?, &svid2.id, &[])?;
    ensure!(facts2.spki_alg == OID_ED25519);
    ensure!(facts.serial != facts2.serial);
    ensure!(ca.metric(ISSUED, &[])? == 2.0);
    Ok(())
}

/// `curl` as an independent client: TLS to the CA with the bundle, JSON in, a chain out that
/// OpenSSL verifies; and a refusal in the documented JSON shape.
#[tokio::test]
async fn curl_obtains_a_certificate() -> TestResult {
    let curl = require_tool("curl");
    let ca = CaFixture::start(CaOptions::default())?;
    let id = ca.spiffe_id("shop", "web")?;
    let req = ca.dir().join("req.json");
    std::fs::write(&req, csr_body(&client_csr(&id)?))?;
    let out_file = ca.dir().join("resp.json");
    let url = format!("{}{CERTIFICATES_PATH}", ca.url());
    let curl_post = |auth: Option<String>, extra: &[&str]| -> anyhow::Result<(u16, String)> {
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        args.extend([
            "-sS".into(),
            "--cacert".into(),
            ca.bundle_path().display().to_string(),
            "-H".into(),
            "Content-Type: application/json".into(),
            "--data-binary".into(),
            format!("@{}", req.display()),
            "-o".into(),
            out_file.display().to_string(),
            "-w".into(),
            "%{http_code}".into(),
        ]);
        if let Some(a) = auth {
            args.extend(["-H".into(), a]);
        }
        args.push(url.clone());
        let code = run_ok(&curl, &args)?;
        Ok((code.trim().parse()?, std::fs::read_to_string(&out_file)?))
    };

    // Default protocol: curl negotiates HTTP/2.
    let (status, body) = curl_post(
        Some(format!(
            "Authorization: Bearer {}",
            ca.token("shop", "web")?
        )),
        &[],
    )?;
    ensure!(status == 200, "curl got {status}: {body}");
    let resp: CertificateResponse = serde_json::from_str(&body)?;
    let chain = parse_chain(&resp.certificate_chain)?;
    check_profile(&chain[0], &root_der(&ca)?, &id, &[])?;
    webpki_verify(&chain, &ca.bundle()?)?;
    openssl_verify(ca.dir(), &chain, &ca.bundle_path())?;

    // Refusals over HTTP/1.1: curl 7.x treats the RST_STREAM(NO_ERROR) that follows an early
    // HTTP/2 answer as a failure (curl: (92)); HTTP/2 refusals are covered by
    // `http2_clients_get_certificates_and_early_refusals`.
    let (status, body) = curl_post(None, &["--http1.1"])?;
    ensure!(status == 401, "no token: {status} {body}");
    let err: moat_core::api::ApiError = serde_json::from_str(&body)?;
    ensure!(err.error == "missing_token", "{err:?}");
    Ok(())
}

/// The CA also speaks HTTP/2 (ALPN `h2`): a certificate, and refusals sent before the request
/// body is complete, arrive intact (RFC 9113 §8.1: complete response, then RST_STREAM(NO_ERROR)).
#[tokio::test]
async fn http2_clients_get_certificates_and_early_refusals() -> TestResult {
    use http_body_util::BodyExt as _;
    let ca = CaFixture::start(CaOptions::default())?;
    let id = ca.spiffe_id("shop", "web")?;
    let tls = moat_e2e::https::client_config_alpn(ca.bundle_pem()?.as_bytes(), &[b"h2"])?;
    let stream = moat_e2e::https::connect_tls(ca.addr(), tls).await?;
    ensure!(
        stream.get_ref().1.alpn_protocol() == Some(&b"h2"[..]),
        "h2 not negotiated"
    );
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await?;
    let conn = tokio::spawn(conn);
    let uri = format!("{}{CERTIFICATES_PATH}", ca.url());

    // Issuance.
    let (tx, body) = http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
    let req = http::Request::post(&uri)
        .header(
            "authorization",
            format!("Bearer {}", ca.token("shop", "web")?),
        )
        .body(body)?;
    let mut tx = tx;
    tx.send_data(csr_body(&client_csr(&id)?)).await?;
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req)).await??;
    ensure!(resp.status() == 200, "h2 issuance: {}", resp.status());
    let body = resp.into_body().collect().await?.to_bytes();
    let issued: CertificateResponse = serde_json::from_slice(&body)?;
    check_profile(
        &parse_chain(&issued.certificate_chain)?[0],
        &root_der(&ca)?,
        &id,
        &[],
    )?;

    // Refused from the headers while the body is still open.
    for (token, code, status) in [
        (None, "missing_token", 401),
        (Some("x.y.z"), "invalid_token", 401),
    ] {
        let (mut tx, body) =
            http_body_util::channel::Channel::<Bytes, std::convert::Infallible>::new(4);
        let mut b = http::Request::post(&uri);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = b.body(body)?;
        tx.send_data(Bytes::from_static(b"{\"csr\": ")).await?;
        let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
            .await
            .context("no answer while the body is open")??;
        let st = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        let err: moat_core::api::ApiError = serde_json::from_slice(&body)
            .with_context(|| format!("h2 refusal body: {}", String::from_utf8_lossy(&body)))?;
        ensure!(
            st == status && err.error == code,
            "h2 early refusal: {st} {err:?}"
        );
        drop(tx);
    }
    // Close the connection now, so the CA's shutdown does not wait for it.
    drop(send);
    conn.abort();
    let _ = conn.await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Refusals: every error class, and nothing issued
// ---------------------------------------------------------------------------------------------

/// 400: malformed JSON, missing or unknown fields, PEM garbage, tampered CSR signature, RSA
/// and P-384 keys.
#[tokio::test]
async fn malformed_requests_are_400_and_issue_nothing() -> TestResult {
    let ca = CaFixture::start(CaOptions::default().unlimited())?;
    let id = ca.spiffe_id("shop", "web")?;
    let token = ca.token("shop", "web")?;
    let t = Some(token.as_str());
    let issued_before = ca.metric(ISSUED, &[])?;
    let mut tally = Tally::default();

    for (body, what) in [
        (&b"{not json"[..], "malformed JSON"),
        (b"", "empty body"),
        (b"[]", "JSON array"),
        (b"{}", "JSON without csr"),
        (b"{\"csr\": 42}", "csr not a string"),
    ] {
        let r = ca.post(t, Bytes::from_static(body)).await?;
        tally.refused(&r, 400, "invalid_json", what)?;
    }
    let good = client_csr(&id)?;
    let unknown = serde_json::json!({"csr": good, "ttl": "876000h"}).to_string();
    tally.refused(
        &ca.post(t, unknown).await?,
        400,
        "invalid_json",
        "unknown field",
    )?;

    for (pem, what) in [
        ("garbage".to_string(), "not PEM"),
        (
            "-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n".into(),
            "bad base64",
        ),
        (
            moat_core::pem::encode_block("CERTIFICATE REQUEST", b"\x30\x03\x02\x01\x00"),
            "not PKCS#10 inside",
        ),
        (
            good.replace("CERTIFICATE REQUEST", "CERTIFICATE"),
            "wrong PEM label",
        ),
    ] {
        let r = ca.request_certificate(&token, &pem).await?;
        tally.refused(&r, 400, "invalid_csr", what)?;
    }

    // Flip one bit inside the signature: still parses, no longer verifies.
    let der = CertificateSigningRequestDer::from_pem_slice(good.as_bytes())?;
    let mut bytes = der.as_ref().to_vec();
    let n = bytes.len();
    bytes[n - 5] ^= 0x01;
    let tampered = moat_core::pem::encode_block("CERTIFICATE REQUEST", &bytes);
    tally.refused(
        &ca.request_certificate(&token, &tampered).await?,
        400,
        "invalid_csr_signature",
        "tampered signature",
    )?;

    let rsa = KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?;
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
    for (key, what) in [(&rsa, "RSA key"), (&p384, "P-384 key")] {
        let pem = csr_with(key, vec![uri(id.as_str())?], |_| {})?;
        let r = ca.request_certificate(&token, &pem).await?;
        tally.refused(&r, 400, "unsupported_key", what)?;
    }

    tally.check(&ca, issued_before, 0.0)?;
    // Refusals name the caller in the audit trail.
    let audit = ca.json_logs();
    let rsa_line = logs::matching(&audit, &[("reason", "unsupported_key")]);
    ensure!(rsa_line[0]["namespace"] == "shop" && rsa_line[0]["service_account"] == "web");
    ensure!(rsa_line[0]["status"] == 400);
    Ok(())
}

/// 401: missing, expired, not-yet-valid, forged, wrong-audience, wrong-issuer, unsigned and
/// HS256 tokens, and tokens that are not Kubernetes service-account tokens.
#[tokio::test]
async fn bad_tokens_are_401_and_issue_nothing() -> TestResult {
    let ca = CaFixture::start(CaOptions::default().unlimited())?;
    let id = ca.spiffe_id("shop", "web")?;
    let body = csr_body(&client_csr(&id)?);
    let issued_before = ca.metric(ISSUED, &[])?;
    let mut tally = Tally::default();
    let spec = || TokenSpec::new("shop", "web");

    tally.refused(
        &ca.post(None, body.clone()).await?,
        401,
        "missing_token",
        "no header",
    )?;
    let basic = http::Request::post(CERTIFICATES_PATH)
        .header("authorization", "Basic c2hvcDp3ZWI=")
        .body(http_body_util::Full::new(body.clone()))?;
    tally.refused(&ca.send(basic).await?, 401, "missing_token", "Basic auth")?;

    let cases: Vec<(String, &str, &str)> = vec![
        (ca.mint(&spec().expired())?, "expired_token", "expired"),
        (
            ca.mint(&spec().not_yet_valid())?,
            "expired_token",
            "not yet valid",
        ),
        (
            ca.mint(&spec().audiences(&["kubernetes"]))?,
            "wrong_audience",
            "wrong audience",
        ),
        (
            ca.mint(&spec().issuer("https://evil.example"))?,
            "wrong_issuer",
            "wrong issuer",
        ),
        (
            ca.issuer().forge(&spec(), &SigningKey::es256("es256-1")?)?,
            "invalid_token",
            "forged with a foreign key under the issuer's kid",
        ),
        (
            SigningKey::es256("unknown")?.sign(&ca.issuer().claims(&spec()))?,
            "invalid_token",
            "foreign key, unknown kid",
        ),
        (
            unsigned_token(&ca.issuer().claims(&spec())),
            "invalid_token",
            "alg none",
        ),
        (
            hs256_token(&ca.issuer().claims(&spec()), b"moat-ca", Some("es256-1"))?,
            "invalid_token",
            "HS256",
        ),
        ("not.a.jwt".into(), "invalid_token", "garbage"),
        (
            ca.mint(&spec().without_kubernetes_claims())?,
            "invalid_token",
            "no kubernetes.io claims",
        ),
        (
            ca.mint(&spec().subject("system:serviceaccount:kube-system:admin"))?,
            "invalid_token",
            "subject disagrees with kubernetes.io claims",
        ),
        (
            ca.mint(&spec().unbound())?,
            "unbound_token",
            "valid, but not bound to a pod (kubectl create token)",
        ),
    ];
    for (token, code, what) in &cases {
        let r = ca.post(Some(token), body.clone()).await?;
        tally.refused(&r, 401, code, what)?;
    }
    // A forgery fails on its signature, not on anything else.
    let forged = ca
        .post(Some(&cases[4].0), body.clone())
        .await?
        .api_error()?;
    ensure!(forged.message.contains("signature"), "{forged:?}");
    let unbound = ca
        .post(Some(&ca.mint(&spec().unbound())?), body.clone())
        .await?
        .api_error()?;
    ensure!(
        unbound.message.contains("not bound to a pod"),
        "the refusal says what is wrong: {unbound:?}"
    );
    tally
        .by_reason
        .entry("unbound_token".into())
        .and_modify(|n| *n += 1);
    tally
        .by_reason
        .entry("invalid_token".into())
        .and_modify(|n| *n += 1);

    tally.check(&ca, issued_before, 0.0)?;
    // The same request with a valid token works: the refusals were about the tokens.
    let ok = ca.post(Some(&ca.token("shop", "web")?), body).await?;
    ensure!(ok.status == 200, "{}", ok.text());
    Ok(())
}

/// RS256 tokens signed by an RSA key of the issuer's JWK Set are accepted like ES256 ones.
#[tokio::test]
async fn rs256_tokens_from_the_jwks_are_accepted() -> TestResult {
    let ca = CaFixture::start(CaOptions {
        rsa_issuer_key: true,
        ..CaOptions::default()
    })?;
    let id = ca.spiffe_id("shop", "web")?;
    let token = ca.mint(&TokenSpec::new("shop", "web").key("rs256-1"))?;
    ensure!(jsonwebtoken::decode_header(&token)?.alg == jsonwebtoken::Algorithm::RS256);
    let reply = ca.request_certificate(&token, &client_csr(&id)?).await?;
    ensure!(reply.status == 200, "RS256: {}", reply.text());
    let chain = parse_chain(&reply.json::<CertificateResponse>()?.certificate_chain)?;
    check_profile(&chain[0], &root_der(&ca)?, &id, &[])?;
    // An RSA key outside the JWK Set is refused.
    let foreign = SigningKey::rs256("rs256-1")?;
    let forged = ca
        .issuer()
        .forge(&TokenSpec::new("shop", "web").key("rs256-1"), &foreign)?;
    let r = ca.request_certificate(&forged, &client_csr(&id)?).await?;
    assert_refused(&r, 401, "invalid_token", "foreign RSA key")?;
    Ok(())
}

/// 403: another identity, another trust domain, a DNS or IP SAN, a CA certificate or
/// certificate-signing usage.
#[tokio::test]
async fn foreign_requests_are_403_and_issue_nothing() -> TestResult {
    let ca = CaFixture::start(CaOptions::default().unlimited())?;
    let id = ca.spiffe_id("shop", "web")?;
    let token = ca.token("shop", "web")?;
    let issued_before = ca.metric(ISSUED, &[])?;
    let mut tally = Tally::default();
    let key = p256()?;

    let cases = [
        (
            csr_with(
                &key,
                vec![uri("spiffe://cluster.local/ns/shop/sa/admin")?],
                |_| {},
            )?,
            "identity_mismatch",
            "another SPIFFE ID",
        ),
        (
            csr_with(
                &key,
                vec![uri("spiffe://evil.example/ns/shop/sa/web")?],
                |_| {},
            )?,
            "identity_mismatch",
            "another trust domain",
        ),
        (
            csr_with(
                &key,
                vec![
                    uri(id.as_str())?,
                    uri("spiffe://cluster.local/ns/shop/sa/admin")?,
                ],
                |_| {},
            )?,
            "identity_mismatch",
            "own and another identity",
        ),
        (
            csr_with(&key, vec![uri(id.as_str())?, dns("web.shop.svc")?], |_| {})?,
            "identity_mismatch",
            "a DNS SAN",
        ),
        (
            csr_with(
                &key,
                vec![uri(id.as_str())?, SanType::IpAddress([10, 0, 0, 1].into())],
                |_| {},
            )?,
            "identity_mismatch",
            "an IP SAN",
        ),
        (
            csr_with(&key, vec![uri(id.as_str())?], |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
            })?,
            "ca_not_allowed",
            "CA:true",
        ),
        (
            csr_with(&key, vec![uri(id.as_str())?], |p| {
                p.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyCertSign,
                ]
            })?,
            "ca_not_allowed",
            "keyCertSign",
        ),
    ];
    for (pem, code, what) in &cases {
        let r = ca.request_certificate(&token, pem).await?;
        tally.refused(&r, 403, code, what)?;
    }
    let msg = ca
        .request_certificate(&token, &cases[0].0)
        .await?
        .api_error()?;
    tally
        .by_reason
        .entry("identity_mismatch".into())
        .and_modify(|n| *n += 1);
    ensure!(
        msg.message
            .contains("spiffe://cluster.local/ns/shop/sa/admin")
            && msg.message.contains(id.as_str()),
        "the refusal says what was asked and what is proven: {msg:?}"
    );
    tally.check(&ca, issued_before, 0.0)?;
    Ok(())
}

/// 413: a declared `Content-Length` over the limit (refused before reading anything), and a
/// chunked body without length that grows past it.
#[tokio::test]
async fn oversized_bodies_are_413_and_issue_nothing() -> TestResult {
    let ca = CaFixture::start(CaOptions::default().unlimited())?;
    let token = ca.token("shop", "web")?;
    let issued_before = ca.metric(ISSUED, &[])?;
    let mut tally = Tally::default();
    let host = ca.addr();
    let limit = moat_core::api::MAX_REQUEST_BYTES;

    // Declared length: refused from the headers alone, even without a token.
    let mut c = ca.connect_raw().await?;
    c.write(
        format!(
            "POST {CERTIFICATES_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            limit + 1
        )
        .as_bytes(),
    )
    .await?;
    let r = c.read_reply(Duration::from_secs(5)).await?;
    tally.refused(&r, 413, "body_too_large", "declared Content-Length")?;

    // Chunked, no length: refused once the body passes the limit.
    let mut c = ca.connect_raw().await?;
    c.write(
        format!(
            "POST {CERTIFICATES_PATH} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    // Exactly the limit in 4 KiB chunks, then one byte more: the server has read everything
    // sent when it answers (no unread data, so no reset racing the answer).
    let chunk = format!("1000\r\n{}\r\n", "A".repeat(0x1000));
    for _ in 0..limit / 0x1000 {
        c.write(chunk.as_bytes()).await?;
    }
    c.write(b"1\r\nA\r\n").await?;
    let r = c.read_reply(Duration::from_secs(5)).await?;
    tally.refused(&r, 413, "body_too_large", "chunked body without length")?;

    tally.check(&ca, issued_before, 0.0)?;
    Ok(())
}

/// 429 past the per-identity burst, with a `Retry-After` after which the identity is served
/// again; other identities are unaffected.
#[tokio::test]
async fn rate_limit_is_429_with_retry_after() -> TestResult {
    let ca = CaFixture::start(CaOptions {
        rate_limit: Some(1.0),
        rate_burst: Some(2.0),
        ..CaOptions::default()
    })?;
    let id = ca.spiffe_id("shop", "web")?;
    let token = ca.token("shop", "web")?;
    let csr = client_csr(&id)?;
    let issued_before = ca.metric(ISSUED, &[])?;
    let mut tally = Tally::default();

    for i in 0..2 {
        let r = ca.request_certificate(&token, &csr).await?;
        ensure!(
            r.status == 200,
            "request {i} within the burst: {}",
            r.text()
        );
    }
    let r = ca.request_certificate(&token, &csr).await?;
    tally.refused(&r, 429, "rate_limited", "third request")?;
    let retry: u64 = r
        .header("retry-after")
        .context("429 without Retry-After")?
        .parse()?;
    ensure!(retry == 1, "Retry-After {retry}, expected 1 at 1 request/s");

    // Limits are per identity.
    let other = ca.spiffe_id("shop", "cart")?;
    let r = ca
        .request_certificate(&ca.token("shop", "cart")?, &client_csr(&other)?)
        .await?;
    ensure!(r.status == 200, "another identity: {}", r.text());

    tokio::time::sleep(Duration::from_secs(retry)).await;
    let r = ca.request_certificate(&token, &csr).await?;
    ensure!(
        r.status == 200,
        "after Retry-After: {} {}",
        r.status,
        r.text()
    );

    tally.check(&ca, issued_before, 4.0)?;
    let line = &logs::matching(&ca.json_logs(), &[("reason", "rate_limited")])[0].clone();
    ensure!(line["service_account"] == "web" && line["status"] == 429);
    ensure!(
        line["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "the audit line names the client's address: {line}"
    );
    Ok(())
}

/// `Retry-After` is never shorter than the actual wait (it is rounded up, not down).
#[tokio::test]
async fn retry_after_is_never_too_early() -> TestResult {
    let ca = CaFixture::start(CaOptions {
        rate_limit: Some(0.5),
        rate_burst: Some(1.0),
        ..CaOptions::default()
    })?;
    let id = ca.spiffe_id("shop", "web")?;
    let token = ca.token("shop", "web")?;
    let csr = client_csr(&id)?;
    ensure!(ca.request_certificate(&token, &csr).await?.status == 200);
    let r = ca.request_certificate(&token, &csr).await?;
    assert_refused(&r, 429, "rate_limited", "second request")?;
    let retry: u64 = r.header("retry-after").context("no Retry-After")?.parse()?;
    ensure!(
        retry == 2,
        "Retry-After {retry}, expected 2 at 0.5 request/s"
    );
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let r = ca.request_certificate(&token, &csr).await?;
    ensure!(
        r.status == 200,
        "refused again after waiting Retry-After: {} {}",
        r.status,
        r.text()
    );
    Ok(())
}

/// `GET /v1/trust-bundle` serves bundle.pem; unknown paths are 404 and wrong methods 405, both
/// in the JSON error shape.
#[tokio::test]
async fn trust_bundle_not_found_and_wrong_method() -> TestResult {
    let ca = CaFixture::start(CaOptions::default())?;
    let get = |path: &str| http::Request::get(path).body(http_body_util::Full::new(Bytes::new()));
    let r = ca.send(get(TRUST_BUNDLE_PATH)?).await?;
    ensure!(r.status == 200);
    ensure!(r.header("content-type") == Some("application/x-pem-file"));
    ensure!(
        r.text() == ca.bundle_pem()?,
        "the served bundle is bundle.pem"
    );

    assert_refused(
        &ca.send(get("/v2/certificates")?).await?,
        404,
        "not_found",
        "unknown path",
    )?;
    assert_refused(&ca.send(get("/")?).await?, 404, "not_found", "root")?;
    assert_refused(
        &ca.send(get(CERTIFICATES_PATH)?).await?,
        405,
        "method_not_allowed",
        "GET certificates",
    )?;
    let put =
        http::Request::put(CERTIFICATES_PATH).body(http_body_util::Full::new(Bytes::new()))?;
    assert_refused(
        &ca.send(put).await?,
        405,
        "method_not_allowed",
        "PUT certificates",
    )?;
    let post =
        http::Request::post(TRUST_BUNDLE_PATH).body(http_body_util::Full::new(Bytes::new()))?;
    assert_refused(
        &ca.send(post).await?,
        405,
        "method_not_allowed",
        "POST trust-bundle",
    )?;
    ensure!(ca.metric(ISSUED, &[])? == 0.0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Signing material
// ---------------------------------------------------------------------------------------------

/// With an intermediate (the root offline), the chain is leaf + intermediate and verifies
/// against the root bundle, for the raw API, the core client and OpenSSL.
#[tokio::test]
async fn intermediate_chain_verifies_against_the_root() -> TestResult {
    let ca = CaFixture::start(CaOptions {
        intermediate: true,
        ..CaOptions::default()
    })?;
    let id = ca.spiffe_id("shop", "web")?;
    let reply = ca
        .request_certificate(&ca.token("shop", "web")?, &client_csr(&id)?)
        .await?;
    ensure!(reply.status == 200, "{}", reply.text());
    let resp: CertificateResponse = reply.json()?;
    let chain = parse_chain(&resp.certificate_chain)?;
    ensure!(
        chain.len() == 2,
        "chain is leaf + intermediate, got {}",
        chain.len()
    );
    let inter = std::fs::read_to_string(ca.signing_dir().join("tls.crt"))?;
    ensure!(
        chain[1] == parse_chain(&inter)?[0],
        "the second certificate is the intermediate"
    );
    ensure!(!ca.bundle()?.contains(&chain[1]), "the root is never sent");
    ensure!(
        resp.trust_bundle == ca.bundle_pem()?,
        "trust_bundle is the root bundle"
    );
    check_profile(&chain[0], &chain[1], &id, &[])?;
    webpki_verify(&chain, &ca.bundle()?)?;
    openssl_verify(ca.dir(), &chain, &ca.bundle_path())?;
    ensure!(
        webpki_verify(&chain[..1], &ca.bundle()?).is_err(),
        "without the intermediate the leaf must not verify"
    );

    // The intermediate itself: a CA under the root, for the same trust domain.
    let (_, ic) = X509Certificate::from_der(&chain[1])?;
    let root_cert = root_der(&ca)?;
    let (_, root) = X509Certificate::from_der(&root_cert)?;
    ensure!(ic.is_ca() && ic.issuer().as_raw() == root.subject().as_raw());
    // pathLen 0: it signs leaves, never another CA.
    let bc = ic
        .basic_constraints()?
        .context("the intermediate has basicConstraints")?;
    ensure!(bc.critical && bc.value.ca, "{bc:?}");
    ensure!(
        bc.value.path_len_constraint == Some(0),
        "intermediate pathLen is {:?}, want 0",
        bc.value.path_len_constraint
    );

    let svid = ca.client(ca.client_config("shop", "web")?)?.fetch().await?;
    ensure!(svid.chain.len() == 2 && svid.id == id);
    Ok(())
}

/// `serve` on a directory whose key does not match its certificate, on an empty directory,
/// or with unreadable material exits non-zero with a clear message and no panic.
#[test]
fn serve_refuses_broken_signing_material() -> TestResult {
    let tmp = moat_e2e::temp_dir("broken")?;
    let root = tmp.path().join("root");
    moat_e2e::ca::run_ca_ok([
        "init".as_ref(),
        "--trust-domain".as_ref(),
        "cluster.local".as_ref(),
        "--dir".as_ref(),
        root.as_os_str(),
    ])?;
    let issuer = moat_e2e::TokenIssuer::es256(tmp.path().join("jwks.json"))?;

    let mismatched = tmp.path().join("mismatched");
    std::fs::create_dir_all(&mismatched)?;
    for f in ["ca.crt", "bundle.pem"] {
        std::fs::copy(root.join(f), mismatched.join(f))?;
    }
    std::fs::write(mismatched.join("ca.key"), p256()?.serialize_pem())?;

    let inter_mismatched = tmp.path().join("inter");
    moat_e2e::ca::run_ca_ok([
        "intermediate".as_ref(),
        "--root-dir".as_ref(),
        root.as_os_str(),
        "--out".as_ref(),
        inter_mismatched.as_os_str(),
    ])?;
    std::fs::remove_file(inter_mismatched.join("tls.key"))?;
    std::fs::write(inter_mismatched.join("tls.key"), p256()?.serialize_pem())?;

    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty)?;

    let garbage = tmp.path().join("garbage");
    std::fs::create_dir_all(&garbage)?;
    std::fs::copy(root.join("ca.key"), garbage.join("ca.key"))?;
    std::fs::copy(root.join("bundle.pem"), garbage.join("bundle.pem"))?;
    std::fs::write(garbage.join("ca.crt"), "not a certificate\n")?;

    let bin = moat_e2e::binary("moat-ca");
    for (dir, expect) in [
        (&mismatched, "do not form a valid chain"),
        (&inter_mismatched, "do not form a valid chain"),
        (&empty, "holds neither"),
        (&tmp.path().join("missing"), "holds neither"),
        (&garbage, "signing certificate"),
    ] {
        let args = [
            "serve".to_string(),
            "--dir".into(),
            dir.display().to_string(),
            "--listen".into(),
            moat_e2e::net::free_addr().to_string(),
            "--admin-listen".into(),
            moat_e2e::net::free_addr().to_string(),
            "--jwks-file".into(),
            issuer.jwks_path().display().to_string(),
            "--token-issuer".into(),
            issuer.name().into(),
            "--log-format".into(),
            "json".into(),
        ];
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut p = Proc::start(&name, &bin, &args, &tmp.path().join("logs"))?;
        let status = p
            .wait_timeout(Duration::from_secs(10))?
            .with_context(|| format!("serve --dir {} kept running", dir.display()))?;
        let stderr = p.stderr();
        ensure!(
            status.code() == Some(2),
            "{}: exit {status}: {stderr}",
            dir.display()
        );
        ensure!(
            stderr.contains("moat-ca: error:") && stderr.contains(expect),
            "{}: message should mention {expect:?}: {stderr}",
            dir.display()
        );
        ensure!(
            !stderr.contains("panicked"),
            "{}: panic: {stderr}",
            dir.display()
        );
    }
    Ok(())
}

/// `init` (and `intermediate`) refuse to overwrite an existing key.
#[test]
fn init_refuses_to_overwrite_a_key() -> TestResult {
    let tmp = moat_e2e::temp_dir("init")?;
    let root = tmp.path().join("root");
    let init = |dir: &Path| {
        run_ca([
            "init".as_ref(),
            "--trust-domain".as_ref(),
            "cluster.local".as_ref(),
            "--dir".as_ref(),
            dir.as_os_str(),
        ])
    };
    let first = init(&root)?;
    ensure!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let key = std::fs::read(root.join("ca.key"))?;
    let cert = std::fs::read(root.join("ca.crt"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("ca.key"))?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "ca.key mode {mode:o}");
    }

    let second = init(&root)?;
    let stderr = String::from_utf8_lossy(&second.stderr);
    ensure!(!second.status.success(), "second init succeeded");
    ensure!(stderr.contains("refusing to overwrite"), "{stderr}");
    ensure!(!stderr.contains("panicked"));
    ensure!(std::fs::read(root.join("ca.key"))? == key, "key changed");
    ensure!(
        std::fs::read(root.join("ca.crt"))? == cert,
        "certificate changed"
    );

    let out = tmp.path().join("inter");
    let inter = |out: &Path| {
        run_ca([
            "intermediate".as_ref(),
            "--root-dir".as_ref(),
            root.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ])
    };
    ensure!(inter(&out)?.status.success());
    let ikey = std::fs::read(out.join("tls.key"))?;
    let again = inter(&out)?;
    ensure!(!again.status.success(), "second intermediate succeeded");
    ensure!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    ensure!(
        std::fs::read(out.join("tls.key"))? == ikey,
        "intermediate key changed"
    );
    Ok(())
}

/// `--dns-san ID=NAME` lets exactly that identity carry exactly that DNS name.
#[tokio::test]
async fn dns_sans_only_for_the_allowed_identity() -> TestResult {
    let name = "moat-injector.moat-system.svc";
    let ca = CaFixture::start(CaOptions::default().args([
        "--dns-san".to_string(),
        format!("spiffe://cluster.local/ns/moat-system/sa/moat-injector={name}"),
    ]))?;
    let injector = ca.spiffe_id("moat-system", "moat-injector")?;

    // The core client, as the injector uses it.
    let mut cfg = ca.client_config("moat-system", "moat-injector")?;
    cfg.dns_names = vec![name.to_string()];
    let svid = ca.client(cfg)?.fetch().await?;
    check_profile(&svid.chain[0], &root_der(&ca)?, &injector, &[name])?;
    let leaf = webpki::EndEntityCert::try_from(&svid.chain[0])?;
    leaf.verify_is_valid_for_subject_name(&rustls_pki_types::ServerName::try_from(name)?)?;
    webpki_verify(&svid.chain, &ca.bundle()?)?;
    openssl_verify(ca.dir(), &svid.chain, &ca.bundle_path())?;

    // Without the DNS name, the same identity gets a plain SVID.
    let plain = ca
        .client(ca.client_config("moat-system", "moat-injector")?)?
        .fetch()
        .await?;
    check_profile(&plain.chain[0], &root_der(&ca)?, &injector, &[])?;

    let token = ca.token("moat-system", "moat-injector")?;
    let key = p256()?;
    let other_name = csr_with(
        &key,
        vec![uri(injector.as_str())?, dns("evil.moat-system.svc")?],
        |_| {},
    )?;
    assert_refused(
        &ca.request_certificate(&token, &other_name).await?,
        403,
        "identity_mismatch",
        "allowed identity, other name",
    )?;
    let other = ca.spiffe_id("moat-system", "other")?;
    let stolen = csr_with(&key, vec![uri(other.as_str())?, dns(name)?], |_| {})?;
    assert_refused(
        &ca.request_certificate(&ca.token("moat-system", "other")?, &stolen)
            .await?,
        403,
        "identity_mismatch",
        "other identity, allowed name",
    )?;
    ensure!(ca.metric(ISSUED, &[])? == 2.0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Renewal, outage, shutdown
// ---------------------------------------------------------------------------------------------

fn test_schedule() -> Schedule {
    Schedule {
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(1),
        bundle_poll: Duration::from_secs(60),
    }
}

fn summary_not_after(s: &moat_core::svid::IdentitySummary) -> anyhow::Result<SystemTime> {
    let nanos = rfc3339_unix_nanos(&s.not_after)?;
    Ok(UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos)?))
}

/// The identity manager replaces a 6-second certificate before it expires, twice in a row,
/// at 50-70 % of its remaining life.
#[tokio::test]
async fn manager_renews_before_expiry_twice() -> TestResult {
    let ca = CaFixture::start(CaOptions::default().short_ttl("6s"))?;
    let client = ca.client(ca.client_config("shop", "web")?)?;
    let (mgr, handle) = IdentityManager::new(
        client,
        ca.shared_bundle()?,
        None,
        moat_core::tls::provider(),
        test_schedule(),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(mgr.run(stop_rx));

    tokio::time::timeout(Duration::from_secs(10), handle.ready())
        .await
        .context("no first certificate")?;
    let mut rx = handle.subscribe();
    rx.borrow_and_update();
    let mut current = handle.summary().context("no summary")?;
    let mut installed_at = Instant::now();
    ensure!(current.spiffe_id == ca.spiffe_id("shop", "web")?.as_str());
    for round in 1..=2 {
        let old_expiry = summary_not_after(&current)?;
        tokio::time::timeout(Duration::from_secs(8), rx.changed())
            .await
            .with_context(|| format!("round {round}: no renewal"))??;
        let renewed_at = SystemTime::now();
        let elapsed = installed_at.elapsed();
        let next = rx.borrow_and_update().clone().context("summary cleared")?;
        ensure!(next.serial != current.serial, "round {round}: same serial");
        ensure!(
            renewed_at < old_expiry,
            "round {round}: renewed after the old certificate expired"
        );
        ensure!(
            (Duration::from_millis(2000)..Duration::from_millis(5500)).contains(&elapsed),
            "round {round}: renewed {elapsed:?} after the previous install, expected 50-70% of ~6s"
        );
        ensure!(handle.has_valid_cert());
        ensure!(handle.cert.get().is_some());
        // The workload's view of the serial is the CA's audit record of it.
        ensure!(
            !logs::matching(
                &ca.json_logs(),
                &[("event", "issued"), ("serial", &next.serial)]
            )
            .is_empty(),
            "round {round}: serial {} not in the CA's audit log",
            next.serial
        );
        current = next;
        installed_at = Instant::now();
    }
    let _ = stop_tx.send(true);
    task.await?;
    ensure!(ca.metric(ISSUED, &[])? == 3.0);
    Ok(())
}

/// While the CA is down the manager keeps serving its still-valid certificate and counts the
/// failures; when the CA is back on the same port, the next attempt gets a new certificate.
#[tokio::test]
async fn manager_keeps_its_certificate_through_a_ca_outage() -> TestResult {
    let (capture, _guard) = LogCapture::install("moat_core=info");
    let mut ca = CaFixture::start(CaOptions::default().short_ttl("8s"))?;
    let client = ca.client(ca.client_config("shop", "web")?)?;
    let (mgr, handle) = IdentityManager::new(
        client,
        ca.shared_bundle()?,
        None,
        moat_core::tls::provider(),
        test_schedule(),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(mgr.run(stop_rx));
    tokio::time::timeout(Duration::from_secs(10), handle.ready())
        .await
        .context("no first certificate")?;
    let first = handle.summary().context("no summary")?;
    let first_cert = handle.cert.get().context("no certificate")?;

    let status = ca.stop()?;
    ensure!(status.success(), "CA exit {status}");

    // Wait for the renewal attempts to fail.
    let failures = || {
        capture
            .events()
            .into_iter()
            .filter(|e| e["message"] == "identity certificate request failed")
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(8);
    while failures().len() < 2 {
        ensure!(
            Instant::now() < deadline,
            "no failed renewal seen: {}",
            capture.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = failures();
    for f in &seen {
        ensure!(f["reason"] == "connect", "failure reason: {f}");
        ensure!(f["serving_valid_cert"] == true, "failure while valid: {f}");
        ensure!(f["level"] == "WARN");
    }
    ensure!(
        seen[1]["attempt"].as_u64() > seen[0]["attempt"].as_u64(),
        "attempts counted"
    );
    // Still serving the old, valid certificate.
    ensure!(
        handle.has_valid_cert(),
        "the old certificate must still be valid"
    );
    let during = handle.summary().context("summary lost")?;
    ensure!(
        during.serial == first.serial,
        "certificate changed during the outage"
    );
    ensure!(Arc::ptr_eq(
        &handle.cert.get().context("cert lost")?,
        &first_cert
    ));

    // CA back on the same port: the next attempt succeeds.
    let port = ca.addr();
    ca.restart()?;
    ensure!(ca.addr() == port && ca.starts() == 2);
    let mut rx = handle.subscribe();
    let renewed = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.as_ref().is_some_and(|s| s.serial != first.serial)),
    )
    .await
    .context("no renewal after the CA came back")??
    .clone()
    .context("summary cleared")?;
    ensure!(renewed.spiffe_id == first.spiffe_id);
    ensure!(handle.has_valid_cert());
    ensure!(
        capture.text().contains("identity certificate installed"),
        "install logged"
    );
    let _ = stop_tx.send(true);
    task.await?;
    Ok(())
}

/// SIGTERM: `/ready` fails at once, a request in flight still completes, a stalled one is cut
/// at the grace period, and the process exits 0.
#[tokio::test]
async fn sigterm_drains_then_exits_zero() -> TestResult {
    let grace = Duration::from_secs(2);
    let mut ca = CaFixture::start(
        CaOptions::default()
            .unlimited()
            .args(["--shutdown-grace", "2s"]),
    )?;
    let id = ca.spiffe_id("shop", "web")?;
    let token = ca.token("shop", "web")?;
    let body = csr_body(&client_csr(&id)?);
    let head = |len: usize| {
        format!(
            "POST {CERTIFICATES_PATH} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n",
            ca.addr()
        )
    };
    // A: headers and half the body, finished after SIGTERM. B: never finished.
    let mut a = ca.connect_raw().await?;
    a.write(head(body.len()).as_bytes()).await?;
    a.write(&body[..body.len() / 2]).await?;
    let mut b = ca.connect_raw().await?;
    b.write(head(body.len()).as_bytes()).await?;
    b.write(&body[..10]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let admin = ca.admin_addr().to_string();
    moat_e2e::wait_for_http(&admin, "/ready", Duration::from_secs(1))?;
    let sent = Instant::now();
    ca.proc()?.signal(SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match moat_e2e::net::http_get(&admin, "/ready", Duration::from_millis(200)) {
            Ok(r) if r.status == 200 => {
                ensure!(Instant::now() < deadline, "/ready still 200 after SIGTERM");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            _ => break,
        }
    }
    ensure!(ca.proc()?.is_running(), "exited before draining");

    a.write(&body[body.len() / 2..]).await?;
    let r = a.read_reply(Duration::from_secs(5)).await?;
    ensure!(
        r.status == 200,
        "in-flight request after SIGTERM: {} {}",
        r.status,
        r.text()
    );
    parse_chain(&r.json::<CertificateResponse>()?.certificate_chain)?;

    let status = ca
        .proc()?
        .wait_timeout(grace + Duration::from_secs(3))?
        .context("did not exit after the grace period")?;
    let took = sent.elapsed();
    ensure!(status.code() == Some(0), "exit {status}");
    ensure!(
        took >= grace - Duration::from_millis(200) && took <= grace + Duration::from_millis(1500),
        "exited {took:?} after SIGTERM, expected about the {grace:?} grace (a request was stalled)"
    );
    let logs = ca.logs();
    ensure!(logs.contains("grace period over"), "{logs}");
    ensure!(logs.contains("moat-ca stopped"));
    drop(b);
    Ok(())
}
