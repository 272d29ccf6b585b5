//! A minimal blocking HTTP/1.1 client for the load generators: one `GET`, one response framed
//! by `Content-Length` (what the nginx backend sends). Blocking sockets on plain threads keep
//! the generator's own overhead small and its timing precise.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The keep-alive request every workload sends.
pub const GET: &[u8] = b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n";
/// The same request asking the server to close the connection after answering.
pub const GET_CLOSE: &[u8] = b"GET /1k HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

/// One client connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    filled: usize,
}

impl Conn {
    /// Connects with `timeout` for the connect and for every later read and write.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            stream,
            buf: vec![0; 2048],
            filled: 0,
        })
    }

    /// Sends `request` and reads its response; returns the status code.
    pub fn request(&mut self, request: &[u8]) -> io::Result<u16> {
        self.stream.write_all(request)?;
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            let parsed = resp
                .parse(&self.buf[..self.filled])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if let httparse::Status::Complete(head) = parsed {
                let status = resp.code.unwrap_or(0);
                let body = content_length(resp.headers)?;
                let total = head + body;
                while self.filled < total {
                    self.fill()?;
                }
                self.buf.copy_within(total..self.filled, 0);
                self.filled -= total;
                return Ok(status);
            }
            self.fill()?;
        }
    }

    /// Waits until the server closes the connection (after a `Connection: close` response), so
    /// the server side holds the TIME_WAIT state, as with a real client.
    pub fn wait_close(mut self) -> io::Result<()> {
        let mut scratch = [0u8; 512];
        loop {
            if self.stream.read(&mut scratch)? == 0 {
                return Ok(());
            }
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.filled == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        match self.stream.read(&mut self.buf[self.filled..])? {
            0 => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the response ended",
            )),
            n => {
                self.filled += n;
                Ok(())
            }
        }
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> io::Result<usize> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "response without a valid Content-Length",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn reads_pipelined_responses_split_across_reads() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = [0u8; 256];
            let _ = s.read(&mut req).unwrap();
            // Two responses, the first one split mid-header.
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(b"ngth: 3\r\n\r\nabcHTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
            let _ = s.read(&mut req).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        });
        let mut c = Conn::connect(addr, Duration::from_secs(2)).unwrap();
        assert_eq!(c.request(GET).unwrap(), 200);
        assert_eq!(c.request(b"").unwrap(), 404);
        let err = c.request(GET).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        server.join().unwrap();
    }
}
