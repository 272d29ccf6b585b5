//! `moat-bench`: Moat's benchmarks, run against the real release binaries.
//!
//! The benchmarks build nothing themselves: run `cargo build --release --workspace` first
//! (they look for `target/release/moat-*` next to their own executable, or in
//! `$MOAT_BIN_DIR`). Each benchmark is a subcommand; add one by adding a module, a [`Cmd`]
//! variant and its arm in [`dispatch`].

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

mod all;
mod alloc;
mod ca;
mod controller;
mod discovery;
mod injector;
mod mesh;
mod phase;
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
    /// Injector admission: latency and admissions per second of the real moat-injector.
    Injector(injector::InjectorArgs),
    /// Data plane: Moat's sidecar pair against HAProxy and no proxy, side by side.
    Mesh(mesh::MeshArgs),
    /// Discovery at cluster scale: index memory, one sidecar's state, change fan-out.
    Discovery(discovery::DiscoveryArgs),
    /// The deployed discovery controller against a live API server (tests/cluster/up.sh).
    Controller(controller::ControllerArgs),
    /// Everything: the data-plane comparison with CA and injector lines, one report.
    All(all::AllArgs),
}

/// Runs one benchmark; `Ok(false)` when it ran but saw failures (errors, not missed targets).
fn dispatch(cmd: Cmd) -> anyhow::Result<bool> {
    match cmd {
        Cmd::Ca(args) => ca::main(args),
        Cmd::Discovery(args) => discovery::main(args),
        Cmd::Controller(args) => controller::main(args),
        Cmd::Mesh(args) => mesh::main(args),
        Cmd::All(args) => all::main(args),
        Cmd::Injector(args) => injector::main(args),
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
