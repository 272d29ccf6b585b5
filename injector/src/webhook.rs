//! The HTTPS webhook: `POST /inject` and `POST /inject/opt-in` only, served by [`moat_core::https`] (TLS 1.3 with a
//! hot-swappable serving certificate, HTTP/1.1 and HTTP/2). Transport checks (path, method,
//! content type, body size) happen here; everything about the AdmissionReview is in
//! [`crate::admission`].

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use moat_core::https;

use crate::admission::{self, BadRequest, Reply, MAX_BODY};
use crate::config::{FailureMode, InjectConfig};
use crate::inject::Scope;

/// The webhook path for namespaces labelled `moat.dev/inject=enabled`: the mesh is enforced
/// ([`Scope::Enforcing`]). Which path is called is decided by the API server from the
/// namespace's real labels (the webhook configuration's `namespaceSelector`), so no pod can
/// choose it; any other caller of `/inject` also gets enforcement, the safe default.
pub const PATH: &str = "/inject";
/// The webhook path for pods that opted in (pod label) from a namespace without the label
/// ([`Scope::OptIn`]).
pub const PATH_OPT_IN: &str = "/inject/opt-in";

/// The scope of a webhook path, if it is one.
pub fn scope_of(path: &str) -> Option<Scope> {
    match path {
        PATH => Some(Scope::Enforcing),
        PATH_OPT_IN => Some(Scope::OptIn),
        _ => None,
    }
}
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// Shared state of the webhook: the (reloadable) injection configuration and failure mode.
#[derive(Debug)]
pub struct Webhook {
    config: ArcSwap<InjectConfig>,
    failure: FailureMode,
    limits: https::Limits,
}

impl Webhook {
    /// A webhook injecting with `config`.
    pub fn new(config: InjectConfig, failure: FailureMode) -> Self {
        Self {
            config: ArcSwap::from_pointee(config),
            failure,
            limits: default_limits(),
        }
    }

    /// The same webhook served within `limits` (connections, timeouts).
    pub fn with_limits(mut self, limits: https::Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Replaces the configuration (e.g. after the trust bundle changed).
    pub fn set_config(&self, config: InjectConfig) {
        self.config.store(Arc::new(config));
    }

    /// The configuration in use.
    pub fn config(&self) -> Arc<InjectConfig> {
        self.config.load_full()
    }

    /// Answers one HTTP request given its parts (transport checks, then the review).
    pub fn answer(
        &self,
        method: &Method,
        path: &str,
        content_type: Option<&str>,
        body: Result<&[u8], BadRequest>,
    ) -> Reply {
        let Some(scope) = scope_of(path) else {
            return BadRequest::NotFound(path.chars().take(100).collect()).reply();
        };
        if method != Method::POST {
            return BadRequest::MethodNotAllowed(method.to_string()).reply();
        }
        let json = content_type
            .and_then(|ct| ct.split(';').next())
            .is_some_and(|ct| ct.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return BadRequest::ContentType(content_type.unwrap_or("").chars().take(100).collect())
                .reply();
        }
        match body {
            Ok(body) => admission::review_in(body, &self.config.load(), self.failure, scope),
            Err(e) => e.reply(),
        }
    }

    async fn respond(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let declared_len = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let routed = scope_of(parts.uri.path()).is_some() && parts.method == Method::POST;
        let bytes = if routed {
            read_body(body, declared_len).await
        } else {
            Ok(Bytes::new())
        };
        let reply = self.answer(
            &parts.method,
            parts.uri.path(),
            content_type.as_deref(),
            bytes.as_deref().map_err(Clone::clone),
        );
        to_response(reply)
    }
}

impl https::Handler for Webhook {
    fn handle(
        &self,
        req: Request<Incoming>,
    ) -> impl std::future::Future<Output = Response<Full<Bytes>>> + Send {
        self.respond(req)
    }

    fn limits(&self) -> https::Limits {
        self.limits
    }
}

/// The webhook's server limits unless configured otherwise.
pub fn default_limits() -> https::Limits {
    https::Limits {
        max_connections: MAX_CONNECTIONS,
        metrics_prefix: "moat_injector",
        ..https::Limits::default()
    }
}

/// Most bytes of an oversized body read (and discarded) so the client, still sending, gets the
/// 413 instead of a connection reset.
const DRAIN_LIMIT: usize = 16 << 20;

/// Reads a request body of at most [`MAX_BODY`] bytes.
async fn read_body(mut body: Incoming, declared_len: Option<u64>) -> Result<Bytes, BadRequest> {
    let mut buf = Vec::new();
    let mut total = 0usize;
    let mut too_large = declared_len.is_some_and(|l| l > MAX_BODY as u64);
    let drain = async {
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|e| BadRequest::InvalidJson(format!("cannot read body: {e}")))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            total = total.saturating_add(data.len());
            if total > MAX_BODY {
                too_large = true;
                buf = Vec::new();
            }
            if too_large {
                if total > DRAIN_LIMIT {
                    break;
                }
            } else {
                buf.extend_from_slice(data);
            }
        }
        Ok::<(), BadRequest>(())
    };
    tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .map_err(|_| BadRequest::InvalidJson("request body not received within 10s".into()))??;
    if too_large {
        return Err(BadRequest::TooLarge);
    }
    Ok(Bytes::from(buf))
}

fn to_response(reply: Reply) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = moat_core::admin::json(status, &reply.body);
    if reply.status == 405 {
        r.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
    }
    r
}
