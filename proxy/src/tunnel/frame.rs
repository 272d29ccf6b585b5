//! Tunnel frames: `type: u8 | length: u24 (big endian) | payload`, and the OPEN and RESET
//! frames written and read outside a [`Stream`](super::Stream).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frame type: start of a stream.
pub const OPEN: u8 = 1;
/// Frame type: stream data.
pub const DATA: u8 = 2;
/// Frame type: half-close.
pub const FIN: u8 = 3;
/// Frame type: abort.
pub const RESET: u8 = 4;
/// Largest DATA payload we send: two TLS records, written with one system call.
pub const MAX_DATA: usize = 32 * 1024;
/// Largest frame we accept (DATA, or a RESET reason).
pub(super) const MAX_FRAME: usize = 64 * 1024;
/// Longest RESET reason kept.
const MAX_REASON: usize = 256;

/// Why the peer reset a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ResetCode {
    /// Authorization policy denied the caller.
    Denied = 1,
    /// The destination app refused or could not be reached.
    ConnectFailed = 2,
    /// The proxy is shutting down or the connection was revoked.
    Closed = 3,
    /// Protocol violation or local error.
    Error = 4,
}

impl ResetCode {
    pub(super) fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Denied,
            2 => Self::ConnectFailed,
            3 => Self::Closed,
            _ => Self::Error,
        }
    }

    /// Short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Denied => "denied",
            Self::ConnectFailed => "connect_failed",
            Self::Closed => "closed",
            Self::Error => "error",
        }
    }
}

/// The peer's reset, carried as the source of an `io::Error` of kind `ConnectionReset`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("stream reset by peer sidecar ({}): {reason}", code.label())]
pub struct PeerReset {
    /// Why.
    pub code: ResetCode,
    /// Human-readable reason from the peer.
    pub reason: String,
}

pub(super) fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("moat tunnel: {}", msg.into()),
    )
}

pub(super) fn header(kind: u8, len: usize) -> [u8; 4] {
    let l = (len as u32).to_be_bytes();
    [kind, l[1], l[2], l[3]]
}

/// Writes an OPEN frame.
pub async fn write_open<W: AsyncWrite + Unpin>(w: &mut W, port: u16) -> io::Result<()> {
    let p = port.to_be_bytes();
    let h = header(OPEN, 2);
    w.write_all(&[h[0], h[1], h[2], h[3], p[0], p[1]]).await
}

/// Reads the OPEN frame that starts a stream; `Ok(None)` on a clean end of connection.
pub async fn read_open<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<u16>> {
    let mut h = [0u8; 4];
    match r.read_exact(&mut h[..1]).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    r.read_exact(&mut h[1..]).await?;
    let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
    if h[0] != OPEN || len != 2 {
        return Err(protocol_error(format!(
            "expected OPEN, got frame type {} length {len}",
            h[0]
        )));
    }
    let mut p = [0u8; 2];
    r.read_exact(&mut p).await?;
    Ok(Some(u16::from_be_bytes(p)))
}

/// Writes a RESET frame (the connection must not be reused afterwards).
pub async fn write_reset<W: AsyncWrite + Unpin>(
    w: &mut W,
    code: ResetCode,
    reason: &str,
) -> io::Result<()> {
    let reason = truncate(reason, MAX_REASON);
    let mut buf = Vec::with_capacity(5 + reason.len());
    buf.extend_from_slice(&header(RESET, 1 + reason.len()));
    buf.push(code as u8);
    buf.extend_from_slice(reason.as_bytes());
    w.write_all(&buf).await?;
    w.flush().await
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
