//! The `uvmctl` command line: parse arguments, dispatch to the command's
//! module (`cli::*`), map the outcome to an exit code (0 ok, 1 error, 2
//! changes pending with `--detailed-exitcode`, 3 a policy stop, 4 the state
//! directory stayed locked, 5 a saved plan is stale).

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use std::io::Write;
use std::process::ExitCode;
use uvmctl::apply::lock::LockError;
use uvmctl::config::HostDefaults;

/// `print!` that returns the write's error instead of panicking: a reader
/// that went away (`uvmctl plan | head`) ends the command quietly.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($t)*).map_err($crate::cli::StdoutError)
    }};
}

/// `println!` likewise.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($t)*).map_err($crate::cli::StdoutError)
    }};
}

mod cli;

use cli::args::{Cli, Command};
use cli::{EXIT_ERROR, EXIT_LOCKED, StdoutError};

#[tokio::main]
async fn main() -> ExitCode {
    // Whatever uvmctl (or a QEMU it starts) creates without an explicit
    // mode is root's alone, whatever umask the caller had.
    #[cfg(unix)]
    {
        uvmctl::hostfs::private_umask();
        uvmctl::hostfs::raise_nofile_limit();
    }
    let mut command = Cli::command();
    let parsed = command
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|m| {
            if let Some(why) = cli::args::git_option_without_git(&command, &m) {
                return Err(command.error(clap::error::ErrorKind::MissingRequiredArgument, why));
            }
            Cli::from_arg_matches(&m)
        });
    let cli = match parsed {
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
        Err(e) if cli::closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let locked = matches!(e.downcast_ref::<LockError>(), Some(LockError::Held { .. }));
            ExitCode::from(if locked { EXIT_LOCKED } else { EXIT_ERROR })
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    // Commands that touch no host never read the config file, so a bad
    // one cannot keep an operator from `validate` or `completions`.
    let hostless = matches!(
        cli.command,
        Command::Validate { .. }
            | Command::Schema { .. }
            | Command::Completions { .. }
            | Command::Man { .. }
    );
    let file = if hostless {
        HostDefaults::default()
    } else {
        uvmctl::config::load(cli.config.as_deref())?
    };
    let host = &cli::host::options(cli.host, file);
    match cli.command {
        Command::Validate { dir, output } => cli::status::validate(dir, output).await,
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
        Command::Schema { policy } => {
            let schema = if policy {
                uvmctl::spec::policy::json_schema()
            } else {
                uvmctl::spec::json_schema()
            };
            outln!("{}", serde_json::to_string_pretty(&schema)?)?;
            Ok(0)
        }
        Command::Plan(args) => cli::plan::run(args, host).await,
        Command::Apply(args) => cli::apply::run(args, host).await,
        Command::Watch(args) => cli::watch::run(args, host).await,
        #[cfg(unix)]
        Command::Serve(args) => cli::serve::run(args, host).await,
        #[cfg(not(unix))]
        Command::Serve(_) => {
            anyhow::bail!("uvmctl serve is unix-only: it listens on a unix socket and drives QEMU")
        }
        Command::Status { output } => cli::status::status(output, host).await,
        Command::Destroy { name, lock_timeout } => {
            cli::status::destroy(&name, lock_timeout, host).await
        }
        Command::History { name, output } => cli::status::history(&name, output, host).await,
        Command::Wait { name, timeout } => cli::status::wait(&name, timeout, host).await,
        #[cfg(unix)]
        Command::Console { name } => cli::guest::console(&name, host).await,
        #[cfg(unix)]
        Command::Logs {
            name,
            follow,
            previous,
            raw,
        } => cli::guest::logs(&name, follow, previous, raw, host).await,
        #[cfg(unix)]
        Command::Agent {
            name,
            timeout,
            raw,
            command,
        } => cli::guest::agent(&name, &command, timeout, raw, host).await,
        #[cfg(not(unix))]
        Command::Console { .. } | Command::Logs { .. } | Command::Agent { .. } => {
            anyhow::bail!(
                "console, logs and agent reach a guest of the qemu virtstack, which runs on Linux only"
            )
        }
        Command::Export { name } => cli::status::export(name.as_ref(), host).await,
        Command::Capabilities { output } => cli::status::capabilities(output, host),
    }
}
