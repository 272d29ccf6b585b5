//! The mesh lab (root): pods produced by the real `moat-injector` from Kubernetes pod specs and
//! run like a kubelet would, in network namespaces on one bridge, with the real `moat-ca` and
//! `moat-proxy`. The scenarios prove, on one machine, that the mesh is transparent to apps, that
//! sniffing the node's bridge and man-in-the-middle attacks get nothing (an insider with a
//! valid certificate included, once discovery pins identities), that Services are balanced per
//! HTTP/2 request, that strangers and unlisted callers are refused, and that certificates
//! rotate without failing a request, even through a CA outage. See `moat_e2e::lab` for how pods are produced.
//!
//! The scenarios run one at a time (they share the machine's two cores and the `ip netns`
//! namespace list they check at the end).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moat_e2e::demo::TcpOutcome;
use moat_e2e::lab::{
    self, client_pod, contains, http_get_in, http_post_in, marker, pcap, server_pod, spiffe_id,
    tcp_in, tls, unmeshed, DeployOptions, LabOptions, MeshLab, PodHandle, Relay, Sniffer, Tamper,
    ADMIN_PORT, ECHO_PORT, HTTP_ALT_PORT, HTTP_PORT,
};
use moat_e2e::net::Metrics;
use moat_e2e::require_netns;
use serde_json::Value;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const HTTP_REQUESTS: &str = "moat_proxy_http_requests_total";
const REFUSED: &str = "moat_proxy_connections_refused_total";
const AUTHZ: &str = "moat_proxy_authz_decisions_total";
const HS_FAIL: &str = "moat_proxy_tls_handshake_failures_total";
const HANDSHAKES: &str = "moat_proxy_tls_handshakes_total";
const BYTES: &str = "moat_proxy_bytes_total";
const CERT_REQUESTS: &str = "moat_identity_cert_requests_total";

fn start(opts: LabOptions) -> MeshLab {
    match MeshLab::start(opts) {
        Ok(l) => l,
        Err(e) => panic!("cannot start the mesh lab: {e:#}"),
    }
}

fn deploy(lab: &mut MeshLab, pod: k8s_openapi::api::core::v1::Pod) -> PodHandle {
    deploy_with(lab, pod, DeployOptions::default())
}

fn deploy_with(
    lab: &mut MeshLab,
    pod: k8s_openapi::api::core::v1::Pod,
    opts: DeployOptions,
) -> PodHandle {
    let name = pod.metadata.name.clone().unwrap_or_default();
    match lab.deploy_with(pod, opts) {
        Ok(h) => h,
        Err(e) => panic!("cannot deploy pod {name}: {e:#}"),
    }
}

/// Tears the lab down and checks nothing is left; prints the scenario's wall time.
fn finish(lab: MeshLab, scenario: &str, started: Instant) {
    let prefix = lab.prefix().to_string();
    let t = lab.shutdown().expect("the lab tears down cleanly");
    let left: Vec<String> = moat_e2e::netns::list_namespaces()
        .expect("ip netns list")
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    eprintln!(
        "{scenario}: passed in {:.1} s (teardown stopped {} processes, removed {} namespaces)",
        started.elapsed().as_secs_f64(),
        t.stopped,
        t.namespaces
    );
}

fn metrics(p: &PodHandle) -> Metrics {
    match p.metrics() {
        Ok(m) => m,
        Err(e) => panic!("cannot scrape {}: {e:#}", p.name),
    }
}

fn value(p: &PodHandle, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics(p).value(name, labels)
}

fn logged(p: &PodHandle, fields: &[(&str, &str)]) -> Vec<Value> {
    moat_e2e::logs::matching(&p.sidecar_logs(), fields)
        .into_iter()
        .cloned()
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the injector must have done to a meshed pod, read back from the spec the lab ran.
fn check_injected(lab: &MeshLab, p: &PodHandle, has_probe: bool) {
    assert!(
        p.meshed && p.admission.patched,
        "{} was not injected",
        p.name
    );
    let spec = lab.pod_spec(p).expect("pod spec");
    let s = spec.spec.as_ref().expect("spec");
    let inits = s.init_containers.as_ref().expect("init containers");
    assert_eq!(inits[0].name, "moat-init");
    assert_eq!(inits[0].args.as_ref().expect("args")[0], "init");
    assert_eq!(inits[1].name, "moat-proxy");
    assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"));
    let env: Vec<&str> = inits[1]
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect();
    for want in [
        "MOAT_TOKEN_FILE",
        "MOAT_TRUST_BUNDLE_PEM",
        "MOAT_POLICY",
        "MOAT_MESH_NETWORKS",
        "MOAT_SERVICE_ACCOUNT",
    ] {
        assert!(env.contains(&want), "{want} missing from {env:?}");
    }
    if has_probe {
        let probe = s.containers[0]
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("readiness probe");
        assert_eq!(
            probe.path.as_deref(),
            Some("/app-health/app/readiness"),
            "the app's probe was not rewritten to the sidecar"
        );
    }
    assert_eq!(
        p.identity().expect("/identity")["spiffe_id"],
        p.spiffe_id.as_str()
    );
}

fn expect_reply(r: anyhow::Result<moat_e2e::https::Reply>, what: &str) -> moat_e2e::https::Reply {
    match r {
        Ok(r) => r,
        Err(e) => panic!("{what}: {e:#}"),
    }
}

// ---------------------------------------------------------------------------------------------

const A_TO_B_POLICY: &str = "apiVersion: moat.dev/v1
kind: Policy
default: deny
rules:
  - name: a-http
    ports: [8080]
    from:
      - serviceAccount: shop/a
  - name: a-echo
    ports: [9000]
    from:
      - serviceAccount: shop/a
";

/// Scenario 1: apps call each other by pod IP and port as if there were no mesh; HTTP and raw
/// TCP both work, and both sidecars count the traffic with the right peer identities.
#[test]
fn transparency_http_and_tcp_between_meshed_pods() {
    require_netns!();
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut lab = start(LabOptions::new("tr", [10, 81, 1]));
    lab.set_policy(A_TO_B_POLICY).expect("policy");
    let b = deploy(&mut lab, server_pod("b", "b"));
    let a = deploy(&mut lab, client_pod("a", "a"));
    check_injected(&lab, &b, true);
    check_injected(&lab, &a, false);

    // HTTP, as plain as it gets: the app dials b's IP and port.
    let r = expect_reply(
        http_get_in(&a.netns, b.addr(HTTP_PORT), "/whoami"),
        "a -> b GET",
    );
    assert_eq!((r.status, r.text().as_str()), (200, "b\n"));
    let body = "an ordinary request body, nothing mesh-specific";
    let r = expect_reply(
        http_post_in(&a.netns, b.addr(HTTP_PORT), "/echo", body),
        "a -> b POST",
    );
    assert_eq!((r.status, r.text().as_str()), (200, body));
    let app = lab.app(&b).expect("b's app");
    assert!(
        app.bodies().iter().any(|x| x == body.as_bytes()),
        "b's app did not get the body in plaintext"
    );

    // Raw TCP.
    let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let t = tcp_in(&a.netns, b.addr(ECHO_PORT), msg.clone()).expect("a -> b TCP");
    assert_eq!(t.outcome, TcpOutcome::Echoed, "{:?}", t.outcome);
    assert_eq!(app.tcp_received(), msg, "b's app got the bytes unchanged");

    // Both sidecars saw it, with each other's verified identity.
    let (am, bm) = (metrics(&a), metrics(&b));
    let (id_a, id_b) = (spiffe_id("a"), spiffe_id("b"));
    let a_out = am.value(
        HTTP_REQUESTS,
        &[
            ("direction", "outbound"),
            ("peer", &id_b),
            ("status_class", "2xx"),
        ],
    );
    let b_in = bm.value(
        HTTP_REQUESTS,
        &[
            ("direction", "inbound"),
            ("peer", &id_a),
            ("status_class", "2xx"),
        ],
    );
    assert!(
        a_out >= 2.0 && b_in >= 2.0,
        "a counted {a_out}, b counted {b_in}"
    );
    // TCP: b admitted it by the rule that names only shop/a, on port 9000.
    assert!(bm.value(AUTHZ, &[("decision", "allow"), ("rule", "a-echo")]) >= 1.0);
    assert!(bm.value(AUTHZ, &[("decision", "allow"), ("rule", "a-http")]) >= 1.0);
    let n = msg.len() as f64;
    for (who, m, dir) in [("a", &am, "outbound"), ("b", &bm, "inbound")] {
        let rx = m.value(BYTES, &[("direction", dir), ("flow", "rx")]);
        let tx = m.value(BYTES, &[("direction", dir), ("flow", "tx")]);
        assert!(
            rx >= n && tx >= n,
            "{who}'s {dir} bytes: rx {rx} tx {tx}, sent {n}"
        );
    }
    assert!(am.value(HANDSHAKES, &[("direction", "outbound")]) >= 1.0);
    assert!(bm.value(HANDSHAKES, &[("direction", "inbound")]) >= 1.0);
    assert_eq!(am.value(HS_FAIL, &[]), 0.0);
    finish(lab, "transparency", started);
}

/// Scenario 2: a sniffer on the node's bridge sees TLS 1.3 between the sidecars and never the
/// secret carried in requests and responses; a plaintext control proves the capture would see
/// it.
#[test]
fn sniffing_the_bridge_sees_only_tls() {
    require_netns!();
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut lab = start(LabOptions::new("sn", [10, 81, 2]));
    let b = deploy(&mut lab, server_pod("b", "b"));
    let a = deploy(&mut lab, client_pod("a", "a"));
    let stranger = deploy(&mut lab, unmeshed(client_pod("stranger", "stranger")));
    assert!(!stranger.meshed && !stranger.admission.patched);

    let capture_dir = lab.dir().join("capture");
    std::fs::create_dir_all(&capture_dir).expect("mkdir");
    let node = lab.node().expect("node").clone();
    let sniffer = Sniffer::start(&node, "br0", &capture_dir.join("br0.pcap")).expect("tcpdump");
    let file = sniffer.file().to_path_buf();

    let secret = marker("MOAT-SECRET");
    for i in 0..3 {
        let body = format!("card-number={secret} request #{i}");
        let r = expect_reply(
            http_post_in(&a.netns, b.addr(HTTP_PORT), "/echo", body.clone()),
            "a -> b POST",
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), body, "the secret came back in the response");
    }
    let big = format!("{secret} ").repeat(5_000);
    let r = expect_reply(
        http_post_in(&a.netns, b.addr(HTTP_PORT), "/echo", big.clone()),
        "a -> b big POST",
    );
    assert_eq!(r.body.len(), big.len());
    let tcp_msg = format!("{secret} over raw TCP\n").repeat(200);
    let t = tcp_in(&a.netns, b.addr(ECHO_PORT), tcp_msg.clone()).expect("TCP");
    assert_eq!(t.outcome, TcpOutcome::Echoed);
    assert!(contains(&t.received, secret.as_bytes()));
    // Control: an unmeshed pod's plaintext crosses the same bridge (and is refused by b).
    let control = marker("PLAINTEXT-CONTROL");
    let r = expect_reply(
        http_post_in(&stranger.netns, b.addr(HTTP_PORT), "/echo", control.clone()),
        "stranger -> b",
    );
    assert_eq!(r.status, 403);

    let bytes = sniffer.stop().expect("stop tcpdump");
    assert!(bytes.len() > 10_000, "the capture is nearly empty");
    assert!(
        contains(&bytes, control.as_bytes()),
        "the capture misses plaintext: it proves nothing"
    );
    assert!(
        !contains(&bytes, secret.as_bytes()),
        "the secret is visible on the bridge ({})",
        file.display()
    );

    let flows = pcap::tcp_flows(&bytes).expect("pcap");
    for port in [HTTP_PORT, ECHO_PORT] {
        let c2s = flows
            .iter()
            .find(|f| {
                *f.src.ip() == a.ip
                    && *f.dst.ip() == b.ip
                    && f.dst.port() == port
                    && f.saw_syn
                    && !f.data.is_empty()
            })
            .unwrap_or_else(|| panic!("no a -> b:{port} connection in the capture"));
        let s2c = flows
            .iter()
            .find(|f| f.src == c2s.dst && f.dst == c2s.src)
            .expect("the answer direction");
        for (dir, f, hello) in [
            ("a -> b", c2s, tls::CLIENT_HELLO),
            ("b -> a", s2c, tls::SERVER_HELLO),
        ] {
            assert_eq!(f.gaps, 0, "{dir}:{port}: packets missing from the capture");
            let (records, rest) = tls::records(&f.data);
            assert_eq!(rest, 0, "{dir}:{port}: bytes that are not TLS records");
            assert_eq!(
                (records[0].content_type, records[0].handshake_type),
                (tls::HANDSHAKE, Some(hello)),
                "{dir}:{port}: does not start with its hello"
            );
            let app_data = records
                .iter()
                .filter(|r| r.content_type == tls::APPLICATION_DATA && r.version == 0x0303)
                .count();
            assert!(
                app_data >= 2,
                "{dir}:{port}: {app_data} application-data records"
            );
            assert!(
                records.iter().all(|r| matches!(
                    r.content_type,
                    tls::HANDSHAKE | tls::APPLICATION_DATA | tls::CHANGE_CIPHER_SPEC
                )),
                "{dir}:{port}: unexpected record types {records:?}"
            );
            eprintln!(
                "sniffing: {dir}:{port}: {} bytes in {} TLS records, {app_data} of them encrypted application data",
                f.data.len(),
                records.len()
            );
        }
        assert!(
            contains(&c2s.data[..c2s.data.len().min(2048)], b"moat/1"),
            "the ClientHello offers ALPN moat/1"
        );
    }
    // tcpdump itself reads the file: the packets between the pods are there.
    let filter = format!("host {} and host {}", a.ip, b.ip);
    let shown = node
        .run(
            "tcpdump",
            ["-r", &file.display().to_string(), "-nn", &filter],
        )
        .expect("tcpdump -r");
    let packets = String::from_utf8_lossy(&shown.stdout).lines().count();
    assert!(
        packets > 20,
        "tcpdump -r shows {packets} packets between a and b"
    );
    eprintln!(
        "sniffing: tcpdump -r lists {packets} packets between a and b; none carries the secret"
    );
    finish(lab, "sniffing", started);
}

/// Scenario 3: an attacker takes over pod b's address (as ARP spoofing would) and (a) presents
/// a certificate from its own CA, (c) relays the TLS bytes to the real b — reading nothing and
/// breaking the connection when it alters a byte — and (b) presents a real mesh identity that
/// is not b's. Pod a's sidecar, told to expect b's identity at b's address, refuses (a) and (b).
#[test]
fn man_in_the_middle_gets_nothing() {
    require_netns!();
    let openssl = moat_e2e::tools::require_tool("openssl");
    let _one_at_a_time = serial();
    let started = Instant::now();
    let subnet = [10, 81, 3];
    let mut lab = start(LabOptions::new("mi", subnet));
    let gw = lab.gateway();
    let b = deploy(&mut lab, server_pod("b", "b"));
    let (id_b, id_attacker) = (spiffe_id("b"), spiffe_id("attacker"));
    // The injector cannot say "b's address must be b"; the lab adds MOAT_PEER_IDENTITIES.
    let a = deploy_with(
        &mut lab,
        client_pod("a", "a"),
        DeployOptions::default().expect_peer(b.ip, &id_b),
    );
    let c = deploy(&mut lab, client_pod("c", "c"));
    let rogue = deploy(&mut lab, server_pod("rogue", "attacker"));
    assert_eq!(
        rogue.identity().expect("identity")["spiffe_id"],
        id_attacker.as_str()
    );
    let mallory = lab.add_host("mallory").expect("attacker host");
    let node = lab.node().expect("node").clone();
    let target = b.addr(HTTP_PORT);
    let whoami = |p: &PodHandle| http_get_in(&p.netns, target, "/whoami");
    let r = expect_reply(whoami(&a), "baseline");
    assert_eq!(r.text(), "b\n");

    // The takeover: b moves to another address, mallory answers for b's.
    let b_new = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 200);
    b.netns
        .readdress(b.ip, b_new, lab::PREFIX_LEN, gw)
        .expect("move b");
    mallory
        .add_address(b.ip, lab::PREFIX_LEN)
        .expect("mallory takes b's address");
    for ns in [&a.netns, &c.netns, &node, &mallory] {
        ns.flush_neighbours().expect("flush");
    }

    // (a) A certificate from the attacker's own CA, claiming to be b.
    let (cert, key) = lab::forged_certificate(lab.dir(), &id_b).expect("forged certificate");
    let s_server = lab
        .spawn_host_process(
            &mallory,
            "openssl-s_server",
            &openssl,
            &[
                "s_server",
                "-4",
                "-accept",
                "8080",
                "-cert",
                &cert.display().to_string(),
                "-key",
                &key.display().to_string(),
                "-alpn",
                "moat/1",
                "-tls1_3",
                "-www",
            ],
        )
        .expect("openssl s_server");
    wait_until(
        "openssl s_server listening",
        Duration::from_secs(10),
        || {
            let p = lab.host_proc(s_server).expect("proc");
            std::fs::read_to_string(p.stdout_path()).is_ok_and(|s| s.contains("ACCEPT"))
        },
    );
    let refused = |p: &PodHandle, reason: &str| {
        value(p, HS_FAIL, &[("direction", "outbound"), ("reason", reason)])
    };
    let before = refused(&a, "untrusted_issuer");
    for attempt in 0.. {
        // The first attempt may use a's pooled connection to the real b (now a dead end).
        match whoami(&a) {
            Ok(r) => panic!(
                "a's app got an answer from the impostor: {} {}",
                r.status,
                r.text()
            ),
            Err(e) => eprintln!("mitm (a): attempt {attempt}: a's app saw: {e:#}"),
        }
        if refused(&a, "untrusted_issuer") > before {
            break;
        }
        assert!(attempt < 5, "a's sidecar never counted untrusted_issuer");
    }
    let logs = logged(&a, &[("reason", "untrusted_issuer"), ("expected", &id_b)]);
    assert!(!logs.is_empty(), "the refusal is not in a's logs");
    let s_output = |lab: &mut MeshLab| {
        let p = lab.host_proc(s_server).expect("proc");
        format!(
            "{}{}",
            std::fs::read_to_string(p.stdout_path()).unwrap_or_default(),
            p.stderr()
        )
    };
    // a's sidecar counts the refusal as it sends its alert; s_server reports the alert when it
    // gets to read it, which can be a moment later.
    let failed_handshake = |out: &str| out.contains("alert") || out.contains("ERROR");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !failed_handshake(&s_output(&mut lab)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.host_proc(s_server)
        .expect("proc")
        .terminate(Duration::from_secs(5))
        .expect("stop s_server");
    let s_out = s_output(&mut lab);
    assert!(
        failed_handshake(&s_out),
        "openssl s_server saw no failed handshake: {s_out}"
    );
    eprintln!("mitm (a): refused, untrusted_issuer; a logged: {}", logs[0]);

    // (c) Relaying to the real b (now at b_new): works end to end, the relay sees ciphertext.
    let relay = Relay::start(&mallory, &[HTTP_PORT, ECHO_PORT], b_new).expect("relay");
    let secret = marker("MOAT-SECRET");
    let r = expect_reply(whoami(&a), "a -> b through the relay");
    assert_eq!(r.text(), "b\n", "the relay reaches the real b");
    let body = format!("{secret} ").repeat(3000);
    let r = expect_reply(
        http_post_in(&a.netns, target, "/echo", body.clone()),
        "POST through the relay",
    );
    assert_eq!((r.status, r.text()), (200, body.clone()));
    let tcp_msg = format!("{secret}\n").repeat(2000).into_bytes();
    let t = tcp_in(&a.netns, b.addr(ECHO_PORT), tcp_msg.clone()).expect("TCP via relay");
    assert_eq!(t.outcome, TcpOutcome::Echoed);
    assert!(relay.connections() >= 2);
    let seen = relay.observed();
    assert!(seen.len() > 2 * body.len(), "the relay carried the traffic");
    assert!(
        !contains(&seen, secret.as_bytes()),
        "the relay read the secret"
    );
    let records = relay.records();
    assert!(records
        .iter()
        .any(|r| r.to_server && r.record.handshake_type == Some(tls::CLIENT_HELLO)));
    assert!(records
        .iter()
        .any(|r| !r.to_server && r.record.content_type == tls::APPLICATION_DATA));
    assert!(records
        .iter()
        .all(|r| r.record.content_type != tls::APPLICATION_DATA || r.record.version == 0x0303));
    eprintln!(
        "mitm (c): relayed {} bytes in {} TLS records over {} connections; the secret is not among them",
        seen.len(),
        records.len(),
        relay.connections()
    );

    // Tampering towards b: the altered request never reaches b's app.
    let app = lab.app(&b).expect("b's app");
    let bodies_before = app.bodies().len();
    relay.set_tamper(Tamper::ToServer);
    let tampered_body = format!("{secret}-tamper ").repeat(4000);
    match http_post_in(&a.netns, target, "/echo", tampered_body.clone()) {
        Ok(r) => assert!(
            r.status != 200 && !contains(&r.body, secret.as_bytes()),
            "an altered request got an answer: {} ({} bytes)",
            r.status,
            r.body.len()
        ),
        Err(e) => eprintln!("mitm (c): altered request: a's app saw {e:#}"),
    }
    assert!(relay.tampered() >= 1, "the relay altered nothing");
    let new_bodies = app.bodies();
    for got in &new_bodies[bodies_before..] {
        assert!(
            got.as_ref() == tampered_body.as_bytes(),
            "b's app received an altered body ({} bytes)",
            got.len()
        );
    }
    eprintln!(
        "mitm (c): altered request: b's app received {} complete bodies, {} requests broke off mid-body",
        new_bodies.len() - bodies_before,
        app.stats().incomplete.load(std::sync::atomic::Ordering::Relaxed)
    );
    // Tampering towards a: the altered echo never reaches a's app.
    let tampered = relay.tampered();
    relay.set_tamper(Tamper::ToClient);
    let msg: Vec<u8> = format!("{secret}-echo\n").repeat(4000).into_bytes();
    let t = tcp_in(&a.netns, b.addr(ECHO_PORT), msg.clone()).expect("TCP via tampering relay");
    assert!(relay.tampered() > tampered, "the relay altered nothing");
    assert_ne!(
        t.outcome,
        TcpOutcome::Echoed,
        "altered data was delivered as valid"
    );
    assert!(
        msg.starts_with(&t.received),
        "a's app received bytes that are not what b sent ({:?})",
        t.outcome
    );
    eprintln!(
        "mitm (c): {} altered records broke their connections; a's app got {:?} with {} intact bytes",
        relay.tampered(),
        t.outcome,
        t.received.len()
    );
    relay.set_tamper(Tamper::Off);
    drop(relay);

    // (b) A real mesh identity that is not b's, at b's address.
    mallory
        .remove_address(b.ip, lab::PREFIX_LEN)
        .expect("mallory lets go");
    rogue
        .netns
        .add_address(b.ip, lab::PREFIX_LEN)
        .expect("rogue takes b's address");
    for ns in [&a.netns, &c.netns, &node, &rogue.netns] {
        ns.flush_neighbours().expect("flush");
    }
    let rogue_app_before = lab.app(&rogue).expect("rogue app").requests();
    let before = refused(&a, "wrong_identity");
    for attempt in 0.. {
        match whoami(&a) {
            Ok(r) => panic!(
                "a's app got an answer from the rogue pod: {} {}",
                r.status,
                r.text()
            ),
            Err(e) => eprintln!("mitm (b): attempt {attempt}: a's app saw: {e:#}"),
        }
        if refused(&a, "wrong_identity") > before {
            break;
        }
        assert!(attempt < 5, "a's sidecar never counted wrong_identity");
    }
    assert_eq!(
        lab.app(&rogue).expect("rogue app").requests(),
        rogue_app_before,
        "a's request reached the rogue app"
    );
    let logs = logged(&a, &[("reason", "wrong_identity"), ("expected", &id_b)]);
    assert!(!logs.is_empty(), "the refusal is not in a's logs");
    eprintln!("mitm (b): refused, wrong_identity; a logged: {}", logs[0]);
    // Without an expected identity, c's sidecar accepts any identity of the trust domain: it
    // reaches the rogue pod, and its metrics name the attacker's identity, not b's.
    let r = expect_reply(whoami(&c), "c -> b's address");
    assert_eq!(r.text(), "rogue\n");
    assert!(
        value(
            &c,
            HTTP_REQUESTS,
            &[("direction", "outbound"), ("peer", &id_attacker)]
        ) >= 1.0
    );
    eprintln!(
        "mitm (b): note: c, without MOAT_PEER_IDENTITIES, reached the rogue pod (peer {id_attacker})"
    );
    finish(lab, "man in the middle", started);
}

/// Scenario 3b: discovery. Pod a's sidecar learns who answers at each address from the
/// discovery service, with no `MOAT_PEER_IDENTITIES`. (1) HTTP/2 requests to a Service's
/// cluster IP, all on one app connection (10 in flight), are spread over its three endpoints, and so are
/// HTTP/1 requests on two keep-alive connections; (2) an insider whose sidecar holds a valid SVID of another service
/// account takes over b's address and is refused as `wrong_identity`, logged and counted;
/// (3) once discovery says the address now belongs to that pod (IP reuse after b is gone),
/// a reaches it as its new identity; (4) an address no pod holds is refused.
#[test]
fn discovery_pins_every_identity_and_balances_services() {
    require_netns!();
    let h2load = moat_e2e::tools::require_tool("h2load");
    let _one_at_a_time = serial();
    let started = Instant::now();
    let subnet = [10, 81, 9];
    let mut lab = start(LabOptions::new("ds", subnet).with_discovery());
    let gw = lab.gateway();
    let a = deploy(&mut lab, client_pod("a", "a"));
    let b = deploy(&mut lab, server_pod("b", "b"));
    let rogue = deploy(&mut lab, server_pod("rogue", "attacker"));
    let api: Vec<PodHandle> = (1..=3)
        .map(|i| deploy(&mut lab, server_pod(&format!("api-{i}"), "api")))
        .collect();
    let (id_b, id_attacker) = (spiffe_id("b"), spiffe_id("attacker"));
    let whoami = |target| http_get_in(&a.netns, target, "/whoami");
    let r = expect_reply(whoami(b.addr(HTTP_PORT)), "baseline");
    assert_eq!(r.text(), "b\n");
    assert_eq!(
        value(&a, "moat_proxy_discovery_connected", &[]),
        1.0,
        "a's sidecar is not connected to discovery"
    );

    // (1) A Service: cluster IP 10.96.0.10:80 → the api pods' port 8080.
    let cluster_ip = Ipv4Addr::new(10, 96, 0, 10);
    let endpoints: Vec<moat_e2e::discovery::EndpointPod> = api
        .iter()
        .map(|p| moat_e2e::discovery::EndpointPod {
            name: p.name.clone(),
            ip: p.ip,
        })
        .collect();
    lab.discovery()
        .expect("discovery")
        .publish_service(lab::NAMESPACE, "api", cluster_ip, 80, HTTP_PORT, &endpoints)
        .expect("publish the Service");
    let served = |lab: &MeshLab| -> Vec<u64> {
        api.iter()
            .map(|p| lab.app(p).expect("api app").requests())
            .collect()
    };
    // HTTP/1 first, while no endpoint has a latency history (a slow moment in one phase
    // would rightly steer the next one's first picks): balanced per request, so two
    // keep-alive connections reach all three endpoints.
    let url = format!("http://{cluster_ip}/whoami");
    // Bytes from and to a's app (outbound), and the api pods' callers' (inbound, summed).
    let bytes = || -> [f64; 4] {
        let flow = |p: &PodHandle, dir: &str, flow: &str| {
            value(p, BYTES, &[("direction", dir), ("flow", flow)])
        };
        [
            flow(&a, "outbound", "rx"),
            flow(&a, "outbound", "tx"),
            api.iter().map(|p| flow(p, "inbound", "rx")).sum(),
            api.iter().map(|p| flow(p, "inbound", "tx")).sum(),
        ]
    };
    // At least: each request's head (HTTP/1 request line; HTTP/2 a 9-byte frame header) and
    // each answer's body ("api-N\n"), 300 times.
    let check_bytes = |phase: &str, before: [f64; 4], after: [f64; 4], min_rx: f64| {
        let grew: Vec<f64> = after
            .iter()
            .zip(before)
            .map(|(now, was)| now - was)
            .collect();
        assert!(
            grew[0] >= min_rx && grew[1] >= 300.0 * 6.0 && grew[2] >= min_rx && grew[3] >= 300.0 * 6.0,
            "{phase}: moat_proxy_bytes_total grew by {grew:?} (a outbound rx/tx, api inbound rx/tx)"
        );
    };
    let bytes_before = bytes();
    let before = served(&lab);
    let out = a
        .netns
        .command(&h2load)
        .args(["--h1", "-n", "300", "-c", "2", &url])
        .output()
        .expect("run h2load --h1");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("300 succeeded") && text.contains("Application protocol: http/1.1"),
        "h2load --h1: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let per_endpoint: Vec<u64> = served(&lab)
        .iter()
        .zip(&before)
        .map(|(n, b)| n - b)
        .collect();
    eprintln!("discovery: 300 HTTP/1 requests on 2 connections, per endpoint: {per_endpoint:?}");
    assert!(
        per_endpoint.iter().all(|n| *n >= 10),
        "HTTP/1 requests were not balanced per request: {per_endpoint:?}"
    );
    check_bytes("HTTP/1", bytes_before, bytes(), 300.0 * 20.0);

    // HTTP/2: balanced per request, over one app connection.
    let bytes_before = bytes();
    let before = served(&lab);
    let out = a
        .netns
        .command(&h2load)
        .args(["-n", "300", "-c", "1", "-m", "10", &url])
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("300 succeeded"),
        "h2load over one connection: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("1 total client(s)") && text.contains("Application protocol: h2c"),
        "h2load did not use one HTTP/2 connection: {text}"
    );
    let per_endpoint: Vec<u64> = served(&lab)
        .iter()
        .zip(&before)
        .map(|(n, b)| n - b)
        .collect();
    eprintln!("discovery: 300 HTTP/2 requests on one connection (10 in flight), per endpoint: {per_endpoint:?}");
    assert!(
        per_endpoint.iter().all(|n| *n >= 30),
        "HTTP/2 requests were not balanced per request: {per_endpoint:?}"
    );
    check_bytes("HTTP/2", bytes_before, bytes(), 300.0 * 9.0);
    // (2) The insider takes over b's address; discovery still (rightly) says it is b's.
    let node = lab.node().expect("node").clone();
    let b_new = Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 200);
    b.netns
        .readdress(b.ip, b_new, lab::PREFIX_LEN, gw)
        .expect("move b");
    rogue
        .netns
        .add_address(b.ip, lab::PREFIX_LEN)
        .expect("rogue takes b's address");
    for ns in [&a.netns, &node, &rogue.netns] {
        ns.flush_neighbours().expect("flush");
    }
    let refused = |reason: &str| {
        value(
            &a,
            HS_FAIL,
            &[("direction", "outbound"), ("reason", reason)],
        )
    };
    let rogue_app_before = lab.app(&rogue).expect("rogue app").requests();
    let before = refused("wrong_identity");
    for attempt in 0.. {
        match whoami(b.addr(HTTP_PORT)) {
            Ok(r) => panic!(
                "a's app got an answer from the insider: {} {}",
                r.status,
                r.text()
            ),
            Err(e) => eprintln!("discovery: takeover attempt {attempt}: a's app saw: {e:#}"),
        }
        if refused("wrong_identity") > before {
            break;
        }
        assert!(attempt < 5, "a's sidecar never counted wrong_identity");
    }
    assert_eq!(
        lab.app(&rogue).expect("rogue app").requests(),
        rogue_app_before,
        "a's request reached the insider's app"
    );
    let logs = logged(&a, &[("reason", "wrong_identity"), ("expected", &id_b)]);
    assert!(!logs.is_empty(), "the refusal is not in a's logs");
    eprintln!(
        "discovery: takeover refused, wrong_identity; a logged: {}",
        logs[0]
    );

    // (3) b is gone and its IP is reused by the other pod: refused until discovery says so,
    // then reached as the new identity (its own policy decides the rest).
    let d = lab.discovery().expect("discovery");
    d.withdraw_pod(lab::NAMESPACE, "b").expect("withdraw b");
    d.publish_pod(lab.pod_spec(&rogue).expect("rogue spec"), b.ip)
        .expect("rogue holds b's IP");
    let told = Instant::now();
    let reply = loop {
        match whoami(b.addr(HTTP_PORT)) {
            Ok(r) => break r,
            Err(e) => {
                assert!(
                    told.elapsed() < Duration::from_secs(10),
                    "the reused address was still refused 10 s after discovery changed: {e:#}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert_eq!(reply.text(), "rogue\n");
    assert!(
        value(
            &a,
            HTTP_REQUESTS,
            &[("direction", "outbound"), ("peer", &id_attacker)]
        ) >= 1.0,
        "a's metrics do not name the new identity"
    );
    eprintln!(
        "discovery: the reused address answered as {id_attacker} {:.1?} after discovery said so",
        told.elapsed()
    );

    // (4) An address no pod holds: refused, never dialed with any identity.
    let unknown_before = value(
        &a,
        REFUSED,
        &[("direction", "outbound"), ("reason", "unknown_destination")],
    );
    let nobody = SocketAddr::from((
        Ipv4Addr::new(subnet[0], subnet[1], subnet[2], 250),
        HTTP_PORT,
    ));
    assert!(whoami(nobody).is_err(), "an address no pod holds answered");
    assert!(
        value(
            &a,
            REFUSED,
            &[("direction", "outbound"), ("reason", "unknown_destination")]
        ) > unknown_before,
        "the unknown address was not refused as unknown_destination"
    );
    finish(lab, "discovery", started);
}

const PUBLIC_ALT_POLICY: &str = "apiVersion: moat.dev/v1
kind: Policy
default: deny
rules:
  - name: public-alt
    ports: [8081]
    from:
      - unauthenticated: true
  - name: mesh
    from:
      - authenticated: true
";

/// Scenario 4: an unmeshed pod's plaintext to a meshed pod is refused (strict mTLS) except on
/// the one port the policy opens to unauthenticated callers; a meshed pod never downgrades to
/// plaintext towards a pod without a sidecar.
#[test]
fn strangers_are_refused_and_nothing_downgrades() {
    require_netns!();
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut lab = start(LabOptions::new("st", [10, 81, 4]));
    let b = deploy(&mut lab, server_pod("b", "b"));
    let a = deploy(&mut lab, client_pod("a", "a"));
    let stranger = deploy(&mut lab, unmeshed(client_pod("stranger", "stranger")));
    let legacy = deploy(&mut lab, unmeshed(server_pod("legacy", "legacy")));
    assert!(!legacy.meshed && !stranger.meshed);
    let app_before = lab.app(&b).expect("app").requests();

    // Strict by default (no policy ConfigMap: the built-in policy).
    for port in [HTTP_PORT, HTTP_ALT_PORT] {
        let r = expect_reply(
            http_get_in(&stranger.netns, b.addr(port), "/whoami"),
            "stranger -> b",
        );
        assert_eq!(r.status, 403, "port {port}: {}", r.text());
        assert_eq!(r.header("x-moat-denied-by"), Some("default"));
    }
    let t = tcp_in(&stranger.netns, b.addr(ECHO_PORT), "hello?").expect("TCP");
    assert_eq!(
        t.outcome,
        TcpOutcome::Reset,
        "stranger's TCP: {:?}",
        t.outcome
    );
    assert_eq!(lab.app(&b).expect("app").requests(), app_before);
    let bm = metrics(&b);
    assert!(bm.value(AUTHZ, &[("decision", "deny"), ("rule", "default")]) >= 3.0);
    assert!(
        bm.value(
            HTTP_REQUESTS,
            &[
                ("direction", "inbound"),
                ("peer", "unauthenticated"),
                ("status_class", "4xx")
            ]
        ) >= 2.0
    );

    // The policy opens port 8081 to unauthenticated callers, and only that port.
    lab.set_policy(PUBLIC_ALT_POLICY).expect("policy");
    wait_until("8081 open to strangers", Duration::from_secs(15), || {
        http_get_in(&stranger.netns, b.addr(HTTP_ALT_PORT), "/whoami")
            .is_ok_and(|r| r.status == 200 && r.text() == "b\n")
    });
    let r = expect_reply(
        http_get_in(&stranger.netns, b.addr(HTTP_PORT), "/whoami"),
        "stranger -> b:8080",
    );
    assert_eq!(
        (r.status, r.header("x-moat-denied-by")),
        (403, Some("default"))
    );
    let t = tcp_in(&stranger.netns, b.addr(ECHO_PORT), "hello?").expect("TCP");
    assert_eq!(t.outcome, TcpOutcome::Reset);
    assert!(value(&b, AUTHZ, &[("decision", "allow"), ("rule", "public-alt")]) >= 1.0);
    let r = expect_reply(
        http_get_in(&a.netns, b.addr(HTTP_PORT), "/whoami"),
        "a -> b",
    );
    assert_eq!((r.status, r.text().as_str()), (200, "b\n"));

    // No downgrade: a's sidecar will not speak plaintext to a pod without one.
    let legacy_before = lab.app(&legacy).expect("legacy app").requests();
    let fails_before = value(&a, HS_FAIL, &[("direction", "outbound")]);
    match http_get_in(&a.netns, legacy.addr(HTTP_PORT), "/whoami") {
        Ok(r) => panic!("a reached the unmeshed pod: {} {}", r.status, r.text()),
        Err(e) => eprintln!("downgrade: a's app saw {e:#}"),
    }
    let t = tcp_in(&a.netns, legacy.addr(ECHO_PORT), "plaintext?").expect("TCP");
    assert!(
        matches!(t.outcome, TcpOutcome::Reset | TcpOutcome::Closed) && t.received.is_empty(),
        "{:?}",
        t.outcome
    );
    assert!(value(&a, HS_FAIL, &[("direction", "outbound")]) >= fails_before + 2.0);
    assert_eq!(
        lab.app(&legacy).expect("legacy app").requests(),
        legacy_before,
        "the unmeshed app received a request in plaintext"
    );
    finish(lab, "strangers and downgrade", started);
}

/// Scenario 5: with a policy admitting only `web` to `api`, web gets through, batch gets 403 or
/// a closed connection; audit mode admits batch and counts the would-deny.
#[test]
fn allow_lists_admit_only_the_listed_callers_and_audit_counts() {
    require_netns!();
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut lab = start(LabOptions::new("al", [10, 81, 5]));
    lab.set_policy(moat_e2e::demo::API_POLICY).expect("policy");
    let api = deploy(&mut lab, server_pod("api", "api"));
    let web = deploy(&mut lab, client_pod("web", "web"));
    let batch = deploy(&mut lab, client_pod("batch", "batch"));
    let (id_web, id_batch) = (spiffe_id("web"), spiffe_id("batch"));

    let r = expect_reply(
        http_get_in(&web.netns, api.addr(HTTP_PORT), "/orders/7"),
        "web",
    );
    assert_eq!(r.status, 200);
    assert!(r.text().contains("\"id\":7,"), "{}", r.text());
    let t = tcp_in(&web.netns, api.addr(ECHO_PORT), "web's bytes").expect("TCP");
    assert_eq!(t.outcome, TcpOutcome::Echoed);

    let r = expect_reply(
        http_get_in(&batch.netns, api.addr(HTTP_PORT), "/orders/7"),
        "batch",
    );
    assert_eq!(
        (r.status, r.header("x-moat-denied-by")),
        (403, Some("default"))
    );
    let t = tcp_in(&batch.netns, api.addr(ECHO_PORT), "batch's bytes").expect("TCP");
    assert!(
        matches!(t.outcome, TcpOutcome::Reset | TcpOutcome::Closed) && t.received.is_empty(),
        "batch's TCP: {:?}",
        t.outcome
    );
    let m = metrics(&api);
    assert!(
        m.value(
            AUTHZ,
            &[("decision", "allow"), ("rule", moat_e2e::demo::ALLOW_RULE)]
        ) >= 2.0
    );
    assert!(m.value(AUTHZ, &[("decision", "deny"), ("rule", "default")]) >= 2.0);
    assert!(
        m.value(
            HTTP_REQUESTS,
            &[
                ("direction", "inbound"),
                ("peer", &id_web),
                ("status_class", "2xx")
            ]
        ) >= 1.0
    );
    assert!(
        m.value(
            HTTP_REQUESTS,
            &[
                ("direction", "inbound"),
                ("peer", &id_batch),
                ("status_class", "4xx")
            ]
        ) >= 1.0
    );
    assert!(!logged(&api, &[("caller", &id_batch), ("rule", "default")]).is_empty());

    // Audit: batch is admitted, and the would-deny is counted.
    let audit = moat_e2e::demo::API_POLICY.replace("default: deny", "default: audit");
    lab.set_policy(&audit).expect("policy");
    wait_until("audit mode admits batch", Duration::from_secs(15), || {
        http_get_in(&batch.netns, api.addr(HTTP_PORT), "/orders/8")
            .is_ok_and(|r| r.status == 200 && r.text().contains("\"id\":8,"))
    });
    let t = tcp_in(&batch.netns, api.addr(ECHO_PORT), "batch's bytes").expect("TCP");
    assert_eq!(t.outcome, TcpOutcome::Echoed);
    let m = metrics(&api);
    assert!(m.value(AUTHZ, &[("decision", "audit_deny"), ("rule", "default")]) >= 2.0);
    assert!(
        !logged(
            &api,
            &[("caller", &id_batch), ("message", "audit: would deny")]
        )
        .is_empty(),
        "the would-deny is not in api's logs"
    );
    let r = expect_reply(
        http_get_in(&web.netns, api.addr(HTTP_PORT), "/orders/9"),
        "web",
    );
    assert_eq!(r.status, 200);
    finish(lab, "allow lists", started);
}

#[derive(Debug, Default)]
struct Steady {
    ok: usize,
    failures: Vec<String>,
}

/// Scenario 6: with 1-minute certificates and steady traffic, certificates rotate without a
/// failed request; with the CA stopped, traffic keeps flowing on valid certificates while
/// renewals fail; when the CA returns, renewal resumes.
#[test]
fn rotation_and_ca_outage_fail_no_request() {
    require_netns!();
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut lab = start(LabOptions::new("ro", [10, 81, 6]).cert_ttl("1m"));
    let b = deploy(&mut lab, server_pod("b", "b"));
    let a = deploy(&mut lab, client_pod("a", "a"));
    let ident = b.identity().expect("identity");
    let life = |v: &Value| -> Option<i64> {
        let p = |k: &str| {
            time::OffsetDateTime::parse(
                v[k].as_str()?,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()
        };
        Some((p("not_after")? - p("not_before")?).whole_seconds())
    };
    let secs = life(&ident).expect("validity in /identity");
    assert!(
        (55..=130).contains(&secs),
        "certificate lifetime {secs} s: {ident}"
    );
    let serials = |who: &[&PodHandle]| -> Vec<String> {
        who.iter().map(|p| p.serial().expect("serial")).collect()
    };
    let s0 = serials(&[&a, &b]);

    // Steady traffic from a's app: an HTTP request every 100 ms on a fresh connection, a TCP
    // echo every 500 ms, and every 2 s a burst of concurrent requests, growing each time, so
    // that a's sidecar must dial new mTLS connections (fresh handshakes with whatever
    // certificates are current) rather than only reuse pooled ones.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let (http_to, tcp_to) = (b.addr(HTTP_PORT), b.addr(ECHO_PORT));
        lab::spawn_in(&a.netns, move || async move {
            let mut s = Steady::default();
            let mut i = 0u64;
            let mut bursts = 0usize;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                if i % 20 == 0 {
                    bursts += 1;
                    let tasks: Vec<_> = (0..2 * bursts + 4)
                        .map(|_| {
                            tokio::spawn(lab::http_request(
                                http_to,
                                http::Method::GET,
                                "/whoami",
                                bytes::Bytes::new(),
                                Duration::from_secs(5),
                            ))
                        })
                        .collect();
                    for t in tasks {
                        match t.await {
                            Ok(Ok(r)) if r.status == 200 && r.text() == "b\n" => s.ok += 1,
                            Ok(Ok(r)) => s
                                .failures
                                .push(format!("burst #{bursts}: HTTP {}", r.status)),
                            Ok(Err(e)) => s.failures.push(format!("burst #{bursts}: {e:#}")),
                            Err(e) => s.failures.push(format!("burst #{bursts}: task {e}")),
                        }
                    }
                }
                let t0 = Instant::now();
                match lab::http_request(
                    http_to,
                    http::Method::GET,
                    "/whoami",
                    bytes::Bytes::new(),
                    Duration::from_secs(5),
                )
                .await
                {
                    Ok(r) if r.status == 200 && r.text() == "b\n" => s.ok += 1,
                    Ok(r) => s.failures.push(format!("#{i}: HTTP {}", r.status)),
                    Err(e) => s.failures.push(format!("#{i}: {e:#}")),
                }
                if i % 5 == 0 {
                    let msg = format!("steady #{i}").into_bytes();
                    let t = lab::tcp_roundtrip(tcp_to, msg, Duration::from_secs(5)).await;
                    match t.outcome {
                        TcpOutcome::Echoed => s.ok += 1,
                        o => s.failures.push(format!("#{i}: TCP {o:?}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100).saturating_sub(t0.elapsed())).await;
            }
            Ok(s)
        })
    };

    // 1. Rotation with the CA up (renewal at 50-70 % of the lifetime).
    wait_until("both certificates rotated", Duration::from_secs(80), || {
        let s = serials(&[&a, &b]);
        s[0] != s0[0] && s[1] != s0[1]
    });
    let t_rotated = started.elapsed();
    let s1 = serials(&[&a, &b]);
    let dialed_at_rotation = value(&a, HANDSHAKES, &[("direction", "outbound")]);

    // 2. Outage: the CA stops; the next renewals fail, traffic does not.
    lab.stop_ca().expect("stop the CA");
    let t_stopped = started.elapsed();
    wait_until(
        "renewals fail while the CA is down",
        Duration::from_secs(70),
        || {
            [&a, &b]
                .iter()
                .all(|p| value(p, CERT_REQUESTS, &[("result", "error")]) >= 1.0)
        },
    );
    let t_failed = started.elapsed();
    assert_eq!(
        serials(&[&a, &b]),
        s1,
        "a certificate was renewed without a CA"
    );
    let dialed_in_outage = value(&a, HANDSHAKES, &[("direction", "outbound")]);
    assert!(
        dialed_in_outage > dialed_at_rotation,
        "no new mTLS connection was made with the rotated certificates"
    );
    assert!(
        a.ready() && b.ready(),
        "a sidecar went unready during the outage"
    );

    // 3. The CA returns: renewal resumes.
    lab.start_ca().expect("restart the CA");
    wait_until(
        "renewal after the CA returned",
        Duration::from_secs(45),
        || {
            let s = serials(&[&a, &b]);
            s[0] != s1[0] && s[1] != s1[1]
        },
    );
    let t_renewed = started.elapsed();
    let dialed_at_renewal = value(&a, HANDSHAKES, &[("direction", "outbound")]);
    wait_until(
        "new mTLS connections with the renewed certificates",
        Duration::from_secs(10),
        || value(&a, HANDSHAKES, &[("direction", "outbound")]) > dialed_at_renewal,
    );
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let steady = traffic
        .join()
        .expect("traffic thread")
        .expect("traffic ran");
    eprintln!(
        "rotation: rotated at {:.0} s, CA stopped at {:.0} s, renewals failing by {:.0} s, renewed after restart at {:.0} s; {} exchanges ok",
        t_rotated.as_secs_f64(),
        t_stopped.as_secs_f64(),
        t_failed.as_secs_f64(),
        t_renewed.as_secs_f64(),
        steady.ok
    );
    assert!(
        steady.failures.is_empty(),
        "{} of {} exchanges failed: {:?}",
        steady.failures.len(),
        steady.ok + steady.failures.len(),
        &steady.failures[..steady.failures.len().min(5)]
    );
    assert!(steady.ok > 300, "only {} exchanges", steady.ok);
    for p in [&a, &b] {
        assert!(value(p, CERT_REQUESTS, &[("result", "ok")]) >= 3.0);
        assert_eq!(
            value(p, HS_FAIL, &[]),
            0.0,
            "{} counted failed handshakes",
            p.name
        );
    }
    eprintln!(
        "rotation: a made {} outbound handshakes, b accepted {}, a reused pooled tunnels {} times",
        value(&a, HANDSHAKES, &[("direction", "outbound")]),
        value(&b, HANDSHAKES, &[("direction", "inbound")]),
        value(&a, "moat_proxy_tunnel_reuses_total", &[])
    );
    finish(lab, "rotation and outage", started);
}

/// Regression: a pooled mTLS tunnel between two sidecars must not carry new app connections
/// after the certificates it was authenticated with have expired, however busy it is —
/// otherwise short-lived certificates stop being a revocation mechanism for busy peers.
#[test]
fn pooled_tunnels_do_not_outlive_their_certificates() {
    require_netns!();
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut lab = start(LabOptions::new("tl", [10, 81, 7]).cert_ttl("10s"));
    let b = deploy(&mut lab, server_pod("b", "b"));
    let a = deploy(&mut lab, client_pod("a", "a"));
    let not_after = |p: &PodHandle| {
        let v = p.identity().expect("identity");
        time::OffsetDateTime::parse(
            v["not_after"].as_str().expect("not_after"),
            &time::format_description::well_known::Rfc3339,
        )
        .expect("RFC 3339")
    };
    let expiry = not_after(&a).min(not_after(&b));
    let until = expiry + time::Duration::seconds(3);
    let mut requests = 0;
    while time::OffsetDateTime::now_utc() < until {
        let r = expect_reply(
            http_get_in(&a.netns, b.addr(HTTP_PORT), "/whoami"),
            "a -> b",
        );
        assert_eq!(r.status, 200);
        requests += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let handshakes = value(&a, HANDSHAKES, &[("direction", "outbound")]);
    let reuses = value(&a, "moat_proxy_tunnel_reuses_total", &[]);
    assert!(
        handshakes >= 2.0,
        "{requests} app connections over {:.0} s rode {handshakes} mTLS connection(s) ({reuses} reuses); \
         the first certificates expired at {expiry}, 3 s before the last request, yet no new handshake happened",
        started.elapsed().as_secs_f64()
    );
    finish(lab, "tunnel lifetime", started);
}

/// A TCP echo server bound to `addr` inside `ns` for `lifetime` (a service the pod exposes
/// only on loopback, or a neighbour's listener); the counter says how many connections it
/// accepted.
fn echo_server_in(
    ns: &moat_e2e::netns::Netns,
    addr: std::net::SocketAddr,
    lifetime: Duration,
) -> Arc<std::sync::atomic::AtomicUsize> {
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let _detached = lab::spawn_in(ns, move || async move {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind(addr).await;
        let _ = tx.send(l.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        let l = l?;
        let _ = tokio::time::timeout(lifetime, async {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        })
        .await;
        Ok(())
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => accepted,
        other => panic!("echo server on {addr}: {other:?}"),
    }
}

#[test]
fn a_compromised_pod_reaches_only_what_it_dialed() {
    use moat_e2e::attack::{Attacker, Outcome};
    require_netns!();
    let _one_at_a_time = serial();
    let started = Instant::now();
    let mut lab = start(LabOptions::new("cp", [10, 81, 7]));
    let gw = lab.gateway();
    let b = deploy(&mut lab, server_pod("b", "b"));
    let a = deploy(&mut lab, client_pod("a", "a"));
    // b's loopback-only service (an admin agent, pprof...).
    let secret = echo_server_in(
        &b.netns,
        "127.0.0.1:9999".parse().unwrap(),
        Duration::from_secs(60),
    );
    // mallory: a foothold on the pod network with a valid SVID of its own service account.
    let mallory = lab.add_host("mallory").expect("attacker host");
    let token = lab.dir().join("attacker.token");
    std::fs::write(
        &token,
        lab.issuer()
            .token(lab::NAMESPACE, "attacker")
            .expect("token"),
    )
    .expect("token file");
    let (ca_url, bundle) = (lab.ca_url(), lab.bundle_path().to_path_buf());
    let attacker = lab::block_on_in(&mallory, move || async move {
        Attacker::enroll(
            &ca_url,
            &bundle,
            &token,
            lab::TRUST_DOMAIN,
            lab::NAMESPACE,
            "attacker",
        )
        .await
    })
    .expect("the attacker enrolls like any workload");
    let attacker = Arc::new(attacker);
    let open = |to: std::net::SocketAddr, port: u16, payload: &'static [u8]| {
        let attacker = attacker.clone();
        lab::block_on_in(&mallory, move || async move {
            attacker
                .open(to, port, payload, Duration::from_secs(5))
                .await
        })
        .expect("attack ran")
    };
    let refused =
        |reason: &str| value(&b, REFUSED, &[("direction", "inbound"), ("reason", reason)]);

    // Control: the default policy admits any identity of the trust domain, so the port the
    // attacker dialed answers. Everything below is refused for where it tries to go.
    let o = open(
        b.addr(HTTP_PORT),
        0,
        b"GET /whoami HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    assert!(
        matches!(&o, Outcome::Data(d) if contains(d, b"\r\n\r\nb\n")),
        "control: {o:?}"
    );
    let (mismatch0, direct0) = (refused("port_mismatch"), refused("no_original_destination"));
    // 1. Dial the allowed app port, name another in OPEN: the loopback service, the admin
    //    port, the outbound listener (a nested tunnel would start there).
    for port in [9999, ADMIN_PORT, 15001] {
        let o = open(b.addr(HTTP_PORT), port, b"POST /shutdown HTTP/1.0\r\n\r\n");
        assert!(
            matches!(&o, Outcome::Reset { code: 1, reason } if reason.contains("only reaches the port it was addressed to")),
            "OPEN({port}) on a connection to {HTTP_PORT}: {o:?}"
        );
    }
    // 2. Dial the inbound port itself: no original destination, nothing to reach.
    for port in [0, 9999, ADMIN_PORT] {
        let o = open(b.addr(15006), port, b"POST /shutdown HTTP/1.0\r\n\r\n");
        assert!(
            !o.reached_something(),
            "straight to :15006, OPEN({port}): {o:?}"
        );
    }
    assert_eq!(refused("port_mismatch") - mismatch0, 3.0);
    assert_eq!(refused("no_original_destination") - direct0, 3.0);
    let lines = logged(
        &b,
        &[
            ("caller", spiffe_id("attacker").as_str()),
            ("reason", "port_mismatch"),
        ],
    );
    assert_eq!(
        lines.len(),
        3,
        "each refusal logged with the caller's identity"
    );
    assert_eq!(
        secret.load(Ordering::SeqCst),
        0,
        "the loopback-only service was reached"
    );

    // 3. The admin port, seen from another host on the pod network.
    let from_mallory = |method: &str, path: &str| {
        let r = if method == "POST" {
            http_post_in(&mallory, b.addr(ADMIN_PORT), path, "")
        } else {
            http_get_in(&mallory, b.addr(ADMIN_PORT), path)
        };
        expect_reply(r, path).status
    };
    assert_eq!(from_mallory("POST", "/shutdown"), 403);
    assert_eq!(from_mallory("GET", "/identity"), 403);
    assert_eq!(from_mallory("GET", "/app-health/app/readiness"), 403);
    assert_eq!(
        from_mallory("GET", "/metrics"),
        200,
        "metrics stay scrapeable by default"
    );
    // The node (kubelet) still probes; the pod still reads its own identity.
    let node = lab.node().expect("node").clone();
    let r = expect_reply(
        http_get_in(&node, b.addr(ADMIN_PORT), "/app-health/app/readiness"),
        "kubelet probe",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(b.identity().is_ok());
    // The namespace policy narrows /metrics to the node's monitoring agent.
    let policy = format!(
        "apiVersion: moat.dev/v1\nkind: Policy\ndefault: deny\nrules:\n  - name: mesh\n    from:\n      - authenticated: true\nadmin:\n  metricsFrom: [\"{gw}/32\"]\n"
    );
    lab.set_policy(&policy).expect("policy");
    wait_until(
        "the metrics restriction in force",
        Duration::from_secs(20),
        || http_get_in(&mallory, b.addr(ADMIN_PORT), "/metrics").is_ok_and(|r| r.status == 403),
    );
    let r = expect_reply(
        http_get_in(&node, b.addr(ADMIN_PORT), "/metrics"),
        "node scrape",
    );
    assert_eq!(r.status, 200);
    assert!(b.ready(), "b stopped being ready");

    // 4. IPv6 link-local: the kernel's fe80:: addresses must not bypass the sidecar, inbound
    //    (mallory to b's app) or outbound (a's app to a neighbour).
    let scope = |ns: &moat_e2e::netns::Netns| ns.link_local(0).expect("link-local").scope_id();
    let b_ll = *b.netns.link_local(HTTP_PORT).expect("b's link-local").ip();
    let to_b = std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
        b_ll,
        HTTP_PORT,
        0,
        scope(&mallory),
    ));
    let not_pod0 = refused("not_pod_address");
    let t = lab::block_on_in(&mallory, move || async move {
        Ok(lab::tcp_roundtrip(
            to_b,
            b"GET /whoami HTTP/1.0\r\n\r\n".to_vec(),
            Duration::from_secs(5),
        )
        .await)
    })
    .expect("link-local attempt ran");
    assert!(
        t.received.is_empty(),
        "mallory reached b's app over link-local, around the sidecar: {:?} {:?}",
        t.outcome,
        String::from_utf8_lossy(&t.received)
    );
    assert_eq!(
        refused("not_pod_address") - not_pod0,
        1.0,
        "the link-local connection did not go through b's sidecar: {:?}",
        t.outcome
    );
    let m_ll = *mallory.link_local(0).expect("mallory's link-local").ip();
    let neighbour = echo_server_in(
        &mallory,
        "[::]:8088".parse().unwrap(),
        Duration::from_secs(30),
    );
    let to_mallory =
        std::net::SocketAddr::V6(std::net::SocketAddrV6::new(m_ll, 8088, 0, scope(&a.netns)));
    let t = lab::block_on_in(&a.netns, move || async move {
        Ok(lab::tcp_roundtrip(to_mallory, b"a's secret".to_vec(), Duration::from_secs(5)).await)
    })
    .expect("outbound link-local attempt ran");
    assert!(t.received.is_empty(), "{:?}", t.outcome);
    assert_eq!(
        neighbour.load(Ordering::SeqCst),
        0,
        "a's app reached a neighbour over link-local without its sidecar"
    );
    // Outbound link-local is redirected like any TCP, but a REDIRECT to loopback loses the
    // link scope, so the handshake never completes: the connection is dropped, not sent.
    assert!(
        !matches!(t.outcome, TcpOutcome::Echoed),
        "a's app talked to a neighbour over link-local: {:?}",
        t.outcome
    );
    finish(
        lab,
        "a compromised pod reaches only what it dialed",
        started,
    );
}
