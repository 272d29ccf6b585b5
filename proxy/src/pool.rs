//! Outbound mTLS connections to peer sidecars: dialing with the expected identity pinned in the
//! handshake, and a pool of idle connections so new app connections skip the handshake.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use moat_core::bundle::TrustBundle;
use moat_core::spiffe::{SpiffeId, TrustDomain};
use moat_core::tls::{self, CurrentCert, SpiffeVerifier};
use rustls::crypto::CryptoProvider;
use tokio::net::TcpStream;

use crate::bufio::BufIo;
use crate::metrics::{self as m, Direction};
use crate::tunnel;

/// An established client-side mTLS connection to a peer sidecar.
pub type TlsConn = tokio_rustls::client::TlsStream<BufIo<TcpStream>>;

/// Why a peer sidecar could not be reached securely.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TCP connect or handshake took too long.
    #[error("timed out connecting to {0}")]
    Timeout(SocketAddr),
    /// The mutual-TLS handshake failed (including a peer that failed verification).
    #[error("mTLS handshake with {addr} failed ({reason}): {source}")]
    Handshake {
        /// Where.
        addr: SocketAddr,
        /// Bounded label.
        reason: &'static str,
        /// The TLS error.
        source: std::io::Error,
    },
    /// No certificate yet.
    #[error("no workload certificate yet")]
    NoIdentity,
}

impl DialError {
    /// Bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect_failed",
            Self::Timeout(_) => "timeout",
            Self::Handshake { reason, .. } => reason,
            Self::NoIdentity => "no_identity",
        }
    }
}

/// Pool key: where we dial, and which identity must answer.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Key {
    /// Peer address.
    pub addr: SocketAddr,
    /// The exact identity required, or any identity of the trust domain.
    pub expected: Option<SpiffeId>,
}

struct Idle {
    conn: TlsConn,
    peer: SpiffeId,
    since: Instant,
    expires: SystemTime,
}

/// A pooled or fresh connection, with the verified identity of the peer.
pub struct Checkout {
    /// The connection.
    pub conn: TlsConn,
    /// The peer's verified SPIFFE ID.
    pub peer: SpiffeId,
    /// Whether it came from the pool.
    pub reused: bool,
    /// When the peer's certificate expires: the connection must not carry new streams after.
    pub expires: SystemTime,
}

/// Dials and pools mTLS connections.
pub struct Pool {
    cert: Arc<CurrentCert>,
    bundle: Arc<ArcSwap<TrustBundle>>,
    trust_domain: TrustDomain,
    provider: Arc<CryptoProvider>,
    configs: Mutex<HashMap<Option<SpiffeId>, Arc<rustls::ClientConfig>>>,
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    settings: PoolSettings,
}

/// How the pool dials and keeps connections.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Deadline for TCP connect plus the mTLS handshake.
    pub connect_timeout: Duration,
    /// How long an idle connection is kept.
    pub idle_timeout: Duration,
    /// Idle connections kept per destination.
    pub max_idle_per_key: usize,
    /// TCP keepalive idle time on connections to peers (`--tcp-keepalive`).
    pub keepalive: Duration,
}

impl Pool {
    /// Creates a pool.
    pub fn new(
        cert: Arc<CurrentCert>,
        bundle: Arc<ArcSwap<TrustBundle>>,
        trust_domain: TrustDomain,
        provider: Arc<CryptoProvider>,
        settings: PoolSettings,
    ) -> Self {
        Self {
            cert,
            bundle,
            trust_domain,
            provider,
            configs: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
            settings,
        }
    }

    fn config(&self, expected: &Option<SpiffeId>) -> Result<Arc<rustls::ClientConfig>, DialError> {
        let mut map = self.configs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(expected) {
            return Ok(c.clone());
        }
        let verifier = SpiffeVerifier::new(
            self.bundle.clone(),
            self.trust_domain.clone(),
            self.provider.clone(),
        )
        .expecting(expected.clone());
        let cfg = tls::mesh_client_config(self.cert.clone(), verifier, self.provider.clone())
            .map(Arc::new)
            .map_err(|e| DialError::Handshake {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                reason: "config",
                source: std::io::Error::other(e),
            })?;
        // Bounded by the number of distinct expected identities in the configuration.
        map.insert(expected.clone(), cfg.clone());
        Ok(cfg)
    }

    /// A connection to `key`, from the pool when one is idle and healthy, else freshly dialed.
    pub async fn get(&self, key: &Key) -> Result<Checkout, DialError> {
        if let Some(idle) = self.take_idle(key) {
            metrics::counter!(m::POOL_REUSE).increment(1);
            return Ok(Checkout {
                conn: idle.conn,
                peer: idle.peer,
                reused: true,
                expires: idle.expires,
            });
        }
        self.dial(key).await
    }

    fn take_idle(&self, key: &Key) -> Option<Idle> {
        let mut map = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = map.get_mut(key)?;
        while let Some(idle) = list.pop() {
            // A pooled connection is only as good as the certificate it was authenticated
            // with: short-lived certificates must keep working as revocation.
            if idle.since.elapsed() < self.settings.idle_timeout
                && SystemTime::now() + EXPIRY_MARGIN < idle.expires
                && !is_stale(&idle.conn)
            {
                return Some(idle);
            }
        }
        None
    }

    /// A freshly dialed connection to `key`, never a pooled one (a replay must not land on
    /// the connection, hence the pod, that just refused).
    pub async fn dial(&self, key: &Key) -> Result<Checkout, DialError> {
        let Some(own) = self.cert.get() else {
            return Err(DialError::NoIdentity);
        };
        // Read before the handshake: if the certificate rotates meanwhile, the one presented is
        // newer, so this errs on the early side.
        let own_expires = leaf_expiry(Some(&own.cert));
        let cfg = self.config(&key.expected)?;
        let addr = key.addr;
        let start = Instant::now();
        let fut = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| DialError::Connect { addr, source })?;
            crate::net::tune(&tcp, Some(self.settings.keepalive));
            // SNI is off; the name only satisfies the API. Identity is checked by the verifier.
            let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
            tokio_rustls::TlsConnector::from(cfg)
                .connect(name, BufIo::new(tcp))
                .await
                .map_err(|source| DialError::Handshake {
                    addr,
                    reason: tls::failure_reason(&source),
                    source,
                })
        };
        let conn = tokio::time::timeout(self.settings.connect_timeout, fut)
            .await
            .map_err(|_| DialError::Timeout(addr))??;
        metrics::histogram!(m::CONNECT_DURATION, "direction" => "outbound")
            .record(start.elapsed().as_secs_f64());
        metrics::counter!(m::HANDSHAKES, "direction" => Direction::Outbound.as_str()).increment(1);
        // The server stops accepting streams when *our* certificate expires, and we must stop
        // trusting it when *its* certificate does: whichever comes first ends reuse.
        let expires = leaf_expiry(conn.get_ref().1.peer_certificates()).min(own_expires);
        let peer = tls::peer_identity(conn.get_ref().1.peer_certificates()).ok_or_else(|| {
            DialError::Handshake {
                addr,
                reason: "not_svid",
                source: std::io::Error::other("peer presented no SPIFFE identity"),
            }
        })?;
        Ok(Checkout {
            conn,
            peer,
            reused: false,
            expires,
        })
    }

    /// Returns a connection whose stream completed cleanly.
    pub fn put(&self, key: Key, conn: TlsConn, peer: SpiffeId, expires: SystemTime) {
        if SystemTime::now() >= expires {
            return;
        }
        let mut map = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = map.entry(key).or_default();
        if list.len() < self.settings.max_idle_per_key {
            list.push(Idle {
                conn,
                peer,
                since: Instant::now(),
                expires,
            });
        }
    }

    /// Drops idle connections past their idle timeout.
    pub fn evict_expired(&self) {
        let mut map = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let ttl = self.settings.idle_timeout;
        map.retain(|_, list| {
            let now = SystemTime::now();
            list.retain(|i| i.since.elapsed() < ttl && now < i.expires);
            !list.is_empty()
        });
    }

    /// Number of idle connections (for tests and the admin view).
    pub fn idle_count(&self) -> usize {
        let map = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        map.values().map(Vec::len).sum()
    }

    /// Home for a stream's connection: back into this pool.
    pub fn home(
        self: &Arc<Self>,
        key: Key,
        peer: SpiffeId,
        expires: SystemTime,
    ) -> tunnel::Home<TlsConn> {
        let pool = self.clone();
        Box::new(move |conn| pool.put(key, conn, peer, expires))
    }
}

/// Stop reusing a pooled connection this long before either certificate on it expires, so the
/// server side (which refuses new streams once the client's certificate has expired) never has to.
const EXPIRY_MARGIN: Duration = Duration::from_secs(2);

/// When a chain's leaf certificate expires (now, if it cannot be read: never reuse).
pub fn leaf_expiry(certs: Option<&[rustls_pki_types::CertificateDer<'_>]>) -> SystemTime {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| moat_core::x509::inspect(leaf).ok())
        .map(|i| i.not_after)
        .unwrap_or_else(SystemTime::now)
}

/// An idle connection is stale when anything became readable: the peer closed it or sent an
/// alert. A healthy idle tunnel is silent.
fn is_stale(conn: &TlsConn) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let io = conn.get_ref().0;
    io.has_buffered() || !matches!(io.get_ref().poll_read_ready(&mut cx), Poll::Pending)
}
