//! The cluster suite: Moat installed on a live Kubernetes cluster (`tests/cluster/up.sh`) with
//! `kubectl apply -k deploy/`, exactly as deploy/README.md tells an operator to, then used by
//! meshed workloads created through the API server.
//!
//! The steps run in order and build on each other (the install is what every later step
//! uses), so this is one test program (`harness = false`) rather than independent tests:
//!
//! 1. `install`: moat-ca and moat-injector become Ready; the injector serves a certificate the
//!    CA issued to its identity and keeps the webhook's `caBundle` equal to the trust bundle,
//!    repairing an edit.
//! 2. `injection`: Deployments, StatefulSets and CronJobs in a namespace labelled
//!    `moat.dev/inject=enabled` get the sidecar; unlabelled namespaces, `kube-system` and
//!    `moat-system` are untouched even when a pod asks for it; a tenant cannot opt a pod out
//!    of an enforcing namespace.
//! 3. `identity`: sidecars hold SVIDs obtained with their projected tokens; the CA, through the
//!    real TokenReview API, refuses a token for another audience, a token of a deleted pod and
//!    a token asking for another workload's identity.
//! 4. `traffic`: Services (ClusterIP and headless) carry only TLS records on the node's
//!    bridge; the namespace's `moat-policy` is enforced and hot-reloaded; probes pass under
//!    default deny; a Job and a CronJob's Job complete, sidecar included.
//! 5. `rollout`: `kubectl rollout restart` of the server under steady traffic fails no request.
//! 6. `ca-restart`: deleting and restarting moat-ca pods fails no request, and a pod created
//!    meanwhile still gets its identity.
//! 7. `uninstall`: `kubectl delete -k deploy/` leaves no webhook behind and meshed pods
//!    working.
//!
//! Without a cluster (`KUBECONFIG`/`KUBECTL` unset) the suite says so loudly and passes,
//! unless `MOAT_REQUIRE_CLUSTER_TESTS=1` (set by `tests/run.sh` as root), where that fails.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use base64::Engine as _;
use moat_core::client::{make_csr, KeyAlgorithm};
use moat_core::SpiffeId;
use moat_e2e::cluster::{eventually, run_checked, Cluster, Install};
use moat_e2e::https::{self, Http1Client};
use moat_e2e::lab::{contains, marker, pcap, tls};
use rustls_pki_types::ServerName;
use serde_json::{json, Value};

/// The mesh namespace (labelled `moat.dev/inject=enabled`).
const SHOP: &str = "moat-e2e-shop";
/// A namespace without the label.
const PLAIN: &str = "moat-e2e-plain";
/// Moat's own namespace.
const SYSTEM: &str = "moat-system";
/// The test image `tests/cluster/oci.py` builds (busybox).
const APP_IMAGE: &str = "localhost/moat-e2e-app:latest";
/// The node's pod bridge (`tests/cluster/env.sh`).
const BRIDGE: &str = "moat-cni0";
/// The test servers' ports: Service port 80 (`web`) and container port 8080.
const APP_PORTS: [u16; 2] = [80, 8080];
/// Longest wait for pods to start, roll out or finish.
const POD_TIMEOUT: Duration = Duration::from_secs(180);
/// Longest wait for a ConfigMap edit to reach the sidecars (kubelet sync + policy re-read).
const POLICY_TIMEOUT: Duration = Duration::from_secs(120);

/// One step of the suite: it runs against the shared cluster state and may leave resources for later steps.
type Step = fn(&mut Suite) -> anyhow::Result<()>;

fn main() -> ExitCode {
    let required = std::env::var("MOAT_REQUIRE_CLUSTER_TESTS").as_deref() == Ok("1");
    let cluster = match Cluster::from_env() {
        Ok(c) => c,
        Err(why) if required => {
            eprintln!("cluster suite: FAILED: MOAT_REQUIRE_CLUSTER_TESTS=1 but {why}");
            return ExitCode::FAILURE;
        }
        Err(why) => {
            eprintln!(
                "\n*** cluster suite SKIPPED: {why}.\n*** Run it as root: \
                 eval \"$(tests/cluster/up.sh)\" && cargo test --release -p moat-e2e --test cluster\n"
            );
            return ExitCode::SUCCESS;
        }
    };
    let mut suite = match Suite::new(cluster) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cluster suite: FAILED to prepare: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let steps: [(&str, Step); 8] = [
        ("install", install),
        ("injection", injection),
        ("identity", identity),
        ("traffic", traffic),
        ("discovery", discovery),
        ("rollout", rollout),
        ("ca-restart", ca_restart),
        ("uninstall", uninstall),
    ];
    let started = Instant::now();
    for (name, step) in steps {
        let t = Instant::now();
        eprintln!("cluster suite: {name} ...");
        if let Err(e) = step(&mut suite) {
            eprintln!(
                "cluster suite: {name} FAILED after {:.0?}: {e:#}",
                t.elapsed()
            );
            eprintln!("{}", suite.k.diagnostics(&[SYSTEM, SHOP, PLAIN]));
            eprintln!("{}", suite.moat_logs());
            suite.cleanup();
            return ExitCode::FAILURE;
        }
        eprintln!("cluster suite: {name} ok ({:.1?})", t.elapsed());
    }
    suite.cleanup();
    eprintln!(
        "cluster suite: all {} steps passed in {:.0?}",
        steps.len(),
        started.elapsed()
    );
    ExitCode::SUCCESS
}

/// What the steps share: the cluster, the rendered install and the markers the apps serve.
struct Suite {
    k: Cluster,
    dir: tempfile::TempDir,
    /// The copy of deploy/ with throwaway CA material, as an operator would have it.
    deploy: PathBuf,
    /// The root certificate (the trust bundle) in PEM.
    root_pem: String,
    /// What `web` in the mesh serves: must never appear on the wire.
    secret: String,
    /// What `plain-web` outside the mesh serves: proves the capture sees plaintext.
    control: String,
    rt: tokio::runtime::Runtime,
}

impl Suite {
    fn new(k: Cluster) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("moat-cluster-").tempdir()?;
        let Install {
            deploy, root_pem, ..
        } = Install::render(dir.path())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let suite = Self {
            k,
            dir,
            deploy,
            root_pem,
            secret: marker("mesh-secret"),
            control: marker("plain-control"),
            rt,
        };
        suite.remove_leftovers()?;
        Ok(suite)
    }

    /// Removes what an interrupted earlier run may have left, so every run starts clean.
    fn remove_leftovers(&self) -> anyhow::Result<()> {
        self.k.kubectl([
            "delete",
            "mutatingwebhookconfiguration",
            "moat-injector",
            "--ignore-not-found",
        ])?;
        for ns in [SHOP, PLAIN, SYSTEM] {
            self.k.kubectl([
                "delete",
                "namespace",
                ns,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=180s",
            ])?;
        }
        self.k.kubectl([
            "delete",
            "clusterrole,clusterrolebinding",
            "-l",
            "app.kubernetes.io/part-of=moat",
            "--ignore-not-found",
        ])?;
        self.k.kubectl([
            "-n",
            "kube-system",
            "delete",
            "pod",
            "moat-e2e-optin",
            "--ignore-not-found",
            "--wait=true",
        ])?;
        Ok(())
    }

    fn cleanup(&self) {
        for args in [
            vec![
                "delete",
                "namespace",
                SHOP,
                PLAIN,
                "--ignore-not-found",
                "--wait=false",
            ],
            vec![
                "-n",
                "kube-system",
                "delete",
                "pod",
                "moat-e2e-optin",
                "--ignore-not-found",
            ],
        ] {
            if let Err(e) = self.k.kubectl(&args) {
                eprintln!("cluster suite: cleanup: {e:#}");
            }
        }
    }

    /// The last lines of every Moat container's log in the test namespaces.
    fn moat_logs(&self) -> String {
        let mut out = String::new();
        for (ns, selector, container) in [
            (SYSTEM, "app.kubernetes.io/part-of=moat", None),
            (SHOP, "moat-e2e/app", Some("moat-proxy")),
        ] {
            let Ok(pods) = self.k.pods(ns, selector) else {
                continue;
            };
            for p in pods {
                let name = p["metadata"]["name"].as_str().unwrap_or_default();
                let mut args = vec!["-n", ns, "logs", name, "--tail=40"];
                if let Some(c) = container {
                    args.extend_from_slice(&["-c", c]);
                }
                if let Ok(o) = self.k.run(&args) {
                    out.push_str(&format!("--- logs {ns}/{name}\n"));
                    out.push_str(&String::from_utf8_lossy(&o.stdout));
                    out.push_str(&String::from_utf8_lossy(&o.stderr));
                }
            }
        }
        out
    }

    /// `kubectl apply` of `objects` as one List.
    fn apply(&self, objects: Vec<Value>) -> anyhow::Result<()> {
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        self.k.apply(&list.to_string())?;
        Ok(())
    }

    fn rollout_status(&self, ns: &str, what: &str) -> anyhow::Result<()> {
        self.k.kubectl([
            "-n",
            ns,
            "rollout",
            "status",
            what,
            &format!("--timeout={}s", POD_TIMEOUT.as_secs()),
        ])?;
        Ok(())
    }

    /// The one pod named by `selector` in `ns` that is not being deleted.
    fn pod(&self, ns: &str, selector: &str) -> anyhow::Result<Value> {
        let pods: Vec<Value> = self
            .k
            .pods(ns, selector)?
            .into_iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
            .collect();
        match pods.as_slice() {
            [p] => Ok(p.clone()),
            _ => bail!("{} pods match {selector} in {ns}, expected one", pods.len()),
        }
    }

    /// Runs `sh -c script` in the app container of `ns/pod`.
    fn sh(&self, ns: &str, pod: &str, script: &str) -> anyhow::Result<std::process::Output> {
        self.k.exec(ns, pod, "app", &["sh", "-c", script])
    }

    /// `wget` of `url` from the app container of `ns/pod`: the body, or why it failed. (Deadlines
    /// come from `timeout`: this busybox's `wget -T` crashes.)
    fn fetch(&self, ns: &str, pod: &str, url: &str) -> anyhow::Result<String> {
        let out = self.sh(ns, pod, &format!("timeout 5 wget -q -O - {url}"))?;
        if !out.status.success() {
            bail!(
                "wget {url} from {ns}/{pod} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The cluster IP and port of Service `ns/name`.
    fn service_addr(&self, ns: &str, name: &str) -> anyhow::Result<SocketAddr> {
        let svc = self.k.get_json(&["-n", ns, "service", name])?;
        let ip: IpAddr = svc["spec"]["clusterIP"]
            .as_str()
            .context("service without clusterIP")?
            .parse()?;
        let port = svc["spec"]["ports"][0]["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .context("service without port")?;
        Ok(SocketAddr::new(ip, port))
    }

    /// `POST /v1/certificates` to moat-ca through its Service, as a sidecar would, with
    /// `token` and a CSR for `id`.
    fn request_svid(&self, token: &str, id: &SpiffeId) -> anyhow::Result<https::Reply> {
        let addr = self.service_addr(SYSTEM, "moat-ca")?;
        let cfg = https::client_config(self.root_pem.as_bytes())?;
        let (_, csr) = make_csr(id, &[], KeyAlgorithm::EcdsaP256)?;
        self.rt.block_on(async {
            let name = ServerName::try_from("moat-ca.moat-system.svc")?;
            let mut c = Http1Client::connect_to(addr, name, cfg).await?;
            c.send(https::certificate_request(
                Some(token),
                https::csr_body(&csr),
            )?)
            .await
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads

/// Labels every test workload carries (`moat-e2e/app=<app>`).
fn app_labels(app: &str) -> Value {
    json!({"moat-e2e/app": app})
}

/// A pod spec that passes Pod Security `restricted`, running `script` in container `app`.
fn pod_spec(service_account: &str, script: &str, port: Option<u16>) -> Value {
    let mut app = json!({
        "name": "app",
        "image": APP_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": true,
        },
        "volumeMounts": [{"name": "www", "mountPath": "/www"}],
    });
    if let Some(port) = port {
        let probe = json!({"httpGet": {"path": "/", "port": port}, "periodSeconds": 3,
                           "timeoutSeconds": 2, "failureThreshold": 2});
        app["ports"] = json!([{"name": "http", "containerPort": port}]);
        app["readinessProbe"] = probe.clone();
        app["livenessProbe"] = probe;
        // Traffic keeps arriving for a moment after a pod starts terminating, until every
        // node has seen the endpoint go: the usual preStop delay lets it finish.
        app["lifecycle"] = json!({"preStop": {"exec": {"command": ["sleep", "5"]}}});
    }
    json!({
        "serviceAccountName": service_account,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [app],
        "volumes": [{"name": "www", "emptyDir": {}}],
    })
}

/// An HTTP server on `port` whose index page says `body` (busybox httpd).
fn server_script(body: &str, port: u16) -> String {
    format!("echo \"{body}\" > /www/index.html && exec httpd -f -p {port} -h /www")
}

/// Requests `url` every 200 ms for ever, one line per request: `ok` or `FAIL <reason>`.
fn traffic_script(url: &str) -> String {
    format!(
        "while true; do if out=$(timeout 3 wget -q -O /dev/null {url} 2>&1); then echo ok; \
         else echo \"FAIL $(date +%T) $out\"; fi; sleep 0.2; done"
    )
}

fn service_account(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}})
}

fn deployment(ns: &str, app: &str, replicas: u32, spec: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": app, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": app_labels(app)},
            "strategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {"metadata": {"labels": app_labels(app)}, "spec": spec},
        },
    })
}

fn service(ns: &str, app: &str, port: u16, target: u16, headless: bool) -> Value {
    let mut spec = json!({
        "selector": app_labels(app),
        "ports": [{"name": "http", "port": port, "targetPort": target}],
    });
    if headless {
        spec["clusterIP"] = json!("None");
    }
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": app, "namespace": ns}, "spec": spec})
}

fn bare_pod(ns: &str, name: &str, labels: Value, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": spec})
}

/// A batch pod template: fetches `url` (retrying while the server starts) and exits.
fn job_pod_spec(url: &str) -> Value {
    let script = format!(
        "for i in $(seq 30); do timeout 3 wget -q -O - {url} && exit 0; sleep 2; done; exit 1"
    );
    let mut spec = pod_spec("client", &script, None);
    spec["restartPolicy"] = json!("Never");
    spec
}

/// The policy the `traffic` step installs: `client` everywhere, `intruder` only when
/// `admit_intruder`, nothing else (no unauthenticated caller).
fn shop_policy(admit_intruder: bool) -> Value {
    let mut rules = vec![json!({"name": "client", "action": "allow",
                                "from": [{"serviceAccount": format!("{SHOP}/client")}]})];
    if admit_intruder {
        rules.push(
            json!({"name": "intruder-admitted", "action": "allow", "ports": [8080],
                          "from": [{"serviceAccount": format!("{SHOP}/intruder")}]}),
        );
    }
    let policy =
        json!({"apiVersion": "moat.dev/v1", "kind": "Policy", "default": "deny", "rules": rules});
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "moat-policy", "namespace": SHOP},
        // JSON is YAML: the policy file needs no YAML library here.
        "data": {"policy.yaml": policy.to_string()},
    })
}

// ---------------------------------------------------------------------------------------------
// Pod inspection

fn name_of(obj: &Value) -> &str {
    obj["metadata"]["name"].as_str().unwrap_or("?")
}

fn container_names(pod: &Value, field: &str) -> Vec<String> {
    pod["spec"][field]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks that `pod` went through the injector: the annotation, `moat-init`, and `moat-proxy`
/// as a native sidecar.
fn check_injected(pod: &Value) -> anyhow::Result<()> {
    let name = name_of(pod);
    let annotation = pod["metadata"]["annotations"]["moat.dev/injected"]
        .as_str()
        .with_context(|| format!("{name}: no moat.dev/injected annotation"))?;
    let status: Value = serde_json::from_str(annotation)
        .with_context(|| format!("{name}: moat.dev/injected is not JSON"))?;
    ensure!(status["mode"] == "native", "{name}: injected as {status}");
    let init = container_names(pod, "initContainers");
    ensure!(
        init.first().map(String::as_str) == Some("moat-init")
            && init.iter().any(|c| c == "moat-proxy"),
        "{name}: init containers {init:?}"
    );
    let sidecar = pod["spec"]["initContainers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "moat-proxy"))
        .context("no moat-proxy")?;
    ensure!(
        sidecar["restartPolicy"] == "Always",
        "{name}: moat-proxy is not a native sidecar"
    );
    Ok(())
}

/// Checks that `pod` is exactly what its owner asked for: no annotation, no Moat container.
fn check_untouched(pod: &Value) -> anyhow::Result<()> {
    let name = name_of(pod);
    ensure!(
        pod["metadata"]["annotations"]["moat.dev/injected"].is_null(),
        "{name}: was injected"
    );
    let all: Vec<String> = container_names(pod, "initContainers")
        .into_iter()
        .chain(container_names(pod, "containers"))
        .collect();
    ensure!(all == ["app"], "{name}: containers {all:?}");
    Ok(())
}

/// Whether every container of `pod` (sidecar included) is ready.
fn all_ready(pod: &Value) -> bool {
    let ready = |field: &str| {
        pod["status"][field]
            .as_array()
            .is_none_or(|cs| cs.iter().all(|c| c["ready"] == true))
    };
    pod["status"]["phase"] == "Running"
        && !pod["status"]["containerStatuses"].is_null()
        && ready("containerStatuses")
        && ready("initContainerStatuses")
}

fn restarts(pod: &Value) -> u64 {
    ["containerStatuses", "initContainerStatuses"]
        .iter()
        .filter_map(|f| pod["status"][f].as_array())
        .flatten()
        .filter_map(|c| c["restartCount"].as_u64())
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Steady traffic

/// The `client` Deployment's request log, read from a starting line.
struct TrafficLog {
    pod: String,
    from: usize,
}

impl TrafficLog {
    /// Starts counting at the current end of the client's log.
    fn mark(s: &Suite) -> anyhow::Result<Self> {
        let pod = name_of(&s.pod(SHOP, "moat-e2e/app=client")?).to_string();
        let from = Self::lines(s, &pod)?.len();
        Ok(Self { pod, from })
    }

    fn lines(s: &Suite, pod: &str) -> anyhow::Result<Vec<String>> {
        let text = s.k.kubectl(["-n", SHOP, "logs", pod, "-c", "app"])?;
        Ok(text.lines().map(str::to_string).collect())
    }

    /// Requests since the mark: fails if one failed or too few were made.
    fn check(&self, s: &Suite, what: &str, at_least: usize) -> anyhow::Result<usize> {
        let lines = Self::lines(s, &self.pod)?;
        let new = lines.get(self.from..).unwrap_or_default();
        let failed: Vec<&String> = new.iter().filter(|l| l.starts_with("FAIL")).collect();
        let ok = new.iter().filter(|l| *l == "ok").count();
        ensure!(
            failed.is_empty(),
            "{what}: {} of {} requests failed: {failed:?}",
            failed.len(),
            new.len()
        );
        ensure!(
            ok >= at_least,
            "{what}: only {ok} requests were made (expected {at_least}+)"
        );
        eprintln!("cluster suite: {what}: {ok} requests, none failed");
        Ok(ok)
    }
}

// ---------------------------------------------------------------------------------------------
// Capture on the node's bridge

/// `tcpdump` of every TCP packet on the pod bridge.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let file = dir.join("bridge.pcap");
        let log = dir.join("tcpdump.log");
        let child = Command::new("tcpdump")
            .args(["-i", BRIDGE, "-n", "-U", "-s", "0", "-Z", "root", "-w"])
            .arg(&file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("cannot run tcpdump")?;
        let mut cap = Self { child, file };
        eventually("tcpdump to listen", Duration::from_secs(10), || {
            if let Some(status) = cap.child.try_wait()? {
                bail!(
                    "tcpdump exited ({status}): {}",
                    std::fs::read_to_string(&log)?
                );
            }
            Ok(std::fs::read_to_string(&log)?
                .contains("listening on")
                .then_some(()))
        })?;
        Ok(cap)
    }

    fn stop(mut self) -> anyhow::Result<Vec<u8>> {
        std::thread::sleep(Duration::from_millis(500));
        // SIGINT: tcpdump flushes and exits.
        let pid = libc::pid_t::try_from(self.child.id())?;
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(pid, libc::SIGINT) };
        self.child.wait()?;
        Ok(std::fs::read(&self.file)?)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. install

fn install(s: &mut Suite) -> anyhow::Result<()> {
    s.k.kubectl(["apply", "-k", &s.deploy.display().to_string()])?;
    s.rollout_status(SYSTEM, "deployment/moat-ca")?;
    s.rollout_status(SYSTEM, "deployment/moat-injector")?;
    s.rollout_status(SYSTEM, "deployment/moat-destination")?;
    for app in ["moat-ca", "moat-injector", "moat-destination"] {
        let pods = s.k.pods(SYSTEM, &format!("app.kubernetes.io/name={app}"))?;
        let ready = pods.iter().filter(|p| all_ready(p)).count();
        ensure!(
            ready == 2,
            "{app}: {ready} of {} pods Ready, expected 2",
            pods.len()
        );
    }

    // The webhook's serving certificate: issued by the in-cluster CA to the injector's
    // identity, for the name the API server dials; verified against the root, as it does.
    let addr = s.service_addr(SYSTEM, "moat-injector")?;
    let cfg = https::client_config(s.root_pem.as_bytes())?;
    // Pods turn Ready before the EndpointSlice reaches kube-proxy: until it does, the
    // Service's cluster IP rejects connections, so retry the handshake for a while.
    let leaf = eventually(
        "the injector Service to answer",
        Duration::from_secs(30),
        || {
            s.rt.block_on(async {
                let name = ServerName::try_from("moat-injector.moat-system.svc")?;
                let tls = https::connect_tls_to(addr, name, cfg.clone()).await?;
                let certs = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .context("no peer certificate")?;
                anyhow::Ok(Some(certs[0].to_vec()))
            })
        },
    )?;
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).context("injector certificate")?;
    let sans = cert
        .subject_alternative_name()?
        .context("injector certificate without SANs")?;
    let names: Vec<String> = sans
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    for want in [
        "URI(spiffe://cluster.local/ns/moat-system/sa/moat-injector)",
        "DNSName(moat-injector.moat-system.svc)",
    ] {
        ensure!(
            names.iter().any(|n| n == want),
            "injector SANs {names:?} lack {want}"
        );
    }
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    ensure!(
        lifetime <= 3700,
        "injector certificate lives {lifetime} s, expected at most 1h"
    );

    // caBundle: filled with the trust bundle, and repaired after an edit.
    let want = moat_core::TrustBundle::from_pem(s.root_pem.as_bytes())?;
    let in_sync = |s: &Suite| -> anyhow::Result<Option<()>> {
        let mwc =
            s.k.get_json(&["mutatingwebhookconfiguration", "moat-injector"])?;
        let hooks = mwc["webhooks"].as_array().context("no webhooks")?;
        for h in hooks {
            let b64 = h["clientConfig"]["caBundle"].as_str().unwrap_or_default();
            let pem = base64::engine::general_purpose::STANDARD.decode(b64)?;
            let Ok(have) = moat_core::TrustBundle::from_pem(&pem) else {
                return Ok(None);
            };
            if have.certs() != want.certs() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    };
    eventually(
        "the webhook caBundle to equal the trust bundle",
        Duration::from_secs(60),
        || in_sync(s),
    )?;
    let foreign = moat_e2e::lab::webhook_pki(std::net::Ipv4Addr::LOCALHOST)?.0;
    let patch = json!([{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle",
                        "value": base64::engine::general_purpose::STANDARD.encode(foreign)}]);
    s.k.kubectl([
        "patch",
        "mutatingwebhookconfiguration",
        "moat-injector",
        "--type=json",
        "-p",
        &patch.to_string(),
    ])?;
    ensure!(in_sync(s)?.is_none(), "the caBundle edit did not take");
    // The injector re-checks every 30 s (--ca-bundle-sync-interval).
    eventually(
        "the injector to repair the edited caBundle",
        Duration::from_secs(75),
        || in_sync(s),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. injection

fn injection(s: &mut Suite) -> anyhow::Result<()> {
    s.apply(vec![
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": SHOP, "labels": {"moat.dev/inject": "enabled"}}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PLAIN}}),
    ])?;
    let mut objects: Vec<Value> = ["web", "db", "client", "intruder"]
        .iter()
        .map(|sa| service_account(SHOP, sa))
        .collect();
    objects.extend([
        service_account(PLAIN, "client"),
        deployment(SHOP, "web", 2, pod_spec("web", &server_script(&s.secret, 8080), Some(8080))),
        service(SHOP, "web", 80, 8080, false),
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": SHOP},
            "spec": {
                "replicas": 2, "serviceName": "db",
                "selector": {"matchLabels": app_labels("db")},
                "template": {"metadata": {"labels": app_labels("db")},
                             "spec": pod_spec("db", &server_script("db-$HOSTNAME", 8080), Some(8080))},
            },
        }),
        service(SHOP, "db", 8080, 8080, true),
        deployment(SHOP, "client", 1, pod_spec("client", &traffic_script("http://web"), None)),
        deployment(SHOP, "intruder", 1, pod_spec("intruder", "exec sleep 100000", None)),
        json!({
            "apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": "tick", "namespace": SHOP},
            "spec": {
                "schedule": "* * * * *", "concurrencyPolicy": "Forbid",
                "successfulJobsHistoryLimit": 1, "failedJobsHistoryLimit": 1,
                "jobTemplate": {"spec": {"backoffLimit": 0, "template": {
                    "metadata": {"labels": app_labels("tick")},
                    "spec": job_pod_spec("http://web")}}},
            },
        }),
        deployment(PLAIN, "plain-web", 1, pod_spec("client", &server_script(&s.control, 8080), Some(8080))),
        service(PLAIN, "plain-web", 80, 8080, false),
        deployment(PLAIN, "plain-client", 1, pod_spec("client", "exec sleep 100000", None)),
    ]);
    // Pods that ask to be injected where Moat must never inject.
    let optin = json!({"moat.dev/inject": "enabled", "moat-e2e/app": "optin"});
    for ns in ["kube-system", SYSTEM] {
        objects.push(bare_pod(
            ns,
            "moat-e2e-optin",
            optin.clone(),
            pod_spec("default", "exec sleep 100000", None),
        ));
    }
    s.apply(objects)?;

    for (ns, what) in [
        (SHOP, "deployment/web"),
        (SHOP, "statefulset/db"),
        (SHOP, "deployment/client"),
        (SHOP, "deployment/intruder"),
        (PLAIN, "deployment/plain-web"),
        (PLAIN, "deployment/plain-client"),
    ] {
        s.rollout_status(ns, what)?;
    }
    for app in ["web", "db", "client", "intruder"] {
        let pods = s.k.pods(SHOP, &format!("moat-e2e/app={app}"))?;
        ensure!(!pods.is_empty(), "no {app} pods");
        for p in pods
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        {
            check_injected(p)?;
            ensure!(all_ready(p), "{}: not Ready", name_of(p));
        }
    }
    for p in s.k.pods(PLAIN, "moat-e2e/app")? {
        check_untouched(&p)?;
    }
    for ns in ["kube-system", SYSTEM] {
        let pod = eventually("the opt-in pod to run", POD_TIMEOUT, || {
            let p = s.k.get_json(&["-n", ns, "pod", "moat-e2e-optin"])?;
            Ok(all_ready(&p).then_some(p))
        })?;
        check_untouched(&pod).with_context(|| format!("in {ns}"))?;
    }
    s.k.kubectl([
        "-n",
        SYSTEM,
        "delete",
        "pod",
        "moat-e2e-optin",
        "--wait=false",
    ])?;

    // A tenant of an enforcing namespace cannot take a pod out of the mesh by editing its spec.
    let escape = bare_pod(
        SHOP,
        "escape",
        json!({"moat.dev/inject": "disabled"}),
        pod_spec("client", "exec sleep 100000", None),
    );
    match s.k.apply(&escape.to_string()) {
        Ok(out) => bail!("a pod opting out of the enforcing namespace was admitted: {out}"),
        Err(e) => {
            let msg = format!("{e:#}");
            ensure!(
                msg.contains("denied the request") && msg.contains("moat.dev/inject"),
                "the opt-out was refused, but not by the injector: {msg}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 3. identity

fn identity(s: &mut Suite) -> anyhow::Result<()> {
    // Every meshed pod holds its own SVID (from its projected token, via TokenReview).
    for app in ["web", "db", "client", "intruder"] {
        let want = format!("spiffe://cluster.local/ns/{SHOP}/sa/{app}");
        for p in s.k.pods(SHOP, &format!("moat-e2e/app={app}"))? {
            let body = s.fetch(SHOP, name_of(&p), "http://127.0.0.1:15020/identity")?;
            let id: Value = serde_json::from_str(&body).context("/identity")?;
            ensure!(
                id["spiffe_id"] == want.as_str(),
                "{}: identity {id}",
                name_of(&p)
            );
        }
    }

    let client = s.pod(SHOP, "moat-e2e/app=client")?;
    let client_id: SpiffeId = format!("spiffe://cluster.local/ns/{SHOP}/sa/client").parse()?;
    let web_id: SpiffeId = format!("spiffe://cluster.local/ns/{SHOP}/sa/web").parse()?;
    let token = |audience: &str, pod: &Value| -> anyhow::Result<String> {
        let out = s.k.kubectl([
            "-n",
            SHOP,
            "create",
            "token",
            pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default"),
            "--audience",
            audience,
            "--duration=10m",
            "--bound-object-kind=Pod",
            &format!("--bound-object-name={}", name_of(pod)),
            &format!(
                "--bound-object-uid={}",
                pod["metadata"]["uid"].as_str().unwrap_or_default()
            ),
        ])?;
        Ok(out.trim().to_string())
    };

    // The control: a token bound to a live pod, for the CA's audience, is accepted.
    let r = s.request_svid(&token("moat-ca", &client)?, &client_id)?;
    ensure!(
        r.status == 200,
        "a valid pod-bound token was refused: {} {}",
        r.status,
        r.text()
    );

    let refused = |what: &str, r: https::Reply| -> anyhow::Result<()> {
        ensure!(
            r.status == 401 || r.status == 403,
            "{what}: answered {} {}",
            r.status,
            r.text()
        );
        eprintln!(
            "cluster suite: {what}: refused ({} {})",
            r.status,
            r.text().trim()
        );
        Ok(())
    };
    refused(
        "a token for another audience",
        s.request_svid(&token("not-moat-ca", &client)?, &client_id)?,
    )?;
    refused(
        "a workload asking for another's identity",
        s.request_svid(&token("moat-ca", &client)?, &web_id)?,
    )?;

    // A pod that is gone: its token was minted while it lived, and is presented only now
    // (never seen by the CA before, so nothing cached can answer for it).
    s.apply(vec![bare_pod(
        SHOP,
        "doomed",
        app_labels("doomed"),
        pod_spec("client", "exec sleep 100000", None),
    )])?;
    let doomed = s.k.get_json(&["-n", SHOP, "pod", "doomed"])?;
    let doomed_token = token("moat-ca", &doomed)?;
    s.k.kubectl([
        "-n",
        SHOP,
        "delete",
        "pod",
        "doomed",
        "--grace-period=0",
        "--force",
        "--wait=true",
    ])?;
    refused(
        "the token of a deleted pod",
        s.request_svid(&doomed_token, &client_id)?,
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. traffic

fn traffic(s: &mut Suite) -> anyhow::Result<()> {
    // Fresh callers, so their first connections (handshakes included) happen under capture.
    s.apply(vec![
        bare_pod(
            SHOP,
            "probe",
            app_labels("probe"),
            pod_spec("client", "exec sleep 100000", None),
        ),
        bare_pod(
            PLAIN,
            "probe",
            app_labels("probe"),
            pod_spec("client", "exec sleep 100000", None),
        ),
    ])?;
    for ns in [SHOP, PLAIN] {
        s.k.kubectl([
            "-n",
            ns,
            "wait",
            "--for=condition=Ready",
            "pod/probe",
            "--timeout=180s",
        ])?;
    }
    let plain_ips: Vec<String> =
        s.k.pods(PLAIN, "moat-e2e/app")?
            .iter()
            .filter_map(|p| p["status"]["podIP"].as_str().map(str::to_string))
            .collect();

    let capture = Capture::start(s.dir.path())?;
    let web = s.fetch(
        SHOP,
        "probe",
        &format!("http://web.{SHOP}.svc.cluster.local/"),
    )?;
    ensure!(web.contains(&s.secret), "web answered {web:?}");
    for i in 0..2 {
        let url = format!("http://db-{i}.db.{SHOP}.svc.cluster.local:8080/");
        let db = s.fetch(SHOP, "probe", &url)?;
        ensure!(db.trim() == format!("db-db-{i}"), "{url} answered {db:?}");
    }
    let plain = s.fetch(PLAIN, "probe", "http://plain-web/")?;
    ensure!(plain.contains(&s.control), "plain-web answered {plain:?}");
    let bytes = capture.stop()?;

    ensure!(
        contains(&bytes, s.control.as_bytes()),
        "the capture misses the unmeshed plaintext: it proves nothing"
    );
    ensure!(
        !contains(&bytes, s.secret.as_bytes()),
        "the mesh secret is visible on {BRIDGE}"
    );
    let in_pod_net = |ip: &std::net::Ipv4Addr| ip.octets()[..2] == [10, 244];
    let meshed = |ip: &std::net::Ipv4Addr| !plain_ips.contains(&ip.to_string());
    let flows = pcap::tcp_flows(&bytes)?;
    let mut checked = 0;
    for f in flows.iter().filter(|f| {
        in_pod_net(f.src.ip())
            && meshed(f.src.ip())
            && meshed(f.dst.ip())
            && (APP_PORTS.contains(&f.dst.port()) || APP_PORTS.contains(&f.src.port()))
            && !f.data.is_empty()
    }) {
        let (records, rest) = tls::records(&f.data);
        ensure!(
            rest == 0 && !records.is_empty(),
            "{} -> {}: {rest} bytes that are not TLS records",
            f.src,
            f.dst
        );
        if f.saw_syn && APP_PORTS.contains(&f.dst.port()) {
            ensure!(
                records[0].handshake_type == Some(tls::CLIENT_HELLO),
                "{} -> {}: does not start with a ClientHello",
                f.src,
                f.dst
            );
        }
        checked += 1;
    }
    ensure!(checked >= 4, "only {checked} meshed flows in the capture");
    eprintln!("cluster suite: {checked} meshed flows on {BRIDGE}, all TLS records");

    // Policy: default deny; `client` allowed, `intruder` and unmeshed callers refused.
    s.apply(vec![shop_policy(false)])?;
    let intruder = name_of(&s.pod(SHOP, "moat-e2e/app=intruder")?).to_string();
    let denied = |ns: &str, pod: &str| -> anyhow::Result<Option<()>> {
        let out = s.sh(
            ns,
            pod,
            "timeout 5 wget -q -O - http://web.moat-e2e-shop.svc/",
        )?;
        let err = String::from_utf8_lossy(&out.stderr);
        Ok((!out.status.success() && err.contains("403")).then_some(()))
    };
    eventually(
        "the intruder to be denied by moat-policy",
        POLICY_TIMEOUT,
        || denied(SHOP, &intruder),
    )?;
    eventually("an unmeshed caller to be denied", POLICY_TIMEOUT, || {
        denied(PLAIN, "probe")
    })?;
    let web = s.fetch(SHOP, "probe", "http://web/")?;
    ensure!(
        web.contains(&s.secret),
        "client identity refused under the policy: {web:?}"
    );
    // Hot reload: admitting the intruder takes effect without a restart.
    s.apply(vec![shop_policy(true)])?;
    eventually(
        "the intruder to be admitted after the policy edit",
        POLICY_TIMEOUT,
        || {
            Ok(s.fetch(SHOP, &intruder, "http://web/")
                .ok()
                .filter(|b| b.contains(&s.secret)))
        },
    )?;
    s.apply(vec![shop_policy(false)])?;
    eventually("the intruder to be denied again", POLICY_TIMEOUT, || {
        denied(SHOP, &intruder)
    })?;

    // A Job: its app exits, the sidecar follows, the pod and the Job finish.
    s.apply(vec![json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "once", "namespace": SHOP},
        "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": app_labels("once")},
                                                 "spec": job_pod_spec("http://web")}},
    })])?;
    s.k.kubectl([
        "-n",
        SHOP,
        "wait",
        "--for=condition=Complete",
        "job/once",
        "--timeout=180s",
    ])?;
    let pod = s.pod(SHOP, "moat-e2e/app=once")?;
    check_injected(&pod)?;
    check_finished(s, SHOP, name_of(&pod))?;

    // The CronJob, created in the injection step, has run by now (once a minute).
    let tick = eventually("a Job of CronJob tick to succeed", POD_TIMEOUT, || {
        let pods = s.k.pods(SHOP, "moat-e2e/app=tick")?;
        Ok(pods
            .into_iter()
            .find(|p| p["status"]["phase"] == "Succeeded"))
    })?;
    check_injected(&tick)?;
    check_finished(s, SHOP, name_of(&tick))?;
    s.k.kubectl(["-n", SHOP, "delete", "cronjob", "tick"])?;

    // Probes under default deny: the kubelet reaches them through the sidecar, so the servers
    // stay Ready and are never restarted by their liveness probes.
    std::thread::sleep(Duration::from_secs(8));
    for app in ["web", "db"] {
        for p in s.k.pods(SHOP, &format!("moat-e2e/app={app}"))? {
            ensure!(
                all_ready(&p),
                "{}: not Ready under default deny",
                name_of(&p)
            );
            ensure!(
                restarts(&p) == 0,
                "{}: restarted {} times",
                name_of(&p),
                restarts(&p)
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 5. discovery

/// The sidecar's counter or gauge `name{labels}` in pod `ns/pod`, 0 when absent.
fn proxy_metric(s: &Suite, ns: &str, pod: &str, name: &str, labels: &str) -> anyhow::Result<f64> {
    let text = s.fetch(ns, pod, "http://127.0.0.1:15020/metrics")?;
    Ok(metric_value(&text, name, labels))
}

/// The probe pod's sidecar counter `name` for one `reason`.
fn probe_count(s: &Suite, name: &str, reason: &str) -> anyhow::Result<f64> {
    proxy_metric(s, SHOP, "probe", name, &format!("reason=\"{reason}\""))
}

const REFUSED: &str = "moat_proxy_connections_refused_total";

/// The sum of the samples of `name` whose label set contains every `k="v"` of `labels`.
fn metric_value(text: &str, name: &str, labels: &str) -> f64 {
    let want: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && want.iter().all(|w| rest.contains(w)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The pod IP of `ns/pod`.
fn pod_ip(s: &Suite, ns: &str, pod: &str) -> anyhow::Result<String> {
    let p = s.k.get_json(&["-n", ns, "pod", pod])?;
    p["status"]["podIP"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("{ns}/{pod} has no IP"))
}

fn discovery(s: &mut Suite) -> anyhow::Result<()> {
    // Sidecars hold a live subscription to moat-destination.
    eventually(
        "the probe's sidecar to be connected to discovery",
        Duration::from_secs(60),
        || {
            let up = proxy_metric(s, SHOP, "probe", "moat_proxy_discovery_connected", "")?;
            Ok((up == 1.0).then_some(()))
        },
    )?;

    // A Service with three replicas: the client's sidecar picks the endpoint (each serves its
    // own name), so fresh connections spread over all three.
    s.apply(vec![
        deployment(
            SHOP,
            "echo",
            3,
            pod_spec("web", &server_script("echo-$HOSTNAME", 8080), Some(8080)),
        ),
        service(SHOP, "echo", 80, 8080, false),
    ])?;
    s.rollout_status(SHOP, "deployment/echo")?;
    let names: Vec<String> =
        s.k.pods(SHOP, "moat-e2e/app=echo")?
            .iter()
            .map(|p| format!("echo-{}", name_of(p)))
            .collect();
    let mut counts: std::collections::BTreeMap<String, u32> = Default::default();
    let script = "for i in $(seq 60); do timeout 3 wget -q -O - http://echo/ || echo FAIL; done";
    // Until the EndpointSlice has all three, the first answers may come from fewer.
    eventually(
        "requests to spread over the three echo pods",
        Duration::from_secs(60),
        || {
            counts.clear();
            let out = s.sh(SHOP, "probe", script)?;
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                *counts.entry(line.trim().to_string()).or_default() += 1;
            }
            Ok(names
                .iter()
                .all(|n| counts.get(n).copied().unwrap_or(0) >= 5)
                .then_some(()))
        },
    )
    .with_context(|| format!("per endpoint: {counts:?}"))?;
    ensure!(!counts.contains_key("FAIL"), "failed requests: {counts:?}");
    eprintln!("cluster suite: 60 requests to echo, per endpoint: {counts:?}");

    // Scaled to zero, the Service is refused by the sidecar at once (no endpoints), and
    // scaled back up it answers again as soon as discovery lists the new pods.
    s.k.kubectl(["-n", SHOP, "scale", "deployment/echo", "--replicas=0"])?;
    // Terminating pods keep serving through their preStop delay (listed as serving while no
    // ready endpoint is left); once they are gone the sidecar refuses at once.
    let no_endpoints = |s: &Suite| probe_count(s, REFUSED, "no_endpoints");
    let refused_before = no_endpoints(s)?;
    eventually(
        "echo to be refused with no endpoints",
        Duration::from_secs(90),
        || {
            let failed = s.fetch(SHOP, "probe", "http://echo/").is_err();
            Ok((failed && no_endpoints(s)? > refused_before).then_some(()))
        },
    )?;
    s.k.kubectl(["-n", SHOP, "scale", "deployment/echo", "--replicas=1"])?;
    s.k.kubectl([
        "-n",
        SHOP,
        "wait",
        "--for=condition=Available",
        "deployment/echo",
        "--timeout=180s",
    ])?;
    let ready_at = Instant::now();
    eventually(
        "echo to answer after scaling back up",
        Duration::from_secs(30),
        || {
            Ok(s.fetch(SHOP, "probe", "http://echo/")
                .ok()
                .filter(|b| b.starts_with("echo-")))
        },
    )?;
    eprintln!(
        "cluster suite: echo answered {:.1?} after its Deployment turned Available again",
        ready_at.elapsed()
    );

    // An address in the mesh networks that no pod holds: refused, never dialed with any
    // identity of the trust domain.
    let before = probe_count(s, REFUSED, "unknown_destination")?;
    ensure!(
        s.fetch(SHOP, "probe", "http://10.244.0.250:8080/").is_err(),
        "an address no pod holds answered"
    );
    let after = probe_count(s, REFUSED, "unknown_destination")?;
    ensure!(
        after > before,
        "the unknown destination was not refused as unknown_destination"
    );

    // The insider man in the middle: a rule on the node (the network between the pods) sends
    // the probe's traffic for db-0 to the intruder's pod, whose sidecar holds a valid SVID of
    // the trust domain (shop/intruder). The probe's sidecar expects shop/db there and refuses.
    let (probe_ip, db_ip) = (pod_ip(s, SHOP, "probe")?, pod_ip(s, SHOP, "db-0")?);
    let intruder = name_of(&s.pod(SHOP, "moat-e2e/app=intruder")?).to_string();
    let intruder_ip = pod_ip(s, SHOP, &intruder)?;
    let url = format!("http://db-0.db.{SHOP}.svc.cluster.local:8080/");
    ensure!(
        s.fetch(SHOP, "probe", &url)?.trim() == "db-db-0",
        "db-0 did not answer before the attack"
    );
    let rule = [
        "-t",
        "nat",
        "PREROUTING",
        "-s",
        &probe_ip,
        "-d",
        &db_ip,
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "DNAT",
        "--to-destination",
        &format!("{intruder_ip}:8080"),
    ];
    let iptables = |op: &str| {
        let mut args = rule.to_vec();
        args.insert(2, op);
        run_checked(Command::new("iptables").args(&args))
    };
    let wrong = |s: &Suite| {
        probe_count(
            s,
            "moat_proxy_tls_handshake_failures_total",
            "wrong_identity",
        )
    };
    // Conntrack entries of the probe's flows to db-0 (none left to bypass or keep the rule).
    let forget_flows = || {
        let _ = Command::new("conntrack")
            .args(["-D", "-s", &probe_ip, "-d", &db_ip])
            .output();
    };
    let failures_before = wrong(s)?;
    iptables("-I")?;
    let attacked = (|| -> anyhow::Result<()> {
        // Established flows keep their translation: drop them so the next connect is diverted.
        forget_flows();
        eventually(
            "the diverted connection to be refused as wrong_identity",
            Duration::from_secs(30),
            || {
                let answered = s.fetch(SHOP, "probe", &url);
                Ok((answered.is_err() && wrong(s)? > failures_before).then_some(()))
            },
        )?;
        ensure!(
            s.fetch(SHOP, "probe", &url).is_err(),
            "a request reached the intruder's sidecar in place of db-0"
        );
        Ok(())
    })();
    iptables("-D")?;
    attacked?;
    forget_flows();
    eventually(
        "db-0 to answer again once the attack stops",
        Duration::from_secs(30),
        || {
            Ok(s.fetch(SHOP, "probe", &url)
                .ok()
                .filter(|b| b.trim() == "db-db-0"))
        },
    )?;
    s.k.kubectl([
        "-n",
        SHOP,
        "delete",
        "deployment/echo",
        "service/echo",
        "--wait=false",
    ])?;
    Ok(())
}

/// Checks that pod `ns/name` ended: phase Succeeded, every container (sidecar included)
/// terminated.
fn check_finished(s: &Suite, ns: &str, name: &str) -> anyhow::Result<()> {
    eventually(
        "the finished pod's sidecar to exit",
        Duration::from_secs(60),
        || {
            let p = s.k.get_json(&["-n", ns, "pod", name])?;
            if p["status"]["phase"] != "Succeeded" {
                return Ok(None);
            }
            let running: Vec<&str> = ["containerStatuses", "initContainerStatuses"]
                .iter()
                .filter_map(|f| p["status"][f].as_array())
                .flatten()
                .filter(|c| c["state"]["terminated"].is_null())
                .filter_map(|c| c["name"].as_str())
                .collect();
            if running.is_empty() {
                Ok(Some(()))
            } else {
                bail!("{name}: still running {running:?}")
            }
        },
    )
}

// ---------------------------------------------------------------------------------------------
// 6. rollout

fn rollout(s: &mut Suite) -> anyhow::Result<()> {
    let log = TrafficLog::mark(s)?;
    let before: Vec<String> =
        s.k.pods(SHOP, "moat-e2e/app=web")?
            .iter()
            .map(|p| name_of(p).to_string())
            .collect();
    s.k.kubectl(["-n", SHOP, "rollout", "restart", "deployment/web"])?;
    s.rollout_status(SHOP, "deployment/web")?;
    // Until the old pods are gone, connections to them are still being drained.
    eventually("the old web pods to be gone", POD_TIMEOUT, || {
        let now = s.k.pods(SHOP, "moat-e2e/app=web")?;
        Ok(now
            .iter()
            .all(|p| !before.contains(&name_of(p).to_string()))
            .then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(3));
    log.check(s, "rollout restart of web under steady traffic", 20)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 7. ca-restart

fn ca_restart(s: &mut Suite) -> anyhow::Result<()> {
    let log = TrafficLog::mark(s)?;
    let ca = s.k.pods(SYSTEM, "app.kubernetes.io/name=moat-ca")?;
    let victim = ca
        .first()
        .map(name_of)
        .context("no moat-ca pod")?
        .to_string();
    s.k.kubectl(["-n", SYSTEM, "delete", "pod", &victim, "--wait=false"])?;
    // A new workload needs the CA while one replica is gone.
    s.apply(vec![bare_pod(
        SHOP,
        "late",
        app_labels("late"),
        pod_spec("client", "exec sleep 100000", None),
    )])?;
    s.k.kubectl([
        "-n",
        SHOP,
        "wait",
        "--for=condition=Ready",
        "pod/late",
        "--timeout=180s",
    ])?;
    s.rollout_status(SYSTEM, "deployment/moat-ca")?;
    s.k.kubectl(["-n", SYSTEM, "rollout", "restart", "deployment/moat-ca"])?;
    s.rollout_status(SYSTEM, "deployment/moat-ca")?;
    let body = s.fetch(SHOP, "late", "http://127.0.0.1:15020/identity")?;
    ensure!(body.contains("/sa/client"), "late pod identity {body}");
    let web = s.fetch(SHOP, "late", "http://web/")?;
    ensure!(
        web.contains(&s.secret),
        "late pod could not reach web: {web:?}"
    );
    log.check(s, "moat-ca pod deleted, then moat-ca restarted", 20)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 8. uninstall

fn uninstall(s: &mut Suite) -> anyhow::Result<()> {
    let log = TrafficLog::mark(s)?;
    let deploy = s.deploy.display().to_string();
    s.k.kubectl(["delete", "-k", &deploy, "--wait=true", "--timeout=180s"])?;
    let hooks = s.k.get_json(&["mutatingwebhookconfigurations"])?;
    let left: Vec<&str> = hooks["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(name_of)
                .filter(|n| n.contains("moat"))
                .collect()
        })
        .unwrap_or_default();
    ensure!(left.is_empty(), "webhooks left behind: {left:?}");
    let roles = s.k.kubectl([
        "get",
        "clusterrole,clusterrolebinding",
        "-l",
        "app.kubernetes.io/part-of=moat",
        "-o",
        "name",
    ])?;
    ensure!(roles.trim().is_empty(), "RBAC left behind: {roles}");
    let ns = s.k.run(["get", "namespace", SYSTEM])?;
    ensure!(!ns.status.success(), "namespace {SYSTEM} still exists");

    // Running meshed pods keep working on the certificates they hold.
    std::thread::sleep(Duration::from_secs(5));
    log.check(s, "after uninstall", 15)?;
    let web = s.fetch(SHOP, "probe", "http://web/")?;
    ensure!(
        web.contains(&s.secret),
        "meshed pods stopped working: {web:?}"
    );
    // New pods are no longer held up by a webhook without a backend.
    s.apply(vec![bare_pod(
        SHOP,
        "after",
        app_labels("after"),
        pod_spec("client", "exec sleep 100000", None),
    )])?;
    s.k.kubectl([
        "-n",
        SHOP,
        "wait",
        "--for=condition=Ready",
        "pod/after",
        "--timeout=180s",
    ])?;
    check_untouched(&s.k.get_json(&["-n", SHOP, "pod", "after"])?)?;
    Ok(())
}
