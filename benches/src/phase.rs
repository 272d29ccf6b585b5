//! The measurement driver of the control-plane benchmarks (`ca`, `injector`): N client tasks,
//! each over its own keep-alive HTTPS (TLS 1.3, HTTP/1.1) connection, drive one server through
//! two phases, each a warm-up and then a measured window:
//!
//! 1. **saturation**: closed loop, every task sends its next request as soon as the previous
//!    answer is in: the most answers per second the server gives. Latency here is queueing at
//!    saturation (Little's law: connections / throughput), not a latency target.
//! 2. **fixed rate** (unless its rate is 0): open loop at a rate spread over the connections;
//!    latency is measured from each request's scheduled send time, so a stalled server cannot
//!    hide its backlog (no coordinated omission).
//!
//! A phase reports client-side percentiles of the correct answers, the server's own latency
//! histogram over the same window, the server's and the client's CPU time, and how much CPU the
//! rest of the machine used meanwhile (benchmarks on a shared machine say so). A benchmark
//! supplies what one request is and what counts as a correct answer ([`Workload`]), and what
//! its report calls the figures ([`Names`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use moat_e2e::https::{Http1Client, Reply};
use moat_e2e::net::Histogram;
use serde::ser::{SerializeStruct, Serializer};
use serde::Serialize;

use crate::util::{self, LatencySummary};

/// The server under test: where the client tasks connect and what a phase reads of it.
#[derive(Debug)]
pub struct Server {
    /// Its process, for its CPU time.
    pub pid: u32,
    /// The address the client tasks connect to.
    pub addr: SocketAddr,
    /// TLS client configuration that trusts it.
    pub tls: Arc<rustls::ClientConfig>,
    /// Its plain-HTTP admin address, serving `/metrics`.
    pub admin: String,
    /// Its latency histogram (seconds), as a metric name and the labels of the answers measured.
    pub histogram: (&'static str, &'static [(&'static str, &'static str)]),
}

/// How a run is paced.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Client tasks, one connection each.
    pub concurrency: usize,
    /// Warm-up before each phase's window.
    pub warmup: Duration,
    /// Measurement window of each phase.
    pub duration: Duration,
    /// Offered load of the fixed-rate phase, requests/s; 0 skips that phase.
    pub rate: f64,
}

/// One benchmark's requests: what a client task sends and what counts as a correct answer.
pub trait Workload: Send + Sync + 'static {
    /// What one client task keeps from one request to the next.
    type Task: Send + 'static;

    /// What the report calls the figures.
    const NAMES: &'static Names;

    /// Whether failures in the warm-up count too, not only those in the window.
    const COUNTS_WARMUP_FAILURES: bool = false;

    /// The state of client task `t` of `n`.
    fn task(&self, t: usize, n: usize) -> Self::Task;

    /// The task's next request.
    fn request(&self, task: &mut Self::Task) -> anyhow::Result<http::Request<Full<Bytes>>>;

    /// Judges the answer to the task's last request: `Ok(Err(reason))` is a failure, counted
    /// by reason; `Err` ends the run.
    fn check(&self, task: &mut Self::Task, reply: &Reply) -> anyhow::Result<Result<(), String>>;
}

/// What a benchmark's report calls its answers, its server and their figures, in its JSON and
/// in its printed lines.
#[derive(Debug)]
pub struct Names {
    /// The server, in the CPU and memory lines: `CA`.
    pub server: &'static str,
    /// The correct answers.
    pub answers: AnswerNames,
    /// The server's latency histogram.
    pub histogram: HistogramNames,
    /// The server's CPU time.
    pub cpu: CpuNames,
    /// The requests, in the fixed-rate heading (per second offered): `requests`.
    pub offered: &'static str,
}

/// What a report calls the correct answers.
#[derive(Debug)]
pub struct AnswerNames {
    /// JSON key of their count in the window, also their noun: `certificates`.
    pub key: &'static str,
    /// JSON key of their rate: `certs_per_sec`.
    pub per_sec_key: &'static str,
    /// Unit of the throughput line, per second: `certs`.
    pub unit: &'static str,
    /// Whether the report has their mean size.
    pub bytes: bool,
}

/// What a report calls the server's histogram.
#[derive(Debug)]
pub struct HistogramNames {
    /// JSON key: `ca_histogram`.
    pub key: &'static str,
    /// Label of its line: `CA histogram`.
    pub label: &'static str,
    /// What it counts: `requests`.
    pub noun: &'static str,
    /// What its line adds in parentheses: `bucket bounds`.
    pub note: &'static str,
}

/// How a report gives the server's CPU time.
#[derive(Debug)]
pub struct CpuNames {
    /// JSON key of its seconds in the window: `ca_cpu_s`.
    pub key: &'static str,
    /// JSON key of its time per correct answer: `ca_cpu_us_per_cert`.
    pub per_answer_key: &'static str,
    /// CPU seconds per answer times this is that figure: `1e6` (microseconds).
    pub scale: f64,
    /// Decimals printed of that figure.
    pub decimals: usize,
    /// Unit printed after it: `us/cert`.
    pub unit: &'static str,
}

/// Results of one phase.
#[derive(Debug, Clone)]
pub struct Phase {
    /// What the report calls the figures.
    pub names: &'static Names,
    /// `saturation` or `fixed_rate`.
    pub mode: &'static str,
    /// Offered requests/s (fixed-rate phase only).
    pub offered_rate: Option<f64>,
    /// Measurement window, seconds.
    pub duration_s: f64,
    /// Correct answers in the window.
    pub answers: u64,
    /// Failed requests by reason: of the window, or of the whole phase when the workload
    /// counts warm-up failures.
    pub errors: BTreeMap<String, u64>,
    /// Correct answers per second.
    pub answers_per_sec: f64,
    /// Client-side latency of correct answers.
    pub latency: LatencySummary,
    /// Mean body of correct answers, bytes.
    pub response_bytes_mean: f64,
    /// The server's own histogram over the window.
    pub server_histogram: ServerHistogram,
    /// Server user+system CPU seconds in the window.
    pub server_cpu_s: f64,
    /// Benchmark client CPU seconds in the window.
    pub client_cpu_s: f64,
    /// Busy CPU of the whole machine in the window, in cores.
    pub machine_busy_cores: f64,
    /// Of which neither the server nor this client: other processes, in cores.
    pub other_cores: f64,
}

impl Phase {
    /// Failed requests.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Server CPU per correct answer, in the unit of [`CpuNames::scale`].
    pub fn server_cpu_per_answer(&self) -> f64 {
        if self.answers > 0 {
            self.server_cpu_s * self.names.cpu.scale / self.answers as f64
        } else {
            0.0
        }
    }

    /// The phase's lines of a report.
    fn lines(&self) -> Vec<String> {
        let n = self.names;
        let mut lines = vec![match self.offered_rate {
            None => "  saturation (closed loop):".to_string(),
            Some(r) => format!("  fixed rate (open loop, {r:.0} {}/s offered):", n.offered),
        }];
        let bytes = if n.answers.bytes {
            format!(", answers {:.0} bytes on average", self.response_bytes_mean)
        } else {
            String::new()
        };
        let throughput = format!(
            "{:>8.0} {}/s ({} {} in {:.1} s{bytes})",
            self.answers_per_sec, n.answers.unit, self.answers, n.answers.key, self.duration_s
        );
        lines.push(row(4, "throughput", &throughput));
        lines.push(row(4, "client latency", &self.latency.line()));
        let histogram = self.server_histogram.line(n.histogram.noun);
        let histogram = format!("{histogram} ({})", n.histogram.note);
        lines.push(row(4, n.histogram.label, &histogram));
        let cpu = format!(
            "{} {:.2} cores ({:.*} {}), client {:.2} cores, other processes {:.2} cores",
            n.server,
            self.server_cpu_s / self.duration_s,
            n.cpu.decimals,
            self.server_cpu_per_answer(),
            n.cpu.unit,
            self.client_cpu_s / self.duration_s,
            self.other_cores
        );
        lines.push(row(4, "CPU", &cpu));
        if !self.errors.is_empty() {
            lines.push(row(4, "ERRORS", &format!("{:?}", self.errors)));
        }
        lines
    }
}

/// The JSON keys a report has always had: the shared figures under the benchmark's names.
impl Serialize for Phase {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.names;
        let mut m = s.serialize_struct("Phase", 14)?;
        m.serialize_field("mode", self.mode)?;
        m.serialize_field("offered_rate", &self.offered_rate)?;
        m.serialize_field("duration_s", &self.duration_s)?;
        m.serialize_field(n.answers.key, &self.answers)?;
        m.serialize_field("errors", &self.errors)?;
        m.serialize_field(n.answers.per_sec_key, &self.answers_per_sec)?;
        m.serialize_field("latency", &self.latency)?;
        if n.answers.bytes {
            m.serialize_field("response_bytes_mean", &self.response_bytes_mean)?;
        } else {
            m.skip_field("response_bytes_mean")?;
        }
        m.serialize_field(n.histogram.key, &self.server_histogram)?;
        m.serialize_field(n.cpu.key, &self.server_cpu_s)?;
        m.serialize_field(n.cpu.per_answer_key, &self.server_cpu_per_answer())?;
        m.serialize_field("client_cpu_s", &self.client_cpu_s)?;
        m.serialize_field("machine_busy_cores", &self.machine_busy_cores)?;
        m.serialize_field("other_cores", &self.other_cores)?;
        m.end()
    }
}

/// A server's own view of a window, from its Prometheus latency histogram (so at bucket
/// resolution): what it spent per request, apart from the network and the client.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerHistogram {
    /// Requests answered in the window.
    pub count: u64,
    /// Mean time to answer, milliseconds.
    pub mean_ms: f64,
    /// Upper bound of the bucket holding the median, milliseconds.
    pub p50_le_ms: f64,
    /// Upper bound of the bucket holding the 99th percentile, milliseconds.
    pub p99_le_ms: f64,
    /// Upper bound of the bucket holding the 99.9th percentile, milliseconds.
    pub p999_le_ms: f64,
}

impl ServerHistogram {
    /// `<count> <noun>, mean … ms; p50 <= … ms, p99 <= … ms, p99.9 <= … ms`.
    pub fn line(&self, noun: &str) -> String {
        format!(
            "{} {noun}, mean {:.3} ms; p50 <= {} ms, p99 <= {} ms, p99.9 <= {} ms",
            self.count, self.mean_ms, self.p50_le_ms, self.p99_le_ms, self.p999_le_ms
        )
    }

    /// Summarises `h` (seconds).
    pub fn of(h: &moat_e2e::net::Histogram) -> Self {
        let le = |q| h.quantile_upper_bound(q).map_or(0.0, |s| s * 1000.0);
        Self {
            count: h.count.max(0.0) as u64,
            mean_ms: h.mean().map_or(0.0, |m| m * 1000.0),
            p50_le_ms: le(0.5),
            p99_le_ms: le(0.99),
            p999_le_ms: le(0.999),
        }
    }
}

/// The phases of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Phases {
    /// Closed-loop phase.
    pub saturation: Phase,
    /// Open-loop phase, unless skipped.
    pub fixed_rate: Option<Phase>,
}

impl Phases {
    /// Failed requests, all phases together.
    pub fn errors(&self) -> u64 {
        self.saturation.error_count() + self.fixed_rate.as_ref().map_or(0, Phase::error_count)
    }
}

/// A run's report, line by line: a blank line, `heading`, the phases, the server's memory
/// (`rss_mib`: current and peak), a NOTE when other processes took CPU, and the `target` verdict.
pub fn report_lines(
    heading: &str,
    phases: &Phases,
    rss_mib: (f64, f64),
    target: &str,
) -> Vec<String> {
    let mut lines = vec![String::new(), heading.to_string()];
    lines.extend(phases.saturation.lines());
    lines.extend(phases.fixed_rate.iter().flat_map(Phase::lines));
    let memory = format!("RSS {:.1} MiB, peak {:.1} MiB", rss_mib.0, rss_mib.1);
    lines.push(row(
        2,
        &format!("{} memory", phases.saturation.names.server),
        &memory,
    ));
    let busy = phases
        .fixed_rate
        .iter()
        .chain(std::iter::once(&phases.saturation))
        .map(|p| p.other_cores)
        .fold(0.0, f64::max);
    if busy > 0.25 {
        let note = format!(
            "other processes used up to {busy:.2} cores during the run: figures are pessimistic"
        );
        lines.push(row(2, "NOTE", &note));
    }
    lines.push(row(2, "target", target));
    lines
}

/// One line of a report: `text` in the column every report line shares.
fn row(indent: usize, label: &str, text: &str) -> String {
    const COLUMN: usize = 19;
    let width = COLUMN - indent;
    format!("{:indent$}{label:<width$}{text}", "")
}

/// Writes `report` as pretty JSON to `path` and says so.
pub fn write_json(path: &Path, report: &impl Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("results written to {}", path.display());
    Ok(())
}

/// Runs the saturation phase, then the fixed-rate one unless `plan.rate` is 0. Blocking: call
/// it outside any async runtime.
pub fn run<W: Workload>(server: Server, work: W, plan: &Plan) -> anyhow::Result<Phases> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let (server, work) = (Arc::new(server), Arc::new(work));
    rt.block_on(async {
        let saturation = phase(&server, &work, plan, None).await?;
        let fixed_rate = if plan.rate > 0.0 {
            Some(phase(&server, &work, plan, Some(plan.rate)).await?)
        } else {
            None
        };
        Ok(Phases {
            saturation,
            fixed_rate,
        })
    })
}

/// When a phase's requests count.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// The warm-up begins.
    begin: Instant,
    /// The measured window begins.
    start: Instant,
    /// The phase ends.
    end: Instant,
}

/// What one client task measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    answers: u64,
    response_bytes: u64,
    errors: BTreeMap<String, u64>,
}

/// One warm-up plus measured window; `rate`: open loop at that many requests/s.
async fn phase<W: Workload>(
    server: &Arc<Server>,
    work: &Arc<W>,
    plan: &Plan,
    rate: Option<f64>,
) -> anyhow::Result<Phase> {
    let n = plan.concurrency;
    let begin = Instant::now();
    let start = begin + plan.warmup;
    let window = Window {
        begin,
        start,
        end: start + plan.duration,
    };
    let mut tasks = Vec::with_capacity(n);
    for t in 0..n {
        let pace = Pace::for_task(rate, t, n);
        let (server, work) = (server.clone(), work.clone());
        let task = work.task(t, n);
        tasks.push(tokio::spawn(async move {
            client(&server, &*work, task, pace, window).await
        }));
    }
    tokio::time::sleep_until(window.start.into()).await;
    let before = snapshot(server).await?;
    tokio::time::sleep_until(window.end.into()).await;
    let after = snapshot(server).await?;

    let mut all = Tally::default();
    for t in tasks {
        let s = t.await.context("client task panicked")??;
        all.latencies_us.extend(s.latencies_us);
        all.answers += s.answers;
        all.response_bytes += s.response_bytes;
        for (k, v) in s.errors {
            *all.errors.entry(k).or_default() += v;
        }
    }
    let secs = (after.at - before.at).as_secs_f64();
    let server_cpu_s = after.server_cpu_s - before.server_cpu_s;
    let client_cpu_s = after.client_cpu_s - before.client_cpu_s;
    let machine_busy_cores = (after.machine_busy_s - before.machine_busy_s) / secs;
    let response_bytes_mean = if all.answers > 0 {
        all.response_bytes as f64 / all.answers as f64
    } else {
        0.0
    };
    Ok(Phase {
        names: W::NAMES,
        mode: if rate.is_some() {
            "fixed_rate"
        } else {
            "saturation"
        },
        offered_rate: rate,
        duration_s: plan.duration.as_secs_f64(),
        answers: all.answers,
        errors: all.errors,
        answers_per_sec: all.answers as f64 / plan.duration.as_secs_f64(),
        latency: LatencySummary::from_micros(&mut all.latencies_us),
        response_bytes_mean,
        server_histogram: ServerHistogram::of(&after.histogram.since(&before.histogram)),
        server_cpu_s,
        client_cpu_s,
        machine_busy_cores,
        other_cores: (machine_busy_cores - (server_cpu_s + client_cpu_s) / secs).max(0.0),
    })
}

/// One client task: requests over one keep-alive connection (a new one when it closes) until
/// the phase ends.
async fn client<W: Workload>(
    server: &Server,
    work: &W,
    mut task: W::Task,
    pace: Pace,
    window: Window,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let mut conn: Option<Http1Client> = None;
    let mut schedule = pace.schedule(window.begin);
    loop {
        let t0 = schedule.next().await;
        if t0 >= window.end {
            return Ok(tally);
        }
        let c = match conn.as_mut() {
            Some(c) if c.is_open() => c,
            _ => conn.insert(Http1Client::connect(server.addr, server.tls.clone()).await?),
        };
        let req = work.request(&mut task)?;
        let outcome = c.send(req).await;
        let t1 = Instant::now();
        let in_window = t0 >= window.start && t1 <= window.end;
        let judged = match outcome {
            Ok(reply) => work
                .check(&mut task, &reply)?
                .map(|()| reply.body.len() as u64),
            Err(e) => {
                conn = None;
                Err(format!("transport: {e:#}"))
            }
        };
        match judged {
            Ok(len) if in_window => {
                tally.answers += 1;
                tally.response_bytes += len;
                let us = u64::try_from((t1 - t0).as_micros()).unwrap_or(u64::MAX);
                tally.latencies_us.push(us);
            }
            Ok(_) => {}
            Err(reason) if in_window || W::COUNTS_WARMUP_FAILURES => {
                *tally.errors.entry(reason).or_default() += 1;
            }
            Err(_) => {}
        }
    }
}

/// What a phase reads at each end of its window.
struct Snapshot {
    at: Instant,
    histogram: Histogram,
    server_cpu_s: f64,
    client_cpu_s: f64,
    machine_busy_s: f64,
}

async fn snapshot(server: &Arc<Server>) -> anyhow::Result<Snapshot> {
    let server = server.clone();
    tokio::task::spawn_blocking(move || {
        let at = Instant::now();
        let server_cpu_s = util::cpu_seconds(server.pid)?;
        let client_cpu_s = util::cpu_seconds(std::process::id())?;
        let (machine_busy_s, _) = util::machine_cpu_seconds()?;
        let (name, labels) = server.histogram;
        let histogram = moat_e2e::net::scrape(&server.admin)?
            .histogram(name, labels)
            .unwrap_or_default();
        Ok(Snapshot {
            at,
            histogram,
            server_cpu_s,
            client_cpu_s,
            machine_busy_s,
        })
    })
    .await
    .context("snapshot task")?
}

/// How a client task paces its requests.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// Next request as soon as the previous answer is in.
    Closed,
    /// One request every `interval`, the first at `offset` after the phase starts.
    Open {
        /// Time between this task's requests.
        interval: Duration,
        /// This task's first request, after the start.
        offset: Duration,
    },
}

impl Pace {
    /// Task `t` of `n`: a closed loop, or its share of an open loop at `rate` requests/s
    /// (every `n / rate` seconds, staggered so the tasks together send evenly).
    fn for_task(rate: Option<f64>, t: usize, n: usize) -> Self {
        match rate {
            None => Pace::Closed,
            Some(r) => {
                let interval = Duration::from_secs_f64(n as f64 / r);
                Pace::Open {
                    interval,
                    offset: interval.mul_f64(t as f64 / n as f64),
                }
            }
        }
    }

    /// The task's schedule from `begin`.
    fn schedule(self, begin: Instant) -> Schedule {
        let due = match self {
            Pace::Closed => begin,
            Pace::Open { offset, .. } => begin + offset,
        };
        Schedule { pace: self, due }
    }
}

/// When a client task's requests are due.
#[derive(Debug)]
struct Schedule {
    pace: Pace,
    due: Instant,
}

impl Schedule {
    /// Waits for the next request's turn; returns when it counts as sent: now (closed loop, or
    /// open loop on schedule), or its scheduled time when the task is behind, because then the
    /// wait is the server's doing (coordinated omission corrected).
    async fn next(&mut self) -> Instant {
        let t0 = match self.pace {
            Pace::Closed => Instant::now(),
            Pace::Open { .. } if Instant::now() >= self.due => self.due,
            Pace::Open { .. } => {
                tokio::time::sleep_until(self.due.into()).await;
                Instant::now()
            }
        };
        if let Pace::Open { interval, .. } = self.pace {
            self.due += interval;
        }
        t0
    }
}

#[cfg(test)]
impl Phase {
    /// A phase of 10 s with these figures, 0.5 s of server CPU and the rest zero.
    pub fn sample(
        names: &'static Names,
        rate: Option<f64>,
        per_sec: f64,
        p50: f64,
        p99: f64,
    ) -> Self {
        Phase {
            names,
            mode: if rate.is_some() {
                "fixed_rate"
            } else {
                "saturation"
            },
            offered_rate: rate,
            duration_s: 10.0,
            answers: (per_sec * 10.0) as u64,
            errors: BTreeMap::new(),
            answers_per_sec: per_sec,
            latency: LatencySummary {
                p50_ms: p50,
                p99_ms: p99,
                ..LatencySummary::default()
            },
            response_bytes_mean: 0.0,
            server_histogram: ServerHistogram::default(),
            server_cpu_s: 0.5,
            client_cpu_s: 0.0,
            machine_busy_cores: 0.0,
            other_cores: 0.0,
        }
    }
}

/// `report` as JSON, asserted to have the keys `keys` (separated by white space) and, in both
/// phases, the keys every phase has plus `own`.
#[cfg(test)]
pub fn report_json(report: &impl Serialize, keys: &str, own: &str) -> serde_json::Value {
    let assert_keys = |v: &serde_json::Value, want: &str| {
        let mut keys: Vec<_> = v.as_object().into_iter().flat_map(|o| o.keys()).collect();
        keys.sort_unstable();
        let mut want: Vec<_> = want.split_whitespace().collect();
        want.sort_unstable();
        assert_eq!(keys, want);
    };
    let json = serde_json::to_value(report).unwrap();
    assert_keys(&json, keys);
    let shared = "mode offered_rate duration_s errors latency client_cpu_s machine_busy_cores";
    let phase = format!("{shared} other_cores {own}");
    assert_keys(&json["saturation"], &phase);
    assert_keys(&json["fixed_rate"], &phase);
    json
}
