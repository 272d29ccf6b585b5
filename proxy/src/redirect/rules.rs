//! The rules themselves: `iptables-restore` input for a [`RedirectConfig`], the transaction
//! that replaces an earlier run's, and the check of what the kernel holds afterwards. Pure
//! functions of their inputs, so every rule is tested without root.

use moat_core::contract::ADMIN_PORT;

use super::{Family, PortRange, RedirectConfig, INBOUND_CHAIN, OUTBOUND_CHAIN};

/// Ports or ranges per `-m multiport` rule (the kernel accepts 15, a range counts twice).
const MULTIPORT_SLOTS: usize = 15;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redirect::{CidrList, Endpoint, EndpointList, PortList};
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
}
