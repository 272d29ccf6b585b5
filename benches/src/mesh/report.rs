//! The comparison's results: every run, the medians per system with ratios and targets, and
//! the files a person or a tool reads (report.md, report.json, PNG plots via `plot.py`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::Serialize;

use super::MeshArgs;

/// One measured run of one workload against one system.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// Workload id (`bulk1`, `ka`, ...).
    pub workload: &'static str,
    /// System name.
    pub system: &'static str,
    /// 1-based repeat.
    pub repeat: usize,
    /// Measured values by key (`gbit_s`, `p99_ms`, ...).
    pub values: BTreeMap<&'static str, f64>,
    /// Failed requests or connections counted by the load generator.
    pub errors: u64,
    /// Why the run failed, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Per-side details (memory of each proxy side...).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// Wall-clock seconds the run took, set-up included.
    pub secs: f64,
    /// Latency samples of the open-loop run, µs (for the percentile curve).
    #[serde(skip)]
    pub samples: Vec<u64>,
}

impl Run {
    /// An empty run.
    pub fn new(workload: &'static str, system: &'static str, repeat: usize) -> Self {
        Self {
            workload,
            system,
            repeat,
            values: BTreeMap::new(),
            errors: 0,
            error: None,
            note: String::new(),
            secs: 0.0,
            samples: Vec::new(),
        }
    }

    /// Records a value.
    pub fn set(&mut self, key: &'static str, v: f64) {
        self.values.insert(key, v);
    }

    /// One line for the console and the report's "every run" list.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "[{:<5}] {:<8} #{}:",
            self.workload, self.system, self.repeat
        );
        for (k, v) in &self.values {
            s.push_str(&format!(" {k}={}", fmt_num(*v)));
        }
        if self.errors > 0 {
            s.push_str(&format!(" ERRORS={}", self.errors));
        }
        if !self.note.is_empty() {
            s.push_str(&format!(" ({})", self.note));
        }
        if let Some(e) = &self.error {
            s.push_str(&format!(" FAILED: {e}"));
        }
        s
    }
}

/// A line from another benchmark (CA issuance, injector admission).
#[derive(Debug, Clone, Serialize)]
pub struct Extra {
    /// `ca` or `injector`.
    pub id: String,
    /// Human label.
    pub label: String,
    /// The one-line result.
    pub text: String,
}

/// The machine the run happened on.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    /// CPUs available.
    pub cpus: usize,
    /// Kernel release.
    pub kernel: String,
    /// `/proc/loadavg` before the run.
    pub loadavg_start: String,
    /// `/proc/loadavg` after the run.
    pub loadavg_end: String,
}

/// The run's settings.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Seconds per run.
    pub duration_s: f64,
    /// Runs per workload and system.
    pub repeats: usize,
    /// Fixed-rate workload's offered rate.
    pub rate: f64,
    /// Keep-alive connections.
    pub ka_connections: usize,
    /// Idle connections held.
    pub idle_connections: usize,
    /// Where the measured Moat binaries came from (`target/dist`: as shipped).
    pub binaries: String,
    /// Extra arguments given to both Moat proxies (none: defaults).
    pub moat_args: Vec<String>,
}

/// Which way a metric improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Throughput.
    Higher,
    /// Latency, CPU, memory.
    Lower,
}

/// How Moat's value compares with its target.
#[derive(Debug, Clone, Copy)]
enum Verdict {
    Met,
    Missed,
    /// The baseline moved more than the effect (e.g. a proxy "adding" negative latency).
    Inconclusive,
}

impl Verdict {
    fn of(met: bool) -> Self {
        if met {
            Verdict::Met
        } else {
            Verdict::Missed
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::Inconclusive => "inconclusive (noise)",
        }
    }
}

/// A goal for Moat's value.
#[derive(Debug, Clone, Copy)]
enum Target {
    None,
    /// Moat/HAProxy must be at least (higher) or at most (lower) this.
    VsHaproxy(f64),
    /// Moat's value must be at most this.
    AtMost(f64),
}

/// One table row: a metric's median per system.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Stable id.
    pub id: &'static str,
    /// Human label.
    pub label: String,
    /// Unit.
    pub unit: &'static str,
    /// Which way is better.
    pub better: Better,
    /// Plot grouping: throughput, connections, latency, cpu, memory.
    pub group: &'static str,
    /// Median over repeats per system (`None`: not applicable).
    pub values: BTreeMap<&'static str, Option<f64>>,
    /// Every repeat's value per system.
    pub runs: BTreeMap<&'static str, Vec<f64>>,
    /// Moat's median over HAProxy's.
    pub moat_vs_haproxy: Option<f64>,
    /// Moat's median over direct's.
    pub moat_vs_direct: Option<f64>,
    /// The goal, in words.
    pub target: Option<String>,
    /// `met`, `missed` or `inconclusive (noise)` when there is a target and both values exist.
    pub verdict: Option<&'static str>,
}

/// A point of a latency-percentile curve.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    /// Percentile, 0-100.
    pub percentile: f64,
    /// Latency at that percentile.
    pub ms: f64,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Always `mesh`.
    pub bench: &'static str,
    /// `full` or `smoke`.
    pub mode: &'static str,
    /// Start time, RFC 3339.
    pub started_at: String,
    /// Machine facts.
    pub host: Host,
    /// Settings.
    pub settings: Settings,
    /// Column order.
    pub systems: Vec<String>,
    /// Every run in the order it ran.
    pub runs: Vec<Run>,
    /// Medians and ratios.
    pub rows: Vec<Row>,
    /// Fixed-rate latency percentiles per system (all repeats merged).
    pub latency_curves: BTreeMap<&'static str, Vec<CurvePoint>>,
    /// Other benchmarks' lines.
    pub extras: Vec<Extra>,
}

struct Def {
    id: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
    group: &'static str,
    workload: &'static str,
    key: &'static str,
    target: Target,
}

// One positional argument per column keeps the table below one readable line per row.
#[allow(clippy::too_many_arguments)]
const fn def(
    id: &'static str,
    label: &'static str,
    unit: &'static str,
    better: Better,
    group: &'static str,
    workload: &'static str,
    key: &'static str,
    target: Target,
) -> Def {
    Def {
        id,
        label,
        unit,
        better,
        group,
        workload,
        key,
        target,
    }
}

use Better::{Higher, Lower};
use Target::{AtMost, VsHaproxy};

/// The table, top to bottom. `{rate}` and `{conns}` are filled in from the settings.
#[rustfmt::skip]
const ROWS: &[Def] = &[
    def("bulk1_gbit_s", "Bulk TCP, 1 stream", "Gbit/s", Higher, "throughput", "bulk1", "gbit_s", VsHaproxy(1.2)),
    def("bulk8_gbit_s", "Bulk TCP, 8 streams", "Gbit/s", Higher, "throughput", "bulk8", "gbit_s", VsHaproxy(1.2)),
    def("bulk1_cpu_s_per_gb", "Proxy CPU per GB, 1 stream", "CPU s/GB", Lower, "cpu", "bulk1", "cpu_s_per_gb", VsHaproxy(1.0)),
    def("bulk8_cpu_s_per_gb", "Proxy CPU per GB, 8 streams", "CPU s/GB", Lower, "cpu", "bulk8", "cpu_s_per_gb", VsHaproxy(1.0)),
    def("ka_rps", "HTTP/1.1 keep-alive, {conns} connections", "req/s", Higher, "throughput", "ka", "rps", VsHaproxy(1.2)),
    def("ka_p50_ms", "  keep-alive p50", "ms", Lower, "latency", "ka", "p50_ms", Target::None),
    def("ka_p99_ms", "  keep-alive p99", "ms", Lower, "latency", "ka", "p99_ms", Target::None),
    def("ka_p999_ms", "  keep-alive p99.9", "ms", Lower, "latency", "ka", "p999_ms", Target::None),
    def("ka_cpu_s_per_10k", "Proxy CPU per 10,000 keep-alive requests", "CPU s", Lower, "cpu", "ka", "cpu_s_per_10k", Target::None),
    def("rate_achieved_rps", "Fixed rate {rate} req/s (open loop): achieved", "req/s", Higher, "latency", "rate", "achieved_rps", Target::None),
    def("rate_p50_ms", "  fixed-rate p50", "ms", Lower, "latency", "rate", "p50_ms", Target::None),
    def("rate_p99_ms", "  fixed-rate p99", "ms", Lower, "latency", "rate", "p99_ms", Target::None),
    def("rate_p999_ms", "  fixed-rate p99.9", "ms", Lower, "latency", "rate", "p999_ms", Target::None),
    def("rate_added_p50_ms", "  latency added over direct, p50", "ms", Lower, "latency", "rate", "added_p50_ms", VsHaproxy(1.0)),
    def("rate_added_p99_ms", "  latency added over direct, p99", "ms", Lower, "latency", "rate", "added_p99_ms", VsHaproxy(1.0)),
    def("close_cps", "New connections (request + close), {conns} clients", "conn/s", Higher, "connections", "close", "cps", VsHaproxy(6.0)),
    def("close_p50_ms", "  new connection + request p50", "ms", Lower, "latency", "close", "p50_ms", Target::None),
    def("close_p99_ms", "  new connection + request p99", "ms", Lower, "latency", "close", "p99_ms", Target::None),
    def("close_handshakes_per_conn", "  TLS handshakes per app connection (server side)", "", Lower, "connections", "close", "handshakes_per_conn", Target::None),
    def("close_cpu_ms_per_conn", "Proxy CPU per new connection", "CPU ms", Lower, "cpu", "close", "cpu_ms_per_conn", Target::None),
    def("h2_rps", "HTTP/2 cleartext, 4 connections x 10 streams", "req/s", Higher, "throughput", "h2", "rps", Target::None),
    def("h2_p50_ms", "  HTTP/2 p50", "ms", Lower, "latency", "h2", "p50_ms", Target::None),
    def("h2_p99_ms", "  HTTP/2 p99", "ms", Lower, "latency", "h2", "p99_ms", Target::None),
    def("rss_idle_mib", "RSS per proxy, idle (larger side)", "MiB", Lower, "memory", "start", "rss_idle_mib", AtMost(8.0)),
    def("rss_anon_idle_mib", "  of which private (anonymous; code pages are shared)", "MiB", Lower, "memory", "start", "rss_anon_idle_mib", Target::None),
    def("rss_load_mib", "RSS per proxy, keep-alive load (larger side)", "MiB", Lower, "memory", "ka", "rss_load_mib", AtMost(20.0)),
    def("idle_kib_per_conn", "Memory per idle proxied connection (larger side)", "KiB", Lower, "memory", "idle", "kib_per_conn", AtMost(32.0)),
];

impl Report {
    /// An empty report for `args`.
    pub fn new(args: &MeshArgs, cpus: usize) -> Self {
        Self {
            bench: "mesh",
            mode: if args.smoke { "smoke" } else { "full" },
            started_at: whole_seconds(&moat_core::svid::rfc3339(std::time::SystemTime::now())),
            host: Host {
                cpus,
                kernel: read_trim("/proc/sys/kernel/osrelease"),
                loadavg_start: loadavg(),
                loadavg_end: String::new(),
            },
            settings: Settings {
                duration_s: args.duration.as_secs_f64(),
                repeats: args.repeats,
                rate: args.rate,
                ka_connections: args.connections,
                idle_connections: args.idle_connections,
                binaries: moat_e2e::bin::bin_dir()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default(),
                moat_args: args.moat_args.clone(),
            },
            systems: args.systems.clone(),
            runs: Vec::new(),
            rows: Vec::new(),
            latency_curves: BTreeMap::new(),
            extras: Vec::new(),
        }
    }

    /// Derives the added latency, the rows and the curves from the runs.
    pub fn finish(&mut self) {
        self.host.loadavg_end = loadavg();
        self.add_latency_over_direct();
        let fill = |l: &str| {
            l.replace("{rate}", &fmt_num(self.settings.rate))
                .replace("{conns}", &self.settings.ka_connections.to_string())
        };
        let rows: Vec<Row> = ROWS.iter().map(|d| self.row(d, fill(d.label))).collect();
        self.rows = rows;
        let mut curves = BTreeMap::new();
        for r in self
            .runs
            .iter()
            .filter(|r| r.workload == "rate" && r.error.is_none())
        {
            curves
                .entry(r.system)
                .or_insert_with(Vec::new)
                .extend(&r.samples);
        }
        self.latency_curves = curves
            .into_iter()
            .map(|(sys, mut samples)| (sys, curve(&mut samples)))
            .collect();
    }

    fn add_latency_over_direct(&mut self) {
        let direct: BTreeMap<usize, BTreeMap<&str, f64>> = self
            .runs
            .iter()
            .filter(|r| r.workload == "rate" && r.system == "direct" && r.error.is_none())
            .map(|r| (r.repeat, r.values.iter().map(|(k, v)| (*k, *v)).collect()))
            .collect();
        for r in self
            .runs
            .iter_mut()
            .filter(|r| r.workload == "rate" && r.error.is_none())
        {
            let Some(d) = direct.get(&r.repeat) else {
                continue;
            };
            for (key, added) in [("p50_ms", "added_p50_ms"), ("p99_ms", "added_p99_ms")] {
                if let (Some(v), Some(base)) = (r.values.get(key), d.get(key)) {
                    let diff = v - base;
                    r.values.insert(added, diff);
                }
            }
        }
    }

    fn row(&self, d: &Def, label: String) -> Row {
        let mut runs: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
        for r in self
            .runs
            .iter()
            .filter(|r| r.workload == d.workload && r.error.is_none())
        {
            if let Some(v) = r.values.get(d.key) {
                runs.entry(r.system).or_default().push(*v);
            }
        }
        let values: BTreeMap<&'static str, Option<f64>> = self
            .systems
            .iter()
            .filter_map(|s| known(s))
            .map(|s| (s, runs.get(s).map(|v| median(v))))
            .collect();
        let get = |s: &str| values.get(s).copied().flatten();
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 && a >= 0.0 => Some(a / b),
            _ => None,
        };
        let (moat, haproxy) = (get("moat"), get("haproxy"));
        let (target, verdict) = match d.target {
            Target::None => (None, None),
            VsHaproxy(f) => {
                let words = match (d.better, f == 1.0) {
                    (Lower, true) => "no more than HAProxy".to_string(),
                    (Lower, false) => format!("<= {f}x HAProxy"),
                    (Higher, _) => format!(">= {f}x HAProxy"),
                };
                let met = match (moat, haproxy) {
                    // A proxy "adding" no or negative latency over direct means the run's noise
                    // is larger than the effect: no verdict either way.
                    (Some(_), Some(h)) if d.better == Lower && h <= 0.0 => {
                        Some(Verdict::Inconclusive)
                    }
                    (Some(m), Some(h)) => Some(Verdict::of(match d.better {
                        Higher => m >= f * h,
                        Lower => m <= f * h,
                    })),
                    _ => None,
                };
                (Some(words), met)
            }
            AtMost(v) => (
                Some(format!("<= {v} {}", d.unit)),
                moat.map(|m| Verdict::of(m <= v)),
            ),
        };
        Row {
            id: d.id,
            label,
            unit: d.unit,
            better: d.better,
            group: d.group,
            moat_vs_haproxy: ratio(moat, haproxy),
            moat_vs_direct: ratio(moat, get("direct")),
            values,
            runs,
            target,
            verdict: verdict.map(Verdict::as_str),
        }
    }

    /// The Markdown report: the table, every run, the other benchmarks.
    pub fn markdown(&self) -> String {
        let mut md = format!(
            "## Moat data plane: {} run, {} repeat(s) x {} s per workload, {} CPUs, {}\n\n",
            self.mode,
            self.settings.repeats,
            self.settings.duration_s,
            self.host.cpus,
            self.started_at
        );
        md.push_str(&format!(
            "Moat binaries from `{}`{}. Load average {} before, {} after. Medians over repeats; every run is listed below.\n\n",
            self.settings.binaries,
            if self.settings.moat_args.is_empty() {
                String::new()
            } else {
                format!(", run with `{}`", self.settings.moat_args.join(" "))
            },
            self.host.loadavg_start,
            self.host.loadavg_end
        ));
        md.push_str("| metric | unit |");
        for s in &self.systems {
            md.push_str(&format!(" {s} |"));
        }
        md.push_str(" Moat/HAProxy | Moat/direct | target | verdict |\n|---|---|");
        md.push_str(&"---:|".repeat(self.systems.len() + 2));
        md.push_str("---|---|\n");
        for r in &self.rows {
            md.push_str(&format!("| {} | {} |", r.label, r.unit));
            for s in &self.systems {
                let v = r.values.get(s.as_str()).copied().flatten();
                md.push_str(&format!(" {} |", v.map_or("–".into(), fmt_num)));
            }
            let x = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}x"));
            md.push_str(&format!(
                " {} | {} | {} | {} |\n",
                x(r.moat_vs_haproxy),
                x(r.moat_vs_direct),
                r.target.as_deref().unwrap_or(""),
                match r.verdict {
                    Some("missed") => "**MISSED**",
                    Some(v) => v,
                    None => "",
                }
            ));
        }
        if !self.extras.is_empty() {
            md.push_str("\n### Control plane\n\n");
            for e in &self.extras {
                md.push_str(&format!("- **{}**: {}\n", e.label, e.text));
            }
        }
        md.push_str("\n### Every run\n\n```\n");
        for r in &self.runs {
            md.push_str(&r.describe());
            md.push('\n');
        }
        md.push_str("```\n");
        md
    }

    /// Writes report.md, report.json and (if `plots`) the PNGs into `out`.
    pub fn write(&self, out: &Path, plots: bool) -> anyhow::Result<()> {
        std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
        let md = out.join("report.md");
        std::fs::write(&md, self.markdown()).with_context(|| md.display().to_string())?;
        let json = out.join("report.json");
        std::fs::write(&json, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| json.display().to_string())?;
        println!("wrote {} and {}", md.display(), json.display());
        if plots {
            let python = python_with_matplotlib()?;
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("plot.py");
            let status = Command::new(&python)
                .arg(&script)
                .arg(&json)
                .arg(out)
                .status()
                .with_context(|| format!("cannot run {}", python.display()))?;
            if !status.success() {
                bail!("{} failed ({status})", script.display());
            }
        }
        Ok(())
    }
}

/// The Python that has matplotlib: the repository's `.venv` (tests/setup.sh), else `python3`.
pub fn python_with_matplotlib() -> anyhow::Result<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let ok = Command::new(&python)
        .args(["-c", "import matplotlib"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        bail!(
            "{} cannot import matplotlib: run tests/setup.sh (it installs it into .venv) or `pip install matplotlib`",
            python.display()
        );
    }
    Ok(python)
}

fn known(s: &str) -> Option<&'static str> {
    ["direct", "moat", "haproxy"].into_iter().find(|k| *k == s)
}

/// Median (mean of the middle two for an even count).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Percentile curve of µs samples, up to the deepest percentile the count supports.
fn curve(samples: &mut [u64]) -> Vec<CurvePoint> {
    samples.sort_unstable();
    let n = samples.len() as f64;
    [
        0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 97.5, 99.0, 99.5, 99.75, 99.9, 99.95, 99.99,
        99.995, 99.999,
    ]
    .into_iter()
    // A percentile needs about 10 samples beyond it to mean anything.
    .filter(|p| n * (1.0 - p / 100.0) >= 10.0 || *p == 0.0)
    .map(|p| CurvePoint {
        percentile: p,
        ms: crate::util::percentile(samples, p / 100.0) as f64 / 1000.0,
    })
    .collect()
}

/// A number with as many digits as it deserves: 123,456 / 1,234 / 123 / 12.3 / 1.23 / 0.123.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "–".into()
    } else if a >= 1000.0 {
        let n = v.round() as i64;
        let digits = n.unsigned_abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 {
            format!("-{out}")
        } else {
            out
        }
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `2026-11-22T10:13:56.353Z` → `2026-11-22T10:13:56Z`.
fn whole_seconds(ts: &str) -> String {
    match ts.split_once('.') {
        Some((s, _)) => format!("{s}Z"),
        None => ts.to_string(),
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn loadavg() -> String {
    read_trim("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> MeshArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            a: MeshArgs,
        }
        W::parse_from(["x"]).a
    }

    fn run(w: &'static str, s: &'static str, rep: usize, kv: &[(&'static str, f64)]) -> Run {
        let mut r = Run::new(w, s, rep);
        for (k, v) in kv {
            r.set(k, *v);
        }
        r
    }

    #[test]
    fn medians_ratios_verdicts_and_added_latency() {
        let mut rep = Report::new(&args(), 2);
        rep.runs = vec![
            run("bulk1", "direct", 1, &[("gbit_s", 15.0)]),
            run("bulk1", "moat", 1, &[("gbit_s", 6.0)]),
            run("bulk1", "haproxy", 1, &[("gbit_s", 4.0)]),
            run("bulk1", "moat", 2, &[("gbit_s", 7.0)]),
            run("bulk1", "haproxy", 2, &[("gbit_s", 6.0)]),
            run("rate", "direct", 1, &[("p50_ms", 0.2), ("p99_ms", 1.0)]),
            run("rate", "moat", 1, &[("p50_ms", 0.5), ("p99_ms", 3.0)]),
            run("rate", "haproxy", 1, &[("p50_ms", 0.8), ("p99_ms", 2.0)]),
            run("start", "moat", 1, &[("rss_idle_mib", 9.0)]),
        ];
        rep.runs[6].samples = (1..=1000).collect();
        rep.finish();
        let row = |id: &str| rep.rows.iter().find(|r| r.id == id).unwrap();
        let bulk = row("bulk1_gbit_s");
        assert_eq!(bulk.values["moat"], Some(6.5));
        assert_eq!(bulk.values["haproxy"], Some(5.0));
        assert_eq!(bulk.runs["moat"], vec![6.0, 7.0]);
        assert_eq!(bulk.moat_vs_haproxy, Some(1.3));
        assert_eq!(bulk.verdict, Some("met"));
        let p50 = row("rate_added_p50_ms");
        assert!((p50.values["moat"].unwrap() - 0.3).abs() < 1e-9);
        assert_eq!(p50.verdict, Some("met"));
        assert_eq!(row("rate_added_p99_ms").verdict, Some("missed"));
        assert_eq!(row("rss_idle_mib").verdict, Some("missed"));
        // No data: no verdict, no invented zero.
        assert_eq!(row("h2_rps").values["moat"], None);
        assert_eq!(row("close_cps").verdict, None);
        let curve = &rep.latency_curves["moat"];
        assert_eq!(curve.last().unwrap().percentile, 99.0);
        let md = rep.markdown();
        assert!(md.contains("| Bulk TCP, 1 stream | Gbit/s | 15.0 | 6.50 | 5.00 | 1.30x | 0.43x | >= 1.2x HAProxy | met |"), "{md}");
        assert!(md.contains("**MISSED**"));
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(fmt_num(123456.4), "123,456");
        assert_eq!(fmt_num(-1234.0), "-1,234");
        assert_eq!(fmt_num(123.4), "123");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(0.01234), "0.012");
        assert_eq!(fmt_num(0.0), "0.00");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
