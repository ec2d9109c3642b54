//! The emulator's own statement of the HCS JSON schema, and a validator over it.
//!
//! Every object below is written from Microsoft's schema reference,
//! `virtualization/api/hcs/SchemaReference.md` in MicrosoftDocs/Virtualization-Documentation
//! (snapshot 77e0742a8029cf3b5a96c84dfab2ce7ba623286c); each entry names the section it comes
//! from. The tables cover every object reachable from the documents the emulator reads
//! (ComputeSystem, ModifySettingRequest and the Settings types of its resource paths,
//! SaveOptions, PauseOptions, ShutdownOptions, System_PropertyQuery, SystemQuery) and from the
//! documents it writes (Properties, ComputeSystemProperties, SystemExitStatus, ResultError), so
//! that its tests can check its own output against the reference too.
//!
//! The reference's own names are used: the VM's `ComputeTopology` field has the type `Topology`,
//! its memory is `VirtualMachine_Memory`, its processor `VirtualMachine_Processor`, its
//! `Devices.HvSocket` is `VirtualMachine_HvSocket`, and the property query is
//! `System_PropertyQuery`.
//!
//! The reference marks no field as required, so this statement only says which fields exist and
//! what they hold; requirements (SchemaVersion, VirtualMachine, ...) are checked by the callers of
//! [`validate`]. A field the reference does not list is refused, as is a value of the wrong JSON
//! type, an integer outside its width or sign, a word outside its enum, a malformed GUID, and
//! `null` (the reference has no nullable types; see the README's assumptions).

#![forbid(unsafe_code)]

use serde_json::Value;

/// The type of a field, as the reference's "JSON type" table and its enum/struct sections say.
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    Str,
    Bool,
    U8,
    U16,
    U32,
    U64,
    I32,
    I64,
    /// `Guid`: a string matching `^[0-9A-Fa-f]{8}-([0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}$`.
    Guid,
    /// `DateTime`: a string (format date-time).
    DateTime,
    /// `MacAddress`: a string (format mac-address): six hex pairs separated by `-` or `:`.
    MacAddress,
    /// `ByteArray` and the binary string types: a string.
    Bytes,
    /// `Any`: no restriction.
    Any,
    /// One of the words of the named enum section.
    Enum(&'static str),
    /// The named struct section.
    Obj(&'static str),
    /// `Map<K, V>`: a JSON object whose keys are K written as strings.
    Map(Key, &'static Ty),
    /// `<T> array`.
    Array(&'static Ty),
}

/// The key type of a `Map`.
#[derive(Debug, Clone, Copy)]
pub enum Key {
    Str,
    U8,
    U16,
    U32,
    U64,
    Guid,
}

/// A struct section: its fields, in the reference's order.
pub struct Object {
    pub name: &'static str,
    pub fields: &'static [(&'static str, Ty)],
}

/// An enum section: its words ("all variants listed should be used as string").
pub struct Enum {
    pub name: &'static str,
    pub words: &'static [&'static str],
}

/// The first offence found in a document: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offence {
    /// The JSON path of the offending value, e.g. `VirtualMachine.Devices.Scsi["0"]`.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Offence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            write!(f, "(document root): {}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

pub fn object(name: &str) -> Option<&'static Object> {
    OBJECTS.iter().find(|o| o.name == name)
}

pub fn enumeration(name: &str) -> Option<&'static Enum> {
    ENUMS.iter().find(|e| e.name == name)
}

/// Validates `value` as an instance of the struct section `object_name`. `path` is the JSON
/// path of `value` in its document (empty for a document root).
pub fn validate(object_name: &str, value: &Value, path: &str) -> Result<(), Offence> {
    match object(object_name) {
        Some(o) => check(&Ty::Obj(o.name), value, path),
        None => Err(offence(
            path,
            format!("no schema statement for {object_name}"),
        )),
    }
}

/// Validates `value` as an instance of `ty` (for Settings that are not objects, e.g. a uint64).
pub fn validate_type(ty: &Ty, value: &Value, path: &str) -> Result<(), Offence> {
    check(ty, value, path)
}

fn offence(path: &str, message: impl Into<String>) -> Offence {
    Offence {
        path: path.to_string(),
        message: message.into(),
    }
}

fn field_path(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn mistyped(path: &str, wanted: &str, value: &Value) -> Offence {
    offence(
        path,
        format!("expected {wanted}, found {}", describe(value)),
    )
}

fn check_uint(path: &str, value: &Value, name: &str, max: u64) -> Result<(), Offence> {
    match value {
        Value::Number(n) => match n.as_u64() {
            Some(v) if v <= max => Ok(()),
            Some(v) => Err(offence(path, format!("{v} does not fit in {name}"))),
            None if n.as_i64().is_some() => Err(offence(
                path,
                format!("{n} is negative; {name} is unsigned"),
            )),
            None => Err(offence(path, format!("{n} is not an integer ({name})"))),
        },
        other => Err(mistyped(path, name, other)),
    }
}

fn check_int(path: &str, value: &Value, name: &str, min: i64, max: i64) -> Result<(), Offence> {
    match value {
        Value::Number(n) => match n.as_i64() {
            Some(v) if (min..=max).contains(&v) => Ok(()),
            Some(v) => Err(offence(path, format!("{v} does not fit in {name}"))),
            None if n.as_u64().is_some() => {
                Err(offence(path, format!("{n} does not fit in {name}")))
            }
            None => Err(offence(path, format!("{n} is not an integer ({name})"))),
        },
        other => Err(mistyped(path, name, other)),
    }
}

/// `^[0-9A-Fa-f]{8}-([0-9A-Fa-f]{4}-){3}[0-9A-Fa-f]{12}$`
pub fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8usize, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_mac(s: &str) -> bool {
    let sep = if s.contains(':') { ':' } else { '-' };
    let parts: Vec<&str> = s.split(sep).collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

fn check_str(path: &str, value: &Value, name: &str) -> Result<(), Offence> {
    match value {
        Value::String(_) => Ok(()),
        other => Err(mistyped(path, name, other)),
    }
}

fn check_key(path: &str, key: &str, ty: Key) -> Result<(), Offence> {
    let (ok, name) = match ty {
        Key::Str => (true, "string"),
        Key::U8 => (is_decimal_at_most(key, u64::from(u8::MAX)), "uint8"),
        Key::U16 => (is_decimal_at_most(key, u64::from(u16::MAX)), "uint16"),
        Key::U32 => (is_decimal_at_most(key, u64::from(u32::MAX)), "uint32"),
        Key::U64 => (is_decimal_at_most(key, u64::MAX), "uint64"),
        Key::Guid => (is_guid(key), "Guid"),
    };
    if ok {
        Ok(())
    } else {
        Err(offence(
            path,
            format!("map key {key:?} is not a {name} (the map's key type)"),
        ))
    }
}

/// A decimal integer as written canonically (no sign, no leading zero, so
/// that `00` never names what `0` names) that is at most `max`.
pub fn is_decimal_at_most(s: &str, max: u64) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'))
        && s.parse::<u64>().is_ok_and(|v| v <= max)
}

fn check(ty: &Ty, value: &Value, path: &str) -> Result<(), Offence> {
    if value.is_null() && !matches!(ty, Ty::Any) {
        return Err(offence(
            path,
            "null is not a value of any schema type (omit the field instead)",
        ));
    }
    match *ty {
        Ty::Any => Ok(()),
        Ty::Str | Ty::Bytes | Ty::DateTime => check_str(path, value, "a string"),
        Ty::Bool => match value {
            Value::Bool(_) => Ok(()),
            other => Err(mistyped(path, "a bool", other)),
        },
        Ty::U8 => check_uint(path, value, "uint8", u64::from(u8::MAX)),
        Ty::U16 => check_uint(path, value, "uint16", u64::from(u16::MAX)),
        Ty::U32 => check_uint(path, value, "uint32", u64::from(u32::MAX)),
        Ty::U64 => check_uint(path, value, "uint64", u64::MAX),
        Ty::I32 => check_int(
            path,
            value,
            "int32",
            i64::from(i32::MIN),
            i64::from(i32::MAX),
        ),
        Ty::I64 => check_int(path, value, "int64", i64::MIN, i64::MAX),
        Ty::Guid => match value {
            Value::String(s) if is_guid(s) => Ok(()),
            Value::String(s) => Err(offence(path, format!("{s:?} is not a Guid"))),
            other => Err(mistyped(path, "a Guid string", other)),
        },
        Ty::MacAddress => match value {
            Value::String(s) if is_mac(s) => Ok(()),
            Value::String(s) => Err(offence(path, format!("{s:?} is not a MacAddress"))),
            other => Err(mistyped(path, "a MacAddress string", other)),
        },
        Ty::Enum(name) => {
            let words = enumeration(name).map(|e| e.words).unwrap_or(&[]);
            match value {
                Value::String(s) if words.contains(&s.as_str()) => Ok(()),
                Value::String(s) => Err(offence(
                    path,
                    format!("{s:?} is not a word of {name} ({})", words.join(", ")),
                )),
                other => Err(mistyped(path, &format!("a {name} string"), other)),
            }
        }
        Ty::Array(item) => match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| check(item, v, &format!("{path}[{i}]"))),
            other => Err(mistyped(path, "an array", other)),
        },
        Ty::Map(key, item) => match value {
            Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                let p = format!("{path}[{k:?}]");
                check_key(&p, k, key)?;
                check(item, v, &p)
            }),
            other => Err(mistyped(path, "an object (map)", other)),
        },
        Ty::Obj(name) => {
            let Some(def) = object(name) else {
                return Err(offence(path, format!("no schema statement for {name}")));
            };
            let Value::Object(map) = value else {
                return Err(mistyped(path, &format!("an object ({name})"), value));
            };
            for (k, v) in map {
                let p = field_path(path, k);
                match def.fields.iter().find(|(f, _)| f == k) {
                    Some((_, fty)) => check(fty, v, &p)?,
                    None => return Err(offence(&p, format!("unknown field of {name}"))),
                }
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The statement itself. One entry per SchemaReference.md section, in alphabetical order, each
// field in the order the reference lists it.
// ---------------------------------------------------------------------------------------------

pub static OBJECTS: &[Object] = &[
    // SchemaReference.md, section "Attachment" (#Attachment)
    Object {
        name: "Attachment",
        fields: &[
            ("Type", Ty::Enum("AttachmentType")),
            ("Path", Ty::Str),
            ("CachingMode", Ty::Enum("CachingMode")),
            ("ReadOnly", Ty::Bool),
            ("SupportCompressedVolumes", Ty::Bool),
            ("AlwaysAllowSparseFiles", Ty::Bool),
            ("SupportEncryptedFiles", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "AttributionRecord" (#AttributionRecord)
    Object {
        name: "AttributionRecord",
        fields: &[
            ("WorkerExit", Ty::Obj("WorkerExit")),
            ("GuestCrash", Ty::Obj("GuestCrash")),
            ("TripleFault", Ty::Obj("TripleFault")),
            (
                "InjectNonMaskableInterrupt",
                Ty::Obj("InjectNonMaskableInterrupt"),
            ),
            ("OperationFailure", Ty::Obj("OperationFailure")),
            ("SystemExit", Ty::Obj("SystemExit")),
            ("VirtualDeviceFailure", Ty::Obj("VirtualDeviceFailure")),
        ],
    },
    // SchemaReference.md, section "Battery" (#Battery)
    Object {
        name: "Battery",
        fields: &[],
    },
    // SchemaReference.md, section "Chipset" (#Chipset)
    Object {
        name: "Chipset",
        fields: &[
            ("Uefi", Ty::Obj("Uefi")),
            ("IsNumLockDisabled", Ty::Bool),
            ("BaseBoardSerialNumber", Ty::Str),
            ("ChassisSerialNumber", Ty::Str),
            ("ChassisAssetTag", Ty::Str),
            ("EnableHibernation", Ty::Bool),
            ("UseUtc", Ty::Bool),
            ("LinuxKernelDirect", Ty::Obj("LinuxKernelDirect")),
        ],
    },
    // SchemaReference.md, section "ComPort" (#ComPort)
    Object {
        name: "ComPort",
        fields: &[("NamedPipe", Ty::Str), ("OptimizeForDebugger", Ty::Bool)],
    },
    // SchemaReference.md, section "ComputeSystem" (#ComputeSystem)
    Object {
        name: "ComputeSystem",
        fields: &[
            ("Owner", Ty::Str),
            ("SchemaVersion", Ty::Obj("Version")),
            ("HostingSystemId", Ty::Str),
            ("HostedSystem", Ty::Any),
            ("Container", Ty::Obj("Container")),
            ("VirtualMachine", Ty::Obj("VirtualMachine")),
            ("ShouldTerminateOnLastHandleClosed", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "ComputeSystemProperties" (#ComputeSystemProperties)
    Object {
        name: "ComputeSystemProperties",
        fields: &[
            ("Id", Ty::Str),
            ("Name", Ty::Str),
            ("SystemType", Ty::Enum("SystemType")),
            ("State", Ty::Enum("State")),
            ("Owner", Ty::Str),
            ("RuntimeId", Ty::Guid),
            ("RuntimeOsType", Ty::Enum("OsType")),
            ("HostingSystemId", Ty::Str),
            ("IsDummy", Ty::Bool),
            ("ObRoot", Ty::Str),
            ("RuntimeTemplateId", Ty::Str),
        ],
    },
    // SchemaReference.md, section "Container" (#Container)
    Object {
        name: "Container",
        fields: &[
            ("GuestOs", Ty::Obj("GuestOs")),
            ("Storage", Ty::Obj("Storage")),
            ("MappedDirectories", Ty::Array(&Ty::Obj("MappedDirectory"))),
            ("MappedPipes", Ty::Array(&Ty::Obj("MappedPipe"))),
            ("Memory", Ty::Obj("Container_Memory")),
            ("Processor", Ty::Obj("Container_Processor")),
            ("Networking", Ty::Obj("Networking")),
            ("HvSocket", Ty::Obj("Container_HvSocket")),
            (
                "ContainerCredentialGuard",
                Ty::Obj("ContainerCredentialGuardState"),
            ),
            ("RegistryChanges", Ty::Obj("RegistryChanges")),
            ("AssignedDevices", Ty::Array(&Ty::Obj("Device"))),
            ("AdditionalDeviceNamespace", Ty::Obj("ContainersDef_Device")),
        ],
    },
    // SchemaReference.md, section "ContainerCredentialGuardState" (#ContainerCredentialGuardState)
    Object {
        name: "ContainerCredentialGuardState",
        fields: &[
            ("Cookie", Ty::Bytes),
            ("RpcEndpoint", Ty::Str),
            ("Transport", Ty::Enum("ContainerCredentialGuardTransport")),
            ("CredentialSpec", Ty::Str),
        ],
    },
    // SchemaReference.md, section "Container_HvSocket" (#Container_HvSocket)
    Object {
        name: "Container_HvSocket",
        fields: &[
            ("Config", Ty::Obj("HvSocketSystemConfig")),
            ("EnablePowerShellDirect", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "Container_Memory" (#Container_Memory)
    Object {
        name: "Container_Memory",
        fields: &[("SizeInMB", Ty::U64)],
    },
    // SchemaReference.md, section "Container_Processor" (#Container_Processor)
    Object {
        name: "Container_Processor",
        fields: &[
            ("Count", Ty::U32),
            ("Weight", Ty::I64),
            ("Maximum", Ty::I64),
        ],
    },
    // SchemaReference.md, section "ContainersDef_BatchedBinding" (#ContainersDef_BatchedBinding)
    Object {
        name: "ContainersDef_BatchedBinding",
        fields: &[("filepath", Ty::Str), ("bindingroots", Ty::Array(&Ty::Str))],
    },
    // SchemaReference.md, section "ContainersDef_Device" (#ContainersDef_Device)
    Object {
        name: "ContainersDef_Device",
        fields: &[("device_extension", Ty::Array(&Ty::Obj("DeviceExtension")))],
    },
    // SchemaReference.md, section "CpuGroup" (#CpuGroup)
    Object {
        name: "CpuGroup",
        fields: &[("Id", Ty::Guid)],
    },
    // SchemaReference.md, section "Device" (#Device)
    Object {
        name: "Device",
        fields: &[
            ("Type", Ty::Enum("DeviceType")),
            ("InterfaceClassGuid", Ty::Guid),
            ("LocationPath", Ty::Str),
        ],
    },
    // SchemaReference.md, section "DeviceCategory" (#DeviceCategory)
    Object {
        name: "DeviceCategory",
        fields: &[
            ("name", Ty::Str),
            ("interface_class", Ty::Array(&Ty::Obj("InterfaceClass"))),
        ],
    },
    // SchemaReference.md, section "DeviceExtension" (#DeviceExtension)
    Object {
        name: "DeviceExtension",
        fields: &[
            ("device_category", Ty::Obj("DeviceCategory")),
            ("namespace", Ty::Obj("Namespace")),
        ],
    },
    // SchemaReference.md, section "DeviceInstance" (#DeviceInstance)
    Object {
        name: "DeviceInstance",
        fields: &[
            ("id", Ty::Str),
            ("location_path", Ty::Str),
            ("port_name", Ty::Str),
            ("interface_class", Ty::Array(&Ty::Obj("InterfaceClass"))),
        ],
    },
    // SchemaReference.md, section "DeviceNamespace" (#DeviceNamespace)
    Object {
        name: "DeviceNamespace",
        fields: &[
            ("requires_driverstore", Ty::Bool),
            ("device_category", Ty::Array(&Ty::Obj("DeviceCategory"))),
            ("device_instance", Ty::Array(&Ty::Obj("DeviceInstance"))),
        ],
    },
    // SchemaReference.md, section "Devices" (#Devices)
    Object {
        name: "Devices",
        fields: &[
            ("ComPorts", Ty::Map(Key::U32, &Ty::Obj("ComPort"))),
            ("VirtioSerial", Ty::Obj("VirtioSerial")),
            ("Scsi", Ty::Map(Key::Str, &Ty::Obj("Scsi"))),
            ("VirtualPMem", Ty::Obj("VirtualPMemController")),
            (
                "NetworkAdapters",
                Ty::Map(Key::Str, &Ty::Obj("NetworkAdapter")),
            ),
            ("VideoMonitor", Ty::Obj("VideoMonitor")),
            ("Keyboard", Ty::Obj("Keyboard")),
            ("Mouse", Ty::Obj("Mouse")),
            ("HvSocket", Ty::Obj("VirtualMachine_HvSocket")),
            ("EnhancedModeVideo", Ty::Obj("EnhancedModeVideo")),
            ("GuestCrashReporting", Ty::Obj("GuestCrashReporting")),
            ("VirtualSmb", Ty::Obj("VirtualSmb")),
            ("Plan9", Ty::Obj("Plan9")),
            ("Battery", Ty::Obj("Battery")),
            (
                "FlexibleIov",
                Ty::Map(Key::Str, &Ty::Obj("FlexibleIoDevice")),
            ),
            ("SharedMemory", Ty::Obj("SharedMemoryConfiguration")),
            (
                "VirtualPci",
                Ty::Map(Key::Str, &Ty::Obj("VirtualPciDevice")),
            ),
        ],
    },
    // SchemaReference.md, section "EnhancedModeVideo" (#EnhancedModeVideo)
    Object {
        name: "EnhancedModeVideo",
        fields: &[("ConnectionOptions", Ty::Obj("RdpConnectionOptions"))],
    },
    // SchemaReference.md, section "ErrorEvent" (#ErrorEvent)
    Object {
        name: "ErrorEvent",
        fields: &[
            ("Message", Ty::Str),
            ("StackTrace", Ty::Str),
            ("Provider", Ty::Guid),
            ("EventId", Ty::U16),
            ("Flags", Ty::U32),
            ("Source", Ty::Str),
            ("Data", Ty::Array(&Ty::Obj("EventData"))),
        ],
    },
    // SchemaReference.md, section "EventData" (#EventData)
    Object {
        name: "EventData",
        fields: &[("Type", Ty::Enum("EventDataType")), ("Value", Ty::Str)],
    },
    // SchemaReference.md, section "FilesystemLayer" (#FilesystemLayer)
    Object {
        name: "FilesystemLayer",
        fields: &[("identifier", Ty::Guid), ("path", Ty::Str)],
    },
    // SchemaReference.md, section "FilesystemNamespace" (#FilesystemNamespace)
    Object {
        name: "FilesystemNamespace",
        fields: &[
            ("path", Ty::Str),
            ("isolation", Ty::Enum("FilesystemIsolationMode")),
            ("nesting", Ty::Enum("FilesystemNestingMode")),
            ("layer", Ty::Array(&Ty::Obj("FilesystemLayer"))),
            (
                "bindings",
                Ty::Array(&Ty::Obj("ContainersDef_BatchedBinding")),
            ),
        ],
    },
    // SchemaReference.md, section "FlexibleIoDevice" (#FlexibleIoDevice)
    Object {
        name: "FlexibleIoDevice",
        fields: &[
            ("EmulatorId", Ty::Guid),
            ("HostingModel", Ty::Enum("FlexibleIoDeviceHostingModel")),
            ("Configuration", Ty::Array(&Ty::Str)),
        ],
    },
    // SchemaReference.md, section "GpuConfiguration" (#GpuConfiguration)
    Object {
        name: "GpuConfiguration",
        fields: &[
            ("AssignmentMode", Ty::Enum("GpuAssignmentMode")),
            ("AssignmentRequest", Ty::Map(Key::Str, &Ty::U16)),
            ("AllowVendorExtension", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "GuestConnection" (#GuestConnection)
    Object {
        name: "GuestConnection",
        fields: &[
            ("UseVsock", Ty::Bool),
            ("UseConnectedSuspend", Ty::Bool),
            ("UseHostTimeZone", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "GuestConnectionInfo" (#GuestConnectionInfo)
    Object {
        name: "GuestConnectionInfo",
        fields: &[
            ("SupportedSchemaVersions", Ty::Array(&Ty::Obj("Version"))),
            ("ProtocolVersion", Ty::U32),
            ("GuestDefinedCapabilities", Ty::Any),
        ],
    },
    // SchemaReference.md, section "GuestCrash" (#GuestCrash)
    Object {
        name: "GuestCrash",
        fields: &[("CrashParameters", Ty::Array(&Ty::U64))],
    },
    // SchemaReference.md, section "GuestCrashReporting" (#GuestCrashReporting)
    Object {
        name: "GuestCrashReporting",
        fields: &[("WindowsCrashSettings", Ty::Obj("WindowsCrashReporting"))],
    },
    // SchemaReference.md, section "GuestOs" (#GuestOs)
    Object {
        name: "GuestOs",
        fields: &[("HostName", Ty::Str)],
    },
    // SchemaReference.md, section "GuestState" (#GuestState)
    Object {
        name: "GuestState",
        fields: &[
            ("GuestStateFilePath", Ty::Str),
            ("RuntimeStateFilePath", Ty::Str),
            ("ForceTransientState", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "Heartbeat" (#Heartbeat)
    Object {
        name: "Heartbeat",
        fields: &[],
    },
    // SchemaReference.md, section "HostFiles" (#HostFiles)
    Object {
        name: "HostFiles",
        fields: &[
            ("base_image_path", Ty::Str),
            ("sandbox_path", Ty::Str),
            ("file", Ty::Array(&Ty::Str)),
        ],
    },
    // SchemaReference.md, section "HvSocketServiceConfig" (#HvSocketServiceConfig)
    Object {
        name: "HvSocketServiceConfig",
        fields: &[
            ("BindSecurityDescriptor", Ty::Str),
            ("ConnectSecurityDescriptor", Ty::Str),
            ("AllowWildcardBinds", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "HvSocketSystemConfig" (#HvSocketSystemConfig)
    Object {
        name: "HvSocketSystemConfig",
        fields: &[
            ("DefaultBindSecurityDescriptor", Ty::Str),
            ("DefaultConnectSecurityDescriptor", Ty::Str),
            (
                "ServiceTable",
                Ty::Map(Key::Guid, &Ty::Obj("HvSocketServiceConfig")),
            ),
        ],
    },
    // SchemaReference.md, section "IdleProcessorsRequest" (#IdleProcessorsRequest)
    Object {
        name: "IdleProcessorsRequest",
        fields: &[("IdleProcessorCount", Ty::U32)],
    },
    // SchemaReference.md, section "InjectNonMaskableInterrupt" (#InjectNonMaskableInterrupt)
    Object {
        name: "InjectNonMaskableInterrupt",
        fields: &[],
    },
    // SchemaReference.md, section "InterfaceClass" (#InterfaceClass)
    Object {
        name: "InterfaceClass",
        fields: &[
            ("type", Ty::Enum("InterfaceClassType")),
            ("identifier", Ty::Guid),
            ("recurse", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "IovSettings" (#IovSettings)
    Object {
        name: "IovSettings",
        fields: &[
            ("OffloadWeight", Ty::U32),
            ("QueuePairsRequested", Ty::U32),
            ("InterruptModeration", Ty::Enum("InterruptModerationMode")),
        ],
    },
    // SchemaReference.md, section "JobCpu" (#JobCpu)
    Object {
        name: "JobCpu",
        fields: &[("rate", Ty::U32), ("weight", Ty::U32)],
    },
    // SchemaReference.md, section "JobMemory" (#JobMemory)
    Object {
        name: "JobMemory",
        fields: &[("limit", Ty::U64)],
    },
    // SchemaReference.md, section "JobNamespace" (#JobNamespace)
    Object {
        name: "JobNamespace",
        fields: &[
            ("cpu", Ty::Obj("JobCpu")),
            ("memory", Ty::Obj("JobMemory")),
            ("systemroot", Ty::Obj("JobSystemRoot")),
            ("terminationpolicy", Ty::Enum("JobTerminationPolicy")),
            ("threadimpersonation", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "JobSystemRoot" (#JobSystemRoot)
    Object {
        name: "JobSystemRoot",
        fields: &[("path", Ty::Str)],
    },
    // SchemaReference.md, section "Keyboard" (#Keyboard)
    Object {
        name: "Keyboard",
        fields: &[],
    },
    // SchemaReference.md, section "KvpExchange" (#KvpExchange)
    Object {
        name: "KvpExchange",
        fields: &[
            ("EnableHostOSInfoKvpItems", Ty::Enum("StateOverride")),
            ("EntriesToBeAdded", Ty::Map(Key::Str, &Ty::Str)),
            ("EntriesToBeRemoved", Ty::Array(&Ty::Str)),
        ],
    },
    // SchemaReference.md, section "Layer" (#Layer)
    Object {
        name: "Layer",
        fields: &[
            ("Id", Ty::Guid),
            ("Path", Ty::Str),
            ("PathType", Ty::Enum("PathType")),
            ("Cache", Ty::Enum("CacheMode")),
        ],
    },
    // SchemaReference.md, section "LinuxKernelDirect" (#LinuxKernelDirect)
    Object {
        name: "LinuxKernelDirect",
        fields: &[
            ("KernelFilePath", Ty::Str),
            ("InitRdPath", Ty::Str),
            ("KernelCmdLine", Ty::Str),
        ],
    },
    // SchemaReference.md, section "MappedDirectory" (#MappedDirectory)
    Object {
        name: "MappedDirectory",
        fields: &[
            ("HostPath", Ty::Str),
            ("HostPathType", Ty::Enum("PathType")),
            ("ContainerPath", Ty::Str),
            ("ReadOnly", Ty::Bool),
            ("SupportCloudFiles", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "MappedPipe" (#MappedPipe)
    Object {
        name: "MappedPipe",
        fields: &[
            ("ContainerPipeName", Ty::Str),
            ("HostPath", Ty::Str),
            ("HostPathType", Ty::Enum("MappedPipePathType")),
        ],
    },
    // SchemaReference.md, section "MemoryInformationForVm" (#MemoryInformationForVm)
    Object {
        name: "MemoryInformationForVm",
        fields: &[
            ("VirtualNodeCount", Ty::U8),
            ("VirtualMachineMemory", Ty::Obj("VmMemory")),
            ("VirtualNodes", Ty::Array(&Ty::Obj("VirtualNodeInfo"))),
        ],
    },
    // SchemaReference.md, section "MemoryStats" (#MemoryStats)
    Object {
        name: "MemoryStats",
        fields: &[
            ("MemoryUsageCommitBytes", Ty::U64),
            ("MemoryUsageCommitPeakBytes", Ty::U64),
            ("MemoryUsagePrivateWorkingSetBytes", Ty::U64),
        ],
    },
    // SchemaReference.md, section "ModifySettingRequest" (#ModifySettingRequest)
    Object {
        name: "ModifySettingRequest",
        fields: &[
            ("ResourcePath", Ty::Str),
            ("RequestType", Ty::Enum("ModifyRequestType")),
            ("Settings", Ty::Any),
            ("GuestRequest", Ty::Any),
        ],
    },
    // SchemaReference.md, section "MountManagerMountPoint" (#MountManagerMountPoint)
    Object {
        name: "MountManagerMountPoint",
        fields: &[("name", Ty::Str), ("path", Ty::Str)],
    },
    // SchemaReference.md, section "MountManagerNamespace" (#MountManagerNamespace)
    Object {
        name: "MountManagerNamespace",
        fields: &[("mount_point", Ty::Array(&Ty::Obj("MountManagerMountPoint")))],
    },
    // SchemaReference.md, section "Mouse" (#Mouse)
    Object {
        name: "Mouse",
        fields: &[],
    },
    // SchemaReference.md, section "NamedPipeNamespace" (#NamedPipeNamespace)
    Object {
        name: "NamedPipeNamespace",
        fields: &[("symlink", Ty::Array(&Ty::Obj("NamedPipeSymlink")))],
    },
    // SchemaReference.md, section "NamedPipeSymlink" (#NamedPipeSymlink)
    Object {
        name: "NamedPipeSymlink",
        fields: &[("name", Ty::Str), ("path", Ty::Str)],
    },
    // SchemaReference.md, section "Namespace" (#Namespace)
    Object {
        name: "Namespace",
        fields: &[
            ("job", Ty::Obj("JobNamespace")),
            ("filesystem", Ty::Obj("FilesystemNamespace")),
            ("mountmgr", Ty::Obj("MountManagerNamespace")),
            ("namedpipe", Ty::Obj("NamedPipeNamespace")),
            ("ob", Ty::Obj("ObjectNamespace")),
            ("registry", Ty::Obj("RegistryNamespace")),
            ("network", Ty::Obj("NetworkNamespace")),
            ("device", Ty::Obj("DeviceNamespace")),
            ("hostfiles", Ty::Obj("HostFiles")),
        ],
    },
    // SchemaReference.md, section "NetworkAdapter" (#NetworkAdapter)
    Object {
        name: "NetworkAdapter",
        fields: &[
            ("EndpointId", Ty::Guid),
            ("MacAddress", Ty::MacAddress),
            ("InstanceId", Ty::Guid),
            ("DisableInterruptBatching", Ty::Bool),
            ("IovSettings", Ty::Obj("IovSettings")),
            ("ConnectionState", Ty::Enum("StateOverride")),
        ],
    },
    // SchemaReference.md, section "NetworkNamespace" (#NetworkNamespace)
    Object {
        name: "NetworkNamespace",
        fields: &[("compartment", Ty::Str)],
    },
    // SchemaReference.md, section "Networking" (#Networking)
    Object {
        name: "Networking",
        fields: &[
            ("AllowUnqualifiedDnsQuery", Ty::Bool),
            ("DnsSearchList", Ty::Str),
            ("NetworkSharedContainerName", Ty::Str),
            ("Namespace", Ty::Str),
            ("NetworkAdapters", Ty::Array(&Ty::Guid)),
        ],
    },
    // SchemaReference.md, section "ObjectDirectory" (#ObjectDirectory)
    Object {
        name: "ObjectDirectory",
        fields: &[
            ("name", Ty::Str),
            ("clonesd", Ty::Str),
            ("shadow", Ty::Enum("ObjectDirectoryShadow")),
            ("symlink", Ty::Array(&Ty::Obj("ObjectSymlink"))),
            ("objdir", Ty::Array(&Ty::Obj("ObjectDirectory"))),
        ],
    },
    // SchemaReference.md, section "ObjectNamespace" (#ObjectNamespace)
    Object {
        name: "ObjectNamespace",
        fields: &[
            ("shadow", Ty::Enum("ObjectDirectoryShadow")),
            ("symlink", Ty::Array(&Ty::Obj("ObjectSymlink"))),
            ("objdir", Ty::Array(&Ty::Obj("ObjectDirectory"))),
        ],
    },
    // SchemaReference.md, section "ObjectSymlink" (#ObjectSymlink)
    Object {
        name: "ObjectSymlink",
        fields: &[
            ("name", Ty::Str),
            ("path", Ty::Str),
            ("scope", Ty::Enum("ObjectSymlinkScope")),
            ("pathtoclone", Ty::Str),
            ("access_mask", Ty::U32),
        ],
    },
    // SchemaReference.md, section "OperationFailure" (#OperationFailure)
    Object {
        name: "OperationFailure",
        fields: &[("Detail", Ty::Enum("OperationFailureDetail"))],
    },
    // SchemaReference.md, section "PauseNotification" (#PauseNotification)
    Object {
        name: "PauseNotification",
        fields: &[("Reason", Ty::Enum("PauseReason"))],
    },
    // SchemaReference.md, section "PauseOptions" (#PauseOptions)
    Object {
        name: "PauseOptions",
        fields: &[
            ("SuspensionLevel", Ty::Enum("PauseSuspensionLevel")),
            ("HostedNotification", Ty::Obj("PauseNotification")),
        ],
    },
    // SchemaReference.md, section "Plan9" (#Plan9)
    Object {
        name: "Plan9",
        fields: &[("Shares", Ty::Array(&Ty::Obj("Plan9Share")))],
    },
    // SchemaReference.md, section "Plan9Share" (#Plan9Share)
    Object {
        name: "Plan9Share",
        fields: &[
            ("Name", Ty::Str),
            ("AccessName", Ty::Str),
            ("Path", Ty::Str),
            ("Port", Ty::U32),
            ("AllowedFiles", Ty::Array(&Ty::Str)),
            // Not in the reference: hcsshim's Plan9ShareFlags
            // (internal/hcs/schema2/plan9_share.go), which it has always
            // sent to HCS (ReadOnly 0x1, RestrictFileAccess 0x80, ...).
            ("Flags", Ty::U32),
        ],
    },
    // SchemaReference.md, section "ProcessDetails" (#ProcessDetails)
    Object {
        name: "ProcessDetails",
        fields: &[
            ("ProcessId", Ty::U32),
            ("ImageName", Ty::Str),
            ("CreateTimestamp", Ty::DateTime),
            ("UserTime100ns", Ty::U64),
            ("KernelTime100ns", Ty::U64),
            ("MemoryCommitBytes", Ty::U64),
            ("MemoryWorkingSetPrivateBytes", Ty::U64),
            ("MemoryWorkingSetSharedBytes", Ty::U64),
        ],
    },
    // SchemaReference.md, section "ProcessorFeatureSet" (#ProcessorFeatureSet)
    Object {
        name: "ProcessorFeatureSet",
        fields: &[
            (
                "ProcessorFeatures",
                Ty::Array(&Ty::Enum("ProcessorFeature")),
            ),
            (
                "XsaveProcessorFeatures",
                Ty::Array(&Ty::Enum("XsaveProcessorFeature")),
            ),
            (
                "ProcessorFeatureSetMode",
                Ty::Enum("ProcessorFeatureSetMode"),
            ),
        ],
    },
    // SchemaReference.md, section "ProcessorLimits" (#ProcessorLimits)
    Object {
        name: "ProcessorLimits",
        fields: &[
            ("Limit", Ty::U64),
            ("Weight", Ty::U64),
            ("Reservation", Ty::U64),
            ("MaximumFrequencyMHz", Ty::U32),
        ],
    },
    // SchemaReference.md, section "ProcessorStats" (#ProcessorStats)
    Object {
        name: "ProcessorStats",
        fields: &[
            ("TotalRuntime100ns", Ty::U64),
            ("RuntimeUser100ns", Ty::U64),
            ("RuntimeKernel100ns", Ty::U64),
        ],
    },
    // SchemaReference.md, section "Properties" (#Properties)
    Object {
        name: "Properties",
        fields: &[
            ("Id", Ty::Str),
            ("SystemType", Ty::Enum("SystemType")),
            ("RuntimeOsType", Ty::Enum("OsType")),
            ("Name", Ty::Str),
            ("Owner", Ty::Str),
            ("RuntimeId", Ty::Guid),
            ("RuntimeTemplateId", Ty::Str),
            ("State", Ty::Enum("State")),
            ("Stopped", Ty::Bool),
            ("ExitType", Ty::Enum("NotificationType")),
            ("Memory", Ty::Obj("MemoryInformationForVm")),
            ("Statistics", Ty::Obj("Statistics")),
            ("ProcessList", Ty::Array(&Ty::Obj("ProcessDetails"))),
            ("TerminateOnLastHandleClosed", Ty::Bool),
            ("HostingSystemId", Ty::Str),
            (
                "SharedMemoryRegionInfo",
                Ty::Array(&Ty::Obj("SharedMemoryRegionInfo")),
            ),
            ("GuestConnectionInfo", Ty::Obj("GuestConnectionInfo")),
            (
                "PropertyResponses",
                Ty::Map(Key::Str, &Ty::Obj("PropertyResponse")),
            ),
        ],
    },
    // SchemaReference.md, section "PropertyResponse" (#PropertyResponse)
    Object {
        name: "PropertyResponse",
        fields: &[("Error", Ty::Obj("ResultError")), ("Response", Ty::Any)],
    },
    // SchemaReference.md, section "RdpConnectionOptions" (#RdpConnectionOptions)
    Object {
        name: "RdpConnectionOptions",
        fields: &[("AccessSids", Ty::Array(&Ty::Str)), ("NamedPipe", Ty::Str)],
    },
    // SchemaReference.md, section "RegistryChanges" (#RegistryChanges)
    Object {
        name: "RegistryChanges",
        fields: &[
            ("AddValues", Ty::Array(&Ty::Obj("RegistryValue"))),
            ("DeleteKeys", Ty::Array(&Ty::Obj("RegistryKey"))),
        ],
    },
    // SchemaReference.md, section "RegistryDeleteKey" (#RegistryDeleteKey)
    Object {
        name: "RegistryDeleteKey",
        fields: &[("name", Ty::Str)],
    },
    // SchemaReference.md, section "RegistryHiveStack" (#RegistryHiveStack)
    Object {
        name: "RegistryHiveStack",
        fields: &[
            ("hive", Ty::Str),
            ("layer", Ty::Array(&Ty::Obj("RegistryLayer"))),
            ("mkkey", Ty::Array(&Ty::Obj("RegistryMakeKey"))),
            ("delkey", Ty::Array(&Ty::Obj("RegistryDeleteKey"))),
        ],
    },
    // SchemaReference.md, section "RegistryKey" (#RegistryKey)
    Object {
        name: "RegistryKey",
        fields: &[
            ("Hive", Ty::Enum("RegistryHive")),
            ("Name", Ty::Str),
            ("Volatile", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "RegistryLayer" (#RegistryLayer)
    Object {
        name: "RegistryLayer",
        fields: &[
            ("hosthive", Ty::Str),
            ("filepath", Ty::Str),
            ("identifier", Ty::Guid),
            ("readonly", Ty::Bool),
            ("immutable", Ty::Bool),
            ("inherittrustclass", Ty::Bool),
            ("trustedhive", Ty::Bool),
            ("writethrough", Ty::Bool),
            ("fileaccesstoken", Ty::U64),
        ],
    },
    // SchemaReference.md, section "RegistryMakeKey" (#RegistryMakeKey)
    Object {
        name: "RegistryMakeKey",
        fields: &[
            ("name", Ty::Str),
            ("clonesd", Ty::Str),
            ("mkkey", Ty::Array(&Ty::Obj("RegistryMakeKey"))),
            ("mkvalue", Ty::Array(&Ty::Obj("RegistryMakeValue"))),
            ("volatile", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "RegistryMakeValue" (#RegistryMakeValue)
    Object {
        name: "RegistryMakeValue",
        fields: &[
            ("name", Ty::Str),
            ("data_multistring", Ty::Str),
            ("data_dword", Ty::U32),
            ("data_string", Ty::Str),
            ("data_binary", Ty::Bytes),
        ],
    },
    // SchemaReference.md, section "RegistryNamespace" (#RegistryNamespace)
    Object {
        name: "RegistryNamespace",
        fields: &[
            ("symlink", Ty::Array(&Ty::Obj("RegistrySymlink"))),
            (
                "redirectionnode",
                Ty::Array(&Ty::Obj("RegistryRedirectionNode")),
            ),
            ("hivestack", Ty::Array(&Ty::Obj("RegistryHiveStack"))),
        ],
    },
    // SchemaReference.md, section "RegistryRedirectionNode" (#RegistryRedirectionNode)
    Object {
        name: "RegistryRedirectionNode",
        fields: &[
            ("containerpath", Ty::Str),
            ("hostpath", Ty::Str),
            ("hivestack", Ty::Str),
            ("access_mask", Ty::U32),
            ("trustedhive", Ty::Bool),
            ("exitnode", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "RegistrySymlink" (#RegistrySymlink)
    Object {
        name: "RegistrySymlink",
        fields: &[("key", Ty::Str), ("target", Ty::Str)],
    },
    // SchemaReference.md, section "RegistryValue" (#RegistryValue)
    Object {
        name: "RegistryValue",
        fields: &[
            ("Key", Ty::Obj("RegistryKey")),
            ("Name", Ty::Str),
            ("Type", Ty::Enum("RegistryValueType")),
            ("StringValue", Ty::Str),
            ("BinaryValue", Ty::Bytes),
            ("DWordValue", Ty::U32),
            ("QWordValue", Ty::U64),
            ("CustomType", Ty::U32),
        ],
    },
    // SchemaReference.md, section "RestoreState" (#RestoreState)
    Object {
        name: "RestoreState",
        fields: &[
            ("SaveStateFilePath", Ty::Str),
            ("TemplateSystemId", Ty::Str),
        ],
    },
    // SchemaReference.md, section "ResultError" (#ResultError)
    Object {
        name: "ResultError",
        fields: &[
            ("Error", Ty::I32),
            ("ErrorMessage", Ty::Str),
            ("ErrorEvents", Ty::Array(&Ty::Obj("ErrorEvent"))),
            ("Attribution", Ty::Array(&Ty::Obj("AttributionRecord"))),
        ],
    },
    // SchemaReference.md, section "SaveOptions" (#SaveOptions)
    Object {
        name: "SaveOptions",
        fields: &[
            ("SaveType", Ty::Enum("SaveType")),
            ("SaveStateFilePath", Ty::Str),
        ],
    },
    // SchemaReference.md, section "Scsi" (#Scsi)
    Object {
        name: "Scsi",
        fields: &[
            ("Attachments", Ty::Map(Key::U32, &Ty::Obj("Attachment"))),
            ("DisableInterruptBatching", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "Services" (#Services)
    Object {
        name: "Services",
        fields: &[
            ("Heartbeat", Ty::Obj("Heartbeat")),
            ("Shutdown", Ty::Obj("Shutdown")),
            ("Timesync", Ty::Obj("Timesync")),
            ("KvpExchange", Ty::Obj("KvpExchange")),
        ],
    },
    // SchemaReference.md, section "SharedMemoryConfiguration" (#SharedMemoryConfiguration)
    Object {
        name: "SharedMemoryConfiguration",
        fields: &[("Regions", Ty::Array(&Ty::Obj("SharedMemoryRegion")))],
    },
    // SchemaReference.md, section "SharedMemoryRegion" (#SharedMemoryRegion)
    Object {
        name: "SharedMemoryRegion",
        fields: &[
            ("SectionName", Ty::Str),
            ("StartOffset", Ty::U64),
            ("Length", Ty::U64),
            ("AllowGuestWrite", Ty::Bool),
            ("HiddenFromGuest", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "SharedMemoryRegionInfo" (#SharedMemoryRegionInfo)
    Object {
        name: "SharedMemoryRegionInfo",
        fields: &[("SectionName", Ty::Str), ("GuestPhysicalAddress", Ty::U64)],
    },
    // SchemaReference.md, section "Shutdown" (#Shutdown)
    Object {
        name: "Shutdown",
        fields: &[],
    },
    // SchemaReference.md, section "ShutdownOptions" (#ShutdownOptions)
    Object {
        name: "ShutdownOptions",
        fields: &[
            ("Mechanism", Ty::Enum("ShutdownMechanism")),
            ("Type", Ty::Enum("ShutdownType")),
            ("Force", Ty::Bool),
            ("Reason", Ty::Str),
        ],
    },
    // SchemaReference.md, section "Statistics" (#Statistics)
    Object {
        name: "Statistics",
        fields: &[
            ("Timestamp", Ty::DateTime),
            ("ContainerStartTime", Ty::DateTime),
            ("Uptime100ns", Ty::U64),
            ("Processor", Ty::Obj("ProcessorStats")),
            ("Memory", Ty::Obj("MemoryStats")),
            ("Storage", Ty::Obj("StorageStats")),
        ],
    },
    // SchemaReference.md, section "Storage" (#Storage)
    Object {
        name: "Storage",
        fields: &[
            ("Layers", Ty::Array(&Ty::Obj("Layer"))),
            ("Path", Ty::Str),
            ("QoS", Ty::Obj("StorageQoS")),
        ],
    },
    // SchemaReference.md, section "StorageQoS" (#StorageQoS)
    Object {
        name: "StorageQoS",
        fields: &[("IopsMaximum", Ty::U64), ("BandwidthMaximum", Ty::U64)],
    },
    // SchemaReference.md, section "StorageStats" (#StorageStats)
    Object {
        name: "StorageStats",
        fields: &[
            ("ReadCountNormalized", Ty::U64),
            ("ReadSizeBytes", Ty::U64),
            ("WriteCountNormalized", Ty::U64),
            ("WriteSizeBytes", Ty::U64),
        ],
    },
    // SchemaReference.md, section "SystemExit" (#SystemExit)
    Object {
        name: "SystemExit",
        fields: &[
            ("Detail", Ty::Enum("SystemExitDetail")),
            ("Initiator", Ty::Enum("ExitInitiator")),
        ],
    },
    // SchemaReference.md, section "SystemExitStatus" (#SystemExitStatus)
    Object {
        name: "SystemExitStatus",
        fields: &[
            ("Status", Ty::I32),
            ("ExitType", Ty::Enum("NotificationType")),
            ("Attribution", Ty::Array(&Ty::Obj("AttributionRecord"))),
        ],
    },
    // SchemaReference.md, section "SystemQuery" (#SystemQuery)
    Object {
        name: "SystemQuery",
        fields: &[
            ("Ids", Ty::Array(&Ty::Str)),
            ("Names", Ty::Array(&Ty::Str)),
            ("Types", Ty::Array(&Ty::Enum("SystemType"))),
            ("Owners", Ty::Array(&Ty::Str)),
        ],
    },
    // SchemaReference.md, section "System_PropertyQuery" (#System_PropertyQuery)
    Object {
        name: "System_PropertyQuery",
        fields: &[
            ("PropertyTypes", Ty::Array(&Ty::Enum("System_PropertyType"))),
            ("Queries", Ty::Map(Key::Str, &Ty::Any)),
        ],
    },
    // SchemaReference.md, section "Timesync" (#Timesync)
    Object {
        name: "Timesync",
        fields: &[],
    },
    // SchemaReference.md, section "Topology" (#Topology)
    Object {
        name: "Topology",
        fields: &[
            ("Memory", Ty::Obj("VirtualMachine_Memory")),
            ("Processor", Ty::Obj("VirtualMachine_Processor")),
        ],
    },
    // SchemaReference.md, section "TripleFault" (#TripleFault)
    Object {
        name: "TripleFault",
        fields: &[("ErrorType", Ty::U64)],
    },
    // SchemaReference.md, section "Uefi" (#Uefi)
    Object {
        name: "Uefi",
        fields: &[
            ("EnableDebugger", Ty::Bool),
            ("SecureBootTemplateId", Ty::Guid),
            (
                "ApplySecureBootTemplate",
                Ty::Enum("ApplySecureBootTemplateType"),
            ),
            ("BootThis", Ty::Obj("UefiBootEntry")),
            ("Console", Ty::Enum("SerialConsole")),
            ("StopOnBootFailure", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "UefiBootEntry" (#UefiBootEntry)
    Object {
        name: "UefiBootEntry",
        fields: &[
            ("DeviceType", Ty::Enum("UefiBootDevice")),
            ("DevicePath", Ty::Str),
            ("DiskNumber", Ty::U16),
            ("OptionalData", Ty::Str),
            ("VmbFsRootPath", Ty::Str),
        ],
    },
    // SchemaReference.md, section "Version" (#Version)
    Object {
        name: "Version",
        fields: &[("Major", Ty::U32), ("Minor", Ty::U32)],
    },
    // SchemaReference.md, section "VideoMonitor" (#VideoMonitor)
    Object {
        name: "VideoMonitor",
        fields: &[
            ("HorizontalResolution", Ty::U16),
            ("VerticalResolution", Ty::U16),
            ("ConnectionOptions", Ty::Obj("RdpConnectionOptions")),
        ],
    },
    // SchemaReference.md, section "VirtioSerial" (#VirtioSerial)
    Object {
        name: "VirtioSerial",
        fields: &[("Ports", Ty::Map(Key::U32, &Ty::Obj("VirtioSerialPort")))],
    },
    // SchemaReference.md, section "VirtioSerialPort" (#VirtioSerialPort)
    Object {
        name: "VirtioSerialPort",
        fields: &[("NamedPipe", Ty::Str), ("Name", Ty::Str)],
    },
    // SchemaReference.md, section "VirtualDeviceFailure" (#VirtualDeviceFailure)
    Object {
        name: "VirtualDeviceFailure",
        fields: &[
            ("Detail", Ty::Enum("VirtualDeviceFailureDetail")),
            ("Name", Ty::Str),
            ("DeviceId", Ty::Guid),
            ("InstanceId", Ty::Guid),
        ],
    },
    // SchemaReference.md, section "VirtualMachine" (#VirtualMachine)
    Object {
        name: "VirtualMachine",
        fields: &[
            ("Version", Ty::Obj("Version")),
            ("StopOnReset", Ty::Bool),
            ("Chipset", Ty::Obj("Chipset")),
            ("ComputeTopology", Ty::Obj("Topology")),
            ("Devices", Ty::Obj("Devices")),
            ("Services", Ty::Obj("Services")),
            ("GuestState", Ty::Obj("GuestState")),
            ("RestoreState", Ty::Obj("RestoreState")),
            ("RegistryChanges", Ty::Obj("RegistryChanges")),
            ("StorageQoS", Ty::Obj("StorageQoS")),
            ("GuestConnection", Ty::Obj("GuestConnection")),
        ],
    },
    // SchemaReference.md, section "VirtualMachine_HvSocket" (#VirtualMachine_HvSocket)
    Object {
        name: "VirtualMachine_HvSocket",
        fields: &[("HvSocketConfig", Ty::Obj("HvSocketSystemConfig"))],
    },
    // SchemaReference.md, section "VirtualMachine_Memory" (#VirtualMachine_Memory)
    Object {
        name: "VirtualMachine_Memory",
        fields: &[
            // Not in this section's table, but set by the reference's own samples
            // (Reference/Tutorial.md `"Backing": "Virtual"`, EventCallbackSample.md and
            // OperationCompletionSample.md `"Backing": "Physical"`) and by hcsshim
            // (VirtualMachineMemory.Backing, MemoryBackingType).
            ("Backing", Ty::Enum("MemoryBackingType")),
            ("SizeInMB", Ty::U64),
            ("AllowOvercommit", Ty::Bool),
            ("BackingPageSize", Ty::Enum("MemoryBackingPageSize")),
            ("FaultClusterSizeShift", Ty::U32),
            ("DirectMapFaultClusterSizeShift", Ty::U32),
            ("PinBackingPages", Ty::Bool),
            ("ForbidSmallBackingPages", Ty::Bool),
            ("EnableHotHint", Ty::Bool),
            ("EnableColdHint", Ty::Bool),
            ("EnableColdDiscardHint", Ty::Bool),
            ("EnableDeferredCommit", Ty::Bool),
            ("LowMmioGapInMB", Ty::U64),
            ("HighMmioBaseInMB", Ty::U64),
            ("HighMmioGapInMB", Ty::U64),
        ],
    },
    // SchemaReference.md, section "VirtualMachine_Processor" (#VirtualMachine_Processor)
    Object {
        name: "VirtualMachine_Processor",
        fields: &[
            ("Count", Ty::U32),
            ("Limit", Ty::U64),
            ("Weight", Ty::U64),
            ("Reservation", Ty::U64),
            ("MaximumFrequencyMHz", Ty::U32),
            ("ExposeVirtualizationExtensions", Ty::Bool),
            ("EnablePerfmonPmu", Ty::Bool),
            ("EnablePerfmonArchPmu", Ty::Bool),
            ("EnablePerfmonPebs", Ty::Bool),
            ("EnablePerfmonLbr", Ty::Bool),
            ("EnablePerfmonIpt", Ty::Bool),
            ("EnablePageShattering", Ty::Bool),
            ("DisableSpeculationControls", Ty::Bool),
            ("ProcessorFeatureSet", Ty::Obj("ProcessorFeatureSet")),
            ("CpuGroup", Ty::Obj("CpuGroup")),
        ],
    },
    // SchemaReference.md, section "VirtualNodeInfo" (#VirtualNodeInfo)
    Object {
        name: "VirtualNodeInfo",
        fields: &[
            ("VirtualNodeIndex", Ty::U8),
            ("PhysicalNodeNumber", Ty::U8),
            ("VirtualProcessorCount", Ty::U32),
            ("MemoryUsageInPages", Ty::U64),
        ],
    },
    // SchemaReference.md, section "VirtualPMemController" (#VirtualPMemController)
    Object {
        name: "VirtualPMemController",
        fields: &[
            ("Devices", Ty::Map(Key::U8, &Ty::Obj("VirtualPMemDevice"))),
            ("MaximumCount", Ty::U8),
            ("MaximumSizeBytes", Ty::U64),
            ("Backing", Ty::Enum("VirtualPMemBackingType")),
        ],
    },
    // SchemaReference.md, section "VirtualPMemDevice" (#VirtualPMemDevice)
    Object {
        name: "VirtualPMemDevice",
        fields: &[
            ("HostPath", Ty::Str),
            ("ReadOnly", Ty::Bool),
            ("ImageFormat", Ty::Enum("VirtualPMemImageFormat")),
            ("SizeBytes", Ty::U64),
            (
                "Mappings",
                Ty::Map(Key::U64, &Ty::Obj("VirtualPMemMapping")),
            ),
        ],
    },
    // SchemaReference.md, section "VirtualPMemMapping" (#VirtualPMemMapping)
    Object {
        name: "VirtualPMemMapping",
        fields: &[
            ("HostPath", Ty::Str),
            ("ImageFormat", Ty::Enum("VirtualPMemImageFormat")),
        ],
    },
    // SchemaReference.md, section "VirtualPciDevice" (#VirtualPciDevice)
    Object {
        name: "VirtualPciDevice",
        fields: &[("Functions", Ty::Array(&Ty::Obj("VirtualPciFunction")))],
    },
    // SchemaReference.md, section "VirtualPciFunction" (#VirtualPciFunction)
    Object {
        name: "VirtualPciFunction",
        fields: &[
            ("DeviceInstancePath", Ty::Str),
            ("VirtualFunction", Ty::U16),
            ("AllowDirectTranslatedP2P", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "VirtualSmb" (#VirtualSmb)
    Object {
        name: "VirtualSmb",
        fields: &[
            ("Shares", Ty::Array(&Ty::Obj("VirtualSmbShare"))),
            ("DirectFileMappingInMB", Ty::I64),
        ],
    },
    // SchemaReference.md, section "VirtualSmbShare" (#VirtualSmbShare)
    Object {
        name: "VirtualSmbShare",
        fields: &[
            ("Name", Ty::Str),
            ("Path", Ty::Str),
            ("AllowedFiles", Ty::Array(&Ty::Str)),
            ("Options", Ty::Obj("VirtualSmbShareOptions")),
        ],
    },
    // SchemaReference.md, section "VirtualSmbShareOptions" (#VirtualSmbShareOptions)
    Object {
        name: "VirtualSmbShareOptions",
        fields: &[
            ("ReadOnly", Ty::Bool),
            ("ShareRead", Ty::Bool),
            ("CacheIo", Ty::Bool),
            ("NoOplocks", Ty::Bool),
            ("TakeBackupPrivilege", Ty::Bool),
            ("UseShareRootIdentity", Ty::Bool),
            ("NoDirectmap", Ty::Bool),
            ("NoLocks", Ty::Bool),
            ("NoDirnotify", Ty::Bool),
            ("VmSharedMemory", Ty::Bool),
            ("RestrictFileAccess", Ty::Bool),
            ("ForceLevelIIOplocks", Ty::Bool),
            ("ReparseBaseLayer", Ty::Bool),
            ("PseudoOplocks", Ty::Bool),
            ("NonCacheIo", Ty::Bool),
            ("PseudoDirnotify", Ty::Bool),
            ("SingleFileMapping", Ty::Bool),
            ("SupportCloudFiles", Ty::Bool),
            ("FilterEncryptionAttributes", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "VmMemory" (#VmMemory)
    Object {
        name: "VmMemory",
        fields: &[
            ("AvailableMemory", Ty::I32),
            ("AvailableMemoryBuffer", Ty::I32),
            ("ReservedMemory", Ty::U64),
            ("AssignedMemory", Ty::U64),
            ("SlpActive", Ty::Bool),
            ("BalancingEnabled", Ty::Bool),
            ("DmOperationInProgress", Ty::Bool),
        ],
    },
    // SchemaReference.md, section "WindowsCrashReporting" (#WindowsCrashReporting)
    Object {
        name: "WindowsCrashReporting",
        fields: &[("DumpFileName", Ty::Str), ("MaxDumpSize", Ty::I64)],
    },
    // SchemaReference.md, section "WorkerExit" (#WorkerExit)
    Object {
        name: "WorkerExit",
        fields: &[
            ("ExitCode", Ty::U32),
            ("Type", Ty::Enum("WorkerExitType")),
            ("Detail", Ty::Enum("WorkerExitDetail")),
            ("Initiator", Ty::Enum("ExitInitiator")),
        ],
    },
];

pub static ENUMS: &[Enum] = &[
    // Not a SchemaReference.md section: the words of the reference samples' Memory.Backing
    // ("Virtual", "Physical") and hcsshim's MemoryBackingType (which adds "Hybrid").
    Enum {
        name: "MemoryBackingType",
        words: &["Physical", "Virtual", "Hybrid"],
    },
    // SchemaReference.md, section "ApplySecureBootTemplateType" (#ApplySecureBootTemplateType)
    Enum {
        name: "ApplySecureBootTemplateType",
        words: &["Skip", "Apply"],
    },
    // SchemaReference.md, section "AttachmentType" (#AttachmentType)
    Enum {
        name: "AttachmentType",
        words: &["VirtualDisk", "Iso", "PassThru"],
    },
    // SchemaReference.md, section "CacheMode" (#CacheMode)
    Enum {
        name: "CacheMode",
        words: &[
            "Unspecified",
            "Disabled",
            "Enabled",
            "Private",
            "PrivateAllowSharing",
        ],
    },
    // SchemaReference.md, section "CachingMode" (#CachingMode)
    Enum {
        name: "CachingMode",
        words: &["Uncached", "Cached", "ReadOnlyCached"],
    },
    // SchemaReference.md, section "ContainerCredentialGuardTransport" (#ContainerCredentialGuardTransport)
    Enum {
        name: "ContainerCredentialGuardTransport",
        words: &["LRPC", "HvSocket"],
    },
    // SchemaReference.md, section "DeviceType" (#DeviceType)
    Enum {
        name: "DeviceType",
        words: &["ClassGuid", "DeviceInstance", "GpuMirror"],
    },
    // SchemaReference.md, section "EventDataType" (#EventDataType)
    Enum {
        name: "EventDataType",
        words: &[
            "Empty",
            "String",
            "AnsiString",
            "SByte",
            "Byte",
            "Int16",
            "UInt16",
            "Int32",
            "UInt32",
            "Int64",
            "UInt64",
            "Single",
            "Double",
            "Boolean",
            "Binary",
            "Guid",
        ],
    },
    // SchemaReference.md, section "ExitInitiator" (#ExitInitiator)
    Enum {
        name: "ExitInitiator",
        words: &["None", "GuestOS", "Client", "Internal", "Unknown"],
    },
    // SchemaReference.md, section "FilesystemIsolationMode" (#FilesystemIsolationMode)
    Enum {
        name: "FilesystemIsolationMode",
        words: &["hard", "soft"],
    },
    // SchemaReference.md, section "FilesystemNestingMode" (#FilesystemNestingMode)
    Enum {
        name: "FilesystemNestingMode",
        words: &["inner", "outer"],
    },
    // SchemaReference.md, section "FlexibleIoDeviceHostingModel" (#FlexibleIoDeviceHostingModel)
    Enum {
        name: "FlexibleIoDeviceHostingModel",
        words: &["Internal", "External"],
    },
    // SchemaReference.md, section "GpuAssignmentMode" (#GpuAssignmentMode)
    Enum {
        name: "GpuAssignmentMode",
        words: &["Disabled", "Default", "List", "Mirror"],
    },
    // SchemaReference.md, section "InterfaceClassType" (#InterfaceClassType)
    Enum {
        name: "InterfaceClassType",
        words: &["Inherit", "DeviceInstance", "ClassGuid"],
    },
    // SchemaReference.md, section "InterruptModerationMode" (#InterruptModerationMode)
    Enum {
        name: "InterruptModerationMode",
        words: &["Default", "Adaptive", "Off", "Low", "Medium", "High"],
    },
    // SchemaReference.md, section "JobTerminationPolicy" (#JobTerminationPolicy)
    Enum {
        name: "JobTerminationPolicy",
        words: &["PermanentQuiescent", "KillOnHandleClose"],
    },
    // SchemaReference.md, section "MappedPipePathType" (#MappedPipePathType)
    Enum {
        name: "MappedPipePathType",
        words: &["AbsolutePath", "VirtualSmbPipeName"],
    },
    // SchemaReference.md, section "MemoryBackingPageSize" (#MemoryBackingPageSize)
    Enum {
        name: "MemoryBackingPageSize",
        words: &["Small", "Large"],
    },
    // SchemaReference.md, section "ModifyRequestType" (#ModifyRequestType)
    Enum {
        name: "ModifyRequestType",
        words: &["Add", "Remove", "Update"],
    },
    // SchemaReference.md, section "NotificationType" (#NotificationType)
    Enum {
        name: "NotificationType",
        words: &[
            "None",
            "GracefulExit",
            "ForcedExit",
            "UnexpectedExit",
            "Unknown",
        ],
    },
    // SchemaReference.md, section "ObjectDirectoryShadow" (#ObjectDirectoryShadow)
    Enum {
        name: "ObjectDirectoryShadow",
        words: &["false", "true", "ifexists"],
    },
    // SchemaReference.md, section "ObjectSymlinkScope" (#ObjectSymlinkScope)
    Enum {
        name: "ObjectSymlinkScope",
        words: &["Local", "Global", "GlobalDropSilo"],
    },
    // SchemaReference.md, section "OperationFailureDetail" (#OperationFailureDetail)
    Enum {
        name: "OperationFailureDetail",
        words: &[
            "Invalid",
            "CreateInternalError",
            "ConstructStateError",
            "RuntimeOsTypeMismatch",
            "Construct",
            "Start",
            "Pause",
            "Resume",
            "Shutdown",
            "Terminate",
            "Save",
            "GetProperties",
            "Modify",
            "Crash",
            "GuestCrash",
            "LifecycleNotify",
            "ExecuteProcess",
            "GetProcessInfo",
            "WaitForProcess",
            "SignalProcess",
            "ModifyProcess",
            "PrepareForHosting",
            "RegisterHostedSystem",
            "UnregisterHostedSystem",
            "PrepareForClone",
            "GetCloneTemplate",
        ],
    },
    // SchemaReference.md, section "OsType" (#OsType)
    Enum {
        name: "OsType",
        words: &["Unknown", "Windows", "Linux"],
    },
    // SchemaReference.md, section "PathType" (#PathType)
    Enum {
        name: "PathType",
        words: &["AbsolutePath", "VirtualSmbShareName"],
    },
    // SchemaReference.md, section "PauseReason" (#PauseReason)
    Enum {
        name: "PauseReason",
        words: &["None", "Save", "Template"],
    },
    // SchemaReference.md, section "PauseSuspensionLevel" (#PauseSuspensionLevel)
    Enum {
        name: "PauseSuspensionLevel",
        words: &["Suspend", "MemoryLow", "MemoryMedium", "MemoryHigh"],
    },
    // SchemaReference.md, section "ProcessorFeature" (#ProcessorFeature)
    Enum {
        name: "ProcessorFeature",
        words: &[
            "Sse3",
            "LahfSahf",
            "Ssse3",
            "Sse4_1",
            "Sse4_2",
            "Sse4A",
            "Xop",
            "Popcnt",
            "Cmpxchg16B",
            "Altmovcr8",
            "Lzcnt",
            "Misalignsse",
            "MmxExt",
            "Amd3Dnow",
            "ExtAmd3Dnow",
            "Page1Gb",
            "AmdAes",
            "Pclmulqdq",
            "Pcid",
            "Fma4",
            "F16C",
            "Rdrand",
            "Rdwrfsgs",
            "Smep",
            "EnhancedFastString",
            "Bmi1",
            "Bmi2",
            "Movbe",
            "Npiep1",
            "DepX87FpuSave",
            "Rdseed",
            "Adx",
            "IntelPrefetch",
            "Smap",
            "Hle",
            "Rtm",
            "Rdtscp",
            "Clflushopt",
            "Clwb",
            "Sha",
            "X87PointersSaved",
            "Invpcid",
            "Ibrs",
            "Stibp",
            "Ibpb",
            "UnrestrictedGuest",
            "Mdd",
            "FastShortRepMov",
            "L1DCacheFlush",
            "RdclNo",
            "IbrsAll",
            "SkipL1Df",
            "SsbNo",
            "RsbaNo",
            "VirtSpecCtrl",
            "Rdpid",
            "Umip",
            "MbsNo",
            "MbClear",
            "TaaNo",
            "TsxCtrl",
            "AcountMcount",
            "TscInvariant",
            "Clzero",
            "Rdpru",
            "La57",
            "Mbec",
            "NestedVirt",
            "Psfd",
            "CetSs",
            "CetIbt",
            "VmxExceptionInject",
            "UmwaitTpause",
            "Movdiri",
            "Movdir64b",
            "Cldemote",
            "Serialize",
            "TscDeadlineTmr",
            "TscAdjust",
            "FZLRepMovsb",
            "FSRepStosb",
            "FSRepCmpsb",
            "SentinelAmd",
            "Asid16",
            "TGran16",
            "TGran64",
            "Haf",
            "Hdbs",
            "Pan",
            "AtS1E1",
            "Uao",
            "El0Aarch32",
            "Fp",
            "FpHp",
            "AdvSimd",
            "AdvSimdHp",
            "GicV3V4",
            "PmuV3",
            "PmuV3ArmV81",
            "PmuV3ArmV84",
            "ArmAes",
            "PolyMul",
            "Sha1",
            "Sha256",
            "Sha512",
            "Crc32",
            "Atomic",
            "Rdm",
            "Sha3",
            "Sm3",
            "Sm4",
            "Dp",
            "Fhm",
            "DcCvap",
            "DcCvadp",
            "ApaBase",
            "ApaEp",
            "ApaEp2",
            "ApaEp2Fp",
            "ApaEp2Fpc",
            "Jscvt",
            "Fcma",
            "RcpcV83",
            "RcpcV84",
            "Gpa",
            "L1ipPipt",
            "DzPermitted",
            "SentinelArm",
        ],
    },
    // SchemaReference.md, section "ProcessorFeatureSetMode" (#ProcessorFeatureSetMode)
    Enum {
        name: "ProcessorFeatureSetMode",
        words: &["Strict", "Permissive"],
    },
    // SchemaReference.md, section "RegistryHive" (#RegistryHive)
    Enum {
        name: "RegistryHive",
        words: &["System", "Software", "Security", "Sam"],
    },
    // SchemaReference.md, section "RegistryValueType" (#RegistryValueType)
    Enum {
        name: "RegistryValueType",
        words: &[
            "None",
            "String",
            "ExpandedString",
            "MultiString",
            "Binary",
            "DWord",
            "QWord",
            "CustomType",
        ],
    },
    // SchemaReference.md, section "SaveType" (#SaveType)
    Enum {
        name: "SaveType",
        words: &["ToFile", "AsTemplate"],
    },
    // SchemaReference.md, section "SerialConsole" (#SerialConsole)
    Enum {
        name: "SerialConsole",
        words: &["Default", "Disabled", "ComPort1", "ComPort2"],
    },
    // SchemaReference.md, section "ShutdownMechanism" (#ShutdownMechanism)
    Enum {
        name: "ShutdownMechanism",
        words: &["GuestConnection", "IntegrationService"],
    },
    // SchemaReference.md, section "ShutdownType" (#ShutdownType)
    Enum {
        name: "ShutdownType",
        words: &["Shutdown", "Hibernate", "Reboot"],
    },
    // SchemaReference.md, section "State" (#State)
    Enum {
        name: "State",
        words: &[
            "Created",
            "Running",
            "Paused",
            "Stopped",
            "SavedAsTemplate",
            "Unknown",
        ],
    },
    // SchemaReference.md, section "StateOverride" (#StateOverride)
    Enum {
        name: "StateOverride",
        words: &["Default", "Disabled", "Enabled"],
    },
    // SchemaReference.md, section "SystemExitDetail" (#SystemExitDetail)
    Enum {
        name: "SystemExitDetail",
        words: &[
            "Invalid",
            "HcsApiFatalError",
            "ServiceStop",
            "Shutdown",
            "Terminate",
            "UnexpectedExit",
        ],
    },
    // SchemaReference.md, section "SystemType" (#SystemType)
    Enum {
        name: "SystemType",
        words: &["Container", "VirtualMachine"],
    },
    // SchemaReference.md, section "System_PropertyType" (#System_PropertyType)
    Enum {
        name: "System_PropertyType",
        words: &[
            "Memory",
            "Statistics",
            "ProcessList",
            "TerminateOnLastHandleClosed",
            "SharedMemoryRegion",
            "GuestConnection",
        ],
    },
    // SchemaReference.md, section "UefiBootDevice" (#UefiBootDevice)
    Enum {
        name: "UefiBootDevice",
        words: &["ScsiDrive", "VmbFs", "Network", "File"],
    },
    // SchemaReference.md, section "VirtualDeviceFailureDetail" (#VirtualDeviceFailureDetail)
    Enum {
        name: "VirtualDeviceFailureDetail",
        words: &[
            "None",
            "Create",
            "Initialize",
            "StartReservingResources",
            "FinishReservingResources",
            "FreeReservedResources",
            "SaveReservedResources",
            "PowerOnCold",
            "PowerOnRestore",
            "PowerOff",
            "Save",
            "Resume",
            "Pause",
            "EnableOptimizations",
            "StartDisableOptimizations",
            "FinishDisableOptimizations",
            "Reset",
            "PostReset",
            "Teardown",
            "SaveCompatibilityInfo",
            "MetricRestore",
            "MetricEnumerate",
            "MetricEnumerateForSave",
            "MetricReset",
            "MetricEnable",
            "MetricDisable",
        ],
    },
    // SchemaReference.md, section "VirtualPMemBackingType" (#VirtualPMemBackingType)
    Enum {
        name: "VirtualPMemBackingType",
        words: &["Virtual", "Physical"],
    },
    // SchemaReference.md, section "VirtualPMemImageFormat" (#VirtualPMemImageFormat)
    Enum {
        name: "VirtualPMemImageFormat",
        words: &["Vhdx", "Vhd1"],
    },
    // SchemaReference.md, section "WorkerExitDetail" (#WorkerExitDetail)
    Enum {
        name: "WorkerExitDetail",
        words: &[
            "Invalid",
            "PowerOff",
            "PowerOffCritical",
            "Reset",
            "GuestCrash",
            "GuestFirmwareCrash",
            "TripleFault",
            "DeviceFatalApicRequest",
            "DeviceFatalMsrRequest",
            "DeviceFatalException",
            "DeviceFatalError",
            "DeviceMachineCheck",
            "EmulatorError",
            "VidTerminate",
            "ProcessUnexpectedExit",
            "InitializationFailure",
            "InitializationStartTimeout",
            "ColdStartFailure",
            "ResetStartFailure",
            "FastRestoreStartFailure",
            "RestoreStartFailure",
            "FastSavePreservePartition",
            "FastSavePreservePartitionHandleTransfer",
            "FastSave",
            "CloneTemplate",
            "Save",
            "Migrate",
            "MigrateFailure",
            "CannotReferenceVm",
            "MgotUnregister",
            "FastSavePreservePartitionHandleTransferStorage",
            "FastSavePreservePartitionHandleTransferNetworking",
            "FastSavePreservePartitionHandleTransferStorageAndNetworking",
            "FastSavePreservePartitionHsr",
            "FastSavePreservePartitionWithHandleTransfer",
            "FastSaveWithHandleTransfer",
        ],
    },
    // SchemaReference.md, section "WorkerExitType" (#WorkerExitType)
    Enum {
        name: "WorkerExitType",
        words: &[
            "None",
            "InitializationFailed",
            "Stopped",
            "Saved",
            "StoppedOnReset",
            "UnexpectedStop",
            "ResetFailed",
            "UnrecoverableError",
        ],
    },
    // SchemaReference.md, section "XsaveProcessorFeature" (#XsaveProcessorFeature)
    Enum {
        name: "XsaveProcessorFeature",
        words: &[
            "Xsave",
            "Xsave_Opt",
            "Avx",
            "Avx2",
            "Fma",
            "Mpx",
            "Avx512",
            "Avx512Dq",
            "Avx512Cd",
            "Avx512Bw",
            "Avx512Vl",
            "Xsave_Comp",
            "Xsave_Supervisor",
            "Xcr1",
            "Avx512_Bitalg",
            "AVX512_Ifma",
            "Avx512_Vbmi",
            "Avx512_Vbmi2",
            "Avx512_Vnni",
            "Gfni",
            "Vaes",
            "Avx512_Vpopcntdq",
            "Vpclmulqdq",
            "Avx512_Bf16",
            "Avx512_Vp2Intersect",
            "Avx512Fp16",
            "Xfd",
            "AmxTile",
            "AmxBf16",
            "AmxInt8",
            "AvxVnni",
            "SentinelAmdXsave",
        ],
    },
];
