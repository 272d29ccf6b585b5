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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use moat_core::api::CertificateResponse;
use moat_core::client::{make_csr, KeyAlgorithm};
use moat_e2e::https::{certificate_request, csr_body, Http1Client};
use moat_e2e::net::Histogram;
use moat_e2e::{CaFixture, CaOptions};
use serde::Serialize;

use crate::util::{self, LatencySummary, Pace, ServerHistogram};

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

/// Results of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseReport {
    /// `saturation` or `fixed_rate`.
    pub mode: &'static str,
    /// Offered requests/s (fixed-rate phase only).
    pub offered_rate: Option<f64>,
    /// Measurement window, seconds.
    pub duration_s: f64,
    /// Certificates received (HTTP 200) in the window.
    pub certificates: u64,
    /// Failed requests in the window, by status or error.
    pub errors: BTreeMap<String, u64>,
    /// Certificates per second.
    pub certs_per_sec: f64,
    /// Client-side latency of successful requests.
    pub latency: LatencySummary,
    /// The CA's own issuance histogram over the window.
    pub ca_histogram: ServerHistogram,
    /// CA user+system CPU seconds in the window.
    pub ca_cpu_s: f64,
    /// CA CPU per certificate, microseconds.
    pub ca_cpu_us_per_cert: f64,
    /// Benchmark client CPU seconds in the window.
    pub client_cpu_s: f64,
    /// Busy CPU of the whole machine in the window, in cores.
    pub machine_busy_cores: f64,
    /// Of which neither the CA nor this client: other processes, in cores.
    pub other_cores: f64,
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
    /// Closed-loop phase.
    pub saturation: PhaseReport,
    /// Open-loop phase, unless skipped.
    pub fixed_rate: Option<PhaseReport>,
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
        self.saturation.errors.values().sum::<u64>()
            + self
                .fixed_rate
                .as_ref()
                .map_or(0, |p| p.errors.values().sum::<u64>())
    }

    /// One line for the combined report.
    pub fn summary_line(&self) -> String {
        let rate = self.fixed_rate.as_ref().map_or(String::new(), |p| {
            format!(
                "; at {:.0}/s p50 {:.2} ms, p99 {:.2} ms",
                p.certs_per_sec, p.latency.p50_ms, p.latency.p99_ms
            )
        });
        format!(
            "{:.0} certs/s saturated{rate} (target >= {:.0} certs/s with p99 < {:.0} ms: {})",
            self.saturation.certs_per_sec,
            self.target_certs_per_sec,
            self.target_p99_ms,
            if self.met { "met" } else { "MISSED" }
        )
    }
}

/// One identity's pre-generated request.
struct Identity {
    token: String,
    body: Bytes,
    spiffe_id: String,
}

/// What one client task measured.
#[derive(Default)]
struct TaskStats {
    latencies_us: Vec<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
}

/// Runs the benchmark and prints the report; `Ok(false)` when requests failed.
pub fn main(args: CaArgs) -> anyhow::Result<bool> {
    let json = args.json.clone();
    let report = measure(args)?;
    if let Some(path) = &json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("results written to {}", path.display());
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
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let report = rt.block_on(run(&args))?;
    print_report(&report);
    Ok(report)
}

async fn run(args: &CaArgs) -> anyhow::Result<CaReport> {
    let opts = CaOptions {
        log_level: args.ca_log_level.clone(),
        ..CaOptions::default().unlimited()
    };
    let ca = tokio::task::spawn_blocking(move || CaFixture::start(opts))
        .await
        .context("CA start-up task")??;
    let ca = Arc::new(ca);
    let pid = ca.pid().context("the CA has no PID")?;
    println!(
        "moat-ca (pid {pid}) on {}; {} identities, {} connections; per phase {:?} warm-up + {:?} measured",
        ca.url(),
        args.identities,
        args.concurrency,
        args.warmup,
        args.duration
    );
    let identities = Arc::new(generate_identities(&ca, args.identities)?);

    let saturation = phase(&ca, pid, &identities, args, None).await?;
    let fixed_rate = if args.rate > 0.0 {
        Some(phase(&ca, pid, &identities, args, Some(args.rate)).await?)
    } else {
        None
    };

    if !util::pid_alive(pid) {
        bail!("moat-ca died during the run:\n{}", ca.logs());
    }
    let (rss, peak) = util::rss_bytes(pid)?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let met = saturation.certs_per_sec >= TARGET_CERTS_PER_SEC
        && fixed_rate.as_ref().is_some_and(|p| {
            p.offered_rate.unwrap_or(0.0) >= TARGET_CERTS_PER_SEC
                && p.certs_per_sec >= 0.98 * TARGET_CERTS_PER_SEC
                && p.latency.p99_ms < TARGET_P99_MS
        });
    Ok(CaReport {
        bench: "ca",
        concurrency: args.concurrency,
        identities: args.identities,
        warmup_s: args.warmup.as_secs_f64(),
        host_cpus: util::cpus(),
        saturation,
        fixed_rate,
        ca_rss_mib: mib(rss),
        ca_peak_rss_mib: mib(peak),
        target_certs_per_sec: TARGET_CERTS_PER_SEC,
        target_p99_ms: TARGET_P99_MS,
        met,
    })
}

/// One warm-up plus measured window; `rate`: open loop at that many requests/s.
async fn phase(
    ca: &Arc<CaFixture>,
    pid: u32,
    ids: &Arc<Vec<Identity>>,
    args: &CaArgs,
    rate: Option<f64>,
) -> anyhow::Result<PhaseReport> {
    let n = args.concurrency;
    let begin = Instant::now();
    let start = begin + args.warmup;
    let end = start + args.duration;
    let mut tasks = Vec::with_capacity(n);
    for t in 0..n {
        let pace = Pace::for_task(rate, t, n);
        let (ca, ids) = (ca.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            client_task(&ca, &ids, t, n, pace, begin, start, end).await
        }));
    }
    tokio::time::sleep_until(start.into()).await;
    let before = snapshot(ca, pid).await?;
    tokio::time::sleep_until(end.into()).await;
    let after = snapshot(ca, pid).await?;

    let mut all = TaskStats::default();
    for t in tasks {
        let s = t.await.context("client task panicked")??;
        all.latencies_us.extend(s.latencies_us);
        all.ok += s.ok;
        for (k, v) in s.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let secs = (after.at - before.at).as_secs_f64();
    let ca_cpu_s = after.ca_cpu_s - before.ca_cpu_s;
    let client_cpu_s = after.client_cpu_s - before.client_cpu_s;
    let machine_busy_cores = (after.machine_busy_s - before.machine_busy_s) / secs;
    Ok(PhaseReport {
        mode: if rate.is_some() {
            "fixed_rate"
        } else {
            "saturation"
        },
        offered_rate: rate,
        duration_s: args.duration.as_secs_f64(),
        certificates: all.ok,
        errors: all.errors,
        certs_per_sec: all.ok as f64 / args.duration.as_secs_f64(),
        latency: LatencySummary::from_micros(&mut all.latencies_us),
        ca_histogram: ServerHistogram::of(&after.histogram.since(&before.histogram)),
        ca_cpu_s,
        ca_cpu_us_per_cert: if all.ok > 0 {
            ca_cpu_s * 1e6 / all.ok as f64
        } else {
            0.0
        },
        client_cpu_s,
        machine_busy_cores,
        other_cores: (machine_busy_cores - (ca_cpu_s + client_cpu_s) / secs).max(0.0),
    })
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

#[allow(clippy::too_many_arguments)]
async fn client_task(
    ca: &CaFixture,
    ids: &[Identity],
    first: usize,
    stride: usize,
    pace: Pace,
    begin: Instant,
    start: Instant,
    end: Instant,
) -> anyhow::Result<TaskStats> {
    let mut stats = TaskStats::default();
    let mut conn: Option<Http1Client> = None;
    let mut next = first % ids.len();
    let mut checked = false;
    let mut schedule = pace.schedule(begin);
    loop {
        let t0 = schedule.next().await;
        if t0 >= end {
            return Ok(stats);
        }
        let c = match conn.as_mut() {
            Some(c) if c.is_open() => c,
            _ => conn.insert(ca.connect().await?),
        };
        let id = &ids[next];
        next = (next + stride) % ids.len();
        let req = certificate_request(Some(&id.token), id.body.clone())?;
        let outcome = c.send(req).await;
        let t1 = Instant::now();
        let in_window = t0 >= start && t1 <= end;
        match outcome {
            Ok(reply) if reply.status == 200 => {
                if !checked {
                    // Once per task: the answer is a real chain for this identity.
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
                    checked = true;
                }
                if in_window {
                    stats.ok += 1;
                    let us = u64::try_from((t1 - t0).as_micros()).unwrap_or(u64::MAX);
                    stats.latencies_us.push(us);
                }
            }
            Ok(reply) => {
                if in_window {
                    *stats
                        .errors
                        .entry(format!("http_{}", reply.status))
                        .or_default() += 1;
                }
            }
            Err(e) => {
                conn = None;
                if in_window {
                    *stats.errors.entry(format!("transport: {e:#}")).or_default() += 1;
                }
            }
        }
    }
}

struct Snapshot {
    at: Instant,
    histogram: Histogram,
    ca_cpu_s: f64,
    client_cpu_s: f64,
    machine_busy_s: f64,
}

async fn snapshot(ca: &Arc<CaFixture>, pid: u32) -> anyhow::Result<Snapshot> {
    let ca = ca.clone();
    tokio::task::spawn_blocking(move || {
        let at = Instant::now();
        let ca_cpu_s = util::cpu_seconds(pid)?;
        let client_cpu_s = util::cpu_seconds(std::process::id())?;
        let (machine_busy_s, _) = util::machine_cpu_seconds()?;
        let histogram = ca.metrics()?.histogram(HISTOGRAM, &[]).unwrap_or_default();
        Ok(Snapshot {
            at,
            histogram,
            ca_cpu_s,
            client_cpu_s,
            machine_busy_s,
        })
    })
    .await
    .context("snapshot task")?
}

fn print_phase(p: &PhaseReport) {
    match p.offered_rate {
        None => println!("  saturation (closed loop):"),
        Some(r) => println!("  fixed rate (open loop, {r:.0} requests/s offered):"),
    }
    println!(
        "    throughput     {:>8.0} certs/s ({} certificates in {:.1} s)",
        p.certs_per_sec, p.certificates, p.duration_s
    );
    println!("    client latency {}", p.latency.line());
    println!(
        "    CA histogram   {} (bucket bounds)",
        p.ca_histogram.line("requests")
    );
    println!(
        "    CPU            CA {:.2} cores ({:.0} us/cert), client {:.2} cores, other processes {:.2} cores",
        p.ca_cpu_s / p.duration_s,
        p.ca_cpu_us_per_cert,
        p.client_cpu_s / p.duration_s,
        p.other_cores
    );
    if !p.errors.is_empty() {
        println!("    ERRORS         {:?}", p.errors);
    }
}

fn print_report(r: &CaReport) {
    println!();
    println!(
        "CA issuance: {} connections, {} identities, {} CPUs shared by client and CA",
        r.concurrency, r.identities, r.host_cpus
    );
    print_phase(&r.saturation);
    if let Some(p) = &r.fixed_rate {
        print_phase(p);
    }
    println!(
        "  CA memory        RSS {:.1} MiB, peak {:.1} MiB",
        r.ca_rss_mib, r.ca_peak_rss_mib
    );
    let busy = r
        .fixed_rate
        .iter()
        .chain(std::iter::once(&r.saturation))
        .map(|p| p.other_cores)
        .fold(0.0, f64::max);
    if busy > 0.25 {
        println!(
            "  NOTE             other processes used up to {busy:.2} cores during the run: figures are pessimistic"
        );
    }
    let p99 = r
        .fixed_rate
        .as_ref()
        .map_or("not measured (--rate 0)".to_string(), |p| {
            format!("{:.2} ms at {:.0}/s", p.latency.p99_ms, p.certs_per_sec)
        });
    println!(
        "  target           >= {:.0} certs/s with p99 < {:.0} ms: {} (saturation {:.0} certs/s; p99 {})",
        r.target_certs_per_sec,
        r.target_p99_ms,
        if r.met { "MET" } else { "MISSED" },
        r.saturation.certs_per_sec,
        p99
    );
}
