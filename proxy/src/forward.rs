//! Byte forwarding for opaque streams: a bidirectional copy with half-close, byte counting, and
//! buffers sized to the traffic (1 KiB, growing to 64 KiB only while a direction keeps filling
//! them), plus [`Rewind`] to replay bytes read during protocol detection.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use metrics::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::observe::{Http1Observer, Sink};

/// Watches the bytes of a copy: `a → b` are requests, `b → a` responses.
pub struct Observer<'a> {
    /// The HTTP/1 state machine.
    pub http: Http1Observer,
    /// Where results go.
    pub sink: &'a mut (dyn Sink + Send),
    /// Resolves when the proxy starts draining: the copy then ends as soon as the connection
    /// is between requests, instead of holding an idle keep-alive connection to the end of
    /// the grace period.
    pub drain: Option<Drain>,
}

/// A future that resolves when draining starts.
pub type Drain = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The drain future for `signal` (see [`Observer::drain`]).
pub fn drain(mut signal: tokio::sync::watch::Receiver<bool>) -> Drain {
    Box::pin(async move { moat_core::shutdown::signalled(&mut signal).await })
}

const MIN_BUF: usize = 1024;
const MAX_BUF: usize = 64 * 1024;

/// One direction of a copy.
struct Dir {
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    read_done: bool,
    shut: bool,
    total: u64,
}

impl Dir {
    fn new() -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            end: 0,
            read_done: false,
            shut: false,
            total: 0,
        }
    }

    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        counter: &Counter,
        mut watch: impl FnMut(&[u8]),
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos < self.end {
                let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.pos..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                counter.increment(n as u64);
                self.total += n as u64;
                continue;
            }
            if self.read_done {
                if !self.shut {
                    ready!(w.as_mut().poll_shutdown(cx))?;
                    self.shut = true;
                }
                return Poll::Ready(Ok(()));
            }
            if self.buf.is_empty() {
                self.buf = vec![0; MIN_BUF];
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing buffered is waiting: make sure what we wrote is on its way.
                    ready!(w.as_mut().poll_flush(cx))?;
                    return Poll::Pending;
                }
            }
            let n = rb.filled().len();
            if n == 0 {
                self.read_done = true;
                continue;
            }
            watch(&self.buf[..n]);
            if n == self.buf.len() && self.buf.len() < MAX_BUF {
                // This direction is streaming: read bigger chunks next time.
                let next = (self.buf.len() * 4).min(MAX_BUF);
                self.buf.resize(next, 0);
            }
            self.pos = 0;
            self.end = n;
        }
    }
}

/// Copies both ways until both directions reached EOF, half-closing each side as its peer
/// finishes. Returns (bytes a→b, bytes b→a).
pub async fn copy_bidirectional<A, B>(
    a: &mut A,
    b: &mut B,
    a_to_b: &Counter,
    b_to_a: &Counter,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    copy_observed(a, b, a_to_b, b_to_a, None).await
}

/// [`copy_bidirectional`] with an observer that sees every chunk as it passes.
pub async fn copy_observed<A, B>(
    a: &mut A,
    b: &mut B,
    a_to_b: &Counter,
    b_to_a: &Counter,
    mut obs: Option<Observer<'_>>,
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut ab = Dir::new();
    let mut ba = Dir::new();
    let mut ab_done = false;
    let mut ba_done = false;
    let mut draining = false;
    std::future::poll_fn(|cx| {
        if !ab_done {
            let watch = |bytes: &[u8]| {
                if let Some(o) = obs.as_mut() {
                    o.http.client_bytes(bytes, o.sink);
                }
            };
            if let Poll::Ready(r) = ab.poll(cx, Pin::new(&mut *a), Pin::new(&mut *b), a_to_b, watch)
            {
                r?;
                ab_done = true;
                ab.buf = Vec::new();
            }
        }
        if !ba_done {
            let watch = |bytes: &[u8]| {
                if let Some(o) = obs.as_mut() {
                    o.http.server_bytes(bytes, o.sink);
                }
            };
            if let Poll::Ready(r) = ba.poll(cx, Pin::new(&mut *b), Pin::new(&mut *a), b_to_a, watch)
            {
                r?;
                ba_done = true;
                ba.buf = Vec::new();
            }
        }
        if ab_done && ba_done {
            return Poll::Ready(Ok((ab.total, ba.total)));
        }
        if let Some(o) = obs.as_mut() {
            if !draining {
                if let Some(d) = o.drain.as_mut() {
                    draining = d.as_mut().poll(cx).is_ready();
                }
            }
            // Nothing in flight and nothing buffered on its way: close between requests, with
            // a clean shutdown of both sides so the last response is flushed and both peers
            // see an orderly end rather than a reset.
            if draining && o.http.is_idle() && ab.pos == ab.end && ba.pos == ba.end {
                if !ba.shut {
                    ready!(Pin::new(&mut *a).poll_shutdown(cx))?;
                    ba.shut = true;
                }
                if !ab.shut {
                    ready!(Pin::new(&mut *b).poll_shutdown(cx))?;
                    ab.shut = true;
                }
                return Poll::Ready(Ok((ab.total, ba.total)));
            }
        }
        Poll::Pending
    })
    .await
}

/// The caller's side of a connection that hyper serves, counting what it reads from the caller
/// (`rx`) and writes to it (`tx`), as the byte copy does for `moat_proxy_bytes_total`.
pub struct Counted<IO> {
    inner: IO,
    rx: Counter,
    tx: Counter,
}

impl<IO> Counted<IO> {
    /// Counts `inner`'s traffic in `cm`'s byte counters.
    pub fn new(inner: IO, cm: &crate::metrics::ConnMetrics) -> Self {
        Self::with_counters(inner, cm.rx.clone(), cm.tx.clone())
    }

    fn with_counters(inner: IO, rx: Counter, tx: Counter) -> Self {
        Self { inner, rx, tx }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.rx.increment(n as u64);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.tx.increment(n as u64);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.tx.increment(n as u64);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// An I/O object that first yields `prefix` (bytes already read during detection).
pub struct Rewind<IO> {
    prefix: Vec<u8>,
    pos: usize,
    inner: IO,
}

impl<IO> Rewind<IO> {
    /// Replays `prefix` before reading from `inner`.
    pub fn new(prefix: Vec<u8>, inner: IO) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        let (mut client, mut proxy_a) = tokio::io::duplex(1 << 16);
        let (mut proxy_b, mut server) = tokio::io::duplex(1 << 16);
        let up = metrics::Counter::noop();
        let down = metrics::Counter::noop();
        let copy = tokio::spawn(async move {
            copy_bidirectional(&mut proxy_a, &mut proxy_b, &up, &down).await
        });
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let expected = big.clone();
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(b"bye").await.unwrap();
            server.shutdown().await.unwrap();
            got
        });
        client.write_all(&big).await.unwrap();
        client.shutdown().await.unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"bye");
        assert_eq!(server_task.await.unwrap(), expected);
        assert_eq!(copy.await.unwrap().unwrap(), (300_000, 3));
    }

    #[tokio::test]
    async fn counted_counts_what_the_caller_sent_and_received() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let (rx, tx) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (mut caller, ours) = tokio::io::duplex(64);
        let mut c = Counted::with_counters(
            ours,
            Counter::from_arc(rx.clone()),
            Counter::from_arc(tx.clone()),
        );
        caller.write_all(b"request").await.unwrap();
        let mut buf = [0u8; 7];
        c.read_exact(&mut buf).await.unwrap();
        c.write_all(b"a longer answer").await.unwrap();
        let slices = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
        let n = c.write_vectored(&slices).await.unwrap();
        assert_eq!(rx.load(Ordering::Relaxed), 7);
        assert_eq!(tx.load(Ordering::Relaxed), 15 + n as u64);
    }

    #[tokio::test]
    async fn rewind_replays_prefix_first() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(b"hello".to_vec(), b);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
