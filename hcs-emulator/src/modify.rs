//! HcsModifyComputeSystem: which resource paths HCS modifies, which RequestTypes each accepts,
//! what its Settings are, and how a request changes the stored document.
//!
//! Written from `virtualization/api/hcs/Reference/HcsModifyComputeSystem.md` (its table of
//! ResourcePath / Settings type / valid RequestType), plus the resource paths hcsshim uses that
//! the table does not list (`internal/hcs/resourcepaths`: `.../Processor/Limits` and
//! `.../HvSocket/HvSocketConfig/ServiceTable/<guid>`). "No Limit" in the reference means any
//! RequestType; an absent RequestType is accepted only on those "No Limit" paths that set a
//! single value (memory size, CPU group, power cap), where it means Update.

#![forbid(unsafe_code)]

use serde_json::{Map, Value};

use crate::hresult::{
    E_ALREADY_EXISTS, E_INVALIDARG, E_NOT_FOUND, HCS_E_INVALID_JSON, HcsError, HcsResult,
};
use crate::schema::{self, Ty};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    Add,
    Remove,
    Update,
}

impl RequestType {
    fn parse(word: &str) -> Option<Self> {
        match word {
            "Add" => Some(RequestType::Add),
            "Remove" => Some(RequestType::Remove),
            "Update" => Some(RequestType::Update),
            _ => None,
        }
    }

    fn word(self) -> &'static str {
        match self {
            RequestType::Add => "Add",
            RequestType::Remove => "Remove",
            RequestType::Update => "Update",
        }
    }
}

/// One segment of a resource path pattern.
#[derive(Debug, Clone, Copy)]
enum Seg {
    Lit(&'static str),
    /// Any non-empty name (a controller, adapter or device identifier).
    Name,
    /// A decimal unsigned integer no larger than the bound.
    Uint(u64),
    /// A GUID.
    Guid,
}

#[derive(Debug, Clone, Copy)]
enum Accepts {
    /// "No Limit": Add, Remove or Update.
    NoLimit {
        absent_means_update: bool,
    },
    Only(&'static [RequestType]),
    /// Update, or no RequestType at all (hcsshim sends none for processor limits).
    UpdateOrAbsent,
}

#[derive(Debug, Clone, Copy)]
enum Settings {
    Of(Ty),
    /// "`Settings` should be empty".
    Empty,
}

/// A document location; `$0`, `$1` stand for the path's wildcard segments.
type Loc = &'static [&'static str];

#[derive(Debug, Clone, Copy)]
enum Effect {
    /// An entry of the map at `map`, keyed by wildcard `key`. `parent`, when given, must already
    /// exist (it is named `what` in the error). With `update_inserts`, Update adds a missing
    /// entry (hcsshim adds hvsocket services with Update).
    MapEntry {
        map: Loc,
        key: usize,
        parent: Option<(Loc, &'static str)>,
        update_inserts: bool,
    },
    /// An element of the array at `array`, identified by the `identity` fields of Settings
    /// (the first is required; the others count only when both sides have them).
    ArrayEntry {
        array: Loc,
        identity: &'static [&'static str],
        parent: Option<(Loc, &'static str)>,
    },
    /// Sets (Remove: deletes) the value at `at`.
    SetValue { at: Loc },
    /// Merges the fields of Settings into the object at `at`.
    MergeFields { at: Loc },
    /// A host named pipe mapped into the guest, kept beside the document (the VM schema has no
    /// field for it).
    MappedPipe,
    /// Accepted, but nothing in the VM document records it.
    NoDocumentChange,
}

/// An extra check of a request against the current document and the path's wildcards.
type Check = fn(&Value, &[String], RequestType) -> HcsResult<()>;

struct Route {
    pattern: &'static [Seg],
    accepts: Accepts,
    settings: Settings,
    /// "`Settings` is ignored when type is "Remove"".
    ignore_settings_on_remove: bool,
    effect: Effect,
    /// Extra checks against the current document.
    check: Option<Check>,
}

use RequestType::{Add, Remove, Update};
use Seg::{Guid, Lit, Name, Uint};

const VM_DEVICES: [Seg; 2] = [Lit("VirtualMachine"), Lit("Devices")];

static ROUTES: &[Route] = &[
    // Reference table: "VirtualMachine/ComputeTopology/Processor/CpuGroup", CpuGroup, No Limit.
    Route {
        pattern: &[
            Lit("VirtualMachine"),
            Lit("ComputeTopology"),
            Lit("Processor"),
            Lit("CpuGroup"),
        ],
        accepts: Accepts::NoLimit {
            absent_means_update: true,
        },
        settings: Settings::Of(Ty::Obj("CpuGroup")),
        ignore_settings_on_remove: true,
        effect: Effect::SetValue {
            at: &["VirtualMachine", "ComputeTopology", "Processor", "CpuGroup"],
        },
        check: None,
    },
    // Reference table: ".../Processor/IdledProcessors", IdleProcessorsRequest, Only "Update".
    Route {
        pattern: &[
            Lit("VirtualMachine"),
            Lit("ComputeTopology"),
            Lit("Processor"),
            Lit("IdledProcessors"),
        ],
        accepts: Accepts::Only(&[Update]),
        settings: Settings::Of(Ty::Obj("IdleProcessorsRequest")),
        ignore_settings_on_remove: false,
        effect: Effect::NoDocumentChange,
        check: None,
    },
    // Reference table: ".../Processor/CpuFrequencyPowerCap", ULONG, No Limit.
    Route {
        pattern: &[
            Lit("VirtualMachine"),
            Lit("ComputeTopology"),
            Lit("Processor"),
            Lit("CpuFrequencyPowerCap"),
        ],
        accepts: Accepts::NoLimit {
            absent_means_update: true,
        },
        settings: Settings::Of(Ty::U32),
        ignore_settings_on_remove: false,
        effect: Effect::NoDocumentChange,
        check: None,
    },
    // hcsshim CPULimitsResourcePath; Settings ProcessorLimits ("Used when modifying processor
    // scheduling limits of a virtual machine"); hcsshim sends no RequestType.
    Route {
        pattern: &[
            Lit("VirtualMachine"),
            Lit("ComputeTopology"),
            Lit("Processor"),
            Lit("Limits"),
        ],
        accepts: Accepts::UpdateOrAbsent,
        settings: Settings::Of(Ty::Obj("ProcessorLimits")),
        ignore_settings_on_remove: false,
        effect: Effect::MergeFields {
            at: &["VirtualMachine", "ComputeTopology", "Processor"],
        },
        check: None,
    },
    // Reference table: "VirtualMachine/ComputeTopology/Gpu", GpuConfiguration, Only "Update".
    Route {
        pattern: &[Lit("VirtualMachine"), Lit("ComputeTopology"), Lit("Gpu")],
        accepts: Accepts::Only(&[Update]),
        settings: Settings::Of(Ty::Obj("GpuConfiguration")),
        ignore_settings_on_remove: false,
        effect: Effect::NoDocumentChange,
        check: None,
    },
    // Reference table: ".../Memory/SizeInMB", "UINT64, meaning new memory size in MB", No Limit.
    Route {
        pattern: &[
            Lit("VirtualMachine"),
            Lit("ComputeTopology"),
            Lit("Memory"),
            Lit("SizeInMB"),
        ],
        accepts: Accepts::NoLimit {
            absent_means_update: true,
        },
        settings: Settings::Of(Ty::U64),
        ignore_settings_on_remove: false,
        effect: Effect::SetValue {
            at: &["VirtualMachine", "ComputeTopology", "Memory", "SizeInMB"],
        },
        check: None,
    },
    // Reference table: "VirtualMachine/Devices/FlexibleIov/<Identifier>", FlexibleIoDevice,
    // Only "Add".
    Route {
        pattern: &[VM_DEVICES[0], VM_DEVICES[1], Lit("FlexibleIov"), Name],
        accepts: Accepts::Only(&[Add]),
        settings: Settings::Of(Ty::Obj("FlexibleIoDevice")),
        ignore_settings_on_remove: false,
        effect: Effect::MapEntry {
            map: &["VirtualMachine", "Devices", "FlexibleIov"],
            key: 0,
            parent: None,
            update_inserts: false,
        },
        check: None,
    },
    // Reference table: "VirtualMachine/Devices/MappedPipes/<Identifier>", Settings empty,
    // "Add" or "Remove".
    Route {
        pattern: &[VM_DEVICES[0], VM_DEVICES[1], Lit("MappedPipes"), Name],
        accepts: Accepts::Only(&[Add, Remove]),
        settings: Settings::Empty,
        ignore_settings_on_remove: true,
        effect: Effect::MappedPipe,
        check: None,
    },
    // Reference table: "VirtualMachine/Devices/NetworkAdapters/<Identifier>", NetworkAdapter,
    // No Limit.
    Route {
        pattern: &[VM_DEVICES[0], VM_DEVICES[1], Lit("NetworkAdapters"), Name],
        accepts: Accepts::NoLimit {
            absent_means_update: false,
        },
        settings: Settings::Of(Ty::Obj("NetworkAdapter")),
        ignore_settings_on_remove: true,
        effect: Effect::MapEntry {
            map: &["VirtualMachine", "Devices", "NetworkAdapters"],
            key: 0,
            parent: None,
            update_inserts: false,
        },
        check: None,
    },
    // Reference table: "VirtualMachine/Devices/Plan9/Shares", Plan9Share, No Limit.
    Route {
        pattern: &[VM_DEVICES[0], VM_DEVICES[1], Lit("Plan9"), Lit("Shares")],
        accepts: Accepts::NoLimit {
            absent_means_update: false,
        },
        settings: Settings::Of(Ty::Obj("Plan9Share")),
        ignore_settings_on_remove: false,
        effect: Effect::ArrayEntry {
            array: &["VirtualMachine", "Devices", "Plan9", "Shares"],
            identity: &["Name", "AccessName", "Port"],
            parent: Some((
                &["VirtualMachine", "Devices", "Plan9"],
                "the Plan9 device (VirtualMachine.Devices.Plan9)",
            )),
        },
        check: None,
    },
    // Reference table: "VirtualMachine/Devices/Scsi/<Identifier>/Attachments/<UnsignedInt>",
    // Attachment, No Limit, "`Settings` is ignored when type is "Remove"".
    Route {
        pattern: &[
            VM_DEVICES[0],
            VM_DEVICES[1],
            Lit("Scsi"),
            Name,
            Lit("Attachments"),
            Uint(u32::MAX as u64),
        ],
        accepts: Accepts::NoLimit {
            absent_means_update: false,
        },
        settings: Settings::Of(Ty::Obj("Attachment")),
        ignore_settings_on_remove: true,
        effect: Effect::MapEntry {
            map: &["VirtualMachine", "Devices", "Scsi", "$0", "Attachments"],
            key: 1,
            parent: Some((
                &["VirtualMachine", "Devices", "Scsi", "$0"],
                "SCSI controller $0 (VirtualMachine.Devices.Scsi[\"$0\"])",
            )),
            update_inserts: false,
        },
        check: None,
    },
    // Reference table: "VirtualMachine/Devices/ComPorts/<UnsignedInt>", ComPort, No Limit;
    // "the serial ID which is not larger than 1".
    Route {
        pattern: &[VM_DEVICES[0], VM_DEVICES[1], Lit("ComPorts"), Uint(1)],
        accepts: Accepts::NoLimit {
            absent_means_update: false,
        },
        settings: Settings::Of(Ty::Obj("ComPort")),
        ignore_settings_on_remove: true,
        effect: Effect::MapEntry {
            map: &["VirtualMachine", "Devices", "ComPorts"],
            key: 0,
            parent: None,
            update_inserts: false,
        },
        check: None,
    },
    // Reference table: "VirtualMachine/Devices/SharedMemory/Regions", SharedMemoryRegion,
    // No Limit.
    Route {
        pattern: &[
            VM_DEVICES[0],
            VM_DEVICES[1],
            Lit("SharedMemory"),
            Lit("Regions"),
        ],
        accepts: Accepts::NoLimit {
            absent_means_update: false,
        },
        settings: Settings::Of(Ty::Obj("SharedMemoryRegion")),
        ignore_settings_on_remove: false,
        effect: Effect::ArrayEntry {
            array: &["VirtualMachine", "Devices", "SharedMemory", "Regions"],
            identity: &["SectionName"],
            parent: None,
        },
        check: None,
    },
    // Reference table: "VirtualMachine/Devices/VirtualPMem/Devices/<UnsignedInt>",
    // VirtualPMemDevice, "Add" or "Remove"; Settings ignored on Remove.
    Route {
        pattern: &[
            VM_DEVICES[0],
            VM_DEVICES[1],
            Lit("VirtualPMem"),
            Lit("Devices"),
            Uint(u8::MAX as u64),
        ],
        accepts: Accepts::Only(&[Add, Remove]),
        settings: Settings::Of(Ty::Obj("VirtualPMemDevice")),
        ignore_settings_on_remove: true,
        effect: Effect::MapEntry {
            map: &["VirtualMachine", "Devices", "VirtualPMem", "Devices"],
            key: 0,
            parent: Some((
                &["VirtualMachine", "Devices", "VirtualPMem"],
                "the VirtualPMem controller (VirtualMachine.Devices.VirtualPMem)",
            )),
            update_inserts: false,
        },
        check: Some(below_pmem_maximum_count),
    },
    // Reference table: ".../VirtualPMem/Devices/<UnsignedInt>/Mappings/<UnsignedInt>",
    // VirtualPMemMapping, "Add" or "Remove"; Settings ignored on Remove.
    Route {
        pattern: &[
            VM_DEVICES[0],
            VM_DEVICES[1],
            Lit("VirtualPMem"),
            Lit("Devices"),
            Uint(u8::MAX as u64),
            Lit("Mappings"),
            Uint(u64::MAX),
        ],
        accepts: Accepts::Only(&[Add, Remove]),
        settings: Settings::Of(Ty::Obj("VirtualPMemMapping")),
        ignore_settings_on_remove: true,
        effect: Effect::MapEntry {
            map: &[
                "VirtualMachine",
                "Devices",
                "VirtualPMem",
                "Devices",
                "$0",
                "Mappings",
            ],
            key: 1,
            parent: Some((
                &["VirtualMachine", "Devices", "VirtualPMem", "Devices", "$0"],
                "VirtualPMem device $0 (VirtualMachine.Devices.VirtualPMem.Devices[\"$0\"])",
            )),
            update_inserts: false,
        },
        check: None,
    },
    // Reference table: "VirtualMachine/Devices/VirtualSmb/Shares", VirtualSmbShare, No Limit.
    Route {
        pattern: &[
            VM_DEVICES[0],
            VM_DEVICES[1],
            Lit("VirtualSmb"),
            Lit("Shares"),
        ],
        accepts: Accepts::NoLimit {
            absent_means_update: false,
        },
        settings: Settings::Of(Ty::Obj("VirtualSmbShare")),
        ignore_settings_on_remove: false,
        effect: Effect::ArrayEntry {
            array: &["VirtualMachine", "Devices", "VirtualSmb", "Shares"],
            identity: &["Name"],
            parent: Some((
                &["VirtualMachine", "Devices", "VirtualSmb"],
                "the VirtualSmb device (VirtualMachine.Devices.VirtualSmb)",
            )),
        },
        check: None,
    },
    // Reference table: "VirtualMachine/Devices/VirtualPci/" + c_Identifier, VirtualPciDevice,
    // "Add" or "Remove"; Settings ignored on Remove.
    Route {
        pattern: &[VM_DEVICES[0], VM_DEVICES[1], Lit("VirtualPci"), Name],
        accepts: Accepts::Only(&[Add, Remove]),
        settings: Settings::Of(Ty::Obj("VirtualPciDevice")),
        ignore_settings_on_remove: true,
        effect: Effect::MapEntry {
            map: &["VirtualMachine", "Devices", "VirtualPci"],
            key: 0,
            parent: None,
            update_inserts: false,
        },
        check: None,
    },
    // hcsshim HvSocketConfigResourceFormat (not in the reference table); HvSocketServiceConfig;
    // hcsshim adds and changes a service with Update, and removes it with Remove.
    Route {
        pattern: &[
            VM_DEVICES[0],
            VM_DEVICES[1],
            Lit("HvSocket"),
            Lit("HvSocketConfig"),
            Lit("ServiceTable"),
            Guid,
        ],
        accepts: Accepts::Only(&[Update, Remove]),
        settings: Settings::Of(Ty::Obj("HvSocketServiceConfig")),
        ignore_settings_on_remove: true,
        effect: Effect::MapEntry {
            map: &[
                "VirtualMachine",
                "Devices",
                "HvSocket",
                "HvSocketConfig",
                "ServiceTable",
            ],
            key: 0,
            parent: None,
            update_inserts: true,
        },
        check: None,
    },
];

/// VirtualPMemController: "adds empty devices up to MaximumCount"; a device id at or past
/// MaximumCount has no slot.
fn below_pmem_maximum_count(doc: &Value, caps: &[String], _: RequestType) -> HcsResult<()> {
    let max = doc
        .pointer("/VirtualMachine/Devices/VirtualPMem/MaximumCount")
        .and_then(Value::as_u64);
    let id = caps.first().and_then(|c| c.parse::<u64>().ok());
    match (max, id) {
        (Some(max), Some(id)) if id >= max => Err(HcsError::new(
            E_INVALIDARG,
            format!(
                "VirtualPMem device {id} is not below VirtualMachine.Devices.VirtualPMem.MaximumCount ({max})"
            ),
        )),
        _ => Ok(()),
    }
}

fn matches(pattern: &[Seg], segs: &[&str]) -> Option<Vec<String>> {
    if pattern.len() != segs.len() {
        return None;
    }
    let mut caps = Vec::new();
    for (p, s) in pattern.iter().zip(segs) {
        match *p {
            Lit(l) if l == *s => {}
            Lit(_) => return None,
            Name if !s.is_empty() => caps.push((*s).to_string()),
            Uint(max) if schema::is_decimal_at_most(s, max) => caps.push((*s).to_string()),
            Guid if schema::is_guid(s) => caps.push((*s).to_string()),
            _ => return None,
        }
    }
    Some(caps)
}

fn resolve(loc: Loc, caps: &[String]) -> Vec<String> {
    loc.iter()
        .map(|k| match k.strip_prefix('$') {
            Some(n) => n
                .parse::<usize>()
                .ok()
                .and_then(|i| caps.get(i))
                .cloned()
                .unwrap_or_default(),
            None => (*k).to_string(),
        })
        .collect()
}

fn fill(text: &str, caps: &[String]) -> String {
    let mut out = text.to_string();
    for (i, c) in caps.iter().enumerate() {
        out = out.replace(&format!("${i}"), c);
    }
    out
}

fn dotted(keys: &[String]) -> String {
    keys.join(".")
}

fn get<'a>(doc: &'a Value, keys: &[String]) -> Option<&'a Value> {
    keys.iter().try_fold(doc, |v, k| v.get(k))
}

/// The object at `keys`, creating missing objects on the way.
fn object_mut<'a>(doc: &'a mut Value, keys: &[String]) -> HcsResult<&'a mut Map<String, Value>> {
    let mut cur = doc;
    for (i, k) in keys.iter().enumerate() {
        let Value::Object(map) = cur else {
            return Err(HcsError::new(
                E_INVALIDARG,
                format!("{} is not an object", dotted(&keys[..i])),
            ));
        };
        cur = map
            .entry(k.clone())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    match cur {
        Value::Object(map) => Ok(map),
        _ => Err(HcsError::new(
            E_INVALIDARG,
            format!("{} is not an object", dotted(keys)),
        )),
    }
}

fn array_mut<'a>(doc: &'a mut Value, keys: &[String]) -> HcsResult<&'a mut Vec<Value>> {
    let Some((last, parent)) = keys.split_last() else {
        return Err(HcsError::new(E_INVALIDARG, "empty document location"));
    };
    let map = object_mut(doc, parent)?;
    match map
        .entry(last.clone())
        .or_insert_with(|| Value::Array(Vec::new()))
    {
        Value::Array(items) => Ok(items),
        _ => Err(HcsError::new(
            E_INVALIDARG,
            format!("{} is not an array", dotted(keys)),
        )),
    }
}

fn merge(into: &mut Value, from: &Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
}

fn settings_field(settings: Option<&Value>, field: &str) -> Option<Value> {
    settings.and_then(|s| s.get(field)).cloned()
}

/// Applies the ModifySettingRequest `request` (already parsed JSON) to a VM's `document` and its
/// `mapped_pipes`. On error nothing is changed.
pub fn apply(
    document: &mut Value,
    mapped_pipes: &mut Vec<String>,
    request: &Value,
) -> HcsResult<()> {
    schema::validate("ModifySettingRequest", request, "")
        .map_err(|o| HcsError::new(HCS_E_INVALID_JSON, format!("ModifySettingRequest: {o}")))?;

    let resource_path = request.get("ResourcePath").and_then(Value::as_str);
    let request_type = request
        .get("RequestType")
        .and_then(Value::as_str)
        .and_then(RequestType::parse);
    let settings = request.get("Settings");

    let Some(resource_path) = resource_path.filter(|p| !p.is_empty()) else {
        if request.get("GuestRequest").is_some() {
            // A request for the guest only: HCS forwards it to the guest; nothing on the host
            // side changes.
            return Ok(());
        }
        return Err(HcsError::new(
            E_INVALIDARG,
            "ModifySettingRequest: ResourcePath is required (or a GuestRequest)",
        ));
    };

    let segs: Vec<&str> = resource_path.split('/').collect();
    let Some((route, caps)) = ROUTES
        .iter()
        .find_map(|r| matches(r.pattern, &segs).map(|c| (r, c)))
    else {
        let hint = if segs.len() == 4 && segs[..3] == ["VirtualMachine", "Devices", "Scsi"] {
            " (SCSI controllers cannot be added or removed at run time; only \
             VirtualMachine/Devices/Scsi/<controller>/Attachments/<lun> is modifiable)"
        } else {
            ""
        };
        return Err(HcsError::new(
            E_INVALIDARG,
            format!("ResourcePath: resource path {resource_path:?} is not one HCS modifies{hint}"),
        ));
    };

    let kind = match (route.accepts, request_type) {
        (Accepts::NoLimit { .. }, Some(t)) => t,
        (
            Accepts::NoLimit {
                absent_means_update: true,
            },
            None,
        ) => Update,
        (Accepts::NoLimit { .. }, None) => {
            return Err(HcsError::new(
                E_INVALIDARG,
                format!(
                    "RequestType: resource path {resource_path:?} needs a RequestType (Add, Remove or Update)"
                ),
            ));
        }
        (Accepts::UpdateOrAbsent, None | Some(Update)) => Update,
        (Accepts::UpdateOrAbsent, Some(t)) => {
            return Err(HcsError::new(
                E_INVALIDARG,
                format!(
                    "RequestType: resource path {resource_path:?} does not accept {}; it accepts only Update (or no RequestType)",
                    t.word()
                ),
            ));
        }
        (Accepts::Only(types), t) => match t.filter(|t| types.contains(t)) {
            Some(t) => t,
            None => {
                let accepted: Vec<&str> = types.iter().map(|t| t.word()).collect();
                let given = t.map_or("no RequestType", |t| t.word());
                return Err(HcsError::new(
                    E_INVALIDARG,
                    format!(
                        "RequestType: resource path {resource_path:?} does not accept {given}; it accepts only {}",
                        accepted.join(" or ")
                    ),
                ));
            }
        },
    };

    let ignore_settings = kind == Remove && route.ignore_settings_on_remove;
    if !ignore_settings {
        match route.settings {
            Settings::Of(ty) => match settings {
                Some(s) => schema::validate_type(&ty, s, "Settings").map_err(|o| {
                    HcsError::new(HCS_E_INVALID_JSON, format!("ModifySettingRequest.{o}"))
                })?,
                None => {
                    return Err(HcsError::new(
                        E_INVALIDARG,
                        format!(
                            "Settings: resource path {resource_path:?} with {} needs Settings",
                            kind.word()
                        ),
                    ));
                }
            },
            Settings::Empty => {
                let empty = match settings {
                    None | Some(Value::Null) => true,
                    Some(Value::Object(m)) => m.is_empty(),
                    Some(_) => false,
                };
                if !empty {
                    return Err(HcsError::new(
                        E_INVALIDARG,
                        format!("Settings: resource path {resource_path:?} takes empty Settings"),
                    ));
                }
            }
        }
    }

    if let Some(check) = route.check {
        check(document, &caps, kind)?;
    }

    let mut doc = document.clone();
    let mut pipes = mapped_pipes.clone();
    let new_value = settings.cloned().unwrap_or(Value::Null);
    match route.effect {
        Effect::MapEntry {
            map,
            key,
            parent,
            update_inserts,
        } => {
            let key = caps.get(key).cloned().unwrap_or_default();
            if let Some((loc, what)) = parent {
                let loc = resolve(loc, &caps);
                if !get(&doc, &loc).is_some_and(Value::is_object) {
                    return Err(HcsError::new(
                        E_NOT_FOUND,
                        format!(
                            "ResourcePath {resource_path:?}: {} does not exist in the compute system's document",
                            fill(what, &caps)
                        ),
                    ));
                }
            }
            let map_keys = resolve(map, &caps);
            let where_ = format!("{}[{key:?}]", dotted(&map_keys));
            let entries = object_mut(&mut doc, &map_keys)?;
            match (kind, entries.get_mut(&key)) {
                (Add, Some(_)) => {
                    return Err(HcsError::new(
                        E_ALREADY_EXISTS,
                        format!("ResourcePath {resource_path:?}: {where_} already exists"),
                    ));
                }
                (Add, None) => {
                    entries.insert(key, new_value);
                }
                (Remove, Some(_)) => {
                    entries.remove(&key);
                }
                (Update, Some(existing)) => merge(existing, &new_value),
                (Update, None) if update_inserts => {
                    entries.insert(key, new_value);
                }
                (Remove | Update, None) => {
                    return Err(HcsError::new(
                        E_NOT_FOUND,
                        format!("ResourcePath {resource_path:?}: {where_} does not exist"),
                    ));
                }
            }
        }
        Effect::ArrayEntry {
            array,
            identity,
            parent,
        } => {
            if let Some((loc, what)) = parent {
                let loc = resolve(loc, &caps);
                if !get(&doc, &loc).is_some_and(Value::is_object) {
                    return Err(HcsError::new(
                        E_NOT_FOUND,
                        format!(
                            "ResourcePath {resource_path:?}: {what} does not exist in the compute system's document"
                        ),
                    ));
                }
            }
            let Some((primary, others)) = identity.split_first() else {
                return Err(HcsError::new(E_INVALIDARG, "route without identity"));
            };
            let Some(id) = settings_field(settings, primary) else {
                return Err(HcsError::new(
                    E_INVALIDARG,
                    format!(
                        "Settings.{primary}: resource path {resource_path:?} identifies its entry by {primary}, which is missing"
                    ),
                ));
            };
            let others: Vec<(&str, Value)> = others
                .iter()
                .filter_map(|f| settings_field(settings, f).map(|v| (*f, v)))
                .collect();
            let same = |item: &Value| {
                item.get(*primary) == Some(&id)
                    && others
                        .iter()
                        .all(|(f, v)| item.get(*f).is_none_or(|iv| iv == v))
            };
            let array_keys = resolve(array, &caps);
            let where_ = dotted(&array_keys);
            let items = array_mut(&mut doc, &array_keys)?;
            let found = items.iter().position(same);
            match (kind, found) {
                (Add, Some(_)) => {
                    return Err(HcsError::new(
                        E_ALREADY_EXISTS,
                        format!("{where_}: an entry with {primary} {id} already exists"),
                    ));
                }
                (Add, None) => items.push(new_value),
                (Remove, Some(i)) => {
                    items.remove(i);
                }
                (Update, Some(i)) => merge(&mut items[i], &new_value),
                (Remove | Update, None) => {
                    return Err(HcsError::new(
                        E_NOT_FOUND,
                        format!("{where_}: no entry with {primary} {id}"),
                    ));
                }
            }
        }
        Effect::SetValue { at } => {
            let keys = resolve(at, &caps);
            let Some((last, parent)) = keys.split_last() else {
                return Err(HcsError::new(E_INVALIDARG, "empty document location"));
            };
            let map = object_mut(&mut doc, parent)?;
            if kind == Remove && route.ignore_settings_on_remove {
                map.remove(last);
            } else {
                map.insert(last.clone(), new_value);
            }
        }
        Effect::MergeFields { at } => {
            let keys = resolve(at, &caps);
            let map = object_mut(&mut doc, &keys)?;
            if let Value::Object(fields) = &new_value {
                for (k, v) in fields {
                    map.insert(k.clone(), v.clone());
                }
            }
        }
        Effect::MappedPipe => {
            let name = caps.first().cloned().unwrap_or_default();
            let at = pipes.iter().position(|p| *p == name);
            match (kind, at) {
                (Add, Some(_)) => {
                    return Err(HcsError::new(
                        E_ALREADY_EXISTS,
                        format!("ResourcePath {resource_path:?}: pipe {name:?} is already mapped"),
                    ));
                }
                (Add, None) => pipes.push(name),
                (Remove, Some(i)) => {
                    pipes.remove(i);
                }
                _ => {
                    return Err(HcsError::new(
                        E_NOT_FOUND,
                        format!("ResourcePath {resource_path:?}: pipe {name:?} is not mapped"),
                    ));
                }
            }
        }
        Effect::NoDocumentChange => {}
    }

    // The document must still be a ComputeSystem (it always should be; this guards the table).
    schema::validate("ComputeSystem", &doc, "").map_err(|o| {
        HcsError::new(
            HCS_E_INVALID_JSON,
            format!("the modified document would not be a ComputeSystem: {o}"),
        )
    })?;
    *document = doc;
    *mapped_pipes = pipes;
    Ok(())
}
