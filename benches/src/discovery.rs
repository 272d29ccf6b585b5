//! `moat-bench discovery`: the discovery service's state and fan-out at cluster scale, with
//! moat-destination's own index and API and the sidecars' own discovery client, in one
//! process over real loopback sockets and mutual TLS.
//!
//! 1. **Index**: `--pods` pods and `--services` Services whose EndpointSlices list
//!    `--endpoints` endpoints in all (each pod serves several Services), applied to the index
//!    as the watch would. Reported: the heap the index holds (net bytes allocated, counted by
//!    this binary's allocator) against the controller's 200 MiB target.
//! 2. **Sidecars**: `--sidecars` discovery clients (each its own mTLS HTTP/2 connection and
//!    SVID) subscribe to `--per-sidecar` Services each. Reported: the heap a sidecar's
//!    discovery state takes (net bytes from before the first client to after the last one's
//!    first answers, per sidecar; it also counts the server's side of each connection and its
//!    answer cache, so it is an upper bound) against 2 MiB.
//! 3. **Changes**: `--changes` EndpointSlice updates (an endpoint turning unready or ready
//!    again), each applied to the index at t0; reported: the time until each subscribed
//!    sidecar holds the new answer, p50/p99/max over every (change, sidecar) pair, against
//!    p99 < 1 s.
//!
//! Not measured here: the Kubernetes API server's side (its watch traffic and the delay from
//! an API write to the index). The controller holds one watch per kind (pods, Services,
//! EndpointSlices) whatever the number of sidecars, which serve from the index alone.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use moat_core::discovery::Resolution;
use moat_core::tls::{self, CurrentCert, SpiffeVerifier};
use moat_core::TrustDomain;
use moat_destination::api::Api;
use moat_destination::index::Index;
use moat_destination::watch::Shared;
use moat_proxy::discovery::{Resolver, Server};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::alloc;
use crate::util;

const TD: &str = "cluster.local";
const NS: &str = "bench";
/// Target: the controller's memory at 10,000 pods / 20,000 endpoints.
const INDEX_TARGET_MIB: f64 = 200.0;
/// Target: one sidecar's discovery state for 50 Services.
const SIDECAR_TARGET_MIB: f64 = 2.0;
/// Target: an EndpointSlice change reaches subscribed sidecars within this, p99.
const CHANGE_TARGET_MS: f64 = 1000.0;

/// How long EndpointSlice changes took to reach the sidecars watching them.
#[derive(Debug, Serialize)]
pub(crate) struct Deliveries {
    changes: usize,
    change_deliveries: usize,
    change_p50_ms: f64,
    change_p99_ms: f64,
    change_max_ms: f64,
    change_target_p99_ms: f64,
}

impl Deliveries {
    /// The summary of `changes` changes whose deliveries took `samples` (µs).
    pub(crate) fn new(changes: usize, mut samples: Vec<u64>) -> Self {
        samples.sort_unstable();
        let ms = |q: f64| util::percentile(&samples, q) as f64 / 1000.0;
        Self {
            changes,
            change_deliveries: samples.len(),
            change_p50_ms: ms(0.50),
            change_p99_ms: ms(0.99),
            change_max_ms: samples.last().copied().unwrap_or(0) as f64 / 1000.0,
            change_target_p99_ms: CHANGE_TARGET_MS,
        }
    }

    /// Whether the p99 target was met.
    pub(crate) fn met(&self) -> bool {
        self.change_p99_ms < self.change_target_p99_ms
    }

    /// One line for the console: "`changes` EndpointSlice `what`, ... deliveries ...".
    pub(crate) fn line(&self, what: &str) -> String {
        format!(
            "{} EndpointSlice {what}, {} deliveries to subscribed sidecars: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 < {:.0} ms)",
            self.changes, self.change_deliveries, self.change_p50_ms, self.change_p99_ms, self.change_max_ms, self.change_target_p99_ms
        )
    }
}

/// The cluster both discovery benchmarks build, and how they report.
#[derive(Args, Debug, Clone)]
pub(crate) struct ScaleArgs {
    /// Pods.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) pods: usize,
    /// Services (each with one EndpointSlice).
    #[arg(long, default_value_t = 200)]
    pub(crate) services: usize,
    /// Endpoints over all Services (spread evenly; at least one per Service).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) endpoints: usize,
    /// Services each sidecar talks to.
    #[arg(long, default_value_t = 50)]
    pub(crate) per_sidecar: usize,
    /// A quick run at a tenth of the scale (checks the harness, not the targets).
    #[arg(long)]
    pub(crate) smoke: bool,
    /// Write the report as JSON here.
    #[arg(long)]
    pub(crate) json: Option<std::path::PathBuf>,
}

/// Options of `moat-bench discovery`.
#[derive(Args, Debug, Clone)]
pub struct DiscoveryArgs {
    #[command(flatten)]
    scale: ScaleArgs,
    /// Subscribed sidecars.
    #[arg(long, default_value_t = 100)]
    sidecars: usize,
    /// EndpointSlice changes timed.
    #[arg(long, default_value_t = 200)]
    changes: usize,
}

/// What the run measured.
#[derive(Debug, Serialize)]
struct Report {
    pods: usize,
    services: usize,
    endpoints: usize,
    sidecars: usize,
    per_sidecar: usize,
    index_mib: f64,
    index_target_mib: f64,
    sidecar_state_kib: f64,
    sidecar_target_mib: f64,
    #[serde(flatten)]
    changes: Deliveries,
}

/// Runs the benchmark; `Ok(false)` when an answer was missing or wrong.
pub fn main(mut args: DiscoveryArgs) -> anyhow::Result<bool> {
    if args.scale.smoke {
        args.scale.pods /= 10;
        args.scale.services = (args.scale.services / 10).max(args.scale.per_sidecar);
        args.scale.endpoints /= 10;
        args.sidecars = (args.sidecars / 10).max(1);
        args.changes = (args.changes / 10).max(1);
    }
    if args.scale.services == 0
        || args.scale.endpoints < args.scale.services
        || args.scale.pods == 0
    {
        bail!("need at least one pod, one Service and one endpoint per Service");
    }
    if args.scale.per_sidecar > args.scale.services {
        bail!(
            "--per-sidecar {} exceeds --services {}",
            args.scale.per_sidecar,
            args.scale.services
        );
    }
    if args.scale.pods > 250 * 256 * 256 {
        bail!("at most {} pods", 250 * 256 * 256);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(run(&args))?;
    println!(
        "discovery: index of {} pods, {} Services, {} endpoints: {:.1} MiB of heap (target: controller < {:.0} MiB)",
        report.pods, report.services, report.endpoints, report.index_mib, report.index_target_mib
    );
    println!(
        "discovery: {} sidecars subscribed to {} Services each: {:.0} KiB per sidecar (target < {:.0} MiB)",
        report.sidecars,
        report.per_sidecar,
        report.sidecar_state_kib,
        report.sidecar_target_mib
    );
    println!("discovery: {}", report.changes.line("changes"));
    let met = [
        report.index_mib < INDEX_TARGET_MIB,
        report.sidecar_state_kib < SIDECAR_TARGET_MIB * 1024.0,
        report.changes.met(),
    ];
    println!(
        "discovery: targets {}",
        if met.iter().all(|m| *m) {
            "met"
        } else {
            "MISSED"
        }
    );
    if let Some(path) = &args.scale.json {
        crate::phase::write_json(path, &report)?;
    }
    Ok(true)
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8)
}

fn cluster_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, (j >> 8) as u8, j as u8)
}

fn pod(i: usize) -> anyhow::Result<Pod> {
    let ip = pod_ip(i).to_string();
    Ok(serde_json::from_value(json!({
        "metadata": {"namespace": NS, "name": format!("app-{i}"),
                     "labels": {"app": format!("app-{}", i % 100)}},
        "spec": {"serviceAccountName": format!("sa-{}", i % 100),
                 "containers": [{"name": "app", "image": "app:1"},
                                {"name": "moat-proxy", "image": "moat-proxy:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    }))?)
}

fn service(j: usize) -> anyhow::Result<Service> {
    let ip = cluster_ip(j).to_string();
    Ok(serde_json::from_value(json!({
        "metadata": {"namespace": NS, "name": format!("svc-{j}")},
        "spec": {"clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))?)
}

/// Service `j`'s slice: `per` endpoints starting at pod `j * stride`; `unready` is not ready.
fn slice(
    j: usize,
    per: usize,
    pods: usize,
    unready: Option<usize>,
) -> anyhow::Result<EndpointSlice> {
    let stride = (pods / 2).max(1) / per.max(1);
    let endpoints: Vec<serde_json::Value> = (0..per)
        .map(|k| {
            let i = (j * stride.max(1) + k) % pods;
            json!({
                "addresses": [pod_ip(i).to_string()],
                "conditions": {"ready": unready != Some(k), "serving": true},
                "targetRef": {"kind": "Pod", "namespace": NS, "name": format!("app-{i}")},
            })
        })
        .collect();
    Ok(serde_json::from_value(json!({
        "metadata": {"namespace": NS, "name": format!("svc-{j}-0"),
                     "labels": {"kubernetes.io/service-name": format!("svc-{j}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))?)
}

/// The Services a sidecar watches: (Service number, cluster IP and port).
pub(crate) type Targets = Vec<(usize, SocketAddr)>;

/// A subscribed sidecar: its resolver and what it watches.
pub(crate) type Sidecar = (Arc<Resolver>, Targets);

/// Starts a sidecar's discovery client against `server` and subscribes it to `wanted`,
/// registering every target first (as concurrent app connections would); fails unless
/// Service `j` answers with `endpoints(j)` endpoints.
pub(crate) async fn subscribe(
    server: Server,
    wanted: Targets,
    endpoints: impl Fn(usize) -> usize,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Sidecar> {
    let resolver = Arc::new(Resolver::default());
    tokio::spawn(resolver.clone().run(server, stop));
    for (_, t) in &wanted {
        let _ = resolver.resolve(*t, Duration::ZERO).await;
    }
    for (j, t) in &wanted {
        match resolver
            .resolve(*t, Duration::from_secs(30))
            .await
            .as_deref()
        {
            Some(Resolution::Service { endpoints: e, .. }) if e.len() == endpoints(*j) => {}
            other => bail!("Service svc-{j} answered {other:?}"),
        }
    }
    Ok((resolver, wanted))
}

/// Who watches each Service: (sidecar number, target).
pub(crate) fn watchers(sidecars: &[Sidecar]) -> BTreeMap<usize, Vec<(usize, SocketAddr)>> {
    let mut w: BTreeMap<usize, Vec<(usize, SocketAddr)>> = BTreeMap::new();
    for (s, (_, wanted)) in sidecars.iter().enumerate() {
        for (j, t) in wanted {
            w.entry(*j).or_default().push((s, *t));
        }
    }
    w
}

/// What each of `subscribers` holds now, to tell a change's answer from the old one.
pub(crate) fn held(
    sidecars: &[Sidecar],
    subscribers: &[(usize, SocketAddr)],
) -> anyhow::Result<Vec<Arc<Resolution>>> {
    subscribers
        .iter()
        .map(|(s, t)| sidecars[*s].0.current(*t).context("no answer held"))
        .collect()
}

/// Waits until each of `subscribers` holds an answer other than its `held` one, pushing each
/// delay since `t0` (µs) to `samples`; fails after 10 s.
pub(crate) async fn await_deliveries(
    sidecars: &[Sidecar],
    subscribers: &[(usize, SocketAddr)],
    held: &[Arc<Resolution>],
    t0: Instant,
    samples: &mut Vec<u64>,
) -> anyhow::Result<()> {
    let mut pending: Vec<usize> = (0..subscribers.len()).collect();
    while !pending.is_empty() {
        let now = t0.elapsed();
        pending.retain(|&k| {
            let (s, t) = subscribers[k];
            let changed = sidecars[s]
                .0
                .current(t)
                .is_some_and(|r| !Arc::ptr_eq(&r, &held[k]));
            if changed {
                samples.push(now.as_micros() as u64);
            }
            !changed
        });
        if now > Duration::from_secs(10) {
            bail!("{} sidecars did not get the change in 10 s", pending.len());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(())
}

async fn run(args: &DiscoveryArgs) -> anyhow::Result<Report> {
    let td = TrustDomain::new(TD)?;
    let per = args.scale.endpoints / args.scale.services;

    // 1. The index, as the watch would fill it.
    alloc::start_counting();
    let before = alloc::net_bytes();
    let index = Shared::new(Index::new(td.clone()));
    for i in 0..args.scale.pods {
        let p = pod(i)?;
        index
            .update(|ix| ix.apply_pod(&p))
            .map_err(|why| anyhow::anyhow!("pod {i} skipped: {why:?}"))?;
    }
    for j in 0..args.scale.services {
        let (s, e) = (service(j)?, slice(j, per, args.scale.pods, None)?);
        index.update(|ix| -> anyhow::Result<()> {
            ix.apply_service(&s)
                .map_err(|why| anyhow::anyhow!("Service {j} skipped: {why:?}"))?;
            ix.apply_slice(&e)
                .map_err(|why| anyhow::anyhow!("slice {j} skipped: {why:?}"))
        })?;
    }
    let index_bytes = alloc::net_bytes() - before;

    // 2. The API and the sidecars.
    let ca = moat_e2e::pki::TestCa::new(TD)?;
    let (stop_tx, stop) = watch::channel(false);
    let verifier = SpiffeVerifier::new(ca.bundle.clone(), td.clone(), tls::provider());
    let mut cfg = tls::mesh_server_config(
        ca.svid("moat-system", "moat-destination")?,
        verifier,
        tls::provider(),
    )?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // Every sidecar here connects from 127.0.0.1: the per-source share must cover them all.
    let limits = moat_core::https::Limits {
        max_connections: args.sidecars + 16,
        max_connections_per_source: args.sidecars + 16,
        ..Api::default_limits()
    };
    let api = Api::new(index.clone(), stop.clone(), limits);
    tokio::spawn(moat_core::https::serve(
        listener,
        Arc::new(cfg),
        Arc::new(api),
        stop.clone(),
        Duration::from_secs(1),
    ));

    let targets = |s: usize| -> Targets {
        (0..args.scale.per_sidecar)
            .map(|t| {
                let j = (s * 7 + t) % args.scale.services;
                (j, SocketAddr::from((cluster_ip(j), 80)))
            })
            .collect()
    };
    // Certificates are made before the measured window: they are the identity's, which a
    // sidecar holds with or without discovery.
    let certs: Vec<Arc<CurrentCert>> = (0..args.sidecars)
        .map(|s| ca.svid(NS, &format!("sa-{}", s % 100)))
        .collect::<anyhow::Result<_>>()?;
    let mut sidecars: Vec<Sidecar> = Vec::new();
    let before = alloc::net_bytes();
    for (s, cert) in certs.into_iter().enumerate() {
        let server = Server::new(
            addr.to_string(),
            &td,
            cert,
            ca.bundle.clone(),
            tls::provider(),
            Duration::from_secs(5),
        )?;
        let sidecar = subscribe(server, targets(s), |_| per, stop.clone())
            .await
            .with_context(|| format!("sidecar {s}"))?;
        sidecars.push(sidecar);
    }
    let sidecar_bytes = (alloc::net_bytes() - before) as f64 / args.sidecars as f64;

    // 3. Changes: who watches each Service, then one slice update at a time.
    let watchers = watchers(&sidecars);
    let watched: Vec<usize> = watchers.keys().copied().collect();
    let mut samples: Vec<u64> = Vec::new();
    let mut unready: HashMap<usize, Option<usize>> = HashMap::new();
    for c in 0..args.changes {
        let j = watched[c * 31 % watched.len()];
        let state = unready.entry(j).or_insert(None);
        *state = match state {
            Some(_) => None,
            None => Some(c % per),
        };
        let new_slice = slice(j, per, args.scale.pods, *state)?;
        let subscribers = &watchers[&j];
        let held = held(&sidecars, subscribers)?;
        let t0 = Instant::now();
        index
            .update(|ix| ix.apply_slice(&new_slice))
            .map_err(|why| anyhow::anyhow!("slice {j} skipped: {why:?}"))?;
        await_deliveries(&sidecars, subscribers, &held, t0, &mut samples)
            .await
            .with_context(|| format!("change {c} (svc-{j})"))?;
    }
    stop_tx.send_replace(true);
    Ok(Report {
        pods: args.scale.pods,
        services: args.scale.services,
        endpoints: per * args.scale.services,
        sidecars: args.sidecars,
        per_sidecar: args.scale.per_sidecar,
        index_mib: index_bytes as f64 / (1024.0 * 1024.0),
        index_target_mib: INDEX_TARGET_MIB,
        sidecar_state_kib: sidecar_bytes / 1024.0,
        sidecar_target_mib: SIDECAR_TARGET_MIB,
        changes: Deliveries::new(args.changes, samples),
    })
}
