//! The discovery service's metric names, described once at start-up.

/// Watch events applied to the index, by `kind` and `event` (`list`, `apply`, `delete`).
pub const WATCH_EVENTS: &str = "moat_destination_watch_events_total";
/// Kubernetes watch or list failures, by `kind` (retried with backoff).
pub const WATCH_ERRORS: &str = "moat_destination_watch_errors_total";
/// Objects left out of the index (no valid identity, unnamed), by `kind`.
pub const SKIPPED: &str = "moat_destination_objects_skipped_total";
/// Objects held in the index, by `kind`.
pub const OBJECTS: &str = "moat_destination_objects";
/// Watch requests answered, by `result` (`changed`, `unchanged`, `invalid`).
pub const REQUESTS: &str = "moat_destination_requests_total";
/// Resolutions sent to sidecars, by `kind` (`pod`, `service`, `unknown`).
pub const UPDATES: &str = "moat_destination_updates_total";
/// Watch requests being held right now.
pub const HELD: &str = "moat_destination_requests_held";

/// Registers every metric's help text.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        WATCH_EVENTS,
        "Kubernetes watch events applied to the discovery index, by kind and event"
    );
    describe_counter!(WATCH_ERRORS, "Kubernetes list/watch failures, by kind (retried with backoff; the last known state is served meanwhile)");
    describe_counter!(
        SKIPPED,
        "Objects left out of discovery (no valid SPIFFE identity, unnamed), by kind"
    );
    describe_gauge!(OBJECTS, "Objects held in the discovery index, by kind");
    describe_counter!(REQUESTS, "Sidecar watch requests answered, by result");
    describe_counter!(UPDATES, "Resolutions sent to sidecars, by kind");
    describe_gauge!(
        HELD,
        "Sidecar watch requests held open waiting for a change"
    );
}

/// Every metric name, for the docs check.
pub const ALL: &[&str] = &[
    WATCH_EVENTS,
    WATCH_ERRORS,
    SKIPPED,
    OBJECTS,
    REQUESTS,
    UPDATES,
    HELD,
];
