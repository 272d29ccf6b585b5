//! App probes rewritten by the injector: the kubelet asks the admin port
//! (`/app-health/<container>/<probe>`), and the proxy runs the original probe against the app
//! over loopback, which is never redirected. This keeps probes working under strict mTLS
//! without admitting unauthenticated callers.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

/// One original probe.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Probe {
    /// `httpGet`: success is a status in 200..400.
    Http {
        /// App port.
        port: u16,
        /// Request path.
        #[serde(default = "root")]
        path: String,
        /// `HTTP` or `HTTPS` (HTTPS is checked as a TCP connect: the kubelet does not verify
        /// probe certificates either, and the proxy will not speak TLS without verifying).
        #[serde(default)]
        scheme: Option<String>,
        /// Extra request headers.
        #[serde(default)]
        headers: Vec<Header>,
    },
    /// `tcpSocket`: success is an accepted connection.
    Tcp {
        /// App port.
        port: u16,
    },
}

fn root() -> String {
    "/".into()
}

/// A probe header.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// `MOAT_APP_PROBES` could not be read.
#[derive(Debug, thiserror::Error)]
#[error("MOAT_APP_PROBES is not valid probe JSON: {0}")]
pub struct ProbesError(#[source] serde_json::Error);

/// Why an app probe failed: the body of the 503 the kubelet gets.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing accepted the connection on the app's port.
    #[error("connect to 127.0.0.1:{port}: {source}")]
    Connect {
        /// The app port.
        port: u16,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// The app accepted but the HTTP exchange failed.
    #[error("HTTP probe failed: {0}")]
    Http(#[source] hyper::Error),
    /// The probe's path or headers do not make a valid request.
    #[error("bad probe request: {0}")]
    Request(#[source] http::Error),
    /// The app answered with a status outside 200..400.
    #[error("app answered {0}")]
    Status(http::StatusCode),
    /// No answer in time.
    #[error("probe timed out after {0:?}")]
    Timeout(Duration),
}

/// The app probes, keyed `<container>/<probe>`.
#[derive(Debug, Default, Clone)]
pub struct AppProbes(HashMap<String, Probe>);

impl AppProbes {
    /// Parses `MOAT_APP_PROBES` (absent = no probes).
    pub fn parse(json: Option<&str>) -> Result<Self, ProbesError> {
        match json.map(str::trim) {
            None | Some("") => Ok(Self::default()),
            Some(j) => serde_json::from_str(j).map(Self).map_err(ProbesError),
        }
    }

    /// The probe registered under `key`.
    pub fn get(&self, key: &str) -> Option<&Probe> {
        self.0.get(key)
    }
}

/// Runs `probe` against the app on loopback; `Err` carries why it failed.
pub async fn check(probe: &Probe, timeout: Duration) -> Result<(), ProbeError> {
    let fut = async {
        match probe {
            Probe::Tcp { port } => connect(*port).await.map(|_| ()),
            Probe::Http { port, scheme, .. } if scheme.as_deref() == Some("HTTPS") => {
                connect(*port).await.map(|_| ())
            }
            Probe::Http {
                port,
                path,
                headers,
                ..
            } => http_get(*port, path, headers).await,
        }
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ProbeError::Timeout(timeout))?
}

async fn connect(port: u16) -> Result<tokio::net::TcpStream, ProbeError> {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|source| ProbeError::Connect { port, source })
}

async fn http_get(port: u16, path: &str, headers: &[Header]) -> Result<(), ProbeError> {
    let tcp = connect(port).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(ProbeError::Http)?;
    let task = tokio::spawn(conn);
    let mut req = http::Request::get(path).header(http::header::HOST, format!("127.0.0.1:{port}"));
    for h in headers {
        req = req.header(h.name.as_str(), h.value.as_str());
    }
    let req = req
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(ProbeError::Request)?;
    let resp = send.send_request(req).await.map_err(ProbeError::Http);
    task.abort();
    let status = resp?.status();
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(ProbeError::Status(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_injector_format() {
        let p = AppProbes::parse(Some(
            r#"{"web/readiness":{"kind":"http","port":8080,"path":"/ready","scheme":"HTTP","headers":[{"name":"X","value":"y"}]},
                "db/liveness":{"kind":"tcp","port":5432}}"#,
        ))
        .unwrap();
        assert_eq!(p.get("db/liveness"), Some(&Probe::Tcp { port: 5432 }));
        assert!(matches!(
            p.get("web/readiness"),
            Some(Probe::Http { port: 8080, .. })
        ));
        assert!(AppProbes::parse(Some(r#"{"a/b":{"kind":"exec"}}"#)).is_err());
        assert!(AppProbes::parse(None).unwrap().get("x").is_none());
    }

    #[tokio::test]
    async fn http_and_tcp_probes_reach_the_app() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok");
                let status = if ok { "200 OK" } else { "500 Oops" };
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        let t = Duration::from_secs(2);
        let ok = Probe::Http {
            port,
            path: "/ok".into(),
            scheme: None,
            headers: vec![],
        };
        let bad = Probe::Http {
            port,
            path: "/bad".into(),
            scheme: None,
            headers: vec![],
        };
        assert!(check(&ok, t).await.is_ok());
        let err = check(&bad, t).await.unwrap_err();
        assert!(matches!(err, ProbeError::Status(s) if s == 500), "{err}");
        assert_eq!(err.to_string(), "app answered 500 Internal Server Error");
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let err = check(&Probe::Tcp { port: closed_port }, t)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ProbeError::Connect { port, .. } if port == closed_port),
            "{err}"
        );
        assert!(check(&Probe::Tcp { port }, t).await.is_ok());
    }
}
