//! Replaying an app connection that the peer's app never saw.
//!
//! Why: a pooled tunnel connection stays pinned to the pod it was first dialed to, even when
//! it was dialed through a Service address. When that pod's app has exited (a rolling update:
//! the app stops first, its sidecar last), the peer sidecar answers the next stream with
//! `RESET connect_failed`. That answer guarantees that the app on the other side received no
//! byte, so the stream can be replayed, once, on a freshly dialed connection, which the
//! Service routes to a live endpoint. The app never notices.
//!
//! [`Retrying`] wraps the outbound stream: it records what the app sends until the peer's
//! first byte arrives (at most [`MAX_REPLAY`] bytes; beyond that, or after the first answer,
//! nothing is recorded and nothing can be replayed), and on a `connect_failed` reset it
//! obtains a new stream from its redial function with the recorded bytes (and the app's FIN,
//! if it already sent one) written to it. Every other failure reaches the caller unchanged:
//! only `connect_failed` proves the request was not delivered.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::tunnel::{PeerReset, ResetCode};

/// Most bytes kept for a replay: a request head and a small body.
pub const MAX_REPLAY: usize = 64 * 1024;

/// A new stream with the replayed bytes written (and FIN sent when asked).
pub type Redial<S> = Pin<Box<dyn Future<Output = io::Result<S>> + Send>>;

/// A stream that is replayed on a fresh one when the peer's app refused it (see the module
/// documentation).
pub struct Retrying<S, F> {
    inner: S,
    /// What the app sent, while the peer has sent nothing and it fits; `None` once a replay is
    /// no longer possible.
    sent: Option<Vec<u8>>,
    fin: bool,
    redial: Option<Redial<S>>,
    retries: u8,
    dial: F,
}

impl<S, F> Retrying<S, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Vec<u8>, bool) -> Redial<S> + Unpin,
{
    /// Wraps `inner`; `dial(bytes, fin)` makes a replacement, at most `retries` times.
    pub fn new(inner: S, retries: u8, dial: F) -> Self {
        Self {
            inner,
            sent: Some(Vec::new()),
            fin: false,
            redial: None,
            retries,
            dial,
        }
    }

    fn poll_redial(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(fut) = self.redial.as_mut() {
            let next = ready!(fut.as_mut().poll(cx));
            self.redial = None;
            self.inner = next?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Whether `e` is the peer's proof that its app never received the stream.
fn app_never_saw_it(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|x| x.downcast_ref::<PeerReset>())
        .is_some_and(|r| r.code == ResetCode::ConnectFailed)
}

impl<S, F> AsyncRead for Retrying<S, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Vec<u8>, bool) -> Redial<S> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            ready!(this.poll_redial(cx))?;
            let before = buf.filled().len();
            match ready!(Pin::new(&mut this.inner).poll_read(cx, buf)) {
                Ok(()) => {
                    if buf.filled().len() > before {
                        // The peer answered: from here on the stream is the app's.
                        this.sent = None;
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if this.retries > 0 && app_never_saw_it(&e) => {
                    let Some(sent) = this.sent.clone() else {
                        return Poll::Ready(Err(e));
                    };
                    this.retries -= 1;
                    metrics::counter!(crate::metrics::STREAM_RETRIES).increment(1);
                    tracing::debug!(error = %e, replayed = sent.len(), "the peer's app refused the stream; replaying it on a fresh connection");
                    this.redial = Some((this.dial)(sent, this.fin));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<S, F> AsyncWrite for Retrying<S, F>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut(Vec<u8>, bool) -> Redial<S> + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_redial(cx))?;
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        if let Some(sent) = this.sent.as_mut() {
            if sent.len() + n > MAX_REPLAY {
                this.sent = None;
            } else {
                sent.extend_from_slice(&buf[..n]);
            }
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_redial(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_redial(cx))?;
        this.fin = true;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::{self, Stream};
    use std::sync::{Arc, Mutex};
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    type Replays = Arc<Mutex<Vec<(Vec<u8>, bool)>>>;

    /// A redial that records what it was asked to replay and connects to a server answering
    /// `answer` after reading the replayed request.
    fn redial(
        replays: Replays,
        answer: &'static [u8],
    ) -> impl FnMut(Vec<u8>, bool) -> Redial<Stream<DuplexStream>> + Unpin {
        move |bytes, fin| {
            replays.lock().unwrap().push((bytes.clone(), fin));
            Box::pin(async move {
                let (client, server) = duplex(1 << 16);
                let want = bytes.clone();
                tokio::spawn(async move {
                    let mut s = Stream::new(server);
                    let mut got = vec![0; want.len()];
                    s.read_exact(&mut got).await.unwrap();
                    assert_eq!(got, want);
                    s.write_all(answer).await.unwrap();
                    s.shutdown().await.unwrap();
                    let _ = s.drain_to_fin().await;
                });
                let mut s = Stream::new(client);
                s.write_all(&bytes).await?;
                if fin {
                    s.shutdown().await?;
                }
                Ok(s)
            })
        }
    }

    /// A peer sidecar whose app refuses: reads the request, answers RESET `code`.
    fn refusing_peer(mut server: DuplexStream, code: ResetCode) {
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let _ = server.read(&mut buf).await;
            tunnel::write_reset(&mut server, code, "app port 8080: Connection refused")
                .await
                .unwrap();
        });
    }

    #[tokio::test]
    async fn a_stream_the_peer_app_never_saw_is_replayed_once() {
        let (client, server) = duplex(1 << 16);
        refusing_peer(server, ResetCode::ConnectFailed);
        let replays = Replays::default();
        let mut s = Retrying::new(
            Stream::new(client),
            1,
            redial(replays.clone(), b"HTTP/1.1 200 OK\r\n\r\n"),
        );
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(
            *replays.lock().unwrap(),
            vec![(b"GET / HTTP/1.1\r\n\r\n".to_vec(), false)]
        );
    }

    #[tokio::test]
    async fn other_resets_reach_the_app() {
        for code in [ResetCode::Denied, ResetCode::Closed, ResetCode::Error] {
            let (client, server) = duplex(1 << 16);
            refusing_peer(server, code);
            let replays = Replays::default();
            let mut s = Retrying::new(Stream::new(client), 1, redial(replays.clone(), b"no"));
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let mut answer = Vec::new();
            let e = s.read_to_end(&mut answer).await.unwrap_err();
            assert!(
                e.get_ref()
                    .and_then(|x| x.downcast_ref::<PeerReset>())
                    .is_some(),
                "{code:?}: {e}"
            );
            assert!(replays.lock().unwrap().is_empty(), "{code:?} was replayed");
        }
    }

    #[tokio::test]
    async fn no_replay_once_the_peer_answered_or_too_much_was_sent() {
        // The peer answered some bytes before refusing: the app has seen the stream.
        let (client, mut server) = duplex(1 << 16);
        tokio::spawn(async move {
            // DATA "hello", then the refusal.
            server.write_all(&[tunnel::DATA, 0, 0, 5]).await.unwrap();
            server.write_all(b"hello").await.unwrap();
            tunnel::write_reset(&mut server, ResetCode::ConnectFailed, "late")
                .await
                .unwrap();
        });
        let replays = Replays::default();
        let mut s = Retrying::new(Stream::new(client), 1, redial(replays.clone(), b"no"));
        let mut answer = Vec::new();
        assert!(s.read_to_end(&mut answer).await.is_err());
        assert_eq!(answer, b"hello");
        assert!(replays.lock().unwrap().is_empty());

        // More than MAX_REPLAY bytes sent: nothing to replay from.
        let (client, server) = duplex(1 << 20);
        refusing_peer(server, ResetCode::ConnectFailed);
        let mut s = Retrying::new(Stream::new(client), 1, redial(replays.clone(), b"no"));
        s.write_all(&vec![b'x'; MAX_REPLAY + 1]).await.unwrap();
        assert!(s.read_to_end(&mut answer).await.is_err());
        assert!(replays.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_apps_fin_is_replayed_too() {
        let (client, server) = duplex(1 << 16);
        refusing_peer(server, ResetCode::ConnectFailed);
        let replays = Replays::default();
        let mut s = Retrying::new(Stream::new(client), 1, redial(replays.clone(), b"bye"));
        s.write_all(b"QUIT\n").await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"bye");
        assert_eq!(*replays.lock().unwrap(), vec![(b"QUIT\n".to_vec(), true)]);
    }
}
