//! AdmissionReview in, AdmissionReview out: request validation, the skip rules that depend on
//! the request (operation, kind, sub-resource), the failure mode, and the response encoding.
//!
//! Whatever the input, the answer is either a well-formed `admission.k8s.io/v1`
//! AdmissionReview echoing the request's uid, or (when there is no uid to echo) a 4xx with a
//! JSON `{"error", "message"}` body. A patch is only ever returned after it was applied to the
//! pod here, so the API server never receives a patch that does not apply.

use std::borrow::Cow;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube_core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use kube_core::{ClusterResourceScope, Resource, TypeMeta};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{json, Value};

use crate::annotations::warning;
use crate::config::{FailureMode, InjectConfig};
use crate::enforce::Violation;
use crate::inject::{self, Context, Decision, InjectError, Scope};
use crate::metrics;

/// Largest request body accepted (1 MiB; a Pod is far smaller).
pub const MAX_BODY: usize = 1 << 20;
/// The only AdmissionReview version served.
pub const API_VERSION: &str = "admission.k8s.io/v1";
/// The AdmissionReview kind.
pub const KIND: &str = "AdmissionReview";

/// An HTTP answer: status code and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Value,
}

/// A request that cannot be answered with an AdmissionReview.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    /// The body is not JSON.
    #[error("request body is not JSON: {0}")]
    InvalidJson(String),
    /// Not an `admission.k8s.io/v1` AdmissionReview.
    #[error("expected apiVersion admission.k8s.io/v1 kind AdmissionReview, got {api_version:?} {kind:?} (set admissionReviewVersions: [v1])")]
    WrongType {
        /// The apiVersion received.
        api_version: String,
        /// The kind received.
        kind: String,
    },
    /// No `request` member.
    #[error("AdmissionReview has no request")]
    MissingRequest,
    /// No `request.uid` to echo.
    #[error("AdmissionReview request has no uid")]
    MissingUid,
    /// The body is larger than [`MAX_BODY`].
    #[error("request body exceeds {MAX_BODY} bytes")]
    TooLarge,
    /// The content type is not JSON.
    #[error("content type must be application/json, got {0:?}")]
    ContentType(String),
    /// A path other than `/inject`.
    #[error("no such path {0:?}: the webhook is POST /inject")]
    NotFound(String),
    /// A method other than POST.
    #[error("method {0} not allowed: the webhook is POST /inject")]
    MethodNotAllowed(String),
}

impl BadRequest {
    /// Metric label and `error` field.
    pub fn label(&self) -> &'static str {
        match self {
            BadRequest::InvalidJson(_) => "invalid_json",
            BadRequest::WrongType { .. } => "wrong_review_type",
            BadRequest::MissingRequest => "missing_request",
            BadRequest::MissingUid => "missing_uid",
            BadRequest::TooLarge => "body_too_large",
            BadRequest::ContentType(_) => "unsupported_media_type",
            BadRequest::NotFound(_) => "not_found",
            BadRequest::MethodNotAllowed(_) => "method_not_allowed",
        }
    }

    /// HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            BadRequest::TooLarge => 413,
            BadRequest::ContentType(_) => 415,
            BadRequest::NotFound(_) => 404,
            BadRequest::MethodNotAllowed(_) => 405,
            _ => 400,
        }
    }

    /// The JSON error reply (counted as an error).
    pub fn reply(&self) -> Reply {
        metrics::error(self.label());
        Reply {
            status: self.status(),
            body: json!({"error": self.label(), "message": self.to_string()}),
        }
    }
}

/// The injection function [`review_with`] calls (normally [`inject::inject_in`]).
pub type Injector = fn(&Value, &Context, &InjectConfig) -> Result<inject::Outcome, InjectError>;

/// Answers one AdmissionReview body for a mesh-enforcing namespace ([`Scope::Enforcing`]).
pub fn review(body: &[u8], cfg: &InjectConfig, failure: FailureMode) -> Reply {
    review_in(body, cfg, failure, Scope::Enforcing)
}

/// Answers one AdmissionReview body under the rules of `scope`.
pub fn review_in(body: &[u8], cfg: &InjectConfig, failure: FailureMode, scope: Scope) -> Reply {
    review_with(body, cfg, failure, scope, inject::inject_in)
}

/// [`review_in`] with another injection function (used to test the failure modes).
pub fn review_with(
    body: &[u8],
    cfg: &InjectConfig,
    failure: FailureMode,
    scope: Scope,
    injector: Injector,
) -> Reply {
    let start = Instant::now();
    let (reply, result) = match review_inner(body, cfg, failure, scope, injector) {
        Ok(r) => r,
        Err(bad) => {
            tracing::warn!(error = bad.label(), message = %bad, "bad admission request");
            (bad.reply(), "bad_request")
        }
    };
    ::metrics::histogram!(metrics::ADMISSION_DURATION, "result" => result)
        .record(start.elapsed().as_secs_f64());
    reply
}

fn review_inner(
    body: &[u8],
    cfg: &InjectConfig,
    failure: FailureMode,
    scope: Scope,
    injector: Injector,
) -> Result<(Reply, &'static str), BadRequest> {
    let mut raw: Value =
        serde_json::from_slice(body).map_err(|e| BadRequest::InvalidJson(e.to_string()))?;
    let field = |k: &str| raw.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version != API_VERSION || kind != KIND {
        return Err(BadRequest::WrongType { api_version, kind });
    }
    let request = raw
        .get("request")
        .filter(|r| r.is_object())
        .ok_or(BadRequest::MissingRequest)?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or(BadRequest::MissingUid)?
        .to_string();

    let typed = typed_request(&raw, request, api_version, kind);
    let req = match typed {
        Ok(req) => req,
        Err(e) => {
            metrics::error("undecodable_request");
            tracing::warn!(%uid, error = %e, failure_mode = ?failure, "admission request not understood");
            let reply = match failure {
                FailureMode::Open => bare_allow(
                    &uid,
                    vec![warning(format!(
                        "moat-injector: request not understood, pod admitted without sidecar: {e}"
                    ))],
                ),
                FailureMode::Closed => {
                    let mut r = AdmissionResponse::invalid(format!(
                        "moat-injector cannot read the admission request (pod refused, --failure-mode closed): {e}"
                    ));
                    r.uid = uid.clone();
                    r.result.code = 500;
                    r.result.reason = "InternalError".into();
                    encode(r)
                }
            };
            return Ok((reply, "error"));
        }
    };
    // The pod is moved out rather than copied: nothing reads the raw review after this.
    let object = raw
        .get_mut("request")
        .and_then(|r| r.get_mut("object"))
        .map(Value::take);
    Ok(decide(&req, object, cfg, failure, scope, injector))
}

/// The typed request, accepting and rejecting exactly what decoding the whole review as
/// `AdmissionReview<DynamicObject>` would, without building a copy of the review or the pod.
fn typed_request(
    raw: &Value,
    request: &Value,
    api_version: String,
    kind: String,
) -> Result<AdmissionRequest<ObjectShape>, String> {
    // An unused `response` member still has to decode, as it did inside the whole review.
    if let Some(response) = raw.get("response") {
        Option::<AdmissionResponse>::deserialize(response).map_err(|e| e.to_string())?;
    }
    let mut req =
        AdmissionRequest::<ObjectShape>::deserialize(request).map_err(|e| e.to_string())?;
    req.types = TypeMeta { api_version, kind };
    Ok(req)
}

/// What the request's `object` and `oldObject` must be to decode as a `DynamicObject` (a map
/// whose `metadata`, if any, is an `ObjectMeta`; every other key is accepted as is). The pod
/// itself is read by the injector from the raw JSON, so it is checked here, never copied.
#[derive(Debug, Clone, Default)]
struct ObjectShape {
    metadata: ObjectMeta,
}

impl<'de> Deserialize<'de> for ObjectShape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ShapeVisitor;
        impl<'de> Visitor<'de> for ShapeVisitor {
            type Value = ObjectShape;
            // The same wording as `DynamicObject`, so the warnings do not change.
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("struct DynamicObject")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ObjectShape, A::Error> {
                let mut shape = ObjectShape::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "metadata" {
                        shape.metadata = map.next_value()?;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(shape)
            }
        }
        d.deserialize_map(ShapeVisitor)
    }
}

impl Resource for ObjectShape {
    type DynamicType = ();
    type Scope = ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A response built without a decodable request (only the uid is known).
fn bare_allow(uid: &str, warnings: Vec<String>) -> Reply {
    Reply {
        status: 200,
        body: json!({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "response": {"uid": uid, "allowed": true, "warnings": warnings},
        }),
    }
}

/// Encodes a response review; `patch` becomes base64 as Kubernetes expects for `[]byte`.
fn encode(mut resp: AdmissionResponse) -> Reply {
    // Serialized as-is, `Vec<u8>` would become a JSON array of numbers, one per byte.
    let patch = resp.patch.take();
    let mut body = serde_json::to_value(resp.into_review()).unwrap_or_else(|_| json!({}));
    if let (Some(patch), Some(Value::Object(r))) = (patch, body.get_mut("response")) {
        r.insert(
            "patch".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(patch)),
        );
    }
    Reply { status: 200, body }
}

fn with_warnings(mut resp: AdmissionResponse, warnings: Vec<String>) -> AdmissionResponse {
    if !warnings.is_empty() {
        resp.warnings = Some(warnings);
    }
    resp
}

fn decide(
    req: &AdmissionRequest<ObjectShape>,
    object: Option<Value>,
    cfg: &InjectConfig,
    failure: FailureMode,
    scope: Scope,
    injector: Injector,
) -> (Reply, &'static str) {
    let allow = AdmissionResponse::from(req);
    let skip = |reason: &'static str, warnings: Vec<String>| {
        metrics::skipped(reason);
        (encode(with_warnings(allow.clone(), warnings)), "skipped")
    };
    if req.operation != Operation::Create {
        return skip("operation", Vec::new());
    }
    let is_pod =
        req.kind.group.is_empty() && req.kind.kind == "Pod" && req.resource.resource == "pods";
    if !is_pod {
        let w = warning(format!(
            "moat-injector only mutates Pods; {}/{} {} left unchanged",
            req.kind.group, req.kind.version, req.kind.kind
        ));
        return skip("not_pod", vec![w]);
    }
    if req.sub_resource.as_deref().is_some_and(|s| !s.is_empty()) {
        return skip("subresource", Vec::new());
    }
    let Some(object) = object.filter(Value::is_object) else {
        return unreadable(
            req,
            &req.name,
            req.namespace.as_deref().unwrap_or(""),
            "missing_object",
            "CREATE without an object".into(),
            failure,
        );
    };
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|ns| !ns.is_empty())
        .or(req.namespace.as_deref())
        .filter(|ns| !ns.is_empty())
        .map(str::to_string);
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .or_else(|| {
            object
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_else(|| req.name.clone());
    let ns_label = namespace.as_deref().unwrap_or("");

    let ctx = Context {
        namespace: namespace.as_deref(),
        scope,
    };
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| injector(&object, &ctx, cfg)))
        .unwrap_or_else(|_| Err(InjectError::Result("panic while injecting".into())));
    match outcome {
        Ok(o) => match o.decision {
            Decision::Refuse(violations) => refuse(req, &name, ns_label, &violations, o.warnings),
            Decision::Skip(reason) => {
                tracing::info!(uid = %req.uid, namespace = ns_label, pod = %name, reason = reason.label(), warnings = ?o.warnings, dry_run = req.dry_run, "pod not injected");
                skip(reason.label(), o.warnings)
            }
            Decision::Inject(injection) => {
                // Re-apply the finished patch to the original object, as the API server will,
                // so a patch-builder bug can never reach it. The original is not needed after
                // this, so it is patched in place instead of copied.
                let mut check = object;
                let applies = json_patch::patch(&mut check, &injection.patch).is_ok()
                    && check == injection.patched;
                let resp = if applies {
                    with_warnings(allow.clone(), o.warnings.clone()).with_patch(injection.patch)
                } else {
                    return internal(
                        req,
                        &name,
                        ns_label,
                        InjectError::Result("patch does not reproduce the pod".into()),
                        failure,
                    );
                };
                match resp {
                    Ok(resp) => {
                        ::metrics::counter!(metrics::INJECTIONS).increment(1);
                        tracing::info!(uid = %req.uid, namespace = ns_label, pod = %name, mode = %injection.status.mode, probes = injection.status.probes.len(), warnings = ?o.warnings, dry_run = req.dry_run, "pod injected");
                        (encode(resp), "injected")
                    }
                    Err(e) => internal(
                        req,
                        &name,
                        ns_label,
                        InjectError::Result(e.to_string()),
                        failure,
                    ),
                }
            }
        },
        Err(InjectError::Decode(e)) => unreadable(
            req,
            &name,
            ns_label,
            "undecodable_object",
            format!("pod not understood: {e}"),
            failure,
        ),
        Err(e) => internal(req, &name, ns_label, e, failure),
    }
}

/// A pod refused in an enforcing namespace: every violation is named with its field and fix,
/// counted and logged.
fn refuse(
    req: &AdmissionRequest<ObjectShape>,
    name: &str,
    namespace: &str,
    violations: &[Violation],
    warnings: Vec<String>,
) -> (Reply, &'static str) {
    let mut reasons: Vec<&'static str> = violations.iter().map(|v| v.what.label()).collect();
    reasons.dedup();
    for r in &reasons {
        metrics::refused(r);
    }
    let mut keys: Vec<&'static str> = violations.iter().map(|v| v.what.key()).collect();
    keys.sort_unstable();
    keys.dedup();
    let what: Vec<&str> = violations.iter().map(|v| v.message.as_str()).collect();
    tracing::warn!(uid = %req.uid, namespace, pod = %name, reasons = ?reasons, violations = ?what, dry_run = req.dry_run, "pod refused: it would not be (fully) in the mesh");
    let message = format!(
        "moat-injector: namespace {} enforces the Moat mesh (label moat.dev/inject=enabled) and this pod would escape it: {}. Fix the pod, or ask the platform team to allow it (moat-injector --allow-opt-out={}={})",
        if namespace.is_empty() { "?" } else { namespace },
        what.join("; "),
        if namespace.is_empty() { "NAMESPACE" } else { namespace },
        keys.join(",")
    );
    let mut resp = with_warnings(AdmissionResponse::from(req), warnings).deny(message);
    resp.result.code = 403;
    resp.result.reason = "Forbidden".into();
    (encode(resp), "refused")
}

/// A request or pod the injector cannot read: admitted unchanged with a warning (`open`) or
/// refused (`closed`): with `closed`, nothing reaches an enforcing namespace unmeshed because
/// the injector did not understand it.
fn unreadable(
    req: &AdmissionRequest<ObjectShape>,
    name: &str,
    namespace: &str,
    label: &'static str,
    what: String,
    failure: FailureMode,
) -> (Reply, &'static str) {
    metrics::error(label);
    tracing::warn!(uid = %req.uid, namespace, pod = %name, error = %what, failure_mode = ?failure, "pod not readable by the injector");
    let resp = AdmissionResponse::from(req);
    let resp = match failure {
        FailureMode::Open => with_warnings(
            resp,
            vec![warning(format!(
                "moat-injector: {what}; pod admitted without sidecar"
            ))],
        ),
        FailureMode::Closed => {
            let mut r = resp.deny(format!(
                "moat-injector cannot inject the pod (refused, --failure-mode closed): {what}"
            ));
            r.result.code = 500;
            r.result.reason = "InternalError".into();
            r
        }
    };
    (encode(resp), "error")
}

/// An injector failure: admit unchanged with a warning (`open`) or refuse (`closed`).
fn internal(
    req: &AdmissionRequest<ObjectShape>,
    name: &str,
    namespace: &str,
    err: InjectError,
    failure: FailureMode,
) -> (Reply, &'static str) {
    metrics::error(err.label());
    tracing::error!(uid = %req.uid, namespace, pod = %name, error = %err, failure_mode = ?failure, "injection failed");
    let resp = AdmissionResponse::from(req);
    let resp = match failure {
        FailureMode::Open => with_warnings(
            resp,
            vec![warning(format!(
                "moat-injector failed ({}); pod admitted WITHOUT the mesh sidecar",
                err.label()
            ))],
        ),
        FailureMode::Closed => {
            let mut r = resp.deny(format!("moat-injector failed to inject the pod: {err}"));
            r.result.code = 500;
            r.result.reason = "InternalError".into();
            r
        }
    };
    (encode(resp), "error")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube_core::DynamicObject;

    /// `ObjectShape` stands in for `DynamicObject` only if both accept and reject the same
    /// objects with the same messages.
    #[test]
    fn object_shape_decodes_like_dynamic_object() {
        let cases = [
            json!(null),
            json!({}),
            json!({"metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"x": [1]}}),
            json!({"metadata": null}),
            json!({"metadata": {"labels": {"a": 1}}}),
            json!({"metadata": {"creationTimestamp": "yesterday"}}),
            json!({"metadata": []}),
            json!({"apiVersion": 1, "kind": ["Pod"]}),
            json!("pod"),
            json!([{"name": "p"}]),
            json!(7),
        ];
        for case in cases {
            let dynamic = Option::<DynamicObject>::deserialize(&case).map(|o| o.is_some());
            let shape = Option::<ObjectShape>::deserialize(&case).map(|o| o.is_some());
            assert_eq!(
                dynamic.map_err(|e| e.to_string()),
                shape.map_err(|e| e.to_string()),
                "{case}"
            );
        }
    }

    /// Decoding the request alone fails exactly when decoding the whole review did.
    #[test]
    fn typed_request_decodes_like_the_whole_review() {
        let request = json!({
            "uid": "u", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE", "userInfo": {}, "object": {"metadata": {"name": "p"}},
        });
        let with = |parent: &str, key: &str, v: Value| {
            let mut r = json!({"apiVersion": API_VERSION, "kind": KIND, "request": request});
            if let Some(Value::Object(m)) = r.pointer_mut(parent) {
                m.insert(key.into(), v);
            }
            r
        };
        let cases = [
            with("/request", "uid", json!("u")),
            with("/request", "operation", json!("PATCH")),
            with("/request", "userInfo", json!(null)),
            with("/request", "object", json!({"metadata": {"labels": []}})),
            with("/request", "oldObject", json!("old")),
            with("/request", "kind", json!({"kind": "Pod"})),
            with("/request", "dryRun", json!("yes")),
            with("/request", "options", json!({"a": 1})),
            with("", "response", json!({"uid": 1})),
            with("", "response", json!({"uid": "u", "allowed": true})),
            with("", "response", json!(null)),
        ];
        for case in cases {
            let whole = serde_json::from_value::<
                kube_core::admission::AdmissionReview<DynamicObject>,
            >(case.clone())
            .map(|r| {
                let q: Result<AdmissionRequest<DynamicObject>, _> = r.try_into();
                q.ok().map(|q| (q.uid, q.types))
            });
            let part = typed_request(&case, &case["request"], API_VERSION.into(), KIND.into())
                .map(|q| Some((q.uid, q.types)));
            assert_eq!(whole.map_err(|e| e.to_string()), part, "{case}");
        }
    }
}
