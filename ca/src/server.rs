//! The CA's HTTPS API: `POST /v1/certificates` and `GET /v1/trust-bundle`.
//!
//! Order of checks on issuance, cheapest and least trusting first: body size, bearer token,
//! per-identity rate limit, JSON, CSR. Nothing is signed unless every check passed, and every
//! outcome is an audit line and a metric.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use moat_core::api::{
    ApiError, CertificateRequest, CertificateResponse, CERTIFICATES_PATH, MAX_REQUEST_BYTES,
    TRUST_BUNDLE_PATH,
};
use moat_core::https;
use moat_core::spiffe::SpiffeId;

use crate::auth::{AuthError, TokenVerifier, Workload};
use crate::authority::Authority;
use crate::csr;
use crate::ratelimit::RateLimiter;

/// Metric names.
pub mod metric {
    /// Counter: certificates issued.
    pub const ISSUED: &str = "moat_ca_certificates_issued_total";
    /// Counter: refused requests, by `reason`.
    pub const REFUSED: &str = "moat_ca_certificate_refusals_total";
    /// Histogram: time to answer an issuance request (any outcome), seconds.
    pub const LATENCY: &str = "moat_ca_issuance_duration_seconds";
    /// Gauge: Unix time at which the signing certificate expires.
    pub const SIGNER_EXPIRY: &str = "moat_ca_signing_cert_expiration_timestamp_seconds";
}

/// Issuance policy and server limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Lifetime of issued leaves.
    pub cert_ttl: Duration,
    /// Sustained requests per second allowed per identity.
    pub rate_per_identity: f64,
    /// Burst allowed per identity.
    pub burst_per_identity: f64,
    /// Deadline for answering one request.
    pub request_timeout: Duration,
    /// Connection limits and timeouts of the HTTPS server.
    pub server: https::Limits,
    /// DNS SANs some identities may request (e.g. the injector's webhook name).
    pub dns_sans: HashMap<SpiffeId, Vec<String>>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cert_ttl: Duration::from_secs(3600),
            rate_per_identity: 5.0,
            burst_per_identity: 20.0,
            request_timeout: Duration::from_secs(10),
            server: https::Limits {
                max_connections: 4096,
                // Request heads are small: a bearer token and a few headers.
                max_buf: Some(MAX_REQUEST_BYTES * 2),
                metrics_prefix: "moat_ca",
                ..https::Limits::default()
            },
            dns_sans: HashMap::new(),
        }
    }
}

/// A refused request: HTTP status, error code, message, and who asked (when known).
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    who: Option<Workload>,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            who: None,
            retry_after: None,
        }
    }

    fn by(mut self, who: &Workload) -> Self {
        self.who = Some(who.clone());
        self
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        let status = match e {
            AuthError::Unavailable(_) | AuthError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::UNAUTHORIZED,
        };
        let mut r = Refusal::new(status, e.reason(), e.to_string());
        if let AuthError::Overloaded { retry_after, .. } = e {
            r.retry_after = Some(retry_after);
        }
        r
    }
}

/// The CA service: authority, authentication and limits.
pub struct CaService {
    authority: Authority,
    verifier: Arc<dyn TokenVerifier>,
    limits: Limits,
    limiter: RateLimiter,
    bundle_pem: Bytes,
}

impl CaService {
    /// Creates the service.
    pub fn new(authority: Authority, verifier: Arc<dyn TokenVerifier>, limits: Limits) -> Self {
        let bundle_pem = Bytes::from(authority.bundle().to_pem());
        metrics::gauge!(metric::SIGNER_EXPIRY).set(
            authority
                .not_after()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        Self {
            limiter: RateLimiter::new(limits.rate_per_identity, limits.burst_per_identity),
            authority,
            verifier,
            limits,
            bundle_pem,
        }
    }

    /// The signing authority.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Answers one HTTP request.
    pub async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let client = req.extensions().get::<https::ClientAddr>().map(|c| c.0);
        match (req.method(), req.uri().path()) {
            (&Method::POST, CERTIFICATES_PATH) => {
                let start = Instant::now();
                let outcome = match tokio::time::timeout(
                    self.limits.request_timeout,
                    self.issue(req, client),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "timeout",
                        format!(
                            "request not completed within {:?}",
                            self.limits.request_timeout
                        ),
                    )),
                };
                metrics::histogram!(metric::LATENCY).record(start.elapsed().as_secs_f64());
                match outcome {
                    Ok(resp) => resp,
                    Err(refusal) => self.refuse(refusal, client),
                }
            }
            (&Method::GET, TRUST_BUNDLE_PATH) => {
                let mut r = Response::new(Full::new(self.bundle_pem.clone()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/x-pem-file"),
                );
                r
            }
            (_, CERTIFICATES_PATH) | (_, TRUST_BUNDLE_PATH) => error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("use POST {CERTIFICATES_PATH} or GET {TRUST_BUNDLE_PATH}"),
                None,
            ),
            _ => error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!(
                    "unknown path; the API is POST {CERTIFICATES_PATH} and GET {TRUST_BUNDLE_PATH}"
                ),
                None,
            ),
        }
    }

    fn refuse(&self, r: Refusal, client: Option<SocketAddr>) -> Response<Full<Bytes>> {
        metrics::counter!(metric::REFUSED, "reason" => r.code).increment(1);
        let (ns, sa, pod) = match &r.who {
            Some(w) => (
                w.namespace.as_str(),
                w.service_account.as_str(),
                w.pod.as_deref().unwrap_or(""),
            ),
            None => ("", "", ""),
        };
        tracing::warn!(
            target: "moat_ca::audit",
            event = "refused",
            reason = r.code,
            status = r.status.as_u16(),
            client = %client_str(client),
            namespace = ns,
            service_account = sa,
            pod,
            detail = %r.message,
            "certificate request refused"
        );
        error_response(r.status, r.code, &r.message, r.retry_after)
    }

    async fn issue(
        &self,
        req: Request<Incoming>,
        client: Option<SocketAddr>,
    ) -> Result<Response<Full<Bytes>>, Refusal> {
        let too_big = || {
            Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "request body exceeds {MAX_REQUEST_BYTES} bytes; a CSR is well under 2 KiB"
                ),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REQUEST_BYTES as u64) {
            return Err(too_big());
        }
        let token = bearer(req.headers()).ok_or(AuthError::Missing)?.to_string();
        let workload = self
            .verifier
            .verify_from(&token, client.map(|c| c.ip()))
            .await?;
        let id = SpiffeId::workload(
            self.authority.trust_domain(),
            &workload.namespace,
            &workload.service_account,
        )
        .map_err(|e| {
            Refusal::new(
                StatusCode::FORBIDDEN,
                "invalid_identity",
                format!("token names an identity that is not a valid SPIFFE ID: {e}"),
            )
            .by(&workload)
        })?;
        if let Err(wait) = self.limiter.take(id.as_str()) {
            let mut r = Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "more than {} requests/s for {id}; retry after {:.1}s",
                    self.limits.rate_per_identity,
                    wait.as_secs_f64()
                ),
            )
            .by(&workload);
            r.retry_after = Some(wait);
            return Err(r);
        }

        let body = Limited::new(req.into_body(), MAX_REQUEST_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    too_big().by(&workload)
                } else {
                    Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        format!("cannot read body: {e}"),
                    )
                    .by(&workload)
                }
            })?
            .to_bytes();
        let request: CertificateRequest = serde_json::from_slice(&body).map_err(|e| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("body must be JSON {{\"csr\": \"<PEM PKCS#10>\"}}: {e}"),
            )
            .by(&workload)
        })?;
        let allowed_dns = self
            .limits
            .dns_sans
            .get(&id)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let admitted = csr::admit(&request.csr, &id, allowed_dns).map_err(|e| {
            Refusal::new(
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
                e.code(),
                e.to_string(),
            )
            .by(&workload)
        })?;
        let issued = self
            .authority
            .issue(
                &admitted.key,
                &id,
                &admitted.dns_names,
                self.limits.cert_ttl,
            )
            .map_err(|e| {
                Refusal::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "signing_failed",
                    e.to_string(),
                )
                .by(&workload)
            })?;
        metrics::counter!(metric::ISSUED).increment(1);
        let expires_at = moat_core::svid::rfc3339(issued.not_after);
        tracing::info!(
            target: "moat_ca::audit",
            event = "issued",
            client = %client_str(client),
            spiffe_id = %id,
            namespace = %workload.namespace,
            service_account = %workload.service_account,
            pod = workload.pod.as_deref().unwrap_or(""),
            serial = %issued.serial_hex,
            not_after = %expires_at,
            "certificate issued"
        );
        let body = CertificateResponse {
            certificate_chain: issued.chain_pem,
            trust_bundle: String::from_utf8_lossy(&self.bundle_pem).into_owned(),
            expires_at,
        };
        Ok(json_response(StatusCode::OK, &body))
    }
}

impl https::Handler for CaService {
    fn handle(
        &self,
        req: Request<Incoming>,
    ) -> impl std::future::Future<Output = Response<Full<Bytes>>> + Send {
        self.answer(req)
    }

    fn limits(&self) -> https::Limits {
        self.limits.server
    }
}

/// The client's address for audit lines (empty when not known, e.g. in unit tests).
fn client_str(client: Option<SocketAddr>) -> String {
    client.map(|c| c.to_string()).unwrap_or_default()
}

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    moat_core::admin::json(status, body)
}

fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    retry_after: Option<Duration>,
) -> Response<Full<Bytes>> {
    let mut r = json_response(
        status,
        &ApiError {
            error: code.to_string(),
            message: message.to_string(),
        },
    );
    if let Some(d) = retry_after {
        // Rounded up: a client that waits exactly Retry-After must find a token available.
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        if let Ok(v) = header::HeaderValue::from_str(&secs.max(1).to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing_is_strict() {
        let mut h = http::HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "bearer   abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            h.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert_eq!(bearer(&h), None, "{bad}");
        }
    }
}
