//! Protocol detection from the first bytes of a connection: a TLS ClientHello offering Moat's
//! ALPN (a peer sidecar), HTTP/1.x, HTTP/2 with prior knowledge, or anything else (opaque).
//!
//! The classifiers are pure functions over byte slices, so they can be tested and fuzzed alone;
//! [`peek`] gathers the bytes from a socket without consuming them, within a timeout.

use std::time::Duration;

use moat_core::tls::MOAT_ALPN;
use tokio::net::TcpStream;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Not enough bytes yet to decide.
    NeedMore,
    /// A TLS ClientHello offering the Moat ALPN: a peer sidecar.
    MoatTls,
    /// Some other TLS ClientHello (the app's own TLS, or a stranger).
    OtherTls,
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 connection preface.
    Http2,
    /// Anything else.
    Opaque,
}

impl Protocol {
    /// Label value for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::NeedMore => "unknown",
            Self::MoatTls => "moat_tls",
            Self::OtherTls => "tls",
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Opaque => "opaque",
        }
    }

    /// Whether hyper should proxy it per request.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http1 | Self::Http2)
    }
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Classifies plaintext application bytes (no TLS).
pub fn http(buf: &[u8]) -> Protocol {
    if buf.is_empty() {
        return Protocol::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        // "PRI " could still be a (bizarre) HTTP/1 method only if the preface diverges later.
        return if n == H2_PREFACE.len() {
            Protocol::Http2
        } else {
            Protocol::NeedMore
        };
    }
    let mut maybe = false;
    for m in METHODS {
        let k = buf.len().min(m.len());
        if buf[..k] == m[..k] {
            if k == m.len() {
                return Protocol::Http1;
            }
            maybe = true;
        }
    }
    if maybe {
        Protocol::NeedMore
    } else {
        Protocol::Opaque
    }
}

/// Peeks (without consuming) until `classify` decides or `timeout` passes (→ opaque).
pub async fn peek(tcp: &TcpStream, timeout: Duration, classify: fn(&[u8]) -> Protocol) -> Protocol {
    let mut buf = vec![0u8; 4096];
    let fut = async {
        loop {
            let n = match tcp.peek(&mut buf).await {
                Ok(0) | Err(_) => return Protocol::Opaque,
                Ok(n) => n,
            };
            match classify(&buf[..n]) {
                Protocol::NeedMore if n < buf.len() => {
                    // More bytes are coming; peek would return the same bytes at once.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Protocol::NeedMore => return Protocol::Opaque,
                p => return p,
            }
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or(Protocol::Opaque)
}

/// Classifies the first bytes of an inbound connection: TLS (Moat or other), else as [`http`].
pub fn inbound(buf: &[u8]) -> Protocol {
    match client_hello_alpn(buf) {
        Hello::NeedMore => Protocol::NeedMore,
        Hello::Alpn(true) => Protocol::MoatTls,
        Hello::Alpn(false) => Protocol::OtherTls,
        Hello::NotTls => http(buf),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Hello {
    NeedMore,
    NotTls,
    /// A ClientHello; whether it offers the Moat ALPN.
    Alpn(bool),
}

/// Minimal ClientHello reader: record header, handshake header, then the extensions list,
/// looking for ALPN (type 16). Only the first record is read: Moat's own ClientHello (even
/// with a post-quantum key share) fits in one.
fn client_hello_alpn(buf: &[u8]) -> Hello {
    let mut r = Reader(buf);
    let Some(ct) = r.u8() else {
        return Hello::NeedMore;
    };
    if ct != 0x16 {
        return Hello::NotTls;
    }
    let Some(major) = r.u8() else {
        return Hello::NeedMore;
    };
    if major != 3 {
        return Hello::NotTls;
    }
    let (Some(_minor), Some(rec_len)) = (r.u8(), r.u16()) else {
        return Hello::NeedMore;
    };
    let Some(record) = r.take(usize::from(rec_len)) else {
        return Hello::NeedMore;
    };
    parse_hello(record).map_or(Hello::Alpn(false), Hello::Alpn)
}

fn parse_hello(record: &[u8]) -> Option<bool> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let body = r.take(len).or_else(|| Some(r.rest()))?;
    let mut h = Reader(body);
    h.take(2 + 32)?; // legacy_version, random
    let sid = h.u8()?;
    h.take(usize::from(sid))?;
    let suites = h.u16()?;
    h.take(usize::from(suites))?;
    let comp = h.u8()?;
    h.take(usize::from(comp))?;
    let ext_len = h.u16()?;
    let mut exts = Reader(h.take(usize::from(ext_len))?);
    while let Some(ty) = exts.u16() {
        let len = exts.u16()?;
        let data = exts.take(usize::from(len))?;
        if ty == 16 {
            let mut a = Reader(data);
            let list_len = a.u16()?;
            let mut list = Reader(a.take(usize::from(list_len))?);
            while let Some(plen) = list.u8() {
                if list.take(usize::from(plen))? == MOAT_ALPN {
                    return Some(true);
                }
            }
            return Some(false);
        }
    }
    Some(false)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Captures a real rustls ClientHello offering `alpn`.
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(moat_core::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(cfg), "peer.test".try_into().unwrap()).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn recognises_moat_client_hello_even_with_post_quantum_key_share() {
        let hello = client_hello(&[MOAT_ALPN]);
        assert!(
            hello.len() > 1000,
            "X25519MLKEM768 key share makes it large"
        );
        assert_eq!(inbound(&hello), Protocol::MoatTls);
        for cut in [1, 5, 100, hello.len() - 1] {
            assert_eq!(inbound(&hello[..cut]), Protocol::NeedMore, "cut at {cut}");
        }
        assert_eq!(
            inbound(&client_hello(&[b"h2", b"http/1.1"])),
            Protocol::OtherTls
        );
        assert_eq!(inbound(&client_hello(&[])), Protocol::OtherTls);
    }

    #[test]
    fn classifies_http_and_opaque() {
        assert_eq!(http(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(http(b"POS"), Protocol::NeedMore);
        assert_eq!(http(b"POST /x"), Protocol::Http1);
        assert_eq!(http(H2_PREFACE), Protocol::Http2);
        assert_eq!(http(&H2_PREFACE[..10]), Protocol::NeedMore);
        assert_eq!(http(b"\x00\x00\x00\x01"), Protocol::Opaque);
        assert_eq!(http(b"SSH-2.0-OpenSSH"), Protocol::Opaque);
        // A TLS record header with a bogus major version is neither TLS nor HTTP.
        assert_eq!(inbound(b"\x16\x01"), Protocol::Opaque);
    }

    #[test]
    fn never_panics_on_garbage() {
        let mut seed = 7u32;
        for len in 0..600 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            let _ = inbound(&buf);
            let mut tls = vec![0x16, 3, 1, (len >> 8) as u8, len as u8];
            tls.extend_from_slice(&buf);
            let _ = inbound(&tls);
        }
    }
}
