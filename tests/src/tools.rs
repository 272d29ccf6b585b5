//! External command-line tools some tests need (`openssl`, `curl`).
//!
//! A missing tool is a test failure with a clear message, never a silent skip: CI installs
//! them, and a test that quietly does nothing proves nothing.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context};

/// Finds `name` in `PATH`.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Finds `name` in `PATH`; panics with an explanation when it is missing.
pub fn require_tool(name: &str) -> PathBuf {
    match find_tool(name) {
        Some(p) => p,
        None => panic!(
            "this test needs `{name}` but it is not in PATH; install it (CI does: apt-get install {name})"
        ),
    }
}

/// Runs `tool` with `args`, capturing its output (whatever the exit status).
pub fn run<I, S>(tool: &Path, args: I) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(tool);
    cmd.args(args).stdin(Stdio::null());
    let shown = format!("{cmd:?}");
    cmd.output().with_context(|| format!("cannot run {shown}"))
}

/// Runs `tool` with `args` and returns its stdout; an error (with stderr) if it fails.
pub fn run_ok<I, S>(tool: &Path, args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let out = run(tool, &args)?;
    if !out.status.success() {
        bail!(
            "{} {:?} failed ({}): {}{}",
            tool.display(),
            args,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
