//! `moat-proxy`: the sidecar (`run`), the pod's traffic redirection (`init`), and policy tools.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use moat_proxy::{app, config::RunArgs, policy, redirect};

/// Moat's sidecar proxy.
#[derive(Parser)]
#[command(name = "moat-proxy", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the sidecar proxy.
    Run(Box<RunArgs>),
    /// Program the pod's iptables redirection (run once, as the init container).
    Init(redirect::InitArgs),
    /// Validate and explain authorization policy files.
    Policy {
        #[command(subcommand)]
        cmd: policy::cli::PolicyCmd,
    },
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Run(args) => match app::run(*args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("moat-proxy: error: {e:#}");
                ExitCode::from(2)
            }
        },
        Cmd::Init(args) => redirect::run(args),
        Cmd::Policy { cmd } => policy::cli::run(cmd),
    }
}
