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
