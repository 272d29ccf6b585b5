//! AdmissionReview decoding and injection in the webhook: the API server forwards whatever a
//! tenant put in their pod spec. Every body must get an AdmissionReview answer (or a bounded
//! HTTP error), and a patch, when there is one, must be a JSON Patch that applies to the pod
//! it came with.
#![no_main]

use std::sync::LazyLock;

use base64::Engine as _;
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use moat_injector::admission;
use moat_injector::config::{ConfigArgs, FailureMode, InjectConfig};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    cfg: ConfigArgs,
}

static CONFIG: LazyLock<InjectConfig> = LazyLock::new(|| {
    let ca = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|mut p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let key = rcgen::KeyPair::generate()?;
            p.self_signed(&key)
        })
        .expect("a CA certificate");
    let path = std::env::temp_dir().join(format!("moat-fuzz-bundle-{}.pem", std::process::id()));
    std::fs::write(&path, ca.pem()).expect("write the bundle");
    let bundle = path.to_string_lossy().into_owned();
    Cli::try_parse_from([
        "fuzz",
        "--trust-bundle",
        &bundle,
        "--destination-addr",
        "off",
    ])
    .expect("flags")
    .cfg
    .load()
    .expect("an injection config")
});

fuzz_target!(|data: &[u8]| {
    // The failure mode only matters when injection fails; the length's parity picks it so
    // that each input runs once.
    let failure = if data.len() % 2 == 0 {
        FailureMode::Closed
    } else {
        FailureMode::Open
    };
    {
        let reply = admission::review(data, &CONFIG, failure);
        assert!(matches!(reply.status, 200 | 400 | 413), "{reply:?}");
        let Some(patch) = reply.body["response"]["patch"].as_str() else {
            return;
        };
        let patch = base64::engine::general_purpose::STANDARD
            .decode(patch)
            .expect("the patch is base64");
        let patch: json_patch::Patch =
            serde_json::from_slice(&patch).expect("the patch is a JSON Patch");
        let review: serde_json::Value =
            serde_json::from_slice(data).expect("a patched review was JSON");
        let mut pod = review["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch)
            .unwrap_or_else(|e| panic!("the patch does not apply to its own pod: {e}"));
    }
});
