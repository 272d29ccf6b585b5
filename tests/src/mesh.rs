//! [`ProxyFixture`]: a real `moat-proxy run` on loopback with explicit routes, getting its
//! identity from a [`CaFixture`]; and [`backend`] apps for it to front.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::ca::CaFixture;
use crate::net::{self, Metrics};
use crate::proc::Proc;

/// How long a proxy may take to obtain its first certificate.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How a [`ProxyFixture`] runs.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Workload namespace.
    pub namespace: String,
    /// Workload service account.
    pub service_account: String,
    /// Explicit routes (`listen=..,connect=..,port=..[,identity=..]`).
    pub routes: Vec<String>,
    /// Policy YAML written to the policy file (none: the file does not exist → built-in).
    pub policy: Option<String>,
    /// Further `run` arguments.
    pub extra_args: Vec<String>,
    /// The inbound listener address (default: a free loopback port).
    pub inbound: Option<SocketAddr>,
    /// App ports on 127.0.0.1 that peers may open (`--inbound-ports`); none by default.
    pub expose: Vec<u16>,
}

impl ProxyOptions {
    /// A workload `<ns>/<sa>` with no routes and the built-in policy.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            routes: Vec::new(),
            policy: None,
            extra_args: Vec::new(),
            inbound: None,
            expose: Vec::new(),
        }
    }

    /// Lets peers open these app ports on 127.0.0.1 (the proxy runs in explicit-route mode).
    pub fn expose(mut self, ports: &[u16]) -> Self {
        self.expose.extend_from_slice(ports);
        self
    }

    /// Listens for peer sidecars on `addr`, so a client can be configured before this starts.
    pub fn inbound(mut self, addr: SocketAddr) -> Self {
        self.inbound = Some(addr);
        self
    }

    /// Adds a route.
    pub fn route(
        mut self,
        listen: SocketAddr,
        connect: SocketAddr,
        port: u16,
        identity: Option<&str>,
    ) -> Self {
        let mut r = format!("listen={listen},connect={connect},port={port}");
        if let Some(id) = identity {
            r.push_str(&format!(",identity={id}"));
        }
        self.routes.push(r);
        self
    }

    /// Sets the policy file's contents.
    pub fn policy(mut self, yaml: &str) -> Self {
        self.policy = Some(yaml.into());
        self
    }

    /// Adds `run` arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// A running sidecar, stopped when dropped.
pub struct ProxyFixture {
    dir: tempfile::TempDir,
    proc: Proc,
    inbound: SocketAddr,
    admin: SocketAddr,
    policy_path: PathBuf,
}

impl ProxyFixture {
    /// Starts the proxy and waits until `/ready` (it holds a certificate).
    pub fn start(ca: &CaFixture, opts: ProxyOptions) -> anyhow::Result<Self> {
        let bin = crate::bin::try_binary("moat-proxy")?;
        let dir = crate::temp_dir("proxy")?;
        let token = ca.write_token(&opts.namespace, &opts.service_account)?;
        let policy_path = dir.path().join("policy.yaml");
        if let Some(p) = &opts.policy {
            std::fs::write(&policy_path, p)?;
        }
        let inbound = opts.inbound.unwrap_or_else(net::free_addr);
        let admin = net::free_addr();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--trust-domain".into(),
            ca.trust_domain().to_string(),
            "--namespace".into(),
            opts.namespace.clone(),
            "--service-account".into(),
            opts.service_account.clone(),
            "--ca-url".into(),
            ca.url(),
            "--token-file".into(),
            token.display().to_string(),
            "--trust-bundle".into(),
            ca.bundle_path().display().to_string(),
            "--policy".into(),
            policy_path.display().to_string(),
            "--inbound-listen".into(),
            inbound.to_string(),
            "--inbound-target".into(),
            "127.0.0.1".into(),
            "--outbound-listen".into(),
            "off".into(),
            "--admin-listen".into(),
            admin.to_string(),
            "--log-format".into(),
            "json".into(),
        ];
        if !opts.expose.is_empty() {
            let ports: Vec<String> = opts.expose.iter().map(u16::to_string).collect();
            args.push("--inbound-ports".into());
            args.push(ports.join(","));
        }
        for r in &opts.routes {
            args.push("--route".into());
            args.push(r.clone());
        }
        args.extend(opts.extra_args.iter().cloned());
        let name = format!("proxy-{}", opts.service_account);
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(&args);
        // Keep tests independent of the caller's environment.
        for (k, _) in std::env::vars() {
            if k.starts_with("MOAT_") {
                cmd.env_remove(k);
            }
        }
        let mut proc = Proc::spawn(&name, cmd, &dir.path().join("logs"))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = proc.try_status()? {
                bail!(
                    "moat-proxy exited ({status}) before becoming ready: {}",
                    proc.stderr()
                );
            }
            match net::http_get(&admin.to_string(), "/ready", Duration::from_millis(500)) {
                Ok(r) if r.status == 200 => break,
                _ if Instant::now() >= deadline => {
                    bail!(
                        "moat-proxy not ready after {READY_TIMEOUT:?}: {}",
                        proc.stderr_tail(20)
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(25)),
            }
        }
        Ok(Self {
            dir,
            proc,
            inbound,
            admin,
            policy_path,
        })
    }

    /// The inbound listener (peer sidecars connect here).
    pub fn inbound(&self) -> SocketAddr {
        self.inbound
    }

    /// The proxy's PID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The admin listener, as `host:port`.
    pub fn admin(&self) -> String {
        self.admin.to_string()
    }

    /// Scrapes `/metrics`.
    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        net::scrape(&self.admin())
    }

    /// `GET /identity` as JSON.
    pub fn identity(&self) -> anyhow::Result<serde_json::Value> {
        let r = net::http_get(&self.admin(), "/identity", Duration::from_secs(2))?;
        serde_json::from_str(&r.body).context("/identity is not JSON")
    }

    /// Replaces the policy file atomically (write + rename, like a ConfigMap swap).
    pub fn set_policy(&self, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path().join(".policy.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.policy_path)?;
        Ok(())
    }

    /// The policy file path.
    pub fn policy_path(&self) -> &Path {
        &self.policy_path
    }

    /// The process.
    pub fn proc(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// The proxy's JSON log lines so far.
    pub fn json_logs(&self) -> Vec<serde_json::Value> {
        self.proc.json_logs()
    }

    /// Waits until `cond(metrics)` holds or `timeout` passes.
    pub fn wait_metrics(
        &self,
        timeout: Duration,
        cond: impl Fn(&Metrics) -> bool,
    ) -> anyhow::Result<Metrics> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.metrics()?;
            if cond(&m) {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                return Ok(m);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Small real apps for proxies to front: an HTTP/1.1 + h2c server, a TCP echo server, and a
/// server-speaks-first TCP server.
pub mod backend {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// Body every plain `GET /` answers with.
    pub const HELLO: &str = "hello from the backend\n";
    /// Greeting of the server-speaks-first app.
    pub const GREETING: &[u8] = b"220 moat-test ESMTP ready\r\n";

    /// Starts the HTTP app: `/` → [`HELLO`], `/slow?ms=N` → waits N ms, `/status/N` → status
    /// N, anything else echoes the path. Serves HTTP/1.1 and h2c (prior knowledge).
    pub async fn http() -> SocketAddr {
        http_on(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind the HTTP backend")
    }

    /// Like [`http`], on a given address (e.g. `0.0.0.0:8080` inside a pod namespace).
    pub async fn http_on(addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let l = TcpListener::bind(addr).await?;
        let addr = l.local_addr()?;
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: http::Request<hyper::body::Incoming>| async move {
                            let path = req.uri().path().to_string();
                            let query = req.uri().query().unwrap_or("").to_string();
                            let (status, body) = if path == "/" {
                                (200, HELLO.to_string())
                            } else if path == "/slow" {
                                let ms = query
                                    .strip_prefix("ms=")
                                    .and_then(|v| v.parse().ok())
                                    .unwrap_or(1000);
                                tokio::time::sleep(Duration::from_millis(ms)).await;
                                (200, format!("slept {ms} ms\n"))
                            } else if let Some(code) = path.strip_prefix("/status/") {
                                (code.parse().unwrap_or(500), format!("status {code}\n"))
                            } else {
                                (200, format!("path {path}\n"))
                            };
                            let mut r = http::Response::new(Full::new(Bytes::from(body)));
                            *r.status_mut() = http::StatusCode::from_u16(status)
                                .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
                            Ok::<_, Infallible>(r)
                        },
                    );
                    serve_app_connection(s, svc).await;
                });
            }
        });
        Ok(addr)
    }

    /// Serves one app connection (HTTP/1.1 or h2c) until it ends. Half-closes as nginx and
    /// httpd do: a client that sends its request and FIN at once still gets the answer
    /// (hyper's default drops it when EOF wins the race).
    pub async fn serve_app_connection<S, B>(s: TcpStream, svc: S)
    where
        S: hyper::service::Service<
                http::Request<hyper::body::Incoming>,
                Response = http::Response<B>,
            > + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().half_close(true);
        let _ = builder.serve_connection(TokioIo::new(s), svc).await;
    }

    /// Starts a TCP echo app.
    pub async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    /// Starts a server-speaks-first app: sends [`GREETING`] on accept, then echoes.
    pub async fn greeter() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    if s.write_all(GREETING).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }
}
