//! Connection budgets: how many connections the proxy holds at once, per direction and per
//! source, with defaults derived from the container's memory limit so the proxy refuses new
//! connections before the OOM killer ends all of them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::RefuseReason;

/// Connection budgets: inbound and outbound apart, so a flood of callers can never take the
/// app's own outbound calls down with it, and a per-source share of the inbound one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Concurrent inbound connections.
    pub inbound: usize,
    /// Concurrent outbound connections.
    pub outbound: usize,
    /// Concurrent inbound connections from one source IP.
    pub per_source: usize,
}

/// Without a memory limit: the historical default.
const UNLIMITED_DEFAULT: usize = 20_000;
/// Memory kept aside for the proxy itself (code, runtime, certificates, policy).
const BASE_MEMORY: u64 = 24 << 20;
/// Budget per proxied connection: an idle one costs ~30 KiB (benches/), a busy one grows its
/// copy buffers, so this is twice the idle figure and a full budget stays below the limit.
const PER_CONNECTION_MEMORY: u64 = 64 << 10;

impl ConnLimits {
    /// The budgets from the flags, defaults derived from the memory limit (`None`: no limit).
    pub fn resolve(a: &crate::config::RunArgs, memory_limit: Option<u64>) -> Self {
        let total = match a.max_connections {
            Some(n) => n as usize,
            None => match memory_limit {
                Some(bytes) => {
                    (bytes.saturating_sub(BASE_MEMORY) / PER_CONNECTION_MEMORY).max(64) as usize
                }
                None => UNLIMITED_DEFAULT,
            },
        };
        let half = (total / 2).max(1);
        let inbound = a.max_inbound_connections.map_or(half, |n| n as usize);
        let outbound = a.max_outbound_connections.map_or(half, |n| n as usize);
        let per_source = a
            .max_connections_per_source
            .map_or((inbound / 4).max(32), |n| n as usize)
            .min(inbound);
        Self {
            inbound,
            outbound,
            per_source,
        }
    }
}

/// The container's memory limit in bytes: cgroup v2 `memory.max`, else cgroup v1
/// `memory.limit_in_bytes`; `None` when unlimited or unknown.
pub fn memory_limit() -> Option<u64> {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let v1 = || std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes").ok();
    parse_memory_limit(&v2.or_else(v1)?)
}

/// Parses a cgroup memory limit file: `max` (v2) and v1's "no limit" (a page-aligned value
/// near `i64::MAX`) mean unlimited.
fn parse_memory_limit(text: &str) -> Option<u64> {
    let n: u64 = text.trim().parse().ok()?;
    (n > 0 && n < (1 << 60)).then_some(n)
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The direction's budget is used up.
    Budget,
    /// This source IP holds its share of the inbound budget.
    PerSource,
}

impl Refusal {
    /// Why the connection is refused.
    pub fn reason(self) -> RefuseReason {
        match self {
            Refusal::Budget => RefuseReason::MaxConnections,
            Refusal::PerSource => RefuseReason::MaxConnectionsPerSource,
        }
    }
}

type SourceCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One direction's budget, optionally with a per-source share.
pub struct Budget {
    total: Arc<Semaphore>,
    per_source: Option<(usize, SourceCounts)>,
}

/// Held while a connection is open; gives its slots back on drop.
pub struct Permit {
    _total: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
}

/// One connection counted against its source IP.
struct SourceSlot {
    ip: IpAddr,
    counts: SourceCounts,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl Budget {
    /// A budget of `total` connections, at most `per_source` of them from one IP.
    pub fn new(total: usize, per_source: Option<usize>) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total)),
            per_source: per_source.map(|n| (n, SourceCounts::default())),
        }
    }

    /// Takes a slot for a connection from `source`, or says why not.
    pub fn try_admit(&self, source: IpAddr) -> Result<Permit, Refusal> {
        let source_slot = match &self.per_source {
            None => None,
            Some((cap, counts)) => {
                let ip = source.to_canonical();
                let mut m = counts.lock().unwrap_or_else(|p| p.into_inner());
                let n = m.entry(ip).or_insert(0);
                if *n >= *cap {
                    return Err(Refusal::PerSource);
                }
                *n += 1;
                Some(SourceSlot {
                    ip,
                    counts: counts.clone(),
                })
            }
        };
        // On refusal `source_slot` drops here and gives its count back.
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refusal::Budget)?;
        Ok(Permit {
            _total: total,
            _source: source_slot,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_source_share_and_total_are_enforced_and_released() {
        let b = Budget::new(3, Some(2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let c: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = b.try_admit(a).unwrap();
        let _p2 = b.try_admit(a).unwrap();
        assert_eq!(b.try_admit(a).err(), Some(Refusal::PerSource));
        // IPv4-mapped IPv6 is the same source.
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(b.try_admit(mapped).err(), Some(Refusal::PerSource));
        let _p3 = b.try_admit(c).unwrap();
        // Total used up: another source is refused, and the refusal leaks no per-source count.
        assert_eq!(b.try_admit(c).err(), Some(Refusal::Budget));
        drop(p1);
        let _p4 = b.try_admit(c).unwrap();
        assert_eq!(b.try_admit(a).err(), Some(Refusal::Budget));
    }

    #[test]
    fn memory_limit_files() {
        assert_eq!(parse_memory_limit("max\n"), None);
        assert_eq!(parse_memory_limit("268435456\n"), Some(256 << 20));
        assert_eq!(parse_memory_limit("9223372036854771712"), None);
        assert_eq!(parse_memory_limit("garbage"), None);
    }
}
