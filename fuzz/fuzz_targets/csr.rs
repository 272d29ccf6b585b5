//! CSR admission in the CA: a workload sends PEM it wrote itself. Even first byte: the rest is
//! the PEM text as sent; odd: the rest is DER, wrapped in PEM armour here, so the PKCS#10
//! parser is reached without the fuzzer having to learn base64. Admission
//! must end in an answer with an HTTP status, and never grant a DNS name nobody allowed.
#![no_main]

use std::sync::LazyLock;

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use moat_core::spiffe::SpiffeId;

static PROVEN: LazyLock<SpiffeId> = LazyLock::new(|| {
    "spiffe://cluster.local/ns/shop/sa/web"
        .parse()
        .expect("a valid SPIFFE ID")
});

fn check(pem: &str) {
    match moat_ca::csr::admit(pem, &PROVEN, &[]) {
        Ok(admitted) => assert!(
            admitted.dns_names.is_empty(),
            "DNS names granted without being allowed: {:?}",
            admitted.dns_names
        ),
        Err(e) => {
            assert!(matches!(e.status(), 400 | 403), "{e}");
            let _ = (e.code(), e.to_string());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        if let Ok(text) = std::str::from_utf8(rest) {
            check(text);
        }
    } else {
        let b64 = base64::engine::general_purpose::STANDARD.encode(rest);
        check(&format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n"
        ));
    }
});
