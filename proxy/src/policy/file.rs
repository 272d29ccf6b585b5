//! The policy file format as serde types that validate while they deserialize.
//!
//! serde_yaml only knows where a node is while it is deserializing that node, and it attaches
//! that location to any error raised there. So every semantic check lives inside the
//! `Deserialize` impl of the node it is about, and an invalid port or name is reported at its
//! own line and column rather than at the top of the file.
//!
//! To report every error instead of only the first, [`deserialize`] runs the deserialization
//! repeatedly: each semantic check gets an ordinal, and a check that failed in an earlier run
//! yields a placeholder in later runs so they can go on to find the next error. Structural errors
//! (YAML syntax, unknown or missing keys, wrong types) cannot be stepped over and end the search.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

use super::from::FromList;
use super::DefaultAction;

/// The only `apiVersion` this build understands.
pub(crate) const API_VERSION: &str = "moat.dev/v1";
/// The only `kind` this build understands.
pub(crate) const KIND: &str = "Policy";
/// Beyond this many errors the rest are noise; the author has enough to fix.
const MAX_ERRORS: usize = 50;

/// State of one deserialization run.
///
/// A thread-local because derived `Deserialize` impls cannot pass context down to the leaves;
/// a run is synchronous and never leaves the thread that started it.
#[derive(Default)]
struct Run {
    /// Ordinal of the next semantic check; stable across runs because the input is the same.
    next_check: usize,
    /// Checks that failed in earlier runs, which now yield a placeholder.
    skip: Vec<usize>,
    /// The check that failed in this run, with its message (serde_yaml decorates the error).
    failed: Option<(usize, String)>,
    /// Rule names seen so far, with their index, to catch duplicates at the second use.
    names: Vec<(usize, String)>,
    /// Index of the rule being deserialized; left set when an error unwinds out of a rule.
    rule: Option<usize>,
}

thread_local! {
    static RUN: RefCell<Option<Run>> = const { RefCell::new(None) };
}

/// Runs a semantic check: passes `Ok` through, turns `Err` into a located serde error unless
/// an earlier run already reported this very check, in which case `placeholder` stands in.
pub(super) fn check<T, E: de::Error>(
    result: Result<T, String>,
    placeholder: impl FnOnce() -> T,
) -> Result<T, E> {
    let skipped = RUN.with(|run| {
        let mut run = run.borrow_mut();
        let run = run.as_mut()?;
        let ordinal = run.next_check;
        run.next_check += 1;
        match &result {
            Ok(_) => Some(false),
            Err(_) if run.skip.contains(&ordinal) => Some(true),
            Err(msg) => {
                run.failed = Some((ordinal, msg.clone()));
                Some(false)
            }
        }
    });
    match result {
        Ok(v) => Ok(v),
        Err(_) if skipped == Some(true) => Ok(placeholder()),
        Err(msg) => Err(E::custom(msg)),
    }
}

fn set_rule(index: Option<usize>) {
    RUN.with(|run| {
        if let Some(run) = run.borrow_mut().as_mut() {
            run.rule = index;
        }
    });
}

/// Deserializes a scalar as text and validates it *inside* the visitor: serde_yaml attaches
/// the scalar's own location only to errors raised while it is visiting that scalar.
pub(super) fn validated_str<'de, D, T>(
    d: D,
    expecting: &'static str,
    validate: impl FnOnce(&str) -> Result<T, String>,
    placeholder: impl FnOnce() -> T,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<F, P>(&'static str, F, P);
    impl<'de, T, F, P> Visitor<'de> for V<F, P>
    where
        F: FnOnce(&str) -> Result<T, String>,
        P: FnOnce() -> T,
    {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<T, E> {
            check((self.1)(s), self.2)
        }
    }
    d.deserialize_str(V(expecting, validate, placeholder))
}

/// One problem found in the file, before it is dressed with the file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawError {
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// Index of the rule the error is inside of, if any.
    pub rule: Option<usize>,
}

/// Deserializes and validates `yaml`, collecting every error it can find in file order.
pub(crate) fn deserialize(yaml: &str) -> Result<RawPolicy, Vec<RawError>> {
    let mut skip = Vec::new();
    let mut errors: Vec<RawError> = Vec::new();
    loop {
        RUN.with(|run| {
            *run.borrow_mut() = Some(Run {
                skip: skip.clone(),
                ..Run::default()
            })
        });
        let result = serde_yaml::from_str::<RawPolicy>(yaml);
        let run = RUN.with(|run| run.borrow_mut().take()).unwrap_or_default();
        let err = match result {
            Ok(policy) if errors.is_empty() => return Ok(policy),
            Ok(_) => return Err(errors),
            Err(err) => err,
        };
        let display = err.to_string();
        let (line, column) = match err.location() {
            Some(loc) => (loc.line(), loc.column()),
            None => (second_document_line(yaml).unwrap_or(1), 1),
        };
        // Only trust the side channel when the error that came out is the one it recorded.
        let semantic = run.failed.filter(|(_, msg)| display.contains(msg.as_str()));
        let message = match &semantic {
            Some((_, msg)) => msg.clone(),
            None => bare_message(&display, line, column),
        };
        let raw = RawError {
            line,
            column,
            message,
            rule: run.rule,
        };
        if !errors.contains(&raw) {
            errors.push(raw);
        }
        match semantic {
            Some((ordinal, _)) if errors.len() < MAX_ERRORS && !skip.contains(&ordinal) => {
                skip.push(ordinal)
            }
            _ => return Err(errors),
        }
    }
}

/// Where a second YAML document starts, for serde_yaml's location-less "more than one
/// document" error: the first `---` line after some content.
fn second_document_line(yaml: &str) -> Option<usize> {
    let mut content = false;
    for (i, line) in yaml.lines().enumerate() {
        let is_separator = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_separator && content {
            return Some(i + 1);
        }
        let t = line.trim();
        if !is_separator && !t.is_empty() && !t.starts_with('#') && !t.starts_with('%') {
            content = true;
        }
    }
    None
}

/// Strips what serde_yaml adds around a message: the ` at line L column C` we report
/// separately, and the `rules[0].from[1]: ` path prefix we replace with the rule name.
pub(crate) fn bare_message(display: &str, line: usize, column: usize) -> String {
    let at = format!(" at line {line} column {column}");
    let msg = display.replacen(&at, "", 1);
    if let Some((head, rest)) = msg.split_once(": ") {
        let is_path = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '[' | ']' | '?'));
        if is_path {
            return rest.to_string();
        }
    }
    msg
}

/// The whole file.
#[derive(serde::Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a Moat policy (a mapping with apiVersion: moat.dev/v1, kind: Policy, default and rules)"
)]
pub(crate) struct RawPolicy {
    #[allow(dead_code)] // validated on the way in; there is nothing else to keep
    pub api_version: ApiVersion,
    #[allow(dead_code)]
    pub kind: Kind,
    #[serde(default)]
    pub default: DefaultAction,
    #[serde(default)]
    pub rules: Rules,
    #[serde(default)]
    pub admin: Option<RawAdmin>,
}

/// `admin`: who may use the sidecar's admin port beyond what every pod allows.
#[derive(serde::Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "an admin section (a mapping with metricsFrom)"
)]
pub(crate) struct RawAdmin {
    /// Networks that may scrape `/metrics`.
    pub metrics_from: CidrList,
}

/// A non-empty list of CIDRs (a bare IP is a /32 or /128).
pub(crate) struct CidrList(pub Vec<moat_core::netaddr::Cidr>);

impl<'de> Deserialize<'de> for CidrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CidrList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of networks such as 10.0.0.0/8 or fd00::/8")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CidrList, A::Error> {
                let mut cidrs = Vec::new();
                while let Some(CidrEntry(c)) = seq.next_element()? {
                    cidrs.extend(c);
                }
                let r = if cidrs.is_empty() {
                    Err("metricsFrom is empty, so nobody but the pod itself could scrape /metrics; omit admin to let anyone".to_string())
                } else {
                    Ok(())
                };
                check(r, || ()).map(|()| CidrList(cidrs))
            }
        }
        d.deserialize_seq(V)
    }
}

/// One network of a [`CidrList`]; `None` stands in for an entry already reported as invalid.
struct CidrEntry(Option<moat_core::netaddr::Cidr>);

impl<'de> Deserialize<'de> for CidrEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        validated_str(
            d,
            "a network such as 10.0.0.0/8",
            |s| {
                s.parse::<moat_core::netaddr::Cidr>()
                    .map(|c| CidrEntry(Some(c)))
            },
            || CidrEntry(None),
        )
    }
}

/// `apiVersion`, checked to be [`API_VERSION`].
pub(crate) struct ApiVersion;

impl<'de> Deserialize<'de> for ApiVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        validated_str(
            d,
            "an apiVersion string",
            |s| {
                if s == API_VERSION {
                    Ok(ApiVersion)
                } else {
                    Err(format!(
                        "apiVersion {s:?} is not supported; use {API_VERSION:?}"
                    ))
                }
            },
            || ApiVersion,
        )
    }
}

/// `kind`, checked to be [`KIND`].
pub(crate) struct Kind;

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        validated_str(
            d,
            "a kind string",
            |s| {
                if s == KIND {
                    Ok(Kind)
                } else {
                    Err(format!("kind {s:?} is not supported; use {KIND:?}"))
                }
            },
            || Kind,
        )
    }
}

/// The `rules` list; tracks which rule is being read so errors can name it.
#[derive(Default)]
pub(crate) struct Rules(pub Vec<RawRule>);

impl<'de> Deserialize<'de> for Rules {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Rules;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of rules")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Rules, A::Error> {
                let mut rules = Vec::new();
                loop {
                    set_rule(Some(rules.len()));
                    match seq.next_element::<RawRule>()? {
                        Some(rule) => rules.push(rule),
                        None => break,
                    }
                }
                set_rule(None);
                Ok(Rules(rules))
            }
        }
        d.deserialize_seq(V)
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Action {
    #[default]
    Allow,
    Deny,
}

/// One rule.
#[derive(serde::Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a rule (a mapping with name, action, ports and from)"
)]
pub(crate) struct RawRule {
    pub name: RuleName,
    #[serde(default)]
    pub action: Action,
    #[serde(default)]
    pub ports: Option<Ports>,
    pub from: FromList,
}

/// A rule name: `[a-z0-9-]{1,63}`, unique, and not `default` (that label means "no rule").
pub(crate) struct RuleName(pub String);

pub(crate) fn rule_name_problem(s: &str) -> Option<String> {
    if s.is_empty()
        || s.len() > 63
        || !s
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        Some(format!(
            "rule name {s:?} must be 1-63 characters of lowercase letters, digits and '-'"
        ))
    } else if s == "default" {
        Some(format!(
            "rule name {s:?} is reserved: decisions made by the default action are labelled \"default\""
        ))
    } else {
        None
    }
}

impl<'de> Deserialize<'de> for RuleName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        validated_str(
            d,
            "a rule name",
            |s| {
                if let Some(problem) = rule_name_problem(s) {
                    return Err(problem);
                }
                RUN.with(|run| {
                    let mut run = run.borrow_mut();
                    let Some(run) = run.as_mut() else {
                        return Ok(());
                    };
                    if let Some((first, _)) = run.names.iter().find(|(_, n)| n == s) {
                        return Err(format!(
                            "rule name {s:?} is already used by rule #{}",
                            first + 1
                        ));
                    }
                    let index = run.rule.unwrap_or(run.names.len());
                    run.names.push((index, s.to_string()));
                    Ok(())
                })?;
                Ok(RuleName(s.to_string()))
            },
            || RuleName(String::new()),
        )
    }
}

/// `ports`: a non-empty list of inclusive ranges.
pub(crate) struct Ports(pub Vec<(u16, u16)>);

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ports;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of ports and \"lo-hi\" port ranges")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ports, A::Error> {
                let mut ranges = Vec::new();
                while let Some(PortRange(lo, hi)) = seq.next_element()? {
                    ranges.push((lo, hi));
                }
                let r = if ranges.is_empty() {
                    Err("ports is empty, so the rule could never match; omit ports to match every port".to_string())
                } else {
                    Ok(())
                };
                check(r, || ()).map(|()| Ports(ranges))
            }
        }
        d.deserialize_seq(V)
    }
}

/// One `ports` entry: a port number, or a `"lo-hi"` string.
struct PortRange(u16, u16);

fn port_number(n: i128) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("port {n} is out of range (1-65535)")),
    }
}

fn parse_port_text(s: &str) -> Result<(u16, u16), String> {
    let number = |t: &str| -> Result<u16, String> {
        let t = t.trim();
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!(
                "port {s:?} is neither a port number nor a \"lo-hi\" range"
            ));
        }
        match t.parse::<u32>() {
            Ok(n) => port_number(i128::from(n)),
            // All digits, so the only way to fail is size.
            Err(_) => Err(format!("port {t} is out of range (1-65535)")),
        }
    };
    match s.split_once('-') {
        None => number(s).map(|p| (p, p)),
        Some((lo, hi)) => {
            let (lo, hi) = (number(lo)?, number(hi)?);
            if lo > hi {
                Err(format!("port range {s:?} is reversed (lo > hi)"))
            } else {
                Ok((lo, hi))
            }
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number (1-65535) or a \"lo-hi\" port range")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortRange, E> {
                let r = port_number(i128::from(n)).map(|p| PortRange(p, p));
                check(r, || PortRange(1, 1))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortRange, E> {
                let r = port_number(i128::from(n)).map(|p| PortRange(p, p));
                check(r, || PortRange(1, 1))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortRange, E> {
                let r = parse_port_text(s).map(|(lo, hi)| PortRange(lo, hi));
                check(r, || PortRange(1, 1))
            }
        }
        d.deserialize_any(V)
    }
}
