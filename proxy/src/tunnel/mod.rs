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
//!
//! [`frame`] encodes and decodes frames; [`stream`] is the per-stream state machine that turns
//! them into `AsyncRead`/`AsyncWrite` and decides when a connection may be reused.

mod frame;
mod stream;

pub use frame::{
    read_open, write_open, write_reset, PeerReset, ResetCode, DATA, FIN, MAX_DATA, OPEN, RESET,
};
pub use stream::{Home, Stream};

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::pin::Pin;
    use std::task::{ready, Context, Poll};

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

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
            let wire = s.get_ref().unwrap().out.clone();
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
