//! Keeps a workload's identity fresh: obtains an SVID at start, renews it at a jittered 50-70 %
//! of its lifetime, retries failures with capped exponential backoff while the still-valid
//! certificate keeps serving, and reloads the trust bundle when its file changes.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use tokio::sync::watch;

use crate::bundle::TrustBundle;
use crate::client::{CaClient, ClientError};
use crate::svid::{IdentitySummary, Svid};
use crate::tls::CurrentCert;
use crate::watch::FileWatch;
use crate::x509::CertInfo;

/// Metric names exported by the identity manager.
pub mod metric {
    /// Gauge: Unix time at which the current certificate expires.
    pub const EXPIRY_TIMESTAMP: &str = "moat_identity_cert_expiration_timestamp_seconds";
    /// Gauge: seconds left before the current certificate expires (0 when none or expired).
    pub const TIME_TO_EXPIRY: &str = "moat_identity_cert_time_to_expiry_seconds";
    /// Counter: certificate requests, by `result` (`ok` or `error`) and error `reason`.
    pub const RENEWALS: &str = "moat_identity_cert_requests_total";
    /// Counter: trust bundle reloads, by `result`.
    pub const BUNDLE_RELOADS: &str = "moat_trust_bundle_reloads_total";
}

/// Renewal and retry timing.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// First retry delay after a failure.
    pub initial_backoff: Duration,
    /// Largest retry delay.
    pub max_backoff: Duration,
    /// How often the trust bundle file is checked.
    pub bundle_poll: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            bundle_poll: Duration::from_secs(5),
        }
    }
}

/// When to renew a certificate received at `received`: after `fraction` (expected in
/// 0.5..=0.7) of the lifetime it had left then. Counting from receipt rather than from
/// `notBefore` keeps the CA's clock-skew back-dating from eating into the schedule.
pub fn renew_at(info: &CertInfo, received: SystemTime, fraction: f64) -> SystemTime {
    let left = info.not_after.duration_since(received).unwrap_or_default();
    received + left.mul_f64(fraction.clamp(0.0, 1.0))
}

/// Delay before retry number `attempt` (0-based): doubling from `initial`, capped at `max`,
/// scaled by `jitter` (expected in 0.8..=1.2), and never later than half the time left on a
/// still-valid certificate.
pub fn retry_delay(
    s: &Schedule,
    attempt: u32,
    jitter: f64,
    remaining: Option<Duration>,
) -> Duration {
    let exp = s
        .initial_backoff
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(s.max_backoff)
        .mul_f64(jitter.clamp(0.5, 1.5));
    match remaining {
        Some(r) if !r.is_zero() => exp.min(r / 2).max(Duration::from_millis(100)),
        _ => exp,
    }
}

/// Read side of the identity: what the data path and the admin endpoints use.
#[derive(Clone)]
pub struct IdentityHandle {
    /// The certificate presented in new handshakes.
    pub cert: Arc<CurrentCert>,
    /// The trust bundle peers are verified against.
    pub bundle: Arc<ArcSwap<TrustBundle>>,
    summary: watch::Receiver<Option<Arc<IdentitySummary>>>,
    not_after: Arc<ArcSwap<Option<SystemTime>>>,
}

impl IdentityHandle {
    /// The identity in use, if any.
    pub fn summary(&self) -> Option<Arc<IdentitySummary>> {
        self.summary.borrow().clone()
    }

    /// Whether a certificate is held and not expired.
    pub fn has_valid_cert(&self) -> bool {
        matches!(**self.not_after.load(), Some(t) if t > SystemTime::now())
    }

    /// Waits until a first certificate is obtained.
    pub async fn ready(&self) {
        let mut rx = self.summary.clone();
        let _ = rx.wait_for(|s| s.is_some()).await;
    }

    /// A receiver notified on every new certificate.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<IdentitySummary>>> {
        self.summary.clone()
    }
}

/// Where the manager gets certificates: [`CaClient`] (moat-ca over HTTPS) in production, a
/// fake CA in tests, so the whole lifecycle (start, rotation, CA outage, new roots) runs
/// in-process.
pub trait CertSource: Send + Sync + 'static {
    /// Requests a new SVID and, when the CA sends a different one, its trust bundle.
    fn fetch_with_bundle(&self) -> CertFuture<'_>;
}

/// What [`CertSource::fetch_with_bundle`] returns.
pub type CertFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(Svid, Option<TrustBundle>), ClientError>> + Send + 'a>>;

impl CertSource for CaClient {
    fn fetch_with_bundle(&self) -> CertFuture<'_> {
        Box::pin(CaClient::fetch_with_bundle(self))
    }
}

/// Write side: runs the renewal loop.
pub struct IdentityManager {
    client: Box<dyn CertSource>,
    provider: Arc<CryptoProvider>,
    schedule: Schedule,
    bundle_watch: Option<FileWatch>,
    cert: Arc<CurrentCert>,
    bundle: Arc<ArcSwap<TrustBundle>>,
    summary: watch::Sender<Option<Arc<IdentitySummary>>>,
    not_after: Arc<ArcSwap<Option<SystemTime>>>,
}

impl IdentityManager {
    /// Creates the manager and its read handle. `bundle_file` is watched for changes.
    pub fn new(
        client: impl CertSource,
        bundle: Arc<ArcSwap<TrustBundle>>,
        bundle_file: Option<(PathBuf, Vec<u8>)>,
        provider: Arc<CryptoProvider>,
        schedule: Schedule,
    ) -> (Self, IdentityHandle) {
        let cert = Arc::new(CurrentCert::default());
        let (tx, rx) = watch::channel(None);
        let not_after = Arc::new(ArcSwap::from_pointee(None));
        let handle = IdentityHandle {
            cert: cert.clone(),
            bundle: bundle.clone(),
            summary: rx,
            not_after: not_after.clone(),
        };
        let mgr = Self {
            client: Box::new(client),
            provider,
            schedule,
            bundle_watch: bundle_file.map(|(p, cur)| FileWatch::new(p, Some(cur))),
            cert,
            bundle,
            summary: tx,
            not_after,
        };
        (mgr, handle)
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut attempt: u32 = 0;
        let mut next = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut bundle_tick = tokio::time::interval(self.schedule.bundle_poll);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    next = tokio::time::Instant::now() + self.renew(&mut attempt).await;
                }
                _ = tick.tick() => self.report_expiry(),
                _ = bundle_tick.tick() => self.reload_bundle().await,
                _ = crate::shutdown::signalled(&mut shutdown) => return,
            }
        }
    }

    /// One renewal attempt; returns the delay before the next one.
    async fn renew(&mut self, attempt: &mut u32) -> Duration {
        match self.client.fetch_with_bundle().await {
            Ok((svid, bundle)) => match self.install(&svid) {
                Ok(()) => {
                    *attempt = 0;
                    self.adopt_ca_bundle(bundle);
                    metrics::counter!(metric::RENEWALS, "result" => "ok", "reason" => "")
                        .increment(1);
                    let at = renew_at(&svid.info, SystemTime::now(), 0.5 + 0.2 * fastrand::f64());
                    let delay = at.duration_since(SystemTime::now()).unwrap_or_default();
                    tracing::info!(
                        spiffe_id = %svid.id,
                        serial = %svid.info.serial_hex,
                        not_after = %crate::svid::rfc3339(svid.info.not_after),
                        renew_in_s = delay.as_secs_f64(),
                        "identity certificate installed"
                    );
                    delay
                }
                Err(e) => self.failed(attempt, "install", &e),
            },
            Err(e) => self.failed(attempt, e.reason(), &e),
        }
    }

    fn failed(
        &self,
        attempt: &mut u32,
        reason: &'static str,
        err: &dyn std::error::Error,
    ) -> Duration {
        metrics::counter!(metric::RENEWALS, "result" => "error", "reason" => reason).increment(1);
        let remaining = (**self.not_after.load())
            .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default());
        let delay = retry_delay(
            &self.schedule,
            *attempt,
            0.8 + 0.4 * fastrand::f64(),
            remaining,
        );
        *attempt = attempt.saturating_add(1);
        let still_valid = remaining.is_some_and(|r| !r.is_zero());
        tracing::warn!(
            error = %err,
            reason,
            attempt = *attempt,
            retry_in_s = delay.as_secs_f64(),
            serving_valid_cert = still_valid,
            "identity certificate request failed"
        );
        delay
    }

    fn install(&self, svid: &Svid) -> Result<(), crate::svid::SvidKeyError> {
        let ck = svid.certified_key(&self.provider)?;
        self.cert.set(ck);
        self.not_after.store(Arc::new(Some(svid.info.not_after)));
        self.summary
            .send_replace(Some(Arc::new(IdentitySummary::of(svid))));
        self.report_expiry();
        Ok(())
    }

    /// Without a bundle file to watch, the CA's bundle (fetched over a channel authenticated
    /// by the current one) is how new roots arrive.
    fn adopt_ca_bundle(&self, bundle: Option<TrustBundle>) {
        let Some(b) = bundle else { return };
        if self.bundle_watch.is_some() {
            return;
        }
        tracing::info!(roots = b.certs().len(), "trust bundle updated from the CA");
        metrics::counter!(metric::BUNDLE_RELOADS, "result" => "ok").increment(1);
        self.bundle.store(Arc::new(b));
    }

    fn report_expiry(&self) {
        if let Some(t) = **self.not_after.load() {
            let ts = t
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64();
            metrics::gauge!(metric::EXPIRY_TIMESTAMP).set(ts);
            let left = t
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .as_secs_f64();
            metrics::gauge!(metric::TIME_TO_EXPIRY).set(left);
        }
    }

    async fn reload_bundle(&mut self) {
        let Some(w) = self.bundle_watch.as_mut() else {
            return;
        };
        match w.poll().await {
            Ok(None) => {}
            Ok(Some(bytes)) => match TrustBundle::from_pem(&bytes) {
                Ok(b) => {
                    tracing::info!(path = %w.path().display(), roots = b.certs().len(), "trust bundle reloaded");
                    self.bundle.store(Arc::new(b));
                    metrics::counter!(metric::BUNDLE_RELOADS, "result" => "ok").increment(1);
                }
                Err(e) => {
                    tracing::error!(path = %w.path().display(), error = %e, "new trust bundle rejected; keeping the previous one");
                    metrics::counter!(metric::BUNDLE_RELOADS, "result" => "error").increment(1);
                }
            },
            Err(e) => {
                tracing::warn!(path = %w.path().display(), error = %e, "cannot read trust bundle; keeping the previous one");
                metrics::counter!(metric::BUNDLE_RELOADS, "result" => "error").increment(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Mutex;

    use crate::testcerts::{ca, leaf_params, Ca};

    const ME: &str = "spiffe://cluster.local/ns/shop/sa/web";

    /// An in-process CA: issues `lifetime`-long SVIDs from its root, fails while `down`, and
    /// hands out `new_bundle` once.
    struct FakeCa {
        root: Ca,
        lifetime: Duration,
        down: AtomicBool,
        fetches: AtomicU32,
        new_bundle: Mutex<Option<TrustBundle>>,
    }

    impl FakeCa {
        fn new(lifetime: Duration) -> Arc<Self> {
            Arc::new(Self {
                root: ca("fake moat root"),
                lifetime,
                down: AtomicBool::new(false),
                fetches: AtomicU32::new(0),
                new_bundle: Mutex::new(None),
            })
        }

        fn bundle(&self) -> TrustBundle {
            TrustBundle::from_certs(vec![self.root.der().clone()]).unwrap()
        }

        fn issue(&self) -> Result<(Svid, Option<TrustBundle>), ClientError> {
            self.fetches.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(ClientError::Timeout(Duration::from_secs(1)));
            }
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = leaf_params(&[ME]);
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::seconds(1);
            p.not_after = now + time::Duration::try_from(self.lifetime).unwrap();
            let chain = vec![p.signed_by(&key, &self.root).unwrap().der().clone()];
            let (id, info) = crate::svid::leaf_info(&chain).unwrap();
            let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
            let svid = Svid {
                chain,
                key,
                id,
                info,
            };
            Ok((svid, self.new_bundle.lock().unwrap().take()))
        }
    }

    struct Source(Arc<FakeCa>);

    impl CertSource for Source {
        fn fetch_with_bundle(&self) -> CertFuture<'_> {
            let r = self.0.issue();
            Box::pin(async move { r })
        }
    }

    /// A running manager over `fake`, fast retries; dropping the sender stops it.
    fn start(fake: &Arc<FakeCa>) -> (IdentityHandle, watch::Sender<bool>) {
        let bundle = Arc::new(ArcSwap::from_pointee(fake.bundle()));
        let schedule = Schedule {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(200),
            bundle_poll: Duration::from_secs(60),
        };
        let (mgr, handle) = IdentityManager::new(
            Source(fake.clone()),
            bundle,
            None,
            crate::tls::provider(),
            schedule,
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(mgr.run(stop_rx));
        (handle, stop_tx)
    }

    async fn within<F: Future>(what: &str, limit: Duration, f: F) -> F::Output {
        tokio::time::timeout(limit, f)
            .await
            .unwrap_or_else(|_| panic!("{what} did not happen within {limit:?}"))
    }

    #[tokio::test]
    async fn the_first_certificate_makes_the_identity_ready_and_is_presented() {
        let fake = FakeCa::new(Duration::from_secs(60));
        let (handle, _stop) = start(&fake);
        assert!(!handle.has_valid_cert(), "valid before any certificate");
        within(
            "the first certificate",
            Duration::from_secs(5),
            handle.ready(),
        )
        .await;
        assert!(handle.has_valid_cert());
        assert_eq!(handle.summary().unwrap().spiffe_id, ME);
        let presented = handle.cert.get().expect("a certificate is presented");
        assert_eq!(
            crate::x509::svid_identity(&presented.cert[0])
                .unwrap()
                .as_str(),
            ME
        );
    }

    #[tokio::test]
    async fn certificates_rotate_before_they_expire() {
        let fake = FakeCa::new(Duration::from_secs(3));
        let (handle, _stop) = start(&fake);
        let mut rx = handle.subscribe();
        within(
            "the first certificate",
            Duration::from_secs(5),
            handle.ready(),
        )
        .await;
        let first = handle.summary().unwrap().serial.clone();
        // Renewal at 50-70 % of 3 s: a new serial within about 2.1 s, the old one still valid.
        within(
            "a renewal",
            Duration::from_secs(3),
            rx.wait_for(|s| s.as_ref().is_some_and(|s| s.serial != first)),
        )
        .await
        .unwrap();
        assert!(handle.has_valid_cert(), "the renewed certificate is valid");
    }

    #[tokio::test]
    async fn during_a_ca_outage_the_valid_certificate_keeps_serving_then_readiness_drops() {
        // 6 s, of which X.509's whole seconds may cut up to one: renewal is due by 4.2 s, the
        // certificate lasts at least 5 s.
        let fake = FakeCa::new(Duration::from_secs(6));
        let (handle, _stop) = start(&fake);
        within(
            "the first certificate",
            Duration::from_secs(5),
            handle.ready(),
        )
        .await;
        let serial = handle.summary().unwrap().serial.clone();
        fake.down.store(true, Ordering::SeqCst);
        let before = fake.fetches.load(Ordering::SeqCst);

        // Past the renewal point the CA is still down: retries, and the old certificate stays.
        within("two failed renewals", Duration::from_millis(4600), async {
            while fake.fetches.load(Ordering::SeqCst) < before + 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(handle.summary().unwrap().serial, serial);
        assert!(handle.has_valid_cert(), "dropped a still-valid certificate");

        // Past expiry: no valid certificate, so readiness (which follows it) goes false.
        within("the certificate's expiry", Duration::from_secs(3), async {
            while handle.has_valid_cert() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;

        // The CA comes back: a new certificate within the capped backoff.
        fake.down.store(false, Ordering::SeqCst);
        within("recovery", Duration::from_secs(2), async {
            while !handle.has_valid_cert() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_ne!(handle.summary().unwrap().serial, serial);
    }

    #[tokio::test]
    async fn new_roots_from_the_ca_replace_the_bundle_when_no_file_is_watched() {
        let fake = FakeCa::new(Duration::from_secs(3));
        let next_root = ca("next moat root");
        let both = TrustBundle::from_certs(vec![fake.root.der().clone(), next_root.der().clone()])
            .unwrap();
        *fake.new_bundle.lock().unwrap() = Some(both);
        let (handle, _stop) = start(&fake);
        within(
            "the first certificate",
            Duration::from_secs(5),
            handle.ready(),
        )
        .await;
        assert_eq!(handle.bundle.load().certs().len(), 2);
    }

    #[tokio::test]
    async fn stopping_ends_the_renewal_loop() {
        let fake = FakeCa::new(Duration::from_secs(1));
        let (handle, stop) = start(&fake);
        within(
            "the first certificate",
            Duration::from_secs(5),
            handle.ready(),
        )
        .await;
        stop.send_replace(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after_stop = fake.fetches.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            fake.fetches.load(Ordering::SeqCst),
            after_stop,
            "still renewing after stop"
        );
    }

    fn info(lifetime: Duration) -> CertInfo {
        let nb = UNIX_EPOCH + Duration::from_secs(1_000_000);
        CertInfo {
            spiffe_id: None,
            serial_hex: String::new(),
            not_before: nb,
            not_after: nb + lifetime,
            is_ca: false,
        }
    }

    #[test]
    fn renews_between_half_and_seventy_percent() {
        let i = info(Duration::from_secs(3660));
        // Issued back-dated by 60 s: the schedule counts from receipt, not notBefore.
        let received = i.not_before + Duration::from_secs(60);
        assert_eq!(
            renew_at(&i, received, 0.5),
            received + Duration::from_secs(1800)
        );
        assert_eq!(
            renew_at(&i, received, 0.7),
            received + Duration::from_secs(2520)
        );
    }

    #[test]
    fn backoff_doubles_caps_and_respects_expiry() {
        let s = Schedule::default();
        assert_eq!(retry_delay(&s, 0, 1.0, None), Duration::from_millis(500));
        assert_eq!(retry_delay(&s, 1, 1.0, None), Duration::from_secs(1));
        assert_eq!(retry_delay(&s, 3, 1.0, None), Duration::from_secs(4));
        assert_eq!(retry_delay(&s, 30, 1.0, None), Duration::from_secs(30));
        // Ten seconds left: retry within five.
        assert_eq!(
            retry_delay(&s, 30, 1.0, Some(Duration::from_secs(10))),
            Duration::from_secs(5)
        );
        // Never a busy loop.
        assert_eq!(
            retry_delay(&s, 30, 1.0, Some(Duration::from_millis(10))),
            Duration::from_millis(100)
        );
    }
}
