//! `moat-proxy init`: its flags, and the sequence that changes a pod's nat table: validate,
//! pre-flight every family (tools, capabilities, a test run of the transaction), then apply
//! and read back each one.

use std::process::ExitCode;

use moat_core::contract::{ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, PROXY_GID, PROXY_UID};

use super::iptables::{check_capabilities, restore, save_nat, select_backend};
use super::rules::{plan, rules, verify};
use super::{CidrList, EndpointList, Family, PortList, RedirectConfig, RedirectError};

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
