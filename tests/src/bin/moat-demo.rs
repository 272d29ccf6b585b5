//! `moat-demo`: Moat's main job on loopback, without a cluster and without root.
//!
//! Starts the real `moat-ca` and three real `moat-proxy` sidecars next to this executable
//! (`cargo build --release --workspace` builds them all), sends traffic through them, prints
//! what the sidecars measured, and keeps everything running until Ctrl-C. It is also a check:
//! when the mesh does not behave as described, it says so and exits 1. The story itself lives
//! in `moat_e2e::demo`.
//!
//! `--lab` (root) tells the same story in the mesh lab (`moat_e2e::lab`): `api`, `web` and
//! `batch` are network-namespace pods made from Kubernetes pod specs by the real
//! `moat-injector`, their apps know nothing about the mesh, and the impostor connects from a
//! namespace outside it.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _};
use moat_e2e::demo::{self, App, Plan, Routes, Style, Targets};
use moat_e2e::mesh::ProxyFixture;
use moat_e2e::proc::{Proc, SIGTERM};
use moat_e2e::CaFixture;
use tokio::sync::watch;

const USAGE: &str = "\
Usage: moat-demo [--once] [--duration SECS] [--lab]

Runs Moat on loopback with the real binaries from this directory: a CA, two sample apps behind
a sidecar (api), a caller the policy admits (web), one it denies (batch), and an impostor with a
forged certificate. Prints what the sidecars measured, then keeps running until Ctrl-C.

Options:
  --once            print the report, stop everything and exit (0 when the mesh behaved)
  --duration SECS   how long to send traffic (default 3)
  --lab             the same story in network-namespace pods made from Kubernetes pod
                    specs by the real moat-injector (root; exits 2 without it)
  -h, --help        this text

Exit codes: 0 ok, 1 the mesh did not behave as described (or could not start),
            2 usage error or lab unavailable, 130 interrupted before the report.";

/// Command-line options.
#[derive(Debug, Clone)]
struct Args {
    once: bool,
    duration: Duration,
    lab: bool,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut a = Args {
        once: false,
        duration: Duration::from_secs(3),
        lab: false,
    };
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "--once" => a.once = true,
            "--lab" => a.lab = true,
            "-h" | "--help" => return Ok(None),
            "--duration" => {
                let v = inline
                    .or_else(|| it.next())
                    .ok_or("--duration needs a number of seconds")?;
                let secs: f64 = v
                    .trim_end_matches('s')
                    .parse()
                    .map_err(|_| format!("--duration {v:?} is not a number of seconds"))?;
                if !(0.5..=3600.0).contains(&secs) {
                    return Err(format!("--duration {v}: use 0.5 to 3600 seconds"));
                }
                a.duration = Duration::from_secs_f64(secs);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(a))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("moat-demo: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.lab {
        return lab(&args);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("moat-demo: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(args))
}

/// Set by SIGINT/SIGTERM during `--lab`.
static LAB_STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_lab_signal(_: libc::c_int) {
    LAB_STOP.store(true, Ordering::SeqCst);
}

fn lab_stopped() -> bool {
    LAB_STOP.load(Ordering::SeqCst)
}

/// `--lab`: the same story in network-namespace pods produced by the injector (root).
fn lab(args: &Args) -> ExitCode {
    if let Err(why) = moat_e2e::netns::check_privileges() {
        eprintln!(
            "moat-demo --lab: this machine cannot build the namespace lab: it {why}.\n\n\
             Run it as root (sudo -E target/release/moat-demo --lab), or use the loopback demo,\n\
             which tells the same story without root:\n\n    target/release/moat-demo"
        );
        return ExitCode::from(2);
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_lab_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_lab_signal as *const () as libc::sighandler_t,
        );
    }
    let style = Style {
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let bin_dir = moat_e2e::bin::bin_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "?".into());
    println!(
        "{} {}",
        style.bold("Moat demo in the mesh lab:"),
        style.dim(&format!(
            "pods are network namespaces on one bridge, made from Kubernetes pod specs by the real \
             moat-injector and run like a kubelet would; moat-ca, moat-injector and moat-proxy from {bin_dir}"
        ))
    );
    let story = demo::lab_setup(&mut |line| {
        println!("{line}");
        let _ = std::io::stdout().flush();
    });
    let mut story = match story {
        Ok(s) => s,
        Err(_) if lab_stopped() => {
            eprintln!("\nmoat-demo: interrupted before the report; everything is stopped.");
            return ExitCode::from(130);
        }
        Err(e) => {
            eprintln!("\n{} {e:#}", style.bad("moat-demo --lab failed:"));
            return ExitCode::from(1);
        }
    };
    if lab_stopped() {
        return lab_teardown(story, ExitCode::from(130));
    }
    println!(
        "[3/3] traffic  for {} s from the pods' own namespaces to api {}: web (HTTP, ~{} requests/s; TCP echo), batch, and a forged certificate from outside the mesh",
        args.duration.as_secs_f64(),
        story.api.ip,
        demo::WEB_RATE_PER_CONN * demo::WEB_CONNS
    );
    let _ = std::io::stdout().flush();
    let observed = match demo::lab_drive(
        &story,
        Plan {
            duration: args.duration,
        },
    ) {
        Ok(o) => o,
        Err(_) if lab_stopped() => return lab_teardown(story, ExitCode::from(130)),
        Err(e) => {
            eprintln!("\n{} {e:#}", style.bad("moat-demo --lab failed:"));
            story.lab.keep_files();
            return lab_teardown(story, ExitCode::from(1));
        }
    };
    let verdict = demo::evaluate(&observed, style);
    println!();
    print!("{}", demo::render(&verdict, style));
    println!(
        "Logs (JSON, one file per container) and the admitted pod specs: {}/pods/<pod>/",
        story.lab.dir().display()
    );
    if !verdict.failures.is_empty() {
        story.lab.keep_files();
        return lab_teardown(story, ExitCode::from(1));
    }
    if args.once {
        println!("Stopping (--once).");
        return lab_teardown(story, ExitCode::SUCCESS);
    }
    let api = story.api.ip;
    let ns = |p: &moat_e2e::lab::PodHandle| p.netns.name.clone();
    let node = story.lab.node().map(|n| n.name.clone()).unwrap_or_default();
    println!("Try it yourself (as root):");
    println!(
        "  ip netns exec {} curl http://{api}:8080/orders/7       {}",
        ns(&story.web),
        style.dim("# as web: allowed")
    );
    println!(
        "  ip netns exec {} curl -i http://{api}:8080/orders/7  {}",
        ns(&story.batch),
        style.dim("# as batch: 403, x-moat-denied-by")
    );
    println!(
        "  ip netns exec {node} curl -s http://{api}:15020/metrics | grep authz  {}",
        style.dim("# api's decisions")
    );
    println!("{}", style.bold("Press Ctrl-C to stop."));
    let _ = std::io::stdout().flush();
    let code = loop {
        if lab_stopped() {
            println!();
            break ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(200));
        if let Err(e) = story.lab.check_running() {
            // Ctrl-C reaches the lab's processes too; that is not a failure.
            std::thread::sleep(Duration::from_millis(300));
            if lab_stopped() {
                println!();
                break ExitCode::SUCCESS;
            }
            eprintln!("\n{} {e:#}", style.bad("moat-demo:"));
            story.lab.keep_files();
            break ExitCode::from(1);
        }
    };
    lab_teardown(story, code)
}

/// Tears the lab down, says what it stopped, and returns `code` (1 if something was left).
fn lab_teardown(story: demo::LabStory, code: ExitCode) -> ExitCode {
    let dir = story.lab.dir().to_path_buf();
    match story.lab.shutdown() {
        Ok(t) if dir.exists() => {
            println!(
                "Stopped {} processes and removed {} namespaces; the logs are kept in {}",
                t.stopped,
                t.namespaces,
                dir.display()
            );
            code
        }
        Ok(t) => {
            println!(
                "Stopped {} processes, removed {} namespaces and the temporary files.",
                t.stopped, t.namespaces
            );
            code
        }
        Err(e) => {
            eprintln!("moat-demo: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Marks an error caused by Ctrl-C / SIGTERM before the report was printed.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Everything the demo started, so that it can all be stopped.
#[derive(Default)]
struct Demo {
    /// `ca.log`, `api.log`... symlinks to each process' JSON log.
    logs: Option<tempfile::TempDir>,
    /// The log directory, once kept for a failure.
    kept: Option<PathBuf>,
    links: Vec<(PathBuf, PathBuf)>,
    ca: Option<CaFixture>,
    proxies: Vec<(&'static str, ProxyFixture)>,
    apps: Vec<App>,
}

async fn run(args: Args) -> ExitCode {
    let style = Style {
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let (stop_tx, mut stop) = watch::channel(false);
    if let Err(e) = watch_signals(stop_tx) {
        eprintln!("moat-demo: {e:#}");
        return ExitCode::from(1);
    }
    let mut d = Demo::default();
    let result = d.play(&args, style, stop.clone()).await;
    let interrupted = *stop.borrow();
    let code = match result {
        Ok(true) if args.once => {
            println!("Stopping (--once).");
            ExitCode::SUCCESS
        }
        Ok(true) => {
            println!("{}", style.bold("Press Ctrl-C to stop."));
            let _ = std::io::stdout().flush();
            match d.watch(&mut stop).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("\n{} {e:#}", style.bad("moat-demo:"));
                    d.keep_logs();
                    ExitCode::from(1)
                }
            }
        }
        Ok(false) => {
            d.keep_logs();
            ExitCode::from(1)
        }
        Err(_) if interrupted => {
            eprintln!("\nmoat-demo: interrupted before the report; stopping everything.");
            ExitCode::from(130)
        }
        Err(e) => {
            if e.downcast_ref::<Interrupted>().is_none() {
                eprintln!("\n{} {e:#}", style.bad("moat-demo failed:"));
            }
            d.keep_logs();
            ExitCode::from(1)
        }
    };
    let n = d.stop();
    match &d.kept {
        Some(dir) => println!(
            "Stopped {n} processes; their logs are kept in {}",
            dir.display()
        ),
        None if n > 0 => println!("Stopped {n} processes and removed the temporary files."),
        None => {}
    }
    code
}

fn watch_signals(tx: watch::Sender<bool>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(())
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn check(stop: &watch::Receiver<bool>) -> anyhow::Result<()> {
    if *stop.borrow() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Runs a blocking harness call (process start-up, readiness polling) off the async workers.
fn blocking<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    tokio::task::block_in_place(f)
}

/// Makes `<dir>/<name>.log` point at `target`.
fn link(links: &mut Vec<(PathBuf, PathBuf)>, dir: &Path, name: &str, target: &Path) {
    let link = dir.join(format!("{name}.log"));
    if std::os::unix::fs::symlink(target, &link).is_ok() {
        links.push((link, target.to_path_buf()));
    }
}

fn add_proxy(
    proxies: &mut Vec<(&'static str, ProxyFixture)>,
    links: &mut Vec<(PathBuf, PathBuf)>,
    logs: &Path,
    name: &'static str,
    mut p: ProxyFixture,
) {
    link(links, logs, name, p.proc().stderr_path());
    proxies.push((name, p));
}

fn find<'a>(
    proxies: &'a [(&'static str, ProxyFixture)],
    name: &str,
) -> anyhow::Result<&'a ProxyFixture> {
    proxies
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, p)| p)
        .with_context(|| format!("no {name} sidecar"))
}

impl Demo {
    /// Starts everything, drives the traffic and prints the report. `Ok(false)`: the mesh
    /// misbehaved (already reported).
    async fn play(
        &mut self,
        args: &Args,
        style: Style,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<bool> {
        for b in ["moat-ca", "moat-proxy"] {
            moat_e2e::bin::try_binary(b)?;
        }
        let bin_dir = moat_e2e::bin::bin_dir()?;
        let logs = tempfile::Builder::new()
            .prefix("moat-demo-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let logs_path = logs.path().to_path_buf();
        self.logs = Some(logs);
        println!(
            "{} {}",
            style.bold("Moat demo:"),
            style.dim(&format!(
                "the real moat-ca and moat-proxy from {} on loopback — no cluster, no root",
                bin_dir.display()
            ))
        );

        // 1. The CA.
        let mut ca = blocking(|| CaFixture::start(demo::ca_options()))?;
        if let Ok(p) = ca.proc() {
            link(&mut self.links, &logs_path, "ca", p.stderr_path());
        }
        let ca: &CaFixture = self.ca.insert(ca);
        println!(
            "[1/3] CA       moat-ca serves https://{} with a fresh root for trust domain {}; \
             it trusts service-account tokens from an offline JWKS issuer",
            ca.addr(),
            ca.trust_domain()
        );
        check(&stop)?;

        // 2. Apps and sidecars.
        let orders = demo::orders_app().await?;
        let echo = demo::echo_app().await?;
        let (orders_addr, echo_addr) = (orders.addr(), echo.addr());
        self.apps.extend([orders, echo]);
        println!(
            "[2/3] apps     orders HTTP API on {orders_addr}, TCP echo on {echo_addr} (plain text; only the sidecars speak TLS)"
        );
        let api = blocking(|| demo::start_api(ca, &[orders_addr, echo_addr]))?;
        let api_inbound = api.inbound();
        let api_admin = api.admin();
        let api_id = demo::identity(&api)?;
        add_proxy(&mut self.proxies, &mut self.links, &logs_path, "api", api);
        println!(
            "      sidecar  api    {:<40} mTLS in on {api_inbound}; policy: admit shop/web (rule {:?}), deny the rest",
            api_id.spiffe_id,
            demo::ALLOW_RULE
        );
        check(&stop)?;
        let mut routes: Vec<Routes> = Vec::new();
        for sa in ["web", "batch"] {
            let api = find(&self.proxies, "api")?;
            let (p, r) = blocking(|| demo::start_caller(ca, sa, api, orders_addr, echo_addr))?;
            let id = demo::identity(&p)?;
            add_proxy(&mut self.proxies, &mut self.links, &logs_path, sa, p);
            println!(
                "      sidecar  {sa:<6} {:<40} app side: HTTP {}, TCP {} -> api (must prove {})",
                id.spiffe_id,
                r.http,
                r.tcp,
                demo::short_id(&api_id.spiffe_id)
            );
            routes.push(r);
            check(&stop)?;
        }
        let (web_routes, batch_routes) = match routes.as_slice() {
            [w, b] => (*w, *b),
            _ => bail!("internal error: expected two caller sidecars"),
        };

        // 3. Traffic.
        let plan = Plan {
            duration: args.duration,
        };
        println!(
            "[3/3] traffic  for {} s: web -> api (HTTP, ~{} requests/s; TCP echo), batch -> api, forged certificate -> api",
            args.duration.as_secs_f64(),
            demo::WEB_RATE_PER_CONN * demo::WEB_CONNS
        );
        let _ = std::io::stdout().flush();
        let targets = Targets {
            web: web_routes,
            batch: batch_routes,
            api_inbound,
            api_admin,
            api_id: ca.spiffe_id(demo::NAMESPACE, "api")?,
            forged_claim: demo::spiffe_id(ca, demo::FORGED_CLAIM)?,
            bundle: ca.shared_bundle()?,
            trust_domain: ca.trust_domain().clone(),
        };
        let traffic = tokio::select! {
            t = demo::drive(plan, targets) => t?,
            _ = stopped(&mut stop) => return Err(Interrupted.into()),
        };

        // Read what the sidecars saw. Their counters are updated as answers go out; allow a
        // moment for the last ones.
        let web_id = demo::spiffe_id(ca, "web")?;
        let want = traffic.web_http.ok as f64;
        let api_metrics = blocking(|| {
            find(&self.proxies, "api")?.wait_metrics(Duration::from_secs(2), |m| {
                m.value(
                    "moat_proxy_http_requests_total",
                    &[
                        ("direction", "inbound"),
                        ("peer", &web_id),
                        ("status_class", "2xx"),
                    ],
                ) >= want
            })
        })?;
        let view = |name: &str,
                    metrics: Option<moat_e2e::net::Metrics>|
         -> anyhow::Result<demo::SidecarView> {
            let p = find(&self.proxies, name)?;
            Ok(demo::SidecarView {
                identity: demo::identity(p)?,
                metrics: match metrics {
                    Some(m) => m,
                    None => p.metrics()?,
                },
                admin: p.admin(),
            })
        };
        let observed = demo::Observed {
            api: view("api", Some(api_metrics))?,
            web: view("web", None)?,
            batch: view("batch", None)?,
            traffic,
            expected_ids: [
                demo::spiffe_id(ca, "api")?,
                web_id.clone(),
                demo::spiffe_id(ca, "batch")?,
            ],
        };
        let verdict = demo::evaluate(&observed, style);
        println!();
        print!("{}", demo::render(&verdict, style));
        println!(
            "Logs (JSON, one file per process): {}/  {}",
            logs_path.display(),
            style.dim("ca.log api.log web.log batch.log")
        );
        if !verdict.failures.is_empty() {
            return Ok(false);
        }
        if !args.once {
            println!("Try it yourself:");
            println!(
                "  curl http://{}/orders/7                 {}",
                web_routes.http,
                style.dim("# as web: allowed")
            );
            println!(
                "  curl -i http://{}/orders/7              {}",
                batch_routes.http,
                style.dim("# as batch: 403, x-moat-denied-by")
            );
            println!(
                "  curl -s http://{}/metrics | grep authz  {}",
                observed.api.admin,
                style.dim("# api's decisions")
            );
        }
        Ok(true)
    }

    /// Waits for Ctrl-C / SIGTERM; an error if a process dies meanwhile.
    async fn watch(&mut self, stop: &mut watch::Receiver<bool>) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = stopped(stop) => {
                    println!();
                    return Ok(());
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            let mut procs: Vec<&mut Proc> =
                self.proxies.iter_mut().map(|(_, p)| p.proc()).collect();
            if let Some(ca) = self.ca.as_mut() {
                procs.extend(ca.proc().ok());
            }
            for p in procs {
                p.ensure_running()?;
            }
        }
    }

    /// Stops every process at once (SIGTERM, then SIGKILL for stragglers when the fixtures are
    /// dropped) and removes the temporary directories unless the logs are kept. Returns how
    /// many processes were running.
    fn stop(&mut self) -> usize {
        self.apps.clear();
        let mut procs: Vec<&mut Proc> = self.proxies.iter_mut().map(|(_, p)| p.proc()).collect();
        if let Some(ca) = self.ca.as_mut() {
            procs.extend(ca.proc().ok());
        }
        let mut running = 0;
        for p in procs.iter_mut() {
            if p.is_running() {
                running += 1;
                let _ = p.signal(SIGTERM);
            }
        }
        for p in procs.iter_mut() {
            let _ = p.wait_timeout(Duration::from_secs(5));
        }
        self.copy_logs_if_kept();
        self.proxies.clear();
        self.ca = None;
        running
    }

    /// Keeps the log directory after exit (on failure), so the JSON logs can be read.
    fn keep_logs(&mut self) {
        if self.links.is_empty() {
            return;
        }
        if let Some(dir) = self.logs.take() {
            self.kept = Some(dir.keep());
        }
    }

    /// When the log directory is kept, replaces its symlinks (whose targets are about to be
    /// removed with the fixtures' directories) with copies.
    fn copy_logs_if_kept(&mut self) {
        if self.kept.is_none() {
            return;
        }
        for (link, target) in &self.links {
            let _ = std::fs::remove_file(link);
            let _ = std::fs::copy(target, link);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Args>, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn parses_flags() {
        let a = parse(&["--once", "--duration", "2"]).unwrap().unwrap();
        assert!(a.once && !a.lab);
        assert_eq!(a.duration, Duration::from_secs(2));
        let a = parse(&["--duration=1.5s"]).unwrap().unwrap();
        assert_eq!(a.duration, Duration::from_millis(1500));
        assert!(parse(&["--lab"]).unwrap().unwrap().lab);
        assert!(parse(&["--help"]).unwrap().is_none());
        assert!(parse(&["--duration"]).is_err());
        assert!(parse(&["--duration", "0"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }
}
