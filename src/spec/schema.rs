//! The JSON Schema of a spec document: the shape from the model's types,
//! then every single-document rule `validate` checks that JSON Schema can
//! state (ranges, patterns, one boot kind, the constant `kind` and
//! `apiVersion`), so an editor refuses what `uvmctl validate` refuses.
//!
//! What it cannot state, and so leaves to `validate`: keys unique within a
//! list (controller ids, LUNs, NIC ids, MACs, share names...), a VPMem
//! device id below its controller's `maximumDevices`, a writable image
//! attached once, the names and MACs unique across files, byte lengths
//! of non-ASCII strings (`maxLength` counts characters), a console probe's
//! pattern being a regular expression, and a probe's deadline leaving room
//! for its minimum healthy time. The integration
//! test `cli::schema_refuses_what_validate_refuses` checks the rest with an
//! independent validator, for generated documents.

use super::validate::{
    MAX_MEMORY_MB, MAX_PATH_BYTES, MAX_PROBE_PATTERN_BYTES, MAX_PROBE_SECONDS, MAX_PROBE_WORDS,
    MAX_PROBES, MAX_PROCESSORS, MAX_SCSI_CONTROLLER, MAX_SCSI_LUN, MAX_SERIAL_PORT,
    MAX_UNIX_SOCKET_PATH, MAX_VPMEM_DEVICES, MAX_VPMEM_SIZE_BYTES,
};
use crate::vm::config::{API_VERSION, KIND, VmDocument};
use serde_json::{Value, json};

/// The JSON Schema of a spec document, for editors (yaml-language-server) and CI.
pub fn json_schema() -> Value {
    match constrained() {
        Ok(schema) => schema,
        // Only a renamed type or field can get here, and the unit test
        // below fails first; the unconstrained shape is still correct.
        Err(_) => base(),
    }
}

fn base() -> Value {
    serde_json::to_value(schemars::schema_for!(VmDocument)).unwrap_or(Value::Null)
}

/// A whole-string pattern. `$` alone is not enough: ECMA-262 (what JSON
/// Schema and editors use) ends it at the end of the string, but Python's
/// `re` (python-jsonschema, check-jsonschema) also before a final newline.
fn whole(body: &str) -> String {
    format!("^(?:{body})$(?!\\n)")
}

const GUID_BODY: &str =
    "[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}";
/// Absolute on some host (`/x`, `\\server\share`, `C:\x`), no control characters.
const PATH_BODY: &str = r"(?:/|\\\\|[A-Za-z]:[\\/])[^\x00-\x1f\x7f]*";
/// No character Rust's `char::is_control` names (Unicode Cc).
const NO_CONTROL: &str = r"[^\x00-\x1f\x7f-\x9f]";

fn guid() -> Value {
    json!({ "pattern": whole(&format!(r"\{{{GUID_BODY}\}}|{GUID_BODY}")) })
}

fn host_path() -> Value {
    json!({ "pattern": whole(PATH_BODY), "maxLength": MAX_PATH_BYTES })
}

fn socket_path() -> Value {
    json!({ "pattern": whole(PATH_BODY), "maxLength": MAX_UNIX_SOCKET_PATH })
}

fn name(max: usize, dot_underscore: bool) -> Value {
    let class = if dot_underscore {
        "[A-Za-z0-9._-]"
    } else {
        "[A-Za-z0-9-]"
    };
    json!({ "pattern": whole(&format!("{class}{{1,{max}}}")) })
}

/// [`crate::vm::VmName`]'s rule: no leading `-` (a name `-rf` would read as
/// an option wherever it is passed on).
fn vm_name() -> Value {
    json!({ "pattern": whole(&format!("[A-Za-z0-9][A-Za-z0-9-]{{0,{}}}", crate::vm::MAX_VM_NAME - 1)) })
}

/// Kubernetes label syntax: `[prefix/]name`, the prefix a DNS subdomain
/// of at most 253 characters; values empty or as a name.
fn labels() -> Value {
    let name = "[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?";
    let dns_label = "[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?";
    json!({
        "maxProperties": super::validate::MAX_LABELS,
        "propertyNames": {
            "pattern": whole(&format!("(?:(?=[^/]{{1,253}}/){dns_label}(?:\\.{dns_label})*/)?{name}")),
        },
        "additionalProperties": { "type": "string", "pattern": whole(&format!("(?:{name})?")) },
    })
}

fn range(min: u64, max: u64) -> Value {
    json!({ "minimum": min, "maximum": max })
}

fn file_names() -> Value {
    json!({
        "uniqueItems": true,
        "items": {
            "pattern": whole(r"[^/\\\x00-\x1f\x7f-\x9f]+"),
            "not": { "enum": [".", ".."] },
        },
    })
}

fn present_object(field: &str) -> Value {
    json!({ "required": [field], "properties": { field: { "type": "object" } } })
}

fn present(field: &str, ty: &str) -> Value {
    json!({ "required": [field], "properties": { field: { "type": ty } } })
}

/// What each place in the schema gets, by JSON pointer.
fn rules() -> Vec<(&'static str, Value)> {
    let mac = {
        let pair = "[0-9A-Fa-f]{2}";
        // The first octet's low bit clear: unicast.
        let first = "[0-9A-Fa-f][02468ACEace]";
        json!({
            "pattern": whole(&format!("{first}(?:-{pair}){{5}}|{first}(?::{pair}){{5}}")),
            "not": { "pattern": "^00(?:[-:]00){5}$" },
        })
    };
    vec![
        (
            "/$defs/Health/properties/probes",
            json!({ "minItems": 1, "maxItems": MAX_PROBES }),
        ),
        (
            "/$defs/Probe",
            json!({ "allOf": [
                {
                    "if": { "properties": { "kind": { "const": "exec" } } },
                    "then": { "required": ["command"], "properties": { "command": { "minItems": 1 } } },
                    "else": { "properties": { "command": { "maxItems": 0 } } },
                },
                {
                    "if": { "properties": { "kind": { "const": "console" } } },
                    "then": { "required": ["pattern"], "properties": { "pattern": { "type": "string" } } },
                    "else": { "properties": { "pattern": { "type": "null" } } },
                },
            ] }),
        ),
        (
            "/$defs/Probe/properties/command",
            json!({ "maxItems": MAX_PROBE_WORDS, "items": { "pattern": whole("[A-Za-z0-9._/-]+") } }),
        ),
        (
            "/$defs/Probe/properties/pattern",
            json!({ "maxLength": MAX_PROBE_PATTERN_BYTES, "pattern": whole(&format!("{NO_CONTROL}*")) }),
        ),
        ("/$defs/Probe/properties/intervalSeconds", range(1, 3600)),
        (
            "/$defs/Probe/properties/deadlineSeconds",
            range(1, MAX_PROBE_SECONDS.into()),
        ),
        (
            "/$defs/Probe/properties/minHealthySeconds",
            range(0, MAX_PROBE_SECONDS.into()),
        ),
        ("/properties/apiVersion", json!({ "const": API_VERSION })),
        ("/properties/kind", json!({ "const": KIND })),
        ("/$defs/Metadata/properties/name", vm_name()),
        ("/$defs/Metadata/properties/labels", labels()),
        (
            "/$defs/Boot",
            json!({ "oneOf": [present_object("uefi"), present_object("linuxKernelDirect")] }),
        ),
        ("/$defs/UefiBoot/properties/dir", host_path()),
        (
            "/$defs/UefiBoot/properties/path",
            json!({ "pattern": whole(&format!("{NO_CONTROL}+")) }),
        ),
        (
            "/$defs/UefiBoot/properties/args",
            json!({ "pattern": r"^[^\x00]*$" }),
        ),
        ("/$defs/LinuxKernelDirect/properties/kernel", host_path()),
        ("/$defs/LinuxKernelDirect/properties/initrd", host_path()),
        (
            "/$defs/LinuxKernelDirect/properties/cmdline",
            json!({ "pattern": whole(&format!("{NO_CONTROL}*")) }),
        ),
        (
            "/$defs/Processors/properties/count",
            range(1, MAX_PROCESSORS.into()),
        ),
        ("/$defs/Memory/properties/sizeMB", range(1, MAX_MEMORY_MB)),
        ("/$defs/Mmio/properties/lowGapMB", range(0, 3072)),
        ("/$defs/Mmio/properties/highBaseMB", range(4096, 1 << 30)),
        ("/$defs/Mmio/properties/highGapMB", range(0, 1 << 30)),
        (
            "/$defs/SerialConsole/properties/port",
            range(0, MAX_SERIAL_PORT.into()),
        ),
        (
            "/$defs/SerialConsole/properties/listenerPath",
            socket_path(),
        ),
        (
            "/$defs/StorageQos",
            json!({ "anyOf": [present("iopsMaximum", "integer"), present("bandwidthMaximum", "integer")] }),
        ),
        (
            "/$defs/StorageQos/properties/iopsMaximum",
            json!({ "minimum": 1 }),
        ),
        (
            "/$defs/StorageQos/properties/bandwidthMaximum",
            json!({ "minimum": 1 }),
        ),
        (
            "/$defs/ScsiController/properties/id",
            range(0, MAX_SCSI_CONTROLLER.into()),
        ),
        (
            "/$defs/ScsiDisk/properties/lun",
            range(0, MAX_SCSI_LUN.into()),
        ),
        ("/$defs/ScsiDisk/properties/path", host_path()),
        (
            "/$defs/Vpmem/properties/maximumDevices",
            range(1, MAX_VPMEM_DEVICES.into()),
        ),
        (
            "/$defs/Vpmem/properties/maximumSizeBytes",
            json!({ "minimum": 4096, "maximum": MAX_VPMEM_SIZE_BYTES, "multipleOf": 4096 }),
        ),
        // Below `maximumDevices`, which is at most MAX_VPMEM_DEVICES.
        (
            "/$defs/VpmemDevice/properties/id",
            range(0, (MAX_VPMEM_DEVICES - 1).into()),
        ),
        ("/$defs/VpmemDevice/properties/path", host_path()),
        ("/$defs/NetworkAdapter/properties/nicId", guid()),
        (
            "/$defs/NetworkAdapter/properties/endpointId",
            json!({ "anyOf": [
                {
                    "pattern": whole(&format!("[A-Za-z0-9._-]{{1,{}}}", super::validate::MAX_ENDPOINT_BYTES)),
                    "not": { "enum": [".", ".."] },
                },
                guid(),
            ]}),
        ),
        ("/$defs/NetworkAdapter/properties/macAddress", mac),
        ("/$defs/Plan9Share/properties/name", name(31, true)),
        ("/$defs/Plan9Share/properties/hostPath", host_path()),
        ("/$defs/Plan9Share/properties/port", range(1, 65535)),
        ("/$defs/Plan9Share/properties/allowedFiles", file_names()),
        ("/$defs/VsmbShare/properties/name", name(64, true)),
        ("/$defs/VsmbShare/properties/hostPath", host_path()),
        ("/$defs/VsmbShare/properties/allowedFiles", file_names()),
        (
            "/$defs/PciDevice/properties/instanceId",
            json!({ "pattern": whole("[!-~]{1,256}") }),
        ),
        ("/$defs/PciDevice/properties/vmbusGuid", guid()),
        (
            "/$defs/VmSocket",
            json!({ "allOf": [
                {
                    "if": { "properties": { "type": { "const": "hvsocket" } } },
                    "then": {
                        "required": ["serviceId"],
                        "properties": { "serviceId": { "type": "string" }, "port": { "type": "null" } },
                    },
                },
                {
                    "if": { "properties": { "type": { "const": "vsock" } } },
                    "then": {
                        "required": ["port"],
                        "properties": { "port": { "type": "integer" }, "serviceId": { "type": "null" } },
                    },
                },
            ] }),
        ),
        ("/$defs/VmSocket/properties/serviceId", guid()),
        (
            "/$defs/VmSocket/properties/port",
            range(1, u64::from(u32::MAX) - 1),
        ),
        ("/$defs/VmSocket/properties/listenerPath", socket_path()),
        ("/$defs/WindowsOptions/properties/cpuGroup", guid()),
    ]
}

/// The base schema with every rule merged in; the pointers no schema
/// object answers to, if any.
fn constrained() -> Result<Value, Vec<&'static str>> {
    let mut schema = base();
    bound_integers(&mut schema);
    let mut missing = Vec::new();
    for (pointer, rule) in rules() {
        match schema.pointer_mut(pointer).and_then(Value::as_object_mut) {
            Some(target) => {
                if let Value::Object(rule) = rule {
                    target.extend(rule);
                }
            }
            None => missing.push(pointer),
        }
    }
    if missing.is_empty() {
        Ok(schema)
    } else {
        Err(missing)
    }
}

/// serde refuses a number past its field's type; schemars states only the
/// lower bound.
fn bound_integers(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let max = match map.get("format").and_then(Value::as_str) {
                Some("uint32") => Some(json!(u32::MAX)),
                Some("uint64") => Some(json!(u64::MAX)),
                _ => None,
            };
            if let Some(max) = max {
                map.entry("maximum").or_insert(max);
            }
            map.values_mut().for_each(bound_integers);
        }
        Value::Array(items) => items.iter_mut().for_each(bound_integers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_lands_on_a_schema_object() {
        assert_eq!(constrained().err(), None);
    }

    #[test]
    fn integers_are_bounded_by_their_type() {
        let s = json_schema();
        assert_eq!(
            s.pointer("/$defs/Plan9Share/properties/flags/maximum"),
            Some(&json!(u32::MAX))
        );
        assert_eq!(
            s.pointer("/$defs/Processors/properties/count/maximum"),
            Some(&json!(MAX_PROCESSORS))
        );
    }
}
