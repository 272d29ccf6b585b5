//! The admission metrics: duration histogram, injections, skips and errors by reason. (Own test
//! binary: it installs the global metrics recorder.)

mod common;

use common::*;
use moat_injector::admission;
use moat_injector::config::{FailureMode, SidecarMode};
use serde_json::json;

#[test]
fn decisions_are_counted_by_reason() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("recorder");
    moat_injector::metrics::describe();
    let cfg = config(SidecarMode::Native);
    let pod = |spec: serde_json::Value| json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec});
    let app = json!([{"name": "app", "image": "nginx"}]);
    let send = |review: &serde_json::Value| {
        admission::review(
            &serde_json::to_vec(review).expect("json"),
            &cfg,
            FailureMode::Open,
        )
    };
    send(&review_of("1", &pod(json!({"containers": app})), "default"));
    send(&review_of(
        "2",
        &pod(json!({"containers": app, "hostNetwork": true})),
        "default",
    ));
    send(&review_of(
        "3",
        &pod(json!({"containers": app})),
        "kube-system",
    ));
    let mut delete = review_of("4", &pod(json!({"containers": app})), "default");
    delete["request"]["operation"] = json!("DELETE");
    send(&delete);
    send(&review_of(
        "5",
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}),
        "default",
    ));
    admission::review(b"garbage", &cfg, FailureMode::Open);

    let text = handle.render();
    for line in [
        "moat_injector_injections_total 1",
        "moat_injector_skips_total{reason=\"host_network\"} 1",
        "moat_injector_skips_total{reason=\"system_namespace\"} 1",
        "moat_injector_skips_total{reason=\"operation\"} 1",
        "moat_injector_skips_total{reason=\"not_pod\"} 1",
        "moat_injector_errors_total{reason=\"invalid_json\"} 1",
        "moat_injector_admission_duration_seconds_count{result=\"injected\"} 1",
        "moat_injector_admission_duration_seconds_count{result=\"skipped\"} 4",
        "moat_injector_admission_duration_seconds_count{result=\"bad_request\"} 1",
        "# HELP moat_injector_skips_total",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
}
