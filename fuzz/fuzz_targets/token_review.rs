//! The CA's reading of a TokenReview answer from the Kubernetes API server. An answer that
//! does not say "authenticated, for our audience, as a service account bound to a pod" must
//! never prove a workload.
#![no_main]

use k8s_openapi::api::authentication::v1::TokenReview;
use libfuzzer_sys::fuzz_target;
use moat_ca::auth::workload_from_review;

fuzz_target!(|data: &[u8]| {
    let Ok(review) = serde_json::from_slice::<TokenReview>(data) else {
        return;
    };
    let authenticated = review
        .status
        .as_ref()
        .is_some_and(|s| s.authenticated == Some(true));
    match workload_from_review(review, "moat-ca") {
        Ok(w) => {
            assert!(authenticated, "an unauthenticated review proved {w:?}");
            assert!(w.pod.is_some(), "a review without a pod proved {w:?}");
        }
        Err(e) => {
            let _ = (e.reason(), e.to_string());
        }
    }
});
