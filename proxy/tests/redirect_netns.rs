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

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd as _;
use std::process::{Command, Output};
use std::sync::mpsc;

const POD_IP: &str = "10.233.0.1";
const PEER_IP: &str = "10.233.0.2";
/// A second peer address, excluded from redirection by CIDR.
const PEER_IP_EXCLUDED: &str = "10.233.0.3";
const POD_IP6: &str = "fd00:233::1";
const PEER_IP6: &str = "fd00:233::2";

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
            (&ns.pod, &va, vec![POD_IP], POD_IP6),
            (&ns.peer, &vb, vec![PEER_IP, PEER_IP_EXCLUDED], PEER_IP6),
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
            exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
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

/// A TCP listener inside namespace `ns` that answers every connection with `tag`. It runs on
/// its own thread, moved into the namespace with setns(2) (which only affects that thread).
fn listen(ns: &str, port: u16, tag: &'static str) {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let bound = (|| -> std::io::Result<TcpListener> {
            let f = File::open(&path)?;
            // SAFETY: setns with a valid namespace fd only changes this thread's namespace.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // [::] also accepts IPv4 (net.ipv6.bindv6only is 0 in a new namespace).
            TcpListener::bind(SocketAddr::from(([0u16; 8], port)))
                .or_else(|_| TcpListener::bind(SocketAddr::from(([0u8; 4], port))))
        })();
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
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    require_init();

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
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    if !in_path("iptables-legacy-restore") {
        eprintln!("SKIPPED: iptables-legacy is not installed");
        return;
    }
    require_init();
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
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    require_init();
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
