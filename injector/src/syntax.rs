//! The value formats flags and annotations share: port lists, CIDR lists, resource quantities
//! and log levels. Everything the injector writes into `moat-proxy init` arguments goes through
//! these parsers first, so the init container never fails on a value the injector accepted.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// A TCP port or an inclusive range of ports, written `80`, `8000:8010` or `8000-8010`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (equal to `first` for a single port).
    pub last: u16,
}

impl PortRange {
    /// Whether `port` is inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let port = |p: &str| -> Result<u16, String> {
            let p = p.trim();
            match p.parse::<u32>() {
                Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
                Ok(_) => Err(format!("port {p} is outside 1-65535")),
                Err(_) => Err(format!("{} is not a port", shorten(p, 20))),
            }
        };
        match s.split_once([':', '-']) {
            Some((a, b)) => {
                let (first, last) = (port(a)?, port(b)?);
                if first > last {
                    return Err(format!("range {s} starts after it ends"));
                }
                Ok(Self { first, last })
            }
            None => port(s).map(|p| Self { first: p, last: p }),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}:{}", self.first, self.last)
        }
    }
}

/// Parses a comma-separated list of ports and ranges; empty items are ignored.
pub fn parse_ports(s: &str) -> Result<Vec<PortRange>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(PortRange::from_str)
        .collect()
}

/// Formats ports the way `moat-proxy init` reads them (`80,8000:8010`).
pub fn format_ports(ports: &[PortRange]) -> String {
    ports
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// An IPv4 or IPv6 network, host bits cleared; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{} is not an IPv4 or IPv6 CIDR", shorten(s, 45)))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("{}: prefix must be 0-{max}", shorten(s, 45))),
            },
        };
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses a comma-separated list of CIDRs; empty items are ignored.
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(Cidr::from_str)
        .collect()
}

/// Formats CIDRs as a comma-separated list.
pub fn format_cidrs(cidrs: &[Cidr]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A comma-separated CIDR list usable as a clap value (`--mesh-networks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl FromStr for CidrList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_cidrs(s).map(CidrList)
    }
}

impl fmt::Display for CidrList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_cidrs(&self.0))
    }
}

/// Parses a Kubernetes resource quantity (`500m`, `1`, `0.5`, `256Mi`, `1G`, `1e3`) and returns
/// its value in base units. Negative quantities are refused (they are never valid resources).
pub fn parse_quantity(s: &str) -> Result<f64, String> {
    let bad = || format!("{} is not a Kubernetes quantity", shorten(s, 30));
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(end);
    let number = number.strip_prefix('+').unwrap_or(number);
    let digits_ok = !number.is_empty()
        && number != "."
        && number.bytes().filter(|b| *b == b'.').count() <= 1
        && number.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if !digits_ok {
        return Err(bad());
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().map_err(|_| bad())?;
            if !(-30..=30).contains(&e) {
                return Err(bad());
            }
            10f64.powi(e)
        }
        _ => return Err(bad()),
    };
    Ok(value * multiplier)
}

/// Levels accepted in a log filter.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a log filter: a level (`info`) or comma-separated `target=level` directives
/// (`info,moat_proxy=debug`), targets made of letters, digits, `_` and `::`.
pub fn validate_log_level(s: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{} is not a log level (off, error, warn, info, debug, trace, or target=level)",
            shorten(s, 30)
        )
    };
    if s.is_empty() || s.len() > 200 {
        return Err(bad());
    }
    for directive in s.split(',') {
        let (target, level) = match directive.split_once('=') {
            Some((t, l)) => (Some(t), l),
            None => (None, directive),
        };
        if !LEVELS.contains(&level) {
            return Err(bad());
        }
        if let Some(t) = target {
            let ok = !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
            if !ok {
                return Err(bad());
            }
        }
    }
    Ok(())
}

/// Cuts `s` to at most `max` characters for messages, marking the cut.
pub fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(3)).collect();
        out.push_str("...");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(
            format_ports(&parse_ports("80, 8000-8010,9000:9001,").unwrap()),
            "80,8000:8010,9000:9001"
        );
        assert!(parse_ports("").unwrap().is_empty());
        for bad in ["0", "65536", "http", "10:5", "1-2-3", "-1", "80,abc"] {
            assert!(parse_ports(bad).is_err(), "{bad} accepted");
        }
        assert!(PortRange::from_str("10:20").unwrap().contains(15));
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            format_cidrs(&parse_cidrs("10.1.2.3/8, fd00::1/8,192.168.0.1").unwrap()),
            "10.0.0.0/8,fd00::/8,192.168.0.1/32"
        );
        for bad in ["10.0.0.0/33", "::/129", "bad", "10.0.0.0/", "1.2.3/8"] {
            assert!(parse_cidrs(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn quantities() {
        let eq = |s: &str, v: f64| {
            let got = parse_quantity(s).unwrap();
            assert!((got - v).abs() < 1e-9 * v.max(1.0), "{s}: {got} != {v}");
        };
        eq("500m", 0.5);
        eq("1", 1.0);
        eq("0.5", 0.5);
        eq("256Mi", 256.0 * 1024.0 * 1024.0);
        eq("1G", 1e9);
        eq("1e3", 1000.0);
        eq("2Gi", 2.0 * 1024f64.powi(3));
        for bad in [
            "", "abc", "-1", "1x", "1.2.3", "Mi", "1 Mi", "1e", ".", "1e99",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn log_levels() {
        for ok in [
            "info",
            "debug",
            "info,moat_proxy=debug",
            "moat_proxy::tls=trace",
        ] {
            assert!(validate_log_level(ok).is_ok(), "{ok}");
        }
        for bad in ["", "verbose", "info,", "x=loud", "a b=info", "$(X)=info"] {
            assert!(validate_log_level(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn shortens_on_char_boundaries() {
        assert_eq!(shorten("short", 10), "short");
        assert_eq!(shorten("ééééééééééé", 6), "ééé...");
    }
}
