//! One stream over a tunnel connection: DATA/FIN/RESET framing behind `AsyncRead` and
//! `AsyncWrite`, and the rules for handing the connection back for the next stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::frame::{
    header, protocol_error, write_reset, PeerReset, ResetCode, DATA, FIN, MAX_DATA, MAX_FRAME,
    RESET,
};

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
