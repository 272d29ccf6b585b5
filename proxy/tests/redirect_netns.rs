//! End-to-end test of `moat-proxy init` in real network namespaces.
//!
//! Needs root, `ip`, iptables (nft or legacy), `setpriv`, `bash` and `timeout`; without them it
//! prints `SKIPPED: <reason>` to stderr and passes (CI runs as root with the tools, so it runs
//! there). It creates a "pod" namespace and a "peer" namespace joined by a veth pair, runs the
//! real `moat-proxy init` binary inside the pod namespace, checks the nat table, reruns it, and
//! proves with real connections that traffic is (or is not) redirected.
//!
//! The binary is `CARGO_BIN_EXE_moat-proxy`; `MOAT_PROXY_BIN=/path/to/binary` overrides it
//! (any binary whose `init` subcommand is `moat_proxy::redirect::run`).
//!
//! The last test also runs the real sidecar (`moat-proxy run`, as uid 7777, with a CA built
//! from moat-ca's code) behind those rules and proves IPv6 (and IPv4 through its dual-stack
//! inbound listener) is captured and proxied.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const POD_IP: &str = "10.233.0.1";
const PEER_IP: &str = "10.233.0.2";
/// A second peer address, excluded from redirection by CIDR.
const PEER_IP_EXCLUDED: &str = "10.233.0.3";
const POD_IP6: &str = "fd00:233::1";
const PEER_IP6: &str = "fd00:233::2";
/// A second peer IPv6 address, which the sidecar test does not allow as egress.
const PEER_IP6_OTHER: &str = "fd00:233::3";

fn binary() -> String {
    std::env::var("MOAT_PROXY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moat-proxy").into())
}

fn in_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (network namespaces and iptables need it)".into());
    }
    for tool in [
        "ip",
        "iptables-save",
        "iptables-restore",
        "setpriv",
        "bash",
        "timeout",
    ] {
        if !in_path(tool) {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

fn run(cmd: &[&str]) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn must(cmd: &[&str]) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces joined by a veth pair; deleted on drop, even when the test panics.
struct Namespaces {
    pod: String,
    peer: String,
}

impl Namespaces {
    /// `tag` (one letter) keeps the names of concurrently running tests apart.
    fn create(tag: char) -> Self {
        let pid = std::process::id();
        let ns = Namespaces {
            pod: format!("moat-test-pod-{pid}-{tag}"),
            peer: format!("moat-test-peer-{pid}-{tag}"),
        };
        // Interface names are limited to 15 characters.
        let (va, vb) = (format!("mt{pid}{tag}a"), format!("mt{pid}{tag}b"));
        must(&["ip", "netns", "add", &ns.pod]);
        must(&["ip", "netns", "add", &ns.peer]);
        must(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
        ]);
        must(&["ip", "link", "set", &va, "netns", &ns.pod]);
        must(&["ip", "link", "set", &vb, "netns", &ns.peer]);
        for (name, dev, v4, v6) in [
            (&ns.pod, &va, vec![POD_IP], vec![POD_IP6]),
            (
                &ns.peer,
                &vb,
                vec![PEER_IP, PEER_IP_EXCLUDED],
                vec![PEER_IP6, PEER_IP6_OTHER],
            ),
        ] {
            let exec = |args: &[&str]| {
                let mut cmd = vec!["ip", "netns", "exec", name.as_str()];
                cmd.extend_from_slice(args);
                must(&cmd);
            };
            exec(&["ip", "link", "set", "lo", "up"]);
            for a in v4 {
                exec(&["ip", "addr", "add", &format!("{a}/24"), "dev", dev]);
            }
            for a in v6 {
                exec(&[
                    "ip",
                    "-6",
                    "addr",
                    "add",
                    &format!("{a}/64"),
                    "dev",
                    dev,
                    "nodad",
                ]);
            }
            exec(&["ip", "link", "set", dev, "up"]);
        }
        ns
    }

    /// Runs `cmd` inside namespace `ns`.
    fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(cmd);
        run(&full)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Deleting a namespace also deletes the veth end inside it.
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Moves the calling thread into namespace `ns` (setns(2) only affects this thread).
fn enter(ns: &str) -> std::io::Result<()> {
    let f = File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: setns with a valid namespace fd only changes this thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread inside namespace `ns` and returns its result.
fn within<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    let ns = ns.to_string();
    std::thread::spawn(move || enter(&ns).and_then(|()| f()))
        .join()
        .expect("namespace thread panicked")
}

/// A TCP listener inside namespace `ns` that answers every connection with `tag`, on its own
/// thread.
fn listen(ns: &str, port: u16, tag: &'static str) {
    let ns_name = ns.to_string();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let bound = enter(&ns_name).and_then(|()| {
            // [::] also accepts IPv4 (net.ipv6.bindv6only is 0 in a new namespace).
            TcpListener::bind(SocketAddr::from(([0u16; 8], port)))
                .or_else(|_| TcpListener::bind(SocketAddr::from(([0u8; 4], port))))
        });
        match bound {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                for mut s in l.incoming().flatten() {
                    let _ = s.write_all(format!("{tag}\n").as_bytes());
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        }
    });
    rx.recv()
        .expect("listener thread died")
        .unwrap_or_else(|e| panic!("cannot listen on {port} in {ns}: {e}"));
}

/// Connects from namespace `ns` (optionally as `uid:gid`) to `host:port` with bash's /dev/tcp
/// and returns the tag of the listener that answered, or the error.
fn connect(
    nss: &Namespaces,
    ns: &str,
    user: Option<(&str, &str)>,
    host: &str,
    port: u16,
) -> String {
    let script = format!("exec 3<>/dev/tcp/{host}/{port} && head -n1 <&3");
    let mut cmd: Vec<&str> = Vec::new();
    if let Some((uid, gid)) = user {
        cmd.extend(["setpriv", "--reuid", uid, "--regid", gid, "--clear-groups"]);
    }
    cmd.extend(["timeout", "5", "bash", "-c", &script]);
    let out = nss.exec(ns, &cmd);
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    } else {
        format!("ERROR: {}", String::from_utf8_lossy(&out.stderr).trim())
    }
}

/// `*-save -t nat` of whichever backend holds Moat's chains, plus its name.
fn saved_rules(nss: &Namespaces, ns: &str, v6: bool) -> (String, String) {
    let base = if v6 { "ip6tables" } else { "iptables" };
    let mut found = Vec::new();
    for flavour in ["nft", "legacy"] {
        let prog = format!("{base}-{flavour}-save");
        if !in_path(&prog) {
            continue;
        }
        let out = nss.exec(ns, &[&prog, "-t", "nat"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains(":MOAT_INBOUND") {
            found.push((prog, text));
        }
    }
    assert!(
        found.len() <= 1,
        "Moat chains in several backends: {found:?}"
    );
    found.pop().unwrap_or_default()
}

/// The rule lines (no comments, no counters) of a save output.
fn rule_lines(save: &str) -> Vec<String> {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect()
}

fn count(save: &str, line: &str) -> usize {
    save.lines().filter(|l| l.trim() == line).count()
}

/// Fails (never skips) when the binary has no `init` subcommand.
fn require_init() {
    let help = run(&[&binary(), "init", "--help"]);
    assert!(
        help.status.success()
            && String::from_utf8_lossy(&help.stdout).contains("--exclude-outbound-cidrs"),
        "{} has no `init` subcommand: add `Init(moat_proxy::redirect::InitArgs)` to the CLI in \
         proxy/src/main.rs and dispatch it to `moat_proxy::redirect::run` ({})",
        binary(),
        String::from_utf8_lossy(&help.stderr)
    );
}

/// Whether the test can run here (root, the tools, and `also_needs`); prints `SKIPPED: <reason>`
/// when not, unless `MOAT_REQUIRE_ROOT_TESTS` is set (CI as root), where a missing
/// requirement fails the test instead. Fails (never skips) when the binary has no `init`
/// subcommand.
fn runnable(also_needs: &[&str]) -> bool {
    let reason = skip_reason().or_else(|| {
        also_needs
            .iter()
            .find(|t| !in_path(t))
            .map(|t| format!("{t} is not installed"))
    });
    if let Some(reason) = reason {
        if std::env::var_os("MOAT_REQUIRE_ROOT_TESTS").is_some() {
            panic!("MOAT_REQUIRE_ROOT_TESTS is set but this test cannot run: {reason}");
        }
        eprintln!("SKIPPED: {reason}");
        return false;
    }
    require_init();
    true
}

fn init(nss: &Namespaces, ns: &str, args: &[&str]) -> Output {
    let bin = binary();
    let mut cmd = vec![bin.as_str(), "init"];
    cmd.extend_from_slice(args);
    nss.exec(ns, &cmd)
}

const INIT_ARGS: &[&str] = &[
    "--exclude-inbound-ports",
    "9999",
    "--exclude-outbound-ports",
    "5432",
    "--exclude-outbound-cidrs",
    "10.233.0.3/32",
];

#[test]
fn init_redirects_traffic_in_a_real_network_namespace() {
    if !runnable(&[]) {
        return;
    }

    let nss = Namespaces::create('a');
    let (pod, peer) = (nss.pod.clone(), nss.peer.clone());
    for (port, tag) in [
        (15001, "outbound-listener"),
        (15006, "inbound-listener"),
        (8080, "app-8080"),
        (9999, "app-9999"),
        (15020, "admin"),
    ] {
        listen(&pod, port, tag);
    }
    listen(&peer, 80, "peer-80");
    listen(&peer, 5432, "peer-5432");

    // Before init nothing is redirected.
    assert_eq!(connect(&nss, &pod, None, PEER_IP, 80), "peer-80");
    assert_eq!(connect(&nss, &peer, None, POD_IP, 8080), "app-8080");

    // Dry run prints the rules and changes nothing.
    let dry = init(&nss, &pod, &[&["--dry-run"], INIT_ARGS].concat());
    assert!(dry.status.success(), "{dry:?}");
    let dry_out = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry_out.contains("-A MOAT_OUTBOUND -p tcp -j REDIRECT --to-ports 15001"),
        "{dry_out}"
    );
    assert_eq!(
        saved_rules(&nss, &pod, false).1,
        "",
        "dry run changed the nat table"
    );

    // Invalid flags are refused before anything is touched.
    for bad in [
        vec!["--exclude-outbound-cidrs", "10.0.0.0/99"],
        vec!["--exclude-inbound-ports", "0"],
        vec!["--inbound-port", "15001"],
    ] {
        let out = init(&nss, &pod, &bad);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(!out.stderr.is_empty(), "{bad:?}: no error message");
        assert_eq!(
            saved_rules(&nss, &pod, false).1,
            "",
            "{bad:?} changed the nat table"
        );
    }

    // Without NET_ADMIN it fails with an actionable message and changes nothing.
    let bin = binary();
    let unprivileged = nss.exec(
        &pod,
        &[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            &bin,
            "init",
        ],
    );
    assert!(!unprivileged.status.success());
    let err = String::from_utf8_lossy(&unprivileged.stderr);
    assert!(err.contains("NET_ADMIN"), "unhelpful error: {err}");
    assert_eq!(saved_rules(&nss, &pod, false).1, "");

    // Without iptables in PATH it fails with an actionable message and changes nothing.
    let no_tools = nss.exec(&pod, &["env", "PATH=/nonexistent", &bin, "init"]);
    assert!(!no_tools.status.success());
    let err = String::from_utf8_lossy(&no_tools.stderr);
    assert!(err.contains("not found in PATH"), "unhelpful error: {err}");
    assert_eq!(saved_rules(&nss, &pod, false).1, "");

    // Apply.
    let first = init(&nss, &pod, INIT_ARGS);
    assert!(
        first.status.success(),
        "init failed: {}{}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr)
    );
    let out = String::from_utf8_lossy(&first.stdout);
    assert!(out.contains("IPv4 nat rules applied and verified"), "{out}");
    assert!(
        out.contains("IPv6 nat rules applied and verified"),
        "IPv6 not detected: {out}"
    );

    let (prog, v4) = saved_rules(&nss, &pod, false);
    eprintln!("rules read back with {prog}:\n{v4}");
    for line in [
        "-A PREROUTING -p tcp -j MOAT_INBOUND",
        "-A OUTPUT -p tcp -j MOAT_OUTBOUND",
        "-A MOAT_INBOUND -p tcp -m multiport --dports 15020,9999 -j RETURN",
        "-A MOAT_INBOUND -p tcp -j REDIRECT --to-ports 15006",
        "-A MOAT_OUTBOUND -m owner --uid-owner 7777 -j RETURN",
        "-A MOAT_OUTBOUND -m owner --gid-owner 7777 -j RETURN",
        "-A MOAT_OUTBOUND -o lo -j RETURN",
        "-A MOAT_OUTBOUND -d 127.0.0.0/8 -j RETURN",
        "-A MOAT_OUTBOUND -d 10.233.0.3/32 -j RETURN",
        "-A MOAT_OUTBOUND -p tcp -m multiport --dports 5432 -j RETURN",
        "-A MOAT_OUTBOUND -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert_eq!(count(&v4, line), 1, "{line:?} not exactly once in:\n{v4}");
    }
    let (_, v6) = saved_rules(&nss, &pod, true);
    assert_eq!(
        count(&v6, "-A MOAT_OUTBOUND -d ::1/128 -j RETURN"),
        1,
        "{v6}"
    );
    assert_eq!(
        count(&v6, "-A PREROUTING -p tcp -j MOAT_INBOUND"),
        1,
        "{v6}"
    );
    // The IPv4 CIDR exclusion does not leak into the IPv6 table.
    assert!(!v6.contains("10.233.0.3"), "{v6}");

    // Rerun: identical rules, nothing duplicated.
    let second = init(&nss, &pod, INIT_ARGS);
    assert!(second.status.success(), "rerun failed: {second:?}");
    let (_, v4_again) = saved_rules(&nss, &pod, false);
    assert_eq!(
        rule_lines(&v4_again),
        rule_lines(&v4),
        "rerun changed the rules"
    );
    let (_, v6_again) = saved_rules(&nss, &pod, true);
    assert_eq!(
        rule_lines(&v6_again),
        rule_lines(&v6),
        "rerun changed the IPv6 rules"
    );

    // The peer namespace was never touched.
    assert_eq!(saved_rules(&nss, &peer, false).1, "");

    // Redirection really happens.
    // (what, as uid:gid, host, port, expected listener, from which namespace)
    type Connection<'a> = (
        &'a str,
        Option<(&'a str, &'a str)>,
        &'a str,
        u16,
        &'a str,
        &'a str,
    );
    let cases: Vec<Connection> = vec![
        ("app egress", None, PEER_IP, 80, "outbound-listener", ""),
        (
            "proxy uid egress",
            Some(("7777", "7777")),
            PEER_IP,
            80,
            "peer-80",
            "",
        ),
        (
            "proxy gid egress",
            Some(("1000", "7777")),
            PEER_IP,
            80,
            "peer-80",
            "",
        ),
        (
            "other uid egress",
            Some(("1000", "1000")),
            PEER_IP,
            80,
            "outbound-listener",
            "",
        ),
        (
            "excluded outbound port",
            None,
            PEER_IP,
            5432,
            "peer-5432",
            "",
        ),
        (
            "excluded outbound CIDR",
            None,
            PEER_IP_EXCLUDED,
            80,
            "peer-80",
            "",
        ),
        ("loopback", None, "127.0.0.1", 8080, "app-8080", ""),
        ("own pod IP (via lo)", None, POD_IP, 8080, "app-8080", ""),
        (
            "app egress IPv6",
            None,
            PEER_IP6,
            80,
            "outbound-listener",
            "",
        ),
        ("ingress", None, POD_IP, 8080, "inbound-listener", "peer"),
        (
            "excluded inbound port",
            None,
            POD_IP,
            9999,
            "app-9999",
            "peer",
        ),
        ("admin port", None, POD_IP, 15020, "admin", "peer"),
        (
            "ingress IPv6",
            None,
            POD_IP6,
            8080,
            "inbound-listener",
            "peer",
        ),
    ];
    let mut failures = Vec::new();
    for (what, user, host, port, want, from) in cases {
        let ns = if from == "peer" { &peer } else { &pod };
        let got = connect(&nss, ns, user, host, port);
        if got != want {
            failures.push(format!(
                "{what}: {host}:{port} answered by {got:?}, expected {want:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "redirection wrong:\n{}",
        failures.join("\n")
    );
}

#[test]
fn legacy_backend_applies_idempotently() {
    if !runnable(&["iptables-legacy-restore"]) {
        return;
    }
    let nss = Namespaces::create('l');
    let (pod, peer) = (nss.pod.clone(), nss.peer.clone());
    listen(&pod, 15001, "outbound-listener");
    listen(&peer, 80, "peer-80");
    for round in 1..=2 {
        let out = init(&nss, &pod, &["--iptables-mode", "legacy", "--ipv6", "off"]);
        assert!(out.status.success(), "round {round}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("(legacy backend)"),
            "{out:?}"
        );
    }
    let (prog, v4) = saved_rules(&nss, &pod, false);
    assert_eq!(prog, "iptables-legacy-save");
    assert_eq!(
        count(&v4, "-A PREROUTING -p tcp -j MOAT_INBOUND"),
        1,
        "{v4}"
    );
    assert_eq!(count(&v4, "-A OUTPUT -p tcp -j MOAT_OUTBOUND"), 1, "{v4}");
    assert_eq!(
        saved_rules(&nss, &pod, true).1,
        "",
        "--ipv6 off installed IPv6 rules"
    );
    assert_eq!(connect(&nss, &pod, None, PEER_IP, 80), "outbound-listener");
    assert_eq!(
        connect(&nss, &pod, Some(("7777", "7777")), PEER_IP, 80),
        "peer-80"
    );
}

#[test]
fn dry_run_needs_no_privileges() {
    if !runnable(&[]) {
        return;
    }
    let out = run(&[
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        &binary(),
        "init",
        "--dry-run",
        "--ipv6",
        "on",
        "--exclude-outbound-cidrs",
        "fd00::/8,10.0.0.0/8",
    ]);
    assert!(out.status.success(), "{out:?}");
    let mut text = String::new();
    out.stdout
        .as_slice()
        .read_to_string(&mut text)
        .unwrap_or_default();
    assert!(text.contains("# IPv4 rules"), "{text}");
    assert!(text.contains("# IPv6 rules"), "{text}");
    assert!(
        text.contains("-A MOAT_OUTBOUND -d fd00::/8 -j RETURN"),
        "{text}"
    );
    assert!(
        text.contains("-A MOAT_OUTBOUND -d 10.0.0.0/8 -j RETURN"),
        "{text}"
    );
}

/// Accepts every token as the service account `shop/web`.
struct AnyToken;

impl moat_ca::auth::TokenVerifier for AnyToken {
    fn verify<'a>(
        &'a self,
        _token: &'a str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<moat_ca::auth::Workload, moat_ca::auth::AuthError>,
                > + Send
                + 'a,
        >,
    > {
        Box::pin(async {
            Ok(moat_ca::auth::Workload {
                namespace: "shop".into(),
                service_account: "web".into(),
                pod: None,
            })
        })
    }
}

/// A certificate authority made of moat-ca's code, serving HTTPS on 127.0.0.1 inside
/// namespace `ns` (on its own thread) until dropped. Its root is written to `dir`.
struct TestCa {
    url: String,
    bundle: PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
}

impl TestCa {
    fn start(ns: &str, dir: &Path) -> Self {
        use moat_ca::authority::{self, Authority};
        let root = dir.join("ca");
        let td = moat_core::TrustDomain::new("cluster.local").expect("trust domain");
        authority::init_root(&td, &root, Duration::from_secs(86400)).expect("CA root");
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (tx, rx) = mpsc::channel();
        let ns = ns.to_string();
        let root_dir = root.clone();
        std::thread::spawn(move || {
            let run = || -> Result<(), String> {
                enter(&ns).map_err(|e| e.to_string())?;
                let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
                listener.set_nonblocking(true).map_err(|e| e.to_string())?;
                let addr = listener.local_addr().map_err(|e| e.to_string())?;
                let authority = Authority::load_dir(&root_dir, None).map_err(|e| e.to_string())?;
                let (chain, key) = authority
                    .serving_cert(&["127.0.0.1".into()], Duration::from_secs(86400))
                    .map_err(|e| e.to_string())?;
                let serving = Arc::new(moat_core::tls::CurrentCert::default());
                serving.set(
                    moat_core::svid::certified_key(chain, key, &moat_core::tls::provider())
                        .map_err(|e| e.to_string())?,
                );
                let tls = moat_core::https::server_config(serving).map_err(|e| e.to_string())?;
                let svc = moat_ca::server::CaService::new(
                    authority,
                    Arc::new(AnyToken),
                    moat_ca::server::Limits::default(),
                );
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let _ = tx.send(Ok(addr));
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                    moat_core::https::serve(
                        listener,
                        Arc::new(tls),
                        Arc::new(svc),
                        stopped,
                        Duration::ZERO,
                    )
                    .await;
                });
                Ok(())
            };
            if let Err(e) = run() {
                let _ = tx.send(Err(e));
            }
        });
        let addr = rx
            .recv()
            .expect("CA thread died")
            .unwrap_or_else(|e| panic!("cannot start the test CA: {e}"));
        TestCa {
            url: format!("https://{addr}"),
            bundle: root.join("bundle.pem"),
            stop,
        }
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// A directory under the system temp dir, removed on drop; readable by every uid (the proxy
/// runs as 7777 and reads its token, bundle and policy from it, like kubelet mounts).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("moat-proxy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `moat-proxy run` process, killed on drop.
struct Sidecar {
    child: Child,
    log: PathBuf,
}

impl Sidecar {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a raw HTTP/1.0 `request` to `addr` from inside namespace `ns`; returns the whole
/// response.
fn http(ns: &str, addr: &str, request: String) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().expect("addr");
    within(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

fn http_get(ns: &str, addr: &str, path: &str) -> std::io::Result<String> {
    http(
        ns,
        addr,
        format!("GET {path} HTTP/1.0\r\nHost: proxy\r\n\r\n"),
    )
}

/// Sum of the samples of metric `name` whose labels contain every `labels` pair.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn sidecar_captures_ipv6_and_ipv4_behind_the_rules() {
    if !runnable(&["ss"]) {
        return;
    }
    let dir = TempDir::new("ipv6");
    let nss = Namespaces::create('6');
    let (pod, peer) = (nss.pod.clone(), nss.peer.clone());
    listen(&pod, 8080, "app-8080");
    listen(&pod, 8081, "app-8081");
    listen(&peer, 80, "peer-80");

    let ca = TestCa::start(&pod, &dir.0);
    let token = dir.0.join("token");
    std::fs::write(&token, "any").expect("token");
    // Plaintext callers may reach 8080 only: a connection to 8081 answered by the app would
    // mean it bypassed the sidecar.
    let policy = dir.0.join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: moat.dev/v1\nkind: Policy\ndefault: deny\nrules:\n  - name: app\n    ports: [8080]\n    from:\n      - unauthenticated: true\n",
    )
    .expect("policy");
    for f in [&token, &policy, &ca.bundle] {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    std::fs::set_permissions(
        ca.bundle.parent().expect("ca dir"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");

    let out = init(&nss, &pod, &["--ipv6", "on"]);
    assert!(out.status.success(), "init: {out:?}");

    let log = dir.0.join("proxy.log");
    let bin = binary();
    let child = Command::new("ip")
        .args([
            "netns", "exec", &pod, "setpriv", "--reuid", "7777", "--regid", "7777",
        ])
        .args(["--clear-groups", &bin, "run", "--namespace", "shop"])
        .args(["--service-account", "web", "--ca-url", &ca.url])
        .arg("--token-file")
        .arg(&token)
        .arg("--trust-bundle")
        .arg(&ca.bundle)
        .arg("--policy")
        .arg(&policy)
        // Plaintext egress to the first peer IPv6 address only; nothing is in the mesh.
        .args(["--mesh-networks", "10.99.0.0/16", "--allow-egress"])
        .arg(format!("{PEER_IP6}/128"))
        .args(["--log-format", "json", "--log-level", "debug"])
        .args(["--drain-delay", "0s", "--detect-timeout", "500ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log file"))
        .spawn()
        .expect("start moat-proxy run");
    let mut sidecar = Sidecar { child, log };

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(st)) = sidecar.child.try_wait() {
            panic!("moat-proxy run exited ({st}): {}", sidecar.log());
        }
        let ready = http_get(&pod, "127.0.0.1:15020", "/ready");
        if ready.is_ok_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "moat-proxy run not ready: {}",
            sidecar.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The listeners: inbound and admin dual-stack on [::] (`ss` shows a socket without
    // IPV6_V6ONLY as `*`), outbound on both loopbacks.
    let ss = nss.exec(&pod, &["ss", "-Hltn"]);
    let listening = String::from_utf8_lossy(&ss.stdout).into_owned();
    for want in ["*:15006", "127.0.0.1:15001", "[::1]:15001", "*:15020"] {
        assert!(
            listening.split_whitespace().any(|w| w == want),
            "{want} not listening:\n{listening}"
        );
    }
    // IPv6 admin (a kubelet probing an IPv6 pod).
    let ready6 = http_get(&pod, "[::1]:15020", "/ready").expect("admin over IPv6");
    assert!(ready6.contains(" 200 "), "{ready6}");

    type Case<'a> = (&'a str, &'a str, &'a str, u16, &'a str);
    let cases: Vec<Case> = vec![
        // (what, from namespace, host, port, expected answer)
        ("IPv6 egress, allowed", "pod", PEER_IP6, 80, "peer-80"),
        (
            "IPv6 egress, not allowed",
            "pod",
            PEER_IP6_OTHER,
            80,
            "ERROR",
        ),
        ("IPv4 egress, not allowed", "pod", PEER_IP, 80, "ERROR"),
        (
            "IPv6 ingress, allowed port",
            "peer",
            POD_IP6,
            8080,
            "app-8080",
        ),
        ("IPv6 ingress, denied port", "peer", POD_IP6, 8081, "ERROR"),
        (
            "IPv4 ingress (dual-stack), allowed port",
            "peer",
            POD_IP,
            8080,
            "app-8080",
        ),
        (
            "IPv4 ingress (dual-stack), denied port",
            "peer",
            POD_IP,
            8081,
            "ERROR",
        ),
        // Not redirected (local traffic): no original destination, whatever the family.
        (
            "IPv4 straight to the inbound port",
            "pod",
            POD_IP,
            15006,
            "ERROR",
        ),
        (
            "IPv6 straight to the inbound port",
            "pod",
            POD_IP6,
            15006,
            "ERROR",
        ),
    ];
    let mut failures = Vec::new();
    for (what, from, host, port, want) in cases {
        let ns = if from == "peer" { &peer } else { &pod };
        let got = connect(&nss, ns, None, host, port);
        let ok = if want == "ERROR" {
            got.starts_with("ERROR") || got.is_empty()
        } else {
            got == want
        };
        if !ok {
            failures.push(format!(
                "{what}: {host}:{port} gave {got:?}, expected {want}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nproxy log:\n{}",
        failures.join("\n"),
        sidecar.log()
    );

    // Every one of those went through the sidecar, which recovered the original destinations.
    let m = http_get(&pod, "127.0.0.1:15020", "/metrics").expect("metrics");
    let refused = |dir: &str, reason: &str| {
        metric(
            &m,
            "moat_proxy_connections_refused_total",
            &[
                &format!("direction=\"{dir}\""),
                &format!("reason=\"{reason}\""),
            ],
        )
    };
    assert_eq!(refused("outbound", "egress_denied"), 2.0, "{m}");
    assert_eq!(refused("outbound", "no_original_destination"), 0.0, "{m}");
    let inbound = metric(
        &m,
        "moat_proxy_connections_total",
        &["direction=\"inbound\""],
    );
    assert_eq!(inbound, 2.0, "inbound connections proxied\n{m}");
    let denied = metric(
        &m,
        "moat_proxy_authz_decisions_total",
        &["decision=\"deny\"", "rule=\"default\""],
    );
    assert_eq!(denied, 2.0, "inbound connections denied\n{m}");
    assert_eq!(
        refused("inbound", "no_original_destination"),
        2.0,
        "an unredirected IPv4 connection on the dual-stack socket must not look redirected\n{m}"
    );
    let log = sidecar.log();
    for dst in [format!("[{PEER_IP6_OTHER}]:80"), format!("{PEER_IP}:80")] {
        assert!(log.contains(&dst), "refusal of {dst} not logged:\n{log}");
    }

    // /identity is for loopback callers: 127.0.0.1 reaches the dual-stack admin socket as
    // ::ffff:127.0.0.1 and must still count as loopback; the peer is refused.
    let identity = || "GET /identity HTTP/1.0\r\n\r\n".to_string();
    let from_peer = http(&peer, &format!("{POD_IP}:15020"), identity()).expect("from the peer");
    assert!(from_peer.contains(" 403 "), "{from_peer}");
    let local = http(&pod, "127.0.0.1:15020", identity()).expect("from loopback");
    assert!(local.contains(" 200 "), "{local}");
    // POST /shutdown is never served on TCP, not even to loopback.
    let shutdown = "POST /shutdown HTTP/1.0\r\nContent-Length: 0\r\n\r\n".to_string();
    let local = http(&pod, "127.0.0.1:15020", shutdown).expect("from loopback");
    assert!(local.contains(" 403 "), "{local}");
    assert!(
        sidecar.child.try_wait().ok().flatten().is_none(),
        "TCP /shutdown stopped the sidecar"
    );
    drop(ca);
}
