//! Identity-based authorization policy: which callers may reach this workload, on which ports.
//!
//! A [`Policy`] is parsed and validated once ([`Policy::parse`]) into a compact, immutable form
//! so that [`Policy::evaluate`] can run on every inbound connection or request without
//! allocating. The file format and its semantics are documented in `docs/policy.md`;
//! [`watch`] keeps the policy in force up to date with the file, and [`cli`] offers
//! `moat-proxy policy check|explain`.

pub mod cli;
mod file;
mod from;
pub mod watch;

#[cfg(test)]
mod tests;

use std::fmt;

use metrics::Counter;
use moat_core::{SpiffeId, TrustDomain};

use from::{Caller, Matcher};

pub use watch::{load_initial, spawn_watcher};

/// Name of the single rule of [`Policy::builtin`].
pub const BUILTIN_RULE: &str = "default-authenticated";
/// The `rule` of a [`Decision`] made by the default action rather than a rule.
pub const DEFAULT_RULE: &str = "default";

/// What happens to a caller that no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    /// Refuse the caller.
    #[default]
    Deny,
    /// Let the caller through.
    Allow,
    /// Let the caller through but flag the decision as a would-deny, to roll out a policy safely.
    Audit,
}

impl DefaultAction {
    /// The lowercase word used in the policy file.
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultAction::Deny => "deny",
            DefaultAction::Allow => "allow",
            DefaultAction::Audit => "audit",
        }
    }
}

impl fmt::Display for DefaultAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The caller is allowed.
    Allow,
    /// The caller is refused.
    Deny,
    /// The caller is allowed, but would have been denied: the default action is `audit`.
    AuditDeny,
}

impl Verdict {
    /// Metric label: `allow`, `deny` or `audit_deny`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::AuditDeny => "audit_deny",
        }
    }
}

/// A verdict and the rule that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision<'a> {
    /// What to do with the caller.
    pub verdict: Verdict,
    /// The deciding rule's name, or `"default"` when no rule matched.
    pub rule: &'a str,
}

impl Decision<'_> {
    /// Whether the caller may proceed (true for audit would-denies too).
    pub fn allowed(&self) -> bool {
        matches!(self.verdict, Verdict::Allow | Verdict::AuditDeny)
    }

    /// Metric label of the verdict: `allow`, `deny` or `audit_deny`.
    pub fn label(&self) -> &'static str {
        self.verdict.label()
    }
}

/// One problem in a policy file, located at the offending node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file name given to [`Policy::parse`].
    pub source: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong, prefixed with the rule it is in, if any.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.source, self.line, self.column, self.message
        )
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file is not a valid policy; every problem found, in file order, one per line.
    #[error("{}", DisplayLines(.0))]
    Invalid(Vec<Diagnostic>),
    /// The file exists but could not be read.
    #[error("{path}: cannot read the policy file: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl PolicyError {
    /// The located problems (empty for read errors).
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            PolicyError::Invalid(d) => d,
            PolicyError::Read { .. } => &[],
        }
    }
}

struct DisplayLines<'a>(&'a [Diagnostic]);

impl fmt::Display for DisplayLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Rule {
    name: Box<str>,
    verdict: Verdict,
    /// Inclusive ranges; `None` means every port.
    ports: Option<Box<[(u16, u16)]>>,
    from: Box<[Matcher]>,
    /// This rule's series of `moat_proxy_authz_decisions_total`.
    decisions: Counter,
}

impl Rule {
    fn matches(&self, caller: &Caller<'_>, port: u16) -> bool {
        let port_ok = match &self.ports {
            None => true,
            Some(ranges) => ranges.iter().any(|&(lo, hi)| lo <= port && port <= hi),
        };
        port_ok && self.from.iter().any(|m| m.matches(caller))
    }
}

/// A parsed, validated, immutable authorization policy.
#[derive(Debug, Clone)]
pub struct Policy {
    local_td: TrustDomain,
    default: DefaultAction,
    rules: Box<[Rule]>,
    /// Networks that may scrape `/metrics` (`None`: the proxy's flags alone decide).
    metrics_from: Option<Box<[moat_core::netaddr::Cidr]>>,
    /// The exact file contents this policy came from, so the watcher can tell a real change
    /// from a re-read of the same file; `None` for the builtin policy.
    source_text: Option<Box<str>>,
    /// The default action's series of `moat_proxy_authz_decisions_total`.
    default_decisions: Counter,
}

impl Policy {
    /// Parses and validates YAML. `source` is the file name used in error messages.
    pub fn parse(yaml: &str, source: &str, local_td: &TrustDomain) -> Result<Policy, PolicyError> {
        let diag = |line, column, message| Diagnostic {
            source: source.to_string(),
            line,
            column,
            message,
        };
        // A lenient first look: serde_yaml has no better message than "EOF" for an empty
        // file, and it lets errors inside a rule name the rule even when the name comes after.
        let value = serde_yaml::from_str::<serde_yaml::Value>(yaml);
        // A YAML syntax error is about the text, not about the rule that was being read.
        let syntax_error = value.as_ref().err().and_then(|e| {
            let l = e.location()?;
            let message = file::bare_message(&e.to_string(), l.line(), l.column());
            Some((l.line(), l.column(), message))
        });
        let value = value.ok();
        if matches!(value, Some(serde_yaml::Value::Null)) {
            return Err(PolicyError::Invalid(vec![diag(
                1,
                1,
                format!(
                    "the policy file is empty; expected apiVersion: {}, kind: {}, default and rules",
                    file::API_VERSION,
                    file::KIND
                ),
            )]));
        }
        let raw = file::deserialize(yaml).map_err(|errors| {
            let rule_name = |i: usize| {
                value
                    .as_ref()
                    .and_then(|v| v.get("rules")?.get(i)?.get("name")?.as_str())
                    .filter(|n| file::rule_name_problem(n).is_none())
            };
            PolicyError::Invalid(
                errors
                    .into_iter()
                    .map(|mut e| {
                        if syntax_error.as_ref() == Some(&(e.line, e.column, e.message.clone())) {
                            e.rule = None;
                        }
                        let message = match e.rule {
                            Some(i) => match rule_name(i) {
                                Some(name) => format!("rule {name:?}: {}", e.message),
                                None => format!("rule #{}: {}", i + 1, e.message),
                            },
                            None => e.message,
                        };
                        diag(e.line, e.column, message)
                    })
                    .collect(),
            )
        })?;
        let rules = raw
            .rules
            .0
            .into_iter()
            .map(|r| {
                let verdict = match r.action {
                    file::Action::Allow => Verdict::Allow,
                    file::Action::Deny => Verdict::Deny,
                };
                Rule {
                    decisions: crate::metrics::authz_counter(verdict, &r.name.0),
                    name: r.name.0.into(),
                    verdict,
                    ports: r.ports.map(|p| p.0.into()),
                    from: r.from.0.into(),
                }
            })
            .collect();
        Ok(Policy {
            local_td: local_td.clone(),
            default: raw.default,
            rules,
            metrics_from: raw.admin.map(|a| a.metrics_from.0.into()),
            source_text: Some(yaml.into()),
            default_decisions: default_counter(raw.default),
        })
    }

    /// Built-in policy used when no policy file exists: allow every authenticated identity of
    /// the local trust domain (rule "default-authenticated"), deny everything else.
    pub fn builtin(local_td: &TrustDomain) -> Policy {
        Policy {
            local_td: local_td.clone(),
            default: DefaultAction::Deny,
            rules: Box::new([Rule {
                name: BUILTIN_RULE.into(),
                verdict: Verdict::Allow,
                ports: None,
                from: Box::new([Matcher::Authenticated]),
                decisions: crate::metrics::authz_counter(Verdict::Allow, BUILTIN_RULE),
            }]),
            metrics_from: None,
            source_text: None,
            default_decisions: default_counter(DefaultAction::Deny),
        }
    }

    /// Evaluates a caller (`peer` is `None` for plaintext callers) connecting to `port`.
    ///
    /// Never allocates: it runs for every connection and request.
    pub fn evaluate(&self, peer: Option<&SpiffeId>, port: u16) -> Decision<'_> {
        self.decide(peer, port).0
    }

    /// [`Policy::evaluate`], and the decision counted in `moat_proxy_authz_decisions_total`
    /// under its rule. The series were registered when the policy was parsed, so counting is
    /// one atomic add: no label is built per decision.
    pub fn authorize(&self, peer: Option<&SpiffeId>, port: u16) -> Decision<'_> {
        let (decision, counter) = self.decide(peer, port);
        counter.increment(1);
        decision
    }

    /// The decision and the deciding rule's counter.
    fn decide(&self, peer: Option<&SpiffeId>, port: u16) -> (Decision<'_>, &Counter) {
        let local = peer.is_some_and(|p| p.is_member_of(&self.local_td));
        let caller = Caller {
            id: peer,
            local,
            workload: if local {
                peer.and_then(SpiffeId::workload_parts)
            } else {
                None
            },
        };
        for rule in self.rules.iter() {
            if rule.matches(&caller, port) {
                let decision = Decision {
                    verdict: rule.verdict,
                    rule: &rule.name,
                };
                return (decision, &rule.decisions);
            }
        }
        let decision = Decision {
            verdict: default_verdict(self.default),
            rule: DEFAULT_RULE,
        };
        (decision, &self.default_decisions)
    }

    /// Whether the policy lets a caller at `ip` scrape `/metrics` (true without an `admin`
    /// section).
    pub fn admits_scraper(&self, ip: std::net::IpAddr) -> bool {
        self.metrics_from
            .as_deref()
            .is_none_or(|nets| nets.iter().any(|n| n.contains(ip)))
    }

    /// The action taken when no rule matches.
    pub fn default_action(&self) -> DefaultAction {
        self.default
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Rule names in evaluation order.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.rules.iter().map(|r| &*r.name)
    }

    /// The trust domain `serviceAccount`, `namespace` and `authenticated` refer to.
    pub fn local_trust_domain(&self) -> &TrustDomain {
        &self.local_td
    }

    /// Whether this is the built-in policy rather than one read from a file.
    pub fn is_builtin(&self) -> bool {
        self.source_text.is_none()
    }

    /// The file contents this policy was parsed from (`None` for the builtin policy).
    pub(crate) fn source_text(&self) -> Option<&str> {
        self.source_text.as_deref()
    }
}

fn default_verdict(action: DefaultAction) -> Verdict {
    match action {
        DefaultAction::Deny => Verdict::Deny,
        DefaultAction::Allow => Verdict::Allow,
        DefaultAction::Audit => Verdict::AuditDeny,
    }
}

fn default_counter(action: DefaultAction) -> Counter {
    crate::metrics::authz_counter(default_verdict(action), DEFAULT_RULE)
}

/// Decodes file bytes as UTF-8, pointing at the first bad byte otherwise.
pub(crate) fn decode<'a>(bytes: &'a [u8], source: &str) -> Result<&'a str, PolicyError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let good = &bytes[..e.valid_up_to()];
        let line = 1 + good.iter().filter(|&&b| b == b'\n').count();
        let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        // Columns count characters, and the prefix is valid UTF-8 by construction.
        let column = 1 + String::from_utf8_lossy(&good[line_start..]).chars().count();
        PolicyError::Invalid(vec![Diagnostic {
            source: source.to_string(),
            line,
            column,
            message: "the policy file is not valid UTF-8".to_string(),
        }])
    })
}
