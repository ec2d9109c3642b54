//! The `uvmctl` command line: parse arguments, call the library, map the
//! outcome to an exit code (0 ok, 1 error, 2 changes pending with
//! `--detailed-exitcode`, 3 changes exceed `--max-disruption`).

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use uvmctl::plan::{self, PlanOptions, render};
use uvmctl::spec;
use uvmctl::virtstack::recorded::Recorded;
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
    /// Print the JSON Schema of a spec document (for yaml-language-server).
    Schema,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Directory of spec files (searched recursively), or one file.
    dir: PathBuf,
    /// Observed state recorded from a host (the spec shape `uvmctl export`
    /// writes): plan against it instead of a live virtstack.
    #[arg(long, value_name = "FILE")]
    observed: PathBuf,
    /// Whose capabilities to assume for --observed.
    #[arg(long, default_value = "qemu", value_name = "NAME")]
    virtstack: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Also show a unified diff of canonical YAML, observed → desired, per VM.
    #[arg(long)]
    diff: bool,
    /// Remove managed VMs that have no spec (never while any spec fails to load).
    #[arg(long)]
    prune: bool,
    /// With --prune: allow pruning when no spec loaded at all.
    #[arg(long, requires = "prune")]
    allow_empty_prune: bool,
    /// Exit 2 when there are changes (0 when none).
    #[arg(long)]
    detailed_exitcode: bool,
    /// Exit 3 when any change is more disruptive than this.
    #[arg(long, value_enum, value_name = "CLASS")]
    max_disruption: Option<MaxDisruption>,
    /// Color text output.
    #[arg(long, value_enum, default_value_t = Color::Auto)]
    color: Color,
}

#[derive(Clone, Copy, ValueEnum)]
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

const EXIT_ERROR: u8 = 1;
const EXIT_CHANGES: u8 = 2;
const EXIT_TOO_DISRUPTIVE: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Validate { dir } => {
            let loaded = spec::load_dir(&dir);
            for e in &loaded.errors {
                eprintln!("{e}");
            }
            let n = loaded.desired.vms.len();
            if loaded.errors.is_empty() {
                println!("{n} VM spec{} valid", if n == 1 { "" } else { "s" });
                Ok(0)
            } else {
                let bad = loaded.desired.unknown.len();
                eprintln!(
                    "{} error{}; {n} VM spec{} valid, {bad} invalid",
                    loaded.errors.len(),
                    if loaded.errors.len() == 1 { "" } else { "s" },
                    if n == 1 { "" } else { "s" }
                );
                Ok(EXIT_ERROR)
            }
        }
        Command::Schema => {
            println!("{}", serde_json::to_string_pretty(&spec::json_schema())?);
            Ok(0)
        }
        Command::Plan(args) => run_plan(args),
    }
}

fn run_plan(args: PlanArgs) -> anyhow::Result<u8> {
    let loaded = spec::load_dir(&args.dir);
    let host = Recorded::load(&args.observed, &args.virtstack).with_context(|| {
        format!(
            "cannot read observed state from {}",
            args.observed.display()
        )
    })?;
    let caps = host.caps();
    let opts = PlanOptions {
        prune: args.prune,
        allow_empty_prune: args.allow_empty_prune,
    };
    let the_plan = plan::plan(&loaded.desired, host.state(), caps, &opts);

    let style = render::Style {
        color: match args.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => {
                std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
            }
        },
    };
    match args.output {
        Output::Json => print!("{}", render::json(&the_plan, &loaded.errors)),
        Output::Text => {
            for e in &loaded.errors {
                eprintln!("{e}");
            }
            if args.diff {
                print!(
                    "{}",
                    render::diff(&the_plan, &loaded.desired, host.state(), &style)
                );
            }
            print!("{}", render::text(&the_plan, &style));
        }
    }

    if !loaded.errors.is_empty() {
        if matches!(args.output, Output::Text) {
            eprintln!(
                "{} spec error(s): the VMs they concern were not planned",
                loaded.errors.len()
            );
        }
        return Ok(EXIT_ERROR);
    }
    let summary = the_plan.summary();
    if let (Some(limit), Some(max)) = (args.max_disruption, summary.max_disruption)
        && max > Disruption::from(limit)
    {
        let limit = Disruption::from(limit);
        eprintln!("changes exceed --max-disruption {limit}: this plan needs {max}");
        return Ok(EXIT_TOO_DISRUPTIVE);
    }
    if args.detailed_exitcode && the_plan.has_changes() {
        return Ok(EXIT_CHANGES);
    }
    Ok(0)
}
