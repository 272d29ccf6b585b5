//! Loopback networking helpers: free ports, plain HTTP/1.0 requests to admin listeners, and
//! Prometheus text scraping. No HTTP client library: a raw socket is enough for `/ready` and
//! `/metrics`, and keeps these helpers usable from any thread, async or not.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A TCP port on 127.0.0.1 that was free a moment ago and that this process has not handed
/// out before (so two fixtures of one test binary never race for the same port).
pub fn free_port() -> u16 {
    let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0);
        if port != 0 && seen.insert(port) {
            return port;
        }
    }
    panic!("cannot find a free TCP port on 127.0.0.1");
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Resolves `http://host:port[/...]` or `host:port` to a socket address.
pub fn resolve(url_or_addr: &str) -> anyhow::Result<SocketAddr> {
    let s = url_or_addr.strip_prefix("http://").unwrap_or(url_or_addr);
    let hostport = s.split('/').next().unwrap_or(s);
    hostport
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {url_or_addr:?}"))?
        .next()
        .with_context(|| format!("{url_or_addr:?} resolves to no address"))
}

/// A plain HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// Status code.
    pub status: u16,
    /// Header lines, as sent.
    pub headers: Vec<(String, String)>,
    /// Body (lossy UTF-8).
    pub body: String,
}

/// `GET path` over HTTP/1.0 (the server closes the connection after answering).
pub fn http_get(url_or_addr: &str, path: &str, timeout: Duration) -> anyhow::Result<HttpReply> {
    let addr = resolve(url_or_addr)?;
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to GET {path} from {addr}"))?;
    parse_reply(&raw).with_context(|| format!("answer to GET {path} from {addr}"))
}

fn parse_reply(raw: &[u8]) -> anyhow::Result<HttpReply> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP status line: {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpReply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Polls `GET path` until it answers 200, for up to `timeout`.
pub fn wait_for_http(url_or_addr: &str, path: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_get(url_or_addr, path, Duration::from_millis(500)) {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => format!("status {}", r.status),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("{url_or_addr}{path} not ready after {timeout:?}: {last}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`, `_count` suffixes for histograms).
    pub name: String,
    /// Labels, in order.
    pub labels: Vec<(String, String)>,
    /// Value.
    pub value: f64,
}

impl Sample {
    /// Whether every `(key, value)` of `want` is among this sample's labels.
    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        want.iter()
            .all(|(k, v)| self.labels.iter().any(|(lk, lv)| lk == k && lv == v))
    }

    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A scraped `/metrics` page.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Every sample.
    pub samples: Vec<Sample>,
}

/// A histogram's cumulative buckets, sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// `(upper bound, cumulative count)`, ascending, `+Inf` last.
    pub buckets: Vec<(f64, f64)>,
    /// Sum of observations.
    pub sum: f64,
    /// Number of observations.
    pub count: f64,
}

impl Histogram {
    /// This histogram minus an earlier snapshot of it (observations made in between).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .map(|(le, c)| {
                let before = earlier
                    .buckets
                    .iter()
                    .find(|(l, _)| l == le)
                    .map_or(0.0, |(_, c)| *c);
                (*le, c - before)
            })
            .collect();
        Histogram {
            buckets,
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1): an over-estimate at bucket
    /// resolution. `None` when empty.
    pub fn quantile_upper_bound(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.count).ceil().max(1.0);
        self.buckets
            .iter()
            .find(|(_, c)| *c >= rank)
            .map(|(le, _)| *le)
    }

    /// Mean observation. `None` when empty.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

impl Metrics {
    /// Parses Prometheus text format.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        Self { samples }
    }

    /// Sum of the samples named `name` carrying all of `labels`; `None` if there are none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in &self.samples {
            if s.name == name && s.has_labels(labels) {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
    }

    /// Like [`Metrics::get`], with absent series counted as 0 (a counter never incremented is
    /// not exported).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The samples named `name`.
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The histogram `name` restricted to `labels` (buckets of matching series are added).
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Option<Histogram> {
        let bucket_name = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for s in self.series(&bucket_name).filter(|s| s.has_labels(labels)) {
            let le = match s.label("le") {
                Some("+Inf") => f64::INFINITY,
                Some(v) => match v.parse() {
                    Ok(x) => x,
                    Err(_) => continue,
                },
                None => continue,
            };
            match buckets.iter_mut().find(|(l, _)| *l == le) {
                Some((_, c)) => *c += s.value,
                None => buckets.push((le, s.value)),
            }
        }
        if buckets.is_empty() {
            return None;
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Histogram {
            buckets,
            sum: self.value(&format!("{name}_sum"), labels),
            count: self.value(&format!("{name}_count"), labels),
        })
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name_labels, value) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            let value = line[close + 1..].split_whitespace().next()?;
            ((&line[..open], parse_labels(&line[open + 1..close])), value)
        }
        None => {
            let mut parts = line.split_whitespace();
            let name = parts.next()?;
            ((name, Vec::new()), parts.next()?)
        }
    };
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name_labels.0.to_string(),
        labels: name_labels.1,
        value,
    })
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        if chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(other) => value.push(other),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim().to_string(), value));
    }
}

/// Scrapes `/metrics` from an admin listener.
pub fn scrape(admin: &str) -> anyhow::Result<Metrics> {
    let r = http_get(admin, "/metrics", Duration::from_secs(5))?;
    if r.status != 200 {
        bail!("{admin}/metrics answered {}", r.status);
    }
    Ok(Metrics::parse(&r.body))
}

/// The value of `name{labels...}` at `admin`'s `/metrics` (summed over series matching the
/// given labels; 0 when absent, since counters appear on first increment). Panics if the
/// scrape itself fails.
pub fn scrape_metric(admin: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    match scrape(admin) {
        Ok(m) => m.value(name, labels),
        Err(e) => panic!("cannot scrape {admin}/metrics: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counters_labels_and_histograms() {
        let text = r#"
# TYPE moat_ca_certificates_issued_total counter
moat_ca_certificates_issued_total 3
moat_ca_certificate_refusals_total{reason="invalid_json"} 2
moat_ca_certificate_refusals_total{reason="rate_limited",x="a\"b"} 1
moat_ca_issuance_duration_seconds_bucket{le="0.001"} 1
moat_ca_issuance_duration_seconds_bucket{le="0.01"} 4
moat_ca_issuance_duration_seconds_bucket{le="+Inf"} 5
moat_ca_issuance_duration_seconds_sum 0.5
moat_ca_issuance_duration_seconds_count 5
"#;
        let m = Metrics::parse(text);
        assert_eq!(m.value("moat_ca_certificates_issued_total", &[]), 3.0);
        assert_eq!(
            m.value(
                "moat_ca_certificate_refusals_total",
                &[("reason", "invalid_json")]
            ),
            2.0
        );
        assert_eq!(m.value("moat_ca_certificate_refusals_total", &[]), 3.0);
        assert_eq!(
            m.series("moat_ca_certificate_refusals_total")
                .nth(1)
                .and_then(|s| s.label("x")),
            Some("a\"b")
        );
        assert_eq!(m.get("absent", &[]), None);
        let h = m
            .histogram("moat_ca_issuance_duration_seconds", &[])
            .unwrap();
        assert_eq!(h.count, 5.0);
        assert_eq!(h.quantile_upper_bound(0.5), Some(0.01));
        assert_eq!(h.quantile_upper_bound(0.2), Some(0.001));
        assert_eq!(h.quantile_upper_bound(1.0), Some(f64::INFINITY));
        let d = h.since(&Histogram {
            buckets: vec![(0.001, 1.0), (0.01, 1.0), (f64::INFINITY, 1.0)],
            sum: 0.1,
            count: 1.0,
        });
        assert_eq!(d.count, 4.0);
        assert_eq!(d.quantile_upper_bound(0.5), Some(0.01));
    }

    #[test]
    fn parses_http_replies() {
        let r = parse_reply(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\r\nnot ready\n",
        )
        .unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.body, "not ready\n");
        assert_eq!(r.headers[0], ("content-type".into(), "text/plain".into()));
        assert!(parse_reply(b"garbage").is_err());
    }

    #[test]
    fn free_ports_are_not_handed_out_twice() {
        let a: HashSet<u16> = (0..50).map(|_| free_port()).collect();
        assert_eq!(a.len(), 50);
    }
}
