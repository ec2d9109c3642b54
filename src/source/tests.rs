// Most of these tests run git, which the Windows build's tests (under
// Wine) do not have: their helpers are unused there.
#![cfg_attr(not(unix), allow(dead_code))]

use super::checkout::tree_entries;
use super::verify::ssh_signed;
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

// Git runs: the Windows build's tests run under Wine, which has none.
#[cfg(unix)]
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
// Git runs: the Windows build's tests run under Wine, which has none.
#[cfg(unix)]
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
// Git runs: the Windows build's tests run under Wine, which has none.
#[cfg(unix)]
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
#[cfg(unix)]
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
    assert!(matches!(src.sync().await.expect("converges"), Synced::Applied(r) if r.sha == next));
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
// Git runs: the Windows build's tests run under Wine, which has none.
#[cfg(unix)]
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
#[cfg(unix)]
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
    std::os::unix::fs::symlink("web.yaml", origin.dir.path().join("specs/web.link")).expect("link");
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
// Git runs: the Windows build's tests run under Wine, which has none.
#[cfg(unix)]
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

#[cfg(unix)]
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
// Git runs: the Windows build's tests run under Wine, which has none.
#[cfg(unix)]
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
// Git runs: the Windows build's tests run under Wine, which has none.
#[cfg(unix)]
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
    assert!(matches!(branch.sync().await.expect("branch"), Synced::Applied(r) if r.sha == good));
    let mut opts = src.options().clone();
    opts.reference = "refs/tags/main".into();
    opts.cache = cache.path().join("tag");
    let tag = GitSource::new(opts).expect("options");
    assert!(matches!(tag.sync().await.expect("tag"), Synced::Applied(r) if r.sha == evil));
}

/// Issue 31: a tree of many small files (trees that reuse each other
/// make thousands from a few kilobytes) is bounded by what it takes on
/// disk, not by its bytes alone.
// Git runs: the Windows build's tests run under Wine, which has none.
#[cfg(unix)]
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
#[cfg(unix)]
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
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).expect("chmod");
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
            commit("gpgsig -----BEGIN SSH SIGNATURE-----\n U1NI\n -----END SSH SIGNATURE-----\n")
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
    assert!(ssh_signed(commit("gpgsig -----BEGIN SIGNED MESSAGE-----\n x\n").as_bytes()).is_err());
    assert!(ssh_signed(commit("gpgsig -----BEGIN SSH SIGNATURE-----\n x\ngpgsig-sha256 -----BEGIN PGP SIGNATURE-----\n").as_bytes()).is_err());
}

/// A gate that answers as told, and counts what it was asked.
#[derive(Debug, Default)]
struct TestGate {
    open: std::sync::atomic::AtomicBool,
    asked: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Gate for TestGate {
    fn wave(&self) -> (u32, u32) {
        (2, 1)
    }

    async fn ask(&self, revision: &Revision) -> GateStatus {
        self.asked.lock().expect("lock").push(revision.sha.clone());
        let open = self.open.load(std::sync::atomic::Ordering::SeqCst);
        GateStatus {
            wave: 2,
            waits_on: 1,
            revision: revision.clone(),
            open,
            query: "q".into(),
            answer: if open { "1" } else { "no sample" }.into(),
            checked_at: 1,
        }
    }
}

/// Issue 35: a host of a later wave keeps its revision in force while the
/// gate is closed, asks again each sync, and puts it in force once it opens.
/// A revision already in force is never asked about.
// Git runs: the Windows build's tests run under Wine, which has none.
#[cfg(unix)]
#[tokio::test]
async fn a_closed_gate_keeps_the_revision_in_force() {
    let origin = Origin::new();
    origin.write("specs/web.yaml", &vm("web"));
    let first = origin.commit("web", &[]);
    let cache = tempfile::tempdir().expect("tempdir");
    let gate = std::sync::Arc::new(TestGate::default());
    let src = source(&origin, cache.path()).with_gate(GatePolicy::Ask(gate.clone()));
    // Nothing in force yet: it waits too.
    let waiting = src.sync().await.expect("sync");
    assert!(
        matches!(&waiting, Synced::Waiting { in_force: None, gate } if !gate.open && gate.revision.sha == first),
        "{waiting:?}"
    );
    assert!(!src.spec_dir().exists(), "nothing checked out");
    gate.open.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(src.sync().await.expect("sync"), Synced::Applied(r) if r.sha == first));
    assert!(matches!(
        src.sync().await.expect("sync"),
        Synced::Unchanged(_)
    ));
    assert_eq!(
        gate.asked.lock().expect("lock").len(),
        2,
        "not asked for the revision in force"
    );

    gate.open.store(false, std::sync::atomic::Ordering::SeqCst);
    origin.write("specs/db.yaml", &vm("db"));
    let second = origin.commit("db", &[]);
    for _ in 0..2 {
        let s = src.sync().await.expect("sync");
        assert_eq!(s.in_force().map(|r| r.sha.as_str()), Some(first.as_str()));
    }
    assert_eq!(names(&src.spec_dir()), ["web"]);
    let status = src.status();
    assert_eq!(status.applied.as_ref().map(|r| &r.sha), Some(&first));
    assert_eq!(status.fetched.as_ref().map(|r| &r.sha), Some(&second));
    let g = status.gate.expect("the gate's answer kept");
    assert_eq!(
        (g.open, g.revision.sha.as_str(), g.answer.as_str()),
        (false, second.as_str(), "no sample")
    );
    assert!(status.last_error.is_none(), "waiting is no error");
    // By hand on the same cache: refused while the gate has not passed it,
    // unless asked; the record stays for the watcher.
    let err = source(&origin, cache.path())
        .sync()
        .await
        .expect_err("a manual sync respects the gate");
    assert!(
        matches!(
            &err,
            SourceError::Gated {
                wave: 2,
                waits_on: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("--ignore-gate"), "{err}");
    assert_eq!(
        names(&src.spec_dir()),
        ["web"],
        "the revision in force stays"
    );

    gate.open.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(src.sync().await.expect("sync"), Synced::Applied(r) if r.sha == second));
    assert_eq!(names(&src.spec_dir()), ["db", "web"]);
    assert!(src.status().applied_at.is_some());

    // Past a closed gate with --ignore-gate; and a watcher with no wave
    // any more drops the record.
    gate.open.store(false, std::sync::atomic::Ordering::SeqCst);
    origin.write("specs/cache.yaml", &vm("cache"));
    let third = origin.commit("cache", &[]);
    assert!(matches!(
        src.sync().await.expect("sync"),
        Synced::Waiting { .. }
    ));
    let by_hand = source(&origin, cache.path()).with_gate(GatePolicy::Manual { ignore: true });
    assert!(matches!(by_hand.sync().await.expect("sync"), Synced::Applied(r) if r.sha == third));
    let g = src.status().gate.expect("kept");
    assert_eq!(
        (g.revision.sha.as_str(), g.open, g.answer.as_str()),
        (
            third.as_str(),
            false,
            "put in force by hand (--ignore-gate)"
        )
    );
    let ungated = source(&origin, cache.path()).with_gate(GatePolicy::Ungated);
    assert!(matches!(
        ungated.sync().await.expect("sync"),
        Synced::Unchanged(_)
    ));
    assert_eq!(src.status().gate, None);

    // A host made wave 2 since: its watcher's first sync records the gate
    // (nothing new to ask about yet), and a manual apply respects it.
    assert!(matches!(
        src.sync().await.expect("sync"),
        Synced::Unchanged(_)
    ));
    let g = src.status().gate.expect("recorded at once");
    assert!(g.open && g.revision.sha == third, "{g:?}");
    origin.write("specs/queue.yaml", &vm("queue"));
    origin.commit("queue", &[]);
    let err = source(&origin, cache.path())
        .sync()
        .await
        .expect_err("refused");
    assert!(matches!(err, SourceError::Gated { .. }), "{err}");
}

/// While a newer revision waits at the gate, the one in force is kept
/// whole: a removed link is put back.
// Git runs: the Windows build's tests run under Wine, which has none.
#[cfg(unix)]
#[tokio::test]
async fn the_revision_in_force_is_kept_whole_while_the_gate_is_closed() {
    let origin = Origin::new();
    origin.write("specs/web.yaml", &vm("web"));
    origin.commit("web", &[]);
    let cache = tempfile::tempdir().expect("tempdir");
    let gate = std::sync::Arc::new(TestGate::default());
    gate.open.store(true, std::sync::atomic::Ordering::SeqCst);
    let src = source(&origin, cache.path()).with_gate(GatePolicy::Ask(gate.clone()));
    assert!(matches!(
        src.sync().await.expect("sync"),
        Synced::Applied(_)
    ));
    gate.open.store(false, std::sync::atomic::Ordering::SeqCst);
    origin.write("specs/db.yaml", &vm("db"));
    origin.commit("db", &[]);
    std::fs::remove_file(src.spec_dir()).expect("rm link");
    assert!(matches!(
        src.sync().await.expect("sync"),
        Synced::Waiting { .. }
    ));
    assert_eq!(names(&src.spec_dir()), ["web"], "put back, not moved on");
}

/// The switch of revisions needs no git, and runs on both platforms: a
/// link renamed over `specs` on unix, `specs.ref` replaced on Windows;
/// either way the spec directory is the revision's, then the next one's,
/// and a watcher resolving it again (Windows) finds the new one.
#[test]
fn the_spec_directory_switches_whole_to_the_revision_swapped_in() {
    let cache = tempfile::tempdir().expect("tempdir");
    let src = GitSource::new(GitOptions {
        url: "file:///nowhere".into(),
        reference: "main".into(),
        path: "specs".into(),
        cache: cache.path().to_path_buf(),
        allowed_signers: None,
        max_bytes: DEFAULT_MAX_BYTES,
        fetch_timeout: DEFAULT_FETCH_TIMEOUT,
        placement: None,
    })
    .expect("options");
    assert!(!src.spec_dir().exists(), "nothing in force yet");
    assert_eq!(spec_dir_named(cache.path()), None);
    for (rev, vm_name) in [("rev-1", "one"), ("rev-2", "two")] {
        let dir = cache.path().join(rev).join("specs");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(format!("{vm_name}.yaml")), vm(vm_name)).expect("write");
        src.swap(&dir).expect("swap");
        assert_eq!(names(&src.spec_dir()), [vm_name]);
        if cfg!(unix) {
            assert_eq!(src.spec_dir(), cache.path().join("specs"));
        } else {
            assert_eq!(spec_dir_named(cache.path()), Some(dir));
        }
    }
    // What a cut-short swap leaves is cleaned up at the next start.
    for left in [".specs.77", ".specs.ref.77.0.tmp"] {
        std::fs::write(cache.path().join(left), "rev-1/specs").expect("leftover");
    }
    src.clean_leftovers();
    let left: Vec<String> = std::fs::read_dir(cache.path())
        .expect("read cache")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".specs"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A checkout on Windows writes only names Windows writes as named (what
/// Git for Windows' `core.protectNTFS` refuses is refused).
#[test]
fn names_windows_reads_as_something_else_are_refused_for_a_windows_checkout() {
    use super::checkout::windows_name_ok;
    for ok in [
        "web.yaml",
        "specs",
        "a b.yaml",
        "COM10",
        "console.yaml",
        ".hidden",
    ] {
        assert!(windows_name_ok(ok), "{ok}");
    }
    for bad in [
        "CON", "con.yaml", "aux.yaml", "NUL", "com1", "LPT9.txt", "COM¹", "conin$", "a.", "a ",
        "a:b", "a\\b", "a*", "a?", "a|b", "a<b", "a\u{1}b", "",
    ] {
        assert!(!windows_name_ok(bad), "{bad:?}");
    }
}
