//! Helpers shared by every benchmark: latency percentiles and `/proc` readers (liveness, CPU
//! time, memory) for processes by PID.
//!
//! Processes are started and stopped with the end-to-end harness: [`moat_e2e::proc::Proc`]
//! (spawn with logs to files, SIGTERM/SIGKILL on drop) and [`moat_e2e::proc::kill_pid`]; the
//! fixtures ([`moat_e2e::CaFixture`], ...) build on them.

use anyhow::{bail, Context};
use serde::Serialize;

/// Whether process `pid` exists and has not exited (a zombie counts as exited).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => stat_fields(&s).and_then(|f| f.first().copied()) != Some("Z"),
        Err(_) => false,
    }
}

/// Value at quantile `q` (0..=1) of ascending `sorted` values, nearest-rank method.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency distribution, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: usize,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl LatencySummary {
    /// `p50 … ms  p90 …  p99 …  p99.9 …  max …  mean …`, as the reports print it.
    pub fn line(&self) -> String {
        format!(
            "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  mean {:.2} ms",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.mean_ms
        )
    }

    /// Summarises samples in microseconds (sorted in place).
    pub fn from_micros(samples: &mut [u64]) -> Self {
        samples.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Self {
            count: samples.len(),
            mean_ms: if samples.is_empty() {
                0.0
            } else {
                sum as f64 / samples.len() as f64 / 1000.0
            },
            p50_ms: ms(percentile(samples, 0.50)),
            p90_ms: ms(percentile(samples, 0.90)),
            p99_ms: ms(percentile(samples, 0.99)),
            p999_ms: ms(percentile(samples, 0.999)),
            max_ms: ms(samples.last().copied().unwrap_or(0)),
        }
    }
}

/// Fields of `/proc/<pid>/stat` after the command name, starting with the state (field 3).
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let after = stat.get(stat.rfind(')')? + 1..)?;
    Some(after.split_whitespace().collect())
}

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions; it only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User plus system CPU seconds used so far by process `pid`.
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    let f = stat_fields(&stat).with_context(|| format!("{path}: unexpected format"))?;
    // utime and stime are fields 14 and 15; f[0] is field 3.
    let field = |n: usize| -> anyhow::Result<u64> {
        f.get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{path}: field {n} missing"))
    };
    Ok((field(14)? + field(15)?) as f64 / clock_ticks())
}

/// Resident memory of process `pid`: (current, peak) in bytes, from `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    let kib = |key: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    match (kib("VmRSS:"), kib("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss * 1024, hwm * 1024)),
        _ => bail!("{path}: no VmRSS/VmHWM"),
    }
}

/// Resident memory of process `pid`: (current, peak) in MiB.
pub fn rss_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let (rss, peak) = rss_bytes(pid)?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok((mib(rss), mib(peak)))
}

/// Private (anonymous) resident memory of process `pid`, in bytes: what it costs beyond the
/// code pages every process of the same binary shares (`RssAnon` in `/proc/<pid>/status`).
pub fn rss_anon_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .with_context(|| format!("{path}: no RssAnon"))
}

/// Busy and total CPU time of the whole machine so far, in seconds (from `/proc/stat`).
pub fn machine_cpu_seconds() -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat: no cpu line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        bail!("/proc/stat: short cpu line {line:?}");
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let idle = v[3] + v[4];
    let total: u64 = v[..8].iter().sum();
    let hz = clock_ticks();
    Ok(((total - idle) as f64 / hz, total as f64 / hz))
}

/// Number of CPUs this process may run on.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&v, 1.0), 1000);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 0.5), 0);
        let mut s = vec![3000, 1000, 2000];
        let l = LatencySummary::from_micros(&mut s);
        assert_eq!((l.count, l.p50_ms, l.max_ms, l.mean_ms), (3, 2.0, 3.0, 2.0));
    }

    #[test]
    fn reads_own_process_stats() {
        let pid = std::process::id();
        assert!(pid_alive(pid));
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        let (rss, peak) = rss_bytes(pid).unwrap();
        assert!(rss > 0 && peak >= rss);
        assert!(stat_fields("12 (a b) c) S 1 2").unwrap()[0] == "S");
        let (busy, total) = machine_cpu_seconds().unwrap();
        assert!(busy > 0.0 && total >= busy);
    }
}
