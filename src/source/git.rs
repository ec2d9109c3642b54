//! git on the mirror: how each command is run (no prompt, hook or host
//! configuration, within a deadline), what an error quotes of it, and
//! the questions a sync asks (the commit a ref names, whether one commit
//! descends from another).

use super::{GitSource, SourceError, io_err, is_sha};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// The longest any other git command may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of git's stderr an error quotes.
const STDERR_CHARS: usize = 300;

impl GitSource {
    pub(super) async fn resolve(&self, name: &str) -> Result<String, SourceError> {
        let out = self
            .git(
                &["rev-parse", "--verify", "--quiet", "--end-of-options"],
                &[std::ffi::OsStr::new(&format!("{name}^{{commit}}"))],
                "rev-parse",
            )
            .await?;
        let sha = out.trim().to_string();
        if is_sha(&sha) {
            Ok(sha)
        } else {
            Err(SourceError::NoSuchRef(self.opts.reference.clone()))
        }
    }

    /// Runs `cmd` to its end, within [`GIT_TIMEOUT`].
    pub(super) async fn finish(
        mut cmd: tokio::process::Command,
        what: &'static str,
    ) -> Result<std::process::Output, SourceError> {
        tokio::time::timeout(GIT_TIMEOUT, cmd.output())
            .await
            .map_err(|_| SourceError::Timeout {
                what,
                after: GIT_TIMEOUT,
            })?
            .map_err(io_err(format!("cannot run git {what}")))
    }

    pub(super) async fn descends(&self, new: &str, old: &str) -> Result<bool, SourceError> {
        let mut cmd = self.command(&self.mirror());
        cmd.args(["merge-base", "--is-ancestor", old, new]);
        let out = Self::finish(cmd, "merge-base").await?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(SourceError::Git {
                what: "merge-base",
                stderr: bounded(&String::from_utf8_lossy(&out.stderr)),
            }),
        }
    }

    /// git on the mirror, reading no configuration of the host's (system
    /// or root's global): no filter, attribute driver, verifier program or
    /// alias of theirs takes part in what is read from the mirror.
    pub(super) fn command(&self, git_dir: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::from(self.std_command(git_dir));
        cmd.kill_on_drop(true);
        cmd
    }

    /// git for what talks to the remote (`ls-remote`, `fetch`): the host's
    /// configuration is how an operator gives credentials, proxies and
    /// `ssh` options, so it is read.
    pub(super) fn command_with_host_config(&self, git_dir: &Path) -> tokio::process::Command {
        let mut std = self.std_command(git_dir);
        std.env_remove("GIT_CONFIG_NOSYSTEM")
            .env_remove("GIT_CONFIG_GLOBAL");
        let mut cmd = tokio::process::Command::from(std);
        cmd.kill_on_drop(true);
        cmd
    }

    /// [`GitSource::command`], for a blocking thread.
    pub(super) fn std_command(&self, git_dir: &Path) -> std::process::Command {
        // git and what it runs (ssh, a credential helper) inherit nothing
        // of ours.
        let mut cmd = crate::child::std_command("git", Vec::new());
        cmd.arg("--git-dir")
            .arg(git_dir)
            .args([
                "-c",
                "protocol.ext.allow=never",
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "core.fsmonitor=false",
                "-c",
                "gc.auto=0",
            ])
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Runs a git command on the mirror with a deadline; its stdout.
    pub(super) async fn git(
        &self,
        args: &[&str],
        rest: &[&std::ffi::OsStr],
        what: &'static str,
    ) -> Result<String, SourceError> {
        let out = self.git_bytes(args, rest, what).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// [`GitSource::git`], its stdout as bytes (paths need not be UTF-8).
    pub(super) async fn git_bytes(
        &self,
        args: &[&str],
        rest: &[&std::ffi::OsStr],
        what: &'static str,
    ) -> Result<Vec<u8>, SourceError> {
        let mut cmd = self.command(&self.mirror());
        cmd.args(args).args(rest);
        let out = Self::finish(cmd, what).await?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(SourceError::Git {
                what,
                stderr: bounded(&String::from_utf8_lossy(&out.stderr)),
            })
        }
    }
}

pub(super) fn bounded(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(STDERR_CHARS).collect()
}
