//! `moat-injector inject -f` through the real binary, over the Istio corpus manifests
//! (Deployments, Pods, `kind: List`, CronJob), validated with `kubernetes-validate`.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use moat_injector::config::SidecarMode;
use serde::Deserialize as _;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_moat-injector");

fn bundle_file(dir: &TempDir) -> PathBuf {
    let p = dir.0.join("bundle.pem");
    std::fs::write(&p, &test_ca().0).expect("write bundle");
    p
}

fn inject(file: &str, bundle: &Path, extra: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["inject", "-f", file, "--trust-bundle"])
        .arg(bundle)
        // As in a pod whose resolv.conf names the cluster DNS Service (not this machine's).
        .args(["--cluster-dns-ip", "10.96.0.10"])
        .args(extra)
        .env_remove("MOAT_PROXY_IMAGE")
        .env_remove("MOAT_TRUST_DOMAIN")
        .env_remove("MOAT_MESH_NETWORKS")
        .env_remove("MOAT_DESTINATION_ADDR")
        .env_remove("MOAT_SERVICE_NETWORKS")
        // As in a pod: the API server's Service address (excluded from capture by default).
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run moat-injector");
    if let (Some(input), Some(mut s)) = (stdin, child.stdin.take()) {
        // The process may exit before reading (e.g. on a bad flag): a broken pipe is fine.
        let _ = s.write_all(input.as_bytes());
    }
    child.wait_with_output().expect("wait")
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("output is YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The pod templates of a document (List items included).
fn templates(doc: &Value) -> Vec<Value> {
    match doc["kind"].as_str().unwrap_or("") {
        "List" => doc["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(templates)
            .collect(),
        "Pod" => vec![doc.clone()],
        "CronJob" => doc
            .pointer("/spec/jobTemplate/spec/template")
            .cloned()
            .into_iter()
            .collect(),
        _ => doc.pointer("/spec/template").cloned().into_iter().collect(),
    }
}

/// Objects kubernetes-validate can check (it has no schema for `kind: List`).
fn validatable(doc: &Value) -> Vec<Value> {
    if doc["kind"] == "List" {
        doc["items"].as_array().cloned().unwrap_or_default()
    } else {
        vec![doc.clone()]
    }
}

fn is_injected(t: &Value) -> bool {
    t.pointer("/metadata/annotations/moat.dev~1injected")
        .is_some()
}

#[test]
fn injects_the_istio_corpus_through_the_binary() {
    let dir = TempDir::new("offline");
    let bundle = bundle_file(&dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir().join("istio"))
        .expect("istio")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        names.contains(&"list.yaml".to_string()) && names.contains(&"cronjob.yaml".to_string())
    );

    let mut to_validate = BTreeMap::new();
    for (file, name) in files.iter().zip(&names) {
        let path = file.to_str().expect("utf-8 path");
        let out = inject(path, &bundle, &[], None);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let input = yaml_docs(file);
        let output = docs(&stdout);
        assert_eq!(input.len(), output.len(), "{name}: document count changed");
        for (before, after) in input.iter().zip(&output) {
            let (tb, ta) = (templates(before), templates(after));
            assert_eq!(tb.len(), ta.len(), "{name}");
            for (b, a) in tb.iter().zip(&ta) {
                if name == "hello-host-network.yaml" {
                    assert_eq!(a, b, "{name}: hostNetwork template changed");
                    assert!(stderr.contains("skipped: host_network"), "{stderr}");
                } else {
                    assert!(is_injected(a), "{name}: not injected:\n{stdout}");
                    let init = a["spec"]["initContainers"]
                        .as_array()
                        .expect("initContainers");
                    assert_eq!(init[0]["name"], "moat-init", "{name}");
                    assert_eq!(init[1]["name"], "moat-proxy", "{name}");
                }
            }
            // Everything outside the pod template is untouched.
            let strip = |d: &Value| {
                let mut d = d.clone();
                for p in ["/spec/template", "/spec/jobTemplate/spec/template"] {
                    if let Some(t) = d.pointer_mut(p) {
                        *t = Value::Null;
                    }
                }
                if d["kind"] == "Pod" {
                    d = json!({"kind": "Pod"});
                }
                if let Some(items) = d.get_mut("items").and_then(Value::as_array_mut) {
                    for i in items {
                        if let Some(t) = i.pointer_mut("/spec/template") {
                            *t = Value::Null;
                        }
                    }
                }
                d
            };
            assert_eq!(
                strip(before),
                strip(after),
                "{name}: outside of the template changed"
            );
            for (i, v) in validatable(after).into_iter().enumerate() {
                to_validate.insert(format!("{name}#{i}"), v);
            }
        }

        // Idempotent: injecting the output again changes nothing.
        let again_file = dir.0.join(format!("{name}.out"));
        std::fs::write(&again_file, &stdout).expect("write");
        let again = inject(again_file.to_str().expect("utf-8"), &bundle, &[], None);
        assert!(again.status.success());
        assert_eq!(
            docs(&String::from_utf8_lossy(&again.stdout)),
            output,
            "{name}: not idempotent"
        );
        if name != "hello-host-network.yaml" {
            assert!(
                String::from_utf8_lossy(&again.stderr).contains("skipped: already_injected"),
                "{name}"
            );
        }
    }
    kubernetes_validate(&to_validate);
}

#[test]
fn offline_uses_the_webhook_injection() {
    // The pod template injected offline equals the pod the webhook produces for it.
    let dir = TempDir::new("same");
    let bundle = bundle_file(&dir);
    let path = corpus_dir().join("istio/ready_live.yaml");
    let out = inject(path.to_str().expect("utf-8"), &bundle, &[], None);
    assert!(out.status.success());
    let offline = templates(&docs(&String::from_utf8_lossy(&out.stdout))[0])[0].clone();

    let template = templates(&yaml_docs(&path)[0])[0].clone();
    let cfg = config(SidecarMode::Native);
    let outcome = moat_injector::inject::inject(&template, None, &cfg).expect("inject");
    let moat_injector::inject::Decision::Inject(injection) = outcome.decision else {
        panic!("not injected");
    };
    assert_eq!(offline, injection.patched);

    // The discovery flags reach the sidecar's environment.
    let out = inject(
        path.to_str().expect("utf-8"),
        &bundle,
        &[
            "--service-networks",
            "10.96.0.0/12",
            "--destination-addr",
            "dest.example:9000",
        ],
        None,
    );
    assert!(out.status.success());
    let template = templates(&docs(&String::from_utf8_lossy(&out.stdout))[0])[0].clone();
    let proxy_env = template["spec"]["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "moat-proxy"))
        .map(|c| c["env"].clone())
        .expect("the sidecar");
    let env = |name: &str| {
        proxy_env
            .as_array()
            .and_then(|e| e.iter().find(|v| v["name"] == name))
            .map(|v| v["value"].clone())
    };
    assert_eq!(env("MOAT_SERVICE_NETWORKS"), Some("10.96.0.0/12".into()));
    assert_eq!(
        env("MOAT_DESTINATION_ADDR"),
        Some("dest.example:9000".into())
    );
    let out = inject(
        path.to_str().expect("utf-8"),
        &bundle,
        &["--destination-addr", "off"],
        None,
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("MOAT_DESTINATION_ADDR"), "{text}");

    // A pod created from the injected template is left as it is by the webhook, even in an
    // enforcing namespace where Moat's parts are never trusted: they are exactly its own.
    let mut pod = offline.clone();
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["generateName"] = json!("ready-live-");
    let review = review_of("from-template", &pod, "shop");
    let resp = check_envelope(&review, &call(&review, &cfg));
    assert_eq!(resp.response["allowed"], true, "{}", resp.response);
    assert!(
        resp.patch.is_none(),
        "the webhook re-injected an offline-injected pod"
    );
}

#[test]
fn stdin_multi_document_with_other_kinds_and_classic_mode() {
    let dir = TempDir::new("stdin");
    let bundle = bundle_file(&dir);
    let input = "\
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  key: value
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
  namespace: data
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
      - name: db
        image: postgres:16
        ports: [{name: pg, containerPort: 5432}]
        readinessProbe: {tcpSocket: {port: pg}}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: opted-out
spec:
  template:
    metadata:
      labels: {moat.dev/inject: disabled}
    spec:
      restartPolicy: Never
      containers: [{name: job, image: busybox}]
---
apiVersion: v1
kind: Service
metadata:
  name: db
spec:
  ports: [{port: 5432}]
";
    let out = inject("-", &bundle, &["--sidecar-mode", "classic"], Some(input));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("StatefulSet/db: injected"), "{stderr}");
    assert!(
        stderr.contains("Job/opted-out: skipped: opted_out"),
        "{stderr}"
    );
    let before = docs(input);
    let after = docs(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(after.len(), 4);
    assert_eq!(before[0], after[0], "ConfigMap changed");
    assert_eq!(before[2], after[2], "opted-out Job changed");
    assert_eq!(before[3], after[3], "Service changed");
    let t = &after[1]["spec"]["template"];
    let containers: Vec<&str> = t["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        containers,
        ["db", "moat-proxy"],
        "classic mode appends the proxy"
    );
    assert_eq!(t["spec"]["initContainers"][0]["name"], "moat-init");
    assert_eq!(
        t["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/app-health/db/readiness"
    );
    // By default neither the API server nor DNS over TCP is captured.
    let init_args = &t["spec"]["initContainers"][0]["args"];
    let tail: Vec<&str> = init_args.as_array().expect("args")[9..]
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        tail,
        [
            "--exclude-outbound-cidrs",
            "10.96.0.1/32",
            "--exclude-outbound-endpoints",
            "10.96.0.10/32=53"
        ],
        "{init_args}"
    );
    let mut v = BTreeMap::new();
    for (i, d) in after.iter().enumerate() {
        v.insert(format!("stdin#{i}"), d.clone());
    }
    kubernetes_validate(&v);
}

#[test]
fn api_server_and_dns_capture_can_be_turned_on() {
    let dir = TempDir::new("capture");
    let bundle = bundle_file(&dir);
    let input = "\
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  containers: [{name: app, image: nginx}]
";
    let init_args = |extra: &[&str]| {
        let out = inject("-", &bundle, extra, Some(input));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        docs(&String::from_utf8_lossy(&out.stdout))[0]["spec"]["initContainers"][0]["args"].clone()
    };
    let both = init_args(&["--capture-api-server", "--capture-dns-tcp"]);
    assert_eq!(both.as_array().expect("args").len(), 9, "{both}");
    let ipv6 = init_args(&["--api-server-ip", "fd00:10:96::1", "--capture-dns-tcp"]);
    assert_eq!(ipv6[9], "--exclude-outbound-cidrs", "{ipv6}");
    assert_eq!(ipv6[10], "fd00:10:96::1/128", "{ipv6}");
}

#[test]
fn clear_errors() {
    let dir = TempDir::new("errors");
    let bundle = bundle_file(&dir);
    let out = inject("/nonexistent.yaml", &bundle, &[], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent.yaml"));

    let out = inject(
        "-",
        Path::new("/nonexistent/bundle.pem"),
        &[],
        Some("kind: Pod\n"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read trust bundle /nonexistent/bundle.pem"),
        "{err}"
    );

    let out = inject("-", &bundle, &[], Some("a: [unclosed\n"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid YAML"));

    let out = inject("-", &bundle, &["--mesh-networks", "10.0.0.0/99"], Some(""));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("prefix must be 0-32"));
}
