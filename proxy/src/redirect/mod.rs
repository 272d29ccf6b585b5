//! Traffic redirection: the nat-table rules `moat-proxy init` installs in a pod's network
//! namespace so that the app's TCP traffic passes through the sidecar.
//!
//! * Inbound: PREROUTING jumps to `MOAT_INBOUND`, which leaves the excluded ports (always the
//!   admin port 15020) alone and REDIRECTs every other TCP connection to the inbound listener.
//! * Outbound: OUTPUT jumps to `MOAT_OUTBOUND`, which leaves alone the proxy's own traffic
//!   (uid and gid 7777: the loop breaker), loopback (`-o lo`, `127.0.0.0/8` or `::1`), excluded
//!   CIDRs, excluded endpoints (a port to a network only: DNS to the cluster DNS Service) and
//!   excluded ports, and REDIRECTs every other TCP connection to the outbound listener.
//!
//! The rules are generated as `iptables-restore` input by the pure [`rules()`] and applied in
//! one `iptables-restore --noflush` transaction per address family ([`plan`] adds the deletion
//! of jumps left by an earlier run), so a rerun replaces Moat's chains instead of duplicating
//! them and a failure never leaves half a rule set behind.
//!
//! * [`rules`](mod@rules): the rule text for a [`RedirectConfig`], and its verification
//!   against what the kernel holds afterwards: pure, tested without root.
//! * `iptables`: finding and running the iptables programs (backend choice, save, restore,
//!   capabilities).
//! * `init`: `moat-proxy init`: its flags, and the apply-then-verify sequence.

mod init;
mod iptables;
pub mod rules;

use std::fmt;

use moat_core::contract::{INBOUND_PORT, OUTBOUND_PORT, PROXY_GID, PROXY_UID};
pub use moat_core::netaddr::{Cidr, CidrList, List, PortList, PortRange};

pub use init::{apply, ipv6_reachable, run, InitArgs, IptablesMode, Ipv6Mode};
pub use rules::{plan, rules, verify};

/// Chain holding the inbound rules (jumped to from PREROUTING).
pub const INBOUND_CHAIN: &str = "MOAT_INBOUND";
/// Chain holding the outbound rules (jumped to from OUTPUT).
pub const OUTBOUND_CHAIN: &str = "MOAT_OUTBOUND";

/// Why the redirection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    /// A flag value is invalid.
    #[error("invalid {flag}: {reason}")]
    InvalidArgument {
        /// The flag.
        flag: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A required program is missing.
    #[error("{program} not found in PATH ({path}); the init image must ship iptables (nft or legacy), or choose another --iptables-mode")]
    MissingTool {
        /// The program looked for.
        program: String,
        /// The PATH searched.
        path: String,
    },
    /// The process lacks the capabilities to program the nat table.
    #[error("missing capability {0}: run the init container with securityContext.capabilities.add: [NET_ADMIN, NET_RAW] (and runAsUser: 0)")]
    MissingCapability(&'static str),
    /// An iptables program failed.
    #[error("{program} failed ({status}): {stderr}{hint}")]
    ToolFailed {
        /// The program run.
        program: String,
        /// Its exit status.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
        /// Actionable advice when the failure is recognised.
        hint: &'static str,
    },
    /// The rules read back after applying are not the ones applied.
    #[error("verification failed ({family}): {reason}")]
    Verification {
        /// IPv4 or IPv6.
        family: Family,
        /// What is missing or duplicated.
        reason: String,
    },
}

/// Outbound destination ports left alone for one network only, written `CIDR=PORT` or
/// `CIDR=FIRST-LAST` (e.g. `10.96.0.10/32=53`: DNS to the cluster DNS Service, and nowhere
/// else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// Destination network.
    pub cidr: Cidr,
    /// Destination ports.
    pub ports: PortRange,
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (cidr, ports) = s.trim().split_once('=').ok_or_else(|| {
            format!(
                "{:?} is not CIDR=PORT or CIDR=FIRST-LAST (e.g. 10.96.0.10/32=53)",
                moat_core::netaddr::shorten(s.trim(), 45)
            )
        })?;
        Ok(Self {
            cidr: cidr.parse()?,
            ports: ports.parse()?,
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.cidr, self.ports)
    }
}

/// A comma-separated list of [`Endpoint`]s, e.g. `10.96.0.10/32=53,fd00::a/128=53`.
pub type EndpointList = List<Endpoint>;

/// Address family of a rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 (`iptables`).
    V4,
    /// IPv6 (`ip6tables`).
    V6,
}

impl Family {
    /// The family of a network.
    pub fn of(cidr: &Cidr) -> Self {
        if cidr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Everything the rules depend on, for one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Address family the rules are for.
    pub family: Family,
    /// Port of the proxy's inbound listener.
    pub inbound_port: u16,
    /// Port of the proxy's outbound listener.
    pub outbound_port: u16,
    /// The proxy's uid, whose traffic is never redirected.
    pub proxy_uid: u32,
    /// The proxy's gid, whose traffic is never redirected.
    pub proxy_gid: u32,
    /// Inbound ports left alone, in addition to the admin port.
    pub exclude_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports left alone.
    pub exclude_outbound_ports: Vec<PortRange>,
    /// Outbound destinations left alone (only those of `family` are used).
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// Outbound ports left alone for one network only (only those of `family` are used).
    pub exclude_outbound_endpoints: Vec<Endpoint>,
}

impl RedirectConfig {
    /// Moat's defaults (inbound 15006, outbound 15001, proxy 7777:7777, no exclusions).
    pub fn new(family: Family) -> Self {
        Self {
            family,
            inbound_port: INBOUND_PORT,
            outbound_port: OUTBOUND_PORT,
            proxy_uid: PROXY_UID,
            proxy_gid: PROXY_GID,
            exclude_inbound_ports: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            exclude_outbound_cidrs: Vec::new(),
            exclude_outbound_endpoints: Vec::new(),
        }
    }
}
