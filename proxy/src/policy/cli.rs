//! `moat-proxy policy check|explain`: validate a policy before shipping it, and ask which rule
//! decides for a given caller. The output format is relied on by scripts; see `docs/policy.md`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use moat_core::{SpiffeId, TrustDomain};

use super::{decode, Policy, PolicyError, Verdict};

/// Policy tooling, mounted as `moat-proxy policy ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum PolicyCmd {
    /// Validate a policy file; prints line-numbered errors.
    Check {
        /// The policy file.
        file: PathBuf,
        /// Local trust domain, which serviceAccount, namespace and authenticated refer to.
        #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: TrustDomain,
    },
    /// Show which rule decides for a caller and port.
    Explain {
        /// The policy file.
        file: PathBuf,
        /// The caller: a SPIFFE ID, or the word "unauthenticated" for a plaintext caller.
        #[arg(long)]
        from: String,
        /// The destination port.
        #[arg(long)]
        port: u16,
        /// Local trust domain, which serviceAccount, namespace and authenticated refer to.
        #[arg(long, env = "MOAT_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: TrustDomain,
    },
}

/// Exit code: the file is valid, or a decision was made.
const EXIT_OK: u8 = 0;
/// Exit code: invalid policy or invalid arguments.
const EXIT_INVALID: u8 = 1;
/// Exit code: the file could not be read.
const EXIT_UNREADABLE: u8 = 2;

/// What a command printed and how it exits; separate from the printing so tests can check it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub code: u8,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    fn ok(stdout: String) -> Self {
        Self {
            code: EXIT_OK,
            stdout,
            stderr: String::new(),
        }
    }

    fn fail(code: u8, stderr: String) -> Self {
        Self {
            code,
            stdout: String::new(),
            stderr,
        }
    }
}

/// Runs a policy subcommand, printing its results; returns the process exit code.
pub fn run(cmd: PolicyCmd) -> ExitCode {
    let out = execute(&cmd);
    // A closed stdout/stderr (e.g. piped into `head`) must not turn into a panic.
    let _ = std::io::stdout().write_all(out.stdout.as_bytes());
    let _ = std::io::stderr().write_all(out.stderr.as_bytes());
    ExitCode::from(out.code)
}

pub(crate) fn execute(cmd: &PolicyCmd) -> Outcome {
    match cmd {
        PolicyCmd::Check { file, trust_domain } => check(file, trust_domain),
        PolicyCmd::Explain {
            file,
            from,
            port,
            trust_domain,
        } => explain(file, from, *port, trust_domain),
    }
}

/// Reads and parses `file`, or says why not, with the right exit code.
fn load(file: &Path, td: &TrustDomain) -> Result<Policy, Outcome> {
    let name = file.display().to_string();
    let bytes = std::fs::read(file).map_err(|e| {
        Outcome::fail(
            EXIT_UNREADABLE,
            format!("{name}: cannot read the policy file: {e}\n"),
        )
    })?;
    decode(&bytes, &name)
        .and_then(|text| Policy::parse(text, &name, td))
        .map_err(|e| {
            let code = match e {
                PolicyError::Invalid(_) => EXIT_INVALID,
                PolicyError::Read { .. } => EXIT_UNREADABLE,
            };
            Outcome::fail(code, format!("{e}\n"))
        })
}

fn check(file: &Path, td: &TrustDomain) -> Outcome {
    match load(file, td) {
        Ok(policy) => Outcome::ok(format!(
            "{}: ok ({} rules, default {})\n",
            file.display(),
            policy.rule_count(),
            policy.default_action()
        )),
        Err(out) => out,
    }
}

fn explain(file: &Path, from: &str, port: u16, td: &TrustDomain) -> Outcome {
    let peer = if from == "unauthenticated" {
        None
    } else {
        match SpiffeId::parse(from) {
            Ok(id) => Some(id),
            Err(e) => {
                return Outcome::fail(
                    EXIT_INVALID,
                    format!("invalid --from {from:?}: {e} (give a SPIFFE ID such as spiffe://{td}/ns/<namespace>/sa/<service-account>, or \"unauthenticated\")\n"),
                )
            }
        }
    };
    if port == 0 {
        return Outcome::fail(EXIT_INVALID, "invalid --port 0: ports are 1-65535\n".into());
    }
    let policy = match load(file, td) {
        Ok(p) => p,
        Err(out) => return out,
    };
    let d = policy.evaluate(peer.as_ref(), port);
    let mut out = format!(
        "{}\nrule: {}\n",
        if d.allowed() { "allow" } else { "deny" },
        d.rule
    );
    if d.verdict == Verdict::AuditDeny {
        out.push_str("audit: would deny (default action is audit)\n");
    }
    Outcome::ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: PolicyCmd,
    }

    struct TempFile(PathBuf);

    impl TempFile {
        fn new(tag: &str, contents: &[u8]) -> Self {
            let path = std::env::temp_dir()
                .join(format!("moat-policy-cli-{tag}-{}.yaml", std::process::id()));
            std::fs::write(&path, contents).unwrap();
            Self(path)
        }
        fn name(&self) -> String {
            self.0.display().to_string()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn cmd(args: &[&str]) -> PolicyCmd {
        let mut argv = vec!["policy"];
        argv.extend_from_slice(args);
        // Pin the trust domain so a MOAT_TRUST_DOMAIN in the test environment cannot leak in.
        if !args.contains(&"--trust-domain") {
            argv.extend_from_slice(&["--trust-domain", "cluster.local"]);
        }
        Cli::try_parse_from(argv).unwrap().cmd
    }

    const POLICY: &str = "\
apiVersion: moat.dev/v1
kind: Policy
default: audit
rules:
  - name: web-to-api
    ports: [8080]
    from:
      - serviceAccount: shop/web
  - name: no-plaintext
    action: deny
    from:
      - unauthenticated: true
";

    #[test]
    fn policy_check_valid_file() {
        let f = TempFile::new("valid", POLICY.as_bytes());
        let out = execute(&cmd(&["check", &f.name()]));
        assert_eq!(out.code, 0);
        assert_eq!(
            out.stdout,
            format!("{}: ok (2 rules, default audit)\n", f.name())
        );
        assert_eq!(out.stderr, "");
    }

    #[test]
    fn policy_check_prints_every_error_located() {
        let f = TempFile::new(
            "invalid",
            b"apiVersion: moat.dev/v1\nkind: Policy\nrules:\n  - name: a\n    ports: [0]\n    from: [{namespace: Shop}]\n",
        );
        let out = execute(&cmd(&["check", &f.name()]));
        assert_eq!(out.code, 1);
        assert_eq!(out.stdout, "");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 2, "{}", out.stderr);
        assert_eq!(
            lines[0],
            format!(
                "{}:5:13: rule \"a\": port 0 is out of range (1-65535)",
                f.name()
            )
        );
        assert!(
            lines[1].starts_with(&format!(
                "{}:6:24: rule \"a\": namespace \"Shop\"",
                f.name()
            )),
            "{}",
            lines[1]
        );
    }

    #[test]
    fn policy_check_unreadable_file_exits_2() {
        let out = execute(&cmd(&["check", "/nonexistent/moat/policy.yaml"]));
        assert_eq!(out.code, 2);
        assert!(
            out.stderr
                .starts_with("/nonexistent/moat/policy.yaml: cannot read the policy file: "),
            "{}",
            out.stderr
        );
    }

    #[test]
    fn policy_check_respects_trust_domain_flag() {
        let f = TempFile::new("td", POLICY.as_bytes());
        let out = execute(&cmd(&[
            "check",
            &f.name(),
            "--trust-domain",
            "prod.example",
        ]));
        assert_eq!(out.code, 0);
        assert!(Cli::try_parse_from(["policy", "check", "x", "--trust-domain", "Bad TD"]).is_err());
    }

    #[test]
    fn policy_explain_outputs() {
        let f = TempFile::new("explain", POLICY.as_bytes());
        let name = f.name();
        let web = "spiffe://cluster.local/ns/shop/sa/web";

        let out = execute(&cmd(&["explain", &name, "--from", web, "--port", "8080"]));
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (0, "allow\nrule: web-to-api\n")
        );

        let out = execute(&cmd(&[
            "explain",
            &name,
            "--from",
            "unauthenticated",
            "--port",
            "8080",
        ]));
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (0, "deny\nrule: no-plaintext\n")
        );

        let out = execute(&cmd(&["explain", &name, "--from", web, "--port", "9090"]));
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (
                0,
                "allow\nrule: default\naudit: would deny (default action is audit)\n"
            )
        );

        // The same web identity from another trust domain is not shop/web.
        let out = execute(&cmd(&[
            "explain",
            &name,
            "--from",
            web,
            "--port",
            "8080",
            "--trust-domain",
            "other.local",
        ]));
        assert_eq!(out.stdout.lines().nth(1), Some("rule: default"));
    }

    #[test]
    fn policy_explain_deny_by_default() {
        let f = TempFile::new(
            "deny",
            b"apiVersion: moat.dev/v1\nkind: Policy\ndefault: deny\n",
        );
        let out = execute(&cmd(&[
            "explain",
            &f.name(),
            "--from",
            "spiffe://cluster.local/ns/a/sa/b",
            "--port",
            "1",
        ]));
        assert_eq!(
            (out.code, out.stdout.as_str()),
            (0, "deny\nrule: default\n")
        );
    }

    #[test]
    fn policy_explain_errors() {
        let f = TempFile::new("explain-err", POLICY.as_bytes());
        let out = execute(&cmd(&[
            "explain",
            &f.name(),
            "--from",
            "spiffe://Bad/x",
            "--port",
            "80",
        ]));
        assert_eq!(out.code, 1);
        assert!(
            out.stderr
                .starts_with("invalid --from \"spiffe://Bad/x\": "),
            "{}",
            out.stderr
        );
        assert_eq!(out.stdout, "");

        let bad = TempFile::new("explain-bad", b"apiVersion: moat.dev/v2\nkind: Policy\n");
        let out = execute(&cmd(&[
            "explain",
            &bad.name(),
            "--from",
            "unauthenticated",
            "--port",
            "80",
        ]));
        assert_eq!(out.code, 1);
        assert!(
            out.stderr.starts_with(&format!("{}:1:13: ", bad.name())),
            "{}",
            out.stderr
        );

        let out = execute(&cmd(&[
            "explain",
            "/nonexistent/p.yaml",
            "--from",
            "unauthenticated",
            "--port",
            "80",
        ]));
        assert_eq!(out.code, 2);
    }
}
