//! SPIFFE identifiers (`spiffe://<trust-domain>/<path>`), parsed once and trusted afterwards.
//!
//! The rules are those of the SPIFFE ID standard: lowercase trust domain of `[a-z0-9.-_]`, no
//! port, userinfo, query or fragment; path segments of `[a-zA-Z0-9.-_]`, never empty, `.` or `..`,
//! and no trailing slash. Moat workload identities use the Kubernetes convention
//! `/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest SPIFFE ID we accept or produce (the standard's interoperability floor).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name allowed by the standard.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The string does not start with `spiffe://`.
    #[error("a SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,
    /// The trust domain part is empty.
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain has a character outside `[a-z0-9.-_]`.
    #[error("the trust domain {0:?} may only contain lowercase letters, digits, '.', '-' and '_'")]
    BadTrustDomainChar(String),
    /// The trust domain is longer than 255 bytes.
    #[error("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// The path has an empty, `.` or `..` segment, or a trailing slash.
    #[error("path segment {0:?} is empty, '.', '..' or followed by a trailing '/'")]
    BadSegment(String),
    /// A path segment has a character outside `[a-zA-Z0-9.-_]`.
    #[error("path segment {0:?} may only contain letters, digits, '.', '-' and '_'")]
    BadSegmentChar(String),
    /// The ID carries a query or fragment.
    #[error("a SPIFFE ID may not have a query or fragment")]
    QueryOrFragment,
    /// The ID is longer than 2048 bytes.
    #[error("a SPIFFE ID may not be longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    /// A workload identity was expected but the path is not `/ns/<ns>/sa/<sa>`.
    #[error("expected a workload identity of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    NotWorkload,
}

/// A validated SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

impl TrustDomain {
    /// Validates a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of the trust domain itself (`spiffe://<td>`, no path), as carried by CAs.
    pub fn id(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID with a non-empty path (a workload identity, never a trust domain ID).
///
/// Cloning is cheap: the string is shared.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    full: Arc<str>,
    /// Byte offset where the path (leading '/') starts in `full`.
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID that must have a path.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or(SpiffeIdError::WrongScheme)?;
        if rest.contains(['?', '#']) {
            return Err(SpiffeIdError::QueryOrFragment);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        if path.is_empty() {
            return Err(SpiffeIdError::BadSegment(String::new()));
        }
        for seg in path[1..].split('/') {
            validate_segment(seg)?;
        }
        Ok(Self {
            full: Arc::from(s),
            path_start: "spiffe://".len() + td.len(),
        })
    }

    /// Builds the workload identity `spiffe://<td>/ns/<namespace>/sa/<service_account>`.
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        // Each name must be exactly one path segment: "a/b" would forge a different shape.
        validate_segment(namespace)?;
        validate_segment(service_account)?;
        Self::parse(&format!(
            "spiffe://{td}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The full ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The trust domain part, without the scheme.
    pub fn trust_domain_str(&self) -> &str {
        &self.full["spiffe://".len()..self.path_start]
    }

    /// Whether this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    /// The path, starting with '/'.
    pub fn path(&self) -> &str {
        &self.full[self.path_start..]
    }

    /// `(namespace, service_account)` when the path is `/ns/<ns>/sa/<sa>`.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        let mut segs = self.path()[1..].split('/');
        match (
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
            segs.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The Kubernetes namespace of a workload identity.
    pub fn namespace(&self) -> Option<&str> {
        self.workload_parts().map(|(ns, _)| ns)
    }

    /// The service account of a workload identity.
    pub fn service_account(&self) -> Option<&str> {
        self.workload_parts().map(|(_, sa)| sa)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.full)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::BadTrustDomainChar(td.to_string()));
    }
    Ok(())
}

fn validate_segment(seg: &str) -> Result<(), SpiffeIdError> {
    if seg.is_empty() || seg == "." || seg == ".." {
        return Err(SpiffeIdError::BadSegment(seg.to_string()));
    }
    if !seg
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(SpiffeIdError::BadSegmentChar(seg.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert_eq!(id.workload_parts(), Some(("default", "web")));
        assert!(id.is_member_of(&TrustDomain::new("cluster.local").unwrap()));
        assert!(!id.is_member_of(&TrustDomain::new("other.local").unwrap()));
    }

    #[test]
    fn non_workload_paths_are_valid_ids_without_workload_parts() {
        let id = SpiffeId::parse("spiffe://td/a/b/c").unwrap();
        assert_eq!(id.workload_parts(), None);
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b/extra").unwrap();
        assert_eq!(id.workload_parts(), None);
    }

    #[test]
    fn rejects_every_malformed_shape() {
        let cases = [
            ("http://td/a", SpiffeIdError::WrongScheme),
            ("spiffe://", SpiffeIdError::EmptyTrustDomain),
            ("spiffe:///a", SpiffeIdError::EmptyTrustDomain),
            (
                "spiffe://TD/a",
                SpiffeIdError::BadTrustDomainChar("TD".into()),
            ),
            (
                "spiffe://td:443/a",
                SpiffeIdError::BadTrustDomainChar("td:443".into()),
            ),
            (
                "spiffe://user@td/a",
                SpiffeIdError::BadTrustDomainChar("user@td".into()),
            ),
            ("spiffe://td", SpiffeIdError::BadSegment(String::new())),
            ("spiffe://td/", SpiffeIdError::BadSegment(String::new())),
            ("spiffe://td/a/", SpiffeIdError::BadSegment(String::new())),
            ("spiffe://td/a//b", SpiffeIdError::BadSegment(String::new())),
            ("spiffe://td/./b", SpiffeIdError::BadSegment(".".into())),
            ("spiffe://td/../b", SpiffeIdError::BadSegment("..".into())),
            (
                "spiffe://td/a%20b",
                SpiffeIdError::BadSegmentChar("a%20b".into()),
            ),
            ("spiffe://td/a?x=1", SpiffeIdError::QueryOrFragment),
            ("spiffe://td/a#f", SpiffeIdError::QueryOrFragment),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input), Err(want), "{input}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(SpiffeId::parse(&long), Err(SpiffeIdError::TooLong));
    }

    #[test]
    fn workload_constructor_validates_names() {
        let td = TrustDomain::new("cluster.local").unwrap();
        assert_eq!(
            SpiffeId::workload(&td, "prod", "api").unwrap().as_str(),
            "spiffe://cluster.local/ns/prod/sa/api"
        );
        assert!(SpiffeId::workload(&td, "pr/od", "api").is_err());
        assert!(SpiffeId::workload(&td, "", "api").is_err());
    }
}
