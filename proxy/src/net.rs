//! Socket-level helpers: listeners, original destination recovery, socket options.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// A listening TCP socket on `addr` (`SO_REUSEADDR`, backlog 4096). For an IPv6 address,
/// `dual_stack` clears `IPV6_V6ONLY`: the socket then accepts IPv4 too, and those connections
/// show IPv4-mapped addresses (`::ffff:a.b.c.d`, see [`canonical`]).
pub fn listen(addr: SocketAddr, dual_stack: bool) -> std::io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(!dual_stack)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

/// Whether a socket error means the host has no IPv6 (or not that IPv6 address): IPv6 disabled
/// in the kernel, or the address (e.g. `::1`) not configured.
pub fn is_no_ipv6(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// `addr` with an IPv4-mapped IPv6 address (how a dual-stack socket shows IPv4 peers) turned
/// back into the IPv4 address.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The address a redirected connection was originally sent to (`SO_ORIGINAL_DST`, IPv4 or
/// IPv6). `None` when the connection was not redirected by the nat table.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = canonical(stream.local_addr().ok()?);
    let orig = match local {
        // Also an IPv4 connection on a dual-stack socket (IPv4-mapped local address): it
        // still has an IPv4 conntrack entry, which the SOL_IP option reads.
        SocketAddr::V4(_) => sock.original_dst_v4().ok(),
        SocketAddr::V6(_) => sock.original_dst_v6().ok(),
    }?;
    let orig = canonical(orig.as_socket()?);
    // Without a REDIRECT, the "original" destination is just our own address.
    (orig != local).then_some(orig)
}

/// Applies the options every proxied TCP socket gets.
pub fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let ka = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(Duration::from_secs(10))
            .with_retries(3);
        let _ = SockRef::from(stream).set_tcp_keepalive(&ka);
    }
}

/// Closes a socket with RST instead of FIN, so a refused client learns at once.
pub fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// The default gateways of this network namespace (IPv4 from `/proc/net/route`, IPv6 from
/// `/proc/net/ipv6_route`). With bridge CNIs the kubelet's probes come from the node's address
/// on the bridge, which is the pod's gateway rather than the node IP.
pub fn default_gateways() -> Vec<std::net::IpAddr> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let mut gws = gateways_v4(&v4);
    gws.extend(gateways_v6(&v6));
    gws.dedup();
    gws
}

/// `/proc/net/route`: `Iface Destination Gateway Flags ...`, addresses in little-endian hex.
fn gateways_v4(table: &str) -> Vec<std::net::IpAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dst, gw) = (f.get(1)?, f.get(2)?);
            let gw = u32::from_str_radix(gw, 16).ok()?;
            (*dst == "00000000" && gw != 0)
                .then(|| std::net::Ipv4Addr::from(u32::from_be(gw)).into())
        })
        .collect()
}

/// `/proc/net/ipv6_route`: `dst dst_len src src_len next_hop metric refcnt use flags iface`.
fn gateways_v6(table: &str) -> Vec<std::net::IpAddr> {
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dst, len, hop) = (f.first()?, f.get(1)?, f.get(4)?);
            let hop = u128::from_str_radix(hop, 16).ok()?;
            (dst.bytes().all(|b| b == b'0') && *len == "00" && hop != 0)
                .then(|| std::net::Ipv6Addr::from(hop).into())
        })
        .collect()
}

/// Binds the local control socket at `path`, replacing a stale socket left by an earlier run,
/// and lets every uid of the pod connect: the directory (the pod's own volume) is the
/// boundary, so an app container running as another user can still stop its sidecar.
pub fn listen_unix(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use anyhow::Context as _;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?,
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it (--admin-socket)",
            path.display()
        ),
        Err(_) => {}
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {} (--admin-socket)", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(l)
}

#[cfg(test)]
mod gateway_tests {
    use super::*;

    #[test]
    fn reads_default_gateways_from_proc_tables() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            gateways_v4(v4),
            vec!["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth0\n\
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(
            gateways_v6(v6),
            vec!["fe80::1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(gateways_v4("").is_empty());
    }
}
