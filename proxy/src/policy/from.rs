//! Who a rule admits: every kind of `from` entry (its key in the file, how its value is read
//! and checked, and how it matches a caller) is defined here together, so adding a kind is
//! one [`Key`], one [`Matcher`] variant with its match arm and its parse arm, and its row in
//! `docs/policy.md` (a test checks the docs list every key).
//!
//! Values are validated while they deserialize, at their own line and column (see `file`).

use std::fmt;

use moat_core::{SpiffeId, TrustDomain};
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::file::{check, validated_str};

/// The key of a `from` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(field_identifier, rename_all = "camelCase")]
pub(super) enum Key {
    Identity,
    ServiceAccount,
    Namespace,
    TrustDomain,
    Authenticated,
    Unauthenticated,
}

impl Key {
    /// Every key, in the order messages list them.
    pub(super) const ALL: [Key; 6] = [
        Key::Identity,
        Key::ServiceAccount,
        Key::Namespace,
        Key::TrustDomain,
        Key::Authenticated,
        Key::Unauthenticated,
    ];

    /// The key as written in the file.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Key::Identity => "identity",
            Key::ServiceAccount => "serviceAccount",
            Key::Namespace => "namespace",
            Key::TrustDomain => "trustDomain",
            Key::Authenticated => "authenticated",
            Key::Unauthenticated => "unauthenticated",
        }
    }

    /// `identity, serviceAccount, ... or unauthenticated`, for messages.
    fn list() -> String {
        let names: Vec<&str> = Key::ALL.iter().map(|k| k.as_str()).collect();
        match names.split_last() {
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        }
    }
}

/// A caller matcher. Comparisons only: what the caller is relative to the local trust domain
/// is worked out once per evaluation ([`Caller`]), so matching never allocates.
#[derive(Debug, Clone)]
pub(super) enum Matcher {
    /// Exact SPIFFE ID, any trust domain.
    Identity(Box<str>),
    /// Workload identity `ns/<namespace>/sa/<name>` of the local trust domain.
    ServiceAccount { namespace: Box<str>, name: Box<str> },
    /// Any workload identity of the namespace, local trust domain.
    Namespace(Box<str>),
    /// Any identity of the trust domain.
    TrustDomain(Box<str>),
    /// Any identity of the local trust domain.
    Authenticated,
    /// A caller without a client certificate.
    Unauthenticated,
}

/// What evaluation needs to know about a caller, worked out once per evaluation.
pub(super) struct Caller<'a> {
    /// The caller's identity; `None` for plaintext.
    pub(super) id: Option<&'a SpiffeId>,
    /// Whether it belongs to the local trust domain.
    pub(super) local: bool,
    /// Its namespace and service account, when it is a local workload identity.
    pub(super) workload: Option<(&'a str, &'a str)>,
}

impl Matcher {
    /// Whether this entry admits `caller`.
    pub(super) fn matches(&self, caller: &Caller<'_>) -> bool {
        match self {
            Matcher::Unauthenticated => caller.id.is_none(),
            Matcher::Authenticated => caller.local,
            Matcher::Identity(id) => caller.id.is_some_and(|c| c.as_str() == &**id),
            Matcher::TrustDomain(td) => caller.id.is_some_and(|c| c.trust_domain_str() == &**td),
            Matcher::Namespace(ns) => {
                caller.local && caller.workload.is_some_and(|(n, _)| n == &**ns)
            }
            Matcher::ServiceAccount { namespace, name } => {
                caller.local
                    && caller
                        .workload
                        .is_some_and(|(n, s)| n == &**namespace && s == &**name)
            }
        }
    }
}

/// `from`: a non-empty list of caller matchers.
pub(crate) struct FromList(pub Vec<Matcher>);

impl<'de> Deserialize<'de> for FromList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FromList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of callers ({} entries)", Key::list())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FromList, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = seq.next_element()? {
                    entries.push(entry);
                }
                let r =
                    if entries.is_empty() {
                        Err("from is empty, so the rule could never match; list at least one caller"
                        .to_string())
                    } else {
                        Ok(())
                    };
                check(r, || ()).map(|()| FromList(entries))
            }
        }
        d.deserialize_seq(V)
    }
}

impl<'de> Deserialize<'de> for Matcher {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Matcher;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a caller: a mapping with one key, {}", Key::list())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Matcher, A::Error> {
                let Some(key) = map.next_key::<Key>()? else {
                    let r = Err(format!("a from entry needs one key: {}", Key::list()));
                    return check(r, || Matcher::Unauthenticated);
                };
                let entry = match key {
                    Key::Identity => Matcher::Identity(map.next_value::<IdentityV>()?.0.into()),
                    Key::ServiceAccount => {
                        let ServiceAccountV(namespace, name) = map.next_value()?;
                        Matcher::ServiceAccount {
                            namespace: namespace.into(),
                            name: name.into(),
                        }
                    }
                    Key::Namespace => Matcher::Namespace(map.next_value::<NamespaceV>()?.0.into()),
                    Key::TrustDomain => {
                        Matcher::TrustDomain(map.next_value::<TrustDomainV>()?.0.into())
                    }
                    Key::Authenticated => {
                        map.next_value::<OnlyTrue>()?;
                        Matcher::Authenticated
                    }
                    Key::Unauthenticated => {
                        map.next_value::<OnlyTrue>()?;
                        Matcher::Unauthenticated
                    }
                };
                if let Some(extra) = map.next_key::<Key>()? {
                    // Drain the mapping so that, when this check is stepped over, the run goes on.
                    map.next_value::<IgnoredAny>()?;
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    let r = Err(format!(
                        "a from entry has exactly one key, but this one has {} and {}; make them separate list items (a caller matching any entry is enough)",
                        key.as_str(),
                        extra.as_str()
                    ));
                    return check(r, || entry);
                }
                Ok(entry)
            }
        }
        d.deserialize_map(V)
    }
}

/// A SPIFFE ID, kept as the validated string evaluation compares against.
struct IdentityV(String);

impl<'de> Deserialize<'de> for IdentityV {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        validated_str(
            d,
            "a SPIFFE ID",
            |s| match SpiffeId::parse(s) {
                Ok(id) => Ok(IdentityV(id.as_str().to_string())),
                Err(e) => Err(format!("identity {s:?} is not a valid SPIFFE ID: {e}")),
            },
            || IdentityV(String::new()),
        )
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters: a Kubernetes namespace.
pub(crate) fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Dot-separated DNS labels, at most 253 characters: a Kubernetes service account name.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

fn namespace_problem(s: &str) -> Option<String> {
    (!is_dns_label(s)).then(|| {
        format!("namespace {s:?} is not a valid Kubernetes namespace name (1-63 lowercase letters, digits or '-', starting and ending with a letter or digit)")
    })
}

struct NamespaceV(String);

impl<'de> Deserialize<'de> for NamespaceV {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        validated_str(
            d,
            "a namespace name",
            |s| match namespace_problem(s) {
                Some(problem) => Err(problem),
                None => Ok(NamespaceV(s.to_string())),
            },
            || NamespaceV(String::new()),
        )
    }
}

struct ServiceAccountV(String, String);

impl<'de> Deserialize<'de> for ServiceAccountV {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        validated_str(
            d,
            "<namespace>/<service-account>",
            |s| match s.split_once('/') {
                None => Err(format!(
                    "serviceAccount {s:?} must be written <namespace>/<name>, e.g. shop/web"
                )),
                Some((ns, name)) => {
                    if let Some(problem) = namespace_problem(ns) {
                        Err(format!("serviceAccount {s:?}: {problem}"))
                    } else if !is_dns_subdomain(name) {
                        Err(format!("serviceAccount {s:?}: {name:?} is not a valid Kubernetes service account name (lowercase letters, digits, '-' and '.', at most 253 characters)"))
                    } else {
                        Ok(ServiceAccountV(ns.to_string(), name.to_string()))
                    }
                }
            },
            || ServiceAccountV(String::new(), String::new()),
        )
    }
}

/// A trust domain name, kept as the validated string evaluation compares against.
struct TrustDomainV(String);

impl<'de> Deserialize<'de> for TrustDomainV {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        validated_str(
            d,
            "a trust domain name",
            |s| match TrustDomain::new(s) {
                Ok(td) => Ok(TrustDomainV(td.as_str().to_string())),
                Err(e) => Err(format!(
                    "trustDomain {s:?} is not a valid trust domain: {e}"
                )),
            },
            || TrustDomainV(String::new()),
        )
    }
}

/// `authenticated: true` / `unauthenticated: true`; `false` would be a matcher that matches
/// nothing, which is never what the author meant.
struct OnlyTrue;

impl<'de> Deserialize<'de> for OnlyTrue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = OnlyTrue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<OnlyTrue, E> {
                let r = if v {
                    Ok(OnlyTrue)
                } else {
                    Err("only `true` is allowed here; remove the entry to stop matching these callers".to_string())
                };
                check(r, || OnlyTrue)
            }
        }
        d.deserialize_bool(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_from_key_is_documented_and_listed_in_messages() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/policy.md");
        let docs = std::fs::read_to_string(path).unwrap();
        for key in Key::ALL {
            let row = format!("| `{}:", key.as_str());
            assert!(docs.contains(&row), "docs/policy.md has no row for {key:?}");
        }
        assert_eq!(
            Key::list(),
            "identity, serviceAccount, namespace, trustDomain, authenticated or unauthenticated"
        );
    }
}
