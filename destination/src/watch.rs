//! Keeps the [`Index`] in step with the cluster: one kube-runtime watcher per kind (list, then
//! watch with bookmarks; a fresh list when the watch expires; exponential backoff on API
//! errors). A re-list replaces what the index held for that kind, so objects deleted while
//! the watch was down disappear.

use std::fmt::Debug;
use std::sync::{Arc, RwLock};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use tokio::sync::watch;

use crate::index::{Index, Skipped};
use crate::metrics as m;

/// Shared index, plus a generation counter bumped on every change (what held requests wait on).
#[derive(Debug, Clone)]
pub struct Shared {
    /// The index.
    pub index: Arc<RwLock<Index>>,
    /// Bumped after every change to the index.
    pub generation: watch::Sender<u64>,
    /// Which kinds have completed their first list: (pods, services, slices).
    pub synced: watch::Sender<[bool; 3]>,
}

impl Shared {
    /// A shared empty index.
    pub fn new(index: Index) -> Self {
        Self {
            index: Arc::new(RwLock::new(index)),
            generation: watch::Sender::new(0),
            synced: watch::Sender::new([false; 3]),
        }
    }

    /// Applies `f` to the index and wakes whoever waits for changes.
    pub fn update<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        let r = {
            let mut ix = self.index.write().unwrap_or_else(|p| p.into_inner());
            let r = f(&mut ix);
            let (pods, services, slices) = ix.sizes();
            metrics::gauge!(m::OBJECTS, "kind" => "pods").set(pods as f64);
            metrics::gauge!(m::OBJECTS, "kind" => "services").set(services as f64);
            metrics::gauge!(m::OBJECTS, "kind" => "endpointslices").set(slices as f64);
            r
        };
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
        r
    }

    /// Whether every kind has been listed at least once.
    pub fn is_synced(&self) -> bool {
        self.synced.borrow().iter().all(|s| *s)
    }
}

/// How one kind goes into the index.
trait Kind: Resource + Clone + Debug + Send + Sync + serde::de::DeserializeOwned + 'static {
    const LABEL: &'static str;
    const SLOT: usize;
    fn apply(ix: &mut Index, o: &Self) -> Result<(), Skipped>;
    fn delete(ix: &mut Index, o: &Self);
    fn replace(ix: &mut Index, all: &[Self]) -> usize;
}

impl Kind for Pod {
    const LABEL: &'static str = "pods";
    const SLOT: usize = 0;
    fn apply(ix: &mut Index, o: &Self) -> Result<(), Skipped> {
        ix.apply_pod(o)
    }
    fn delete(ix: &mut Index, o: &Self) {
        ix.delete_pod(o)
    }
    fn replace(ix: &mut Index, all: &[Self]) -> usize {
        ix.replace_pods(all)
    }
}

impl Kind for Service {
    const LABEL: &'static str = "services";
    const SLOT: usize = 1;
    fn apply(ix: &mut Index, o: &Self) -> Result<(), Skipped> {
        ix.apply_service(o)
    }
    fn delete(ix: &mut Index, o: &Self) {
        ix.delete_service(o)
    }
    fn replace(ix: &mut Index, all: &[Self]) -> usize {
        ix.replace_services(all)
    }
}

impl Kind for EndpointSlice {
    const LABEL: &'static str = "endpointslices";
    const SLOT: usize = 2;
    fn apply(ix: &mut Index, o: &Self) -> Result<(), Skipped> {
        ix.apply_slice(o)
    }
    fn delete(ix: &mut Index, o: &Self) {
        ix.delete_slice(o)
    }
    fn replace(ix: &mut Index, all: &[Self]) -> usize {
        ix.replace_slices(all)
    }
}

/// Watches pods, Services and EndpointSlices in every namespace until `stop`.
pub async fn run(client: Client, shared: Shared, mut stop: watch::Receiver<bool>) {
    // Finished pods release their IPs: the API server filters them out, and a pod that
    // finishes arrives as a deletion.
    let pods = watcher::Config::default()
        .fields("status.phase!=Succeeded,status.phase!=Failed")
        .page_size(500);
    tokio::select! {
        _ = watch_kind::<Pod>(Api::all(client.clone()), pods, &shared) => {}
        _ = watch_kind::<Service>(Api::all(client.clone()), watcher::Config::default().page_size(500), &shared) => {}
        _ = watch_kind::<EndpointSlice>(Api::all(client), watcher::Config::default().page_size(500), &shared) => {}
        _ = moat_core::shutdown::signalled(&mut stop) => {}
    }
}

async fn watch_kind<K: Kind>(api: Api<K>, cfg: watcher::Config, shared: &Shared)
where
    K::DynamicType: Default,
{
    let stream = watcher::watcher(api, cfg).default_backoff();
    futures_util::pin_mut!(stream);
    let mut listing: Vec<K> = Vec::new();
    let mut failing = false;
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                metrics::counter!(m::WATCH_ERRORS, "kind" => K::LABEL).increment(1);
                if !failing {
                    tracing::warn!(kind = K::LABEL, error = %e, "Kubernetes watch failed; retrying with backoff, serving the last known state");
                }
                failing = true;
                continue;
            }
        };
        if failing {
            tracing::info!(kind = K::LABEL, "Kubernetes watch recovered");
            failing = false;
        }
        match event {
            Event::Init => listing.clear(),
            Event::InitApply(o) => listing.push(o),
            Event::InitDone => {
                let all = std::mem::take(&mut listing);
                let skipped = shared.update(|ix| K::replace(ix, &all));
                count(K::LABEL, "list", all.len() as u64);
                skipped_metric::<K>(skipped as u64);
                let first = !shared.synced.borrow()[K::SLOT];
                shared.synced.send_modify(|s| s[K::SLOT] = true);
                if first {
                    tracing::info!(kind = K::LABEL, objects = all.len(), skipped, "listed");
                }
            }
            Event::Apply(o) => {
                count(K::LABEL, "apply", 1);
                if let Err(why) = shared.update(|ix| K::apply(ix, &o)) {
                    skipped_metric::<K>(1);
                    tracing::debug!(kind = K::LABEL, object = %describe(&o), reason = why.as_str(), "object left out of discovery");
                }
            }
            Event::Delete(o) => {
                count(K::LABEL, "delete", 1);
                shared.update(|ix| K::delete(ix, &o));
            }
        }
    }
}

fn count(kind: &'static str, event: &'static str, n: u64) {
    metrics::counter!(m::WATCH_EVENTS, "kind" => kind, "event" => event).increment(n);
}

fn skipped_metric<K: Kind>(n: u64) {
    if n > 0 {
        metrics::counter!(m::SKIPPED, "kind" => K::LABEL).increment(n);
    }
}

fn describe<K: Resource>(o: &K) -> String {
    let m = o.meta();
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or(""),
        m.name.as_deref().unwrap_or("")
    )
}
