//! Injection configuration: the flags shared by `serve` and `inject`, and the values pinned in
//! `docs/interfaces.md` (ports, uid, paths, names) that the injected pod and the proxy agree on.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use moat_core::contract;
use moat_core::netaddr::HostPort;
use moat_core::TrustBundle;
use moat_core::TrustDomain;

use crate::enforce::{Enforcement, EnforcementArgs};
use crate::syntax::{self, Cidr, CidrList, PortRange};

/// This injector's version, recorded in the `moat.dev/injected` annotation.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Default image of the sidecar and init containers.
pub const DEFAULT_PROXY_IMAGE: &str =
    concat!("ghcr.io/moat-mesh/moat-proxy:", env!("CARGO_PKG_VERSION"));
/// Default CA URL written into sidecars.
pub const DEFAULT_CA_URL: &str = "https://moat-ca.moat-system.svc:8443";
/// Default trust bundle file.
pub const DEFAULT_TRUST_BUNDLE: &str = "/var/run/moat/trust/bundle.pem";
/// Default discovery service written into sidecars (deploy/destination/).
pub const DEFAULT_DESTINATION_ADDR: &str = "moat-destination.moat-system.svc:8086";

// The pod contract, in the integer types of the Kubernetes API (lossless widening).
/// uid of the sidecar proxy ([`contract::PROXY_UID`]); the redirection rules exempt it.
pub const PROXY_UID: i64 = contract::PROXY_UID as i64;
/// gid of the sidecar proxy ([`contract::PROXY_GID`]); the redirection rules exempt it.
pub const PROXY_GID: i64 = contract::PROXY_GID as i64;
/// Proxy admin port ([`contract::ADMIN_PORT`]): `/ready`, `/live`, `/app-health/...`; never
/// redirected.
pub const ADMIN_PORT: i32 = contract::ADMIN_PORT as i32;
/// Proxy inbound listener ([`contract::INBOUND_PORT`]).
pub const INBOUND_PORT: i32 = contract::INBOUND_PORT as i32;
/// Proxy outbound listener ([`contract::OUTBOUND_PORT`]).
pub const OUTBOUND_PORT: i32 = contract::OUTBOUND_PORT as i32;
/// The shared run directory ([`contract::RUN_DIR`]): read-write in the sidecar (its admin
/// socket), read-only in the app containers.
pub const RUN_DIR: &str = contract::RUN_DIR;
/// DNS port: outbound TCP to the cluster DNS addresses is not captured unless
/// `--capture-dns-tcp` (cluster DNS is not in the mesh).
pub const DNS_PORT: u16 = 53;
/// Where the injector finds its own resolver, the default cluster DNS address.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";
/// Name of the admin port on the sidecar.
pub const ADMIN_PORT_NAME: &str = "moat-admin";

/// Init container programming the redirection.
pub const INIT_CONTAINER: &str = "moat-init";
/// The sidecar container's name.
pub use moat_core::contract::PROXY_CONTAINER;
/// Projected service-account token volume (audience `moat-ca`).
pub const TOKEN_VOLUME: &str = "moat-token";
/// Optional authorization policy ConfigMap volume.
pub const POLICY_VOLUME: &str = "moat-policy";
/// The pod's shared in-memory volume: `/run` of the init container (xtables lock), the
/// sidecar's run directory (admin socket) and, read-only, the app containers'.
pub const RUN_VOLUME: &str = "moat-run";
/// Where the token volume is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/moat";
/// The token file inside it.
pub const TOKEN_FILE: &str = "/var/run/secrets/moat/token";
/// Audience of the projected token.
pub const TOKEN_AUDIENCE: &str = "moat-ca";
/// Lifetime requested for the projected token.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Name of the policy ConfigMap in the pod's namespace.
pub const POLICY_CONFIGMAP: &str = "moat-policy";
/// Where the policy volume is mounted.
pub const POLICY_DIR: &str = "/etc/moat/policy";
/// The policy file inside it.
pub const POLICY_FILE: &str = "/etc/moat/policy/policy.yaml";
/// Moat's control-plane namespace.
pub const CONTROL_PLANE_NAMESPACE: &str = "moat-system";
/// Namespaces never injected, whatever their labels (mirrors the webhook's namespaceSelector).
pub const IGNORED_NAMESPACES: [&str; 4] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    CONTROL_PLANE_NAMESPACE,
];

/// Where the sidecar goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SidecarMode {
    /// Init container with `restartPolicy: Always` (Kubernetes >= 1.29), started before any
    /// other init container.
    Native,
    /// Regular container appended to `containers`; the redirection init container runs last.
    Classic,
}

impl SidecarMode {
    /// The name used in flags, annotations and the status annotation.
    pub fn as_str(&self) -> &'static str {
        match self {
            SidecarMode::Native => "native",
            SidecarMode::Classic => "classic",
        }
    }
}

/// What to do when the injector itself fails on a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureMode {
    /// Admit the pod unmodified, with a warning.
    Open,
    /// Refuse the pod.
    Closed,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The trust bundle file cannot be read.
    #[error("cannot read trust bundle {path}: {source} (pass --trust-bundle FILE: the PEM roots of moat-ca, e.g. ConfigMap moat-system/moat-trust-bundle key bundle.pem)")]
    BundleRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The trust bundle is not a PEM bundle of CA certificates.
    #[error("trust bundle {path} is invalid: {reason}")]
    BundleInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Injection flags, shared by `moat-injector serve` and `moat-injector inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// Image of the sidecar and init containers.
    #[arg(long, env = "MOAT_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE, value_parser = parse_image)]
    pub proxy_image: String,
    /// Trust domain written into sidecars.
    #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,
    /// CA URL written into sidecars.
    #[arg(long, env = "MOAT_CA_URL", default_value = DEFAULT_CA_URL, value_parser = parse_https_url)]
    pub ca_url: String,
    /// Trust bundle (PEM) written into sidecars as MOAT_TRUST_BUNDLE_PEM (bootstrap).
    #[arg(long, env = "MOAT_TRUST_BUNDLE", default_value = DEFAULT_TRUST_BUNDLE)]
    pub trust_bundle: PathBuf,
    /// Pod CIDRs (comma-separated) whose destinations sidecars reach over mTLS.
    #[arg(long, env = "MOAT_MESH_NETWORKS", default_value = "10.0.0.0/8", value_parser = parse_mesh_networks)]
    pub mesh_networks: CidrList,
    /// Service CIDRs outside --mesh-networks (comma-separated), written into sidecars: their
    /// cluster IPs are resolved through discovery and balanced over the Service's endpoints,
    /// as cluster IPs inside the mesh networks already are. Default: none.
    #[arg(long, env = "MOAT_SERVICE_NETWORKS", default_value = "", value_parser = CidrList::from_str)]
    pub service_networks: CidrList,
    /// The discovery service (`host:port`) written into sidecars, which pin every mesh
    /// destination's identity from it. `off`: none, and sidecars accept any identity of the
    /// trust domain at destinations without an explicit one (logged by each sidecar).
    #[arg(long, env = "MOAT_DESTINATION_ADDR", default_value = DEFAULT_DESTINATION_ADDR, value_parser = parse_destination_addr)]
    pub destination_addr: DestinationAddr,
    /// Default sidecar layout: native (init container with restartPolicy Always) or classic.
    #[arg(long, value_enum, default_value_t = SidecarMode::Native)]
    pub sidecar_mode: SidecarMode,
    /// Address of the Kubernetes API server's Service, never captured in injected pods (unless
    /// --capture-api-server). Kubernetes sets KUBERNETES_SERVICE_HOST in every pod; a value
    /// that is not an IP address is ignored.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST", value_name = "IP")]
    pub api_server_ip: Option<String>,
    /// Capture the pods' traffic to the Kubernetes API server too. By default its address
    /// (--api-server-ip) is excluded from redirection: the API server is not in the mesh, and
    /// captured it would be refused (egress fails closed) or sent to mTLS (mesh networks).
    #[arg(long)]
    pub capture_api_server: bool,
    /// Capture outbound TCP port 53 to the cluster DNS addresses too. By default DNS over TCP
    /// to those addresses (and only to them) is excluded from redirection: cluster DNS
    /// (kube-system) is not in the mesh.
    #[arg(long)]
    pub capture_dns_tcp: bool,
    /// Cluster DNS Service address whose TCP port 53 is not captured (repeatable). Default: the
    /// nameservers of --resolv-conf that are IP addresses (in a pod: the cluster DNS Service).
    #[arg(long, value_name = "IP", action = clap::ArgAction::Append)]
    pub cluster_dns_ip: Vec<IpAddr>,
    /// resolv.conf whose nameservers are the default --cluster-dns-ip.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_RESOLV_CONF)]
    pub resolv_conf: PathBuf,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub enforcement: EnforcementArgs,
}

fn parse_image(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 512 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{s:?} is not a container image reference"));
    }
    Ok(s.to_string())
}

fn parse_https_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(format!("{s:?} must be https://host[:port]"));
    }
    Ok(s.to_string())
}

/// `--destination-addr`: `host:port`, or `off`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationAddr(pub Option<HostPort>);

fn parse_destination_addr(s: &str) -> Result<DestinationAddr, String> {
    match s {
        "off" => Ok(DestinationAddr(None)),
        s => s
            .parse()
            .map(|a| DestinationAddr(Some(a)))
            .map_err(|e| format!("{e} (or off)")),
    }
}

fn parse_mesh_networks(s: &str) -> Result<CidrList, String> {
    let list: CidrList = s.parse()?;
    if list.0.is_empty() {
        return Err("at least one CIDR is required".into());
    }
    Ok(list)
}

/// The API server address as found in `KUBERNETES_SERVICE_HOST` (`10.96.0.1`, `fd00::1`,
/// `[fd00::1]`); `None` when it is not an IP address.
fn api_server_address(host: &str) -> Option<IpAddr> {
    let host = host.trim();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.parse().ok()
}

impl ConfigArgs {
    /// Outbound networks no injected pod captures: the API server's address (a /32 or /128),
    /// unless `--capture-api-server`.
    pub fn skip_outbound_cidrs(&self) -> Vec<Cidr> {
        if self.capture_api_server {
            return Vec::new();
        }
        match self
            .api_server_ip
            .as_deref()
            .filter(|h| !h.trim().is_empty())
        {
            None => Vec::new(),
            Some(host) => match api_server_address(host) {
                Some(ip) => vec![Cidr::host(ip)],
                None => {
                    tracing::warn!(
                        api_server = %syntax::shorten(host, 60),
                        "the API server address is not an IP; its traffic is not excluded from capture (set --api-server-ip)"
                    );
                    Vec::new()
                }
            },
        }
    }

    /// The cluster DNS addresses: `--cluster-dns-ip`, else the IP nameservers of
    /// `--resolv-conf` (loopback ones are a local stub resolver, not the cluster's: ignored).
    pub fn cluster_dns(&self) -> Vec<IpAddr> {
        if !self.cluster_dns_ip.is_empty() {
            return self.cluster_dns_ip.clone();
        }
        let text = match std::fs::read_to_string(&self.resolv_conf) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %self.resolv_conf.display(), error = %e, "cannot read resolv.conf; no cluster DNS address known (set --cluster-dns-ip), DNS over TCP will be captured");
                return Vec::new();
            }
        };
        let ips = nameservers(&text);
        if ips.is_empty() {
            tracing::warn!(path = %self.resolv_conf.display(), "no usable nameserver IP in resolv.conf; DNS over TCP will be captured (set --cluster-dns-ip)");
        }
        ips
    }

    /// Outbound endpoints no injected pod captures: TCP port 53 of each cluster DNS address,
    /// unless `--capture-dns-tcp`. Only those destinations: port 53 elsewhere is captured.
    pub fn skip_outbound_endpoints(&self) -> Vec<(Cidr, PortRange)> {
        if self.capture_dns_tcp {
            return Vec::new();
        }
        self.cluster_dns()
            .into_iter()
            .map(|ip| (Cidr::host(ip), PortRange::single(DNS_PORT)))
            .collect()
    }

    /// Reads the trust bundle and builds the configuration.
    pub fn load(&self) -> Result<InjectConfig, ConfigError> {
        let pem = read_bundle(&self.trust_bundle)?;
        Ok(InjectConfig {
            proxy_image: self.proxy_image.clone(),
            trust_domain: self.trust_domain.clone(),
            ca_url: self.ca_url.clone(),
            trust_bundle_pem: pem,
            mesh_networks: self.mesh_networks.0.clone(),
            service_networks: self.service_networks.0.clone(),
            destination_addr: self.destination_addr.0.clone(),
            sidecar_mode: self.sidecar_mode,
            skip_outbound_cidrs: self.skip_outbound_cidrs(),
            skip_outbound_endpoints: self.skip_outbound_endpoints(),
            enforcement: self.enforcement.policy(),
        })
    }
}

/// The IP nameservers of a resolv.conf, loopback ones left out (a stub resolver such as
/// systemd-resolved's 127.0.0.53 is never the cluster DNS, and loopback is not captured).
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in resolv_conf.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        // An IPv6 nameserver may carry a zone (`fe80::1%eth0`): not a cluster address.
        if let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
            if !ip.is_loopback() && !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// Reads and validates a PEM trust bundle, returning it normalised.
pub fn read_bundle(path: &Path) -> Result<String, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::BundleRead {
        path: path.to_path_buf(),
        source,
    })?;
    parse_bundle(path, &bytes)
}

/// Validates PEM trust bundle bytes read from `path`, returning them normalised.
pub fn parse_bundle(path: &Path, bytes: &[u8]) -> Result<String, ConfigError> {
    TrustBundle::from_pem(bytes)
        .map(|b| b.to_pem())
        .map_err(|e| ConfigError::BundleInvalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Everything the injection of one pod depends on besides the pod itself.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// Image of the sidecar and init containers.
    pub proxy_image: String,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// CA URL.
    pub ca_url: String,
    /// Trust bundle PEM written into sidecars.
    pub trust_bundle_pem: String,
    /// Pod CIDRs.
    pub mesh_networks: Vec<Cidr>,
    /// Service CIDRs the sidecars balance themselves.
    pub service_networks: Vec<Cidr>,
    /// The discovery service, when sidecars use one.
    pub destination_addr: Option<HostPort>,
    /// Default sidecar layout.
    pub sidecar_mode: SidecarMode,
    /// Outbound networks every pod leaves uncaptured (before its own annotation's).
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Outbound (network, ports) every pod leaves uncaptured: DNS to the cluster DNS.
    pub skip_outbound_endpoints: Vec<(Cidr, PortRange)>,
    /// What enforcing namespaces allow tenants to opt out of.
    pub enforcement: Enforcement,
}

impl InjectConfig {
    /// The mesh networks as written into `MOAT_MESH_NETWORKS`.
    pub fn mesh_networks_env(&self) -> String {
        syntax::format_list(&self.mesh_networks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cfg: ConfigArgs,
    }

    #[test]
    fn defaults_match_the_pinned_interface() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(cli.cfg.proxy_image, "ghcr.io/moat-mesh/moat-proxy:0.1.0");
        assert_eq!(cli.cfg.trust_domain.as_str(), "cluster.local");
        assert_eq!(cli.cfg.ca_url, "https://moat-ca.moat-system.svc:8443");
        assert_eq!(cli.cfg.trust_bundle, PathBuf::from(DEFAULT_TRUST_BUNDLE));
        assert_eq!(cli.cfg.mesh_networks.to_string(), "10.0.0.0/8");
        assert_eq!(cli.cfg.sidecar_mode, SidecarMode::Native);
        assert_eq!(
            cli.cfg.destination_addr.0.as_ref().map(HostPort::as_str),
            Some(DEFAULT_DESTINATION_ADDR)
        );
        assert!(cli.cfg.service_networks.0.is_empty());
        assert_eq!(cli.cfg.resolv_conf, PathBuf::from("/etc/resolv.conf"));
        assert_eq!(cli.cfg.enforcement.policy(), Enforcement::default());
    }

    #[test]
    fn dns_is_excluded_only_for_the_cluster_dns_addresses() {
        let endpoints = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            cli.cfg
                .skip_outbound_endpoints()
                .iter()
                .map(|(c, p)| format!("{c}={p}"))
                .collect::<Vec<_>>()
        };
        let dir = std::env::temp_dir().join(format!("moat-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let resolv = dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            "search shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver 127.0.0.53\nnameserver fd00:10:96::a\noptions ndots:5\n",
        )
        .unwrap();
        let r = resolv.to_str().unwrap();
        assert_eq!(
            endpoints(&["x", "--resolv-conf", r]),
            ["10.96.0.10/32=53", "fd00:10:96::a/128=53"]
        );
        assert_eq!(
            endpoints(&[
                "x",
                "--resolv-conf",
                r,
                "--cluster-dns-ip",
                "10.0.0.10",
                "--cluster-dns-ip",
                "10.0.0.11"
            ]),
            ["10.0.0.10/32=53", "10.0.0.11/32=53"]
        );
        assert!(endpoints(&["x", "--resolv-conf", r, "--capture-dns-tcp"]).is_empty());
        assert!(endpoints(&["x", "--resolv-conf", "/nonexistent/resolv.conf"]).is_empty());
        assert!(Cli::try_parse_from(["x", "--cluster-dns-ip", "kube-dns"]).is_err());
        assert_eq!(
            nameservers("nameserver 127.0.0.11\nnameserver ::1\n"),
            Vec::<IpAddr>::new()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn api_server_and_dns_are_not_captured_by_default() {
        let skipped = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            syntax::format_list(&cli.cfg.skip_outbound_cidrs())
        };
        let ip = "--api-server-ip";
        assert_eq!(skipped(&["x", ip, "10.96.0.1"]), "10.96.0.1/32");
        assert_eq!(skipped(&["x", ip, "fd00:10:96::1"]), "fd00:10:96::1/128");
        assert_eq!(skipped(&["x", ip, "[fd00::1]"]), "fd00::1/128");
        assert_eq!(skipped(&["x", ip, "10.96.0.1", "--capture-api-server"]), "");
        assert_eq!(skipped(&["x", ip, "kubernetes.default.svc"]), "");
        assert_eq!(skipped(&["x", ip, ""]), "");
    }

    #[test]
    fn discovery_can_be_turned_off_and_service_networks_set() {
        let cli = Cli::try_parse_from([
            "x",
            "--destination-addr",
            "off",
            "--service-networks",
            "10.96.0.0/12,fd00:10:96::/112",
        ])
        .unwrap();
        assert_eq!(cli.cfg.destination_addr, DestinationAddr(None));
        assert_eq!(
            cli.cfg.service_networks.to_string(),
            "10.96.0.0/12,fd00:10:96::/112"
        );
        let cli = Cli::try_parse_from(["x", "--destination-addr", "10.0.0.5:8086"]).unwrap();
        assert_eq!(
            cli.cfg.destination_addr.0.as_ref().map(HostPort::as_str),
            Some("10.0.0.5:8086")
        );
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            vec!["x", "--ca-url", "http://moat-ca:8443"],
            vec!["x", "--ca-url", "not a url"],
            vec!["x", "--mesh-networks", "10.0.0.0/99"],
            vec!["x", "--mesh-networks", ""],
            vec!["x", "--trust-domain", "Not A Domain"],
            vec!["x", "--proxy-image", "a b"],
            vec!["x", "--sidecar-mode", "sometimes"],
            vec!["x", "--destination-addr", "moat-destination"],
            vec!["x", "--destination-addr", "moat-destination:0"],
            vec!["x", "--destination-addr", ":8086"],
            vec!["x", "--destination-addr", "a b:8086"],
            vec!["x", "--service-networks", "10.96.0.0/33"],
        ] {
            assert!(Cli::try_parse_from(&args).is_err(), "{args:?} accepted");
        }
    }

    #[test]
    fn missing_bundle_names_the_file_and_the_fix() {
        let e = read_bundle(Path::new("/nonexistent/bundle.pem")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/nonexistent/bundle.pem"), "{msg}");
        assert!(msg.contains("--trust-bundle"), "{msg}");
        let e = parse_bundle(Path::new("x.pem"), b"not pem").unwrap_err();
        assert!(matches!(e, ConfigError::BundleInvalid { .. }));
    }
}
