//! Service-account token verification in the CA (offline, against the issuer's JWKS). Odd
//! first byte: the rest is the token as sent. Even first byte: the rest is the claims, signed
//! here with the issuer's key, so the claim checks behind the signature are reached too. A
//! token must never prove a workload that is not bound to a pod.
#![no_main]

use std::sync::LazyLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use moat_ca::auth::{Jwks, TokenVerifier};

struct Issuer {
    jwks: Jwks,
    key: jsonwebtoken::EncodingKey,
    runtime: tokio::runtime::Runtime,
}

static ISSUER: LazyLock<Issuer> = LazyLock::new(|| {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
    let raw = pair.public_key_raw();
    let (x, y) = raw[1..].split_at(32);
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "fuzz",
        "x": B64.encode(x), "y": B64.encode(y),
    }]});
    let path = std::env::temp_dir().join(format!("moat-fuzz-jwks-{}.json", std::process::id()));
    std::fs::write(&path, jwks.to_string()).expect("write the JWKS");
    let jwks = Jwks::load(
        path,
        "https://kubernetes.default.svc".into(),
        "moat-ca".into(),
    )
    .expect("load the JWKS");
    let key = jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    Issuer { jwks, key, runtime }
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let issuer = &*ISSUER;
    let token = if mode & 1 == 1 {
        match std::str::from_utf8(rest) {
            Ok(t) => t.to_string(),
            Err(_) => return,
        }
    } else {
        let signing_input = format!(
            "{}.{}",
            B64.encode(br#"{"alg":"ES256","kid":"fuzz","typ":"JWT"}"#),
            B64.encode(rest)
        );
        let Ok(sig) = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &issuer.key,
            jsonwebtoken::Algorithm::ES256,
        ) else {
            return;
        };
        format!("{signing_input}.{sig}")
    };
    match issuer.runtime.block_on(issuer.jwks.verify(&token)) {
        Ok(w) => {
            assert!(w.pod.is_some(), "a token without a pod proved {w:?}");
            assert!(mode & 1 == 0, "an unsigned token was accepted: {token}");
        }
        Err(e) => {
            let _ = (e.reason(), e.to_string());
        }
    }
});
