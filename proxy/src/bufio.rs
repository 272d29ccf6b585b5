//! A read buffer under rustls.
//!
//! rustls asks its transport for at most 4 KiB per read, so a 16 KiB TLS record costs four
//! system calls. This wrapper reads up to 64 KiB per call while data keeps coming and hands
//! rustls its 4 KiB slices from memory. The buffer is released whenever it is empty, so an
//! idle connection holds none.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = 64 * 1024;

/// An I/O object whose reads go through an adaptive buffer.
#[derive(Debug)]
pub struct BufIo<T> {
    inner: T,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Size of the next buffer: doubles while reads fill it.
    next: usize,
}

impl<T> BufIo<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            next: MIN_READ,
        }
    }

    /// The wrapped stream, dropping anything buffered.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Whether bytes were read from the socket but not yet consumed.
    pub fn has_buffered(&self) -> bool {
        self.pos < self.end
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BufIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if this.pos == this.end {
            if out.remaining() >= this.next {
                // Large reads go straight to the caller.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if this.buf.len() != this.next {
                this.buf = vec![0; this.next];
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            this.next = if n == this.buf.len() {
                (this.next * 2).min(MAX_READ)
            } else {
                (n.next_power_of_two()).clamp(MIN_READ, MAX_READ)
            };
            this.pos = 0;
            this.end = n;
            if n == 0 {
                this.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
        }
        let n = (this.end - this.pos).min(out.remaining());
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        if this.pos == this.end {
            this.buf = Vec::new();
            this.pos = 0;
            this.end = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BufIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn delivers_every_byte_in_order_through_small_and_large_reads() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..500_000u32).map(|i| (i * 7) as u8).collect();
        let expected = data.clone();
        tokio::spawn(async move {
            a.write_all(&data).await.unwrap();
        });
        let mut r = BufIo::new(b);
        let mut got = Vec::new();
        let mut small = [0u8; 100];
        let mut large = vec![0u8; 100_000];
        while got.len() < expected.len() {
            let n = if got.len() % 2 == 0 {
                r.read(&mut small).await.unwrap()
            } else {
                r.read(&mut large).await.unwrap()
            };
            let chunk = if got.len() % 2 == 0 {
                &small[..n]
            } else {
                &large[..n]
            };
            got.extend_from_slice(chunk);
        }
        assert_eq!(got, expected);
    }
}
