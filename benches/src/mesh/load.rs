//! The workloads, each aimed at one entry address of a system under test. External tools
//! (iperf3, wrk, h2load) where a standard one exists; our own threads where precise timing
//! matters (the open loop, new connections, idle connections).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::http1::{Conn, GET, GET_CLOSE};

/// Per-read/connect timeout of our own generators: a request slower than this is an error.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Bulk throughput from iperf3.
#[derive(Debug, Clone, Copy)]
pub struct Bulk {
    /// Received bits per second.
    pub gbit_s: f64,
    /// Received bytes.
    pub bytes: f64,
}

/// Runs `iperf3 -c` through `entry` with `streams` parallel streams.
pub fn iperf(entry: SocketAddr, streams: u32, dur: Duration, raw: &Path) -> anyhow::Result<Bulk> {
    let secs = dur.as_secs().max(1).to_string();
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        &entry.ip().to_string(),
        "-p",
        &entry.port().to_string(),
    ])
    .args(["-t", &secs, "-P", &streams.to_string(), "-J"])
    .args(["--connect-timeout", "5000"]);
    let out = run_tool(cmd, dur + Duration::from_secs(20), raw)?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("iperf3 printed no JSON (see {})", raw.display()))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let recv = &v["end"]["sum_received"];
    match (recv["bits_per_second"].as_f64(), recv["bytes"].as_f64()) {
        (Some(bps), Some(bytes)) if bytes > 0.0 => Ok(Bulk {
            gbit_s: bps / 1e9,
            bytes,
        }),
        _ => bail!("iperf3 reported no received bytes (see {})", raw.display()),
    }
}

/// A closed-loop HTTP load's result.
#[derive(Debug, Clone, Default)]
pub struct Requests {
    /// Successful requests (2xx).
    pub ok: u64,
    /// Failed requests or connections.
    pub errors: u64,
    /// Seconds measured.
    pub secs: f64,
    /// Latency percentiles, ms: p50, p90, p99, p99.9.
    pub p50: f64,
    /// 90th percentile, ms.
    pub p90: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// 99.9th percentile, ms.
    pub p999: f64,
}

impl Requests {
    /// Successful requests per second.
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.secs.max(1e-9)
    }

    fn from_samples(ok: u64, errors: u64, secs: f64, samples: &mut [u64]) -> Self {
        let l = crate::util::LatencySummary::from_micros(samples);
        Self {
            ok,
            errors,
            secs,
            p50: l.p50_ms,
            p90: l.p90_ms,
            p99: l.p99_ms,
            p999: l.p999_ms,
        }
    }
}

/// wrk's Lua hook printing one machine-readable line (latencies in µs).
const WRK_REPORT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("MOAT_WRK %d %d %d %d %d %d %d %.1f %.1f %.1f %.1f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"#;

/// HTTP/1.1 keep-alive at maximum rate: `wrk -t1 -c<conns>` through `entry`.
pub fn wrk(entry: SocketAddr, conns: usize, dur: Duration, raw: &Path) -> anyhow::Result<Requests> {
    let script = raw.with_extension("lua");
    std::fs::write(&script, WRK_REPORT).with_context(|| script.display().to_string())?;
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{conns}"),
        &format!("-d{}s", dur.as_secs().max(1)),
    ])
    .args(["--timeout", "5s", "-s"])
    .arg(&script)
    .arg(format!("http://{entry}/1k"));
    let out = run_tool(cmd, dur + Duration::from_secs(20), raw)?;
    parse_wrk(&out).with_context(|| format!("unexpected wrk output (see {})", raw.display()))
}

fn parse_wrk(out: &str) -> anyhow::Result<Requests> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("MOAT_WRK "))
        .context("no MOAT_WRK line")?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("non-numeric MOAT_WRK field")?;
    let [requests, duration_us, connect, read, write, status, timeout, p50, p90, p99, p999] = f[..]
    else {
        bail!("MOAT_WRK has {} fields, expected 11", f.len());
    };
    let errors = connect + read + write + status + timeout;
    Ok(Requests {
        ok: (requests - status).max(0.0) as u64,
        errors: errors as u64,
        secs: duration_us / 1e6,
        p50: p50 / 1000.0,
        p90: p90 / 1000.0,
        p99: p99 / 1000.0,
        p999: p999 / 1000.0,
    })
}

/// HTTP/2 over cleartext (prior knowledge), small requests multiplexed on a few connections:
/// `h2load -c<clients> -m<streams>`; latency percentiles from its per-request log.
pub fn h2load(
    entry: SocketAddr,
    clients: usize,
    streams: usize,
    dur: Duration,
    raw: &Path,
) -> anyhow::Result<Requests> {
    let log = raw.with_extension("log");
    let mut cmd = Command::new("h2load");
    cmd.args([&format!("-c{clients}"), &format!("-m{streams}")])
        .args(["-D", &dur.as_secs().max(1).to_string(), "--warm-up-time=1"])
        .arg(format!("--log-file={}", log.display()))
        .arg(format!("http://{entry}/1k"));
    let out = run_tool(cmd, dur + Duration::from_secs(25), raw)?;
    let (done, failed, errored, secs) = parse_h2load(&out)
        .with_context(|| format!("unexpected h2load output (see {})", raw.display()))?;
    let text = std::fs::read_to_string(&log).with_context(|| log.display().to_string())?;
    let mut samples: Vec<u64> = text
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    let ok = done.saturating_sub(failed);
    Ok(Requests::from_samples(
        ok,
        failed + errored,
        secs,
        &mut samples,
    ))
}

/// (done, failed, errored, seconds) from h2load's summary.
fn parse_h2load(out: &str) -> anyhow::Result<(u64, u64, u64, f64)> {
    let secs = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split('s').next())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .context("no `finished in` line")?;
    let req = out
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .context("no `requests:` line")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        req.split(',')
            .find_map(|p| p.trim().strip_suffix(name))
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no `{name}` count"))
    };
    Ok((field("done")?, field("failed")?, field("errored")?, secs))
}

/// An open-loop load's result.
#[derive(Debug, Clone, Default)]
pub struct OpenLoop {
    /// Summary (latency measured from each request's scheduled send time).
    pub requests: Requests,
    /// Every latency sample, µs, ascending.
    pub samples: Vec<u64>,
}

/// HTTP/1.1 at a fixed `rate` over `conns` keep-alive connections, open loop: request `i` is
/// due at `start + i / rate` whatever happened to earlier ones, and its latency is measured
/// from that moment, so a stall is charged to every request it delayed (coordinated omission
/// corrected, as wrk2 does). Each connection owns every `conns`-th slot.
pub fn open_loop(
    entry: SocketAddr,
    rate: f64,
    conns: usize,
    dur: Duration,
) -> anyhow::Result<OpenLoop> {
    let conns = conns.max(1);
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        clients.push(Conn::connect(entry, IO_TIMEOUT).with_context(|| format!("connect {entry}"))?);
    }
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + dur;
    let slot = Duration::from_secs_f64(1.0 / rate);
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(k, mut conn)| {
            thread::spawn(move || {
                precise_sleeps();
                let (mut ok, mut errors, mut samples) = (0u64, 0u64, Vec::new());
                let mut due = start + slot * k as u32;
                let every = slot * conns as u32;
                while due < end {
                    let now = Instant::now();
                    if due > now {
                        thread::sleep(due - now);
                    }
                    match conn.request(GET) {
                        Ok(200) => {
                            ok += 1;
                            samples.push(due.elapsed().as_micros() as u64);
                        }
                        _ => {
                            errors += 1;
                            match Conn::connect(entry, IO_TIMEOUT) {
                                Ok(c) => conn = c,
                                Err(_) => thread::sleep(Duration::from_millis(10)),
                            }
                        }
                    }
                    due += every;
                }
                (ok, errors, samples)
            })
        })
        .collect();
    let (ok, errors, mut samples) = gather(threads)?;
    let secs = start.elapsed().as_secs_f64();
    let requests = Requests::from_samples(ok, errors, secs, &mut samples);
    Ok(OpenLoop { requests, samples })
}

/// Every request on a new connection (`Connection: close`), `conc` clients in a closed loop;
/// latency includes the TCP connect, as an app sees it.
pub fn new_connections(entry: SocketAddr, conc: usize, dur: Duration) -> anyhow::Result<Requests> {
    let start = Instant::now();
    let end = start + dur;
    let threads: Vec<_> = (0..conc.max(1))
        .map(|_| {
            thread::spawn(move || {
                let (mut ok, mut errors, mut samples) = (0u64, 0u64, Vec::new());
                while Instant::now() < end {
                    let t = Instant::now();
                    let done = Conn::connect(entry, IO_TIMEOUT).and_then(|mut c| {
                        let status = c.request(GET_CLOSE)?;
                        c.wait_close()?;
                        Ok(status)
                    });
                    match done {
                        Ok(200) => {
                            ok += 1;
                            samples.push(t.elapsed().as_micros() as u64);
                        }
                        _ => {
                            errors += 1;
                            thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                (ok, errors, samples)
            })
        })
        .collect();
    let (ok, errors, mut samples) = gather(threads)?;
    let secs = start.elapsed().as_secs_f64();
    Ok(Requests::from_samples(ok, errors, secs, &mut samples))
}

/// What load threads counted: (successes, errors, latency samples in µs).
type Tally = (u64, u64, Vec<u64>);

/// Waits for every load thread and adds up what they counted.
fn gather(threads: Vec<thread::JoinHandle<Tally>>) -> anyhow::Result<Tally> {
    let (mut ok, mut errors, mut samples) = (0, 0, Vec::new());
    for t in threads {
        let (o, e, s) = t
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
        ok += o;
        errors += e;
        samples.extend(s);
    }
    Ok((ok, errors, samples))
}

/// Opens `n` keep-alive connections through `entry`, each having completed one request (so
/// both proxy sides hold the whole path), and returns them open.
pub fn idle_connections(entry: SocketAddr, n: usize) -> anyhow::Result<Vec<Conn>> {
    let workers = 8.min(n.max(1));
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let count = n / workers + usize::from(w < n % workers);
            thread::spawn(move || -> anyhow::Result<Vec<Conn>> {
                let mut held = Vec::with_capacity(count);
                for i in 0..count {
                    let mut c = Conn::connect(entry, IO_TIMEOUT)
                        .with_context(|| format!("connection {i} of worker {w}"))?;
                    match c.request(GET) {
                        Ok(200) => held.push(c),
                        Ok(s) => bail!("connection {i} of worker {w}: status {s}"),
                        Err(e) => bail!("connection {i} of worker {w}: {e}"),
                    }
                }
                Ok(held)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("connect thread panicked"))??,
        );
    }
    Ok(all)
}

/// Samples the RSS of `pids` every 200 ms until dropped; [`RssPeak::finish`] gives the peaks.
pub struct RssPeak {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<Vec<u64>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RssPeak {
    /// Starts sampling.
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(vec![0u64; pids.len()]));
        let (s, p) = (stop.clone(), peaks.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(mut peaks) = p.lock() {
                    for (peak, pid) in peaks.iter_mut().zip(&pids) {
                        if let Ok((rss, _)) = crate::util::rss_bytes(*pid) {
                            *peak = (*peak).max(rss);
                        }
                    }
                }
                thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the peak RSS of each PID, in bytes, in the order given.
    pub fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peaks.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl Drop for RssPeak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs a tool with stdout to `raw` (kept for inspection), killed after `limit`; returns stdout.
fn run_tool(mut cmd: Command, limit: Duration, raw: &Path) -> anyhow::Result<String> {
    let stdout = std::fs::File::create(raw).with_context(|| raw.display().to_string())?;
    let err_path: PathBuf = raw.with_extension("stderr");
    let stderr =
        std::fs::File::create(&err_path).with_context(|| err_path.display().to_string())?;
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("cannot run {shown}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{shown} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let out = std::fs::read_to_string(raw).unwrap_or_default();
    if !status.success() {
        let err = std::fs::read_to_string(&err_path).unwrap_or_default();
        bail!("{shown} failed ({status}): {}{}", err.trim(), tail(&out));
    }
    Ok(out)
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// Lets `thread::sleep` wake within microseconds of its deadline instead of the default 50 µs
/// timer slack, which would blur the open loop's schedule.
fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_report_line() {
        let out = "Running 1s test\nMOAT_WRK 1000 2000000 0 1 0 2 0 250.0 400.0 900.0 1500.5\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!((r.ok, r.errors), (998, 3));
        assert_eq!(r.secs, 2.0);
        assert_eq!((r.p50, r.p999), (0.25, 1.5005));
        assert!(parse_wrk("no line").is_err());
        assert!(parse_wrk("MOAT_WRK 1 2 3").is_err());
    }

    #[test]
    fn parses_h2load_summary() {
        let out = "finished in 2.00s, 1234.50 req/s, 1.2MB/s\n\
                   requests: 2469 total, 2479 started, 2469 done, 2468 succeeded, 1 failed, 0 errored, 0 timeout\n";
        assert_eq!(parse_h2load(out).unwrap(), (2469, 1, 0, 2.0));
        assert!(parse_h2load("finished in 2.00s\n").is_err());
    }
}
