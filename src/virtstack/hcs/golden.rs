//! Golden files of what HCS receives, reviewed against Microsoft's schema
//! reference (MicrosoftDocs Virtualization-Documentation,
//! `virtualization/api/hcs/Reference/SchemaReference.md`, one heading per
//! object; the request table in `Reference/HcsModifyComputeSystem.md`).
//! `cargo insta review` shows a change to them.
//!
//! Objects in the create documents, by their reference section:
//! - `ComputeSystem` (#ComputeSystem): Owner, SchemaVersion (#Version),
//!   ShouldTerminateOnLastHandleClosed, VirtualMachine.
//! - `VirtualMachine` (#VirtualMachine): StopOnReset, Chipset, ComputeTopology,
//!   Devices, StorageQoS (#StorageQoS), RestoreState (#RestoreState).
//! - `Chipset` (#Chipset): Uefi (#Uefi) with BootThis (#UefiBootEntry),
//!   LinuxKernelDirect (#LinuxKernelDirect, schema 2.2).
//! - `Topology` (#Topology): Memory (#VirtualMachine_Memory; the MMIO fields
//!   are 2.3, EnableColdDiscardHint 2.2), Processor (#VirtualMachine_Processor;
//!   CpuGroup #CpuGroup is 2.5).
//! - `Devices` (#Devices): ComPorts (#ComPort), Scsi (#Scsi) with
//!   Attachments (#Attachment), VirtualPMem (#VirtualPMemController) with
//!   Devices (#VirtualPMemDevice), NetworkAdapters (#NetworkAdapter), Plan9
//!   (#Plan9, shares #Plan9Share), VirtualSmb (#VirtualSmb, shares
//!   #VirtualSmbShare, options #VirtualSmbShareOptions), VirtualPci
//!   (#VirtualPciDevice, functions #VirtualPciFunction, 2.3), HvSocket
//!   (#VirtualMachine_HvSocket, #HvSocketSystemConfig, #HvSocketServiceConfig).
//!
//! `Plan9Share.Flags` is not in the reference; it is hcsshim's
//! (`internal/hcs/schema2/plan9_share.go`), which real HCS accepts.

use super::documents::{create_document, modify_request, save_options};
use crate::spec::{PciDevice, Plan9Share, ScsiDisk, VmSocket, VsmbShare};
use crate::vm::items::{Item, ScsiDiskItem};
use crate::vm::{Change, ScsiDiskType, VMSocketType, VPMemImageFormat, VsmbOptions};
use std::path::Path;

fn pretty<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("our documents serialize")
}

/// Every spec document under `specs/` (Linux and Windows), by file.
#[test]
fn create_documents_of_every_example_in_specs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("specs");
    let loaded = crate::spec::load_dir(&root);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    assert!(loaded.desired.vms.len() >= 6, "the examples are there");
    for (name, vm) in &loaded.desired.vms {
        insta::assert_snapshot!(
            format!("create_{name}"),
            pretty(&create_document(&vm.config, None))
        );
    }
}

/// A VM restored from a save is created with `RestoreState`
/// (#RestoreState), and the save asked for with `SaveOptions`
/// (#SaveOptions, SaveType `ToFile`).
#[test]
fn restore_and_save_documents() {
    let cfg = crate::spec::VmConfig {
        boot: crate::spec::Boot {
            linux_kernel_direct: Some(crate::spec::LinuxKernelDirect {
                kernel: "C:/ProgramData/uvmctl/saved/vmlinuz".into(),
                initrd: None,
                cmdline: String::new(),
            }),
            uefi: None,
        },
        ..crate::spec::VmConfig::default()
    };
    let doc = create_document(&cfg, Some("C:/ProgramData/uvmctl/state/hcs/saved.vmrs"));
    insta::assert_snapshot!("restore_state", pretty(&doc.virtual_machine.restore_state));
    insta::assert_snapshot!(
        "save_options",
        pretty(&save_options("C:/ProgramData/uvmctl/state/hcs/saved.vmrs"))
    );
}

/// One ModifySettingRequest (#ModifySettingRequest) per kind of live
/// change, with the resource paths of `HcsModifyComputeSystem.md`'s table
/// (the hvsocket service path is hcsshim's: the table has none).
#[test]
fn a_request_for_every_kind_of_change() {
    let disk = Item::ScsiDisk(ScsiDiskItem {
        controller: 0,
        disk: ScsiDisk {
            lun: 3,
            path: "C:/ProgramData/uvmctl/disks/data.vhdx".into(),
            disk_type: ScsiDiskType::Vhdx,
            read_only: false,
        },
    });
    let passthru = Item::ScsiDisk(ScsiDiskItem {
        controller: 1,
        disk: ScsiDisk {
            lun: 0,
            path: "\\\\.\\PHYSICALDRIVE2".into(),
            disk_type: ScsiDiskType::PassThrough,
            read_only: true,
        },
    });
    let pmem = Item::VpmemDevice(crate::spec::VpmemDevice {
        id: 2,
        path: "C:/ProgramData/uvmctl/layers/app.vhd".into(),
        format: VPMemImageFormat::Vhd1,
        read_only: true,
    });
    let nic = Item::NetworkAdapter(crate::spec::NetworkAdapter {
        nic_id: "6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c09".into(),
        endpoint_id: "9d0ad1f5-3c4b-4b8e-8d2f-7a6c5b4e3d29".into(),
        mac_address: "00-15-5D-12-34-09".into(),
    });
    let plan9 = Item::Plan9Share(Plan9Share {
        name: "logs".into(),
        host_path: "C:/ProgramData/uvmctl/logs".into(),
        port: 564,
        flags: 0,
        allowed_files: vec!["app.log".into()],
        read_only: true,
    });
    let vsmb = Item::VsmbShare(VsmbShare {
        name: "tools".into(),
        host_path: "C:/ProgramData/uvmctl/tools".into(),
        allowed_files: Vec::new(),
        options: VsmbOptions {
            read_only: true,
            no_direct_map: true,
            ..VsmbOptions::default()
        },
    });
    let pci = Item::PciDevice(PciDevice {
        instance_id: "PCIP\\VEN_8086&DEV_1572&SUBSYS_00018086&REV_01\\4&2B3C1F0&0&0010".into(),
        vmbus_guid: None,
    });
    let hvsock = Item::VmSocket(VmSocket {
        socket_type: VMSocketType::HvSocket,
        service_id: Some("0000abcd-facb-11e6-bd58-64006a7986d3".into()),
        port: None,
        listener_path: "C:/ProgramData/uvmctl/agent.sock".into(),
    });
    let cases = vec![
        ("scsi disk add (#Attachment)", Change::Add(disk.clone())),
        ("scsi disk remove", Change::Remove(disk)),
        ("scsi pass-through add", Change::Add(passthru)),
        (
            "vpmem device add (#VirtualPMemDevice)",
            Change::Add(pmem.clone()),
        ),
        ("vpmem device remove", Change::Remove(pmem)),
        ("nic add (#NetworkAdapter)", Change::Add(nic.clone())),
        ("nic remove", Change::Remove(nic)),
        ("plan9 share add (#Plan9Share)", Change::Add(plan9.clone())),
        ("plan9 share remove", Change::Remove(plan9)),
        (
            "vsmb share add (#VirtualSmbShare)",
            Change::Add(vsmb.clone()),
        ),
        ("vsmb share remove", Change::Remove(vsmb)),
        (
            "vpci device add (#VirtualPciDevice)",
            Change::Add(pci.clone()),
        ),
        ("vpci device remove", Change::Remove(pci)),
        (
            "memory size (SizeInMB, a number)",
            Change::Update {
                before: Item::Memory(1024),
                after: Item::Memory(2048),
            },
        ),
        (
            "cpu group join (#CpuGroup)",
            Change::Update {
                before: Item::CpuGroup(None),
                after: Item::CpuGroup(Some("7c2b9a10-5d3e-4f61-8a7b-0c9d8e7f6a51".into())),
            },
        ),
        (
            "cpu group leave (the null group)",
            Change::Update {
                before: Item::CpuGroup(Some("7c2b9a10-5d3e-4f61-8a7b-0c9d8e7f6a51".into())),
                after: Item::CpuGroup(None),
            },
        ),
        (
            "hvsocket service add (#HvSocketServiceConfig)",
            Change::Add(hvsock.clone()),
        ),
        ("hvsocket service remove", Change::Remove(hvsock)),
    ];
    let mut out = serde_json::Map::new();
    for (what, change) in cases {
        let request = modify_request(&change)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .unwrap_or_else(|| panic!("{what}: no request"));
        out.insert(
            what.to_string(),
            serde_json::to_value(request).expect("serialize"),
        );
    }
    insta::assert_snapshot!("modify_requests", pretty(&out));
}

/// What HCS has no live request for is refused here too (the capabilities
/// call those changes a restart, so the plan never sends them).
#[test]
fn changes_hcs_makes_only_at_create_have_no_request() {
    for change in [
        Change::Update {
            before: Item::Processors(2),
            after: Item::Processors(4),
        },
        Change::Add(Item::ScsiController(1)),
    ] {
        let e = modify_request(&change).expect_err("no such request");
        assert!(e.contains("HCS"), "{e}");
    }
    let policy = Change::Update {
        before: Item::Policy(crate::spec::Policy::default()),
        after: Item::Policy(crate::spec::Policy {
            protected: true,
            ..crate::spec::Policy::default()
        }),
    };
    assert_eq!(modify_request(&policy), Ok(None), "record only");
}
