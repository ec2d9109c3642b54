//! `uvmctl serve`: one VM served over hcsshim's vmservice protocol.

use super::args::ServeArgs;
use anyhow::bail;
use std::path::PathBuf;
use uvmctl::virtstack::{self, HostOptions, Kind};
use uvmctl::vm::VmName;

pub async fn run(args: ServeArgs, host: &HostOptions) -> anyhow::Result<u8> {
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
    let qemu = HostOptions {
        virtstack: Kind::Qemu,
        ..host.clone()
    };
    let vs = virtstack::open(&qemu, false).await?.vs;
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
