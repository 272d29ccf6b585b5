//! Policy files, written by the security team and mounted from a ConfigMap. Parsing must end
//! in a policy or located diagnostics; a parsed policy must evaluate any caller without
//! panicking, and fail closed: with `default: deny` and no rule matching, nobody is admitted.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use moat_core::spiffe::{SpiffeId, TrustDomain};
use moat_proxy::policy::{DefaultAction, Policy};

static TD: LazyLock<TrustDomain> =
    LazyLock::new(|| "cluster.local".parse().expect("a valid trust domain"));
static CALLERS: LazyLock<Vec<SpiffeId>> = LazyLock::new(|| {
    [
        "spiffe://cluster.local/ns/shop/sa/web",
        "spiffe://cluster.local/ns/kube-system/sa/default",
        "spiffe://other.example/ns/shop/sa/web",
    ]
    .iter()
    .map(|s| s.parse().expect("a valid SPIFFE ID"))
    .collect()
});

fuzz_target!(|data: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::parse(yaml, "fuzz.yaml", &TD) {
        Ok(policy) => {
            for port in [0, 80, 8080, 65535] {
                let anonymous = policy.evaluate(None, port);
                if policy.rule_count() == 0 && policy.default_action() == DefaultAction::Deny {
                    assert!(
                        !anonymous.allowed(),
                        "deny-by-default with no rules admitted"
                    );
                }
                for caller in CALLERS.iter() {
                    let d = policy.evaluate(Some(caller), port);
                    let _ = (d.allowed(), d.label());
                }
            }
            let _ = policy.rule_names().count();
        }
        Err(e) => {
            for d in e.diagnostics() {
                let _ = d.to_string();
            }
            let _ = e.to_string();
        }
    }
});
