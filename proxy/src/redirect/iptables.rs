//! Running the iptables programs: which backend (nft or legacy) and family, reading the nat
//! table, applying a transaction, and the capabilities that takes.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{Family, IptablesMode, RedirectError, INBOUND_CHAIN};

/// The iptables programs of one family and backend.
#[derive(Debug, Clone)]
pub(super) struct Backend {
    pub(super) restore: PathBuf,
    save: PathBuf,
    pub(super) name: &'static str,
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn missing(program: &str) -> RedirectError {
    RedirectError::MissingTool {
        program: program.to_string(),
        path: std::env::var("PATH").unwrap_or_default(),
    }
}

fn backend_programs(family: Family, flavour: &str) -> (String, String) {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    if flavour.is_empty() {
        (format!("{base}-restore"), format!("{base}-save"))
    } else {
        (
            format!("{base}-{flavour}-restore"),
            format!("{base}-{flavour}-save"),
        )
    }
}

fn backend(family: Family, flavour: &'static str) -> Result<Backend, RedirectError> {
    let (restore, save) = backend_programs(family, flavour);
    Ok(Backend {
        restore: find_in_path(&restore).ok_or_else(|| missing(&restore))?,
        save: find_in_path(&save).ok_or_else(|| missing(&save))?,
        name: if flavour.is_empty() {
            "default"
        } else {
            flavour
        },
    })
}

/// Runs `save -t nat`, returning its output.
pub(super) fn save_nat(b: &Backend) -> Result<String, RedirectError> {
    let out = Command::new(&b.save)
        .args(["-t", "nat"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| tool_error(&b.save, "could not start", &e.to_string()))?;
    if !out.status.success() {
        return Err(tool_error(
            &b.save,
            &out.status.to_string(),
            &String::from_utf8_lossy(&out.stderr),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn tool_error(program: &Path, status: &str, stderr: &str) -> RedirectError {
    let lower = stderr.to_ascii_lowercase();
    let hint = if lower.contains("permission denied") || lower.contains("operation not permitted") {
        " -- the init container needs NET_ADMIN and NET_RAW and must run as uid 0"
    } else if lower.contains("protocol not supported")
        || lower.contains("does not exist")
        || lower.contains("table does not exist")
        || lower.contains("can't initialize")
    {
        " -- the node kernel lacks this iptables backend; try --iptables-mode legacy or nft"
    } else {
        ""
    };
    RedirectError::ToolFailed {
        program: program.display().to_string(),
        status: status.to_string(),
        stderr: stderr.trim().to_string(),
        hint,
    }
}

/// Pipes `input` to `restore --noflush` (with `--test`, only checks it).
pub(super) fn restore(b: &Backend, input: &str, test_only: bool) -> Result<(), RedirectError> {
    let mut cmd = Command::new(&b.restore);
    cmd.args(["--noflush", "--wait", "10"]);
    if test_only {
        cmd.arg("--test");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool_error(&b.restore, "could not start", &e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| tool_error(&b.restore, "stdin", &e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| tool_error(&b.restore, "wait", &e.to_string()))?;
    if !out.status.success() {
        return Err(tool_error(
            &b.restore,
            &out.status.to_string(),
            &String::from_utf8_lossy(&out.stderr),
        ));
    }
    Ok(())
}

/// Picks the backend for `family` according to `mode`.
pub(super) fn select_backend(family: Family, mode: IptablesMode) -> Result<Backend, RedirectError> {
    match mode {
        IptablesMode::Nft => backend(family, "nft"),
        IptablesMode::Legacy => backend(family, "legacy"),
        IptablesMode::Auto => {
            let marker = format!(":{INBOUND_CHAIN} ");
            let nft = backend(family, "nft");
            // A backend that already holds Moat's chains (a rerun) is kept.
            if let Ok(b) = &nft {
                if save_nat(b).is_ok_and(|s| s.contains(&marker)) {
                    return nft;
                }
            }
            if let Ok(b) = backend(family, "legacy") {
                if save_nat(&b).is_ok_and(|s| s.contains(&marker)) {
                    return Ok(b);
                }
            }
            if let Ok(b) = &nft {
                if save_nat(b).is_ok() {
                    return nft;
                }
            }
            backend(family, "legacy").or_else(|_| backend(family, ""))
        }
    }
}

/// Effective capabilities bitmask of this process (`CapEff` in `/proc/self/status`).
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

pub(super) fn check_capabilities() -> Result<(), RedirectError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_NET_RAW: u32 = 13;
    // When /proc is unreadable, let iptables itself report the problem.
    let Some(caps) = effective_caps() else {
        return Ok(());
    };
    if caps & (1 << CAP_NET_ADMIN) == 0 {
        return Err(RedirectError::MissingCapability("NET_ADMIN"));
    }
    if caps & (1 << CAP_NET_RAW) == 0 {
        return Err(RedirectError::MissingCapability("NET_RAW"));
    }
    Ok(())
}
