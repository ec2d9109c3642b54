//! What judging health costs (issue 34): one probe asked of a VM on the
//! simulator, and one whole judgement (`judge_change`, as `apply
//! --wait-healthy` and the watcher run it) of each of 100 simulated VMs,
//! on one thread. A probe is asked once per VM per interval while a change
//! is judged, and never once the verdict is in, so this is the watcher's
//! CPU per VM per probe interval while judging (the simulator's part, a
//! record read, included; QEMU's agent round trip is not). Once per
//! change, the change and then its verdict are written into the VM's
//! history, in its record.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use uvmctl::apply::healthy::judge_change;
use uvmctl::reconcile::history;
use uvmctl::virtstack::sim::Sim;
use uvmctl::vm::config::{Health, Probe, ProbeKind, VmConfig};
use uvmctl::vm::health::{ProbeCursor, Verdict};
use uvmctl::vm::{Virtstack, VmName};

const VMS: usize = 100;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    Sim::ensure_dir(dir.path()).expect("records dir");
    let sim = Arc::new(Sim::new(dir.path()));
    let health = Health {
        probes: vec![Probe {
            min_healthy_seconds: 0,
            ..Probe::of(ProbeKind::Agent)
        }],
    };
    let names: Vec<VmName> = (0..VMS)
        .map(|i| VmName::new(&format!("vm-{i:03}")).expect("name"))
        .collect();
    let doc: uvmctl::spec::VmDocument = serde_yaml::from_str(
        "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: x\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: /k/vmlinuz\n  processors:\n    count: 1\n  memory:\n    sizeMB: 256\n",
    )
    .expect("spec");
    let cfg = VmConfig {
        health: Some(health.clone()),
        ..doc.spec
    };
    rt.block_on(async {
        for name in &names {
            sim.create(name, &cfg).await.expect("create");
            sim.start(name, false).await.expect("start");
        }
    });

    let mut g = c.benchmark_group("health_100_sim");
    g.bench_function("one_probe_per_vm", |b| {
        b.iter(|| {
            rt.block_on(async {
                for name in &names {
                    let answer = sim
                        .probe(name, &health.probes[0], &mut ProbeCursor::default())
                        .await
                        .expect("probe");
                    black_box(answer);
                }
            })
        })
    });
    g.bench_function("one_judgement_per_vm", |b| {
        b.iter(|| {
            rt.block_on(async {
                for name in &names {
                    let verdict =
                        judge_change(sim.as_ref(), name, &health, false, false, &mut |_, _, _| {})
                            .await;
                    assert_eq!(verdict, Verdict::Healthy);
                }
            })
        })
    });
    // What each change adds: its entry written into the VM's history,
    // then its verdict (two record reads and writes on the simulator).
    g.bench_function("one_change_and_verdict_in_the_history_per_vm", |b| {
        let spec = cfg.digest();
        b.iter(|| {
            rt.block_on(async {
                for name in &names {
                    let applied = history::Note {
                        applied: Some(&cfg),
                        revision: Some("main@sha1:0".into()),
                        ..history::Note::default()
                    };
                    black_box(history::write(sim.as_ref(), name, applied).await);
                    let judged = history::Note {
                        verdicts: vec![(spec.clone(), Verdict::Healthy)],
                        ..history::Note::default()
                    };
                    black_box(history::write(sim.as_ref(), name, judged).await);
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
