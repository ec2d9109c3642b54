//! Tests through the exported functions, as a caller would use them: UTF-16 strings in,
//! documents out, LocalFree.

use std::ffi::c_void;
use std::ptr::{null, null_mut};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::abi::*;
// Documents are kernel32's to free there, as HCS's are.
use crate::hresult::*;
use crate::store::{State, Store};
#[cfg(windows)]
use windows_sys::Win32::Foundation::LocalFree;

fn w(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// Reads and frees a result document.
fn take(p: PWSTR) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let mut len = 0;
    // SAFETY: the emulator's documents are NUL-terminated.
    let s = unsafe {
        while *p.add(len) != 0 {
            len += 1;
        }
        String::from_utf16_lossy(std::slice::from_raw_parts(p, len))
    };
    // SAFETY: `p` came from the emulator and is freed once.
    assert!(unsafe { LocalFree(p.cast()) }.is_null());
    Some(s)
}

fn unique(name: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn new_op() -> HCS_OPERATION {
    // SAFETY: no context, no callback.
    let op = unsafe { HcsCreateOperation(null(), None) };
    assert!(!op.is_null());
    op
}

/// Waits for `op`, closes it, and returns its HRESULT and parsed document.
fn finish(op: HCS_OPERATION) -> (HRESULT, Option<Value>) {
    let mut doc = null_mut();
    // SAFETY: `op` is live; `doc` is a valid out-pointer.
    let hr = unsafe { HcsWaitForOperationResult(op, INFINITE, &mut doc) };
    // SAFETY: `op` is live and closed once.
    unsafe { HcsCloseOperation(op) };
    let doc = take(doc).map(|d| serde_json::from_str(&d).expect("result documents are JSON"));
    (hr, doc)
}

fn message(doc: &Option<Value>) -> String {
    doc.as_ref()
        .and_then(|d| d.get("ErrorMessage"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn config() -> Value {
    json!({
        "Owner": "uvmctl-test",
        "SchemaVersion": {"Major": 2, "Minor": 1},
        "ShouldTerminateOnLastHandleClosed": false,
        "VirtualMachine": {
            "StopOnReset": true,
            "Chipset": {
                "Uefi": {
                    "ApplySecureBootTemplate": "Skip",
                    "BootThis": {"DeviceType": "ScsiDrive", "DevicePath": "0", "DiskNumber": 0}
                }
            },
            "ComputeTopology": {
                "Memory": {"SizeInMB": 1024, "AllowOvercommit": true},
                "Processor": {"Count": 2}
            },
            "Devices": {
                "Scsi": {"0": {"Attachments": {"0": {"Type": "VirtualDisk", "Path": "/vm/os.vhdx"}}}},
                "VirtualPMem": {"MaximumCount": 4},
                "Plan9": {"Shares": []},
                "VirtualSmb": {"Shares": [], "DirectFileMappingInMB": 64},
                "NetworkAdapters": {
                    "eth0": {"EndpointId": "6c1d1d3a-0c3e-4d5b-9a3e-1b2c3d4e5f60", "MacAddress": "00-15-5D-01-02-03"}
                },
                "HvSocket": {"HvSocketConfig": {"ServiceTable": {
                    "00000001-facb-11e6-bd58-64006a7986d3": {"BindSecurityDescriptor": "D:P(A;;FA;;;SY)"}
                }}},
                "ComPorts": {"0": {"NamedPipe": "\\\\.\\pipe\\vm-com1"}}
            },
            "StorageQoS": {"IopsMaximum": 1000}
        }
    })
}

/// A caller's view of one compute system handle.
struct Sys(HCS_SYSTEM);

impl Sys {
    fn call(
        &self,
        f: unsafe extern "system" fn(HCS_SYSTEM, HCS_OPERATION, PCWSTR) -> HRESULT,
        options: Option<&str>,
    ) -> (HRESULT, Option<Value>) {
        let op = new_op();
        let text = options.map(w);
        let p = text.as_ref().map_or(null(), |t| t.as_ptr());
        // SAFETY: live handles and a NUL-terminated string (or null).
        assert_eq!(
            unsafe { f(self.0, op, p) },
            S_OK,
            "the call was not accepted"
        );
        finish(op)
    }

    fn start(&self) -> HRESULT {
        self.call(HcsStartComputeSystem, None).0
    }

    fn terminate(&self) -> HRESULT {
        self.call(HcsTerminateComputeSystem, None).0
    }

    fn properties(&self, query: Option<&str>) -> (HRESULT, Option<Value>) {
        self.call(HcsGetComputeSystemProperties, query)
    }

    fn state(&self) -> String {
        let (hr, doc) = self.properties(None);
        assert_eq!(hr, S_OK);
        doc.and_then(|d| d.get("State").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default()
    }

    fn modify(&self, request: &Value) -> (HRESULT, Option<Value>) {
        let op = new_op();
        let text = w(&request.to_string());
        // SAFETY: live handles and a NUL-terminated string.
        assert_eq!(
            unsafe { HcsModifyComputeSystem(self.0, op, text.as_ptr(), null_mut()) },
            S_OK
        );
        finish(op)
    }

    fn close(self) {
        // SAFETY: a live handle, closed once.
        unsafe { HcsCloseComputeSystem(self.0) };
    }
}

fn create(id: &str, config: &Value) -> (HRESULT, Option<Value>, Option<Sys>) {
    let op = new_op();
    let id = w(id);
    let text = w(&config.to_string());
    let mut system = null_mut();
    // SAFETY: NUL-terminated strings, a live operation, a valid out-pointer.
    let hr = unsafe { HcsCreateComputeSystem(id.as_ptr(), text.as_ptr(), op, null(), &mut system) };
    assert_eq!(hr, S_OK, "create was not accepted");
    let (hr, doc) = finish(op);
    let sys = (!system.is_null()).then_some(Sys(system));
    (hr, doc, sys)
}

fn create_ok(id: &str, config: &Value) -> Sys {
    let (hr, doc, sys) = create(id, config);
    assert_eq!(hr, S_OK, "create failed: {doc:?}");
    sys.expect("a handle")
}

fn running(name: &str) -> (String, Sys) {
    let id = unique(name);
    let sys = create_ok(&id, &config());
    assert_eq!(sys.start(), S_OK);
    (id, sys)
}

fn open(id: &str) -> Result<Sys, HRESULT> {
    let id = w(id);
    let mut system = null_mut();
    // SAFETY: a NUL-terminated string and a valid out-pointer.
    match unsafe { HcsOpenComputeSystem(id.as_ptr(), GENERIC_ALL, &mut system) } {
        S_OK => Ok(Sys(system)),
        hr => Err(hr),
    }
}

fn document(id: &str) -> Value {
    crate::abi::store()
        .record(id)
        .map(|r| r.document)
        .unwrap_or(Value::Null)
}

#[test]
fn create_start_modify_properties_terminate_round_trip() {
    let id = unique("round-trip");
    let sys = create_ok(&id, &config());
    assert_eq!(sys.state(), "Created");
    assert_eq!(sys.start(), S_OK);
    assert_eq!(sys.state(), "Running");

    let (hr, doc) = sys.modify(&json!({
        "ResourcePath": "VirtualMachine/Devices/Scsi/0/Attachments/1",
        "RequestType": "Add",
        "Settings": {"Type": "VirtualDisk", "Path": "/vm/data.vhdx", "ReadOnly": false}
    }));
    assert_eq!(hr, S_OK, "{doc:?}");
    assert_eq!(
        document(&id).pointer("/VirtualMachine/Devices/Scsi/0/Attachments/1/Path"),
        Some(&json!("/vm/data.vhdx"))
    );
    let (hr, _) = sys.modify(&json!({
        "ResourcePath": "VirtualMachine/ComputeTopology/Memory/SizeInMB",
        "RequestType": "Update",
        "Settings": 2048
    }));
    assert_eq!(hr, S_OK);

    let (hr, props) = sys.properties(Some(r#"{"PropertyTypes":["Statistics"]}"#));
    assert_eq!(hr, S_OK);
    let props = props.expect("properties");
    assert_eq!(props["Id"], json!(id));
    assert_eq!(props["SystemType"], json!("VirtualMachine"));
    assert_eq!(props["Owner"], json!("uvmctl-test"));
    assert_eq!(props["State"], json!("Running"));
    assert_eq!(props["Stopped"], json!(false));
    let runtime_id = props["RuntimeId"].as_str().unwrap_or("");
    assert!(crate::schema::is_guid(runtime_id), "{runtime_id}");
    let stats = &props["Statistics"];
    assert_eq!(
        stats["Memory"]["MemoryUsageCommitBytes"],
        json!(2048u64 * 1024 * 1024)
    );
    assert!(stats["Uptime100ns"].is_u64());
    assert!(stats["Processor"]["TotalRuntime100ns"].is_u64());
    assert!(
        stats["Timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    // The Statistics document is itself an instance of the reference's Statistics.
    assert_eq!(
        crate::schema::validate("Statistics", stats, "Statistics"),
        Ok(())
    );

    let op = new_op();
    // SAFETY: a live operation; null query.
    assert_eq!(unsafe { HcsEnumerateComputeSystems(null(), op) }, S_OK);
    let (hr, list) = finish(op);
    assert_eq!(hr, S_OK);
    let list = list.expect("a list");
    let mine: Vec<&Value> = list
        .as_array()
        .map(|a| a.iter().filter(|s| s["Id"] == json!(id)).collect())
        .unwrap_or_default();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0]["State"], json!("Running"));
    assert_eq!(mine[0]["RuntimeId"], json!(runtime_id));
    assert_eq!(crate::schema::validate("Properties", mine[0], ""), Ok(()));

    assert_eq!(sys.terminate(), S_OK);
    assert_eq!(sys.state(), "Stopped");
    let (_, props) = sys.properties(None);
    assert_eq!(props.map(|p| p["Stopped"].clone()), Some(json!(true)));
    sys.close();
    assert_eq!(open(&id).err(), Some(HCS_E_SYSTEM_NOT_FOUND));
}

#[test]
fn unknown_field_is_refused_with_its_path() {
    let mut c = config();
    c["VirtualMachine"]["Devices"]["Scsi"]["0"]["Attachments"]["1"] =
        json!({"Typ": "VirtualDisk", "Path": "/x"});
    let (hr, doc, sys) = create(&unique("unknown-field"), &c);
    assert_eq!(hr, HCS_E_INVALID_JSON);
    assert!(sys.is_none());
    let m = message(&doc);
    assert!(
        m.contains(
            r#"VirtualMachine.Devices.Scsi["0"].Attachments["1"].Typ: unknown field of Attachment"#
        ),
        "{m}"
    );
    assert_eq!(
        doc.map(|d| d["Error"].clone()),
        Some(json!(HCS_E_INVALID_JSON))
    );
}

#[test]
fn mistyped_values_are_refused() {
    let cases: Vec<(Value, &str)> = vec![
        (
            json!("1024"),
            "VirtualMachine.ComputeTopology.Memory.SizeInMB",
        ),
        (json!(-1), "VirtualMachine.ComputeTopology.Memory.SizeInMB"),
        (json!(1.5), "VirtualMachine.ComputeTopology.Memory.SizeInMB"),
    ];
    for (value, path) in cases {
        let mut c = config();
        c["VirtualMachine"]["ComputeTopology"]["Memory"]["SizeInMB"] = value.clone();
        let (hr, doc, _) = create(&unique("mistyped"), &c);
        assert_eq!(hr, HCS_E_INVALID_JSON, "{value}");
        assert!(message(&doc).contains(path), "{}", message(&doc));
    }
    let mut c = config();
    c["VirtualMachine"]["Devices"]["VirtualPMem"]["MaximumCount"] = json!(256);
    let (hr, doc, _) = create(&unique("too-large"), &c);
    assert_eq!(hr, HCS_E_INVALID_JSON);
    assert!(
        message(&doc).contains("does not fit in uint8"),
        "{}",
        message(&doc)
    );

    let mut c = config();
    c["VirtualMachine"]["Devices"]["Scsi"]["0"]["Attachments"]["0"]["Type"] = json!("Floppy");
    let (hr, doc, _) = create(&unique("enum"), &c);
    assert_eq!(hr, HCS_E_INVALID_JSON);
    assert!(
        message(&doc).contains("AttachmentType"),
        "{}",
        message(&doc)
    );

    let mut c = config();
    c["VirtualMachine"]["Devices"]["NetworkAdapters"]["eth0"]["EndpointId"] = json!("not-a-guid");
    let (hr, _, _) = create(&unique("guid"), &c);
    assert_eq!(hr, HCS_E_INVALID_JSON);

    for version in [
        json!({"Major": 1, "Minor": 0}),
        json!({"Major": 2, "Minor": 0}),
    ] {
        let mut c = config();
        c["SchemaVersion"] = version;
        let (hr, doc, _) = create(&unique("version"), &c);
        assert_eq!(hr, HCS_E_INVALID_JSON);
        assert!(message(&doc).contains("SchemaVersion"));
    }
    let mut c = config();
    c.as_object_mut().map(|o| o.remove("VirtualMachine"));
    let (hr, _, _) = create(&unique("no-vm"), &c);
    assert_eq!(hr, HCS_E_INVALID_JSON);
}

#[test]
fn request_types_and_paths_outside_the_table_are_refused() {
    let (_, sys) = running("request-type");
    let (hr, doc) = sys.modify(&json!({
        "ResourcePath": "VirtualMachine/Devices/VirtualPci/gpu0",
        "RequestType": "Update",
        "Settings": {"Functions": []}
    }));
    assert_eq!(hr, E_INVALIDARG);
    let m = message(&doc);
    assert!(
        m.contains("VirtualMachine/Devices/VirtualPci/gpu0") && m.contains("Add or Remove"),
        "{m}"
    );

    let (hr, doc) = sys.modify(&json!({
        "ResourcePath": "VirtualMachine/Devices/Keyboard",
        "RequestType": "Add",
        "Settings": {}
    }));
    assert_eq!(hr, E_INVALIDARG);
    assert!(message(&doc).contains("is not one HCS modifies"));

    let (hr, _) = sys.modify(&json!({
        "ResourcePath": "VirtualMachine/Devices/Scsi/1",
        "RequestType": "Add",
        "Settings": {"Attachments": {}}
    }));
    assert_eq!(hr, E_INVALIDARG);

    let (hr, doc) = sys.modify(&json!({
        "ResourcePath": "VirtualMachine/Devices/Scsi/0/Attachments/2",
        "RequestType": "Add",
        "Settings": {"Type": "VirtualDisk", "Path": "/x", "Flags": 1}
    }));
    assert_eq!(hr, HCS_E_INVALID_JSON);
    assert!(message(&doc).contains("Settings.Flags: unknown field of Attachment"));

    let (hr, _) = sys.modify(&json!({"ResourcePath": 7}));
    assert_eq!(hr, HCS_E_INVALID_JSON);
    assert_eq!(sys.terminate(), S_OK);
    sys.close();
}

#[test]
fn attachment_to_a_missing_controller_is_not_found() {
    let (_, sys) = running("missing-controller");
    let (hr, doc) = sys.modify(&json!({
        "ResourcePath": "VirtualMachine/Devices/Scsi/7/Attachments/0",
        "RequestType": "Add",
        "Settings": {"Type": "VirtualDisk", "Path": "/x"}
    }));
    assert_eq!(hr, E_NOT_FOUND);
    assert!(
        message(&doc).contains("SCSI controller 7"),
        "{}",
        message(&doc)
    );
    // A lun that is taken, and a lun that is free, on the controller that exists.
    let add0 = json!({
        "ResourcePath": "VirtualMachine/Devices/Scsi/0/Attachments/0",
        "RequestType": "Add",
        "Settings": {"Type": "Iso", "Path": "/seed.iso"}
    });
    assert_eq!(sys.modify(&add0).0, E_ALREADY_EXISTS);
    let remove5 = json!({
        "ResourcePath": "VirtualMachine/Devices/Scsi/0/Attachments/5",
        "RequestType": "Remove"
    });
    assert_eq!(sys.modify(&remove5).0, E_NOT_FOUND);
    let remove0 = json!({
        "ResourcePath": "VirtualMachine/Devices/Scsi/0/Attachments/0",
        "RequestType": "Remove"
    });
    assert_eq!(sys.modify(&remove0).0, S_OK);
    assert_eq!(sys.terminate(), S_OK);
    sys.close();
}

#[test]
fn modify_needs_a_running_system() {
    let id = unique("modify-state");
    let sys = create_ok(&id, &config());
    let request = json!({
        "ResourcePath": "VirtualMachine/ComputeTopology/Memory/SizeInMB",
        "Settings": 4096
    });
    assert_eq!(sys.modify(&request).0, HCS_E_INVALID_STATE);
    assert_eq!(sys.start(), S_OK);
    assert_eq!(sys.modify(&request).0, S_OK);
    assert_eq!(sys.call(HcsPauseComputeSystem, None).0, S_OK);
    assert_eq!(sys.modify(&request).0, HCS_E_INVALID_STATE);
    assert_eq!(sys.call(HcsResumeComputeSystem, None).0, S_OK);
    assert_eq!(sys.terminate(), S_OK);
    let (hr, doc) = sys.modify(&request);
    assert_eq!(hr, HCS_E_INVALID_STATE);
    assert!(message(&doc).contains("Stopped"));
    sys.close();
}

#[test]
fn double_create_is_already_exists() {
    let id = unique("double");
    let sys = create_ok(&id, &config());
    let (hr, doc, second) = create(&id, &config());
    assert_eq!(hr, HCS_E_SYSTEM_ALREADY_EXISTS);
    assert!(second.is_none());
    assert!(message(&doc).contains(&id));
    sys.close();
}

#[test]
fn closed_handles_are_e_handle() {
    let id = unique("closed");
    let sys = create_ok(&id, &config());
    let raw = sys.0;
    sys.close();
    let op = new_op();
    // SAFETY: a stale handle is only looked up, never dereferenced.
    assert_eq!(unsafe { HcsStartComputeSystem(raw, op, null()) }, E_HANDLE);
    let mut doc = null_mut();
    // SAFETY: as above.
    assert_eq!(
        unsafe { HcsWaitForComputeSystemExit(raw, 0, &mut doc) },
        E_HANDLE
    );
    // The operation was not used by the refused call.
    // SAFETY: a live operation and a valid out-pointer.
    assert_eq!(
        unsafe { HcsGetOperationResult(op, &mut doc) },
        HCS_E_OPERATION_NOT_STARTED
    );
    assert!(doc.is_null());
    // SAFETY: closed once.
    unsafe { HcsCloseOperation(op) };
    // SAFETY: a closed operation handle is only looked up.
    assert_eq!(
        unsafe { HcsWaitForOperationResult(op, 0, &mut doc) },
        E_HANDLE
    );
    let sys = create_ok(&unique("closed-op"), &config());
    // SAFETY: as above.
    assert_eq!(
        unsafe { HcsStartComputeSystem(sys.0, op, null()) },
        E_HANDLE
    );
    sys.close();
}

#[test]
fn direct_argument_errors() {
    let op = new_op();
    let mut system = null_mut();
    let c = w(&config().to_string());
    let empty = w("");
    // SAFETY: valid strings or null; a valid out-pointer or null.
    unsafe {
        assert_eq!(
            HcsCreateComputeSystem(null(), c.as_ptr(), op, null(), &mut system),
            E_INVALIDARG
        );
        assert_eq!(
            HcsCreateComputeSystem(empty.as_ptr(), c.as_ptr(), op, null(), &mut system),
            E_INVALIDARG
        );
        let id = w(&unique("args"));
        assert_eq!(
            HcsCreateComputeSystem(id.as_ptr(), c.as_ptr(), op, null(), null_mut()),
            E_POINTER
        );
        assert_eq!(
            HcsCreateComputeSystem(id.as_ptr(), null(), op, null(), &mut system),
            E_POINTER
        );
        assert_eq!(
            HcsOpenComputeSystem(id.as_ptr(), GENERIC_ALL, &mut system),
            HCS_E_SYSTEM_NOT_FOUND
        );
        assert_eq!(
            HcsOpenComputeSystem(null(), GENERIC_ALL, &mut system),
            E_INVALIDARG
        );
        let mut doc = null_mut();
        assert_eq!(
            HcsWaitForOperationResult(op, 0, &mut doc),
            HCS_E_OPERATION_NOT_STARTED
        );
        HcsCloseOperation(op);
    }
}

#[test]
fn start_after_stop_is_invalid_state() {
    let (_, sys) = running("restart");
    assert_eq!(sys.start(), HCS_E_INVALID_STATE);
    assert_eq!(sys.call(HcsShutDownComputeSystem, None).0, S_OK);
    assert_eq!(sys.start(), HCS_E_INVALID_STATE);
    assert_eq!(sys.terminate(), HCS_E_SYSTEM_ALREADY_STOPPED);
    assert_eq!(
        sys.call(HcsShutDownComputeSystem, None).0,
        HCS_E_SYSTEM_ALREADY_STOPPED
    );
    assert_eq!(sys.call(HcsPauseComputeSystem, None).0, HCS_E_INVALID_STATE);
    sys.close();
}

extern "system" fn record_event(event: *const HCS_EVENT, context: *mut c_void) {
    // SAFETY: the context is the test's Mutex, alive for the whole test; the event and its data
    // are valid during the call.
    unsafe {
        let seen = &*(context as *const Mutex<Vec<(u32, String)>>);
        let ev = &*event;
        let data = if ev.EventData.is_null() {
            String::new()
        } else {
            let mut len = 0;
            while *ev.EventData.add(len) != 0 {
                len += 1;
            }
            String::from_utf16_lossy(std::slice::from_raw_parts(ev.EventData, len))
        };
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((ev.Type, data));
    }
}

#[test]
fn system_exited_fires_the_callback() {
    let (_, sys) = running("callback");
    let seen: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());
    let ctx = &seen as *const _ as *const c_void;
    // SAFETY: `seen` outlives the handle.
    unsafe {
        assert_eq!(
            HcsSetComputeSystemCallback(sys.0, HCS_EVENT_OPTION_NONE, ctx, Some(record_event)),
            S_OK
        );
        assert_eq!(
            HcsSetComputeSystemCallback(sys.0, HCS_EVENT_OPTION_NONE, ctx, Some(record_event)),
            HCS_E_OPERATION_SYSTEM_CALLBACK_ALREADY_SET
        );
    }
    assert_eq!(sys.call(HcsShutDownComputeSystem, None).0, S_OK);
    let events = seen.lock().map(|v| v.clone()).unwrap_or_default();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, HCS_EVENT_SYSTEM_EXITED);
    let status: Value = serde_json::from_str(&events[0].1).expect("SystemExitStatus");
    assert_eq!(status["Status"], json!(0));
    assert_eq!(status["ExitType"], json!("GracefulExit"));
    assert_eq!(
        crate::schema::validate("SystemExitStatus", &status, ""),
        Ok(())
    );
    sys.close();
}

static COMPLETIONS: AtomicUsize = AtomicUsize::new(0);

extern "system" fn count_completion(_op: HCS_OPERATION, context: *mut c_void) {
    COMPLETIONS.fetch_add(context as usize, Ordering::SeqCst);
}

#[test]
fn operation_callbacks_and_reuse() {
    let (_, sys) = running("op-callback");
    // SAFETY: the context is an integer the callback adds up.
    let op = unsafe { HcsCreateOperation(std::ptr::without_provenance(7), Some(count_completion)) };
    // SAFETY: live handles.
    assert_eq!(unsafe { HcsPauseComputeSystem(sys.0, op, null()) }, S_OK);
    assert_eq!(COMPLETIONS.load(Ordering::SeqCst), 7);
    // An operation is reused once it has completed, as the reference's Tutorial.md does.
    // SAFETY: live handles.
    assert_eq!(unsafe { HcsResumeComputeSystem(sys.0, op, null()) }, S_OK);
    assert_eq!(finish(op).0, S_OK);
    assert_eq!(COMPLETIONS.load(Ordering::SeqCst), 14);

    // With operation callbacks enabled on the system, operations with callbacks are refused,
    // and completions arrive as HcsEventOperationCallback events.
    let seen: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());
    let ctx = &seen as *const _ as *const c_void;
    // SAFETY: `seen` outlives the handle.
    unsafe {
        assert_eq!(
            HcsSetComputeSystemCallback(
                sys.0,
                HCS_EVENT_OPTION_ENABLE_OPERATION_CALLBACKS,
                ctx,
                Some(record_event)
            ),
            S_OK
        );
        let op = HcsCreateOperation(std::ptr::without_provenance(1), Some(count_completion));
        assert_eq!(
            HcsPauseComputeSystem(sys.0, op, null()),
            HCS_E_OPERATION_SYSTEM_CALLBACK_ALREADY_SET
        );
        HcsCloseOperation(op);
    }
    assert_eq!(sys.terminate(), S_OK);
    let types: Vec<u32> = seen
        .lock()
        .map(|v| v.iter().map(|e| e.0).collect())
        .unwrap_or_default();
    assert_eq!(
        types,
        vec![HCS_EVENT_SYSTEM_EXITED, HCS_EVENT_OPERATION_CALLBACK]
    );
    sys.close();
}

#[test]
fn wait_for_exit_times_out_then_succeeds() {
    let (id, sys) = running("wait-exit");
    let mut doc = null_mut();
    let started = Instant::now();
    // SAFETY: a live handle and a valid out-pointer.
    assert_eq!(
        unsafe { HcsWaitForComputeSystemExit(sys.0, 50, &mut doc) },
        HCS_E_OPERATION_TIMEOUT
    );
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert!(doc.is_null());

    let other = open(&id).expect("a second handle");
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        let hr = other.terminate();
        other.close();
        hr
    });
    // SAFETY: as above.
    assert_eq!(
        unsafe { HcsWaitForComputeSystemExit(sys.0, 10_000, &mut doc) },
        S_OK
    );
    assert_eq!(killer.join().ok(), Some(S_OK));
    let status: Value = serde_json::from_str(&take(doc).unwrap_or_default()).expect("JSON");
    assert_eq!(status["ExitType"], json!("ForcedExit"));
    // Once stopped, the wait returns at once.
    // SAFETY: as above.
    assert_eq!(
        unsafe { HcsWaitForComputeSystemExit(sys.0, 0, null_mut()) },
        S_OK
    );
    sys.close();
}

// SAFETY: a Sys is an opaque handle value that the emulator only looks up in its table; it is
// never dereferenced, so moving it to another thread is sound.
unsafe impl Send for Sys {}

#[test]
fn save_needs_paused_and_restores() {
    let dir = temp_dir("save");
    let file = dir.join("vm.save");
    let file_s = file.to_string_lossy().to_string();
    let (_, sys) = running("save");
    let options = json!({"SaveType": "ToFile", "SaveStateFilePath": file_s}).to_string();
    assert_eq!(
        sys.call(HcsSaveComputeSystem, Some(&options)).0,
        HCS_E_INVALID_STATE
    );
    let (hr, _) = sys.modify(&json!({
        "ResourcePath": "VirtualMachine/Devices/Plan9/Shares",
        "RequestType": "Add",
        "Settings": {"Name": "share", "AccessName": "share", "Path": "/srv", "Port": 564}
    }));
    assert_eq!(hr, S_OK);
    assert_eq!(sys.call(HcsPauseComputeSystem, None).0, S_OK);
    let (hr, doc) = sys.call(
        HcsSaveComputeSystem,
        Some(r#"{"SaveType": "ToDisk", "SaveStateFilePath": "/x"}"#),
    );
    assert_eq!(hr, HCS_E_INVALID_JSON);
    assert!(message(&doc).contains("SaveType"));
    assert_eq!(sys.call(HcsSaveComputeSystem, Some(&options)).0, S_OK);
    assert_eq!(sys.state(), "Paused");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o600));
    }
    // The file is created new: a second save to it fails.
    assert_eq!(
        sys.call(HcsSaveComputeSystem, Some(&options)).0,
        E_FILE_EXISTS
    );
    assert_eq!(sys.terminate(), S_OK);
    sys.close();

    let mut c = config();
    c["VirtualMachine"]["RestoreState"] = json!({"SaveStateFilePath": file_s});
    c["VirtualMachine"]["Devices"]
        .as_object_mut()
        .map(|d| d.remove("Plan9"));
    let id = unique("restored");
    let restored = create_ok(&id, &c);
    assert_eq!(restored.start(), S_OK);
    assert_eq!(restored.state(), "Running");
    assert_eq!(
        document(&id).pointer("/VirtualMachine/Devices/Plan9/Shares/0/Name"),
        Some(&json!("share")),
        "a restored system runs its saved hardware"
    );
    assert_eq!(restored.terminate(), S_OK);
    restored.close();

    let mut c = config();
    c["VirtualMachine"]["RestoreState"] =
        json!({"SaveStateFilePath": dir.join("missing").to_string_lossy()});
    assert_eq!(create(&unique("restore-missing"), &c).0, E_FILE_NOT_FOUND);
    let foreign = dir.join("foreign");
    let _ = std::fs::write(&foreign, "{}");
    c["VirtualMachine"]["RestoreState"] = json!({"SaveStateFilePath": foreign.to_string_lossy()});
    assert_eq!(create(&unique("restore-foreign"), &c).0, E_INVALID_DATA);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn share_pmem_hvsocket_and_cpu_paths() {
    let (id, sys) = running("devices");
    let ok = |r: Value| {
        let (hr, doc) = sys.modify(&r);
        assert_eq!(hr, S_OK, "{r}: {doc:?}");
    };
    ok(
        json!({"ResourcePath": "VirtualMachine/Devices/VirtualSmb/Shares", "RequestType": "Add",
        "Settings": {"Name": "s1", "Path": "C:\\share", "Options": {"ReadOnly": true, "NoDirectmap": true}}}),
    );
    ok(
        json!({"ResourcePath": "VirtualMachine/Devices/VirtualSmb/Shares", "RequestType": "Remove",
        "Settings": {"Name": "s1"}}),
    );
    ok(
        json!({"ResourcePath": "VirtualMachine/Devices/VirtualPMem/Devices/3", "RequestType": "Add",
        "Settings": {"HostPath": "/layer.vhd", "ReadOnly": true, "ImageFormat": "Vhd1"}}),
    );
    let (hr, _) = sys.modify(
        &json!({"ResourcePath": "VirtualMachine/Devices/VirtualPMem/Devices/4",
        "RequestType": "Add", "Settings": {"HostPath": "/layer.vhd"}}),
    );
    assert_eq!(hr, E_INVALIDARG, "4 is not below MaximumCount 4");
    ok(
        json!({"ResourcePath": "VirtualMachine/Devices/NetworkAdapters/eth1", "RequestType": "Add",
        "Settings": {"EndpointId": "6c1d1d3a-0c3e-4d5b-9a3e-1b2c3d4e5f61"}}),
    );
    ok(
        json!({"ResourcePath": "VirtualMachine/Devices/NetworkAdapters/eth1", "RequestType": "Remove"}),
    );
    let guid = "abcdef01-facb-11e6-bd58-64006a7986d3";
    ok(
        json!({"ResourcePath": format!("VirtualMachine/Devices/HvSocket/HvSocketConfig/ServiceTable/{guid}"),
        "RequestType": "Update", "Settings": {"BindSecurityDescriptor": "D:P(A;;FA;;;SY)"}}),
    );
    assert!(
        document(&id)
            .pointer(&format!(
                "/VirtualMachine/Devices/HvSocket/HvSocketConfig/ServiceTable/{guid}"
            ))
            .is_some()
    );
    let (hr, _) = sys.modify(&json!({
        "ResourcePath": "VirtualMachine/Devices/HvSocket/HvSocketConfig/ServiceTable/not-a-guid",
        "RequestType": "Update", "Settings": {}}));
    assert_eq!(hr, E_INVALIDARG);
    ok(
        json!({"ResourcePath": format!("VirtualMachine/Devices/HvSocket/HvSocketConfig/ServiceTable/{guid}"),
        "RequestType": "Remove"}),
    );
    ok(
        json!({"ResourcePath": "VirtualMachine/ComputeTopology/Processor/CpuGroup",
        "Settings": {"Id": "11111111-2222-3333-4444-555555555555"}}),
    );
    assert_eq!(
        document(&id).pointer("/VirtualMachine/ComputeTopology/Processor/CpuGroup/Id"),
        Some(&json!("11111111-2222-3333-4444-555555555555"))
    );
    let (hr, _) = sys.modify(
        &json!({"ResourcePath": "VirtualMachine/ComputeTopology/Memory/SizeInMB",
        "RequestType": "Update", "Settings": "4096"}),
    );
    assert_eq!(hr, HCS_E_INVALID_JSON);
    let (hr, _) = sys.modify(
        &json!({"ResourcePath": "VirtualMachine/Devices/Plan9/Shares",
        "RequestType": "Remove", "Settings": {"Name": "nothing", "Port": 564}}),
    );
    assert_eq!(hr, E_NOT_FOUND);
    assert_eq!(sys.terminate(), S_OK);
    sys.close();

    // A VM without Plan9 cannot get a Plan9 share.
    let mut c = config();
    c["VirtualMachine"]["Devices"]
        .as_object_mut()
        .map(|d| d.remove("Plan9"));
    let sys = create_ok(&unique("no-plan9"), &c);
    assert_eq!(sys.start(), S_OK);
    let (hr, doc) = sys.modify(
        &json!({"ResourcePath": "VirtualMachine/Devices/Plan9/Shares",
        "RequestType": "Add", "Settings": {"Name": "s", "Path": "/", "Port": 564}}),
    );
    assert_eq!(hr, E_NOT_FOUND);
    assert!(message(&doc).contains("Plan9"));
    assert_eq!(sys.terminate(), S_OK);
    sys.close();
}

#[test]
fn properties_queries_are_validated() {
    let (_, sys) = running("query");
    let (hr, doc) = sys.properties(Some(r#"{"PropertyTypes":["Bogus"]}"#));
    assert_eq!(hr, HCS_E_INVALID_JSON);
    assert!(
        message(&doc).contains("PropertyTypes[0]"),
        "{}",
        message(&doc)
    );
    let (hr, doc) = sys.properties(Some(
        r#"{"PropertyTypes":["Memory","TerminateOnLastHandleClosed"]}"#,
    ));
    assert_eq!(hr, S_OK);
    let doc = doc.unwrap_or(Value::Null);
    assert_eq!(doc["TerminateOnLastHandleClosed"], json!(false));
    assert!(doc["Memory"]["VirtualMachineMemory"].is_object());
    let (hr, _) = sys.properties(Some("not json"));
    assert_eq!(hr, HCS_E_INVALID_JSON);
    assert_eq!(sys.terminate(), S_OK);
    sys.close();
}

#[test]
fn enumerate_filters_by_system_query() {
    let owner = unique("owner");
    let mut c = config();
    c["Owner"] = json!(owner);
    let a = unique("enum-a");
    let sa = create_ok(&a, &c);
    let sb = create_ok(&unique("enum-b"), &config());
    let run = |q: &str| {
        let op = new_op();
        let q = w(q);
        // SAFETY: a NUL-terminated query and a live operation.
        assert_eq!(unsafe { HcsEnumerateComputeSystems(q.as_ptr(), op) }, S_OK);
        finish(op)
    };
    let (hr, list) = run(&json!({"Owners": [owner]}).to_string());
    assert_eq!(hr, S_OK);
    let ids: Vec<Value> = list
        .and_then(|l| l.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|s| s["Id"].clone())
        .collect();
    assert_eq!(ids, vec![json!(a)]);
    let (hr, _) = run(r#"{"Id": ["x"]}"#);
    assert_eq!(hr, HCS_E_INVALID_JSON);
    sa.close();
    sb.close();
}

#[test]
fn terminate_on_last_handle_closed() {
    let id = unique("last-handle");
    let mut c = config();
    c["ShouldTerminateOnLastHandleClosed"] = json!(true);
    let sys = create_ok(&id, &c);
    assert_eq!(sys.start(), S_OK);
    let second = open(&id).expect("open");
    sys.close();
    assert_eq!(second.state(), "Running");
    second.close();
    assert_eq!(open(&id).err(), Some(HCS_E_SYSTEM_NOT_FOUND));

    // Without it, a running system outlives its handles (HCS is a service).
    let (id, sys) = running("outlives");
    sys.close();
    let again = open(&id).expect("still there");
    assert_eq!(again.state(), "Running");
    assert_eq!(again.terminate(), S_OK);
    again.close();
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hcs-emulator-test-{}", unique(name)));
    // Fresh: under Wine a process id comes round again, and a failed
    // run's records would still be there.
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::create_dir_all(&d);
    d
}

#[test]
fn file_store_is_shared_by_two_processes() {
    let dir = temp_dir("store");
    let a = Store::new(Some(dir.clone()));
    let b = Store::new(Some(dir.clone()));
    let id = "shared-vm";
    assert_eq!(a.create(id, &config().to_string()), Ok(()));
    assert_eq!(
        b.create(id, &config().to_string()).map_err(|e| e.hr),
        Err(HCS_E_SYSTEM_ALREADY_EXISTS)
    );
    assert_eq!(b.open(id), Ok(()));
    assert_eq!(b.start(id, None), Ok(()));
    assert_eq!(a.record(id).map(|r| r.state), Some(State::Running));
    let request = json!({
        "ResourcePath": "VirtualMachine/Devices/Scsi/0/Attachments/3",
        "RequestType": "Add",
        "Settings": {"Type": "VirtualDisk", "Path": "/d.vhdx"}
    });
    assert_eq!(a.modify(id, &request.to_string()), Ok(()));
    assert!(
        b.record(id)
            .and_then(|r| r
                .document
                .pointer("/VirtualMachine/Devices/Scsi/0/Attachments/3")
                .cloned())
            .is_some()
    );
    let listed = b.enumerate(None).unwrap_or_default();
    assert!(listed.contains("shared-vm"), "{listed}");

    // A waits in its own "process" while B terminates.
    std::thread::scope(|s| {
        let waiter = s.spawn(|| a.wait_exit(id, Some(Duration::from_secs(10))));
        std::thread::sleep(Duration::from_millis(100));
        assert!(matches!(b.terminate(id, None), Ok(Some(_))));
        let status = waiter.join().ok().and_then(Result::ok).unwrap_or_default();
        assert!(status.contains("ForcedExit"), "{status}");
    });
    // A closes its handle (it stopped: removed from the service); B then sees it gone.
    assert_eq!(a.close(id), None);
    assert_eq!(b.record(id), None);
    assert_eq!(b.close(id), None);
    let leftovers = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
    assert_eq!(leftovers, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn local_free_frees_documents() {
    let (_, sys) = running("local-free");
    let op = new_op();
    // SAFETY: live handles.
    assert_eq!(
        unsafe { HcsGetComputeSystemProperties(sys.0, op, null()) },
        S_OK
    );
    let mut doc = null_mut();
    // SAFETY: a live operation and a valid out-pointer.
    assert_eq!(unsafe { HcsGetOperationResult(op, &mut doc) }, S_OK);
    assert!(!doc.is_null());
    // SAFETY: a document of this library, freed once; then null.
    unsafe {
        assert!(LocalFree(doc.cast()).is_null());
        assert!(LocalFree(null_mut()).is_null());
        HcsCloseOperation(op);
    }
    assert_eq!(sys.terminate(), S_OK);
    sys.close();
}

#[test]
fn memory_backing_of_the_reference_samples_is_accepted() {
    // Tutorial.md and EventCallbackSample.md set ComputeTopology.Memory.Backing, which the
    // SchemaReference.md table omits (see schema.rs).
    let mut c = config();
    c["VirtualMachine"]["ComputeTopology"]["Memory"]["Backing"] = json!("Virtual");
    assert_eq!(crate::store::check_configuration(&c), Ok(()));
    c["VirtualMachine"]["ComputeTopology"]["Memory"]["Backing"] = json!("Paged");
    assert!(crate::store::check_configuration(&c).is_err());
}
