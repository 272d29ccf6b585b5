//! The proxy's own admin routes, beside `/metrics`, `/ready` and `/live`, and who may call
//! each: the admin port answers every pod on the network, so anything that tells or changes
//! more than health is limited to the pod itself or the node.
//!
//! | route | who |
//! |-------|-----|
//! | `GET /metrics` | anyone, unless `--metrics-allow` or the policy's `admin.metricsFrom` narrow it (loopback always) |
//! | `GET /identity` | loopback and the local socket |
//! | `POST /shutdown` | the local control socket only (`--admin-socket`), never TCP: a peer's stream could come from loopback |
//! | `GET /app-health/<container>/<probe>` | the node (`MOAT_HOST_IP`), the pod's default gateways, `--probe-allow`, loopback |

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use moat_core::admin::{json, text, Caller, Route, RouteFuture};
use moat_core::manager::IdentityHandle;
use moat_core::netaddr::Cidr;
use tokio::sync::{watch, Notify};

use crate::policy::Policy;
use crate::probes::{self, AppProbes};

/// Who may call the restricted routes.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Besides loopback, callers of `/app-health/`: the node, gateways, `--probe-allow`.
    pub probes: Vec<Cidr>,
    /// `--metrics-allow` (empty: anyone, subject to the policy's `admin.metricsFrom`).
    pub metrics: Vec<Cidr>,
}

impl Access {
    fn admits_prober(&self, caller: Caller) -> bool {
        match caller {
            Caller::Local => true,
            Caller::Tcp(a) => a.ip().is_loopback() || contains(&self.probes, a.ip()),
        }
    }

    fn admits_scraper(&self, caller: Caller, policy: &Policy) -> bool {
        match caller {
            Caller::Local => true,
            Caller::Tcp(a) if a.ip().is_loopback() => true,
            Caller::Tcp(a) => {
                (self.metrics.is_empty() || contains(&self.metrics, a.ip()))
                    && policy.admits_scraper(a.ip())
            }
        }
    }
}

fn contains(nets: &[Cidr], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(ip))
}

fn refused(caller: Caller, route: &'static str, why: &'static str) -> Option<RouteFuture> {
    crate::metrics::admin_refused(route);
    tracing::warn!(%caller, route, "admin request refused: {why}");
    let resp = text(StatusCode::FORBIDDEN, format!("{why}\n"));
    Some(Box::pin(async move { resp }))
}

/// Builds the extra routes.
pub fn routes(
    identity: IdentityHandle,
    shutdown: Arc<Notify>,
    probes: AppProbes,
    access: Access,
    policy: watch::Receiver<Arc<Policy>>,
) -> Route {
    let probes = Arc::new(probes);
    Arc::new(
        move |method: &Method, path: &str, caller: Caller| -> Option<RouteFuture> {
            match (method, path) {
                (&Method::GET, "/metrics") => {
                    if access.admits_scraper(caller, &policy.borrow()) {
                        None // served by the shared admin server
                    } else {
                        refused(
                            caller,
                            "metrics",
                            "/metrics is restricted by --metrics-allow or the policy's admin.metricsFrom",
                        )
                    }
                }
                (&Method::GET, "/identity") => {
                    if !caller.is_local() {
                        return refused(
                            caller,
                            "identity",
                            "/identity is only answered to the pod itself (loopback)",
                        );
                    }
                    let resp = match identity.summary() {
                        Some(s) => json(StatusCode::OK, &*s),
                        None => text(StatusCode::SERVICE_UNAVAILABLE, "no certificate yet\n"),
                    };
                    Some(Box::pin(async move { resp }))
                }
                (&Method::POST, "/shutdown") => {
                    if caller != Caller::Local {
                        return refused(
                            caller,
                            "shutdown",
                            "POST /shutdown is only served on the local control socket (MOAT_ADMIN_SOCKET, /run/moat/admin.sock in injected pods)",
                        );
                    }
                    tracing::info!("shutdown requested on the local control socket");
                    shutdown.notify_one();
                    let resp = text(StatusCode::ACCEPTED, "shutting down\n");
                    Some(Box::pin(async move { resp }))
                }
                (&Method::GET, p) if p.starts_with("/app-health/") => {
                    if !access.admits_prober(caller) {
                        return refused(
                            caller,
                            "app_health",
                            "/app-health/ is only answered to the node (kubelet) and the pod itself",
                        );
                    }
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
