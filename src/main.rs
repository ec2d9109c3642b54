//! The `uvmctl` command line: parse arguments, call the library, map the
//! outcome to an exit code (0 ok, 1 error, 2 changes pending with
//! `--detailed-exitcode`, 3 changes exceed `--max-disruption`, 4 the state
//! directory stayed locked, 5 a saved plan is stale).

use anyhow::{Context, bail};
use clap::builder::TypedValueParser as _;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use uvmctl::apply::lock::{LockError, StateLock};
use uvmctl::apply::{self, ApplyOptions};
use uvmctl::config::HostDefaults;
use uvmctl::plan::hold::Limits;
use uvmctl::plan::saved::{MAX_SAVED_PLAN_BYTES, SavedPlan};
use uvmctl::plan::{PlanOptions, render};
use uvmctl::reconcile;
use uvmctl::spec::{self, Loaded};
use uvmctl::virtstack::qemu::DEFAULT_STATE_DIR;
use uvmctl::virtstack::recorded::Recorded;
use uvmctl::virtstack::{self, AccelChoice, HostOptions, Kind};
use uvmctl::vm::{Capabilities, Disruption, Observe, Virtstack, VmName};

/// `print!` that returns the write's error instead of panicking: a reader
/// that went away (`uvmctl plan | head`) ends the command quietly.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($t)*).map_err(StdoutError)
    }};
}

/// `println!` likewise.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($t)*).map_err(StdoutError)
    }};
}

#[derive(Parser)]
#[command(
    name = "uvmctl",
    version,
    about = "Declarative manager for lightweight utility VMs",
    after_help = "Exit codes: 0 success; 1 error (usage errors included); 2 changes pending \
(plan --detailed-exitcode); 3 a policy stop (a change more disruptive than --max-disruption, \
a recreate not allowed, a prune refused); 4 the state directory stayed locked \
(--lock-timeout); 5 a saved plan is stale (apply FILE: what it was computed from changed)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    host: HostArgs,
    /// Host defaults (keys stateDir, allowRoots, accel, virtstack, qemuUser,
    /// remoteDir, remoteServer, hcsLibrary, hcsAllowRoots); flags and
    /// UVMCTL_* variables win over it
    /// [default: /etc/uvmctl/config.yaml, if it exists].
    #[arg(long, global = true, env = "UVMCTL_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Check spec files; print every error as file:line:col: field: message.
    Validate {
        /// Directory of spec files (searched recursively), or one file.
        dir: PathBuf,
        /// Output format (json: docs/plan-json.md, "validate").
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show what would change, per VM and per device, and how disruptive it is.
    Plan(PlanArgs),
    /// Make the VMs what the specs say.
    Apply(ApplyArgs),
    /// Keep the VMs what the specs say, unattended: react to spec changes
    /// and VM events, resync periodically, until SIGINT/SIGTERM.
    Watch(WatchArgs),
    /// Serve one VM over hcsshim's vmservice protocol (ttrpc) on the QEMU
    /// virtstack, until SIGTERM or a client's Quit.
    Serve(ServeArgs),
    /// Table of the VMs uvmctl manages (and what a running `watch` did).
    Status {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Stop a VM and delete everything uvmctl keeps for it.
    Destroy {
        /// VM name.
        name: VmName,
        /// Wait this long for another apply holding the state directory.
        #[arg(long, value_parser = parse_duration, default_value = "30")]
        lock_timeout: Duration,
    },
    /// Wait until a VM's QEMU exits; say whether it was asked to (exit 0)
    /// or died on its own (exit 1, with its last stderr lines).
    Wait {
        /// VM name.
        name: VmName,
        /// Give up after this long (exit 2); waits forever without it.
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Attach to a running VM's serial console (COM1, the guest's ttyS0);
    /// Ctrl-] detaches. With a pipe for input, it exits once the input has
    /// ended and the guest has been quiet for a second (qemu virtstack).
    Console {
        /// VM name.
        name: VmName,
    },
    /// Print what QEMU (its stderr) and the VM's console said since the VM
    /// was last launched (qemu virtstack).
    Logs {
        /// VM name.
        name: VmName,
        /// Keep printing what they gain, until interrupted or the VM is destroyed.
        #[arg(long, short)]
        follow: bool,
        /// The console of the launch before this one instead.
        #[arg(long)]
        previous: bool,
        /// Print the guest's bytes as they are; by default control
        /// characters (escape sequences a guest could use on your terminal)
        /// are shown escaped.
        #[arg(long)]
        raw: bool,
    },
    /// Run a command of uvmctl's guest agent in a running VM (the test guest,
    /// guest/README.md: e.g. `uvmctl agent web blocks`) and print its answer
    /// lines; exit 1 with the agent's message when it answers ERR (qemu
    /// virtstack).
    Agent {
        /// VM name.
        name: VmName,
        /// Give up waiting for the answer after this long.
        #[arg(long, value_parser = parse_duration, default_value = "3m")]
        timeout: Duration,
        /// Print the agent's answer as it is; by default control characters
        /// are shown escaped.
        #[arg(long)]
        raw: bool,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Write the observed state of VMs as spec YAML (adopting a VM starts here).
    Export {
        /// Only this VM.
        name: Option<VmName>,
    },
    /// What a virtstack can do on this host: resource × operation → disruption.
    Capabilities {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the JSON Schema of a spec document (for yaml-language-server).
    Schema,
    /// Print a shell completion script (e.g. `uvmctl completions bash >
    /// /etc/bash_completion.d/uvmctl`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write a man page per command (uvmctl.1, uvmctl-plan.1, ...) into DIR.
    Man {
        /// Where to write them (made if missing).
        dir: PathBuf,
    },
}

/// Where the QEMU virtstack keeps its VMs and what it may touch. Accepted
/// before or after the subcommand; each falls back to its `UVMCTL_*`
/// variable, then to the config file, then to its default.
#[derive(Args, Clone)]
#[command(next_help_heading = "Host options (before or after the command)")]
struct HostArgs {
    /// Root of per-VM state directories (QMP sockets, launch records)
    /// [default: /run/uvmctl].
    #[arg(long, global = true, env = "UVMCTL_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Host paths (disks, kernels, shares) must lie under one of these after
    /// resolving symlinks; repeatable; in UVMCTL_ALLOW_ROOT, separated by `:`
    /// [default: /var/lib/uvmctl, /var/cache/uvmctl].
    #[arg(
        long = "allow-root",
        global = true,
        env = "UVMCTL_ALLOW_ROOT",
        value_delimiter = ':',
        value_name = "DIR"
    )]
    allow_roots: Vec<PathBuf>,
    /// Acceleration for launched VMs: kvm only works where the CPU shows
    /// vmx/svm [default: auto].
    #[arg(
        long,
        global = true,
        env = "UVMCTL_ACCEL",
        value_name = "ACCEL",
        value_parser = clap::builder::PossibleValuesParser::new(AccelChoice::ALL.map(AccelChoice::as_str))
            .try_map(|s: String| s.parse::<AccelChoice>())
    )]
    accel: Option<AccelChoice>,
    /// The virtstack: `qemu` (QEMU here), `remotevm` (one vmservice
    /// server per VM), `hcs` (Windows' Host Compute Service, through
    /// --hcs-library) or `sim` (a simulator: VMs as records under the state
    /// directory, with qemu's rules; nothing runs) [default: qemu].
    #[arg(
        long,
        global = true,
        env = "UVMCTL_VIRTSTACK",
        value_name = "NAME",
        value_parser = clap::builder::PossibleValuesParser::new(Kind::ALL.map(Kind::as_str))
    )]
    virtstack: Option<String>,
    /// remotevm: where its per-VM records and server sockets live
    /// [default: STATE_DIR/.remotevm].
    #[arg(long, global = true, env = "UVMCTL_REMOTE_DIR", value_name = "DIR")]
    remote_dir: Option<PathBuf>,
    /// remotevm: the vmservice server program, started per VM with
    /// `--ttrpc ADDRESS --name VM` as hcsshim does [default: this uvmctl's
    /// `serve`, on the QEMU virtstack with these host options].
    #[arg(
        long,
        global = true,
        env = "UVMCTL_REMOTE_SERVER",
        value_name = "PROGRAM"
    )]
    remote_server: Option<PathBuf>,
    /// The unprivileged user QEMU and the vsock backend run as (made by
    /// scripts/setup-host); `root` runs them as root, only when asked for
    /// [default: uvmctl-qemu when uvmctl runs as root, else uvmctl's own user].
    #[arg(long, global = true, env = "UVMCTL_QEMU_USER", value_name = "USER")]
    qemu_user: Option<String>,
    /// hcs: the computecore library to load: Windows' own, or elsewhere
    /// the HCS emulator built from hcs-emulator/ (docs/hcs.md)
    /// [default: computecore.dll].
    #[arg(long, global = true, env = "UVMCTL_HCS_LIBRARY", value_name = "FILE")]
    hcs_library: Option<PathBuf>,
    /// hcs: paths on the Windows host (disks, shares, boot files) must lie
    /// under one of these; repeatable; in UVMCTL_HCS_ALLOW_ROOT, separated
    /// by `;` [default: C:/ProgramData/uvmctl].
    #[arg(
        long = "hcs-allow-root",
        global = true,
        env = "UVMCTL_HCS_ALLOW_ROOT",
        value_delimiter = ';',
        value_name = "DIR"
    )]
    hcs_allow_roots: Vec<PathBuf>,
}

impl HostArgs {
    /// Flags and variables, then the config file's `defaults`, then the
    /// built-in defaults.
    fn resolve(self, defaults: HostDefaults) -> anyhow::Result<Host> {
        let accel = self.accel.or(defaults.accel).unwrap_or_default();
        Ok(Host {
            state_dir: self
                .state_dir
                .or(defaults.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            allow_roots: if self.allow_roots.is_empty() {
                defaults.allow_roots
            } else {
                self.allow_roots
            },
            accel,
            virtstack: self
                .virtstack
                .or(defaults.virtstack.map(|v| v.as_str().to_string()))
                .unwrap_or_else(|| Kind::default().as_str().into()),
            remote_dir: self.remote_dir.or(defaults.remote_dir),
            remote_server: self.remote_server.or(defaults.remote_server),
            qemu_user: self.qemu_user.or(defaults.qemu_user),
            hcs_library: self.hcs_library.or(defaults.hcs_library),
            hcs_allow_roots: if self.hcs_allow_roots.is_empty() {
                defaults.hcs_allow_roots
            } else {
                self.hcs_allow_roots
            },
        })
    }
}

/// The host options in force.
struct Host {
    state_dir: PathBuf,
    allow_roots: Vec<PathBuf>,
    accel: AccelChoice,
    virtstack: String,
    remote_dir: Option<PathBuf>,
    remote_server: Option<PathBuf>,
    qemu_user: Option<String>,
    hcs_library: Option<PathBuf>,
    hcs_allow_roots: Vec<PathBuf>,
}

impl Host {
    fn options(&self) -> HostOptions {
        HostOptions {
            state_dir: self.state_dir.clone(),
            allow_roots: self.allow_roots.clone(),
            accel: self.accel,
            qemu_user: self.qemu_user.clone(),
            remote_dir: self.remote_dir.clone(),
            remote_server: self.remote_server.clone(),
            hcs_library: self.hcs_library.clone(),
            hcs_allow_roots: self.hcs_allow_roots.clone(),
        }
    }

    /// The QEMU virtstack, for the commands only it has, as an observer:
    /// they never change a VM's state.
    fn qemu(&self, command: &str) -> anyhow::Result<uvmctl::virtstack::qemu::Qemu> {
        if self.virtstack != Kind::Qemu.as_str() {
            bail!(
                "uvmctl {command} reaches a guest of the qemu virtstack only (not {})",
                self.virtstack
            );
        }
        Ok(virtstack::open::qemu(&self.options(), true)?)
    }

    /// The live virtstack these options name, and the directory its lock
    /// (and a watcher's status file) lives in.
    async fn live(&self, observer: bool) -> anyhow::Result<(Arc<dyn Virtstack>, PathBuf)> {
        let kind: Kind = self.virtstack.parse()?;
        let opened = virtstack::open(kind, &self.options(), observer).await?;
        Ok((opened.vs, opened.lock_dir))
    }
}

/// Specs from a git repository instead of a directory (as Flux's
/// GitRepository): fetched, checked and swapped in whole (README.md,
/// "A fleet from one repository").
#[derive(Args, Clone)]
#[command(next_help_heading = "Specs from git")]
struct GitArgs {
    /// Take the specs from this git repository (any URL git fetches)
    /// instead of DIR.
    #[arg(long, value_name = "URL")]
    git: Option<String>,
    /// The branch or tag of --git to follow: a full ref name
    /// (refs/heads/main, refs/tags/v1) or a bare one, refused when it names
    /// both a branch and a tag.
    #[arg(long, value_name = "REF", default_value = "main", requires = "git")]
    git_ref: String,
    /// The spec directory inside the repository.
    #[arg(long, value_name = "PATH", default_value = ".", requires = "git")]
    git_path: PathBuf,
    /// Put in force only commits SSH-signed by a key of this file, in
    /// git's allowed_signers format (OpenPGP and X.509 signatures are
    /// refused, whatever keyrings the host has).
    #[arg(long, value_name = "FILE", requires = "git")]
    allowed_signers: Option<PathBuf>,
    /// Where the mirror and the checkouts live [default: STATE_DIR/git;
    /// for plan, a temporary directory removed after].
    #[arg(long, value_name = "DIR", requires = "git")]
    git_cache: Option<PathBuf>,
    /// The most the repository's mirror may hold, and one revision's
    /// checkout may take on disk (each file and directory at least 4 KiB),
    /// in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256, requires = "git")]
    git_max_mb: u64,
    /// The longest a fetch may take.
    #[arg(long, value_parser = parse_duration, default_value = "2m", requires = "git")]
    git_timeout: Duration,
}

/// Which of the specs are this host's (README.md, "A fleet from one
/// repository"). Names and MACs stay unique over every spec.
#[derive(Args, Clone)]
#[command(next_help_heading = "Placement")]
struct PlacementArgs {
    /// Only the VMs whose labels match (kubectl's syntax: key=value,
    /// key!=value, key, !key, joined by commas); the others are neither
    /// created nor kept here.
    #[arg(long, short = 'l', value_name = "SELECTOR")]
    selector: Option<uvmctl::spec::Selector>,
    /// Only the VMs labelled `host: NAME` [NAME default: this host's name].
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
    for_host: Option<String>,
    /// Only the VMs whose spec file is under this directory of the specs
    /// (e.g. hosts/web-01).
    #[arg(long, value_name = "PATH")]
    placement_path: Option<PathBuf>,
}

impl PlacementArgs {
    fn placement(&self) -> anyhow::Result<Option<uvmctl::spec::Placement>> {
        if self.selector.is_none() && self.for_host.is_none() && self.placement_path.is_none() {
            return Ok(None);
        }
        let mut selector = self.selector.clone().unwrap_or_default();
        if let Some(name) = &self.for_host {
            let name = if name.is_empty() {
                nix::unistd::gethostname()
                    .context("cannot read this host's name for --for-host")?
                    .to_string_lossy()
                    .into_owned()
            } else {
                name.clone()
            };
            let one: uvmctl::spec::Selector = format!("{}={name}", uvmctl::spec::HOST_LABEL)
                .parse()
                .context("--for-host")?;
            selector = selector.and(one);
        }
        if let Some(p) = &self.placement_path {
            uvmctl::spec::Placement::check_path(p).map_err(anyhow::Error::msg)?;
        }
        Ok(Some(uvmctl::spec::Placement {
            selector,
            path: self.placement_path.clone(),
        }))
    }
}

/// A temporary directory, removed when dropped.
struct TempCache(PathBuf);

impl Drop for TempCache {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new directory of this process's own under the temporary directory:
/// made, never found (a name planted there, a link among them, is refused
/// by `mkdir` itself rather than followed).
fn temp_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!("{prefix}-{}-{nanos}-{attempt}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot make {}", dir.display()));
            }
        }
    }
    bail!("cannot make a temporary directory under {}", base.display())
}

impl GitArgs {
    /// The cache apply and watch share: --git-cache, else STATE_DIR/git.
    fn cache(&self, host: &Host) -> PathBuf {
        self.git_cache
            .clone()
            .unwrap_or_else(|| host.state_dir.join("git"))
    }

    fn source(
        &self,
        cache: PathBuf,
        placement: Option<uvmctl::spec::Placement>,
    ) -> anyhow::Result<Option<uvmctl::source::GitSource>> {
        let Some(url) = &self.git else {
            return Ok(None);
        };
        Ok(Some(uvmctl::source::GitSource::new(
            uvmctl::source::GitOptions {
                url: url.clone(),
                reference: self.git_ref.clone(),
                path: self.git_path.clone(),
                cache,
                allowed_signers: self.allowed_signers.clone(),
                max_bytes: self.git_max_mb.saturating_mul(1 << 20),
                placement,
                fetch_timeout: self.git_timeout,
            },
        )?))
    }
}

/// The spec directory a command reads: DIR, or the revision of --git put
/// in force (fetched first). For `plan` without --git-cache the cache is
/// temporary, so a plan never changes what a watcher has in force.
async fn spec_dir(
    dir: &Option<PathBuf>,
    git: &GitArgs,
    placement: &PlacementArgs,
    host: &Host,
    temporary: bool,
) -> anyhow::Result<(PathBuf, Option<TempCache>)> {
    let (cache, guard) = match (&git.git_cache, temporary) {
        (Some(c), _) => (c.clone(), None),
        (None, true) => {
            let c = temp_dir("uvmctl-git")?;
            (c.clone(), Some(TempCache(c)))
        }
        (None, false) => (git.cache(host), None),
    };
    match (dir, git.source(cache, placement.placement()?)?) {
        (_, Some(source)) => {
            let synced = source.sync().await?;
            eprintln!("specs: {} {}", source.options().url, synced.revision());
            Ok((source.spec_dir(), guard))
        }
        (Some(d), None) => Ok((d.clone(), None)),
        (None, None) => bail!("give a spec directory or --git URL"),
    }
}

#[derive(Args)]
struct PlanArgs {
    /// Directory of spec files (searched recursively), or one file.
    #[arg(required_unless_present = "git", conflicts_with = "git")]
    dir: Option<PathBuf>,
    /// Plan against observed state recorded from a host (the spec shape
    /// `uvmctl export` writes) instead of the live QEMU virtstack.
    #[arg(long, value_name = "FILE")]
    observed: Option<PathBuf>,
    #[command(flatten)]
    common: PlanCommon,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Also show a unified diff of canonical YAML, observed → desired, per
    /// VM (text output only).
    #[arg(long)]
    diff: bool,
    /// With --virtstack hcs: print, instead of the plan, the HCS calls
    /// applying it would make (create documents, ModifySettingRequests,
    /// lifecycle calls), in order per VM, as JSON (docs/hcs.md). Needs no
    /// HCS with --observed.
    #[arg(long, conflicts_with_all = ["output", "diff", "out"])]
    hcs_requests: bool,
    /// Exit 2 when there are changes (0 when none).
    #[arg(long)]
    detailed_exitcode: bool,
    /// Also save the plan, with what it was computed from, for `uvmctl
    /// apply FILE` to apply exactly it (docs/plan-json.md, "Saved plans").
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["observed", "git", "selector", "for_host", "placement_path"]
    )]
    out: Option<PathBuf>,
    // Last: their help headings would take the options after them.
    #[command(flatten)]
    git: GitArgs,
    #[command(flatten)]
    placement: PlacementArgs,
}

#[derive(Args)]
struct PlanCommon {
    /// Only these VMs (repeatable): e.g. the one a watcher holds a change
    /// for. The others are neither planned nor pruned.
    #[arg(long, value_name = "NAME")]
    only: Vec<VmName>,
    /// Remove managed VMs that have no spec (never while any spec fails to
    /// load, never every VM of this host without --allow-empty).
    #[arg(long)]
    prune: bool,
    /// With --prune: allow a prune that removes every VM of this host
    /// (otherwise refused, exit 3: an empty or misspelt selection is more
    /// likely a mistake than an intent).
    #[arg(long, alias = "allow-empty-prune", requires = "prune")]
    allow_empty: bool,
    /// With --prune: refuse (exit 3) a prune that removes more than this
    /// many VMs, or this share of this host's VMs (`25%`).
    #[arg(long, value_name = "N|P%", requires = "prune")]
    max_prune: Option<uvmctl::plan::prune::PruneLimit>,
    /// Exit 3 when any change is more disruptive than this.
    #[arg(long, value_enum, value_name = "CLASS")]
    max_disruption: Option<MaxDisruption>,
    /// Color text output.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    color: Color,
}

#[derive(Args)]
struct WatchArgs {
    /// Directory of spec files (searched recursively), or one file.
    #[arg(required_unless_present = "git", conflicts_with = "git")]
    dir: Option<PathBuf>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics,
    /// e.g. 127.0.0.1:9464 (README.md, "A fleet from one repository").
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// With --git: fetch this often (SIGHUP fetches and reconciles at once).
    #[arg(long, value_parser = parse_duration, default_value = "1m", requires = "git")]
    git_interval: Duration,
    /// Rescan the specs and re-observe every VM this often (30s, 5m, ...).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    resync: Duration,
    /// Quiet time per file before its change counts.
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    debounce: Duration,
    /// Hold (do not execute) changes more disruptive than this.
    #[arg(long, value_enum, value_name = "CLASS", default_value_t = MaxDisruption::Live)]
    max_disruption: MaxDisruption,
    /// Execute nothing: drift, spec changes, crashes and prunes are
    /// observed, planned and reported (logs, `uvmctl status`) as held.
    #[arg(long)]
    detect_only: bool,
    /// Remove managed VMs whose spec is gone, once a second scan confirms it;
    /// never while any spec fails to load, never every VM of this host
    /// without --allow-empty.
    #[arg(long)]
    prune: bool,
    /// With --prune: allow a prune that removes every VM of this host.
    #[arg(long, requires = "prune")]
    allow_empty: bool,
    /// With --prune: hold a prune that removes more than this many VMs, or
    /// this share of this host's VMs (`25%`).
    #[arg(long, value_name = "N|P%", requires = "prune")]
    max_prune: Option<uvmctl::plan::prune::PruneLimit>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// How long a reconcile waits for another uvmctl holding the state
    /// directory before trying again later.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    lock_timeout: Duration,
    /// Longest a single VM's reconcile may take.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    reconcile_deadline: Duration,
    /// First retry delay after a failure or a crash; doubles per failure.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    backoff: Duration,
    /// Longest retry delay.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    backoff_cap: Duration,
    // Last: their help headings would take the options after them.
    #[command(flatten)]
    git: GitArgs,
    #[command(flatten)]
    placement: PlacementArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// hcsshim's invocation: listen on this unix socket, then close standard
    /// output (hcsshim waits for that before it connects).
    #[arg(
        long,
        value_name = "ADDRESS",
        required_unless_present = "listen",
        conflicts_with = "listen"
    )]
    ttrpc: Option<String>,
    /// Listen on `unix:PATH` (by hand, or from a service manager).
    #[arg(long, value_name = "unix:PATH")]
    listen: Option<String>,
    /// The VM this server serves [default: the socket's file stem, if it is a
    /// valid VM name, else `vm`].
    #[arg(long)]
    name: Option<VmName>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
struct ApplyArgs {
    /// Directory of spec files (searched recursively), or one file; or a
    /// plan saved by `plan --out`, applied only if nothing it was computed
    /// from has changed (else exit 5).
    #[arg(required_unless_present = "git", conflicts_with = "git")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    common: PlanCommon,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// Recreate VMs even when their spec's policy does not allow it.
    #[arg(long)]
    allow_recreate: bool,
    /// Wait this long (30s, 2m; a bare number is seconds) for another apply
    /// holding the state directory; then exit 4.
    #[arg(long, value_parser = parse_duration, default_value = "30")]
    lock_timeout: Duration,
    /// Wait up to this long (120s, 2m; a bare number is seconds) for each VM
    /// meant to run to boot (its guest opens the uvmctl.agent port; guests
    /// without that agent never do), showing progress.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    wait_ready: Option<Duration>,
    // Last: their help headings would take the options after them.
    #[command(flatten)]
    git: GitArgs,
    #[command(flatten)]
    placement: PlacementArgs,
}

/// `100ms`, `30s`, `5m`, `1h`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    num.parse::<f64>()
        .ok()
        .map(|v| v * scale)
        .filter(|v| v.is_finite() && *v >= 0.0 && *v < 1e9)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a duration (such as 100ms, 30s, 5m)"))
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum MaxDisruption {
    Live,
    Restart,
    Recreate,
}

impl From<MaxDisruption> for Disruption {
    fn from(m: MaxDisruption) -> Self {
        match m {
            MaxDisruption::Live => Disruption::Live,
            MaxDisruption::Restart => Disruption::Restart,
            MaxDisruption::Recreate => Disruption::Recreate,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Color {
    Auto,
    Always,
    Never,
}

impl Color {
    fn style(self) -> render::Style {
        render::Style {
            color: match self {
                Color::Always => true,
                Color::Never => false,
                Color::Auto => {
                    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
                }
            },
        }
    }
}

const EXIT_ERROR: u8 = 1;
const EXIT_CHANGES: u8 = 2;
/// A policy stop: above --max-disruption, a recreate not allowed, a prune refused.
const EXIT_POLICY: u8 = 3;
const EXIT_LOCKED: u8 = 4;
const EXIT_STALE_PLAN: u8 = 5;

#[tokio::main]
async fn main() -> ExitCode {
    // Whatever uvmctl (or a QEMU it starts) creates without an explicit
    // mode is root's alone, whatever umask the caller had.
    uvmctl::hostfs::private_umask();
    uvmctl::hostfs::raise_nofile_limit();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version are answers (0); every usage error exits 1, as
        // Terraform and Flux do: 2 means "changes pending" to CI.
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_ERROR } else { 0 });
        }
    };
    // What is still buffered goes out now, where its error can be seen.
    let ran = run(cli).await.and_then(|code| {
        Ok(std::io::stdout()
            .flush()
            .map_err(StdoutError)
            .map(|()| code)?)
    });
    match ran {
        Ok(code) => ExitCode::from(code),
        // The reader went away (`| head`, `| true`): as ripgrep does, end
        // quietly and successfully; what was asked for was only output.
        Err(e) if closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(LockError::Held { .. }) = e.downcast_ref::<LockError>() {
                eprintln!("error: {e:#}");
                return ExitCode::from(EXIT_LOCKED);
            }
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// A write to standard output failed (only these may end a command quietly:
/// a broken pipe anywhere else, a QMP socket say, is an error).
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output: {0}")]
struct StdoutError(std::io::Error);

/// Whether `e` is a write to a standard output nobody reads any more.
fn closed_stdout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<StdoutError>()
        .is_some_and(|StdoutError(io)| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Waits for the state directory's lock off the async workers (it polls).
async fn lock(root: PathBuf, timeout: Duration, what: String) -> anyhow::Result<StateLock> {
    Ok(tokio::task::spawn_blocking(move || StateLock::acquire(&root, timeout, &what)).await??)
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    // Commands that touch no host never read the config file, so a bad
    // one cannot keep an operator from `validate` or `completions`.
    let hostless = matches!(
        cli.command,
        Command::Validate { .. }
            | Command::Schema
            | Command::Completions { .. }
            | Command::Man { .. }
    );
    let defaults = if hostless {
        HostDefaults::default()
    } else {
        uvmctl::config::load(cli.config.as_deref())?
    };
    let host = &cli.host.resolve(defaults)?;
    match cli.command {
        Command::Validate { dir, output } => validate(dir, output).await,
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "uvmctl", &mut out);
            out!("{}", String::from_utf8_lossy(&out))?;
            Ok(0)
        }
        Command::Man { dir } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            Ok(0)
        }
        Command::Schema => {
            outln!("{}", serde_json::to_string_pretty(&spec::json_schema())?)?;
            Ok(0)
        }
        Command::Plan(args) => run_plan(args, host).await,
        Command::Apply(args) => run_apply(args, host).await,
        Command::Watch(args) => run_watch(args, host).await,
        Command::Serve(args) => run_serve(args, host).await,
        Command::Status { output } => {
            let (vs, dir) = host.live(true).await?;
            let watch = uvmctl::watch::status::read(&dir);
            status(vs.as_ref(), output, watch).await
        }
        Command::Destroy { name, lock_timeout } => {
            let (vs, root) = host.live(false).await?;
            let _lock = lock(root, lock_timeout, "uvmctl destroy".into()).await?;
            vs.destroy(&name).await?;
            eprintln!("{name}: destroyed");
            Ok(0)
        }
        Command::Wait { name, timeout } => {
            let (vs, _) = host.live(false).await?;
            if !vs.wait(&name, timeout).await? {
                eprintln!(
                    "{name}: still running after {:?}",
                    timeout.unwrap_or_default()
                );
                return Ok(2);
            }
            // A VM destroyed meanwhile stopped as asked; one still listed
            // says why it stopped.
            match vs.observe(&name).await.ok().and_then(|o| o.exit_error) {
                Some(err) => {
                    eprintln!("{name}: {err}");
                    Ok(1)
                }
                None => {
                    eprintln!("{name}: exited");
                    Ok(0)
                }
            }
        }
        Command::Console { name } => run_console(&name, host).await,
        Command::Logs {
            name,
            follow,
            previous,
            raw,
        } => run_logs(&name, follow, previous, raw, host).await,
        Command::Agent {
            name,
            timeout,
            raw,
            command,
        } => {
            let qemu = host.qemu("agent")?;
            for line in qemu.agent(&name, &command, timeout).await? {
                if raw {
                    outln!("{line}")?;
                } else {
                    outln!("{}", uvmctl::escape::escaped(&line))?;
                }
            }
            Ok(0)
        }
        Command::Export { name } => {
            let (vs, _) = host.live(true).await?;
            let (yaml, skipped) = uvmctl::inspect::export(vs.as_ref(), name.as_ref()).await?;
            out!("{yaml}")?;
            for (vm, why) in &skipped {
                eprintln!("{vm}: not exported: cannot be observed ({why})");
            }
            Ok(if skipped.is_empty() { 0 } else { EXIT_ERROR })
        }
        Command::Capabilities { output } => {
            let virtstack = &host.virtstack;
            let caps = Capabilities::profile(virtstack).with_context(|| {
                format!(
                    "no capability profile for virtstack {virtstack:?} (known: {})",
                    Kind::names()
                )
            })?;
            match output {
                Output::Json => outln!("{}", serde_json::to_string_pretty(&caps)?)?,
                Output::Text => out!("{}", caps.markdown_table())?,
            }
            Ok(0)
        }
    }
}

async fn validate(dir: PathBuf, output: Output) -> anyhow::Result<u8> {
    let mut loaded = reconcile::load(dir.clone(), None).await;
    if loaded.errors.is_empty() && loaded.desired.vms.is_empty() {
        // Nothing checked is not "valid" (issue 30: `validate emptydir`).
        loaded.errors.push(spec::SpecError::whole_file(
            &dir,
            "no VM spec found (files ending in .yaml or .yml, one VM a document)",
        ));
    }
    if output == Output::Json {
        let doc = serde_json::json!({
            "formatVersion": 1,
            "valid": loaded.desired.vms.keys().collect::<Vec<_>>(),
            "invalid": &loaded.desired.unknown,
            "errors": &loaded.errors,
        });
        outln!("{}", serde_json::to_string_pretty(&doc)?)?;
        return Ok(if loaded.errors.is_empty() {
            0
        } else {
            EXIT_ERROR
        });
    }
    for e in &loaded.errors {
        eprintln!("{e}");
    }
    let n = loaded.desired.vms.len();
    let s = |n: usize| if n == 1 { "" } else { "s" };
    if loaded.errors.is_empty() {
        outln!("{n} VM spec{} valid", s(n))?;
        Ok(0)
    } else {
        let bad = loaded.desired.unknown.len();
        eprintln!(
            "{} error{}; {n} VM spec{} valid, {bad} invalid",
            loaded.errors.len(),
            s(loaded.errors.len()),
            s(n)
        );
        Ok(EXIT_ERROR)
    }
}

/// What to plan against: a recording, or the live virtstack (looking only).
async fn observer(observed: Option<&PathBuf>, host: &Host) -> anyhow::Result<Arc<dyn Observe>> {
    Ok(match observed {
        Some(path) => Arc::new(
            Recorded::load(path, &host.virtstack)
                .with_context(|| format!("cannot read observed state from {}", path.display()))?,
        ),
        None => {
            let (vs, _) = host.live(true).await?;
            let vs: Arc<dyn Observe> = vs;
            vs
        }
    })
}

fn print_errors(loaded: &Loaded) {
    for e in &loaded.errors {
        eprintln!("{e}");
    }
    if !loaded.errors_elsewhere.is_empty() {
        eprintln!(
            "{} spec error(s) in files whose VMs are all other hosts': not this host's concern (uvmctl validate lists them)",
            loaded.errors_elsewhere.len()
        );
    }
}

fn plan_options(common: &PlanCommon) -> PlanOptions {
    PlanOptions {
        prune: common.prune,
        guard: uvmctl::plan::prune::PruneGuard {
            allow_empty: common.allow_empty,
            max_prune: common.max_prune,
        },
    }
}

fn limits(common: &PlanCommon) -> Limits {
    Limits {
        max_disruption: common.max_disruption.map(Disruption::from),
        ..Limits::default()
    }
}

fn print_refused(refused: &[uvmctl::plan::Refused]) {
    for r in refused {
        eprintln!("{r}");
    }
}

async fn run_plan(args: PlanArgs, host: &Host) -> anyhow::Result<u8> {
    if args.diff && args.output == Output::Json {
        bail!("--diff shows a text diff; it does not go with --output json");
    }
    if args.hcs_requests && host.virtstack != Kind::Hcs.as_str() {
        bail!(
            "--hcs-requests shows what the hcs virtstack sends: give --virtstack hcs (not {})",
            host.virtstack
        );
    }
    let (dir, _cache) = spec_dir(&args.dir, &args.git, &args.placement, host, true).await?;
    let live = match &args.observed {
        None => Some(host.live(true).await?.0),
        Some(_) => None,
    };
    let vs: Arc<dyn Observe> = match (&live, &args.observed) {
        (Some(live), _) => live.clone(),
        (None, path) => observer(path.as_ref(), host).await?,
    };
    let planned = reconcile::plan_dir(
        dir.clone(),
        args.placement.placement()?,
        vs.as_ref(),
        &plan_options(&args.common),
        &args.common.only,
    )
    .await?;
    let style = args.common.color.style();
    let errors = &planned.loaded.errors;
    if args.hcs_requests {
        print_errors(&planned.loaded);
        return hcs_requests(&planned, host).await;
    }
    // The checks apply makes before anything changes (images another VM
    // has; on a live host also host paths under trusted roots, image
    // formats, listeners): a plan never promises what apply would refuse.
    let refused = planned.refused(live.as_deref());
    match args.output {
        Output::Json => out!("{}", render::json(&planned.plan, errors, &refused))?,
        Output::Text => {
            print_errors(&planned.loaded);
            if args.diff {
                out!(
                    "{}",
                    render::diff(
                        &planned.plan,
                        &planned.loaded.desired,
                        &planned.observed,
                        &style
                    )
                )?;
            }
            out!("{}", render::text(&planned.plan, &style))?;
        }
    }
    let text = args.output == Output::Text;
    // A plan that apply would not run as it is is not saved: say so.
    let not_saved = || {
        if let Some(out) = &args.out {
            eprintln!("the plan was not saved to {}", out.display());
        }
    };
    if !errors.is_empty() {
        if text {
            eprintln!(
                "{} spec error(s): the VMs they concern were not planned",
                errors.len()
            );
        }
        not_saved();
        return Ok(EXIT_ERROR);
    }
    if planned.unobserved() > 0 {
        if text {
            eprintln!(
                "{} VM(s) could not be observed and were not planned",
                planned.unobserved()
            );
        }
        not_saved();
        return Ok(EXIT_ERROR);
    }
    if !refused.is_empty() {
        if text {
            print_refused(&refused);
            eprintln!(
                "{} VM(s) would be refused by apply before anything changed",
                refused.len()
            );
        }
        not_saved();
        return Ok(EXIT_ERROR);
    }
    if let Some(refused) = &planned.plan.prune_refused {
        eprintln!("{refused}");
        not_saved();
        return Ok(EXIT_POLICY);
    }
    if let (Some(out), Some(live)) = (&args.out, &live) {
        let dir = std::path::absolute(&dir)
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        let saved = saved_plan(&dir, &planned, live.as_ref(), &args.common);
        let json = serde_json::to_string_pretty(&saved)? + "\n";
        uvmctl::hostfs::replace_file(out, json.as_bytes(), 0o600)
            .with_context(|| format!("cannot write {}", out.display()))?;
        if text {
            eprintln!(
                "Saved the plan to {}: `uvmctl apply {}` applies exactly it.",
                out.display(),
                out.display()
            );
        }
    }
    if let Some((limit, max)) = planned.exceeds(&limits(&args.common)) {
        eprintln!("changes exceed --max-disruption {limit}: this plan needs {max}");
        return Ok(EXIT_POLICY);
    }
    if args.detailed_exitcode && planned.plan.has_changes() {
        return Ok(EXIT_CHANGES);
    }
    Ok(0)
}

/// `plan --hcs-requests`: the plan applied through the hcs virtstack over
/// a recorder seeded with what was observed; its calls printed per VM.
async fn hcs_requests(planned: &reconcile::Planned, host: &Host) -> anyhow::Result<u8> {
    use uvmctl::virtstack::hcs::{Hcs, HcsRecord, dry_run::Recorder, system_id};
    let recorder = Arc::new(Recorder::new());
    let records = TempCache(temp_dir("uvmctl-hcs")?);
    let hcs = Hcs::new(recorder.clone(), &records.0, &host.hcs_allow_roots);
    Hcs::ensure_dir(&records.0).context("cannot make the dry run's records")?;
    for (name, vm) in &planned.observed.vms {
        let Ok(name) = VmName::new(name) else {
            continue;
        };
        let state = match vm.state {
            uvmctl::vm::State::Created => Some("Created"),
            uvmctl::vm::State::Running => Some("Running"),
            uvmctl::vm::State::Paused => Some("Paused"),
            _ => None,
        };
        if let Some(state) = state {
            recorder.seed(&system_id(&name), state);
        }
        // A saved guest is restored from where this host keeps it.
        let saved =
            (vm.state == uvmctl::vm::State::Saved).then(|| Hcs::save_file(&host.state_dir, &name));
        let rec = HcsRecord {
            config: vm.config.clone(),
            saved,
        };
        hcs.adopt(&name, &rec)?;
    }
    let opts = ApplyOptions {
        allow_recreate: true,
        ..ApplyOptions::default()
    };
    let quiet: apply::Progress = Arc::new(|_: &str, _: &str| {});
    let outcomes = apply::apply(
        &planned.plan,
        &planned.loaded.desired,
        Arc::new(hcs),
        opts,
        quiet,
    )
    .await;
    // VMs are applied side by side: each VM's calls in its own order.
    let mut calls = recorder.calls();
    calls.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    outln!("{}", serde_json::to_string_pretty(&calls)?)?;
    let mut failed = false;
    for o in outcomes {
        if let Err(e) = o.result {
            eprintln!("{}: {}", o.name, uvmctl::vm::Chain(&e));
            failed = true;
        }
    }
    if planned.unobserved() > 0 {
        eprintln!(
            "{} VM(s) could not be observed and were not planned",
            planned.unobserved()
        );
    }
    Ok(
        if failed || !planned.loaded.errors.is_empty() || planned.unobserved() > 0 {
            EXIT_ERROR
        } else {
            0
        },
    )
}

/// Asks on the terminal; only `yes` is yes.
fn confirmed() -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("refusing to apply without --yes: standard input is not a terminal to ask on");
    }
    eprint!("Apply these changes? Only 'yes' is accepted: ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

/// The saved form of `planned`, as computed on `vs` with `common`'s options.
fn saved_plan(
    dir: &std::path::Path,
    planned: &reconcile::Planned,
    vs: &dyn Virtstack,
    common: &PlanCommon,
) -> SavedPlan {
    let only: Vec<String> = common.only.iter().map(ToString::to_string).collect();
    SavedPlan::new(
        dir,
        &planned.plan,
        &planned.loaded.desired,
        &planned.observed,
        vs.capabilities(),
        &plan_options(common),
        &only,
    )
}

/// The saved plan at `path`, when it is one (a spec file or directory is not).
fn read_saved(path: &std::path::Path) -> anyhow::Result<Option<SavedPlan>> {
    use std::io::Read;
    if !path.is_file() {
        return Ok(None);
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SAVED_PLAN_BYTES + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", path.display()))?;
    let looks_saved = bytes.trim_ascii_start().starts_with(b"{")
        && bytes.windows(17).any(|w| w == b"\"uvmctlSavedPlan\"");
    if !looks_saved {
        return Ok(None);
    }
    if bytes.len() as u64 > MAX_SAVED_PLAN_BYTES {
        bail!("{}: larger than a saved plan can be", path.display());
    }
    Ok(Some(SavedPlan::parse(path, &bytes)?))
}

async fn run_apply(mut args: ApplyArgs, host: &Host) -> anyhow::Result<u8> {
    let (dir, _cache) = spec_dir(&args.dir, &args.git, &args.placement, host, false).await?;
    let saved = match &args.git.git {
        Some(_) => None,
        None => read_saved(&dir)?,
    };
    let mut dir = dir;
    if let Some(s) = &saved {
        // The plan's own options are what it was computed with.
        if args.common.prune
            || args.common.allow_empty
            || args.common.max_prune.is_some()
            || !args.common.only.is_empty()
        {
            bail!("a saved plan carries its own --only and --prune; give neither with it");
        }
        if args.placement.placement()?.is_some() {
            bail!(
                "a saved plan is made without placement; give no --selector, --for-host or --placement-path with it"
            );
        }
        args.common.prune = s.prune;
        args.common.allow_empty = s.allow_empty;
        args.common.max_prune = s.max_prune;
        args.common.only = s
            .only
            .iter()
            .map(|n| VmName::new(n))
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: a VM name in --only is not valid", dir.display()))?;
        dir = s.dir.clone();
    }
    // Specs first: a directory that does not load changes nothing and
    // waits for no lock.
    let loaded = reconcile::load(dir.clone(), args.placement.placement()?).await;
    if saved.is_some() && !loaded.errors.is_empty() {
        // A saved plan is only written from specs that load: these changed.
        // Their errors are not shown, since the directory is the file's
        // word, and a tampered file could name one whose contents the
        // errors would echo.
        eprintln!(
            "{}: the specs no longer load ({} error(s)); the saved plan is stale and nothing was applied: plan again",
            dir.display(),
            loaded.errors.len()
        );
        return Ok(EXIT_STALE_PLAN);
    }
    if !loaded.errors.is_empty() {
        print_errors(&loaded);
        bail!("{} spec error(s); nothing was applied", loaded.errors.len());
    }
    let (vs, root) = host.live(false).await?;
    let what = format!("uvmctl apply {}", dir.display());
    let _lock = lock(root, args.lock_timeout, what).await?;

    let observed = reconcile::observe_all(vs.as_ref()).await?;
    let planned = match reconcile::Planned::new(
        loaded,
        observed,
        vs.as_ref(),
        &plan_options(&args.common),
        &args.common.only,
    ) {
        Ok(p) => p,
        // A VM the saved plan was made for is gone since: stale, not a typo.
        Err(e) if saved.is_some() => {
            eprintln!("{e}; the saved plan is stale and nothing was applied: plan again");
            return Ok(EXIT_STALE_PLAN);
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(s) = &saved {
        let stale = s.stale(&saved_plan(&dir, &planned, vs.as_ref(), &args.common));
        if !stale.is_empty() {
            for why in &stale {
                eprintln!("{why}");
            }
            eprintln!(
                "the saved plan is stale ({} difference(s)); nothing was applied: plan again",
                stale.len()
            );
            return Ok(EXIT_STALE_PLAN);
        }
    }
    // A reader gone before the plan is shown: nothing is applied, and
    // that is an error, not a quiet end.
    if let Err(e) = out!(
        "{}",
        render::text(&planned.plan, &args.common.color.style())
    ) {
        bail!("cannot show the plan ({e}); nothing was applied");
    }
    if let Some(refused) = &planned.plan.prune_refused {
        eprintln!("{refused}; nothing was applied");
        return Ok(EXIT_POLICY);
    }
    if !planned.plan.has_changes() {
        // A VM that could not be observed is not "no changes": 1, as plan.
        return Ok(if planned.unobserved() == 0 {
            0
        } else {
            EXIT_ERROR
        });
    }
    let limits = Limits {
        allow_recreate: args.allow_recreate,
        ..limits(&args.common)
    };
    if let Some((limit, max)) = planned.exceeds(&limits) {
        eprintln!(
            "changes exceed --max-disruption {limit}: this plan needs {max}; nothing was applied"
        );
        return Ok(EXIT_POLICY);
    }
    let refused = planned.recreates_refused(&limits);
    if !refused.is_empty() {
        eprintln!(
            "{} must be recreated, which {} spec's policy.allowRecreate does not allow; \
             give --allow-recreate to recreate anyway; nothing was applied",
            refused.join(", "),
            if refused.len() == 1 { "its" } else { "their" }
        );
        return Ok(EXIT_POLICY);
    }
    // Every host path of every VM that will be built is checked before anything changes.
    let refused = planned.refused(Some(vs.as_ref()));
    if !refused.is_empty() {
        print_refused(&refused);
        bail!("{} VM(s) refused; nothing was applied", refused.len());
    }
    if !args.yes && !confirmed()? {
        eprintln!("Apply cancelled.");
        return Ok(EXIT_ERROR);
    }
    let started = std::time::Instant::now();
    let progress: apply::Progress = Arc::new(move |vm: &str, msg: &str| {
        eprintln!("[{:>6.1}s] {vm}: {msg}", started.elapsed().as_secs_f64());
    });
    // Ctrl+C: every VM finishes the step in flight and stops, and the
    // summary says where each was left; a second Ctrl+C exits at once.
    static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let interrupts = tokio::spawn(async {
        use std::sync::atomic::Ordering;
        while tokio::signal::ctrl_c().await.is_ok() {
            if INTERRUPTED.swap(true, Ordering::Relaxed) {
                eprintln!("interrupted again: exiting now, steps in flight abandoned");
                std::process::exit(130);
            }
            eprintln!(
                "interrupted: each VM stops after the step in flight (Ctrl+C again exits at once)"
            );
        }
    });
    let opts = ApplyOptions {
        allow_recreate: args.allow_recreate,
        wait_ready: args.wait_ready,
        interrupt: Some(&INTERRUPTED),
    };
    let applied = planned.apply(vs, opts, progress).await;
    interrupts.abort();
    eprintln!("{applied}");
    if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        return Ok(130);
    }
    Ok(if applied.converged() { 0 } else { EXIT_ERROR })
}

async fn status(
    vs: &dyn Virtstack,
    output: Output,
    watch: Option<(uvmctl::watch::status::WatchStatus, bool)>,
) -> anyhow::Result<u8> {
    let mut rows = uvmctl::inspect::status(vs).await?;
    if let Some((w, running)) = &watch {
        uvmctl::inspect::add_watch(&mut rows, w, *running);
    }
    match output {
        Output::Json => {
            let doc = uvmctl::inspect::StatusDoc::new(rows, watch.as_ref().map(|(w, r)| (w, *r)));
            outln!("{}", serde_json::to_string_pretty(&doc)?)?;
        }
        Output::Text => {
            if rows.is_empty() {
                outln!("No VMs on virtstack {}.", vs.name())?;
            } else {
                out!("{}", uvmctl::inspect::status_table(&rows))?;
            }
            if let Some((w, running)) = &watch {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let present = |vm: &str| rows.iter().any(|r| r.name == vm);
                out!(
                    "{}",
                    uvmctl::inspect::watch_section(w, *running, now, &present)
                )?;
            }
        }
    }
    Ok(0)
}

async fn run_serve(args: ServeArgs, host: &Host) -> anyhow::Result<u8> {
    let path = match (&args.ttrpc, &args.listen) {
        (Some(a), _) => PathBuf::from(a.strip_prefix("unix://").unwrap_or(a)),
        (None, Some(l)) => match l.strip_prefix("unix:") {
            Some(p) => PathBuf::from(p.trim_start_matches("//")),
            None => bail!("--listen {l:?}: only unix:PATH is supported"),
        },
        (None, None) => bail!("--ttrpc or --listen is needed"),
    };
    let name = match args.name {
        Some(n) => n,
        None => path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| VmName::new(s).ok())
            .unwrap_or(VmName::new("vm")?),
    };
    let vs = virtstack::open(Kind::Qemu, &host.options(), false)
        .await?
        .vs;
    let serving = uvmctl::vmservice::Serving::start(vs, name.clone(), &path).await?;
    eprintln!("uvmctl serve: VM {name} on {}", path.display());
    if args.ttrpc.is_some() {
        // hcsshim connects once our standard output closes.
        let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
        nix::unistd::dup2_stdout(&null)?;
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        () = serving.quit_asked() => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    serving.shutdown().await;
    Ok(0)
}

async fn run_console(name: &VmName, host: &Host) -> anyhow::Result<u8> {
    use uvmctl::virtstack::qemu::guest::{self, RelayEnd};
    let qemu = host.qemu("console")?;
    let console = qemu.console(name).await?;
    let stdin = std::io::stdin();
    let raw = if stdin.is_terminal() {
        eprint!("Connected to the console of {name}; Ctrl-] detaches.\r\n");
        Some(RawTerminal::enter(&stdin)?)
    } else {
        None
    };
    // A thread of its own: a read of a terminal blocks, and tokio's stdin
    // would make the runtime wait for it at exit.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin().lock();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let detach = raw.as_ref().map(|_| guest::DETACH);
    let ended = guest::relay(console, rx, &mut tokio::io::stdout(), detach).await;
    drop(raw);
    match ended {
        Ok(RelayEnd::Detached) => eprintln!("\ndetached from {name}"),
        Ok(RelayEnd::InputClosed) => {}
        Ok(RelayEnd::ConsoleClosed) => eprintln!("\n{name}: its console closed (the VM stopped)"),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Err(StdoutError(e).into()),
        Err(e) => bail!("{name}: console: {e}"),
    }
    Ok(0)
}

/// The terminal in raw mode (keys reach the guest as typed, Ctrl-C too),
/// restored when dropped.
struct RawTerminal {
    fd: std::os::fd::OwnedFd,
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    fn enter(stdin: &std::io::Stdin) -> anyhow::Result<Self> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        use std::os::fd::AsFd;
        let fd = stdin.as_fd().try_clone_to_owned()?;
        let saved = tcgetattr(&fd).context("cannot read the terminal's settings")?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&fd, SetArg::TCSANOW, &raw).context("cannot put the terminal in raw mode")?;
        Ok(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ =
            nix::sys::termios::tcsetattr(&self.fd, nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

async fn run_logs(
    name: &VmName,
    follow: bool,
    previous: bool,
    raw: bool,
    host: &Host,
) -> anyhow::Result<u8> {
    let qemu = host.qemu("logs")?;
    let logs = qemu.logs(name, previous)?;
    if previous && !follow && logs.iter().all(|l| !l.path.exists()) {
        // Nothing printed would read as an empty console.
        eprintln!("{name}: no console of a launch before this one is kept");
        return Ok(0);
    }
    let mut printer = uvmctl::virtstack::qemu::guest::LogPrinter::new(&logs).raw(raw);
    let print = |printer: &mut uvmctl::virtstack::qemu::guest::LogPrinter| -> anyhow::Result<()> {
        match printer.print_new(&mut std::io::stdout().lock()) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutError(e).into()),
            Err(e) => Err(anyhow::anyhow!("{name}: {e}")),
        }
    };
    print(&mut printer)?;
    if !follow {
        return Ok(0);
    }
    // Until the VM is destroyed: then nothing more will come.
    while qemu.logs(name, previous).is_ok() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        print(&mut printer)?;
    }
    Ok(0)
}

async fn run_watch(args: WatchArgs, host: &Host) -> anyhow::Result<u8> {
    // notify's inotify backend says at info level what a swapped revision
    // does to its watches, dozens of lines a swap: its warnings are enough.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,notify=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    let (vs, state_dir) = host.live(false).await?;
    let cache = args.git.cache(host);
    let source = args
        .git
        .source(cache.clone(), args.placement.placement()?)?;
    let mut refused = uvmctl::watch::signals::RefusedLog::default();
    let dir = match (&args.dir, &source) {
        (_, Some(source)) => {
            match source.sync().await {
                Ok(s) => tracing::info!(
                    url = %source.options().url,
                    "revision in force: {}",
                    s.revision()
                ),
                // What an earlier run put in force stays in force.
                Err(e) if source.spec_dir().exists() => refused.log(source, &e),
                Err(e) => bail!("{e}; nothing is in force yet, so there is nothing to watch"),
            }
            source.spec_dir()
        }
        (Some(d), None) => {
            // A directory that is not there at the start is a typo far more
            // often than one about to appear (issue 30): said, not watched.
            if std::fs::metadata(d).is_err() {
                bail!(
                    "spec directory {} does not exist (nothing to watch)",
                    d.display()
                );
            }
            std::path::absolute(d).with_context(|| format!("cannot resolve {}", d.display()))?
        }
        (None, None) => bail!("give a spec directory or --git URL"),
    };
    let metrics = match args.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics-listen {addr}: cannot listen"))?;
            let metrics = uvmctl::watch::metrics::Metrics::new();
            tracing::info!(
                "metrics at http://{}/metrics",
                listener.local_addr().map_or(addr, |a| a)
            );
            tokio::spawn(uvmctl::watch::metrics::serve(listener, metrics.clone()));
            Some(metrics)
        }
        None => None,
    };
    let (sig_tx, sig_rx) = tokio::sync::mpsc::unbounded_channel();
    let fetch_now = source
        .as_ref()
        .map(|_| Arc::new(tokio::sync::Notify::new()));
    if let (Some(source), Some(fetch_now)) = (source.clone(), &fetch_now) {
        let every = args.git_interval;
        uvmctl::watch::signals::poll_git(source, every, fetch_now.clone(), sig_tx.clone(), refused);
    }
    uvmctl::watch::signals::forward_os_signals(sig_tx, fetch_now)?;
    let opts = uvmctl::watch::WatchOptions {
        dir,
        resync: args.resync.max(Duration::from_millis(100)),
        debounce: args.debounce.max(Duration::from_millis(1)),
        max_disruption: args.max_disruption.into(),
        detect_only: args.detect_only,
        prune: args.prune,
        prune_guard: uvmctl::plan::prune::PruneGuard {
            allow_empty: args.allow_empty,
            max_prune: args.max_prune,
        },
        state_dir: Some(state_dir),
        lock_timeout: args.lock_timeout,
        reconcile_deadline: args.reconcile_deadline,
        backoff: uvmctl::watch::Backoff {
            base: args.backoff,
            cap: args.backoff_cap.max(args.backoff),
            ..uvmctl::watch::Backoff::default()
        },
        source: source.map(|_| cache),
        placement: args.placement.placement()?,
        metrics,
    };
    uvmctl::watch::run(vs, opts, sig_rx, None).await?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    /// Issue 18: one duration syntax for every option, bare seconds still
    /// accepted where they were.
    #[test]
    fn every_duration_option_takes_units_and_bare_seconds() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
