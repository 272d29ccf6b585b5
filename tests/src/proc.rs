//! Child processes that cannot outlive their test.
//!
//! A [`Proc`] sends the child's stdout and stderr (Moat's JSON logs) to files, and on drop
//! stops the child: SIGTERM, then SIGKILL if it has not exited after [`DROP_GRACE`]. When the
//! drop happens during a panic (a failing test), the tail of the child's stderr is printed so
//! the failure shows what the binary said.
//!
//! Children also die with the test process itself (`PR_SET_PDEATHSIG`), so a test binary
//! killed by a timeout leaves no CA or proxy behind. The death signal is tied to the thread
//! that forked, so every child is forked by one spawner thread that lives as long as the
//! process.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a dropped [`Proc`] gets between SIGTERM and SIGKILL.
pub const DROP_GRACE: Duration = Duration::from_secs(5);

/// `SIGTERM`.
pub const SIGTERM: i32 = libc::SIGTERM;
/// `SIGKILL`.
pub const SIGKILL: i32 = libc::SIGKILL;
/// `SIGINT`.
pub const SIGINT: i32 = libc::SIGINT;

/// Sends `signal` to process `pid`.
///
/// Only signal processes you know are alive and not yet reaped (a reaped PID may be reused).
pub fn kill_pid(pid: u32, signal: i32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "PID out of range"))?;
    if pid <= 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "refusing to signal a process group",
        ));
    }
    // SAFETY: kill(2) has no memory-safety preconditions; pid > 0 targets one process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Forks `cmd` from the process-wide spawner thread, with SIGKILL as its parent-death signal.
fn spawn_tied_to_process(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let started = std::thread::Builder::new()
            .name("moat-e2e-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = started {
            eprintln!("moat-e2e: cannot start the spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let sent = spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply_tx));
    if let Err(mpsc::SendError((mut cmd, _))) = sent {
        // No spawner thread: spawn here (the child then dies with this thread).
        return cmd.spawn();
    }
    reply_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread is gone")))
}

/// A running child process, stopped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `bin` with `args`, logging to `<log_dir>/<name>.stdout` and `.stderr`.
    pub fn start<I, S>(name: &str, bin: &Path, args: I, log_dir: &Path) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(bin);
        cmd.args(args);
        Self::spawn(name, cmd, log_dir)
    }

    /// Spawns a prepared command (arguments, environment, working directory already set);
    /// stdin is closed and stdout/stderr are appended to `<log_dir>/<name>.stdout`/`.stderr`,
    /// so a restarted process keeps one log.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(log_dir)
            .with_context(|| format!("cannot create {}", log_dir.display()))?;
        let stdout_path = log_dir.join(format!("{name}.stdout"));
        let stderr_path = log_dir.join(format!("{name}.stderr"));
        let open = |p: &Path| -> anyhow::Result<File> {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open {}", p.display()))
        };
        cmd.stdin(Stdio::null())
            .stdout(open(&stdout_path)?)
            .stderr(open(&stderr_path)?);
        let program = cmd.get_program().to_os_string();
        let child = spawn_tied_to_process(cmd)
            .with_context(|| format!("cannot start {name} ({program:?})"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            stdout_path,
            stderr_path,
            status: None,
        })
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// File receiving the child's stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// File receiving the child's stdout.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// Everything the child wrote to stderr so far (lossy UTF-8).
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The child's stderr lines that are JSON objects (Moat's structured logs).
    pub fn json_logs(&self) -> Vec<serde_json::Value> {
        crate::logs::json_lines(&self.stderr())
    }

    /// The exit status, if the child has exited (reaps it).
    pub fn try_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("cannot wait for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// An error naming the process and its last log lines if it has exited: for supervisors
    /// that must notice a component dying under them.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.try_status()? {
            Some(status) => bail!(
                "{} exited unexpectedly ({status}); its last log lines:\n{}",
                self.name,
                self.stderr_tail(10)
            ),
            None => Ok(()),
        }
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// Sends `signal` to the child if it is still running.
    pub fn signal(&mut self, signal: i32) -> anyhow::Result<()> {
        if self.try_status()?.is_some() {
            return Ok(());
        }
        kill_pid(self.pid(), signal)
            .with_context(|| format!("cannot signal {} (pid {})", self.name, self.pid()))
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; an error if it did not exit
    /// (the process is then left to [`Drop`], which escalates to SIGKILL).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(SIGTERM)?;
        match self.wait_timeout(timeout)? {
            Some(s) => Ok(s),
            None => bail!(
                "{} (pid {}) did not exit within {timeout:?} of SIGTERM",
                self.name,
                self.pid()
            ),
        }
    }

    /// Sends SIGKILL and reaps the child.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(SIGKILL)?;
        match self.wait_timeout(Duration::from_secs(10))? {
            Some(s) => Ok(s),
            None => bail!("{} (pid {}) survived SIGKILL", self.name, self.pid()),
        }
    }

    /// Last `n` lines of stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        let all = self.stderr();
        let lines: Vec<&str> = all.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.signal(SIGTERM);
            if !matches!(self.wait_timeout(DROP_GRACE), Ok(Some(_))) {
                let _ = self.signal(SIGKILL);
                let _ = self.wait_timeout(Duration::from_secs(5));
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- {} (pid {}) stderr, last lines ({}) ----\n{}\n---- end of {} stderr ----",
                self.name,
                self.pid(),
                self.stderr_path.display(),
                self.stderr_tail(40),
                self.name
            );
        }
    }
}
