//! The proxy's own admin routes, beside `/metrics`, `/ready` and `/live`:
//! `GET /identity`, `POST /shutdown` (loopback callers only, for Jobs) and
//! `GET /app-health/<container>/<probe>` (rewritten app probes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use moat_core::admin::{json, text, Route, RouteFuture};
use moat_core::manager::IdentityHandle;
use tokio::sync::Notify;

use crate::probes::{self, AppProbes};

/// Builds the extra routes.
pub fn routes(identity: IdentityHandle, shutdown: Arc<Notify>, probes: AppProbes) -> Route {
    let probes = Arc::new(probes);
    Arc::new(
        move |method: &Method, path: &str, peer: SocketAddr| -> Option<RouteFuture> {
            match (method, path) {
                (&Method::GET, "/identity") => {
                    let resp = match identity.summary() {
                        Some(s) => json(StatusCode::OK, &*s),
                        None => text(StatusCode::SERVICE_UNAVAILABLE, "no certificate yet\n"),
                    };
                    Some(Box::pin(async move { resp }))
                }
                (&Method::POST, "/shutdown") => {
                    let resp = if peer.ip().is_loopback() {
                        tracing::info!(%peer, "shutdown requested on the admin port");
                        shutdown.notify_one();
                        text(StatusCode::ACCEPTED, "shutting down\n")
                    } else {
                        text(
                            StatusCode::FORBIDDEN,
                            "POST /shutdown is only accepted from localhost\n",
                        )
                    };
                    Some(Box::pin(async move { resp }))
                }
                (&Method::GET, p) if p.starts_with("/app-health/") => {
                    let key = p.trim_start_matches("/app-health/").to_string();
                    let probes = probes.clone();
                    Some(Box::pin(async move {
                        let Some(probe) = probes.get(&key) else {
                            return text(StatusCode::NOT_FOUND, format!("no app probe {key:?}\n"));
                        };
                        match probes::check(probe, Duration::from_secs(5)).await {
                            Ok(()) => text(StatusCode::OK, "ok\n"),
                            Err(e) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
                        }
                    }))
                }
                _ => None,
            }
        },
    )
}
