//! The `uvmctl` command line: parse arguments, call the library, map the
//! outcome to an exit code (0 ok, 1 error, 2 changes pending with
//! `--detailed-exitcode`, 3 changes exceed `--max-disruption` or the state
//! directory stayed locked).

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use uvmctl::apply::lock::{LockError, StateLock};
use uvmctl::apply::{self, ApplyOptions};
use uvmctl::plan::{self, Plan, PlanOptions, render};
use uvmctl::spec::{self, API_VERSION, KIND, Loaded, Metadata, VmDocument, VmStatus};
use uvmctl::virtstack::qemu::{
    Accel, AllowedRoots, DEFAULT_ALLOWED_ROOTS, DEFAULT_STATE_DIR, DEFAULT_STOP_TIMEOUT,
    DEFAULT_UNPLUG_TIMEOUT, Qemu, QemuOptions, StateDir,
};
use uvmctl::virtstack::recorded::Recorded;
use uvmctl::virtstack::{Capabilities, HostFacts, ObservedState};
use uvmctl::vm::Disruption;

#[derive(Parser)]
#[command(
    name = "uvmctl",
    version,
    about = "Declarative manager for lightweight utility VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check spec files; print every error as file:line:col: field: message.
    Validate {
        /// Directory of spec files (searched recursively), or one file.
        dir: PathBuf,
    },
    /// Show what would change, per VM and per device, and how disruptive it is.
    Plan(PlanArgs),
    /// Make the VMs what the specs say.
    Apply(ApplyArgs),
    /// Table of the VMs uvmctl manages.
    Status {
        #[command(flatten)]
        host: HostArgs,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Stop a VM and delete everything uvmctl keeps for it.
    Destroy {
        /// VM name.
        name: String,
        #[command(flatten)]
        host: HostArgs,
        /// Wait this long for another apply holding the state directory.
        #[arg(long, value_parser = parse_secs, default_value = "30")]
        lock_timeout: Duration,
    },
    /// Wait until a VM's QEMU exits; say whether it was asked to (exit 0)
    /// or died on its own (exit 1, with its last stderr lines).
    Wait {
        /// VM name.
        name: String,
        #[command(flatten)]
        host: HostArgs,
        /// Give up after this long (exit 2); waits forever without it.
        #[arg(long, value_parser = parse_secs)]
        timeout: Option<Duration>,
    },
    /// Write the observed state of VMs as spec YAML (adopting a VM starts here).
    Export {
        /// Only this VM.
        name: Option<String>,
        #[command(flatten)]
        host: HostArgs,
    },
    /// What a virtstack can do on this host: resource × operation → disruption.
    Capabilities {
        /// Virtstack.
        #[arg(long, default_value = "qemu")]
        virtstack: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print the JSON Schema of a spec document (for yaml-language-server).
    Schema,
}

/// Where the QEMU virtstack keeps its VMs and what it may touch.
#[derive(Args, Clone)]
struct HostArgs {
    /// Root of per-VM state directories (QMP sockets, launch records).
    #[arg(long, default_value = DEFAULT_STATE_DIR, value_name = "DIR")]
    state_dir: PathBuf,
    /// Host paths (disks, kernels, shares) must lie under one of these after
    /// resolving symlinks; repeatable [default: /var/lib/uvmctl, /var/cache/uvmctl].
    #[arg(long = "allow-root", value_name = "DIR")]
    allow_roots: Vec<PathBuf>,
    /// Acceleration for launched VMs: kvm only works where the CPU shows vmx/svm.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto)]
    accel: AccelArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

impl HostArgs {
    /// The QEMU virtstack; an `observer` only looks (its own QMP socket,
    /// nothing created on the host).
    fn qemu(&self, observer: bool) -> anyhow::Result<Qemu> {
        let roots = if self.allow_roots.is_empty() {
            AllowedRoots::new(DEFAULT_ALLOWED_ROOTS)
        } else {
            AllowedRoots::new(&self.allow_roots)
        };
        Ok(Qemu::new(QemuOptions {
            state_dir: StateDir::new(&self.state_dir)?,
            roots,
            accel: match self.accel {
                AccelArg::Auto => Accel::auto(),
                AccelArg::Kvm => Accel::Kvm,
                AccelArg::Tcg => Accel::Tcg,
            },
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            unplug_timeout: DEFAULT_UNPLUG_TIMEOUT,
            observer,
        }))
    }
}

#[derive(Args)]
struct PlanArgs {
    /// Directory of spec files (searched recursively), or one file.
    dir: PathBuf,
    /// Plan against observed state recorded from a host (the spec shape
    /// `uvmctl export` writes) instead of the live QEMU virtstack.
    #[arg(long, value_name = "FILE")]
    observed: Option<PathBuf>,
    /// Whose capabilities to assume for --observed.
    #[arg(
        long,
        default_value = "qemu",
        value_name = "NAME",
        requires = "observed"
    )]
    virtstack: String,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    common: PlanCommon,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Also show a unified diff of canonical YAML, observed → desired, per VM.
    #[arg(long)]
    diff: bool,
    /// Exit 2 when there are changes (0 when none).
    #[arg(long)]
    detailed_exitcode: bool,
}

#[derive(Args)]
struct PlanCommon {
    /// Remove managed VMs that have no spec (never while any spec fails to load).
    #[arg(long)]
    prune: bool,
    /// With --prune: allow pruning when no spec loaded at all.
    #[arg(long, requires = "prune")]
    allow_empty_prune: bool,
    /// Exit 3 when any change is more disruptive than this.
    #[arg(long, value_enum, value_name = "CLASS")]
    max_disruption: Option<MaxDisruption>,
    /// Color text output.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    color: Color,
}

#[derive(Args)]
struct ApplyArgs {
    /// Directory of spec files (searched recursively), or one file.
    dir: PathBuf,
    #[command(flatten)]
    host: HostArgs,
    #[command(flatten)]
    common: PlanCommon,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// Recreate VMs even when their spec's policy does not allow it.
    #[arg(long)]
    allow_recreate: bool,
    /// Wait this long (seconds) for another apply holding the state directory; then exit 3.
    #[arg(long, value_parser = parse_secs, default_value = "30")]
    lock_timeout: Duration,
    /// Wait up to SECS for each VM meant to run to boot (its guest opens the
    /// uvmctl.agent port; guests without that agent never do), showing progress.
    #[arg(long, value_parser = parse_secs, value_name = "SECS")]
    wait_ready: Option<Duration>,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds"))
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
const EXIT_TOO_DISRUPTIVE: u8 = 3;
const EXIT_LOCKED: u8 = 3;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
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

async fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Validate { dir } => Ok(validate(&dir)),
        Command::Schema => {
            println!("{}", serde_json::to_string_pretty(&spec::json_schema())?);
            Ok(0)
        }
        Command::Plan(args) => run_plan(args).await,
        Command::Apply(args) => run_apply(args).await,
        Command::Status { host, output } => status(&host.qemu(true)?, output).await,
        Command::Destroy {
            name,
            host,
            lock_timeout,
        } => {
            let qemu = host.qemu(false)?;
            qemu.options().state_dir.ensure_root()?;
            let _lock = StateLock::acquire(
                qemu.options().state_dir.root(),
                lock_timeout,
                "uvmctl destroy",
            )?;
            qemu.destroy(&name).await?;
            eprintln!("{name}: destroyed");
            Ok(0)
        }
        Command::Wait {
            name,
            host,
            timeout,
        } => {
            let qemu = host.qemu(false)?;
            if !qemu.wait(&name, timeout).await? {
                eprintln!(
                    "{name}: still running after {:?}",
                    timeout.unwrap_or_default()
                );
                return Ok(2);
            }
            match qemu.exit_error(&name) {
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
        Command::Export { name, host } => export(&host.qemu(true)?, name.as_deref()).await,
        Command::Capabilities { virtstack, output } => {
            let caps = match virtstack.as_str() {
                "qemu" => Capabilities::qemu(&HostFacts::probe()),
                other => Capabilities::profile(other).with_context(|| {
                    format!("no capability profile for virtstack {other:?} (known: qemu, hcs)")
                })?,
            };
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&caps)?),
                Output::Text => print!("{}", caps.markdown_table()),
            }
            Ok(0)
        }
    }
}

fn validate(dir: &std::path::Path) -> u8 {
    let loaded = spec::load_dir(dir);
    for e in &loaded.errors {
        eprintln!("{e}");
    }
    let n = loaded.desired.vms.len();
    let s = |n: usize| if n == 1 { "" } else { "s" };
    if loaded.errors.is_empty() {
        println!("{n} VM spec{} valid", s(n));
        0
    } else {
        let bad = loaded.desired.unknown.len();
        eprintln!(
            "{} error{}; {n} VM spec{} valid, {bad} invalid",
            loaded.errors.len(),
            s(loaded.errors.len()),
            s(n)
        );
        EXIT_ERROR
    }
}

/// Observed state and capabilities: a recording, or the live QEMU virtstack.
async fn observe(
    observed: Option<&PathBuf>,
    virtstack: &str,
    host: &HostArgs,
) -> anyhow::Result<(ObservedState, Capabilities)> {
    match observed {
        Some(path) => {
            let rec = Recorded::load(path, virtstack)
                .with_context(|| format!("cannot read observed state from {}", path.display()))?;
            Ok((rec.state().clone(), rec.caps().clone()))
        }
        None => {
            let qemu = host.qemu(true)?;
            let state = qemu.observe_all().await?;
            Ok((state, qemu.capabilities().clone()))
        }
    }
}

fn print_errors(loaded: &Loaded) {
    for e in &loaded.errors {
        eprintln!("{e}");
    }
}

fn exceeds(common: &PlanCommon, the_plan: &Plan) -> Option<(Disruption, Disruption)> {
    let limit = Disruption::from(common.max_disruption?);
    let max = the_plan.summary().max_disruption?;
    (max > limit).then_some((limit, max))
}

async fn run_plan(args: PlanArgs) -> anyhow::Result<u8> {
    let loaded = spec::load_dir(&args.dir);
    let (observed, caps) = observe(args.observed.as_ref(), &args.virtstack, &args.host).await?;
    let opts = PlanOptions {
        prune: args.common.prune,
        allow_empty_prune: args.common.allow_empty_prune,
    };
    let the_plan = plan::plan(&loaded.desired, &observed, &caps, &opts);
    let style = args.common.color.style();
    match args.output {
        Output::Json => print!("{}", render::json(&the_plan, &loaded.errors)),
        Output::Text => {
            print_errors(&loaded);
            if args.diff {
                print!(
                    "{}",
                    render::diff(&the_plan, &loaded.desired, &observed, &style)
                );
            }
            print!("{}", render::text(&the_plan, &style));
        }
    }
    if !loaded.errors.is_empty() {
        if args.output == Output::Text {
            eprintln!(
                "{} spec error(s): the VMs they concern were not planned",
                loaded.errors.len()
            );
        }
        return Ok(EXIT_ERROR);
    }
    if let Some((limit, max)) = exceeds(&args.common, &the_plan) {
        eprintln!("changes exceed --max-disruption {limit}: this plan needs {max}");
        return Ok(EXIT_TOO_DISRUPTIVE);
    }
    if args.detailed_exitcode && the_plan.has_changes() {
        return Ok(EXIT_CHANGES);
    }
    Ok(0)
}

async fn run_apply(args: ApplyArgs) -> anyhow::Result<u8> {
    let loaded = spec::load_dir(&args.dir);
    if !loaded.errors.is_empty() {
        print_errors(&loaded);
        bail!("{} spec error(s); nothing was applied", loaded.errors.len());
    }
    let qemu = args.host.qemu(false)?;
    qemu.options().state_dir.ensure_root()?;
    let what = format!("uvmctl apply {}", args.dir.display());
    let _lock = StateLock::acquire(qemu.options().state_dir.root(), args.lock_timeout, &what)?;

    let observed = qemu.observe_all().await?;
    let opts = PlanOptions {
        prune: args.common.prune,
        allow_empty_prune: args.common.allow_empty_prune,
    };
    let the_plan = plan::plan(&loaded.desired, &observed, qemu.capabilities(), &opts);
    print!("{}", render::text(&the_plan, &args.common.color.style()));
    if !the_plan.has_changes() {
        return Ok(0);
    }
    if let Some((limit, max)) = exceeds(&args.common, &the_plan) {
        eprintln!(
            "changes exceed --max-disruption {limit}: this plan needs {max}; nothing was applied"
        );
        return Ok(EXIT_TOO_DISRUPTIVE);
    }
    // Every host path of every VM that will be built is checked before anything changes.
    let mut refused = Vec::new();
    for vm in &the_plan.vms {
        if let Some(want) = loaded.desired.vms.get(&vm.name)
            && let Err(e) =
                uvmctl::virtstack::qemu::launch::resolve(&want.config, &qemu.options().roots)
        {
            refused.push(format!("{} ({}): {e}", vm.name, want.file.display()));
        }
    }
    if !refused.is_empty() {
        for r in &refused {
            eprintln!("{r}");
        }
        bail!("{} VM(s) refused; nothing was applied", refused.len());
    }
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            bail!("refusing to apply without --yes: standard input is not a terminal to ask on");
        }
        eprint!("Apply these changes? Only 'yes' is accepted: ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != "yes" {
            eprintln!("Apply cancelled.");
            return Ok(EXIT_ERROR);
        }
    }

    let started = std::time::Instant::now();
    let progress: apply::Progress = Arc::new(move |vm: &str, msg: &str| {
        eprintln!("[{:>6.1}s] {vm}: {msg}", started.elapsed().as_secs_f64());
    });
    let outcomes = apply::apply(
        &the_plan,
        &loaded.desired,
        &qemu,
        ApplyOptions {
            allow_recreate: args.allow_recreate,
            wait_ready: args.wait_ready,
        },
        progress,
    )
    .await;
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.result.is_err())
        .map(|o| o.name.as_str())
        .collect();
    eprintln!(
        "Apply: {} VM(s) changed, {} failed{}{} in {:.1}s",
        outcomes.len() - failed.len(),
        failed.len(),
        if failed.is_empty() { "" } else { ": " },
        failed.join(", "),
        started.elapsed().as_secs_f64()
    );
    for o in &outcomes {
        if let Err(e) = &o.result {
            eprintln!("  {}: {e}", o.name);
        }
    }
    Ok(if failed.is_empty() { 0 } else { EXIT_ERROR })
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusRow {
    name: String,
    state: String,
    uptime_seconds: Option<u64>,
    memory_mb: u64,
    vcpus: u32,
    devices: usize,
    /// vCPU time used since launch, and host memory in use (running VMs only).
    cpu_time_ms: Option<u64>,
    rss_mb: Option<u64>,
    last_error: Option<String>,
}

async fn status(qemu: &Qemu, output: Output) -> anyhow::Result<u8> {
    let mut rows = Vec::new();
    for name in qemu.list() {
        let (vm, err) = match qemu.observe(&name).await {
            Ok(vm) => (Some(vm), qemu.exit_error(&name)),
            Err(e) => (None, Some(e.to_string())),
        };
        let rec =
            uvmctl::virtstack::qemu::LaunchRecord::load(&qemu.options().state_dir, &name).ok();
        let uptime = match (&vm, rec.as_ref().and_then(|r| r.started_at)) {
            (Some(v), Some(t)) if v.state.is_live() => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|now| now.as_secs().saturating_sub(t)),
            _ => None,
        };
        let stats = match &vm {
            Some(v) if v.state.is_live() => qemu.stats(&name).await.ok(),
            _ => None,
        };
        rows.push(match vm {
            Some(v) => StatusRow {
                name,
                state: v.state.to_string(),
                uptime_seconds: uptime,
                memory_mb: v.config.memory.size_mb,
                vcpus: v.config.processors.count,
                devices: plan::flatten(&v.config)
                    .keys()
                    .filter(|(k, _)| !k.is_singleton())
                    .count(),
                cpu_time_ms: stats.map(|s| s.total_runtime_ns / 1_000_000),
                rss_mb: stats.map(|s| s.working_set_bytes >> 20),
                last_error: err,
            },
            None => StatusRow {
                name,
                state: "unknown".into(),
                uptime_seconds: None,
                memory_mb: 0,
                vcpus: 0,
                devices: 0,
                cpu_time_ms: None,
                rss_mb: None,
                last_error: err,
            },
        });
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Text => {
            println!(
                "{:<24} {:<11} {:>8} {:>8} {:>5} {:>7} {:>9} {:>7}  LAST ERROR",
                "NAME", "STATE", "UPTIME", "MEMORY", "VCPUS", "DEVICES", "CPU TIME", "RSS"
            );
            for r in &rows {
                let up = r.uptime_seconds.map_or("-".into(), |s| format!("{s}s"));
                let cpu = r
                    .cpu_time_ms
                    .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
                let rss = r.rss_mb.map_or("-".into(), |mb| format!("{mb}MB"));
                println!(
                    "{:<24} {:<11} {:>8} {:>6}MB {:>5} {:>7} {:>9} {:>7}  {}",
                    r.name,
                    r.state,
                    up,
                    r.memory_mb,
                    r.vcpus,
                    r.devices,
                    cpu,
                    rss,
                    r.last_error.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(0)
}

async fn export(qemu: &Qemu, only: Option<&str>) -> anyhow::Result<u8> {
    let names: Vec<String> = match only {
        Some(n) => vec![n.to_string()],
        None => qemu.list(),
    };
    let mut first = true;
    for name in names {
        let vm = qemu.observe(&name).await?;
        let mut config = vm.config;
        config.power_state = plan::observed_power(vm.state);
        config.canonicalize();
        let doc = VmDocument {
            api_version: API_VERSION.into(),
            kind: KIND.into(),
            metadata: Metadata { name },
            spec: config,
            status: Some(VmStatus {
                state: vm.state,
                managed: vm.managed,
            }),
        };
        if !first {
            println!("---");
        }
        first = false;
        print!("{}", serde_yaml::to_string(&doc)?);
    }
    Ok(0)
}
