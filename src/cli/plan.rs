//! `uvmctl plan`: what would change, shown as text, JSON or a diff; saved
//! for `apply FILE` with `--out`; or, on hcs, the calls applying it would
//! make (`--hcs-requests`).

use super::args::{Output, PlanArgs};
use super::host::{self, TempCache, spec_dir, temp_dir};
use super::shared::{limits, plan_options, print_errors, print_refused, saved_plan};
use super::{EXIT_CHANGES, EXIT_ERROR, EXIT_POLICY};
use anyhow::{Context, bail};
use std::sync::Arc;
use uvmctl::apply::{self, ApplyOptions};
use uvmctl::plan::render;
use uvmctl::reconcile;
use uvmctl::virtstack::{HostOptions, Kind};
use uvmctl::vm::Observe;

pub async fn run(args: PlanArgs, host: &HostOptions) -> anyhow::Result<u8> {
    if args.diff && args.output == Output::Json {
        bail!("--diff shows a text diff; it does not go with --output json");
    }
    if args.hcs_requests && host.virtstack != Kind::Hcs {
        bail!(
            "--hcs-requests shows what the hcs virtstack sends: give --virtstack hcs (not {})",
            host.virtstack
        );
    }
    let (dir, _cache, _revision) =
        spec_dir(&args.dir, &args.git, &args.placement, host, true, false).await?;
    let live = match &args.observed {
        None => Some(host::live(host, true).await?.0),
        Some(_) => None,
    };
    let vs: Arc<dyn Observe> = match (&live, &args.observed) {
        (Some(live), _) => live.clone(),
        (None, path) => host::observer(path.as_ref(), host).await?,
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
        Output::Json => {
            let held: Vec<render::Held> = planned
                .outside_windows(super::shared::unix_now())
                .into_iter()
                .map(|(vm, why)| render::Held {
                    vm: vm.to_string(),
                    message: why.to_string(),
                    opens_at: match why {
                        uvmctl::plan::hold::Hold::OutsideWindow {
                            next_open: Some(t), ..
                        } => Some(uvmctl::plan::hold::utc(t)),
                        _ => None,
                    },
                })
                .collect();
            out!(
                "{}",
                render::json_held(&planned.plan, errors, &refused, &held)
            )?;
        }
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
        let saved = saved_plan(
            &dir,
            &planned,
            live.as_ref(),
            &plan_options(&args.common),
            &args.common.only,
        );
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
    for (vm, why) in planned.outside_windows(super::shared::unix_now()) {
        eprintln!("{vm}: held: {why}");
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
async fn hcs_requests(planned: &reconcile::Planned, host: &HostOptions) -> anyhow::Result<u8> {
    use uvmctl::virtstack::hcs::dry_run;
    let records = TempCache(temp_dir("uvmctl-hcs")?);
    let (hcs, recorder) = dry_run::seeded(
        &planned.observed,
        &records.0,
        &host.state_dir,
        &host.hcs_allow_roots,
    )?;
    let opts = ApplyOptions {
        allow_recreate: true,
        ..ApplyOptions::default()
    };
    let quiet: apply::Progress = Arc::new(|_: &str, _: &str| {});
    let (plan, desired) = (&planned.plan, &planned.loaded.desired);
    let outcomes = apply::apply(plan, desired, Arc::new(hcs), opts, quiet).await;
    outln!(
        "{}",
        serde_json::to_string_pretty(&dry_run::calls_by_vm(&recorder))?
    )?;
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
    let clean = !failed && planned.loaded.errors.is_empty() && planned.unobserved() == 0;
    Ok(if clean { 0 } else { EXIT_ERROR })
}
