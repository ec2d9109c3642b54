//! What the hcs virtstack costs uvmctl itself: the create document of each
//! of the 10,000 fleet specs, built and serialized (`plan --hcs-requests`
//! and every create do this), and one VM's life through the dynamic-loading
//! path into the HCS emulator (create, start, a disk hot-added, properties,
//! terminate: the calls and UTF-16 round trips, not HCS's own work).
//! Target: the 10,000 documents in under 10 % of planning the same fleet
//! (benches/plan.rs), so the HCS path never dominates a plan.

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use uvmctl::spec::VmDocument;
use uvmctl::virtstack::hcs::api::{ComputeService, Computecore, Verb};
use uvmctl::virtstack::hcs::documents::{create_document, modify_request};
use uvmctl::vm::items::{Item, ScsiDiskItem};
use uvmctl::vm::{Change, ScsiDiskType};

mod common;
use common::{VMS, spec};

fn bench(c: &mut Criterion) {
    let configs: Vec<_> = (0..VMS)
        .map(|i| {
            let doc: VmDocument = serde_yaml::from_str(&spec(i, 512)).expect("spec parses");
            doc.spec
        })
        .collect();
    let mut g = c.benchmark_group("hcs");
    g.sample_size(10);
    g.bench_function("create_documents_10k", |b| {
        b.iter(|| {
            for cfg in &configs {
                black_box(serde_json::to_string(&create_document(cfg, None)).expect("serializes"));
            }
        })
    });

    let emulator = uvmctl::virtstack::hcs::built_emulator()
        .expect("the HCS emulator is built: cargo build -p uvmctl-hcs-emulator");
    let hcs = Computecore::load(&emulator, Duration::from_secs(10)).expect("load emulator");
    // On HCS a NIC's endpoint is an HNS endpoint's GUID, not a tap device.
    let mut cfg = configs[0].clone();
    for n in &mut cfg.network_adapters {
        n.endpoint_id = "9d0ad1f5-3c4b-4b8e-8d2f-7a6c5b4e3d21".into();
    }
    let doc = serde_json::to_string(&create_document(&cfg, None)).expect("serializes");
    let add = serde_json::to_string(
        &modify_request(&Change::Add(Item::ScsiDisk(ScsiDiskItem {
            controller: 0,
            disk: uvmctl::spec::ScsiDisk {
                lun: 1,
                path: "/var/lib/uvmctl/disks/data.vhdx".into(),
                disk_type: ScsiDiskType::Vhdx,
                read_only: false,
            },
        })))
        .expect("a request")
        .expect("a device request"),
    )
    .expect("serializes");
    g.bench_function("emulator_vm_lifecycle", |b| {
        b.iter(|| {
            hcs.create("bench", &doc).expect("create");
            hcs.lifecycle("bench", Verb::Start, None).expect("start");
            hcs.modify("bench", &add).expect("modify");
            black_box(hcs.properties("bench", "{}").expect("properties"));
            hcs.lifecycle("bench", Verb::Terminate, None)
                .expect("terminate");
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
