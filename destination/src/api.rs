//! `POST /v1/watch` (see [`moat_core::discovery`]): answers a sidecar's targets that changed,
//! or holds the request until one does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use moat_core::admin;
use moat_core::discovery::{self, Update, WatchRequest, WatchResponse, MAX_TARGETS, MAX_WAIT_S};
use moat_core::https::{Handler, Limits};
use tokio::sync::watch;

use crate::metrics as m;
use crate::watch::Shared;

/// Largest request body: `MAX_TARGETS` targets of ~60 bytes each.
const MAX_BODY: usize = 512 * 1024;

/// Most answers kept between two index changes (beyond it the cache starts afresh).
const MAX_CACHED: usize = 65_536;

/// The discovery API.
#[derive(Debug)]
pub struct Api {
    shared: Shared,
    stop: watch::Receiver<bool>,
    limits: Limits,
    answers: Mutex<Answers>,
}

/// Answers computed since the index last changed, shared by every held request. Every change
/// wakes every held request; with this each target is then resolved (and hashed) once, not
/// once per sidecar watching it, so a change costs a map lookup per watched target, not a
/// rebuilt answer: the fan-out stays fast with thousands of sidecars.
#[derive(Debug, Default)]
struct Answers {
    generation: u64,
    by_target: HashMap<SocketAddr, (u64, Arc<discovery::Resolution>)>,
}

impl Api {
    /// Serves `shared` until `stop` (held requests then answer at once).
    pub fn new(shared: Shared, stop: watch::Receiver<bool>, limits: Limits) -> Self {
        Self {
            shared,
            stop,
            limits,
            answers: Mutex::default(),
        }
    }

    /// The server limits for the discovery API: one long-lived HTTP/2 connection per sidecar.
    pub fn default_limits() -> Limits {
        Limits {
            max_connections: 20_000,
            max_connections_per_source: 16,
            // A sidecar's connection always has a request held: idle means it is gone.
            idle_timeout: Duration::from_secs(MAX_WAIT_S + 30),
            max_concurrent_streams: 16,
            metrics_prefix: "moat_destination",
            ..Limits::default()
        }
    }

    /// The targets of `req` whose resolution differs from what the sidecar holds.
    fn changed(&self, req: &WatchRequest) -> Vec<Update> {
        let ix = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
        // Read under the index lock: the generation is bumped only after a change is written,
        // so answers cached under it never predate it.
        let generation = *self.shared.generation.borrow();
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if answers.generation != generation || answers.by_target.len() >= MAX_CACHED {
            answers.by_target.clear();
            answers.generation = generation;
        }
        req.targets
            .iter()
            .filter_map(|k| {
                let (version, resolution) =
                    answers.by_target.entry(k.target).or_insert_with(|| {
                        let r = ix.resolve(k.target);
                        (r.version(), Arc::new(r))
                    });
                (*version != k.version).then(|| Update {
                    target: k.target,
                    version: *version,
                    resolution: (**resolution).clone(),
                })
            })
            .collect()
    }

    async fn watch(&self, req: WatchRequest) -> WatchResponse {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(req.wait_s);
        let mut generation = self.shared.generation.subscribe();
        let mut stop = self.stop.clone();
        let _held = Held::new();
        loop {
            generation.mark_unchanged();
            let updates = self.changed(&req);
            if !updates.is_empty() {
                for u in &updates {
                    let kind = match u.resolution {
                        discovery::Resolution::Pod { .. } => "pod",
                        discovery::Resolution::Service { .. } => "service",
                        discovery::Resolution::Unknown => "unknown",
                    };
                    metrics::counter!(m::UPDATES, "kind" => kind).increment(1);
                }
                metrics::counter!(m::REQUESTS, "result" => "changed").increment(1);
                return WatchResponse { updates };
            }
            tokio::select! {
                r = generation.changed() => if r.is_err() { break },
                _ = tokio::time::sleep_until(deadline) => break,
                _ = moat_core::shutdown::signalled(&mut stop) => break,
            }
        }
        metrics::counter!(m::REQUESTS, "result" => "unchanged").increment(1);
        WatchResponse::default()
    }
}

/// Counts a held request while it lives.
struct Held;

impl Held {
    fn new() -> Self {
        metrics::gauge!(m::HELD).increment(1.0);
        Self
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        metrics::gauge!(m::HELD).decrement(1.0);
    }
}

fn invalid(msg: String) -> Response<Full<Bytes>> {
    metrics::counter!(m::REQUESTS, "result" => "invalid").increment(1);
    admin::text(StatusCode::BAD_REQUEST, msg)
}

/// Parses and checks a watch request body.
pub fn parse_request(body: &[u8]) -> Result<WatchRequest, String> {
    let req: WatchRequest = serde_json::from_slice(body).map_err(|e| {
        format!(
            "body must be JSON {{\"targets\": [{{\"target\": \"<ip>:<port>\", \"version\": <n>}}], \"wait_s\": <n>}}: {e}"
        )
    })?;
    if req.targets.len() > MAX_TARGETS {
        return Err(format!(
            "{} targets in one request; at most {MAX_TARGETS}",
            req.targets.len()
        ));
    }
    if req.wait_s > MAX_WAIT_S {
        return Err(format!("wait_s {} is above {MAX_WAIT_S}", req.wait_s));
    }
    Ok(req)
}

impl Handler for Api {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() != discovery::WATCH_PATH {
            return admin::text(
                StatusCode::NOT_FOUND,
                format!("not found; the API is POST {}\n", discovery::WATCH_PATH),
            );
        }
        if req.method() != Method::POST {
            return admin::text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        }
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return invalid(format!(
                    "cannot read the body (at most {MAX_BODY} bytes): {e}\n"
                ))
            }
        };
        match parse_request(&body) {
            Ok(w) => admin::json(StatusCode::OK, &self.watch(w).await),
            Err(e) => invalid(format!("{e}\n")),
        }
    }

    fn limits(&self) -> Limits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;
    use moat_core::discovery::Known;
    use moat_core::spiffe::TrustDomain;

    fn api() -> (Api, watch::Sender<bool>) {
        let shared = Shared::new(Index::new(TrustDomain::new("cluster.local").unwrap()));
        let (tx, rx) = watch::channel(false);
        (Api::new(shared, rx, Api::default_limits()), tx)
    }

    fn pod(ip: &str) -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "shop", "name": "api-0"},
            "spec": {"serviceAccountName": "api", "containers": [{"name": "moat-proxy"}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .unwrap()
    }

    fn req(version: u64, wait_s: u64) -> WatchRequest {
        WatchRequest {
            targets: vec![Known {
                target: "10.244.0.5:8080".parse().unwrap(),
                version,
            }],
            wait_s,
        }
    }

    #[tokio::test]
    async fn unknown_versions_are_answered_at_once_and_known_ones_held_until_a_change() {
        let (api, _stop) = api();
        let first = api.watch(req(0, 30)).await;
        assert_eq!(first.updates.len(), 1);
        assert_eq!(first.updates[0].resolution, discovery::Resolution::Unknown);
        let v = first.updates[0].version;

        let shared = api.shared.clone();
        let api = std::sync::Arc::new(api);
        let held = tokio::spawn({
            let api = api.clone();
            async move { api.watch(req(v, 30)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!held.is_finished(), "nothing changed: the request is held");
        shared.update(|ix| ix.apply_pod(&pod("10.244.0.5")).unwrap());
        let got = tokio::time::timeout(Duration::from_secs(2), held)
            .await
            .expect("answered on change")
            .unwrap();
        assert!(matches!(
            got.updates[0].resolution,
            discovery::Resolution::Pod { meshed: true, .. }
        ));
    }

    #[tokio::test]
    async fn a_held_request_ends_empty_at_its_deadline_or_on_shutdown() {
        let (api, stop) = api();
        let v = api.watch(req(0, 0)).await.updates[0].version;
        let t = tokio::time::Instant::now();
        assert!(api.watch(req(v, 0)).await.updates.is_empty());
        assert!(t.elapsed() < Duration::from_secs(1));
        let api = std::sync::Arc::new(api);
        let held = tokio::spawn({
            let api = api.clone();
            async move { api.watch(req(v, 60)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send_replace(true);
        let got = tokio::time::timeout(Duration::from_secs(2), held)
            .await
            .expect("shutdown answers held requests")
            .unwrap();
        assert!(got.updates.is_empty());
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        assert!(parse_request(b"junk")
            .unwrap_err()
            .contains("body must be JSON"));
        assert!(parse_request(br#"{"targets":[{"target":"nope"}],"wait_s":1}"#).is_err());
        assert!(parse_request(br#"{"targets":[],"wait_s":600}"#)
            .unwrap_err()
            .contains("above"));
        let many = serde_json::json!({
            "targets": vec![serde_json::json!({"target": "10.0.0.1:80"}); MAX_TARGETS + 1],
            "wait_s": 1
        });
        assert!(parse_request(many.to_string().as_bytes())
            .unwrap_err()
            .contains("at most"));
        assert!(parse_request(br#"{"targets":[{"target":"10.0.0.1:80"}],"wait_s":5}"#).is_ok());
    }
}
