//! Network values written in flags, environment variables and annotations: CIDRs
//! (`10.0.0.0/8`, `fd00::/8`, a bare address), TCP port lists (`80,8000:8010`) and service
//! addresses (`moat-destination.moat-system.svc:8086`). The proxy,
//! its `init` step and the injector parse them here, so a value one accepts the others accept.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Longest part of a refused value quoted back in an error message: values can come from pod
/// annotations, and an error must stay readable (and fit a Kubernetes warning).
const QUOTE_MAX: usize = 45;

/// Cuts `s` to at most `max` characters for messages, marking the cut with `...`.
pub fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(3)).collect();
        out.push_str("...");
        out
    }
}

/// An IPv4 or IPv6 network in CIDR notation, host bits cleared (`10.1.2.3/8` is
/// `10.0.0.0/8`); a bare address is a /32 or /128.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network of `addr` with `prefix` bits (host bits cleared); `None` when the prefix is
    /// longer than the address.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let addr = match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
            _ => return None,
        };
        Some(Self { addr, prefix })
    }

    /// The network holding only `addr` (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, prefix }
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether this is an IPv4 network.
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` lies inside the network. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as
    /// a dual-stack socket reports IPv4 peers) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        Cidr::new(ip, self.prefix).is_some_and(|n| n.addr == self.addr)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            format!(
                "{:?} is not an IPv4 or IPv6 network (write e.g. 10.0.0.0/8, fd00::/8 or 10.96.0.1)",
                shorten(s, QUOTE_MAX)
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|n| *n <= max).ok_or_else(|| {
                format!(
                    "{:?}: prefix must be 0-{max} for an {} address",
                    shorten(s, QUOTE_MAX),
                    if max == 32 { "IPv4" } else { "IPv6" }
                )
            })?,
        };
        Ok(Cidr::new(addr, prefix).expect("prefix checked"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A TCP port or an inclusive range of ports, written `80`, `8000:8010` or `8000-8010` (shown
/// as `iptables` writes it: `8000:8010`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (equal to `first` for a single port).
    pub last: u16,
}

impl PortRange {
    /// A single port.
    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }

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
                Err(_) => Err(format!(
                    "{:?} is not a port number (1-65535) or range (8000:8010)",
                    shorten(p, 20)
                )),
            }
        };
        match s.split_once([':', '-']) {
            Some((a, b)) => {
                let (first, last) = (port(a)?, port(b)?);
                if first > last {
                    return Err(format!(
                        "range {:?} starts after it ends",
                        shorten(s, QUOTE_MAX)
                    ));
                }
                Ok(Self { first, last })
            }
            None => port(s).map(Self::single),
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

/// A comma-separated list (`a,b,c`) of `T`; empty items are ignored, so the empty string is the
/// empty list. Displays the same way, which is what `moat-proxy init` reads back.
#[derive(Clone, PartialEq, Eq)]
pub struct List<T>(pub Vec<T>);

/// A list of CIDRs, e.g. `10.96.0.1/32,fd00::/8`.
pub type CidrList = List<Cidr>;
/// A list of ports and port ranges, e.g. `22,8000:8010`.
pub type PortList = List<PortRange>;

impl<T> Default for List<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: FromStr<Err = String>> FromStr for List<T> {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(T::from_str)
            .collect::<Result<Vec<_>, _>>()
            .map(List)
    }
}

impl<T: fmt::Display> fmt::Display for List<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, item) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{item}")?;
        }
        Ok(())
    }
}

impl<T: fmt::Display> fmt::Debug for List<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{self}]")
    }
}

/// Parses a comma-separated list of CIDRs; empty items are ignored.
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    CidrList::from_str(s).map(|l| l.0)
}

/// Parses a comma-separated list of ports and ranges; empty items are ignored.
pub fn parse_ports(s: &str) -> Result<Vec<PortRange>, String> {
    PortList::from_str(s).map(|l| l.0)
}

/// Formats items as a comma-separated list (`80,8000:8010`, `10.0.0.0/8,fd00::/8`).
pub fn format_list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A service address, `HOST:PORT`: a DNS name, an IPv4 address or a bracketed IPv6 address,
/// and a port other than 0. Kept as written, because names are resolved at every connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort(String);

impl HostPort {
    /// The address as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{:?} is not HOST:PORT", shorten(s, QUOTE_MAX));
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if !port.parse::<u16>().is_ok_and(|p| p != 0) {
            return Err(bad());
        }
        let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            // A name or an IPv4 address: the characters DNS allows, nothing that could smuggle
            // a path, credentials or a second address into an environment variable.
            None => {
                !host.is_empty()
                    && host.len() <= 253
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
            }
        };
        if host_ok {
            Ok(Self(s.to_string()))
        } else {
            Err(bad())
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_clears_host_bits() {
        let show = |s: &str| Cidr::from_str(s).unwrap().to_string();
        assert_eq!(show("10.1.2.3/8"), "10.0.0.0/8");
        assert_eq!(show(" 0.0.0.0/0 "), "0.0.0.0/0");
        assert_eq!(show("::/0"), "::/0");
        assert_eq!(show("2001:db8::1"), "2001:db8::1/128");
        assert_eq!(show("192.168.1.1"), "192.168.1.1/32");
        assert_eq!(show("fd00::1/8"), "fd00::/8");
        assert_eq!(
            Cidr::host("10.96.0.1".parse().unwrap()).to_string(),
            "10.96.0.1/32"
        );
        assert!(Cidr::new("10.0.0.0".parse().unwrap(), 33).is_none());
    }

    #[test]
    fn cidr_errors_say_what_to_write() {
        let err = |s: &str| Cidr::from_str(s).unwrap_err();
        assert!(err("10.0.0.0/33").contains("prefix must be 0-32 for an IPv4"));
        assert!(err("fd00::/129").contains("prefix must be 0-128 for an IPv6"));
        assert!(err("10.0.0.0/x").contains("prefix must be 0-32"));
        assert!(err("10.0.0.0/").contains("prefix must be 0-32"));
        assert!(err("1.2.3.4/-1").contains("prefix"));
        for bad in ["bad", "10.0.0/8", "1.2.3/8", ""] {
            assert!(err(bad).contains("e.g. 10.0.0.0/8"), "{bad}");
        }
        let long = "x".repeat(500);
        assert!(err(&long).len() < 150, "long values are cut");
    }

    #[test]
    fn cidr_membership() {
        let n: Cidr = "10.244.0.0/16".parse().unwrap();
        assert!(n.contains("10.244.3.4".parse().unwrap()));
        assert!(!n.contains("10.245.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:10.244.0.9".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains("2001:db8::1".parse().unwrap()));
        assert!(!all6.contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn ports() {
        assert_eq!(PortRange::from_str("80").unwrap(), PortRange::single(80));
        assert_eq!(
            PortRange::from_str("1-65535").unwrap(),
            PortRange {
                first: 1,
                last: 65535
            }
        );
        assert_eq!(PortRange::from_str("10:20").unwrap().to_string(), "10:20");
        assert!(PortRange::from_str("10:20").unwrap().contains(15));
        let err = |s: &str| PortRange::from_str(s).unwrap_err();
        assert!(err("0").contains("outside 1-65535"));
        assert!(err("65536").contains("outside 1-65535"));
        assert!(err("http").contains("not a port number"));
        assert!(err("20:10").contains("starts after"));
        for bad in ["-5", "1-2-3", "-1", ""] {
            assert!(PortRange::from_str(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn lists() {
        assert_eq!(
            PortList::from_str("80, 8000-8010,9000:9001,")
                .unwrap()
                .to_string(),
            "80,8000:8010,9000:9001"
        );
        assert_eq!(PortList::from_str("").unwrap(), PortList::default());
        assert!(parse_ports("80,abc").is_err());
        assert_eq!(
            format_list(&parse_cidrs("10.1.2.3/8, fd00::1/8,192.168.0.1").unwrap()),
            "10.0.0.0/8,fd00::/8,192.168.0.1/32"
        );
        assert_eq!(
            format!("{:?}", CidrList::from_str("10.0.0.0/8").unwrap()),
            "[10.0.0.0/8]"
        );
        assert!(parse_cidrs("10.0.0.0/8,::/129").is_err());
    }

    #[test]
    fn shortens_on_char_boundaries() {
        assert_eq!(shorten("short", 10), "short");
        assert_eq!(shorten("ééééééééééé", 6), "ééé...");
    }

    #[test]
    fn host_port_accepts_names_and_addresses_and_nothing_else() {
        for ok in [
            "moat-destination.moat-system.svc:8086",
            "10.0.0.5:8086",
            "[fd00::5]:8086",
            "localhost:1",
        ] {
            assert_eq!(ok.parse::<HostPort>().unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "moat-destination",
            ":8086",
            "host:0",
            "host:65536",
            "host:port",
            "fd00::5:8086",
            "[not-v6]:8086",
            "user@host:8086",
            "host/path:8086",
            "host name:8086",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad:?}");
        }
    }
}
