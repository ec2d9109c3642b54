//! `uvmctl apply`: the specs (or a saved plan) made real, after every check
//! that can refuse has passed, with progress, and a summary that says where
//! each VM was left.

use super::args::ApplyArgs;
use super::host::{self, lock, spec_dir};
use super::shared::{limits, plan_options, print_errors, print_refused, saved_plan};
use super::{EXIT_ERROR, EXIT_POLICY, EXIT_STALE_PLAN};
use anyhow::bail;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use uvmctl::apply::{self, ApplyOptions};
use uvmctl::plan::hold::Limits;
use uvmctl::plan::render;
use uvmctl::reconcile;
use uvmctl::virtstack::HostOptions;

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

/// Once set, every VM stops after the step in flight.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ctrl+C: every VM finishes the step in flight and stops, and the summary
/// says where each was left; a second Ctrl+C exits at once.
fn on_interrupt() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        while tokio::signal::ctrl_c().await.is_ok() {
            if INTERRUPTED.swap(true, Ordering::Relaxed) {
                eprintln!("interrupted again: exiting now, steps in flight abandoned");
                std::process::exit(130);
            }
            eprintln!(
                "interrupted: each VM stops after the step in flight (Ctrl+C again exits at once)"
            );
        }
    })
}

pub async fn run(mut args: ApplyArgs, host: &HostOptions) -> anyhow::Result<u8> {
    let (mut dir, _cache, revision) = spec_dir(
        &args.dir,
        &args.git,
        &args.placement,
        host,
        false,
        args.ignore_gate,
    )
    .await?;
    let saved = match &args.git.git {
        Some(_) => None,
        None => reconcile::read_saved_plan(&dir)?,
    };
    let mut opts = plan_options(&args.common);
    if let Some(s) = &saved {
        // The plan's own options are what it was computed with.
        let placed = args.placement.placement()?.is_some();
        s.adopt(&dir, &mut opts, &mut args.common.only, placed)?;
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
    let (vs, root) = host::live(host, false).await?;
    let _lock = lock(
        root,
        args.lock_timeout,
        format!("uvmctl apply {}", dir.display()),
    )
    .await?;

    let observed = reconcile::observe_all(vs.as_ref()).await?;
    let only = &args.common.only;
    let planned = match reconcile::Planned::new(loaded, observed, vs.as_ref(), &opts, only) {
        Ok(p) => p,
        // A VM the saved plan was made for is gone since: stale, not a typo.
        Err(e) if saved.is_some() => {
            eprintln!("{e}; the saved plan is stale and nothing was applied: plan again");
            return Ok(EXIT_STALE_PLAN);
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(s) = &saved {
        let now = saved_plan(&dir, &planned, vs.as_ref(), &opts, only);
        let stale = s.stale(&now);
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
    let shown = render::text(&planned.plan, &args.common.color.style());
    if let Err(e) = out!("{shown}") {
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
    if !args.ignore_windows {
        let held = planned.outside_windows(super::shared::unix_now());
        if !held.is_empty() {
            for (vm, why) in &held {
                eprintln!("{vm}: held: {why}");
            }
            eprintln!(
                "{} VM(s) held by the maintenance windows of {}; nothing was applied (--ignore-windows applies anyway)",
                held.len(),
                uvmctl::spec::policy::POLICY_FILE
            );
            return Ok(EXIT_POLICY);
        }
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
    let interrupts = on_interrupt();
    let opts = ApplyOptions {
        allow_recreate: args.allow_recreate,
        wait_healthy: args.wait_healthy,
        interrupt: Some(&INTERRUPTED),
    };
    let applied = planned.apply(vs, opts, revision, progress).await;
    interrupts.abort();
    eprintln!("{applied}");
    if INTERRUPTED.load(Ordering::Relaxed) {
        return Ok(130);
    }
    Ok(if applied.converged() { 0 } else { EXIT_ERROR })
}
