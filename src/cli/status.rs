//! What uvmctl manages on this host: `status` (with what a running watcher
//! did) and `validate`, which needs no host.

use super::EXIT_ERROR;
use super::args::Output;
use super::host;
use anyhow::Context;
use std::path::PathBuf;
use std::time::Duration;
use uvmctl::reconcile;
use uvmctl::spec;
use uvmctl::virtstack::HostOptions;
use uvmctl::vm::{Capabilities, VmName};

pub async fn validate(dir: PathBuf, output: Output) -> anyhow::Result<u8> {
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

/// `uvmctl status`: the VMs, and what a watcher of the state directory did.
pub async fn status(output: Output, host: &HostOptions) -> anyhow::Result<u8> {
    let (vs, dir) = host::live(host, true).await?;
    let watch = uvmctl::watch::status::read(&dir);
    let vs = vs.as_ref();
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

/// `uvmctl destroy`: under the state directory's lock.
pub async fn destroy(
    name: &VmName,
    lock_timeout: Duration,
    host: &HostOptions,
) -> anyhow::Result<u8> {
    let (vs, root) = host::live(host, false).await?;
    let _lock = host::lock(root, lock_timeout, "uvmctl destroy".into()).await?;
    vs.destroy(name).await?;
    eprintln!("{name}: destroyed");
    Ok(0)
}

/// `uvmctl wait`: 0 when the VM stopped as asked, 1 (with why) when it
/// died on its own, 2 when it still runs after `timeout`.
pub async fn wait(
    name: &VmName,
    timeout: Option<Duration>,
    host: &HostOptions,
) -> anyhow::Result<u8> {
    let (vs, _) = host::live(host, false).await?;
    if !vs.wait(name, timeout).await? {
        eprintln!(
            "{name}: still running after {:?}",
            timeout.unwrap_or_default()
        );
        return Ok(2);
    }
    // A VM destroyed meanwhile stopped as asked; one still listed says why
    // it stopped.
    match vs.observe(name).await.ok().and_then(|o| o.exit_error) {
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

/// `uvmctl export`: observed VMs as spec YAML.
pub async fn export(name: Option<&VmName>, host: &HostOptions) -> anyhow::Result<u8> {
    let (vs, _) = host::live(host, true).await?;
    let (yaml, skipped) = uvmctl::inspect::export(vs.as_ref(), name).await?;
    out!("{yaml}")?;
    for (vm, why) in &skipped {
        eprintln!("{vm}: not exported: cannot be observed ({why})");
    }
    Ok(if skipped.is_empty() { 0 } else { EXIT_ERROR })
}

/// `uvmctl history NAME`: what its record keeps of the changes applied to it.
pub async fn history(name: &VmName, output: Output, host: &HostOptions) -> anyhow::Result<u8> {
    let (vs, _) = host::live(host, true).await?;
    let history = vs
        .history(name)
        .await
        .with_context(|| format!("cannot read the history of {name}"))?;
    match output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&history)?)?,
        Output::Text => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            out!("{}", uvmctl::inspect::history_table(&history, now))?;
        }
    }
    Ok(0)
}

/// `uvmctl capabilities`: the virtstack's profile.
pub fn capabilities(output: Output, host: &HostOptions) -> anyhow::Result<u8> {
    let caps = Capabilities::profile(host.virtstack);
    match output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&caps)?)?,
        Output::Text => out!("{}", caps.markdown_table())?,
    }
    Ok(0)
}
