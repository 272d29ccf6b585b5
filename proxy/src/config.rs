//! `moat-proxy run` configuration: every flag has an environment variable (the injector sets
//! those) and a default. Values are parsed into types here, once; the data path trusts them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use moat_core::client::KeyAlgorithm;
use moat_core::spiffe::{SpiffeId, TrustDomain};
use moat_core::telemetry::LogFormat;

use moat_core::netaddr::{Cidr, HostPort, PortRange};

use crate::limits::ConnLimits;

fn duration(s: &str) -> Result<Duration, String> {
    moat_core::duration::parse(s)
}

/// An explicit route, for running without iptables (local demo, benchmarks, VMs):
/// `listen=ADDR,connect=ADDR,port=N[,identity=SPIFFE_ID]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Plaintext listener for the local app.
    pub listen: SocketAddr,
    /// The peer sidecar's inbound address.
    pub connect: SocketAddr,
    /// App port on the peer.
    pub port: u16,
    /// Identity the peer must prove (any identity of the trust domain when absent).
    pub identity: Option<SpiffeId>,
}

impl FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut listen, mut connect, mut port, mut identity) = (None, None, None, None);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("route {s:?}: {part:?} is not key=value"))?;
            let bad = |what: &str| format!("route {s:?}: invalid {what} {v:?}");
            match k {
                "listen" => listen = Some(v.parse().map_err(|_| bad("listen address"))?),
                "connect" => connect = Some(v.parse().map_err(|_| bad("connect address"))?),
                "port" => {
                    port = Some(
                        v.parse::<u16>()
                            .ok()
                            .filter(|p| *p != 0)
                            .ok_or_else(|| bad("port"))?,
                    )
                }
                "identity" => {
                    identity = Some(SpiffeId::parse(v).map_err(|e| format!("route {s:?}: {e}"))?)
                }
                other => {
                    return Err(format!(
                        "route {s:?}: unknown key {other:?} (use listen, connect, port, identity)"
                    ))
                }
            }
        }
        let need = |what| {
            format!("route {s:?}: missing {what}= (format: listen=ADDR,connect=ADDR,port=N[,identity=SPIFFE_ID])")
        };
        Ok(Self {
            listen: listen.ok_or_else(|| need("listen"))?,
            connect: connect.ok_or_else(|| need("connect"))?,
            port: port.ok_or_else(|| need("port"))?,
            identity,
        })
    }
}

/// A static expected identity for a destination: `IP[:PORT]=SPIFFE_ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Destination IP.
    pub ip: IpAddr,
    /// Destination port (any port when absent).
    pub port: Option<u16>,
    /// The identity it must prove.
    pub id: SpiffeId,
}

impl FromStr for PeerIdentity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (dst, id) = s
            .split_once('=')
            .ok_or_else(|| format!("peer identity {s:?}: expected IP[:PORT]=SPIFFE_ID"))?;
        let id = SpiffeId::parse(id.trim()).map_err(|e| format!("peer identity {s:?}: {e}"))?;
        let dst = dst.trim();
        if let Ok(sa) = dst.parse::<SocketAddr>() {
            return Ok(Self {
                ip: sa.ip(),
                port: Some(sa.port()),
                id,
            });
        }
        let ip = dst
            .trim_matches(['[', ']'])
            .parse()
            .map_err(|_| format!("peer identity {s:?}: {dst:?} is not an IP or IP:PORT"))?;
        Ok(Self { ip, port: None, id })
    }
}

/// A listener address, or `off` (or empty) for no listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOrOff(pub Option<SocketAddr>);

fn listen_or_off(s: &str) -> Result<ListenOrOff, String> {
    match s {
        "off" | "" => Ok(ListenOrOff(None)),
        s => s
            .parse()
            .map(|a| ListenOrOff(Some(a)))
            .map_err(|_| format!("{s:?} is not ADDR:PORT or 'off'")),
    }
}

/// Flags of `moat-proxy run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Trust domain of this mesh.
    #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,
    /// Namespace of this pod (downward API).
    #[arg(long, env = "MOAT_POD_NAMESPACE")]
    pub namespace: String,
    /// Service account of this pod (downward API).
    #[arg(long, env = "MOAT_SERVICE_ACCOUNT")]
    pub service_account: String,
    /// Pod name (downward API), named in the start-up and ready logs.
    #[arg(long, env = "MOAT_POD_NAME", default_value = "")]
    pub pod_name: String,
    /// Pod IP (downward API `status.podIP`), named in the ready log next to the identity, so
    /// an address in a peer's log can be traced to this pod and identity.
    #[arg(long, env = "MOAT_POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// The CA's URL.
    #[arg(
        long,
        env = "MOAT_CA_URL",
        default_value = "https://moat-ca.moat-system.svc:8443"
    )]
    pub ca_url: http::Uri,
    /// Projected service-account token (audience moat-ca), re-read for every request.
    #[arg(
        long,
        env = "MOAT_TOKEN_FILE",
        default_value = "/var/run/secrets/moat/token"
    )]
    pub token_file: PathBuf,
    /// Trust bundle file (PEM roots), watched for changes.
    #[arg(long, env = "MOAT_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// Trust bundle as PEM text (bootstrap value written by the injector).
    #[arg(long, env = "MOAT_TRUST_BUNDLE_PEM", hide_env_values = true)]
    pub trust_bundle_pem: Option<String>,
    /// Authorization policy file; when it does not exist the built-in policy applies (any
    /// identity of this trust domain, no unauthenticated callers).
    #[arg(
        long,
        env = "MOAT_POLICY",
        default_value = "/etc/moat/policy/policy.yaml"
    )]
    pub policy: PathBuf,
    /// Inbound listener (captured traffic into the pod, and peer sidecars).
    #[arg(long, env = "MOAT_INBOUND_LISTEN", default_value = "0.0.0.0:15006")]
    pub inbound_listen: SocketAddr,
    /// Transparent outbound listener (captured traffic from the app); `off` to disable.
    #[arg(long, env = "MOAT_OUTBOUND_LISTEN", default_value = "127.0.0.1:15001", value_parser = listen_or_off)]
    pub outbound_listen: ListenOrOff,
    /// Admin listener: /metrics, /ready, /live, /identity, POST /shutdown, /app-health/...
    #[arg(long, env = "MOAT_ADMIN_LISTEN", default_value = "0.0.0.0:15020")]
    pub admin_listen: SocketAddr,
    /// Networks whose destinations must be reached over mTLS (comma-separated CIDRs).
    #[arg(long, env = "MOAT_MESH_NETWORKS", value_delimiter = ',')]
    pub mesh_networks: Vec<Cidr>,
    /// Service networks (Service CIDRs outside the mesh networks, comma-separated): a cluster
    /// IP there is resolved through discovery and balanced over the Service's endpoints, as
    /// cluster IPs inside the mesh networks already are. Needs `--destination-addr`.
    #[arg(long, env = "MOAT_SERVICE_NETWORKS", value_delimiter = ',')]
    pub service_networks: Vec<Cidr>,
    /// The discovery service (`moat-destination`, `host:port`). With it, every mesh
    /// destination's identity is pinned from discovery and a destination it does not know is
    /// refused (`unknown_destination`). Without it, a mesh destination without
    /// `--peer-identity` accepts any identity of the trust domain (logged at start-up).
    #[arg(long, env = "MOAT_DESTINATION_ADDR")]
    pub destination_addr: Option<HostPort>,
    /// How long a connection to a destination never resolved waits for discovery's first
    /// answer before it is refused.
    #[arg(long, env = "MOAT_DISCOVERY_WAIT", default_value = "2s", value_parser = duration)]
    pub discovery_wait: Duration,
    /// Destinations outside the mesh allowed in plaintext (comma-separated CIDRs). Default:
    /// none — egress fails closed.
    #[arg(long, env = "MOAT_EGRESS_ALLOW", value_delimiter = ',')]
    pub allow_egress: Vec<Cidr>,
    /// Expected identities of destinations: `IP[:PORT]=SPIFFE_ID` (repeatable, or comma-separated).
    #[arg(
        long = "peer-identity",
        env = "MOAT_PEER_IDENTITIES",
        value_delimiter = ','
    )]
    pub peer_identities: Vec<PeerIdentity>,
    /// Explicit routes: `listen=ADDR,connect=ADDR,port=N[,identity=ID]` (repeatable;
    /// `;`-separated in the env var).
    #[arg(long = "route", env = "MOAT_ROUTES", value_delimiter = ';')]
    pub routes: Vec<Route>,
    /// Forward inbound traffic to this IP instead of the original destination (explicit-route
    /// mode without iptables). Peers reach only `--inbound-ports` there.
    #[arg(long, env = "MOAT_INBOUND_TARGET")]
    pub inbound_target: Option<IpAddr>,
    /// Explicit-route mode: the only app ports a peer's stream may open on `--inbound-target`
    /// (comma-separated ports or ranges; none by default, so nothing is reachable). Without
    /// iptables there is no original destination to pin a stream to, so this list is the
    /// whole of what peers can reach.
    #[arg(long, env = "MOAT_INBOUND_PORTS", value_delimiter = ',')]
    pub inbound_ports: Vec<PortRange>,
    /// Local control socket for state-changing admin actions (`POST /shutdown`); never served
    /// on a TCP port. The injector puts it in the pod's shared `moat-run` volume.
    #[arg(long, env = "MOAT_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// The node's IP (downward API `status.hostIP`): kubelet probes of `/app-health/` are
    /// accepted from it, from the pod's default gateways and from loopback only.
    #[arg(long, env = "MOAT_HOST_IP", value_delimiter = ',')]
    pub host_ip: Vec<IpAddr>,
    /// More networks allowed to call `/app-health/` (comma-separated CIDRs), for CNIs whose
    /// kubelet traffic comes from neither the node IP nor the pod's gateway.
    #[arg(long, env = "MOAT_PROBE_ALLOW", value_delimiter = ',')]
    pub probe_allow: Vec<Cidr>,
    /// Networks allowed to scrape `/metrics` (comma-separated CIDRs; default: anyone). The
    /// namespace policy's `admin.metricsFrom` narrows it further.
    #[arg(long, env = "MOAT_METRICS_ALLOW", value_delimiter = ',')]
    pub metrics_allow: Vec<Cidr>,
    /// Original app probes rewritten by the injector (JSON), served on /app-health/.
    #[arg(long, env = "MOAT_APP_PROBES")]
    pub app_probes: Option<String>,
    /// How long to wait for a caller's first bytes before treating the stream as opaque.
    #[arg(long, env = "MOAT_DETECT_TIMEOUT", default_value = "3s", value_parser = duration)]
    pub detect_timeout: Duration,
    /// Deadline for an mTLS handshake.
    #[arg(long, env = "MOAT_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub handshake_timeout: Duration,
    /// Deadline for connecting to an app or peer.
    #[arg(long, env = "MOAT_CONNECT_TIMEOUT", default_value = "5s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// How long an idle pooled connection to a peer sidecar is kept (client side).
    #[arg(long, env = "MOAT_POOL_IDLE_TIMEOUT", default_value = "30s", value_parser = duration)]
    pub pool_idle_timeout: Duration,
    /// How long the server side keeps an idle tunnel (longer than any client's pool timeout).
    #[arg(long, env = "MOAT_TUNNEL_IDLE_TIMEOUT", default_value = "90s", value_parser = duration)]
    pub tunnel_idle_timeout: Duration,
    /// TCP keepalive idle time on sockets to and from other hosts (peer sidecars, egress).
    #[arg(long, env = "MOAT_TCP_KEEPALIVE", default_value = "60s", value_parser = duration)]
    pub keepalive: Duration,
    /// App ports never sniffed for HTTP: always proxied as opaque bytes (databases, brokers,
    /// anything whose first bytes could look like HTTP). Comma-separated.
    #[arg(long, env = "MOAT_OPAQUE_PORTS", value_delimiter = ',')]
    pub opaque_ports: Vec<u16>,
    /// Maximum concurrent proxied connections, inbound and outbound together (each direction
    /// gets half unless set below). Default: derived from the container's memory limit (cgroup
    /// `memory.max`) so the limit is reached before the OOM killer; 20000 without a limit.
    #[arg(long, env = "MOAT_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(2..))]
    pub max_connections: Option<u32>,
    /// Maximum concurrent inbound connections (peers and plaintext callers).
    #[arg(long, env = "MOAT_MAX_INBOUND_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inbound_connections: Option<u32>,
    /// Maximum concurrent outbound connections (the app's own calls): an inbound flood can
    /// never take these.
    #[arg(long, env = "MOAT_MAX_OUTBOUND_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_outbound_connections: Option<u32>,
    /// Maximum concurrent inbound connections from one source IP. Default: a quarter of the
    /// inbound budget (at least 32).
    #[arg(long, env = "MOAT_MAX_CONNECTIONS_PER_SOURCE", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_source: Option<u32>,
    /// Idle pooled connections kept per destination.
    #[arg(long, env = "MOAT_POOL_MAX_IDLE", default_value_t = 64)]
    pub pool_max_idle: usize,
    /// After SIGTERM, keep accepting this long (the app may still be finishing).
    #[arg(long, env = "MOAT_DRAIN_DELAY", default_value = "5s", value_parser = duration)]
    pub drain_delay: Duration,
    /// After accepting stops, how long in-flight connections may take.
    #[arg(long, env = "MOAT_SHUTDOWN_GRACE", default_value = "20s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// Threads proxying traffic. 1 (the default) runs everything on one thread, which is the
    /// cheapest for a sidecar; raise it for pods that move more than one core can.
    #[arg(long, env = "MOAT_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
    /// Certificate key algorithm.
    #[arg(long, env = "MOAT_KEY_ALGORITHM", value_enum, default_value_t = KeyAlgorithm::EcdsaP256)]
    pub key_algorithm: KeyAlgorithm,
    /// Log format: auto (JSON unless on a terminal), json or pretty.
    #[arg(long, env = "MOAT_LOG_FORMAT", default_value = "auto")]
    pub log_format: LogFormat,
    /// Log filter, e.g. info or moat_proxy=debug.
    #[arg(long, env = "MOAT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Validated configuration used by the data path.
#[derive(Debug, Clone)]
pub struct Config {
    /// This workload's identity.
    pub identity: SpiffeId,
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Inbound listener.
    pub inbound_listen: SocketAddr,
    /// Transparent outbound listener.
    pub outbound_listen: Option<SocketAddr>,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Mesh networks.
    pub mesh_networks: Vec<Cidr>,
    /// Plaintext egress allowed to these.
    pub allow_egress: Vec<Cidr>,
    /// Service networks (cluster IPs resolved through discovery).
    pub service_networks: Vec<Cidr>,
    /// The discovery service, when configured.
    pub destination_addr: Option<HostPort>,
    /// See [`RunArgs::discovery_wait`].
    pub discovery_wait: Duration,
    peer_by_addr: HashMap<SocketAddr, SpiffeId>,
    peer_by_ip: HashMap<IpAddr, SpiffeId>,
    /// Explicit routes.
    pub routes: Vec<Route>,
    /// Inbound forwarding target override.
    pub inbound_target: Option<IpAddr>,
    /// Ports peers may open in explicit-route mode.
    pub inbound_ports: Vec<PortRange>,
    /// Local control socket.
    pub admin_socket: Option<PathBuf>,
    /// Who may call `/app-health/` besides loopback: the node and extra networks.
    pub probe_allow: Vec<Cidr>,
    /// Who may scrape `/metrics` (empty: anyone).
    pub metrics_allow: Vec<Cidr>,
    /// Connection budgets.
    pub limits: ConnLimits,
    /// See [`RunArgs::detect_timeout`].
    pub detect_timeout: Duration,
    /// See [`RunArgs::handshake_timeout`].
    pub handshake_timeout: Duration,
    /// See [`RunArgs::connect_timeout`].
    pub connect_timeout: Duration,
    /// See [`RunArgs::pool_idle_timeout`].
    pub pool_idle_timeout: Duration,
    /// See [`RunArgs::tunnel_idle_timeout`].
    pub tunnel_idle_timeout: Duration,
    /// See [`RunArgs::keepalive`].
    pub keepalive: Duration,
    /// See [`RunArgs::opaque_ports`].
    pub opaque_ports: Vec<u16>,
    /// See [`RunArgs::pool_max_idle`].
    pub pool_max_idle: usize,
    /// See [`RunArgs::drain_delay`].
    pub drain_delay: Duration,
    /// See [`RunArgs::shutdown_grace`].
    pub shutdown_grace: Duration,
}

/// Why the flags do not make a usable configuration: each says which flags and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Namespace and service account do not form a SPIFFE ID.
    #[error("namespace {namespace:?} / service account {service_account:?} do not form a valid identity")]
    Identity {
        /// `--namespace`.
        namespace: String,
        /// `--service-account`.
        service_account: String,
        /// Why.
        #[source]
        source: moat_core::spiffe::SpiffeIdError,
    },
    /// Neither trust bundle flag is set.
    #[error("no trust bundle: set MOAT_TRUST_BUNDLE (file) or MOAT_TRUST_BUNDLE_PEM")]
    NoTrustBundle,
    /// A timeout of zero.
    #[error("timeouts must be greater than zero")]
    ZeroTimeout,
    /// Clients would hold idle tunnels longer than servers keep them.
    #[error("--pool-idle-timeout ({pool}) must be shorter than --tunnel-idle-timeout ({tunnel}) so clients let go of idle tunnels first")]
    PoolOutlivesTunnel {
        /// `--pool-idle-timeout`.
        pool: String,
        /// `--tunnel-idle-timeout`.
        tunnel: String,
    },
    /// Service networks without discovery.
    #[error("--service-networks needs --destination-addr: a cluster IP can only be sent to its Service's endpoints once discovery says which they are")]
    ServiceNetworksWithoutDiscovery,
    /// `--inbound-ports` outside route mode.
    #[error("--inbound-ports only applies with --inbound-target; with iptables a stream reaches exactly the port its caller dialed")]
    InboundPortsWithoutTarget,
    /// `--inbound-ports` would expose one of the proxy's own listeners.
    #[error("--inbound-ports includes port {0}, one of the proxy's own listeners: peers must never reach the proxy itself")]
    InboundPortsIncludeProxy(u16),
}

impl Config {
    /// Validates the flags.
    pub fn from_args(a: &RunArgs) -> Result<Self, ConfigError> {
        let identity = SpiffeId::workload(&a.trust_domain, &a.namespace, &a.service_account)
            .map_err(|source| ConfigError::Identity {
                namespace: a.namespace.clone(),
                service_account: a.service_account.clone(),
                source,
            })?;
        let outbound_listen = a.outbound_listen.0;
        if a.trust_bundle.is_none() && a.trust_bundle_pem.is_none() {
            return Err(ConfigError::NoTrustBundle);
        }
        let mut peer_by_addr = HashMap::new();
        let mut peer_by_ip = HashMap::new();
        for p in &a.peer_identities {
            match p.port {
                Some(port) => peer_by_addr.insert(SocketAddr::new(p.ip, port), p.id.clone()),
                None => peer_by_ip.insert(p.ip, p.id.clone()),
            };
        }
        for t in [a.detect_timeout, a.handshake_timeout, a.connect_timeout] {
            if t.is_zero() {
                return Err(ConfigError::ZeroTimeout);
            }
        }
        if a.pool_idle_timeout >= a.tunnel_idle_timeout {
            return Err(ConfigError::PoolOutlivesTunnel {
                pool: moat_core::duration::format(a.pool_idle_timeout),
                tunnel: moat_core::duration::format(a.tunnel_idle_timeout),
            });
        }
        if !a.service_networks.is_empty() && a.destination_addr.is_none() {
            return Err(ConfigError::ServiceNetworksWithoutDiscovery);
        }
        if a.inbound_target.is_none() && !a.inbound_ports.is_empty() {
            return Err(ConfigError::InboundPortsWithoutTarget);
        }
        if let Some(p) = own_ports(a, outbound_listen)
            .into_iter()
            .find(|p| a.inbound_ports.iter().any(|r| r.contains(*p)))
        {
            return Err(ConfigError::InboundPortsIncludeProxy(p));
        }
        let probe_allow = a
            .host_ip
            .iter()
            .map(|ip| Cidr::host(*ip))
            .chain(a.probe_allow.iter().copied())
            .collect();
        let limits = ConnLimits::resolve(a, crate::limits::memory_limit());
        Ok(Self {
            identity,
            trust_domain: a.trust_domain.clone(),
            inbound_listen: a.inbound_listen,
            outbound_listen,
            admin_listen: a.admin_listen,
            mesh_networks: a.mesh_networks.clone(),
            allow_egress: a.allow_egress.clone(),
            service_networks: a.service_networks.clone(),
            destination_addr: a.destination_addr.clone(),
            discovery_wait: a.discovery_wait,
            peer_by_addr,
            peer_by_ip,
            routes: a.routes.clone(),
            inbound_target: a.inbound_target,
            inbound_ports: a.inbound_ports.clone(),
            admin_socket: a.admin_socket.clone(),
            probe_allow,
            metrics_allow: a.metrics_allow.clone(),
            limits,
            detect_timeout: a.detect_timeout,
            handshake_timeout: a.handshake_timeout,
            connect_timeout: a.connect_timeout,
            pool_idle_timeout: a.pool_idle_timeout,
            tunnel_idle_timeout: a.tunnel_idle_timeout,
            keepalive: a.keepalive,
            opaque_ports: a.opaque_ports.clone(),
            pool_max_idle: a.pool_max_idle,
            drain_delay: a.drain_delay,
            shutdown_grace: a.shutdown_grace,
        })
    }

    /// Whether `port` is one of the proxy's own listener ports (or Moat's standard ones): a
    /// peer's stream must never be sent there.
    pub fn is_proxy_port(&self, port: u16) -> bool {
        moat_core::contract::PROXY_PORTS.contains(&port)
            || self.inbound_listen.port() == port
            || self.outbound_listen.is_some_and(|l| l.port() == port)
            || self.admin_listen.port() == port
            || self.routes.iter().any(|r| r.listen.port() == port)
    }

    /// Whether explicit-route mode exposes app port `port` to peers.
    pub fn exposes(&self, port: u16) -> bool {
        self.inbound_ports.iter().any(|r| r.contains(port))
    }

    /// Whether traffic to app port `port` skips HTTP detection.
    pub fn is_opaque(&self, port: u16) -> bool {
        self.opaque_ports.contains(&port)
    }

    /// The identity a destination must prove, when configured.
    pub fn expected_identity(&self, dst: SocketAddr) -> Option<SpiffeId> {
        self.peer_by_addr
            .get(&dst)
            .or_else(|| self.peer_by_ip.get(&dst.ip()))
            .cloned()
    }

    /// Whether `dst` is one of our own listeners (a connection there would loop).
    pub fn is_own_listener(&self, dst: SocketAddr) -> bool {
        let ours = |l: SocketAddr| {
            l.port() == dst.port()
                && (l.ip().is_unspecified() || l.ip() == dst.ip() || dst.ip().is_loopback())
        };
        ours(self.inbound_listen)
            || self.outbound_listen.is_some_and(ours)
            || ours(self.admin_listen)
    }
}

/// Every port this proxy listens on, from its flags.
fn own_ports(a: &RunArgs, outbound: Option<SocketAddr>) -> Vec<u16> {
    let mut ports = moat_core::contract::PROXY_PORTS.to_vec();
    ports.extend([a.inbound_listen.port(), a.admin_listen.port()]);
    ports.extend(outbound.map(|o| o.port()));
    ports.extend(a.routes.iter().map(|r| r.listen.port()));
    ports
}

/// `moat-proxy run` flags of a test pod (shop/api, a bundle given) plus `extra`, for unit tests.
#[cfg(test)]
pub(crate) fn test_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }
    let base = [
        "moat-proxy",
        "--namespace",
        "shop",
        "--service-account",
        "api",
        "--trust-bundle-pem",
        "unused",
    ];
    Cli::try_parse_from(base.iter().chain(extra)).map(|c| c.run)
}

/// A validated [`Config`] from [`test_args`] plus `extra` flags.
#[cfg(test)]
pub(crate) fn test_config(extra: &[&str]) -> Config {
    let args = test_args(extra).expect("test flags parse");
    Config::from_args(&args).expect("test flags validate")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_and_listeners_are_checked_by_the_parser() {
        let parse = test_args;
        let a = parse(&[]).unwrap();
        // The defaults are the pod contract the injector and `moat-proxy init` rely on.
        use moat_core::contract::{ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT};
        assert_eq!(a.inbound_listen.port(), INBOUND_PORT);
        assert_eq!(a.admin_listen.port(), ADMIN_PORT);
        assert_eq!(a.outbound_listen.0.map(|l| l.port()), Some(OUTBOUND_PORT));
        assert_eq!(a.key_algorithm, KeyAlgorithm::EcdsaP256);
        assert_eq!(
            a.outbound_listen,
            ListenOrOff(Some("127.0.0.1:15001".parse().unwrap()))
        );
        let a = parse(&["--key-algorithm", "ed25519", "--outbound-listen", "off"]).unwrap();
        assert_eq!(a.key_algorithm, KeyAlgorithm::Ed25519);
        assert_eq!(a.outbound_listen, ListenOrOff(None));
        let err = parse(&["--key-algorithm", "rsa"]).unwrap_err().to_string();
        assert!(
            err.contains("ecdsa-p256") && err.contains("ed25519"),
            "{err}"
        );
        let err = parse(&["--outbound-listen", "15001"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not ADDR:PORT or 'off'"), "{err}");
    }

    #[test]
    fn connection_budgets_follow_the_memory_limit_and_the_flags() {
        let args = |extra: &[&str]| test_args(extra).unwrap();
        // 256 MiB: (256 - 24) MiB / 64 KiB = 3712 connections, half each way.
        let l = ConnLimits::resolve(&args(&[]), Some(256 << 20));
        assert_eq!((l.inbound, l.outbound, l.per_source), (1856, 1856, 464));
        // No limit: the fixed default.
        let l = ConnLimits::resolve(&args(&[]), None);
        assert_eq!((l.inbound, l.outbound), (10_000, 10_000));
        // A tiny limit still leaves a usable floor.
        let l = ConnLimits::resolve(&args(&[]), Some(16 << 20));
        assert_eq!((l.inbound, l.outbound, l.per_source), (32, 32, 32));
        let l = ConnLimits::resolve(
            &args(&[
                "--max-connections",
                "100",
                "--max-outbound-connections",
                "7",
                "--max-connections-per-source",
                "500",
            ]),
            Some(256 << 20),
        );
        assert_eq!((l.inbound, l.outbound, l.per_source), (50, 7, 50));
        for bad in [
            &["--max-connections", "1"][..],
            &["--max-inbound-connections", "0"],
            &["--max-connections-per-source", "-3"],
        ] {
            assert!(test_args(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn inbound_ports_never_include_the_proxy_itself() {
        let parse = |extra: &[&str]| Config::from_args(&test_args(extra).unwrap());
        let err = parse(&[
            "--inbound-target",
            "127.0.0.1",
            "--inbound-ports",
            "8000-16000",
        ])
        .unwrap_err();
        assert!(
            matches!(err, ConfigError::InboundPortsIncludeProxy(15001)),
            "{err}"
        );
        let err = parse(&["--inbound-ports", "8080"]).unwrap_err();
        assert!(err.to_string().contains("--inbound-target"), "{err}");
        let cfg = parse(&[
            "--inbound-target",
            "127.0.0.1",
            "--inbound-ports",
            "8080,9000-9001",
        ])
        .unwrap();
        assert!(cfg.exposes(8080) && cfg.exposes(9001) && !cfg.exposes(9002));
    }

    #[test]
    fn parses_routes_and_peer_identities() {
        let r: Route =
            "listen=127.0.0.1:8080,connect=10.0.0.2:15006,port=80,identity=spiffe://td/ns/a/sa/b"
                .parse()
                .unwrap();
        assert_eq!(r.port, 80);
        assert_eq!(r.identity.unwrap().as_str(), "spiffe://td/ns/a/sa/b");
        for bad in [
            "listen=127.0.0.1:8080,connect=10.0.0.2:15006",
            "listen=x,connect=10.0.0.2:15006,port=80",
            "listen=127.0.0.1:8080,connect=10.0.0.2:15006,port=0",
            "listen=127.0.0.1:8080,connect=10.0.0.2:15006,port=80,color=red",
            "listen=127.0.0.1:8080,connect=10.0.0.2:15006,port=80,identity=http://x",
        ] {
            assert!(bad.parse::<Route>().is_err(), "{bad}");
        }
        let p: PeerIdentity = "10.0.0.5:8080=spiffe://td/ns/a/sa/b".parse().unwrap();
        assert_eq!(p.port, Some(8080));
        let p: PeerIdentity = "fd00::5=spiffe://td/ns/a/sa/b".parse().unwrap();
        assert_eq!(p.port, None);
        assert!("10.0.0.5".parse::<PeerIdentity>().is_err());
    }
}
