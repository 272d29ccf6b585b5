//! Live connection tracking: for revocation (a policy change closes connections it no longer
//! allows) and for draining on shutdown (wait until in-flight work is done).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_core::spiffe::SpiffeId;
use tokio::sync::{watch, Notify};

use crate::policy::Policy;

struct Entry {
    peer: Option<SpiffeId>,
    port: u16,
    kill: Arc<Notify>,
}

/// Every live proxied connection of this process.
pub struct Registry {
    next: AtomicU64,
    authorized: Mutex<HashMap<u64, Entry>>,
    active: AtomicUsize,
    idle: Notify,
    drain_tx: watch::Sender<bool>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(1),
            authorized: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            drain_tx: watch::channel(false).0,
        }
    }
}

/// Held while a connection is being proxied; removes itself on drop.
pub struct Active {
    registry: Arc<Registry>,
}

impl Drop for Active {
    fn drop(&mut self) {
        if self.registry.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.registry.idle.notify_waiters();
        }
    }
}

/// Held by an authorized inbound stream; `revoked()` resolves when policy withdraws it.
pub struct Authorized {
    id: u64,
    registry: Arc<Registry>,
    kill: Arc<Notify>,
}

impl Authorized {
    /// Resolves when a policy reload denies this connection.
    pub async fn revoked(&self) {
        self.kill.notified().await;
    }
}

impl Drop for Authorized {
    fn drop(&mut self) {
        let mut map = self
            .registry
            .authorized
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.remove(&self.id);
    }
}

impl Registry {
    /// Counts a connection as in flight until the guard drops.
    pub fn active(self: &Arc<Self>) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active {
            registry: self.clone(),
        }
    }

    /// Records an authorized inbound stream so a later policy can revoke it.
    pub fn authorize(self: &Arc<Self>, peer: Option<&SpiffeId>, port: u16) -> Authorized {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Notify::new());
        let mut map = self.authorized.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(
            id,
            Entry {
                peer: peer.cloned(),
                port,
                kill: kill.clone(),
            },
        );
        Authorized {
            id,
            registry: self.clone(),
            kill,
        }
    }

    /// Closes every authorized connection `policy` no longer allows; returns how many.
    pub fn revoke_denied(&self, policy: &Policy) -> usize {
        let map = self.authorized.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        for e in map.values() {
            let d = policy.evaluate(e.peer.as_ref(), e.port);
            if !d.allowed() {
                // notify_one stores a permit, so a task not yet waiting still sees it.
                e.kill.notify_one();
                n += 1;
                tracing::warn!(
                    peer = e
                        .peer
                        .as_ref()
                        .map(SpiffeId::as_str)
                        .unwrap_or("unauthenticated"),
                    port = e.port,
                    rule = d.rule,
                    "closing open connection: the new policy denies it"
                );
            }
        }
        n
    }

    /// Connections in flight.
    pub fn active_count(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// A receiver that turns true when draining starts (HTTP servers then finish their
    /// in-flight requests and close).
    pub fn drain_signal(&self) -> watch::Receiver<bool> {
        self.drain_tx.subscribe()
    }

    /// Starts draining.
    pub fn start_drain(&self) {
        self.drain_tx.send_replace(true);
    }

    /// Waits until no connection is in flight, or `timeout`; returns how many remain.
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.idle.notified();
            if self.active_count() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active_count();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use moat_core::TrustDomain;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
    const PARTNER: &str = "spiffe://partner.example/ns/shop/sa/web";
    const HOUR: Duration = Duration::from_secs(3600);

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn policy(yaml: &str) -> Policy {
        let text = format!("apiVersion: moat.dev/v1\nkind: Policy\n{yaml}");
        match Policy::parse(&text, "policy.yaml", &td()) {
            Ok(p) => p,
            Err(e) => panic!("{e}\n{text}"),
        }
    }

    /// Whether the connection has been told to close, without waiting for it.
    fn is_revoked(a: &Authorized) -> bool {
        a.revoked().now_or_never().is_some()
    }

    #[test]
    fn a_reload_closes_exactly_the_connections_the_new_policy_denies() {
        let reg = Arc::new(Registry::default());
        let web_http = reg.authorize(Some(&id(WEB)), 8080);
        let web_admin = reg.authorize(Some(&id(WEB)), 9000);
        let api_http = reg.authorize(Some(&id(API)), 8080);
        let plaintext = reg.authorize(None, 8080);
        let p = policy(
            "default: deny\nrules:\n  - name: web-http\n    ports: [8080]\n    from:\n      - serviceAccount: shop/web\n",
        );
        assert_eq!(reg.revoke_denied(&p), 3);
        assert!(!is_revoked(&web_http), "the allowed connection was closed");
        // The permit is stored, so a connection that was not yet waiting still learns of it.
        for (what, a) in [
            ("another port", &web_admin),
            ("another identity", &api_http),
            ("unauthenticated", &plaintext),
        ] {
            assert!(is_revoked(a), "{what} was left open");
        }
    }

    #[tokio::test]
    async fn a_connection_already_waiting_is_woken_by_the_revocation() {
        let reg = Arc::new(Registry::default());
        let guard = reg.authorize(Some(&id(API)), 8080);
        let waiter = tokio::spawn(async move { guard.revoked().await });
        // Let the task start waiting before the policy changes.
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert_eq!(reg.revoke_denied(&policy("default: deny\n")), 1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the revocation did not wake the connection")
            .unwrap();
    }

    #[test]
    fn a_policy_that_still_allows_everything_revokes_nothing() {
        let reg = Arc::new(Registry::default());
        let guards = [
            reg.authorize(Some(&id(WEB)), 8080),
            reg.authorize(Some(&id(PARTNER)), 8080),
            reg.authorize(None, 22),
        ];
        // Audit would-denies are allowed: rolling out a policy in audit mode closes nothing.
        for p in [policy("default: allow\n"), policy("default: audit\n")] {
            assert_eq!(reg.revoke_denied(&p), 0, "{:?}", p.default_action());
        }
        assert!(guards.iter().all(|g| !is_revoked(g)));
    }

    #[test]
    fn the_builtin_policy_revokes_plaintext_and_foreign_callers() {
        let reg = Arc::new(Registry::default());
        let local = reg.authorize(Some(&id(WEB)), 8080);
        let foreign = reg.authorize(Some(&id(PARTNER)), 8080);
        let plaintext = reg.authorize(None, 8080);
        assert_eq!(reg.revoke_denied(&Policy::builtin(&td())), 2);
        assert!(!is_revoked(&local));
        assert!(is_revoked(&foreign));
        assert!(is_revoked(&plaintext));
    }

    #[test]
    fn a_finished_connection_is_forgotten() {
        let reg = Arc::new(Registry::default());
        let kept = reg.authorize(Some(&id(WEB)), 8080);
        drop(reg.authorize(Some(&id(API)), 8080));
        assert_eq!(reg.revoke_denied(&policy("default: deny\n")), 1);
        assert!(is_revoked(&kept));
    }

    #[tokio::test]
    async fn draining_waits_for_the_last_connection_or_the_deadline() {
        let reg = Arc::new(Registry::default());
        assert_eq!(reg.wait_idle(Duration::from_secs(5)).await, 0);

        let (a, b) = (reg.active(), reg.active());
        assert_eq!(reg.active_count(), 2);
        assert_eq!(reg.wait_idle(Duration::from_millis(50)).await, 2);

        drop(a);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(b);
        });
        let left = tokio::time::timeout(Duration::from_secs(5), reg.wait_idle(HOUR))
            .await
            .expect("the last connection ending did not end the wait");
        assert_eq!(left, 0);
    }

    #[test]
    fn the_drain_signal_reaches_receivers_taken_before_and_after() {
        let reg = Registry::default();
        let early = reg.drain_signal();
        assert!(!*early.borrow());
        reg.start_drain();
        assert!(*early.borrow());
        assert!(*reg.drain_signal().borrow());
    }
}
