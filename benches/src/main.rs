//! `moat-bench`: Moat's benchmarks, run against the real release binaries.
//!
//! The benchmarks build nothing themselves: run `cargo build --release --workspace` first
//! (they look for `target/release/moat-*` next to their own executable, or in
//! `$MOAT_BIN_DIR`). Each benchmark is a subcommand; add one by adding a module, a [`Cmd`]
//! variant and its arm in [`dispatch`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod ca;
mod util;

/// Moat's benchmarks (expects release binaries: `cargo build --release --workspace`).
#[derive(Parser)]
#[command(name = "moat-bench", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// CA issuance: certificates per second and latency of the real moat-ca.
    Ca(ca::CaArgs),
}

/// Runs one benchmark; `Ok(false)` when it ran but saw failures (errors, not missed targets).
fn dispatch(cmd: Cmd) -> anyhow::Result<bool> {
    match cmd {
        Cmd::Ca(args) => ca::main(args),
    }
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().cmd) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("moat-bench: requests failed during the run (see ERRORS above)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("moat-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
