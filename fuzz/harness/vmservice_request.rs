//! The vmservice server's requests, as any client may send them (uvmctl
//! serve runs as root): the first byte picks the call, the rest is the
//! request's protobuf encoding. Properties:
//! - decoding and handling never panic, and every refusal is a ttrpc status;
//! - a request that fails changes nothing on the VM;
//! - a `CreateVMRequest` the server accepts becomes a configuration that
//!   passes the spec validation again unchanged (it is canonical).

use protobuf::Message;
use std::sync::{Arc, LazyLock};
use ttrpc::r#async::TtrpcContext;
use uvmctl::protocol::convert;
use uvmctl::protocol::vmservice as pb;
use uvmctl::protocol::vmservice_ttrpc::Vm;
use uvmctl::virtstack::fake::{Fake, FakeVm};
use uvmctl::vm::{Capabilities, HostFacts, State, VmName};
use uvmctl::vmservice::VmService;

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
});

/// A running VM with a disk, a NIC and two vCPUs, on a fake with vsock.
fn host() -> Fake {
    static CONFIG: LazyLock<uvmctl::spec::VmConfig> = LazyLock::new(config);
    let fake = Fake::new(Capabilities::qemu(&HostFacts {
        vhost_user_vsock: true,
        ..HostFacts::default()
    }));
    fake.insert(
        "vm",
        FakeVm {
            config: CONFIG.clone(),
            state: State::Running,
            managed: true,
        },
    );
    fake
}

fn config() -> uvmctl::spec::VmConfig {
    let yaml = "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: vm\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: /k/vmlinuz\n  processors:\n    count: 2\n  memory:\n    sizeMB: 512\n  scsiControllers:\n    - id: 0\n      disks:\n        - {lun: 0, path: /d/0.img, type: passthrough}\n  networkAdapters:\n    - {nicId: 6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01, endpointId: user, macAddress: 52-54-00-12-34-56}\n";
    let loaded = uvmctl::spec::load_texts(&[("vm.yaml".into(), yaml.into())]);
    (*loaded.desired.vms["vm"].config).clone()
}

fn is_status(r: &ttrpc::Result<protobuf::well_known_types::empty::Empty>) -> bool {
    matches!(r, Ok(_) | Err(ttrpc::Error::RpcStatus(_)))
}

/// Checks the properties on one input; panics when one does not hold.
pub fn check(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let ctx = TtrpcContext::default();
    match which % 3 {
        0 => {
            let Ok(req) = pb::CreateVMRequest::parse_from_bytes(bytes) else {
                return;
            };
            if let Ok(cfg) = convert::vm_config("vm", &req) {
                let again = convert::validated("vm", cfg.clone())
                    .expect("an accepted config validates again");
                assert_eq!(again, cfg, "an accepted config is canonical");
            }
            let fake = Fake::new(Capabilities::qemu(&HostFacts::default()));
            let service = VmService::new(Arc::new(fake.clone()), VmName::new("vm").expect("name"));
            let r = RT.block_on(service.create_vm(&ctx, req));
            assert!(is_status(&r), "{r:?}");
            assert_eq!(
                r.is_ok(),
                fake.get("vm").is_some(),
                "created exactly when accepted"
            );
        }
        1 => {
            let Ok(req) = pb::ModifyResourceRequest::parse_from_bytes(bytes) else {
                return;
            };
            let fake = host();
            let before = fake.get("vm");
            let service = VmService::new(Arc::new(fake.clone()), VmName::new("vm").expect("name"));
            let r = RT.block_on(service.modify_resource(&ctx, req));
            assert!(is_status(&r), "{r:?}");
            if r.is_err() {
                assert_eq!(fake.get("vm"), before, "a refused request changed the VM");
            }
        }
        _ => {
            let Ok(req) = pb::VMSocketRequest::parse_from_bytes(bytes) else {
                return;
            };
            let fake = host();
            let before = fake.get("vm");
            let service = VmService::new(Arc::new(fake.clone()), VmName::new("vm").expect("name"));
            let r = RT.block_on(service.vm_socket(&ctx, req));
            assert!(is_status(&r), "{r:?}");
            if r.is_err() {
                assert_eq!(fake.get("vm"), before, "a refused request changed the VM");
            }
        }
    }
}
