//! Shields the Kubernetes API server from the CA's callers: a [`Guarded`] verifier answers
//! repeated tokens from a cache and lets only so many TokenReviews a second through, globally
//! and per client address, so a flood of bogus tokens costs the API server at most the
//! configured rate.
//!
//! The cache is keyed by the SHA-256 of the token, never the token itself (a heap dump of the
//! CA must not hand out credentials). A verified token is remembered for at most
//! [`CacheConfig::ttl`] and never beyond its own `exp`; a refused one for
//! [`CacheConfig::negative_ttl`]. Answers that say nothing about the token (API server
//! unreachable, rate limited) are never cached.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

use crate::auth::{AuthError, TokenVerifier, Workload};
use crate::ratelimit::RateLimiter;

/// Metric names.
pub mod metric {
    /// Counter: token verifications sent to the verifier, by `result` (`authenticated`,
    /// `refused`, `error`).
    pub const REVIEWS: &str = "moat_ca_token_reviews_total";
    /// Counter: cache lookups, by `result` (`hit`, `miss`).
    pub const CACHE: &str = "moat_ca_token_cache_lookups_total";
    /// Counter: verifications refused by the TokenReview rate limit, by `scope` (`global`,
    /// `source`).
    pub const THROTTLED: &str = "moat_ca_token_reviews_throttled_total";
    /// Gauge: entries in the token cache.
    pub const CACHE_ENTRIES: &str = "moat_ca_token_cache_entries";
}

/// How verification results are cached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheConfig {
    /// Longest a verified token is remembered (never beyond its `exp`). Zero: no cache.
    pub ttl: Duration,
    /// How long a refused token is remembered. Zero: refusals are not cached.
    pub negative_ttl: Duration,
    /// Most entries held; the oldest expiring go first when full.
    pub max_entries: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
            max_entries: 10_000,
        }
    }
}

/// How many verifications reach the verifier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReviewLimits {
    /// Sustained verifications per second, all clients together.
    pub rate: f64,
    /// Burst, all clients together.
    pub burst: f64,
    /// Sustained verifications per second from one client address.
    pub per_source_rate: f64,
    /// Burst from one client address.
    pub per_source_burst: f64,
}

impl Default for ReviewLimits {
    fn default() -> Self {
        Self {
            rate: 50.0,
            burst: 100.0,
            per_source_rate: 5.0,
            per_source_burst: 20.0,
        }
    }
}

/// SHA-256 of `token`, the cache key. `None` only if the crypto provider had no SHA-256.
pub fn token_key(token: &str) -> Option<[u8; 32]> {
    let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    let hash = suite.tls13()?.common.hash_provider;
    if hash.algorithm() != rustls::crypto::hash::HashAlgorithm::SHA256 {
        return None;
    }
    hash.hash(token.as_bytes()).as_ref().try_into().ok()
}

/// The `exp` of a JWT, read without verifying it. Only used to bound how long the verifier's
/// answer for this very token is kept, so the signature is not this function's concern.
pub fn token_expiry(token: &str) -> Option<SystemTime> {
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: u64,
    }
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let exp: Exp = serde_json::from_slice(&bytes).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(exp.exp))
}

#[derive(Debug, Clone)]
struct Entry {
    until: Instant,
    result: Result<Workload, AuthError>,
}

/// Verification results by token hash.
#[derive(Debug)]
pub struct TokenCache {
    cfg: CacheConfig,
    map: Mutex<HashMap<[u8; 32], Entry>>,
}

impl TokenCache {
    /// An empty cache.
    pub fn new(cfg: CacheConfig) -> Self {
        Self {
            cfg,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// How long `result` for a token expiring at `expiry` may be kept, seen at `now`.
    pub fn ttl_for(
        &self,
        result: &Result<Workload, AuthError>,
        expiry: Option<SystemTime>,
        now: SystemTime,
    ) -> Option<Duration> {
        let ttl = match result {
            // A token without a readable expiry is not cached: nothing bounds it.
            Ok(_) => self
                .cfg
                .ttl
                .min(expiry?.duration_since(now).unwrap_or_default()),
            Err(AuthError::Unavailable(_) | AuthError::Overloaded { .. } | AuthError::Missing) => {
                return None
            }
            Err(_) => self.cfg.negative_ttl,
        };
        (!ttl.is_zero()).then_some(ttl)
    }

    /// The cached result for `key`, if still valid at `now`.
    pub fn get(&self, key: &[u8; 32], now: Instant) -> Option<Result<Workload, AuthError>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some(e) if e.until > now => Some(e.result.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers `result` for `key` for `ttl` from `now`, making room when full.
    pub fn put(
        &self,
        key: [u8; 32],
        result: Result<Workload, AuthError>,
        ttl: Duration,
        now: Instant,
    ) {
        if self.cfg.max_entries == 0 {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.cfg.max_entries && !map.contains_key(&key) {
            map.retain(|_, e| e.until > now);
            while map.len() >= self.cfg.max_entries {
                let Some(first) = map.iter().min_by_key(|(_, e)| e.until).map(|(k, _)| *k) else {
                    break;
                };
                map.remove(&first);
            }
        }
        map.insert(
            key,
            Entry {
                until: now + ttl,
                result,
            },
        );
        metrics::gauge!(metric::CACHE_ENTRIES).set(map.len() as f64);
    }

    /// Entries held (expired ones included until they are looked up or pushed out).
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A verifier behind the cache and the rate limits.
pub struct Guarded<V> {
    inner: V,
    cache: TokenCache,
    limits: ReviewLimits,
    global: RateLimiter,
    per_source: RateLimiter,
}

impl<V: TokenVerifier> Guarded<V> {
    /// Guards `inner`.
    pub fn new(inner: V, cache: CacheConfig, limits: ReviewLimits) -> Self {
        Self {
            inner,
            cache: TokenCache::new(cache),
            global: RateLimiter::new(limits.rate, limits.burst),
            per_source: RateLimiter::new(limits.per_source_rate, limits.per_source_burst),
            limits,
        }
    }

    /// The cache.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    fn throttle(&self, source: Option<IpAddr>) -> Result<(), AuthError> {
        if let Some(ip) = source {
            if let Err(wait) = self.per_source.take(&ip.to_canonical().to_string()) {
                metrics::counter!(metric::THROTTLED, "scope" => "source").increment(1);
                return Err(AuthError::Overloaded {
                    message: format!(
                        "this client address sent more than {}/s new tokens to verify (--token-review-source-rate)",
                        self.limits.per_source_rate
                    ),
                    retry_after: wait,
                });
            }
        }
        if let Err(wait) = self.global.take("") {
            metrics::counter!(metric::THROTTLED, "scope" => "global").increment(1);
            return Err(AuthError::Overloaded {
                message: format!(
                    "the CA sends at most {}/s TokenReviews to the Kubernetes API server (--token-review-rate)",
                    self.limits.rate
                ),
                retry_after: wait,
            });
        }
        Ok(())
    }

    async fn check(&self, token: &str, source: Option<IpAddr>) -> Result<Workload, AuthError> {
        let key = token_key(token);
        if let Some(hit) = key.and_then(|k| self.cache.get(&k, Instant::now())) {
            metrics::counter!(metric::CACHE, "result" => "hit").increment(1);
            return hit;
        }
        metrics::counter!(metric::CACHE, "result" => "miss").increment(1);
        self.throttle(source)?;
        let result = self.inner.verify(token).await;
        let label = match &result {
            Ok(_) => "authenticated",
            Err(AuthError::Unavailable(_)) => "error",
            Err(_) => "refused",
        };
        metrics::counter!(metric::REVIEWS, "result" => label).increment(1);
        if let Some(k) = key {
            if let Some(ttl) = self
                .cache
                .ttl_for(&result, token_expiry(token), SystemTime::now())
            {
                self.cache.put(k, result.clone(), ttl, Instant::now());
            }
        }
        result
    }
}

impl<V: TokenVerifier> TokenVerifier for Guarded<V> {
    fn verify<'a>(
        &'a self,
        token: &'a str,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Workload, AuthError>> + Send + 'a>> {
        Box::pin(self.check(token, None))
    }

    fn verify_from<'a>(
        &'a self,
        token: &'a str,
        source: Option<IpAddr>,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<Workload, AuthError>> + Send + 'a>> {
        Box::pin(self.check(token, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn web() -> Workload {
        Workload {
            namespace: "shop".into(),
            service_account: "web".into(),
            pod: Some("web-0".into()),
        }
    }

    fn jwt(exp: u64) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            b64.encode(br#"{"alg":"ES256"}"#),
            b64.encode(format!(r#"{{"exp":{exp},"sub":"x"}}"#))
        )
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn a_verified_token_is_never_cached_beyond_its_expiry() {
        let c = TokenCache::new(CacheConfig {
            ttl: 5 * MIN,
            ..CacheConfig::default()
        });
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let ok = Ok(web());
        // Expiring in 90 s: 90 s, not the 5 min TTL.
        let exp = now + Duration::from_secs(90);
        assert_eq!(
            c.ttl_for(&ok, Some(exp), now),
            Some(Duration::from_secs(90))
        );
        // Expiring in an hour: the TTL.
        assert_eq!(c.ttl_for(&ok, Some(now + 60 * MIN), now), Some(5 * MIN));
        // Already expired, or no readable expiry: not cached at all.
        assert_eq!(c.ttl_for(&ok, Some(now), now), None);
        assert_eq!(c.ttl_for(&ok, Some(now - MIN), now), None);
        assert_eq!(c.ttl_for(&ok, None, now), None);
        // The expiry is read from the token itself.
        assert_eq!(
            token_expiry(&jwt(1_800_000_090)),
            Some(UNIX_EPOCH + Duration::from_secs(1_800_000_090))
        );
        assert_eq!(token_expiry("not-a-jwt"), None);
        assert_eq!(token_expiry("a.%%%.c"), None);
    }

    #[test]
    fn refusals_are_cached_briefly_and_outages_not_at_all() {
        let c = TokenCache::new(CacheConfig::default());
        let now = SystemTime::now();
        let rejected = Err(AuthError::Rejected("no".into()));
        assert_eq!(
            c.ttl_for(&rejected, None, now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            c.ttl_for(&Err(AuthError::Unbound("x".into())), None, now),
            Some(Duration::from_secs(10))
        );
        for transient in [
            AuthError::Unavailable("down".into()),
            AuthError::Overloaded {
                message: "busy".into(),
                retry_after: Duration::from_secs(1),
            },
        ] {
            assert_eq!(c.ttl_for(&Err(transient), None, now), None);
        }
    }

    #[test]
    fn entries_expire_and_the_cache_stays_bounded() {
        let c = TokenCache::new(CacheConfig {
            max_entries: 3,
            ..CacheConfig::default()
        });
        let t0 = Instant::now();
        let key = |i: u8| [i; 32];
        c.put(key(1), Ok(web()), Duration::from_secs(10), t0);
        assert_eq!(c.get(&key(1), t0 + Duration::from_secs(9)), Some(Ok(web())));
        assert_eq!(c.get(&key(1), t0 + Duration::from_secs(10)), None);
        assert!(c.is_empty(), "an expired entry is dropped when looked up");
        for i in 1..=10u8 {
            c.put(key(i), Ok(web()), Duration::from_secs(u64::from(i)), t0);
            assert!(c.len() <= 3);
        }
        // The entries expiring soonest were pushed out.
        assert!(c.get(&key(10), t0).is_some());
        assert!(c.get(&key(8), t0).is_some());
        assert!(c.get(&key(7), t0).is_none());
    }

    #[test]
    fn the_key_is_the_sha256_of_the_token() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let got: String = token_key("abc")
            .unwrap()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, want);
    }

    /// Counts calls; accepts tokens starting with "good".
    struct Counting(Arc<AtomicUsize>);

    impl TokenVerifier for Counting {
        fn verify<'a>(
            &'a self,
            token: &'a str,
        ) -> Pin<Box<dyn std::future::Future<Output = Result<Workload, AuthError>> + Send + 'a>>
        {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if token.starts_with("good") {
                    Ok(web())
                } else {
                    Err(AuthError::Rejected("bogus".into()))
                }
            })
        }
    }

    #[tokio::test]
    async fn repeated_tokens_and_floods_do_not_reach_the_verifier() {
        let calls = Arc::new(AtomicUsize::new(0));
        let g = Guarded::new(
            Counting(calls.clone()),
            CacheConfig::default(),
            ReviewLimits {
                rate: 0.001,
                burst: 5.0,
                per_source_rate: 0.001,
                per_source_burst: 3.0,
            },
        );
        let far = (SystemTime::now() + 60 * MIN)
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let good = format!("good{}", jwt(far));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..5 {
            assert_eq!(g.verify_from(&good, Some(a)).await, Ok(web()));
            assert!(g.verify_from("bogus", Some(a)).await.is_err());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "both answers were cached");
        // Distinct bogus tokens from one address: that address's burst, then refused.
        let mut overloaded = 0;
        for i in 0..10 {
            match g.verify_from(&format!("bogus-{i}"), Some(a)).await {
                Err(AuthError::Overloaded { retry_after, .. }) => {
                    assert!(retry_after > Duration::ZERO);
                    overloaded += 1;
                }
                Err(AuthError::Rejected(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(overloaded, 9);
        // Another address has its own share, but the global burst (5) caps everyone.
        for i in 0..10 {
            let _ = g.verify_from(&format!("bogus-b{i}"), Some(b)).await;
        }
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        // Cached answers are still served while the limit holds.
        assert_eq!(g.verify_from(&good, Some(b)).await, Ok(web()));
        assert_eq!(calls.load(Ordering::SeqCst), 5);
    }
}
