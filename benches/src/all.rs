//! `moat-bench all`: every benchmark in one run and one report: the data-plane comparison,
//! with CA issuance and injector admission as their own lines.

use clap::{Args, FromArgMatches};

use crate::mesh::report::Extra;
use crate::{ca, injector, mesh};

/// Options of `moat-bench all` (those of `mesh`; `--smoke` applies to every benchmark).
#[derive(Debug, Clone, Args)]
pub struct AllArgs {
    #[command(flatten)]
    mesh: mesh::MeshArgs,
}

/// Runs everything; `Ok(false)` when any benchmark saw failed requests.
pub fn main(args: AllArgs) -> anyhow::Result<bool> {
    let smoke = args.mesh.smoke;
    let mut ca_args: ca::CaArgs = defaults()?;
    ca_args.smoke = smoke;
    let ca = ca::measure(ca_args)?;
    let mut inj_args: injector::InjectorArgs = defaults()?;
    inj_args.smoke = smoke;
    let inj = injector::run(&inj_args)?;
    println!("\ninjector admission: {}", inj.summary_line());
    let extras = vec![
        Extra {
            id: "ca".into(),
            label: "CA issuance (`moat-bench ca`)".into(),
            text: ca.summary_line(),
        },
        Extra {
            id: "injector".into(),
            label: "Injector admission (`moat-bench injector`)".into(),
            text: inj.summary_line(),
        },
    ];
    let (report, ok) = mesh::run(args.mesh, extras)?;
    println!("\n{}", report.markdown());
    Ok(ok && ca.errors() == 0 && inj.errors() == 0)
}

/// A benchmark's options at their defaults, as if given no flags.
pub fn defaults<T: Args + FromArgMatches>() -> anyhow::Result<T> {
    let cmd = T::augment_args(clap::Command::new("moat-bench"));
    let matches = cmd.try_get_matches_from(["moat-bench"])?;
    Ok(T::from_arg_matches(&matches)?)
}
