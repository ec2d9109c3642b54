//! The Host Compute Service's C API (computecore.dll), loaded at run time
//! so that the same code builds and is tested on every OS: on Windows the
//! real library, elsewhere the emulator (`hcs-emulator/`), by path.
//!
//! [`ComputeService`] is the API as the virtstack uses it: one call per HCS
//! call, documents in and out as JSON text, each call opening the system
//! and closing it again (uvmctl's systems do not end with their last
//! handle). [`Computecore`] implements it over the library: UTF-16 in and
//! out, every handle closed on drop, every wait with a deadline, HRESULTs
//! and result documents turned into [`HcsError`].

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// An HRESULT.
pub type Hresult = i32;

/// HRESULTs uvmctl tells apart (Microsoft's `HCSHResult.md`; the others are
/// winerror.h's).
pub mod hr {
    use super::Hresult;
    /// Success.
    pub const S_OK: Hresult = 0;
    /// An unspecified failure (uvmctl's own, before or after HCS answered).
    pub const E_FAIL: Hresult = 0x8000_4005_u32 as i32;
    /// HRESULT_FROM_WIN32(ERROR_TIMEOUT): a wait that timed out, as Win32
    /// waits say it.
    pub const ERROR_TIMEOUT: Hresult = 0x8007_05B4_u32 as i32;
    /// An invalid argument.
    pub const E_INVALIDARG: Hresult = 0x8007_0057_u32 as i32;
    /// Not implemented.
    pub const E_NOTIMPL: Hresult = 0x8000_4001_u32 as i32;
    /// HRESULT_FROM_WIN32(ERROR_NOT_FOUND).
    pub const NOT_FOUND: Hresult = 0x8007_0490_u32 as i32;
    /// The operation is not valid in the system's state.
    pub const HCS_E_INVALID_STATE: Hresult = 0x8037_0105_u32 as i32;
    /// The JSON document is invalid.
    pub const HCS_E_INVALID_JSON: Hresult = 0x8037_010D_u32 as i32;
    /// No system with that id.
    pub const HCS_E_SYSTEM_NOT_FOUND: Hresult = 0x8037_010E_u32 as i32;
    /// A system with that id exists.
    pub const HCS_E_SYSTEM_ALREADY_EXISTS: Hresult = 0x8037_010F_u32 as i32;
    /// The system does not run.
    pub const HCS_E_SYSTEM_ALREADY_STOPPED: Hresult = 0x8037_0110_u32 as i32;
    /// The operation did not complete in time.
    pub const HCS_E_OPERATION_TIMEOUT: Hresult = 0x8037_0118_u32 as i32;
    /// Only administrators (or Hyper-V Administrators) may.
    pub const HCS_E_ACCESS_DENIED: Hresult = 0x8037_011B_u32 as i32;
}

/// What an HCS call answered, when it was not success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call}({id}): HRESULT {:#010x}{}", *hresult as u32, message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
pub struct HcsError {
    /// The call (`HcsModifyComputeSystem`).
    pub call: &'static str,
    /// The compute system.
    pub id: String,
    /// What it returned.
    pub hresult: Hresult,
    /// The result document's `ErrorMessage`, or what went wrong on our side.
    pub message: Option<String>,
}

impl HcsError {
    /// A failure on uvmctl's side of the call (E_FAIL, said as uvmctl's).
    fn ours(call: &'static str, id: &str, message: impl Into<String>) -> Self {
        HcsError {
            call,
            id: id.to_string(),
            hresult: hr::E_FAIL,
            message: Some(format!("uvmctl: {}", message.into())),
        }
    }
}

/// A lifecycle call on one compute system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// `HcsStartComputeSystem`.
    Start,
    /// `HcsShutDownComputeSystem`.
    ShutDown,
    /// `HcsTerminateComputeSystem`.
    Terminate,
    /// `HcsPauseComputeSystem`.
    Pause,
    /// `HcsResumeComputeSystem`.
    Resume,
    /// `HcsSaveComputeSystem` (options: a SaveOptions document).
    Save,
}

impl Verb {
    /// The C function.
    pub fn call(self) -> &'static str {
        match self {
            Verb::Start => "HcsStartComputeSystem",
            Verb::ShutDown => "HcsShutDownComputeSystem",
            Verb::Terminate => "HcsTerminateComputeSystem",
            Verb::Pause => "HcsPauseComputeSystem",
            Verb::Resume => "HcsResumeComputeSystem",
            Verb::Save => "HcsSaveComputeSystem",
        }
    }
}

/// The HCS calls the hcs virtstack makes, one method per call. Blocking:
/// the virtstack calls them off the async runtime, one VM's hang its own.
pub trait ComputeService: Send + Sync {
    /// `HcsCreateComputeSystem` with a ComputeSystem document.
    fn create(&self, id: &str, document: &str) -> Result<(), HcsError>;
    /// A lifecycle call; `options` is the call's document, if it takes one.
    fn lifecycle(&self, id: &str, verb: Verb, options: Option<&str>) -> Result<(), HcsError>;
    /// `HcsModifyComputeSystem` with a ModifySettingRequest.
    fn modify(&self, id: &str, request: &str) -> Result<(), HcsError>;
    /// `HcsGetComputeSystemProperties`: the Properties document.
    fn properties(&self, id: &str, query: &str) -> Result<String, HcsError>;
    /// `HcsWaitForComputeSystemExit`: whether the system exited within `timeout`.
    fn wait_exit(&self, id: &str, timeout: Duration) -> Result<bool, HcsError>;
}

type Handle = *mut c_void;
type OperationCompletion = unsafe extern "system" fn(Handle, *mut c_void);

/// The computecore.dll entry points uvmctl calls.
struct Fns {
    create_operation:
        unsafe extern "system" fn(*const c_void, Option<OperationCompletion>) -> Handle,
    close_operation: unsafe extern "system" fn(Handle),
    wait_for_operation_result: unsafe extern "system" fn(Handle, u32, *mut *mut u16) -> Hresult,
    create_compute_system: unsafe extern "system" fn(
        *const u16,
        *const u16,
        Handle,
        *const c_void,
        *mut Handle,
    ) -> Hresult,
    open_compute_system: unsafe extern "system" fn(*const u16, u32, *mut Handle) -> Hresult,
    close_compute_system: unsafe extern "system" fn(Handle),
    start: unsafe extern "system" fn(Handle, Handle, *const u16) -> Hresult,
    shut_down: unsafe extern "system" fn(Handle, Handle, *const u16) -> Hresult,
    terminate: unsafe extern "system" fn(Handle, Handle, *const u16) -> Hresult,
    pause: unsafe extern "system" fn(Handle, Handle, *const u16) -> Hresult,
    resume: unsafe extern "system" fn(Handle, Handle, *const u16) -> Hresult,
    save: unsafe extern "system" fn(Handle, Handle, *const u16) -> Hresult,
    get_properties: unsafe extern "system" fn(Handle, Handle, *const u16) -> Hresult,
    modify: unsafe extern "system" fn(Handle, Handle, *const u16, Handle) -> Hresult,
    /// Windows 10 2104 / Server 2022 and later; before, exits are polled.
    wait_for_exit: Option<unsafe extern "system" fn(Handle, u32, *mut *mut u16) -> Hresult>,
    local_free: unsafe extern "system" fn(*mut c_void) -> *mut c_void,
}

/// `HcsOpenComputeSystem`'s access: must be GENERIC_ALL.
const GENERIC_ALL: u32 = 0x1000_0000;

/// A result document is read up to this many UTF-16 units.
const MAX_RESULT_UNITS: usize = 16 << 20;

/// Why the library could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// It could not be loaded.
    #[error(
        "cannot load the HCS library {}: {reason}. The hcs virtstack drives Windows' Host \
Compute Service through computecore.dll (Windows 10 1809 / Server 2019 or later, with \
Hyper-V); elsewhere give --hcs-library the HCS emulator built from hcs-emulator/ (docs/hcs.md)",
        path.display()
    )]
    Load {
        /// The library.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// It lacks an entry point.
    #[error("the HCS library {} has no {symbol}: {reason}", path.display())]
    Symbol {
        /// The library.
        path: PathBuf,
        /// The missing function.
        symbol: &'static str,
        /// What the loader said.
        reason: String,
    },
}

/// computecore.dll (or the emulator), loaded.
pub struct Computecore {
    fns: Fns,
    path: PathBuf,
    /// How long any one operation may take.
    timeout: Duration,
    // Last: the entry points above are valid only while these are loaded.
    _lib: libloading::Library,
    _free_lib: Option<libloading::Library>,
}

fn load(path: &Path) -> Result<libloading::Library, LoadError> {
    let err = |e: libloading::Error| LoadError::Load {
        path: path.to_path_buf(),
        reason: reason(&e),
    };
    // A bare name is looked up in the system directory only, never in the
    // program's or the working directory, where a planted DLL would run
    // as the administrator uvmctl runs as.
    #[cfg(windows)]
    if path.components().count() == 1 {
        use libloading::os::windows::{LOAD_LIBRARY_SEARCH_SYSTEM32, Library};
        // SAFETY: loading runs the library's initialisers: Windows' own
        // DLL from the system directory.
        return unsafe { Library::load_with_flags(path, LOAD_LIBRARY_SEARCH_SYSTEM32) }
            .map(Into::into)
            .map_err(err);
    }
    // SAFETY: loading runs the library's initialisers: computecore.dll's
    // or the emulator's, which the operator named on purpose.
    unsafe { libloading::Library::new(path) }.map_err(err)
}

/// The loader's error with what the OS said (dlerror, GetLastError).
fn reason(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

impl Computecore {
    /// Loads the library at `path` (a bare name is looked up as the OS
    /// looks up libraries); operations may take up to `timeout` each.
    ///
    /// # Errors
    /// When it cannot be loaded or lacks an entry point.
    pub fn load(path: &Path, timeout: Duration) -> Result<Self, LoadError> {
        let lib = load(path)?;
        // Result documents are LocalFree'd: kernel32's on Windows; the
        // emulator exports its own.
        let free_lib = if cfg!(windows) {
            Some(load(Path::new("kernel32.dll"))?)
        } else {
            None
        };
        macro_rules! sym {
            ($lib:expr, $name:literal) => {{
                // SAFETY: the type is the function's C signature as
                // Microsoft's reference gives it (docs/hcs.md); the pointer
                // is used only while the library stays loaded (`_lib`).
                let s = unsafe { $lib.get(concat!($name, "\0").as_bytes()) };
                *s.map_err(|e| LoadError::Symbol {
                    path: path.to_path_buf(),
                    symbol: $name,
                    reason: reason(&e),
                })?
            }};
        }
        let free_from = free_lib.as_ref().unwrap_or(&lib);
        let fns = Fns {
            create_operation: sym!(lib, "HcsCreateOperation"),
            close_operation: sym!(lib, "HcsCloseOperation"),
            wait_for_operation_result: sym!(lib, "HcsWaitForOperationResult"),
            create_compute_system: sym!(lib, "HcsCreateComputeSystem"),
            open_compute_system: sym!(lib, "HcsOpenComputeSystem"),
            close_compute_system: sym!(lib, "HcsCloseComputeSystem"),
            start: sym!(lib, "HcsStartComputeSystem"),
            shut_down: sym!(lib, "HcsShutDownComputeSystem"),
            terminate: sym!(lib, "HcsTerminateComputeSystem"),
            pause: sym!(lib, "HcsPauseComputeSystem"),
            resume: sym!(lib, "HcsResumeComputeSystem"),
            save: sym!(lib, "HcsSaveComputeSystem"),
            get_properties: sym!(lib, "HcsGetComputeSystemProperties"),
            modify: sym!(lib, "HcsModifyComputeSystem"),
            // SAFETY: as `sym!`; absent on older Windows, which is no error.
            wait_for_exit: unsafe { lib.get(b"HcsWaitForComputeSystemExit\0") }
                .ok()
                .map(|s| *s),
            local_free: sym!(free_from, "LocalFree"),
        };
        Ok(Computecore {
            fns,
            path: path.to_path_buf(),
            timeout,
            _lib: lib,
            _free_lib: free_lib,
        })
    }

    /// As loaded from a Windows without HcsWaitForComputeSystemExit.
    #[cfg(test)]
    pub(crate) fn without_exit_wait(mut self) -> Self {
        self.fns.wait_for_exit = None;
        self
    }

    /// Where it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn operation(&self, call: &'static str, id: &str) -> Result<Operation<'_>, HcsError> {
        // SAFETY: no context and no callback: the result is waited for.
        let h = unsafe { (self.fns.create_operation)(std::ptr::null(), None) };
        if h.is_null() {
            return Err(HcsError::ours(
                call,
                id,
                "HcsCreateOperation returned no operation",
            ));
        }
        Ok(Operation { fns: &self.fns, h })
    }

    fn open(&self, call: &'static str, id: &str) -> Result<System<'_>, HcsError> {
        let wid = wide(call, id, id)?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: `wid` is NUL-terminated and outlives the call; `h` is written.
        let r = unsafe { (self.fns.open_compute_system)(wid.as_ptr(), GENERIC_ALL, &mut h) };
        check(call, id, r, None)?;
        if h.is_null() {
            return Err(HcsError::ours(
                call,
                id,
                "HcsOpenComputeSystem returned no handle",
            ));
        }
        Ok(System { fns: &self.fns, h })
    }

    /// Waits for `op`'s result: its document on success.
    fn result(&self, call: &'static str, id: &str, op: &Operation<'_>) -> Result<String, HcsError> {
        let mut doc: *mut u16 = std::ptr::null_mut();
        let ms = u32::try_from(self.timeout.as_millis()).unwrap_or(u32::MAX - 1);
        // SAFETY: `op.h` is a live operation; `doc` receives a string the
        // library allocated, freed below with LocalFree.
        let r = unsafe { (self.fns.wait_for_operation_result)(op.h, ms, &mut doc) };
        let text = self.take(call, id, doc)?;
        if r == hr::HCS_E_OPERATION_TIMEOUT {
            return Err(HcsError {
                call,
                id: id.to_string(),
                hresult: r,
                message: Some(format!("did not complete within {:?}", self.timeout)),
            });
        }
        check(call, id, r, text.as_deref())?;
        Ok(text.unwrap_or_default())
    }

    /// Reads and frees a result string; one without its end within the
    /// bound is refused (never read as a shorter document).
    fn take(&self, call: &'static str, id: &str, p: *mut u16) -> Result<Option<String>, HcsError> {
        if p.is_null() {
            return Ok(None);
        }
        let mut n = 0;
        // SAFETY: the library returns a NUL-terminated UTF-16 string; it
        // is read up to a bound, then freed once.
        let text = unsafe {
            while n < MAX_RESULT_UNITS && *p.add(n) != 0 {
                n += 1;
            }
            let s = (n < MAX_RESULT_UNITS)
                .then(|| String::from_utf16_lossy(std::slice::from_raw_parts(p, n)));
            (self.fns.local_free)(p.cast());
            s
        };
        text.map(Some).ok_or_else(|| {
            HcsError::ours(
                call,
                id,
                format!("a result document longer than {MAX_RESULT_UNITS} characters"),
            )
        })
    }

    fn system_call(
        &self,
        call: &'static str,
        id: &str,
        f: impl FnOnce(Handle, Handle) -> Hresult,
    ) -> Result<String, HcsError> {
        let system = self.open(call, id)?;
        let op = self.operation(call, id)?;
        check(call, id, f(system.h, op.h), None)?;
        self.result(call, id, &op)
    }
}

impl ComputeService for Computecore {
    fn create(&self, id: &str, document: &str) -> Result<(), HcsError> {
        const CALL: &str = "HcsCreateComputeSystem";
        let wid = wide(CALL, id, id)?;
        let wdoc = wide(CALL, id, document)?;
        let op = self.operation(CALL, id)?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: both strings are NUL-terminated and outlive the call; the
        // security descriptor is reserved (null); `h` is written.
        let r = unsafe {
            (self.fns.create_compute_system)(
                wid.as_ptr(),
                wdoc.as_ptr(),
                op.h,
                std::ptr::null(),
                &mut h,
            )
        };
        // Closed whatever the result: the system does not end with it.
        let _system = (!h.is_null()).then_some(System { fns: &self.fns, h });
        check(CALL, id, r, None)?;
        self.result(CALL, id, &op).map(drop)
    }

    fn lifecycle(&self, id: &str, verb: Verb, options: Option<&str>) -> Result<(), HcsError> {
        let call = verb.call();
        let wopt = options.map(|o| wide(call, id, o)).transpose()?;
        let f = match verb {
            Verb::Start => self.fns.start,
            Verb::ShutDown => self.fns.shut_down,
            Verb::Terminate => self.fns.terminate,
            Verb::Pause => self.fns.pause,
            Verb::Resume => self.fns.resume,
            Verb::Save => self.fns.save,
        };
        let p = wopt.as_ref().map_or(std::ptr::null(), |w| w.as_ptr());
        // SAFETY: live handles from `system_call`; `p` is null (options are
        // reserved for most calls) or a NUL-terminated string outliving it.
        self.system_call(call, id, |s, op| unsafe { f(s, op, p) })
            .map(drop)
    }

    fn modify(&self, id: &str, request: &str) -> Result<(), HcsError> {
        const CALL: &str = "HcsModifyComputeSystem";
        let w = wide(CALL, id, request)?;
        // SAFETY: live handles; `w` is NUL-terminated and outlives the
        // call; no identity token.
        self.system_call(CALL, id, |s, op| unsafe {
            (self.fns.modify)(s, op, w.as_ptr(), std::ptr::null_mut())
        })
        .map(drop)
    }

    fn properties(&self, id: &str, query: &str) -> Result<String, HcsError> {
        const CALL: &str = "HcsGetComputeSystemProperties";
        let w = wide(CALL, id, query)?;
        // SAFETY: live handles; `w` is NUL-terminated and outlives the call.
        self.system_call(CALL, id, |s, op| unsafe {
            (self.fns.get_properties)(s, op, w.as_ptr())
        })
    }

    fn wait_exit(&self, id: &str, timeout: Duration) -> Result<bool, HcsError> {
        const CALL: &str = "HcsWaitForComputeSystemExit";
        let Some(wait_for_exit) = self.fns.wait_for_exit else {
            return self.poll_exit(id, timeout);
        };
        let system = self.open(CALL, id)?;
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX - 1);
        let mut doc: *mut u16 = std::ptr::null_mut();
        // SAFETY: a live system handle; `doc` receives a library string.
        let r = unsafe { wait_for_exit(system.h, ms, &mut doc) };
        let text = self.take(CALL, id, doc)?;
        // Its reference names no codes: both ways a wait says "timed out".
        if r == hr::HCS_E_OPERATION_TIMEOUT || r == hr::ERROR_TIMEOUT {
            return Ok(false);
        }
        check(CALL, id, r, text.as_deref())?;
        Ok(true)
    }
}

impl Computecore {
    /// Where HcsWaitForComputeSystemExit is missing (before Windows 10
    /// 2104): the system's state, every 100 ms until `timeout`.
    fn poll_exit(&self, id: &str, timeout: Duration) -> Result<bool, HcsError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.properties(id, "{}") {
                Ok(doc) => {
                    let state = serde_json::from_str::<serde_json::Value>(&doc)
                        .ok()
                        .and_then(|v| Some(v.get("State")?.as_str()?.to_string()));
                    if state.as_deref() == Some("Stopped") {
                        return Ok(true);
                    }
                }
                Err(e) if e.hresult == hr::HCS_E_SYSTEM_NOT_FOUND => return Ok(true),
                Err(e) => return Err(e),
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An operation handle, closed on drop.
struct Operation<'a> {
    fns: &'a Fns,
    h: Handle,
}

impl Drop for Operation<'_> {
    fn drop(&mut self) {
        // SAFETY: made by HcsCreateOperation, closed once.
        unsafe { (self.fns.close_operation)(self.h) }
    }
}

/// A compute system handle, closed on drop.
struct System<'a> {
    fns: &'a Fns,
    h: Handle,
}

impl Drop for System<'_> {
    fn drop(&mut self) {
        // SAFETY: opened or created by the library, closed once.
        unsafe { (self.fns.close_compute_system)(self.h) }
    }
}

/// `s` as a NUL-terminated UTF-16 string; one with a NUL inside would be
/// cut short there, so it is refused.
fn wide(call: &'static str, id: &str, s: &str) -> Result<Vec<u16>, HcsError> {
    if s.contains('\0') {
        return Err(HcsError::ours(call, id, "a string holds a NUL character"));
    }
    Ok(s.encode_utf16().chain(std::iter::once(0)).collect())
}

/// `r` as a result: a failure with the result document's `ErrorMessage`
/// (a `ResultError`), or the document itself when it is not one.
fn check(call: &'static str, id: &str, r: Hresult, doc: Option<&str>) -> Result<(), HcsError> {
    if r >= 0 {
        return Ok(());
    }
    let message = doc.filter(|d| !d.trim().is_empty()).map(|d| {
        serde_json::from_str::<serde_json::Value>(d)
            .ok()
            .and_then(|v| v.get("ErrorMessage")?.as_str().map(str::to_string))
            .unwrap_or_else(|| d.chars().take(2000).collect())
    });
    Err(HcsError {
        call,
        id: id.to_string(),
        hresult: r,
        message,
    })
}
