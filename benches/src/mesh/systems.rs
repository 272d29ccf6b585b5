//! The systems under test, each a pair on loopback: the client side takes plaintext and
//! originates mutual TLS 1.3 with a client certificate, the server side verifies it,
//! terminates TLS and forwards to the shared backends. "direct" is no proxy at all.
//!
//! Every pair carries three routes (HTTP/1.1, HTTP/2 cleartext, iperf3) and uses certificates
//! from the same `moat-ca` root.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use moat_core::pem::{encode_block, encode_certs};
use moat_e2e::ca::{CaFixture, CaOptions};
use moat_e2e::mesh::{ProxyFixture, ProxyOptions};
use moat_e2e::net::{free_addr, free_port};
use moat_e2e::proc::Proc;

use super::backend::{local, wait_listening, Backends};

/// Where a load generator connects to reach each backend through a system.
#[derive(Debug, Clone, Copy)]
pub struct Entries {
    /// To nginx, HTTP/1.1.
    pub http: SocketAddr,
    /// To nginx, HTTP/2 cleartext.
    pub h2c: SocketAddr,
    /// To the iperf3 server.
    pub iperf: SocketAddr,
}

/// One proxy process of a pair.
#[derive(Debug, Clone, Copy)]
pub struct Side {
    /// `client` or `server`.
    pub role: &'static str,
    /// Its PID, for `/proc` CPU and memory readings.
    pub pid: u32,
}

/// How to count the TLS handshakes the server side has accepted.
enum HandshakeCounter {
    None,
    /// `moat_proxy_tls_handshakes_total{direction="inbound"}` from the admin endpoint.
    Moat(String),
    /// `CumSslConns` from HAProxy's stats socket.
    Haproxy(PathBuf),
}

/// A running system.
pub struct System {
    /// Column name in the report.
    pub name: &'static str,
    /// Load generators' entry points.
    pub entries: Entries,
    /// Proxy processes (none for direct).
    pub sides: Vec<Side>,
    counter: HandshakeCounter,
    _procs: Vec<Proc>,
    _moat: Vec<ProxyFixture>,
}

impl System {
    /// No proxy: the load goes straight to the backends.
    pub fn direct(b: &Backends) -> Self {
        Self {
            name: "direct",
            entries: Entries {
                http: b.http,
                h2c: b.h2c,
                iperf: b.iperf,
            },
            sides: Vec::new(),
            counter: HandshakeCounter::None,
            _procs: Vec::new(),
            _moat: Vec::new(),
        }
    }

    /// Two `moat-proxy` processes with explicit routes; each gets its certificate from `ca`.
    pub fn moat(ca: &CaFixture, b: &Backends, extra: &[String]) -> anyhow::Result<Self> {
        let id = |sa: &str| ca.spiffe_id("bench", sa).map(|i| i.to_string());
        let policy = format!(
            "apiVersion: moat.dev/v1\nkind: Policy\ndefault: deny\nrules:\n  - name: bench-client\n    from:\n      - identity: {}\n",
            id("client")?
        );
        let server = ProxyFixture::start(
            ca,
            ProxyOptions::new("bench", "server")
                .expose(&[b.http.port(), b.h2c.port(), b.iperf.port()])
                .policy(&policy)
                .args(extra.iter().cloned()),
        )
        .context("starting the server-side moat-proxy")?;
        let entries = Entries {
            http: free_addr(),
            h2c: free_addr(),
            iperf: free_addr(),
        };
        let expect = id("server")?;
        let client = ProxyFixture::start(
            ca,
            ProxyOptions::new("bench", "client")
                .route(entries.http, server.inbound(), b.http.port(), Some(&expect))
                .route(entries.h2c, server.inbound(), b.h2c.port(), Some(&expect))
                .route(
                    entries.iperf,
                    server.inbound(),
                    b.iperf.port(),
                    Some(&expect),
                ),
        )
        .context("starting the client-side moat-proxy")?;
        Ok(Self {
            name: "moat",
            entries,
            sides: vec![side("client", &client), side("server", &server)],
            counter: HandshakeCounter::Moat(server.admin()),
            _procs: Vec::new(),
            _moat: vec![client, server],
        })
    }

    /// Two HAProxy processes in TCP mode with leaf certificates from the same CA.
    pub fn haproxy(
        ca: &CaFixture,
        b: &Backends,
        dir: &Path,
        maxconn: usize,
    ) -> anyhow::Result<Self> {
        let dir = dir.join("haproxy");
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        for sa in ["haproxy-client", "haproxy-server"] {
            let pem = issue_pem(ca, sa)?;
            std::fs::write(dir.join(format!("{sa}.pem")), pem)?;
        }
        let bundle = ca.bundle_path();
        let entries = Entries {
            http: local(free_port()),
            h2c: local(free_port()),
            iperf: local(free_port()),
        };
        let tls_ports = [free_port(), free_port(), free_port()];
        let routes = [
            ("http", entries.http, tls_ports[0], b.http),
            ("h2c", entries.h2c, tls_ports[1], b.h2c),
            ("iperf", entries.iperf, tls_ports[2], b.iperf),
        ];
        let d = dir.display();
        let head = |role: &str| {
            format!(
                "global\n  maxconn {maxconn}\n  stats socket {d}/{role}.sock mode 600 level user\n  \
                 ssl-default-bind-options ssl-min-ver TLSv1.3\n  ssl-default-server-options ssl-min-ver TLSv1.3\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\n"
            )
        };
        let (mut client_cfg, mut server_cfg) = (head("client"), head("server"));
        let b = bundle.display();
        for (name, entry, tls_port, backend) in routes {
            // No `verifyhost`: HAProxy cannot match a SPIFFE URI SAN, so it checks the chain only.
            client_cfg.push_str(&format!(
                "frontend {name}\n  bind {entry}\n  default_backend {name}\n\
                 backend {name}\n  server s 127.0.0.1:{tls_port} ssl crt {d}/haproxy-client.pem ca-file {b} verify required\n"
            ));
            server_cfg.push_str(&format!(
                "frontend {name}\n  bind 127.0.0.1:{tls_port} ssl crt {d}/haproxy-server.pem ca-file {b} verify required\n  default_backend {name}\n\
                 backend {name}\n  server b {backend}\n"
            ));
        }
        let mut procs = Vec::new();
        let mut sides = Vec::new();
        for (role, cfg) in [("server", server_cfg), ("client", client_cfg)] {
            let path = dir.join(format!("{role}.cfg"));
            std::fs::write(&path, cfg)?;
            let mut cmd = Command::new("haproxy");
            cmd.arg("-db").arg("-f").arg(&path);
            let p = Proc::spawn(&format!("haproxy-{role}"), cmd, &dir)?;
            sides.push(Side { role, pid: p.pid() });
            procs.push(p);
        }
        sides.reverse();
        for addr in [entries.http, entries.h2c, entries.iperf]
            .into_iter()
            .chain(tls_ports.map(local))
        {
            wait_listening(addr, Duration::from_secs(10))
                .with_context(|| format!("haproxy did not start (logs in {d})"))?;
        }
        Ok(Self {
            name: "haproxy",
            entries,
            sides,
            counter: HandshakeCounter::Haproxy(dir.join("server.sock")),
            _procs: procs,
            _moat: Vec::new(),
        })
    }

    /// TLS handshakes the server side has accepted so far (`None` for direct).
    pub fn handshakes(&self) -> anyhow::Result<Option<f64>> {
        match &self.counter {
            HandshakeCounter::None => Ok(None),
            HandshakeCounter::Moat(admin) => {
                let m = moat_e2e::net::scrape(admin)?;
                Ok(Some(m.value(
                    "moat_proxy_tls_handshakes_total",
                    &[("direction", "inbound")],
                )))
            }
            HandshakeCounter::Haproxy(sock) => haproxy_info(sock, "CumSslConns").map(Some),
        }
    }

    /// PIDs of the proxy processes.
    pub fn pids(&self) -> Vec<u32> {
        self.sides.iter().map(|s| s.pid).collect()
    }

    /// Whether every proxy process is still running.
    pub fn alive(&self) -> bool {
        self.sides.iter().all(|s| crate::util::pid_alive(s.pid))
    }
}

fn side(role: &'static str, p: &ProxyFixture) -> Side {
    Side { role, pid: p.pid() }
}

/// An SVID for `bench/<sa>` from the CA's API, as HAProxy wants it: chain, then key.
fn issue_pem(ca: &CaFixture, sa: &str) -> anyhow::Result<String> {
    let client = ca.client(ca.client_config("bench", sa)?)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let svid = rt
        .block_on(client.fetch())
        .with_context(|| format!("issuing a certificate for bench/{sa}"))?;
    Ok(format!(
        "{}{}",
        encode_certs(&svid.chain),
        encode_block("PRIVATE KEY", svid.key.secret_der())
    ))
}

/// One numeric field of HAProxy's `show info`.
fn haproxy_info(sock: &Path, field: &str) -> anyhow::Result<f64> {
    let mut s = UnixStream::connect(sock).with_context(|| sock.display().to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"show info\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let prefix = format!("{field}:");
    match out.lines().find_map(|l| l.strip_prefix(&prefix)) {
        Some(v) => v
            .trim()
            .parse()
            .with_context(|| format!("HAProxy {field}: {v:?}")),
        None => bail!("HAProxy `show info` has no {field}"),
    }
}

/// The CA every pair's certificates come from (default TTL, no rate limit in the way).
pub fn start_ca() -> anyhow::Result<CaFixture> {
    CaFixture::start(CaOptions::default().unlimited()).context("starting moat-ca")
}
