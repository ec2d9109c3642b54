//! Per-document checks: everything serde's types cannot say. Each problem is
//! reported with its field path; the loader turns paths into positions.
//!
//! Bounds, documented in README.md:
//! processors 1–255, memory 1–1048576 MB, SCSI controller 0–3, LUN 0–63,
//! serial port 0–3, VPMem 1–128 devices of 4 KiB–1 TiB (4 KiB multiples),
//! Plan9 port 1–65535, vsock port 1–4294967294, unix listener paths at most
//! 107 bytes.

use super::error::{excerpt, excerpt_bare};
use crate::vm::config::*;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Most processors a spec may ask for.
pub const MAX_PROCESSORS: u32 = 255;
/// Most memory a spec may ask for, in MB (1 TiB).
pub const MAX_MEMORY_MB: u64 = 1 << 20;
/// Highest SCSI controller number.
pub const MAX_SCSI_CONTROLLER: u32 = 3;
/// Highest SCSI LUN.
pub const MAX_SCSI_LUN: u32 = 63;
/// Highest serial port number.
pub const MAX_SERIAL_PORT: u32 = 3;
/// Most VPMem devices.
pub const MAX_VPMEM_DEVICES: u32 = 128;
/// Largest VPMem device, in bytes (1 TiB).
pub const MAX_VPMEM_SIZE_BYTES: u64 = 1 << 40;
/// Longest unix socket path (`sun_path` holds 108 bytes with its NUL).
pub const MAX_UNIX_SOCKET_PATH: usize = 107;
/// Most labels a VM may carry.
pub const MAX_LABELS: usize = 64;
/// Longest host path.
pub const MAX_PATH_BYTES: usize = 4095;

/// One problem: field path and message.
pub type Problem = (String, String);

/// Checks one deserialized document and canonicalizes its values in place
/// (MACs to `00-15-5D-01-02-03`, GUIDs to lowercase). List order is kept, so
/// later checks can still name `disks[3]` as the file has it. Returns every
/// problem found, not only the first.
pub fn validate_document(doc: &mut VmDocument) -> Vec<Problem> {
    let mut v = Checker::default();
    if doc.api_version != API_VERSION {
        v.err(
            "apiVersion",
            format!(
                "unsupported apiVersion {} (expected {API_VERSION:?})",
                excerpt(&doc.api_version)
            ),
        );
    }
    if doc.kind != KIND {
        v.err(
            "kind",
            format!(
                "unsupported kind {} (expected {KIND:?})",
                excerpt(&doc.kind)
            ),
        );
    }
    // The one rule every virtstack applies (`VmName`): what validate
    // accepts, apply accepts.
    if let Err(e) = crate::vm::VmName::new(&doc.metadata.name) {
        v.err("metadata.name", e.to_string());
    }
    if doc.metadata.labels.len() > MAX_LABELS {
        v.err(
            "metadata.labels",
            format!("{} labels; at most {MAX_LABELS}", doc.metadata.labels.len()),
        );
    }
    for (k, val) in &doc.metadata.labels {
        let problem = super::placement::label_key_problem(k)
            .or_else(|| super::placement::label_value_problem(val));
        if let Some(why) = problem {
            v.err("metadata.labels", why);
        }
    }
    check_config(&mut v, &mut doc.spec);
    v.problems
}

#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn err(&mut self, field: impl Into<String>, msg: impl Into<String>) {
        self.problems.push((field.into(), msg.into()));
    }

    fn range<T: PartialOrd + std::fmt::Display>(
        &mut self,
        field: &str,
        v: T,
        lo: T,
        hi: T,
    ) -> bool {
        if v < lo || v > hi {
            self.err(field, format!("{v} is out of range {lo}–{hi}"));
            return false;
        }
        true
    }

    fn host_path(&mut self, field: &str, p: &Path) {
        let s = p.as_os_str().as_encoded_bytes();
        if s.is_empty() {
            self.err(field, "path is empty");
        } else if s.iter().any(|b| *b < 0x20 || *b == 0x7f) {
            self.err(field, "path contains a NUL or control character");
        } else if !is_absolute_on_some_host(s) {
            self.err(
                field,
                format!(
                    "path {} is relative; give an absolute path",
                    excerpt(&p.display().to_string())
                ),
            );
        } else if s.len() > MAX_PATH_BYTES {
            self.err(
                field,
                format!(
                    "path is {} bytes, over the {MAX_PATH_BYTES}-byte limit",
                    s.len()
                ),
            );
        }
    }

    fn socket_path(&mut self, field: &str, p: &Path) {
        let before = self.problems.len();
        self.host_path(field, p);
        let len = p.as_os_str().len();
        if self.problems.len() == before && len > MAX_UNIX_SOCKET_PATH {
            self.err(
                field,
                format!(
                    "unix socket path is {len} bytes, over the {MAX_UNIX_SOCKET_PATH}-byte limit"
                ),
            );
        }
    }
}

/// Absolute on the host that runs the VM: POSIX (`/srv/x`) or, for HCS hosts,
/// Windows (`C:\x`, `C:/x`, `\\server\share`).
/// The longest network endpoint (tap device) name the kernel takes.
pub const MAX_ENDPOINT_BYTES: usize = 15;

fn is_absolute_on_some_host(s: &[u8]) -> bool {
    match s {
        [b'/', ..] => true,
        [b'\\', b'\\', ..] => true,
        [d, b':', b'\\' | b'/', ..] => d.is_ascii_alphabetic(),
        _ => false,
    }
}

fn check_name(v: &mut Checker, field: &str, name: &str, max: usize, allow_dot_underscore: bool) {
    let ok_char = |c: char| {
        c.is_ascii_alphanumeric() || c == '-' || (allow_dot_underscore && (c == '.' || c == '_'))
    };
    let allowed = if allow_dot_underscore {
        "[A-Za-z0-9._-]"
    } else {
        "[A-Za-z0-9-]"
    };
    if name.is_empty() || name.len() > max || !name.chars().all(ok_char) {
        v.err(
            field,
            format!(
                "name {} must be 1–{max} characters of {allowed}",
                excerpt(name)
            ),
        );
    }
}

/// Canonical GUID (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase), braces allowed on input.
pub fn parse_guid(s: &str) -> Option<String> {
    let t = s
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(s);
    let groups: Vec<&str> = t.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if groups.len() != 5 {
        return None;
    }
    for (g, n) in groups.iter().zip(lens) {
        if g.len() != n || !g.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
    }
    Some(t.to_ascii_lowercase())
}

/// Canonical unicast MAC (`00-15-5D-01-02-03`), from dash or colon form.
pub fn parse_mac(s: &str) -> Result<String, String> {
    let sep = if s.contains('-') { '-' } else { ':' };
    let parts: Vec<&str> = s.split(sep).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.chars().all(|c| c.is_ascii_hexdigit()))
    {
        return Err(format!(
            "MAC address {} must be six hex pairs, like 00-15-5D-01-02-03",
            excerpt(s)
        ));
    }
    let bytes: Vec<u8> = parts
        .iter()
        .filter_map(|p| u8::from_str_radix(p, 16).ok())
        .collect();
    if bytes[0] & 1 == 1 {
        return Err(format!(
            "MAC address {} is multicast; a NIC needs a unicast address",
            excerpt(s)
        ));
    }
    if bytes.iter().all(|b| *b == 0) {
        return Err(format!("MAC address {} is all zeros", excerpt(s)));
    }
    Ok(bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join("-"))
}

fn check_guid(v: &mut Checker, field: &str, s: &mut String) {
    match parse_guid(s) {
        Some(g) => *s = g,
        None => v.err(
            field,
            format!(
                "{} is not a GUID (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
                excerpt(s)
            ),
        ),
    }
}

fn check_file_names(v: &mut Checker, field: &str, names: &[String]) {
    let mut seen = BTreeSet::new();
    for (i, n) in names.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if n.is_empty()
            || n == "."
            || n == ".."
            || n.contains('/')
            || n.contains('\\')
            || n.chars().any(char::is_control)
        {
            v.err(
                &f,
                format!("{} must be a plain file name inside the share", excerpt(n)),
            );
        } else if !seen.insert(n.as_str()) {
            v.err(&f, format!("file {} is listed twice", excerpt(n)));
        }
    }
}

fn check_config(v: &mut Checker, c: &mut VmConfig) {
    // Boot
    match (&c.boot.uefi, &c.boot.linux_kernel_direct) {
        (Some(_), Some(_)) => v.err(
            "spec.boot",
            "give either uefi or linuxKernelDirect, not both",
        ),
        (None, None) => v.err("spec.boot", "give one of uefi or linuxKernelDirect"),
        (Some(u), None) => {
            v.host_path("spec.boot.uefi.dir", &u.dir);
            if u.path.is_empty() || u.path.chars().any(char::is_control) {
                v.err(
                    "spec.boot.uefi.path",
                    "EFI path must be non-empty, without control characters",
                );
            }
            if u.args.contains('\0') {
                v.err("spec.boot.uefi.args", "args contain a NUL character");
            }
        }
        (None, Some(k)) => {
            v.host_path("spec.boot.linuxKernelDirect.kernel", &k.kernel);
            if let Some(i) = &k.initrd {
                v.host_path("spec.boot.linuxKernelDirect.initrd", i);
            }
            if k.cmdline.chars().any(char::is_control) {
                v.err(
                    "spec.boot.linuxKernelDirect.cmdline",
                    "command line contains a control character",
                );
            }
        }
    }

    v.range(
        "spec.processors.count",
        c.processors.count,
        1,
        MAX_PROCESSORS,
    );
    v.range("spec.memory.sizeMB", c.memory.size_mb, 1, MAX_MEMORY_MB);
    if let Some(m) = c.memory.mmio {
        v.range("spec.memory.mmio.lowGapMB", m.low_gap_mb, 0, 3072);
        v.range("spec.memory.mmio.highBaseMB", m.high_base_mb, 4096, 1 << 30);
        v.range("spec.memory.mmio.highGapMB", m.high_gap_mb, 0, 1 << 30);
    }

    // Serial consoles, keyed by port.
    let mut ports = BTreeMap::new();
    for (i, s) in c.serial_consoles.iter().enumerate() {
        let f = format!("spec.serialConsoles[{i}]");
        v.range(&format!("{f}.port"), s.port, 0, MAX_SERIAL_PORT);
        if let Some(prev) = ports.insert(s.port, i) {
            v.err(
                format!("{f}.port"),
                format!(
                    "duplicate serial port {} (also serialConsoles[{prev}])",
                    s.port
                ),
            );
        }
        v.socket_path(&format!("{f}.listenerPath"), &s.listener_path);
    }

    if let Some(q) = c.storage_qos {
        if q.iops_maximum.is_none() && q.bandwidth_maximum.is_none() {
            v.err(
                "spec.storageQos",
                "give iopsMaximum or bandwidthMaximum, or leave storageQos out",
            );
        }
        if q.iops_maximum == Some(0) {
            v.err(
                "spec.storageQos.iopsMaximum",
                "must be at least 1; leave it out for no limit",
            );
        }
        if q.bandwidth_maximum == Some(0) {
            v.err(
                "spec.storageQos.bandwidthMaximum",
                "must be at least 1; leave it out for no limit",
            );
        }
    }

    // SCSI: controllers by id, disks by (controller, lun).
    let mut ctrls = BTreeMap::new();
    let mut disk_paths: BTreeMap<&Path, (String, bool)> = BTreeMap::new();
    for (i, ctrl) in c.scsi_controllers.iter().enumerate() {
        let f = format!("spec.scsiControllers[{i}]");
        v.range(&format!("{f}.id"), ctrl.id, 0, MAX_SCSI_CONTROLLER);
        if let Some(prev) = ctrls.insert(ctrl.id, i) {
            v.err(
                format!("{f}.id"),
                format!(
                    "duplicate controller {} (also scsiControllers[{prev}])",
                    ctrl.id
                ),
            );
        }
        let mut luns = BTreeMap::new();
        for (j, d) in ctrl.disks.iter().enumerate() {
            let df = format!("{f}.disks[{j}]");
            v.range(&format!("{df}.lun"), d.lun, 0, MAX_SCSI_LUN);
            if let Some(prev) = luns.insert(d.lun, j) {
                v.err(
                    format!("{df}.lun"),
                    format!(
                        "duplicate lun {} on controller {} (also disks[{prev}])",
                        d.lun, ctrl.id
                    ),
                );
            }
            v.host_path(&format!("{df}.path"), &d.path);
            check_shared_disk(
                v,
                &mut disk_paths,
                &d.path,
                &format!("{df}.path"),
                d.read_only,
            );
        }
    }

    // VPMem: controller limits, devices by id.
    if let Some(p) = &c.vpmem {
        v.range(
            "spec.vpmem.maximumDevices",
            p.maximum_devices,
            1,
            MAX_VPMEM_DEVICES,
        );
        if v.range(
            "spec.vpmem.maximumSizeBytes",
            p.maximum_size_bytes,
            4096,
            MAX_VPMEM_SIZE_BYTES,
        ) && p.maximum_size_bytes % 4096 != 0
        {
            v.err(
                "spec.vpmem.maximumSizeBytes",
                format!("{} is not a multiple of 4096", p.maximum_size_bytes),
            );
        }
        let mut ids = BTreeMap::new();
        for (i, d) in p.devices.iter().enumerate() {
            let f = format!("spec.vpmem.devices[{i}]");
            if d.id >= p.maximum_devices {
                v.err(
                    format!("{f}.id"),
                    format!(
                        "device {} is past the controller's maximumDevices {}",
                        d.id, p.maximum_devices
                    ),
                );
            }
            if let Some(prev) = ids.insert(d.id, i) {
                v.err(
                    format!("{f}.id"),
                    format!("duplicate vpmem device {} (also devices[{prev}])", d.id),
                );
            }
            v.host_path(&format!("{f}.path"), &d.path);
            check_shared_disk(
                v,
                &mut disk_paths,
                &d.path,
                &format!("{f}.path"),
                d.read_only,
            );
        }
    }

    // NICs: by nic id; MACs unique too.
    let mut nic_ids = BTreeMap::new();
    let mut macs = BTreeMap::new();
    for (i, n) in c.network_adapters.iter_mut().enumerate() {
        let f = format!("spec.networkAdapters[{i}]");
        check_guid(v, &format!("{f}.nicId"), &mut n.nic_id);
        if let Some(prev) = nic_ids.insert(n.nic_id.clone(), i) {
            v.err(
                format!("{f}.nicId"),
                format!(
                    "duplicate nicId {} (also networkAdapters[{prev}])",
                    n.nic_id
                ),
            );
        }
        // A tap device's name, as the kernel takes it (IFNAMSIZ less its
        // NUL: 15 bytes). Longer ones would be cut silently, so two
        // endpoints sharing 15 characters would share one tap.
        // On HCS, an HNS endpoint's GUID.
        let ok_endpoint = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if parse_guid(&n.endpoint_id).is_none()
            && (n.endpoint_id.is_empty()
                || n.endpoint_id.len() > MAX_ENDPOINT_BYTES
                || !n.endpoint_id.chars().all(ok_endpoint)
                || n.endpoint_id == "."
                || n.endpoint_id == "..")
        {
            v.err(
                format!("{f}.endpointId"),
                format!(
                    "endpoint {} must be an interface name: 1–{MAX_ENDPOINT_BYTES} characters of [A-Za-z0-9._-], not . or .. (qemu: a tap device or user), or a GUID (hcs: an HNS endpoint)",
                    excerpt(&n.endpoint_id)
                ),
            );
        }
        match parse_mac(&n.mac_address) {
            Ok(m) => {
                n.mac_address = m;
                if let Some(prev) = macs.insert(n.mac_address.clone(), i) {
                    v.err(
                        format!("{f}.macAddress"),
                        format!(
                            "duplicate MAC {} (also networkAdapters[{prev}])",
                            n.mac_address
                        ),
                    );
                }
            }
            Err(e) => v.err(format!("{f}.macAddress"), e),
        }
    }

    // Plan9 shares by name.
    let mut names = BTreeMap::new();
    for (i, s) in c.plan9_shares.iter().enumerate() {
        let f = format!("spec.plan9Shares[{i}]");
        check_name(v, &format!("{f}.name"), &s.name, 31, true);
        if let Some(prev) = names.insert(s.name.clone(), i) {
            v.err(
                format!("{f}.name"),
                format!(
                    "duplicate share {} (also plan9Shares[{prev}])",
                    excerpt(&s.name)
                ),
            );
        }
        v.host_path(&format!("{f}.hostPath"), &s.host_path);
        v.range(&format!("{f}.port"), s.port, 1, 65535);
        check_file_names(v, &format!("{f}.allowedFiles"), &s.allowed_files);
    }

    // VSMB shares by name.
    let mut names = BTreeMap::new();
    for (i, s) in c.vsmb_shares.iter().enumerate() {
        let f = format!("spec.vsmbShares[{i}]");
        check_name(v, &format!("{f}.name"), &s.name, 64, true);
        if let Some(prev) = names.insert(s.name.clone(), i) {
            v.err(
                format!("{f}.name"),
                format!(
                    "duplicate share {} (also vsmbShares[{prev}])",
                    excerpt(&s.name)
                ),
            );
        }
        v.host_path(&format!("{f}.hostPath"), &s.host_path);
        check_file_names(v, &format!("{f}.allowedFiles"), &s.allowed_files);
    }

    // PCI devices by instance id.
    let mut ids = BTreeMap::new();
    for (i, d) in c.pci_devices.iter_mut().enumerate() {
        let f = format!("spec.pciDevices[{i}]");
        if d.instance_id.is_empty()
            || d.instance_id.len() > 256
            || !d.instance_id.chars().all(|c| c.is_ascii_graphic())
        {
            v.err(
                format!("{f}.instanceId"),
                "instance id must be 1–256 printable ASCII characters without spaces",
            );
        }
        if let Some(prev) = ids.insert(d.instance_id.clone(), i) {
            v.err(
                format!("{f}.instanceId"),
                format!(
                    "duplicate PCI device {} (also pciDevices[{prev}])",
                    excerpt(&d.instance_id)
                ),
            );
        }
        if let Some(g) = &mut d.vmbus_guid {
            check_guid(v, &format!("{f}.vmbusGuid"), g);
        }
    }

    // VM sockets by (type, address).
    let mut keys = BTreeMap::new();
    for (i, s) in c.vm_sockets.iter_mut().enumerate() {
        let f = format!("spec.vmSockets[{i}]");
        match s.socket_type {
            crate::vm::VMSocketType::HvSocket => {
                if s.port.is_some() {
                    v.err(
                        format!("{f}.port"),
                        "an hvsocket listener is addressed by serviceId, not port",
                    );
                }
                match &mut s.service_id {
                    Some(id) => check_guid(v, &format!("{f}.serviceId"), id),
                    None => v.err(
                        format!("{f}.serviceId"),
                        "an hvsocket listener needs a serviceId GUID",
                    ),
                }
            }
            crate::vm::VMSocketType::VSock => {
                if s.service_id.is_some() {
                    v.err(
                        format!("{f}.serviceId"),
                        "a vsock listener is addressed by port, not serviceId",
                    );
                }
                match s.port {
                    Some(p) => {
                        v.range(&format!("{f}.port"), p, 1, u32::MAX - 1);
                    }
                    None => v.err(format!("{f}.port"), "a vsock listener needs a port"),
                }
            }
        }
        v.socket_path(&format!("{f}.listenerPath"), &s.listener_path);
        if let Some(prev) = keys.insert((s.socket_type, s.address()), i) {
            v.err(
                f,
                format!(
                    "duplicate listener {} (also vmSockets[{prev}])",
                    s.address()
                ),
            );
        }
    }

    if let Some(g) = c.windows.as_mut().and_then(|w| w.cpu_group.as_mut()) {
        check_guid(v, "spec.windows.cpuGroup", g);
    }
    if let Some(h) = &c.health {
        check_health(v, h);
        if h.notifies()
            && let Some(i) = c
                .vm_sockets
                .iter()
                .position(|s| s.port == Some(crate::vm::config::NOTIFY_VSOCK_PORT))
        {
            v.err(
                format!("spec.vmSockets[{i}].port"),
                format!(
                    "port {} is where the guest says READY=1 for spec.health's notify probe; use another",
                    crate::vm::config::NOTIFY_VSOCK_PORT
                ),
            );
        }
    }
}

/// Most probes in `spec.health`.
pub const MAX_PROBES: usize = 16;
/// Most words in an `exec` probe's command.
pub const MAX_PROBE_WORDS: usize = 16;
/// Longest console probe pattern, in bytes.
pub const MAX_PROBE_PATTERN_BYTES: usize = 256;
/// Longest probe deadline, in seconds (a day).
pub const MAX_PROBE_SECONDS: u32 = 86_400;

/// A word the test guest's agent takes as an argument (guest/README.md):
/// an `exec` probe's words go to it as one line.
fn agent_word(w: &str) -> bool {
    !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'))
}

fn check_health(v: &mut Checker, h: &Health) {
    if h.probes.is_empty() {
        v.err("spec.health.probes", "give at least one probe");
    }
    if h.probes.len() > MAX_PROBES {
        v.err(
            "spec.health.probes",
            format!("{} probes; at most {MAX_PROBES}", h.probes.len()),
        );
    }
    for (i, p) in h.probes.iter().enumerate().take(MAX_PROBES) {
        let at = |f: &str| format!("spec.health.probes[{i}].{f}");
        match (p.kind, p.command.is_empty()) {
            (ProbeKind::Exec, true) => v.err(at("command"), "an exec probe needs a command"),
            (ProbeKind::Exec, false) => {
                if p.command.len() > MAX_PROBE_WORDS {
                    v.err(
                        at("command"),
                        format!("{} words; at most {MAX_PROBE_WORDS}", p.command.len()),
                    );
                }
                if let Some((j, w)) = p.command.iter().enumerate().find(|(_, w)| !agent_word(w)) {
                    v.err(
                        format!("spec.health.probes[{i}].command[{j}]"),
                        format!(
                            "{} is not a word the guest agent takes (letters, digits, '.', '_', '/', '-')",
                            excerpt(w)
                        ),
                    );
                }
            }
            (_, false) => v.err(at("command"), "only an exec probe has a command"),
            (_, true) => {}
        }
        match (p.kind, &p.pattern) {
            (ProbeKind::Console, None) => v.err(at("pattern"), "a console probe needs a pattern"),
            (ProbeKind::Console, Some(pat)) if pat.len() > MAX_PROBE_PATTERN_BYTES => v.err(
                at("pattern"),
                format!("{} bytes; at most {MAX_PROBE_PATTERN_BYTES}", pat.len()),
            ),
            (ProbeKind::Console, Some(pat)) if pat.chars().any(char::is_control) => v.err(
                at("pattern"),
                "pattern contains a control character (write it as an escape: \\t, \\x1b)",
            ),
            (ProbeKind::Console, Some(pat)) => {
                if let Err(e) = crate::vm::health::console_pattern(pat) {
                    // regex draws the pattern over several lines; the last says what.
                    let e = e.to_string();
                    let what = e
                        .lines()
                        .last()
                        .unwrap_or_default()
                        .trim_start_matches("error: ");
                    v.err(at("pattern"), format!("not a regular expression: {what}"));
                }
            }
            (_, Some(_)) => v.err(at("pattern"), "only a console probe has a pattern"),
            (_, None) => {}
        }
        v.range(&at("intervalSeconds"), p.interval_seconds, 1, 3600);
        v.range(
            &at("deadlineSeconds"),
            p.deadline_seconds,
            1,
            MAX_PROBE_SECONDS,
        );
        v.range(
            &at("minHealthySeconds"),
            p.min_healthy_seconds,
            0,
            MAX_PROBE_SECONDS,
        );
        if u64::from(p.min_healthy_seconds) + u64::from(p.interval_seconds)
            > u64::from(p.deadline_seconds)
        {
            v.err(
                at("deadlineSeconds"),
                format!(
                    "{} s leaves no time to pass for {} s asked every {} s: give at least minHealthySeconds + intervalSeconds",
                    p.deadline_seconds, p.min_healthy_seconds, p.interval_seconds
                ),
            );
        }
    }
}

/// A disk image attached writable must be attached once only; read-only may repeat.
fn check_shared_disk<'a>(
    v: &mut Checker,
    seen: &mut BTreeMap<&'a Path, (String, bool)>,
    path: &'a Path,
    field: &str,
    read_only: bool,
) {
    match seen.get(path) {
        Some((prev, prev_ro)) if !(read_only && *prev_ro) => {
            v.err(
                field,
                format!(
                    "{} is already attached at {prev}; a writable image can be attached once",
                    excerpt_bare(&path.display().to_string())
                ),
            );
        }
        Some(_) => {}
        None => {
            seen.insert(path, (field.to_string(), read_only));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with `health` (indented under `spec:`), loaded: its errors as shown.
    fn health_errors(health: &str) -> Vec<String> {
        let text = format!(
            "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: web\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: /k/vmlinuz\n  processors:\n    count: 1\n  memory:\n    sizeMB: 64\n  health:\n{health}"
        );
        crate::spec::load_texts(&[("t.yaml".into(), text)])
            .errors
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn health_probes_load_with_their_defaults() {
        let text = "apiVersion: uvmctl.dev/v1alpha1\nkind: UtilityVM\nmetadata:\n  name: web\nspec:\n  boot:\n    linuxKernelDirect:\n      kernel: /k/vmlinuz\n  processors:\n    count: 1\n  memory:\n    sizeMB: 64\n  health:\n    probes:\n      - kind: agent\n      - kind: exec\n        command: [cat, /sys/block/sda/size]\n        minHealthySeconds: 0\n      - kind: console\n        pattern: '^login:'\n";
        let loaded = crate::spec::load_texts(&[("t.yaml".into(), text.to_string())]);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let health = loaded.desired.vms["web"]
            .config
            .health
            .clone()
            .expect("health");
        let labels: Vec<String> = health.probes.iter().map(Probe::label).collect();
        assert_eq!(
            labels,
            ["agent", "exec cat /sys/block/sda/size", "console /^login:/"]
        );
        assert_eq!(
            (
                health.probes[0].interval_seconds,
                health.probes[0].deadline_seconds,
                health.probes[0].min_healthy_seconds
            ),
            (2, 120, 10)
        );
        assert_eq!(health.probes[1].min_healthy_seconds, 0);
    }

    #[test]
    fn a_health_probe_that_cannot_run_is_refused_at_its_field() {
        let errors = health_errors(
            "    probes:\n      - kind: exec\n      - kind: exec\n        command: [cat, 'a b']\n      - kind: agent\n        pattern: x\n        command: [ping]\n      - kind: console\n        pattern: '(unclosed'\n      - kind: console\n      - kind: notify\n        intervalSeconds: 5\n        minHealthySeconds: 10\n        deadlineSeconds: 12\n",
        );
        let want = [
            "t.yaml:15:9: spec.health.probes[0].command: an exec probe needs a command",
            "t.yaml:17:24: spec.health.probes[1].command[1]: \"a b\" is not a word the guest agent takes (letters, digits, '.', '_', '/', '-')",
            "t.yaml:19:9: spec.health.probes[2].pattern: only a console probe has a pattern",
            "t.yaml:20:9: spec.health.probes[2].command: only an exec probe has a command",
            "t.yaml:22:9: spec.health.probes[3].pattern: not a regular expression: unclosed group",
            "t.yaml:23:9: spec.health.probes[4].pattern: a console probe needs a pattern",
            "t.yaml:27:9: spec.health.probes[5].deadlineSeconds: 12 s leaves no time to pass for 10 s asked every 5 s: give at least minHealthySeconds + intervalSeconds",
        ];
        assert_eq!(errors, want);
        assert_eq!(
            health_errors("    probes: []\n"),
            ["t.yaml:14:5: spec.health.probes: give at least one probe"]
        );
        // A pattern is shown in plans and logs: no terminal escapes in it.
        let escape =
            health_errors("    probes:\n      - kind: console\n        pattern: \"\\e]0;x\"\n");
        assert_eq!(escape.len(), 1, "{escape:?}");
        assert!(
            escape[0]
                .contains("spec.health.probes[0].pattern: pattern contains a control character"),
            "{escape:?}"
        );
    }

    #[test]
    fn guids_are_canonicalized_and_malformed_ones_refused() {
        assert_eq!(
            parse_guid("{6BA7B810-9DAD-11D1-80B4-00C04FD430C8}").as_deref(),
            Some("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
        );
        assert_eq!(parse_guid("6ba7b810-9dad-11d1-80b4-00c04fd430c"), None);
        assert_eq!(parse_guid("6ba7b810-9dad-11d1-80b4-00c04fd430cg"), None);
        assert_eq!(parse_guid("6ba7b8109dad11d180b400c04fd430c8"), None);
    }

    #[test]
    fn macs_are_canonicalized_and_multicast_or_zero_refused() {
        assert_eq!(
            parse_mac("00:15:5d:01:02:0a").as_deref(),
            Ok("00-15-5D-01-02-0A")
        );
        assert_eq!(
            parse_mac("00-15-5D-01-02-0A").as_deref(),
            Ok("00-15-5D-01-02-0A")
        );
        assert!(
            parse_mac("01:00:5e:00:00:01")
                .unwrap_err()
                .contains("multicast")
        );
        assert!(
            parse_mac("00:00:00:00:00:00")
                .unwrap_err()
                .contains("all zeros")
        );
        assert!(
            parse_mac("00:15:5d:01:02")
                .unwrap_err()
                .contains("six hex pairs")
        );
        assert!(
            parse_mac("00:15:5d:01:02:0g")
                .unwrap_err()
                .contains("six hex pairs")
        );
    }
}
