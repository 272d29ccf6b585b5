//! [`CaFixture`]: a real `moat-ca` on loopback, with its own root (optionally an
//! intermediate), its own token issuer, its own ports and its own temporary directory.
//!
//! Layout of [`CaFixture::dir`]:
//!
//! ```text
//! root/       moat-ca init        (ca.crt, ca.key, bundle.pem)
//! signing/    moat-ca intermediate (tls.crt, tls.key, ca.crt), only with an intermediate
//! jwks.json   the token issuer's public keys
//! tokens/     token files written for clients
//! logs/       ca.stderr (JSON logs, appended across restarts), ca.stdout
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use bytes::Bytes;
use moat_core::client::{CaClient, CaClientConfig, KeyAlgorithm};
use moat_core::{SpiffeId, TrustBundle, TrustDomain};

use crate::https::{self, Http1Client, Reply};
use crate::net::{self, Metrics};
use crate::proc::Proc;
use crate::token::{SigningKey, TokenIssuer, TokenSpec};

/// How long `serve` may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How a [`CaFixture`] is set up. `Default` gives a root CA for `cluster.local` with the
/// binary's own defaults (TTL, rate limits) and an ES256 token issuer.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// Trust domain passed to `moat-ca init`.
    pub trust_domain: String,
    /// Sign with an intermediate created by `moat-ca intermediate` (serve `--dir signing/`).
    pub intermediate: bool,
    /// `--cert-ttl` (e.g. `"6s"`); `None`: the binary's default.
    pub cert_ttl: Option<String>,
    /// Pass the hidden `--test-allow-short-ttl`.
    pub allow_short_ttl: bool,
    /// `--rate-limit`; `None`: the binary's default.
    pub rate_limit: Option<f64>,
    /// `--rate-burst`; `None`: the binary's default.
    pub rate_burst: Option<f64>,
    /// Also give the token issuer an RS256 key (generated with `openssl`), kid `rs256-1`.
    pub rsa_issuer_key: bool,
    /// `--token-audience`.
    pub audience: String,
    /// `--log-level`.
    pub log_level: String,
    /// Further `serve` arguments, e.g. `--dns-san ...` or `--shutdown-grace 2s`.
    pub extra_args: Vec<String>,
    /// Verify tokens offline against the fixture issuer's JWK Set (`--jwks-file`); when
    /// false the CA uses TokenReview (see [`CaOptions::token_review`]).
    pub jwks: bool,
    /// Environment variables of `serve`.
    pub env: Vec<(String, String)>,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            intermediate: false,
            cert_ttl: None,
            allow_short_ttl: false,
            rate_limit: None,
            rate_burst: None,
            rsa_issuer_key: false,
            audience: crate::token::DEFAULT_AUDIENCE.into(),
            log_level: "info".into(),
            extra_args: Vec::new(),
            jwks: true,
            env: Vec::new(),
        }
    }
}

impl CaOptions {
    /// Short-lived certificates (`--cert-ttl <ttl> --test-allow-short-ttl`).
    pub fn short_ttl(mut self, ttl: &str) -> Self {
        self.cert_ttl = Some(ttl.into());
        self.allow_short_ttl = true;
        self
    }

    /// Rate limits high enough never to matter.
    pub fn unlimited(mut self) -> Self {
        self.rate_limit = Some(1e9);
        self.rate_burst = Some(1e9);
        self
    }

    /// Verify tokens with the TokenReview API of `api` instead of the JWK Set.
    pub fn token_review(mut self, api: &crate::kube_api::FakeApiServer) -> Self {
        self.jwks = false;
        self.env.extend(api.env());
        self.extra_args.extend([
            "--service-account-dir".to_string(),
            api.service_account_dir().display().to_string(),
        ]);
        self
    }

    /// Adds `serve` arguments.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }
}

/// Runs `moat-ca` with `args` to completion (for `init`, `intermediate`, failing `serve`s).
pub fn run_ca<I, S>(args: I) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = ca_command(&crate::bin::try_binary("moat-ca")?);
    cmd.args(args);
    let shown = format!("{cmd:?}");
    cmd.output().with_context(|| format!("cannot run {shown}"))
}

/// Like [`run_ca`], but an error when the command fails.
pub fn run_ca_ok<I, S>(args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let out = run_ca(&args)?;
    if !out.status.success() {
        bail!(
            "moat-ca {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `moat-ca` command with no `MOAT_*` variables inherited from the caller's environment.
fn ca_command(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("MOAT_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

/// A running `moat-ca serve`, stopped when dropped.
pub struct CaFixture {
    dir: tempfile::TempDir,
    opts: CaOptions,
    bin: PathBuf,
    issuer: TokenIssuer,
    trust_domain: TrustDomain,
    listen: SocketAddr,
    admin: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    proc: Option<Proc>,
    starts: u32,
}

impl CaFixture {
    /// Creates the root (and intermediate), the token issuer, and starts `serve` on free
    /// loopback ports; returns once `/ready` answers 200.
    pub fn start(opts: CaOptions) -> anyhow::Result<Self> {
        let bin = crate::bin::try_binary("moat-ca")?;
        let dir = crate::temp_dir("ca")?;
        let trust_domain = TrustDomain::new(&opts.trust_domain)
            .map_err(|e| anyhow::anyhow!("trust domain {:?}: {e}", opts.trust_domain))?;
        let root = dir.path().join("root");
        run_ca_ok([
            "init".as_ref(),
            "--trust-domain".as_ref(),
            opts.trust_domain.as_ref(),
            "--dir".as_ref(),
            root.as_os_str(),
        ])?;
        if opts.intermediate {
            let signing = dir.path().join("signing");
            run_ca_ok([
                "intermediate".as_ref(),
                "--root-dir".as_ref(),
                root.as_os_str(),
                "--out".as_ref(),
                signing.as_os_str(),
            ])?;
        }
        let mut keys = vec![SigningKey::es256("es256-1")?];
        if opts.rsa_issuer_key {
            keys.push(SigningKey::rs256("rs256-1")?);
        }
        let issuer = TokenIssuer::new(
            dir.path().join("jwks.json"),
            crate::token::DEFAULT_ISSUER,
            &opts.audience,
            keys,
        )?;
        let bundle = std::fs::read(root.join("bundle.pem")).context("reading bundle.pem")?;
        let tls = https::client_config(&bundle)?;
        let mut me = Self {
            dir,
            opts,
            bin,
            issuer,
            trust_domain,
            listen: net::free_addr(),
            admin: net::free_addr(),
            tls,
            proc: None,
            starts: 0,
        };
        // A port handed out by free_port() can still be taken by someone else before the CA
        // binds it; try fresh ports a few times before giving up.
        let mut attempt = 0;
        loop {
            match me.spawn_serve() {
                Ok(()) => return Ok(me),
                Err(e) if attempt < 3 && format!("{e:#}").contains("cannot listen") => {
                    attempt += 1;
                    me.listen = net::free_addr();
                    me.admin = net::free_addr();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The `serve` arguments of this fixture.
    pub fn serve_args(&self) -> Vec<String> {
        let o = &self.opts;
        let mut a: Vec<String> = vec![
            "serve".into(),
            "--dir".into(),
            self.signing_dir().display().to_string(),
            "--listen".into(),
            self.listen.to_string(),
            "--admin-listen".into(),
            self.admin.to_string(),
            "--token-audience".into(),
            o.audience.clone(),
            "--log-format".into(),
            "json".into(),
            "--log-level".into(),
            o.log_level.clone(),
        ];
        if o.jwks {
            a.extend([
                "--jwks-file".into(),
                self.issuer.jwks_path().display().to_string(),
                "--token-issuer".into(),
                self.issuer.name().into(),
            ]);
        }
        if let Some(ttl) = &o.cert_ttl {
            a.extend(["--cert-ttl".into(), ttl.clone()]);
        }
        if o.allow_short_ttl {
            a.push("--test-allow-short-ttl".into());
        }
        if let Some(r) = o.rate_limit {
            a.extend(["--rate-limit".into(), r.to_string()]);
        }
        if let Some(b) = o.rate_burst {
            a.extend(["--rate-burst".into(), b.to_string()]);
        }
        a.extend(o.extra_args.iter().cloned());
        a
    }

    fn spawn_serve(&mut self) -> anyhow::Result<()> {
        let mut cmd = ca_command(&self.bin);
        cmd.args(self.serve_args());
        cmd.envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        let mut proc = Proc::spawn("ca", cmd, &self.dir.path().join("logs"))?;
        self.starts += 1;
        let log_start = proc.stderr().len();
        let deadline = Instant::now() + READY_TIMEOUT;
        let admin = self.admin.to_string();
        loop {
            if let Some(status) = proc.try_status()? {
                let stderr = proc.stderr();
                bail!(
                    "moat-ca serve exited ({status}) before becoming ready: {}",
                    stderr.get(log_start..).unwrap_or(&stderr)
                );
            }
            match net::http_get(&admin, "/ready", Duration::from_millis(500)) {
                Ok(r) if r.status == 200 => break,
                _ if Instant::now() >= deadline => {
                    bail!("moat-ca serve not ready after {READY_TIMEOUT:?}");
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        self.proc = Some(proc);
        Ok(())
    }

    /// Stops the CA with SIGTERM and returns its exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let proc = self.proc.as_mut().context("the CA is not running")?;
        proc.terminate(Duration::from_secs(20))
    }

    /// Stops the CA if it runs, then starts it again on the same ports with the same
    /// directory (same keys, same issuer).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(p) = self.proc.as_mut() {
            if p.is_running() {
                p.terminate(Duration::from_secs(20))?;
            }
        }
        self.spawn_serve()
    }

    /// How many times `serve` was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// The running (or last) `serve` process.
    pub fn proc(&mut self) -> anyhow::Result<&mut Proc> {
        self.proc.as_mut().context("the CA was never started")
    }

    /// PID of `serve`.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The CA's stderr so far, every start included.
    pub fn logs(&self) -> String {
        self.proc.as_ref().map(Proc::stderr).unwrap_or_default()
    }

    /// The CA's JSON log lines so far.
    pub fn json_logs(&self) -> Vec<serde_json::Value> {
        crate::logs::json_lines(&self.logs())
    }

    /// Base URL of the API, `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.listen)
    }

    /// API address.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// Admin address (`/metrics`, `/ready`, `/live`), plain HTTP.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The fixture's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The root written by `moat-ca init`.
    pub fn root_dir(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The directory `serve` signs from (the intermediate's, or the root's).
    pub fn signing_dir(&self) -> PathBuf {
        if self.opts.intermediate {
            self.dir.path().join("signing")
        } else {
            self.root_dir()
        }
    }

    /// The root trust bundle (`root/bundle.pem`).
    pub fn bundle_path(&self) -> PathBuf {
        self.root_dir().join("bundle.pem")
    }

    /// Contents of the trust bundle.
    pub fn bundle_pem(&self) -> anyhow::Result<String> {
        std::fs::read_to_string(self.bundle_path()).context("reading bundle.pem")
    }

    /// The trust bundle, parsed.
    pub fn bundle(&self) -> anyhow::Result<TrustBundle> {
        Ok(TrustBundle::from_pem(self.bundle_pem()?.as_bytes())?)
    }

    /// Options the fixture was started with.
    pub fn options(&self) -> &CaOptions {
        &self.opts
    }

    /// The token issuer the CA trusts.
    pub fn issuer(&self) -> &TokenIssuer {
        &self.issuer
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> anyhow::Result<SpiffeId> {
        SpiffeId::workload(&self.trust_domain, namespace, service_account)
            .map_err(|e| anyhow::anyhow!("{namespace}/{service_account}: {e}"))
    }

    /// A valid token for `<ns>/<sa>`.
    pub fn token(&self, namespace: &str, service_account: &str) -> anyhow::Result<String> {
        self.issuer.token(namespace, service_account)
    }

    /// A token for `spec`.
    pub fn mint(&self, spec: &TokenSpec) -> anyhow::Result<String> {
        self.issuer.mint(spec)
    }

    /// Writes a valid token for `<ns>/<sa>` to `tokens/<ns>.<sa>` and returns the path.
    pub fn write_token(&self, namespace: &str, service_account: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir.path().join("tokens");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{namespace}.{service_account}"));
        std::fs::write(&path, self.token(namespace, service_account)?)?;
        Ok(path)
    }

    /// Client configuration for workload `<ns>/<sa>` (token file written, 10 s timeout).
    pub fn client_config(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> anyhow::Result<CaClientConfig> {
        Ok(CaClientConfig {
            url: self.url().parse()?,
            token_file: self.write_token(namespace, service_account)?,
            identity: self.spiffe_id(namespace, service_account)?,
            key_algorithm: KeyAlgorithm::default(),
            dns_names: Vec::new(),
            timeout: Duration::from_secs(10),
        })
    }

    /// The trust bundle as the shared, swappable form `CaClient` and the manager take.
    pub fn shared_bundle(&self) -> anyhow::Result<Arc<ArcSwap<TrustBundle>>> {
        Ok(Arc::new(ArcSwap::from_pointee(self.bundle()?)))
    }

    /// A real [`CaClient`] with `cfg`, trusting this CA's bundle.
    pub fn client(&self, cfg: CaClientConfig) -> anyhow::Result<CaClient> {
        Ok(CaClient::new(
            cfg,
            self.shared_bundle()?,
            moat_core::tls::provider(),
        )?)
    }

    /// TLS client configuration trusting this CA's bundle.
    pub fn tls_config(&self) -> Arc<rustls::ClientConfig> {
        self.tls.clone()
    }

    /// A new keep-alive HTTP/1.1 connection to the API.
    pub async fn connect(&self) -> anyhow::Result<Http1Client> {
        Http1Client::connect(self.listen, self.tls.clone()).await
    }

    /// A new raw TLS connection to the API.
    pub async fn connect_raw(&self) -> anyhow::Result<https::RawConn> {
        https::RawConn::connect(self.listen, self.tls.clone()).await
    }

    /// `POST /v1/certificates` with `body` on a new connection.
    pub async fn post(&self, token: Option<&str>, body: impl Into<Bytes>) -> anyhow::Result<Reply> {
        let mut c = self.connect().await?;
        c.send(https::certificate_request(token, body)?).await
    }

    /// `POST /v1/certificates` with `{"csr": csr_pem}` on a new connection.
    pub async fn request_certificate(&self, token: &str, csr_pem: &str) -> anyhow::Result<Reply> {
        self.post(Some(token), https::csr_body(csr_pem)).await
    }

    /// Any request on a new connection.
    pub async fn send(
        &self,
        req: http::Request<http_body_util::Full<Bytes>>,
    ) -> anyhow::Result<Reply> {
        let mut c = self.connect().await?;
        c.send(req).await
    }

    /// The CA's current metrics.
    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        net::scrape(&self.admin.to_string())
    }

    /// One metric value (0 when absent).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> anyhow::Result<f64> {
        Ok(self.metrics()?.value(name, labels))
    }
}

impl Drop for CaFixture {
    fn drop(&mut self) {
        // Stop the CA before its directory goes away (its logs are in there).
        drop(self.proc.take());
        if crate::keep_requested() {
            self.dir.disable_cleanup(true);
            eprintln!("moat-e2e: CA fixture kept in {}", self.dir.path().display());
        }
    }
}
