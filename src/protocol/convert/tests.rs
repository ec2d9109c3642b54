use super::*;

fn request() -> pb::CreateVMRequest {
    let mut boot = pb::DirectBoot::new();
    boot.kernel_path = "/var/cache/uvmctl/guest/vmlinux".into();
    boot.initrd_path = "/var/cache/uvmctl/guest/initrd.img".into();
    boot.kernel_cmdline = "console=ttyS0".into();
    let mut mem = pb::MemoryConfig::new();
    mem.memory_mb = 256;
    mem.allow_overcommit = true;
    let mut cpu = pb::ProcessorConfig::new();
    cpu.processor_count = 2;
    let mut disk = pb::SCSIDisk::new();
    disk.controller = 0;
    disk.lun = 1;
    disk.host_path = "/var/lib/uvmctl/d.img".into();
    disk.type_ = pb::DiskType::SCSI_DISK_TYPE_PHYSICAL.into();
    let mut nic = pb::NICConfig::new();
    nic.nic_id = "6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c01".into();
    nic.port_id = "user".into();
    nic.mac_address = "52-54-00-12-34-56".into();
    let mut devices = pb::DevicesConfig::new();
    devices.scsi_disks.push(disk);
    devices.nic_config.push(nic);
    let mut c = pb::VMConfig::new();
    c.set_direct_boot(boot);
    c.memory_config = Some(mem).into();
    c.processor_config = Some(cpu).into();
    c.devices_config = Some(devices).into();
    let mut r = pb::CreateVMRequest::new();
    r.config = Some(c).into();
    r
}

#[test]
fn a_full_request_becomes_the_spec_model() {
    let cfg = vm_config("vm", &request()).expect("valid");
    assert_eq!(cfg.memory.size_mb, 256);
    assert_eq!(cfg.processors.count, 2);
    assert_eq!(cfg.scsi_controllers[0].disks[0].lun, 1);
    assert_eq!(cfg.network_adapters[0].endpoint_id, "user");
    assert_eq!(cfg.power_state, crate::spec::PowerState::Stopped);
}

fn edited(f: impl FnOnce(&mut pb::VMConfig)) -> pb::CreateVMRequest {
    let mut r = request();
    if let Some(c) = r.config.as_mut() {
        f(c);
    }
    r
}

#[test]
fn bad_requests_name_the_field_and_say_why() {
    let r = edited(|c| c.memory_config.clear());
    assert_eq!(
        vm_config("vm", &r),
        Err(invalid("config.memory_config", "missing"))
    );
    let r = edited(|c| {
        if let Some(m) = c.memory_config.as_mut() {
            m.memory_mb = u64::MAX;
        }
    });
    let err = vm_config("vm", &r).expect_err("absurd memory");
    assert!(
        matches!(err, RequestError::Invalid { ref field, .. } if field == "spec.memory.sizeMB"),
        "{err}"
    );
    let r = edited(|c| {
        if let Some(d) = c.devices_config.as_mut() {
            d.scsi_disks[0].type_ = EnumOrUnknown::from_i32(7);
        }
    });
    assert_eq!(
        vm_config("vm", &r),
        Err(invalid(
            "config.devices_config.scsi_disks[0].type",
            "unknown enum value 7"
        ))
    );
    let r = edited(|c| c.BootConfig = None);
    assert!(matches!(
        vm_config("vm", &r),
        Err(RequestError::Invalid { .. })
    ));
    let r = edited(|c| {
        if let Some(d) = c.devices_config.as_mut() {
            d.scsi_disks[0].host_path = "relative.img".into();
        }
    });
    assert!(matches!(
        vm_config("vm", &r),
        Err(RequestError::Invalid { .. })
    ));
    let r = edited(|c| {
        if let Some(p) = c.processor_config.as_mut() {
            p.processor_weight = 5;
        }
    });
    assert!(matches!(
        vm_config("vm", &r),
        Err(RequestError::Unimplemented { .. })
    ));
}

mod round_trip {
    use super::*;
    use crate::vm::items::flatten;
    use proptest::prelude::*;

    fn arb_disks() -> impl Strategy<Value = Vec<ScsiController>> {
        prop::collection::btree_map(0u32..3, prop::collection::btree_set(0u32..6, 1..4), 0..3)
            .prop_map(|m| {
                m.into_iter()
                    .map(|(id, luns)| ScsiController {
                        id,
                        disks: luns
                            .into_iter()
                            .map(|lun| ScsiDisk {
                                lun,
                                path: format!("/var/lib/uvmctl/d{id}-{lun}.img").into(),
                                disk_type: [
                                    ScsiDiskType::PassThrough,
                                    ScsiDiskType::Vhdx,
                                    ScsiDiskType::Vhd1,
                                ][(lun % 3) as usize],
                                read_only: lun.is_multiple_of(2),
                            })
                            .collect(),
                    })
                    .collect()
            })
    }

    fn nic(i: u8) -> NetworkAdapter {
        NetworkAdapter {
            nic_id: format!("6f1c2a4e-0b7d-4c55-9a51-3f6e2d8b9c{i:02x}"),
            endpoint_id: if i.is_multiple_of(2) {
                "user".into()
            } else {
                format!("tap{i}")
            },
            mac_address: format!("52-54-00-12-34-{i:02X}"),
        }
    }

    fn arb_config() -> impl Strategy<Value = VmConfig> {
        (
            (
                1u32..9,
                prop::sample::select(vec![256u64, 384, 1024]),
                any::<bool>(),
            ),
            arb_disks(),
            (0u8..3, 0u32..3, any::<bool>()),
            (prop::option::of("[a-z=0-9 ]{0,20}"), 0u32..3),
        )
            .prop_map(
                |((cpus, mb, virt), scsi, (nics, pmem, initrd), (cmdline, serial))| {
                    let mut c = VmConfig {
                        boot: Boot {
                            linux_kernel_direct: Some(LinuxKernelDirect {
                                kernel: "/var/cache/uvmctl/guest/vmlinuz".into(),
                                initrd: initrd.then(|| "/var/cache/uvmctl/guest/initrd.img".into()),
                                cmdline: cmdline.unwrap_or_default(),
                            }),
                            uefi: None,
                        },
                        ..VmConfig::default()
                    };
                    c.processors.count = cpus;
                    c.memory.size_mb = mb;
                    c.memory.backing = if virt {
                        MemoryBackingType::Virtual
                    } else {
                        MemoryBackingType::Physical
                    };
                    c.scsi_controllers = scsi;
                    c.network_adapters = (0..nics).map(nic).collect();
                    if pmem > 0 {
                        c.vpmem = Some(Vpmem {
                            maximum_devices: pmem,
                            maximum_size_bytes: VPMEM_DEVICE_BYTES,
                            devices: (0..pmem)
                                .map(|id| VpmemDevice {
                                    id,
                                    path: format!("/var/lib/uvmctl/p{id}.vhdx").into(),
                                    format: VPMemImageFormat::Vhdx,
                                    read_only: true,
                                })
                                .collect(),
                        });
                    }
                    c.serial_consoles = (0..serial)
                        .map(|port| SerialConsole {
                            port,
                            listener_path: format!("/run/uvmctl/com{port}.sock").into(),
                        })
                        .collect();
                    c.power_state = crate::spec::PowerState::Stopped;
                    c
                },
            )
    }

    /// A change the protocol carries, that fits `c`.
    fn arb_change(c: VmConfig) -> impl Strategy<Value = (VmConfig, Change)> {
        let disks: Vec<Item> = flatten(&c)
            .into_values()
            .filter(|i| matches!(i, Item::ScsiDisk(_) | Item::NetworkAdapter(_)))
            .collect();
        let pick = disks.clone();
        (
            0usize..7,
            any::<prop::sample::Index>(),
            1u32..9,
            1u64..8,
            1u32..64,
        )
            .prop_map(move |(what, index, cpus, mb, port)| {
                let listener = |p: &str| {
                    Item::VmSocket(VmSocket {
                        socket_type: VMSocketType::VSock,
                        service_id: None,
                        port: Some(port),
                        listener_path: p.into(),
                    })
                };
                let mut have = c.clone();
                let change = match what {
                    0 if !pick.is_empty() => Change::Remove(index.get(&pick).clone()),
                    // A disk on a controller the VM has (the model
                    // names a controller before its disks).
                    1 if !c.scsi_controllers.is_empty() => {
                        let ctl = index.get(&c.scsi_controllers);
                        let lun = (0..8)
                            .find(|l| !ctl.disks.iter().any(|d| d.lun == *l))
                            .unwrap_or(7);
                        Change::Add(Item::ScsiDisk(ScsiDiskItem {
                            controller: ctl.id,
                            disk: ScsiDisk {
                                lun,
                                path: "/var/lib/uvmctl/new.img".into(),
                                disk_type: ScsiDiskType::PassThrough,
                                read_only: false,
                            },
                        }))
                    }
                    2 => Change::Add(Item::NetworkAdapter(nic(9))),
                    3 => Change::Update {
                        before: Item::Processors(c.processors.count),
                        after: Item::Processors(cpus),
                    },
                    4 => Change::Update {
                        before: Item::Memory(c.memory.size_mb),
                        after: Item::Memory(mb * 256),
                    },
                    5 => Change::Add(listener("/run/l.sock")),
                    _ => {
                        // An update of a listener the VM has.
                        if let Item::VmSocket(s) = listener("/run/old.sock") {
                            have.vm_sockets.push(s);
                        }
                        Change::Update {
                            before: listener("/run/old.sock"),
                            after: listener("/run/new.sock"),
                        }
                    }
                };
                (have, change)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// config → `CreateVMRequest` → config is the identity (on what
        /// the protocol can say), after the spec validation.
        #[test]
        fn a_config_survives_the_wire(c in arb_config()) {
            let c = validated("vm", c).expect("generated configs are valid");
            let mut req = pb::CreateVMRequest::new();
            req.config = Some(to_pb(&c)).into();
            prop_assert_eq!(vm_config("vm", &req), Ok(c));
        }

        /// change → requests (client) → changes (server) makes on the
        /// VM exactly what the change makes.
        #[test]
        fn a_change_survives_the_wire((have, change) in arb_config().prop_flat_map(arb_change)) {
            let want = change.applied(&have).expect("generated changes fit");
            let mut now = have.clone();
            for wire in to_wire(&change, &have).expect("the protocol carries it") {
                let changes = match &wire {
                    Wire::Modify(m) => from_modify(m, &now).expect("the server takes it"),
                    Wire::Socket(v) => vec![from_socket(v, &now).expect("the server takes it")],
                };
                for c in changes {
                    now = c.applied(&now).expect("server-side change fits");
                }
            }
            prop_assert_eq!(now, want);
        }

        /// `CapabilitiesVM` → capabilities → `CapabilitiesVM` is the identity.
        #[test]
        fn capabilities_survive_the_wire(vsock in any::<bool>(), hcs in any::<bool>()) {
            let caps = if hcs {
                Capabilities::hcs()
            } else {
                Capabilities::qemu(&crate::vm::HostFacts { vhost_user_vsock: vsock, ..Default::default() })
            };
            let wire = capabilities(&caps, None);
            let back = capabilities_from("remotevm", &wire);
            prop_assert_eq!(capabilities(&back, None), wire);
        }
    }
}
