//! The command line's definitions, and nothing else (ripgrep's low-level
//! arguments): what each command and option is, its help, its defaults and
//! its environment variable. Turning them into the library's options is
//! [`super::host`]'s and each command's.

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;
use uvmctl::virtstack::{AccelChoice, Kind};
use uvmctl::vm::VmName;

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
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub host: HostArgs,
    /// Host defaults (keys stateDir, allowRoots, accel, virtstack, qemuUser,
    /// remoteDir, remoteServer, hcsLibrary, hcsAllowRoots); flags and
    /// UVMCTL_* variables win over it
    /// [default: /etc/uvmctl/config.yaml, if it exists].
    #[arg(long, global = true, env = "UVMCTL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum Command {
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
    /// The configurations applied to a VM, oldest first (at most 10, and
    /// always its last healthy one): when, the spec's digest, the source
    /// revision, how spec.health judged it, and what was reverted.
    History {
        /// VM name.
        name: VmName,
        /// Output format (json: the list as the VM's record keeps it).
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
    Schema {
        /// The schema of the rollout policy file (uvmctl-policy.yaml)
        /// instead.
        #[arg(long)]
        policy: bool,
    },
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
pub struct HostArgs {
    /// Root of per-VM state directories (QMP sockets, launch records)
    /// [default: /run/uvmctl].
    #[arg(long, global = true, env = "UVMCTL_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
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
    pub allow_roots: Vec<PathBuf>,
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
    pub accel: Option<AccelChoice>,
    /// The virtstack: `qemu` (QEMU here), `remotevm` (one vmservice
    /// server per VM), `hcs` (Windows' Host Compute Service, through
    /// --hcs-library) or `sim` (a simulator: VMs as records under the state
    /// directory, with qemu's rules; nothing runs) [default: qemu; hcs on
    /// Windows].
    #[arg(
        long,
        global = true,
        env = "UVMCTL_VIRTSTACK",
        value_name = "NAME",
        value_parser = clap::builder::PossibleValuesParser::new(Kind::ALL.map(Kind::as_str))
            .try_map(|s: String| s.parse::<Kind>())
    )]
    pub virtstack: Option<Kind>,
    /// remotevm: where its per-VM records and server sockets live
    /// [default: STATE_DIR/.remotevm].
    #[arg(long, global = true, env = "UVMCTL_REMOTE_DIR", value_name = "DIR")]
    pub remote_dir: Option<PathBuf>,
    /// remotevm: the vmservice server program, started per VM with
    /// `--ttrpc ADDRESS --name VM` as hcsshim does [default: this uvmctl's
    /// `serve`, on the QEMU virtstack with these host options].
    #[arg(
        long,
        global = true,
        env = "UVMCTL_REMOTE_SERVER",
        value_name = "PROGRAM"
    )]
    pub remote_server: Option<PathBuf>,
    /// The unprivileged user QEMU and the vsock backend run as (made by
    /// scripts/setup-host); `root` runs them as root, only when asked for
    /// [default: uvmctl-qemu when uvmctl runs as root, else uvmctl's own user].
    #[arg(long, global = true, env = "UVMCTL_QEMU_USER", value_name = "USER")]
    pub qemu_user: Option<String>,
    /// hcs: the computecore library to load: Windows' own, or elsewhere
    /// the HCS emulator built from hcs-emulator/ (docs/hcs.md)
    /// [default: computecore.dll].
    #[arg(long, global = true, env = "UVMCTL_HCS_LIBRARY", value_name = "FILE")]
    pub hcs_library: Option<PathBuf>,
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
    pub hcs_allow_roots: Vec<PathBuf>,
}

/// Specs from a git repository instead of a directory (as Flux's
/// GitRepository): fetched, checked and swapped in whole (README.md,
/// "A fleet from one repository").
#[derive(Args, Clone)]
#[command(next_help_heading = "Specs from git")]
pub struct GitArgs {
    /// Take the specs from this git repository (any URL git fetches)
    /// instead of DIR.
    #[arg(long, value_name = "URL")]
    pub git: Option<String>,
    /// The branch or tag of --git to follow: a full ref name
    /// (refs/heads/main, refs/tags/v1) or a bare one, refused when it names
    /// both a branch and a tag.
    #[arg(long, value_name = "REF", default_value = "main", requires = "git")]
    pub git_ref: String,
    /// The spec directory inside the repository.
    #[arg(long, value_name = "PATH", default_value = ".", requires = "git")]
    pub git_path: PathBuf,
    /// Put in force only commits SSH-signed by a key of this file, in
    /// git's allowed_signers format (OpenPGP and X.509 signatures are
    /// refused, whatever keyrings the host has).
    #[arg(long, value_name = "FILE", requires = "git")]
    pub allowed_signers: Option<PathBuf>,
    /// Where the mirror and the checkouts live [default: STATE_DIR/git;
    /// for plan, a temporary directory removed after].
    #[arg(long, value_name = "DIR", requires = "git")]
    pub git_cache: Option<PathBuf>,
    /// The most the repository's mirror may hold, and one revision's
    /// checkout may take on disk (each file and directory at least 4 KiB),
    /// in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256, requires = "git")]
    pub git_max_mb: u64,
    /// The longest a fetch may take.
    #[arg(long, value_parser = parse_duration, default_value = "2m", requires = "git")]
    pub git_timeout: Duration,
}

/// Which of the specs are this host's (README.md, "A fleet from one
/// repository"). Names and MACs stay unique over every spec.
#[derive(Args, Clone)]
#[command(next_help_heading = "Placement")]
pub struct PlacementArgs {
    /// Only the VMs whose labels match (kubectl's syntax: key=value,
    /// key!=value, key, !key, joined by commas); the others are neither
    /// created nor kept here.
    #[arg(long, short = 'l', value_name = "SELECTOR")]
    pub selector: Option<uvmctl::spec::Selector>,
    /// Only the VMs labelled `host: NAME` [NAME default: this host's name].
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
    pub for_host: Option<String>,
    /// Only the VMs whose spec file is under this directory of the specs
    /// (e.g. hosts/web-01).
    #[arg(long, value_name = "PATH")]
    pub placement_path: Option<PathBuf>,
}

#[derive(Args)]
pub struct PlanArgs {
    /// Directory of spec files (searched recursively), or one file.
    #[arg(required_unless_present = "git", conflicts_with = "git")]
    pub dir: Option<PathBuf>,
    /// Plan against observed state recorded from a host (the spec shape
    /// `uvmctl export` writes) instead of the live QEMU virtstack.
    #[arg(long, value_name = "FILE")]
    pub observed: Option<PathBuf>,
    #[command(flatten)]
    pub common: PlanCommon,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Also show a unified diff of canonical YAML, observed → desired, per
    /// VM (text output only).
    #[arg(long)]
    pub diff: bool,
    /// With --virtstack hcs: print, instead of the plan, the HCS calls
    /// applying it would make (create documents, ModifySettingRequests,
    /// lifecycle calls), in order per VM, as JSON (docs/hcs.md). Needs no
    /// HCS with --observed.
    #[arg(long, conflicts_with_all = ["output", "diff", "out"])]
    pub hcs_requests: bool,
    /// Exit 2 when there are changes (0 when none).
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// Also save the plan, with what it was computed from, for `uvmctl
    /// apply FILE` to apply exactly it (docs/plan-json.md, "Saved plans").
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["observed", "git", "selector", "for_host", "placement_path"]
    )]
    pub out: Option<PathBuf>,
    // Last: their help headings would take the options after them.
    #[command(flatten)]
    pub git: GitArgs,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

#[derive(Args)]
pub struct PlanCommon {
    /// Only these VMs (repeatable): e.g. the one a watcher holds a change
    /// for. The others are neither planned nor pruned.
    #[arg(long, value_name = "NAME")]
    pub only: Vec<VmName>,
    /// Remove managed VMs that have no spec (never while any spec fails to
    /// load, never every VM of this host without --allow-empty).
    #[arg(long)]
    pub prune: bool,
    /// With --prune: allow a prune that removes every VM of this host
    /// (otherwise refused, exit 3: an empty or misspelt selection is more
    /// likely a mistake than an intent).
    #[arg(long, alias = "allow-empty-prune", requires = "prune")]
    pub allow_empty: bool,
    /// With --prune: refuse (exit 3) a prune that removes more than this
    /// many VMs, or this share of this host's VMs (`25%`).
    #[arg(long, value_name = "N|P%", requires = "prune")]
    pub max_prune: Option<uvmctl::plan::prune::PruneLimit>,
    /// Exit 3 when any change is more disruptive than this.
    #[arg(long, value_enum, value_name = "CLASS")]
    pub max_disruption: Option<MaxDisruption>,
    /// Color text output.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    pub color: Color,
}

#[derive(Args)]
pub struct WatchArgs {
    /// Directory of spec files (searched recursively), or one file.
    #[arg(required_unless_present = "git", conflicts_with = "git")]
    pub dir: Option<PathBuf>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics,
    /// e.g. 127.0.0.1:9464 (README.md, "A fleet from one repository").
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// With --git: fetch this often (SIGHUP fetches and reconciles at once).
    #[arg(long, value_parser = parse_duration, default_value = "1m", requires = "git")]
    pub git_interval: Duration,
    /// Rescan the specs and re-observe every VM this often (30s, 5m, ...).
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub resync: Duration,
    /// Quiet time of the spec directory before its changes count (at most
    /// ten times this while changes keep coming).
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub debounce: Duration,
    /// Hold (do not execute) changes more disruptive than this.
    #[arg(long, value_enum, value_name = "CLASS", default_value_t = MaxDisruption::Live)]
    pub max_disruption: MaxDisruption,
    /// Execute nothing: drift, spec changes, crashes and prunes are
    /// observed, planned and reported (logs, `uvmctl status`) as held.
    #[arg(long)]
    pub detect_only: bool,
    /// Do not revert a change its spec.health judges unhealthy: report it
    /// (logs, `uvmctl status`, metrics) and leave the VM as its spec says.
    #[arg(long)]
    pub no_revert: bool,
    /// Remove managed VMs whose spec is gone, once a second scan confirms it;
    /// never while any spec fails to load, never every VM of this host
    /// without --allow-empty.
    #[arg(long)]
    pub prune: bool,
    /// With --prune: allow a prune that removes every VM of this host.
    #[arg(long, requires = "prune")]
    pub allow_empty: bool,
    /// With --prune: hold a prune that removes more than this many VMs, or
    /// this share of this host's VMs (`25%`).
    #[arg(long, value_name = "N|P%", requires = "prune")]
    pub max_prune: Option<uvmctl::plan::prune::PruneLimit>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Windows: run as the service NAME under the service control manager
    /// (stop and shutdown stop cleanly; `sc.exe control NAME paramchange`
    /// fetches and reconciles now, as SIGHUP does); the log goes to
    /// STATE_DIR\watch.log, kept under 16 MiB with one older file.
    #[cfg(windows)]
    #[arg(long, value_name = "NAME")]
    pub service: Option<String>,
    /// How long a reconcile waits for another uvmctl holding the state
    /// directory before trying again later.
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub lock_timeout: Duration,
    /// Longest a single VM's reconcile may take.
    #[arg(long, value_parser = parse_duration, default_value = "10m")]
    pub reconcile_deadline: Duration,
    /// First retry delay after a failure or a crash; doubles per failure.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub backoff: Duration,
    /// Longest retry delay.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub backoff_cap: Duration,
    // Last: their help headings would take the options after them.
    #[command(flatten)]
    pub git: GitArgs,
    #[command(flatten)]
    pub placement: PlacementArgs,
    #[command(flatten)]
    pub rollout: RolloutArgs,
}

/// A host's part in a progressive rollout (README.md, "Rollouts").
#[derive(Args, Clone)]
#[command(next_help_heading = "Rollout")]
pub struct RolloutArgs {
    /// This host's wave. With --git, a host of wave 2 or more puts a new
    /// revision in force only once the gate of the wave before passes
    /// (asked at each --git-interval); every wave, the first too, publishes
    /// in its metrics (--metrics-listen) what that gate reads. Without it:
    /// no gate, and nothing published for one.
    #[arg(long, value_name = "N", requires_all = ["git", "metrics_listen"],
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub wave: Option<u32>,
    /// The fleet's Prometheus, which the gate asks (http://HOST:PORT[/PREFIX]).
    /// Unreachable, or any answer but a pass: the gate stays closed.
    #[arg(long, value_name = "URL", requires = "wave")]
    pub prometheus: Option<uvmctl::source::prometheus::PrometheusUrl>,
    /// The gate's PromQL instant query; `$wave` is the wave before, `$revision`
    /// the commit waiting, `$soak` the soak in seconds. It passes when it
    /// returns at least one sample and none is 0 [default: README.md,
    /// "Rollouts"].
    #[arg(long, value_name = "PROMQL", requires = "wave")]
    pub gate_query: Option<String>,
    /// How long every host of the wave before must have had the revision in
    /// force, settled and healthy.
    #[arg(long, value_parser = parse_duration, default_value = "10m", requires = "wave")]
    pub soak: Duration,
    /// The longest one gate query may take.
    #[arg(long, value_parser = parse_duration, default_value = "10s", requires = "wave")]
    pub gate_timeout: Duration,
}

#[derive(Args)]
pub struct ServeArgs {
    /// hcsshim's invocation: listen on this unix socket, then close standard
    /// output (hcsshim waits for that before it connects).
    #[arg(
        long,
        value_name = "ADDRESS",
        required_unless_present = "listen",
        conflicts_with = "listen"
    )]
    pub ttrpc: Option<String>,
    /// Listen on `unix:PATH` (by hand, or from a service manager).
    #[arg(long, value_name = "unix:PATH")]
    pub listen: Option<String>,
    /// The VM this server serves [default: the socket's file stem, if it is a
    /// valid VM name, else `vm`].
    #[arg(long)]
    pub name: Option<VmName>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
pub struct ApplyArgs {
    /// Directory of spec files (searched recursively), or one file; or a
    /// plan saved by `plan --out`, applied only if nothing it was computed
    /// from has changed (else exit 5).
    #[arg(required_unless_present = "git", conflicts_with = "git")]
    pub dir: Option<PathBuf>,
    #[command(flatten)]
    pub common: PlanCommon,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
    /// Recreate VMs even when their spec's policy does not allow it.
    #[arg(long)]
    pub allow_recreate: bool,
    /// Apply restarts and recreates outside the maintenance windows of
    /// uvmctl-policy.yaml (for a person who means it).
    #[arg(long)]
    pub ignore_windows: bool,
    /// With --git, on a cache a watcher of a later rollout wave follows: put
    /// the ref's head in force though that watcher's gate has not passed it
    /// (for a person who means it; README.md, "Rollouts").
    #[arg(long, requires = "git")]
    pub ignore_gate: bool,
    /// Wait this long (30s, 2m; a bare number is seconds) for another apply
    /// holding the state directory; then exit 4.
    #[arg(long, value_parser = parse_duration, default_value = "30")]
    pub lock_timeout: Duration,
    /// Wait up to this long (120s, 2m; a bare number is seconds) for each VM
    /// it changes that is meant to run to be judged healthy by its
    /// spec.health probes, showing
    /// progress; exit non-zero naming the probe when it is unhealthy. A VM
    /// without spec.health waits for its guest to open the uvmctl.agent port
    /// (guests without that agent never do). --wait-ready is another name.
    #[arg(long, visible_alias = "wait-ready", value_parser = parse_duration, value_name = "DURATION")]
    pub wait_healthy: Option<Duration>,
    // Last: their help headings would take the options after them.
    #[command(flatten)]
    pub git: GitArgs,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

/// The options that only mean something with `--git` (their `requires`).
const GIT_ONLY: &[&str] = &[
    "git_ref",
    "git_path",
    "allowed_signers",
    "git_cache",
    "git_max_mb",
    "git_timeout",
    "git_interval",
    "ignore_gate",
    "wave",
];

/// The first option given (on the command line or in the environment)
/// that only means something with `--git`, when `--git` is not: clap drops
/// an option's requirement of `--git` once a spec DIR, which conflicts with
/// it, is given, so `apply DIR --git-path hosts/a` would apply all of DIR.
pub fn git_option_without_git(cmd: &clap::Command, matches: &clap::ArgMatches) -> Option<String> {
    use clap::parser::ValueSource;
    let (name, sub) = matches.subcommand()?;
    // Err: this command has no --git at all.
    if sub.try_contains_id("git").unwrap_or(true) {
        return None;
    }
    // Each command has only some of them (asking for another panics).
    let given = GIT_ONLY
        .iter()
        .filter(|id| sub.try_contains_id(id).is_ok())
        .find(|id| {
            matches!(
                sub.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        })?;
    let long = cmd
        .find_subcommand(name)?
        .get_arguments()
        .find(|a| a.get_id() == *given)?
        .get_long()?;
    Some(format!(
        "--{long} only means something with --git URL (with a spec directory it would be ignored)"
    ))
}

/// `100ms`, `30s`, `5m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
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
pub enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MaxDisruption {
    Live,
    Restart,
    Recreate,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
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
