//! `moat-bench ca`: certificate issuance throughput and latency of the real `moat-ca`.
//!
//! Starts the release `moat-ca` (built beforehand; this builds nothing) with an offline JWK Set
//! issuer and rate limits out of the way, pre-generates one token and one CSR per identity
//! (many distinct identities, as in a cluster), then drives `POST /v1/certificates` from N
//! concurrent tasks, each over its own keep-alive HTTPS (TLS 1.3, HTTP/1.1) connection, in two
//! phases:
//!
//! 1. **saturation**: closed loop, every task sends its next request as soon as the previous
//!    answer is in: the most certificates per second the CA signs. Latency here is queueing at
//!    saturation (Little's law: connections / throughput), not the latency target.
//! 2. **fixed rate**: open loop at `--rate` requests/s (default: the 2,000/s target) spread
//!    over the connections; latency is measured from each request's scheduled send time, so a
//!    stalled CA cannot hide its backlog (no coordinated omission).
//!
//! Each phase reports client-side percentiles, the CA's own
//! `moat_ca_issuance_duration_seconds` histogram over the same window, the CA's CPU time, and
//! how much CPU the rest of the machine used meanwhile (benchmarks on a shared machine say so).
//! The verdict: saturation throughput >= 2,000 certificates/s, and p99 < 10 ms at 2,000/s.
//! The phases are [`crate::phase`]'s, shared with `moat-bench injector`; this module makes the
//! requests and checks the answers.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use http_body_util::Full;
use moat_core::api::CertificateResponse;
use moat_core::client::{make_csr, KeyAlgorithm};
use moat_e2e::https::{certificate_request, csr_body, Reply};
use moat_e2e::{CaFixture, CaOptions};
use serde::Serialize;

use crate::phase::{
    self, AnswerNames, CpuNames, HistogramNames, Names, Phases, Plan, Server, Workload,
};
use crate::util;

/// Target: certificates signed per second.
pub const TARGET_CERTS_PER_SEC: f64 = 2000.0;
/// Target: client-side p99 issuance latency, milliseconds.
pub const TARGET_P99_MS: f64 = 10.0;

const HISTOGRAM: &str = "moat_ca_issuance_duration_seconds";

/// Options of `moat-bench ca`.
#[derive(Debug, Clone, Args)]
pub struct CaArgs {
    /// Measurement window of each phase.
    #[arg(long, default_value = "10s", value_parser = moat_core::duration::parse)]
    pub duration: Duration,
    /// Warm-up before each phase's window (connections, caches, CPU frequency).
    #[arg(long, default_value = "1s", value_parser = moat_core::duration::parse)]
    pub warmup: Duration,
    /// Concurrent client tasks, one keep-alive connection each.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Distinct workload identities (token + CSR each) the requests cycle through.
    #[arg(long, default_value_t = 256)]
    pub identities: usize,
    /// Offered load of the fixed-rate phase, requests/s; 0 skips that phase.
    #[arg(long, default_value_t = TARGET_CERTS_PER_SEC)]
    pub rate: f64,
    /// The CA's log level (`info` logs one audit line per certificate, as in production).
    #[arg(long, default_value = "info")]
    pub ca_log_level: String,
    /// CI smoke run: 2 s windows after 0.5 s of warm-up.
    #[arg(long)]
    pub smoke: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Results of a run.
#[derive(Debug, Clone, Serialize)]
pub struct CaReport {
    /// Always `"ca"`.
    pub bench: &'static str,
    /// Client tasks (= connections).
    pub concurrency: usize,
    /// Distinct identities.
    pub identities: usize,
    /// Warm-up before each window, seconds.
    pub warmup_s: f64,
    /// CPUs available to the benchmark and the CA together.
    pub host_cpus: usize,
    /// The closed-loop phase (`saturation`) and the open-loop one (`fixed_rate`).
    #[serde(flatten)]
    pub phases: Phases,
    /// CA resident memory at the end, MiB.
    pub ca_rss_mib: f64,
    /// CA peak resident memory, MiB.
    pub ca_peak_rss_mib: f64,
    /// Target throughput.
    pub target_certs_per_sec: f64,
    /// Target p99 at the target throughput, milliseconds.
    pub target_p99_ms: f64,
    /// Whether both targets were met.
    pub met: bool,
}

impl CaReport {
    /// Requests that failed, all phases together.
    pub fn errors(&self) -> u64 {
        self.phases.errors()
    }

    /// One line for the combined report.
    pub fn summary_line(&self) -> String {
        let rate = self.phases.fixed_rate.as_ref().map_or(String::new(), |p| {
            format!(
                "; at {:.0}/s p50 {:.2} ms, p99 {:.2} ms",
                p.answers_per_sec, p.latency.p50_ms, p.latency.p99_ms
            )
        });
        format!(
            "{:.0} certs/s saturated{rate} (target >= {:.0} certs/s with p99 < {:.0} ms: {})",
            self.phases.saturation.answers_per_sec,
            self.target_certs_per_sec,
            self.target_p99_ms,
            if self.met { "met" } else { "MISSED" }
        )
    }
}

/// What the CA's report calls the figures.
static NAMES: Names = Names {
    server: "CA",
    answers: AnswerNames {
        key: "certificates",
        per_sec_key: "certs_per_sec",
        unit: "certs",
        bytes: false,
    },
    histogram: HistogramNames {
        key: "ca_histogram",
        label: "CA histogram",
        noun: "requests",
        note: "bucket bounds",
    },
    cpu: CpuNames {
        key: "ca_cpu_s",
        per_answer_key: "ca_cpu_us_per_cert",
        scale: 1e6,
        decimals: 0,
        unit: "us/cert",
    },
    offered: "requests",
};

/// One identity's pre-generated request.
struct Identity {
    token: String,
    body: Bytes,
    spiffe_id: String,
}

/// Certificate requests cycling through the identities.
struct Issuance {
    ids: Vec<Identity>,
}

/// Where one client task is in the identities.
struct Cursor {
    /// The identity of the next request.
    next: usize,
    /// How far each request moves on: the number of tasks, so they share the identities.
    stride: usize,
    /// The identity of the request in flight.
    sent: usize,
    /// Whether a certificate of this task has been checked.
    checked: bool,
}

impl Workload for Issuance {
    type Task = Cursor;

    const NAMES: &'static Names = &NAMES;

    fn task(&self, t: usize, n: usize) -> Cursor {
        Cursor {
            next: t % self.ids.len(),
            stride: n,
            sent: 0,
            checked: false,
        }
    }

    fn request(&self, c: &mut Cursor) -> anyhow::Result<http::Request<Full<Bytes>>> {
        c.sent = c.next;
        c.next = (c.next + c.stride) % self.ids.len();
        let id = &self.ids[c.sent];
        certificate_request(Some(&id.token), id.body.clone())
    }

    fn check(&self, c: &mut Cursor, reply: &Reply) -> anyhow::Result<Result<(), String>> {
        if reply.status != 200 {
            return Ok(Err(format!("http_{}", reply.status)));
        }
        if !c.checked {
            // Once per task: the answer is a real chain for this identity.
            let id = &self.ids[c.sent];
            let resp: CertificateResponse = reply.json()?;
            let chain = moat_core::pem::parse_certs(resp.certificate_chain.as_bytes())?;
            let info = moat_core::x509::inspect(&chain[0])?;
            if info.spiffe_id.as_ref().map(|s| s.as_str()) != Some(id.spiffe_id.as_str()) {
                bail!(
                    "certificate for {} names {:?}",
                    id.spiffe_id,
                    info.spiffe_id
                );
            }
            c.checked = true;
        }
        Ok(Ok(()))
    }
}

/// Runs the benchmark and prints the report; `Ok(false)` when requests failed.
pub fn main(args: CaArgs) -> anyhow::Result<bool> {
    let json = args.json.clone();
    let report = measure(args)?;
    if let Some(path) = &json {
        phase::write_json(path, &report)?;
    }
    Ok(report.errors() == 0)
}

/// Runs the benchmark, prints the report and returns it.
pub fn measure(mut args: CaArgs) -> anyhow::Result<CaReport> {
    if args.smoke {
        args.duration = Duration::from_secs(2);
        args.warmup = Duration::from_millis(500);
    }
    if args.concurrency == 0 || args.identities == 0 {
        bail!("--concurrency and --identities must be at least 1");
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a non-negative number");
    }
    moat_e2e::bin::try_binary("moat-ca")
        .context("moat-bench builds nothing: run `cargo build --release --workspace` first")?;
    let report = run(&args)?;
    println!("{}", report_lines(&report).join("\n"));
    Ok(report)
}

fn run(args: &CaArgs) -> anyhow::Result<CaReport> {
    let ca = CaFixture::start(CaOptions {
        log_level: args.ca_log_level.clone(),
        ..CaOptions::default().unlimited()
    })?;
    let pid = ca.pid().context("the CA has no PID")?;
    println!(
        "moat-ca (pid {pid}) on {}; {} identities, {} connections; per phase {:?} warm-up + {:?} measured",
        ca.url(),
        args.identities,
        args.concurrency,
        args.warmup,
        args.duration
    );
    let ids = generate_identities(&ca, args.identities)?;
    let server = Server {
        pid,
        addr: ca.addr(),
        tls: ca.tls_config(),
        admin: ca.admin_addr().to_string(),
        histogram: (HISTOGRAM, &[]),
    };
    let plan = Plan {
        concurrency: args.concurrency,
        warmup: args.warmup,
        duration: args.duration,
        rate: args.rate,
    };
    let phases = phase::run(server, Issuance { ids }, &plan)?;

    if !util::pid_alive(pid) {
        bail!("moat-ca died during the run:\n{}", ca.logs());
    }
    Ok(report(args, phases, util::rss_mib(pid)?))
}

/// The report of a run: its phases and the CA's memory (MiB, current and peak) with the
/// verdict.
fn report(args: &CaArgs, phases: Phases, (rss_mib, peak_rss_mib): (f64, f64)) -> CaReport {
    let met = phases.saturation.answers_per_sec >= TARGET_CERTS_PER_SEC
        && phases.fixed_rate.as_ref().is_some_and(|p| {
            p.offered_rate.unwrap_or(0.0) >= TARGET_CERTS_PER_SEC
                && p.answers_per_sec >= 0.98 * TARGET_CERTS_PER_SEC
                && p.latency.p99_ms < TARGET_P99_MS
        });
    CaReport {
        bench: "ca",
        concurrency: args.concurrency,
        identities: args.identities,
        warmup_s: args.warmup.as_secs_f64(),
        host_cpus: util::cpus(),
        phases,
        ca_rss_mib: rss_mib,
        ca_peak_rss_mib: peak_rss_mib,
        target_certs_per_sec: TARGET_CERTS_PER_SEC,
        target_p99_ms: TARGET_P99_MS,
        met,
    }
}

fn generate_identities(ca: &CaFixture, n: usize) -> anyhow::Result<Vec<Identity>> {
    (0..n)
        .map(|i| {
            let (ns, sa) = (format!("bench-{}", i % 16), format!("sa-{i}"));
            let id = ca.spiffe_id(&ns, &sa)?;
            let (_, csr) = make_csr(&id, &[], KeyAlgorithm::EcdsaP256)?;
            Ok(Identity {
                token: ca.token(&ns, &sa)?,
                body: csr_body(&csr),
                spiffe_id: id.to_string(),
            })
        })
        .collect()
}

/// The report as printed.
fn report_lines(r: &CaReport) -> Vec<String> {
    let heading = format!(
        "CA issuance: {} connections, {} identities, {} CPUs shared by client and CA",
        r.concurrency, r.identities, r.host_cpus
    );
    let p99 = r
        .phases
        .fixed_rate
        .as_ref()
        .map_or("not measured (--rate 0)".to_string(), |p| {
            format!("{:.2} ms at {:.0}/s", p.latency.p99_ms, p.answers_per_sec)
        });
    let target = format!(
        ">= {:.0} certs/s with p99 < {:.0} ms: {} (saturation {:.0} certs/s; p99 {})",
        r.target_certs_per_sec,
        r.target_p99_ms,
        if r.met { "MET" } else { "MISSED" },
        r.phases.saturation.answers_per_sec,
        p99
    );
    let rss = (r.ca_rss_mib, r.ca_peak_rss_mib);
    phase::report_lines(&heading, &r.phases, rss, &target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phase::Phase;

    #[test]
    fn report_keeps_its_lines_and_json_keys() {
        let args: CaArgs = crate::all::defaults().unwrap();
        let phases = Phases {
            saturation: Phase::sample(&NAMES, None, 4359.2, 7.0, 9.0),
            fixed_rate: Some(Phase::sample(&NAMES, Some(2000.0), 1999.6, 1.271, 16.54)),
        };
        let mut r = report(&args, phases.clone(), (12.3, 13.5));
        // Throughput met, p99 missed.
        assert!(!r.met);
        let mut quick = phases;
        quick.fixed_rate.as_mut().unwrap().latency.p99_ms = 9.9;
        assert!(report(&args, quick, (0.0, 0.0)).met);
        r.host_cpus = 2;
        let json = phase::report_json(
            &r,
            "bench concurrency identities warmup_s host_cpus saturation fixed_rate ca_rss_mib \
             ca_peak_rss_mib target_certs_per_sec target_p99_ms met",
            "certificates certs_per_sec ca_histogram ca_cpu_s ca_cpu_us_per_cert",
        );
        assert_eq!(json["saturation"]["certificates"], 43592);
        assert_eq!(
            json["saturation"]["ca_cpu_us_per_cert"],
            0.5 * 1e6 / 43592.0
        );
        assert_eq!(
            r.summary_line(),
            "4359 certs/s saturated; at 2000/s p50 1.27 ms, p99 16.54 ms (target >= 2000 certs/s with p99 < 10 ms: MISSED)"
        );

        r.phases.saturation.other_cores = 0.4;
        if let Some(p) = r.phases.fixed_rate.as_mut() {
            p.errors.insert("http_503".into(), 2);
        }
        let histogram = "0 requests, mean 0.000 ms; p50 <= 0 ms, p99 <= 0 ms, p99.9 <= 0 ms";
        assert_eq!(
            report_lines(&r),
            [
                String::new(),
                "CA issuance: 32 connections, 256 identities, 2 CPUs shared by client and CA".into(),
                "  saturation (closed loop):".into(),
                "    throughput         4359 certs/s (43592 certificates in 10.0 s)".into(),
                "    client latency p50 7.00 ms  p90 0.00 ms  p99 9.00 ms  p99.9 0.00 ms  max 0.00 ms  mean 0.00 ms".into(),
                format!("    CA histogram   {histogram} (bucket bounds)"),
                "    CPU            CA 0.05 cores (11 us/cert), client 0.00 cores, other processes 0.40 cores".into(),
                "  fixed rate (open loop, 2000 requests/s offered):".into(),
                "    throughput         2000 certs/s (19996 certificates in 10.0 s)".into(),
                "    client latency p50 1.27 ms  p90 0.00 ms  p99 16.54 ms  p99.9 0.00 ms  max 0.00 ms  mean 0.00 ms".into(),
                format!("    CA histogram   {histogram} (bucket bounds)"),
                "    CPU            CA 0.05 cores (25 us/cert), client 0.00 cores, other processes 0.00 cores".into(),
                "    ERRORS         {\"http_503\": 2}".into(),
                "  CA memory        RSS 12.3 MiB, peak 13.5 MiB".into(),
                "  NOTE             other processes used up to 0.40 cores during the run: figures are pessimistic".into(),
                "  target           >= 2000 certs/s with p99 < 10 ms: MISSED (saturation 4359 certs/s; p99 16.54 ms at 2000/s)".into(),
            ]
        );
    }
}
