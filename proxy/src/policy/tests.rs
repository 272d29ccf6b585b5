use super::*;

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn parse(yaml: &str) -> Policy {
    match Policy::parse(yaml, "policy.yaml", &td()) {
        Ok(p) => p,
        Err(e) => panic!("unexpected error:\n{e}"),
    }
}

/// Parses a policy that must fail, returning its diagnostics as `line:col: message` strings.
fn errors(yaml: &str) -> Vec<String> {
    match Policy::parse(yaml, "policy.yaml", &td()) {
        Ok(_) => panic!("policy unexpectedly valid:\n{yaml}"),
        Err(e) => {
            let diags = e.diagnostics();
            assert!(!diags.is_empty());
            assert_eq!(
                e.to_string(),
                diags
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            diags
                .iter()
                .map(|d| {
                    assert_eq!(d.source, "policy.yaml");
                    format!("{}:{}: {}", d.line, d.column, d.message)
                })
                .collect()
        }
    }
}

/// The only error of `yaml`, which must start with `prefix`.
fn single_error(yaml: &str, prefix: &str) {
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with(prefix),
        "got {:?}, want prefix {prefix:?}",
        errs[0]
    );
}

const HEADER: &str = "apiVersion: moat.dev/v1\nkind: Policy\n";

/// A policy with one rule made of `body` lines (indented under `- `), default deny.
fn one_rule(body: &str) -> String {
    format!("{HEADER}default: deny\nrules:\n  - name: r\n{body}")
}

const SHOP_WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// A decision table: each row is a caller (a SPIFFE ID, or `plaintext`), a port, and the
/// verdict and rule that must decide; a failing row names itself.
macro_rules! decides {
    (@caller plaintext) => { None::<SpiffeId> };
    (@caller $id:expr) => { Some(id($id)) };
    ($policy:expr, { $( $caller:tt : $port:literal => $verdict:ident by $rule:literal ),+ $(,)? }) => {{
        let policy = &$policy;
        $(
            let caller = decides!(@caller $caller);
            assert_eq!(
                policy.evaluate(caller.as_ref(), $port),
                Decision { verdict: Verdict::$verdict, rule: $rule },
                "{} on port {}",
                stringify!($caller),
                $port
            );
        )+
    }};
}

// ---------------------------------------------------------------- matchers

#[test]
fn policy_identity_matches_exactly_in_any_trust_domain() {
    let p = parse(&one_rule(
        "    from:\n      - identity: spiffe://partner.example/billing\n      - identity: spiffe://cluster.local/ns/shop/sa/web\n",
    ));
    assert_eq!(
        p.evaluate(Some(&id("spiffe://partner.example/billing")), 1)
            .verdict,
        Verdict::Allow
    );
    assert_eq!(p.evaluate(Some(&id(SHOP_WEB)), 1).rule, "r");
    for other in [
        "spiffe://partner.example/billing/x",
        "spiffe://partner.example/Billing",
        "spiffe://other.example/billing",
        "spiffe://cluster.local/ns/shop/sa/web2",
    ] {
        assert_eq!(
            p.evaluate(Some(&id(other)), 1).verdict,
            Verdict::Deny,
            "{other}"
        );
    }
    assert_eq!(p.evaluate(None, 1).verdict, Verdict::Deny);
}

#[test]
fn policy_service_account_matches_local_trust_domain_only() {
    let p = parse(&one_rule("    from:\n      - serviceAccount: shop/web\n"));
    assert!(p.evaluate(Some(&id(SHOP_WEB)), 80).allowed());
    assert!(!p
        .evaluate(Some(&id("spiffe://partner.example/ns/shop/sa/web")), 80)
        .allowed());
    assert!(!p
        .evaluate(Some(&id("spiffe://cluster.local/ns/shop/sa/api")), 80)
        .allowed());
    assert!(!p
        .evaluate(Some(&id("spiffe://cluster.local/ns/shop2/sa/web")), 80)
        .allowed());
    // Not a workload path, even though the segments are there.
    assert!(!p
        .evaluate(Some(&id("spiffe://cluster.local/ns/shop/sa/web/x")), 80)
        .allowed());
    assert!(!p.evaluate(None, 80).allowed());

    // The same file read by a proxy of another trust domain means that trust domain's shop/web.
    let other = TrustDomain::new("prod.example").unwrap();
    let p = Policy::parse(
        &one_rule("    from:\n      - serviceAccount: shop/web\n"),
        "p",
        &other,
    )
    .unwrap();
    assert!(!p.evaluate(Some(&id(SHOP_WEB)), 80).allowed());
    assert!(p
        .evaluate(Some(&id("spiffe://prod.example/ns/shop/sa/web")), 80)
        .allowed());
    assert_eq!(p.local_trust_domain(), &other);
}

#[test]
fn policy_service_account_names_may_be_dns_subdomains() {
    let p = parse(&one_rule(
        "    from:\n      - serviceAccount: shop/web.v2\n",
    ));
    assert!(p
        .evaluate(Some(&id("spiffe://cluster.local/ns/shop/sa/web.v2")), 80)
        .allowed());
}

#[test]
fn policy_namespace_matches_every_service_account_of_it_locally() {
    let p = parse(&one_rule("    from:\n      - namespace: shop\n"));
    assert!(p.evaluate(Some(&id(SHOP_WEB)), 80).allowed());
    assert!(p
        .evaluate(Some(&id("spiffe://cluster.local/ns/shop/sa/api")), 80)
        .allowed());
    assert!(!p
        .evaluate(Some(&id("spiffe://cluster.local/ns/shopping/sa/web")), 80)
        .allowed());
    assert!(!p
        .evaluate(Some(&id("spiffe://partner.example/ns/shop/sa/web")), 80)
        .allowed());
    assert!(!p
        .evaluate(Some(&id("spiffe://cluster.local/ns/shop")), 80)
        .allowed());
    assert!(!p.evaluate(None, 80).allowed());
}

#[test]
fn policy_trust_domain_matches_any_identity_of_it() {
    let p = parse(&one_rule(
        "    from:\n      - trustDomain: partner.example\n",
    ));
    assert!(p
        .evaluate(Some(&id("spiffe://partner.example/anything")), 80)
        .allowed());
    assert!(p
        .evaluate(Some(&id("spiffe://partner.example/ns/a/sa/b")), 80)
        .allowed());
    assert!(!p
        .evaluate(Some(&id("spiffe://partner.example.evil/x")), 80)
        .allowed());
    assert!(!p.evaluate(Some(&id(SHOP_WEB)), 80).allowed());
    assert!(!p.evaluate(None, 80).allowed());
}

#[test]
fn policy_authenticated_matches_any_local_identity() {
    let p = parse(&one_rule("    from:\n      - authenticated: true\n"));
    assert!(p.evaluate(Some(&id(SHOP_WEB)), 80).allowed());
    assert!(p
        .evaluate(Some(&id("spiffe://cluster.local/not/a/workload")), 80)
        .allowed());
    assert!(!p
        .evaluate(Some(&id("spiffe://partner.example/ns/shop/sa/web")), 80)
        .allowed());
    assert!(!p.evaluate(None, 80).allowed());
}

#[test]
fn policy_unauthenticated_matches_plaintext_callers_only() {
    let p = parse(&one_rule("    from:\n      - unauthenticated: true\n"));
    assert!(p.evaluate(None, 80).allowed());
    assert!(!p.evaluate(Some(&id(SHOP_WEB)), 80).allowed());
}

#[test]
fn policy_a_rule_matches_when_any_from_entry_matches() {
    let p = parse(&one_rule(
        "    from:\n      - namespace: shop\n      - unauthenticated: true\n",
    ));
    assert!(p.evaluate(None, 80).allowed());
    assert!(p.evaluate(Some(&id(SHOP_WEB)), 80).allowed());
    assert!(!p
        .evaluate(Some(&id("spiffe://cluster.local/ns/x/sa/y")), 80)
        .allowed());
}

// ---------------------------------------------------------------- ordering and ports

#[test]
fn policy_first_matching_rule_decides() {
    let yaml = format!(
        "{HEADER}default: allow
rules:
  - name: deny-web-admin
    action: deny
    ports: [9000]
    from:
      - serviceAccount: shop/web
  - name: allow-shop
    from:
      - namespace: shop
  - name: deny-shop-never-reached
    action: deny
    from:
      - namespace: shop
"
    );
    let p = parse(&yaml);
    assert_eq!(p.rule_count(), 3);
    assert_eq!(
        p.rule_names().collect::<Vec<_>>(),
        ["deny-web-admin", "allow-shop", "deny-shop-never-reached"]
    );
    decides!(p, {
        SHOP_WEB: 9000 => Deny by "deny-web-admin",
        // The deny rule's ports do not match, so evaluation moves on.
        SHOP_WEB: 8080 => Allow by "allow-shop",
        "spiffe://cluster.local/ns/shop/sa/api": 9000 => Allow by "allow-shop",
        plaintext: 9000 => Allow by "default",
    });
}

#[test]
fn policy_ports_and_ranges() {
    let p = parse(&one_rule(
        "    ports: [8080, \"9000-9100\", 443, \"10-10\", 65535, \" 20 - 21 \"]\n    from: [{unauthenticated: true}]\n",
    ));
    for port in [8080, 9000, 9050, 9100, 443, 10, 65535, 20, 21] {
        assert!(p.evaluate(None, port).allowed(), "{port}");
    }
    for port in [8079, 8081, 8999, 9101, 442, 11, 65534, 1, 0, 22] {
        assert!(!p.evaluate(None, port).allowed(), "{port}");
    }
}

#[test]
fn policy_absent_ports_match_every_port() {
    let p = parse(&one_rule("    from: [{unauthenticated: true}]\n"));
    for port in [0, 1, 80, 65535] {
        assert!(p.evaluate(None, port).allowed());
    }
}

#[test]
fn policy_port_forms_block_and_unquoted_range() {
    let p = parse(&one_rule(
        "    ports:\n      - 80\n      - 9000-9001\n      - '7000'\n    from: [{unauthenticated: true}]\n",
    ));
    for port in [80, 9000, 9001, 7000] {
        assert!(p.evaluate(None, port).allowed(), "{port}");
    }
    assert!(!p.evaluate(None, 81).allowed());
}

// ---------------------------------------------------------------- defaults

#[test]
fn policy_default_actions() {
    let caller = id("spiffe://cluster.local/ns/x/sa/y");
    for (word, action, verdict, label) in [
        ("deny", DefaultAction::Deny, Verdict::Deny, "deny"),
        ("allow", DefaultAction::Allow, Verdict::Allow, "allow"),
        (
            "audit",
            DefaultAction::Audit,
            Verdict::AuditDeny,
            "audit_deny",
        ),
    ] {
        let p = parse(&format!("{HEADER}default: {word}\n"));
        assert_eq!(p.default_action(), action);
        assert_eq!(action.to_string(), word);
        assert_eq!(p.rule_count(), 0);
        let d = p.evaluate(Some(&caller), 443);
        assert_eq!(
            d,
            Decision {
                verdict,
                rule: "default"
            }
        );
        assert_eq!(d.label(), label);
        assert_eq!(d.allowed(), verdict != Verdict::Deny);
        assert_eq!(p.evaluate(None, 443).verdict, verdict);
    }
}

#[test]
fn policy_default_is_deny_when_omitted() {
    let p = parse(HEADER);
    assert_eq!(p.default_action(), DefaultAction::Deny);
}

#[test]
fn policy_audit_default_does_not_affect_matching_rules() {
    let p = parse(&format!(
        "{HEADER}default: audit\nrules:\n  - name: block\n    action: deny\n    from: [{{namespace: bad}}]\n  - name: ok\n    from: [{{namespace: good}}]\n"
    ));
    let d = p.evaluate(Some(&id("spiffe://cluster.local/ns/bad/sa/x")), 1);
    assert_eq!(
        (d.verdict, d.rule, d.label(), d.allowed()),
        (Verdict::Deny, "block", "deny", false)
    );
    let d = p.evaluate(Some(&id("spiffe://cluster.local/ns/good/sa/x")), 1);
    assert_eq!(
        (d.verdict, d.rule, d.label(), d.allowed()),
        (Verdict::Allow, "ok", "allow", true)
    );
    let d = p.evaluate(Some(&id("spiffe://cluster.local/ns/other/sa/x")), 1);
    assert_eq!(
        (d.verdict, d.rule, d.label(), d.allowed()),
        (Verdict::AuditDeny, "default", "audit_deny", true)
    );
}

#[test]
fn policy_registers_a_decision_series_per_rule_and_authorize_counts_the_decider() {
    let rec = crate::metrics::test_recorder::TestRecorder::default();
    metrics::with_local_recorder(&rec, || {
        let p = parse(&format!(
            "{HEADER}default: audit\nrules:\n  - name: block\n    action: deny\n    from: [{{namespace: bad}}]\n  - name: ok\n    from: [{{namespace: good}}]\n"
        ));
        let series = |decision: &str, rule: &str| {
            format!("moat_proxy_authz_decisions_total{{decision={decision},rule={rule}}}")
        };
        // Every rule's series exists from the start (a rule that never matched reads 0),
        // under the verdict it gives.
        let want = [
            series("audit_deny", "default"),
            series("allow", "ok"),
            series("deny", "block"),
        ];
        assert_eq!(rec.registered(), want.iter().cloned().collect());
        assert_eq!(rec.get(&series("deny", "block")), None);

        let bad = id("spiffe://cluster.local/ns/bad/sa/x");
        assert_eq!(p.authorize(Some(&bad), 1).rule, "block");
        assert_eq!(p.authorize(Some(&bad), 2).rule, "block");
        assert_eq!(p.authorize(None, 1).rule, "default");
        // Evaluating without enforcing (explain, revocation checks) counts nothing.
        assert_eq!(p.evaluate(Some(&bad), 1).rule, "block");
        assert_eq!(rec.get(&series("deny", "block")), Some(2.0));
        assert_eq!(rec.get(&series("audit_deny", "default")), Some(1.0));
        assert_eq!(rec.get(&series("allow", "ok")), None);
        // Authorizing registers nothing new: the handles were made at parse time.
        assert_eq!(rec.registered(), want.iter().cloned().collect());
    });
}

#[test]
fn policy_builtin_allows_local_identities_only() {
    let p = Policy::builtin(&td());
    assert!(p.is_builtin());
    assert_eq!(p.default_action(), DefaultAction::Deny);
    assert_eq!(p.rule_count(), 1);
    decides!(p, {
        SHOP_WEB: 8080 => Allow by "default-authenticated",
        "spiffe://cluster.local/some/service": 1 => Allow by "default-authenticated",
        "spiffe://partner.example/ns/shop/sa/web": 8080 => Deny by "default",
        plaintext: 8080 => Deny by "default",
    });
}

#[test]
fn policy_the_documented_example_parses() {
    let yaml = r#"apiVersion: moat.dev/v1
kind: Policy
default: deny            # deny | allow | audit  (audit = allow, but record a would-deny)
rules:
  - name: web-to-api     # required, unique, [a-z0-9-]{1,63}; used as metric label
    action: allow        # allow (default) | deny
    ports: [8080, "9000-9100"]   # optional; absent = every port; ints or "lo-hi" ranges, 1..65535
    from:                # required, non-empty; a rule matches when the caller matches ANY entry
      - identity: spiffe://cluster.local/ns/shop/sa/web    # exact SPIFFE ID (any trust domain)
      - serviceAccount: shop/web                           # namespace/name in the LOCAL trust domain
      - namespace: shop                                    # any service account of that namespace, local trust domain
      - trustDomain: partner.example                       # any identity of that trust domain
      - authenticated: true                                # any identity of the local trust domain
      - unauthenticated: true                              # plaintext callers (no client certificate)
"#;
    let p = parse(yaml);
    assert_eq!(p.rule_count(), 1);
    assert_eq!(p.evaluate(None, 9050).rule, "web-to-api");
    assert_eq!(p.evaluate(None, 9101).rule, "default");
}

#[test]
fn policy_docs_examples_parse() {
    // Every ```yaml block of docs/policy.md that is a Policy must be valid.
    let doc = include_str!("../../../docs/policy.md");
    let mut count = 0;
    for block in doc.split("```yaml\n").skip(1) {
        let Some((yaml, _)) = block.split_once("```") else {
            panic!("unterminated yaml block");
        };
        if yaml.contains("kind: Policy") && !yaml.contains("# invalid") {
            parse(yaml);
            count += 1;
        }
    }
    assert!(
        count >= 3,
        "expected at least 3 policy examples, found {count}"
    );
}

// ---------------------------------------------------------------- errors, each with its location

#[test]
fn policy_error_empty_file() {
    for yaml in ["", "\n\n", "# only a comment\n", "---\n", "~\n"] {
        single_error(yaml, "1:1: the policy file is empty");
    }
}

#[test]
fn policy_error_yaml_syntax() {
    let errs = errors(&format!(
        "{HEADER}rules:\n  - name: a\n    from: [{{authenticated: true}}\n  - name: b\n"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("6:3: "), "{errs:?}");

    // Not attributed to a rule even though one was being read.
    let errs = errors(&format!("{HEADER}rules: [\n"));
    assert_eq!(
        errs,
        ["4:1: did not find expected node content, while parsing a flow node"]
    );
}

#[test]
fn policy_error_not_a_mapping() {
    single_error(
        "just text\n",
        "1:1: invalid type: string \"just text\", expected a Moat policy",
    );
    single_error(
        "- a\n- b\n",
        "1:1: invalid type: sequence, expected a Moat policy",
    );
}

#[test]
fn policy_error_api_version_and_kind() {
    single_error(
        "apiVersion: moat.dev/v2\nkind: Policy\n",
        "1:13: apiVersion \"moat.dev/v2\" is not supported; use \"moat.dev/v1\"",
    );
    single_error(
        "apiVersion: moat.dev/v1\nkind: ConfigMap\n",
        "2:7: kind \"ConfigMap\" is not supported; use \"Policy\"",
    );
    single_error("kind: Policy\n", "1:1: missing field `apiVersion`");
    single_error("apiVersion: moat.dev/v1\n", "1:1: missing field `kind`");
}

#[test]
fn policy_error_unknown_keys_everywhere() {
    single_error(
        &format!("{HEADER}defualt: deny\n"),
        "3:1: unknown field `defualt`, expected one of",
    );
    single_error(
        &one_rule("    port: [80]\n    from: [{authenticated: true}]\n"),
        "6:5: rule \"r\": unknown field `port`, expected one of `name`, `action`, `ports`, `from`",
    );
    single_error(
        &one_rule("    from:\n      - serviceaccount: shop/web\n"),
        "7:9: rule \"r\": unknown field `serviceaccount`, expected one of `identity`, `serviceAccount`",
    );
}

#[test]
fn policy_error_bad_enum_words() {
    single_error(
        &format!("{HEADER}default: permit\n"),
        "3:10: unknown variant `permit`, expected one of `deny`, `allow`, `audit`",
    );
    single_error(
        &one_rule("    action: audit\n    from: [{authenticated: true}]\n"),
        "6:13: rule \"r\": unknown variant `audit`, expected `allow` or `deny`",
    );
}

#[test]
fn policy_error_rule_names() {
    single_error(
        &format!("{HEADER}rules:\n  - name: Web_API\n    from: [{{authenticated: true}}]\n"),
        "4:11: rule #1: rule name \"Web_API\" must be 1-63 characters",
    );
    single_error(
        &format!("{HEADER}rules:\n  - name: \"\"\n    from: [{{authenticated: true}}]\n"),
        "4:11: rule #1: rule name \"\" must be",
    );
    single_error(
        &format!(
            "{HEADER}rules:\n  - name: {}\n    from: [{{authenticated: true}}]\n",
            "a".repeat(64)
        ),
        "4:11: rule #1: rule name",
    );
    single_error(
        &format!("{HEADER}rules:\n  - name: default\n    from: [{{authenticated: true}}]\n"),
        "4:11: rule #1: rule name \"default\" is reserved",
    );
    single_error(
        &format!("{HEADER}rules:\n  - from: [{{authenticated: true}}]\n"),
        "4:5: rule #1: missing field `name`",
    );
}

#[test]
fn policy_error_duplicate_rule_names() {
    let yaml = format!(
        "{HEADER}rules:
  - name: a
    from: [{{authenticated: true}}]
  - name: b
    from: [{{authenticated: true}}]
  - from: [{{unauthenticated: true}}]
    name: a
"
    );
    single_error(
        &yaml,
        "9:11: rule \"a\": rule name \"a\" is already used by rule #1",
    );
}

#[test]
fn policy_error_ports() {
    let rule = |ports: &str| {
        one_rule(&format!(
            "    ports: {ports}\n    from: [{{authenticated: true}}]\n"
        ))
    };
    single_error(
        &rule("[0]"),
        "6:13: rule \"r\": port 0 is out of range (1-65535)",
    );
    single_error(
        &rule("[80, 65536]"),
        "6:17: rule \"r\": port 65536 is out of range (1-65535)",
    );
    single_error(
        &rule("[-5]"),
        "6:13: rule \"r\": port -5 is out of range (1-65535)",
    );
    single_error(
        &rule("[8080, \"9100-9000\"]"),
        "6:19: rule \"r\": port range \"9100-9000\" is reversed (lo > hi)",
    );
    single_error(
        &rule("[\"0-10\"]"),
        "6:13: rule \"r\": port 0 is out of range (1-65535)",
    );
    single_error(
        &rule("[\"1-70000\"]"),
        "6:13: rule \"r\": port 70000 is out of range",
    );
    single_error(
        &rule("[\"99999999999999999999\"]"),
        "6:13: rule \"r\": port 99999999999999999999 is out of range (1-65535)",
    );
    single_error(
        &rule("[http]"),
        "6:13: rule \"r\": port \"http\" is neither a port number nor a \"lo-hi\" range",
    );
    single_error(
        &rule("[\"1-2-3\"]"),
        "6:13: rule \"r\": port \"1-2-3\" is neither",
    );
    single_error(
        &rule("[\"80-\"]"),
        "6:13: rule \"r\": port \"80-\" is neither",
    );
    single_error(&rule("[]"), "6:12: rule \"r\": ports is empty");
    single_error(
        &rule("[1.5]"),
        "6:13: rule \"r\": invalid type: floating point `1.5`",
    );
    single_error(
        &rule("80"),
        "6:12: rule \"r\": invalid type: integer `80`, expected a list of ports",
    );
    // Block style puts the error on the item's own line.
    single_error(
        &one_rule(
            "    ports:\n      - 80\n      - \"9100-9000\"\n    from: [{authenticated: true}]\n",
        ),
        "8:9: rule \"r\": port range \"9100-9000\" is reversed",
    );
}

#[test]
fn policy_error_from_list() {
    single_error(
        &one_rule("    from: []\n"),
        "6:11: rule \"r\": from is empty",
    );
    // Missing keys are reported where the rule's mapping starts.
    single_error(
        &one_rule("    ports: [80]\n"),
        "5:5: rule \"r\": missing field `from`",
    );
    single_error(
        &one_rule("    from:\n      - namespace: shop\n        serviceAccount: shop/web\n"),
        "7:9: rule \"r\": a from entry has exactly one key, but this one has namespace and serviceAccount",
    );
    single_error(
        &one_rule("    from:\n      - {}\n"),
        "7:9: rule \"r\": a from entry needs one key",
    );
    single_error(
        &one_rule("    from:\n      - shop/web\n"),
        "7:9: rule \"r\": invalid type: string \"shop/web\", expected a caller",
    );
}

#[test]
fn policy_error_identities() {
    let from = |entry: &str| one_rule(&format!("    from:\n      - {entry}\n"));
    single_error(
        &from("identity: https://cluster.local/ns/a/sa/b"),
        "7:19: rule \"r\": identity \"https://cluster.local/ns/a/sa/b\" is not a valid SPIFFE ID: a SPIFFE ID must start with",
    );
    single_error(
        &from("identity: spiffe://Cluster.local/ns/a/sa/b"),
        "7:19: rule \"r\": identity \"spiffe://Cluster.local/ns/a/sa/b\" is not a valid SPIFFE ID",
    );
    single_error(
        &from("identity: spiffe://cluster.local"),
        "7:19: rule \"r\": identity \"spiffe://cluster.local\" is not a valid SPIFFE ID",
    );
    single_error(
        &from("trustDomain: Partner.Example"),
        "7:22: rule \"r\": trustDomain \"Partner.Example\" is not a valid trust domain",
    );
    single_error(
        &from("trustDomain: \"spiffe://partner.example\""),
        "7:22: rule \"r\": trustDomain \"spiffe://partner.example\" is not a valid trust domain",
    );
}

#[test]
fn policy_error_kubernetes_names() {
    let from = |entry: &str| one_rule(&format!("    from:\n      - {entry}\n"));
    for bad in ["Shop", "-shop", "shop-", "sh.op", "sh_op", "\"\""] {
        single_error(
            &from(&format!("namespace: {bad}")),
            "7:20: rule \"r\": namespace",
        );
    }
    single_error(
        &from(&format!("namespace: {}", "a".repeat(64))),
        "7:20: rule \"r\": namespace",
    );
    single_error(
        &from("serviceAccount: web"),
        "7:25: rule \"r\": serviceAccount \"web\" must be written <namespace>/<name>",
    );
    single_error(
        &from("serviceAccount: Shop/web"),
        "7:25: rule \"r\": serviceAccount \"Shop/web\": namespace \"Shop\" is not a valid",
    );
    for bad in ["shop/Web", "shop/", "shop/a/b", "shop/web..x", "shop/-web"] {
        single_error(
            &from(&format!("serviceAccount: {bad}")),
            &format!("7:25: rule \"r\": serviceAccount \"{bad}\""),
        );
    }
}

#[test]
fn policy_error_authenticated_false() {
    for key in ["authenticated", "unauthenticated"] {
        let yaml = one_rule(&format!("    from:\n      - {key}: false\n"));
        let col = 9 + key.len() + 2;
        single_error(
            &yaml,
            &format!("7:{col}: rule \"r\": only `true` is allowed here"),
        );
    }
    single_error(
        &one_rule("    from:\n      - authenticated: yes\n"),
        "7:24: rule \"r\": invalid type: string \"yes\", expected true",
    );
}

#[test]
fn policy_error_rule_is_named_even_when_name_comes_last() {
    single_error(
        &format!(
            "{HEADER}rules:\n  - ports: [0]\n    from: [{{authenticated: true}}]\n    name: late\n"
        ),
        "4:13: rule \"late\": port 0",
    );
    // And by position when the name is unusable.
    let errs = errors(&format!(
        "{HEADER}rules:\n  - name: ok\n    from: [{{authenticated: true}}]\n  - ports: [0]\n    name: No\n    from: [{{authenticated: true}}]\n"
    ));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].starts_with("6:13: rule #2: port 0"), "{errs:#?}");
    assert!(
        errs[1].starts_with("7:11: rule #2: rule name \"No\""),
        "{errs:#?}"
    );
}

#[test]
fn policy_reports_every_semantic_error_in_file_order() {
    let yaml = "apiVersion: moat.dev/v9
kind: Policy
default: deny
rules:
  - name: Bad
    ports: [0, \"5-1\"]
    from:
      - namespace: X
      - authenticated: false
  - name: ok
    from: []
  - name: ok
    from:
      - identity: nope
      - unknownKey: 1
      - namespace: Y
";
    let errs = errors(yaml);
    let want = [
        "1:13: apiVersion \"moat.dev/v9\"",
        "5:11: rule #1: rule name \"Bad\"",
        "6:13: rule #1: port 0",
        "6:16: rule #1: port range \"5-1\" is reversed",
        "8:20: rule #1: namespace \"X\"",
        "9:24: rule #1: only `true`",
        "11:11: rule \"ok\": from is empty",
        "12:11: rule \"ok\": rule name \"ok\" is already used by rule #2",
        "14:19: rule \"ok\": identity \"nope\"",
        // Structural: the search stops here, so the namespace Y is not reported.
        "15:9: rule \"ok\": unknown field `unknownKey`",
    ];
    assert_eq!(errs.len(), want.len(), "{errs:#?}");
    for (got, want) in errs.iter().zip(want) {
        assert!(got.starts_with(want), "got {got:?}, want prefix {want:?}");
    }
}

#[test]
fn policy_error_display_format() {
    let err = Policy::parse(
        &one_rule("    ports: [8080, \"9100-9000\"]\n    from: [{authenticated: true}]\n"),
        "policy.yaml",
        &td(),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "policy.yaml:6:19: rule \"r\": port range \"9100-9000\" is reversed (lo > hi)"
    );
}

#[test]
fn policy_error_multiple_documents() {
    // Reported at the separator that starts the second document.
    let errs = errors(&format!("# comment\n---\n{HEADER}---\n{HEADER}"));
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("5:1: deserializing from YAML containing more than one document"),
        "{errs:?}"
    );
}

#[test]
fn policy_error_duplicate_keys() {
    // serde reports repeated keys where their mapping starts.
    single_error(
        &format!("{HEADER}kind: Policy\n"),
        "1:1: duplicate field `kind`",
    );
    single_error(
        &format!("{HEADER}rules:\n  - name: a\n    from: [{{authenticated: true}}]\n    name: b\n"),
        // The lenient first look also fails on the repeated key, so the rule goes by number.
        "4:5: rule #1: duplicate field `name`",
    );
}

#[test]
fn policy_error_not_utf8() {
    let err = decode(b"apiVersion: moat.dev/v1\nkind: P\xc3olicy\n", "p.yaml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "p.yaml:2:8: the policy file is not valid UTF-8"
    );
}

#[test]
fn policy_parsing_is_reentrant_after_errors() {
    // The per-run state must not leak from a failed parse into the next one.
    let yaml = format!("{HEADER}rules:\n  - name: a\n    from: [{{authenticated: true}}]\n");
    assert!(Policy::parse(
        &format!("{yaml}  - name: a\n    from: [{{x: 1}}]\n"),
        "p",
        &td()
    )
    .is_err());
    assert_eq!(parse(&yaml).rule_count(), 1);
    assert_eq!(parse(&yaml).rule_count(), 1);
}
