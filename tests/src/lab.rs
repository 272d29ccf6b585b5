//! The mesh lab: Moat as a Kubernetes cluster would run it, on one machine, with every pod a
//! network namespace (root only).
//!
//! # What is real
//!
//! * **Network**: a node namespace holding bridge `br0` and the lab's gateway address, pod
//!   namespaces attached by veth pairs, each with an address of the pod CIDR (see
//!   [`crate::netns`]). Pods' default route points at the node namespace, which has no way out:
//!   no packet leaves the lab's namespaces.
//! * **Control plane**, in the node namespace: the real `moat-ca serve` (`https://<gw>:8443`,
//!   admin `:9090`), trusting a test token issuer ([`TokenIssuer`]) through `--jwks-file`; and
//!   the real `moat-injector serve` (`https://<gw>:9443/inject`, admin `:9091`) with a serving
//!   certificate the lab generates, configured with `--ca-url https://<gw>:8443`,
//!   `--mesh-networks <lab cidr>`, `--trust-bundle <bundle.pem>`, `--trust-domain
//!   cluster.local`.
//! * **Pods** are produced the way Kubernetes produces them:
//!   1. the test writes a `k8s_openapi` [`Pod`] (service account, containers with ports and
//!      an HTTP readiness probe — see [`server_pod`], [`client_pod`]);
//!   2. the lab, acting as the API server, wraps it in an `admission.k8s.io/v1` AdmissionReview
//!      (operation `CREATE`) and POSTs it over HTTPS to the injector's `/inject`; the returned
//!      base64 RFC 6902 patch is applied with the `json-patch` crate;
//!   3. the lab, acting as the kubelet, runs what the *patched* spec says: volumes are
//!      materialised (projected service-account tokens minted by the lab's issuer with the
//!      audience and expiry the spec asks for; ConfigMaps from the lab's store; emptyDirs);
//!      init containers run to completion in order, native sidecars (init containers with
//!      `restartPolicy: Always`) are started and their startup probe awaited before the next
//!      init container; then the app containers start, and every readiness probe must pass.
//!      Each container runs with the `command`/`args` of the spec (`$(VAR)` expanded like the
//!      kubelet does, `$$` → `$`), the environment of the spec (plain values, and the
//!      downward-API `fieldRef`s `metadata.name`, `metadata.namespace`,
//!      `spec.serviceAccountName`, `spec.nodeName`, `status.podIP`, `status.hostIP`) and the
//!      user, group, capabilities and no-new-privileges its `securityContext` gives, applied by
//!      `setpriv` inside the pod's namespace (`runAsNonRoot` is checked). Images map to local
//!      programs: an image named `.../moat-proxy:<tag>` is `target/release/moat-proxy`
//!      (entrypoint `moat-proxy`); [`SERVER_IMAGE`] is the lab's in-process app server
//!      ([`AppServer`]: HTTP on the container ports named `http*`, TCP echo on the others);
//!      [`CLIENT_IMAGE`] runs nothing (the test acts as that pod's app by entering its
//!      namespace, see [`block_on_in`]). Probes are performed from the node namespace against
//!      the pod's IP, like a kubelet's.
//!
//! # The one place the lab differs from a kubelet: volume mounts
//!
//! There is no mount namespace per container. Each volume of a pod is a host directory,
//! `<lab dir>/pods/<pod>/volumes/<volume name>/`, shared by the containers that mount it, and
//! for each container:
//!
//! * a `volumeMount`'s `mountPath` stands for that directory (`subPath` is not supported);
//! * every environment value and every command/argument that **equals a mountPath or starts
//!   with `<mountPath>/`** is rewritten to the host directory (longest mountPath first), e.g.
//!   `MOAT_TOKEN_FILE=/var/run/secrets/moat/token` becomes
//!   `<lab dir>/pods/a/volumes/moat-token/token` and `MOAT_POLICY=/etc/moat/policy/policy.yaml`
//!   becomes `<lab dir>/pods/a/volumes/moat-policy/policy.yaml`.
//!
//! Nothing else is translated: a path the program derives on its own would not be found.
//!
//! # Smaller simplifications (none changes what Moat sees)
//!
//! * `readOnlyRootFilesystem`, seccomp profiles and resource requests/limits are not
//!   enforced (no container runtime); `readOnly` mounts are not enforced either.
//! * Probes are polled every 100 ms rather than every `periodSeconds`, so pods become ready
//!   quickly; the deadline still follows the spec (capped at [`PROBE_DEADLINE_CAP`]).
//! * A ConfigMap change reaches the pods' volumes at once (a kubelet takes up to a minute);
//!   files are replaced atomically (write, then rename), as the kubelet's symlink swap does.
//! * Projected tokens are minted once per pod and not refreshed: lab runs are far shorter
//!   than the 1-hour tokens the injector asks for.
//! * App containers run in this process, as root, from the images above.
//! * Expected peer identities (`MOAT_PEER_IDENTITIES`) cannot be expressed through the
//!   injector; [`DeployOptions::sidecar_env`] adds such variables to the `moat-proxy`
//!   container's environment after injection (like a kustomize patch on the injected pod).
//! * There is no Kubernetes API server, so a lab started [`LabOptions::with_discovery`] runs
//!   moat-destination's own API and index in this process (node namespace, SVID from the
//!   lab's CA) and feeds the index the objects a watch would list: each pod as it is deployed,
//!   and the Services and address changes a test publishes. Without it the injector writes
//!   `--destination-addr off`. The cluster suite runs the real watch.
//!
//! # Teardown
//!
//! [`MeshLab`] stops every process it started (apps, sidecars via `POST /shutdown` and
//! SIGTERM, then SIGKILL for stragglers, the injector, the CA, packet captures) and deletes
//! every namespace when dropped, even during a panic. [`MeshLab::shutdown`] does the same and
//! then checks that nothing is left: no namespace with the lab's prefix in `ip netns list`
//! and no process it started still alive.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::ffi::OsString;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, HTTPGetAction, Pod, PodSpec, Probe, SecurityContext, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::https::{Http1Client, Reply};
use crate::net::Metrics;
use crate::netns::{Lab, Netns};
use crate::proc::{Proc, SIGINT, SIGKILL, SIGTERM};
use crate::token::{TokenIssuer, TokenSpec};

/// Kubernetes namespace of the lab's workloads.
pub const NAMESPACE: &str = "shop";
/// Trust domain of the lab's CA and sidecars.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Image the injector is told to use for `moat-init` and `moat-proxy`; the lab runs
/// `target/release/moat-proxy` for it.
pub const PROXY_IMAGE: &str = "registry.moat.test/moat-mesh/moat-proxy:lab";
/// The lab's app server image: [`AppServer`] in the pod's namespace.
pub const SERVER_IMAGE: &str = "registry.moat.test/lab/app-server:1";
/// The lab's client image: runs nothing; the test is that pod's app.
pub const CLIENT_IMAGE: &str = "registry.moat.test/lab/client:1";
/// Container name of the app in [`server_pod`] and [`client_pod`].
pub const APP_CONTAINER: &str = "app";
/// The app server's main HTTP port (container port `http`).
pub const HTTP_PORT: u16 = 8080;
/// A second HTTP port (container port `http-alt`).
pub const HTTP_ALT_PORT: u16 = 8081;
/// The app server's TCP echo port (container port `echo`).
pub const ECHO_PORT: u16 = 9000;
/// The sidecar's admin port (`/metrics`, `/ready`, `/identity`, `/app-health/...`).
pub const ADMIN_PORT: u16 = 15020;
/// `moat-ca` API port on the node.
pub const CA_PORT: u16 = 8443;
/// `moat-ca` admin port on the node.
pub const CA_ADMIN_PORT: u16 = 9090;
/// `moat-injector` webhook port on the node.
pub const INJECTOR_PORT: u16 = 9443;
/// `moat-injector` admin port on the node.
pub const INJECTOR_ADMIN_PORT: u16 = 9091;
/// The lab's discovery API port on the node ([`LabOptions::with_discovery`]).
pub const DESTINATION_PORT: u16 = 8086;
/// The Service network (cluster IPs) of a lab with discovery.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// Prefix length of the lab network.
pub const PREFIX_LEN: u8 = 24;
/// Longest a probe is waited for, whatever the spec allows.
pub const PROBE_DEADLINE_CAP: Duration = Duration::from_secs(45);
/// `PATH` of every container.
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Capabilities a container runtime grants by default (containerd / Docker).
const DEFAULT_CAPS: [&str; 14] = [
    "chown",
    "dac_override",
    "fsetid",
    "fowner",
    "mknod",
    "net_raw",
    "setgid",
    "setuid",
    "setfcap",
    "setpcap",
    "net_bind_service",
    "sys_chroot",
    "kill",
    "audit_write",
];

// ---------------------------------------------------------------------------------------------
// Pod specs

fn port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(number),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn pod_meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NAMESPACE.into()),
        labels: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
        ..Default::default()
    }
}

/// A server pod: service account `service_account`, container [`APP_CONTAINER`] running
/// [`SERVER_IMAGE`] with ports `http` ([`HTTP_PORT`]), `http-alt` ([`HTTP_ALT_PORT`]) and
/// `echo` ([`ECHO_PORT`]), and a readiness probe `GET /healthz` on the named port `http`.
pub fn server_pod(name: &str, service_account: &str) -> Pod {
    Pod {
        metadata: pod_meta(name),
        spec: Some(PodSpec {
            service_account_name: Some(service_account.into()),
            containers: vec![Container {
                name: APP_CONTAINER.into(),
                image: Some(SERVER_IMAGE.into()),
                ports: Some(vec![
                    port("http", HTTP_PORT),
                    port("http-alt", HTTP_ALT_PORT),
                    port("echo", ECHO_PORT),
                ]),
                readiness_probe: Some(Probe {
                    http_get: Some(HTTPGetAction {
                        path: Some("/healthz".into()),
                        port: IntOrString::String("http".into()),
                        scheme: Some("HTTP".into()),
                        ..Default::default()
                    }),
                    period_seconds: Some(2),
                    failure_threshold: Some(10),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// A client pod: service account `service_account`, container [`APP_CONTAINER`] running
/// [`CLIENT_IMAGE`] (no ports, no probes; the test acts as its app).
pub fn client_pod(name: &str, service_account: &str) -> Pod {
    Pod {
        metadata: pod_meta(name),
        spec: Some(PodSpec {
            service_account_name: Some(service_account.into()),
            containers: vec![Container {
                name: APP_CONTAINER.into(),
                image: Some(CLIENT_IMAGE.into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

/// `pod` labelled `moat.dev/inject: disabled`: the injector (allowed to by
/// `--allow-opt-out`) admits it unchanged, so it runs outside the mesh (no sidecar, no
/// redirection).
pub fn unmeshed(mut pod: Pod) -> Pod {
    pod.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("moat.dev/inject".into(), "disabled".into());
    pod
}

/// `spiffe://cluster.local/ns/shop/sa/<service_account>`.
pub fn spiffe_id(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service_account}")
}

/// The `ConfigMap moat-policy` contents for a policy.
pub fn policy_config_map(yaml: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("policy.yaml".to_string(), yaml.to_string())])
}

// ---------------------------------------------------------------------------------------------
// Options and handles

/// How a [`MeshLab`] is built.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Short tag (letters/digits, at most 4) keeping namespace names apart.
    pub tag: String,
    /// The pod network `<a>.<b>.<c>.0/24`; the node is `.1`.
    pub subnet: [u8; 3],
    /// `moat-ca serve --cert-ttl` with `--test-allow-short-ttl` (e.g. `"1m"`); `None`: the
    /// CA's default.
    pub cert_ttl: Option<String>,
    /// Run the discovery service ([`crate::discovery::LabDiscovery`]): sidecars then pin
    /// every mesh destination's identity from it, and reach Services in [`SERVICE_CIDR`].
    pub discovery: bool,
}

impl LabOptions {
    /// A lab tagged `tag` on `<subnet>.0/24` with the CA's default certificate lifetime.
    pub fn new(tag: &str, subnet: [u8; 3]) -> Self {
        Self {
            tag: tag.into(),
            subnet,
            cert_ttl: None,
            discovery: false,
        }
    }

    /// With the discovery service.
    pub fn with_discovery(mut self) -> Self {
        self.discovery = true;
        self
    }

    /// Short-lived certificates.
    pub fn cert_ttl(mut self, ttl: &str) -> Self {
        self.cert_ttl = Some(ttl.into());
        self
    }
}

/// Extra settings of one deployment, beyond the pod spec.
#[derive(Debug, Clone, Default)]
pub struct DeployOptions {
    /// Environment variables set on the `moat-proxy` container after injection (replacing
    /// any of the same name), e.g. `MOAT_PEER_IDENTITIES`, which the injector cannot express.
    pub sidecar_env: Vec<(String, String)>,
}

impl DeployOptions {
    /// Requires `identity` of whoever answers at `ip` (`MOAT_PEER_IDENTITIES`).
    pub fn expect_peer(mut self, ip: Ipv4Addr, identity: &str) -> Self {
        let entry = format!("{ip}={identity}");
        match self
            .sidecar_env
            .iter_mut()
            .find(|(k, _)| k == "MOAT_PEER_IDENTITIES")
        {
            Some((_, v)) => {
                v.push(',');
                v.push_str(&entry);
            }
            None => self
                .sidecar_env
                .push(("MOAT_PEER_IDENTITIES".into(), entry)),
        }
        self
    }
}

/// What the injector answered for a pod.
#[derive(Debug, Clone)]
pub struct AdmissionOutcome {
    /// Whether a patch came back (the pod was injected).
    pub patched: bool,
    /// Number of patch operations.
    pub operations: usize,
    /// Admission warnings.
    pub warnings: Vec<String>,
}

/// A deployed pod, as tests refer to it (cheap to clone).
#[derive(Debug, Clone)]
pub struct PodHandle {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Its network namespace.
    pub netns: Netns,
    /// `status.podIP`.
    pub ip: Ipv4Addr,
    /// Whether it runs a sidecar.
    pub meshed: bool,
    /// The SPIFFE ID its sidecar should hold.
    pub spiffe_id: String,
    /// What the injector answered.
    pub admission: AdmissionOutcome,
    /// The pod as run (after admission), JSON.
    pub spec_file: PathBuf,
    /// The sidecar's stderr (JSON logs), when meshed.
    pub sidecar_log: Option<PathBuf>,
}

impl PodHandle {
    /// `<pod ip>:<port>`.
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.ip, port))
    }

    /// The sidecar's `/metrics`, read over the pod's loopback.
    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        self.netns
            .within(|| crate::net::scrape(&format!("127.0.0.1:{ADMIN_PORT}")))
            .with_context(|| format!("metrics of pod {}", self.name))
    }

    /// The sidecar's `/identity`.
    pub fn identity(&self) -> anyhow::Result<Value> {
        let r = self.netns.within(|| {
            crate::net::http_get(
                &format!("127.0.0.1:{ADMIN_PORT}"),
                "/identity",
                Duration::from_secs(3),
            )
        })?;
        if r.status != 200 {
            bail!("/identity of {} answered {}", self.name, r.status);
        }
        serde_json::from_str(&r.body).with_context(|| format!("/identity of {}", self.name))
    }

    /// The serial number of the sidecar's current certificate.
    pub fn serial(&self) -> anyhow::Result<String> {
        let v = self.identity()?;
        v.get("serial")
            .and_then(Value::as_str)
            .map(str::to_string)
            .with_context(|| format!("/identity of {} has no serial: {v}", self.name))
    }

    /// Whether the sidecar's `/ready` answers 200.
    pub fn ready(&self) -> bool {
        self.netns
            .within(|| {
                Ok(crate::net::http_get(
                    &format!("127.0.0.1:{ADMIN_PORT}"),
                    "/ready",
                    Duration::from_secs(2),
                )?
                .status
                    == 200)
            })
            .unwrap_or(false)
    }

    /// The sidecar's JSON log lines so far.
    pub fn sidecar_logs(&self) -> Vec<Value> {
        self.sidecar_log
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .map(|b| crate::logs::json_lines(&String::from_utf8_lossy(&b)))
            .unwrap_or_default()
    }

    /// Waits until `metric{labels}` (summed) reaches at least `at_least`; returns the value.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        at_least: f64,
        timeout: Duration,
    ) -> anyhow::Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metrics()?.value(name, labels);
            if v >= at_least {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!(
                    "sidecar of pod {}: {name}{labels:?} is {v} after {timeout:?}, expected at least {at_least}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lab

/// A volume made from a ConfigMap: its directory and the keys it projects.
struct ConfigMapVolume {
    name: String,
    dir: PathBuf,
    /// `(key, path)` when the volume lists `items`; every key otherwise.
    items: Option<Vec<(String, String)>>,
}

struct PodRuntime {
    handle: PodHandle,
    spec: Pod,
    /// ConfigMap volumes to keep in sync.
    config_maps: Vec<ConfigMapVolume>,
    procs: Vec<Proc>,
    apps: Vec<AppServer>,
}

/// A running mesh lab: namespaces, CA, injector and pods. Everything is torn down on drop.
pub struct MeshLab {
    // Dropped in this order by `teardown`; the fields below keep what it needs.
    pods: Vec<PodRuntime>,
    extra_procs: Vec<Proc>,
    injector: Option<Proc>,
    discovery: Option<crate::discovery::LabDiscovery>,
    ca: Option<Proc>,
    ca_args: Vec<OsString>,
    net: Option<Lab>,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    issuer: TokenIssuer,
    webhook_tls: Arc<rustls::ClientConfig>,
    bundle_path: PathBuf,
    config_maps: BTreeMap<String, BTreeMap<String, String>>,
    namespaces_before: Vec<String>,
    prefix: String,
    cidr: String,
    gateway: Ipv4Addr,
    reviews: u64,
    keep: bool,
    torn_down: bool,
}

/// What [`MeshLab::shutdown`] found.
#[derive(Debug, Clone, Default)]
pub struct Teardown {
    /// Processes that were still running and were stopped.
    pub stopped: usize,
    /// Namespaces deleted.
    pub namespaces: usize,
    /// Namespaces of this lab still listed by `ip netns list` (must be empty).
    pub leftover_namespaces: Vec<String>,
    /// Processes started by the lab still alive (must be empty).
    pub leftover_processes: Vec<u32>,
}

fn chmod(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Creates `dir` (and parents) readable by every user: the sidecar runs as uid 7777.
fn mkdir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    chmod(dir, 0o755)
}

/// Writes `data` to `path` atomically (temporary file, then rename), mode 0644.
fn write_file(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
    chmod(&tmp, 0o644)?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

fn tool(name: &str) -> anyhow::Result<PathBuf> {
    crate::tools::find_tool(name)
        .with_context(|| format!("the lab needs `{name}` in PATH (tests/setup.sh installs it)"))
}

/// A command run inside `ns` with a clean environment (only `PATH`).
fn clean_command(ns: &Netns, program: &Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new(tool("ip")?);
    cmd.args(["netns", "exec", &ns.name])
        .arg(program)
        .env_clear()
        .env("PATH", CONTAINER_PATH);
    Ok(cmd)
}

/// Polls `GET http://<addr><path>` from inside `ns` until it answers 200; fails early when
/// `proc` exits.
fn wait_http_ok(
    ns: &Netns,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    mut proc: Option<&mut Proc>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = proc.as_deref_mut() {
            if let Some(status) = p.try_status()? {
                bail!(
                    "{} exited ({status}) before http://{addr}{path} answered: {}",
                    p.name(),
                    p.stderr_tail(20)
                );
            }
        }
        let path_owned = path.to_string();
        let last = match ns.within(move || {
            crate::net::http_get(&addr.to_string(), &path_owned, Duration::from_millis(800))
        }) {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => format!("status {}", r.status),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "http://{addr}{path} (from {}) not 200 after {timeout:?}: {last}",
                ns.name
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl MeshLab {
    /// Builds the network, starts the CA and the injector in the node namespace; returns once
    /// both are ready. Needs root, `ip`, `iptables`, `setpriv` and the release binaries.
    pub fn start(opts: LabOptions) -> anyhow::Result<Self> {
        crate::netns::check_privileges().map_err(anyhow::Error::msg)?;
        tool("setpriv")?;
        let ca_bin = crate::bin::try_binary("moat-ca")?;
        let injector_bin = crate::bin::try_binary("moat-injector")?;
        crate::bin::try_binary("moat-proxy")?;
        let dir = crate::temp_dir("lab")?;
        let dir_path = dir.path().to_path_buf();
        chmod(&dir_path, 0o755)?;
        let namespaces_before = crate::netns::list_namespaces()?;
        let net = Lab::new(&opts.tag, opts.subnet)?;
        let gateway = net.gateway();
        let cidr = net.cidr();
        let prefix = net.prefix().to_string();

        // The CA's root and the token issuer it trusts.
        let ca_dir = dir_path.join("ca");
        mkdir(&ca_dir)?;
        let root = ca_dir.join("root");
        crate::ca::run_ca_ok([
            "init".as_ref(),
            "--trust-domain".as_ref(),
            TRUST_DOMAIN.as_ref(),
            "--dir".as_ref(),
            root.as_os_str(),
        ])?;
        let bundle_path = root.join("bundle.pem");
        let issuer = TokenIssuer::es256(ca_dir.join("jwks.json"))?;
        let webhook_dir = dir_path.join("injector");
        mkdir(&webhook_dir)?;
        let (webhook_ca, webhook_cert, webhook_key) = webhook_pki(gateway)?;
        let (cert_path, key_path) = (webhook_dir.join("tls.crt"), webhook_dir.join("tls.key"));
        write_file(&cert_path, webhook_cert.as_bytes())?;
        write_file(&key_path, webhook_key.as_bytes())?;
        chmod(&key_path, 0o600)?;
        let webhook_tls = crate::https::client_config(webhook_ca.as_bytes())?;

        let mut ca_args: Vec<OsString> = vec![
            "serve".into(),
            "--dir".into(),
            root.clone().into(),
            "--listen".into(),
            format!("{gateway}:{CA_PORT}").into(),
            "--admin-listen".into(),
            format!("{gateway}:{CA_ADMIN_PORT}").into(),
            "--san".into(),
            gateway.to_string().into(),
            "--jwks-file".into(),
            issuer.jwks_path().into(),
            "--token-issuer".into(),
            issuer.name().into(),
            "--shutdown-grace".into(),
            "1s".into(),
            "--log-format".into(),
            "json".into(),
        ];
        if let Some(ttl) = &opts.cert_ttl {
            ca_args.extend([
                "--cert-ttl".into(),
                ttl.into(),
                "--test-allow-short-ttl".into(),
            ]);
        }
        ca_args.insert(0, ca_bin.into());

        let mut lab = Self {
            pods: Vec::new(),
            extra_procs: Vec::new(),
            injector: None,
            discovery: None,
            ca: None,
            ca_args,
            net: Some(net),
            dir: Some(dir),
            dir_path,
            issuer,
            webhook_tls,
            bundle_path,
            config_maps: BTreeMap::new(),
            namespaces_before,
            prefix,
            cidr,
            gateway,
            reviews: 0,
            keep: false,
            torn_down: false,
        };
        lab.start_ca()?;
        let service_networks = if opts.discovery { SERVICE_CIDR } else { "" };
        let destination_addr = if opts.discovery {
            let dir = lab.dir_path.join("destination");
            mkdir(&dir)?;
            let token_file = dir.join("token");
            let token = lab
                .issuer
                .mint(&TokenSpec::new("moat-system", "moat-destination"))?;
            write_file(&token_file, token.as_bytes())?;
            let addr = SocketAddr::from((gateway, DESTINATION_PORT));
            let d = crate::discovery::LabDiscovery::start(
                lab.node()?,
                addr,
                TRUST_DOMAIN,
                &lab.ca_url(),
                &lab.bundle_path,
                &token_file,
            )
            .context("the lab's discovery service")?;
            lab.discovery = Some(d);
            addr.to_string()
        } else {
            // No discovery: the lab's sidecars pin peers only where a test gives them an
            // identity.
            "off".to_string()
        };

        let node = lab.node()?.clone();
        let mut cmd = clean_command(&node, &injector_bin)?;
        cmd.args(["serve", "--listen"])
            .arg(format!("{gateway}:{INJECTOR_PORT}"))
            .arg("--admin-listen")
            .arg(format!("{gateway}:{INJECTOR_ADMIN_PORT}"))
            .arg("--tls-cert")
            .arg(&cert_path)
            .arg("--tls-key")
            .arg(&key_path)
            .arg("--trust-bundle")
            .arg(&lab.bundle_path)
            .arg("--ca-url")
            .arg(lab.ca_url())
            .arg("--mesh-networks")
            .arg(&lab.cidr)
            .args(["--destination-addr", &destination_addr])
            // Cluster IPs need discovery (the sidecar refuses the flag without it).
            .args(["--service-networks", service_networks])
            .args(["--trust-domain", TRUST_DOMAIN, "--proxy-image", PROXY_IMAGE])
            .args(["--failure-mode", "closed", "--log-format", "json"])
            // The lab's namespace enforces the mesh; its unmeshed pods (`unmeshed`) are an
            // opt-out the platform allows there, as a cluster would for legacy workloads.
            .args(["--allow-opt-out", &format!("{NAMESPACE}=inject-disabled")]);
        let mut injector = Proc::spawn("moat-injector", cmd, &webhook_dir)?;
        let waited = wait_http_ok(
            &node,
            SocketAddr::from((gateway, INJECTOR_ADMIN_PORT)),
            "/ready",
            Duration::from_secs(20),
            Some(&mut injector),
        );
        lab.injector = Some(injector);
        waited.context("moat-injector serve did not become ready")?;
        Ok(lab)
    }

    fn net(&self) -> anyhow::Result<&Lab> {
        self.net.as_ref().context("the lab was torn down")
    }

    fn net_mut(&mut self) -> anyhow::Result<&mut Lab> {
        self.net.as_mut().context("the lab was torn down")
    }

    /// The node namespace (bridge `br0`, CA, injector).
    pub fn node(&self) -> anyhow::Result<&Netns> {
        Ok(&self.net()?.node)
    }

    /// The node's address on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The pod network, e.g. `10.81.1.0/24`.
    pub fn cidr(&self) -> &str {
        &self.cidr
    }

    /// `https://<gateway>:8443`.
    pub fn ca_url(&self) -> String {
        format!("https://{}:{CA_PORT}", self.gateway)
    }

    /// The CA's trust bundle file.
    pub fn bundle_path(&self) -> &Path {
        &self.bundle_path
    }

    /// The token issuer the CA trusts.
    pub fn issuer(&self) -> &TokenIssuer {
        &self.issuer
    }

    /// The discovery service, in a lab started [`LabOptions::with_discovery`].
    pub fn discovery(&self) -> anyhow::Result<&crate::discovery::LabDiscovery> {
        self.discovery
            .as_ref()
            .context("this lab runs no discovery service (LabOptions::with_discovery)")
    }

    /// The lab's working directory (pods' volumes and logs, CA and injector files).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// The prefix of every namespace name of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Starts `moat-ca serve` (again, after [`MeshLab::stop_ca`]) and waits for `/ready`.
    pub fn start_ca(&mut self) -> anyhow::Result<()> {
        if self.ca.as_mut().is_some_and(Proc::is_running) {
            bail!("the CA is already running");
        }
        let node = self.node()?.clone();
        let (program, args) = self.ca_args.split_first().context("no CA command")?;
        let mut cmd = clean_command(&node, Path::new(program))?;
        cmd.args(args);
        let mut proc = Proc::spawn("moat-ca", cmd, &self.dir_path.join("ca"))?;
        let waited = wait_http_ok(
            &node,
            SocketAddr::from((self.gateway, CA_ADMIN_PORT)),
            "/ready",
            Duration::from_secs(20),
            Some(&mut proc),
        );
        self.ca = Some(proc);
        waited.context("moat-ca serve did not become ready")
    }

    /// Stops `moat-ca` (SIGTERM) and waits for it to exit.
    pub fn stop_ca(&mut self) -> anyhow::Result<()> {
        let proc = self.ca.as_mut().context("the CA is not running")?;
        proc.terminate(Duration::from_secs(20))?;
        Ok(())
    }

    /// The CA's JSON logs (every start).
    pub fn ca_logs(&self) -> Vec<Value> {
        self.ca.as_ref().map(Proc::json_logs).unwrap_or_default()
    }

    /// The injector's JSON logs.
    pub fn injector_logs(&self) -> Vec<Value> {
        self.injector
            .as_ref()
            .map(Proc::json_logs)
            .unwrap_or_default()
    }

    /// A bare namespace on the bridge with the next free address and no Moat at all (an
    /// attacker's machine, a tool host). Torn down with the lab.
    pub fn add_host(&mut self, name: &str) -> anyhow::Result<Netns> {
        self.net_mut()?.add_pod(name)
    }

    /// Runs a long-lived process inside `ns` (a tool such as `openssl s_server`), logging to
    /// `<lab dir>/hosts/<name>.stdout|stderr`; stopped with the lab.
    pub fn spawn_host_process(
        &mut self,
        ns: &Netns,
        name: &str,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<usize> {
        let mut cmd = clean_command(ns, program)?;
        cmd.args(args);
        let proc = Proc::spawn(name, cmd, &self.dir_path.join("hosts"))?;
        self.extra_procs.push(proc);
        Ok(self.extra_procs.len() - 1)
    }

    /// A process started by [`MeshLab::spawn_host_process`] (by the index it returned).
    pub fn host_proc(&mut self, index: usize) -> anyhow::Result<&mut Proc> {
        self.extra_procs
            .get_mut(index)
            .context("no such host process")
    }

    /// Creates or replaces ConfigMap `name` of the lab's namespace; every pod volume made
    /// from it is rewritten at once.
    pub fn set_config_map(
        &mut self,
        name: &str,
        data: BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        self.config_maps.insert(name.to_string(), data);
        let data = self.config_maps.get(name);
        for pod in &self.pods {
            for v in pod.config_maps.iter().filter(|v| v.name == name) {
                sync_config_map(&v.dir, data, v.items.as_deref())?;
            }
        }
        Ok(())
    }

    /// Sets the namespace's policy (ConfigMap `moat-policy`, key `policy.yaml`).
    pub fn set_policy(&mut self, yaml: &str) -> anyhow::Result<()> {
        self.set_config_map("moat-policy", policy_config_map(yaml))
    }

    /// Deletes ConfigMap `name` (its volumes become empty, as an `optional` one does).
    pub fn delete_config_map(&mut self, name: &str) -> anyhow::Result<()> {
        self.config_maps.remove(name);
        for pod in &self.pods {
            for v in pod.config_maps.iter().filter(|v| v.name == name) {
                sync_config_map(&v.dir, None, v.items.as_deref())?;
            }
        }
        Ok(())
    }

    /// Creates `pod` like Kubernetes would: admission through the injector, then the kubelet's
    /// work. Returns once every container is started and every probe passes.
    pub fn deploy(&mut self, pod: Pod) -> anyhow::Result<PodHandle> {
        self.deploy_with(pod, DeployOptions::default())
    }

    /// [`MeshLab::deploy`] with extra settings.
    pub fn deploy_with(&mut self, pod: Pod, opts: DeployOptions) -> anyhow::Result<PodHandle> {
        let name = pod
            .metadata
            .name
            .clone()
            .context("the pod has no metadata.name")?;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| NAMESPACE.into());
        let pod_dir = self.dir_path.join("pods").join(&name);
        if pod_dir.exists() {
            bail!("pod {name} already exists in the lab");
        }
        mkdir(&pod_dir)?;
        let original = serde_json::to_value(&pod).context("serialising the pod")?;
        write_file(
            &pod_dir.join("pod.json"),
            &serde_json::to_vec_pretty(&original)?,
        )?;

        // API server: the mutating admission webhook.
        let (admitted, admission) = self
            .admit(&original, &namespace)
            .with_context(|| format!("admission of pod {name}"))?;
        let spec_file = pod_dir.join("pod.admitted.json");
        write_file(&spec_file, &serde_json::to_vec_pretty(&admitted)?)?;
        let spec: Pod = serde_json::from_value(admitted)
            .with_context(|| format!("the admitted pod {name} is not a valid Pod"))?;

        // Kubelet: the sandbox (network namespace) first, then containers.
        let netns = self.net_mut()?.add_pod(&name)?;
        let ip = netns.ip.context("pod namespace without an address")?;
        let service_account = spec
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let meshed = all_containers(&spec).any(|c| c.name == "moat-proxy");
        // The API server would now list the pod with its IP; discovery hears of it.
        if let Some(d) = &self.discovery {
            d.publish_pod(&spec, ip)
                .with_context(|| format!("publishing pod {name} to discovery"))?;
        }
        let handle = PodHandle {
            spiffe_id: format!("spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"),
            name,
            namespace,
            service_account,
            netns,
            ip,
            meshed,
            admission,
            spec_file,
            sidecar_log: meshed.then(|| pod_dir.join("moat-proxy.stderr")),
        };
        self.pods.push(PodRuntime {
            handle: handle.clone(),
            spec,
            config_maps: Vec::new(),
            procs: Vec::new(),
            apps: Vec::new(),
        });
        let index = self.pods.len() - 1;
        self.run_pod(index, &pod_dir, &opts)
            .with_context(|| format!("starting pod {}", handle.name))?;
        Ok(handle)
    }

    /// POSTs an AdmissionReview for `pod` to the injector and applies the returned patch.
    fn admit(&mut self, pod: &Value, namespace: &str) -> anyhow::Result<(Value, AdmissionOutcome)> {
        self.reviews += 1;
        let uid = format!(
            "6c616221-{:04x}-4000-8000-{:012x}",
            std::process::id() & 0xffff,
            self.reviews
        );
        let review = admission_review(&uid, pod, namespace);
        let body = Bytes::from(serde_json::to_vec(&review)?);
        let addr = SocketAddr::from((self.gateway, INJECTOR_PORT));
        let tls = self.webhook_tls.clone();
        let node = self.node()?.clone();
        let reply: Reply = block_on_in(&node, move || async move {
            let mut client = Http1Client::connect(addr, tls).await?;
            let req = http::Request::post("/inject?timeout=10s")
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body))
                .context("building the AdmissionReview request")?;
            client.send(req).await
        })
        .with_context(|| format!("POST https://{addr}/inject"))?;
        if reply.status != 200 {
            bail!("the injector answered {}: {}", reply.status, reply.text());
        }
        let answer: Value = reply.json()?;
        if answer["apiVersion"] != "admission.k8s.io/v1" || answer["kind"] != "AdmissionReview" {
            bail!("the injector's answer is not an admission.k8s.io/v1 AdmissionReview: {answer}");
        }
        let response = &answer["response"];
        if response["uid"] != uid.as_str() {
            bail!(
                "the injector's answer has uid {}, expected {uid}",
                response["uid"]
            );
        }
        let warnings: Vec<String> = response["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w.as_str().map(str::to_string))
            .collect();
        if response["allowed"] != true {
            bail!(
                "the injector refused the pod: {} (warnings {warnings:?})",
                response["status"]
            );
        }
        let mut admitted = pod.clone();
        let Some(patch_b64) = response["patch"].as_str() else {
            return Ok((
                admitted,
                AdmissionOutcome {
                    patched: false,
                    operations: 0,
                    warnings,
                },
            ));
        };
        if response["patchType"] != "JSONPatch" {
            bail!("unexpected patchType {}", response["patchType"]);
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(patch_b64)
            .context("the patch is not base64")?;
        let patch: json_patch::Patch =
            serde_json::from_slice(&raw).context("the patch is not an RFC 6902 JSON patch")?;
        json_patch::patch(&mut admitted, &patch).context("the patch does not apply")?;
        Ok((
            admitted,
            AdmissionOutcome {
                patched: true,
                operations: patch.0.len(),
                warnings,
            },
        ))
    }

    /// The kubelet's work for pod `index`.
    fn run_pod(
        &mut self,
        index: usize,
        pod_dir: &Path,
        opts: &DeployOptions,
    ) -> anyhow::Result<()> {
        let (handle, spec) = {
            let p = &self.pods[index];
            (p.handle.clone(), p.spec.clone())
        };
        let pod_spec = spec.spec.as_ref().context("the pod has no spec")?;
        let volumes = self.materialise_volumes(index, &handle, pod_spec, pod_dir)?;
        let ctx = RunContext {
            handle: &handle,
            pod: &spec,
            volumes: &volumes,
            gateway: self.gateway,
        };
        let node = self.node()?.clone();

        // Init containers in order; native sidecars keep running.
        let mut sidecars: Vec<&Container> = Vec::new();
        for c in pod_spec.init_containers.iter().flatten() {
            let extra = sidecar_env(c, opts);
            let cmd = ctx.command(c, extra)?;
            if c.restart_policy.as_deref() == Some("Always") {
                let proc = Proc::spawn(&c.name, cmd, pod_dir)?;
                self.pods[index].procs.push(proc);
                if let Some(p) = &c.startup_probe {
                    let proc = self.pods[index].procs.last_mut();
                    wait_probe(&node, &handle, c, p, "startup", proc)?;
                }
                sidecars.push(c);
            } else {
                let mut proc = Proc::spawn(&c.name, cmd, pod_dir)?;
                let status = proc
                    .wait_timeout(Duration::from_secs(60))?
                    .with_context(|| format!("init container {} did not finish", c.name))?;
                if !status.success() {
                    bail!(
                        "init container {} failed ({status}): {}",
                        c.name,
                        proc.stderr_tail(20)
                    );
                }
            }
        }
        // App containers (and a classic-mode sidecar).
        for c in &pod_spec.containers {
            let image = c.image.as_deref().unwrap_or_default();
            match image {
                SERVER_IMAGE => {
                    let (mut http, mut echo) = (Vec::new(), Vec::new());
                    for p in c.ports.iter().flatten() {
                        let n = u16::try_from(p.container_port)
                            .with_context(|| format!("port {}", p.container_port))?;
                        if p.name.as_deref().is_some_and(|x| x.starts_with("http")) {
                            http.push(n);
                        } else {
                            echo.push(n);
                        }
                    }
                    let app = AppServer::start(&handle.netns, &handle.name, &http, &echo)?;
                    self.pods[index].apps.push(app);
                }
                CLIENT_IMAGE => {}
                _ => {
                    let extra = sidecar_env(c, opts);
                    let cmd = ctx.command(c, extra)?;
                    let proc = Proc::spawn(&c.name, cmd, pod_dir)?;
                    self.pods[index].procs.push(proc);
                    if let Some(p) = &c.startup_probe {
                        let proc = self.pods[index].procs.last_mut();
                        wait_probe(&node, &handle, c, p, "startup", proc)?;
                    }
                }
            }
        }
        // Ready when every readiness probe passes.
        for c in sidecars.into_iter().chain(pod_spec.containers.iter()) {
            if let Some(p) = &c.readiness_probe {
                wait_probe(&node, &handle, c, p, "readiness", None)?;
            }
        }
        Ok(())
    }

    /// Creates the pod's volumes as host directories (module docs) and returns
    /// `volume name → directory`.
    fn materialise_volumes(
        &mut self,
        index: usize,
        handle: &PodHandle,
        spec: &PodSpec,
        pod_dir: &Path,
    ) -> anyhow::Result<BTreeMap<String, PathBuf>> {
        let mut out = BTreeMap::new();
        for v in spec.volumes.iter().flatten() {
            let dir = pod_dir.join("volumes").join(&v.name);
            mkdir(&dir)?;
            self.materialise_volume(index, handle, v, &dir)
                .with_context(|| format!("volume {}", v.name))?;
            out.insert(v.name.clone(), dir);
        }
        Ok(out)
    }

    fn materialise_volume(
        &mut self,
        index: usize,
        handle: &PodHandle,
        v: &Volume,
        dir: &Path,
    ) -> anyhow::Result<()> {
        if v.empty_dir.is_some() {
            // As the kubelet creates them: writable by every container's user.
            return chmod(dir, 0o777);
        }
        if let Some(cm) = &v.config_map {
            let items = cm
                .items
                .as_ref()
                .map(|i| i.iter().map(|k| (k.key.clone(), k.path.clone())).collect());
            let data = self.config_maps.get(&cm.name);
            if data.is_none() && cm.optional != Some(true) {
                bail!("ConfigMap {} does not exist and is not optional", cm.name);
            }
            sync_config_map(dir, data, items.as_deref())?;
            self.pods[index].config_maps.push(ConfigMapVolume {
                name: cm.name.clone(),
                dir: dir.to_path_buf(),
                items,
            });
            return Ok(());
        }
        if let Some(projected) = &v.projected {
            for source in projected.sources.iter().flatten() {
                let Some(sat) = &source.service_account_token else {
                    bail!("only serviceAccountToken projections exist in the lab");
                };
                let spec = TokenSpec {
                    pod: Some(handle.name.clone()),
                    audiences: Some(vec![sat
                        .audience
                        .clone()
                        .unwrap_or_else(|| "https://kubernetes.default.svc".into())]),
                    expires: sat.expiration_seconds.unwrap_or(3600),
                    ..TokenSpec::new(&handle.namespace, &handle.service_account)
                };
                let token = self.issuer.mint(&spec)?;
                write_file(&dir.join(&sat.path), token.as_bytes())?;
            }
            return Ok(());
        }
        bail!("only projected service-account tokens, ConfigMaps and emptyDirs exist in the lab")
    }

    /// The pod as run (after admission).
    pub fn pod_spec(&self, pod: &PodHandle) -> anyhow::Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.handle.name == pod.name)
            .map(|p| &p.spec)
            .with_context(|| format!("no pod {}", pod.name))
    }

    /// The app server of a pod running [`SERVER_IMAGE`].
    pub fn app(&self, pod: &PodHandle) -> anyhow::Result<&AppServer> {
        self.pods
            .iter()
            .find(|p| p.handle.name == pod.name)
            .and_then(|p| p.apps.first())
            .with_context(|| format!("pod {} runs no app server", pod.name))
    }

    /// An error naming the first long-running process of the lab (sidecar, injector, CA) that
    /// has exited, with its last log lines.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        let procs = self
            .pods
            .iter_mut()
            .flat_map(|p| p.procs.iter_mut())
            .chain(self.injector.iter_mut())
            .chain(self.ca.iter_mut());
        for p in procs {
            p.ensure_running()?;
        }
        Ok(())
    }

    /// Keeps the lab's directory (logs, pod specs, tokens) after teardown.
    pub fn keep_files(&mut self) {
        self.keep = true;
    }

    /// Stops everything and checks that nothing is left (module docs).
    pub fn shutdown(mut self) -> anyhow::Result<Teardown> {
        let t = self.teardown();
        if !t.leftover_namespaces.is_empty() || !t.leftover_processes.is_empty() {
            bail!(
                "the lab left namespaces {:?} and processes {:?} behind",
                t.leftover_namespaces,
                t.leftover_processes
            );
        }
        Ok(t)
    }

    fn teardown(&mut self) -> Teardown {
        let mut t = Teardown::default();
        if self.torn_down {
            return t;
        }
        self.torn_down = true;
        // Apps first (their threads live in the namespaces).
        for p in &mut self.pods {
            p.apps.clear();
        }
        // Each sidecar's local control socket, in the pod's `moat-run` volume.
        let sidecars: Vec<PathBuf> = self
            .pods
            .iter()
            .filter(|p| p.handle.meshed && p.procs.iter().any(|x| x.name() == "moat-proxy"))
            .map(|p| {
                self.dir_path
                    .join("pods")
                    .join(&p.handle.name)
                    .join("volumes")
                    .join("moat-run")
                    .join("admin.sock")
            })
            .collect();
        let mut procs: Vec<Proc> = Vec::new();
        for p in &mut self.pods {
            procs.append(&mut p.procs);
        }
        procs.append(&mut self.extra_procs);
        procs.extend(self.injector.take());
        if let Some(d) = self.discovery.take() {
            d.stop();
        }
        procs.extend(self.ca.take());
        let pids: Vec<u32> = procs.iter().map(Proc::pid).collect();
        t.stopped = procs
            .iter_mut()
            .map(Proc::is_running)
            .filter(|r| *r)
            .count();
        // Sidecars skip their drain delay when asked on their local control socket (what a
        // Job does); a sidecar without one gets SIGTERM below.
        for socket in &sidecars {
            let _ = (|| -> std::io::Result<()> {
                use std::io::{Read as _, Write as _};
                let mut s = std::os::unix::net::UnixStream::connect(socket)?;
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                s.write_all(b"POST /shutdown HTTP/1.0\r\nContent-Length: 0\r\n\r\n")?;
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf);
                Ok(())
            })();
        }
        for p in &mut procs {
            if p.is_running() {
                let _ = p.signal(SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline && procs.iter_mut().any(Proc::is_running) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in &mut procs {
            if p.is_running() {
                let _ = p.signal(SIGKILL);
                let _ = p.wait_timeout(Duration::from_secs(5));
            }
        }
        drop(procs);
        if let Some(net) = self.net.take() {
            t.namespaces = net.pods.len() + 1;
            drop(net);
        }
        t.leftover_namespaces = crate::netns::list_namespaces()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .filter(|n| !self.namespaces_before.contains(n))
            .collect();
        t.leftover_processes = pids
            .into_iter()
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(*pid))
            .collect();
        if self.keep || std::thread::panicking() || crate::keep_requested() {
            // Keep the files of a failing run (or when MOAT_E2E_KEEP asks) for inspection.
            if let Some(dir) = self.dir.take() {
                let kept = dir.keep();
                eprintln!("mesh lab: logs and pod specs kept in {}", kept.display());
            }
        } else {
            self.dir = None;
        }
        t
    }
}

impl Drop for MeshLab {
    fn drop(&mut self) {
        let t = self.teardown();
        if !t.leftover_namespaces.is_empty() || !t.leftover_processes.is_empty() {
            eprintln!(
                "mesh lab: left behind namespaces {:?}, processes {:?}",
                t.leftover_namespaces, t.leftover_processes
            );
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}

fn sidecar_env(c: &Container, opts: &DeployOptions) -> Vec<(String, String)> {
    if c.name == "moat-proxy" {
        opts.sidecar_env.clone()
    } else {
        Vec::new()
    }
}

fn all_containers(pod: &Pod) -> impl Iterator<Item = &Container> {
    let spec = pod.spec.as_ref();
    spec.into_iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .chain(spec.into_iter().flat_map(|s| s.containers.iter()))
}

/// Writes a ConfigMap's keys (or its `items`) into `dir`, removing files of keys that went
/// away; `None` (no such ConfigMap) empties the directory.
fn sync_config_map(
    dir: &Path,
    data: Option<&BTreeMap<String, String>>,
    items: Option<&[(String, String)]>,
) -> anyhow::Result<()> {
    let mut wanted: BTreeMap<String, &str> = BTreeMap::new();
    if let Some(data) = data {
        match items {
            Some(items) => {
                for (key, path) in items {
                    if let Some(v) = data.get(key) {
                        wanted.insert(path.clone(), v);
                    }
                }
            }
            None => {
                for (k, v) in data {
                    wanted.insert(k.clone(), v);
                }
            }
        }
    }
    for (path, value) in &wanted {
        if path.contains('/') || path.starts_with('.') {
            bail!("ConfigMap path {path:?}: nested or hidden paths are not supported");
        }
        write_file(&dir.join(path), value.as_bytes())?;
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !wanted.contains_key(&name) && !name.starts_with('.') {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("remove {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// The `admission.k8s.io/v1` AdmissionReview the API server sends the injector when `pod` is
/// created in `namespace` on behalf of the ReplicaSet controller (operation `CREATE`).
pub fn admission_review(uid: &str, pod: &Value, namespace: &str) -> Value {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": name,
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "groups": ["system:serviceaccounts", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// A TLS serving certificate for the injector: a throwaway CA and a leaf for the node's
/// address and the Service name. Returns `(ca PEM, leaf PEM, key PEM)`.
pub fn webhook_pki(node: Ipv4Addr) -> anyhow::Result<(String, String, String)> {
    let ca_key = rcgen::KeyPair::generate().context("webhook CA key")?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "mesh lab webhook CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).context("webhook CA")?;
    let key = rcgen::KeyPair::generate().context("webhook key")?;
    let leaf = rcgen::CertificateParams::new(vec![
        node.to_string(),
        "moat-injector.moat-system.svc".to_string(),
    ])?
    .signed_by(&key, &ca)
    .context("webhook certificate")?;
    Ok((ca.pem(), leaf.pem(), key.serialize_pem()))
}

// ---------------------------------------------------------------------------------------------
// Running containers

struct RunContext<'a> {
    handle: &'a PodHandle,
    pod: &'a Pod,
    volumes: &'a BTreeMap<String, PathBuf>,
    gateway: Ipv4Addr,
}

/// The program an image runs when the container gives no `command`.
fn image_entrypoint(image: &str) -> anyhow::Result<PathBuf> {
    let repo = image.rsplit('/').next().unwrap_or(image);
    let name = repo.split([':', '@']).next().unwrap_or(repo);
    match name {
        "moat-proxy" => crate::bin::try_binary("moat-proxy"),
        _ => bail!("image {image:?} does not exist in the lab (it runs moat-proxy images, {SERVER_IMAGE} and {CLIENT_IMAGE})"),
    }
}

/// Kubernetes' `$(VAR)` expansion of env values, commands and args: `$$` is a literal `$`,
/// `$(NAME)` is NAME's value when `lookup` knows it and stays `$(NAME)` otherwise, and any
/// other `$` is kept as written.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match lookup(name) {
                        Some(v) => out.push_str(&v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Rewrites `value` when it is a mount path or lies under one (module docs).
pub fn translate_path(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (mount, host) in mounts {
        let mount = mount.trim_end_matches('/');
        if value == mount {
            return host.display().to_string();
        }
        if let Some(rest) = value.strip_prefix(mount).and_then(|r| r.strip_prefix('/')) {
            return host.join(rest).display().to_string();
        }
    }
    value.to_string()
}

impl RunContext<'_> {
    fn field(&self, path: &str) -> anyhow::Result<String> {
        let meta = &self.pod.metadata;
        Ok(match path {
            "metadata.name" => self.handle.name.clone(),
            "metadata.namespace" => self.handle.namespace.clone(),
            "metadata.uid" => meta.uid.clone().unwrap_or_default(),
            "spec.serviceAccountName" => self.handle.service_account.clone(),
            "spec.nodeName" => "lab-node".into(),
            "status.podIP" => self.handle.ip.to_string(),
            "status.podIPs" => self.handle.ip.to_string(),
            "status.hostIP" => self.gateway.to_string(),
            _ => bail!("downward-API field {path:?} is not provided by the lab"),
        })
    }

    /// `(mountPath, host directory)`, longest mount path first.
    fn mounts(&self, c: &Container) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            if m.sub_path.is_some() || m.sub_path_expr.is_some() {
                bail!("container {}: subPath mounts are not supported", c.name);
            }
            let dir = self.volumes.get(&m.name).with_context(|| {
                format!("container {} mounts unknown volume {}", c.name, m.name)
            })?;
            out.push((m.mount_path.clone(), dir.clone()));
        }
        out.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        Ok(out)
    }

    fn env(
        &self,
        c: &Container,
        mounts: &[(String, PathBuf)],
        extra: Vec<(String, String)>,
    ) -> anyhow::Result<Vec<(String, String)>> {
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                expand(v, |name| {
                    env.iter()
                        .rev()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone())
                })
            } else if let Some(from) = &e.value_from {
                let f = from.field_ref.as_ref().with_context(|| {
                    format!(
                        "env {} of {}: only fieldRef sources are provided by the lab",
                        e.name, c.name
                    )
                })?;
                self.field(&f.field_path)?
            } else {
                String::new()
            };
            env.retain(|(k, _)| *k != e.name);
            env.push((e.name.clone(), translate_path(&value, mounts)));
        }
        for (k, v) in extra {
            env.retain(|(name, _)| *name != k);
            env.push((k, v));
        }
        Ok(env)
    }

    /// The command that runs container `c` in the pod's namespace, as its user.
    fn command(&self, c: &Container, extra_env: Vec<(String, String)>) -> anyhow::Result<Command> {
        let image = c
            .image
            .as_deref()
            .with_context(|| format!("container {} has no image", c.name))?;
        let mounts = self.mounts(c)?;
        let env = self.env(c, &mounts, extra_env)?;
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let mut argv: Vec<String> = match &c.command {
            Some(cmd) if !cmd.is_empty() => cmd.iter().map(|a| expand(a, lookup)).collect(),
            _ => vec![image_entrypoint(image)?.display().to_string()],
        };
        argv.extend(c.args.iter().flatten().map(|a| expand(a, lookup)));
        let argv: Vec<String> = argv.iter().map(|a| translate_path(a, &mounts)).collect();
        let (program, args) = argv.split_first().context("empty command")?;

        let pod_sc = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref());
        let sc = c.security_context.as_ref();
        let uid = sc
            .and_then(|s| s.run_as_user)
            .or(pod_sc.and_then(|s| s.run_as_user))
            .unwrap_or(0);
        let gid = sc
            .and_then(|s| s.run_as_group)
            .or(pod_sc.and_then(|s| s.run_as_group))
            .unwrap_or(0);
        let non_root = sc
            .and_then(|s| s.run_as_non_root)
            .or(pod_sc.and_then(|s| s.run_as_non_root));
        if non_root == Some(true) && uid == 0 {
            bail!(
                "container {} has runAsNonRoot and would run as root (the kubelet refuses it)",
                c.name
            );
        }
        let caps = capabilities(sc);
        let caps_arg = std::iter::once("-all".to_string())
            .chain(caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(tool("ip")?);
        cmd.args(["netns", "exec", &self.handle.netns.name])
            .arg(tool("setpriv")?)
            .args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()])
            .arg("--clear-groups");
        if sc.and_then(|s| s.allow_privilege_escalation) == Some(false) {
            cmd.arg("--no-new-privs");
        }
        cmd.args(["--bounding-set", &caps_arg, "--inh-caps", &caps_arg])
            .arg("--")
            .arg(program)
            .args(args)
            .env_clear()
            .env("PATH", CONTAINER_PATH)
            .envs(env);
        Ok(cmd)
    }
}

/// The capabilities a container gets: the runtime's defaults, minus `drop`, plus `add`
/// (lower case, without `CAP_`); everything when privileged.
fn capabilities(sc: Option<&SecurityContext>) -> Vec<String> {
    let norm = |c: &String| {
        c.to_ascii_lowercase()
            .trim_start_matches("cap_")
            .to_string()
    };
    if sc.and_then(|s| s.privileged) == Some(true) {
        return vec!["all".into()];
    }
    let mut caps: Vec<String> = DEFAULT_CAPS.iter().map(|c| c.to_string()).collect();
    if let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) {
        for d in c.drop.iter().flatten().map(norm) {
            if d == "all" {
                caps.clear();
            } else {
                caps.retain(|x| *x != d);
            }
        }
        for a in c.add.iter().flatten().map(norm) {
            if !caps.contains(&a) {
                caps.push(a);
            }
        }
    }
    caps
}

/// Performs probe `p` of container `c` from the node until it succeeds.
fn wait_probe(
    node: &Netns,
    pod: &PodHandle,
    c: &Container,
    p: &Probe,
    kind: &str,
    proc: Option<&mut Proc>,
) -> anyhow::Result<()> {
    let period = f64::from(p.period_seconds.unwrap_or(10).max(1));
    let failures = f64::from(p.failure_threshold.unwrap_or(3).max(1));
    let delay = f64::from(p.initial_delay_seconds.unwrap_or(0).max(0));
    let deadline = Duration::from_secs_f64(delay + period * failures)
        .clamp(Duration::from_secs(20), PROBE_DEADLINE_CAP);
    let what = format!("{kind} probe of {}/{}", pod.name, c.name);
    let resolve = |port: &IntOrString| -> anyhow::Result<u16> {
        match port {
            IntOrString::Int(n) => u16::try_from(*n).with_context(|| format!("port {n}")),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|x| x.name.as_deref() == Some(name.as_str()))
                .and_then(|x| u16::try_from(x.container_port).ok())
                .with_context(|| format!("{what}: no container port named {name}")),
        }
    };
    if let Some(h) = &p.http_get {
        if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            bail!("{what}: only HTTP probes are performed by the lab");
        }
        let host: IpAddr = match &h.host {
            Some(host) => host
                .parse()
                .with_context(|| format!("{what}: host {host}"))?,
            None => IpAddr::V4(pod.ip),
        };
        let addr = SocketAddr::new(host, resolve(&h.port)?);
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        return wait_http_ok(node, addr, &path, deadline, proc).with_context(|| what.clone());
    }
    if let Some(t) = &p.tcp_socket {
        let addr = SocketAddr::new(IpAddr::V4(pod.ip), resolve(&t.port)?);
        let until = Instant::now() + deadline;
        loop {
            let ok = node
                .within(move || {
                    Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())
                })
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() >= until {
                bail!("{what}: {addr} did not accept within {deadline:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    bail!("{what}: only httpGet and tcpSocket probes are performed by the lab")
}

// ---------------------------------------------------------------------------------------------
// Running code inside a namespace

/// Runs `f`'s future to completion on a fresh single-threaded runtime in a thread that
/// entered `ns`: every socket it opens belongs to that namespace (the pod's app, in effect).
pub fn block_on_in<T, F, Fut>(ns: &Netns, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
{
    ns.within(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build a runtime")?;
        rt.block_on(f())
    })
}

/// Like [`block_on_in`], in the background.
pub fn spawn_in<T, F, Fut>(ns: &Netns, f: F) -> std::thread::JoinHandle<anyhow::Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
{
    ns.enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build a runtime")?;
        rt.block_on(f())
    })
}

/// One HTTP/1.1 request on a fresh connection to `addr` (from the current namespace).
pub async fn http_request(
    addr: SocketAddr,
    method: http::Method,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> anyhow::Result<Reply> {
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let _ = tcp.set_nodelay(true);
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, addr.to_string())
            .body(Full::new(body))
            .context("building the request")?;
        let resp = send.send_request(req).await.context("request failed")?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .context("reading the response body")?
            .to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .with_context(|| format!("no answer from {addr} within {timeout:?}"))?
}

/// `GET path` from inside `ns` on a fresh connection (10 s deadline).
pub fn http_get_in(ns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    let path = path.to_string();
    block_on_in(ns, move || async move {
        http_request(
            addr,
            http::Method::GET,
            &path,
            Bytes::new(),
            Duration::from_secs(10),
        )
        .await
    })
}

/// `POST path` with `body` from inside `ns` on a fresh connection (10 s deadline).
pub fn http_post_in(
    ns: &Netns,
    addr: SocketAddr,
    path: &str,
    body: impl Into<Bytes>,
) -> anyhow::Result<Reply> {
    let path = path.to_string();
    let body = body.into();
    block_on_in(ns, move || async move {
        http_request(
            addr,
            http::Method::POST,
            &path,
            body,
            Duration::from_secs(10),
        )
        .await
    })
}

/// How a raw TCP exchange went, with what came back.
#[derive(Debug, Clone)]
pub struct TcpResult {
    /// Bytes received before the end of the stream.
    pub received: Vec<u8>,
    /// How it ended ([`crate::demo::TcpOutcome::Echoed`] when `received` equals what was sent).
    pub outcome: crate::demo::TcpOutcome,
}

/// Connects to `addr`, sends `msg` while reading, half-closes, and reads until the end.
pub async fn tcp_roundtrip(addr: SocketAddr, msg: Vec<u8>, timeout: Duration) -> TcpResult {
    use crate::demo::TcpOutcome;
    let mut received = Vec::new();
    let fut = async {
        let s = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => return TcpOutcome::Error(format!("cannot connect to {addr}: {e}")),
        };
        let (mut r, mut w) = s.into_split();
        let writer = async move {
            w.write_all(&msg).await?;
            w.shutdown().await?;
            Ok::<_, std::io::Error>(msg)
        };
        let reader = async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => received.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e),
                }
            }
        };
        let (w, rd) = tokio::join!(writer, reader);
        let reset = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            )
        };
        match (w, rd) {
            (Ok(sent), Ok(())) if received == sent => TcpOutcome::Echoed,
            (Ok(_), Ok(())) if received.is_empty() => TcpOutcome::Closed,
            (Ok(_), Ok(())) => TcpOutcome::Garbled(received.len()),
            (Err(e), _) | (_, Err(e)) if reset(&e) => TcpOutcome::Reset,
            (Err(e), _) | (_, Err(e)) => TcpOutcome::Error(e.to_string()),
        }
    };
    let outcome = tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(TcpOutcome::Timeout);
    TcpResult { received, outcome }
}

/// [`tcp_roundtrip`] from inside `ns` (10 s deadline).
pub fn tcp_in(ns: &Netns, addr: SocketAddr, msg: impl Into<Vec<u8>>) -> anyhow::Result<TcpResult> {
    let msg = msg.into();
    block_on_in(ns, move || async move {
        Ok(tcp_roundtrip(addr, msg, Duration::from_secs(10)).await)
    })
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A marker unlikely to occur by chance: `<label>-<random hex>`.
pub fn marker(label: &str) -> String {
    format!("{label}-{:016x}{:016x}", fastrand_u64(), fastrand_u64())
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// The app server

/// What an [`AppServer`] saw.
#[derive(Debug, Default)]
pub struct AppStats {
    /// HTTP requests answered.
    pub requests: AtomicU64,
    /// HTTP requests whose body broke off before its end (not answered, not recorded).
    pub incomplete: AtomicU64,
    /// TCP echo connections accepted.
    pub tcp_connections: AtomicU64,
    /// Bytes echoed.
    pub tcp_bytes: AtomicU64,
    /// Bodies of the `POST /echo` requests (the first 256).
    pub bodies: Mutex<Vec<Bytes>>,
    /// Bytes received on echo connections (the first 4 MiB, all connections).
    pub tcp_received: Mutex<Vec<u8>>,
}

/// The lab's app server ([`SERVER_IMAGE`]): plain HTTP/1.1 and h2c on its HTTP ports, TCP echo
/// on the others, knowing nothing about the mesh. Stopped on drop.
///
/// HTTP: `GET /healthz` → `ok`; `GET /whoami` → the pod's name; `POST /echo` → the request
/// body; `GET /orders/<id>` → the demo's orders API; anything else → a greeting.
pub struct AppServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    stats: Arc<AppStats>,
}

impl std::fmt::Debug for AppServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppServer").finish_non_exhaustive()
    }
}

impl AppServer {
    /// Starts the server in `ns`, bound to `0.0.0.0` on every port given.
    pub fn start(
        ns: &Netns,
        pod: &str,
        http_ports: &[u16],
        echo_ports: &[u16],
    ) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let stats = Arc::new(AppStats::default());
        let (http_ports, echo_ports) = (http_ports.to_vec(), echo_ports.to_vec());
        let (pod, st) = (pod.to_string(), stats.clone());
        let thread = spawn_in(ns, move || async move {
            let mut http = Vec::new();
            let mut echo = Vec::new();
            for (ports, out) in [(&http_ports, &mut http), (&echo_ports, &mut echo)] {
                for p in ports.iter() {
                    match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], *p))).await {
                        Ok(l) => out.push(l),
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("cannot bind port {p}: {e}")));
                            return Ok(());
                        }
                    }
                }
            }
            let _ = ready_tx.send(Ok(()));
            let pod: Arc<str> = Arc::from(pod.as_str());
            for l in http {
                tokio::spawn(serve_http(l, pod.clone(), st.clone()));
            }
            for l in echo {
                tokio::spawn(serve_echo(l, st.clone()));
            }
            let _ = stop_rx.await;
            Ok(())
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Self {
                stop: Some(stop_tx),
                thread: Some(thread),
                stats,
            }),
            Ok(Err(e)) => bail!("app server in {}: {e}", ns.name),
            Err(_) => bail!("app server in {} did not start", ns.name),
        }
    }

    /// What it saw so far.
    pub fn stats(&self) -> &AppStats {
        &self.stats
    }

    /// HTTP requests answered so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// The `POST /echo` bodies received so far.
    pub fn bodies(&self) -> Vec<Bytes> {
        self.stats
            .bodies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bytes received on echo connections so far (the first 4 MiB).
    pub fn tcp_received(&self) -> Vec<u8> {
        self.stats
            .tcp_received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for AppServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_http(l: TcpListener, pod: Arc<str>, stats: Arc<AppStats>) {
    while let Ok((s, _)) = l.accept().await {
        let (pod, stats) = (pod.clone(), stats.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (pod, stats) = (pod.clone(), stats.clone());
                    async move { Ok::<_, Infallible>(app_answer(req, &pod, &stats).await) }
                });
            crate::mesh::backend::serve_app_connection(s, svc).await;
        });
    }
}

async fn app_answer(
    req: http::Request<hyper::body::Incoming>,
    pod: &str,
    stats: &AppStats,
) -> http::Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            // The request broke off mid-body: nothing to answer, nothing to record as received.
            stats.incomplete.fetch_add(1, Ordering::Relaxed);
            let mut r = http::Response::new(Full::new(Bytes::new()));
            *r.status_mut() = http::StatusCode::BAD_REQUEST;
            return r;
        }
    };
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let text = |s: String| {
        let mut r = http::Response::new(Full::new(Bytes::from(s)));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        r
    };
    match (method.as_str(), path.as_str()) {
        ("GET", "/healthz") => text("ok\n".into()),
        ("GET", "/whoami") => text(format!("{pod}\n")),
        ("POST", "/echo") => {
            {
                let mut bodies = stats.bodies.lock().unwrap_or_else(|p| p.into_inner());
                if bodies.len() < 256 {
                    bodies.push(body.clone());
                }
            }
            let mut r = http::Response::new(Full::new(body));
            if let Ok(v) = http::HeaderValue::from_str(pod) {
                r.headers_mut().insert("x-lab-pod", v);
            }
            r
        }
        ("GET", p) if p.starts_with("/orders/") => crate::demo::orders_answer(&method, p),
        _ => text(format!("hello from {pod}\n")),
    }
}

async fn serve_echo(l: TcpListener, stats: Arc<AppStats>) {
    while let Ok((mut s, _)) = l.accept().await {
        stats.tcp_connections.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                {
                    let mut seen = stats.tcp_received.lock().unwrap_or_else(|p| p.into_inner());
                    if seen.len() < 4 << 20 {
                        seen.extend_from_slice(&buf[..n]);
                    }
                }
                stats.tcp_bytes.fetch_add(n as u64, Ordering::Relaxed);
                if s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = s.shutdown().await;
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Sniffing

/// A `tcpdump -w` capture running in a namespace.
pub struct Sniffer {
    proc: Proc,
    file: PathBuf,
}

impl Sniffer {
    /// Captures every TCP packet on `iface` of `ns` into `file` (full packets, written as
    /// they arrive); returns once tcpdump listens.
    pub fn start(ns: &Netns, iface: &str, file: &Path) -> anyhow::Result<Self> {
        let tcpdump = tool("tcpdump")?;
        let log_dir = file
            .parent()
            .context("capture file without a directory")?
            .to_path_buf();
        let mut cmd = clean_command(ns, &tcpdump)?;
        cmd.args([
            "-i",
            iface,
            "-n",
            "-U",
            "--immediate-mode",
            "-s",
            "0",
            "-Z",
            "root",
            "-w",
        ])
        .arg(file)
        .arg("tcp");
        let mut proc = Proc::spawn("tcpdump", cmd, &log_dir)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !proc.stderr().contains("listening on") {
            if let Some(status) = proc.try_status()? {
                bail!("tcpdump exited ({status}): {}", proc.stderr());
            }
            if Instant::now() >= deadline {
                bail!("tcpdump did not start listening: {}", proc.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self {
            proc,
            file: file.to_path_buf(),
        })
    }

    /// Stops the capture and returns the pcap file's bytes.
    pub fn stop(mut self) -> anyhow::Result<Vec<u8>> {
        // Let the last packets reach the file.
        std::thread::sleep(Duration::from_millis(300));
        self.proc.signal(SIGINT)?;
        if self.proc.wait_timeout(Duration::from_secs(5))?.is_none() {
            self.proc.kill()?;
        }
        std::fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))
    }

    /// The capture file.
    pub fn file(&self) -> &Path {
        &self.file
    }
}

/// Reading pcap files: TCP payloads reassembled per direction.
pub mod pcap {
    use super::*;

    /// The payload of one direction of one TCP connection, in sequence order.
    #[derive(Debug, Clone)]
    pub struct Flow {
        /// Sender.
        pub src: SocketAddrV4,
        /// Receiver.
        pub dst: SocketAddrV4,
        /// Payload bytes in order (retransmitted bytes once).
        pub data: Vec<u8>,
        /// Holes in the sequence space (missing segments).
        pub gaps: usize,
        /// Whether the capture saw its SYN.
        pub saw_syn: bool,
    }

    struct State {
        flow: Flow,
        next: Option<u32>,
    }

    fn u16_at(b: &[u8], i: usize) -> Option<u16> {
        Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
    }

    fn u32_at(b: &[u8], i: usize) -> Option<u32> {
        Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?))
    }

    /// Every TCP flow (one per direction and connection; a reused 4-tuple continues its flow)
    /// of an Ethernet pcap file, in order of first appearance.
    pub fn tcp_flows(file: &[u8]) -> anyhow::Result<Vec<Flow>> {
        let magic = file.get(..4).context("pcap file too short")?;
        let le = match magic {
            [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
            [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
            _ => bail!("not a pcap file (magic {magic:02x?}; pcapng is not supported)"),
        };
        let rd32 = |i: usize| -> Option<u32> {
            let b: [u8; 4] = file.get(i..i + 4)?.try_into().ok()?;
            Some(if le {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            })
        };
        let linktype = rd32(20).context("pcap header too short")?;
        if linktype != 1 {
            bail!("pcap link type {linktype}, expected Ethernet (1)");
        }
        let mut flows: Vec<State> = Vec::new();
        let mut at = 24usize;
        while at + 16 <= file.len() {
            let incl = rd32(at + 8).context("record header")? as usize;
            let start = at + 16;
            let Some(frame) = file.get(start..start + incl) else {
                break; // truncated last record
            };
            at = start + incl;
            let Some((src, dst, syn, seq, payload)) = parse_frame(frame) else {
                continue;
            };
            let state = match flows
                .iter_mut()
                .position(|s| s.flow.src == src && s.flow.dst == dst)
            {
                Some(i) => &mut flows[i],
                None => {
                    flows.push(State {
                        flow: Flow {
                            src,
                            dst,
                            data: Vec::new(),
                            gaps: 0,
                            saw_syn: false,
                        },
                        next: None,
                    });
                    let last = flows.len() - 1;
                    &mut flows[last]
                }
            };
            if syn {
                state.flow.saw_syn = true;
                state.next = Some(seq.wrapping_add(1));
                continue;
            }
            if payload.is_empty() {
                continue;
            }
            let next = *state.next.get_or_insert(seq);
            let ahead = seq.wrapping_sub(next);
            let len = payload.len() as u32;
            if ahead == 0 {
                state.flow.data.extend_from_slice(payload);
                state.next = Some(next.wrapping_add(len));
            } else if ahead < 1 << 31 {
                // A hole: keep the bytes, count it.
                state.flow.gaps += 1;
                state.flow.data.extend_from_slice(payload);
                state.next = Some(seq.wrapping_add(len));
            } else {
                // (Partly) retransmitted: keep only what is new.
                let behind = next.wrapping_sub(seq);
                if behind < len {
                    state
                        .flow
                        .data
                        .extend_from_slice(&payload[behind as usize..]);
                    state.next = Some(seq.wrapping_add(len));
                }
            }
        }
        Ok(flows.into_iter().map(|s| s.flow).collect())
    }

    type Parsed<'a> = (SocketAddrV4, SocketAddrV4, bool, u32, &'a [u8]);

    fn parse_frame(frame: &[u8]) -> Option<Parsed<'_>> {
        let mut off = 12;
        let mut ethertype = u16_at(frame, off)?;
        off += 2;
        if ethertype == 0x8100 {
            ethertype = u16_at(frame, off + 2)?;
            off += 4;
        }
        if ethertype != 0x0800 {
            return None;
        }
        let ip = frame.get(off..)?;
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        let total = usize::from(u16_at(ip, 2)?);
        if *ip.get(9)? != 6 || ihl < 20 || total > ip.len() {
            return None;
        }
        let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let tcp = ip.get(ihl..total)?;
        let (sport, dport) = (u16_at(tcp, 0)?, u16_at(tcp, 2)?);
        let seq = u32_at(tcp, 4)?;
        let doff = usize::from(tcp.get(12)? >> 4) * 4;
        let syn = tcp.get(13)? & 0x02 != 0;
        let payload = tcp.get(doff..)?;
        Some((
            SocketAddrV4::new(src_ip, sport),
            SocketAddrV4::new(dst_ip, dport),
            syn,
            seq,
            payload,
        ))
    }
}

/// Reading TLS record framing (never decrypting).
pub mod tls {
    /// Content type of a handshake record.
    pub const HANDSHAKE: u8 = 0x16;
    /// Content type of an application-data record (every encrypted TLS 1.3 record).
    pub const APPLICATION_DATA: u8 = 0x17;
    /// Content type of a change-cipher-spec record (TLS 1.3 compatibility mode).
    pub const CHANGE_CIPHER_SPEC: u8 = 0x14;
    /// Content type of an alert.
    pub const ALERT: u8 = 0x15;
    /// Handshake message type ClientHello.
    pub const CLIENT_HELLO: u8 = 1;
    /// Handshake message type ServerHello.
    pub const SERVER_HELLO: u8 = 2;

    /// One record header (and the first handshake message type of a plaintext handshake
    /// record).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Record {
        /// Content type.
        pub content_type: u8,
        /// Legacy record version (0x0303 for TLS 1.2 and 1.3 records).
        pub version: u16,
        /// Payload length.
        pub length: usize,
        /// For a handshake record: the type of the message it starts with.
        pub handshake_type: Option<u8>,
    }

    /// Parses `stream` as consecutive TLS records. Returns the records and the number of
    /// bytes after the last complete record that do not form one (0: the stream is all TLS
    /// records; a stream that is not TLS stops at its first byte).
    pub fn records(stream: &[u8]) -> (Vec<Record>, usize) {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some(h) = stream.get(at..at + 5) {
            let content_type = h[0];
            let version = u16::from_be_bytes([h[1], h[2]]);
            let length = usize::from(u16::from_be_bytes([h[3], h[4]]));
            let plausible = (0x14..=0x17).contains(&content_type)
                && (0x0300..=0x0304).contains(&version)
                && length <= (1 << 14) + 256;
            if !plausible || stream.len() < at + 5 + length {
                break;
            }
            let handshake_type = (content_type == HANDSHAKE)
                .then(|| stream.get(at + 5).copied())
                .flatten();
            out.push(Record {
                content_type,
                version,
                length,
                handshake_type,
            });
            at += 5 + length;
        }
        (out, stream.len() - at)
    }
}

// ---------------------------------------------------------------------------------------------
// Attacks

/// A certificate chain from the attacker's own CA claiming `claimed` (a SPIFFE ID), written
/// as `<dir>/forged.crt` (leaf, then CA) and `<dir>/forged.key`.
pub fn forged_certificate(dir: &Path, claimed: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (chain, key) = crate::demo::forge(claimed)?;
    let mut pem = String::new();
    for der in &chain {
        pem.push_str(&pem_block("CERTIFICATE", der.as_ref()));
    }
    let (cert, keyfile) = (dir.join("forged.crt"), dir.join("forged.key"));
    write_file(&cert, pem.as_bytes())?;
    write_file(&keyfile, key.serialize_pem().as_bytes())?;
    Ok((cert, keyfile))
}

fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// What an intercepting relay does to the bytes it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tamper {
    /// Forward every byte unchanged.
    Off = 0,
    /// Flip one bit in the middle of each large (≥ [`TAMPER_MIN_RECORD`] bytes)
    /// application-data record going to the server.
    ToServer = 1,
    /// The same for records going back to the client.
    ToClient = 2,
}

/// Only application-data records at least this long are tampered with (records carrying bulk
/// data, never the handshake's).
pub const TAMPER_MIN_RECORD: usize = 4096;

/// One record a [`Relay`] forwarded.
#[derive(Debug, Clone, Copy)]
pub struct RelayedRecord {
    /// Towards the server (the relay's upstream).
    pub to_server: bool,
    /// The record header.
    pub record: tls::Record,
    /// Whether the relay altered it.
    pub tampered: bool,
}

#[derive(Debug, Default)]
struct RelayState {
    observed: Mutex<Vec<u8>>,
    records: Mutex<Vec<RelayedRecord>>,
    tamper: AtomicU8,
    tampered: AtomicUsize,
    connections: AtomicUsize,
}

/// A man in the middle's TCP relay: accepts on `0.0.0.0:<port>` in its namespace and forwards
/// each connection to `<upstream>:<port>`, recording every byte it sees and reframing the
/// stream as TLS records so it can alter them ([`Tamper`]). Stopped on drop.
pub struct Relay {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    state: Arc<RelayState>,
}

impl Relay {
    /// Starts relaying `ports` to `upstream`.
    pub fn start(ns: &Netns, ports: &[u16], upstream: Ipv4Addr) -> anyhow::Result<Self> {
        let state = Arc::new(RelayState::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (st, ports) = (state.clone(), ports.to_vec());
        let thread = spawn_in(ns, move || async move {
            let mut listeners = Vec::new();
            for p in &ports {
                match TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], *p))).await {
                    Ok(l) => listeners.push((l, *p)),
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("cannot bind port {p}: {e}")));
                        return Ok(());
                    }
                }
            }
            let _ = ready_tx.send(Ok(()));
            for (l, p) in listeners {
                let st = st.clone();
                tokio::spawn(async move {
                    while let Ok((client, _)) = l.accept().await {
                        st.connections.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(relay_one(
                            client,
                            SocketAddr::from((upstream, p)),
                            st.clone(),
                        ));
                    }
                });
            }
            let _ = stop_rx.await;
            Ok(())
        });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(Self {
                stop: Some(stop_tx),
                thread: Some(thread),
                state,
            }),
            Ok(Err(e)) => bail!("relay in {}: {e}", ns.name),
            Err(_) => bail!("relay in {} did not start", ns.name),
        }
    }

    /// Changes what the relay does to the records it forwards from now on (open connections
    /// included).
    pub fn set_tamper(&self, t: Tamper) {
        self.state.tamper.store(t as u8, Ordering::SeqCst);
    }

    /// Every byte the relay saw, both directions, in arrival order (the first 16 MiB).
    pub fn observed(&self) -> Vec<u8> {
        self.state
            .observed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The TLS records it forwarded.
    pub fn records(&self) -> Vec<RelayedRecord> {
        self.state
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many records it altered.
    pub fn tampered(&self) -> usize {
        self.state.tampered.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn relay_one(client: TcpStream, upstream: SocketAddr, st: Arc<RelayState>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    tokio::join!(
        pump(cr, sw, true, st.clone()),
        pump(sr, cw, false, st.clone())
    );
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    to_server: bool,
    st: Arc<RelayState>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 32 * 1024];
    let mut raw = false;
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut seen = st.observed.lock().unwrap_or_else(|p| p.into_inner());
            if seen.len() < 16 << 20 {
                seen.extend_from_slice(&chunk[..n]);
            }
        }
        buf.extend_from_slice(&chunk[..n]);
        // Forward whole records (altered or not); anything that is not TLS goes as is.
        let mut out = Vec::new();
        loop {
            if raw {
                out.append(&mut buf);
                break;
            }
            let Some(h) = buf.get(..5) else {
                break;
            };
            let length = usize::from(u16::from_be_bytes([h[3], h[4]]));
            if !(0x14..=0x17).contains(&h[0]) || h[1] != 3 || length > (1 << 14) + 256 {
                raw = true;
                continue;
            }
            let (recs, _) = tls::records(&buf);
            let Some(rec) = recs.first().copied() else {
                break; // the rest of the record has not arrived yet
            };
            let mut bytes: Vec<u8> = buf.drain(..5 + rec.length).collect();
            let mode = st.tamper.load(Ordering::SeqCst);
            let wanted = if to_server {
                Tamper::ToServer as u8
            } else {
                Tamper::ToClient as u8
            };
            let tampered = mode == wanted
                && rec.content_type == tls::APPLICATION_DATA
                && rec.length >= TAMPER_MIN_RECORD;
            if tampered {
                bytes[5 + rec.length / 2] ^= 0x01;
                st.tampered.fetch_add(1, Ordering::SeqCst);
            }
            {
                let mut records = st.records.lock().unwrap_or_else(|p| p.into_inner());
                if records.len() < 100_000 {
                    records.push(RelayedRecord {
                        to_server,
                        record: rec,
                        tampered,
                    });
                }
            }
            out.extend_from_slice(&bytes);
        }
        if !out.is_empty() && to.write_all(&out).await.is_err() {
            break;
        }
    }
    if !buf.is_empty() {
        let _ = to.write_all(&buf).await;
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_kubernetes() {
        let env = |n: &str| match n {
            "A" => Some("alpha".to_string()),
            _ => None,
        };
        assert_eq!(expand("x$(A)y", env), "xalphay");
        assert_eq!(expand("$$(A)", env), "$(A)");
        assert_eq!(expand("$(B)", env), "$(B)");
        assert_eq!(expand("a$$b", env), "a$b");
        assert_eq!(expand("cost $5", env), "cost $5");
        assert_eq!(expand("$(A", env), "$(A");
        assert_eq!(expand("end$", env), "end$");
    }

    #[test]
    fn translates_paths_under_mounts_only() {
        let mounts = vec![
            ("/etc/moat/policy".to_string(), PathBuf::from("/lab/p")),
            ("/var/run/secrets/moat".to_string(), PathBuf::from("/lab/t")),
        ];
        assert_eq!(
            translate_path("/var/run/secrets/moat/token", &mounts),
            "/lab/t/token"
        );
        assert_eq!(translate_path("/etc/moat/policy", &mounts), "/lab/p");
        assert_eq!(
            translate_path("/etc/moat/policyx", &mounts),
            "/etc/moat/policyx"
        );
        assert_eq!(translate_path("info", &mounts), "info");
    }

    #[test]
    fn reads_tls_records_and_stops_at_plaintext() {
        let mut s = vec![0x16, 0x03, 0x01, 0x00, 0x02, 0x01, 0x00];
        s.extend([0x17, 0x03, 0x03, 0x00, 0x01, 0xaa]);
        let (recs, rest) = tls::records(&s);
        assert_eq!(rest, 0);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].handshake_type, Some(tls::CLIENT_HELLO));
        assert_eq!(recs[1].content_type, tls::APPLICATION_DATA);
        let (recs, rest) = tls::records(b"GET / HTTP/1.1\r\n");
        assert!(recs.is_empty() && rest == 16);
    }

    #[test]
    fn capabilities_follow_drop_and_add() {
        let sc = SecurityContext {
            capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        };
        assert_eq!(capabilities(Some(&sc)), vec!["net_admin", "net_raw"]);
        assert!(capabilities(None).contains(&"chown".to_string()));
    }
}
