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
use moat_core::x509::leaf_expiry;
use rustls::crypto::CryptoProvider;
use tokio::net::TcpStream;

use crate::bufio::BufIo;
use crate::metrics::{self as m, Direction, RefuseReason};
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
    /// Why the connection that needed this dial is refused.
    pub fn reason(&self) -> RefuseReason {
        match self {
            Self::Connect { .. } => RefuseReason::ConnectFailed,
            Self::Timeout(_) => RefuseReason::Timeout,
            Self::Handshake { reason, .. } => RefuseReason::Handshake(reason),
            Self::NoIdentity => RefuseReason::NoIdentity,
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

    /// Number of idle connections.
    #[cfg(test)]
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

/// An idle connection is stale when anything became readable: the peer closed it or sent an
/// alert. A healthy idle tunnel is silent.
fn is_stale(conn: &TlsConn) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let io = conn.get_ref().0;
    io.has_buffered() || !matches!(io.get_ref().poll_read_ready(&mut cx), Poll::Pending)
}

#[cfg(test)]
mod tests {
    //! The pool over real mTLS connections on loopback: `TlsConn` is a TLS stream over a
    //! `TcpStream`, so in-memory pipes cannot stand in for it. Certificates come from rcgen.

    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa,
        KeyPair, KeyUsagePurpose, SanType,
    };
    use rustls::sign::CertifiedKey;
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
    const DB: &str = "spiffe://cluster.local/ns/shop/sa/db";

    const HOUR: Duration = Duration::from_secs(3600);

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    /// One trust domain: its root and the bundle every sidecar trusts.
    struct Mesh {
        root: CertifiedIssuer<'static, KeyPair>,
        bundle: Arc<ArcSwap<TrustBundle>>,
        provider: Arc<CryptoProvider>,
    }

    impl Mesh {
        fn new() -> Self {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let root = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
            let bundle = TrustBundle::from_certs(vec![root.der().clone()]).unwrap();
            Self {
                root,
                bundle: Arc::new(ArcSwap::from_pointee(bundle)),
                provider: tls::provider(),
            }
        }

        /// A workload certificate for `spiffe_id` that expires `valid_for` from now.
        fn svid(&self, spiffe_id: &str, valid_for: Duration) -> Arc<CurrentCert> {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ];
            p.not_before = (SystemTime::now() - Duration::from_secs(300)).into();
            p.not_after = (SystemTime::now() + valid_for).into();
            let key = KeyPair::generate().unwrap();
            let der = p.signed_by(&key, &self.root).unwrap().der().clone();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let ck = moat_core::svid::certified_key(vec![der], key, &self.provider).unwrap();
            let cert = Arc::new(CurrentCert::default());
            cert.set(ck);
            cert
        }

        fn pool(&self, own: Arc<CurrentCert>, settings: PoolSettings) -> Pool {
            Pool::new(
                own,
                self.bundle.clone(),
                td(),
                self.provider.clone(),
                settings,
            )
        }

        /// A peer sidecar presenting `cert`. It keeps each connection open and silent until
        /// the client closes it, or, with `hang_up`, closes it right after the handshake.
        async fn peer(&self, cert: Arc<CurrentCert>, hang_up: bool) -> SocketAddr {
            let verifier = SpiffeVerifier::new(self.bundle.clone(), td(), self.provider.clone());
            let cfg = tls::mesh_server_config(cert, verifier, self.provider.clone()).unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(mut conn) = acceptor.accept(tcp).await else {
                            return;
                        };
                        if !hang_up {
                            let _ = conn.read(&mut [0u8; 1]).await;
                        }
                    });
                }
            });
            addr
        }
    }

    fn settings() -> PoolSettings {
        PoolSettings {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: HOUR,
            max_idle_per_key: 8,
            keepalive: Duration::from_secs(60),
        }
    }

    fn key(addr: SocketAddr, expected: Option<&str>) -> Key {
        Key {
            addr,
            expected: expected.map(id),
        }
    }

    async fn dial(pool: &Pool, key: &Key) -> Checkout {
        match pool.dial(key).await {
            Ok(co) => co,
            Err(e) => panic!("dial {key:?}: {e}"),
        }
    }

    /// Dials `key` and returns the connection to the pool, as a cleanly finished stream does.
    async fn pooled(pool: &Pool, key: &Key) {
        let co = dial(pool, key).await;
        pool.put(key.clone(), co.conn, co.peer, co.expires);
    }

    fn not_after(cert: &CurrentCert) -> SystemTime {
        leaf_expiry(cert.get().as_deref().map(|k: &CertifiedKey| &k.cert[..]))
    }

    #[tokio::test]
    async fn a_dial_pins_the_expected_identity_in_the_handshake() {
        let mesh = Mesh::new();
        let addr = mesh.peer(mesh.svid(API, HOUR), false).await;
        let pool = mesh.pool(mesh.svid(WEB, HOUR), settings());

        let co = dial(&pool, &key(addr, Some(API))).await;
        assert_eq!(co.peer, id(API));
        assert!(!co.reused);
        // Without a pinned identity, any identity of the trust domain answers.
        assert_eq!(dial(&pool, &key(addr, None)).await.peer, id(API));

        let err = pool
            .dial(&key(addr, Some(DB)))
            .await
            .err()
            .expect("wrong peer");
        assert_eq!(err.reason().as_str(), "wrong_identity", "{err}");
    }

    #[tokio::test]
    async fn a_pooled_connection_is_handed_out_only_for_the_key_it_was_dialed_for() {
        let mesh = Mesh::new();
        let addr = mesh.peer(mesh.svid(API, HOUR), false).await;
        let pool = mesh.pool(mesh.svid(WEB, HOUR), settings());
        let api = key(addr, Some(API));
        pooled(&pool, &api).await;

        for other in [
            key(addr, Some(DB)),
            key(addr, None),
            key(SocketAddr::from(([127, 0, 0, 1], 1)), Some(API)),
        ] {
            assert!(pool.take_idle(&other).is_none(), "{other:?}");
        }
        // Asking for another identity at the same address dials, and the peer fails the pin;
        // the connection verified as API is not offered instead.
        let err = pool
            .get(&key(addr, Some(DB)))
            .await
            .err()
            .expect("wrong peer");
        assert_eq!(err.reason().as_str(), "wrong_identity", "{err}");
        assert_eq!(pool.idle_count(), 1);

        let co = pool.get(&api).await.unwrap();
        assert!(co.reused);
        assert_eq!(co.peer, id(API));
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_idle_timeout_is_not_reused_and_is_evicted() {
        let mesh = Mesh::new();
        let addr = mesh.peer(mesh.svid(API, HOUR), false).await;
        let idle_timeout = Duration::from_millis(300);
        let pool = mesh.pool(
            mesh.svid(WEB, HOUR),
            PoolSettings {
                idle_timeout,
                ..settings()
            },
        );
        let api = key(addr, Some(API));

        pooled(&pool, &api).await;
        pool.evict_expired();
        assert_eq!(pool.idle_count(), 1, "evicted while still fresh");
        tokio::time::sleep(idle_timeout + Duration::from_millis(100)).await;
        let co = pool.get(&api).await.unwrap();
        assert!(!co.reused, "an idle-expired connection was reused");

        pooled(&pool, &api).await;
        tokio::time::sleep(idle_timeout + Duration::from_millis(100)).await;
        pool.evict_expired();
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_is_not_reused_within_the_margin_before_a_certificate_expires() {
        let mesh = Mesh::new();
        let addr = mesh.peer(mesh.svid(API, HOUR), false).await;
        let pool = mesh.pool(mesh.svid(WEB, HOUR), settings());
        let api = key(addr, Some(API));

        let co = dial(&pool, &api).await;
        let soon = SystemTime::now() + EXPIRY_MARGIN / 2;
        pool.put(api.clone(), co.conn, co.peer, soon);
        assert!(pool.take_idle(&api).is_none(), "reused 1 s before expiry");

        let co = dial(&pool, &api).await;
        pool.put(
            api.clone(),
            co.conn,
            co.peer,
            SystemTime::now() - EXPIRY_MARGIN,
        );
        assert_eq!(pool.idle_count(), 0, "an expired connection was pooled");

        let co = dial(&pool, &api).await;
        let later = SystemTime::now() + EXPIRY_MARGIN * 5;
        pool.put(api.clone(), co.conn, co.peer, later);
        let co = pool.get(&api).await.unwrap();
        assert!(co.reused);
        assert_eq!(co.expires, later);
    }

    #[tokio::test]
    async fn eviction_drops_a_connection_whose_certificate_expired_before_its_idle_timeout() {
        let mesh = Mesh::new();
        let addr = mesh.peer(mesh.svid(API, HOUR), false).await;
        let pool = mesh.pool(mesh.svid(WEB, HOUR), settings());
        let api = key(addr, Some(API));
        let co = dial(&pool, &api).await;
        let life = Duration::from_millis(300);
        pool.put(api, co.conn, co.peer, SystemTime::now() + life);
        tokio::time::sleep(life + Duration::from_millis(100)).await;
        pool.evict_expired();
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn reuse_ends_when_the_first_of_both_certificates_expires() {
        let mesh = Mesh::new();
        // The peer's certificate expires first.
        let (short, long) = (mesh.svid(API, HOUR / 2), mesh.svid(WEB, HOUR));
        let addr = mesh.peer(short.clone(), false).await;
        let pool = mesh.pool(long, settings());
        let co = dial(&pool, &key(addr, Some(API))).await;
        assert_eq!(co.expires, not_after(&short));

        // Our own certificate expires first: the server would refuse new streams after it.
        let (short, long) = (mesh.svid(WEB, HOUR / 6), mesh.svid(API, HOUR));
        let addr = mesh.peer(long, false).await;
        let pool = mesh.pool(short.clone(), settings());
        let co = dial(&pool, &key(addr, Some(API))).await;
        assert_eq!(co.expires, not_after(&short));
    }

    #[tokio::test]
    async fn idle_connections_are_capped_per_destination() {
        let mesh = Mesh::new();
        let addr = mesh.peer(mesh.svid(API, HOUR), false).await;
        let pool = mesh.pool(
            mesh.svid(WEB, HOUR),
            PoolSettings {
                max_idle_per_key: 2,
                ..settings()
            },
        );
        let (pinned, any) = (key(addr, Some(API)), key(addr, None));
        for _ in 0..3 {
            pooled(&pool, &pinned).await;
        }
        assert_eq!(pool.idle_count(), 2);
        // The cap is per key: another destination still gets its own connections kept.
        pooled(&pool, &any).await;
        assert_eq!(pool.idle_count(), 3);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_peer_has_closed_is_not_handed_out() {
        let mesh = Mesh::new();
        let quits = mesh.peer(mesh.svid(API, HOUR), true).await;
        let stays = mesh.peer(mesh.svid(API, HOUR), false).await;
        let pool = mesh.pool(mesh.svid(WEB, HOUR), settings());
        let (quits, stays) = (key(quits, Some(API)), key(stays, Some(API)));
        pooled(&pool, &quits).await;
        pooled(&pool, &stays).await;
        // Time for the peer's FIN to arrive and the reactor to see it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            pool.take_idle(&quits).is_none(),
            "a closed connection was reused"
        );
        assert!(
            pool.take_idle(&stays).is_some(),
            "a silent connection is healthy"
        );
    }

    #[tokio::test]
    async fn without_a_workload_certificate_nothing_is_dialed() {
        let mesh = Mesh::new();
        let addr = mesh.peer(mesh.svid(API, HOUR), false).await;
        let pool = mesh.pool(Arc::new(CurrentCert::default()), settings());
        let err = pool
            .get(&key(addr, Some(API)))
            .await
            .err()
            .expect("no cert");
        assert!(matches!(err, DialError::NoIdentity), "{err}");
    }
}
