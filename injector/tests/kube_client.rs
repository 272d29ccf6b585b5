//! The minimal Kubernetes API client that keeps the webhook's caBundle in sync. No live API
//! server is involved: request building and the caBundle patch are checked against a
//! recorded-shape MutatingWebhookConfiguration (tests/data/), and the HTTP exchange runs against
//! a local HTTPS server that behaves like the API server for GET and JSON-patch PATCH.

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use moat_injector::kube::{self, KubeClient, KubeError};
use serde_json::{json, Value};

fn recorded() -> Value {
    serde_json::from_str(include_str!("data/mutatingwebhookconfiguration.json")).expect("fixture")
}

const PEM: &str = "-----BEGIN CERTIFICATE-----\nNEW\n-----END CERTIFICATE-----\n";

#[test]
fn ca_bundle_patch_for_the_recorded_configuration() {
    let config = recorded();
    let b64 = base64::engine::general_purpose::STANDARD.encode(PEM);
    let patch = kube::ca_bundle_patch(&config, PEM).expect("a patch");
    assert_eq!(
        patch,
        json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "48213"},
            {"op": "test", "path": "/webhooks/0/name", "value": "namespace.inject.moat.dev"},
            {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": b64},
            {"op": "test", "path": "/webhooks/1/name", "value": "object.inject.moat.dev"},
            {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": b64},
        ])
    );
    // Applied (as the API server would), the configuration is in sync: no further patch.
    let p: json_patch::Patch = serde_json::from_value(patch).expect("patch");
    let mut updated = config.clone();
    json_patch::patch(&mut updated, &p).expect("applies to the recorded object");
    assert_eq!(
        updated["webhooks"][1]["clientConfig"]["service"]["path"],
        "/inject"
    );
    assert!(kube::ca_bundle_patch(&updated, PEM).is_none());
    // Only what differs is patched.
    let mut one_stale = updated.clone();
    one_stale["webhooks"][0]["clientConfig"]["caBundle"] = json!("c3RhbGU=");
    let p = kube::ca_bundle_patch(&one_stale, PEM).expect("patch");
    assert_eq!(p.as_array().map(Vec::len), Some(3));
    // A concurrent change (resourceVersion moved on) makes the patch fail instead of writing.
    let mut moved = config.clone();
    moved["metadata"]["resourceVersion"] = json!("48999");
    let p: json_patch::Patch =
        serde_json::from_value(kube::ca_bundle_patch(&config, PEM).expect("patch")).expect("patch");
    assert!(json_patch::patch(&mut moved, &p).is_err());
    // No webhooks: nothing to do.
    assert!(kube::ca_bundle_patch(&json!({"metadata": {}}), PEM).is_none());
}

#[test]
fn requests_are_built_like_kubectl_would() {
    let get = kube::get_request("10.96.0.1:443", "moat-injector", "tok\n").expect("request");
    assert_eq!(get.method(), http::Method::GET);
    assert_eq!(
        get.uri().path(),
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/moat-injector"
    );
    assert_eq!(get.headers()["authorization"], "Bearer tok");
    assert_eq!(get.headers()["host"], "10.96.0.1:443");
    assert_eq!(get.headers()["accept"], "application/json");

    let patch =
        json!([{"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": "eA=="}]);
    let req =
        kube::patch_request("10.96.0.1:443", "moat-injector", "tok", &patch).expect("request");
    assert_eq!(req.method(), http::Method::PATCH);
    assert_eq!(req.headers()["content-type"], "application/json-patch+json");
    let body = futures_body(req.into_body());
    assert_eq!(serde_json::from_slice::<Value>(&body).expect("json"), patch);

    for bad in ["", "Moat", "a/b", "../x", "-x", &"a".repeat(254)] {
        assert!(
            matches!(
                kube::get_request("h:1", bad, "t"),
                Err(KubeError::InvalidName(_))
            ),
            "{bad}"
        );
    }
}

fn futures_body(body: Full<Bytes>) -> Bytes {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(async {
            body.collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default()
        })
}

#[test]
fn api_errors_carry_the_status_message() {
    let e = kube::interpret(403, include_bytes!("data/forbidden.json")).unwrap_err();
    match e {
        KubeError::Status { status, message } => {
            assert_eq!(status, 403);
            assert!(message.contains("cannot patch resource"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        kube::interpret(200, b"not json"),
        Err(KubeError::BadResponse(_))
    ));
    assert!(kube::interpret(200, b"{}").is_ok());
}

/// What the fake API server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    auth: String,
    content_type: String,
}

struct FakeApi {
    object: Mutex<Value>,
    seen: Mutex<Vec<Seen>>,
    forbid_patch: bool,
}

async fn api(
    state: Arc<FakeApi>,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |h: &str| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    state.seen.lock().expect("lock").push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        auth: header("authorization"),
        content_type: header("content-type"),
    });
    let reply = |code: u16, body: Vec<u8>| {
        let mut r = http::Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = http::StatusCode::from_u16(code).expect("status");
        r
    };
    let status = |code: u16, msg: &str| {
        reply(code, serde_json::to_vec(&json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": msg, "code": code})).expect("json"))
    };
    if header("authorization") != "Bearer test-token" {
        return status(401, "Unauthorized");
    }
    if parts.uri.path()
        != "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/moat-injector"
    {
        return status(404, "not found");
    }
    match parts.method.as_str() {
        "GET" => reply(
            200,
            serde_json::to_vec(&*state.object.lock().expect("lock")).expect("json"),
        ),
        "PATCH" if state.forbid_patch => reply(403, include_bytes!("data/forbidden.json").to_vec()),
        "PATCH" if header("content-type") == "application/json-patch+json" => {
            let Ok(patch) = serde_json::from_slice::<json_patch::Patch>(&body) else {
                return status(400, "bad patch");
            };
            let mut obj = state.object.lock().expect("lock");
            let mut next = obj.clone();
            if let Err(e) = json_patch::patch(&mut next, &patch) {
                return status(422, &e.to_string());
            }
            let rv: u64 = next["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            next["metadata"]["resourceVersion"] = json!((rv + 1).to_string());
            *obj = next.clone();
            reply(200, serde_json::to_vec(&next).expect("json"))
        }
        _ => status(415, "unsupported"),
    }
}

async fn fake_api_server(forbid_patch: bool) -> (KubeClient, Arc<FakeApi>, TempDir) {
    let dir = TempDir::new("fakeapi");
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("leaf");
    std::fs::write(dir.0.join("ca.crt"), ca.pem()).expect("write");
    std::fs::write(dir.0.join("token"), "test-token\n").expect("write");

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("cert");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let state = Arc::new(FakeApi {
        object: Mutex::new(recorded()),
        seen: Mutex::new(Vec::new()),
        forbid_patch,
    });
    let st = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let st = st.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |req| {
                    let st = st.clone();
                    async move { Ok::<_, Infallible>(api(st, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let client = KubeClient::new(
        "127.0.0.1".into(),
        port,
        dir.0.join("token"),
        dir.0.join("ca.crt"),
    );
    (client, state, dir)
}

#[tokio::test]
async fn syncs_the_ca_bundle_over_https() {
    let (client, state, _dir) = fake_api_server(false).await;
    assert!(client
        .sync_ca_bundle("moat-injector", PEM)
        .await
        .expect("first sync"));
    let b64 = base64::engine::general_purpose::STANDARD.encode(PEM);
    {
        let obj = state.object.lock().expect("lock");
        for w in obj["webhooks"].as_array().expect("webhooks") {
            assert_eq!(w["clientConfig"]["caBundle"], b64.as_str());
        }
        assert_eq!(obj["metadata"]["resourceVersion"], "48214");
    }
    // In sync: only a GET.
    assert!(!client
        .sync_ca_bundle("moat-injector", PEM)
        .await
        .expect("second sync"));
    let seen = state.seen.lock().expect("lock").clone();
    let calls: Vec<(String, String)> = seen
        .iter()
        .map(|s| (s.method.clone(), s.content_type.clone()))
        .collect();
    assert_eq!(
        calls,
        [
            ("GET".to_string(), String::new()),
            (
                "PATCH".to_string(),
                "application/json-patch+json".to_string()
            ),
            ("GET".to_string(), String::new()),
        ]
    );
    assert!(seen.iter().all(|s| s.auth == "Bearer test-token"));
    assert!(seen.iter().all(|s| s
        .path
        .ends_with("/mutatingwebhookconfigurations/moat-injector")));
    // A root rotation (new bundle) is synced again.
    assert!(client
        .sync_ca_bundle("moat-injector", &format!("{PEM}{PEM}"))
        .await
        .expect("rotation"));
}

#[tokio::test]
async fn reports_rbac_and_transport_errors() {
    let (client, _state, _dir) = fake_api_server(true).await;
    let e = client
        .sync_ca_bundle("moat-injector", PEM)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("403") && e.to_string().contains("cannot patch"),
        "{e}"
    );
    let e = client.get_webhook_config("other").await.unwrap_err();
    assert!(matches!(e, KubeError::Status { status: 404, .. }), "{e}");

    let nowhere = KubeClient::new(
        "127.0.0.1".into(),
        1,
        "/nonexistent/token".into(),
        "/nonexistent/ca".into(),
    );
    let e = nowhere
        .get_webhook_config("moat-injector")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/token"), "{e}");
}
