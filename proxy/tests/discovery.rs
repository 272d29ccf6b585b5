//! The sidecar's discovery client against the real discovery API (`moat-destination`'s
//! `Api` over an index fed with pod objects), in one process, over real sockets and mutual
//! TLS: first answers, pushed changes, the server's identity pinned, state kept in outages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use moat_core::discovery::{server_identity, Resolution};
use moat_core::tls::{self, CurrentCert, SpiffeVerifier};
use moat_core::TrustDomain;
use moat_destination::api::Api;
use moat_destination::index::Index;
use moat_destination::watch::Shared;
use moat_proxy::discovery::{Resolver, Server};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

const TD: &str = "cluster.local";

type Ca = moat_e2e::pki::TestCa;

/// A CurrentCert holding an SVID for `ns/sa`, valid now.
fn leaf(ca: &Ca, ns: &str, sa: &str) -> Arc<CurrentCert> {
    ca.svid(ns, sa).unwrap()
}

fn new_ca() -> Ca {
    Ca::new(TD).unwrap()
}

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn pod(name: &str, sa: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"namespace": "shop", "name": name},
        "spec": {"serviceAccountName": sa,
                 "containers": [{"name": "app"}, {"name": "moat-proxy"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))
    .unwrap()
}

/// Serves the discovery API with `cert` as the server's SVID; returns its address, the index
/// and the switch that stops it.
async fn serve(ca: &Ca, cert: Arc<CurrentCert>) -> (SocketAddr, Shared, watch::Sender<bool>) {
    let shared = Shared::new(Index::new(td()));
    let (stop_tx, stop) = watch::channel(false);
    let verifier = SpiffeVerifier::new(ca.bundle.clone(), td(), tls::provider());
    let mut cfg = tls::mesh_server_config(cert, verifier, tls::provider()).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let api = Api::new(shared.clone(), stop.clone(), Api::default_limits());
    tokio::spawn(moat_core::https::serve(
        listener,
        Arc::new(cfg),
        Arc::new(api),
        stop,
        Duration::from_secs(1),
    ));
    (addr, shared, stop_tx)
}

fn client(ca: &Ca, server: SocketAddr) -> (Arc<Resolver>, watch::Sender<bool>) {
    let server = Server::new(
        server.to_string(),
        &td(),
        leaf(ca, "shop", "web"),
        ca.bundle.clone(),
        tls::provider(),
        Duration::from_secs(2),
    )
    .unwrap();
    let resolver = Arc::new(Resolver::default());
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(resolver.clone().run(server, stop));
    (resolver, stop_tx)
}

fn identity_of(r: Option<Arc<Resolution>>) -> Option<String> {
    match r.as_deref() {
        Some(Resolution::Pod { identity, .. }) => Some(identity.as_str().to_string()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_identities_arrive_and_follow_ip_reuse() {
    let ca = new_ca();
    assert_eq!(
        server_identity(&td()).as_str(),
        "spiffe://cluster.local/ns/moat-system/sa/moat-destination"
    );
    let (addr, shared, _stop) = serve(&ca, leaf(&ca, "moat-system", "moat-destination")).await;
    shared.update(|ix| ix.apply_pod(&pod("api-0", "api", "10.0.0.7")).unwrap());
    let (resolver, _client) = client(&ca, addr);

    let target: SocketAddr = "10.0.0.7:8080".parse().unwrap();
    let first = resolver.resolve(target, Duration::from_secs(5)).await;
    assert_eq!(
        identity_of(first).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/api")
    );
    // An address nobody knows resolves to Unknown (outbound refuses it).
    let unknown = resolver
        .resolve("10.0.0.99:80".parse().unwrap(), Duration::from_secs(5))
        .await;
    assert_eq!(unknown.as_deref(), Some(&Resolution::Unknown));

    // The IP is reused by a pod of another service account: the held watch answers, and the
    // sidecar pins the new identity, not the old one.
    let changed = Instant::now();
    shared.update(|ix| ix.apply_pod(&pod("evil-0", "evil", "10.0.0.7")).unwrap());
    loop {
        let now = identity_of(resolver.resolve(target, Duration::ZERO).await);
        if now.as_deref() == Some("spiffe://cluster.local/ns/shop/sa/evil") {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(2),
            "change not pushed within 2 s; still {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_another_identity_is_not_believed() {
    let ca = new_ca();
    // A valid SVID of the trust domain, but not the discovery service's.
    let (addr, shared, _stop) = serve(&ca, leaf(&ca, "shop", "api")).await;
    shared.update(|ix| ix.apply_pod(&pod("api-0", "api", "10.0.0.7")).unwrap());
    let (resolver, _client) = client(&ca, addr);
    let r = resolver
        .resolve(
            "10.0.0.7:8080".parse().unwrap(),
            Duration::from_millis(1500),
        )
        .await;
    assert!(r.is_none(), "answer from an impostor server: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_survive_an_outage_and_new_addresses_wait_bounded() {
    let ca = new_ca();
    let (addr, shared, stop) = serve(&ca, leaf(&ca, "moat-system", "moat-destination")).await;
    shared.update(|ix| ix.apply_pod(&pod("api-0", "api", "10.0.0.7")).unwrap());
    let (resolver, _client) = client(&ca, addr);
    let target: SocketAddr = "10.0.0.7:8080".parse().unwrap();
    assert!(identity_of(resolver.resolve(target, Duration::from_secs(5)).await).is_some());

    stop.send_replace(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        identity_of(resolver.resolve(target, Duration::ZERO).await).as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/api"),
        "the last answer stays in force while the service is down"
    );
    let started = Instant::now();
    let never = resolver
        .resolve("10.0.0.8:8080".parse().unwrap(), Duration::from_millis(400))
        .await;
    assert!(never.is_none());
    assert!(started.elapsed() < Duration::from_secs(2));
}
