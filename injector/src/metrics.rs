//! The injector's Prometheus metrics (served on the admin listener's `/metrics`).

/// Histogram: time to answer one AdmissionReview, by `result` (`injected`, `skipped`,
/// `refused`, `error`, `bad_request`).
pub const ADMISSION_DURATION: &str = "moat_injector_admission_duration_seconds";
/// Counter: pods injected.
pub const INJECTIONS: &str = "moat_injector_injections_total";
/// Counter: requests admitted without injection, by `reason`.
pub const SKIPS: &str = "moat_injector_skips_total";
/// Counter: pods refused in enforcing namespaces, by `reason` (one per distinct reason of the
/// pod: `opted_out`, `net_admin`, ... see `enforce::OptOut::label`).
pub const REFUSALS: &str = "moat_injector_refusals_total";
/// Counter: requests that could not be handled normally, by `reason`.
pub const ERRORS: &str = "moat_injector_errors_total";
/// Counter: caBundle updates of the webhook configuration, by `result`.
pub const CA_BUNDLE_SYNCS: &str = "moat_injector_ca_bundle_syncs_total";
/// Counter: serving certificate reloads from files, by `result`.
pub const CERT_RELOADS: &str = "moat_injector_cert_reloads_total";

/// Registers help texts so the metrics are self-describing.
pub fn describe() {
    metrics::describe_histogram!(
        ADMISSION_DURATION,
        metrics::Unit::Seconds,
        "Time to answer one AdmissionReview, by result."
    );
    metrics::describe_counter!(INJECTIONS, "Pods injected with the Moat sidecar.");
    metrics::describe_counter!(
        SKIPS,
        "Admission requests answered without injection, by reason."
    );
    metrics::describe_counter!(
        REFUSALS,
        "Pods refused in mesh-enforcing namespaces (opt-outs and conflicts), by reason."
    );
    metrics::describe_counter!(ERRORS, "Admission requests that failed, by reason.");
    metrics::describe_counter!(
        CA_BUNDLE_SYNCS,
        "Updates of the MutatingWebhookConfiguration caBundle, by result."
    );
    metrics::describe_counter!(CERT_RELOADS, "Serving certificate reloads, by result.");
}

/// Counts a skip.
pub fn skipped(reason: &'static str) {
    metrics::counter!(SKIPS, "reason" => reason).increment(1);
}

/// Counts a refusal.
pub fn refused(reason: &'static str) {
    metrics::counter!(REFUSALS, "reason" => reason).increment(1);
}

/// Counts an error.
pub fn error(reason: &'static str) {
    metrics::counter!(ERRORS, "reason" => reason).increment(1);
}
