//! App probe rewriting. Kubelet probes arrive from the node in plaintext and would be captured
//! by the inbound redirection (and refused under strict mTLS), so each HTTP and TCP probe is
//! rewritten to `httpGet :15020 /app-health/<container>/<probe>` on the proxy's admin port
//! (never redirected), and the original is recorded in `MOAT_APP_PROBES` for the proxy to
//! perform against `127.0.0.1` (loopback is never redirected). Exec and gRPC probes are left
//! as they are.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::annotations::warning;
use crate::config::ADMIN_PORT;
use crate::patch::{PatchBuildError, PatchBuilder};

/// One original probe, as the proxy performs it (an entry of `MOAT_APP_PROBES`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AppProbe {
    /// An HTTP GET.
    Http {
        /// Container port.
        port: u16,
        /// Request path.
        path: String,
        /// `HTTP` or `HTTPS`.
        scheme: String,
        /// Extra request headers.
        headers: Vec<Header>,
    },
    /// A TCP connect.
    Tcp {
        /// Container port.
        port: u16,
    },
}

/// An HTTP header of a probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: String,
}

/// The probe fields of a container and their names in `MOAT_APP_PROBES` keys.
pub const PROBES: [(&str, &str); 3] = [
    ("readinessProbe", "readiness"),
    ("livenessProbe", "liveness"),
    ("startupProbe", "startup"),
];

/// Path on the admin port that runs the original probe `probe` of `container`.
pub fn health_path(container: &str, probe: &str) -> String {
    format!("/app-health/{container}/{probe}")
}

/// Resolves a probe port (a number or a named container port) to a port number.
fn resolve_port(port: &IntOrString, c: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p != 0),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .or_else(|| name.parse::<u16>().ok())
            .filter(|p| *p != 0),
    }
}

fn probe_of<'c>(c: &'c Container, field: &str) -> Option<&'c Probe> {
    match field {
        "readinessProbe" => c.readiness_probe.as_ref(),
        "livenessProbe" => c.liveness_probe.as_ref(),
        "startupProbe" => c.startup_probe.as_ref(),
        _ => None,
    }
}

/// Rewrites the HTTP and TCP probes of `c`, which sits at `base` in the pod (e.g.
/// `["spec", "containers", "0"]`), recording the originals into `out`.
pub fn rewrite(
    b: &mut PatchBuilder,
    base: &[&str],
    c: &Container,
    out: &mut BTreeMap<String, AppProbe>,
    warnings: &mut Vec<String>,
) -> Result<(), PatchBuildError> {
    for (field, kind) in PROBES {
        let Some(probe) = probe_of(c, field) else {
            continue;
        };
        let key = format!("{}/{kind}", c.name);
        let rewritten = json!({
            "path": health_path(&c.name, kind),
            "port": ADMIN_PORT,
            "scheme": "HTTP",
        });
        let mut path: Vec<&str> = base.to_vec();
        path.push(field);
        if let Some(h) = &probe.http_get {
            if h.host.as_deref().is_some_and(|s| !s.is_empty()) {
                continue; // probes another host: not captured by the pod's rules
            }
            let Some(port) = resolve_port(&h.port, c) else {
                warnings.push(warning(format!(
                    "{key} probe port not found in the container; probe left unchanged"
                )));
                continue;
            };
            if i32::from(port) == ADMIN_PORT {
                continue; // already the proxy's (a probe the proxy would send to itself)
            }
            out.insert(
                key,
                AppProbe::Http {
                    port,
                    path: h
                        .path
                        .clone()
                        .filter(|p| !p.is_empty())
                        .unwrap_or_else(|| "/".into()),
                    scheme: h.scheme.clone().unwrap_or_else(|| "HTTP".into()),
                    headers: h
                        .http_headers
                        .iter()
                        .flatten()
                        .map(|hh| Header {
                            name: hh.name.clone(),
                            value: hh.value.clone(),
                        })
                        .collect(),
                },
            );
            path.push("httpGet");
            b.replace(&path, rewritten)?;
        } else if let Some(t) = &probe.tcp_socket {
            if t.host.as_deref().is_some_and(|s| !s.is_empty()) {
                continue;
            }
            let Some(port) = resolve_port(&t.port, c) else {
                warnings.push(warning(format!(
                    "{key} probe port not found in the container; probe left unchanged"
                )));
                continue;
            };
            if i32::from(port) == ADMIN_PORT {
                continue;
            }
            out.insert(key, AppProbe::Tcp { port });
            let mut tcp = path.clone();
            tcp.push("tcpSocket");
            b.remove(&tcp)?;
            path.push("httpGet");
            b.add(&path, rewritten)?;
        }
    }
    Ok(())
}

/// The `MOAT_APP_PROBES` value: a JSON object keyed `<container>/<probe>`.
pub fn to_env(probes: &BTreeMap<String, AppProbe>) -> String {
    serde_json::to_string(probes).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// Rewrites the probes of the only container of a pod: the patch builder (to inspect the
    /// result), the probes moved to the sidecar, and the warnings.
    fn rewrite_only(c_json: Value) -> (PatchBuilder, BTreeMap<String, AppProbe>, Vec<String>) {
        let pod = json!({"spec": {"containers": [c_json.clone()]}});
        let mut b = PatchBuilder::new(pod);
        let (mut out, mut w) = (BTreeMap::new(), Vec::new());
        let c: Container = serde_json::from_value(c_json).unwrap();
        rewrite(&mut b, &["spec", "containers", "0"], &c, &mut out, &mut w).unwrap();
        (b, out, w)
    }

    #[test]
    fn rewrites_http_named_port_and_tcp_and_keeps_exec() {
        let c_json = json!({
            "name": "web",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http",
                "httpHeaders": [{"name": "X-Probe", "value": "1"}]}, "periodSeconds": 3},
            "livenessProbe": {"tcpSocket": {"port": 5432}, "timeoutSeconds": 2},
            "startupProbe": {"exec": {"command": ["true"]}}
        });
        let (b, out, w) = rewrite_only(c_json);
        assert!(w.is_empty());
        assert_eq!(
            to_env(&out),
            r#"{"web/liveness":{"kind":"tcp","port":5432},"web/readiness":{"kind":"http","port":8080,"path":"/ready","scheme":"HTTP","headers":[{"name":"X-Probe","value":"1"}]}}"#
        );
        let (_, doc) = b.finish();
        let c = &doc["spec"]["containers"][0];
        assert_eq!(
            c["readinessProbe"],
            json!({"httpGet": {"path": "/app-health/web/readiness", "port": 15020, "scheme": "HTTP"}, "periodSeconds": 3})
        );
        assert_eq!(
            c["livenessProbe"],
            json!({"httpGet": {"path": "/app-health/web/liveness", "port": 15020, "scheme": "HTTP"}, "timeoutSeconds": 2})
        );
        assert_eq!(c["startupProbe"], json!({"exec": {"command": ["true"]}}));
    }

    #[test]
    fn unknown_named_port_and_foreign_host_are_left_alone() {
        let c_json = json!({
            "name": "web",
            "readinessProbe": {"httpGet": {"port": "missing"}},
            "livenessProbe": {"httpGet": {"port": 80, "host": "example.com"}},
        });
        let (b, out, w) = rewrite_only(c_json);
        assert!(out.is_empty());
        assert_eq!(w.len(), 1);
        assert!(b.finish().0 .0.is_empty());
    }

    #[test]
    fn default_path_and_scheme() {
        let c_json =
            json!({"name": "a", "readinessProbe": {"httpGet": {"port": 3333, "scheme": "HTTPS"}}});
        let (_, out, _) = rewrite_only(c_json);
        assert_eq!(
            out["a/readiness"],
            AppProbe::Http {
                port: 3333,
                path: "/".into(),
                scheme: "HTTPS".into(),
                headers: vec![]
            }
        );
    }
}
