//! The server against the in-memory virtstack, over a real ttrpc connection.
// The server listens on unix sockets.
#![cfg(unix)]

use super::*;
use crate::virtstack::fake::Fake;
use crate::vm::{Capabilities, HostFacts};
use pb::capabilities_vmresponse::Resource as PbResource;
use pb::modify_resource_request::Resource as Modify;
use ttrpc::context;

struct Served {
    _dir: tempfile::TempDir,
    _server: Serving,
    client: svc::VmClient,
    fake: Fake,
}

fn caps() -> Capabilities {
    Capabilities::qemu(&HostFacts {
        vhost_user_vsock: true,
        ..HostFacts::default()
    })
}

async fn serve() -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vm.sock");
    let addr = format!("unix://{}", path.display());
    let fake = Fake::new(caps());
    let server = Serving::start(
        Arc::new(fake.clone()),
        VmName::new("vm").expect("name"),
        &path,
    )
    .await
    .expect("serve");
    let client = ttrpc::r#async::Client::connect(&addr)
        .await
        .expect("connect");
    Served {
        _dir: dir,
        _server: server,
        client: svc::VmClient::new(client),
        fake,
    }
}

fn code(r: &ttrpc::Error) -> Code {
    match r {
        ttrpc::Error::RpcStatus(s) => s.code(),
        _ => Code::UNKNOWN,
    }
}

fn create_request() -> pb::CreateVMRequest {
    let mut boot = pb::DirectBoot::new();
    boot.kernel_path = "/k/vmlinuz".into();
    let mut mem = pb::MemoryConfig::new();
    mem.memory_mb = 256;
    mem.allow_overcommit = true;
    let mut cpu = pb::ProcessorConfig::new();
    cpu.processor_count = 1;
    let mut c = pb::VMConfig::new();
    c.set_direct_boot(boot);
    c.memory_config = Some(mem).into();
    c.processor_config = Some(cpu).into();
    let mut r = pb::CreateVMRequest::new();
    r.config = Some(c).into();
    r
}

fn ctx() -> context::Context {
    context::with_duration(Duration::from_secs(10))
}

fn scsi(ty: pb::ModifyType, lun: u32) -> pb::ModifyResourceRequest {
    let mut d = pb::SCSIDisk::new();
    d.controller = 0;
    d.lun = lun;
    d.host_path = format!("/d/{lun}.img");
    d.type_ = pb::DiskType::SCSI_DISK_TYPE_PHYSICAL.into();
    let mut r = pb::ModifyResourceRequest::new();
    r.type_ = ty.into();
    r.set_scsi_disk(d);
    r
}

#[tokio::test]
async fn a_vm_is_created_stopped_resumed_changed_paused_and_torn_down() {
    let s = serve().await;
    let c = &s.client;
    // Before CreateVM, everything but create is in the wrong state.
    let e = c.resume_vm(ctx(), &Empty::new()).await.expect_err("no VM");
    assert_eq!(code(&e), Code::FAILED_PRECONDITION);

    c.create_vm(ctx(), &create_request()).await.expect("create");
    assert_eq!(s.fake.get("vm").expect("created").state, State::Created);
    let e = c
        .create_vm(ctx(), &create_request())
        .await
        .expect_err("twice");
    assert_eq!(code(&e), Code::FAILED_PRECONDITION);
    let e = c
        .modify_resource(ctx(), &scsi(pb::ModifyType::ADD, 1))
        .await
        .expect_err("not running");
    assert_eq!(code(&e), Code::FAILED_PRECONDITION);

    c.resume_vm(ctx(), &Empty::new()).await.expect("start");
    assert_eq!(s.fake.get("vm").expect("vm").state, State::Running);
    c.modify_resource(ctx(), &scsi(pb::ModifyType::ADD, 1))
        .await
        .expect("add disk");
    let have = s.fake.get("vm").expect("vm").config;
    assert_eq!(have.scsi_controllers[0].disks[0].lun, 1, "{have:?}");
    let e = c
        .modify_resource(ctx(), &scsi(pb::ModifyType::ADD, 1))
        .await
        .expect_err("again");
    assert_eq!(code(&e), Code::ALREADY_EXISTS);
    c.modify_resource(ctx(), &scsi(pb::ModifyType::REMOVE, 1))
        .await
        .expect("remove disk");
    let e = c
        .modify_resource(ctx(), &scsi(pb::ModifyType::REMOVE, 1))
        .await
        .expect_err("gone");
    assert_eq!(code(&e), Code::NOT_FOUND);

    c.pause_vm(ctx(), &Empty::new()).await.expect("pause");
    assert_eq!(s.fake.get("vm").expect("vm").state, State::Paused);
    c.resume_vm(ctx(), &Empty::new()).await.expect("resume");

    let mut q = pb::InspectVMRequest::new();
    q.query = "state".into();
    let r = c.inspect_vm(ctx(), &q).await.expect("inspect");
    assert_eq!(r.result.string_value(), "running");
    q.query = "nonsense".into();
    assert_eq!(
        code(&c.inspect_vm(ctx(), &q).await.expect_err("unknown query")),
        Code::INVALID_ARGUMENT
    );

    let props = c
        .properties_vm(ctx(), &pb::PropertiesVMRequest::new())
        .await
        .expect("props");
    assert_eq!(props.memory_stats.assigned_memory, 256 << 20);

    // WaitVM on the same connection returns once TeardownVM ran.
    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            c.wait_vm(context::with_duration(Duration::ZERO), &Empty::new())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "waits while the VM runs");
    c.teardown_vm(ctx(), &Empty::new()).await.expect("teardown");
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("unblocked")
        .expect("joins")
        .expect("ok");
    assert!(s.fake.get("vm").is_none());
}

/// Issue 31: one connection parked 12,000 `WaitVM` calls, each polling the
/// VM four times a second. Now a connection has at most
/// `MAX_CALLS_IN_FLIGHT` calls in flight (the next is read once one is
/// answered), and every waiter waits on the VM's one follower.
#[tokio::test]
async fn wait_vm_calls_are_bounded_and_wait_on_events() {
    let s = serve().await;
    let c = &s.client;
    c.create_vm(ctx(), &create_request()).await.expect("create");
    c.resume_vm(ctx(), &Empty::new()).await.expect("start");
    let observed = || s.fake.started("vm", "observe").len();
    let waiters: Vec<_> = (0..super::listen::MAX_CALLS_IN_FLIGHT)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                c.wait_vm(context::with_duration(Duration::ZERO), &Empty::new())
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = observed();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        observed() - before <= 2,
        "{} observations while {} waiters waited",
        observed() - before,
        waiters.len()
    );
    let mut q = pb::InspectVMRequest::new();
    q.query = "state".into();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), c.inspect_vm(ctx(), &q))
            .await
            .is_err(),
        "a call past the bound waits on this connection"
    );
    let path = s._dir.path().join("vm.sock");
    let other = svc::VmClient::new(
        ttrpc::r#async::Client::connect(&format!("unix://{}", path.display()))
            .await
            .expect("connect"),
    );
    let r = other
        .inspect_vm(ctx(), &q)
        .await
        .expect("another connection");
    assert_eq!(r.result.string_value(), "running");

    // The VM stops on its own: every waiter returns, and the connection is
    // read again.
    s.fake.crash("vm", "halted");
    for w in waiters {
        tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .expect("unblocked")
            .expect("joins")
            .expect("ok");
    }
    let r = c.inspect_vm(ctx(), &q).await.expect("read again");
    assert_eq!(r.result.string_value(), "terminated");
}

#[tokio::test]
async fn bad_requests_get_their_status_and_change_nothing() {
    let s = serve().await;
    let c = &s.client;
    let memory = |f: fn(&mut pb::MemoryConfig)| {
        let mut r = create_request();
        if let Some(m) = r.config.as_mut().and_then(|x| x.memory_config.as_mut()) {
            f(m);
        }
        r
    };
    let mut no_memory = create_request();
    if let Some(x) = no_memory.config.as_mut() {
        x.memory_config.clear();
    }
    let absurd = memory(|m| m.memory_mb = 1 << 40);
    let mmio = memory(|m| {
        m.low_mmio_gap_in_mb = 512;
        m.high_mmio_base_in_mb = 65536;
        m.high_mmio_gap_in_mb = 1024;
    });
    for (req, want) in [
        (pb::CreateVMRequest::new(), Code::INVALID_ARGUMENT),
        (no_memory, Code::INVALID_ARGUMENT),
        (absurd, Code::INVALID_ARGUMENT),
        (mmio, Code::UNIMPLEMENTED),
    ] {
        let e = c.create_vm(ctx(), &req).await.expect_err("refused");
        assert_eq!(code(&e), want, "{e:?}");
        assert!(s.fake.get("vm").is_none(), "nothing created");
    }
    c.create_vm(ctx(), &create_request()).await.expect("create");
    c.resume_vm(ctx(), &Empty::new()).await.expect("start");
    let before = s.fake.get("vm");
    let mut outside = scsi(pb::ModifyType::ADD, 1);
    if let Some(Modify::ScsiDisk(d)) = outside.resource.as_mut() {
        d.host_path = "relative/disk.img".into();
    }
    assert_eq!(
        code(&c.modify_resource(ctx(), &outside).await.expect_err("path")),
        Code::INVALID_ARGUMENT
    );
    let mut unknown = scsi(pb::ModifyType::ADD, 1);
    unknown.type_ = protobuf::EnumOrUnknown::from_i32(9);
    assert_eq!(
        code(&c.modify_resource(ctx(), &unknown).await.expect_err("enum")),
        Code::INVALID_ARGUMENT
    );
    let mut r = pb::ModifyResourceRequest::new();
    r.set_processor_config(pb::ModifyProcessorConfigRequest::new());
    assert_eq!(
        code(&c.modify_resource(ctx(), &r).await.expect_err("weight")),
        Code::UNIMPLEMENTED
    );
    assert_eq!(
        code(
            &c.modify_resource(ctx(), &pb::ModifyResourceRequest::new())
                .await
                .expect_err("empty")
        ),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(s.fake.get("vm"), before, "no request changed the VM");
    assert!(
        !s.fake.log().iter().any(|l| l.contains("scsi")),
        "{:?}",
        s.fake.log()
    );
}

#[tokio::test]
async fn capabilities_are_the_virtstacks_and_a_missed_deadline_leaves_the_server_healthy() {
    let s = serve().await;
    let c = &s.client;
    let got = c.capabilities_vm(ctx(), &Empty::new()).await.expect("caps");
    assert_eq!(got, capabilities(&caps()));
    let scsi_row = got
        .supported_resources
        .iter()
        .find(|r| r.resource.enum_value() == Ok(PbResource::Scsi))
        .expect("scsi");
    assert!(scsi_row.Add && scsi_row.Remove && !scsi_row.Update);

    c.create_vm(ctx(), &create_request()).await.expect("create");
    c.resume_vm(ctx(), &Empty::new()).await.expect("start");
    s.fake.hang("vm", "add scsiDisk");
    let e = c
        .modify_resource(
            context::with_duration(Duration::from_millis(300)),
            &scsi(pb::ModifyType::ADD, 2),
        )
        .await
        .expect_err("past its deadline");
    // The client's own timer fires at the same deadline as the server's.
    assert!(
        matches!(code(&e), Code::DEADLINE_EXCEEDED)
            || matches!(&e, ttrpc::Error::Others(m) if m.contains("deadline")),
        "{e:?}"
    );
    // The server answers the next call at once.
    c.pause_vm(ctx(), &Empty::new())
        .await
        .expect("still serving");
    assert_eq!(s.fake.get("vm").expect("vm").state, State::Paused);
}

#[tokio::test]
async fn the_server_answers_deadline_exceeded_when_the_clients_deadline_passes() {
    let s = serve().await;
    let service = VmService::new(Arc::new(s.fake.clone()), VmName::new("vm").expect("name"));
    use svc::Vm as _;
    service
        .create_vm(&TtrpcContext::default(), create_request())
        .await
        .expect("create");
    service
        .resume_vm(&TtrpcContext::default(), Empty::new())
        .await
        .expect("start");
    s.fake.hang("vm", "add scsiDisk");
    let ctx = TtrpcContext {
        timeout_nano: 200_000_000,
        ..TtrpcContext::default()
    };
    let e = service
        .modify_resource(&ctx, scsi(pb::ModifyType::ADD, 3))
        .await
        .expect_err("hangs");
    assert_eq!(code(&e), Code::DEADLINE_EXCEEDED, "{e:?}");
    // Abandoned: the next change is not blocked behind it.
    service.pause_vm(&ctx, Empty::new()).await.expect("pause");
}

/// A VM created over the wire with `backing` (the protocol's
/// `allow_overcommit`), started.
async fn running_vm(c: &svc::VmClient, overcommit: bool) {
    let mut r = create_request();
    if let Some(m) = r.config.as_mut().and_then(|c| c.memory_config.as_mut()) {
        m.allow_overcommit = overcommit;
    }
    c.create_vm(ctx(), &r).await.expect("create");
    c.resume_vm(ctx(), &Empty::new()).await.expect("start");
}

fn memory_update(mb: u64) -> pb::ModifyResourceRequest {
    let mut m = pb::ModifyMemoryRequest::new();
    m.memory_mb = mb;
    let mut r = pb::ModifyResourceRequest::new();
    r.type_ = pb::ModifyType::UPDATE.into();
    r.set_memory(m);
    r
}

fn status_of(e: &ttrpc::Error) -> (Code, String) {
    match e {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message.clone()),
        e => (Code::UNKNOWN, format!("{e:?}")),
    }
}

#[tokio::test]
async fn a_memory_update_on_pinned_memory_is_a_failed_precondition_with_the_reason() {
    let s = serve().await;
    running_vm(&s.client, false).await;
    let e = s
        .client
        .modify_resource(ctx(), &memory_update(512))
        .await
        .expect_err("pinned");
    let (code, message) = status_of(&e);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
    assert!(message.contains("physical backing"), "{message}");
    assert!(message.contains("restart"), "{message}");
    assert_eq!(s.fake.get("vm").expect("vm").config.memory.size_mb, 256);
}

#[tokio::test]
async fn a_device_the_vm_does_not_have_is_not_found() {
    let s = serve().await;
    running_vm(&s.client, true).await;
    let e = s
        .client
        .modify_resource(ctx(), &scsi(pb::ModifyType::REMOVE, 7))
        .await
        .expect_err("no disk 0:7");
    assert_eq!(code(&e), Code::NOT_FOUND, "{e:?}");
    let mut nic = pb::NICConfig::new();
    nic.nic_id = "6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01".into();
    let mut r = pb::ModifyResourceRequest::new();
    r.type_ = pb::ModifyType::REMOVE.into();
    r.set_nic_config(nic);
    let e = s
        .client
        .modify_resource(ctx(), &r)
        .await
        .expect_err("no NIC");
    assert_eq!(code(&e), Code::NOT_FOUND, "{e:?}");
}

/// One request of `op` on the protocol resource `r`, fit for a VM that
/// has what the earlier requests of the sequence added.
fn request_for(r: PbResource, op: pb::ModifyType) -> Option<pb::ModifyResourceRequest> {
    let mut req = pb::ModifyResourceRequest::new();
    req.type_ = op.into();
    match r {
        PbResource::Scsi => return Some(scsi(op, 1)),
        PbResource::Vpmem => {
            let mut d = pb::VPMEMDisk::new();
            d.host_path = "/d/pmem.vhdx".into();
            d.type_ = pb::DiskType::SCSI_DISK_TYPE_VHDX.into();
            req.set_vpmem_disk(d);
        }
        PbResource::VMNic => {
            let mut n = pb::NICConfig::new();
            n.nic_id = "6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c02".into();
            n.port_id = "user".into();
            n.mac_address = "52-54-00-12-34-57".into();
            req.set_nic_config(n);
        }
        PbResource::Memory => {
            let mut m = pb::ModifyMemoryRequest::new();
            m.memory_mb = 512;
            req.set_memory(m);
        }
        PbResource::Processor if op == pb::ModifyType::UPDATE => {
            // The protocol's processor update is weight and limit.
            let mut p = pb::ModifyProcessorConfigRequest::new();
            p.processor_weight = 100;
            req.set_processor_config(p);
        }
        PbResource::Processor => req.set_processor(pb::ModifyProcessorRequest::new()),
        PbResource::Vpci => {
            let mut w = pb::WindowsPCIDevice::new();
            w.instance_id = "PCI\\VEN_1AF4&DEV_1000\\3&267A616A&0&18".into();
            req.set_windows_device(w);
        }
        // ModifyResource has no Plan9 message.
        PbResource::Plan9 => return None,
    }
    Some(req)
}

/// For each resource and each operation, on a VM of each memory backing,
/// `CapabilitiesVM` means what `ModifyResource` does: what it offers is
/// accepted, what it does not is refused (Add before Remove, so a removal
/// has something to remove).
#[tokio::test]
async fn capabilities_vm_says_exactly_what_modify_resource_accepts() {
    for overcommit in [true, false] {
        let s = serve().await;
        running_vm(&s.client, overcommit).await;
        let caps = s
            .client
            .capabilities_vm(ctx(), &Empty::new())
            .await
            .expect("capabilities");
        let mut checked = 0;
        for offered in &caps.supported_resources {
            let r = offered.resource.enum_value().expect("known resource");
            for (op, yes) in [
                (pb::ModifyType::ADD, offered.Add),
                (pb::ModifyType::REMOVE, offered.Remove),
                (pb::ModifyType::UPDATE, offered.Update),
            ] {
                let Some(req) = request_for(r, op) else {
                    assert!(!yes, "{r:?} {op:?} offered without a message");
                    continue;
                };
                let got = s.client.modify_resource(ctx(), &req).await;
                checked += 1;
                assert_eq!(
                    got.is_ok(),
                    yes,
                    "overcommit={overcommit}: {r:?} {op:?} offered={yes}, got {got:?}"
                );
            }
        }
        assert_eq!(checked, 18, "every resource but Plan9, three operations");
        let memory = caps
            .supported_resources
            .iter()
            .find(|x| x.resource.enum_value() == Ok(PbResource::Memory))
            .expect("memory listed");
        assert_eq!(memory.Update, overcommit, "memory resizes only unpinned");
    }
}
