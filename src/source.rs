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

mod checkout;
mod fetch;
pub mod gate;
mod git;
pub mod prometheus;
mod verify;

pub use checkout::MAX_CHECKOUT_ENTRIES;
pub use gate::{Gate, GateStatus};

use crate::spec;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The most a repository's mirror may hold, by default (256 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// The longest a fetch may take, by default.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(120);

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
    /// A watcher of a later wave follows this cache, and its gate has not
    /// passed the revision (a command run by hand, without `--ignore-gate`).
    #[error(
        "{revision}: a watcher of rollout wave {wave} follows this cache, and the gate of wave {waits_on} has not passed this revision; refused (apply --ignore-gate puts it in force anyway)"
    )]
    Gated {
        /// The revision.
        revision: Revision,
        /// The watcher's wave.
        wave: u32,
        /// The wave whose gate it is.
        waits_on: u32,
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
            | SourceError::Specs { revision, .. }
            | SourceError::Gated { revision, .. } => Some(revision),
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
            SourceError::Gated { .. } => "gated",
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
    /// When it was put in force here (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<u64>,
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
    /// The rollout gate, as last asked (a host of a wave after the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateStatus>,
}

/// What a sync did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// The revision in force is still the ref's commit.
    Unchanged(Revision),
    /// A new revision is in force.
    Applied(Revision),
    /// A new revision waits for its wave's gate; the one in force (if any)
    /// stays.
    Waiting {
        /// The revision in force.
        in_force: Option<Revision>,
        /// The revision that waits, and what the gate answered.
        gate: GateStatus,
    },
}

impl Synced {
    /// The revision in force after the sync.
    pub fn in_force(&self) -> Option<&Revision> {
        match self {
            Synced::Unchanged(r) | Synced::Applied(r) => Some(r),
            Synced::Waiting { in_force, .. } => in_force.as_ref(),
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
    /// Who says when a new revision may go in force.
    gate: GatePolicy,
}

/// Who says when a new revision goes in force.
#[derive(Debug, Clone)]
pub enum GatePolicy {
    /// A command run by hand (`apply`, `plan`): where a watcher of a later
    /// wave follows the cache, only a revision its gate passed, unless
    /// `ignore` (`--ignore-gate`).
    Manual {
        /// Put the ref's head in force whatever the gate said.
        ignore: bool,
    },
    /// A watcher of no wave, or of the first: no gate (what a gated
    /// watcher of the cache recorded before is dropped).
    Ungated,
    /// A watcher of a later wave: its gate.
    Ask(std::sync::Arc<dyn Gate>),
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
            gate: GatePolicy::Manual { ignore: false },
        })
    }

    /// The same source, with `gate` saying when a new revision goes in
    /// force (a new source is [`GatePolicy::Manual`], respecting a gate).
    #[must_use]
    pub fn with_gate(mut self, gate: GatePolicy) -> Self {
        self.gate = gate;
        self
    }

    /// The options.
    pub fn options(&self) -> &GitOptions {
        &self.opts
    }

    /// The spec directory of the revision in force (see [`spec_dir_in`]).
    pub fn spec_dir(&self) -> PathBuf {
        spec_dir_in(&self.opts.cache)
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
        match &self.gate {
            // No wave here (any more): a gate recorded before says nothing.
            GatePolicy::Ungated => status.gate = None,
            // A gated watcher says so from its first sync, before any new
            // revision is asked about: a manual apply respects the record.
            GatePolicy::Ask(gate) if status.gate.is_none() => {
                if let Some(applied) = &status.applied {
                    let (wave, waits_on) = gate.wave();
                    status.gate = Some(GateStatus {
                        wave,
                        waits_on,
                        revision: applied.clone(),
                        open: true,
                        query: String::new(),
                        answer: "in force when this watcher started".into(),
                        checked_at: now_unix(),
                    });
                }
            }
            GatePolicy::Ask(_) | GatePolicy::Manual { .. } => {}
        }
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
        // A host of a later wave waits for the wave before (checked before
        // the checkout: a gate may stay closed for hours).
        let new = status.applied.as_ref().map(|a| &a.sha) != Some(&revision.sha);
        match &self.gate {
            GatePolicy::Ask(gate) if new => {
                let asked = gate.ask(&revision).await;
                status.gate = Some(asked.clone());
                if !asked.open {
                    // What stays in force must be whole meanwhile.
                    self.restore(status, path_changed).await?;
                    return Ok(Synced::Waiting {
                        in_force: status.applied.clone(),
                        gate: asked,
                    });
                }
            }
            GatePolicy::Ask(_) | GatePolicy::Ungated => {}
            GatePolicy::Manual { ignore } => {
                if let Some(g) = &mut status.gate
                    && new
                    && !(g.open && g.revision.sha == revision.sha)
                {
                    if !*ignore {
                        return Err(SourceError::Gated {
                            revision,
                            wave: g.wave,
                            waits_on: g.waits_on,
                        });
                    }
                    // Said as what it is: in force past a closed gate.
                    g.revision = revision.clone();
                    g.open = false;
                    g.answer = "put in force by hand (--ignore-gate)".into();
                    g.checked_at = now_unix();
                }
            }
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
        status.applied_at = Some(now_unix());
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
}

impl GitSource {
    /// Makes the revision in force whole again, if it is not (a power cut
    /// during a checkout, a removed link, a new path), while a newer one
    /// waits at the gate.
    async fn restore(&self, status: &SourceStatus, path_changed: bool) -> Result<(), SourceError> {
        let Some(applied) = &status.applied else {
            return Ok(());
        };
        if !path_changed && self.spec_dir().exists() && self.checkout_whole(applied).await {
            return Ok(());
        }
        let target = self.checkout(applied).await?;
        let loaded = spec::load_dir_placed(&target, self.opts.placement.as_ref());
        if let Some(first) = loaded.errors.first() {
            return Err(SourceError::Specs {
                revision: applied.clone(),
                count: loaded.errors.len(),
                first: first.to_string(),
            });
        }
        self.swap(&target)
    }
}

/// The spec directory of the revision in force in the git cache `cache`.
///
/// On unix it is the link `specs`, renamed over whole to switch revisions.
/// On Windows a link takes a privilege and a directory cannot be renamed
/// over another, so the file `specs.ref` names the directory instead
/// (`rev-<sha>/<path>`), replaced whole by a rename (`MoveFileExW`, one
/// step on NTFS): what it names is returned, or the missing `specs` when
/// nothing (or nothing plain) is named. A watcher resolves it again at
/// every reload.
pub fn spec_dir_in(cache: &Path) -> PathBuf {
    spec_dir_named(cache).unwrap_or_else(|| cache.join("specs"))
}

/// On Windows, the directory `specs.ref` in the git cache `cache` names,
/// if it names one inside the cache; on unix `None` (the link `specs` is
/// followed by every open, so it is always the same path).
pub fn spec_dir_named(cache: &Path) -> Option<PathBuf> {
    #[cfg(not(unix))]
    return crate::hostfs::read_state_file(&cache.join(SPEC_REF), 4096)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(PathBuf::from)
        // A revision's checkout or inside one; nothing else of the cache.
        .filter(|p| {
            p.components()
                .next()
                .is_some_and(|first| first.as_os_str().to_string_lossy().starts_with("rev-"))
                && p.components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)))
        })
        .map(|p| cache.join(p));
    #[cfg(unix)]
    {
        let _ = cache;
        None
    }
}

/// On Windows, the file naming the spec directory in force.
#[cfg(not(unix))]
const SPEC_REF: &str = "specs.ref";

/// What `source.json` in a git cache says, if it says anything.
pub fn read_status(cache: &Path) -> Option<SourceStatus> {
    let bytes = crate::hostfs::read_state_file(&cache.join("source.json"), 1 << 20).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests;
