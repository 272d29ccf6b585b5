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
//! The rules are generated as `iptables-restore` input by the pure [`rules`] and applied in
//! one `iptables-restore --noflush` transaction per address family ([`plan`] adds the deletion
//! of jumps left by an earlier run), so a rerun replaces Moat's chains instead of duplicating
//! them and a failure never leaves half a rule set behind.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use moat_core::contract::{ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, PROXY_GID, PROXY_UID};
pub use moat_core::netaddr::{Cidr, CidrList, List, PortList, PortRange};

/// Chain holding the inbound rules (jumped to from PREROUTING).
pub const INBOUND_CHAIN: &str = "MOAT_INBOUND";
/// Chain holding the outbound rules (jumped to from OUTPUT).
pub const OUTBOUND_CHAIN: &str = "MOAT_OUTBOUND";

/// Ports or ranges per `-m multiport` rule (the kernel accepts 15, a range counts twice).
const MULTIPORT_SLOTS: usize = 15;

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

/// The jump from a built-in chain into one of Moat's chains.
fn jumps() -> [(&'static str, String); 2] {
    [
        (
            "PREROUTING",
            format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"),
        ),
        ("OUTPUT", format!("-A OUTPUT -p tcp -j {OUTBOUND_CHAIN}")),
    ]
}

/// Multiport slots a port entry takes.
fn slots(p: &PortRange) -> usize {
    if p.first == p.last {
        1
    } else {
        2
    }
}

/// Groups ports into `-m multiport` sized batches.
fn multiport_batches(ports: &[PortRange]) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    let mut used = 0;
    for p in ports {
        if used + slots(p) > MULTIPORT_SLOTS {
            out.push(cur.join(","));
            cur.clear();
            used = 0;
        }
        used += slots(p);
        cur.push(p.to_string());
    }
    if !cur.is_empty() {
        out.push(cur.join(","));
    }
    out
}

/// Removes duplicates, keeping the first occurrence.
fn dedup<T: PartialEq + Clone>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// The rule lines of Moat's own chains (`-A MOAT_...`), in `iptables-save` form.
fn chain_rules(cfg: &RedirectConfig) -> Vec<String> {
    let mut r = Vec::new();
    let inbound_excluded = dedup(
        std::iter::once(PortRange::single(ADMIN_PORT))
            .chain(cfg.exclude_inbound_ports.iter().copied()),
    );
    for batch in multiport_batches(&inbound_excluded) {
        r.push(format!(
            "-A {INBOUND_CHAIN} -p tcp -m multiport --dports {batch} -j RETURN"
        ));
    }
    r.push(format!(
        "-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        cfg.inbound_port
    ));

    r.push(format!(
        "-A {OUTBOUND_CHAIN} -m owner --uid-owner {} -j RETURN",
        cfg.proxy_uid
    ));
    r.push(format!(
        "-A {OUTBOUND_CHAIN} -m owner --gid-owner {} -j RETURN",
        cfg.proxy_gid
    ));
    r.push(format!("-A {OUTBOUND_CHAIN} -o lo -j RETURN"));
    let loopback = match cfg.family {
        Family::V4 => "127.0.0.0/8",
        Family::V6 => "::1/128",
    };
    r.push(format!("-A {OUTBOUND_CHAIN} -d {loopback} -j RETURN"));
    for cidr in dedup(
        cfg.exclude_outbound_cidrs
            .iter()
            .copied()
            .filter(|c| Family::of(c) == cfg.family),
    ) {
        r.push(format!("-A {OUTBOUND_CHAIN} -d {cidr} -j RETURN"));
    }
    for e in dedup(
        cfg.exclude_outbound_endpoints
            .iter()
            .copied()
            .filter(|e| Family::of(&e.cidr) == cfg.family),
    ) {
        // Written as iptables-save prints it (the implicit `-m tcp`), so `verify` matches.
        r.push(format!(
            "-A {OUTBOUND_CHAIN} -d {} -p tcp -m tcp --dport {} -j RETURN",
            e.cidr, e.ports
        ));
    }
    for batch in multiport_batches(&dedup(cfg.exclude_outbound_ports.iter().copied())) {
        r.push(format!(
            "-A {OUTBOUND_CHAIN} -p tcp -m multiport --dports {batch} -j RETURN"
        ));
    }
    r.push(format!(
        "-A {OUTBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}",
        cfg.outbound_port
    ));
    r
}

/// The complete `iptables-restore --noflush` input for a namespace that has no Moat rules yet:
/// declares (creating or flushing) Moat's chains, fills them, and jumps to them.
pub fn rules(cfg: &RedirectConfig) -> String {
    plan(cfg, "")
}

/// Like [`rules`], for a namespace whose current nat table is `current_save`
/// (`iptables-save -t nat` output): jumps into Moat's chains left by an earlier run are deleted
/// in the same transaction, so the result always has exactly one jump per built-in chain.
pub fn plan(cfg: &RedirectConfig, current_save: &str) -> String {
    let mut out = String::from("*nat\n");
    out.push_str(&format!(":{INBOUND_CHAIN} - [0:0]\n"));
    out.push_str(&format!(":{OUTBOUND_CHAIN} - [0:0]\n"));
    for line in existing_jumps(current_save) {
        out.push_str(&line.replacen("-A ", "-D ", 1));
        out.push('\n');
    }
    for line in chain_rules(cfg) {
        out.push_str(&line);
        out.push('\n');
    }
    for (_, jump) in jumps() {
        out.push_str(&jump);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

/// Rules of the nat table's built-in chains that jump to one of Moat's chains.
fn existing_jumps(save: &str) -> Vec<&str> {
    nat_lines(save)
        .filter(|l| {
            (l.starts_with("-A PREROUTING ") || l.starts_with("-A OUTPUT "))
                && l.split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w[0] == "-j" && (w[1] == INBOUND_CHAIN || w[1] == OUTBOUND_CHAIN))
        })
        .collect()
}

/// The lines of the `*nat` section of an `iptables-save` output.
fn nat_lines(save: &str) -> impl Iterator<Item = &str> {
    let mut in_nat = false;
    save.lines().map(str::trim).filter(move |l| {
        if l.starts_with('*') {
            in_nat = *l == "*nat";
            return false;
        }
        if *l == "COMMIT" {
            in_nat = false;
            return false;
        }
        in_nat
    })
}

/// Checks that `save` (`iptables-save -t nat` after applying) holds exactly Moat's rules for
/// `cfg`: both chains with the expected content, and one jump to each.
pub fn verify(cfg: &RedirectConfig, save: &str) -> Result<(), String> {
    let lines: Vec<&str> = nat_lines(save).collect();
    for chain in [INBOUND_CHAIN, OUTBOUND_CHAIN] {
        let decl = format!(":{chain} ");
        if !lines.iter().any(|l| l.starts_with(&decl)) {
            return Err(format!("chain {chain} is missing"));
        }
    }
    for (builtin, jump) in jumps() {
        let n = existing_jumps(save)
            .iter()
            .filter(|l| l.starts_with(&format!("-A {builtin} ")))
            .count();
        if n != 1 {
            return Err(format!("expected one jump from {builtin}, found {n}"));
        }
        if !lines.contains(&jump.as_str()) {
            return Err(format!("rule {jump:?} is missing"));
        }
    }
    let ours: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| {
            l.starts_with(&format!("-A {INBOUND_CHAIN} "))
                || l.starts_with(&format!("-A {OUTBOUND_CHAIN} "))
        })
        .collect();
    let expected = chain_rules(cfg);
    if ours != expected {
        return Err(format!(
            "Moat's chains hold {ours:?}, expected {expected:?}"
        ));
    }
    Ok(())
}

/// Whether to install IPv6 rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ipv6Mode {
    /// Whenever the pod has IPv6 on an interface other than loopback, link-local included
    /// (fails if ip6tables is missing then: IPv6 would bypass the proxy).
    Auto,
    /// Always (fails if ip6tables is missing).
    On,
    /// Never: an explicit opt-out, logged; IPv6 TCP then bypasses the proxy.
    Off,
}

/// Which iptables backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IptablesMode {
    /// The backend that already holds Moat's chains, else nft when it works, else legacy.
    Auto,
    /// `iptables-nft` (nf_tables kernel API).
    Nft,
    /// `iptables-legacy` (x_tables kernel API).
    Legacy,
}

/// Flags of `moat-proxy init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Port of the proxy's inbound listener (captured inbound TCP goes there).
    #[arg(long, default_value_t = INBOUND_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbound_port: u16,
    /// Port of the proxy's outbound listener (captured outbound TCP goes there).
    #[arg(long, default_value_t = OUTBOUND_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,
    /// The proxy's uid: its own connections are never redirected.
    #[arg(long, default_value_t = PROXY_UID)]
    pub proxy_uid: u32,
    /// The proxy's gid: connections of processes with this group are never redirected.
    #[arg(long, default_value_t = PROXY_GID)]
    pub proxy_gid: u32,
    /// Inbound ports not redirected, e.g. `22,8000:8010` (15020 always is). Repeatable.
    #[arg(long, value_name = "LIST", action = clap::ArgAction::Append)]
    pub exclude_inbound_ports: Vec<PortList>,
    /// Outbound destination ports not redirected, e.g. `5432,6379`. Repeatable.
    #[arg(long, value_name = "LIST", action = clap::ArgAction::Append)]
    pub exclude_outbound_ports: Vec<PortList>,
    /// Outbound destination CIDRs not redirected, e.g. `10.96.0.1/32,fd00::/8`. Repeatable.
    #[arg(long, value_name = "LIST", action = clap::ArgAction::Append)]
    pub exclude_outbound_cidrs: Vec<CidrList>,
    /// Outbound ports not redirected for one destination network only, e.g.
    /// `10.96.0.10/32=53,fd00:10:96::a/128=53` (DNS to the cluster DNS Service). IPv4 networks
    /// go to the iptables rules, IPv6 ones to ip6tables. Repeatable.
    #[arg(long, value_name = "LIST", action = clap::ArgAction::Append)]
    pub exclude_outbound_endpoints: Vec<EndpointList>,
    /// Install IPv6 rules too: auto (when the pod has IPv6), on or off.
    #[arg(long, value_enum, default_value_t = Ipv6Mode::Auto)]
    pub ipv6: Ipv6Mode,
    /// Print the rules that would be applied and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// iptables backend: auto, nft or legacy.
    #[arg(long, value_enum, default_value_t = IptablesMode::Auto)]
    pub iptables_mode: IptablesMode,
}

impl InitArgs {
    /// Checks the flags together and builds the configuration of one family.
    pub fn config(&self, family: Family) -> Result<RedirectConfig, RedirectError> {
        if self.inbound_port == self.outbound_port {
            return Err(RedirectError::InvalidArgument {
                flag: "--inbound-port/--outbound-port",
                reason: format!("both are {}; they must differ", self.inbound_port),
            });
        }
        if self.inbound_port == ADMIN_PORT || self.outbound_port == ADMIN_PORT {
            return Err(RedirectError::InvalidArgument {
                flag: "--inbound-port/--outbound-port",
                reason: format!("{ADMIN_PORT} is the proxy's admin port"),
            });
        }
        if self.proxy_uid == 0 || self.proxy_gid == 0 {
            return Err(RedirectError::InvalidArgument {
                flag: "--proxy-uid/--proxy-gid",
                reason: "0 would exempt every root process from redirection".into(),
            });
        }
        Ok(RedirectConfig {
            family,
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            proxy_uid: self.proxy_uid,
            proxy_gid: self.proxy_gid,
            exclude_inbound_ports: self
                .exclude_inbound_ports
                .iter()
                .flat_map(|l| l.0.iter().copied())
                .collect(),
            exclude_outbound_ports: self
                .exclude_outbound_ports
                .iter()
                .flat_map(|l| l.0.iter().copied())
                .collect(),
            exclude_outbound_cidrs: self
                .exclude_outbound_cidrs
                .iter()
                .flat_map(|l| l.0.iter().copied())
                .collect(),
            exclude_outbound_endpoints: self
                .exclude_outbound_endpoints
                .iter()
                .flat_map(|l| l.0.iter().copied())
                .collect(),
        })
    }
}

/// The iptables programs of one family and backend.
#[derive(Debug, Clone)]
struct Backend {
    restore: PathBuf,
    save: PathBuf,
    name: &'static str,
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn missing(program: &str) -> RedirectError {
    RedirectError::MissingTool {
        program: program.to_string(),
        path: std::env::var("PATH").unwrap_or_default(),
    }
}

fn backend_programs(family: Family, flavour: &str) -> (String, String) {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    if flavour.is_empty() {
        (format!("{base}-restore"), format!("{base}-save"))
    } else {
        (
            format!("{base}-{flavour}-restore"),
            format!("{base}-{flavour}-save"),
        )
    }
}

fn backend(family: Family, flavour: &'static str) -> Result<Backend, RedirectError> {
    let (restore, save) = backend_programs(family, flavour);
    Ok(Backend {
        restore: find_in_path(&restore).ok_or_else(|| missing(&restore))?,
        save: find_in_path(&save).ok_or_else(|| missing(&save))?,
        name: if flavour.is_empty() {
            "default"
        } else {
            flavour
        },
    })
}

/// Runs `save -t nat`, returning its output.
fn save_nat(b: &Backend) -> Result<String, RedirectError> {
    let out = Command::new(&b.save)
        .args(["-t", "nat"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| tool_error(&b.save, "could not start", &e.to_string()))?;
    if !out.status.success() {
        return Err(tool_error(
            &b.save,
            &out.status.to_string(),
            &String::from_utf8_lossy(&out.stderr),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tool_error(program: &Path, status: &str, stderr: &str) -> RedirectError {
    let lower = stderr.to_ascii_lowercase();
    let hint = if lower.contains("permission denied") || lower.contains("operation not permitted") {
        " -- the init container needs NET_ADMIN and NET_RAW and must run as uid 0"
    } else if lower.contains("protocol not supported")
        || lower.contains("does not exist")
        || lower.contains("table does not exist")
        || lower.contains("can't initialize")
    {
        " -- the node kernel lacks this iptables backend; try --iptables-mode legacy or nft"
    } else {
        ""
    };
    RedirectError::ToolFailed {
        program: program.display().to_string(),
        status: status.to_string(),
        stderr: stderr.trim().to_string(),
        hint,
    }
}

/// Pipes `input` to `restore --noflush` (with `--test`, only checks it).
fn restore(b: &Backend, input: &str, test_only: bool) -> Result<(), RedirectError> {
    let mut cmd = Command::new(&b.restore);
    cmd.args(["--noflush", "--wait", "10"]);
    if test_only {
        cmd.arg("--test");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool_error(&b.restore, "could not start", &e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| tool_error(&b.restore, "stdin", &e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| tool_error(&b.restore, "wait", &e.to_string()))?;
    if !out.status.success() {
        return Err(tool_error(
            &b.restore,
            &out.status.to_string(),
            &String::from_utf8_lossy(&out.stderr),
        ));
    }
    Ok(())
}

/// Picks the backend for `family` according to `mode`.
fn select_backend(family: Family, mode: IptablesMode) -> Result<Backend, RedirectError> {
    match mode {
        IptablesMode::Nft => backend(family, "nft"),
        IptablesMode::Legacy => backend(family, "legacy"),
        IptablesMode::Auto => {
            let marker = format!(":{INBOUND_CHAIN} ");
            let nft = backend(family, "nft");
            // A backend that already holds Moat's chains (a rerun) is kept.
            if let Ok(b) = &nft {
                if save_nat(b).is_ok_and(|s| s.contains(&marker)) {
                    return nft;
                }
            }
            if let Ok(b) = backend(family, "legacy") {
                if save_nat(&b).is_ok_and(|s| s.contains(&marker)) {
                    return Ok(b);
                }
            }
            if let Ok(b) = &nft {
                if save_nat(b).is_ok() {
                    return nft;
                }
            }
            backend(family, "legacy").or_else(|_| backend(family, ""))
        }
    }
}

/// Whether IPv6 traffic can reach or leave this namespace: the kernel has IPv6
/// (`/proc/net/if_inet6` exists, `if_inet6` is its content), it is not disabled for the
/// namespace (`disable_ipv6` is `/proc/sys/net/ipv6/conf/all/disable_ipv6`), and an interface
/// other than loopback has an IPv6 address of any scope. Link-local counts: most CNIs leave
/// the kernel's `fe80::` address on the pod's interface, and TCP over it would otherwise
/// reach the app (and the app its neighbours) without the sidecar.
pub fn ipv6_reachable(if_inet6: Option<&str>, disable_ipv6: Option<&str>) -> bool {
    let Some(addrs) = if_inet6 else {
        return false;
    };
    if disable_ipv6.is_some_and(|d| d.trim() == "1") {
        return false;
    }
    addrs.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 6 && f[5] != "lo"
    })
}

/// Effective capabilities bitmask of this process (`CapEff` in `/proc/self/status`).
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

fn check_capabilities() -> Result<(), RedirectError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_NET_RAW: u32 = 13;
    // When /proc is unreadable, let iptables itself report the problem.
    let Some(caps) = effective_caps() else {
        return Ok(());
    };
    if caps & (1 << CAP_NET_ADMIN) == 0 {
        return Err(RedirectError::MissingCapability("NET_ADMIN"));
    }
    if caps & (1 << CAP_NET_RAW) == 0 {
        return Err(RedirectError::MissingCapability("NET_RAW"));
    }
    Ok(())
}

fn describe(cfg: &RedirectConfig) -> String {
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(",")
        }
    };
    let inbound = list(
        std::iter::once(ADMIN_PORT.to_string())
            .chain(cfg.exclude_inbound_ports.iter().map(|p| p.to_string()))
            .collect(),
    );
    let cidrs = list(
        cfg.exclude_outbound_cidrs
            .iter()
            .filter(|c| Family::of(c) == cfg.family)
            .map(|c| c.to_string())
            .collect(),
    );
    let endpoints = list(
        cfg.exclude_outbound_endpoints
            .iter()
            .filter(|e| Family::of(&e.cidr) == cfg.family)
            .map(|e| e.to_string())
            .collect(),
    );
    let ports = list(
        cfg.exclude_outbound_ports
            .iter()
            .map(|p| p.to_string())
            .collect(),
    );
    format!(
        "inbound TCP -> :{} (except ports {inbound}); outbound TCP -> :{} (except uid {}, gid {}, lo, loopback, CIDRs {cidrs}, endpoints {endpoints}, ports {ports})",
        cfg.inbound_port, cfg.outbound_port, cfg.proxy_uid, cfg.proxy_gid
    )
}

/// The families to program for `mode`.
fn families(mode: Ipv6Mode) -> Vec<Family> {
    let v6 = match mode {
        Ipv6Mode::On => true,
        Ipv6Mode::Off => false,
        Ipv6Mode::Auto => ipv6_reachable(
            std::fs::read_to_string("/proc/net/if_inet6")
                .ok()
                .as_deref(),
            std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
                .ok()
                .as_deref(),
        ),
    };
    if v6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    }
}

/// Validates, applies and verifies the redirection; returns what was done.
pub fn apply(args: &InitArgs) -> Result<(), RedirectError> {
    let fams = families(args.ipv6);
    if args.ipv6 == Ipv6Mode::Off && families(Ipv6Mode::Auto).contains(&Family::V6) {
        eprintln!("moat-proxy init: warning: --ipv6 off: this pod has IPv6, and its IPv6 TCP (link-local included) is NOT captured: it bypasses the proxy, mTLS and policy");
    }
    let cfgs = fams
        .iter()
        .map(|f| args.config(*f))
        .collect::<Result<Vec<_>, _>>()?;

    if args.dry_run {
        for cfg in &cfgs {
            println!(
                "# {} rules (iptables-restore --noflush input); {}",
                cfg.family,
                describe(cfg)
            );
            print!("{}", rules(cfg));
        }
        return Ok(());
    }

    check_capabilities()?;
    // Pre-flight for every family before anything changes: tools present, transaction valid.
    let mut planned = Vec::new();
    for cfg in &cfgs {
        let b = select_backend(cfg.family, args.iptables_mode)?;
        let current = save_nat(&b)?;
        let input = plan(cfg, &current);
        restore(&b, &input, true)?;
        planned.push((cfg, b, input));
    }
    for (cfg, b, input) in &planned {
        restore(b, input, false)?;
        let after = save_nat(b)?;
        verify(cfg, &after).map_err(|reason| RedirectError::Verification {
            family: cfg.family,
            reason,
        })?;
        println!(
            "moat-proxy init: {} nat rules applied and verified with {} ({} backend): {}",
            cfg.family,
            b.restore.display(),
            b.name,
            describe(cfg)
        );
        print!("{input}");
    }
    Ok(())
}

/// Entry point of `moat-proxy init`.
pub fn run(args: InitArgs) -> ExitCode {
    match apply(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat-proxy init: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn cfg(family: Family) -> RedirectConfig {
        RedirectConfig::new(family)
    }

    #[test]
    fn default_ipv4_rules() {
        assert_eq!(
            rules(&cfg(Family::V4)),
            "\
*nat
:MOAT_INBOUND - [0:0]
:MOAT_OUTBOUND - [0:0]
-A MOAT_INBOUND -p tcp -m multiport --dports 15020 -j RETURN
-A MOAT_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A MOAT_OUTBOUND -m owner --uid-owner 7777 -j RETURN
-A MOAT_OUTBOUND -m owner --gid-owner 7777 -j RETURN
-A MOAT_OUTBOUND -o lo -j RETURN
-A MOAT_OUTBOUND -d 127.0.0.0/8 -j RETURN
-A MOAT_OUTBOUND -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j MOAT_INBOUND
-A OUTPUT -p tcp -j MOAT_OUTBOUND
COMMIT
"
        );
    }

    #[test]
    fn exclusions_ipv4_and_ipv6() {
        let mut c = cfg(Family::V4);
        c.exclude_inbound_ports = PortList::from_str("22, 9000-9010,15020").unwrap().0;
        c.exclude_outbound_ports = PortList::from_str("5432,6379:6380").unwrap().0;
        c.exclude_outbound_cidrs = CidrList::from_str("10.96.0.1/12,fd00::1/8,192.168.1.1")
            .unwrap()
            .0;
        assert_eq!(
            rules(&c),
            "\
*nat
:MOAT_INBOUND - [0:0]
:MOAT_OUTBOUND - [0:0]
-A MOAT_INBOUND -p tcp -m multiport --dports 15020,22,9000:9010 -j RETURN
-A MOAT_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A MOAT_OUTBOUND -m owner --uid-owner 7777 -j RETURN
-A MOAT_OUTBOUND -m owner --gid-owner 7777 -j RETURN
-A MOAT_OUTBOUND -o lo -j RETURN
-A MOAT_OUTBOUND -d 127.0.0.0/8 -j RETURN
-A MOAT_OUTBOUND -d 10.96.0.0/12 -j RETURN
-A MOAT_OUTBOUND -d 192.168.1.1/32 -j RETURN
-A MOAT_OUTBOUND -p tcp -m multiport --dports 5432,6379:6380 -j RETURN
-A MOAT_OUTBOUND -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j MOAT_INBOUND
-A OUTPUT -p tcp -j MOAT_OUTBOUND
COMMIT
"
        );
        c.family = Family::V6;
        assert_eq!(
            rules(&c),
            "\
*nat
:MOAT_INBOUND - [0:0]
:MOAT_OUTBOUND - [0:0]
-A MOAT_INBOUND -p tcp -m multiport --dports 15020,22,9000:9010 -j RETURN
-A MOAT_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A MOAT_OUTBOUND -m owner --uid-owner 7777 -j RETURN
-A MOAT_OUTBOUND -m owner --gid-owner 7777 -j RETURN
-A MOAT_OUTBOUND -o lo -j RETURN
-A MOAT_OUTBOUND -d ::1/128 -j RETURN
-A MOAT_OUTBOUND -d fd00::/8 -j RETURN
-A MOAT_OUTBOUND -p tcp -m multiport --dports 5432,6379:6380 -j RETURN
-A MOAT_OUTBOUND -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j MOAT_INBOUND
-A OUTPUT -p tcp -j MOAT_OUTBOUND
COMMIT
"
        );
    }

    #[test]
    fn endpoint_exclusions_go_to_their_own_family_only() {
        let mut c = cfg(Family::V4);
        c.exclude_outbound_endpoints = EndpointList::from_str(
            "10.96.0.10=53, fd00:10:96::a/128=53,10.96.0.10/32=53,192.168.0.0/16=8000-8010",
        )
        .unwrap()
        .0;
        let v4 = rules(&c);
        assert!(
            v4.contains(
                "-A MOAT_OUTBOUND -d 127.0.0.0/8 -j RETURN\n\
                 -A MOAT_OUTBOUND -d 10.96.0.10/32 -p tcp -m tcp --dport 53 -j RETURN\n\
                 -A MOAT_OUTBOUND -d 192.168.0.0/16 -p tcp -m tcp --dport 8000:8010 -j RETURN\n\
                 -A MOAT_OUTBOUND -p tcp -j REDIRECT --to-ports 15001\n"
            ),
            "{v4}"
        );
        assert!(!v4.contains("fd00"), "{v4}");
        // Port 53 is excluded only with a destination, never on its own.
        assert!(!v4.contains("--dports 53"), "{v4}");
        c.family = Family::V6;
        let v6 = rules(&c);
        assert!(
            v6.contains(
                "-A MOAT_OUTBOUND -d fd00:10:96::a/128 -p tcp -m tcp --dport 53 -j RETURN\n"
            ),
            "{v6}"
        );
        assert!(
            !v6.contains("10.96.0.10") && !v6.contains("192.168"),
            "{v6}"
        );
        let saved = rules(&c).replace("*nat\n", "*nat\n:OUTPUT ACCEPT [0:0]\n");
        assert_eq!(verify(&c, &saved), Ok(()));
        for bad in [
            "10.96.0.10",
            "10.96.0.10=",
            "=53",
            "10.96.0.10/33=53",
            "10.96.0.10=0",
            "10.0.0.1=9-8",
        ] {
            assert!(Endpoint::from_str(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            Endpoint::from_str(" 10.96.0.10 = 53 ").map(|e| e.to_string()),
            Ok("10.96.0.10/32=53".to_string())
        );
    }

    #[test]
    fn long_port_lists_are_split_into_multiport_batches() {
        let mut c = cfg(Family::V4);
        c.exclude_outbound_ports = (1..=20)
            .map(|p| PortRange { first: p, last: p })
            .chain([PortRange {
                first: 100,
                last: 200,
            }])
            .collect();
        let r = rules(&c);
        assert!(r.contains("--dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15 -j RETURN\n"));
        assert!(r.contains("--dports 16,17,18,19,20,100:200 -j RETURN\n"));
    }

    #[test]
    fn rerun_deletes_previous_jumps_in_the_same_transaction() {
        let before = "\
# Generated by iptables-nft-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j MOAT_INBOUND
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:MOAT_INBOUND - [0:0]
:MOAT_OUTBOUND - [0:0]
-A PREROUTING -p tcp -j MOAT_INBOUND
-A PREROUTING -p tcp -j MOAT_INBOUND
-A PREROUTING -p tcp -j OTHER_MOAT_INBOUNDX
-A OUTPUT -j MOAT_OUTBOUND
-A MOAT_INBOUND -p tcp -j REDIRECT --to-ports 15006
COMMIT
";
        let p = plan(&cfg(Family::V4), before);
        assert!(p.starts_with(
            "\
*nat
:MOAT_INBOUND - [0:0]
:MOAT_OUTBOUND - [0:0]
-D PREROUTING -p tcp -j MOAT_INBOUND
-D PREROUTING -p tcp -j MOAT_INBOUND
-D OUTPUT -j MOAT_OUTBOUND
-A MOAT_INBOUND "
        ));
        assert!(p.ends_with(
            "-A PREROUTING -p tcp -j MOAT_INBOUND\n-A OUTPUT -p tcp -j MOAT_OUTBOUND\nCOMMIT\n"
        ));
        assert!(!p.contains("OTHER"));
    }

    #[test]
    fn verify_accepts_exact_rules_and_rejects_duplicates() {
        let c = cfg(Family::V4);
        let r = rules(&c);
        let saved = r.replace("*nat\n", "*nat\n:PREROUTING ACCEPT [0:0]\n");
        assert_eq!(verify(&c, &saved), Ok(()));
        let dup = saved.replace("COMMIT", "-A PREROUTING -p tcp -j MOAT_INBOUND\nCOMMIT");
        assert!(verify(&c, &dup)
            .unwrap_err()
            .contains("one jump from PREROUTING"));
        let missing = saved.replace(":MOAT_OUTBOUND - [0:0]\n", "");
        assert!(verify(&c, &missing).unwrap_err().contains("MOAT_OUTBOUND"));
        let mut other = c.clone();
        other.outbound_port = 16001;
        assert!(verify(&other, &saved).is_err());
    }

    #[test]
    fn flag_validation() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            init: InitArgs,
        }
        let ok = Cli::try_parse_from([
            "x",
            "--exclude-inbound-ports",
            "22,80",
            "--exclude-inbound-ports",
            "443",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8",
            "--exclude-outbound-endpoints",
            "10.96.0.10/32=53,fd00::a/128=53",
            "--exclude-outbound-endpoints",
            "10.96.0.11/32=53",
            "--ipv6",
            "off",
        ])
        .unwrap();
        let c = ok.init.config(Family::V4).unwrap();
        assert_eq!(c.exclude_inbound_ports.len(), 3);
        assert_eq!(c.exclude_outbound_endpoints.len(), 3);
        for bad in [
            vec!["x", "--inbound-port", "0"],
            vec!["x", "--outbound-port", "70000"],
            vec!["x", "--exclude-inbound-ports", "22,abc"],
            vec!["x", "--exclude-outbound-cidrs", "10.0.0.0/40"],
            vec!["x", "--exclude-outbound-endpoints", "10.96.0.10/32"],
            vec!["x", "--exclude-outbound-endpoints", "10.96.0.10/32=dns"],
            vec!["x", "--ipv6", "maybe"],
            vec!["x", "--iptables-mode", "ebpf"],
        ] {
            assert!(Cli::try_parse_from(&bad).is_err(), "{bad:?} accepted");
        }
        let same = Cli::try_parse_from(["x", "--inbound-port", "15001"]).unwrap();
        assert!(same.init.config(Family::V4).is_err());
        let root = Cli::try_parse_from(["x", "--proxy-uid", "0"]).unwrap();
        assert!(root.init.config(Family::V4).is_err());
    }

    #[test]
    fn ipv6_detection_counts_link_local_and_ignores_loopback() {
        let lo = "00000000000000000000000000000001 01 80 10 80       lo\n";
        let link_local = format!("{lo}fe80000000000000a8c1abfffe123456 02 40 20 80     eth0\n");
        assert!(ipv6_reachable(Some(&link_local), Some("0\n")));
        assert!(ipv6_reachable(Some(&link_local), None));
        let global = format!("{lo}fd000000000000000000000000000001 02 40 00 80     eth0\n");
        assert!(ipv6_reachable(Some(&global), Some("0")));
        assert!(!ipv6_reachable(Some(lo), Some("0")), "loopback only");
        assert!(!ipv6_reachable(Some(&link_local), Some("1")), "disabled");
        assert!(!ipv6_reachable(None, None), "no IPv6 in the kernel");
    }
}
