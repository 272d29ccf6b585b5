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

/// Posts `review` to `path` of a running server; returns the checked response.
fn review_at(server: &Server, ca: &Path, dir: &Path, path: &str, review: &Value) -> Response {
    let file = dir.join("attack.json");
    std::fs::write(&file, serde_json::to_vec(review).expect("json")).expect("write");
    let url = format!("https://{}{path}", server.webhook);
    let data = format!("@{}", file.display());
    let (status, body) = curl(&[
        "--cacert",
        ca.to_str().expect("utf-8"),
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &data,
        &url,
    ]);
    assert_eq!(status, 200, "{body}");
    let reply = moat_injector::admission::Reply {
        status,
        body: serde_json::from_str(&body).expect("JSON answer"),
    };
    check_envelope(review, &reply)
}

fn attack_pod(metadata: Value, spec: Value) -> Value {
    let mut m = metadata;
    m["name"] = json!("tenant");
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": m, "spec": spec})
}

fn web() -> Value {
    json!({"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]})
}

/// A server with its CA, in a directory kept for the test's duration.
fn attack_server(extra: &[&str]) -> (TempDir, Pki, Server) {
    let dir = TempDir::new("attack");
    let (pki, cert, key) = make_pki(&dir.0, "one");
    std::fs::write(&pki.cert, cert).expect("write");
    std::fs::write(&pki.key, key).expect("write");
    let bundle = dir.0.join("bundle.pem");
    std::fs::write(&bundle, &test_ca().0).expect("write");
    let mut args = vec![
        "--cluster-dns-ip",
        "10.96.0.10",
        "--api-server-ip",
        "10.96.0.1",
    ];
    args.extend_from_slice(extra);
    let server = start(&pki, &bundle, &args);
    (dir, pki, server)
}

/// Every route a tenant had to keep a pod out of the mesh in an enforcing namespace, sent
/// through the real webhook binary over HTTPS with its default flags: each is refused with a
/// message naming the field, or (Moat's own parts) never trusted.
#[test]
fn tenant_opt_out_routes_are_refused_in_enforcing_namespaces() {
    let (dir, pki, server) = attack_server(&[]);
    let refused: Vec<(&str, Value, &str)> = vec![
        (
            "opt-out label",
            attack_pod(json!({"labels": {"moat.dev/inject": "disabled"}}), json!({"containers": [web()]})),
            "metadata.labels[moat.dev/inject]=disabled",
        ),
        (
            "opt-out annotation",
            attack_pod(json!({"annotations": {"moat.dev/inject": "disabled"}}), json!({"containers": [web()]})),
            "metadata.annotations[moat.dev/inject]=disabled",
        ),
        (
            "another mesh's container name",
            attack_pod(json!({}), json!({"containers": [web(), {"name": "istio-proxy", "image": "nginx"}]})),
            "spec.containers[istio-proxy]: container belongs to another service mesh",
        ),
        (
            "only containers named like Moat's",
            attack_pod(json!({}), json!({"containers": [{"name": "moat-proxy", "image": "nginx"}]})),
            "moat-init and moat-proxy are reserved for Moat",
        ),
        (
            "runAsUser 7777",
            attack_pod(json!({}), json!({"containers": [{"name": "web", "image": "nginx", "securityContext": {"runAsUser": 7777}}]})),
            "spec.containers[web].securityContext.runAsUser=7777",
        ),
        (
            "runAsGroup 7777 (container)",
            attack_pod(json!({}), json!({"containers": [{"name": "web", "image": "nginx", "securityContext": {"runAsUser": 1000, "runAsGroup": 7777}}]})),
            "spec.containers[web].securityContext.runAsGroup=7777",
        ),
        (
            "runAsGroup 7777 (pod)",
            attack_pod(json!({}), json!({"securityContext": {"runAsGroup": 7777}, "containers": [web()]})),
            "spec.securityContext.runAsGroup=7777",
        ),
        (
            "runAsUser 7777 in an init container",
            attack_pod(json!({}), json!({"initContainers": [{"name": "setup", "image": "busybox", "securityContext": {"runAsUser": 7777}}], "containers": [web()]})),
            "spec.initContainers[setup].securityContext.runAsUser=7777",
        ),
        (
            "fsGroup 7777",
            attack_pod(json!({}), json!({"securityContext": {"fsGroup": 7777}, "containers": [web()]})),
            "spec.securityContext.fsGroup=7777",
        ),
        (
            "declared port 15020",
            attack_pod(json!({}), json!({"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 15020}]}]})),
            "spec.containers[web].ports: container port 15020 is reserved",
        ),
        (
            "volume named moat-run",
            attack_pod(json!({}), json!({"containers": [web()], "volumes": [{"name": "moat-run", "emptyDir": {}}]})),
            "spec.volumes[moat-run]",
        ),
        (
            "skip every outbound network",
            attack_pod(json!({"annotations": {"moat.dev/skip-outbound-cidrs": "0.0.0.0/0,::/0"}}), json!({"containers": [web()]})),
            "metadata.annotations[moat.dev/skip-outbound-cidrs]: 0.0.0.0/0,::/0 not in the platform's allow list",
        ),
        (
            "skip every outbound port",
            attack_pod(json!({"annotations": {"moat.dev/skip-outbound-ports": "1-65535"}}), json!({"containers": [web()]})),
            "metadata.annotations[moat.dev/skip-outbound-ports]: 1:65535 not in",
        ),
        (
            "skip every inbound port",
            attack_pod(json!({"annotations": {"moat.dev/skip-inbound-ports": "1-65535"}}), json!({"containers": [web()]})),
            "metadata.annotations[moat.dev/skip-inbound-ports]: 1:65535 not in",
        ),
        (
            "NET_ADMIN in the app",
            attack_pod(json!({}), json!({"containers": [{"name": "web", "image": "nginx", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]})),
            "spec.containers[web].securityContext.capabilities.add NET_ADMIN",
        ),
        (
            "NET_RAW in an init container",
            attack_pod(json!({}), json!({"initContainers": [{"name": "setup", "image": "busybox", "securityContext": {"capabilities": {"add": ["NET_RAW"]}}}], "containers": [web()]})),
            "spec.initContainers[setup].securityContext.capabilities.add NET_RAW",
        ),
        (
            "privileged app",
            attack_pod(json!({}), json!({"containers": [{"name": "web", "image": "nginx", "securityContext": {"privileged": true}}]})),
            "spec.containers[web].securityContext.privileged=true",
        ),
        (
            "Windows pod",
            attack_pod(json!({}), json!({"os": {"name": "windows"}, "containers": [web()]})),
            "spec.os.name=windows",
        ),
    ];
    for (what, pod, field) in &refused {
        let review = review_of(what, pod, "shop");
        let resp = review_at(&server, &pki.ca, &dir.0, "/inject", &review);
        assert_eq!(
            resp.response["allowed"], false,
            "{what}: admitted: {}",
            resp.response
        );
        assert!(resp.patch.is_none(), "{what}");
        assert_eq!(resp.response["status"]["code"], 403, "{what}");
        let msg = resp.response["status"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(field), "{what}: {msg}");
        assert!(
            msg.contains("namespace shop enforces the Moat mesh")
                && msg.contains("--allow-opt-out=shop="),
            "{what}: {msg}"
        );
    }

    // Moat's own parts are never trusted: a forged status annotation, a fake moat-proxy next
    // to the app, or both, get the real sidecar.
    for (what, pod) in [
        (
            "forged status annotation",
            attack_pod(
                json!({"annotations": {"moat.dev/injected": "{\"version\":\"0.1.0\",\"mode\":\"native\",\"containers\":[\"moat-init\",\"moat-proxy\"],\"volumes\":[],\"probes\":[]}"}}),
                json!({"containers": [web()]}),
            ),
        ),
        (
            "fake moat-proxy container",
            attack_pod(
                json!({}),
                json!({"containers": [web(), {"name": "moat-proxy", "image": "evil", "args": ["sleep", "inf"]}]}),
            ),
        ),
        (
            "fake moat-init doing nothing",
            attack_pod(
                json!({"annotations": {"moat.dev/injected": "{}"}}),
                json!({"initContainers": [{"name": "moat-init", "image": "busybox", "args": ["true"]}], "containers": [web()]}),
            ),
        ),
    ] {
        let review = review_of(what, &pod, "shop");
        let resp = review_at(&server, &pki.ca, &dir.0, "/inject", &review);
        assert_eq!(resp.response["allowed"], true, "{what}: {}", resp.response);
        let patch = resp
            .patch
            .unwrap_or_else(|| panic!("{what}: admitted unmodified"));
        let result = apply_rust(&pod, &patch);
        let init = &result["spec"]["initContainers"];
        assert_eq!(init[0]["name"], "moat-init", "{what}");
        assert_eq!(
            init[0]["image"], "ghcr.io/moat-mesh/moat-proxy:0.1.0",
            "{what}"
        );
        assert_eq!(init[0]["args"][0], "init", "{what}");
        assert_eq!(init[1]["name"], "moat-proxy", "{what}");
        assert_eq!(init[1]["args"], json!(["run"]), "{what}");
        let all: Vec<&Value> = result["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(init.as_array().into_iter().flatten())
            .collect();
        assert_eq!(
            all.iter().filter(|c| c["name"] == "moat-proxy").count(),
            1,
            "{what}"
        );
        assert_eq!(
            all.iter().filter(|c| c["name"] == "moat-init").count(),
            1,
            "{what}"
        );
        // DNS over TCP is uncaptured only to the cluster DNS, not port 53 everywhere.
        let args: Vec<&str> = init[0]["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            args.windows(2)
                .any(|w| w == ["--exclude-outbound-endpoints", "10.96.0.10/32=53"]),
            "{args:?}"
        );
        assert!(!args.contains(&"--exclude-outbound-ports"), "{args:?}");
        // The injected pod sent again (API server re-invocation) is left as it is.
        let again = review_of("again", &result, "shop");
        let resp = review_at(&server, &pki.ca, &dir.0, "/inject", &again);
        assert_eq!(resp.response["allowed"], true);
        assert!(resp.patch.is_none(), "{what}: re-invocation patched again");
    }

    // Fail-open paths are closed by default: an undecodable pod, a CREATE without an object,
    // an undecodable request.
    let mut undecodable = review_of(
        "u",
        &attack_pod(json!({}), json!({"containers": [web()]})),
        "shop",
    );
    undecodable["request"]["object"]["spec"]["containers"] = json!("web");
    let mut no_object = review_of(
        "n",
        &attack_pod(json!({}), json!({"containers": [web()]})),
        "shop",
    );
    no_object["request"]["object"] = Value::Null;
    let mut bad_request = review_of(
        "b",
        &attack_pod(json!({}), json!({"containers": [web()]})),
        "shop",
    );
    bad_request["request"]["operation"] = json!("SMUGGLE");
    for (what, review) in [
        ("undecodable pod", &undecodable),
        ("no object", &no_object),
        ("undecodable request", &bad_request),
    ] {
        let resp = review_at(&server, &pki.ca, &dir.0, "/inject", review);
        assert_eq!(resp.response["allowed"], false, "{what}: {}", resp.response);
        assert_eq!(resp.response["status"]["code"], 500, "{what}");
    }

    // Outside enforcing namespaces (pod opt-in, /inject/opt-in) the pod's own opt-out holds.
    let pod = attack_pod(
        json!({"labels": {"moat.dev/inject": "enabled"}, "annotations": {"moat.dev/inject": "disabled"}}),
        json!({"containers": [web()]}),
    );
    let resp = review_at(
        &server,
        &pki.ca,
        &dir.0,
        "/inject/opt-in",
        &review_of("o", &pod, "dev"),
    );
    assert_eq!(resp.response["allowed"], true);
    assert!(resp.patch.is_none());

    let (status, metrics) = curl(&[&format!("http://{}/metrics", server.admin)]);
    assert_eq!(status, 200);
    for m in [
        "moat_injector_refusals_total{reason=\"opted_out\"} 2",
        "moat_injector_refusals_total{reason=\"proxy_uid_conflict\"} 5",
        "moat_injector_refusals_total{reason=\"net_admin\"} 3",
        "moat_injector_refusals_total{reason=\"exclusion_not_allowed\"} 3",
        "moat_injector_refusals_total{reason=\"name_conflict\"} 2",
        "moat_injector_admission_duration_seconds_bucket{result=\"refused\"",
        "moat_injector_errors_total{reason=\"missing_object\"} 1",
    ] {
        assert!(metrics.contains(m), "{m} missing from:\n{metrics}");
    }
}

/// What the platform team allows (by flag, per namespace or everywhere) is admitted, with a
/// warning naming the allowance; everything else stays refused.
#[test]
fn platform_allowances_admit_named_opt_outs_with_a_warning() {
    let (dir, pki, server) = attack_server(&[
        "--allow-opt-out",
        "legacy=inject-disabled,proxy-uid",
        "--allow-opt-out",
        "net-admin",
        "--allow-skip-outbound-cidrs",
        "192.168.0.0/16",
        "--allow-skip-inbound-ports",
        "22",
    ]);
    let opted_out = attack_pod(
        json!({"labels": {"moat.dev/inject": "disabled"}}),
        json!({"containers": [web()]}),
    );
    // Allowed in legacy: admitted without the mesh, with a warning.
    let resp = review_at(
        &server,
        &pki.ca,
        &dir.0,
        "/inject",
        &review_of("a", &opted_out, "legacy"),
    );
    assert_eq!(resp.response["allowed"], true, "{}", resp.response);
    assert!(resp.patch.is_none());
    assert!(
        resp.warnings()
            .contains("allowed by the platform (inject-disabled)"),
        "{}",
        resp.warnings()
    );
    // Not in shop.
    let resp = review_at(
        &server,
        &pki.ca,
        &dir.0,
        "/inject",
        &review_of("b", &opted_out, "shop"),
    );
    assert_eq!(resp.response["allowed"], false);
    // NET_ADMIN allowed everywhere: injected anyway, with a warning.
    let admin = attack_pod(
        json!({}),
        json!({"containers": [{"name": "web", "image": "nginx", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}),
    );
    let resp = review_at(
        &server,
        &pki.ca,
        &dir.0,
        "/inject",
        &review_of("c", &admin, "shop"),
    );
    assert_eq!(resp.response["allowed"], true);
    assert!(
        resp.patch.is_some(),
        "NET_ADMIN allowed must still be injected"
    );
    assert!(
        resp.warnings()
            .contains("allowed by the platform (net-admin)"),
        "{}",
        resp.warnings()
    );
    // Exclusions inside the allow lists are honoured; outside them refused.
    let inside = attack_pod(
        json!({"annotations": {"moat.dev/skip-outbound-cidrs": "192.168.10.0/24", "moat.dev/skip-inbound-ports": "22"}}),
        json!({"containers": [web()]}),
    );
    let resp = review_at(
        &server,
        &pki.ca,
        &dir.0,
        "/inject",
        &review_of("d", &inside, "shop"),
    );
    let patch = resp.patch.expect("injected");
    let result = apply_rust(&inside, &patch);
    let args = result["spec"]["initContainers"][0]["args"].to_string();
    assert!(
        args.contains("\"--exclude-outbound-cidrs\",\"10.96.0.1/32,192.168.10.0/24\""),
        "{args}"
    );
    assert!(
        args.contains("\"--exclude-inbound-ports\",\"22\""),
        "{args}"
    );
    let outside = attack_pod(
        json!({"annotations": {"moat.dev/skip-outbound-cidrs": "192.0.0.0/8"}}),
        json!({"containers": [web()]}),
    );
    let resp = review_at(
        &server,
        &pki.ca,
        &dir.0,
        "/inject",
        &review_of("e", &outside, "shop"),
    );
    assert_eq!(resp.response["allowed"], false);
    let msg = resp.response["status"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("--allow-skip-outbound-cidrs: 192.168.0.0/16"),
        "{msg}"
    );
}
