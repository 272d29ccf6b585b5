//! Picking a Service's endpoint for a new connection or request: power of two choices over a
//! cost that is a latency EWMA times what is in flight (Linkerd's "P2C + peak EWMA"), so a
//! slow or failing endpoint gets less traffic without a global view.
//!
//! Opaque TCP is balanced per connection, and its latency sample is the time to dial the
//! endpoint (TCP connect and mTLS handshake; a stream over a pooled connection says nothing
//! and is not sampled). HTTP/1 and HTTP/2 (so gRPC) are balanced per request ([`requests`]),
//! and their sample is the time from sending the request to its response head. A failure is recorded as a large sample so the
//! endpoint is avoided until it answers quickly again.
//!
//! Estimates below [`FLOOR`] count as equal, and so do estimates within a factor of
//! [`SIMILAR`] of each other: differences of a few milliseconds between handshakes or answers
//! are noise on a busy node, and letting them decide would starve an endpoint whose one sample
//! came out a little slower (its estimate only moves when it is picked). Among equals, what is
//! in flight decides, then chance; only a clearly slower endpoint loses on latency.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moat_core::discovery::Endpoint;

pub(crate) mod requests;

/// How fast the estimate forgets: after this long without samples, a past peak (a slow
/// answer or a failed connect) has decayed to 37 %.
const DECAY: Duration = Duration::from_secs(10);
/// The sample recorded for a failed connect.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);
/// Estimates below this are equal (see the module docs).
const FLOOR: Duration = Duration::from_millis(5);
/// Estimates within this factor of each other are equal (see the module docs).
const SIMILAR: f64 = 2.0;
/// Most endpoints tracked; stats of endpoints gone from every Service are dropped beyond it.
const MAX_TRACKED: usize = 16_384;

#[derive(Debug)]
struct Stats {
    /// Latency estimate in nanoseconds, and when it was last updated.
    ewma: Mutex<(f64, Instant)>,
    /// Connections open to the endpoint now.
    active: AtomicU32,
}

impl Stats {
    fn new() -> Self {
        Self {
            ewma: Mutex::new((0.0, Instant::now())),
            active: AtomicU32::new(0),
        }
    }

    /// The estimate at `now`: decays toward the starting value, so an endpoint that failed
    /// once is tried again after a while instead of being starved forever.
    fn estimate(&self, now: Instant) -> f64 {
        let (ewma, at) = *self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        decayed(ewma, now.saturating_duration_since(at))
    }

    /// The estimate, never below [`FLOOR`].
    fn floored(&self, now: Instant) -> f64 {
        self.estimate(now).max(FLOOR.as_nanos() as f64)
    }

    fn cost(&self, now: Instant) -> f64 {
        self.floored(now) * f64::from(self.active.load(Ordering::Relaxed) + 1)
    }

    fn record(&self, sample: Duration, now: Instant) {
        let x = sample.as_nanos() as f64;
        let mut g = self.ewma.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(g.1);
        let old = decayed(g.0, elapsed);
        // Peak-sensitive: a slower sample replaces the estimate at once; faster ones pull it
        // down by how much time passed since the last one.
        let new = if x > old {
            x
        } else {
            // At least 30 % weight per sample, so back-to-back samples still move it.
            let w = (-elapsed.as_secs_f64() / DECAY.as_secs_f64())
                .exp()
                .min(0.7);
            old * w + x * (1.0 - w)
        };
        *g = (new, now);
    }
}

/// The estimate `elapsed` after it was last updated. It decays toward zero, not toward the
/// floor: an endpoint not picked because of one slow answer gets no new sample, so its
/// estimate must fall below [`FLOOR`] by itself for it to tie with the others again (decaying
/// toward the floor would leave it a hair above forever, never picked while the others idle).
fn decayed(ewma: f64, elapsed: Duration) -> f64 {
    ewma * (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

/// Per-endpoint load, shared by every Service that lists the endpoint.
#[derive(Debug, Default)]
pub struct Balancer {
    stats: Mutex<HashMap<SocketAddr, Arc<Stats>>>,
}

/// A chosen endpoint, counted as in flight (a connection, or an HTTP/2 request) until dropped.
#[derive(Debug)]
pub struct Pick {
    /// The endpoint.
    pub endpoint: Endpoint,
    stats: Arc<Stats>,
}

impl Pick {
    /// Records how long dialing the endpoint took (TCP connect and handshake).
    pub fn dialed(&self, took: Duration) {
        self.stats.record(took, Instant::now());
    }

    /// Records how long a request took to its response head.
    pub fn answered(&self, took: Duration) {
        self.stats.record(took, Instant::now());
    }

    /// Records a failed connect: the endpoint is avoided until it answers quickly again.
    pub fn failed(&self) {
        self.stats.record(FAILURE_PENALTY, Instant::now());
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// Picks one of `endpoints` that can be reached over the mesh (meshed, identity known,
    /// weight above 0) and is not in `tried`; `None` when none is left.
    pub fn pick(&self, endpoints: &[Endpoint], tried: &[SocketAddr]) -> Option<Pick> {
        let usable: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| e.meshed && e.identity.is_some() && e.weight > 0)
            .filter(|e| !tried.contains(&e.addr))
            .collect();
        let chosen = match usable.len() {
            0 => return None,
            1 => usable[0],
            n => {
                let a = fastrand::usize(0..n);
                let mut b = fastrand::usize(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (usable[a], usable[b]);
                let (sa, sb) = (self.stats(ea.addr), self.stats(eb.addr));
                let now = Instant::now();
                let (fa, fb) = (sa.floored(now), sb.floored(now));
                // Weights scale the load down: an endpoint of weight 2 counts as half as loaded.
                let (wa, wb) = (f64::from(ea.weight), f64::from(eb.weight));
                let a_wins = if fa.max(fb) <= SIMILAR * fa.min(fb) {
                    let load = |s: &Stats, w: f64| f64::from(s.active.load(Ordering::Relaxed)) / w;
                    // `a` is already a random choice: it wins ties.
                    load(&sa, wa) <= load(&sb, wb)
                } else {
                    sa.cost(now) / wa <= sb.cost(now) / wb
                };
                if a_wins {
                    ea
                } else {
                    eb
                }
            }
        };
        let stats = self.stats(chosen.addr);
        stats.active.fetch_add(1, Ordering::Relaxed);
        Some(Pick {
            endpoint: chosen.clone(),
            stats,
        })
    }

    fn stats(&self, addr: SocketAddr) -> Arc<Stats> {
        let mut map = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&addr) {
            // Endpoints with nothing in flight lose their history first.
            map.retain(|_, s| s.active.load(Ordering::Relaxed) > 0);
        }
        map.entry(addr)
            .or_insert_with(|| Arc::new(Stats::new()))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moat_core::SpiffeId;

    fn ep(addr: &str, meshed: bool) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            pod: None,
            identity: Some(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap()),
            meshed,
            zone: None,
            weight: 1,
        }
    }

    #[test]
    fn picks_only_reachable_untried_endpoints() {
        let b = Balancer::default();
        let mut no_identity = ep("10.0.0.3:80", true);
        no_identity.identity = None;
        let eps = vec![
            ep("10.0.0.1:80", true),
            ep("10.0.0.2:80", false),
            no_identity,
        ];
        for _ in 0..20 {
            assert_eq!(
                b.pick(&eps, &[]).unwrap().endpoint.addr,
                "10.0.0.1:80".parse().unwrap()
            );
        }
        assert!(b.pick(&eps, &["10.0.0.1:80".parse().unwrap()]).is_none());
        assert!(b.pick(&[], &[]).is_none());
    }

    #[test]
    fn spreads_over_equal_endpoints_and_avoids_a_slow_one() {
        let b = Balancer::default();
        let eps: Vec<Endpoint> = (1..=3)
            .map(|i| ep(&format!("10.0.0.{i}:80"), true))
            .collect();
        let mut counts = HashMap::new();
        for _ in 0..3000 {
            let p = b.pick(&eps, &[]).unwrap();
            p.dialed(Duration::from_micros(200));
            *counts.entry(p.endpoint.addr).or_insert(0u32) += 1;
        }
        for e in &eps {
            let n = counts[&e.addr];
            assert!((600..=1400).contains(&n), "{} got {n} of 3000", e.addr);
        }
        // One endpoint fails: P2C compares two different endpoints, so with three the failed
        // one gets nothing while the others stay fast.
        let slow = eps[0].addr;
        b.stats(slow).record(FAILURE_PENALTY, Instant::now());
        let mut to_slow = 0;
        for _ in 0..1000 {
            let p = b.pick(&eps, &[]).unwrap();
            if p.endpoint.addr == slow {
                to_slow += 1;
            } else {
                p.dialed(Duration::from_micros(200));
            }
        }
        assert_eq!(to_slow, 0);
    }

    #[test]
    fn small_differences_do_not_starve_an_endpoint_but_a_slow_one_gets_less() {
        let b = Balancer::default();
        let eps: Vec<Endpoint> = (1..=3)
            .map(|i| ep(&format!("10.0.0.{i}:80"), true))
            .collect();
        let now = Instant::now();
        // One handshake each, a little apart, as on a real network; then pooled streams only.
        for (e, ms) in eps.iter().zip([1, 4, 2]) {
            b.stats(e.addr).record(Duration::from_millis(ms), now);
        }
        let mut counts: HashMap<SocketAddr, u32> = HashMap::new();
        for _ in 0..3000 {
            *counts
                .entry(b.pick(&eps, &[]).unwrap().endpoint.addr)
                .or_default() += 1;
        }
        for e in &eps {
            let n = counts.get(&e.addr).copied().unwrap_or(0);
            assert!((600..=1400).contains(&n), "{} got {n} of 3000", e.addr);
        }
        // Ten times the floor: P2C compares two different endpoints, so with three the slowest
        // is never chosen while the others stay fast.
        b.stats(eps[1].addr).record(Duration::from_millis(50), now);
        let slow = (0..1000)
            .filter(|_| b.pick(&eps, &[]).unwrap().endpoint.addr == eps[1].addr)
            .count();
        assert_eq!(slow, 0);
    }

    #[test]
    fn a_failed_endpoint_is_forgiven_with_time() {
        let s = Stats::new();
        let t0 = Instant::now();
        s.record(FAILURE_PENALTY, t0);
        let fast = Duration::from_micros(300).as_nanos() as f64;
        assert!(s.estimate(t0) > 1000.0 * fast);
        // A minute later the penalty has all but gone: a fast endpoint's cost with a few
        // connections in flight exceeds it, so it is tried again.
        let later = s.estimate(t0 + Duration::from_secs(60));
        assert!(later < 2.0 * FLOOR.as_nanos() as f64, "{later}");
        // And a fast answer then pulls the estimate down.
        s.record(Duration::from_micros(300), t0 + Duration::from_secs(60));
        assert!(s.estimate(t0 + Duration::from_secs(60)) < later);
    }

    #[test]
    fn one_slow_answer_stops_counting_once_decayed_below_the_floor() {
        let (slow, fresh) = (Stats::new(), Stats::new());
        let t0 = Instant::now();
        slow.record(Duration::from_millis(10), t0);
        assert!(slow.cost(t0) > fresh.cost(t0));
        // 10 ms falls under the 5 ms floor after DECAY * ln 2 (about 7 s): equal again, so
        // the endpoint is picked (and sampled) again even while nothing is in flight.
        let later = t0 + DECAY;
        assert_eq!(slow.cost(later), fresh.cost(later));
    }

    #[test]
    fn a_somewhat_slower_sample_does_not_starve_an_endpoint_with_nothing_in_flight() {
        let b = Balancer::default();
        let eps = vec![ep("10.0.0.1:80", true), ep("10.0.0.2:80", true)];
        let now = Instant::now();
        b.stats(eps[0].addr).record(Duration::from_micros(800), now);
        // A handshake that took 8 ms on a busy node: within a factor of two of the floor.
        b.stats(eps[1].addr).record(Duration::from_millis(8), now);
        let picked_slower = (0..400)
            .filter(|_| b.pick(&eps, &[]).unwrap().endpoint.addr == eps[1].addr)
            .count();
        assert!(
            (120..=280).contains(&picked_slower),
            "{picked_slower} of 400"
        );
    }

    #[test]
    fn connections_in_flight_count_against_an_endpoint() {
        let b = Balancer::default();
        let eps = vec![ep("10.0.0.1:80", true), ep("10.0.0.2:80", true)];
        // Hold 10 connections on whichever comes first; the next picks go to the other.
        let first = b.pick(&eps, &[]).unwrap();
        let held: Vec<Pick> = (0..10)
            .map(|_| b.pick(std::slice::from_ref(&first.endpoint), &[]).unwrap())
            .collect();
        for _ in 0..20 {
            assert_ne!(
                b.pick(&eps, &[]).unwrap().endpoint.addr,
                first.endpoint.addr
            );
        }
        drop(held);
        drop(first);
        let total: u32 = b
            .stats
            .lock()
            .unwrap()
            .values()
            .map(|s| s.active.load(Ordering::Relaxed))
            .sum();
        assert_eq!(total, 0, "every pick is released when dropped");
    }
}
