//! Plan 10,000 specs (one file each, about 6.6 MB of YAML) from disk to
//! rendered JSON, next to serde_yaml parsing the same bytes alone on one
//! thread. Target: the whole plan within 1.0× the single-threaded parse.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::PathBuf;
use uvmctl::plan::{PlanOptions, plan, render};
use uvmctl::spec::{VmDocument, load_dir};
use uvmctl::virtstack::{Capabilities, HostFacts, ObservedState, ObservedVm};
use uvmctl::vm::State;

mod common;
use common::{VMS, spec};

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut texts = Vec::with_capacity(VMS);
    let mut observed = ObservedState::default();
    for i in 0..VMS {
        let text = spec(i, 512);
        let path: PathBuf = dir.path().join(format!("vm-{i:05}.yaml"));
        std::fs::write(&path, &text).expect("write spec");
        // The host runs the whole fleet; one VM in ten has drifted.
        let host_text = spec(i, if i % 10 == 0 { 256 } else { 512 });
        let doc: VmDocument = serde_yaml::from_str(&host_text).expect("generated spec parses");
        observed.vms.insert(
            doc.metadata.name,
            ObservedVm {
                config: doc.spec,
                state: State::Running,
                managed: true,
                exit_error: None,
                memory_hotplug: None,
            },
        );
        texts.push(text);
    }
    let bytes: usize = texts.iter().map(String::len).sum();
    eprintln!(
        "{VMS} specs, {bytes} bytes of YAML ({:.2} MB)",
        bytes as f64 / 1e6
    );
    let caps = Capabilities::qemu(&HostFacts::default());

    let mut g = c.benchmark_group("plan_10k");
    g.sample_size(10);
    g.bench_function("plan_from_disk_to_json", |b| {
        b.iter(|| {
            let loaded = load_dir(dir.path());
            assert!(loaded.errors.is_empty());
            let p = plan(&loaded.desired, &observed, &caps, &PlanOptions::default());
            black_box(render::json(&p, &loaded.errors, &[]))
        })
    });
    // Issue 30: a writable image another VM of the host has is refused at
    // plan time. Every spec here is a VM to create, on a host of 10,000
    // others holding images of their own (none of the new VMs'): one
    // look-up per image.
    let others: ObservedState = {
        let mut o = ObservedState::default();
        for (name, vm) in &observed.vms {
            let mut vm = vm.clone();
            for c in &mut vm.config.scsi_controllers {
                for d in &mut c.disks {
                    d.path = format!("/var/lib/uvmctl/disks/other-{name}.vhdx").into();
                }
            }
            o.vms.insert(format!("other-{name}"), vm);
        }
        o
    };
    let loaded = load_dir(dir.path());
    let creates = plan(
        &loaded.desired,
        &ObservedState::default(),
        &caps,
        &PlanOptions::default(),
    );
    g.bench_function("images_held_by_others_10k_creates", |b| {
        b.iter(|| {
            let refused = uvmctl::plan::images::held_by_others(&creates, &loaded.desired, &others);
            assert!(refused.is_empty());
            black_box(refused)
        })
    });
    // Issue 30: a document serde refuses is walked against the schema for
    // every fault; a commit that breaks every spec costs this much.
    let broken = tempfile::tempdir().expect("tempdir");
    for (i, t) in texts.iter().enumerate() {
        let bad = t.replace("  processors:", "  procesors:");
        std::fs::write(broken.path().join(format!("vm-{i:05}.yaml")), bad).expect("write spec");
    }
    g.bench_function("load_10k_every_spec_broken", |b| {
        b.iter(|| {
            let loaded = load_dir(broken.path());
            assert_eq!(loaded.desired.unknown.len(), VMS);
            black_box(loaded.errors.len())
        })
    });
    g.bench_function("serde_yaml_parse_value_single_thread", |b| {
        b.iter(|| {
            for t in &texts {
                black_box(serde_yaml::from_str::<serde_yaml::Value>(t).expect("parses"));
            }
        })
    });
    g.bench_function("serde_yaml_parse_typed_single_thread", |b| {
        b.iter(|| {
            for t in &texts {
                black_box(serde_yaml::from_str::<VmDocument>(t).expect("parses"));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
