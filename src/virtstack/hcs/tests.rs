use super::api::Computecore;
use super::*;
use crate::conformance::{failures, run};
use crate::vm::ErrorKind;

pub(crate) fn emulator_path() -> PathBuf {
    built_emulator().expect("the HCS emulator is built: cargo build -p uvmctl-hcs-emulator")
}

pub(crate) fn emulator() -> Arc<Computecore> {
    Arc::new(
        Computecore::load(&emulator_path(), Duration::from_secs(10)).expect("load the emulator"),
    )
}

fn hcs(dir: &Path) -> Hcs {
    Hcs::ensure_dir(dir).expect("records dir");
    Hcs::new(emulator(), dir, &[PathBuf::from("/d"), PathBuf::from("/k")])
}

/// The contract's suite, through the loading path into the emulator.
#[tokio::test]
async fn the_hcs_virtstack_conforms_against_the_emulator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vs = Arc::new(hcs(dir.path()));
    let out = run(vs.clone(), &crate::conformance::tests::fixture("hcsc")).await;
    assert_eq!(out.len(), 9);
    let failed = failures(&out);
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert!(
        vs.list().await.expect("list").is_empty(),
        "the suite leaves no VM"
    );
}

/// The emulator, validating against its own statement of the schema,
/// takes the create document of every example HCS can build.
#[test]
fn the_emulator_takes_every_example_s_create_document() {
    let hcs = emulator();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
    let loaded = crate::spec::load_dir(&root);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    for (name, vm) in &loaded.desired.vms {
        let id = format!("example-{name}");
        let doc = serde_json::to_string(&documents::create_document(&vm.config, None))
            .expect("serialize");
        // Only what the pre-flight refuses already (a tap device for
        // an HNS endpoint) may the emulator refuse.
        let refusals = documents::refusals(&vm.config);
        match hcs.create(&id, &doc) {
            Ok(()) => {
                hcs.lifecycle(&id, Verb::Terminate, None)
                    .expect("terminate");
            }
            Err(e) => assert!(
                !refusals.is_empty(),
                "{name}: the emulator refused its document: {e}"
            ),
        }
    }
}

fn refused(e: &HcsError, hresult: i32, says: &str) {
    assert_eq!(e.hresult, hresult, "{e}");
    assert!(
        e.message.as_deref().unwrap_or_default().contains(says),
        "{e} should say {says:?}"
    );
}

/// What HCS refuses, the emulator refuses: by a request the virtstack
/// makes, or by hand where the virtstack never sends it.
#[tokio::test]
async fn the_emulator_refuses_what_hcs_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vs = hcs(dir.path());
    let raw = emulator();
    let mut cfg = crate::conformance::tests::fixture("r").base;
    cfg.power_state = PowerState::Running;
    let good = serde_json::to_value(documents::create_document(&cfg, None)).expect("doc");

    // Double create, by the virtstack: a compute system of that id is
    // there already (not uvmctl's record).
    raw.create("r-twice", &good.to_string())
        .expect("first create");
    let e = vs
        .create(&VmName::new("r-twice").expect("name"), &cfg)
        .await
        .expect_err("double create");
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(
        e.to_string().contains("0x8037010f"),
        "HCS's answer is shown: {e}"
    );
    raw.lifecycle("r-twice", Verb::Terminate, None)
        .expect("terminate");

    // Unknown and mistyped fields (hand-written documents).
    let mut unknown = good.clone();
    unknown["VirtualMachine"]["Devices"]["Scsi"]["0"]["Attachments"]["0"]["Typ"] =
        "VirtualDisk".into();
    let e = raw
        .create("r-unknown", &unknown.to_string())
        .expect_err("unknown field");
    refused(&e, hr::HCS_E_INVALID_JSON, "Typ");
    let mut mistyped = good.clone();
    mistyped["VirtualMachine"]["ComputeTopology"]["Memory"]["SizeInMB"] = "256".into();
    let e = raw
        .create("r-mistyped", &mistyped.to_string())
        .expect_err("mistyped");
    refused(&e, hr::HCS_E_INVALID_JSON, "SizeInMB");

    // A running system, for the modify refusals.
    raw.create("r-live", &good.to_string()).expect("create");
    raw.lifecycle("r-live", Verb::Start, None).expect("start");
    // A request type the path does not accept: VPMem devices are
    // Add or Remove only.
    let update_pmem = serde_json::json!({
        "ResourcePath": "VirtualMachine/Devices/VirtualPMem/Devices/0",
        "RequestType": "Update",
        "Settings": { "HostPath": "/d/p.vhd", "ImageFormat": "Vhd1" },
    });
    let e = raw
        .modify("r-live", &update_pmem.to_string())
        .expect_err("update of vpmem");
    assert_eq!(e.hresult, hr::E_INVALIDARG, "{e}");
    // An attachment to a controller that does not exist.
    let to_missing = serde_json::json!({
        "ResourcePath": "VirtualMachine/Devices/Scsi/3/Attachments/0",
        "RequestType": "Add",
        "Settings": { "Type": "VirtualDisk", "Path": "/d/x.vhdx" },
    });
    let e = raw
        .modify("r-live", &to_missing.to_string())
        .expect_err("no controller 3");
    refused(&e, hr::NOT_FOUND, "3");
    raw.lifecycle("r-live", Verb::Terminate, None)
        .expect("terminate");

    // A modify on a system that is made but not running.
    raw.create("r-made", &good.to_string()).expect("create");
    let add = documents::modify_request(&Change::Add(crate::vm::items::Item::ScsiDisk(
        crate::vm::items::ScsiDiskItem {
            controller: 0,
            disk: crate::spec::ScsiDisk {
                lun: 5,
                path: "/d/5.img".into(),
                disk_type: crate::vm::ScsiDiskType::PassThrough,
                read_only: false,
            },
        },
    )))
    .expect("request")
    .expect("a device request");
    let text = serde_json::to_string(&add).expect("serialize");
    let e = raw.modify("r-made", &text).expect_err("not running");
    assert_eq!(e.hresult, hr::HCS_E_INVALID_STATE, "{e}");
    // The same request is taken once it runs.
    raw.lifecycle("r-made", Verb::Start, None).expect("start");
    raw.modify("r-made", &text)
        .expect("a running system takes it");
    raw.lifecycle("r-made", Verb::Terminate, None)
        .expect("terminate");

    // The virtstack itself never sends a device change to a VM that
    // does not run: it says so first.
    let vm = VmName::new("r-stopped").expect("name");
    vs.create(&vm, &cfg).await.expect("create");
    let e = vs
        .change(
            &vm,
            &Change::Add(crate::vm::items::Item::ScsiDisk(
                crate::vm::items::ScsiDiskItem {
                    controller: 0,
                    disk: crate::spec::ScsiDisk {
                        lun: 5,
                        path: "/d/5.img".into(),
                        disk_type: crate::vm::ScsiDiskType::PassThrough,
                        read_only: false,
                    },
                },
            )),
        )
        .await
        .expect_err("not running");
    assert_eq!(e.kind(), ErrorKind::WrongState, "{e}");
    vs.destroy(&vm).await.expect("destroy");
}

/// Memory size and CPU group are value paths: the virtstack sends them
/// without a RequestType, as hcsshim does, and HCS (the emulator) takes
/// that on a running VM, where a device path without one is refused.
#[tokio::test]
async fn value_paths_take_no_request_type_and_device_paths_need_one() {
    use crate::vm::items::Item;
    let dir = tempfile::tempdir().expect("tempdir");
    let vs = hcs(dir.path());
    let mut cfg = crate::conformance::tests::fixture("v").base;
    cfg.power_state = PowerState::Running;
    let vm = VmName::new("v-values").expect("name");
    vs.create(&vm, &cfg).await.expect("create");
    vs.start(&vm, false).await.expect("start");

    let grown = cfg.memory.size_mb * 2;
    let resize = Change::Update {
        before: Item::Memory(cfg.memory.size_mb),
        after: Item::Memory(grown),
    };
    let request = documents::modify_request(&resize)
        .expect("request")
        .expect("a modify");
    assert_eq!(request.request_type, None, "hcsshim sends none");
    vs.change(&vm, &resize)
        .await
        .expect("the emulator takes a resize");

    let group = "7c2b9a10-5d3e-4f61-8a7b-0c9d8e7f6a51".to_string();
    let join = Change::Update {
        before: Item::CpuGroup(None),
        after: Item::CpuGroup(Some(group.clone())),
    };
    vs.change(&vm, &join).await.expect("join a CPU group");
    let leave = Change::Update {
        before: Item::CpuGroup(Some(group)),
        after: Item::CpuGroup(None),
    };
    vs.change(&vm, &leave).await.expect("leave it");
    let seen = vs.observe(&vm).await.expect("observe").config;
    assert_eq!(seen.memory.size_mb, grown);
    assert_eq!(seen.windows.and_then(|w| w.cpu_group), None);

    // A device path without a RequestType is refused, by hand: the
    // virtstack never sends one.
    let untyped = serde_json::json!({
        "ResourcePath": "VirtualMachine/Devices/Scsi/0/Attachments/6",
        "Settings": { "Type": "VirtualDisk", "Path": "/d/6.vhdx" },
    });
    let e = emulator()
        .modify(&system_id(&vm), &untyped.to_string())
        .expect_err("a device path needs a RequestType");
    refused(&e, hr::E_INVALIDARG, "needs a RequestType");
    vs.destroy(&vm).await.expect("destroy");
}

/// Before Windows 10 2104 there is no HcsWaitForComputeSystemExit:
/// exits are polled from the system's state.
#[test]
fn without_the_exit_wait_exits_are_polled() {
    let raw = Computecore::load(&emulator_path(), Duration::from_secs(10))
        .expect("load")
        .without_exit_wait();
    let cfg = crate::conformance::tests::fixture("p").base;
    let doc = serde_json::to_string(&documents::create_document(&cfg, None)).expect("doc");
    raw.create("p-poll", &doc).expect("create");
    raw.lifecycle("p-poll", Verb::Start, None).expect("start");
    assert!(
        !raw.wait_exit("p-poll", Duration::from_millis(250))
            .expect("wait")
    );
    raw.lifecycle("p-poll", Verb::Terminate, None)
        .expect("terminate");
    assert!(
        raw.wait_exit("p-poll", Duration::from_millis(250))
            .expect("wait")
    );
}

/// A compute system of a VM's name that another owner made is never
/// changed: observed as not uvmctl's, refused by the verbs, and a
/// destroy takes only uvmctl's record.
#[tokio::test]
async fn another_owner_s_system_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vs = hcs(dir.path());
    let raw = emulator();
    let cfg = crate::conformance::tests::fixture("o").base;
    let mut doc = serde_json::to_value(documents::create_document(&cfg, None)).expect("doc");
    doc["Owner"] = "someone-else".into();
    raw.create("o-theirs", &doc.to_string()).expect("create");
    raw.lifecycle("o-theirs", Verb::Start, None).expect("start");
    let vm = VmName::new("o-theirs").expect("name");
    vs.adopt(
        &vm,
        &HcsRecord {
            config: cfg,
            saved: None,
            history: Default::default(),
        },
    )
    .expect("record");
    assert!(!vs.observe(&vm).await.expect("observe").managed);
    let e = vs.stop(&vm).await.expect_err("not ours to stop");
    assert_eq!(e.kind(), ErrorKind::Refused, "{e}");
    assert!(e.to_string().contains("someone-else"), "{e}");
    vs.destroy(&vm).await.expect("destroy takes the record");
    assert!(vs.list().await.expect("list").is_empty());
    let props = raw.properties("o-theirs", "{}").expect("still there");
    assert!(props.contains("Running"), "{props}");
    raw.lifecycle("o-theirs", Verb::Terminate, None)
        .expect("terminate");
}

/// Operations on closed handles, through the raw ABI (the wrapper
/// never keeps a handle past its call).
#[test]
fn closed_handles_are_refused() {
    type Handle = *mut std::ffi::c_void;
    let path = emulator_path();
    // SAFETY: the emulator, with the C signatures of computecore.dll.
    unsafe {
        let lib = libloading::Library::new(&path).expect("load");
        let create_op: libloading::Symbol<
            unsafe extern "system" fn(
                *const std::ffi::c_void,
                Option<unsafe extern "system" fn(Handle, *mut std::ffi::c_void)>,
            ) -> Handle,
        > = lib.get(b"HcsCreateOperation\0").expect("symbol");
        let close_op: libloading::Symbol<unsafe extern "system" fn(Handle)> =
            lib.get(b"HcsCloseOperation\0").expect("symbol");
        let create: libloading::Symbol<
            unsafe extern "system" fn(
                *const u16,
                *const u16,
                Handle,
                *const std::ffi::c_void,
                *mut Handle,
            ) -> i32,
        > = lib.get(b"HcsCreateComputeSystem\0").expect("symbol");
        let close: libloading::Symbol<unsafe extern "system" fn(Handle)> =
            lib.get(b"HcsCloseComputeSystem\0").expect("symbol");
        let start: libloading::Symbol<
            unsafe extern "system" fn(Handle, Handle, *const u16) -> i32,
        > = lib.get(b"HcsStartComputeSystem\0").expect("symbol");
        let wide = |s: &str| s.encode_utf16().chain([0]).collect::<Vec<u16>>();
        let cfg = crate::conformance::tests::fixture("h").base;
        let doc =
            wide(&serde_json::to_string(&documents::create_document(&cfg, None)).expect("doc"));
        let id = wide("handles");
        let op = create_op(std::ptr::null(), None);
        let mut system: Handle = std::ptr::null_mut();
        assert_eq!(
            create(id.as_ptr(), doc.as_ptr(), op, std::ptr::null(), &mut system),
            0
        );
        close_op(op);
        close(system);
        let op = create_op(std::ptr::null(), None);
        let e_handle = 0x8007_0006_u32 as i32;
        assert_eq!(
            start(system, op, std::ptr::null()),
            e_handle,
            "a closed system handle"
        );
        close_op(op);
        let op2 = create_op(std::ptr::null(), None);
        close_op(op2);
        let mut again: Handle = std::ptr::null_mut();
        assert_eq!(
            create(id.as_ptr(), doc.as_ptr(), op2, std::ptr::null(), &mut again),
            e_handle,
            "a closed operation handle"
        );
    }
}

/// Issue 33: HCS hands out result documents its caller frees with
/// `LocalFree`. Under Windows' loader (Wine, in scripts/test-windows) an
/// emulator that handed out Rust heap buffers had them freed by the wrong
/// allocator: after some reads a document came back empty or garbage.
/// Every one of 200 reads through the loading path is whole here.
#[test]
fn two_hundred_property_reads_each_come_back_whole() {
    let hcs = emulator();
    let id = format!("reads-{}", std::process::id());
    let doc = serde_json::json!({
        "SchemaVersion": {"Major": 2, "Minor": 1},
        "Owner": "uvmctl-test",
        "ShouldTerminateOnLastHandleClosed": false,
        "VirtualMachine": {
            "ComputeTopology": {
                "Memory": {"SizeInMB": 64},
                "Processor": {"Count": 1}
            }
        }
    });
    hcs.create(&id, &doc.to_string()).expect("create");
    let mut first = None;
    for i in 0..200 {
        let text = hcs.properties(&id, "{}").expect("properties");
        let props: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("read {i}: not JSON ({e}): {text:?}"));
        assert_eq!(props["Id"], id.as_str(), "read {i}: {text}");
        assert_eq!(props["Owner"], "uvmctl-test", "read {i}: {text}");
        match &first {
            None => first = Some(text),
            Some(f) => assert_eq!(*f, text, "read {i} differs from the first"),
        }
    }
    hcs.lifecycle(&id, Verb::Terminate, None)
        .expect("terminate");
}
