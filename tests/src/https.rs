//! A small HTTPS client for the CA's API: TLS 1.3 with the trust bundle as roots, HTTP/1.1
//! over one keep-alive connection ([`Http1Client`]), and a raw connection for requests no
//! well-behaved client would send ([`RawConn`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use moat_core::api::ApiError;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Client TLS configuration trusting the roots in `bundle_pem`: TLS 1.3, Moat's provider,
/// ALPN `http/1.1`.
pub fn client_config(bundle_pem: &[u8]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    client_config_alpn(bundle_pem, &[b"http/1.1"])
}

/// Like [`client_config`], offering the ALPN protocols `alpn` (e.g. `h2`).
pub fn client_config_alpn(
    bundle_pem: &[u8],
    alpn: &[&[u8]],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let bundle = moat_core::TrustBundle::from_pem(bundle_pem).context("trust bundle")?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(moat_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(bundle.root_store())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Connects to `addr` and completes a TLS handshake, verifying the server for its IP address.
pub async fn connect_tls(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    connect_tls_to(addr, ServerName::IpAddress(addr.ip().into()), cfg).await
}

/// Connects to `addr` and completes a TLS handshake, verifying the server for `name` (e.g. a
/// Service's DNS name reached at its cluster IP).
pub async fn connect_tls_to(
    addr: SocketAddr,
    name: ServerName<'static>,
    cfg: Arc<rustls::ClientConfig>,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr}"))
}

/// A complete HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Reply {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "status {} body is not the expected JSON: {}",
                self.status,
                self.text()
            )
        })
    }

    /// The body as the API's error object.
    pub fn api_error(&self) -> anyhow::Result<ApiError> {
        self.json()
    }

    /// A header's value as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One keep-alive HTTP/1.1 connection over TLS.
pub struct Http1Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    conn: tokio::task::JoinHandle<()>,
    authority: String,
}

impl Http1Client {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> anyhow::Result<Self> {
        Self::over(connect_tls(addr, cfg).await?, addr).await
    }

    /// Connects to `addr`, verifying the server for `name`.
    pub async fn connect_to(
        addr: SocketAddr,
        name: ServerName<'static>,
        cfg: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        Self::over(connect_tls_to(addr, name, cfg).await?, addr).await
    }

    async fn over(tls: TlsStream<TcpStream>, addr: SocketAddr) -> anyhow::Result<Self> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .context("HTTP/1.1 handshake")?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Self {
            sender,
            conn,
            authority: addr.to_string(),
        })
    }

    /// The `Host` to send.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Sends `req` (a `Host` header is added when missing) and reads the whole answer.
    pub async fn send(&mut self, mut req: http::Request<Full<Bytes>>) -> anyhow::Result<Reply> {
        if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut().insert(
                http::header::HOST,
                http::HeaderValue::from_str(&self.authority)?,
            );
        }
        self.sender.ready().await.context("connection closed")?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .context("sending request")?;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.context("reading body")?.to_bytes();
        Ok(Reply {
            status,
            headers: parts.headers,
            body,
        })
    }

    /// Whether the connection can take another request.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

impl Drop for Http1Client {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

/// `POST /v1/certificates` with an optional bearer token and a JSON body.
pub fn certificate_request(
    token: Option<&str>,
    body: impl Into<Bytes>,
) -> anyhow::Result<http::Request<Full<Bytes>>> {
    let mut b = http::Request::post(moat_core::api::CERTIFICATES_PATH)
        .header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        b = b.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    Ok(b.body(Full::new(body.into()))?)
}

/// The JSON body `{"csr": "<pem>"}`.
pub fn csr_body(csr_pem: &str) -> Bytes {
    Bytes::from(
        serde_json::to_vec(&moat_core::api::CertificateRequest {
            csr: csr_pem.to_string(),
        })
        .unwrap_or_default(),
    )
}

/// A TLS connection on which the test writes bytes itself and reads one HTTP/1.1 answer:
/// partial requests, lying `Content-Length`s, endless chunked bodies.
pub struct RawConn {
    stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl RawConn {
    /// Connects to `addr`.
    pub async fn connect(addr: SocketAddr, cfg: Arc<rustls::ClientConfig>) -> anyhow::Result<Self> {
        Ok(Self {
            stream: connect_tls(addr, cfg).await?,
            buf: Vec::new(),
        })
    }

    /// Writes and flushes `bytes`.
    pub async fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads one answer (`Content-Length` framed, or up to EOF), within `timeout`.
    pub async fn read_reply(&mut self, timeout: Duration) -> anyhow::Result<Reply> {
        tokio::time::timeout(timeout, self.read_reply_inner())
            .await
            .with_context(|| format!("no complete answer within {timeout:?}"))?
    }

    async fn read_reply_inner(&mut self) -> anyhow::Result<Reply> {
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(r) = try_parse(&self.buf)? {
                let used = r.1;
                self.buf.drain(..used);
                return Ok(r.0);
            }
            let n = match self.stream.read(&mut chunk).await {
                Ok(n) => n,
                // A peer closing without close_notify still delivered what it sent.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(e).context("reading answer"),
            };
            if n == 0 {
                return match parse_until_eof(&self.buf)? {
                    Some(r) => {
                        self.buf.clear();
                        Ok(r)
                    }
                    None => bail!(
                        "connection closed before a complete answer ({} bytes: {:?})",
                        self.buf.len(),
                        String::from_utf8_lossy(&self.buf)
                    ),
                };
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Parses the head; returns (status, headers, head length).
fn parse_head(buf: &[u8]) -> anyhow::Result<Option<(u16, http::HeaderMap, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
    let mut headers = http::HeaderMap::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            headers.append(
                http::HeaderName::from_bytes(k.trim().as_bytes())?,
                http::HeaderValue::from_str(v.trim())?,
            );
        }
    }
    Ok(Some((status, headers, end + 4)))
}

fn try_parse(buf: &[u8]) -> anyhow::Result<Option<(Reply, usize)>> {
    let Some((status, headers, head_len)) = parse_head(buf)? else {
        return Ok(None);
    };
    let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return Ok(None);
    };
    if buf.len() < head_len + len {
        return Ok(None);
    }
    let body = Bytes::copy_from_slice(&buf[head_len..head_len + len]);
    Ok(Some((
        Reply {
            status,
            headers,
            body,
        },
        head_len + len,
    )))
}

fn parse_until_eof(buf: &[u8]) -> anyhow::Result<Option<Reply>> {
    let Some((status, headers, head_len)) = parse_head(buf)? else {
        return Ok(None);
    };
    Ok(Some(Reply {
        status,
        headers,
        body: Bytes::copy_from_slice(&buf[head_len..]),
    }))
}
