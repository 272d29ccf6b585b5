//! Offline injection (`moat-injector inject -f FILE|-`) for GitOps: reads manifests, injects
//! every Pod and pod template with exactly the webhook's [`inject::inject`], and writes the
//! manifests back as YAML.
//!
//! Pod templates are found at `/spec/template` (Deployment, StatefulSet, DaemonSet,
//! ReplicaSet, Job, ReplicationController) and `/spec/jobTemplate/spec/template` (CronJob);
//! `kind: List` (and `*List`) items are handled one by one. The patch built for the template is
//! applied to the whole document at that prefix. Other documents pass through unchanged
//! (re-serialised: comments and formatting are not preserved).

use serde::Deserialize as _;
use serde_json::Value;

use crate::config::InjectConfig;
use crate::inject::{self, Decision};
use crate::patch;

/// Why the input could not be processed.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The input is not YAML (or JSON).
    #[error("document {index}: not valid YAML: {reason}")]
    Yaml {
        /// 1-based document number.
        index: usize,
        /// The parser's message.
        reason: String,
    },
    /// The output could not be produced.
    #[error("cannot write YAML: {0}")]
    Output(String),
    /// An injection patch did not apply to the document (a bug in the injector).
    #[error("{object}: {reason}")]
    Internal {
        /// The object.
        object: String,
        /// What failed.
        reason: String,
    },
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `kind/name` (with `items[i]` for list members).
    pub object: String,
    /// `injected`, `skipped: <reason>`, `unchanged: <why>` or `error: <why>`.
    pub result: String,
    /// Warnings, as the webhook would return them.
    pub warnings: Vec<String>,
}

/// Where the pod template of `kind` lives, or `None` for kinds without one.
pub fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Injects every workload of a YAML stream (multi-document, lists allowed); returns the output
/// YAML and one report per workload.
pub fn inject_yaml(input: &str, cfg: &InjectConfig) -> Result<(String, Vec<Report>), OfflineError> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let doc = Value::deserialize(de).map_err(|e| OfflineError::Yaml {
            index: i + 1,
            reason: e.to_string(),
        })?;
        if !doc.is_null() {
            docs.push(doc);
        }
    }
    let mut reports = Vec::new();
    let mut out = String::new();
    for mut doc in docs {
        inject_document(&mut doc, "", cfg, &mut reports)?;
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(
            &serde_yaml::to_string(&doc).map_err(|e| OfflineError::Output(e.to_string()))?,
        );
    }
    Ok((out, reports))
}

fn describe(doc: &Value, at: &str) -> String {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("?");
    let name = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .or_else(|| {
            doc.pointer("/metadata/generateName")
                .and_then(Value::as_str)
        })
        .unwrap_or("?");
    if at.is_empty() {
        format!("{kind}/{name}")
    } else {
        format!("{at} {kind}/{name}")
    }
}

/// Injects one document in place (recursing into lists).
fn inject_document(
    doc: &mut Value,
    at: &str,
    cfg: &InjectConfig,
    reports: &mut Vec<Report>,
) -> Result<(), OfflineError> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if kind == "List" || (kind.ends_with("List") && doc.get("items").is_some()) {
        if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
            for (i, item) in items.iter_mut().enumerate() {
                inject_document(item, &format!("{at}items[{i}]"), cfg, reports)?;
            }
        }
        return Ok(());
    }
    let Some(path) = template_path(&kind) else {
        return Ok(()); // not a workload: passes through
    };
    let object = describe(doc, at);
    let report = |result: String, warnings: Vec<String>| Report {
        object: object.clone(),
        result,
        warnings,
    };
    let prefix = patch::pointer(path);
    let Some(template) = doc.pointer(&prefix).filter(|t| t.is_object()) else {
        reports.push(report("unchanged: no pod template".into(), Vec::new()));
        return Ok(());
    };
    let namespace = doc
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|ns| !ns.is_empty())
        .map(str::to_string);
    match inject::inject(template, namespace.as_deref(), cfg) {
        Err(inject::InjectError::Decode(e)) => {
            reports.push(report(
                format!("unchanged: pod template not understood: {e}"),
                Vec::new(),
            ));
        }
        Err(e) => {
            return Err(OfflineError::Internal {
                object,
                reason: e.to_string(),
            })
        }
        Ok(outcome) => match outcome.decision {
            Decision::Skip(reason) => {
                reports.push(report(
                    format!("skipped: {}", reason.label()),
                    outcome.warnings,
                ));
            }
            // Offline injection enforces nothing (the webhook does, when the pods are created).
            Decision::Refuse(violations) => {
                let why: Vec<&str> = violations.iter().map(|v| v.message.as_str()).collect();
                reports.push(report(
                    format!("unchanged: refused: {}", why.join("; ")),
                    outcome.warnings,
                ));
            }
            Decision::Inject(injection) => {
                let full = patch::prefixed(&injection.patch, &prefix).map_err(|e| {
                    OfflineError::Internal {
                        object: object.clone(),
                        reason: e.to_string(),
                    }
                })?;
                json_patch::patch(doc, &full).map_err(|e| OfflineError::Internal {
                    object: object.clone(),
                    reason: format!("patch does not apply: {e}"),
                })?;
                reports.push(report("injected".into(), outcome.warnings));
            }
        },
    }
    Ok(())
}
