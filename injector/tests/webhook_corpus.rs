//! The webhook handler fed real AdmissionReviews built from every pod spec of the shared corpus
//! (Istio and Linkerd manifests, kubewarden AdmissionRequests) plus our own edge cases. Every
//! patch is applied with two independent RFC 6902 implementations (the json-patch crate and
//! Python `jsonpatch`), the results must agree and pass `kubernetes-validate --strict -k
//! 1.33`, and re-running the webhook on the injected pod must return no patch.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use moat_injector::config::{InjectConfig, SidecarMode};
use moat_injector::enforce;
use moat_injector::inject::{self, Context, Decision, Scope, SkipReason};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// A patch that injects.
    Inject,
    /// No patch; `inject::inject` gives this reason.
    Skip(SkipReason),
    /// No patch, decided before looking at the pod (label used for coverage).
    Untouched(&'static str),
    /// Refused (enforcing namespaces); the refusal reasons (metric labels), in order.
    Refuse(&'static [&'static str]),
}

/// What a case expected outside enforcing namespaces becomes in one: the opt-outs and
/// conflicts that left a pod uninjected are refused.
fn enforced(expect: &Expect) -> Expect {
    match expect {
        Expect::Skip(SkipReason::OptedOut) => Expect::Refuse(&["opted_out"]),
        Expect::Skip(SkipReason::WindowsPod) => Expect::Refuse(&["windows_pod"]),
        Expect::Skip(SkipReason::OtherMesh) => Expect::Refuse(&["other_mesh"]),
        Expect::Skip(SkipReason::ProxyUidConflict) => Expect::Refuse(&["proxy_uid_conflict"]),
        Expect::Skip(SkipReason::PortConflict) => Expect::Refuse(&["port_conflict"]),
        Expect::Skip(SkipReason::NameConflict) => Expect::Refuse(&["name_conflict"]),
        other => other.clone(),
    }
}

struct Case {
    name: String,
    review: Value,
    /// Outside enforcing namespaces (`/inject/opt-in`).
    expect: Expect,
    /// In an enforcing namespace (`/inject`), when not simply `enforced(&expect)`.
    enforcing: Option<Expect>,
    /// A warning containing this text must be returned.
    warning: Option<&'static str>,
}

fn case(name: &str, review: Value, expect: Expect) -> Case {
    Case {
        name: name.into(),
        review,
        expect,
        enforcing: None,
        warning: None,
    }
}

fn pod(name: &str, metadata: Value, spec: Value) -> Value {
    let mut m = metadata;
    if m.get("name").is_none() && m.get("generateName").is_none() {
        m["name"] = json!(name);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": m, "spec": spec})
}

fn app() -> Value {
    json!([{"name": "app", "image": "nginx:1.27", "ports": [{"name": "http", "containerPort": 8080}]}])
}

/// Every pod of the corpus, as the webhook would receive it.
fn corpus_cases() -> Vec<Case> {
    let dir = corpus_dir();
    let mut cases = Vec::new();

    // Istio: every input manifest (not the .injected outputs, which hold Istio's sidecar).
    let mut istio: Vec<_> = std::fs::read_dir(dir.join("istio"))
        .expect("istio dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    istio.sort();
    assert!(istio.len() >= 12, "istio corpus incomplete: {istio:?}");
    for path in istio {
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("?")
            .to_string();
        for (i, doc) in yaml_docs(&path).iter().enumerate() {
            for (j, p) in pods_of(doc).into_iter().enumerate() {
                let expect = if file == "hello-host-network.yaml" {
                    Expect::Skip(SkipReason::HostNetwork)
                } else {
                    Expect::Inject
                };
                let name = format!("istio/{file}#{i}.{j}");
                cases.push(case(&name, review_of(&name, &p, "default"), expect));
            }
        }
    }

    // Linkerd. Its Pod fixtures carry `apiVersion: apps/v1` for `kind: Pod`, which no API
    // server sends (and which neither the Kubernetes types nor the schemas accept): the
    // apiVersion is fixed to v1 before use. The fixtures live in kube-public, which Moat never
    // injects (checked below); as pods of an opted-in namespace they are sent as "default".
    for file in [
        "pod-inject-enabled.yaml",
        "pod-inject-empty.yaml",
        "pod-nativesidecar-inject-enabled.yaml",
        "deployment-inject-disabled.yaml",
        "deployment-with-injected-proxy.yaml",
        "namespace-inject-enabled.yaml",
        "namespace-inject-disabled.yaml",
    ] {
        for doc in yaml_docs(&dir.join("linkerd").join(file)) {
            for mut p in pods_of(&doc) {
                let name = format!("linkerd/{file}");
                if p["kind"] == "Namespace" {
                    let mut c = case(
                        &name,
                        review_of(&name, &p, ""),
                        Expect::Untouched("not_pod"),
                    );
                    c.warning = Some("only mutates Pods");
                    cases.push(c);
                    continue;
                }
                p["apiVersion"] = json!("v1"); // see above: apps/v1 Pod fixed to v1
                let as_is = format!("{name}@kube-public");
                cases.push(case(
                    &as_is,
                    review_of(&as_is, &p, "kube-public"),
                    Expect::Skip(SkipReason::SystemNamespace),
                ));
                p["metadata"]["namespace"] = json!("default");
                let expect = if file == "deployment-with-injected-proxy.yaml" {
                    Expect::Skip(SkipReason::OtherMesh)
                } else {
                    Expect::Inject
                };
                cases.push(case(&name, review_of(&name, &p, "default"), expect));
            }
        }
    }

    // kubewarden: real AdmissionRequest bodies, wrapped into AdmissionReviews.
    for (file, expect) in [
        ("panic.json", Expect::Inject),
        ("request-pod-volumes.json", Expect::Inject),
        ("privileged_init_container.json", Expect::Inject),
        ("pod_request.json", Expect::Skip(SkipReason::HostNetwork)),
        ("deployment_request.json", Expect::Untouched("not_pod")),
    ] {
        let path = dir.join("kubewarden").join(file);
        let req: Value = serde_json::from_slice(&std::fs::read(&path).expect("read"))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut c = case(&format!("kubewarden/{file}"), wrap(req), expect.clone());
        if expect == Expect::Untouched("not_pod") {
            c.warning = Some("only mutates Pods; apps/v1 Deployment left unchanged");
        }
        if file == "privileged_init_container.json" {
            // A privileged init container could rewrite the pod's nat table after moat-init.
            c.enforcing = Some(Expect::Refuse(&["net_admin"]));
        }
        cases.push(c);
    }
    cases
}

fn add(
    v: &mut Vec<Case>,
    name: &str,
    object: Value,
    ns: &str,
    expect: Expect,
    warning: Option<&'static str>,
) {
    let mut c = case(name, review_of(name, &object, ns), expect);
    c.warning = warning;
    v.push(c);
}

/// Adds a case reviewing pod `pod_name` in namespace `default`, with no warning expected.
fn add_pod(
    v: &mut Vec<Case>,
    name: &str,
    pod_name: &str,
    metadata: Value,
    spec: Value,
    expect: Expect,
) {
    add(
        v,
        name,
        pod(pod_name, metadata, spec),
        "default",
        expect,
        None,
    );
}

/// Our own edge cases.
fn own_cases() -> Vec<Case> {
    let mut v = Vec::new();
    add_pod(
        &mut v,
        "own/minimal",
        "minimal",
        json!({}),
        json!({"containers": [{"name": "app", "image": "nginx"}]}),
        Expect::Inject,
    );
    add_pod(
        &mut v,
        "own/escaping",
        "escaping",
        json!({"annotations": {"example.com/a~b": "1", "x/y~z": "2"},
                   "labels": {"app.kubernetes.io/name": "escaping"}}),
        json!({"containers": app()}),
        Expect::Inject,
    );
    add_pod(
        &mut v,
        "own/probes",
        "probes",
        json!({}),
        json!({"containers": [
            {"name": "web", "image": "nginx",
             "ports": [{"name": "http", "containerPort": 8080}, {"name": "admin", "containerPort": 9000}],
             "readinessProbe": {"httpGet": {"path": "/ready", "port": "http",
                 "httpHeaders": [{"name": "X-Probe", "value": "$(NOT_A_VAR)"}]}, "periodSeconds": 2},
             "livenessProbe": {"tcpSocket": {"port": "admin"}},
             "startupProbe": {"exec": {"command": ["true"]}}},
            {"name": "grpc", "image": "grpc-app",
             "readinessProbe": {"grpc": {"port": 50051}},
             "livenessProbe": {"httpGet": {"port": 81, "scheme": "HTTPS", "path": "/live"}}}
        ]}),
        Expect::Inject,
    );
    add(
        &mut v,
        "own/generate-name-only",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": "web-7d9f8-", "labels": {"app": "web"}},
               "spec": {"containers": app()}}),
        "team-a",
        Expect::Inject,
        None,
    );
    add(
        &mut v,
        "own/bad-annotations",
        pod(
            "bad-annotations",
            json!({"annotations": {
                "moat.dev/proxy-cpu-request": "lots",
                "moat.dev/skip-inbound-ports": "22,http",
                "moat.dev/skip-outbound-cidrs": "10.96.0.1/32",
                "moat.dev/proxy-memory-limit": "512Mi",
                "moat.dev/log-leve": "debug",
                "moat.dev/inject": "yes"}}),
            json!({"containers": app()}),
        ),
        "default",
        Expect::Inject,
        Some("moat.dev/log-leve ignored: unknown moat.dev annotation"),
    );
    if let Some(c) = v.last_mut() {
        // 10.96.0.1/32 is not in the (empty) allow list of the test configuration.
        c.enforcing = Some(Expect::Refuse(&["exclusion_not_allowed"]));
    }
    add_pod(
        &mut v,
        "own/classic-by-annotation",
        "classic",
        json!({"annotations": {"moat.dev/sidecar-mode": "classic"}}),
        json!({"initContainers": [{"name": "migrate", "image": "busybox"}], "containers": app()}),
        Expect::Inject,
    );
    add_pod(
        &mut v,
        "own/user-native-sidecar",
        "sidecar",
        json!({"labels": {"moat.dev/inject": "enabled"}}),
        json!({"initContainers": [{"name": "log-shipper", "image": "fluent-bit", "restartPolicy": "Always",
                       "ports": [{"name": "metrics", "containerPort": 2020}],
                       "startupProbe": {"tcpSocket": {"port": "metrics"}}}],
                   "containers": app()}),
        Expect::Inject,
    );
    add_pod(
        &mut v,
        "own/dry-run-and-existing-default-container",
        "dry",
        json!({"annotations": {"kubectl.kubernetes.io/default-container": "app"}}),
        json!({"containers": app(), "volumes": [{"name": "data", "emptyDir": {}}]}),
        Expect::Inject,
    );
    if let Some(Case { review, .. }) = v.last_mut() {
        review["request"]["dryRun"] = json!(true);
    }

    // Skips.
    let skip = |r| Expect::Skip(r);
    add_pod(
        &mut v,
        "own/host-network",
        "hn",
        json!({}),
        json!({"hostNetwork": true, "containers": app()}),
        skip(SkipReason::HostNetwork),
    );
    add_pod(
        &mut v,
        "own/opt-out-label",
        "ol",
        json!({"labels": {"moat.dev/inject": "disabled"}}),
        json!({"containers": app()}),
        skip(SkipReason::OptedOut),
    );
    add_pod(
        &mut v,
        "own/opt-out-annotation",
        "oa",
        json!({"labels": {"moat.dev/inject": "enabled"}, "annotations": {"moat.dev/inject": "disabled"}}),
        json!({"containers": app()}),
        skip(SkipReason::OptedOut),
    );
    // Moat's parts are never trusted on CREATE: a forged status annotation or a container
    // named like Moat's is replaced by a real injection.
    add(
        &mut v,
        "own/forged-injected-annotation",
        pod(
            "ai",
            json!({"annotations": {"moat.dev/injected": "{\"version\":\"0.0.9\"}"}}),
            json!({"containers": app()}),
        ),
        "default",
        Expect::Inject,
        Some("were replaced by the injector's own"),
    );
    add(
        &mut v,
        "own/forged-proxy-container",
        pod(
            "ac",
            json!({}),
            json!({"containers": [{"name": "app", "image": "a"}, {"name": "moat-proxy", "image": "p"}]}),
        ),
        "default",
        Expect::Inject,
        Some("were replaced by the injector's own"),
    );
    add(
        &mut v,
        "own/run-dir-taken",
        pod(
            "rd",
            json!({}),
            json!({"containers": [{"name": "app", "image": "a", "volumeMounts": [{"name": "own", "mountPath": "/run/moat/"}]},
                                  {"name": "b", "image": "b"}],
                   "volumes": [{"name": "own", "emptyDir": {}}]}),
        ),
        "default",
        Expect::Inject,
        Some("container app already mounts /run/moat"),
    );
    add(
        &mut v,
        "own/system-namespace",
        pod(
            "sys",
            json!({"labels": {"moat.dev/inject": "enabled"}}),
            json!({"containers": app()}),
        ),
        "kube-system",
        skip(SkipReason::SystemNamespace),
        Some("never injects pods in namespace kube-system"),
    );
    add(
        &mut v,
        "own/windows",
        pod(
            "win",
            json!({}),
            json!({"os": {"name": "windows"}, "containers": app()}),
        ),
        "default",
        skip(SkipReason::WindowsPod),
        Some("spec.os.name=windows: Windows pods cannot be meshed"),
    );
    add(
        &mut v,
        "own/uid-conflict",
        pod(
            "uid",
            json!({}),
            json!({"containers": [{"name": "app", "image": "a", "securityContext": {"runAsUser": 7777}}]}),
        ),
        "default",
        skip(SkipReason::ProxyUidConflict),
        Some("would run as the proxy's uid/gid"),
    );
    add(
        &mut v,
        "own/gid-conflict-pod-level",
        pod(
            "gid",
            json!({}),
            json!({"securityContext": {"runAsGroup": 7777}, "containers": app()}),
        ),
        "default",
        skip(SkipReason::ProxyUidConflict),
        Some("would run as the proxy's uid/gid"),
    );
    add(
        &mut v,
        "own/port-conflict",
        pod(
            "port",
            json!({}),
            json!({"containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 15001}]}]}),
        ),
        "default",
        skip(SkipReason::PortConflict),
        Some("container port 15001 is reserved for moat-proxy"),
    );
    add(
        &mut v,
        "own/name-conflict",
        pod(
            "vol",
            json!({}),
            json!({"containers": app(), "volumes": [{"name": "moat-token", "emptyDir": {}}]}),
        ),
        "default",
        skip(SkipReason::NameConflict),
        Some("spec.volumes[moat-token]: the volume name is reserved for Moat"),
    );
    add_pod(
        &mut v,
        "own/no-containers",
        "empty",
        json!({}),
        json!({"containers": []}),
        skip(SkipReason::NoContainers),
    );
    add(
        &mut v,
        "own/configmap",
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}}),
        "default",
        Expect::Untouched("not_pod"),
        Some("only mutates Pods; /v1 ConfigMap left unchanged"),
    );
    // An object the Kubernetes types refuse: admitted unchanged, with a warning.
    add(
        &mut v,
        "own/undecodable-pod",
        json!({"apiVersion": "apps/v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": app()}}),
        "default",
        Expect::Untouched("undecodable_object"),
        Some("moat-injector: pod not understood"),
    );
    if let Some(Case { review, .. }) = v.last_mut() {
        // The request says Pod (as the API server would); the object does not decode.
        review["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Pod"});
        review["request"]["resource"] = json!({"group": "", "version": "v1", "resource": "pods"});
    }
    let p = pod("ops", json!({}), json!({"containers": app()}));
    for op in ["DELETE", "UPDATE", "CONNECT"] {
        let name = format!("own/{}", op.to_ascii_lowercase());
        let mut r = review_of(&name, &p, "default");
        r["request"]["operation"] = json!(op);
        if op == "DELETE" {
            r["request"]["object"] = Value::Null;
            r["request"]["oldObject"] = p.clone();
        }
        v.push(case(&name, r, Expect::Untouched("operation")));
    }
    let mut r = review_of("own/subresource", &p, "default");
    r["request"]["subResource"] = json!("ephemeralcontainers");
    v.push(case("own/subresource", r, Expect::Untouched("subresource")));
    v
}

fn object_of(review: &Value) -> &Value {
    &review["request"]["object"]
}

fn namespace_of(review: &Value) -> Option<&str> {
    review["request"]["object"]["metadata"]["namespace"]
        .as_str()
        .or(review["request"]["namespace"].as_str())
        .filter(|s| !s.is_empty())
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap_or("").to_string())
        .collect()
}

fn env_of<'a>(proxy: &'a Value, name: &str) -> &'a Value {
    proxy["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("env {name} missing"))
}

/// Structural checks of an injected pod against its original.
fn check_injected(
    name: &str,
    original: &Value,
    result: &Value,
    mode: SidecarMode,
    cfg: &InjectConfig,
) {
    // What a pod held of Moat's before (forged, or a manifest injected offline) is replaced.
    let original = &enforce::strip(original);
    let spec = &result["spec"];
    let orig_init = names(&original["spec"]["initContainers"]);
    let orig_containers = names(&original["spec"]["containers"]);
    let status: Value = serde_json::from_str(
        result["metadata"]["annotations"]["moat.dev/injected"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no status annotation")),
    )
    .expect("status annotation is JSON");
    assert_eq!(status["version"], "0.1.0", "{name}");
    assert_eq!(
        status["containers"],
        json!(["moat-init", "moat-proxy"]),
        "{name}"
    );
    assert_eq!(
        status["volumes"],
        json!(["moat-token", "moat-policy", "moat-run"]),
        "{name}"
    );

    // Annotation override of the mode.
    let mode = match original
        .pointer("/metadata/annotations/moat.dev~1sidecar-mode")
        .and_then(Value::as_str)
    {
        Some("classic") => SidecarMode::Classic,
        Some("native") => SidecarMode::Native,
        _ => mode,
    };
    let (proxy, init) = match mode {
        SidecarMode::Native => {
            let mut want = vec!["moat-init".to_string(), "moat-proxy".to_string()];
            want.extend(orig_init.iter().cloned());
            assert_eq!(names(&spec["initContainers"]), want, "{name}: init order");
            assert_eq!(names(&spec["containers"]), orig_containers, "{name}");
            assert_eq!(status["mode"], "native");
            let proxy = &spec["initContainers"][1];
            assert_eq!(proxy["restartPolicy"], "Always", "{name}");
            assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 15020, "{name}");
            assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready", "{name}");
            (proxy.clone(), spec["initContainers"][0].clone())
        }
        SidecarMode::Classic => {
            let mut want = orig_init.clone();
            want.push("moat-init".into());
            assert_eq!(names(&spec["initContainers"]), want, "{name}: init order");
            let mut want = orig_containers.clone();
            want.push("moat-proxy".into());
            assert_eq!(names(&spec["containers"]), want, "{name}");
            assert_eq!(status["mode"], "classic");
            let proxy = spec["containers"]
                .as_array()
                .and_then(|c| c.last())
                .cloned()
                .unwrap_or_default();
            assert!(proxy.get("restartPolicy").is_none(), "{name}");
            let init = spec["initContainers"]
                .as_array()
                .and_then(|c| c.last())
                .cloned()
                .unwrap_or_default();
            (proxy, init)
        }
    };

    // The sidecar.
    assert_eq!(proxy["args"], json!(["run"]), "{name}");
    assert_eq!(proxy["image"], cfg.proxy_image.as_str());
    assert_eq!(
        proxy["ports"],
        json!([{"name": "moat-admin", "containerPort": 15020, "protocol": "TCP"}])
    );
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["port"], 15020);
    let sc = &proxy["securityContext"];
    assert_eq!(sc["runAsUser"], 7777);
    assert_eq!(sc["runAsGroup"], 7777);
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(sc["seccompProfile"], json!({"type": "RuntimeDefault"}));
    assert_eq!(
        env_of(&proxy, "MOAT_POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env_of(&proxy, "MOAT_POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(
        env_of(&proxy, "MOAT_SERVICE_ACCOUNT")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.serviceAccountName"
    );
    assert_eq!(
        env_of(&proxy, "MOAT_POD_IP")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert_eq!(
        env_of(&proxy, "MOAT_TRUST_BUNDLE_PEM")["value"],
        cfg.trust_bundle_pem.as_str()
    );
    assert_eq!(
        env_of(&proxy, "MOAT_TRUST_DOMAIN")["value"],
        "cluster.local"
    );
    assert_eq!(
        env_of(&proxy, "MOAT_CA_URL")["value"],
        "https://moat-ca.moat-system.svc:8443"
    );
    assert_eq!(
        env_of(&proxy, "MOAT_TOKEN_FILE")["value"],
        "/var/run/secrets/moat/token"
    );
    assert_eq!(
        env_of(&proxy, "MOAT_POLICY")["value"],
        "/etc/moat/policy/policy.yaml"
    );
    assert_eq!(env_of(&proxy, "MOAT_MESH_NETWORKS")["value"], "10.0.0.0/8");
    assert_eq!(
        env_of(&proxy, "MOAT_DESTINATION_ADDR")["value"],
        "moat-destination.moat-system.svc:8086"
    );
    // Service networks are opt-in: kube-proxy picks the endpoint unless the platform says.
    assert!(proxy["env"]
        .as_array()
        .is_some_and(|e| e.iter().all(|v| v["name"] != "MOAT_SERVICE_NETWORKS")));
    assert_eq!(
        env_of(&proxy, "MOAT_HOST_IP")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    assert_eq!(
        env_of(&proxy, "MOAT_ADMIN_SOCKET")["value"],
        "/run/moat/admin.sock"
    );
    assert!(
        proxy["volumeMounts"]
            .as_array()
            .is_some_and(|m| m.contains(&json!({"name": "moat-run", "mountPath": "/run/moat"}))),
        "{name}: proxy run dir"
    );
    // Every app container reaches the admin socket, read-only (unless /run/moat is taken).
    for (i, c) in original["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let taken =
            c["volumeMounts"].as_array().into_iter().flatten().any(|m| {
                m["mountPath"].as_str().map(|p| p.trim_end_matches('/')) == Some("/run/moat")
            });
        let mounts = result["spec"]["containers"][i]["volumeMounts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let ours = json!({"name": "moat-run", "mountPath": "/run/moat", "readOnly": true});
        assert_eq!(
            mounts.contains(&ours),
            !taken,
            "{name}: container {i} run dir mount"
        );
    }
    let mounts = &proxy["volumeMounts"];
    assert!(
        mounts.as_array().is_some_and(|m| m.contains(
            &json!({"name": "moat-token", "mountPath": "/var/run/secrets/moat", "readOnly": true})
        )),
        "{name}"
    );
    assert!(
        mounts.as_array().is_some_and(|m| m.contains(
            &json!({"name": "moat-policy", "mountPath": "/etc/moat/policy", "readOnly": true})
        )),
        "{name}"
    );

    // The init container.
    assert_eq!(init["name"], "moat-init");
    assert_eq!(init["args"][0], "init", "{name}");
    // DNS over TCP is left alone only towards the cluster DNS, never port 53 everywhere.
    let args: Vec<&str> = init["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--exclude-outbound-endpoints");
    assert_eq!(
        at.map(|i| args[i + 1]),
        Some("10.96.0.10/32=53"),
        "{name}: {args:?}"
    );
    if let Some(i) = args.iter().position(|a| *a == "--exclude-outbound-ports") {
        assert!(
            !args[i + 1].split(',').any(|p| p == "53"),
            "{name}: {args:?}"
        );
    }
    let isc = &init["securityContext"];
    assert_eq!(
        isc["capabilities"],
        json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
    );
    assert_eq!(isc["runAsUser"], 0);
    assert_eq!(isc["runAsNonRoot"], false);
    assert_eq!(isc["readOnlyRootFilesystem"], true);
    assert_eq!(isc["allowPrivilegeEscalation"], false);
    assert_eq!(isc["seccompProfile"], json!({"type": "RuntimeDefault"}));
    assert_eq!(
        init["volumeMounts"],
        json!([{"name": "moat-run", "mountPath": "/run"}])
    );

    // Volumes: the user's first, untouched, then ours.
    let mut want = names(&original["spec"]["volumes"]);
    want.extend(["moat-token", "moat-policy", "moat-run"].map(String::from));
    assert_eq!(names(&spec["volumes"]), want, "{name}");
    let token = &spec["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "moat-token"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "moat-ca", "expirationSeconds": 3600, "path": "token"})
    );

    // Original labels and annotations preserved.
    for key in ["labels", "annotations"] {
        if let Some(m) = original["metadata"][key].as_object() {
            for (k, v) in m
                .iter()
                .filter(|(k, _)| *k != "kubectl.kubernetes.io/default-container")
            {
                assert_eq!(&result["metadata"][key][k], v, "{name}: {key} {k} changed");
            }
        }
    }
    let default_container = original
        .pointer("/metadata/annotations/kubectl.kubernetes.io~1default-container")
        .cloned()
        .unwrap_or_else(|| json!(orig_containers[0]));
    assert_eq!(
        result["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        default_container
    );

    // Probes: HTTP/TCP ones of app containers now go to the admin port, recorded in env.
    let app_probes: Value = serde_json::from_str(
        env_of(&proxy, "MOAT_APP_PROBES")["value"]
            .as_str()
            .expect("string")
            .replace("$$", "$")
            .as_str(),
    )
    .expect("MOAT_APP_PROBES is JSON");
    assert!(app_probes.is_object());
    let mut probed = Vec::new();
    let mut containers: Vec<&Value> = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    if mode == SidecarMode::Native {
        containers.extend(
            spec["initContainers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["restartPolicy"] == "Always"),
        );
    }
    for c in containers {
        let cname = c["name"].as_str().unwrap_or("");
        if cname == "moat-proxy" {
            continue;
        }
        for (field, kind) in [
            ("readinessProbe", "readiness"),
            ("livenessProbe", "liveness"),
            ("startupProbe", "startup"),
        ] {
            let p = &c[field];
            assert!(
                p.get("tcpSocket").is_none(),
                "{name}: {cname} {field} still tcpSocket"
            );
            if let Some(h) = p.get("httpGet") {
                let key = format!("{cname}/{kind}");
                if h.get("host").is_none() {
                    assert_eq!(
                        h,
                        &json!({"path": format!("/app-health/{key}"), "port": 15020, "scheme": "HTTP"}),
                        "{name}"
                    );
                    assert!(app_probes.get(&key).is_some(), "{name}: {key} not recorded");
                    probed.push(key);
                }
            }
        }
    }
    probed.sort();
    assert_eq!(status["probes"], json!(probed), "{name}");
    assert_eq!(
        app_probes.as_object().map(|o| o.len()),
        Some(probed.len()),
        "{name}"
    );
}

fn run_corpus(mode: SidecarMode, scope: Scope) -> BTreeSet<String> {
    let cfg = config(mode);
    let mut cases = corpus_cases();
    cases.extend(own_cases());
    let mut covered = BTreeSet::new();
    let mut python_cases = BTreeMap::new();
    let mut rust_results = BTreeMap::new();
    for c in &cases {
        let reply = call_in(&c.review, &cfg, scope);
        let resp = check_envelope(&c.review, &reply);
        let expect = match scope {
            Scope::Enforcing => c.enforcing.clone().unwrap_or_else(|| enforced(&c.expect)),
            _ => c.expect.clone(),
        };
        if let Expect::Refuse(reasons) = &expect {
            assert_eq!(
                resp.response["allowed"], false,
                "{}: {}",
                c.name, reply.body
            );
            assert!(resp.patch.is_none(), "{}", c.name);
            assert_eq!(resp.response["status"]["code"], 403, "{}", c.name);
            let msg = resp.response["status"]["message"].as_str().unwrap_or("");
            assert!(
                msg.contains("--allow-opt-out=default="),
                "{}: {msg}",
                c.name
            );
            let object = object_of(&c.review);
            let ctx = Context {
                namespace: namespace_of(&c.review),
                scope,
            };
            match inject::inject_in(object, &ctx, &cfg)
                .expect("decision")
                .decision
            {
                Decision::Refuse(v) => {
                    let mut labels: Vec<&str> = v.iter().map(|v| v.what.label()).collect();
                    labels.dedup();
                    assert_eq!(labels, *reasons, "{}: {msg}", c.name);
                }
                other => panic!("{}: {other:?}, expected a refusal", c.name),
            }
            for r in *reasons {
                covered.insert(format!("refused:{r}"));
            }
            continue;
        }
        assert_eq!(resp.response["allowed"], true, "{}: {}", c.name, reply.body);
        if let Some(w) = c.warning {
            assert!(
                resp.warnings().contains(w),
                "{}: warning {w:?} missing in {:?}",
                c.name,
                resp.warnings()
            );
        }
        let object = object_of(&c.review);
        match &expect {
            Expect::Refuse(_) => unreachable!("handled above"),
            Expect::Inject => {
                let patch = resp
                    .patch
                    .unwrap_or_else(|| panic!("{}: no patch: {}", c.name, reply.body));
                let result = apply_rust(object, &patch);
                python_cases.insert(c.name.clone(), (object.clone(), patch));
                rust_results.insert(c.name.clone(), result);
                covered.insert("injected".to_string());
            }
            Expect::Skip(reason) => {
                assert!(resp.patch.is_none(), "{}: unexpected patch", c.name);
                let ctx = Context {
                    namespace: namespace_of(&c.review),
                    scope,
                };
                let outcome = inject::inject_in(object, &ctx, &cfg).expect("decision");
                match outcome.decision {
                    Decision::Skip(r) => assert_eq!(r, *reason, "{}", c.name),
                    other => panic!("{}: {other:?}, expected {reason:?}", c.name),
                }
                covered.insert(reason.label().to_string());
            }
            Expect::Untouched(label) => {
                assert!(resp.patch.is_none(), "{}: unexpected patch", c.name);
                covered.insert(label.to_string());
            }
        }
    }

    // An independent implementation applies every patch to the same result.
    let python_results = apply_python(&python_cases);
    assert_eq!(python_results.len(), rust_results.len());
    let mut injected = BTreeMap::new();
    for (name, rust) in &rust_results {
        assert_eq!(
            &python_results[name], rust,
            "{name}: jsonpatch and json-patch disagree"
        );
        let original = &python_cases[name].0;
        check_injected(name, original, rust, mode, &cfg);

        // Idempotent: the injected pod, sent again (an API server re-invocation), gets no
        // second patch.
        let again = review_of(&format!("{name}-again"), rust, "default");
        let resp = check_envelope(&again, &call_in(&again, &cfg, scope));
        assert_eq!(resp.response["allowed"], true, "{name}: {}", resp.response);
        let ctx = Context {
            namespace: Some("default"),
            scope,
        };
        match inject::inject_in(rust, &ctx, &cfg)
            .expect("decision")
            .decision
        {
            Decision::Skip(SkipReason::AlreadyInjected) => {
                covered.insert("already_injected".to_string());
            }
            other => panic!("{name}: re-invocation gave {other:?}"),
        }
        assert!(
            resp.patch.is_none(),
            "{name}: re-injection produced a patch"
        );
        // kubernetes-validate needs metadata.name; the API server generates it from
        // generateName after admission, so do the same here.
        let mut to_validate = rust.clone();
        if to_validate["metadata"].get("name").is_none() {
            let generated = format!(
                "{}abcde",
                to_validate["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or("pod-")
            );
            to_validate["metadata"]["name"] = json!(generated);
        }
        injected.insert(name.clone(), to_validate);
    }
    kubernetes_validate(&injected);
    covered
}

#[test]
fn corpus_and_edge_cases_native() {
    let covered = run_corpus(SidecarMode::Native, Scope::OptIn);
    // Every skip rule and every untouched path is exercised.
    let all_reasons = [
        SkipReason::NoContainers,
        SkipReason::HostNetwork,
        SkipReason::OptedOut,
        SkipReason::AlreadyInjected,
        SkipReason::SystemNamespace,
        SkipReason::WindowsPod,
        SkipReason::OtherMesh,
        SkipReason::ProxyUidConflict,
        SkipReason::PortConflict,
        SkipReason::NameConflict,
    ];
    // Exhaustiveness: adding a SkipReason must add it to the list above.
    for r in all_reasons {
        match r {
            SkipReason::NoContainers
            | SkipReason::HostNetwork
            | SkipReason::OptedOut
            | SkipReason::AlreadyInjected
            | SkipReason::SystemNamespace
            | SkipReason::WindowsPod
            | SkipReason::OtherMesh
            | SkipReason::ProxyUidConflict
            | SkipReason::PortConflict
            | SkipReason::NameConflict => {}
        }
    }
    let mut expected: BTreeSet<String> =
        all_reasons.iter().map(|r| r.label().to_string()).collect();
    for extra in [
        "injected",
        "not_pod",
        "operation",
        "subresource",
        "undecodable_object",
    ] {
        expected.insert(extra.into());
    }
    assert_eq!(covered, expected);
}

#[test]
fn corpus_and_edge_cases_classic() {
    run_corpus(SidecarMode::Classic, Scope::OptIn);
}

#[test]
fn corpus_and_edge_cases_enforcing_native() {
    let covered = run_corpus(SidecarMode::Native, Scope::Enforcing);
    for r in [
        "opted_out",
        "windows_pod",
        "other_mesh",
        "proxy_uid_conflict",
        "port_conflict",
        "name_conflict",
        "net_admin",
        "exclusion_not_allowed",
    ] {
        assert!(
            covered.contains(&format!("refused:{r}")),
            "no case refused for {r}: {covered:?}"
        );
    }
    assert!(covered.contains("injected"));
}

#[test]
fn corpus_and_edge_cases_enforcing_classic() {
    run_corpus(SidecarMode::Classic, Scope::Enforcing);
}

fn inject_one(object: &Value, cfg: &InjectConfig) -> (Value, Value, Response) {
    let review = review_of("one", object, "default");
    let reply = call(&review, cfg);
    let resp = check_envelope(&review, &reply);
    let patch = resp
        .patch
        .clone()
        .unwrap_or_else(|| panic!("no patch: {}", reply.body));
    (apply_rust(object, &patch), patch, resp)
}

fn paths(patch: &Value) -> Vec<String> {
    patch
        .as_array()
        .into_iter()
        .flatten()
        .map(|op| {
            format!(
                "{} {}",
                op["op"].as_str().unwrap_or(""),
                op["path"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[test]
fn minimal_pod_gets_its_parents_created_first() {
    let cfg = config(SidecarMode::Native);
    let object = pod(
        "m",
        json!({}),
        json!({"containers": [{"name": "app", "image": "nginx"}]}),
    );
    let (_, patch, _) = inject_one(&object, &cfg);
    assert_eq!(
        paths(&patch),
        [
            "add /spec/containers/0/volumeMounts",
            "add /spec/initContainers",
            "add /spec/volumes",
            "add /metadata/annotations"
        ]
    );
}

#[test]
fn keys_are_escaped_and_user_arrays_never_replaced() {
    let cfg = config(SidecarMode::Native);
    let object = pod(
        "e",
        json!({"annotations": {"a~b/c": "1"}}),
        json!({"initContainers": [{"name": "u", "image": "busybox"}],
               "containers": [{"name": "app", "image": "nginx"}],
               "volumes": [{"name": "data", "emptyDir": {}}]}),
    );
    let (result, patch, _) = inject_one(&object, &cfg);
    assert_eq!(
        paths(&patch),
        [
            "add /spec/containers/0/volumeMounts",
            "add /spec/initContainers/0",
            "add /spec/initContainers/1",
            "add /spec/volumes/-",
            "add /spec/volumes/-",
            "add /spec/volumes/-",
            "add /metadata/annotations/moat.dev~1injected",
            "add /metadata/annotations/kubectl.kubernetes.io~1default-container",
        ]
    );
    assert_eq!(result["metadata"]["annotations"]["a~b/c"], "1");
}

#[test]
fn probes_with_named_ports_are_rewritten_and_recorded() {
    let cfg = config(SidecarMode::Native);
    let object = pod(
        "p",
        json!({}),
        json!({"containers": [{"name": "web", "image": "nginx",
            "ports": [{"name": "http", "containerPort": 8080}, {"name": "pg", "containerPort": 5432}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http", "httpHeaders": [{"name": "X", "value": "y"}]}},
            "livenessProbe": {"tcpSocket": {"port": "pg"}, "periodSeconds": 7},
            "startupProbe": {"grpc": {"port": 9090}}}]}),
    );
    let (result, patch, _) = inject_one(&object, &cfg);
    let ops = paths(&patch);
    assert_eq!(
        ops[..3],
        [
            "replace /spec/containers/0/readinessProbe/httpGet",
            "remove /spec/containers/0/livenessProbe/tcpSocket",
            "add /spec/containers/0/livenessProbe/httpGet",
        ]
    );
    let web = &result["spec"]["containers"][0];
    assert_eq!(web["livenessProbe"]["periodSeconds"], 7);
    assert_eq!(
        web["livenessProbe"]["httpGet"]["path"],
        "/app-health/web/liveness"
    );
    assert_eq!(web["startupProbe"], json!({"grpc": {"port": 9090}}));
    let proxy = &result["spec"]["initContainers"][1];
    let probes = env_of(proxy, "MOAT_APP_PROBES")["value"]
        .as_str()
        .expect("value");
    assert_eq!(
        serde_json::from_str::<Value>(probes).expect("json"),
        json!({
            "web/readiness": {"kind": "http", "port": 8080, "path": "/healthz", "scheme": "HTTP", "headers": [{"name": "X", "value": "y"}]},
            "web/liveness": {"kind": "tcp", "port": 5432}
        })
    );
}

#[test]
fn env_values_are_literal() {
    // Kubernetes expands $(VAR) in env values; a probe header must reach the proxy unchanged.
    let cfg = config(SidecarMode::Native);
    let object = pod(
        "d",
        json!({}),
        json!({"containers": [{"name": "web", "image": "nginx",
            "readinessProbe": {"httpGet": {"port": 80, "httpHeaders": [{"name": "X", "value": "$(HOME)"}]}}}]}),
    );
    let (result, _, _) = inject_one(&object, &cfg);
    let proxy = &result["spec"]["initContainers"][1];
    let raw = env_of(proxy, "MOAT_APP_PROBES")["value"]
        .as_str()
        .expect("value");
    assert!(raw.contains("$$(HOME)"), "{raw}");
}

#[test]
fn annotations_tune_the_sidecar_and_init_args() {
    let mut cfg = config(SidecarMode::Native);
    // The exclusions asked for are inside the platform's allow lists.
    cfg.enforcement.skip_inbound_ports =
        moat_injector::syntax::parse_ports("22,9000-9100").expect("ports");
    cfg.enforcement.skip_outbound_ports =
        moat_injector::syntax::parse_ports("5432").expect("ports");
    cfg.enforcement.skip_outbound_cidrs =
        moat_injector::syntax::parse_cidrs("10.96.0.0/12,fd00::/8").expect("cidrs");
    let object = pod(
        "t",
        json!({"annotations": {
            "moat.dev/skip-inbound-ports": "22, 9000-9010",
            "moat.dev/skip-outbound-ports": "5432",
            "moat.dev/skip-outbound-cidrs": "10.96.0.1/32,fd00::/8",
            "moat.dev/proxy-cpu-request": "100m",
            "moat.dev/proxy-cpu-limit": "2",
            "moat.dev/proxy-memory-request": "64Mi",
            "moat.dev/proxy-memory-limit": "512Mi",
            "moat.dev/log-level": "debug"}}),
        json!({"containers": app()}),
    );
    let (result, _, resp) = inject_one(&object, &cfg);
    assert_eq!(resp.warnings(), "");
    let init = &result["spec"]["initContainers"][0];
    assert_eq!(
        init["args"],
        json!([
            "init",
            "--inbound-port",
            "15006",
            "--outbound-port",
            "15001",
            "--proxy-uid",
            "7777",
            "--proxy-gid",
            "7777",
            "--exclude-inbound-ports",
            "22,9000:9010",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "10.96.0.1/32,fd00::/8",
            "--exclude-outbound-endpoints",
            "10.96.0.10/32=53"
        ])
    );
    let proxy = &result["spec"]["initContainers"][1];
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "2", "memory": "512Mi"}})
    );
    assert_eq!(env_of(proxy, "MOAT_LOG_LEVEL")["value"], "debug");
}

#[test]
fn default_resources_and_bad_quantities_fall_back() {
    let cfg = config(SidecarMode::Native);
    let object = pod(
        "r",
        json!({"annotations": {"moat.dev/proxy-cpu-limit": "10m", "moat.dev/proxy-memory-limit": "lots"}}),
        json!({"containers": app()}),
    );
    let (result, _, resp) = inject_one(&object, &cfg);
    let proxy = &result["spec"]["initContainers"][1];
    assert_eq!(
        proxy["resources"],
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}})
    );
    let w = resp.warnings();
    assert!(
        w.contains("moat.dev/proxy-cpu-request 50m exceeds limit 10m; defaults used"),
        "{w}"
    );
    assert!(w.contains("moat.dev/proxy-memory-limit ignored"), "{w}");
}

#[test]
fn generate_name_pod_takes_the_request_namespace() {
    // kubewarden/panic.json: a real ReplicaSet-controller CREATE with generateName only and
    // the namespace only at request level.
    let path = corpus_dir().join("kubewarden/panic.json");
    let req: Value = serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    assert!(req["object"]["metadata"].get("name").is_none());
    assert!(req["object"]["metadata"].get("namespace").is_none());
    let cfg = config(SidecarMode::Native);
    let review = wrap(req.clone());
    let resp = check_envelope(&review, &call(&review, &cfg));
    assert!(resp.patch.is_some());
    // The same pod, sent for a system namespace, is skipped: the request namespace is used.
    let mut sys = req;
    sys["namespace"] = json!("kube-system");
    let review = wrap(sys);
    let resp = check_envelope(&review, &call(&review, &cfg));
    assert!(resp.patch.is_none());
}

#[test]
fn validators_are_not_vacuous() {
    // kubernetes-validate rejects an unknown field and a schema it does not have.
    let mut bad = BTreeMap::new();
    bad.insert(
        "unknown-field".to_string(),
        pod(
            "x",
            json!({}),
            json!({"containers": [{"name": "a", "image": "b", "bogus": 1}]}),
        ),
    );
    assert!(std::panic::catch_unwind(|| kubernetes_validate(&bad)).is_err());
    let mut no_schema = BTreeMap::new();
    no_schema.insert(
        "apps-v1-pod".to_string(),
        json!({"apiVersion": "apps/v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {"containers": app()}}),
    );
    assert!(std::panic::catch_unwind(|| kubernetes_validate(&no_schema)).is_err());
    // Python jsonpatch refuses an add below a missing parent, as the API server would.
    let mut cases = BTreeMap::new();
    cases.insert(
        "missing-parent".to_string(),
        (
            json!({"spec": {}}),
            json!([{"op": "add", "path": "/spec/volumes/-", "value": {}}]),
        ),
    );
    assert!(std::panic::catch_unwind(|| apply_python(&cases)).is_err());
}

#[test]
fn reinvocation_after_another_webhook_reinjects_the_final_pod_once() {
    let cfg = config(SidecarMode::Native);
    let object = pod(
        "ri",
        json!({}),
        json!({"containers": [{"name": "app", "image": "nginx", "ports": [{"containerPort": 8080}],
                               "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}]}),
    );
    let (injected, _, _) = inject_one(&object, &cfg);
    // A later webhook adds a container with a probe and an env var to every container
    // (ours included); the API server then calls the injector again.
    let mut changed = injected.clone();
    changed["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .push(json!({"name": "agent", "image": "agent", "livenessProbe": {"tcpSocket": {"port": 9000}}}));
    for c in changed["spec"]["initContainers"]
        .as_array_mut()
        .expect("init")
    {
        if let Some(e) = c["env"].as_array_mut() {
            e.push(json!({"name": "TZ", "value": "UTC"}));
        }
    }
    let (again, patch, resp) = inject_one(&changed, &cfg);
    assert!(
        resp.warnings().contains("were replaced"),
        "{}",
        resp.warnings()
    );
    // The spec, and the status annotation (one more probe rewritten).
    assert_eq!(paths(&patch), ["add /metadata", "add /spec"]);
    let init = names(&again["spec"]["initContainers"]);
    assert_eq!(init, ["moat-init", "moat-proxy"]);
    let agent = &again["spec"]["containers"][1];
    assert_eq!(
        agent["livenessProbe"]["httpGet"]["path"],
        "/app-health/agent/liveness"
    );
    assert_eq!(
        agent["volumeMounts"],
        json!([{"name": "moat-run", "mountPath": "/run/moat", "readOnly": true}])
    );
    let probes: Value = serde_json::from_str(
        env_of(&again["spec"]["initContainers"][1], "MOAT_APP_PROBES")["value"]
            .as_str()
            .expect("value"),
    )
    .expect("json");
    assert_eq!(
        probes,
        json!({"app/readiness": {"kind": "http", "port": 8080, "path": "/ready", "scheme": "HTTP", "headers": []},
               "agent/liveness": {"kind": "tcp", "port": 9000}})
    );
    check_injected("reinvoked", &changed, &again, SidecarMode::Native, &cfg);
    // And a third call changes nothing.
    let review = review_of("third", &again, "default");
    assert!(check_envelope(&review, &call(&review, &cfg))
        .patch
        .is_none());
}
