//! The commands that reach a guest of the qemu virtstack: its serial
//! console, its logs, uvmctl's agent in it.

use super::StdoutError;
use super::host;
use anyhow::{Context, bail};
use std::io::IsTerminal;
use std::time::Duration;
use uvmctl::virtstack::HostOptions;
use uvmctl::vm::VmName;

pub async fn console(name: &VmName, host: &HostOptions) -> anyhow::Result<u8> {
    use uvmctl::virtstack::qemu::guest::{self, RelayEnd};
    let qemu = host::qemu(host, "console")?;
    let console = qemu.vm(name).console().await?;
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
pub struct RawTerminal {
    pub fd: std::os::fd::OwnedFd,
    pub saved: nix::sys::termios::Termios,
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

pub async fn logs(
    name: &VmName,
    follow: bool,
    previous: bool,
    raw: bool,
    host: &HostOptions,
) -> anyhow::Result<u8> {
    let qemu = host::qemu(host, "logs")?;
    let logs = qemu.vm(name).logs(previous)?;
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
    while qemu.vm(name).logs(previous).is_ok() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        print(&mut printer)?;
    }
    Ok(0)
}

/// `uvmctl agent`: a command of uvmctl's guest agent, its answer lines
/// printed (escaped unless `raw`).
pub async fn agent(
    name: &VmName,
    command: &[String],
    timeout: Duration,
    raw: bool,
    host: &HostOptions,
) -> anyhow::Result<u8> {
    let qemu = host::qemu(host, "agent")?;
    for line in qemu.vm(name).agent(command, timeout).await? {
        if raw {
            outln!("{line}")?;
        } else {
            outln!("{}", uvmctl::escape::escaped(&line))?;
        }
    }
    Ok(0)
}
