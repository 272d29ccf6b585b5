//! `moat-bench controller`: the deployed moat-destination against a live Kubernetes API
//! server, the one-node cluster of `tests/cluster/up.sh` (`KUBECONFIG` and `KUBECTL` set as it
//! prints them). Where `moat-bench discovery` measures the index and API in one process, this
//! measures what only a real cluster shows: the controller's resident memory, the delay from
//! an API write to the sidecars, and the controller's watches on the API server.
//!
//! 1. **Install**: Moat from `deploy/` with throwaway CA material (`kubectl apply -k`), both
//!    moat-destination replicas Ready. Refused when `moat-system` already exists: the
//!    benchmark installs Moat and removes it again, and must never touch someone's install.
//! 2. **Load**: `--pods` pods and `--services` selector-less Services whose EndpointSlices
//!    list `--endpoints` endpoints, written through the API. The pods are bound to a Node
//!    object that no kubelet runs (unschedulable, its Lease renewed so that nothing evicts
//!    them); their status (IP, Running, Ready) is written as a kubelet would. Reported: how
//!    long the writes took, how long after the last one both replicas held everything (their
//!    `moat_destination_objects` gauges), and each replica's RSS before and after, from
//!    `/proc` on this node (target: < 200 MiB at 10,000 pods / 20,000 endpoints).
//! 3. **Sidecars**: `--sidecars` discovery clients (each its own mTLS connection and SVID,
//!    signed by the install's root) subscribe to `--per-sidecar` Services each on one replica.
//!    They all connect from this node's one address, so at most the controller's per-source
//!    limit (16) fit. Reported: the API server's open WATCH requests on pods, Services and
//!    EndpointSlices before and after (they must not change), and the watch bytes the API
//!    server sent per EndpointSlice change without and with the sidecars.
//! 4. **Changes**: `--changes` EndpointSlice writes (an endpoint turning unready or ready),
//!    each timed from the API call to the moment every subscribed sidecar holds the new
//!    answer: p50/p99/max over every (change, sidecar) pair (target: p99 < 1 s).
//!
//! Everything it created is removed at the end, Moat included, also after a failure.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use futures_util::{stream, StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use moat_core::tls;
use moat_core::TrustDomain;
use moat_e2e::cluster::{Cluster, Install};
use moat_e2e::net::{scrape, Metrics};
use moat_e2e::pki::TestCa;
use moat_proxy::discovery::Server;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use crate::discovery::{
    await_deliveries, held, subscribe, watchers, Deliveries, ScaleArgs, Sidecar, Targets,
};
use crate::util;

const TD: &str = "cluster.local";
const NS: &str = "moat-bench-scale";
const SYSTEM: &str = "moat-system";
/// The Node object the benchmark's pods are bound to; no kubelet runs it.
const NODE: &str = "moat-bench-node";
/// Service accounts the pods are spread over (identities in the index).
const ACCOUNTS: usize = 100;
/// API writes in flight at once.
const CONCURRENCY: usize = 32;
/// The controller's per-source connection limit (`Api::default_limits`).
const PER_SOURCE: usize = 16;
/// Target: the controller's RSS at 10,000 pods / 20,000 endpoints.
const RSS_TARGET_MIB: f64 = 200.0;
/// The kinds the controller watches, as the API server's metrics name them.
const WATCHED: [&str; 3] = ["pods", "services", "endpointslices"];

/// Options of `moat-bench controller`.
#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    #[command(flatten)]
    scale: ScaleArgs,
    /// Subscribed sidecars (at most 15: they share this node's address).
    #[arg(long, default_value_t = 15)]
    sidecars: usize,
    /// EndpointSlice changes timed, half of them again before the sidecars connect.
    #[arg(long, default_value_t = 100)]
    changes: usize,
}

/// One controller replica's resident memory, in MiB.
#[derive(Debug, Serialize)]
struct Replica {
    pid: u32,
    rss_idle_mib: f64,
    rss_loaded_mib: f64,
    rss_peak_mib: f64,
    rss_with_sidecars_mib: f64,
}

/// What the run measured.
#[derive(Debug, Serialize)]
struct Report {
    kubernetes: String,
    pods: usize,
    services: usize,
    endpoints: usize,
    load_seconds: f64,
    index_lag_ms: f64,
    replicas: Vec<Replica>,
    rss_target_mib: f64,
    sidecars: usize,
    per_sidecar: usize,
    api_watches_before: BTreeMap<String, u64>,
    api_watches_with_sidecars: BTreeMap<String, u64>,
    watch_bytes_per_change_without_sidecars: f64,
    watch_bytes_per_change_with_sidecars: f64,
    #[serde(flatten)]
    changes: Deliveries,
}

/// Runs the benchmark; `Ok(false)` when an answer was missing or wrong.
pub fn main(mut args: ControllerArgs) -> anyhow::Result<bool> {
    if args.scale.smoke {
        args.scale.pods /= 10;
        args.scale.services =
            (args.scale.services / 10).max(args.scale.per_sidecar.min(args.scale.services));
        args.scale.endpoints /= 10;
        args.changes = (args.changes / 10).max(2);
    }
    let per = args.scale.endpoints / args.scale.services.max(1);
    if args.scale.services == 0 || per == 0 || per > 1000 || args.scale.pods == 0 {
        bail!("need pods, Services, and 1 to 1,000 endpoints per Service");
    }
    if args.sidecars == 0 || args.sidecars >= PER_SOURCE {
        bail!("--sidecars must be 1 to {}", PER_SOURCE - 1);
    }
    if args.scale.per_sidecar == 0 || args.scale.per_sidecar > args.scale.services {
        bail!(
            "--per-sidecar must be 1 to --services ({})",
            args.scale.services
        );
    }
    if args.scale.pods > 250 * 256 {
        bail!("at most {} pods", 250 * 256);
    }
    let k = Cluster::from_env().map_err(|why| anyhow::anyhow!("no cluster: {why}"))?;
    if k.run(["get", "namespace", SYSTEM])?.status.success() {
        bail!(
            "namespace {SYSTEM} exists: this benchmark installs Moat and removes it again, so \
             run it on the test cluster (tests/cluster/up.sh) without Moat installed"
        );
    }
    let dir = tempfile::Builder::new().prefix("moat-bench-").tempdir()?;
    let install = Install::render(dir.path())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(run(&k, &install, &args));
    if let Err(e) = rt.block_on(clean_up(&k, &install.deploy)) {
        eprintln!("controller: clean-up failed: {e:#}");
    }
    let report = result?;
    print(&report);
    if let Some(path) = &args.scale.json {
        crate::phase::write_json(path, &report)?;
    }
    Ok(true)
}

fn print(r: &Report) {
    println!(
        "controller: Kubernetes {}; {} pods, {} Services, {} endpoints written in {:.1} s; both replicas held them {:.0} ms after the last write",
        r.kubernetes, r.pods, r.services, r.endpoints, r.load_seconds, r.index_lag_ms
    );
    for rep in &r.replicas {
        println!(
            "controller: replica pid {}: RSS {:.1} MiB idle, {:.1} MiB loaded (peak {:.1}), {:.1} MiB with {} sidecars (target < {:.0} MiB)",
            rep.pid, rep.rss_idle_mib, rep.rss_loaded_mib, rep.rss_peak_mib, rep.rss_with_sidecars_mib, r.sidecars, r.rss_target_mib
        );
    }
    println!(
        "controller: API server WATCH requests on {WATCHED:?}: {:?} before, {:?} with {} sidecars subscribed to {} Services each",
        in_order(&r.api_watches_before),
        in_order(&r.api_watches_with_sidecars),
        r.sidecars,
        r.per_sidecar
    );
    println!(
        "controller: watch bytes the API server sent per EndpointSlice change (all its watchers): {:.0} without sidecars, {:.0} with",
        r.watch_bytes_per_change_without_sidecars, r.watch_bytes_per_change_with_sidecars
    );
    println!(
        "controller: {}",
        r.changes.line("writes (timed from the API call)")
    );
    let rss_ok = r
        .replicas
        .iter()
        .all(|rep| rep.rss_peak_mib < r.rss_target_mib);
    let watches_ok = r.api_watches_before == r.api_watches_with_sidecars;
    let met = rss_ok && watches_ok && r.changes.met();
    println!("controller: targets {}", if met { "met" } else { "MISSED" });
}

/// Watch counts in [`WATCHED`]'s order.
fn in_order(counts: &BTreeMap<String, u64>) -> Vec<u64> {
    WATCHED
        .iter()
        .map(|k| counts.get(*k).copied().unwrap_or(0))
        .collect()
}

/// Pod `i`'s address: 10.250.0.0/16, outside the cluster's pod and Service ranges.
fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 250, (i >> 8) as u8, i as u8)
}

fn pod(i: usize) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("app-{i}"), "labels": {"app": format!("app-{}", i % ACCOUNTS)}},
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": format!("sa-{}", i % ACCOUNTS),
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 0,
            // Nothing may evict them while the benchmark runs, whatever the Node's health.
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {"name": "app", "image": "localhost/moat-e2e-app:latest"},
                {"name": "moat-proxy", "image": "ghcr.io/moat-mesh/moat-proxy:0.1.0"}
            ]
        }
    }))?)
}

/// What a kubelet would write once pod `i` runs.
fn pod_status(i: usize) -> serde_json::Value {
    let ip = pod_ip(i).to_string();
    json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}]
    }})
}

fn service(j: usize) -> anyhow::Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{j}")},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))?)
}

/// Service `j`'s endpoints: `per` pods from `j * stride`; `unready` is not ready.
fn endpoints(j: usize, per: usize, pods: usize, unready: Option<usize>) -> serde_json::Value {
    let stride = ((pods / 2).max(1) / per).max(1);
    let list: Vec<serde_json::Value> = (0..per)
        .map(|k| {
            let i = (j * stride + k) % pods;
            json!({
                "addresses": [pod_ip(i).to_string()],
                "conditions": {"ready": unready != Some(k), "serving": true},
                "targetRef": {"kind": "Pod", "namespace": NS, "name": format!("app-{i}")},
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

fn slice(j: usize, per: usize, pods: usize) -> anyhow::Result<EndpointSlice> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{j}-0"),
                     "labels": {"kubernetes.io/service-name": format!("svc-{j}"),
                                "endpointslice.kubernetes.io/managed-by": "moat-bench"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints(j, per, pods, None),
    }))?)
}

async fn client(k: &Cluster) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(k.kubeconfig())?;
    let cfg = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

/// Runs `n` API writes, [`CONCURRENCY`] at a time.
async fn write_concurrently<F, Fut>(n: usize, write: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    stream::iter((0..n).map(write))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<()>()
        .await
}

async fn run(k: &Cluster, install: &Install, args: &ControllerArgs) -> anyhow::Result<Report> {
    let per = args.scale.endpoints / args.scale.services;
    let kube = client(k).await?;
    let version = kube.apiserver_version().await?.git_version;

    // 1. Moat, both discovery replicas Ready.
    k.kubectl(["apply", "-k", &install.deploy.display().to_string()])?;
    for d in ["deployment/moat-ca", "deployment/moat-destination"] {
        k.kubectl(["-n", SYSTEM, "rollout", "status", d, "--timeout=180s"])?;
    }
    let replicas = replica_addrs(k)?;
    let pids = controller_pids()?;
    if pids.len() != replicas.len() {
        bail!(
            "found {} moat-destination processes on this node for {} Ready replicas",
            pids.len(),
            replicas.len()
        );
    }
    // Settled: both have listed the cluster once.
    let base = wait_for_objects(&replicas, &BTreeMap::new(), Duration::from_secs(60)).await?;
    let idle: Vec<f64> = pids
        .iter()
        .map(|p| util::rss_mib(*p).map(|m| m.0))
        .collect::<anyhow::Result<_>>()?;

    // 2. The load.
    let node_api: Api<Node> = Api::all(kube.clone());
    node_api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": NODE, "labels": {"moat-bench": "scale"}},
                "spec": {"unschedulable": true}
            }))?,
        )
        .await
        .context("creating the benchmark's Node")?;
    node_api
        .patch_status(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "moat-bench", "lastHeartbeatTime": now(),
                "lastTransitionTime": now()
            }]}})),
        )
        .await?;
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(renew_lease(kube.clone(), stop.clone()));

    let ns_api: Api<Namespace> = Api::all(kube.clone());
    ns_api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await
        .context("creating the benchmark's namespace")?;
    let started = Instant::now();
    let sa_api: Api<ServiceAccount> = Api::namespaced(kube.clone(), NS);
    write_concurrently(ACCOUNTS, |a| {
        let sa_api = sa_api.clone();
        async move {
            let sa = serde_json::from_value(json!({"metadata": {"name": format!("sa-{a}")}}))?;
            sa_api.create(&PostParams::default(), &sa).await?;
            Ok(())
        }
    })
    .await
    .context("creating service accounts")?;
    let pod_api: Api<Pod> = Api::namespaced(kube.clone(), NS);
    write_concurrently(args.scale.pods, |i| {
        let pod_api = pod_api.clone();
        async move {
            let name = format!("app-{i}");
            pod_api
                .create(&PostParams::default(), &pod(i)?)
                .await
                .with_context(|| format!("creating pod {name}"))?;
            pod_api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(pod_status(i)))
                .await
                .with_context(|| format!("writing the status of pod {name}"))?;
            Ok(())
        }
    })
    .await?;
    let svc_api: Api<Service> = Api::namespaced(kube.clone(), NS);
    let slice_api: Api<EndpointSlice> = Api::namespaced(kube.clone(), NS);
    let cluster_ips = Arc::new(std::sync::Mutex::new(HashMap::new()));
    write_concurrently(args.scale.services, |j| {
        let (svc_api, slice_api, ips) = (svc_api.clone(), slice_api.clone(), cluster_ips.clone());
        async move {
            let svc = svc_api
                .create(&PostParams::default(), &service(j)?)
                .await
                .with_context(|| format!("creating Service svc-{j}"))?;
            let ip: IpAddr = svc
                .spec
                .and_then(|s| s.cluster_ip)
                .context("a Service without a cluster IP")?
                .parse()?;
            slice_api
                .create(&PostParams::default(), &slice(j, per, args.scale.pods)?)
                .await
                .with_context(|| format!("creating EndpointSlice svc-{j}-0"))?;
            ips.lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .insert(j, ip);
            Ok(())
        }
    })
    .await?;
    let load_seconds = started.elapsed().as_secs_f64();
    let last_write = Instant::now();
    let want: BTreeMap<String, u64> = [
        ("pods", base["pods"] + args.scale.pods as u64),
        ("services", base["services"] + args.scale.services as u64),
        (
            "endpointslices",
            base["endpointslices"] + args.scale.services as u64,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    wait_for_objects(&replicas, &want, Duration::from_secs(120)).await?;
    let index_lag_ms = last_write.elapsed().as_secs_f64() * 1000.0;
    // What the replicas hold once the burst of events is behind them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded: Vec<(f64, f64)> = pids
        .iter()
        .map(|p| util::rss_mib(*p))
        .collect::<anyhow::Result<_>>()?;

    // 3 and 4. Changes without sidecars (the API side only), then with them.
    let cluster_ips: HashMap<usize, IpAddr> = cluster_ips
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut toggles = Toggles::default();
    let bytes_before = watch_bytes(k)?;
    let quiet = args.changes / 2;
    for c in 0..quiet {
        toggles
            .write(&slice_api, c % args.scale.services, per, args.scale.pods)
            .await?;
    }
    // Every watcher has had them (the sidecars' deliveries below take milliseconds).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let without = (watch_bytes(k)? - bytes_before) / quiet.max(1) as f64;

    let watches_before = api_watches(k)?;
    let root_key = std::fs::read_to_string(install.root_dir.join("ca.key"))?;
    let ca = TestCa::from_pem(TD, &install.root_pem, &root_key)?;
    let td = TrustDomain::new(TD)?;
    let mut sidecars: Vec<Sidecar> = Vec::new();
    for s in 0..args.sidecars {
        let server = Server::new(
            SocketAddr::new(replicas[0].ip(), 8086).to_string(),
            &td,
            ca.svid(NS, &format!("sa-{}", s % ACCOUNTS))?,
            ca.bundle.clone(),
            tls::provider(),
            Duration::from_secs(5),
        )?;
        let wanted: Targets = (0..args.scale.per_sidecar)
            .map(|t| {
                let j = (s * 7 + t) % args.scale.services;
                (j, SocketAddr::new(cluster_ips[&j], 80))
            })
            .collect();
        let sidecar = subscribe(server, wanted, |j| toggles.ready(j, per), stop.clone())
            .await
            .with_context(|| format!("sidecar {s}"))?;
        sidecars.push(sidecar);
    }
    let watches_with = api_watches(k)?;
    let with_sidecars: Vec<f64> = pids
        .iter()
        .map(|p| util::rss_mib(*p).map(|m| m.0))
        .collect::<anyhow::Result<_>>()?;

    let watchers = watchers(&sidecars);
    let watched: Vec<usize> = watchers.keys().copied().collect();
    let timed = args.changes - quiet;
    let bytes_before = watch_bytes(k)?;
    let mut samples: Vec<u64> = Vec::new();
    for c in 0..timed {
        let j = watched[c * 31 % watched.len()];
        let subscribers = &watchers[&j];
        let held = held(&sidecars, subscribers)?;
        let t0 = Instant::now();
        toggles.write(&slice_api, j, per, args.scale.pods).await?;
        await_deliveries(&sidecars, subscribers, &held, t0, &mut samples)
            .await
            .with_context(|| format!("change {c} (svc-{j})"))?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with = (watch_bytes(k)? - bytes_before) / timed.max(1) as f64;
    stop_tx.send_replace(true);

    Ok(Report {
        kubernetes: version,
        pods: args.scale.pods,
        services: args.scale.services,
        endpoints: per * args.scale.services,
        load_seconds,
        index_lag_ms,
        replicas: pids
            .iter()
            .enumerate()
            .map(|(n, pid)| Replica {
                pid: *pid,
                rss_idle_mib: idle[n],
                rss_loaded_mib: loaded[n].0,
                rss_peak_mib: loaded[n].1,
                rss_with_sidecars_mib: with_sidecars[n],
            })
            .collect(),
        rss_target_mib: RSS_TARGET_MIB,
        sidecars: args.sidecars,
        per_sidecar: args.scale.per_sidecar,
        api_watches_before: watches_before,
        api_watches_with_sidecars: watches_with,
        watch_bytes_per_change_without_sidecars: without,
        watch_bytes_per_change_with_sidecars: with,
        changes: Deliveries::new(timed, samples),
    })
}

/// Which endpoint of each Service is unready now; each write flips one Service's state.
#[derive(Default)]
struct Toggles(HashMap<usize, Option<usize>>);

impl Toggles {
    /// How many endpoints of Service `j` are ready now.
    fn ready(&self, j: usize, per: usize) -> usize {
        per - usize::from(self.0.get(&j).is_some_and(|u| u.is_some()))
    }

    async fn write(
        &mut self,
        api: &Api<EndpointSlice>,
        j: usize,
        per: usize,
        pods: usize,
    ) -> anyhow::Result<()> {
        let state = self.0.entry(j).or_insert(None);
        *state = match state {
            Some(_) => None,
            None => Some(j % per),
        };
        let patch = json!({"endpoints": endpoints(j, per, pods, *state)});
        api.patch(
            &format!("svc-{j}-0"),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .with_context(|| format!("updating EndpointSlice svc-{j}-0"))?;
        Ok(())
    }
}

/// Now, as the API writes a `Time`.
fn now() -> serde_json::Value {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or_default()
}

/// Keeps the benchmark's Node healthy in the node controller's eyes, as a kubelet's
/// heartbeat would, until `stop`.
async fn renew_lease(kube: kube::Client, mut stop: watch::Receiver<bool>) {
    let leases: Api<Lease> = Api::namespaced(kube, "kube-node-lease");
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": NODE},
        "spec": {"holderIdentity": NODE, "leaseDurationSeconds": 40}
    });
    loop {
        let mut l = lease.clone();
        l["spec"]["renewTime"] =
            serde_json::to_value(MicroTime(k8s_openapi::jiff::Timestamp::now()))
                .unwrap_or_default();
        let params = PatchParams::apply("moat-bench").force();
        if let Err(e) = leases.patch(NODE, &params, &Patch::Apply(l)).await {
            eprintln!("controller: renewing the benchmark Node's lease: {e}");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The Ready moat-destination replicas' pod addresses.
fn replica_addrs(k: &Cluster) -> anyhow::Result<Vec<SocketAddr>> {
    let pods = k.pods(SYSTEM, "app.kubernetes.io/name=moat-destination")?;
    let addrs: Vec<SocketAddr> = pods
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| p["status"]["podIP"].as_str()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 9090))
        .collect();
    if addrs.len() != 2 {
        bail!(
            "expected 2 moat-destination replicas, found {}",
            addrs.len()
        );
    }
    Ok(addrs)
}

/// The host PIDs of every `moat-destination serve` on this node.
fn controller_pids() -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let mut argv = cmdline.split(|b| *b == 0);
        let exe = argv
            .next()
            .map(|a| Path::new(std::ffi::OsStr::from_bytes(a)))
            .and_then(|p| p.file_name());
        if exe.is_some_and(|e| e == "moat-destination") && argv.next() == Some(b"serve") {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// Waits until every replica's `moat_destination_objects` reach `want` (or, with `want`
/// empty, until every kind is reported); returns the first replica's counts.
async fn wait_for_objects(
    replicas: &[SocketAddr],
    want: &BTreeMap<String, u64>,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut all = Vec::new();
        for r in replicas {
            all.push(objects(*r).await.unwrap_or_default());
        }
        let done = all.iter().all(|have| {
            WATCHED.iter().all(|kind| {
                have.get(*kind)
                    .is_some_and(|n| want.get(*kind).is_none_or(|w| n >= w))
            })
        });
        if done {
            return Ok(all.swap_remove(0));
        }
        if Instant::now() > deadline {
            bail!("the replicas hold {all:?} after {timeout:?}, expected {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A replica's `moat_destination_objects` gauges, by kind (scraped off the runtime's threads).
async fn objects(admin: SocketAddr) -> anyhow::Result<BTreeMap<String, u64>> {
    let m = tokio::task::spawn_blocking(move || scrape(&admin.to_string())).await??;
    Ok(WATCHED
        .iter()
        .filter_map(|kind| {
            let n = m.get(moat_destination::metrics::OBJECTS, &[("kind", kind)])?;
            Some((kind.to_string(), n as u64))
        })
        .collect())
}

/// The API server's metrics.
fn api_metrics(k: &Cluster) -> anyhow::Result<Metrics> {
    Ok(Metrics::parse(&k.kubectl(["get", "--raw", "/metrics"])?))
}

/// The API server's open WATCH requests on the kinds the controller watches.
fn api_watches(k: &Cluster) -> anyhow::Result<BTreeMap<String, u64>> {
    let m = api_metrics(k)?;
    Ok(WATCHED
        .iter()
        .map(|kind| {
            let labels = [("verb", "WATCH"), ("resource", *kind), ("subresource", "")];
            let n = m.value("apiserver_longrunning_requests", &labels);
            (kind.to_string(), n as u64)
        })
        .collect())
}

/// Bytes of EndpointSlice watch events the API server has sent, to all its watchers.
fn watch_bytes(k: &Cluster) -> anyhow::Result<f64> {
    api_metrics(k)?
        .get(
            "apiserver_watch_events_sizes_sum",
            &[("resource", "endpointslices")],
        )
        .context("the API server reports no apiserver_watch_events_sizes_sum for endpointslices")
}

/// Removes everything the benchmark created: its pods at once (no kubelet would confirm a
/// graceful deletion), its namespace, Node and Lease, and Moat.
async fn clean_up(k: &Cluster, deploy: &Path) -> anyhow::Result<()> {
    let kube = client(k).await?;
    let pods: Api<Pod> = Api::namespaced(kube.clone(), NS);
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let _ = pods.delete_collection(&now, &ListParams::default()).await;
    k.kubectl([
        "delete",
        "namespace",
        NS,
        "--ignore-not-found",
        "--wait=true",
        "--timeout=180s",
    ])?;
    k.kubectl(["delete", "node", NODE, "--ignore-not-found"])?;
    k.kubectl([
        "-n",
        "kube-node-lease",
        "delete",
        "lease",
        NODE,
        "--ignore-not-found",
    ])?;
    k.kubectl([
        "delete",
        "-k",
        &deploy.display().to_string(),
        "--ignore-not-found",
        "--wait=true",
        "--timeout=180s",
    ])?;
    Ok(())
}
