//! Locating the release binaries under test.
//!
//! Test executables live in `target/release/deps/`, benchmark executables in
//! `target/release/`; the binaries under test are in `target/release/` either way. Set
//! `MOAT_BIN_DIR` to test binaries from somewhere else.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Message shown when a binary is missing.
pub const BUILD_HINT: &str =
    "build them first: cargo build --release --workspace (tests/run.sh does this)";

/// The directory holding the binaries: `$MOAT_BIN_DIR`, or the running executable's
/// `target/<profile>/` directory.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MOAT_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let mut dir = exe
        .parent()
        .context("the running executable has no parent directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of binary `name` (e.g. `moat-ca`), or an error saying how to build it.
pub fn try_binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    if !is_executable(&path) {
        bail!("{} not found: {BUILD_HINT}", path.display());
    }
    Ok(path)
}

/// Path of binary `name` (e.g. `moat-ca`); panics with the build hint when it is missing.
pub fn binary(name: &str) -> PathBuf {
    match try_binary(name) {
        Ok(p) => p,
        Err(e) => panic!("{e:#}"),
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
