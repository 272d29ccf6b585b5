//! Attacks on a sidecar by holders of a valid SVID and by floods, performed against the real
//! `moat-proxy` and `moat-ca` on loopback (explicit-route mode). The same attacks against
//! captured pods (iptables, original destinations, the admin port seen from another pod) are
//! in `lab_attacks.rs`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use moat_e2e::attack::{Attacker, Outcome};
use moat_e2e::mesh::{backend, ProxyFixture, ProxyOptions};
use moat_e2e::net::{free_addr, Metrics};
use moat_e2e::{CaFixture, CaOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const REFUSED: &str = "moat_proxy_connections_refused_total";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Policy that admits `shop/web` everywhere: the attacker is an *allowed* caller, so every
/// refusal below comes from where the stream asked to go, not from who asked.
const ADMIT_WEB: &str = "apiVersion: moat.dev/v1\nkind: Policy\ndefault: deny\nrules:\n  - name: web\n    from:\n      - serviceAccount: shop/web\n";

fn refused(m: &Metrics, reason: &str) -> f64 {
    m.series(REFUSED)
        .filter(|s| s.has_labels(&[("direction", "inbound"), ("reason", reason)]))
        .map(|s| s.value)
        .sum()
}

async fn attacker(ca: &CaFixture, sa: &str) -> Attacker {
    let token = ca.write_token("shop", sa).expect("token");
    Attacker::enroll(
        &ca.url(),
        &ca.bundle_path(),
        &token,
        &ca.trust_domain().to_string(),
        "shop",
        sa,
    )
    .await
    .expect("the attacker gets a valid SVID for its own service account")
}

fn expect_reset(o: &Outcome, what: &str, reason_has: &str) {
    match o {
        Outcome::Reset { code, reason } => {
            assert_eq!(*code, 1, "{what}: reset code should be 'denied': {reason}");
            assert!(reason.contains(reason_has), "{what}: {reason}");
        }
        other => panic!("{what}: expected a RESET, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_svid_cannot_open_ports_the_sidecar_does_not_expose() {
    let ca = CaFixture::start(CaOptions::default()).unwrap();
    let app = backend::http().await;
    // A loopback-only service in the same "pod" (an admin agent, pprof...): not exposed.
    let secret = backend::echo().await;
    let mut api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api")
            .expose(&[app.port()])
            .policy(ADMIT_WEB),
    )
    .unwrap();
    let admin_port: u16 = api.admin().rsplit(':').next().unwrap().parse().unwrap();
    let mallory = attacker(&ca, "web").await;

    // Control: the attacker's tooling works, the exposed port answers.
    let ok = mallory
        .open(
            api.inbound(),
            app.port(),
            b"GET / HTTP/1.0\r\n\r\n",
            TIMEOUT,
        )
        .await
        .unwrap();
    match &ok {
        Outcome::Data(d) => assert!(
            String::from_utf8_lossy(d).contains(backend::HELLO),
            "{ok:?}"
        ),
        other => panic!("the exposed port should answer: {other:?}"),
    }

    let before = api.metrics().unwrap();
    let o = mallory
        .open(api.inbound(), secret.port(), b"steal", TIMEOUT)
        .await
        .unwrap();
    expect_reset(&o, "unexposed loopback service", "not exposed");
    // The proxy's own admin port: POST /shutdown through the tunnel would come from loopback.
    let shutdown = b"POST /shutdown HTTP/1.0\r\nContent-Length: 0\r\n\r\n";
    let o = mallory
        .open(api.inbound(), admin_port, shutdown, TIMEOUT)
        .await
        .unwrap();
    expect_reset(&o, "the proxy's admin port", "proxy's own ports");
    for port in [15001, 15006, 15020] {
        let o = mallory
            .open(api.inbound(), port, shutdown, TIMEOUT)
            .await
            .unwrap();
        expect_reset(&o, "a standard proxy port", "proxy's own ports");
    }
    // OPEN(0) means "the port I dialed": without iptables there is none.
    let o = mallory.open(api.inbound(), 0, b"x", TIMEOUT).await.unwrap();
    expect_reset(&o, "OPEN(0) in route mode", "names no port");

    let after = api.metrics().unwrap();
    assert_eq!(
        refused(&after, "port_not_exposed") - refused(&before, "port_not_exposed"),
        1.0
    );
    assert_eq!(
        refused(&after, "proxy_port") - refused(&before, "proxy_port"),
        4.0
    );
    assert_eq!(
        refused(&after, "no_destination_port") - refused(&before, "no_destination_port"),
        1.0
    );
    let logs = api.json_logs();
    let lines = moat_e2e::logs::matching(
        &logs,
        &[
            ("caller", mallory.id.as_str()),
            ("reason", "port_not_exposed"),
        ],
    );
    assert_eq!(lines.len(), 1, "one log line naming the caller: {logs:?}");
    // The sidecar is still there.
    assert!(
        api.proc().try_status().unwrap().is_none(),
        "the sidecar died"
    );
    assert!(moat_e2e::net::http_get(&api.admin(), "/ready", TIMEOUT).is_ok_and(|r| r.status == 200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_only_served_on_the_local_socket() {
    let ca = CaFixture::start(CaOptions::default()).unwrap();
    let dir = moat_e2e::temp_dir("admin-socket").unwrap();
    let socket = dir.path().join("admin.sock");
    let mut api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api").args([
            "--admin-socket".to_string(),
            socket.display().to_string(),
            "--drain-delay".into(),
            "0s".into(),
        ]),
    )
    .unwrap();
    // TCP, even from loopback (where a stream tunnelled by a peer would also come from): 403.
    let mut tcp = TcpStream::connect(api.admin()).await.unwrap();
    tcp.write_all(
        b"POST /shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut reply = String::new();
    tcp.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 403"), "{reply}");
    assert!(reply.contains("local control socket"), "{reply}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        api.proc().try_status().unwrap().is_none(),
        "TCP /shutdown stopped the sidecar"
    );

    // The Jobs use case: a container of the pod asks over the socket, and the sidecar exits.
    let curl = moat_e2e::tools::require_tool("curl");
    let out = moat_e2e::tools::run(
        &curl,
        [
            "-sS",
            "--max-time",
            "5",
            "--unix-socket",
            &socket.display().to_string(),
            "-X",
            "POST",
            "http://localhost/shutdown",
        ],
    )
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "shutting down\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = api.proc().try_status().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "the sidecar did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens `n` idle TCP connections from `source` to `to`, keeping them.
async fn hold(n: usize, source: [u8; 4], to: SocketAddr) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((source, 0))).unwrap();
        held.push(s.connect(to).await.unwrap());
    }
    held
}

/// Whether the proxy reset `s` (refused over its budget) within a second.
async fn was_reset(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read(&mut b)).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset
    )
}

/// Whether one more connection from `source` is refused: the kernel completes the handshake
/// before the proxy sees it, so the reset lands either while `connect` is still being polled
/// or on the first read.
async fn is_refused(source: [u8; 4], to: SocketAddr) -> bool {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::from((source, 0))).unwrap();
    match s.connect(to).await {
        Ok(mut stream) => was_reset(&mut stream).await,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_flood_cannot_take_the_outbound_budget() {
    let ca = CaFixture::start(CaOptions::default()).unwrap();
    let app = backend::http().await;
    let api = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "api")
            .expose(&[app.port()])
            .policy(ADMIT_WEB),
    )
    .unwrap();
    let route = free_addr();
    let api_id = ca.spiffe_id("shop", "api").unwrap().to_string();
    // web: a small inbound budget with a per-source share, its app calls api through a route.
    let web = ProxyFixture::start(
        &ca,
        ProxyOptions::new("shop", "web")
            .route(route, api.inbound(), app.port(), Some(&api_id))
            .args([
                "--max-inbound-connections",
                "8",
                "--max-outbound-connections",
                "8",
                "--max-connections-per-source",
                "5",
                // Idle callers hold their slot until detection gives up.
                "--detect-timeout",
                "30s",
            ]),
    )
    .unwrap();
    let before = web.metrics().unwrap();
    // One source takes its share; a sixth connection from it is refused...
    let mut from_one = hold(5, [127, 0, 0, 1], web.inbound()).await;
    assert!(
        is_refused([127, 0, 0, 1], web.inbound()).await,
        "per-source cap not enforced"
    );
    // ...while another source still gets in, until the whole inbound budget is held.
    let mut from_two = hold(3, [127, 0, 0, 2], web.inbound()).await;
    assert!(
        is_refused([127, 0, 0, 3], web.inbound()).await,
        "inbound budget not enforced"
    );
    for s in from_one.iter_mut().chain(from_two.iter_mut()) {
        assert!(!was_reset(s).await, "a connection within budget was reset");
    }

    // With the inbound budget full, the app's own outbound call goes through.
    let reply = tokio::task::spawn_blocking(move || {
        moat_e2e::net::http_get(&route.to_string(), "/", TIMEOUT)
    })
    .await
    .unwrap()
    .expect("the app's outbound call succeeds during the inbound flood");
    assert_eq!(reply.body, backend::HELLO);

    let after = web.metrics().unwrap();
    let delta = |reason| refused(&after, reason) - refused(&before, reason);
    assert_eq!(delta("max_connections_per_source"), 1.0);
    assert_eq!(delta("max_connections"), 1.0);
    drop((from_one, from_two));
}
