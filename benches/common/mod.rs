//! The fleet every benchmark works on: 10,000 realistic specs.

/// How many VMs the benchmarks plan.
pub const VMS: usize = 10_000;

/// A realistic spec (about 690 bytes): a disk, a NIC, a console.
pub fn spec(i: usize, memory_mb: u64) -> String {
    format!(
        "apiVersion: uvmctl.dev/v1alpha1
kind: UtilityVM
metadata:
  name: vm-{i:05}
spec:
  boot:
    linuxKernelDirect:
      kernel: /var/cache/uvmctl/guest/vmlinuz
      initrd: /var/cache/uvmctl/guest/initrd.img
      cmdline: console=ttyS0 quiet
  processors:
    count: 2
  memory:
    sizeMB: {memory_mb}
  serialConsoles:
    - port: 0
      listenerPath: /run/uvmctl/vm-{i:05}/console.sock
  scsiControllers:
    - id: 0
      disks:
        - lun: 0
          path: /var/lib/uvmctl/disks/vm-{i:05}-root.vhdx
          type: vhdx
  networkAdapters:
    - nicId: 6f1c2a4e-0b7d-4c55-9a51-{i:012x}
      endpointId: tap{i}
      macAddress: 52-54-00-{:02X}-{:02X}-{:02X}
",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}
