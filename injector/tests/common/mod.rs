//! Helpers shared by the injector's integration tests: the corpus, a test configuration,
//! AdmissionReview construction, and the independent validators (Python `jsonpatch` and
//! `kubernetes-validate`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use base64::Engine as _;
use moat_injector::admission::{self, Reply};
use moat_injector::config::{FailureMode, InjectConfig, SidecarMode};
use moat_injector::inject::Scope;
use moat_injector::syntax;
use serde::Deserialize as _;
use serde_json::{json, Value};

/// Kubernetes version the injected pods are validated against.
pub const K8S_VERSION: &str = "1.33";

/// The shared corpus of real pod specs and AdmissionRequests (fails loudly when missing).
pub fn corpus_dir() -> PathBuf {
    let dir = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/corpus/k8s"
    ));
    assert!(
        dir.join("istio").is_dir()
            && dir.join("linkerd").is_dir()
            && dir.join("kubewarden").is_dir(),
        "corpus missing at {}: the tests need ../shared/corpus/k8s next to the workspace",
        dir.display()
    );
    dir.to_path_buf()
}

/// A throwaway directory, deleted on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `<tmp>/moat-injector-<tag>-<pid>-<n>` (unique within the process too).
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("moat-injector-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed CA (certificate PEM, key PEM), generated once per test binary.
pub fn test_ca() -> &'static (String, String) {
    static CA: OnceLock<(String, String)> = OnceLock::new();
    CA.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "moat test root");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key).expect("self-signed");
        (cert.pem(), key.serialize_pem())
    })
}

/// The injection configuration used by the tests.
pub fn config(mode: SidecarMode) -> InjectConfig {
    InjectConfig {
        proxy_image: "ghcr.io/moat-mesh/moat-proxy:0.1.0".into(),
        trust_domain: moat_core::TrustDomain::new("cluster.local").expect("td"),
        ca_url: "https://moat-ca.moat-system.svc:8443".into(),
        trust_bundle_pem: moat_core::TrustBundle::from_pem(test_ca().0.as_bytes())
            .expect("bundle")
            .to_pem(),
        mesh_networks: syntax::parse_cidrs("10.0.0.0/8").expect("cidr"),
        service_networks: vec![],
        destination_addr: Some(
            moat_injector::config::DEFAULT_DESTINATION_ADDR
                .parse()
                .expect("the default is HOST:PORT"),
        ),
        sidecar_mode: mode,
        skip_outbound_cidrs: syntax::parse_cidrs("10.96.0.1").expect("cidr"),
        skip_outbound_endpoints: vec![(
            "10.96.0.10/32".parse().expect("cidr"),
            syntax::PortRange::single(53),
        )],
        enforcement: Default::default(),
    }
}

/// Reads every YAML document of a file.
pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The Pods a manifest describes: Pods as they are, workloads' pod templates turned into the
/// Pod their controller would create, List items recursively. Other kinds are returned as
/// they are (the webhook must leave them alone).
pub fn pods_of(doc: &Value) -> Vec<Value> {
    let kind = doc["kind"].as_str().unwrap_or("");
    if kind == "List" {
        return doc["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(pods_of)
            .collect();
    }
    let template = match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            doc.pointer("/spec/template")
        }
        "CronJob" => doc.pointer("/spec/jobTemplate/spec/template"),
        _ => return vec![doc.clone()],
    };
    let Some(t) = template else { return vec![] };
    let mut metadata = t.get("metadata").cloned().unwrap_or_else(|| json!({}));
    // A controller-created pod: generateName, no name.
    let owner = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("pod");
    metadata["generateName"] = json!(format!("{owner}-"));
    if let Some(ns) = doc.pointer("/metadata/namespace") {
        metadata["namespace"] = ns.clone();
    }
    vec![
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": t["spec"].clone()}),
    ]
}

/// Wraps an AdmissionRequest into an AdmissionReview.
pub fn wrap(request: Value) -> Value {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
}

/// An AdmissionReview for a CREATE of `object` (kind and resource derived from it).
pub fn review_of(uid: &str, object: &Value, namespace: &str) -> Value {
    let kind = object["kind"].as_str().unwrap_or("Pod");
    let api_version = object["apiVersion"].as_str().unwrap_or("v1");
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let resource = format!("{}s", kind.to_ascii_lowercase());
    wrap(json!({
        "uid": uid,
        "kind": {"group": group, "version": version, "kind": kind},
        "resource": {"group": group, "version": version, "resource": resource},
        "requestKind": {"group": group, "version": version, "kind": kind},
        "requestResource": {"group": group, "version": version, "resource": resource},
        "name": object.pointer("/metadata/name").cloned().unwrap_or(json!("")),
        "namespace": namespace,
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                     "groups": ["system:serviceaccounts", "system:authenticated"]},
        "object": object,
        "oldObject": null,
        "dryRun": false,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
    }))
}

/// Runs the webhook's review on `review`, as for an enforcing namespace (`/inject`).
pub fn call(review: &Value, cfg: &InjectConfig) -> Reply {
    call_in(review, cfg, Scope::Enforcing)
}

/// Runs the webhook's review on `review` under the rules of `scope`.
pub fn call_in(review: &Value, cfg: &InjectConfig, scope: Scope) -> Reply {
    admission::review_in(
        serde_json::to_vec(review).expect("json").as_slice(),
        cfg,
        FailureMode::Open,
        scope,
    )
}

/// A checked response: the `response` member and the decoded patch, if any.
#[derive(Debug)]
pub struct Response {
    /// The `response` member.
    pub response: Value,
    /// The decoded RFC 6902 patch.
    pub patch: Option<Value>,
}

impl Response {
    /// `response.warnings` joined by newlines.
    pub fn warnings(&self) -> String {
        self.response["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Checks the envelope every answer to a review must have, and decodes the patch.
pub fn check_envelope(review: &Value, reply: &Reply) -> Response {
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = &reply.body;
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1", "{body}");
    assert_eq!(body["kind"], "AdmissionReview", "{body}");
    assert!(body.get("request").is_none(), "request echoed back: {body}");
    let resp = body["response"].clone();
    assert_eq!(
        resp["uid"], review["request"]["uid"],
        "uid not echoed: {body}"
    );
    assert!(resp["allowed"].is_boolean(), "{body}");
    for w in resp["warnings"].as_array().into_iter().flatten() {
        let w = w.as_str().expect("warning is a string");
        assert!(w.chars().count() <= 120, "warning over 120 chars: {w}");
    }
    let patch = match (resp.get("patch"), resp.get("patchType")) {
        (None, None) => None,
        (Some(p), Some(t)) => {
            assert_eq!(t, "JSONPatch");
            let b64 = p
                .as_str()
                .unwrap_or_else(|| panic!("patch is not a base64 string: {p}"));
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .expect("patch is base64");
            let patch: Value = serde_json::from_slice(&bytes).expect("patch is JSON");
            assert!(patch.is_array(), "patch is not an array");
            Some(patch)
        }
        (p, t) => panic!("patch and patchType must come together: {p:?} {t:?}"),
    };
    Response {
        response: resp,
        patch,
    }
}

/// Applies `patch` to `doc` with the json-patch crate.
pub fn apply_rust(doc: &Value, patch: &Value) -> Value {
    let p: json_patch::Patch = serde_json::from_value(patch.clone()).expect("patch parses");
    let mut out = doc.clone();
    json_patch::patch(&mut out, &p)
        .unwrap_or_else(|e| panic!("json-patch crate: {e}\npatch: {patch}"));
    out
}

fn require_python_modules() {
    let out = Command::new("python3")
        .args(["-c", "import jsonpatch, kubernetes_validate"])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "the Python packages jsonpatch and kubernetes-validate are required: run \
             `python3 -m pip install jsonpatch kubernetes-validate` ({})",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "python3 is required (with `python3 -m pip install jsonpatch kubernetes-validate`): {e}"
        ),
    }
}

const APPLY_SCRIPT: &str = r#"
import json, sys, jsonpatch
cases = json.load(open(sys.argv[1]))
out = {}
for name, case in cases.items():
    try:
        out[name] = {"ok": jsonpatch.apply_patch(case["doc"], case["patch"])}
    except Exception as e:
        out[name] = {"error": "%s: %s" % (type(e).__name__, e)}
json.dump(out, open(sys.argv[2], "w"))
"#;

/// Applies each `(doc, patch)` with the Python `jsonpatch` package (an independent RFC 6902
/// implementation), in one process. Returns the patched documents by case name.
pub fn apply_python(cases: &BTreeMap<String, (Value, Value)>) -> BTreeMap<String, Value> {
    require_python_modules();
    let dir = TempDir::new("jsonpatch");
    let input: serde_json::Map<String, Value> = cases
        .iter()
        .map(|(k, (doc, patch))| (k.clone(), json!({"doc": doc, "patch": patch})))
        .collect();
    let (inp, outp) = (dir.0.join("cases.json"), dir.0.join("out.json"));
    std::fs::write(&inp, serde_json::to_vec(&input).expect("json")).expect("write");
    let o = Command::new("python3")
        .arg("-c")
        .arg(APPLY_SCRIPT)
        .arg(&inp)
        .arg(&outp)
        .output()
        .expect("python3");
    assert!(
        o.status.success(),
        "jsonpatch run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out: BTreeMap<String, Value> =
        serde_json::from_slice(&std::fs::read(&outp).expect("read")).expect("json");
    let mut results = BTreeMap::new();
    for (name, r) in out {
        match r.get("ok") {
            Some(v) => {
                results.insert(name, v.clone());
            }
            None => panic!(
                "Python jsonpatch could not apply the patch of {name}: {}",
                r["error"]
            ),
        }
    }
    results
}

/// Validates each object with `kubernetes-validate --strict -k 1.33`; a missing schema
/// ("Couldn't find schema" WARN) is a failure too.
pub fn kubernetes_validate(objects: &BTreeMap<String, Value>) {
    require_python_modules();
    let dir = TempDir::new("kv");
    let mut files = Vec::new();
    for (i, (name, obj)) in objects.iter().enumerate() {
        let f = dir.0.join(format!("{i:03}.json"));
        std::fs::write(&f, serde_json::to_vec_pretty(obj).expect("json")).expect("write");
        files.push((name.clone(), f));
    }
    let o = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION])
        .args(files.iter().map(|(_, f)| f))
        .output()
        .expect("python3 -m kubernetes_validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let mut failures = Vec::new();
    for (name, f) in &files {
        let f = f.display().to_string();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(&f)).collect();
        let passed = lines
            .iter()
            .any(|l| l.starts_with("INFO") && l.contains("passed"));
        let bad = lines
            .iter()
            .any(|l| l.starts_with("ERROR") || l.starts_with("WARN"));
        if !passed || bad {
            failures.push(format!("{name}: {}", lines.join(" | ")));
        }
    }
    assert!(
        failures.is_empty() && o.status.success(),
        "kubernetes-validate --strict -k {K8S_VERSION} failed:\n{}\n{text}",
        failures.join("\n")
    );
}
