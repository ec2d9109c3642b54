//! Spec directories from git: a repository URL, a ref (branch or tag) and a
//! path inside it, fetched into a cache and swapped in atomically, as
//! Flux's source-controller does for a GitRepository.
//!
//! # Guarantees
//! - A revision is put in force only whole: it is checked out into a
//!   directory of its own (`rev-<sha>`), its specs must load without an
//!   error, and only then is the spec directory link (`specs`) replaced by
//!   a rename, so a reader never sees half a checkout (the spec loader and
//!   the watcher follow the swapped link).
//! - The revision in force stays when a fetch fails, the ref or the path is
//!   missing, the repository grows past its bound, the commit is not signed
//!   by an allowed signer, the history was rewritten (the new commit does
//!   not descend from the one in force), or its specs do not load.
//! - What is fetched is bounded in size and time, and so is what a
//!   checkout would write: a stranger's push is input like any other.
//!   git runs with no prompt, no hooks, no `ext::` transport, and the URL,
//!   ref and path can never be read as options.
//! - The path inside the revision must stay inside it (a symlinked path
//!   pointing at `/etc` is refused).
//!
//! git itself does the work (the `git` program, not a library): it is on
//! every host that has the repository's credentials, it verifies SSH
//! signatures against git's own `allowed_signers` format (`ssh-keygen -Y`),
//! and it keeps uvmctl free of a second git implementation to trust.

use crate::spec;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The most a repository's mirror may hold, by default (256 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// The longest a fetch may take, by default.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest any other git command may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of git's stderr an error quotes.
const STDERR_CHARS: usize = 300;

/// Where specs come from in a git repository.
#[derive(Debug, Clone)]
pub struct GitOptions {
    /// The repository (any URL git fetches: `https://`, `ssh://`, `git://`,
    /// `file://`, a path).
    pub url: String,
    /// A branch or a tag.
    pub reference: String,
    /// The spec directory inside the repository (relative; `.` for its root).
    pub path: PathBuf,
    /// Where the mirror, the checkouts and the `specs` link live.
    pub cache: PathBuf,
    /// git's `allowed_signers` file: only commits signed (SSH) by one of
    /// them are put in force.
    pub allowed_signers: Option<PathBuf>,
    /// The most the mirror may hold, and one revision's checkout may
    /// write, in bytes.
    pub max_bytes: u64,
    /// This host's share of the specs: a revision is refused for spec
    /// errors only in files that could hold one of its VMs.
    pub placement: Option<spec::Placement>,
    /// The longest a fetch may take.
    pub fetch_timeout: Duration,
}

/// A commit of a ref, shown as Flux shows it: `main@sha1:<sha>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// The ref it was fetched as.
    pub reference: String,
    /// The commit, 40 hex digits.
    pub sha: String,
}

impl std::fmt::Display for Revision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@sha1:{}", self.reference, self.sha)
    }
}

/// Why a revision was not put in force.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The options cannot name a repository, ref or path.
    #[error("{0}")]
    Options(String),
    /// The git program could not be run, or a cache file not written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// git refused (unreachable URL, authentication...).
    #[error("git {what} failed: {stderr}")]
    Git {
        /// What git was asked to do.
        what: &'static str,
        /// What git said (bounded).
        stderr: String,
    },
    /// The ref is not in the repository.
    #[error("ref {0:?} is not in the repository")]
    NoSuchRef(String),
    /// A bare name the repository has as a branch and as a tag: which one
    /// is in force would be up to whoever may push tags (issue 31).
    #[error(
        "ref {name:?} is both a branch (refs/heads/{name}) and a tag (refs/tags/{name}); refused: name one in full with --git-ref"
    )]
    AmbiguousRef {
        /// The name as given.
        name: String,
    },
    /// The cache directory is not root's alone.
    #[error("the git cache {0}; refused")]
    UntrustedCache(crate::hostfs::TrustError),
    /// git took longer than allowed.
    #[error("git {what} took longer than {after:?}; stopped")]
    Timeout {
        /// What git was doing.
        what: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The mirror grew past its bound.
    #[error(
        "the repository's mirror grew over {max} bytes (--git-max-mb); the fetch was stopped and nothing new is in force"
    )]
    TooLarge {
        /// The bound.
        max: u64,
    },
    /// A revision's checkout would write more than the bound.
    #[error("{revision}: its checkout would write {what}; not checked out")]
    CheckoutTooLarge {
        /// The revision.
        revision: Revision,
        /// How much, against which bound.
        what: String,
    },
    /// The path is not a directory of the revision.
    #[error("{revision}: path {path:?} is not a directory in this revision")]
    MissingPath {
        /// The revision.
        revision: Revision,
        /// The path.
        path: PathBuf,
    },
    /// Not signed by an allowed signer.
    #[error("{revision}: not signed by an allowed signer ({reason})")]
    Unverified {
        /// The revision.
        revision: Revision,
        /// What git said.
        reason: String,
    },
    /// The new commit does not descend from the one in force.
    #[error(
        "{revision} does not descend from {in_force}: history was rewritten (a force-push); refused"
    )]
    Rewritten {
        /// The new revision.
        revision: Revision,
        /// The revision in force.
        in_force: Revision,
    },
    /// Its specs do not load.
    #[error("{revision}: {count} spec error(s), first: {first}")]
    Specs {
        /// The revision.
        revision: Revision,
        /// How many errors.
        count: usize,
        /// The first, as `validate` prints it.
        first: String,
    },
}

impl SourceError {
    /// The revision refused, when the error is about one (not a fetch that
    /// failed).
    pub fn revision(&self) -> Option<&Revision> {
        match self {
            SourceError::MissingPath { revision, .. }
            | SourceError::Unverified { revision, .. }
            | SourceError::Rewritten { revision, .. }
            | SourceError::CheckoutTooLarge { revision, .. }
            | SourceError::Specs { revision, .. } => Some(revision),
            SourceError::Options(_)
            | SourceError::Io { .. }
            | SourceError::Git { .. }
            | SourceError::NoSuchRef(_)
            | SourceError::AmbiguousRef { .. }
            | SourceError::UntrustedCache(_)
            | SourceError::Timeout { .. }
            | SourceError::TooLarge { .. } => None,
        }
    }

    /// A short word for the kind, for metrics and status (bounded set).
    pub fn kind(&self) -> &'static str {
        match self {
            SourceError::Options(_) => "options",
            SourceError::Io { .. } => "io",
            SourceError::Git { .. } => "fetch",
            SourceError::NoSuchRef(_) | SourceError::AmbiguousRef { .. } => "no-such-ref",
            SourceError::UntrustedCache(_) => "untrusted-cache",
            SourceError::Timeout { .. } => "timeout",
            SourceError::TooLarge { .. } | SourceError::CheckoutTooLarge { .. } => "too-large",
            SourceError::MissingPath { .. } => "missing-path",
            SourceError::Unverified { .. } => "unverified",
            SourceError::Rewritten { .. } => "rewritten",
            SourceError::Specs { .. } => "spec-errors",
        }
    }
}

/// What the cache records of the source (`source.json`): read by `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceStatus {
    /// The repository.
    pub url: String,
    /// The ref.
    pub reference: String,
    /// The path inside it.
    pub path: PathBuf,
    /// The revision in force (its specs are the ones applied).
    pub applied: Option<Revision>,
    /// The revision the last fetch found.
    pub fetched: Option<Revision>,
    /// When a fetch last succeeded (seconds since the epoch).
    pub last_fetch: Option<u64>,
    /// Why the last attempt put nothing new in force, if it failed.
    pub last_error: Option<String>,
    /// The kind of that error (`unverified`, `rewritten`, `spec-errors`...).
    pub last_error_kind: Option<String>,
    /// Revisions refused for want of a valid signature, since the cache was
    /// made (each counted once, however often it is fetched again).
    pub refused_unverified: u64,
    /// The last of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_unverified: Option<String>,
    /// Revisions refused, by the kind of refusal (`spec-errors`,
    /// `unverified`, `rewritten`, `missing-path`, `too-large`), each
    /// revision counted once per kind however often it is fetched again.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub refused: std::collections::BTreeMap<String, u64>,
    /// The last refusal counted (`<sha> <kind>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refused: Option<String>,
}

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// The revision in force is still the ref's commit.
    Unchanged(Revision),
    /// A new revision is in force.
    Applied(Revision),
}

impl Synced {
    /// The revision in force after the sync.
    pub fn revision(&self) -> &Revision {
        match self {
            Synced::Unchanged(r) | Synced::Applied(r) => r,
        }
    }
}

/// A git source and its cache.
#[derive(Debug, Clone)]
pub struct GitSource {
    opts: GitOptions,
    /// The checkout in force was found whole since this source was made
    /// (looked at once per process: a power cut may have left it short).
    checked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SourceError {
    let what = what.into();
    move |source| SourceError::Io { what, source }
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl GitSource {
    /// Checks the options: a URL and a ref git cannot read as options, a
    /// relative path that stays inside the repository.
    ///
    /// # Errors
    /// `Options`, saying which.
    pub fn new(opts: GitOptions) -> Result<Self, SourceError> {
        let bad = |what: &str| Err(SourceError::Options(what.to_string()));
        if opts.url.is_empty() || opts.url.starts_with('-') || opts.url.contains(['\n', '\0']) {
            return bad("--git: the URL must not be empty, start with '-' or hold a newline");
        }
        if opts.url.starts_with("ext::") {
            return bad("--git: the ext:: transport runs commands; refused");
        }
        let r = &opts.reference;
        if r.is_empty()
            || r.starts_with('-')
            || r.contains("..")
            || r.ends_with('/')
            || r.ends_with(".lock")
            || !r
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
        {
            return bad("--ref: a branch or tag name of [A-Za-z0-9._/-], without '..'");
        }
        if opts.path.is_absolute()
            || opts
                .path
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return bad("--path: a relative path inside the repository, without '..'");
        }
        Ok(GitSource {
            opts,
            checked: Default::default(),
        })
    }

    /// The options.
    pub fn options(&self) -> &GitOptions {
        &self.opts
    }

    /// The spec directory: a link to the revision in force, swapped whole.
    pub fn spec_dir(&self) -> PathBuf {
        self.opts.cache.join("specs")
    }

    fn mirror(&self) -> PathBuf {
        self.opts.cache.join("repo.git")
    }

    fn status_path(&self) -> PathBuf {
        self.opts.cache.join("source.json")
    }

    /// What the cache records (empty when nothing was ever fetched).
    pub fn status(&self) -> SourceStatus {
        read_status(&self.opts.cache).unwrap_or_else(|| SourceStatus {
            url: self.opts.url.clone(),
            reference: self.opts.reference.clone(),
            path: self.opts.path.clone(),
            ..SourceStatus::default()
        })
    }

    fn store_status(&self, s: &SourceStatus) -> Result<(), SourceError> {
        let bytes = serde_json::to_vec_pretty(s).map_err(|e| SourceError::Io {
            what: "cannot encode source.json".into(),
            source: io::Error::other(e),
        })?;
        crate::hostfs::replace_file(&self.status_path(), &bytes, 0o600)
            .map_err(io_err("cannot write source.json"))
    }

    /// Fetches the ref and puts its commit in force if it is new and
    /// passes every check; the revision in force stays otherwise. Records
    /// the outcome in `source.json` either way.
    ///
    /// # Errors
    /// Why nothing new is in force.
    pub async fn sync(&self) -> Result<Synced, SourceError> {
        crate::hostfs::create_dirs(&self.opts.cache, 0o700)
            .map_err(io_err(format!("cannot make {}", self.opts.cache.display())))?;
        // The state directory's rule: a cache another user made first (its
        // `specs` link pointed at their own directory) is never read.
        crate::hostfs::check_trusted_dir(&self.opts.cache).map_err(SourceError::UntrustedCache)?;
        // One sync per cache at a time (a watcher and an apply).
        let lock_path = self.opts.cache.join("lock");
        let lock = crate::hostfs::open_state_file(&lock_path, 0o600, false)
            .map_err(io_err(format!("cannot open {}", lock_path.display())))?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
            .await
            .map_err(|e| SourceError::Io {
                what: "lock".into(),
                source: io::Error::other(e),
            })?
            .map_err(io_err("cannot lock the git cache"))?;
        let mut status = self.status();
        // The link points into the path the revision was put in force with.
        let path_changed = status.path != self.opts.path;
        status.url.clone_from(&self.opts.url);
        status.reference.clone_from(&self.opts.reference);
        status.path.clone_from(&self.opts.path);
        let outcome = self.sync_locked(&mut status, path_changed).await;
        match &outcome {
            Ok(_) => {
                status.last_error = None;
                status.last_error_kind = None;
            }
            Err(e) => {
                status.last_error = Some(e.to_string());
                status.last_error_kind = Some(e.kind().to_string());
                if let SourceError::Unverified { revision, .. } = e
                    && status.last_unverified.as_ref() != Some(&revision.sha)
                {
                    status.refused_unverified += 1;
                    status.last_unverified = Some(revision.sha.clone());
                }
                if let Some(revision) = e.revision() {
                    let key = format!("{} {}", revision.sha, e.kind());
                    if status.last_refused.as_ref() != Some(&key) {
                        *status.refused.entry(e.kind().to_string()).or_default() += 1;
                        status.last_refused = Some(key);
                    }
                }
            }
        }
        self.store_status(&status)?;
        drop(lock);
        outcome
    }

    async fn sync_locked(
        &self,
        status: &mut SourceStatus,
        path_changed: bool,
    ) -> Result<Synced, SourceError> {
        self.clean_leftovers();
        let mirror = self.mirror();
        if !mirror.join("HEAD").is_file() {
            let _ = std::fs::remove_dir_all(&mirror);
            self.git(&["init", "--quiet", "--bare"], &[], "init")
                .await?;
        }
        self.fetch().await?;
        let sha = self.resolve("refs/uvmctl/fetched").await?;
        let revision = Revision {
            reference: self.opts.reference.clone(),
            sha,
        };
        status.fetched = Some(revision.clone());
        status.last_fetch = Some(now_unix());
        if status.applied.as_ref() == Some(&revision)
            && !path_changed
            && self.spec_dir().exists()
            && self.checkout_whole(&revision).await
        {
            return Ok(Synced::Unchanged(revision));
        }
        if let Some(signers) = &self.opts.allowed_signers {
            self.verify(&revision, signers).await?;
        }
        if let Some(in_force) = &status.applied
            && in_force.sha != revision.sha
            && !self.descends(&revision.sha, &in_force.sha).await?
        {
            return Err(SourceError::Rewritten {
                revision,
                in_force: in_force.clone(),
            });
        }
        let target = self.checkout(&revision).await?;
        let loaded = spec::load_dir_placed(&target, self.opts.placement.as_ref());
        if let Some(first) = loaded.errors.first() {
            return Err(SourceError::Specs {
                revision,
                count: loaded.errors.len(),
                first: first.to_string(),
            });
        }
        self.swap(&target)?;
        let previous = status.applied.replace(revision.clone());
        // Said at once: a watcher's reconcile of the new specs reads it.
        status.last_error = None;
        status.last_error_kind = None;
        self.store_status(status)?;
        // What the revision in force needs stays in the mirror whatever is
        // fetched (or discarded) later.
        self.git(
            &["update-ref", "refs/uvmctl/applied"],
            &[std::ffi::OsStr::new(&revision.sha)],
            "update-ref",
        )
        .await?;
        self.prune_checkouts(&revision, previous.as_ref());
        Ok(Synced::Applied(revision))
    }

    /// `git fetch` of the ref into `refs/uvmctl/fetched`, stopped when the
    /// mirror grows past its bound or the time is up.
    async fn fetch(&self) -> Result<(), SourceError> {
        let full = self.full_ref().await?;
        let refspec = format!("+{full}:refs/uvmctl/fetched");
        let mirror = self.mirror();
        let mut child = self
            .command_with_host_config(&mirror)
            .args([
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                "--",
            ])
            .arg(&self.opts.url)
            .arg(&refspec)
            .spawn()
            .map_err(io_err("cannot run git"))?;
        let stderr = child.stderr.take();
        let reading = tokio::spawn(async move {
            let mut text = String::new();
            if let Some(mut e) = stderr {
                use tokio::io::AsyncReadExt;
                let mut buf = Vec::new();
                let _ = (&mut e).take(64 << 10).read_to_end(&mut buf).await;
                text = String::from_utf8_lossy(&buf).into_owned();
            }
            text
        });
        let start = Instant::now();
        let exit = loop {
            tokio::select! {
                exit = child.wait() => break exit.map_err(io_err("git fetch"))?,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let over = dir_size(&mirror.join("objects")) > self.opts.max_bytes;
            if over || start.elapsed() > self.opts.fetch_timeout {
                let _ = child.kill().await;
                // A killed fetch leaves temporary packs; the refs are untouched.
                remove_temp_packs(&mirror);
                return Err(if over {
                    SourceError::TooLarge {
                        max: self.opts.max_bytes,
                    }
                } else {
                    SourceError::Timeout {
                        what: "fetch",
                        after: self.opts.fetch_timeout,
                    }
                });
            }
        };
        let stderr = reading.await.unwrap_or_default();
        if exit.success() {
            if dir_size(&mirror.join("objects")) > self.opts.max_bytes {
                // Back to what the revision in force needs.
                let _ = self
                    .git(
                        &["update-ref", "-d", "refs/uvmctl/fetched"],
                        &[],
                        "update-ref",
                    )
                    .await;
                let _ = self.git(&["repack", "-a", "-d", "-q"], &[], "repack").await;
                let _ = self.git(&["prune", "--expire=now"], &[], "prune").await;
                return Err(SourceError::TooLarge {
                    max: self.opts.max_bytes,
                });
            }
            return Ok(());
        }
        if stderr.contains("couldn't find remote ref") {
            return Err(SourceError::NoSuchRef(self.opts.reference.clone()));
        }
        Err(SourceError::Git {
            what: "fetch",
            stderr: bounded(&stderr),
        })
    }

    /// The ref to fetch, by its full name: one given in full (`refs/...`)
    /// as it is; a bare name as the branch or the tag of that name, asked
    /// of the remote, and refused when it is both. git itself would take
    /// the tag, so whoever may push tags could override a protected branch.
    async fn full_ref(&self) -> Result<String, SourceError> {
        let name = &self.opts.reference;
        if name.starts_with("refs/") {
            return Ok(name.clone());
        }
        let (branch, tag) = (format!("refs/heads/{name}"), format!("refs/tags/{name}"));
        let mut cmd = self.command_with_host_config(&self.mirror());
        cmd.args(["ls-remote", "--refs", "--"])
            .arg(&self.opts.url)
            .args([&branch, &tag]);
        // Part of the fetch, as far as anyone reading the error goes.
        let out = Self::finish(cmd, "fetch").await?;
        if !out.status.success() {
            return Err(SourceError::Git {
                what: "fetch",
                stderr: bounded(&String::from_utf8_lossy(&out.stderr)),
            });
        }
        // Patterns match a ref's tail: only the exact names count.
        let listed = String::from_utf8_lossy(&out.stdout);
        let has = |full: &str| listed.lines().any(|l| l.split('\t').nth(1) == Some(full));
        match (has(&branch), has(&tag)) {
            (true, true) => Err(SourceError::AmbiguousRef { name: name.clone() }),
            (true, false) => Ok(branch),
            (false, true) => Ok(tag),
            (false, false) => Err(SourceError::NoSuchRef(name.clone())),
        }
    }

    async fn resolve(&self, name: &str) -> Result<String, SourceError> {
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
    async fn finish(
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

    async fn verify(&self, revision: &Revision, signers: &Path) -> Result<(), SourceError> {
        // `verify-commit` picks its verifier from the signature's kind: an
        // OpenPGP signature would be checked against whatever keyrings the
        // host has. The allowed signers are SSH keys, so nothing else is
        // even handed to git (and its other verifiers are disabled).
        let object = self
            .git_bytes(
                &["cat-file", "commit"],
                &[std::ffi::OsStr::new(&revision.sha)],
                "cat-file",
            )
            .await?;
        if let Err(why) = ssh_signed(&object) {
            return Err(SourceError::Unverified {
                revision: revision.clone(),
                reason: why.to_string(),
            });
        }
        let mut cmd = self.command(&self.mirror());
        cmd.arg("-c")
            .arg(format!("gpg.ssh.allowedSignersFile={}", signers.display()))
            .args([
                "-c",
                "gpg.openpgp.program=false",
                "-c",
                "gpg.program=false",
                "-c",
                "gpg.x509.program=false",
            ])
            .arg("verify-commit")
            .arg(&revision.sha);
        let out = Self::finish(cmd, "verify-commit").await?;
        if out.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&out.stderr);
        let reason = said
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no signature");
        Err(SourceError::Unverified {
            revision: revision.clone(),
            reason: bounded(reason),
        })
    }

    async fn descends(&self, new: &str, old: &str) -> Result<bool, SourceError> {
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

    /// The revision checked out in a directory of its own; the spec path
    /// inside it, which must be a directory that stays inside it.
    async fn checkout(&self, revision: &Revision) -> Result<PathBuf, SourceError> {
        let dir = self.opts.cache.join(format!("rev-{}", revision.sha));
        if !dir.is_dir() {
            // Written under another name and renamed when whole: a
            // checkout cut short (uvmctl killed) is never taken for one,
            // whose missing specs would read as VMs to prune.
            let partial = self
                .opts
                .cache
                .join(format!(".rev-{}.partial", revision.sha));
            let _ = std::fs::remove_dir_all(&partial);
            let listing = self
                .git_bytes(
                    &["ls-tree", "-r", "-l", "-z", "--full-tree"],
                    &[std::ffi::OsStr::new(&revision.sha)],
                    "ls-tree",
                )
                .await?;
            let entries = tree_entries(&listing, revision)?;
            // What the checkout would take on disk, inflated: a pack that
            // passed the bound may still hold a blob that unpacks to
            // gigabytes, or trees that reuse each other into thousands of
            // empty files, each an inode and a block.
            let footprint = Footprint::of(&entries);
            let over = if footprint.bytes > self.opts.max_bytes {
                Some(format!(
                    "{} files and {} directories taking {} bytes on disk, over the bound of {} (--git-max-mb)",
                    footprint.files, footprint.dirs, footprint.bytes, self.opts.max_bytes
                ))
            } else if entries.len() > MAX_CHECKOUT_ENTRIES {
                Some(format!(
                    "{} files, over the bound of {MAX_CHECKOUT_ENTRIES}",
                    entries.len()
                ))
            } else {
                None
            };
            if let Some(what) = over {
                return Err(SourceError::CheckoutTooLarge {
                    revision: revision.clone(),
                    what,
                });
            }
            crate::hostfs::create_dirs(&partial, 0o700)
                .map_err(io_err("cannot make the checkout directory"))?;
            self.write_tree(&partial, entries).await?;
            // Not synced to disk (git does not sync a checkout either, and
            // syncfs would flush every VM's dirty pages on the host's file
            // system): a checkout a power cut cut short is found by
            // `checkout_whole` at the next start, and written again.
            std::fs::rename(&partial, &dir).map_err(io_err("cannot keep the checkout"))?;
        }
        let target = dir.join(&self.opts.path);
        let missing = || SourceError::MissingPath {
            revision: revision.clone(),
            path: self.opts.path.clone(),
        };
        let resolved = std::fs::canonicalize(&target).map_err(|_| missing())?;
        let root = std::fs::canonicalize(&dir).map_err(io_err("cannot resolve the checkout"))?;
        if !resolved.starts_with(&root) || !resolved.is_dir() {
            return Err(missing());
        }
        Ok(target)
    }

    /// Writes `entries` under `root` (new and empty) from the objects
    /// themselves (`git cat-file --batch`): what a file holds comes from
    /// the repository alone. No filter, attribute, hook or configuration of
    /// the host's or the repository's is read, so a `.gitattributes`
    /// naming a filter the host defines (git-lfs's smudge fetches from a
    /// URL the repository chooses) runs nothing (issue 30). On a blocking
    /// thread of its own: thousands of small files are plain system calls,
    /// which the async runtime would only slow down.
    async fn write_tree(&self, root: &Path, entries: Vec<TreeEntry>) -> Result<(), SourceError> {
        let mut cmd = self.std_command(&self.mirror());
        cmd.args(["cat-file", "--batch", "--buffer"])
            .stdin(Stdio::piped())
            // Nothing reads it while the objects stream: never a full pipe.
            .stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(io_err("cannot run git cat-file"))?;
        let pid = child.id();
        let root = root.to_path_buf();
        // Why: blocking pipe reads and thousands of file writes.
        let writing = tokio::task::spawn_blocking(move || {
            let written = write_objects(&mut child, &root, &entries);
            let _ = child.kill();
            let _ = child.wait();
            written
        });
        match tokio::time::timeout(self.opts.fetch_timeout, writing).await {
            Ok(Ok(written)) => written,
            Ok(Err(e)) => Err(SourceError::Io {
                what: "checkout".into(),
                source: io::Error::other(e),
            }),
            Err(_) => {
                // The blocking thread ends once git is gone.
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                Err(SourceError::Timeout {
                    what: "checkout",
                    after: self.opts.fetch_timeout,
                })
            }
        }
    }

    /// Whether the checkout of `revision` (in force) has every file of the
    /// revision at its size: looked at once per process, the first time it
    /// is found in force. A checkout that is not whole is removed, so the
    /// sync writes it again and puts it back in force.
    async fn checkout_whole(&self, revision: &Revision) -> bool {
        use std::sync::atomic::Ordering;
        if self.checked.load(Ordering::Relaxed) {
            return true;
        }
        let dir = self.opts.cache.join(format!("rev-{}", revision.sha));
        let listing = self
            .git_bytes(
                &["ls-tree", "-r", "-l", "-z", "--full-tree"],
                &[std::ffi::OsStr::new(&revision.sha)],
                "ls-tree",
            )
            .await;
        let whole = match listing.ok().and_then(|l| tree_entries(&l, revision).ok()) {
            Some(entries) => entries.iter().all(|e| {
                let Ok(m) = std::fs::symlink_metadata(dir.join(&e.path)) else {
                    return false;
                };
                if !e.is_blob() {
                    return m.is_dir();
                }
                if e.mode == 0o120000 {
                    m.file_type().is_symlink()
                } else {
                    m.is_file() && m.len() == e.size
                }
            }),
            // Cannot tell (git failed): keep what is in force.
            None => true,
        };
        if whole {
            self.checked.store(true, Ordering::Relaxed);
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
        whole
    }

    /// Points `specs` at `target` with one rename.
    fn swap(&self, target: &Path) -> Result<(), SourceError> {
        let link = self.spec_dir();
        let relative = target
            .strip_prefix(&self.opts.cache)
            .map_or_else(|_| target.to_path_buf(), Path::to_path_buf);
        let temp = self
            .opts
            .cache
            .join(format!(".specs.{}", std::process::id()));
        let _ = std::fs::remove_file(&temp);
        std::os::unix::fs::symlink(&relative, &temp).map_err(io_err("cannot link the revision"))?;
        std::fs::rename(&temp, &link).map_err(io_err("cannot swap the spec directory"))
    }

    /// Keeps the checkout in force and the one in force before it (a
    /// reader may still be in it); removes the rest, refused revisions'
    /// checkouts among them. Removing the one in force before would pull a
    /// watched directory from under a watcher that has not yet seen the
    /// swap (issue 30: after a refused revision, the newest other checkout
    /// was the refused one, and the fix waited for the resync).
    fn prune_checkouts(&self, keep: &Revision, previous: Option<&Revision>) {
        let Ok(entries) = std::fs::read_dir(&self.opts.cache) else {
            return;
        };
        let kept: Vec<String> = std::iter::once(keep)
            .chain(previous)
            .map(|r| format!("rev-{}", r.sha))
            .collect();
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("rev-") && !kept.iter().any(|k| *k == name) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Removes what a sync cut short (uvmctl killed, a power cut) left in
    /// the cache: a partial checkout, a link not yet swapped in, and the
    /// worktree records of uvmctl versions that checked out with `git
    /// worktree` (a killed one stayed locked: issue 30). Runs under the
    /// cache's lock, so no sync in progress owns any of it.
    fn clean_leftovers(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.opts.cache) {
            for e in entries.filter_map(Result::ok) {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name.starts_with(".rev-") && name.ends_with(".partial") {
                    let _ = std::fs::remove_dir_all(e.path());
                } else if name.starts_with(".specs.") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(self.mirror().join("worktrees"));
    }

    /// git on the mirror, reading no configuration of the host's (system
    /// or root's global): no filter, attribute driver, verifier program or
    /// alias of theirs takes part in what is read from the mirror.
    fn command(&self, git_dir: &Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::from(self.std_command(git_dir));
        cmd.kill_on_drop(true);
        cmd
    }

    /// git for what talks to the remote (`ls-remote`, `fetch`): the host's
    /// configuration is how an operator gives credentials, proxies and
    /// `ssh` options, so it is read.
    fn command_with_host_config(&self, git_dir: &Path) -> tokio::process::Command {
        let mut std = self.std_command(git_dir);
        std.env_remove("GIT_CONFIG_NOSYSTEM")
            .env_remove("GIT_CONFIG_GLOBAL");
        let mut cmd = tokio::process::Command::from(std);
        cmd.kill_on_drop(true);
        cmd
    }

    /// [`GitSource::command`], for a blocking thread.
    fn std_command(&self, git_dir: &Path) -> std::process::Command {
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
    async fn git(
        &self,
        args: &[&str],
        rest: &[&std::ffi::OsStr],
        what: &'static str,
    ) -> Result<String, SourceError> {
        let out = self.git_bytes(args, rest, what).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// [`GitSource::git`], its stdout as bytes (paths need not be UTF-8).
    async fn git_bytes(
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

/// Whether a commit object carries an SSH signature (and nothing else):
/// the `gpgsig` (or `gpgsig-sha256`) header of an SSH signature.
fn ssh_signed(object: &[u8]) -> Result<(), &'static str> {
    let headers = object
        .split(|&b| b == b'\n')
        .take_while(|line| !line.is_empty());
    let mut kinds = headers.filter_map(|line| {
        line.strip_prefix(b"gpgsig ")
            .or_else(|| line.strip_prefix(b"gpgsig-sha256 "))
    });
    match kinds.next() {
        None => Err("no signature"),
        Some(first) if first.starts_with(b"-----BEGIN SSH SIGNATURE-----") => {
            if kinds.next().is_some() {
                Err("more than one signature")
            } else {
                Ok(())
            }
        }
        Some(_) => Err(
            "not an SSH signature (OpenPGP or X.509): --allowed-signers admits SSH signatures only",
        ),
    }
}

/// The most files (and links, and submodules) one revision's checkout may
/// have: a tree of millions of empty files inflates to no bytes at all.
pub const MAX_CHECKOUT_ENTRIES: usize = 200_000;

/// What a checkout takes on disk: each file, link and directory counts at
/// least one block of [`BLOCK`] bytes, so a bound in bytes bounds inodes
/// too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Footprint {
    files: usize,
    dirs: usize,
    bytes: u64,
}

/// The block a file system gives the smallest file or directory.
const BLOCK: u64 = 4096;

impl Footprint {
    fn of(entries: &[TreeEntry]) -> Self {
        let mut dirs = std::collections::HashSet::new();
        let mut bytes = 0u64;
        for e in entries {
            bytes = bytes.saturating_add(e.size.div_ceil(BLOCK).max(1).saturating_mul(BLOCK));
            let mut at = e.path.parent();
            while let Some(dir) = at.filter(|d| !d.as_os_str().is_empty()) {
                if !dirs.insert(dir) {
                    break;
                }
                at = dir.parent();
            }
        }
        let dirs_n = dirs.len();
        Footprint {
            files: entries.len(),
            dirs: dirs_n,
            bytes: bytes.saturating_add(BLOCK.saturating_mul(dirs_n as u64)),
        }
    }
}

/// One file of a revision, as `git ls-tree -r -l -z` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TreeEntry {
    /// `100644`, `100755`, `120000` (a link) or `160000` (a submodule).
    mode: u32,
    /// The object's id.
    object: String,
    /// Its size (0 for a submodule).
    size: u64,
    /// Its path in the revision: relative, no `.`, `..` or empty part.
    path: PathBuf,
}

impl TreeEntry {
    fn is_blob(&self) -> bool {
        self.mode != 0o160000
    }
}

/// Parses `git ls-tree -r -l -z` output, refusing what could not be a
/// checkout's own path.
fn tree_entries(listing: &[u8], revision: &Revision) -> Result<Vec<TreeEntry>, SourceError> {
    use std::os::unix::ffi::OsStrExt;
    let bad = |why: &str| SourceError::Git {
        what: "ls-tree",
        stderr: format!("{revision}: {why}"),
    };
    let mut out = Vec::new();
    for record in listing.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let tab = record
            .iter()
            .position(|b| *b == b'\t')
            .ok_or_else(|| bad("an entry without a path"))?;
        let (meta, path) = (&record[..tab], &record[tab + 1..]);
        let meta = String::from_utf8_lossy(meta);
        let mut parts = meta.split_whitespace();
        let (Some(mode), Some(kind), Some(object), Some(size)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("an entry git did not describe whole"));
        };
        let mode = u32::from_str_radix(mode, 8).map_err(|_| bad("an entry of no mode"))?;
        let size = match (kind, mode) {
            // Regular files (old gits wrote 100664 too) and links.
            ("blob", m) if m & 0o170000 == 0o100000 || m == 0o120000 => {
                size.parse().map_err(|_| bad("a file of no size"))?
            }
            ("commit", 0o160000) => 0,
            _ => {
                return Err(bad(
                    "an entry that is neither a file, a link nor a submodule",
                ));
            }
        };
        if !object.bytes().all(|b| b.is_ascii_hexdigit()) || object.len() < 40 {
            return Err(bad("an entry of no object id"));
        }
        let path = Path::new(std::ffi::OsStr::from_bytes(path));
        let plain = path
            .components()
            .all(|c| matches!(c, Component::Normal(n) if !n.is_empty()));
        if !plain || path.as_os_str().is_empty() {
            return Err(bad("a path that would leave the checkout"));
        }
        out.push(TreeEntry {
            mode,
            object: object.to_string(),
            size,
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Streams every blob of `entries` out of `child` (`git cat-file --batch`)
/// into files under `root`; a submodule is an empty directory, as git
/// leaves it.
fn write_objects(
    child: &mut std::process::Child,
    root: &Path,
    entries: &[TreeEntry],
) -> Result<(), SourceError> {
    use std::io::{BufRead, Read, Write};
    let io = |what: &str| {
        let what = what.to_string();
        move |source| SourceError::Io { what, source }
    };
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| io("git cat-file")(io::Error::other("no stdin pipe")))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| io("git cat-file")(io::Error::other("no stdout pipe")))?;
    // Asked for all at once, from a thread of its own, while read as they
    // come: git's output pipe never waits on a reader still writing.
    let request: Vec<u8> = entries
        .iter()
        .filter(|e| e.is_blob())
        .flat_map(|e| format!("{}\n", e.object).into_bytes())
        .collect();
    let asking = std::thread::spawn(move || {
        let _ = stdin.write_all(&request);
    });
    let mut out = std::io::BufReader::with_capacity(1 << 16, stdout);
    let mut made: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    let mut header = Vec::new();
    let mut body = Vec::new();
    let result = entries.iter().try_for_each(|e| {
        let target = root.join(&e.path);
        make_parents(root, &target, &mut made)?;
        if !e.is_blob() {
            std::fs::create_dir(&target).map_err(io("cannot write the checkout"))?;
            made.insert(target);
            return Ok(());
        }
        header.clear();
        out.read_until(b'\n', &mut header)
            .map_err(io("git cat-file"))?;
        let expected = format!("{} blob {}\n", e.object, e.size);
        if header != expected.as_bytes() {
            return Err(SourceError::Git {
                what: "cat-file",
                stderr: bounded(&String::from_utf8_lossy(&header)),
            });
        }
        body.clear();
        (&mut out)
            .take(e.size)
            .read_to_end(&mut body)
            .map_err(io("git cat-file"))?;
        let mut newline = [0u8; 1];
        out.read_exact(&mut newline).map_err(io("git cat-file"))?;
        if body.len() as u64 != e.size {
            return Err(SourceError::Git {
                what: "cat-file",
                stderr: "an object ended short".into(),
            });
        }
        write_entry(&target, e.mode, &body)
    });
    // The asking thread ends when git reads all or goes away.
    drop(out);
    let _ = child.kill();
    let _ = asking.join();
    result
}

/// Makes the directories between `root` and `target`, each new: one that
/// is already there and not made here (a link a crafted tree put first) is
/// refused, never followed.
fn make_parents(
    root: &Path,
    target: &Path,
    made: &mut std::collections::HashSet<PathBuf>,
) -> Result<(), SourceError> {
    let Some(parent) = target.parent() else {
        return Ok(());
    };
    if parent == root || made.contains(parent) {
        return Ok(());
    }
    make_parents(root, parent, made)?;
    std::fs::create_dir(parent).map_err(io_err(format!(
        "cannot write the checkout ({})",
        parent.display()
    )))?;
    made.insert(parent.to_path_buf());
    Ok(())
}

/// Writes one file or link of a checkout; never follows or replaces
/// anything already there.
fn write_entry(target: &Path, mode: u32, body: &[u8]) -> Result<(), SourceError> {
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let what = || format!("cannot write the checkout ({})", target.display());
    if mode == 0o120000 {
        return std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(body), target)
            .map_err(io_err(what()));
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if mode & 0o111 != 0 { 0o755 } else { 0o644 })
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(target)
        .map_err(io_err(what()))?;
    f.write_all(body).map_err(io_err(what()))
}

/// What `source.json` in a git cache says, if it says anything.
pub fn read_status(cache: &Path) -> Option<SourceStatus> {
    let bytes = crate::hostfs::read_state_file(&cache.join("source.json"), 1 << 20).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn bounded(text: &str) -> String {
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.chars().take(STDERR_CHARS).collect()
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn remove_temp_packs(mirror: &Path) {
    let pack = mirror.join("objects/pack");
    if let Ok(entries) = std::fs::read_dir(&pack) {
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with("tmp_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Why a sync with `opts` puts nothing in force (`what`: what the test
    /// expects to go wrong).
    async fn sync_refused(opts: GitOptions, what: &str) -> SourceError {
        GitSource::new(opts)
            .expect("options")
            .sync()
            .await
            .expect_err(what)
    }

    /// A repository to fetch from, with git's own command line.
    struct Origin {
        dir: tempfile::TempDir,
    }

    impl Origin {
        fn new() -> Self {
            let o = Origin {
                dir: tempfile::tempdir().expect("tempdir"),
            };
            o.git(&["init", "-q", "-b", "main"]);
            o
        }

        fn git(&self, args: &[&str]) -> String {
            let out = Command::new("git")
                .arg("-C")
                .arg(self.dir.path())
                .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
                .args(args)
                .output()
                .expect("git runs");
            assert!(
                out.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }

        fn write(&self, rel: &str, text: &str) {
            let p = self.dir.path().join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, text).expect("write");
        }

        fn commit(&self, message: &str, extra: &[&str]) -> String {
            self.git(&["add", "-A"]);
            let mut args = vec!["commit", "-q", "-m", message];
            args.extend_from_slice(extra);
            self.git(&args);
            self.git(&["rev-parse", "HEAD"])
        }

        fn url(&self) -> String {
            format!("file://{}", self.dir.path().display())
        }
    }

    fn vm(name: &str) -> String {
        format!(
            "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: {name}\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: /k/vmlinuz\n  processors:\n    count: 1\n  memory:\n    sizeMB: 64\n"
        )
    }

    fn source(origin: &Origin, cache: &Path) -> GitSource {
        GitSource::new(GitOptions {
            url: origin.url(),
            reference: "main".into(),
            path: "specs".into(),
            cache: cache.to_path_buf(),
            allowed_signers: None,
            max_bytes: DEFAULT_MAX_BYTES,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            placement: None,
        })
        .expect("options")
    }

    fn names(dir: &Path) -> Vec<String> {
        spec::load_dir(dir).desired.vms.into_keys().collect()
    }

    #[tokio::test]
    async fn a_new_revision_is_checked_out_and_swapped_in_whole() {
        let origin = Origin::new();
        origin.write("specs/web.yaml", &vm("web"));
        origin.write("README.md", "not a spec\n");
        let first = origin.commit("web", &[]);
        let cache = tempfile::tempdir().expect("tempdir");
        let src = source(&origin, cache.path());
        let rev = Revision {
            reference: "main".into(),
            sha: first.clone(),
        };
        assert_eq!(
            src.sync().await.expect("sync"),
            Synced::Applied(rev.clone())
        );
        assert_eq!(rev.to_string(), format!("main@sha1:{first}"));
        assert_eq!(names(&src.spec_dir()), ["web"]);
        assert_eq!(
            src.sync().await.expect("sync"),
            Synced::Unchanged(rev.clone())
        );

        origin.write("specs/db.yaml", &vm("db"));
        let second = origin.commit("db", &[]);
        assert!(matches!(src.sync().await.expect("sync"), Synced::Applied(r) if r.sha == second));
        assert_eq!(names(&src.spec_dir()), ["db", "web"]);
        let status = src.status();
        assert_eq!(status.applied.map(|r| r.sha), Some(second.clone()));
        assert_eq!(status.fetched.map(|r| r.sha), Some(second.clone()));
        assert!(status.last_fetch.is_some() && status.last_error.is_none());
        origin.write("specs/cache.yaml", &vm("cache"));
        origin.commit("cache", &[]);
        src.sync().await.expect("sync");
        // The checkout in force and the one before it are kept.
        let kept = std::fs::read_dir(cache.path())
            .expect("cache")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("rev-"))
            .count();
        assert_eq!(kept, 2);
        assert!(!cache.path().join(format!("rev-{first}")).exists());
    }

    /// The same commit with another `--git-path` is a new spec directory.
    #[tokio::test]
    async fn a_new_path_is_put_in_force_for_the_same_commit() {
        let origin = Origin::new();
        origin.write("specs/web.yaml", &vm("web"));
        origin.write("other/db.yaml", &vm("db"));
        origin.commit("two paths", &[]);
        let cache = tempfile::tempdir().expect("tempdir");
        let src = source(&origin, cache.path());
        src.sync().await.expect("sync");
        assert_eq!(names(&src.spec_dir()), ["web"]);
        let mut opts = src.options().clone();
        opts.path = "other".into();
        let other = GitSource::new(opts).expect("options");
        assert!(matches!(
            other.sync().await.expect("sync"),
            Synced::Applied(_)
        ));
        assert_eq!(names(&other.spec_dir()), ["db"]);
        assert!(
            !std::fs::read_dir(cache.path())
                .expect("cache")
                .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".partial"))),
            "no partial checkout is left"
        );
    }

    /// Issue 17: bad input gets a clear error and changes nothing.
    #[tokio::test]
    async fn what_cannot_be_put_in_force_leaves_the_revision_in_force() {
        let origin = Origin::new();
        origin.write("specs/web.yaml", &vm("web"));
        let good = origin.commit("web", &[]);
        let cache = tempfile::tempdir().expect("tempdir");
        let src = source(&origin, cache.path());
        src.sync().await.expect("sync");
        let in_force = || (src.status().applied.map(|r| r.sha), names(&src.spec_dir()));
        let before = (Some(good.clone()), vec!["web".to_string()]);

        // A spec that does not load.
        origin.write("specs/bad.yaml", "apiVersion: [\n");
        origin.commit("broken", &[]);
        let e = src.sync().await.expect_err("spec errors");
        assert!(matches!(e, SourceError::Specs { count: 1, .. }), "{e}");
        assert!(e.to_string().contains("bad.yaml"), "{e}");
        assert_eq!(in_force(), before);
        assert_eq!(src.status().last_error_kind.as_deref(), Some("spec-errors"));

        // History rewritten: the broken commit replaced by another.
        origin.git(&["reset", "-q", "--hard", &good]);
        origin.git(&["checkout", "-q", "--orphan", "rewritten"]);
        origin.write("specs/other.yaml", &vm("other"));
        origin.commit("unrelated", &[]);
        origin.git(&["branch", "-q", "-M", "main"]);
        let e = src.sync().await.expect_err("rewritten");
        assert!(matches!(e, SourceError::Rewritten { .. }), "{e}");
        assert_eq!(in_force(), before);
        // Issue 30: every kind of refusal is counted (for the metrics), each
        // revision once however often it is fetched again.
        src.sync().await.expect_err("still rewritten");
        let refused = src.status().refused;
        assert_eq!(refused.get("spec-errors"), Some(&1), "{refused:?}");
        assert_eq!(refused.get("rewritten"), Some(&1), "{refused:?}");

        // A ref that does not exist, a path missing from the revision, an
        // unreachable URL, a repository over its bound.
        let mut opts = src.options().clone();
        opts.reference = "nosuch".into();
        let e = sync_refused(opts, "no ref").await;
        assert!(matches!(e, SourceError::NoSuchRef(_)), "{e}");
        let mut opts = src.options().clone();
        opts.path = "nowhere".into();
        opts.cache = cache.path().join("other");
        let e = sync_refused(opts, "no path").await;
        assert!(matches!(e, SourceError::MissingPath { .. }), "{e}");
        let mut opts = src.options().clone();
        opts.url = format!("file://{}/none", cache.path().display());
        let e = sync_refused(opts, "unreachable").await;
        assert!(matches!(e, SourceError::Git { .. }), "{e}");
        let mut opts = src.options().clone();
        opts.max_bytes = 1;
        opts.cache = cache.path().join("tiny");
        let e = sync_refused(opts, "too large").await;
        assert!(matches!(e, SourceError::TooLarge { .. }), "{e}");
        assert_eq!(in_force(), before);

        // A small pack that would unpack to more than the bound.
        origin.write("specs/zeros.bin", &"\0".repeat(2 << 20));
        origin.commit("two MiB of zeros", &[]);
        let mut opts = src.options().clone();
        opts.max_bytes = 1 << 20;
        opts.cache = cache.path().join("inflated");
        let e = sync_refused(opts, "inflates").await;
        assert!(matches!(e, SourceError::CheckoutTooLarge { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("bytes on disk, over the bound of 1048576 (--git-max-mb)"),
            "names the revision and the bound: {e}"
        );
        assert!(!cache.path().join("inflated/specs").exists());
    }

    /// Issue 30: a watcher killed while checking out (or a power cut) left
    /// a partial checkout and, with `git worktree`, a locked worktree that
    /// made every later fetch fail. Whatever a dead sync left is cleared.
    #[tokio::test]
    async fn what_a_killed_checkout_left_is_cleared_at_the_next_sync() {
        let origin = Origin::new();
        origin.write("specs/web.yaml", &vm("web"));
        let sha = origin.commit("web", &[]);
        let cache = tempfile::tempdir().expect("tempdir");
        let src = source(&origin, cache.path());
        src.sync().await.expect("sync");
        origin.write("specs/db.yaml", &vm("db"));
        let next = origin.commit("db", &[]);
        // What uvmctl killed mid-sync leaves: half a checkout of the next
        // revision, a link not yet renamed, and an older uvmctl's locked
        // worktree record of it.
        let partial = cache.path().join(format!(".rev-{next}.partial"));
        std::fs::create_dir_all(partial.join("specs")).expect("mkdir");
        std::fs::write(partial.join("specs/db.yaml"), "apiVersion: [").expect("write");
        std::os::unix::fs::symlink("nowhere", cache.path().join(".specs.4242")).expect("link");
        let admin = cache
            .path()
            .join(format!("repo.git/worktrees/.rev-{next}.partial"));
        std::fs::create_dir_all(&admin).expect("mkdir");
        std::fs::write(admin.join("locked"), "initializing").expect("write");
        std::fs::write(
            admin.join("gitdir"),
            partial.join(".git").display().to_string(),
        )
        .expect("write");
        assert!(
            matches!(src.sync().await.expect("converges"), Synced::Applied(r) if r.sha == next)
        );
        assert_eq!(names(&src.spec_dir()), ["db", "web"]);
        let left: Vec<String> = std::fs::read_dir(cache.path())
            .expect("cache")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(!cache.path().join("repo.git/worktrees").exists());
        assert_ne!(sha, next);
    }

    /// A checkout is not synced to disk (neither is git's): one a power cut
    /// left short is found at the next start and written again.
    #[tokio::test]
    async fn a_checkout_left_short_is_written_again_at_the_next_start() {
        let origin = Origin::new();
        origin.write("specs/web.yaml", &vm("web"));
        let sha = origin.commit("web", &[]);
        let cache = tempfile::tempdir().expect("tempdir");
        source(&origin, cache.path()).sync().await.expect("sync");
        let file = cache.path().join(format!("rev-{sha}/specs/web.yaml"));
        std::fs::write(&file, "").expect("truncate, as a power cut may");
        // The next start (a source made anew) finds it short.
        let src = source(&origin, cache.path());
        let again = src.sync().await.expect("sync");
        assert!(matches!(again, Synced::Applied(_)), "{again:?}");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), vm("web"));
        assert!(matches!(
            src.sync().await.expect("sync"),
            Synced::Unchanged(_)
        ));
    }

    /// Issue 30: a revision's `.gitattributes` naming a filter the host's
    /// git defines ran that filter's smudge during checkout. The files are
    /// the repository's bytes, and nothing the repository names runs.
    #[tokio::test]
    async fn a_filter_the_repository_names_never_runs() {
        let origin = Origin::new();
        origin.write("specs/web.yaml", &vm("web"));
        origin.commit("web", &[]);
        let cache = tempfile::tempdir().expect("tempdir");
        let src = source(&origin, cache.path());
        src.sync().await.expect("sync");
        // The host's git defines the filter (git-lfs's smudge is the usual
        // one); here in the mirror's own configuration, which git reads as
        // it reads the system's and the user's.
        let marker = cache.path().join("smudged");
        let smudge = format!("sh -c 'touch {}; sed s/web/evil/'", marker.display());
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(cache.path().join("repo.git"))
            .args(["config", "filter.evil.smudge", &smudge])
            .output()
            .expect("git config");
        assert!(out.status.success());
        Command::new("git")
            .arg("--git-dir")
            .arg(cache.path().join("repo.git"))
            .args(["config", "filter.evil.required", "true"])
            .output()
            .expect("git config");
        origin.write(".gitattributes", "*.yaml filter=evil\n");
        origin.write("specs/db.yaml", &vm("db"));
        std::os::unix::fs::symlink("web.yaml", origin.dir.path().join("specs/web.link"))
            .expect("link");
        origin.commit("filtered", &[]);
        assert!(matches!(
            src.sync().await.expect("sync"),
            Synced::Applied(_)
        ));
        assert!(!marker.exists(), "the smudge filter ran");
        assert_eq!(
            std::fs::read_to_string(src.spec_dir().join("web.yaml")).expect("read"),
            vm("web"),
            "the repository's bytes"
        );
        assert_eq!(
            std::fs::read_link(src.spec_dir().join("web.link")).expect("a link stays a link"),
            Path::new("web.yaml")
        );
    }

    #[test]
    fn tree_paths_that_would_leave_the_checkout_are_refused() {
        let rev = Revision {
            reference: "main".into(),
            sha: "0".repeat(40),
        };
        let oid = "a".repeat(40);
        let entry = |mode: &str, kind: &str, path: &str| {
            format!("{mode} {kind} {oid}      12\t{path}\0").into_bytes()
        };
        let ok = tree_entries(&entry("100644", "blob", "specs/web.yaml"), &rev).expect("ok");
        assert_eq!(ok[0].size, 12);
        assert_eq!(ok[0].path, Path::new("specs/web.yaml"));
        for bad in ["../x", "/etc/passwd", "a/../../b", "./a"] {
            assert!(
                tree_entries(&entry("100644", "blob", bad), &rev).is_err(),
                "{bad}"
            );
        }
        // Empty parts fold away: the file is a/b, inside the checkout.
        let folded = tree_entries(&entry("100644", "blob", "a//b"), &rev).expect("folded");
        assert_eq!(folded[0].path, Path::new("a/b"));
        // A file mode of an older git (group-writable) is a file too.
        assert!(tree_entries(&entry("100664", "blob", "old.yaml"), &rev).is_ok());
        assert!(tree_entries(&entry("040000", "tree", "d"), &rev).is_err());
        let sub = format!("160000 commit {oid}       -\tmodule\0").into_bytes();
        assert_eq!(tree_entries(&sub, &rev).expect("submodule")[0].size, 0);
    }

    /// Issue 30: with label placement, a spec that fails to load refuses
    /// the revision only on the hosts it could belong to.
    #[tokio::test]
    async fn a_broken_spec_refuses_the_revision_only_where_it_could_be_placed() {
        let origin = Origin::new();
        let labelled = |name: &str, host: &str| {
            vm(name).replace(
                &format!("  name: {name}\n"),
                &format!("  name: {name}\n  labels: {{host: {host}}}\n"),
            )
        };
        origin.write("specs/web.yaml", &labelled("web", "a"));
        origin.write(
            "specs/db.yaml",
            &labelled("db", "b").replace("sizeMB: 64", "sizeMB: lots"),
        );
        let sha = origin.commit("db broken", &[]);
        let on = |host: &str| {
            let cache = tempfile::tempdir().expect("tempdir");
            let mut opts = source(&origin, cache.path()).options().clone();
            opts.placement = Some(spec::Placement {
                selector: spec::Selector::for_host(host),
                path: None,
            });
            (GitSource::new(opts).expect("options"), cache)
        };
        let (a, _ca) = on("a");
        assert!(matches!(a.sync().await.expect("host a"), Synced::Applied(r) if r.sha == sha));
        let (b, _cb) = on("b");
        let e = b.sync().await.expect_err("host b refuses");
        assert!(matches!(e, SourceError::Specs { count: 1, .. }), "{e}");
    }

    #[tokio::test]
    async fn a_spec_path_that_leaves_the_revision_is_refused() {
        let origin = Origin::new();
        std::os::unix::fs::symlink("/etc", origin.dir.path().join("specs")).expect("link");
        origin.commit("a path pointing out", &[]);
        let cache = tempfile::tempdir().expect("tempdir");
        let e = source(&origin, cache.path())
            .sync()
            .await
            .expect_err("outside");
        assert!(matches!(e, SourceError::MissingPath { .. }), "{e}");
        assert!(!cache.path().join("specs").exists());
    }

    #[test]
    fn options_that_git_could_read_as_options_are_refused() {
        let ok = GitOptions {
            url: "https://example.com/r.git".into(),
            reference: "main".into(),
            path: ".".into(),
            cache: "/tmp/c".into(),
            allowed_signers: None,
            max_bytes: 1,
            fetch_timeout: Duration::from_secs(1),
            placement: None,
        };
        assert!(GitSource::new(ok.clone()).is_ok());
        for (url, reference, path) in [
            ("--upload-pack=touch /tmp/x", "main", "."),
            ("ext::sh -c touch% /tmp/x", "main", "."),
            ("https://e/r", "-main", "."),
            ("https://e/r", "a..b", "."),
            ("https://e/r", "main", "../up"),
            ("https://e/r", "main", "/etc"),
        ] {
            let opts = GitOptions {
                url: url.into(),
                reference: reference.into(),
                path: path.into(),
                ..ok.clone()
            };
            assert!(
                matches!(GitSource::new(opts), Err(SourceError::Options(_))),
                "{url} {reference} {path}"
            );
        }
    }

    /// Issue 17: with allowed signers, only a commit signed by one is put
    /// in force; the refusal is counted.
    #[tokio::test]
    async fn only_commits_signed_by_an_allowed_signer_are_put_in_force() {
        let keys = tempfile::tempdir().expect("tempdir");
        let key = keys.path().join("id");
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f"])
            .arg(&key)
            .status()
            .expect("ssh-keygen runs");
        assert!(made.success());
        let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
        let signers = keys.path().join("allowed_signers");
        std::fs::write(&signers, format!("ops@example.com {public}")).expect("write");

        let origin = Origin::new();
        origin.write("specs/web.yaml", &vm("web"));
        origin.commit("unsigned", &[]);
        let cache = tempfile::tempdir().expect("tempdir");
        let mut opts = source(&origin, cache.path()).options().clone();
        opts.allowed_signers = Some(signers);
        let src = GitSource::new(opts).expect("options");
        let e = src.sync().await.expect_err("unsigned");
        assert!(matches!(e, SourceError::Unverified { .. }), "{e}");
        assert!(!src.spec_dir().exists());
        assert_eq!(src.status().refused_unverified, 1);
        src.sync().await.expect_err("still unsigned");
        assert_eq!(
            src.status().refused_unverified,
            1,
            "one revision, counted once"
        );

        origin.write("specs/db.yaml", &vm("db"));
        origin.git(&["add", "-A"]);
        let key = key.display().to_string();
        origin.git(&[
            "-c",
            "gpg.format=ssh",
            "-c",
            &format!("user.signingkey={key}"),
            "commit",
            "-q",
            "-S",
            "-m",
            "signed",
        ]);
        let signed = origin.git(&["rev-parse", "HEAD"]);
        assert!(matches!(src.sync().await.expect("signed"), Synced::Applied(r) if r.sha == signed));
        assert_eq!(names(&src.spec_dir()), ["db", "web"]);
    }

    /// Issue 31: a bare ref name that is both a branch and a tag is refused
    /// (git would take the tag, so whoever may push tags would override a
    /// protected branch); a full ref name is taken as it says.
    #[tokio::test]
    async fn a_tag_of_the_branchs_name_is_refused() {
        let origin = Origin::new();
        origin.write("specs/web.yaml", &vm("web"));
        let good = origin.commit("web", &[]);
        let cache = tempfile::tempdir().expect("tempdir");
        let src = source(&origin, cache.path());
        src.sync().await.expect("sync");
        origin.git(&["checkout", "-q", "-b", "side"]);
        origin.write("specs/evil.yaml", &vm("evil"));
        let evil = origin.commit("evil", &[]);
        origin.git(&["tag", "main", &evil]);
        let e = src.sync().await.expect_err("both a branch and a tag");
        assert!(matches!(e, SourceError::AmbiguousRef { .. }), "{e}");
        assert!(e.to_string().contains("refs/heads/main"), "{e}");
        assert_eq!(src.status().applied.map(|r| r.sha), Some(good.clone()));
        assert_eq!(names(&src.spec_dir()), ["web"]);

        let mut opts = src.options().clone();
        opts.reference = "refs/heads/main".into();
        let branch = GitSource::new(opts).expect("options");
        assert!(
            matches!(branch.sync().await.expect("branch"), Synced::Applied(r) if r.sha == good)
        );
        let mut opts = src.options().clone();
        opts.reference = "refs/tags/main".into();
        opts.cache = cache.path().join("tag");
        let tag = GitSource::new(opts).expect("options");
        assert!(matches!(tag.sync().await.expect("tag"), Synced::Applied(r) if r.sha == evil));
    }

    /// Issue 31: a tree of many small files (trees that reuse each other
    /// make thousands from a few kilobytes) is bounded by what it takes on
    /// disk, not by its bytes alone.
    #[tokio::test]
    async fn an_inode_bomb_revision_is_refused() {
        let origin = Origin::new();
        origin.write("specs/web.yaml", &vm("web"));
        for i in 0..300 {
            origin.write(&format!("specs/empty/{}/{i}", i % 10), "");
        }
        origin.commit("three hundred empty files", &[]);
        let cache = tempfile::tempdir().expect("tempdir");
        let mut opts = source(&origin, cache.path()).options().clone();
        opts.max_bytes = 1 << 20;
        let e = sync_refused(opts, "too many files").await;
        assert!(matches!(e, SourceError::CheckoutTooLarge { .. }), "{e}");
        assert!(
            e.to_string().contains("301 files and 12 directories"),
            "{e}"
        );
        assert!(!cache.path().join("specs").exists());
    }

    /// Issue 31: the cache gets the state directory's rule. One another
    /// user made first, its `specs` link pointed at their directory, is
    /// refused before anything in it is read.
    #[tokio::test]
    async fn a_squatted_cache_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let origin = Origin::new();
        origin.write("specs/web.yaml", &vm("web"));
        origin.commit("web", &[]);
        let base = tempfile::tempdir().expect("tempdir");
        let theirs = base.path().join("theirs");
        std::fs::create_dir_all(&theirs).expect("mkdir");
        let cache = base.path().join("cache");
        std::fs::create_dir_all(&cache).expect("mkdir");
        std::os::unix::fs::symlink(&theirs, cache.join("specs")).expect("link");
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = source(&origin, &cache).sync().await.expect_err("squatted");
        assert!(matches!(e, SourceError::UntrustedCache(_)), "{e}");
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        if nix::unistd::geteuid().is_root() {
            std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700))
                .expect("chmod");
            std::os::unix::fs::chown(&cache, Some(65534), Some(65534)).expect("chown");
            let e = source(&origin, &cache).sync().await.expect_err("squatted");
            assert!(e.to_string().contains("not owned by root"), "{e}");
        }
        assert_eq!(std::fs::read_dir(&theirs).expect("theirs").count(), 0);
    }

    #[test]
    fn only_an_ssh_signature_header_is_an_ssh_signature() {
        let commit = |sig: &str| {
            format!(
                "tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\nauthor a <a@b> 1 +0000\ncommitter a <a@b> 1 +0000\n{sig}\nmessage\ngpgsig -----BEGIN SSH SIGNATURE-----\n"
            )
        };
        assert_eq!(
            ssh_signed(commit("").as_bytes()),
            Err("no signature"),
            "a message line is no header"
        );
        assert!(
            ssh_signed(
                commit(
                    "gpgsig -----BEGIN SSH SIGNATURE-----\n U1NI\n -----END SSH SIGNATURE-----\n"
                )
                .as_bytes()
            )
            .is_ok()
        );
        assert!(
            ssh_signed(
                commit("gpgsig -----BEGIN PGP SIGNATURE-----\n x\n -----END PGP SIGNATURE-----\n")
                    .as_bytes()
            )
            .is_err()
        );
        assert!(
            ssh_signed(commit("gpgsig -----BEGIN SIGNED MESSAGE-----\n x\n").as_bytes()).is_err()
        );
        assert!(ssh_signed(commit("gpgsig -----BEGIN SSH SIGNATURE-----\n x\ngpgsig-sha256 -----BEGIN PGP SIGNATURE-----\n").as_bytes()).is_err());
    }
}
