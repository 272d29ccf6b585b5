//! Logs: reading a child's JSON log lines, and capturing this process' own `tracing` output
//! (e.g. what an in-process [`moat_core::manager::IdentityManager`] reports).

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tracing_subscriber::fmt::MakeWriter;

/// The lines of `text` that parse as JSON objects.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(Value::is_object)
        .collect()
}

/// The JSON log lines whose fields include every `(key, value)` of `fields` (string values
/// compared as strings, others by their JSON text).
pub fn matching<'a>(lines: &'a [Value], fields: &[(&str, &str)]) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| {
            fields.iter().all(|(k, want)| match l.get(*k) {
                Some(Value::String(s)) => s == want,
                Some(other) => other.to_string().as_str() == *want,
                None => false,
            })
        })
        .collect()
}

/// Captures `tracing` events of the current thread as JSON lines, until the guard returned by
/// [`LogCapture::install`] is dropped.
///
/// With a current-thread Tokio runtime (the `#[tokio::test]` default) this includes every task
/// the test spawns.
#[derive(Clone, Default)]
pub struct LogCapture {
    buf: Arc<Mutex<Vec<u8>>>,
}

impl LogCapture {
    /// Starts capturing events at `level` and above (e.g. `"info"`) on this thread.
    pub fn install(level: &str) -> (Self, tracing::subscriber::DefaultGuard) {
        let me = Self::default();
        let filter = tracing_subscriber::EnvFilter::try_new(level)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter)
            .with_writer(me.clone())
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        (me, guard)
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        let buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Captured events as JSON objects.
    pub fn events(&self) -> Vec<Value> {
        json_lines(&self.text())
    }
}

/// Writer handed to the subscriber by [`LogCapture`].
pub struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogCapture {
    type Writer = CaptureWriter;
    fn make_writer(&'a self) -> Self::Writer {
        CaptureWriter(self.buf.clone())
    }
}
