//! The backends every system forwards to: nginx (one worker, a 1 KiB body, HTTP/1.1 and
//! HTTP/2 cleartext) and an iperf3 server. Started once per run and shared by all systems, so
//! differences between columns are the proxies'.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use moat_e2e::net::free_port;
use moat_e2e::proc::Proc;

/// Running backends.
pub struct Backends {
    /// nginx, HTTP/1.1 (`GET /1k`).
    pub http: SocketAddr,
    /// nginx, HTTP/2 with prior knowledge (`GET /1k`).
    pub h2c: SocketAddr,
    /// iperf3 server.
    pub iperf: SocketAddr,
    _nginx: Proc,
    _iperf: Proc,
}

impl Backends {
    /// Starts nginx and iperf3 on free loopback ports; logs and config under `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let (http, h2c, iperf) = (local(free_port()), local(free_port()), local(free_port()));
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir, http, h2c))
            .with_context(|| conf.display().to_string())?;
        let mut cmd = Command::new("nginx");
        cmd.arg("-c").arg(&conf).arg("-p").arg(dir);
        cmd.args(["-g", "daemon off; master_process off;"]);
        let nginx = Proc::spawn("nginx", cmd, dir)?;
        let mut cmd = Command::new("iperf3");
        cmd.args(["-s", "-B", "127.0.0.1", "-p", &iperf.port().to_string()]);
        let iperf_proc = Proc::spawn("iperf3", cmd, dir)?;
        for (name, addr) in [("nginx", http), ("nginx h2c", h2c), ("iperf3", iperf)] {
            wait_listening(addr, Duration::from_secs(10))
                .with_context(|| format!("{name} did not start (logs in {})", dir.display()))?;
        }
        Ok(Self {
            http,
            h2c,
            iperf,
            _nginx: nginx,
            _iperf: iperf_proc,
        })
    }
}

/// 127.0.0.1:`port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Waits until something accepts connections at `addr`.
pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing listening on {addr} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// One worker in the foreground, no access log, keep-alive connections never recycled (as in
/// the reference measurements of the peer proxies), enough connections for the idle test.
fn nginx_conf(dir: &Path, http: SocketAddr, h2c: SocketAddr) -> String {
    let body = "x".repeat(1024);
    let d = dir.display();
    format!(
        "worker_rlimit_nofile 65536;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 30000; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {d}/tmp;\n\
         \x20 keepalive_requests 100000000;\n\
         \x20 keepalive_timeout 600s;\n\
         \x20 http2_max_requests 100000000;\n\
         \x20 server {{ listen {http}; location = /1k {{ return 200 \"{body}\"; }} }}\n\
         \x20 server {{ listen {h2c} http2; location = /1k {{ return 200 \"{body}\"; }} }}\n\
         }}\n"
    )
}
