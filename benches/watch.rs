//! What `uvmctl watch` does per change, on a directory of 10,000 specs (one
//! file each): an edited file reloaded alone (with the cross-file checks run
//! over the whole cached set), a resync that finds nothing changed (a stat
//! per file), a full load for comparison, and the plan of one VM. Target: a
//! one-file change costs at most a quarter of a full load. What is left is
//! linear in the fleet (listing the directory, re-running the cross-file
//! checks, rebuilding the desired set); an index kept across reloads would
//! remove it.

use criterion::{Criterion, criterion_group, criterion_main};
use std::collections::HashSet;
use std::hint::black_box;
use uvmctl::plan::{PlanOptions, plan};
use uvmctl::spec::{DesiredState, Reload, SpecCache, VmDocument, load_dir};
use uvmctl::virtstack::{Capabilities, HostFacts, ObservedState, ObservedVm};
use uvmctl::vm::State;

mod common;
use common::{VMS, spec};

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..VMS {
        std::fs::write(dir.path().join(format!("vm-{i:05}.yaml")), spec(i, 512)).expect("write");
    }
    let mut cache = SpecCache::new(dir.path());
    let first = cache.reload(Reload::All);
    assert!(first.errors.is_empty() && first.desired.vms.len() == VMS);
    let edited = dir.path().join("vm-04242.yaml");
    let changed: HashSet<_> = [edited.clone()].into_iter().collect();
    let caps = Capabilities::qemu(&HostFacts::default());

    let mut g = c.benchmark_group("watch_10k");
    g.sample_size(20);
    let mut mb = 512;
    g.bench_function("one_file_edited_reload", |b| {
        b.iter(|| {
            mb = if mb == 512 { 1024 } else { 512 };
            std::fs::write(&edited, spec(4242, mb)).expect("write");
            let loaded = cache.reload(Reload::Paths(&changed));
            assert_eq!(cache.last_reads(), 1);
            black_box(loaded)
        })
    });
    g.bench_function("resync_nothing_changed", |b| {
        b.iter(|| {
            let loaded = cache.reload(Reload::Stamps);
            assert_eq!(cache.last_reads(), 0);
            black_box(loaded)
        })
    });
    g.sample_size(10);
    g.bench_function("full_load_for_comparison", |b| {
        b.iter(|| black_box(load_dir(dir.path())))
    });
    g.finish();

    let doc: VmDocument = serde_yaml::from_str(&spec(7, 256)).expect("parses");
    let mut observed = ObservedState::default();
    observed.vms.insert(
        doc.metadata.name.clone(),
        ObservedVm {
            config: doc.spec,
            state: State::Running,
            managed: true,
            exit_error: None,
            memory_hotplug: None,
        },
    );
    let loaded = load_dir(dir.path());
    let mut one = DesiredState::default();
    let name = "vm-00007".to_string();
    one.vms
        .insert(name.clone(), loaded.desired.vms[&name].clone());
    c.bench_function("plan_one_vm", |b| {
        b.iter(|| black_box(plan(&one, &observed, &caps, &PlanOptions::default())))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
