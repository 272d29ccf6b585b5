//! `moat-bench mesh`: Moat's data plane against HAProxy and no proxy, side by side in one run.
//!
//! Every system runs at once on loopback (idle ones cost nothing); each workload is repeated
//! and interleaved between systems (A B C, then C B A...), and every run is printed as it
//! finishes, so drift and noise are visible. Results are reduced to medians per system, with
//! ratios Moat/HAProxy and Moat/direct, in a Markdown table, a JSON file and PNG plots.

mod backend;
mod http1;
mod load;
pub mod report;
mod systems;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::util;
use report::{Extra, Run};
use systems::System;

/// Options of `moat-bench mesh`.
#[derive(Debug, Clone, Args)]
pub struct MeshArgs {
    /// Length of each measured run.
    #[arg(long, default_value = "10s", value_parser = moat_core::duration::parse)]
    pub duration: Duration,
    /// Runs of each workload per system (interleaved between systems).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Offered load of the fixed-rate workload, requests/s.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Keep-alive connections of the HTTP/1.1 workloads (and clients of the new-connection one).
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Idle proxied connections held open for the per-connection memory cost.
    #[arg(long, default_value_t = 10_000)]
    pub idle_connections: usize,
    /// Systems to compare, in column order.
    #[arg(long, value_delimiter = ',', default_value = "direct,moat,haproxy")]
    pub systems: Vec<String>,
    /// Workloads to run, in this order (default: all).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "bulk1,bulk8,ka,rate,close,h2,idle"
    )]
    pub workloads: Vec<String>,
    /// Extra `moat-proxy run` argument for both Moat proxies (repeatable), e.g.
    /// `--moat-arg=--worker-threads=2`; recorded in the report.
    #[arg(long = "moat-arg", allow_hyphen_values = true)]
    pub moat_args: Vec<String>,
    /// Output directory: report.md, report.json, PNG plots and every tool's raw output.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Skip the PNG plots (they need Python with matplotlib).
    #[arg(long)]
    pub no_plots: bool,
    /// CI smoke run: 1 s runs, 500 idle connections; proves the harness works, measures little.
    #[arg(long)]
    pub smoke: bool,
}

/// The workloads, in the order they run.
const WORKLOADS: [&str; 7] = ["bulk1", "bulk8", "ka", "rate", "close", "h2", "idle"];

/// Runs the data-plane comparison, writes the report files; `Ok(false)` when any run failed.
pub fn main(args: MeshArgs) -> anyhow::Result<bool> {
    let (report, ok) = run(args, Vec::new())?;
    println!("\n{}", report.markdown());
    Ok(ok)
}

/// Runs the comparison; `extras` (CA, injector lines) join the report. Returns the written
/// report and whether every run succeeded.
pub fn run(mut args: MeshArgs, extras: Vec<Extra>) -> anyhow::Result<(report::Report, bool)> {
    if args.smoke {
        args.duration = Duration::from_secs(1);
        args.idle_connections = args.idle_connections.min(500);
    }
    validate(&args)?;
    check_tools(!args.no_plots)?;
    let fds = raise_fd_limit(args.idle_connections)?;
    if fds.idle < args.idle_connections {
        println!(
            "NOTE: only {} file descriptors per process are allowed and the hard limit cannot be raised here (that needs CAP_SYS_RESOURCE); the idle-connection test holds {} connections instead of {}",
            fds.limit, fds.idle, args.idle_connections
        );
        args.idle_connections = fds.idle;
    }
    let raw = args.out.join("raw");
    if raw.exists() {
        std::fs::remove_dir_all(&raw).with_context(|| raw.display().to_string())?;
    }
    std::fs::create_dir_all(&raw).with_context(|| raw.display().to_string())?;
    let work = moat_e2e::temp_dir("bench")?;

    let mut report = report::Report::new(&args, util::cpus());
    report.extras = extras;
    println!(
        "moat-bench mesh: systems {}, {} repeat(s) of {:?} per workload, on {} CPUs (load average {})",
        args.systems.join(", "),
        args.repeats,
        args.duration,
        util::cpus(),
        report.host.loadavg_start
    );
    let backends = backend::Backends::start(work.path())?;
    let ca = systems::start_ca()?;
    let lab = Lab {
        backends: &backends,
        ca: &ca,
        dir: work.path(),
        maxconn: args.idle_connections + 1000,
        moat_args: &args.moat_args,
    };
    let sys = args
        .systems
        .iter()
        .map(|name| lab.start(name, "shared"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Let start-up allocations settle before the idle reading.
    std::thread::sleep(Duration::from_secs(2));
    for s in sys.iter().filter(|s| !s.sides.is_empty()) {
        let mut run = Run::new("start", s.name, 1);
        let rss = rss_of(s)?;
        run.set("rss_idle_mib", max_mib(&rss));
        let anon = s
            .pids()
            .into_iter()
            .map(util::rss_anon_bytes)
            .collect::<anyhow::Result<Vec<_>>>()?;
        run.set("rss_anon_idle_mib", max_mib(&anon));
        run.note = sides_note(s, &rss);
        print_run(&run);
        report.runs.push(run);
    }

    let mut ok = true;
    for workload in WORKLOADS
        .into_iter()
        .filter(|w| args.workloads.iter().any(|a| a == w))
    {
        for repeat in 1..=args.repeats {
            // Alternate the order so no system always runs first (or last) on a warm machine.
            let order: Vec<&System> = if repeat % 2 == 1 {
                sys.iter().collect()
            } else {
                sys.iter().rev().collect()
            };
            for s in order {
                let started = Instant::now();
                let mut run = match measure(workload, s, &lab, &args, &raw, repeat) {
                    Ok(run) => run,
                    Err(e) => {
                        let mut run = Run::new(workload, s.name, repeat);
                        run.error = Some(format!("{e:#}"));
                        run
                    }
                };
                if !s.alive() {
                    run.error = Some(format!(
                        "{} proxy exited during the run (logs in {})",
                        s.name,
                        work.path().display()
                    ));
                }
                run.secs = started.elapsed().as_secs_f64();
                ok &= run.error.is_none() && run.errors == 0;
                print_run(&run);
                report.runs.push(run);
            }
        }
    }
    report.finish();
    report.write(&args.out, !args.no_plots)?;
    if std::env::var_os("MOAT_BENCH_KEEP").is_some() {
        println!("keeping {}", work.keep().display());
    }
    Ok((report, ok))
}

/// What systems are built from: shared backends, one CA, a scratch directory.
struct Lab<'a> {
    backends: &'a backend::Backends,
    ca: &'a moat_e2e::CaFixture,
    dir: &'a Path,
    maxconn: usize,
    moat_args: &'a [String],
}

impl Lab<'_> {
    /// Starts system `name`; `tag` keeps its files apart from other instances'.
    fn start(&self, name: &str, tag: &str) -> anyhow::Result<System> {
        match name {
            "direct" => Ok(System::direct(self.backends)),
            "moat" => System::moat(self.ca, self.backends, self.moat_args),
            "haproxy" => System::haproxy(
                self.ca,
                self.backends,
                &self.dir.join(format!("haproxy-{tag}")),
                self.maxconn,
            ),
            other => bail!("unknown system {other:?}"),
        }
    }
}

fn validate(args: &MeshArgs) -> anyhow::Result<()> {
    if args.repeats == 0 || args.connections == 0 {
        bail!("--repeats and --connections must be at least 1");
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number of requests per second");
    }
    if args.duration < Duration::from_secs(1) {
        bail!("--duration must be at least 1s (iperf3, wrk and h2load count whole seconds)");
    }
    for w in &args.workloads {
        if !WORKLOADS.contains(&w.as_str()) {
            bail!(
                "--workloads: unknown workload {w:?} (known: {})",
                WORKLOADS.join(", ")
            );
        }
    }
    if args.systems.is_empty() {
        bail!("--systems names no system");
    }
    for (i, s) in args.systems.iter().enumerate() {
        if !["direct", "moat", "haproxy"].contains(&s.as_str()) {
            bail!("--systems: unknown system {s:?} (known: direct, moat, haproxy)");
        }
        if args.systems[..i].contains(s) {
            bail!("--systems: {s} is listed twice");
        }
    }
    Ok(())
}

/// Fails before anything starts when a tool is missing, saying how to get it.
fn check_tools(plots: bool) -> anyhow::Result<()> {
    moat_e2e::bin::try_binary("moat-proxy")
        .context("moat-bench builds nothing: run `cargo build --release --workspace` first")?;
    let missing: Vec<&str> = ["haproxy", "nginx", "iperf3", "wrk", "h2load"]
        .into_iter()
        .filter(|t| moat_e2e::tools::find_tool(t).is_none())
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {} (Debian: apt-get install haproxy nginx-light iperf3 wrk nghttp2-client; tests/setup.sh installs them)",
            missing.join(", ")
        );
    }
    if plots {
        report::python_with_matplotlib().context("the PNG plots need it (or pass --no-plots)")?;
    }
    Ok(())
}

/// One run of `workload` against `s`.
fn measure(
    workload: &'static str,
    s: &System,
    lab: &Lab<'_>,
    args: &MeshArgs,
    raw: &Path,
    repeat: usize,
) -> anyhow::Result<Run> {
    let mut run = Run::new(workload, s.name, repeat);
    let raw = raw.join(format!("{workload}-{}-{repeat}.out", s.name));
    let cpu0 = cpu_of(s)?;
    let dur = args.duration;
    match workload {
        "bulk1" | "bulk8" => {
            let streams = if workload == "bulk1" { 1 } else { 8 };
            let r = load::iperf(s.entries.iperf, streams, dur, &raw)?;
            run.set("gbit_s", r.gbit_s);
            if let Some(cpu) = cpu_since(s, cpu0)? {
                run.set("cpu_s_per_gb", cpu / (r.bytes / 1e9));
                run.set("proxy_cores", cpu / dur.as_secs_f64());
            }
        }
        "ka" => {
            let peaks = load::RssPeak::start(s.pids());
            let r = load::wrk(s.entries.http, args.connections, dur, &raw)?;
            let peaks = peaks.finish();
            set_requests(&mut run, &r, "rps");
            if let Some(cpu) = cpu_since(s, cpu0)? {
                run.set("cpu_s_per_10k", cpu / (r.ok as f64 / 1e4));
                run.set("rss_load_mib", max_mib(&peaks));
                run.note = sides_note(s, &peaks);
            }
        }
        "rate" => {
            let r = load::open_loop(s.entries.http, args.rate, args.connections, dur)?;
            set_requests(&mut run, &r.requests, "achieved_rps");
            run.samples = r.samples;
        }
        "close" => {
            let hs0 = s.handshakes()?;
            let r = load::new_connections(s.entries.http, args.connections, dur)?;
            set_requests(&mut run, &r, "cps");
            if let (Some(a), Some(b)) = (hs0, s.handshakes()?) {
                run.set("handshakes", b - a);
                run.set("handshakes_per_conn", (b - a) / (r.ok.max(1) as f64));
            }
            if let Some(cpu) = cpu_since(s, cpu0)? {
                run.set("cpu_ms_per_conn", cpu * 1e3 / r.ok.max(1) as f64);
            }
        }
        "h2" => {
            let r = load::h2load(s.entries.h2c, 4, 10, dur, &raw)?;
            set_requests(&mut run, &r, "rps");
        }
        "idle" if s.sides.is_empty() => {
            run.note = "no proxy: nothing to measure".into();
        }
        "idle" => {
            // A fresh pair: memory a process has freed stays mapped, so a second measurement
            // on the same processes would read near zero.
            let fresh = lab.start(s.name, &format!("idle-{repeat}"))?;
            load::idle_connections(fresh.entries.http, 1)?;
            std::thread::sleep(Duration::from_millis(500));
            let before = rss_of(&fresh)?;
            let conns = load::idle_connections(fresh.entries.http, args.idle_connections)?;
            std::thread::sleep(Duration::from_millis(500));
            let after = rss_of(&fresh)?;
            let n = conns.len() as f64;
            drop(conns);
            run.set("connections", n);
            let per: Vec<f64> = before
                .iter()
                .zip(&after)
                .map(|(b, a)| (*a as f64 - *b as f64) / 1024.0 / n)
                .collect();
            run.set("kib_per_conn", per.iter().copied().fold(f64::MIN, f64::max));
            run.note = fresh
                .sides
                .iter()
                .zip(&per)
                .map(|(side, kib)| format!("{} {kib:.1} KiB", side.role))
                .collect::<Vec<_>>()
                .join(", ");
            if !fresh.alive() {
                bail!(
                    "a {} proxy exited while holding the idle connections",
                    s.name
                );
            }
        }
        other => bail!("unknown workload {other}"),
    }
    Ok(run)
}

fn set_requests(run: &mut Run, r: &load::Requests, rate_key: &'static str) {
    run.set(rate_key, r.rate());
    run.set("p50_ms", r.p50);
    run.set("p90_ms", r.p90);
    run.set("p99_ms", r.p99);
    run.set("p999_ms", r.p999);
    run.errors = r.errors;
}

fn cpu_of(s: &System) -> anyhow::Result<Vec<f64>> {
    s.pids().into_iter().map(util::cpu_seconds).collect()
}

/// CPU seconds both proxy sides used since `before` (`None` for direct).
fn cpu_since(s: &System, before: Vec<f64>) -> anyhow::Result<Option<f64>> {
    if before.is_empty() {
        return Ok(None);
    }
    let now = cpu_of(s)?;
    Ok(Some(now.iter().zip(&before).map(|(n, b)| n - b).sum()))
}

fn rss_of(s: &System) -> anyhow::Result<Vec<u64>> {
    s.pids()
        .into_iter()
        .map(|p| util::rss_bytes(p).map(|(rss, _)| rss))
        .collect()
}

fn max_mib(bytes: &[u64]) -> f64 {
    bytes.iter().copied().max().unwrap_or(0) as f64 / (1024.0 * 1024.0)
}

fn sides_note(s: &System, bytes: &[u64]) -> String {
    s.sides
        .iter()
        .zip(bytes)
        .map(|(side, b)| format!("{} {:.1} MiB", side.role, *b as f64 / 1048576.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_run(run: &Run) {
    println!("{}", run.describe());
}

/// File descriptors available per process, and how many idle connections that allows.
struct Fds {
    limit: u64,
    idle: usize,
}

/// Raises this process's descriptor limit (children inherit it) so the idle test fits: each
/// proxy side holds two sockets per idle connection.
fn raise_fd_limit(idle: usize) -> anyhow::Result<Fds> {
    let want = (idle as u64) * 2 + 4096;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        let mut new = lim;
        new.rlim_cur = want.max(lim.rlim_cur);
        new.rlim_max = new.rlim_cur.max(lim.rlim_max);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &new) != 0 {
            // Without CAP_SYS_RESOURCE: go as far as the hard limit allows.
            new.rlim_cur = lim.rlim_max;
            new.rlim_max = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &new);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    let idle_fit = (lim.rlim_cur.saturating_sub(4096) / 2) as usize;
    Ok(Fds {
        limit: lim.rlim_cur,
        idle: idle.min(idle_fit),
    })
}
