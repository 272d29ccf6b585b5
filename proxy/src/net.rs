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
