//! `moat-injector serve` over real HTTPS: curl posts AdmissionReviews to /inject, garbage gets
//! 4xx JSON, TLS is 1.3 only, the admin listener answers, and a rotated certificate is picked
//! up without a restart.

mod common;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_moat-injector");

/// A CA and a server certificate for 127.0.0.1/localhost signed by it, written as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, tag: &str) -> (Pki, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("webhook test CA {tag}"));
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "moat-injector.moat-system.svc".to_string(),
    ])
    .expect("params");
    let cert = params.signed_by(&key, &issuer).expect("leaf");
    let pki = Pki {
        ca: dir.join(format!("ca-{tag}.pem")),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).expect("write");
    (pki, cert.pem(), key.serialize_pem())
}

/// The server process, killed on drop.
struct Server {
    child: Child,
    webhook: String,
    admin: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `moat-injector serve` on ephemeral loopback ports with the certificate files of `pki`.
fn serve_command(pki: &Pki, bundle: &Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ])
    .arg("--tls-cert")
    .arg(&pki.cert)
    .arg("--tls-key")
    .arg(&pki.key)
    .arg("--trust-bundle")
    .arg(bundle);
    cmd
}

fn start(pki: &Pki, bundle: &Path, extra: &[&str]) -> Server {
    let mut child = serve_command(pki, bundle)
        .args(["--reload-interval", "200ms", "--log-format", "json"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moat-injector serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("moat-injector serving") {
                let v: Value = serde_json::from_str(&line).unwrap_or_default();
                let _ = tx.send((
                    v["listen"].as_str().unwrap_or("").to_string(),
                    v["admin"].as_str().unwrap_or("").to_string(),
                ));
            }
        }
    });
    let (webhook, admin) = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(addrs) => addrs,
        Err(_) => {
            let _ = child.kill();
            panic!("moat-injector serve did not start");
        }
    };
    Server {
        child,
        webhook,
        admin,
    }
}

/// Runs curl; returns (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is required for this test");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn post(server: &Server, ca: &Path, body_file: &Path, content_type: &str) -> (u16, String) {
    let url = format!("https://{}/inject?timeout=10s", server.webhook);
    let ct = format!("Content-Type: {content_type}");
    let data = format!("@{}", body_file.display());
    curl(&[
        "--cacert",
        ca.to_str().expect("utf-8"),
        "-H",
        &ct,
        "--data-binary",
        &data,
        &url,
    ])
}

#[test]
fn serves_admission_reviews_over_https() {
    let dir = TempDir::new("https");
    let (pki, cert, key) = make_pki(&dir.0, "one");
    std::fs::write(&pki.cert, cert).expect("write");
    std::fs::write(&pki.key, key).expect("write");
    let bundle = dir.0.join("bundle.pem");
    std::fs::write(&bundle, &test_ca().0).expect("write");
    let server = start(&pki, &bundle, &[]);

    // A real AdmissionRequest from the corpus, wrapped.
    let req: Value = serde_json::from_slice(
        &std::fs::read(corpus_dir().join("kubewarden/request-pod-volumes.json")).expect("read"),
    )
    .expect("json");
    let review = wrap(req);
    let review_file = dir.0.join("review.json");
    std::fs::write(&review_file, serde_json::to_vec(&review).expect("json")).expect("write");

    let (status, body) = post(&server, &pki.ca, &review_file, "application/json");
    assert_eq!(status, 200, "{body}");
    let reply = moat_injector::admission::Reply {
        status,
        body: serde_json::from_str(&body).expect("JSON answer"),
    };
    let resp = check_envelope(&review, &reply);
    assert_eq!(resp.response["allowed"], true);
    let patch = resp.patch.expect("patch");
    let result = apply_rust(&review["request"]["object"], &patch);
    assert_eq!(result["spec"]["initContainers"][0]["name"], "moat-init");

    // HTTP/2 works too (the API server may negotiate it).
    let url = format!("https://{}/inject", server.webhook);
    let data = format!("@{}", review_file.display());
    let (status, _) = curl(&[
        "--http2",
        "--cacert",
        pki.ca.to_str().expect("utf-8"),
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &data,
        &url,
    ]);
    assert_eq!(status, 200);

    // Garbage gets 4xx JSON.
    let garbage = dir.0.join("garbage");
    std::fs::write(&garbage, b"\x00\x01 not json").expect("write");
    let big = dir.0.join("big.json");
    std::fs::write(&big, vec![b' '; 2 << 20]).expect("write");
    let half = dir.0.join("half.json");
    std::fs::write(&half, &serde_json::to_vec(&review).expect("json")[..100]).expect("write");
    let no_uid = dir.0.join("no-uid.json");
    std::fs::write(
        &no_uid,
        serde_json::to_vec(
            &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}),
        )
        .expect("json"),
    )
    .expect("write");
    for (file, ct, want_status, want_error) in [
        (&garbage, "application/json", 400, "invalid_json"),
        (&half, "application/json", 400, "invalid_json"),
        (&no_uid, "application/json", 400, "missing_uid"),
        (&review_file, "text/plain", 415, "unsupported_media_type"),
        (&big, "application/json", 413, "body_too_large"),
    ] {
        let (status, body) = post(&server, &pki.ca, file, ct);
        assert_eq!(status, want_status, "{}: {body}", file.display());
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
        assert_eq!(v["error"], want_error, "{body}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, body) = curl(&["--cacert", pki.ca.to_str().expect("utf-8"), &url]);
    assert_eq!(status, 405, "{body}");
    let (status, _) = curl(&[
        "--cacert",
        pki.ca.to_str().expect("utf-8"),
        &format!("https://{}/other", server.webhook),
    ]);
    assert_eq!(status, 404);

    // TLS 1.2 is refused.
    let (status, _) = curl(&[
        "--tlsv1.2",
        "--tls-max",
        "1.2",
        "--cacert",
        pki.ca.to_str().expect("utf-8"),
        &url,
    ]);
    assert_eq!(status, 0, "a TLS 1.2 handshake succeeded");

    // Admin listener.
    let (status, body) = curl(&[&format!("http://{}/ready", server.admin)]);
    assert_eq!((status, body.trim()), (200, "ready"));
    let (status, metrics) = curl(&[&format!("http://{}/metrics", server.admin)]);
    assert_eq!(status, 200);
    for m in [
        "moat_injector_injections_total 2",
        "moat_injector_errors_total{reason=\"invalid_json\"} 2",
        "moat_injector_errors_total{reason=\"unsupported_media_type\"} 1",
        "moat_injector_admission_duration_seconds_bucket{result=\"injected\"",
    ] {
        assert!(metrics.contains(m), "{m} missing from:\n{metrics}");
    }
}

#[test]
fn rotated_certificate_files_are_picked_up() {
    let dir = TempDir::new("rotate");
    let (pki1, cert1, key1) = make_pki(&dir.0, "one");
    std::fs::write(&pki1.cert, cert1).expect("write");
    std::fs::write(&pki1.key, key1).expect("write");
    let bundle = dir.0.join("bundle.pem");
    std::fs::write(&bundle, &test_ca().0).expect("write");
    let server = start(&pki1, &bundle, &[]);
    let url = format!("https://{}/inject", server.webhook);
    let with_ca = |ca: &Path| curl(&["--cacert", ca.to_str().expect("utf-8"), &url]).0;
    assert_eq!(with_ca(&pki1.ca), 405);

    // A certificate from another CA: the key first (a mismatched pair must be ignored), then
    // the certificate.
    let (pki2, cert2, key2) = make_pki(&dir.0, "two");
    std::fs::write(&pki2.key, key2).expect("write");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(with_ca(&pki1.ca), 405, "mismatched pair was installed");
    std::fs::write(&pki2.cert, cert2).expect("write");
    let deadline = Instant::now() + Duration::from_secs(15);
    while with_ca(&pki2.ca) != 405 {
        assert!(Instant::now() < deadline, "new certificate never served");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(with_ca(&pki1.ca), 0, "old certificate still served");
}

#[test]
fn refuses_to_start_without_a_usable_certificate() {
    let dir = TempDir::new("nocert");
    let (pki, cert, _) = make_pki(&dir.0, "one");
    let other_key = rcgen::KeyPair::generate().expect("key").serialize_pem();
    std::fs::write(&pki.cert, cert).expect("write");
    std::fs::write(&pki.key, other_key).expect("write");
    let bundle = dir.0.join("bundle.pem");
    std::fs::write(&bundle, &test_ca().0).expect("write");
    let out = serve_command(&pki, &bundle).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("private key does not match the certificate"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["serve", "--trust-bundle"])
        .arg(&bundle)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-cert"));
}
