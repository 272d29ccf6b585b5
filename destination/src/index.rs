//! What the cluster looks like to a sidecar: pods by IP (identity, meshed), Services by cluster
//! IP and port, and the endpoints behind each port. Fed with Kubernetes objects by
//! [`crate::watch`], read by [`crate::api`]. Only the fields discovery needs are kept, so the
//! index stays small at ten thousand pods.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use moat_core::contract::PROXY_CONTAINER;
use moat_core::discovery::{Endpoint, Resolution};
use moat_core::spiffe::{SpiffeId, TrustDomain};

/// `namespace/name` of an object.
pub type ObjKey = String;

/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn key(ns: Option<&str>, name: Option<&str>) -> Option<ObjKey> {
    Some(format!("{}/{}", ns?, name?))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PodEntry {
    ips: Vec<IpAddr>,
    identity: SpiffeId,
    meshed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ServiceEntry {
    cluster_ips: Vec<IpAddr>,
    /// (port, port name) of each TCP port.
    ports: Vec<(u16, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SliceEntry {
    service: ObjKey,
    /// (port name, target port) of each TCP port.
    ports: Vec<(String, u16)>,
    endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SliceEndpoint {
    addrs: Vec<IpAddr>,
    ready: bool,
    serving: bool,
    zone: Option<String>,
    pod: Option<ObjKey>,
}

/// Why an object was left out of the index (the `reason` of a metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skipped {
    /// No namespace or name.
    Unnamed,
    /// Its service account and namespace make no valid SPIFFE ID.
    NoIdentity,
}

impl Skipped {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unnamed => "unnamed",
            Self::NoIdentity => "invalid_identity",
        }
    }
}

/// The discovery index.
#[derive(Debug)]
pub struct Index {
    trust_domain: TrustDomain,
    pods: HashMap<ObjKey, PodEntry>,
    pod_by_ip: HashMap<IpAddr, ObjKey>,
    services: HashMap<ObjKey, ServiceEntry>,
    service_by_ip: HashMap<IpAddr, ObjKey>,
    slices: HashMap<ObjKey, SliceEntry>,
    slices_by_service: HashMap<ObjKey, BTreeSet<ObjKey>>,
}

impl Index {
    /// An empty index for identities of `trust_domain`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            pods: HashMap::new(),
            pod_by_ip: HashMap::new(),
            services: HashMap::new(),
            service_by_ip: HashMap::new(),
            slices: HashMap::new(),
            slices_by_service: HashMap::new(),
        }
    }

    /// Counts of (pods, services, endpoint slices) held.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.pods.len(), self.services.len(), self.slices.len())
    }

    /// Adds or updates a pod. A pod that no longer runs (no IP, or finished) is removed.
    pub fn apply_pod(&mut self, pod: &Pod) -> Result<(), Skipped> {
        let m = &pod.metadata;
        let k = key(m.namespace.as_deref(), m.name.as_deref()).ok_or(Skipped::Unnamed)?;
        let status = pod.status.as_ref();
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
        {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        if finished || ips.is_empty() || pod_uses_host_network(pod) {
            // A finished pod's IP is free for reuse; a host-network pod's IP is the node's.
            self.delete_pod_key(&k);
            return Ok(());
        }
        let spec = pod.spec.as_ref();
        let sa = spec
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|s| !s.is_empty())
            .unwrap_or("default");
        let ns = m.namespace.as_deref().unwrap_or_default();
        let identity = SpiffeId::workload(&self.trust_domain, ns, sa).map_err(|_| {
            self.delete_pod_key(&k);
            Skipped::NoIdentity
        })?;
        let meshed = spec.is_some_and(|s| {
            s.containers.iter().any(|c| c.name == PROXY_CONTAINER)
                || s.init_containers
                    .iter()
                    .flatten()
                    .any(|c| c.name == PROXY_CONTAINER)
        });
        self.delete_pod_key(&k);
        for ip in &ips {
            // The newest pod holding an IP wins: the previous holder is gone or going.
            self.pod_by_ip.insert(*ip, k.clone());
        }
        self.pods.insert(
            k,
            PodEntry {
                ips,
                identity,
                meshed,
            },
        );
        Ok(())
    }

    /// Removes a pod.
    pub fn delete_pod(&mut self, pod: &Pod) {
        if let Some(k) = key(
            pod.metadata.namespace.as_deref(),
            pod.metadata.name.as_deref(),
        ) {
            self.delete_pod_key(&k);
        }
    }

    fn delete_pod_key(&mut self, k: &str) {
        if let Some(old) = self.pods.remove(k) {
            for ip in old.ips {
                if self.pod_by_ip.get(&ip).is_some_and(|holder| holder == k) {
                    self.pod_by_ip.remove(&ip);
                }
            }
        }
    }

    /// Adds or updates a Service.
    pub fn apply_service(&mut self, svc: &Service) -> Result<(), Skipped> {
        let m = &svc.metadata;
        let k = key(m.namespace.as_deref(), m.name.as_deref()).ok_or(Skipped::Unnamed)?;
        self.delete_service_key(&k);
        let Some(spec) = svc.spec.as_ref() else {
            return Ok(());
        };
        let mut cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if let Some(ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse().ok()) {
            if !cluster_ips.contains(&ip) {
                cluster_ips.push(ip);
            }
        }
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.port).ok()?;
                Some((port, p.name.clone().unwrap_or_default()))
            })
            .collect();
        for ip in &cluster_ips {
            self.service_by_ip.insert(*ip, k.clone());
        }
        self.services.insert(k, ServiceEntry { cluster_ips, ports });
        Ok(())
    }

    /// Removes a Service.
    pub fn delete_service(&mut self, svc: &Service) {
        if let Some(k) = key(
            svc.metadata.namespace.as_deref(),
            svc.metadata.name.as_deref(),
        ) {
            self.delete_service_key(&k);
        }
    }

    fn delete_service_key(&mut self, k: &str) {
        if let Some(old) = self.services.remove(k) {
            for ip in old.cluster_ips {
                if self
                    .service_by_ip
                    .get(&ip)
                    .is_some_and(|holder| holder == k)
                {
                    self.service_by_ip.remove(&ip);
                }
            }
        }
    }

    /// Adds or updates an EndpointSlice.
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Result<(), Skipped> {
        let m = &slice.metadata;
        let k = key(m.namespace.as_deref(), m.name.as_deref()).ok_or(Skipped::Unnamed)?;
        self.delete_slice_key(&k);
        let ns = m.namespace.as_deref().unwrap_or_default();
        let Some(service) = m
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .and_then(|name| key(Some(ns), Some(name)))
        else {
            // Not managed for a Service (or a custom slice without the label): nothing to do.
            return Ok(());
        };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            return Ok(());
        }
        let ports = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let port = u16::try_from(p.port?).ok()?;
                Some((p.name.clone().unwrap_or_default(), port))
            })
            .collect();
        let endpoints = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref();
                // Per the API: an unset `ready` means ready, an unset `serving` follows it.
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving = c.and_then(|c| c.serving).unwrap_or(ready);
                SliceEndpoint {
                    addrs: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                    ready,
                    serving,
                    zone: e.zone.clone(),
                    pod: e
                        .target_ref
                        .as_ref()
                        .filter(|r| r.kind.as_deref() == Some("Pod"))
                        .and_then(|r| {
                            key(
                                Some(r.namespace.as_deref().unwrap_or(ns)),
                                r.name.as_deref(),
                            )
                        }),
                }
            })
            .collect();
        self.slices_by_service
            .entry(service.clone())
            .or_default()
            .insert(k.clone());
        self.slices.insert(
            k,
            SliceEntry {
                service,
                ports,
                endpoints,
            },
        );
        Ok(())
    }

    /// Removes an EndpointSlice.
    pub fn delete_slice(&mut self, slice: &EndpointSlice) {
        if let Some(k) = key(
            slice.metadata.namespace.as_deref(),
            slice.metadata.name.as_deref(),
        ) {
            self.delete_slice_key(&k);
        }
    }

    fn delete_slice_key(&mut self, k: &str) {
        if let Some(old) = self.slices.remove(k) {
            if let Some(set) = self.slices_by_service.get_mut(&old.service) {
                set.remove(k);
                if set.is_empty() {
                    self.slices_by_service.remove(&old.service);
                }
            }
        }
    }

    /// Replaces every pod (after a full list).
    pub fn replace_pods(&mut self, pods: &[Pod]) -> usize {
        self.pods.clear();
        self.pod_by_ip.clear();
        pods.iter().filter(|p| self.apply_pod(p).is_err()).count()
    }

    /// Replaces every Service (after a full list).
    pub fn replace_services(&mut self, services: &[Service]) -> usize {
        self.services.clear();
        self.service_by_ip.clear();
        services
            .iter()
            .filter(|s| self.apply_service(s).is_err())
            .count()
    }

    /// Replaces every EndpointSlice (after a full list).
    pub fn replace_slices(&mut self, slices: &[EndpointSlice]) -> usize {
        self.slices.clear();
        self.slices_by_service.clear();
        slices
            .iter()
            .filter(|s| self.apply_slice(s).is_err())
            .count()
    }

    /// Who answers at `target`: a Service port (cluster IP) first, then a pod IP.
    pub fn resolve(&self, target: SocketAddr) -> Resolution {
        if let Some(svc_key) = self.service_by_ip.get(&target.ip()) {
            return self.resolve_service(svc_key, target.port());
        }
        match self
            .pod_by_ip
            .get(&target.ip())
            .and_then(|k| Some((k, self.pods.get(k)?)))
        {
            Some((k, pod)) => Resolution::Pod {
                pod: k.clone(),
                identity: pod.identity.clone(),
                meshed: pod.meshed,
            },
            None => Resolution::Unknown,
        }
    }

    fn resolve_service(&self, svc_key: &str, port: u16) -> Resolution {
        let Some(svc) = self.services.get(svc_key) else {
            return Resolution::Unknown;
        };
        let Some((_, port_name)) = svc.ports.iter().find(|(p, _)| *p == port) else {
            // The cluster IP is a Service's, but not this port: nothing listens there.
            return Resolution::Unknown;
        };
        let mut ready = Vec::new();
        let mut terminating = Vec::new();
        for slice in self
            .slices_by_service
            .get(svc_key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
        {
            let Some((_, target_port)) = slice.ports.iter().find(|(n, _)| n == port_name) else {
                continue;
            };
            for e in &slice.endpoints {
                if !e.ready && !e.serving {
                    continue;
                }
                for ip in &e.addrs {
                    let ep = self.endpoint(e, *ip, *target_port);
                    if e.ready {
                        ready.push(ep);
                    } else {
                        terminating.push(ep);
                    }
                }
            }
        }
        // Like kube-proxy: endpoints still serving while they terminate only when no ready one
        // is left, so a rollout of the last replica does not drop traffic.
        let mut endpoints = if ready.is_empty() { terminating } else { ready };
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by(|a, b| a.addr == b.addr);
        Resolution::Service {
            service: svc_key.to_string(),
            endpoints,
        }
    }

    fn endpoint(&self, e: &SliceEndpoint, ip: IpAddr, port: u16) -> Endpoint {
        // The pod the slice names, checked against the IP: a slice can lag behind a pod that
        // was replaced, and the IP's current holder is who will answer.
        let holder = self
            .pod_by_ip
            .get(&ip)
            .and_then(|k| Some((k, self.pods.get(k)?)));
        let (pod, identity, meshed) = match holder {
            Some((k, p)) if e.pod.as_ref().is_none_or(|named| named == k) => {
                (Some(k.clone()), Some(p.identity.clone()), p.meshed)
            }
            _ => (e.pod.clone(), None, false),
        };
        Endpoint {
            addr: SocketAddr::new(ip, port),
            pod,
            identity,
            meshed,
            zone: e.zone.clone(),
            weight: 1,
        }
    }
}

fn pod_uses_host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn index() -> Index {
        Index::new(TrustDomain::new("cluster.local").unwrap())
    }

    fn pod(name: &str, sa: &str, ip: &str, meshed: bool) -> Pod {
        let mut containers = vec![json!({"name": "app"})];
        if meshed {
            containers.push(json!({"name": "moat-proxy"}));
        }
        serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": name},
            "spec": {"serviceAccountName": sa, "containers": containers},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .unwrap()
    }

    fn service(name: &str, ip: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": name},
            "spec": {"clusterIP": ip, "clusterIPs": [ip],
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080},
                               {"name": "dns", "port": 53, "protocol": "UDP"}]}
        }))
        .unwrap()
    }

    fn slice(name: &str, svc: &str, eps: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": name,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps
        }))
        .unwrap()
    }

    fn ep(ip: &str, pod: &str, ready: bool, serving: bool) -> serde_json::Value {
        json!({"addresses": [ip], "zone": "z1",
               "conditions": {"ready": ready, "serving": serving, "terminating": !ready},
               "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod}})
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_pod_ip_resolves_to_its_service_accounts_identity() {
        let mut ix = index();
        ix.apply_pod(&pod("api-0", "api", "10.244.0.5", true))
            .unwrap();
        ix.apply_pod(&pod("legacy", "default", "10.244.0.6", false))
            .unwrap();
        assert_eq!(
            ix.resolve(addr("10.244.0.5:8080")),
            Resolution::Pod {
                pod: "shop/api-0".into(),
                identity: "spiffe://cluster.local/ns/shop/sa/api".parse().unwrap(),
                meshed: true
            }
        );
        assert!(matches!(
            ix.resolve(addr("10.244.0.6:80")),
            Resolution::Pod { meshed: false, .. }
        ));
        assert_eq!(ix.resolve(addr("10.244.0.7:80")), Resolution::Unknown);
    }

    #[test]
    fn a_reused_ip_belongs_to_its_newest_pod_and_outlives_the_old_ones_deletion() {
        let mut ix = index();
        let old = pod("old", "api", "10.244.0.5", true);
        ix.apply_pod(&old).unwrap();
        ix.apply_pod(&pod("new", "batch", "10.244.0.5", true))
            .unwrap();
        // The old pod's deletion arrives late: the IP stays the new pod's.
        ix.delete_pod(&old);
        let Resolution::Pod { identity, pod, .. } = ix.resolve(addr("10.244.0.5:1")) else {
            panic!("IP forgotten");
        };
        assert_eq!(pod, "shop/new");
        assert_eq!(identity.as_str(), "spiffe://cluster.local/ns/shop/sa/batch");
        // A finished pod gives its IP up.
        let mut done = pod_value("new", "batch", "10.244.0.5");
        done["status"]["phase"] = json!("Succeeded");
        ix.apply_pod(&serde_json::from_value(done).unwrap())
            .unwrap();
        assert_eq!(ix.resolve(addr("10.244.0.5:1")), Resolution::Unknown);
    }

    fn pod_value(name: &str, sa: &str, ip: &str) -> serde_json::Value {
        serde_json::to_value(pod(name, sa, ip, true)).unwrap()
    }

    #[test]
    fn a_service_port_resolves_to_ready_endpoints_with_their_identities() {
        let mut ix = index();
        ix.apply_service(&service("api", "10.96.0.10")).unwrap();
        ix.apply_pod(&pod("api-0", "api", "10.244.0.5", true))
            .unwrap();
        ix.apply_pod(&pod("api-1", "api", "10.244.0.6", true))
            .unwrap();
        ix.apply_slice(&slice(
            "api-abc",
            "api",
            json!([
                ep("10.244.0.6", "api-1", true, true),
                ep("10.244.0.5", "api-0", true, true),
                ep("10.244.0.9", "api-2", false, false)
            ]),
        ))
        .unwrap();
        let Resolution::Service { service, endpoints } = ix.resolve(addr("10.96.0.10:80")) else {
            panic!("not a service");
        };
        assert_eq!(service, "shop/api");
        let addrs: Vec<_> = endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.244.0.5:8080", "10.244.0.6:8080"]);
        assert!(endpoints.iter().all(|e| e.meshed
            && e.identity.as_ref().map(SpiffeId::as_str)
                == Some("spiffe://cluster.local/ns/shop/sa/api")
            && e.zone.as_deref() == Some("z1")));
        // The UDP port and unknown ports are not TCP destinations.
        assert_eq!(ix.resolve(addr("10.96.0.10:53")), Resolution::Unknown);
        assert_eq!(ix.resolve(addr("10.96.0.10:81")), Resolution::Unknown);
    }

    #[test]
    fn terminating_endpoints_serve_only_when_nothing_else_is_ready() {
        let mut ix = index();
        ix.apply_service(&service("api", "10.96.0.10")).unwrap();
        ix.apply_pod(&pod("api-0", "api", "10.244.0.5", true))
            .unwrap();
        ix.apply_pod(&pod("api-1", "api", "10.244.0.6", true))
            .unwrap();
        let both = slice(
            "s",
            "api",
            json!([
                ep("10.244.0.5", "api-0", false, true),
                ep("10.244.0.6", "api-1", true, true)
            ]),
        );
        ix.apply_slice(&both).unwrap();
        let n = |ix: &Index| match ix.resolve(addr("10.96.0.10:80")) {
            Resolution::Service { endpoints, .. } => endpoints,
            other => panic!("{other:?}"),
        };
        assert_eq!(n(&ix).len(), 1);
        ix.apply_slice(&slice(
            "s",
            "api",
            json!([ep("10.244.0.5", "api-0", false, true)]),
        ))
        .unwrap();
        assert_eq!(n(&ix)[0].addr, addr("10.244.0.5:8080"));
        ix.delete_slice(&both);
        assert!(n(&ix).is_empty(), "no slice: no endpoint");
    }

    #[test]
    fn an_endpoint_whose_ip_moved_to_another_pod_has_no_identity() {
        let mut ix = index();
        ix.apply_service(&service("api", "10.96.0.10")).unwrap();
        // The slice still names api-0, but 10.244.0.5 now belongs to another workload's pod.
        ix.apply_pod(&pod("intruder", "batch", "10.244.0.5", true))
            .unwrap();
        ix.apply_slice(&slice(
            "s",
            "api",
            json!([ep("10.244.0.5", "api-0", true, true)]),
        ))
        .unwrap();
        let Resolution::Service { endpoints, .. } = ix.resolve(addr("10.96.0.10:80")) else {
            panic!();
        };
        assert_eq!(endpoints[0].identity, None);
        assert!(!endpoints[0].meshed);
    }

    #[test]
    fn a_full_list_replaces_what_was_known() {
        let mut ix = index();
        ix.apply_pod(&pod("gone", "api", "10.244.0.5", true))
            .unwrap();
        let bad: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": "shop", "name": "bad"},
            "spec": {"serviceAccountName": "Not_Valid!", "containers": []},
            "status": {"phase": "Running", "podIP": "10.244.0.8"}
        }))
        .unwrap();
        let skipped = ix.replace_pods(&[pod("kept", "api", "10.244.0.6", true), bad]);
        assert_eq!(skipped, 1);
        assert_eq!(ix.resolve(addr("10.244.0.5:80")), Resolution::Unknown);
        assert!(matches!(
            ix.resolve(addr("10.244.0.6:80")),
            Resolution::Pod { .. }
        ));
        assert_eq!(ix.resolve(addr("10.244.0.8:80")), Resolution::Unknown);
        assert_eq!(ix.sizes(), (1, 0, 0));
    }
}
