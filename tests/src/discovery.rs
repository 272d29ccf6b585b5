//! The lab's discovery service: `moat-destination`'s own API and index, serving the lab's
//! sidecars over mutual TLS from the node namespace, with its own SVID from the lab's CA.
//!
//! The lab has no Kubernetes API server, so the lab itself plays the watch's part: it feeds
//! the index the pod, Service and EndpointSlice objects a cluster would list (the cluster
//! suite runs the real watch against a real API server). Everything from the index on — the
//! answers, their versions, the held watches, the TLS — is the production code.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use moat_core::client::{CaClient, CaClientConfig, KeyAlgorithm};
use moat_core::manager::{IdentityManager, Schedule};
use moat_core::tls::{self, SpiffeVerifier};
use moat_core::{discovery, TrustBundle, TrustDomain};
use moat_destination::api::Api;
use moat_destination::index::Index;
use moat_destination::watch::Shared;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::netns::Netns;

/// A running discovery service and the index the lab feeds.
pub struct LabDiscovery {
    shared: Shared,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

/// One endpoint of a Service the lab publishes: a pod's name and IP.
#[derive(Debug, Clone)]
pub struct EndpointPod {
    /// The pod's name (its namespace is the Service's).
    pub name: String,
    /// The pod's IP.
    pub ip: Ipv4Addr,
}

impl LabDiscovery {
    /// Starts serving on `addr` inside `node`: first the SVID (`token_file` proves
    /// `moat-system/moat-destination` to the CA at `ca_url`), then the API.
    pub fn start(
        node: &Netns,
        addr: SocketAddr,
        trust_domain: &str,
        ca_url: &str,
        bundle_path: &Path,
        token_file: &Path,
    ) -> anyhow::Result<Self> {
        let td = TrustDomain::new(trust_domain).context("trust domain")?;
        let shared = Shared::new(Index::new(td.clone()));
        let (stop, stopped) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let bundle_bytes = std::fs::read(bundle_path)
            .with_context(|| format!("reading {}", bundle_path.display()))?;
        let bundle = Arc::new(ArcSwap::from_pointee(
            TrustBundle::from_pem(&bundle_bytes).context("the lab's trust bundle")?,
        ));
        let config = CaClientConfig {
            url: ca_url
                .parse()
                .with_context(|| format!("CA URL {ca_url:?}"))?,
            token_file: token_file.to_path_buf(),
            identity: discovery::server_identity(&td),
            key_algorithm: KeyAlgorithm::default(),
            dns_names: Vec::new(),
            timeout: Duration::from_secs(10),
        };
        let index = shared.clone();
        let thread = crate::lab::spawn_in(node, move || async move {
            let provider = tls::provider();
            let client =
                CaClient::new(config, bundle.clone(), provider.clone()).context("CA client")?;
            let (manager, handle) =
                IdentityManager::new(client, bundle, None, provider.clone(), Schedule::default());
            tokio::spawn(manager.run(stopped.clone()));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while !handle.has_valid_cert() {
                if tokio::time::Instant::now() > deadline {
                    let e = anyhow::anyhow!("no SVID from the lab's CA within 20 s");
                    let _ = ready_tx.send(Err(anyhow::anyhow!("{e}")));
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let verifier = SpiffeVerifier::new(handle.bundle.clone(), td, provider.clone());
            let mut cfg = tls::mesh_server_config(handle.cert.clone(), verifier, provider)
                .context("TLS configuration")?;
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the discovery API on {addr}"))?;
            let api = Api::new(index, stopped.clone(), Api::default_limits());
            let _ = ready_tx.send(Ok(()));
            moat_core::https::serve(
                listener,
                Arc::new(cfg),
                Arc::new(api),
                stopped,
                Duration::from_secs(1),
            )
            .await;
            Ok(())
        });
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(Self {
                shared,
                addr,
                stop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                let why = match thread.join() {
                    Ok(Err(e)) => format!("{e:#}"),
                    _ => "it stopped without saying why".into(),
                };
                anyhow::bail!("the lab's discovery service did not start: {why}")
            }
        }
    }

    /// Where sidecars reach it.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Publishes `pod` (as admitted, so with its sidecar when injected) as running at `ip`;
    /// replaces what was known about the pod, and takes the IP from any earlier holder.
    pub fn publish_pod(&self, pod: &Pod, ip: Ipv4Addr) -> anyhow::Result<()> {
        let mut pod = pod.clone();
        pod.status = Some(
            serde_json::from_value(json!({
                "phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]
            }))
            .context("pod status")?,
        );
        self.shared
            .update(|ix| ix.apply_pod(&pod))
            .map_err(|why| anyhow::anyhow!("the index skipped the pod: {why:?}"))
    }

    /// Withdraws a pod (deleted: its IP is free).
    pub fn withdraw_pod(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": namespace, "name": name}
        }))?;
        self.shared.update(|ix| ix.delete_pod(&pod));
        Ok(())
    }

    /// Publishes Service `namespace/name` at `cluster_ip:port`, served on `target_port` of
    /// `endpoints` (all ready), replacing its previous endpoints.
    pub fn publish_service(
        &self,
        namespace: &str,
        name: &str,
        cluster_ip: Ipv4Addr,
        port: u16,
        target_port: u16,
        endpoints: &[EndpointPod],
    ) -> anyhow::Result<()> {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"namespace": namespace, "name": name},
            "spec": {"clusterIP": cluster_ip.to_string(), "clusterIPs": [cluster_ip.to_string()],
                     "ports": [{"name": "http", "port": port, "targetPort": target_port}]}
        }))
        .context("Service")?;
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"namespace": namespace, "name": format!("{name}-lab"),
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": target_port, "protocol": "TCP"}],
            "endpoints": endpoints.iter().map(|e| json!({
                "addresses": [e.ip.to_string()],
                "conditions": {"ready": true, "serving": true},
                "targetRef": {"kind": "Pod", "namespace": namespace, "name": e.name},
            })).collect::<Vec<_>>(),
        }))
        .context("EndpointSlice")?;
        self.shared.update(|ix| -> anyhow::Result<()> {
            ix.apply_service(&svc)
                .map_err(|why| anyhow::anyhow!("the index skipped the Service: {why:?}"))?;
            ix.apply_slice(&slice)
                .map_err(|why| anyhow::anyhow!("the index skipped the EndpointSlice: {why:?}"))
        })
    }

    /// Stops the service and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LabDiscovery {
    fn drop(&mut self) {
        self.shutdown();
    }
}
