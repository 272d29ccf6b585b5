//! Socket-level helpers: original destination recovery, socket options.

use std::net::SocketAddr;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;

/// The address a redirected connection was originally sent to (`SO_ORIGINAL_DST`, IPv4 or
/// IPv6). `None` when the connection was not redirected by the nat table.
pub fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr().ok()?;
    let orig = match local {
        // An IPv4-mapped IPv6 socket still carries an IPv4 conntrack entry.
        SocketAddr::V4(_) => sock.original_dst_v4().ok(),
        SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => sock.original_dst_v4().ok(),
        SocketAddr::V6(_) => sock.original_dst_v6().ok(),
    }?;
    let orig = orig.as_socket()?;
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
