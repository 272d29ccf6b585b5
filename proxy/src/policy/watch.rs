//! Loading the policy at start-up and keeping it current as the ConfigMap changes.
//!
//! A bad edit must never loosen or break authorization in a running proxy: an invalid new
//! version is rejected and the last good policy stays in force, with the rejection visible in
//! logs and metrics. A vanished file is treated the same way, because falling back to the
//! builtin policy would silently change who may connect.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use moat_core::watch::FileWatch;
use moat_core::TrustDomain;
use tokio::sync::watch;

use super::{decode, Policy, PolicyError};

/// Counter of reload attempts, labelled `result="ok"|"error"`.
pub const METRIC_RELOADS: &str = "moat_proxy_policy_reloads_total";
/// Gauge: 1 while the file on disk is the policy in force, 0 after a rejected reload.
pub const METRIC_VALID: &str = "moat_proxy_policy_valid";
/// Gauge: number of rules in the policy in force.
pub const METRIC_RULES: &str = "moat_proxy_policy_rules";

fn publish_gauges(policy: &Policy, valid: bool) {
    metrics::gauge!(METRIC_VALID).set(if valid { 1.0 } else { 0.0 });
    // Rule counts are tiny, so the conversion is exact.
    metrics::gauge!(METRIC_RULES).set(policy.rule_count() as f64);
}

/// Loads `path`, or the builtin policy if the file does not exist; fails if it exists but is
/// unreadable or invalid, so that a broken policy stops the proxy at start-up.
pub async fn load_initial(path: &Path, td: &TrustDomain) -> Result<Arc<Policy>, PolicyError> {
    let source = path.display().to_string();
    let policy = match tokio::fs::read(path).await {
        Ok(bytes) => Policy::parse(decode(&bytes, &source)?, &source, td)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                path = %source,
                "NO POLICY FILE: using the builtin policy (allow every identity of trust domain {td}, deny everything else); create the moat-policy ConfigMap to control access"
            );
            Policy::builtin(td)
        }
        Err(e) => {
            return Err(PolicyError::Read {
                path: source,
                source: e,
            })
        }
    };
    if !policy.is_builtin() {
        tracing::info!(
            path = %source,
            rules = policy.rule_count(),
            default = %policy.default_action(),
            "policy loaded"
        );
    }
    publish_gauges(&policy, true);
    Ok(Arc::new(policy))
}

/// Polls `path` every `period` and publishes each valid new version; invalid versions are
/// logged and counted while the last good policy stays in force.
pub fn spawn_watcher(
    path: PathBuf,
    td: TrustDomain,
    initial: Arc<Policy>,
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> watch::Receiver<Arc<Policy>> {
    let baseline = initial.source_text().map(|s| s.as_bytes().to_vec());
    let mut state = Watcher {
        source: path.display().to_string(),
        td,
        file_in_force: !initial.is_builtin(),
        missing: initial.is_builtin(),
        rejected: false,
        read_error: None,
    };
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        let mut files = FileWatch::new(path, baseline);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate and the caller has just loaded the file.
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = moat_core::shutdown::signalled(&mut shutdown) => break,
                _ = ticker.tick() => {}
            }
            if tx.is_closed() {
                break;
            }
            let polled = files.poll().await;
            // Cloned so the channel's lock is not held across send_replace.
            let current = tx.borrow().clone();
            if let Some(policy) = state.on_poll(polled, &current) {
                tx.send_replace(policy);
            }
        }
    });
    rx
}

/// What the watcher remembers between polls, to log transitions once rather than every poll.
struct Watcher {
    source: String,
    td: TrustDomain,
    /// Whether the policy in force came from the file (as opposed to the builtin one).
    file_in_force: bool,
    /// Whether the file was absent at the last poll.
    missing: bool,
    /// Whether the file's latest contents were rejected (still true while it is absent, since
    /// the same contents coming back are not re-parsed).
    rejected: bool,
    /// The last read error other than absence, to log each distinct one once.
    read_error: Option<String>,
}

impl Watcher {
    /// Handles one poll; returns the policy to publish, if any.
    fn on_poll(
        &mut self,
        polled: std::io::Result<Option<Vec<u8>>>,
        current: &Arc<Policy>,
    ) -> Option<Arc<Policy>> {
        let changed = match polled {
            Ok(changed) => changed,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !self.missing && self.file_in_force {
                    tracing::warn!(
                        path = %self.source,
                        "policy file has disappeared; keeping the last policy in force (a restart would fall back to the builtin policy)"
                    );
                    metrics::gauge!(METRIC_VALID).set(0.0);
                } else if !self.missing {
                    // Only a rejected file had appeared; without it the builtin policy in
                    // force is exactly what a restart would use.
                    publish_gauges(current, true);
                }
                self.missing = true;
                return None;
            }
            Err(e) => {
                let msg = e.to_string();
                if self.read_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(path = %self.source, error = %msg, "cannot read the policy file; keeping the last policy in force");
                }
                self.read_error = Some(msg);
                return None;
            }
        };
        self.read_error = None;
        let was_missing = std::mem::replace(&mut self.missing, false);
        let Some(bytes) = changed else {
            if was_missing && self.rejected {
                tracing::warn!(path = %self.source, "policy file is back, still the rejected version; keeping the last good policy");
            } else if was_missing {
                // The very contents in force: nothing to reload, but the file is valid again.
                tracing::info!(path = %self.source, "policy file is back, unchanged");
                publish_gauges(current, true);
            }
            return None;
        };
        let parsed = decode(&bytes, &self.source)
            .and_then(|text| Policy::parse(text, &self.source, &self.td));
        match parsed {
            Ok(policy) => {
                metrics::counter!(METRIC_RELOADS, "result" => "ok").increment(1);
                publish_gauges(&policy, true);
                tracing::info!(
                    path = %self.source,
                    rules = policy.rule_count(),
                    default = %policy.default_action(),
                    "policy reloaded"
                );
                self.file_in_force = true;
                self.rejected = false;
                Some(Arc::new(policy))
            }
            Err(e) => {
                self.rejected = true;
                metrics::counter!(METRIC_RELOADS, "result" => "error").increment(1);
                publish_gauges(current, false);
                tracing::error!(
                    path = %self.source,
                    "policy reload rejected, keeping the last good policy ({} rules, default {}):\n{e}",
                    current.rule_count(),
                    current.default_action(),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "moat-policy-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const ALLOW_WEB: &str = "apiVersion: moat.dev/v1\nkind: Policy\ndefault: deny\nrules:\n  - name: web\n    from:\n      - serviceAccount: shop/web\n";
    const ALLOW_ALL: &str = "apiVersion: moat.dev/v1\nkind: Policy\ndefault: allow\n";
    const BROKEN: &str =
        "apiVersion: moat.dev/v1\nkind: Policy\ndefault: deny\nrules:\n  - name: Bad_Name\n    from: [{authenticated: true}]\n";

    /// Writes like kubelet does (never a half-written file), so the watcher cannot catch a
    /// truncated version that happens to be valid.
    fn write_atomic(path: &Path, contents: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    async fn next(rx: &mut watch::Receiver<Arc<Policy>>) -> Arc<Policy> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("no policy published in time")
            .unwrap();
        rx.borrow_and_update().clone()
    }

    fn not_found() -> std::io::Result<Option<Vec<u8>>> {
        Err(std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    #[test]
    fn policy_watcher_metrics_follow_the_file() {
        let rec = crate::metrics::test_recorder::TestRecorder::default();
        let ok = "moat_proxy_policy_reloads_total{result=ok}";
        let error = "moat_proxy_policy_reloads_total{result=error}";
        metrics::with_local_recorder(&rec, || {
            let initial = Arc::new(Policy::parse(ALLOW_WEB, "p", &td()).unwrap());
            let mut w = Watcher {
                source: "p".into(),
                td: td(),
                file_in_force: true,
                missing: false,
                rejected: false,
                read_error: None,
            };

            let p = w.on_poll(Ok(Some(ALLOW_ALL.into())), &initial).unwrap();
            assert_eq!((rec.get(ok), rec.get(error)), (Some(1.0), None));
            assert_eq!(rec.get(METRIC_VALID), Some(1.0));
            assert_eq!(rec.get(METRIC_RULES), Some(0.0));

            assert!(w.on_poll(Ok(Some(BROKEN.into())), &p).is_none());
            assert_eq!((rec.get(ok), rec.get(error)), (Some(1.0), Some(1.0)));
            assert_eq!(rec.get(METRIC_VALID), Some(0.0));
            assert_eq!(rec.get(METRIC_RULES), Some(0.0));

            // Gone, then back with the same rejected contents: still not valid.
            assert!(w.on_poll(not_found(), &p).is_none());
            assert!(w.on_poll(Ok(None), &p).is_none());
            assert_eq!(rec.get(METRIC_VALID), Some(0.0));

            let p = w.on_poll(Ok(Some(ALLOW_WEB.into())), &p).unwrap();
            assert_eq!(rec.get(METRIC_VALID), Some(1.0));
            assert_eq!(rec.get(METRIC_RULES), Some(1.0));

            // Gone: the policy stays but no longer matches the (absent) file.
            assert!(w.on_poll(not_found(), &p).is_none());
            assert_eq!(rec.get(METRIC_VALID), Some(0.0));
            // Back unchanged: valid again without a reload.
            assert!(w.on_poll(Ok(None), &p).is_none());
            assert_eq!(rec.get(METRIC_VALID), Some(1.0));
            assert_eq!((rec.get(ok), rec.get(error)), (Some(2.0), Some(1.0)));

            // Unreadable: nothing changes.
            let denied = Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
            assert!(w.on_poll(denied, &p).is_none());
            assert_eq!(rec.get(METRIC_VALID), Some(1.0));
        });
    }

    #[test]
    fn policy_watcher_metrics_with_builtin_policy() {
        let rec = crate::metrics::test_recorder::TestRecorder::default();
        metrics::with_local_recorder(&rec, || {
            let builtin = Arc::new(Policy::builtin(&td()));
            let mut w = Watcher {
                source: "p".into(),
                td: td(),
                file_in_force: false,
                missing: true,
                rejected: false,
                read_error: None,
            };
            // Still no file: nothing to report.
            assert!(w.on_poll(not_found(), &builtin).is_none());
            assert_eq!(rec.get(METRIC_VALID), None);
            // A broken file appears: rejected, the builtin policy stays.
            assert!(w.on_poll(Ok(Some(BROKEN.into())), &builtin).is_none());
            assert_eq!(rec.get(METRIC_VALID), Some(0.0));
            assert_eq!(rec.get(METRIC_RULES), Some(1.0));
            // And goes away again: the builtin policy is what the (absent) file means.
            assert!(w.on_poll(not_found(), &builtin).is_none());
            assert_eq!(rec.get(METRIC_VALID), Some(1.0));
        });
    }

    #[tokio::test]
    async fn policy_load_initial_falls_back_to_builtin_only_when_absent() {
        let dir = TempDir::new("initial");
        let path = dir.0.join("policy.yaml");
        let p = load_initial(&path, &td()).await.unwrap();
        assert!(p.is_builtin());

        std::fs::write(&path, ALLOW_WEB).unwrap();
        let p = load_initial(&path, &td()).await.unwrap();
        assert!(!p.is_builtin());
        assert_eq!(p.rule_count(), 1);

        std::fs::write(&path, BROKEN).unwrap();
        let err = load_initial(&path, &td()).await.unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{}:5:11: ", path.display())),
            "{err}"
        );

        std::fs::write(&path, b"apiVersion: \xff\n").unwrap();
        let err = load_initial(&path, &td()).await.unwrap_err();
        assert_eq!(err.diagnostics()[0].line, 1);
        assert_eq!(err.diagnostics()[0].column, 13);

        // A directory exists but cannot be read as a file: that must not mean "use builtin".
        let err = load_initial(&dir.0, &td()).await.unwrap_err();
        assert!(matches!(err, PolicyError::Read { .. }), "{err}");
    }

    #[tokio::test]
    async fn policy_watcher_publishes_valid_versions_and_keeps_the_last_good_one() {
        let dir = TempDir::new("watch");
        let path = dir.0.join("policy.yaml");
        write_atomic(&path, ALLOW_WEB);
        let initial = load_initial(&path, &td()).await.unwrap();
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut rx = spawn_watcher(
            path.clone(),
            td(),
            initial,
            Duration::from_millis(10),
            stop_rx,
        );
        // Re-reading identical contents must not publish anything.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!rx.has_changed().unwrap());

        write_atomic(&path, ALLOW_ALL);
        let p = next(&mut rx).await;
        assert_eq!(p.default_action(), super::super::DefaultAction::Allow);

        // Invalid and vanished files leave the last good policy in force.
        write_atomic(&path, BROKEN);
        tokio::time::sleep(Duration::from_millis(60)).await;
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow().default_action(),
            super::super::DefaultAction::Allow
        );

        write_atomic(&path, ALLOW_WEB);
        let p = next(&mut rx).await;
        assert_eq!(p.rule_count(), 1);

        stop_tx.send(true).unwrap();
        // The sender is dropped when the task ends.
        tokio::time::timeout(Duration::from_secs(5), async {
            while rx.changed().await.is_ok() {}
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn policy_watcher_picks_up_a_file_created_after_start() {
        let dir = TempDir::new("late");
        let path = dir.0.join("policy.yaml");
        let initial = load_initial(&path, &td()).await.unwrap();
        assert!(initial.is_builtin());
        let (_stop_tx, stop_rx) = watch::channel(false);
        let mut rx = spawn_watcher(
            path.clone(),
            td(),
            initial,
            Duration::from_millis(10),
            stop_rx,
        );
        write_atomic(&path, ALLOW_WEB);
        let p = next(&mut rx).await;
        assert!(!p.is_builtin());
    }

    #[tokio::test]
    async fn policy_watcher_follows_kubelet_symlink_swaps() {
        let dir = TempDir::new("swap");
        std::fs::create_dir_all(dir.0.join("v1")).unwrap();
        std::fs::create_dir_all(dir.0.join("v2")).unwrap();
        std::fs::write(dir.0.join("v1/policy.yaml"), ALLOW_WEB).unwrap();
        std::fs::write(dir.0.join("v2/policy.yaml"), ALLOW_ALL).unwrap();
        std::os::unix::fs::symlink("v1", dir.0.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/policy.yaml", dir.0.join("policy.yaml")).unwrap();
        let path = dir.0.join("policy.yaml");
        let initial = load_initial(&path, &td()).await.unwrap();
        let (_stop_tx, stop_rx) = watch::channel(false);
        let mut rx = spawn_watcher(path, td(), initial, Duration::from_millis(10), stop_rx);
        std::fs::rename(dir.0.join("..data"), dir.0.join("..old")).unwrap();
        std::os::unix::fs::symlink("v2", dir.0.join("..data")).unwrap();
        let p = next(&mut rx).await;
        assert_eq!(p.default_action(), super::super::DefaultAction::Allow);
    }
}
