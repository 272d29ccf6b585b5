//! Bad input and internal failures: the webhook answers with a well-formed AdmissionReview
//! whenever it knows the request uid, a 4xx JSON error otherwise, and never panics.

mod common;

use common::*;
use moat_injector::admission::{self, review_with, MAX_BODY};
use moat_injector::config::{FailureMode, InjectConfig, SidecarMode};
use moat_injector::inject::{Context, InjectError, Outcome, Scope};
use moat_injector::webhook::Webhook;
use serde_json::{json, Value};

fn pod_review() -> Value {
    review_of(
        "3b9c1f0e-0000-4000-8000-000000000001",
        &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "app", "image": "nginx"}]}}),
        "default",
    )
}

fn body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

fn error_of(reply: &admission::Reply) -> (&str, &str) {
    (
        reply.body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {}", reply.body)),
        reply.body["message"].as_str().unwrap_or(""),
    )
}

#[test]
fn bodies_without_a_usable_review_get_4xx_json() {
    let cfg = config(SidecarMode::Native);
    let mut v1beta1 = pod_review();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut no_request = pod_review();
    no_request
        .as_object_mut()
        .expect("object")
        .remove("request");
    let mut no_uid = pod_review();
    no_uid["request"]
        .as_object_mut()
        .expect("object")
        .remove("uid");
    let mut empty_uid = pod_review();
    empty_uid["request"]["uid"] = json!("");
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("not json", b"hello".to_vec(), 400, "invalid_json"),
        ("empty", Vec::new(), 400, "invalid_json"),
        (
            "truncated",
            body(&pod_review())[..40].to_vec(),
            400,
            "invalid_json",
        ),
        ("array", b"[1,2]".to_vec(), 400, "wrong_review_type"),
        ("v1beta1", body(&v1beta1), 400, "wrong_review_type"),
        (
            "pod instead of review",
            body(&pod_review()["request"]["object"]),
            400,
            "wrong_review_type",
        ),
        ("no request", body(&no_request), 400, "missing_request"),
        ("no uid", body(&no_uid), 400, "missing_uid"),
        ("empty uid", body(&empty_uid), 400, "missing_uid"),
    ];
    for (what, b, status, error) in cases {
        let reply = admission::review(&b, &cfg, FailureMode::Open);
        assert_eq!(reply.status, status, "{what}: {}", reply.body);
        let (e, msg) = error_of(&reply);
        assert_eq!(e, error, "{what}");
        assert!(!msg.is_empty(), "{what}: no message");
    }
}

#[test]
fn undecodable_request_with_a_uid_is_admitted_with_a_warning() {
    let cfg = config(SidecarMode::Native);
    let mut r = pod_review();
    r["request"]["operation"] = json!("EXPLODE");
    r["request"]
        .as_object_mut()
        .expect("object")
        .remove("userInfo");
    let reply = admission::review(&body(&r), &cfg, FailureMode::Open);
    let resp = check_envelope(&r, &reply);
    assert_eq!(resp.response["allowed"], true);
    assert!(resp.patch.is_none());
    assert!(
        resp.warnings().contains("request not understood"),
        "{}",
        resp.warnings()
    );
}

#[test]
fn transport_checks() {
    let wh = Webhook::new(config(SidecarMode::Native), FailureMode::Open);
    let ok = body(&pod_review());
    let post = http::Method::POST;
    let json_ct = Some("application/json");
    assert_eq!(wh.answer(&post, "/inject", json_ct, Ok(&ok)).status, 200);
    assert_eq!(
        wh.answer(
            &post,
            "/inject",
            Some("application/json; charset=utf-8"),
            Ok(&ok)
        )
        .status,
        200
    );
    let r = wh.answer(&post, "/inject", Some("text/plain"), Ok(&ok));
    assert_eq!((r.status, error_of(&r).0), (415, "unsupported_media_type"));
    let r = wh.answer(&post, "/inject", None, Ok(&ok));
    assert_eq!(r.status, 415);
    let r = wh.answer(&http::Method::GET, "/inject", json_ct, Ok(&ok));
    assert_eq!((r.status, error_of(&r).0), (405, "method_not_allowed"));
    assert_eq!(
        wh.answer(&post, "/inject/opt-in", json_ct, Ok(&ok)).status,
        200
    );
    let r = wh.answer(&post, "/inject/other", json_ct, Ok(&ok));
    assert_eq!((r.status, error_of(&r).0), (404, "not_found"));
    let r = wh.answer(&post, "/mutate", json_ct, Ok(&ok));
    assert_eq!((r.status, error_of(&r).0), (404, "not_found"));
    let r = wh.answer(
        &post,
        "/inject",
        json_ct,
        Err(admission::BadRequest::TooLarge),
    );
    assert_eq!((r.status, error_of(&r).0), (413, "body_too_large"));
    assert!(error_of(&r).1.contains(&MAX_BODY.to_string()));
}

fn failing(_: &Value, _: &Context, _: &InjectConfig) -> Result<Outcome, InjectError> {
    Err(InjectError::Result("simulated bug".into()))
}

fn panicking(_: &Value, _: &Context, _: &InjectConfig) -> Result<Outcome, InjectError> {
    panic!("simulated panic")
}

#[test]
fn internal_failure_open_admits_unmodified_with_a_warning() {
    let cfg = config(SidecarMode::Native);
    let r = pod_review();
    for injector in [failing as admission::Injector, panicking] {
        let reply = review_with(
            &body(&r),
            &cfg,
            FailureMode::Open,
            Scope::Enforcing,
            injector,
        );
        let resp = check_envelope(&r, &reply);
        assert_eq!(resp.response["allowed"], true);
        assert!(resp.patch.is_none());
        assert!(
            resp.warnings().contains("WITHOUT the mesh sidecar"),
            "{}",
            resp.warnings()
        );
    }
}

#[test]
fn internal_failure_closed_refuses_the_pod() {
    let cfg = config(SidecarMode::Native);
    let r = pod_review();
    for injector in [failing as admission::Injector, panicking] {
        let reply = review_with(
            &body(&r),
            &cfg,
            FailureMode::Closed,
            Scope::Enforcing,
            injector,
        );
        let resp = check_envelope(&r, &reply);
        assert_eq!(resp.response["allowed"], false);
        assert!(resp.patch.is_none());
        assert_eq!(resp.response["status"]["code"], 500);
        assert!(
            resp.response["status"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("moat-injector failed to inject")),
            "{}",
            resp.response
        );
    }
}

/// A pod, a request or a CREATE the injector cannot read reaches no namespace unmeshed with
/// `--failure-mode closed`; with `open` it is admitted unchanged with a warning.
#[test]
fn unreadable_requests_honour_the_failure_mode() {
    let cfg = config(SidecarMode::Native);
    let mut undecodable_pod = pod_review();
    undecodable_pod["request"]["object"]["spec"]["containers"] = json!("not a list");
    let mut undecodable_request = pod_review();
    undecodable_request["request"]["operation"] = json!("EXPLODE");
    let mut no_object = pod_review();
    no_object["request"]["object"] = Value::Null;
    let mut not_an_object = pod_review();
    not_an_object["request"]["object"] = json!("pod");
    for (what, r, text) in [
        ("undecodable pod", &undecodable_pod, "pod not understood"),
        ("undecodable request", &undecodable_request, "request"),
        ("no object", &no_object, "CREATE without an object"),
        ("object not a map", &not_an_object, ""),
    ] {
        let closed = check_envelope(r, &admission::review(&body(r), &cfg, FailureMode::Closed));
        assert_eq!(
            closed.response["allowed"], false,
            "{what}: {}",
            closed.response
        );
        assert!(closed.patch.is_none(), "{what}");
        assert_eq!(closed.response["status"]["code"], 500, "{what}");
        let msg = closed.response["status"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains("--failure-mode closed") && msg.contains(text),
            "{what}: {msg}"
        );
        let open = check_envelope(r, &admission::review(&body(r), &cfg, FailureMode::Open));
        assert_eq!(open.response["allowed"], true, "{what}");
        assert!(open.patch.is_none(), "{what}");
        assert!(
            open.warnings().contains("without sidecar"),
            "{what}: {}",
            open.warnings()
        );
    }
}

#[test]
fn oversized_and_deeply_nested_bodies_do_not_panic() {
    let cfg = config(SidecarMode::Native);
    let deep = "[".repeat(100_000);
    let reply = admission::review(deep.as_bytes(), &cfg, FailureMode::Open);
    assert_eq!(reply.status, 400);
    let mut r = pod_review();
    r["request"]["object"]["metadata"]["annotations"] = json!({"big": "x".repeat(900_000)});
    let reply = admission::review(&body(&r), &cfg, FailureMode::Open);
    assert_eq!(reply.status, 200);
}
