//! What a tenant's pod may and may not do in a mesh-enforcing namespace (one labelled
//! `moat.dev/inject=enabled`): the conflicts and opt-outs that would leave the pod outside the
//! mesh, the platform team's allowances (`--allow-opt-out`, the exclusion allow lists), and
//! the removal of Moat's own parts from a pod before it is (re-)injected.
//!
//! Namespace labels are set by the platform team, pod specs by tenants: so only the namespace
//! (through the webhook the API server chose, see `webhook.rs`) and injector flags decide what
//! is enforced and what is allowed, never something in the pod.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec};
use serde_json::Value;

use crate::annotations;
use crate::config::{
    ADMIN_PORT, INIT_CONTAINER, POLICY_VOLUME, PROXY_CONTAINER, PROXY_GID, PROXY_UID, RUN_DIR,
    RUN_VOLUME, TOKEN_VOLUME,
};
use crate::probes::{self, AppProbe};
use crate::syntax::{self, Cidr, CidrList, PortList, PortRange};

/// Containers of other meshes: a pod that has one is left alone or refused (two sidecars
/// would fight over the same traffic).
pub const OTHER_MESH_CONTAINERS: [&str; 6] = [
    "istio-proxy",
    "istio-init",
    "istio-validation",
    "linkerd-proxy",
    "linkerd-init",
    "linkerd-network-validator",
];

/// Capabilities that let a container rewrite or bypass the pod's traffic capture.
const NETWORK_CAPABILITIES: [&str; 3] = ["NET_ADMIN", "NET_RAW", "ALL"];

/// Something in a pod that would keep it (or part of its traffic) out of the mesh; also the
/// names the platform team uses in `--allow-opt-out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OptOut {
    /// `moat.dev/inject: disabled` as a pod label or annotation.
    InjectDisabled,
    /// A Windows pod (`spec.os.name: windows`): no iptables, never injected.
    Windows,
    /// Another mesh's container.
    OtherMesh,
    /// An app or init container runs as the proxy's uid or gid.
    ProxyUid,
    /// A container declares one of the proxy's ports.
    PortConflict,
    /// A volume uses one of Moat's volume names.
    NameConflict,
    /// A container asks for NET_ADMIN, NET_RAW (or ALL), or is privileged.
    NetAdmin,
    /// A `moat.dev/skip-*` annotation asks for an exclusion outside the allow lists.
    Exclusions,
}

impl OptOut {
    /// Every opt-out, in the order the checks run.
    pub const ALL: [OptOut; 8] = [
        OptOut::InjectDisabled,
        OptOut::Windows,
        OptOut::OtherMesh,
        OptOut::ProxyUid,
        OptOut::PortConflict,
        OptOut::NameConflict,
        OptOut::NetAdmin,
        OptOut::Exclusions,
    ];

    /// The name used in `--allow-opt-out`.
    pub fn key(&self) -> &'static str {
        match self {
            OptOut::InjectDisabled => "inject-disabled",
            OptOut::Windows => "windows",
            OptOut::OtherMesh => "other-mesh",
            OptOut::ProxyUid => "proxy-uid",
            OptOut::PortConflict => "port-conflict",
            OptOut::NameConflict => "name-conflict",
            OptOut::NetAdmin => "net-admin",
            OptOut::Exclusions => "exclusions",
        }
    }

    /// Metric label (`moat_injector_refusals_total{reason}`), bounded by this enum.
    pub fn label(&self) -> &'static str {
        match self {
            OptOut::InjectDisabled => "opted_out",
            OptOut::Windows => "windows_pod",
            OptOut::OtherMesh => "other_mesh",
            OptOut::ProxyUid => "proxy_uid_conflict",
            OptOut::PortConflict => "port_conflict",
            OptOut::NameConflict => "name_conflict",
            OptOut::NetAdmin => "net_admin",
            OptOut::Exclusions => "exclusion_not_allowed",
        }
    }

    /// Whether the pod is admitted without the mesh when this is allowed (the others are
    /// injected anyway: an allowed capability or exclusion does not prevent the sidecar).
    pub fn skips_injection(&self) -> bool {
        !matches!(self, OptOut::NetAdmin | OptOut::Exclusions)
    }
}

impl fmt::Display for OptOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

impl FromStr for OptOut {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OptOut::ALL
            .into_iter()
            .find(|o| o.key() == s.trim())
            .ok_or_else(|| {
                format!(
                    "{:?} is not an opt-out; one of {}",
                    syntax::shorten(s, 30),
                    OptOut::ALL.map(|o| o.key()).join(", ")
                )
            })
    }
}

/// One `--allow-opt-out` value: `WHAT[,WHAT...]` for every enforcing namespace, or
/// `NAMESPACE=WHAT[,WHAT...]` for one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowance {
    /// The namespace, or `None` for all.
    pub namespace: Option<String>,
    /// What may be opted out there.
    pub what: BTreeSet<OptOut>,
}

impl FromStr for Allowance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (namespace, list) = match s.split_once('=') {
            Some((ns, list)) => {
                let ns = ns.trim();
                let valid = !ns.is_empty()
                    && ns.len() <= 63
                    && ns
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !ns.starts_with('-')
                    && !ns.ends_with('-');
                if !valid {
                    return Err(format!(
                        "{:?} is not a namespace name",
                        syntax::shorten(ns, 63)
                    ));
                }
                (Some(ns.to_string()), list)
            }
            None => (None, s),
        };
        let what = list
            .split(',')
            .filter(|w| !w.trim().is_empty())
            .map(OptOut::from_str)
            .collect::<Result<BTreeSet<_>, _>>()?;
        if what.is_empty() {
            return Err("name at least one opt-out".into());
        }
        Ok(Self { namespace, what })
    }
}

/// The platform team's flags: what tenants may opt out of, and which exclusions they may
/// ask for, in enforcing namespaces.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EnforcementArgs {
    /// In namespaces labelled moat.dev/inject=enabled, allow these opt-outs instead of refusing
    /// the pod: `WHAT[,WHAT...]` everywhere or `NAMESPACE=WHAT[,WHAT...]` in one namespace
    /// (repeatable). WHAT: inject-disabled, windows, other-mesh, proxy-uid, port-conflict,
    /// name-conflict, net-admin, exclusions.
    #[arg(long, value_name = "[NS=]WHAT,...", action = clap::ArgAction::Append)]
    pub allow_opt_out: Vec<Allowance>,
    /// Inbound ports tenants may exclude from capture with moat.dev/skip-inbound-ports in
    /// enforcing namespaces (e.g. `22,9100`; default: none).
    #[arg(long, value_name = "LIST", default_value = "")]
    pub allow_skip_inbound_ports: PortList,
    /// Outbound destination ports tenants may exclude with moat.dev/skip-outbound-ports in
    /// enforcing namespaces (default: none).
    #[arg(long, value_name = "LIST", default_value = "")]
    pub allow_skip_outbound_ports: PortList,
    /// Outbound networks tenants may exclude with moat.dev/skip-outbound-cidrs in enforcing
    /// namespaces; a requested CIDR must lie inside one of them (default: none).
    #[arg(long, value_name = "LIST", default_value = "")]
    pub allow_skip_outbound_cidrs: CidrList,
}

impl EnforcementArgs {
    /// The parsed policy.
    pub fn policy(&self) -> Enforcement {
        Enforcement {
            allow_opt_out: self.allow_opt_out.clone(),
            skip_inbound_ports: self.allow_skip_inbound_ports.0.clone(),
            skip_outbound_ports: self.allow_skip_outbound_ports.0.clone(),
            skip_outbound_cidrs: self.allow_skip_outbound_cidrs.0.clone(),
        }
    }
}

/// What enforcing namespaces allow (from [`EnforcementArgs`]); the default allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enforcement {
    /// `--allow-opt-out` values.
    pub allow_opt_out: Vec<Allowance>,
    /// Inbound ports a pod may exclude.
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound ports a pod may exclude.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound networks a pod may exclude.
    pub skip_outbound_cidrs: Vec<Cidr>,
}

impl Enforcement {
    /// Whether `what` is allowed in `namespace`.
    pub fn allows(&self, namespace: Option<&str>, what: OptOut) -> bool {
        self.allow_opt_out.iter().any(|a| {
            a.what.contains(&what)
                && a.namespace
                    .as_deref()
                    .is_none_or(|ns| Some(ns) == namespace)
        })
    }

    /// The `--allow-opt-out` values, for the start-up log.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .allow_opt_out
            .iter()
            .map(|a| {
                let what: Vec<&str> = a.what.iter().map(|w| w.key()).collect();
                match &a.namespace {
                    Some(ns) => format!("{ns}={}", what.join(",")),
                    None => what.join(","),
                }
            })
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(" ")
        }
    }
}

/// One reason a pod would end up (partly) outside the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// What it is.
    pub what: OptOut,
    /// The field and what to do, e.g. `spec.containers[app].securityContext.runAsUser=7777:
    /// the proxy's uid bypasses capture; use another uid`.
    pub message: String,
}

fn violation(what: OptOut, message: String) -> Violation {
    Violation { what, message }
}

/// Whether `outer` contains all of `inner`.
fn cidr_covers(outer: &Cidr, inner: &Cidr) -> bool {
    outer.is_ipv4() == inner.is_ipv4()
        && outer.prefix() <= inner.prefix()
        && outer.contains(inner.addr())
}

fn ports_cover(outer: &PortRange, inner: &PortRange) -> bool {
    outer.first <= inner.first && inner.last <= outer.last
}

fn container_refs(spec: &PodSpec) -> impl Iterator<Item = (&'static str, &Container)> {
    spec.init_containers
        .iter()
        .flatten()
        .map(|c| ("initContainers", c))
        .chain(spec.containers.iter().map(|c| ("containers", c)))
}

fn name(c: &Container) -> String {
    syntax::shorten(&c.name, 40)
}

/// Every opt-out and conflict of `pod`, in check order. Moat's own parts must have been
/// removed first ([`strip`]). `cfg` decides which exclusion annotations are out of bounds.
pub fn violations(pod: &Pod, spec: &PodSpec, cfg: &Enforcement) -> Vec<Violation> {
    let mut out = Vec::new();
    let meta = &pod.metadata;
    for (field, map) in [
        ("labels", meta.labels.as_ref()),
        ("annotations", meta.annotations.as_ref()),
    ] {
        if map
            .and_then(|m| m.get(annotations::INJECT))
            .map(String::as_str)
            == Some("disabled")
        {
            out.push(violation(
                OptOut::InjectDisabled,
                format!("metadata.{field}[{}]=disabled: opting out of the mesh is not allowed in this namespace; remove it", annotations::INJECT),
            ));
        }
    }
    if spec.os.as_ref().is_some_and(|os| os.name == "windows") {
        out.push(violation(
            OptOut::Windows,
            "spec.os.name=windows: Windows pods cannot be meshed".into(),
        ));
    }
    for (list, c) in container_refs(spec) {
        if OTHER_MESH_CONTAINERS.contains(&c.name.as_str()) {
            out.push(violation(
                OptOut::OtherMesh,
                format!(
                    "spec.{list}[{}]: container belongs to another service mesh; remove it",
                    name(c)
                ),
            ));
        }
    }
    let pod_sc = spec.security_context.as_ref();
    for (list, c) in container_refs(spec) {
        let sc = c.security_context.as_ref();
        for (field, own, inherited, proxy) in [
            (
                "runAsUser",
                sc.and_then(|s| s.run_as_user),
                pod_sc.and_then(|s| s.run_as_user),
                PROXY_UID,
            ),
            (
                "runAsGroup",
                sc.and_then(|s| s.run_as_group),
                pod_sc.and_then(|s| s.run_as_group),
                PROXY_GID,
            ),
        ] {
            let at = match (own, inherited) {
                (Some(v), _) if v == proxy => format!("spec.{list}[{}].securityContext", name(c)),
                (None, Some(v)) if v == proxy => "spec.securityContext".to_string(),
                _ => continue,
            };
            out.push(violation(
                OptOut::ProxyUid,
                format!(
                    "{at}.{field}={proxy}: container {} would run as the proxy's uid/gid and bypass the mesh; use another",
                    name(c)
                ),
            ));
        }
    }
    // The rules match the proxy's gid with `--gid-owner` (the socket owner's fsgid only, not
    // supplementary groups), so these do not bypass capture today; refused anyway so no app
    // process ever holds the proxy's gid, whatever the rules become.
    if let Some(sc) = pod_sc {
        if sc.fs_group == Some(PROXY_GID) {
            out.push(violation(
                OptOut::ProxyUid,
                format!("spec.securityContext.fsGroup={PROXY_GID} is the proxy's gid; use another"),
            ));
        }
        if sc
            .supplemental_groups
            .iter()
            .flatten()
            .any(|g| *g == PROXY_GID)
        {
            out.push(violation(
                OptOut::ProxyUid,
                format!("spec.securityContext.supplementalGroups holds {PROXY_GID}, the proxy's gid; remove it"),
            ));
        }
    }
    for (list, c) in container_refs(spec) {
        if let Some(p) = c.ports.iter().flatten().find(|p| {
            moat_core::contract::PROXY_PORTS
                .iter()
                .any(|r| i32::from(*r) == p.container_port)
        }) {
            out.push(violation(
                OptOut::PortConflict,
                format!(
                    "spec.{list}[{}].ports: container port {} is reserved for moat-proxy; use another port",
                    name(c),
                    p.container_port
                ),
            ));
        }
    }
    for v in spec.volumes.iter().flatten() {
        if [TOKEN_VOLUME, POLICY_VOLUME, RUN_VOLUME].contains(&v.name.as_str()) {
            out.push(violation(
                OptOut::NameConflict,
                format!(
                    "spec.volumes[{}]: the volume name is reserved for Moat; rename it",
                    syntax::shorten(&v.name, 40)
                ),
            ));
        }
    }
    for (list, c) in container_refs(spec) {
        let sc = c.security_context.as_ref();
        if sc.and_then(|s| s.privileged) == Some(true) {
            out.push(violation(
                OptOut::NetAdmin,
                format!(
                    "spec.{list}[{}].securityContext.privileged=true could rewrite the pod's traffic capture; remove it",
                    name(c)
                ),
            ));
        }
        let added = sc
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|caps| caps.add.as_ref());
        for cap in added.into_iter().flatten() {
            let upper = cap.trim().to_ascii_uppercase();
            let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
            if NETWORK_CAPABILITIES.contains(&bare) {
                out.push(violation(
                    OptOut::NetAdmin,
                    format!(
                        "spec.{list}[{}].securityContext.capabilities.add {}: could rewrite or bypass the pod's traffic capture; remove it",
                        name(c),
                        syntax::shorten(cap, 20)
                    ),
                ));
            }
        }
    }
    out.extend(exclusion_violations(meta.annotations.as_ref(), cfg));
    out
}

/// The `moat.dev/skip-*` values outside the allow lists. Malformed values are ignored by the
/// injection (nothing is excluded), so they are not violations.
fn exclusion_violations(
    annotations: Option<&BTreeMap<String, String>>,
    cfg: &Enforcement,
) -> Vec<Violation> {
    let mut out = Vec::new();
    let Some(a) = annotations else {
        return out;
    };
    let ports = [
        (
            annotations::SKIP_INBOUND_PORTS,
            &cfg.skip_inbound_ports,
            "--allow-skip-inbound-ports",
        ),
        (
            annotations::SKIP_OUTBOUND_PORTS,
            &cfg.skip_outbound_ports,
            "--allow-skip-outbound-ports",
        ),
    ];
    for (key, allowed, flag) in ports {
        let Some(Ok(requested)) = a.get(key).map(|v| syntax::parse_ports(v)) else {
            continue;
        };
        let refused: Vec<PortRange> = requested
            .into_iter()
            // 15020 is never redirected anyway.
            .filter(|p| *p != PortRange::single(ADMIN_PORT as u16))
            .filter(|p| !allowed.iter().any(|a| ports_cover(a, p)))
            .collect();
        if !refused.is_empty() {
            out.push(violation(
                OptOut::Exclusions,
                format!(
                    "metadata.annotations[{key}]: {} not in the platform's allow list ({flag}: {}); remove it",
                    syntax::shorten(&syntax::format_list(&refused), 30),
                    allowed_list(allowed)
                ),
            ));
        }
    }
    if let Some(Ok(requested)) = a
        .get(annotations::SKIP_OUTBOUND_CIDRS)
        .map(|v| syntax::parse_cidrs(v))
    {
        let allowed = &cfg.skip_outbound_cidrs;
        let refused: Vec<Cidr> = requested
            .into_iter()
            .filter(|c| !allowed.iter().any(|a| cidr_covers(a, c)))
            .collect();
        if !refused.is_empty() {
            out.push(violation(
                OptOut::Exclusions,
                format!(
                    "metadata.annotations[{}]: {} not in the platform's allow list (--allow-skip-outbound-cidrs: {}); remove it",
                    annotations::SKIP_OUTBOUND_CIDRS,
                    syntax::shorten(&syntax::format_list(&refused), 40),
                    allowed_list(allowed)
                ),
            ));
        }
    }
    out
}

fn allowed_list<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        syntax::shorten(&syntax::format_list(items), 40)
    }
}

/// Whether the pod carries anything only the injector writes: the status annotation or a
/// container named `moat-init`/`moat-proxy`.
pub fn has_moat_parts(pod: &Value) -> bool {
    let annotated = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .is_some_and(|a| a.contains_key(annotations::INJECTED));
    let named = ["/spec/containers", "/spec/initContainers"]
        .iter()
        .filter_map(|p| pod.pointer(p).and_then(Value::as_array))
        .flatten()
        .any(is_moat_container);
    annotated || named
}

fn is_moat_container(c: &Value) -> bool {
    c.get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n == INIT_CONTAINER || n == PROXY_CONTAINER)
}

/// The pod without anything the injector adds (the reverse of the injection): the status
/// annotation, `moat-init` and `moat-proxy`, Moat's volumes, the app containers' mount of the
/// run directory, and the rewritten probes (restored from the removed proxy's
/// `MOAT_APP_PROBES`). Injecting the result gives back exactly what the injector would write,
/// so a pod already injected with the same configuration (an API server re-invocation, an
/// `inject -f` manifest) comes out unchanged, and anything forged is replaced.
pub fn strip(pod: &Value) -> Value {
    let mut out = pod.clone();
    let recorded = recorded_probes(pod);
    if let Some(Value::Object(a)) = out.pointer_mut("/metadata/annotations") {
        a.remove(annotations::INJECTED);
    }
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = out.pointer_mut(&format!("/spec/{list}")) {
            cs.retain(|c| !is_moat_container(c));
        }
    }
    if let Some(Value::Array(vs)) = out.pointer_mut("/spec/volumes") {
        vs.retain(|v| {
            !v.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| [TOKEN_VOLUME, POLICY_VOLUME, RUN_VOLUME].contains(&n))
        });
    }
    if let Some(Value::Array(cs)) = out.pointer_mut("/spec/containers") {
        for c in cs.iter_mut() {
            if let Some(Value::Array(ms)) = c.get_mut("volumeMounts") {
                ms.retain(|m| {
                    !(m.get("name").and_then(Value::as_str) == Some(RUN_VOLUME)
                        && m.get("mountPath").and_then(Value::as_str) == Some(RUN_DIR))
                });
            }
        }
    }
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = out.pointer_mut(&format!("/spec/{list}")) {
            for c in cs.iter_mut() {
                restore_probes(c, &recorded);
            }
        }
    }
    out
}

/// The `MOAT_APP_PROBES` of the pod's `moat-proxy`, if any and readable.
fn recorded_probes(pod: &Value) -> BTreeMap<String, AppProbe> {
    ["/spec/containers", "/spec/initContainers"]
        .iter()
        .filter_map(|p| pod.pointer(p).and_then(Value::as_array))
        .flatten()
        .filter(|c| c.get("name").and_then(Value::as_str) == Some(PROXY_CONTAINER))
        .filter_map(|c| c.get("env").and_then(Value::as_array))
        .flatten()
        .find(|e| e.get("name").and_then(Value::as_str) == Some("MOAT_APP_PROBES"))
        .and_then(|e| e.get("value").and_then(Value::as_str))
        // Written with `$` doubled (see `inject::literal`).
        .and_then(|v| serde_json::from_str(&v.replace("$$", "$")).ok())
        .unwrap_or_default()
}

fn restore_probes(c: &mut Value, recorded: &BTreeMap<String, AppProbe>) {
    let Some(cname) = c.get("name").and_then(Value::as_str).map(str::to_string) else {
        return;
    };
    for (field, kind) in probes::PROBES {
        let Some(probe) = c.get_mut(field).and_then(Value::as_object_mut) else {
            continue;
        };
        let rewritten = serde_json::json!({
            "path": probes::health_path(&cname, kind),
            "port": ADMIN_PORT,
            "scheme": "HTTP",
        });
        if probe.get("httpGet") != Some(&rewritten) {
            continue;
        }
        match recorded.get(&format!("{cname}/{kind}")) {
            Some(AppProbe::Http {
                port,
                path,
                scheme,
                headers,
            }) => {
                let mut h = serde_json::json!({"path": path, "port": port, "scheme": scheme});
                if !headers.is_empty() {
                    h["httpHeaders"] = serde_json::to_value(headers).unwrap_or(Value::Null);
                }
                probe.insert("httpGet".into(), h);
            }
            Some(AppProbe::Tcp { port }) => {
                probe.remove("httpGet");
                probe.insert("tcpSocket".into(), serde_json::json!({"port": port}));
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize as _;
    use serde_json::json;

    fn check(pod: Value, cfg: &Enforcement) -> Vec<(OptOut, String)> {
        let typed = Pod::deserialize(&pod).unwrap();
        let spec = typed.spec.clone().unwrap();
        violations(&typed, &spec, cfg)
            .into_iter()
            .map(|v| (v.what, v.message))
            .collect()
    }

    #[test]
    fn uid_and_gid_at_pod_and_container_level() {
        let found = check(
            json!({"spec": {"securityContext": {"runAsGroup": 7777, "fsGroup": 7777, "supplementalGroups": [1, 7777]},
                   "initContainers": [{"name": "i", "securityContext": {"runAsUser": 7777}}],
                   "containers": [{"name": "a", "securityContext": {"runAsGroup": 1000}}, {"name": "b"}]}}),
            &Enforcement::default(),
        );
        let msgs: Vec<&str> = found.iter().map(|(_, m)| m.as_str()).collect();
        assert!(
            found.iter().all(|(w, _)| *w == OptOut::ProxyUid),
            "{found:?}"
        );
        assert_eq!(
            msgs,
            [
                "spec.initContainers[i].securityContext.runAsUser=7777: container i would run as the proxy's uid/gid and bypass the mesh; use another",
                "spec.securityContext.runAsGroup=7777: container i would run as the proxy's uid/gid and bypass the mesh; use another",
                "spec.securityContext.runAsGroup=7777: container b would run as the proxy's uid/gid and bypass the mesh; use another",
                "spec.securityContext.fsGroup=7777 is the proxy's gid; use another",
                "spec.securityContext.supplementalGroups holds 7777, the proxy's gid; remove it",
            ]
        );
        // A container overriding the pod's value is fine.
        let ok = check(
            json!({"spec": {"securityContext": {"runAsUser": 7777},
                   "containers": [{"name": "a", "securityContext": {"runAsUser": 1000}}]}}),
            &Enforcement::default(),
        );
        assert!(ok.is_empty(), "{ok:?}");
    }

    #[test]
    fn network_capabilities_and_privileged() {
        let found = check(
            json!({"spec": {"containers": [
                {"name": "a", "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE", "cap_net_admin"]}}},
                {"name": "b", "securityContext": {"privileged": true}},
                {"name": "c", "securityContext": {"capabilities": {"add": ["NET_RAW", "ALL"]}}},
                {"name": "d", "securityContext": {"capabilities": {"add": ["CHOWN"], "drop": ["NET_ADMIN"]}}}]}}),
            &Enforcement::default(),
        );
        let who: Vec<String> = found.iter().map(|(_, m)| m[..18].to_string()).collect();
        assert!(found.iter().all(|(w, _)| *w == OptOut::NetAdmin));
        assert_eq!(
            who,
            [
                "spec.containers[a]",
                "spec.containers[b]",
                "spec.containers[c]",
                "spec.containers[c]"
            ]
        );
    }

    #[test]
    fn exclusions_must_lie_inside_the_allow_lists() {
        let cfg = Enforcement {
            skip_inbound_ports: syntax::parse_ports("22,9000-9100").unwrap(),
            skip_outbound_ports: Vec::new(),
            skip_outbound_cidrs: syntax::parse_cidrs("192.168.0.0/16").unwrap(),
            ..Enforcement::default()
        };
        let pod = |a: Value| json!({"metadata": {"annotations": a}, "spec": {"containers": [{"name": "a"}]}});
        assert!(check(
            pod(json!({"moat.dev/skip-inbound-ports": "22,9000-9010,15020",
                       "moat.dev/skip-outbound-cidrs": "192.168.10.0/24"})),
            &cfg
        )
        .is_empty());
        let found = check(
            pod(json!({"moat.dev/skip-inbound-ports": "1-65535",
                       "moat.dev/skip-outbound-ports": "53",
                       "moat.dev/skip-outbound-cidrs": "0.0.0.0/0,::/0,192.168.1.1",
                       "moat.dev/skip-outbound-ports-typo": "1"})),
            &cfg,
        );
        let msgs: Vec<&str> = found.iter().map(|(_, m)| m.as_str()).collect();
        assert_eq!(msgs, [
            "metadata.annotations[moat.dev/skip-inbound-ports]: 1:65535 not in the platform's allow list (--allow-skip-inbound-ports: 22,9000:9100); remove it",
            "metadata.annotations[moat.dev/skip-outbound-ports]: 53 not in the platform's allow list (--allow-skip-outbound-ports: none); remove it",
            "metadata.annotations[moat.dev/skip-outbound-cidrs]: 0.0.0.0/0,::/0 not in the platform's allow list (--allow-skip-outbound-cidrs: 192.168.0.0/16); remove it",
        ]);
        // A malformed value excludes nothing, so it is not refused.
        assert!(check(
            pod(json!({"moat.dev/skip-outbound-cidrs": "everything"})),
            &cfg
        )
        .is_empty());
    }

    #[test]
    fn allowances_by_namespace() {
        let a = |s: &str| Allowance::from_str(s);
        let cfg = Enforcement {
            allow_opt_out: vec![
                a("net-admin").unwrap(),
                a("legacy=inject-disabled,proxy-uid").unwrap(),
            ],
            ..Enforcement::default()
        };
        assert!(cfg.allows(Some("shop"), OptOut::NetAdmin));
        assert!(cfg.allows(None, OptOut::NetAdmin));
        assert!(cfg.allows(Some("legacy"), OptOut::ProxyUid));
        assert!(!cfg.allows(Some("shop"), OptOut::ProxyUid));
        assert!(!cfg.allows(None, OptOut::InjectDisabled));
        assert_eq!(cfg.describe(), "net-admin legacy=inject-disabled,proxy-uid");
        for bad in [
            "",
            "everything",
            "Shop=net-admin",
            "=net-admin",
            "shop=",
            "shop=net-admin,nope",
        ] {
            assert!(a(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Enforcement::default().describe(), "none");
    }

    #[test]
    fn strip_reverses_moat_parts_and_restores_probes() {
        let pod = json!({
            "metadata": {"annotations": {"moat.dev/injected": "{}", "keep": "1"}},
            "spec": {
                "initContainers": [{"name": "moat-init"}, {"name": "moat-proxy", "env": [
                    {"name": "MOAT_APP_PROBES", "value": "{\"app/readiness\":{\"kind\":\"http\",\"port\":8080,\"path\":\"/$$x\",\"scheme\":\"HTTP\",\"headers\":[]},\"app/liveness\":{\"kind\":\"tcp\",\"port\":5432}}"}]}],
                "containers": [{"name": "app",
                    "readinessProbe": {"httpGet": {"path": "/app-health/app/readiness", "port": 15020, "scheme": "HTTP"}, "periodSeconds": 3},
                    "livenessProbe": {"httpGet": {"path": "/app-health/app/liveness", "port": 15020, "scheme": "HTTP"}},
                    "startupProbe": {"httpGet": {"path": "/app-health/app/startup", "port": 15020, "scheme": "HTTP"}},
                    "volumeMounts": [{"name": "data", "mountPath": "/d"}, {"name": "moat-run", "mountPath": "/run/moat", "readOnly": true}]}],
                "volumes": [{"name": "data"}, {"name": "moat-token"}, {"name": "moat-policy"}, {"name": "moat-run"}]}});
        assert!(has_moat_parts(&pod));
        let s = strip(&pod);
        assert!(!has_moat_parts(&s));
        assert_eq!(
            s,
            json!({
                "metadata": {"annotations": {"keep": "1"}},
                "spec": {
                    "initContainers": [],
                    "containers": [{"name": "app",
                        "readinessProbe": {"httpGet": {"path": "/$x", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 3},
                        "livenessProbe": {"tcpSocket": {"port": 5432}},
                        // Not recorded: left as it is.
                        "startupProbe": {"httpGet": {"path": "/app-health/app/startup", "port": 15020, "scheme": "HTTP"}},
                        "volumeMounts": [{"name": "data", "mountPath": "/d"}]}],
                    "volumes": [{"name": "data"}]}})
        );
        assert!(!has_moat_parts(
            &json!({"spec": {"containers": [{"name": "moat"}]}})
        ));
    }
}
