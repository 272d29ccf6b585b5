//! `moat-bench injector`: admission latency and throughput of the real `moat-injector serve`.
//!
//! Starts the release `moat-injector` (built beforehand; this builds nothing) on loopback with
//! a serving certificate generated here (the mesh lab's [`moat_e2e::lab::webhook_pki`]), turns
//! a dozen pods of the shared corpus (`../shared/corpus/k8s`: Istio and Linkerd fixtures, real
//! AdmissionRequests captured by kubewarden) into the AdmissionReviews the API server sends for
//! a pod CREATE ([`moat_e2e::lab::admission_review`], a fresh uid per request), then drives
//! `POST /inject` from N concurrent tasks, each over its own keep-alive HTTPS (TLS 1.3,
//! HTTP/1.1) connection, in two phases, each after a short warm-up:
//!
//! 1. **saturation**: closed loop, every task sends its next review as soon as the previous
//!    answer is in: the most admissions per second the injector answers. Latency here is
//!    queueing at saturation (connections / throughput), not the latency target.
//! 2. **fixed rate**: open loop at `--rate` reviews/s (default 1,000/s) spread over the
//!    connections; latency is measured from each request's scheduled send time, so a stalled
//!    injector cannot hide its backlog (no coordinated omission).
//!
//! Every answer is checked: HTTP 200, an `admission.k8s.io/v1` AdmissionReview echoing the
//! request's uid, `allowed: true`, and a base64 RFC 6902 `JSONPatch`; once per connection and
//! pod the patch is also applied to the pod, which must then hold `moat-init` and `moat-proxy`.
//! Anything else is counted by reason and fails the run. Each phase reports client-side
//! percentiles, the injector's own `moat_injector_admission_duration_seconds` over the same
//! window, its CPU time per 1,000 admissions, and how much CPU the rest of the machine used
//! meanwhile. The verdict: p99 < 2 ms at 1,000 admissions/s. The phases are
//! [`crate::phase`]'s, shared with `moat-bench ca`; this module makes the reviews and checks
//! the answers.

use std::borrow::Cow;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::Engine as _;
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use moat_e2e::https::Reply;
use moat_e2e::Proc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::phase::{
    self, AnswerNames, CpuNames, HistogramNames, Names, Phases, Plan, Server, Workload,
};
use crate::util;

/// Target: client-side p99 admission latency at [`TARGET_RATE`], milliseconds.
pub const TARGET_P99_MS: f64 = 2.0;
/// Offered load at which the latency target applies, admissions/s.
pub const TARGET_RATE: f64 = 1000.0;

const HISTOGRAM: &str = "moat_injector_admission_duration_seconds";
/// The namespace every pod is created in: an ordinary opted-in application namespace.
const NAMESPACE: &str = moat_e2e::lab::NAMESPACE;
/// The API server's request, path and query included.
const INJECT_URI: &str = "/inject?timeout=10s";
/// Stands for the uid while a review is serialised once, so each request only splices its own.
const UID_MARK: &str = "moat-bench-uid-placeholder";

/// Corpus files the reviews are built from, relative to the corpus directory. All are pods
/// Moat injects with its defaults (the corpus's skip and error cases are left out: every
/// answer here must carry a patch).
const CORPUS_PODS: [&str; 12] = [
    "istio/hello.yaml",
    "istio/pod.yaml",
    "istio/multi-init.yaml",
    "istio/native-sidecar.yaml",
    "istio/ready_live.yaml",
    "istio/traffic-annotations.yaml",
    "istio/cronjob.yaml",
    "linkerd/pod-inject-enabled.yaml",
    "linkerd/pod-nativesidecar-inject-enabled.yaml",
    "kubewarden/panic.json",
    "kubewarden/request-pod-volumes.json",
    "kubewarden/privileged_init_container.json",
];

/// Options of `moat-bench injector`.
#[derive(Debug, Clone, Args)]
pub struct InjectorArgs {
    /// Measurement window of each phase.
    #[arg(long, default_value = "10s", value_parser = moat_core::duration::parse)]
    pub duration: Duration,
    /// Warm-up before each phase's window (connections, allocator, CPU frequency).
    #[arg(long, default_value = "1s", value_parser = moat_core::duration::parse)]
    pub warmup: Duration,
    /// Concurrent client tasks, one keep-alive HTTPS connection each.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Offered load of the fixed-rate phase, admissions/s; 0 skips that phase.
    #[arg(long, default_value_t = TARGET_RATE)]
    pub rate: f64,
    /// The k8s corpus (default: `../shared/corpus/k8s` next to the workspace).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// The injector's log level (`info` logs one line per admission, as in production).
    #[arg(long, default_value = "info")]
    pub injector_log_level: String,
    /// CI smoke run: 1 s windows after 0.25 s of warm-up (about 2.5 s in all).
    #[arg(long)]
    pub smoke: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// Results of a run.
#[derive(Debug, Clone, Serialize)]
pub struct InjectorReport {
    /// Always `"injector"`.
    pub bench: &'static str,
    /// Client tasks (= connections).
    pub concurrency: usize,
    /// Corpus files the reviews were built from.
    pub pods: Vec<String>,
    /// Mean AdmissionReview request body, bytes.
    pub request_bytes_mean: f64,
    /// Warm-up before each window, seconds.
    pub warmup_s: f64,
    /// CPUs available to the benchmark and the injector together.
    pub host_cpus: usize,
    /// The closed-loop phase (`saturation`) and the open-loop one (`fixed_rate`); failed
    /// admissions count in the warm-up too.
    #[serde(flatten)]
    pub phases: Phases,
    /// Injector resident memory at the end, MiB.
    pub injector_rss_mib: f64,
    /// Injector peak resident memory, MiB.
    pub injector_peak_rss_mib: f64,
    /// Offered load at which the target applies.
    pub target_rate: f64,
    /// Target p99 at that load, milliseconds.
    pub target_p99_ms: f64,
    /// Whether the target was met (and no admission failed in the fixed-rate phase).
    pub met: bool,
}

impl InjectorReport {
    /// Failed admissions over the whole run.
    pub fn errors(&self) -> u64 {
        self.phases.errors()
    }

    /// One line for a combined report, e.g. `5,200/s saturated; at
    /// 1,000/s p50 0.31 ms, p99 0.92 ms (target p99 < 2 ms: met)`.
    pub fn summary_line(&self) -> String {
        let at = match &self.phases.fixed_rate {
            Some(p) => format!(
                "at {}/s p50 {:.2} ms, p99 {:.2} ms",
                grouped(p.offered_rate.unwrap_or(0.0)),
                p.latency.p50_ms,
                p.latency.p99_ms
            ),
            None => "fixed rate not measured (--rate 0)".to_string(),
        };
        let errors = match self.errors() {
            0 => String::new(),
            n => format!("; {} failed admissions (ERRORS)", grouped(n as f64)),
        };
        format!(
            "{}/s saturated; {at} (target p99 < {} ms: {}){errors}",
            grouped(self.phases.saturation.answers_per_sec),
            self.target_p99_ms,
            if self.met { "met" } else { "missed" },
        )
    }
}

/// One corpus pod as an AdmissionReview body, serialised once; only the uid changes.
#[derive(Debug)]
struct Review {
    /// Corpus file, e.g. `istio/pod.yaml`.
    source: String,
    /// The pod as sent in `request.object`.
    pod: Value,
    /// The body up to the uid's value (inside its quotes).
    before: Bytes,
    /// The body after the uid's value.
    after: Bytes,
}

impl Review {
    fn new(source: &str, pod: Value, namespace: &str) -> anyhow::Result<Self> {
        let body = serde_json::to_vec(&moat_e2e::lab::admission_review(UID_MARK, &pod, namespace))?;
        let mark = format!("\"{UID_MARK}\"");
        let mut hits = body
            .windows(mark.len())
            .enumerate()
            .filter(|(_, w)| *w == mark.as_bytes())
            .map(|(i, _)| i);
        let (Some(at), None) = (hits.next(), hits.next()) else {
            bail!("{source}: the pod itself contains {UID_MARK:?}");
        };
        let body = Bytes::from(body);
        Ok(Self {
            source: source.to_string(),
            pod,
            before: body.slice(..at + 1),
            after: body.slice(at + mark.len() - 1..),
        })
    }

    /// The request body carrying `uid` (a UUID: nothing to escape).
    fn body(&self, uid: &str) -> Bytes {
        let mut b = Vec::with_capacity(self.before.len() + uid.len() + self.after.len());
        b.extend_from_slice(&self.before);
        b.extend_from_slice(uid.as_bytes());
        b.extend_from_slice(&self.after);
        Bytes::from(b)
    }

    /// Size of every body of this review, bytes.
    fn len(&self) -> usize {
        self.before.len() + self.after.len() + uid(0, 0).len()
    }
}

/// A UUID-shaped uid, unique per task and request (`6d6f6174` is "moat").
fn uid(task: usize, seq: u64) -> String {
    format!(
        "6d6f6174-{:04x}-4000-8000-{:012x}",
        task & 0xffff,
        seq & 0xffff_ffff_ffff
    )
}

/// The corpus next to the workspace, as the injector's tests find it.
fn default_corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/k8s")
}

/// The Pod a manifest stands for: a Pod as it is (apiVersion `v1`: Linkerd's fixtures say
/// `apps/v1`, which no API server sends), or the Pod a workload's controller creates from its
/// template (`generateName`, no name).
fn pod_of_manifest(doc: &Value) -> anyhow::Result<Value> {
    let kind = doc["kind"].as_str().unwrap_or("");
    let template = match kind {
        "Pod" => {
            let mut pod = doc.clone();
            pod["apiVersion"] = json!("v1");
            return Ok(pod);
        }
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            doc.pointer("/spec/template")
        }
        "CronJob" => doc.pointer("/spec/jobTemplate/spec/template"),
        _ => bail!("a {kind:?} is neither a Pod nor a workload with a pod template"),
    };
    let template = template.with_context(|| format!("the {kind} has no pod template"))?;
    let mut metadata = template
        .get("metadata")
        .cloned()
        .unwrap_or_else(|| json!({}));
    if !metadata.is_object() {
        bail!("the {kind}'s pod template metadata is not an object");
    }
    let owner = doc
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("pod");
    metadata["generateName"] = json!(format!("{owner}-"));
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": template.get("spec").cloned().unwrap_or(Value::Null),
    }))
}

/// The pod of one corpus file: `.json` files are AdmissionRequests (`request.object`),
/// `.yaml` files are single manifests.
fn corpus_pod(file: &Path, text: &str) -> anyhow::Result<Value> {
    if file.extension().is_some_and(|e| e == "json") {
        let req: Value = serde_json::from_str(text).context("not JSON")?;
        let object = req
            .get("object")
            .filter(|o| o.is_object())
            .context("not an AdmissionRequest with an object")?;
        pod_of_manifest(object)
    } else {
        pod_of_manifest(&serde_yaml::from_str(text).context("not YAML")?)
    }
}

/// Puts `pod` in `namespace` as the API server does for a CREATE in that namespace (a pod
/// without `metadata.namespace` keeps none: the request's namespace is what counts).
fn in_namespace(mut pod: Value, namespace: &str) -> Value {
    if let Some(ns) = pod.pointer_mut("/metadata/namespace") {
        *ns = json!(namespace);
    }
    pod
}

/// The reviews of [`CORPUS_PODS`] found in `dir`.
fn load_reviews(dir: &Path) -> anyhow::Result<Vec<Review>> {
    CORPUS_PODS
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "cannot read {} (the benchmark needs the k8s corpus: --corpus DIR)",
                    path.display()
                )
            })?;
            let pod = corpus_pod(&path, &text).with_context(|| path.display().to_string())?;
            Review::new(name, in_namespace(pod, NAMESPACE), NAMESPACE)
        })
        .collect()
}

/// Why an answer does not count as a correct admission.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Failure {
    /// Not HTTP 200.
    Status(u16),
    /// The body is not an AdmissionReview with a response.
    NotReview(String),
    /// Another apiVersion or kind.
    WrongType(String, String),
    /// The response's uid is not the request's.
    UidMismatch,
    /// `allowed: false`.
    Denied(String),
    /// Allowed without a patch: the pod was not injected.
    NoPatch,
    /// A patch type other than `JSONPatch` (or none).
    PatchType(String),
    /// The patch is not base64.
    PatchNotBase64,
    /// The decoded patch is not an RFC 6902 patch.
    NotJsonPatch(String),
    /// An RFC 6902 patch without operations.
    EmptyPatch,
    /// The patch does not apply to the pod sent.
    DoesNotApply(String),
    /// The patched pod lacks Moat's containers.
    NoSidecar,
}

impl Failure {
    /// The error key: short, and the same for every occurrence of one problem.
    fn reason(&self) -> String {
        let short = |s: &str| s.chars().take(100).collect::<String>();
        match self {
            Failure::Status(s) => format!("http {s}"),
            Failure::NotReview(e) => format!("not an AdmissionReview: {}", short(e)),
            Failure::WrongType(v, k) => {
                format!("answer is {v:?} {k:?}, not admission.k8s.io/v1 AdmissionReview")
            }
            Failure::UidMismatch => "response uid is not the request's".into(),
            Failure::Denied(m) => format!("denied: {}", short(m)),
            Failure::NoPatch => "allowed without a patch (pod not injected)".into(),
            Failure::PatchType(t) => format!("patchType {t:?}, not \"JSONPatch\""),
            Failure::PatchNotBase64 => "patch is not base64".into(),
            Failure::NotJsonPatch(e) => {
                format!("patch is not an RFC 6902 JSON patch: {}", short(e))
            }
            Failure::EmptyPatch => "patch has no operations".into(),
            Failure::DoesNotApply(e) => format!("patch does not apply to the pod: {}", short(e)),
            Failure::NoSidecar => "patched pod lacks moat-init or moat-proxy".into(),
        }
    }
}

#[derive(Deserialize)]
struct ReviewReply<'a> {
    #[serde(rename = "apiVersion", default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(borrow)]
    response: Option<ResponseReply<'a>>,
}

#[derive(Deserialize)]
struct ResponseReply<'a> {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    allowed: bool,
    #[serde(default)]
    status: Option<StatusReply>,
    #[serde(borrow, default)]
    patch: Option<Cow<'a, str>>,
    #[serde(rename = "patchType", default)]
    patch_type: Option<String>,
}

#[derive(Deserialize)]
struct StatusReply {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
}

/// One operation of an RFC 6902 patch, its value skipped: checking every answer's patch must
/// not cost the client more CPU than needed (it shares the machine with the injector).
#[derive(Deserialize)]
struct OpHead<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    path: Cow<'a, str>,
}

/// Checks one answer to the review carrying `uid`; returns its decoded patch (JSON).
fn check_reply(status: u16, body: &[u8], uid: &str) -> Result<Vec<u8>, Failure> {
    if status != 200 {
        return Err(Failure::Status(status));
    }
    let review: ReviewReply =
        serde_json::from_slice(body).map_err(|e| Failure::NotReview(e.to_string()))?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(Failure::WrongType(review.api_version, review.kind));
    }
    let resp = review
        .response
        .ok_or_else(|| Failure::NotReview("no response".into()))?;
    if resp.uid != uid {
        return Err(Failure::UidMismatch);
    }
    if !resp.allowed {
        let (code, message) = resp
            .status
            .map(|s| (s.code.unwrap_or(0), s.message.unwrap_or_default()))
            .unwrap_or_default();
        return Err(Failure::Denied(format!("code {code}: {message}")));
    }
    let Some(patch) = resp.patch else {
        return Err(Failure::NoPatch);
    };
    if resp.patch_type.as_deref() != Some("JSONPatch") {
        return Err(Failure::PatchType(resp.patch_type.unwrap_or_default()));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(patch.as_bytes())
        .map_err(|_| Failure::PatchNotBase64)?;
    let ops: Vec<OpHead> =
        serde_json::from_slice(&raw).map_err(|e| Failure::NotJsonPatch(e.to_string()))?;
    if ops.is_empty() {
        return Err(Failure::EmptyPatch);
    }
    const OPS: [&str; 6] = ["add", "remove", "replace", "move", "copy", "test"];
    if let Some(bad) = ops
        .iter()
        .find(|o| !OPS.contains(&o.op.as_ref()) || !(o.path.is_empty() || o.path.starts_with('/')))
    {
        return Err(Failure::NotJsonPatch(format!(
            "operation {:?} at {:?}",
            bad.op, bad.path
        )));
    }
    Ok(raw)
}

/// Applies the patch (JSON) to `pod` like the API server would; the result must hold
/// `moat-init` and `moat-proxy` (an init container in native mode, a container in classic
/// mode).
fn check_injected(pod: &Value, patch: &[u8]) -> Result<(), Failure> {
    let patch: json_patch::Patch =
        serde_json::from_slice(patch).map_err(|e| Failure::NotJsonPatch(e.to_string()))?;
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).map_err(|e| Failure::DoesNotApply(e.to_string()))?;
    let has = |list: &str, name: &str| {
        patched["spec"][list]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == name))
    };
    if has("initContainers", "moat-init")
        && (has("initContainers", "moat-proxy") || has("containers", "moat-proxy"))
    {
        Ok(())
    } else {
        Err(Failure::NoSidecar)
    }
}

/// What the injector's report calls the figures.
static NAMES: Names = Names {
    server: "injector",
    answers: AnswerNames {
        key: "admissions",
        per_sec_key: "admissions_per_sec",
        unit: "admissions",
        bytes: true,
    },
    histogram: HistogramNames {
        key: "injector_histogram",
        label: "injector hist.",
        noun: "injections",
        note: "bucket bounds; JSON work only",
    },
    cpu: CpuNames {
        key: "injector_cpu_s",
        per_answer_key: "injector_cpu_s_per_1k",
        scale: 1000.0,
        decimals: 3,
        unit: "s per 1,000 admissions",
    },
    offered: "admissions",
};

/// AdmissionReviews cycling through the corpus pods, each answer checked.
struct Admission {
    reviews: Vec<Review>,
}

/// One client task's place in the reviews and what it has checked.
struct Reviewer {
    /// This task's number, in its uids.
    task: usize,
    /// How far each request moves on: the number of tasks, so they share the reviews.
    stride: usize,
    /// The review of the next request.
    next: usize,
    /// Requests sent, in the uids.
    seq: u64,
    /// Applying a patch costs far more than checking its shape: once per pod and connection
    /// proves the injector's patches apply without making the client the bottleneck.
    applied: Vec<bool>,
    /// The review and uid of the request in flight.
    sent: (usize, String),
}

impl Workload for Admission {
    type Task = Reviewer;

    const NAMES: &'static Names = &NAMES;

    // A wrong answer is wrong whenever it comes.
    const COUNTS_WARMUP_FAILURES: bool = true;

    fn task(&self, t: usize, n: usize) -> Reviewer {
        Reviewer {
            task: t,
            stride: n,
            next: t % self.reviews.len(),
            seq: 0,
            applied: vec![false; self.reviews.len()],
            sent: (0, String::new()),
        }
    }

    fn request(&self, r: &mut Reviewer) -> anyhow::Result<http::Request<Full<Bytes>>> {
        let index = r.next;
        r.next = (r.next + r.stride) % self.reviews.len();
        r.seq += 1;
        r.sent = (index, uid(r.task, r.seq));
        Ok(http::Request::post(INJECT_URI)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(self.reviews[index].body(&r.sent.1)))?)
    }

    fn check(&self, r: &mut Reviewer, reply: &Reply) -> anyhow::Result<Result<(), String>> {
        let (index, uid) = &r.sent;
        let review = &self.reviews[*index];
        let checked = check_reply(reply.status, &reply.body, uid).and_then(|patch| {
            if !r.applied[*index] {
                check_injected(&review.pod, &patch)?;
                r.applied[*index] = true;
            }
            Ok(())
        });
        Ok(checked.map_err(|f| format!("{} [{}]", f.reason(), review.source)))
    }
}

/// Runs the benchmark and prints the report; `Ok(false)` when admissions failed.
pub fn main(args: InjectorArgs) -> anyhow::Result<bool> {
    let report = run(&args)?;
    println!("{}", report_lines(&report).join("\n"));
    println!("{}", report.summary_line());
    if let Some(path) = &args.json {
        phase::write_json(path, &report)?;
    }
    Ok(report.errors() == 0)
}

/// Runs the benchmark (starting and stopping the injector) and returns its report. Blocking:
/// call it outside any async runtime.
pub fn run(args: &InjectorArgs) -> anyhow::Result<InjectorReport> {
    let mut args = args.clone();
    if args.smoke {
        args.duration = Duration::from_secs(1);
        args.warmup = Duration::from_millis(250);
    }
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a non-negative number");
    }
    if args.rate > 0.0 && Duration::try_from_secs_f64(args.concurrency as f64 / args.rate).is_err()
    {
        bail!(
            "--rate {:?} is too low to pace {} connections",
            args.rate,
            args.concurrency
        );
    }
    if args.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if tokio::runtime::Handle::try_current().is_ok() {
        bail!("injector::run blocks: call it outside an async runtime");
    }
    let bin = moat_e2e::bin::try_binary("moat-injector")
        .context("moat-bench builds nothing: run `cargo build --release --workspace` first")?;
    let corpus = args.corpus.clone().unwrap_or_else(default_corpus);
    let reviews = load_reviews(&corpus)?;
    let pods = reviews.iter().map(|r| r.source.clone()).collect();
    let request_bytes_mean =
        reviews.iter().map(Review::len).sum::<usize>() as f64 / reviews.len().max(1) as f64;

    let dir = moat_e2e::temp_dir("bench-injector")?;
    let (mut proc, server) = start_injector(&bin, dir.path(), &args.injector_log_level)?;
    let pid = server.pid;
    println!(
        "moat-injector (pid {pid}) on https://{}/inject; {} corpus pods, {} connections; per phase {:?} warm-up + {:?} measured",
        server.addr,
        reviews.len(),
        args.concurrency,
        args.warmup,
        args.duration
    );
    let plan = Plan {
        concurrency: args.concurrency,
        warmup: args.warmup,
        duration: args.duration,
        rate: args.rate,
    };
    let phases = phase::run(server, Admission { reviews }, &plan);
    if !proc.is_running() {
        bail!(
            "moat-injector died during the run:\n{}",
            proc.stderr_tail(20)
        );
    }
    let phases = phases?;
    let (injector_rss_mib, injector_peak_rss_mib) = util::rss_mib(pid)?;
    let met = phases.fixed_rate.as_ref().is_some_and(|p| {
        p.offered_rate.unwrap_or(0.0) >= TARGET_RATE
            && p.answers_per_sec >= 0.98 * TARGET_RATE
            && p.latency.p99_ms < TARGET_P99_MS
            && p.error_count() == 0
    });
    Ok(InjectorReport {
        bench: "injector",
        concurrency: args.concurrency,
        pods,
        request_bytes_mean,
        warmup_s: args.warmup.as_secs_f64(),
        host_cpus: util::cpus(),
        phases,
        injector_rss_mib,
        injector_peak_rss_mib,
        target_rate: TARGET_RATE,
        target_p99_ms: TARGET_P99_MS,
        met,
    })
}

/// Starts `moat-injector serve` on free loopback ports with a fresh serving certificate (its
/// CA doubles as the trust bundle written into sidecars: one P-256 root, like `moat-ca init`
/// makes) and waits for `/ready`.
fn start_injector(bin: &Path, dir: &Path, log_level: &str) -> anyhow::Result<(Proc, Server)> {
    let (ca_pem, cert_pem, key_pem) = moat_e2e::lab::webhook_pki(Ipv4Addr::LOCALHOST)?;
    let (cert, key, bundle) = (
        dir.join("tls.crt"),
        dir.join("tls.key"),
        dir.join("bundle.pem"),
    );
    for (path, pem) in [(&cert, &cert_pem), (&key, &key_pem), (&bundle, &ca_pem)] {
        std::fs::write(path, pem).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let addr = moat_e2e::net::free_addr();
    let admin = moat_e2e::net::free_addr();
    let mut cmd = Command::new(bin);
    // The injector reads these from the environment; the benchmark's own must not leak in.
    for (k, _) in std::env::vars_os() {
        let k_str = k.to_string_lossy();
        if k_str.starts_with("MOAT_") || k_str == "KUBERNETES_SERVICE_HOST" || k_str == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
    cmd.arg("serve")
        // kubewarden/privileged_init_container.json is refused (net_admin) in an enforcing
        // namespace unless allowed: allowed here so every corpus pod is still injected and the
        // workload stays comparable with earlier reports.
        .args(["--allow-opt-out", "net-admin"])
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--admin-listen")
        .arg(admin.to_string())
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--trust-bundle")
        .arg(&bundle)
        // In a cluster KUBERNETES_SERVICE_HOST gives this; it adds the usual exclusion.
        .args(["--api-server-ip", "10.96.0.1"])
        // As deploy/ runs it.
        .args(["--failure-mode", "closed", "--log-format", "json"])
        .args(["--log-level", log_level, "--shutdown-grace", "1s"]);
    let mut proc = Proc::spawn("moat-injector", cmd, &dir.join("logs"))?;
    let admin = admin.to_string();
    if let Err(e) = moat_e2e::net::wait_for_http(&admin, "/ready", Duration::from_secs(15)) {
        bail!(
            "moat-injector did not become ready: {e:#}\n{}",
            proc.stderr_tail(20)
        );
    }
    if !proc.is_running() {
        bail!("moat-injector exited at start:\n{}", proc.stderr_tail(20));
    }
    let tls = moat_e2e::https::client_config(ca_pem.as_bytes())?;
    let pid = proc.pid();
    Ok((
        proc,
        Server {
            pid,
            addr,
            tls,
            admin,
            histogram: (HISTOGRAM, &[("result", "injected")]),
        },
    ))
}

/// `x` rounded to an integer with thousands separators: `5,200`.
fn grouped(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// The report as printed.
fn report_lines(r: &InjectorReport) -> Vec<String> {
    let heading = format!(
        "Injector admission: {} connections, {} corpus pods (requests {:.0} bytes on average), {} CPUs shared by client and injector",
        r.concurrency,
        r.pods.len(),
        r.request_bytes_mean,
        r.host_cpus
    );
    let p99 = r
        .phases
        .fixed_rate
        .as_ref()
        .map_or("not measured (--rate 0)".to_string(), |p| {
            format!(
                "{:.2} ms at {:.0}/s offered, {:.0}/s answered",
                p.latency.p99_ms,
                p.offered_rate.unwrap_or(0.0),
                p.answers_per_sec
            )
        });
    let target = format!(
        "p99 < {:.0} ms at {:.0} admissions/s: {} (p99 {}; saturation {:.0}/s)",
        r.target_p99_ms,
        r.target_rate,
        if r.met { "MET" } else { "MISSED" },
        p99,
        r.phases.saturation.answers_per_sec
    );
    let rss = (r.injector_rss_mib, r.injector_peak_rss_mib);
    phase::report_lines(&heading, &r.phases, rss, &target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::Phase;

    fn reply(response: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }))
        .unwrap()
    }

    fn b64(v: &Value) -> String {
        base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(v).unwrap())
    }

    fn sidecar_patch() -> Value {
        json!([
            {"op": "add", "path": "/spec/initContainers", "value": [
                {"name": "moat-init", "image": "x"},
                {"name": "moat-proxy", "image": "x", "restartPolicy": "Always"},
            ]},
        ])
    }

    fn pod() -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "x"},
               "spec": {"containers": [{"name": "app", "image": "nginx"}]}})
    }

    #[test]
    fn review_body_splices_the_uid_into_the_api_servers_review() {
        let r = Review::new("own/pod", pod(), "shop").unwrap();
        let uid = uid(3, 42);
        assert_eq!(uid, "6d6f6174-0003-4000-8000-00000000002a");
        let body: Value = serde_json::from_slice(&r.body(&uid)).unwrap();
        assert_eq!(r.body(&uid).len(), r.len());
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(body["kind"], "AdmissionReview");
        let req = &body["request"];
        assert_eq!(req["uid"], uid.as_str());
        assert_eq!(req["operation"], "CREATE");
        assert_eq!(req["namespace"], "shop");
        assert_eq!(
            req["kind"],
            json!({"group": "", "version": "v1", "kind": "Pod"})
        );
        assert_eq!(req["resource"]["resource"], "pods");
        assert_eq!(req["object"], pod());
        // A pod that contains the placeholder cannot be spliced safely.
        let mut odd = pod();
        odd["metadata"]["labels"] = json!({"x": UID_MARK});
        assert!(Review::new("own/odd", odd, "shop").is_err());
    }

    #[test]
    fn workloads_become_the_pod_their_controller_creates() {
        let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "hello"},
            "spec": {"template": {"metadata": {"labels": {"app": "hello"}},
                                  "spec": {"containers": [{"name": "hello", "image": "h"}]}}}});
        let p = pod_of_manifest(&deploy).unwrap();
        assert_eq!(p["apiVersion"], "v1");
        assert_eq!(p["kind"], "Pod");
        assert_eq!(p["metadata"]["generateName"], "hello-");
        assert_eq!(p["metadata"]["labels"]["app"], "hello");
        assert_eq!(p["spec"]["containers"][0]["name"], "hello");
        let cron = json!({"kind": "CronJob", "metadata": {"name": "c"},
            "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": []}}}}}});
        assert_eq!(
            pod_of_manifest(&cron).unwrap()["metadata"]["generateName"],
            "c-"
        );
        let mut linkerd = pod();
        linkerd["apiVersion"] = json!("apps/v1");
        assert_eq!(pod_of_manifest(&linkerd).unwrap()["apiVersion"], "v1");
        assert!(pod_of_manifest(&json!({"kind": "Namespace"})).is_err());
        assert!(pod_of_manifest(&json!({"kind": "Deployment", "spec": {}})).is_err());
        // The namespace follows the request's; a pod without one keeps none.
        assert_eq!(in_namespace(pod(), "shop")["metadata"]["namespace"], "shop");
        let bare = json!({"metadata": {"generateName": "a-"}});
        assert_eq!(in_namespace(bare.clone(), "shop"), bare);
    }

    #[test]
    fn admission_requests_give_their_object() {
        let req = json!({"uid": "u", "namespace": "k", "object": pod()}).to_string();
        assert_eq!(corpus_pod(Path::new("a.json"), &req).unwrap(), pod());
        assert!(corpus_pod(Path::new("a.json"), "{\"uid\": \"u\"}").is_err());
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: x}\nspec:\n  containers: [{name: app, image: nginx}]\n";
        assert_eq!(corpus_pod(Path::new("a.yaml"), yaml).unwrap(), pod());
    }

    #[test]
    fn every_corpus_pod_becomes_a_review() {
        let dir = default_corpus();
        assert!(
            dir.join("istio").is_dir(),
            "corpus missing at {}: the benchmark needs ../shared/corpus/k8s next to the workspace",
            dir.display()
        );
        let reviews = load_reviews(&dir).unwrap();
        assert_eq!(reviews.len(), CORPUS_PODS.len());
        for r in &reviews {
            let body: Value = serde_json::from_slice(&r.body(&uid(0, 1))).unwrap();
            let object = &body["request"]["object"];
            assert_eq!(object["kind"], "Pod", "{}", r.source);
            assert_eq!(object["apiVersion"], "v1", "{}", r.source);
            assert!(
                object["spec"]["containers"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty()),
                "{}",
                r.source
            );
            assert_ne!(object["spec"]["hostNetwork"], true, "{}", r.source);
            assert!(
                object["metadata"]["namespace"].is_null()
                    || object["metadata"]["namespace"] == NAMESPACE,
                "{}",
                r.source
            );
        }
    }

    #[test]
    fn a_correct_answer_passes_both_checks() {
        let patch = sidecar_patch();
        let body = reply(
            json!({"uid": "u1", "allowed": true, "patchType": "JSONPatch",
                                "patch": b64(&patch), "status": {"metadata": {}, "code": 200}}),
        );
        let p = check_reply(200, &body, "u1").unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&p).unwrap(), patch);
        assert_eq!(check_injected(&pod(), &p), Ok(()));
        // Classic mode: the proxy is a container.
        let classic = json!([
            {"op": "add", "path": "/spec/initContainers", "value": [{"name": "moat-init"}]},
            {"op": "add", "path": "/spec/containers/-", "value": {"name": "moat-proxy"}},
        ]);
        let p = serde_json::to_vec(&classic).unwrap();
        assert_eq!(check_injected(&pod(), &p), Ok(()));
    }

    #[test]
    fn wrong_answers_are_counted_by_reason() {
        let check = |status, body: &[u8]| check_reply(status, body, "u1").map(|_| ());
        let patched = |patch: Value| {
            reply(json!({"uid": "u1", "allowed": true, "patchType": "JSONPatch", "patch": patch}))
        };
        assert_eq!(check(500, b"{}"), Err(Failure::Status(500)));
        assert!(matches!(check(200, b"<html>"), Err(Failure::NotReview(_))));
        let no_response = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"});
        assert!(matches!(
            check(200, no_response.to_string().as_bytes()),
            Err(Failure::NotReview(_))
        ));
        let v1beta1 = json!({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview",
                             "response": {"uid": "u1", "allowed": true}});
        assert!(matches!(
            check(200, v1beta1.to_string().as_bytes()),
            Err(Failure::WrongType(..))
        ));
        let other_uid = reply(json!({"uid": "u2", "allowed": true}));
        assert_eq!(check(200, &other_uid), Err(Failure::UidMismatch));
        let denied = reply(json!({"uid": "u1", "allowed": false,
                                  "status": {"code": 500, "message": "moat-injector failed"}}));
        assert_eq!(
            check(200, &denied),
            Err(Failure::Denied("code 500: moat-injector failed".into()))
        );
        let skipped = reply(json!({"uid": "u1", "allowed": true, "warnings": ["w"]}));
        assert_eq!(check(200, &skipped), Err(Failure::NoPatch));
        let untyped = reply(json!({"uid": "u1", "allowed": true, "patch": b64(&sidecar_patch())}));
        assert_eq!(check(200, &untyped), Err(Failure::PatchType(String::new())));
        assert_eq!(
            check(200, &patched(json!("%%%"))),
            Err(Failure::PatchNotBase64)
        );
        for not_a_patch in [
            json!({"op": "add"}),
            json!([{"op": "frobnicate", "path": "/spec"}]),
            json!([{"op": "add", "path": "spec", "value": 1}]),
            json!([{"path": "/spec"}]),
        ] {
            assert!(
                matches!(
                    check(200, &patched(json!(b64(&not_a_patch)))),
                    Err(Failure::NotJsonPatch(_))
                ),
                "{not_a_patch}"
            );
        }
        assert_eq!(
            check(200, &patched(json!(b64(&json!([]))))),
            Err(Failure::EmptyPatch)
        );

        let p = |v: Value| serde_json::to_vec(&v).unwrap();
        let missing_parent =
            p(json!([{"op": "add", "path": "/spec/volumes/-", "value": {"name": "v"}}]));
        assert!(matches!(
            check_injected(&pod(), &missing_parent),
            Err(Failure::DoesNotApply(_))
        ));
        let no_proxy = p(json!([{"op": "add", "path": "/metadata/labels", "value": {}}]));
        assert_eq!(check_injected(&pod(), &no_proxy), Err(Failure::NoSidecar));
        // Passes the per-answer check (operation names and paths) but is no RFC 6902 patch.
        let no_value = p(json!([{"op": "add", "path": "/metadata/labels"}]));
        assert!(matches!(
            check_injected(&pod(), &no_value),
            Err(Failure::NotJsonPatch(_))
        ));
        // One key per kind of problem, whatever the request.
        assert_eq!(Failure::Status(503).reason(), "http 503");
        assert!(Failure::Denied("x".repeat(500)).reason().len() < 120);
    }

    #[test]
    fn unusable_options_are_refused_before_anything_starts() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: InjectorArgs,
        }
        let args = |argv: &[&str]| {
            Cli::try_parse_from(std::iter::once("moat-bench").chain(argv.iter().copied()))
                .unwrap()
                .args
        };
        let defaults = args(&[]);
        assert_eq!(defaults.duration, Duration::from_secs(10));
        assert_eq!(defaults.concurrency, 8);
        assert_eq!(defaults.rate, 1000.0);
        for bad in [
            &["--concurrency", "0"][..],
            &["--rate=-1"],
            &["--rate", "NaN"],
            &["--rate", "1e-300"],
            &["--duration", "0s"],
        ] {
            let e = run(&args(bad)).unwrap_err().to_string();
            let flag = bad[0].split('=').next().unwrap_or_default();
            assert!(e.contains(flag), "{bad:?}: {e}");
        }
    }

    #[test]
    fn summary_line_reads_like_the_example() {
        let mut r = InjectorReport {
            bench: "injector",
            concurrency: 8,
            pods: vec![],
            request_bytes_mean: 1834.4,
            warmup_s: 1.0,
            host_cpus: 2,
            phases: Phases {
                saturation: Phase::sample(&NAMES, None, 5200.4, 1.5, 3.0),
                fixed_rate: Some(Phase::sample(&NAMES, Some(1000.0), 999.0, 0.314, 0.92)),
            },
            injector_rss_mib: 0.0,
            injector_peak_rss_mib: 0.0,
            target_rate: TARGET_RATE,
            target_p99_ms: TARGET_P99_MS,
            met: true,
        };
        assert_eq!(
            r.summary_line(),
            "5,200/s saturated; at 1,000/s p50 0.31 ms, p99 0.92 ms (target p99 < 2 ms: met)"
        );
        let histogram = "0 injections, mean 0.000 ms; p50 <= 0 ms, p99 <= 0 ms, p99.9 <= 0 ms";
        assert_eq!(
            report_lines(&r),
            [
                String::new(),
                "Injector admission: 8 connections, 0 corpus pods (requests 1834 bytes on average), 2 CPUs shared by client and injector".into(),
                "  saturation (closed loop):".into(),
                "    throughput         5200 admissions/s (52004 admissions in 10.0 s, answers 0 bytes on average)".into(),
                "    client latency p50 1.50 ms  p90 0.00 ms  p99 3.00 ms  p99.9 0.00 ms  max 0.00 ms  mean 0.00 ms".into(),
                format!("    injector hist. {histogram} (bucket bounds; JSON work only)"),
                "    CPU            injector 0.05 cores (0.010 s per 1,000 admissions), client 0.00 cores, other processes 0.00 cores".into(),
                "  fixed rate (open loop, 1000 admissions/s offered):".into(),
                "    throughput          999 admissions/s (9990 admissions in 10.0 s, answers 0 bytes on average)".into(),
                "    client latency p50 0.31 ms  p90 0.00 ms  p99 0.92 ms  p99.9 0.00 ms  max 0.00 ms  mean 0.00 ms".into(),
                format!("    injector hist. {histogram} (bucket bounds; JSON work only)"),
                "    CPU            injector 0.05 cores (0.050 s per 1,000 admissions), client 0.00 cores, other processes 0.00 cores".into(),
                "  injector memory  RSS 0.0 MiB, peak 0.0 MiB".into(),
                "  target           p99 < 2 ms at 1000 admissions/s: MET (p99 0.92 ms at 1000/s offered, 999/s answered; saturation 5200/s)".into(),
            ]
        );
        // The JSON keys benches/results and earlier reports have.
        let json = phase::report_json(
            &r,
            "bench concurrency pods request_bytes_mean warmup_s host_cpus saturation fixed_rate \
             injector_rss_mib injector_peak_rss_mib target_rate target_p99_ms met",
            "admissions admissions_per_sec response_bytes_mean injector_histogram injector_cpu_s \
             injector_cpu_s_per_1k",
        );
        assert_eq!(json["saturation"]["admissions"], 52004);
        assert_eq!(
            json["saturation"]["injector_cpu_s_per_1k"],
            0.5 * 1000.0 / 52004.0
        );

        r.met = false;
        r.phases.saturation.errors.insert("http 500".into(), 1234);
        r.phases.fixed_rate = None;
        assert_eq!(
            r.summary_line(),
            "5,200/s saturated; fixed rate not measured (--rate 0) (target p99 < 2 ms: missed); 1,234 failed admissions (ERRORS)"
        );
        assert_eq!(grouped(0.0), "0");
        assert_eq!(grouped(999.6), "1,000");
        assert_eq!(grouped(1234567.0), "1,234,567");
        assert_eq!(grouped(-1500.0), "-1,500");
    }
}
