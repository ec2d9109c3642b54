//! The exported C ABI: the same symbols, signatures and handle semantics as computecore.dll
//! (plus `LocalFree`, which on Windows comes from kernel32). All `unsafe` of the crate is here.
//!
//! Handles are non-null integers from one counter, cast to pointers and looked up in a table;
//! they are never dereferenced, and a closed handle is removed, so using it again is E_HANDLE.
//! Operations complete synchronously, inside the call that starts them; their completion
//! callback is called on the calling thread before that call returns, outside every lock.

#![allow(non_snake_case, non_camel_case_types)]

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::hresult::*;
use crate::store::Store;

pub type HCS_OPERATION = *mut c_void;
pub type HCS_SYSTEM = *mut c_void;
pub type PCWSTR = *const u16;
pub type PWSTR = *mut u16;
pub type DWORD = u32;
pub type HANDLE = *mut c_void;

/// HCS_OPERATION_COMPLETION
pub type OperationCompletion = Option<extern "system" fn(HCS_OPERATION, *mut c_void)>;
/// HCS_EVENT_CALLBACK
pub type EventCallback = Option<extern "system" fn(*const HCS_EVENT, *mut c_void)>;
// The callbacks are the caller's C functions, typed as it registers them;
// the emulator calls them as HCS does, with the context it was given.

/// HCS_EVENT (Reference/HCS_EVENT.md).
#[repr(C)]
pub struct HCS_EVENT {
    pub Type: u32,
    pub EventData: PCWSTR,
    pub Operation: HCS_OPERATION,
}

/// HCS_EVENT_TYPE values (Reference/HCS_EVENT_TYPE.md) the emulator sends.
pub const HCS_EVENT_SYSTEM_EXITED: u32 = 0x0000_0001;
pub const HCS_EVENT_OPERATION_CALLBACK: u32 = 0x0100_0000;
/// HCS_EVENT_OPTIONS (Reference/HCS_EVENT_OPTIONS.md).
pub const HCS_EVENT_OPTION_NONE: u32 = 0;
pub const HCS_EVENT_OPTION_ENABLE_OPERATION_CALLBACKS: u32 = 1;
/// The only `requestedAccess` HcsOpenComputeSystem documents ("must be GENERIC_ALL").
pub const GENERIC_ALL: u32 = 0x1000_0000;
pub const INFINITE: u32 = 0xFFFF_FFFF;

type Completion = extern "system" fn(HCS_OPERATION, *mut c_void);
type Event = extern "system" fn(*const HCS_EVENT, *mut c_void);

struct OpEntry {
    /// The caller's context pointer, kept as an integer (never dereferenced).
    context: usize,
    callback: Option<Completion>,
    /// A call that uses this operation is in progress.
    busy: bool,
    /// The outcome of the last call that used it; None: never started.
    result: Option<(HRESULT, Option<String>)>,
}

struct SysEntry {
    id: String,
    /// (callback, context, options) from HcsSetComputeSystemCallback.
    callback: Option<(Event, usize, u32)>,
}

struct Tables {
    next: usize,
    ops: HashMap<usize, OpEntry>,
    systems: HashMap<usize, SysEntry>,
    /// Event callbacks running now, by system handle: a close waits for
    /// them, so a caller may free its context once the close returns.
    in_flight: HashMap<usize, usize>,
}

impl Tables {
    fn new_handle(&mut self) -> usize {
        self.next += 1;
        self.next
    }
}

static TABLES: LazyLock<Mutex<Tables>> = LazyLock::new(|| {
    Mutex::new(Tables {
        next: 0x1000,
        ops: HashMap::new(),
        systems: HashMap::new(),
        in_flight: HashMap::new(),
    })
});

/// Signalled whenever an event callback returns.
static CALLBACK_RETURNED: std::sync::Condvar = std::sync::Condvar::new();

thread_local! {
    /// The system handles whose event callbacks this thread is inside.
    static IN_CALLBACK: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Calls an event callback registered on system handle `handle`, whose
/// in-flight count the caller raised under the tables lock; lowers it and
/// wakes a close waiting for it.
fn call_event(handle: usize, cb: Event, context: usize, ev: &HCS_EVENT) {
    IN_CALLBACK.with(|h| h.borrow_mut().push(handle));
    cb(ev, context as *mut c_void);
    IN_CALLBACK.with(|h| h.borrow_mut().retain(|x| *x != handle));
    let mut t = tables();
    if let Some(n) = t.in_flight.get_mut(&handle) {
        *n -= 1;
        if *n == 0 {
            t.in_flight.remove(&handle);
        }
    }
    drop(t);
    CALLBACK_RETURNED.notify_all();
}

/// The process-wide service (configured from `UVMCTL_HCS_EMULATOR_DIR` on first use).
static STORE: LazyLock<Store> = LazyLock::new(Store::from_env);

/// Result documents handed out and not yet given back to LocalFree, by address.
#[cfg(not(windows))]
static ALLOCATIONS: LazyLock<Mutex<HashMap<usize, Box<[u16]>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn tables() -> MutexGuard<'static, Tables> {
    TABLES.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(not(windows))]
fn allocations() -> MutexGuard<'static, HashMap<usize, Box<[u16]>>> {
    ALLOCATIONS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The process-wide store (for tests and embedding).
pub fn store() -> &'static Store {
    &STORE
}

/// How many result documents are handed out and not yet freed (off
/// Windows; there the caller frees them with kernel32's `LocalFree`, which
/// the emulator does not see).
#[cfg(not(windows))]
pub fn outstanding_documents() -> usize {
    allocations().len()
}

fn wide(s: &str) -> Box<[u16]> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// A result document as this library hands it out, for its caller to
/// free with `LocalFree`: from its own table off Windows, where it also
/// exports that `LocalFree`.
#[cfg(not(windows))]
fn alloc_document(s: &str) -> PWSTR {
    let mut buf = wide(s);
    let ptr = buf.as_mut_ptr();
    allocations().insert(ptr as usize, buf);
    ptr
}

/// A result document as HCS hands it out on Windows: `LocalAlloc`'d, so
/// the caller's kernel32 `LocalFree` frees it (a Rust heap buffer there
/// was freed by the wrong allocator and read back as garbage). Null when
/// the allocation fails, as no document.
#[cfg(windows)]
fn alloc_document(s: &str) -> PWSTR {
    use windows_sys::Win32::System::Memory::{LMEM_FIXED, LocalAlloc};
    let buf = wide(s);
    // SAFETY: a fixed allocation of the document's size, filled whole
    // below before it is handed out.
    unsafe {
        let p = LocalAlloc(LMEM_FIXED, std::mem::size_of_val(&*buf)).cast::<u16>();
        if !p.is_null() {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len());
        }
        p
    }
}

/// Reads a caller's NUL-terminated UTF-16 string. None: null; Some(Err): not UTF-16.
///
/// # Safety
/// `p` is null or points to a NUL-terminated sequence of u16 that stays valid for the call.
unsafe fn read_wide(p: PCWSTR) -> Option<Result<String, ()>> {
    if p.is_null() {
        return None;
    }
    let mut len = 0usize;
    // SAFETY: the caller guarantees a NUL terminator, so every index up to it is in bounds.
    while unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: `len` u16 values starting at `p` were just read.
    let units = unsafe { std::slice::from_raw_parts(p, len) };
    Some(String::from_utf16(units).map_err(|_| ()))
}

/// Writes a result document (or null) to a caller's optional out-pointer.
///
/// # Safety
/// `out` is null or valid for a write of one PWSTR.
unsafe fn write_document(out: *mut PWSTR, doc: Option<&str>) {
    if out.is_null() {
        return;
    }
    let value = doc.map_or(std::ptr::null_mut(), alloc_document);
    // SAFETY: non-null, and the caller guarantees it is writable.
    unsafe { *out = value };
}

/// Reads a required id: null or empty → E_INVALIDARG.
///
/// # Safety
/// As [`read_wide`].
unsafe fn read_id(p: PCWSTR) -> Result<String, HRESULT> {
    // SAFETY: forwarded from the caller.
    match unsafe { read_wide(p) } {
        Some(Ok(s)) if !s.is_empty() => Ok(s),
        _ => Err(E_INVALIDARG),
    }
}

/// Reads an optional document; text that is not UTF-16 becomes an operation failure.
///
/// # Safety
/// As [`read_wide`].
unsafe fn read_document(p: PCWSTR, what: &str) -> HcsResult<Option<String>> {
    // SAFETY: forwarded from the caller.
    match unsafe { read_wide(p) } {
        None => Ok(None),
        Some(Ok(s)) => Ok(Some(s)),
        Some(Err(())) => Err(HcsError::new(
            HCS_E_INVALID_JSON,
            format!("{what} is not valid UTF-16"),
        )),
    }
}

fn system_id(system: HCS_SYSTEM) -> Result<String, HRESULT> {
    tables()
        .systems
        .get(&(system as usize))
        .map(|s| s.id.clone())
        .ok_or(E_HANDLE)
}

/// A started operation, between [`begin`] and [`complete`].
struct Begun {
    op: usize,
    system: Option<usize>,
}

/// Marks `op` as used by a call on `system` (if any). Fails directly with E_HANDLE for an
/// unknown handle, HCS_E_OPERATION_ALREADY_STARTED for an operation still in use, and
/// HCS_E_OPERATION_SYSTEM_CALLBACK_ALREADY_SET for an operation with a completion callback on a
/// system whose event callback takes operation callbacks.
fn begin(
    op: HCS_OPERATION,
    system: Option<HCS_SYSTEM>,
) -> Result<(Begun, Option<String>), HRESULT> {
    let mut t = tables();
    let sys = match system {
        Some(s) => {
            let entry = t.systems.get(&(s as usize)).ok_or(E_HANDLE)?;
            Some((
                s as usize,
                entry.id.clone(),
                entry
                    .callback
                    .is_some_and(|(_, _, o)| o & HCS_EVENT_OPTION_ENABLE_OPERATION_CALLBACKS != 0),
            ))
        }
        None => None,
    };
    let entry = t.ops.get_mut(&(op as usize)).ok_or(E_HANDLE)?;
    if entry.busy {
        return Err(HCS_E_OPERATION_ALREADY_STARTED);
    }
    if entry.callback.is_some() && sys.as_ref().is_some_and(|s| s.2) {
        return Err(HCS_E_OPERATION_SYSTEM_CALLBACK_ALREADY_SET);
    }
    entry.busy = true;
    entry.result = None;
    Ok((
        Begun {
            op: op as usize,
            system: sys.as_ref().map(|s| s.0),
        },
        sys.map(|s| s.1),
    ))
}

/// Records an operation's outcome, fires SystemExited for `exited`, then the completion
/// callbacks; all callbacks are called with no lock held.
fn complete(begun: Begun, result: HcsResult<Option<String>>, exited: Option<(String, String)>) {
    let (hr, doc) = match result {
        Ok(doc) => (S_OK, doc),
        Err(e) => (e.hr, Some(e.document())),
    };
    let (completion, event) = {
        let mut t = tables();
        let completion = t.ops.get_mut(&begun.op).and_then(|entry| {
            entry.busy = false;
            entry.result = Some((hr, doc));
            entry.callback.map(|cb| (cb, entry.context))
        });
        let event = begun.system.and_then(|h| {
            let (cb, ctx, o) = t.systems.get(&h)?.callback?;
            (o & HCS_EVENT_OPTION_ENABLE_OPERATION_CALLBACKS != 0).then_some((h, cb, ctx))
        });
        if let Some((h, _, _)) = event {
            *t.in_flight.entry(h).or_default() += 1;
        }
        (completion, event)
    };
    if let Some((id, doc)) = exited {
        fire_exited(&id, &doc);
    }
    if let Some((cb, context)) = completion {
        cb(begun.op as HCS_OPERATION, context as *mut c_void);
    }
    if let Some((handle, cb, context)) = event {
        let ev = HCS_EVENT {
            Type: HCS_EVENT_OPERATION_CALLBACK,
            EventData: std::ptr::null(),
            Operation: begun.op as HCS_OPERATION,
        };
        call_event(handle, cb, context, &ev);
    }
}

/// Sends HcsEventSystemExited to every handle on `id` in this process with a callback.
fn fire_exited(id: &str, doc: &str) {
    let targets: Vec<(usize, Event, usize)> = {
        let mut t = tables();
        let targets: Vec<(usize, Event, usize)> = t
            .systems
            .iter()
            .filter(|(_, s)| s.id == id)
            .filter_map(|(h, s)| s.callback.map(|(cb, ctx, _)| (*h, cb, ctx)))
            .collect();
        for (h, _, _) in &targets {
            *t.in_flight.entry(*h).or_default() += 1;
        }
        targets
    };
    let data = wide(doc);
    for (handle, cb, context) in targets {
        let ev = HCS_EVENT {
            Type: HCS_EVENT_SYSTEM_EXITED,
            EventData: data.as_ptr(),
            Operation: std::ptr::null_mut(),
        };
        call_event(handle, cb, context, &ev);
    }
}

/// The common shape of the calls that take a system, an operation and an options document.
///
/// # Safety
/// `options` as [`read_wide`].
unsafe fn system_call(
    system: HCS_SYSTEM,
    op: HCS_OPERATION,
    options: PCWSTR,
    what: &str,
    work: impl FnOnce(&Store, &str, Option<&str>) -> HcsResult<(Option<String>, Option<String>)>,
) -> HRESULT {
    let (begun, id) = match begin(op, Some(system)) {
        Ok(b) => b,
        Err(hr) => return hr,
    };
    let id = id.unwrap_or_default();
    // SAFETY: forwarded from the caller.
    let outcome = unsafe { read_document(options, what) }
        .and_then(|text| work(store(), &id, text.as_deref()));
    match outcome {
        Ok((doc, exit)) => complete(begun, Ok(doc), exit.map(|e| (id, e))),
        Err(e) => complete(begun, Err(e), None),
    }
    S_OK
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// HcsCreateOperation (Reference/HcsCreateOperation.md).
///
/// # Safety
/// `context` is passed back to `callback` untouched.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsCreateOperation(
    context: *const c_void,
    callback: OperationCompletion,
) -> HCS_OPERATION {
    let mut t = tables();
    let h = t.new_handle();
    t.ops.insert(
        h,
        OpEntry {
            context: context as usize,
            callback,
            busy: false,
            result: None,
        },
    );
    h as HCS_OPERATION
}

/// HcsCloseOperation (Reference/HcsCloseOperation.md).
///
/// # Safety
/// Any value is accepted; unknown handles are ignored.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsCloseOperation(op: HCS_OPERATION) {
    tables().ops.remove(&(op as usize));
}

/// HcsWaitForOperationResult (Reference/HcsWaitForOperationResult.md).
///
/// # Safety
/// `result_document` is null or valid for a write of one PWSTR.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsWaitForOperationResult(
    op: HCS_OPERATION,
    timeout_ms: DWORD,
    result_document: *mut PWSTR,
) -> HRESULT {
    let deadline =
        (timeout_ms != INFINITE).then(|| Instant::now() + Duration::from_millis(timeout_ms.into()));
    loop {
        // SAFETY: forwarded from the caller.
        let hr = unsafe { HcsGetOperationResult(op, result_document) };
        if hr != HCS_E_OPERATION_PENDING {
            return hr;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return HCS_E_OPERATION_TIMEOUT;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// HcsGetOperationResult (Reference/HcsGetOperationResult.md).
///
/// # Safety
/// `result_document` is null or valid for a write of one PWSTR.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsGetOperationResult(
    op: HCS_OPERATION,
    result_document: *mut PWSTR,
) -> HRESULT {
    let (hr, doc) = {
        let t = tables();
        match t.ops.get(&(op as usize)) {
            None => (E_HANDLE, None),
            Some(e) if e.busy => (HCS_E_OPERATION_PENDING, None),
            Some(e) => match &e.result {
                None => (HCS_E_OPERATION_NOT_STARTED, None),
                Some((hr, doc)) => (*hr, doc.clone()),
            },
        }
    };
    // SAFETY: forwarded from the caller.
    unsafe { write_document(result_document, doc.as_deref()) };
    hr
}

// ---------------------------------------------------------------------------------------------
// Compute systems
// ---------------------------------------------------------------------------------------------

/// HcsCreateComputeSystem (reference/HcsCreateComputeSystem.md). `security_descriptor` is
/// reserved and must be NULL.
///
/// # Safety
/// `id` and `configuration` are null or NUL-terminated UTF-16; `compute_system` is null or
/// valid for a write of one handle.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsCreateComputeSystem(
    id: PCWSTR,
    configuration: PCWSTR,
    op: HCS_OPERATION,
    security_descriptor: *const c_void,
    compute_system: *mut HCS_SYSTEM,
) -> HRESULT {
    if compute_system.is_null() || configuration.is_null() {
        return E_POINTER;
    }
    // SAFETY: checked non-null; the caller guarantees it is writable.
    unsafe { *compute_system = std::ptr::null_mut() };
    // SAFETY: forwarded from the caller.
    let id = match unsafe { read_id(id) } {
        Ok(id) => id,
        Err(hr) => return hr,
    };
    if !security_descriptor.is_null() {
        return E_INVALIDARG;
    }
    let (begun, _) = match begin(op, None) {
        Ok(b) => b,
        Err(hr) => return hr,
    };
    // SAFETY: forwarded from the caller.
    let outcome = unsafe { read_document(configuration, "configuration") }.and_then(|c| {
        let c = c.unwrap_or_default();
        store().create(&id, &c)
    });
    let outcome = outcome.map(|()| {
        let mut t = tables();
        let h = t.new_handle();
        t.systems.insert(
            h,
            SysEntry {
                id: id.clone(),
                callback: None,
            },
        );
        // SAFETY: checked non-null above; the caller guarantees it is writable.
        unsafe { *compute_system = h as HCS_SYSTEM };
        None
    });
    complete(begun, outcome, None);
    S_OK
}

/// HcsOpenComputeSystem (reference/HcsOpenComputeSystem.md). `requested_access` must be
/// GENERIC_ALL.
///
/// # Safety
/// `id` is null or NUL-terminated UTF-16; `compute_system` is null or valid for a write of one
/// handle.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsOpenComputeSystem(
    id: PCWSTR,
    requested_access: DWORD,
    compute_system: *mut HCS_SYSTEM,
) -> HRESULT {
    if compute_system.is_null() {
        return E_POINTER;
    }
    // SAFETY: checked non-null; the caller guarantees it is writable.
    unsafe { *compute_system = std::ptr::null_mut() };
    // SAFETY: forwarded from the caller.
    let id = match unsafe { read_id(id) } {
        Ok(id) => id,
        Err(hr) => return hr,
    };
    if requested_access != GENERIC_ALL {
        return E_INVALIDARG;
    }
    if let Err(e) = store().open(&id) {
        return e.hr;
    }
    let mut t = tables();
    let h = t.new_handle();
    t.systems.insert(h, SysEntry { id, callback: None });
    // SAFETY: checked non-null above; the caller guarantees it is writable.
    unsafe { *compute_system = h as HCS_SYSTEM };
    S_OK
}

/// HcsCloseComputeSystem (Reference/HcsCloseComputeSystem.md).
///
/// # Safety
/// Any value is accepted; unknown handles are ignored.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsCloseComputeSystem(system: HCS_SYSTEM) {
    let handle = system as usize;
    let entry = {
        let mut t = tables();
        let entry = t.systems.remove(&handle);
        // No callback on this handle runs after the close returns (one
        // closing its own handle from inside its callback is not waited for).
        let inside = IN_CALLBACK.with(|h| h.borrow().contains(&handle));
        while !inside && t.in_flight.get(&handle).is_some_and(|n| *n > 0) {
            t = CALLBACK_RETURNED
                .wait(t)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        entry
    };
    if let Some(entry) = entry {
        // A ShouldTerminateOnLastHandleClosed exit has no handle left here to be told.
        let _ = store().close(&entry.id);
    }
}

/// HcsStartComputeSystem (Reference/HcsStartComputeSystem.md).
///
/// # Safety
/// `options` is null or NUL-terminated UTF-16.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsStartComputeSystem(
    system: HCS_SYSTEM,
    op: HCS_OPERATION,
    options: PCWSTR,
) -> HRESULT {
    // SAFETY: forwarded from the caller.
    unsafe {
        system_call(system, op, options, "options", |s, id, o| {
            s.start(id, o).map(|()| (None, None))
        })
    }
}

/// HcsShutDownComputeSystem (Reference/HcsShutDownComputeSystem.md).
///
/// # Safety
/// `options` is null or NUL-terminated UTF-16.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsShutDownComputeSystem(
    system: HCS_SYSTEM,
    op: HCS_OPERATION,
    options: PCWSTR,
) -> HRESULT {
    // SAFETY: forwarded from the caller.
    unsafe {
        system_call(system, op, options, "options", |s, id, o| {
            s.shutdown(id, o).map(|e| (None, e))
        })
    }
}

/// HcsTerminateComputeSystem (Reference/HcsTerminateComputeSystem.md).
///
/// # Safety
/// `options` is null or NUL-terminated UTF-16.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsTerminateComputeSystem(
    system: HCS_SYSTEM,
    op: HCS_OPERATION,
    options: PCWSTR,
) -> HRESULT {
    // SAFETY: forwarded from the caller.
    unsafe {
        system_call(system, op, options, "options", |s, id, o| {
            s.terminate(id, o).map(|e| (None, e))
        })
    }
}

/// HcsPauseComputeSystem (Reference/HcsPauseComputeSystem.md).
///
/// # Safety
/// `options` is null or NUL-terminated UTF-16.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsPauseComputeSystem(
    system: HCS_SYSTEM,
    op: HCS_OPERATION,
    options: PCWSTR,
) -> HRESULT {
    // SAFETY: forwarded from the caller.
    unsafe {
        system_call(system, op, options, "options", |s, id, o| {
            s.pause(id, o).map(|()| (None, None))
        })
    }
}

/// HcsResumeComputeSystem (Reference/HcsResumeComputeSystem.md).
///
/// # Safety
/// `options` is null or NUL-terminated UTF-16.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsResumeComputeSystem(
    system: HCS_SYSTEM,
    op: HCS_OPERATION,
    options: PCWSTR,
) -> HRESULT {
    // SAFETY: forwarded from the caller.
    unsafe {
        system_call(system, op, options, "options", |s, id, o| {
            s.resume(id, o).map(|()| (None, None))
        })
    }
}

/// HcsSaveComputeSystem (Reference/HcsSaveComputeSystem.md).
///
/// # Safety
/// `options` is null or NUL-terminated UTF-16.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsSaveComputeSystem(
    system: HCS_SYSTEM,
    op: HCS_OPERATION,
    options: PCWSTR,
) -> HRESULT {
    // SAFETY: forwarded from the caller.
    unsafe {
        system_call(system, op, options, "options", |s, id, o| {
            s.save(id, o).map(|()| (None, None))
        })
    }
}

/// HcsGetComputeSystemProperties (Reference/HcsGetComputeSystemProperties.md).
///
/// # Safety
/// `property_query` is null or NUL-terminated UTF-16.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsGetComputeSystemProperties(
    system: HCS_SYSTEM,
    op: HCS_OPERATION,
    property_query: PCWSTR,
) -> HRESULT {
    // SAFETY: forwarded from the caller.
    unsafe {
        system_call(system, op, property_query, "propertyQuery", |s, id, q| {
            s.properties(id, q).map(|doc| (Some(doc), None))
        })
    }
}

/// HcsModifyComputeSystem (Reference/HcsModifyComputeSystem.md). `identity` is accepted and
/// not used.
///
/// # Safety
/// `configuration` is null or NUL-terminated UTF-16.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsModifyComputeSystem(
    system: HCS_SYSTEM,
    op: HCS_OPERATION,
    configuration: PCWSTR,
    identity: HANDLE,
) -> HRESULT {
    let _ = identity;
    if let Err(hr) = system_id(system) {
        return hr;
    }
    if configuration.is_null() {
        return E_POINTER;
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        system_call(system, op, configuration, "configuration", |s, id, c| {
            s.modify(id, c.unwrap_or_default()).map(|()| (None, None))
        })
    }
}

/// HcsSetComputeSystemCallback (Reference/HcsSetComputeSystemCallback.md).
///
/// # Safety
/// `context` is passed back to `callback` untouched.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsSetComputeSystemCallback(
    system: HCS_SYSTEM,
    callback_options: DWORD,
    context: *const c_void,
    callback: EventCallback,
) -> HRESULT {
    let mut t = tables();
    let Some(entry) = t.systems.get_mut(&(system as usize)) else {
        return E_HANDLE;
    };
    let Some(callback) = callback else {
        return E_POINTER;
    };
    if callback_options != HCS_EVENT_OPTION_NONE
        && callback_options != HCS_EVENT_OPTION_ENABLE_OPERATION_CALLBACKS
    {
        return E_INVALIDARG;
    }
    if entry.callback.is_some() {
        return HCS_E_OPERATION_SYSTEM_CALLBACK_ALREADY_SET;
    }
    entry.callback = Some((callback, context as usize, callback_options));
    S_OK
}

/// HcsWaitForComputeSystemExit (Reference/HcsWaitForComputeSystemExit.md).
///
/// # Safety
/// `result` is null or valid for a write of one PWSTR.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsWaitForComputeSystemExit(
    system: HCS_SYSTEM,
    timeout_ms: DWORD,
    result: *mut PWSTR,
) -> HRESULT {
    let id = match system_id(system) {
        Ok(id) => id,
        Err(hr) => return hr,
    };
    let timeout = (timeout_ms != INFINITE).then(|| Duration::from_millis(timeout_ms.into()));
    let (hr, doc) = match store().wait_exit(&id, timeout) {
        Ok(doc) => (S_OK, Some(doc)),
        Err(e) => (e.hr, None),
    };
    // SAFETY: forwarded from the caller.
    unsafe { write_document(result, doc.as_deref()) };
    hr
}

/// HcsEnumerateComputeSystems (Reference/HcsEnumerateComputeSystems.md).
///
/// # Safety
/// `query` is null or NUL-terminated UTF-16.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn HcsEnumerateComputeSystems(
    query: PCWSTR,
    op: HCS_OPERATION,
) -> HRESULT {
    let (begun, _) = match begin(op, None) {
        Ok(b) => b,
        Err(hr) => return hr,
    };
    // SAFETY: forwarded from the caller.
    let outcome = unsafe { read_document(query, "query") }
        .and_then(|q| store().enumerate(q.as_deref()))
        .map(Some);
    complete(begun, outcome, None);
    S_OK
}

/// LocalFree for the result documents this library returned. Returns null; a pointer this
/// library did not hand out is left alone and returned (LocalFree's failure return).
/// Off Windows only: there kernel32's frees what `LocalAlloc` gave.
///
/// # Safety
/// `mem` is null or a pointer returned by this library and not yet freed.
#[cfg(not(windows))]
#[unsafe(no_mangle)]
pub unsafe extern "system" fn LocalFree(mem: *mut c_void) -> *mut c_void {
    if mem.is_null() {
        return std::ptr::null_mut();
    }
    match allocations().remove(&(mem as usize)) {
        Some(_) => std::ptr::null_mut(),
        None => mem,
    }
}
