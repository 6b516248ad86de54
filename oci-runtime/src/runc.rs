//! Driving the `runc` binary (decision 6: driven, not linked).
//!
//! Containers are started detached (`runc run -d`): runc exits once the container runs, and
//! the container's init is re-parented to the agent, which is the child subreaper
//! ([`become_subreaper`]), so the agent waits on it and gets its exit code without a shim
//! process per container. Its stdout and stderr are the log file it is given (never a pipe:
//! the container would hold it open).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;

use crate::OciError;

/// The agent adopts the orphans of the processes it starts: a detached container's init
/// becomes its child, so it can wait on it.
pub fn become_subreaper() -> Result<(), OciError> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| OciError::Runtime(format!("cannot become a child subreaper: {e}")))
}

/// One container as `runc state` / `runc list` report it.
#[derive(Debug, Clone, Deserialize)]
pub struct State {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub pid: i32,
    #[serde(default)]
    pub bundle: PathBuf,
}

/// How a container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Its exit code (128 + signal when killed by one).
    Code(i32),
    /// It ended while the agent was not its parent (started by an earlier agent run): the
    /// code is not known.
    Unknown,
}

/// The runc binary and its state directory (one per agent).
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    pub root: PathBuf,
    pub version: String,
}

impl Runc {
    /// Finds `runc` on PATH (or at `binary`) and checks that it runs.
    pub fn find(binary: Option<&Path>, root: impl Into<PathBuf>) -> Option<Runc> {
        let binary = match binary {
            Some(b) => b.to_path_buf(),
            None => std::env::var_os("PATH")?
                .to_str()?
                .split(':')
                .map(|d| Path::new(d).join("runc"))
                .find(|p| p.is_file())?,
        };
        let out = std::process::Command::new(&binary)
            .arg("--version")
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .lines()
            .next()?
            .trim_start_matches("runc version ")
            .to_string();
        out.status.success().then(|| Runc {
            binary,
            root: root.into(),
            version,
        })
    }

    fn command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.binary);
        c.arg("--root").arg(&self.root);
        c.stdin(Stdio::null());
        c
    }

    async fn run_ok(&self, args: &[&str]) -> Result<String, OciError> {
        let out = self
            .command()
            .args(args)
            .output()
            .await
            .map_err(|e| OciError::Runtime(format!("runc {}: {e}", args.join(" "))))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).to_string())
        } else {
            Err(OciError::Runtime(format!(
                "runc {}: {}",
                args.first().unwrap_or(&""),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// Creates and starts `id` from `bundle`, detached, with stdout and stderr going to `log`.
    /// Returns the container's init PID.
    pub async fn run(&self, id: &str, bundle: &Path, log: std::fs::File) -> Result<i32, OciError> {
        let pid_file = bundle.join("init.pid");
        let _ = std::fs::remove_file(&pid_file);
        let err = log
            .try_clone()
            .map_err(|e| OciError::Runtime(format!("log file: {e}")))?;
        let out = self
            .command()
            .arg("run")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            .stdout(log)
            .stderr(err)
            .status()
            .await
            .map_err(|e| OciError::Runtime(format!("runc run: {e}")))?;
        if !out.success() {
            // runc wrote why to the container's log; keep the last line for the status.
            return Err(OciError::Runtime(format!("runc run {id} failed ({out})")));
        }
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| OciError::Runtime(format!("runc run {id}: no init pid")))
    }

    /// The container's state; None when runc does not know it.
    pub async fn state(&self, id: &str) -> Option<State> {
        let out = self.run_ok(&["state", id]).await.ok()?;
        serde_json::from_str(&out).ok()
    }

    pub async fn list(&self) -> Vec<State> {
        match self.run_ok(&["list", "--format", "json"]).await {
            Ok(out) => serde_json::from_str::<Option<Vec<State>>>(&out)
                .ok()
                .flatten()
                .unwrap_or_default(),
            Err(_) => vec![],
        }
    }

    /// Sends `signal` (`TERM`, `KILL`…) to the container's processes.
    pub async fn kill(&self, id: &str, signal: &str) -> Result<(), OciError> {
        self.run_ok(&["kill", "--all", id, signal])
            .await
            .map(|_| ())
    }

    /// Removes the container, killing it first if it still runs.
    pub async fn delete(&self, id: &str) -> Result<(), OciError> {
        match self.run_ok(&["delete", "--force", id]).await {
            Err(OciError::Runtime(m)) if m.contains("does not exist") => Ok(()),
            other => other.map(|_| ()),
        }
    }

    /// A `runc exec` of `args` in `id`, for the caller to wire up and spawn.
    pub fn exec(&self, id: &str, args: &[String], tty: bool) -> tokio::process::Command {
        let mut c = self.command();
        c.arg("exec");
        if tty {
            c.arg("--tty");
        }
        c.arg(id).args(args);
        c
    }
}

/// Waits for a process the agent is the parent of (a container init it adopted) and returns
/// how it ended. A thread blocks in waitpid; the container's whole life is one such wait.
pub async fn wait_child(pid: i32) -> Exit {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::Pid;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("wait-{pid}"))
        .stack_size(64 * 1024)
        .spawn(move || {
            let exit = loop {
                match waitpid(Pid::from_raw(pid), None) {
                    Ok(WaitStatus::Exited(_, code)) => break Exit::Code(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => break Exit::Code(128 + sig as i32),
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    // Not our child (adopted by an earlier agent run): watch it instead.
                    Err(_) => break Exit::Unknown,
                }
            };
            let _ = tx.send(exit);
        });
    if spawned.is_err() {
        return watch_pid(pid).await;
    }
    match rx.await {
        Ok(Exit::Unknown) => watch_pid(pid).await,
        Ok(exit) => exit,
        Err(_) => Exit::Unknown,
    }
}

/// Polls until `pid` is gone: for containers whose init is not the agent's child.
pub async fn watch_pid(pid: i32) -> Exit {
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    while kill(Pid::from_raw(pid), None).is_ok() {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Exit::Unknown
}
