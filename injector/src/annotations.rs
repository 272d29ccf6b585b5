//! The `moat.dev/` pod annotations: opt-in/opt-out and per-pod tuning of the injected sidecar.
//!
//! Every value is validated. A malformed value never produces a broken pod: the annotation is
//! ignored (or the whole resource group falls back to the defaults) and an admission warning
//! says so. Unknown `moat.dev/` annotations are warned about too (typos would otherwise be
//! silently ignored).

use std::collections::BTreeMap;

use crate::config::{InjectConfig, SidecarMode};
use crate::syntax::{self, Cidr, PortRange};

/// Prefix of every Moat annotation and label.
pub const PREFIX: &str = "moat.dev/";
/// Label or annotation `enabled`/`disabled`: pod opt-in or opt-out.
pub const INJECT: &str = "moat.dev/inject";
/// Status annotation written on injected pods.
pub const INJECTED: &str = "moat.dev/injected";
/// Extra inbound ports not redirected to the proxy.
pub const SKIP_INBOUND_PORTS: &str = "moat.dev/skip-inbound-ports";
/// Outbound destination ports not redirected to the proxy.
pub const SKIP_OUTBOUND_PORTS: &str = "moat.dev/skip-outbound-ports";
/// Outbound destination CIDRs not redirected to the proxy.
pub const SKIP_OUTBOUND_CIDRS: &str = "moat.dev/skip-outbound-cidrs";
/// Sidecar CPU request.
pub const PROXY_CPU_REQUEST: &str = "moat.dev/proxy-cpu-request";
/// Sidecar CPU limit.
pub const PROXY_CPU_LIMIT: &str = "moat.dev/proxy-cpu-limit";
/// Sidecar memory request.
pub const PROXY_MEMORY_REQUEST: &str = "moat.dev/proxy-memory-request";
/// Sidecar memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "moat.dev/proxy-memory-limit";
/// Sidecar log filter (`MOAT_LOG_LEVEL`).
pub const LOG_LEVEL: &str = "moat.dev/log-level";
/// `native` or `classic` sidecar layout.
pub const SIDECAR_MODE: &str = "moat.dev/sidecar-mode";

/// Every annotation the injector understands.
pub const KNOWN: [&str; 11] = [
    INJECT,
    INJECTED,
    SKIP_INBOUND_PORTS,
    SKIP_OUTBOUND_PORTS,
    SKIP_OUTBOUND_CIDRS,
    PROXY_CPU_REQUEST,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_REQUEST,
    PROXY_MEMORY_LIMIT,
    LOG_LEVEL,
    SIDECAR_MODE,
];

/// Default sidecar CPU request.
pub const DEFAULT_CPU_REQUEST: &str = "50m";
/// Default sidecar CPU limit.
pub const DEFAULT_CPU_LIMIT: &str = "1";
/// Default sidecar memory request.
pub const DEFAULT_MEMORY_REQUEST: &str = "32Mi";
/// Default sidecar memory limit.
pub const DEFAULT_MEMORY_LIMIT: &str = "256Mi";
/// Default sidecar log filter.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// Longest admission warning Kubernetes recommends.
pub const MAX_WARNING: usize = 120;

/// Makes an admission warning of at most [`MAX_WARNING`] characters.
pub fn warning(msg: impl AsRef<str>) -> String {
    syntax::shorten(msg.as_ref(), MAX_WARNING)
}

/// What the pod itself says about injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodChoice {
    /// `moat.dev/inject: enabled` (label or annotation).
    Enabled,
    /// `moat.dev/inject: disabled` (label or annotation): never inject.
    Disabled,
    /// Not set (or an unknown value, which is warned about).
    Unset,
}

/// Reads the pod's own opt-in/opt-out. `disabled` in either the label or the annotation wins.
pub fn pod_choice(
    labels: Option<&BTreeMap<String, String>>,
    annotations: Option<&BTreeMap<String, String>>,
    warnings: &mut Vec<String>,
) -> PodChoice {
    let mut choice = PodChoice::Unset;
    for (source, map) in [("label", labels), ("annotation", annotations)] {
        match map.and_then(|m| m.get(INJECT)).map(String::as_str) {
            None => {}
            Some("disabled") => return PodChoice::Disabled,
            Some("enabled") => choice = PodChoice::Enabled,
            Some(other) => warnings.push(warning(format!(
                "{source} {INJECT}={} ignored: use enabled or disabled",
                syntax::shorten(other, 20)
            ))),
        }
    }
    choice
}

/// Sidecar resources, as Kubernetes quantities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyResources {
    /// CPU request.
    pub cpu_request: String,
    /// CPU limit.
    pub cpu_limit: String,
    /// Memory request.
    pub memory_request: String,
    /// Memory limit.
    pub memory_limit: String,
}

impl Default for ProxyResources {
    fn default() -> Self {
        Self {
            cpu_request: DEFAULT_CPU_REQUEST.into(),
            cpu_limit: DEFAULT_CPU_LIMIT.into(),
            memory_request: DEFAULT_MEMORY_REQUEST.into(),
            memory_limit: DEFAULT_MEMORY_LIMIT.into(),
        }
    }
}

/// The per-pod settings, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// Extra inbound ports left alone by the redirection.
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound ports left alone by the redirection.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound CIDRs left alone by the redirection.
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Outbound ports left alone for one network only (DNS to the cluster DNS).
    pub skip_outbound_endpoints: Vec<(Cidr, PortRange)>,
    /// Sidecar resources.
    pub resources: ProxyResources,
    /// Sidecar log filter.
    pub log_level: String,
    /// Sidecar layout.
    pub sidecar_mode: SidecarMode,
}

/// Appends the items of `more` not in `list` yet.
fn extend_new<T: PartialEq>(list: &mut Vec<T>, more: Vec<T>) {
    for item in more {
        if !list.contains(&item) {
            list.push(item);
        }
    }
}

/// Reads the tuning annotations; invalid values are ignored with a warning. The outbound skips
/// add to the configuration's (`--api-server-ip`; DNS is an endpoint exclusion).
pub fn tuning(
    annotations: Option<&BTreeMap<String, String>>,
    cfg: &InjectConfig,
    warnings: &mut Vec<String>,
) -> Tuning {
    let empty = BTreeMap::new();
    let a = annotations.unwrap_or(&empty);
    let mut t = Tuning {
        skip_inbound_ports: Vec::new(),
        skip_outbound_ports: Vec::new(),
        skip_outbound_cidrs: cfg.skip_outbound_cidrs.clone(),
        skip_outbound_endpoints: cfg.skip_outbound_endpoints.clone(),
        resources: ProxyResources::default(),
        log_level: DEFAULT_LOG_LEVEL.into(),
        sidecar_mode: cfg.sidecar_mode,
    };
    let mut ignored = |key: &str, why: String| {
        warnings.push(warning(format!("{key} ignored: {why}")));
    };

    for key in a.keys().filter(|k| k.starts_with(PREFIX)) {
        if !KNOWN.contains(&key.as_str()) {
            ignored(key, "unknown moat.dev annotation".into());
        }
    }
    if let Some(v) = a.get(SKIP_INBOUND_PORTS) {
        match syntax::parse_ports(v) {
            Ok(p) => t.skip_inbound_ports = p,
            Err(e) => ignored(SKIP_INBOUND_PORTS, e),
        }
    }
    if let Some(v) = a.get(SKIP_OUTBOUND_PORTS) {
        match syntax::parse_ports(v) {
            Ok(p) => extend_new(&mut t.skip_outbound_ports, p),
            Err(e) => ignored(SKIP_OUTBOUND_PORTS, e),
        }
    }
    if let Some(v) = a.get(SKIP_OUTBOUND_CIDRS) {
        match syntax::parse_cidrs(v) {
            Ok(c) => extend_new(&mut t.skip_outbound_cidrs, c),
            Err(e) => ignored(SKIP_OUTBOUND_CIDRS, e),
        }
    }
    if let Some(v) = a.get(LOG_LEVEL) {
        match syntax::validate_log_level(v) {
            Ok(()) => t.log_level = v.clone(),
            Err(e) => ignored(LOG_LEVEL, e),
        }
    }
    if let Some(v) = a.get(SIDECAR_MODE) {
        match v.as_str() {
            "native" => t.sidecar_mode = SidecarMode::Native,
            "classic" => t.sidecar_mode = SidecarMode::Classic,
            other => ignored(
                SIDECAR_MODE,
                format!("{} is not native or classic", syntax::shorten(other, 20)),
            ),
        }
    }

    // Resources: per resource (cpu, memory), both values must parse and request <= limit,
    // otherwise that resource keeps its defaults (a request above the limit is refused by the
    // API server, which would block the pod).
    let defaults = ProxyResources::default();
    for (req_key, lim_key, default_req, default_lim, is_cpu) in [
        (
            PROXY_CPU_REQUEST,
            PROXY_CPU_LIMIT,
            &defaults.cpu_request,
            &defaults.cpu_limit,
            true,
        ),
        (
            PROXY_MEMORY_REQUEST,
            PROXY_MEMORY_LIMIT,
            &defaults.memory_request,
            &defaults.memory_limit,
            false,
        ),
    ] {
        let mut bad = false;
        let mut value = |key: &str, default: &String| -> (String, f64) {
            let fallback = (
                default.clone(),
                syntax::parse_quantity(default).unwrap_or(0.0),
            );
            match a.get(key) {
                None => fallback,
                Some(v) => match syntax::parse_quantity(v) {
                    Ok(q) if q > 0.0 => (v.trim().to_string(), q),
                    Ok(_) => {
                        warnings.push(warning(format!("{key} ignored: must be positive")));
                        bad = true;
                        fallback
                    }
                    Err(e) => {
                        warnings.push(warning(format!("{key} ignored: {e}")));
                        bad = true;
                        fallback
                    }
                },
            }
        };
        let (req, req_q) = value(req_key, default_req);
        let (lim, lim_q) = value(lim_key, default_lim);
        let (req, lim) = if bad {
            warnings.push(warning(format!(
                "proxy {} resources use the defaults",
                if is_cpu { "cpu" } else { "memory" }
            )));
            (default_req.clone(), default_lim.clone())
        } else if req_q > lim_q {
            warnings.push(warning(format!(
                "{req_key} {} exceeds limit {}; defaults used",
                syntax::shorten(&req, 15),
                syntax::shorten(&lim, 15)
            )));
            (default_req.clone(), default_lim.clone())
        } else {
            (req, lim)
        };
        if is_cpu {
            t.resources.cpu_request = req;
            t.resources.cpu_limit = lim;
        } else {
            t.resources.memory_request = req;
            t.resources.memory_limit = lim;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InjectConfig {
        InjectConfig {
            proxy_image: "img".into(),
            trust_domain: moat_core::TrustDomain::new("cluster.local").unwrap(),
            ca_url: "https://ca".into(),
            trust_bundle_pem: String::new(),
            mesh_networks: vec![],
            service_networks: vec![],
            destination_addr: None,
            sidecar_mode: SidecarMode::Native,
            skip_outbound_cidrs: vec![],
            skip_outbound_endpoints: vec![],
            enforcement: Default::default(),
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn choice_disabled_wins_and_bad_values_warn() {
        let mut w = Vec::new();
        let l = map(&[(INJECT, "enabled")]);
        let a = map(&[(INJECT, "disabled")]);
        assert_eq!(pod_choice(Some(&l), Some(&a), &mut w), PodChoice::Disabled);
        assert_eq!(pod_choice(Some(&l), None, &mut w), PodChoice::Enabled);
        assert_eq!(pod_choice(None, None, &mut w), PodChoice::Unset);
        assert!(w.is_empty());
        let odd = map(&[(INJECT, "true")]);
        assert_eq!(pod_choice(Some(&odd), None, &mut w), PodChoice::Unset);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("use enabled or disabled"), "{w:?}");
    }

    #[test]
    fn defaults_without_annotations() {
        let mut w = Vec::new();
        let t = tuning(None, &cfg(), &mut w);
        assert!(w.is_empty());
        assert_eq!(t.resources, ProxyResources::default());
        assert_eq!(t.log_level, "info");
        assert_eq!(t.sidecar_mode, SidecarMode::Native);
    }

    #[test]
    fn valid_annotations_apply() {
        let a = map(&[
            (SKIP_INBOUND_PORTS, "22,8000-8010"),
            (SKIP_OUTBOUND_PORTS, "5432"),
            (SKIP_OUTBOUND_CIDRS, "10.96.0.1/32,fd00::/8"),
            (PROXY_CPU_REQUEST, "100m"),
            (PROXY_CPU_LIMIT, "2"),
            (PROXY_MEMORY_REQUEST, "64Mi"),
            (PROXY_MEMORY_LIMIT, "1Gi"),
            (LOG_LEVEL, "info,moat_proxy=debug"),
            (SIDECAR_MODE, "classic"),
        ]);
        let mut w = Vec::new();
        let t = tuning(Some(&a), &cfg(), &mut w);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(syntax::format_list(&t.skip_inbound_ports), "22,8000:8010");
        assert_eq!(
            syntax::format_list(&t.skip_outbound_cidrs),
            "10.96.0.1/32,fd00::/8"
        );
        assert_eq!(t.resources.cpu_limit, "2");
        assert_eq!(t.resources.memory_limit, "1Gi");
        assert_eq!(t.log_level, "info,moat_proxy=debug");
        assert_eq!(t.sidecar_mode, SidecarMode::Classic);
    }

    #[test]
    fn outbound_skips_add_to_the_configured_ones() {
        let mut c = cfg();
        c.skip_outbound_cidrs = syntax::parse_cidrs("10.96.0.1").unwrap();
        let mut w = Vec::new();
        let t = tuning(None, &c, &mut w);
        assert_eq!(syntax::format_list(&t.skip_outbound_ports), "");
        assert_eq!(syntax::format_list(&t.skip_outbound_cidrs), "10.96.0.1/32");
        let a = map(&[
            (SKIP_OUTBOUND_PORTS, "5432,53"),
            (SKIP_OUTBOUND_CIDRS, "fd00::/8,10.96.0.1/32"),
        ]);
        let t = tuning(Some(&a), &c, &mut w);
        assert_eq!(syntax::format_list(&t.skip_outbound_ports), "5432,53");
        assert_eq!(
            syntax::format_list(&t.skip_outbound_cidrs),
            "10.96.0.1/32,fd00::/8"
        );
        let bad = map(&[(SKIP_OUTBOUND_PORTS, "dns")]);
        let t = tuning(Some(&bad), &c, &mut w);
        assert_eq!(syntax::format_list(&t.skip_outbound_ports), "");
        assert_eq!(w.len(), 1, "{w:?}");
    }

    #[test]
    fn malformed_values_fall_back_with_short_warnings() {
        let a = map(&[
            (SKIP_INBOUND_PORTS, "22,http"),
            (SKIP_OUTBOUND_CIDRS, "10.0.0.0/99"),
            (PROXY_CPU_REQUEST, "lots"),
            (PROXY_MEMORY_REQUEST, "2Gi"),
            (LOG_LEVEL, "chatty"),
            (SIDECAR_MODE, "sometimes"),
            ("moat.dev/proxy-cpu", "1"),
        ]);
        let mut w = Vec::new();
        let t = tuning(Some(&a), &cfg(), &mut w);
        assert!(t.skip_inbound_ports.is_empty());
        assert!(t.skip_outbound_cidrs.is_empty());
        assert_eq!(t.resources, ProxyResources::default());
        assert_eq!(t.log_level, "info");
        assert_eq!(t.sidecar_mode, SidecarMode::Native);
        let all = w.join("\n");
        for expected in [
            "moat.dev/proxy-cpu ignored: unknown moat.dev annotation",
            "moat.dev/skip-inbound-ports ignored",
            "moat.dev/skip-outbound-cidrs ignored",
            "moat.dev/proxy-cpu-request ignored",
            "proxy cpu resources use the defaults",
            "moat.dev/proxy-memory-request 2Gi exceeds limit 256Mi; defaults used",
            "moat.dev/log-level ignored",
            "moat.dev/sidecar-mode ignored",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert!(w.iter().all(|m| m.chars().count() <= MAX_WARNING), "{w:?}");
    }

    #[test]
    fn long_values_are_cut_in_warnings() {
        let long = "x".repeat(500);
        let a = map(&[
            (SKIP_OUTBOUND_PORTS, long.as_str()),
            (LOG_LEVEL, long.as_str()),
        ]);
        let mut w = Vec::new();
        tuning(Some(&a), &cfg(), &mut w);
        assert_eq!(w.len(), 2);
        assert!(w.iter().all(|m| m.chars().count() <= MAX_WARNING), "{w:?}");
    }
}
