//! An attacker holding a server's connections: many connections from several loopback source
//! addresses (`127.0.0.2`, `127.0.0.3`, ... — all of `127.0.0.0/8` is loopback on Linux, so a
//! per-address limit sees several clients), each idling in a way a server must survive:
//! TCP only, TLS done but silent, an unfinished HTTP/1.1 request head, or an HTTP/2 preface
//! without a stream.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;

/// How a held connection idles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// TCP connected, no ClientHello.
    Tcp,
    /// TLS handshake completed, nothing sent.
    Tls,
    /// TLS, then the start of an HTTP/1.1 request head that never ends.
    PartialRequest,
    /// TLS, then the HTTP/2 preface and SETTINGS, no stream ever opened.
    Http2Preface,
}

impl Idle {
    /// Every kind.
    pub const ALL: [Idle; 4] = [
        Idle::Tcp,
        Idle::Tls,
        Idle::PartialRequest,
        Idle::Http2Preface,
    ];
}

/// Raises this process's soft `RLIMIT_NOFILE` to at least `want` (up to the hard limit);
/// returns the new soft limit. Child processes started afterwards inherit it.
pub fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    lim.rlim_cur = want.min(lim.rlim_max);
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(lim.rlim_cur)
}

/// `n` loopback source addresses other than 127.0.0.1 (which legitimate clients use).
pub fn loopback_sources(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            let i = u32::try_from(i).unwrap_or(0) + 2;
            IpAddr::V4(Ipv4Addr::from(0x7f00_0000u32 | i))
        })
        .collect()
}

/// A TCP connection to `dst` from address `src`.
pub async fn connect_from(src: IpAddr, dst: SocketAddr) -> anyhow::Result<TcpStream> {
    let sock = match src {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    sock.bind(SocketAddr::new(src, 0))
        .with_context(|| format!("bind {src}"))?;
    let tcp = sock
        .connect(dst)
        .await
        .with_context(|| format!("connect {src} -> {dst}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

enum Conn {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One held connection.
pub struct HeldConn {
    /// Its source address.
    pub local: SocketAddr,
    /// How it idles.
    pub kind: Idle,
    conn: Conn,
}

impl HeldConn {
    /// Opens one connection of `kind` from `src` to `dst`.
    pub async fn open(
        src: IpAddr,
        dst: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        kind: Idle,
    ) -> anyhow::Result<Self> {
        let tcp = connect_from(src, dst).await?;
        let local = tcp.local_addr()?;
        if kind == Idle::Tcp {
            return Ok(Self {
                local,
                kind,
                conn: Conn::Tcp(tcp),
            });
        }
        let mut s = tokio_rustls::TlsConnector::from(tls)
            .connect(ServerName::IpAddress(dst.ip().into()), tcp)
            .await
            .with_context(|| format!("TLS handshake {local} -> {dst}"))?;
        match kind {
            Idle::PartialRequest => {
                s.write_all(b"POST /v1/certificates HTTP/1.1\r\nHost: x\r\nContent-Type: app")
                    .await?;
            }
            Idle::Http2Preface => {
                s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
                // An empty SETTINGS frame.
                s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await?;
            }
            Idle::Tcp | Idle::Tls => {}
        }
        s.flush().await?;
        Ok(Self {
            local,
            kind,
            conn: Conn::Tls(Box::new(s)),
        })
    }

    /// Whether the server still keeps the connection open: nothing but a close (or an error)
    /// within `wait` means open. Whatever the server sends (TLS tickets, HTTP/2 settings and
    /// pings) is read and ignored.
    pub async fn is_open(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 4096];
        loop {
            let read = match &mut self.conn {
                Conn::Tcp(t) => tokio::time::timeout_at(deadline, t.read(&mut buf)).await,
                Conn::Tls(t) => tokio::time::timeout_at(deadline, t.read(&mut buf)).await,
            };
            match read {
                Err(_) => return true,
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(_)) => continue,
            }
        }
    }
}

/// Connections held open against a server.
#[derive(Default)]
pub struct Held {
    /// The connections, in the order they were planned (handshakes within a batch run
    /// concurrently, so the server may accept them in another order).
    pub conns: Vec<HeldConn>,
}

impl Held {
    /// Opens `per_source` connections from each of `sources` to `dst`, cycling through
    /// `kinds`, a few dozen handshakes at a time.
    pub async fn open(
        dst: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        sources: &[IpAddr],
        per_source: usize,
        kinds: &[Idle],
    ) -> anyhow::Result<Self> {
        let mut plan = Vec::new();
        for i in 0..per_source {
            for (j, src) in sources.iter().enumerate() {
                let kind = kinds
                    .get((i * sources.len() + j) % kinds.len().max(1))
                    .copied()
                    .unwrap_or(Idle::Tls);
                plan.push((*src, kind));
            }
        }
        let mut held = Self::default();
        for chunk in plan.chunks(32) {
            let mut set = tokio::task::JoinSet::new();
            for (i, (src, kind)) in chunk.iter().copied().enumerate() {
                let tls = tls.clone();
                set.spawn(async move { (i, HeldConn::open(src, dst, tls, kind).await) });
            }
            let mut opened: Vec<(usize, HeldConn)> = Vec::new();
            while let Some(r) = set.join_next().await {
                let (i, c) = r.context("connect task")?;
                opened.push((i, c?));
            }
            opened.sort_by_key(|(i, _)| *i);
            held.conns.extend(opened.into_iter().map(|(_, c)| c));
        }
        Ok(held)
    }

    /// How many connections are held.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// How many the server has not closed (each given `wait` to show a close).
    pub async fn still_open(&mut self, wait: Duration) -> usize {
        let mut n = 0;
        for c in &mut self.conns {
            if c.is_open(wait).await {
                n += 1;
            }
        }
        n
    }
}
