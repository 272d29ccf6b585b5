//! The CA's HTTP API contract, shared by the server (`moat-ca`) and its client (the proxy).
//!
//! `POST /v1/certificates` with `Authorization: Bearer <projected service-account token>` and a
//! [`CertificateRequest`] body returns a [`CertificateResponse`]; every error is an
//! [`ApiError`]. `GET /v1/trust-bundle` returns the PEM roots.

use serde::{Deserialize, Serialize};

/// Path of the issuance endpoint.
pub const CERTIFICATES_PATH: &str = "/v1/certificates";
/// Path of the trust bundle endpoint.
pub const TRUST_BUNDLE_PATH: &str = "/v1/trust-bundle";
/// Largest request body the CA accepts, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Body of `POST /v1/certificates`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateRequest {
    /// PEM-encoded PKCS#10 certificate signing request.
    pub csr: String,
}

/// Successful answer of `POST /v1/certificates`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertificateResponse {
    /// PEM chain, leaf first, then any intermediates (never the root).
    pub certificate_chain: String,
    /// PEM roots the chain must be verified against.
    pub trust_bundle: String,
    /// Leaf expiry, RFC 3339.
    pub expires_at: String,
}

/// Error body of every non-2xx answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// Machine-readable code, e.g. `invalid_csr`, `unauthenticated`, `identity_mismatch`.
    pub error: String,
    /// What was wrong and how to fix it.
    pub message: String,
}
