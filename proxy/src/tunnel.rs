//! The Moat tunnel protocol (ALPN `moat/1`): many app connections, one after another, over one
//! mutual-TLS connection between two sidecars.
//!
//! Why: a new app connection should not pay a full mTLS handshake when the two sidecars already
//! trust each other. Pooled connections carry one stream at a time (no multiplexing), so bulk
//! transfers keep the whole TLS connection and pay only a 4-byte frame header per 32 KiB.
//!
//! Every frame is `type: u8 | length: u24 (big endian) | payload`:
//!
//! | type | payload | meaning |
//! |------|---------|---------|
//! | `OPEN` (1)  | `port: u16` | client starts a stream to `port` on the server's pod (0 = the port the TLS connection was addressed to) |
//! | `DATA` (2)  | bytes, 1..=64 KiB (senders use up to 32 KiB) | stream data |
//! | `FIN` (3)   | — | this direction is finished (TCP half-close) |
//! | `RESET` (4) | `code: u8`, UTF-8 reason | the stream is aborted; the connection is not reused |
//!
//! A stream is complete when each side has sent and received `FIN`; only then does the TLS
//! connection go back to the pool (client) or wait for the next `OPEN` (server).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

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
const MAX_FRAME: usize = 64 * 1024;
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
    fn from_u8(v: u8) -> Self {
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

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("moat tunnel: {}", msg.into()),
    )
}

fn header(kind: u8, len: usize) -> [u8; 4] {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    /// Reading a frame header; `n` bytes of it so far.
    Header(usize),
    /// Inside a DATA frame with this many payload bytes left.
    Data(usize),
    /// Reading a RESET payload of this length; `n` bytes so far.
    Reset { len: usize, n: usize },
    /// FIN received.
    Fin,
    /// RESET received or protocol error: the stream is dead.
    Failed,
}

/// Where a connection goes when its stream completes cleanly: back to the client's pool, or
/// back to the server's loop waiting for the next OPEN.
pub type Home<IO> = Box<dyn FnOnce(IO) + Send>;

/// One stream over a tunnel connection. Implements `AsyncRead`/`AsyncWrite` so that hyper or a
/// byte copy can use it like a socket; `shutdown` sends FIN.
///
/// Whoever owns the stream (hyper, a copy loop) simply drops it when done: if both sides
/// finished cleanly, the connection goes [`Home`]; if only our side finished, a short task
/// waits for the peer's FIN first; anything else closes the connection.
pub struct Stream<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    io: Option<IO>,
    home: Option<Home<IO>>,
    rstate: ReadState,
    rhdr: [u8; 4],
    reset_buf: Vec<u8>,
    /// Encoded frames not yet accepted by `io`.
    wbuf: Vec<u8>,
    wpos: usize,
    fin_sent: bool,
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "moat tunnel: connection already released",
    )
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream<IO> {
    /// Wraps a connection positioned at the start of a stream's data (after OPEN).
    pub fn new(io: IO) -> Self {
        Self::with_home(io, None)
    }

    /// Like [`Stream::new`], returning the connection to `home` once the stream completes.
    pub fn with_home(io: IO, home: Option<Home<IO>>) -> Self {
        Self {
            io: Some(io),
            home,
            rstate: ReadState::Header(0),
            rhdr: [0; 4],
            reset_buf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            fin_sent: false,
        }
    }

    /// Whether both directions finished cleanly, so the connection can carry another stream.
    pub fn is_reusable(&self) -> bool {
        self.fin_sent && self.rstate == ReadState::Fin && self.wpos >= self.wbuf.len()
    }

    /// Whether the peer has finished sending.
    pub fn peer_finished(&self) -> bool {
        self.rstate == ReadState::Fin
    }

    /// Gives the connection back, if the stream completed cleanly.
    pub fn into_reusable(mut self) -> Option<IO> {
        if self.is_reusable() {
            self.home = None;
            self.io.take()
        } else {
            None
        }
    }

    /// The underlying connection.
    pub fn get_ref(&self) -> Option<&IO> {
        self.io.as_ref()
    }

    /// Sends RESET on this stream; the connection will not be reused.
    pub async fn reset(&mut self, code: ResetCode, reason: &str) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_drain(cx)).await?;
        self.rstate = ReadState::Failed;
        self.home = None;
        let io = self.io.as_mut().ok_or_else(closed)?;
        write_reset(io, code, reason).await
    }

    /// Reads until the peer's FIN, discarding data (used to complete a stream before reuse).
    pub async fn drain_to_fin(&mut self) -> io::Result<()> {
        let mut sink = [0u8; 1024];
        while !self.peer_finished() {
            if self.read(&mut sink).await? == 0 && !self.peer_finished() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }

    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let io = self.io.as_mut().ok_or_else(closed)?;
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > 16 * 1024 {
            // Bulk bursts do not pin 32 KiB per connection once they are over.
            self.wbuf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Stream<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(io) = this.io.as_mut() else {
            return Poll::Ready(Err(closed()));
        };
        loop {
            match this.rstate {
                ReadState::Fin => return Poll::Ready(Ok(())),
                ReadState::Failed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "moat tunnel stream already failed",
                    )))
                }
                ReadState::Data(left) => {
                    if buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    let want = left.min(buf.remaining());
                    let mut sub = ReadBuf::new(buf.initialize_unfilled_to(want));
                    if let Err(e) = ready!(Pin::new(&mut *io).poll_read(cx, &mut sub)) {
                        this.rstate = ReadState::Failed;
                        return Poll::Ready(Err(e));
                    }
                    let n = sub.filled().len();
                    if n == 0 {
                        this.rstate = ReadState::Failed;
                        return Poll::Ready(Err(protocol_error(
                            "connection closed inside a DATA frame",
                        )));
                    }
                    buf.advance(n);
                    this.rstate = if left == n {
                        ReadState::Header(0)
                    } else {
                        ReadState::Data(left - n)
                    };
                    return Poll::Ready(Ok(()));
                }
                ReadState::Header(got) => {
                    let mut hb = ReadBuf::new(&mut this.rhdr[got..]);
                    if let Err(e) = ready!(Pin::new(&mut *io).poll_read(cx, &mut hb)) {
                        this.rstate = ReadState::Failed;
                        return Poll::Ready(Err(e));
                    }
                    let n = hb.filled().len();
                    if n == 0 {
                        this.rstate = ReadState::Failed;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "moat tunnel: peer closed the connection without finishing the stream",
                        )));
                    }
                    if got + n < 4 {
                        this.rstate = ReadState::Header(got + n);
                        continue;
                    }
                    let h = this.rhdr;
                    let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
                    match h[0] {
                        DATA if (1..=MAX_FRAME).contains(&len) => {
                            this.rstate = ReadState::Data(len)
                        }
                        FIN if len == 0 => this.rstate = ReadState::Fin,
                        RESET if (1..=MAX_FRAME).contains(&len) => {
                            this.reset_buf = vec![0; len];
                            this.rstate = ReadState::Reset { len, n: 0 };
                        }
                        other => {
                            this.rstate = ReadState::Failed;
                            return Poll::Ready(Err(protocol_error(format!(
                                "unexpected frame type {other} with length {len}"
                            ))));
                        }
                    }
                }
                ReadState::Reset { len, n } => {
                    let mut rb = ReadBuf::new(&mut this.reset_buf[n..len]);
                    if let Err(e) = ready!(Pin::new(&mut *io).poll_read(cx, &mut rb)) {
                        this.rstate = ReadState::Failed;
                        return Poll::Ready(Err(e));
                    }
                    let got = rb.filled().len();
                    if got == 0 {
                        this.rstate = ReadState::Failed;
                        return Poll::Ready(Err(protocol_error("connection closed inside RESET")));
                    }
                    if n + got < len {
                        this.rstate = ReadState::Reset { len, n: n + got };
                        continue;
                    }
                    this.rstate = ReadState::Failed;
                    let code = ResetCode::from_u8(this.reset_buf[0]);
                    let reason = String::from_utf8_lossy(&this.reset_buf[1..]).into_owned();
                    this.reset_buf = Vec::new();
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        PeerReset { code, reason },
                    )));
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Stream<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.fin_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "moat tunnel: write after shutdown",
            )));
        }
        ready!(this.poll_drain(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = data.len().min(MAX_DATA);
        let hdr = header(DATA, n);
        let io = this.io.as_mut().ok_or_else(closed)?;
        // Header and payload go to TLS in one vectored write, so the payload is copied once,
        // straight into the record being encrypted.
        let frame = [io::IoSlice::new(&hdr), io::IoSlice::new(&data[..n])];
        let written = ready!(Pin::new(io).poll_write_vectored(cx, &frame))?;
        if written == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        // A frame must go out whole before anything else: stage what TLS did not take (sized
        // to it, so a small remainder costs little) and report the payload as accepted.
        if written < hdr.len() {
            this.wbuf.extend_from_slice(&hdr[written..]);
            this.wbuf.extend_from_slice(&data[..n]);
        } else if written < hdr.len() + n {
            this.wbuf.extend_from_slice(&data[written - hdr.len()..n]);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        let io = this.io.as_mut().ok_or_else(closed)?;
        Pin::new(io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.fin_sent {
            ready!(this.poll_drain(cx))?;
            this.wbuf.extend_from_slice(&header(FIN, 0));
            this.fin_sent = true;
        }
        ready!(this.poll_drain(cx))?;
        if this.wbuf.capacity() > 4096 {
            this.wbuf = Vec::new();
        }
        // Flush, but do not shut the connection down: it may carry the next stream.
        let io = this.io.as_mut().ok_or_else(closed)?;
        Pin::new(io).poll_flush(cx)
    }
}

/// How long a finished stream waits for the peer's FIN before giving up on reuse.
const FIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for Stream<IO> {
    fn drop(&mut self) {
        let (Some(io), Some(home)) = (self.io.take(), self.home.take()) else {
            return;
        };
        let clean_write = self.fin_sent && self.wpos >= self.wbuf.len();
        match self.rstate {
            ReadState::Fin if clean_write => home(io),
            ReadState::Header(_) | ReadState::Data(_) if clean_write => {
                // Our side is done; the peer's FIN may still be in flight.
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let rest = Stream {
                    io: Some(io),
                    home: Some(home),
                    rstate: self.rstate,
                    rhdr: self.rhdr,
                    reset_buf: Vec::new(),
                    wbuf: Vec::new(),
                    wpos: 0,
                    fin_sent: true,
                };
                rt.spawn(async move {
                    let mut rest = rest;
                    let finished = matches!(
                        tokio::time::timeout(FIN_WAIT, rest.drain_to_fin()).await,
                        Ok(Ok(()))
                    );
                    if !finished {
                        // Dropping `rest` must close the connection, not try again.
                        rest.home = None;
                    }
                });
            }
            // Mid-stream drop, reset or protocol error: the connection is not trustworthy.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streams_round_trip_and_connection_is_reused() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = b;
            let mut ports = Vec::new();
            while let Some(port) = read_open(&mut conn).await.unwrap() {
                ports.push(port);
                let mut s = Stream::new(conn);
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                s.write_all(&got).await.unwrap();
                s.shutdown().await.unwrap();
                conn = s.into_reusable().expect("clean stream");
            }
            ports
        });
        let mut conn = a;
        for (i, size) in [0usize, 1, 100, 40_000].into_iter().enumerate() {
            write_open(&mut conn, 8000 + i as u16).await.unwrap();
            let mut s = Stream::new(conn);
            let data: Vec<u8> = (0..size).map(|x| (x % 251) as u8).collect();
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            let mut echo = Vec::new();
            s.read_to_end(&mut echo).await.unwrap();
            assert_eq!(echo, data);
            conn = s.into_reusable().expect("clean stream");
        }
        drop(conn);
        assert_eq!(server.await.unwrap(), vec![8000, 8001, 8002, 8003]);
    }

    #[tokio::test]
    async fn reset_surfaces_as_connection_reset_with_reason() {
        let (a, mut b) = tokio::io::duplex(4096);
        write_reset(&mut b, ResetCode::Denied, "rule deny-batch")
            .await
            .unwrap();
        let mut s = Stream::new(a);
        let err = s.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        let reset = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<PeerReset>())
            .unwrap();
        assert_eq!(reset.code, ResetCode::Denied);
        assert_eq!(reset.reason, "rule deny-batch");
        assert!(!s.is_reusable());
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error_not_a_panic() {
        for bytes in [
            &[9u8, 0, 0, 1, 0][..],
            &[DATA, 0xff, 0xff, 0xff],
            &[FIN, 0, 0, 5],
        ] {
            let (a, mut b) = tokio::io::duplex(4096);
            b.write_all(bytes).await.unwrap();
            drop(b);
            let mut s = Stream::new(a);
            let err = s.read(&mut [0u8; 16]).await.unwrap_err();
            assert!(
                matches!(
                    err.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ),
                "{err}"
            );
        }
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(&[DATA, 0, 0, 2]).await.unwrap();
        let mut conn = a;
        assert!(read_open(&mut conn).await.is_err());
    }

    /// Like TLS over a dead socket: EOF surfaces as an error, not as a zero-length read.
    struct ErrOnEof(tokio::io::DuplexStream);

    impl AsyncRead for ErrOnEof {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            ready!(Pin::new(&mut self.0).poll_read(cx, buf))?;
            if buf.filled().len() == before {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for ErrOnEof {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_peer_that_vanishes_after_our_fin_closes_the_connection_once() {
        let (a, b) = tokio::io::duplex(4096);
        let a = ErrOnEof(a);
        let homed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = homed.clone();
        let mut s = Stream::with_home(
            a,
            Some(Box::new(move |_io| {
                flag.store(true, std::sync::atomic::Ordering::SeqCst)
            })),
        );
        s.write_all(b"request").await.unwrap();
        s.shutdown().await.unwrap();
        drop(s); // our side finished; the peer's FIN is awaited in the background
        drop(b); // ...but the peer goes away without one
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !homed.load(std::sync::atomic::Ordering::SeqCst),
            "a broken connection went back to the pool"
        );
        let alive = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(
            alive, 0,
            "the background FIN wait must end, not respawn itself"
        );
    }

    /// Accepts at most `step` bytes per write, across vectored slices, like a TLS layer whose
    /// buffer is nearly full.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = self.step;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                self.out.extend_from_slice(&b[..take]);
                (left, n) = (left - take, n + take);
            }
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_stay_whole_when_the_transport_takes_odd_amounts() {
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        for step in [1, 3, 4, 5, 4099, 40_000] {
            let mut s = Stream::new(Trickle {
                out: Vec::new(),
                step,
            });
            for chunk in payload.chunks(7_000) {
                s.write_all(chunk).await.unwrap();
            }
            s.shutdown().await.unwrap();
            let wire = std::mem::take(&mut s.io.as_mut().unwrap().out);
            // Decode: DATA frames carrying the payload in order, then FIN.
            let (mut at, mut got) = (0, Vec::new());
            loop {
                let (kind, len) = (
                    wire[at],
                    u32::from_be_bytes([0, wire[at + 1], wire[at + 2], wire[at + 3]]) as usize,
                );
                at += 4;
                if kind == FIN {
                    break;
                }
                assert_eq!(kind, DATA, "step {step}");
                got.extend_from_slice(&wire[at..at + len]);
                at += len;
            }
            assert_eq!(at, wire.len(), "step {step}: bytes after FIN");
            assert_eq!(got, payload, "step {step}");
        }
    }
}
