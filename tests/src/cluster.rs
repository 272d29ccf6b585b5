//! A live Kubernetes cluster for the cluster suite: the one `tests/cluster/up.sh` started,
//! found through the `KUBECONFIG` and `KUBECTL` variables it prints, driven with its own
//! `kubectl` (the same release as the API server) as an operator would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A running cluster reached with `kubectl`.
pub struct Cluster {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
}

impl Cluster {
    /// The cluster named by `KUBECONFIG` and `KUBECTL` (as printed by `tests/cluster/up.sh`),
    /// or why there is none.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .ok_or_else(|| format!("{name} is not set (run: eval \"$(tests/cluster/up.sh)\")"))
        };
        let cluster = Self {
            kubectl: var("KUBECTL")?,
            kubeconfig: var("KUBECONFIG")?,
        };
        for p in [&cluster.kubectl, &cluster.kubeconfig] {
            if !p.exists() {
                return Err(format!("{} does not exist", p.display()));
            }
        }
        Ok(cluster)
    }

    /// The kubeconfig of the cluster's administrator.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd
    }

    /// Runs kubectl with `args`, whatever its exit status.
    pub fn run<I, S>(&self, args: I) -> anyhow::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .context("cannot run kubectl")
    }

    /// Runs kubectl with `args` and returns its stdout; fails with its stderr.
    pub fn kubectl<I, S>(&self, args: I) -> anyhow::Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let args: Vec<std::ffi::OsString> =
            args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.run(&args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `manifest` (YAML or JSON, several documents allowed).
    pub fn apply(&self, manifest: &str) -> anyhow::Result<String> {
        self.stdin(&["apply", "-f", "-"], manifest)
    }

    /// Runs kubectl with `args`, feeding `input` on stdin; fails with its stderr.
    pub fn stdin(&self, args: &[&str], input: &str) -> anyhow::Result<String> {
        use std::io::Write as _;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run kubectl")?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl get ... -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let text = self.kubectl(&all)?;
        serde_json::from_str(&text).context("kubectl get printed no JSON")
    }

    /// Runs `cmd` in `container` of pod `ns/pod`; returns the whole output, whatever the status.
    pub fn exec(
        &self,
        ns: &str,
        pod: &str,
        container: &str,
        cmd: &[&str],
    ) -> anyhow::Result<Output> {
        let mut args = vec!["-n", ns, "exec", pod, "-c", container, "--"];
        args.extend_from_slice(cmd);
        self.run(&args)
    }

    /// The pods in `ns` matching `selector`, as the API returns them.
    pub fn pods(&self, ns: &str, selector: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let list = self.get_json(&["-n", ns, "pods", "-l", selector])?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// Everything worth reading when a step fails: events, pods and the Moat control plane's
    /// recent logs.
    pub fn diagnostics(&self, namespaces: &[&str]) -> String {
        let mut out = String::new();
        for ns in namespaces {
            for args in [
                vec!["-n", ns, "get", "pods", "-o", "wide"],
                vec!["-n", ns, "get", "events", "--sort-by=.lastTimestamp"],
            ] {
                if let Ok(o) = self.run(&args) {
                    out.push_str(&format!("--- kubectl {}\n", args.join(" ")));
                    out.push_str(&String::from_utf8_lossy(&o.stdout));
                    out.push_str(&String::from_utf8_lossy(&o.stderr));
                }
            }
        }
        out
    }
}

/// Moat's install as an operator renders it: a copy of `deploy/` with throwaway CA material
/// (a root made by `moat-ca init`, its intermediate in `deploy/ca/secret/`).
pub struct Install {
    /// The kustomization to `kubectl apply -k`.
    pub deploy: PathBuf,
    /// Where the root lives (`ca.crt`, `ca.key`).
    pub root_dir: PathBuf,
    /// The root certificate (the trust bundle) in PEM.
    pub root_pem: String,
}

impl Install {
    /// Renders the install under `dir`, for trust domain `cluster.local`.
    pub fn render(dir: &Path) -> anyhow::Result<Self> {
        let deploy = dir.join("deploy");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        run_checked(Command::new("cp").arg("-r").arg(&src).arg(&deploy))?;
        // An operator's own (git-ignored) material must not leak into a test install.
        let secret_dir = deploy.join("ca/secret");
        if secret_dir.exists() {
            std::fs::remove_dir_all(&secret_dir)?;
        }
        let root_dir = dir.join("root");
        let ca = crate::binary("moat-ca");
        run_checked(
            Command::new(&ca)
                .args(["init", "--trust-domain", "cluster.local", "--dir"])
                .arg(&root_dir),
        )?;
        run_checked(
            Command::new(&ca)
                .args(["intermediate", "--root-dir"])
                .arg(&root_dir)
                .arg("--out")
                .arg(&secret_dir),
        )?;
        let root_pem = std::fs::read_to_string(root_dir.join("ca.crt"))?;
        Ok(Self {
            deploy,
            root_dir,
            root_pem,
        })
    }
}

/// Runs `cmd`; fails with its output unless it exits 0.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Polls `check` every 500 ms until it returns `Ok(Some(value))`; fails after `timeout` with
/// the last reason it gave (`Ok(None)` means "not yet", `Err` a reason worth showing).
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
