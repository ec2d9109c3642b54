//! The Windows rules (see the module above): the unix ones in Windows'
//! terms. Handles are opened with `FILE_FLAG_OPEN_REPARSE_POINT`, so a
//! symbolic link or junction is opened itself, seen, and refused; trust is
//! read off the handle's security descriptor (owner and DACL) and judged
//! by [`super::acl`].

use super::acl::{self, Ace, AceKind};
use super::{Stamp, TrustError, temp_name};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::windows::ffi::{OsStrExt, OsStringExt};
use std::os::windows::fs::OpenOptionsExt;
use std::os::windows::io::AsRawHandle;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, LocalFree};
use windows_sys::Win32::Security::Authorization::{
    ConvertSidToStringSidW, ConvertStringSecurityDescriptorToSecurityDescriptorW, GetSecurityInfo,
    SDDL_REVISION_1, SE_FILE_OBJECT, SetSecurityInfo,
};
use windows_sys::Win32::Security::{
    ACCESS_ALLOWED_ACE, ACE_HEADER, ACL, DACL_SECURITY_INFORMATION, GetAce,
    GetSecurityDescriptorDacl, GetSecurityDescriptorOwner, GetTokenInformation, INHERIT_ONLY_ACE,
    LookupAccountSidW, OWNER_SECURITY_INFORMATION, PROTECTED_DACL_SECURITY_INFORMATION,
    PSECURITY_DESCRIPTOR, PSID, SECURITY_ATTRIBUTES, SID_NAME_USE, TOKEN_QUERY, TOKEN_USER,
    TokenUser,
};
use windows_sys::Win32::Storage::FileSystem::{
    BY_HANDLE_FILE_INFORMATION, CreateDirectoryW, FILE_ATTRIBUTE_DIRECTORY,
    FILE_ATTRIBUTE_REPARSE_POINT, FILE_ATTRIBUTE_TAG_INFO, FILE_BASIC_INFO,
    FILE_FLAG_BACKUP_SEMANTICS, FILE_FLAG_OPEN_REPARSE_POINT, FILE_INFO_BY_HANDLE_CLASS,
    FILE_READ_ATTRIBUTES, FileAttributeTagInfo, FileBasicInfo, GetFileInformationByHandle,
    GetFileInformationByHandleEx, READ_CONTROL, WRITE_DAC,
};
use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

/// `ACCESS_ALLOWED_ACE_TYPE` and `ACCESS_DENIED_ACE_TYPE`.
const ALLOWED: u8 = 0;
const DENIED: u8 = 1;

/// A security descriptor `LocalFree`d when dropped.
struct Descriptor(PSECURITY_DESCRIPTOR);

impl Drop for Descriptor {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: allocated by the system for the caller to free so.
            unsafe { LocalFree(self.0) };
        }
    }
}

/// A security descriptor's owner and DACL, in [`acl`]'s terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// The owner's SID string.
    pub owner_sid: String,
    /// The owner, for people.
    pub owner: String,
    /// The DACL's entries; `None` for a null DACL.
    pub dacl: Option<Vec<Ace>>,
}

impl Security {
    /// Reads `sd`.
    ///
    /// # Safety
    /// `sd` is a valid security descriptor.
    unsafe fn read(sd: PSECURITY_DESCRIPTOR) -> io::Result<Self> {
        let mut owner: PSID = std::ptr::null_mut();
        let mut defaulted = 0;
        // SAFETY: out-pointers to locals; `sd` valid per the contract.
        if unsafe { GetSecurityDescriptorOwner(sd, &mut owner, &mut defaulted) } == 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut present, mut dacl): (i32, *mut ACL) = (0, std::ptr::null_mut());
        // SAFETY: as above.
        if unsafe { GetSecurityDescriptorDacl(sd, &mut present, &mut dacl, &mut defaulted) } == 0 {
            return Err(io::Error::last_os_error());
        }
        let owner_sid = if owner.is_null() {
            String::new()
        } else {
            sid_string(owner)?
        };
        let dacl = if present == 0 || dacl.is_null() {
            None
        } else {
            // SAFETY: a DACL the descriptor holds.
            Some(unsafe { entries(dacl) }?)
        };
        Ok(Security {
            owner: if owner.is_null() {
                "nobody".into()
            } else {
                who(owner, &owner_sid)
            },
            owner_sid,
            dacl,
        })
    }

    /// The security of the object `handle` is open on (it needs
    /// `READ_CONTROL`).
    pub fn of(handle: &File) -> io::Result<Self> {
        let (mut owner, mut dacl, mut sd): (PSID, *mut ACL, PSECURITY_DESCRIPTOR) = (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        // SAFETY: a live handle; out-pointers to locals; the descriptor is
        // freed by `Descriptor`.
        let err = unsafe {
            GetSecurityInfo(
                handle.as_raw_handle() as HANDLE,
                SE_FILE_OBJECT,
                OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
                &mut owner,
                std::ptr::null_mut(),
                &mut dacl,
                std::ptr::null_mut(),
                &mut sd,
            )
        };
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err as i32));
        }
        let sd = Descriptor(sd);
        // SAFETY: the descriptor the system just returned.
        unsafe { Self::read(sd.0) }
    }

    /// The security an SDDL string describes (a test's descriptor, or the
    /// one uvmctl gives its directories).
    pub fn from_sddl(sddl: &str) -> io::Result<Self> {
        let sd = sddl_descriptor(sddl)?;
        // SAFETY: the descriptor the system just built.
        unsafe { Self::read(sd.0) }
    }

    /// [`acl::judge`] of this descriptor.
    ///
    /// # Errors
    /// What is wrong.
    pub fn judge(&self, last: bool) -> Result<(), String> {
        acl::judge(&self.owner_sid, self.dacl.as_deref(), me(), last)
    }
}

/// The entries of `dacl`.
///
/// # Safety
/// `dacl` is a valid ACL.
unsafe fn entries(dacl: *mut ACL) -> io::Result<Vec<Ace>> {
    // SAFETY: a valid ACL per the contract.
    let count = unsafe { (*dacl).AceCount };
    let mut out = Vec::with_capacity(usize::from(count));
    for i in 0..u32::from(count) {
        let mut ace: *mut core::ffi::c_void = std::ptr::null_mut();
        // SAFETY: an index below the ACL's count.
        if unsafe { GetAce(dacl, i, &mut ace) } == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: every ACE starts with its header.
        let header = unsafe { *(ace as *const ACE_HEADER) };
        let kind = match header.AceType {
            ALLOWED => AceKind::Allow,
            DENIED => AceKind::Deny,
            n => AceKind::Other(n),
        };
        let (mask, sid) = if matches!(kind, AceKind::Allow | AceKind::Deny) {
            // Allowed and denied entries share ACCESS_ALLOWED_ACE's layout.
            let a = ace as *const ACCESS_ALLOWED_ACE;
            // SAFETY: as the type says; the SID starts at SidStart.
            let (mask, psid) = unsafe { ((*a).Mask, &raw const (*a).SidStart as PSID) };
            let sid = sid_string(psid)?;
            (mask, sid)
        } else {
            (0, String::new())
        };
        out.push(Ace {
            kind,
            inherit_only: u32::from(header.AceFlags) & INHERIT_ONLY_ACE != 0,
            mask,
            who: if sid.is_empty() {
                format!("an entry of type {}", header.AceType)
            } else {
                // SAFETY: as above.
                let psid = unsafe { &raw const (*(ace as *const ACCESS_ALLOWED_ACE)).SidStart };
                who(psid as PSID, &sid)
            },
            sid,
        });
    }
    Ok(out)
}

/// A descriptor built from SDDL.
fn sddl_descriptor(sddl: &str) -> io::Result<Descriptor> {
    let wide: Vec<u16> = OsStr::new(sddl).encode_wide().chain([0]).collect();
    let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
    // SAFETY: a NUL-terminated string; the descriptor is freed by `Descriptor`.
    let ok = unsafe {
        ConvertStringSecurityDescriptorToSecurityDescriptorW(
            wide.as_ptr(),
            SDDL_REVISION_1,
            &mut sd,
            std::ptr::null_mut(),
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Descriptor(sd))
}

/// `S-1-5-32-544` for a SID.
fn sid_string(sid: PSID) -> io::Result<String> {
    let mut text: *mut u16 = std::ptr::null_mut();
    // SAFETY: a valid SID; the string is freed below.
    if unsafe { ConvertSidToStringSidW(sid, &mut text) } == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a NUL-terminated string the system allocated.
    let out = unsafe { wide_string(text) };
    // SAFETY: allocated by the system for the caller to free so.
    unsafe { LocalFree(text.cast()) };
    Ok(out)
}

/// A NUL-terminated UTF-16 string.
///
/// # Safety
/// `p` points at one.
unsafe fn wide_string(p: *const u16) -> String {
    let mut len = 0;
    // SAFETY: NUL-terminated per the contract.
    while unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: `len` units were just read.
    let units = unsafe { std::slice::from_raw_parts(p, len) };
    std::ffi::OsString::from_wide(units)
        .to_string_lossy()
        .into_owned()
}

/// `BUILTIN\Users (S-1-5-32-545)`, or the SID alone when it names no
/// account here.
fn who(sid: PSID, text: &str) -> String {
    let (mut name, mut domain) = ([0u16; 256], [0u16; 256]);
    let (mut name_len, mut domain_len) = (name.len() as u32, domain.len() as u32);
    let mut kind: SID_NAME_USE = 0;
    // SAFETY: buffers with their lengths; a valid SID.
    let ok = unsafe {
        LookupAccountSidW(
            std::ptr::null(),
            sid,
            name.as_mut_ptr(),
            &mut name_len,
            domain.as_mut_ptr(),
            &mut domain_len,
            &mut kind,
        )
    };
    if ok == 0 {
        return text.to_string();
    }
    let name = String::from_utf16_lossy(&name[..name_len as usize]);
    let domain = String::from_utf16_lossy(&domain[..domain_len as usize]);
    if domain.is_empty() {
        format!("{name} ({text})")
    } else {
        format!("{domain}\\{name} ({text})")
    }
}

/// The SID of the user uvmctl runs as, once: trusted as unix trusts
/// uvmctl's own user. (Run elevated, that user's unelevated processes
/// share the SID: docs/security.md, "What remains".)
fn me() -> Option<&'static str> {
    static ME: OnceLock<Option<String>> = OnceLock::new();
    ME.get_or_init(|| {
        let mut token: HANDLE = std::ptr::null_mut();
        // SAFETY: the process's own pseudo-handle; the token is closed below.
        if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) } == 0 {
            return None;
        }
        let mut buf = vec![0u64; 64];
        let mut len = 0u32;
        // SAFETY: a buffer of its stated size, aligned for TOKEN_USER.
        let ok = unsafe {
            GetTokenInformation(
                token,
                TokenUser,
                buf.as_mut_ptr().cast(),
                (buf.len() * 8) as u32,
                &mut len,
            )
        };
        // SAFETY: the token opened above.
        unsafe { CloseHandle(token) };
        if ok == 0 {
            return None;
        }
        // SAFETY: filled as a TOKEN_USER by the call above.
        let user = unsafe { &*(buf.as_ptr() as *const TOKEN_USER) };
        sid_string(user.User.Sid).ok()
    })
    .as_deref()
}

/// A path as people write it: without the `\\?\` that a canonical
/// path has, with one kind of separator (a spec may write `/`).
fn shown(path: &Path) -> String {
    let text = path.display().to_string().replace('/', "\\");
    match text.strip_prefix(r"\\?\") {
        Some(rest) if rest.starts_with("UNC\\") => format!(r"\\{}", &rest[4..]),
        Some(rest) => rest.to_string(),
        None => text,
    }
}

fn untrusted(path: &Path, security: Option<&Security>, why: String) -> TrustError {
    TrustError::UntrustedAcl {
        path: shown(path),
        owner: security.map_or_else(|| "(not read)".into(), |s| s.owner.clone()),
        why,
    }
}

fn unreadable(path: &Path, e: &io::Error) -> TrustError {
    TrustError::Unreadable {
        path: shown(path),
        reason: e.to_string(),
    }
}

/// Opens `path` itself (a reparse point is not followed) to read its
/// attributes and security, and, with `write_dac`, to set its DACL.
fn open_itself(path: &Path, write_dac: bool) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .access_mode(READ_CONTROL | FILE_READ_ATTRIBUTES | if write_dac { WRITE_DAC } else { 0 })
        .custom_flags(FILE_FLAG_BACKUP_SEMANTICS | FILE_FLAG_OPEN_REPARSE_POINT)
        .open(path)
}

/// What `GetFileInformationByHandle` says of an open file.
fn information(file: &File) -> io::Result<BY_HANDLE_FILE_INFORMATION> {
    // SAFETY: plain data, filled by the call.
    let mut info: BY_HANDLE_FILE_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: a live handle and a buffer of the right type.
    if unsafe { GetFileInformationByHandle(file.as_raw_handle() as HANDLE, &mut info) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

fn is_reparse_point(attributes: u32) -> bool {
    attributes & FILE_ATTRIBUTE_REPARSE_POINT != 0
}

/// What is seen of one path on the way to a directory: its attributes and
/// security, read off a handle to it itself (a reparse point not followed).
#[derive(Debug, Clone)]
struct Seen {
    attributes: u32,
    security: Security,
}

fn see(at: &Path) -> Result<Seen, TrustError> {
    let file = open_itself(at, false).map_err(|e| unreadable(at, &e))?;
    let info = information(&file).map_err(|e| unreadable(at, &e))?;
    let security = Security::of(&file).map_err(|e| unreadable(at, &e))?;
    Ok(Seen {
        attributes: info.dwFileAttributes,
        security,
    })
}

/// Checks that nobody but an administrator (or uvmctl's own user) can
/// change what the directory `path` names: no reparse point on the way as
/// given, and the directory and every directory above it judged on its
/// security descriptor. Returns the canonical path.
///
/// # Errors
/// The first directory that fails, with its owner and what is wrong.
pub fn check_trusted_dir(path: &Path) -> Result<PathBuf, TrustError> {
    check_with(path, &see, &|p: &Path| std::fs::canonicalize(p))
}

/// Refuses `at` when it is a reparse point.
fn refuse_reparse(at: &Path, seen: &Seen) -> Result<(), TrustError> {
    if is_reparse_point(seen.attributes) {
        return Err(untrusted(
            at,
            Some(&seen.security),
            "a reparse point (symbolic link or junction); uvmctl follows none".into(),
        ));
    }
    Ok(())
}

/// [`check_trusted_dir`] with what it sees and how it resolves given (the
/// tests give both: Wine 8 makes no reparse point and keeps no DACL).
fn check_with(
    path: &Path,
    see: &dyn Fn(&Path) -> Result<Seen, TrustError>,
    canonicalize: &dyn Fn(&Path) -> io::Result<PathBuf>,
) -> Result<PathBuf, TrustError> {
    let mut at = PathBuf::new();
    for c in path.components() {
        at.push(c);
        if matches!(c, Component::Normal(_)) {
            refuse_reparse(&at, &see(&at)?)?;
        }
    }
    let canonical = canonicalize(path).map_err(|e| unreadable(path, &e))?;
    let components: Vec<Component> = canonical.components().collect();
    let mut at = PathBuf::new();
    for (i, c) in components.iter().enumerate() {
        at.push(c);
        // The prefix alone (`\\?\C:`) names no directory; with the root
        // after it, the drive's root does.
        if matches!(c, Component::Prefix(_)) {
            continue;
        }
        let seen = see(&at)?;
        refuse_reparse(&at, &seen)?;
        if seen.attributes & FILE_ATTRIBUTE_DIRECTORY == 0 {
            return Err(untrusted(
                &at,
                Some(&seen.security),
                "not a directory".into(),
            ));
        }
        seen.security
            .judge(i + 1 == components.len())
            .map_err(|why| untrusted(&at, Some(&seen.security), why))?;
    }
    Ok(canonical)
}

/// Whether the reparse point `file` is open on stands for another name
/// (a symbolic link, junction or mount point: `IsReparseTagNameSurrogate`),
/// rather than storing the file's data another way (deduplicated,
/// compressed by WOF, a cloud placeholder), which is no detour.
fn names_another(file: &File) -> io::Result<bool> {
    // SAFETY: FileAttributeTagInfo fills a FILE_ATTRIBUTE_TAG_INFO.
    let tag: FILE_ATTRIBUTE_TAG_INFO = unsafe { information_ex(file, FileAttributeTagInfo) }?;
    Ok(is_reparse_point(tag.FileAttributes) && tag.ReparseTag & 0x2000_0000 != 0)
}

/// `GetFileInformationByHandleEx` of `class`.
///
/// # Safety
/// `T` is the plain-data structure Windows fills for `class`.
unsafe fn information_ex<T>(file: &File, class: FILE_INFO_BY_HANDLE_CLASS) -> io::Result<T> {
    let mut out = std::mem::MaybeUninit::<T>::zeroed();
    // SAFETY: a live handle and a buffer of the class's type and size.
    let ok = unsafe {
        GetFileInformationByHandleEx(
            file.as_raw_handle() as HANDLE,
            class,
            out.as_mut_ptr().cast(),
            std::mem::size_of::<T>() as u32,
        )
    };
    if ok == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: filled by the call, and all-zero is valid plain data anyway.
    Ok(unsafe { out.assume_init() })
}

/// Checks what a spec names under the allowed root `root`, which HCS
/// opens by name as its own service: every directory from the root down
/// to it, and it, as far as they exist, is no link or junction, is owned
/// by a trusted SID, and lets nobody else change it (a directory: nor add
/// to it). What does not exist yet is HCS's to report: its parent passed,
/// so nobody else can make it.
///
/// # Errors
/// The first that fails, with its owner and what is wrong.
pub fn check_beneath(root: &Path, path: &Path) -> Result<(), TrustError> {
    let Ok(rel) = path.strip_prefix(root) else {
        return Ok(());
    };
    let mut at = root.to_path_buf();
    for c in rel.components() {
        at.push(c);
        let file = match open_itself(&at, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(unreadable(&at, &e)),
        };
        let info = information(&file).map_err(|e| unreadable(&at, &e))?;
        let security = Security::of(&file).map_err(|e| unreadable(&at, &e))?;
        if names_another(&file).map_err(|e| unreadable(&at, &e))? {
            return Err(untrusted(
                &at,
                Some(&security),
                "a reparse point (symbolic link or junction); HCS would follow it".into(),
            ));
        }
        let dir = info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY != 0;
        security
            .judge(dir)
            .map_err(|why| untrusted(&at, Some(&security), why))?;
    }
    Ok(())
}

/// The DACL uvmctl gives a directory it makes: the system, the
/// administrators and its own user, and read and execute for users when
/// `mode` lets others read; protected from what the parent would pass on.
fn private_sddl(mode: u32) -> String {
    let mut sddl = "D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)".to_string();
    if let Some(me) = me() {
        sddl.push_str(&format!("(A;OICI;FA;;;{me})"));
    }
    if mode & 0o005 != 0 {
        sddl.push_str("(A;OICI;FRFX;;;BU)");
    }
    sddl
}

/// Creates the directory `path` (not its parents), or takes the one
/// there: it must be a real directory (not a reparse point), owned by an
/// administrator or uvmctl's own user. Its DACL is then set to a protected
/// one after `mode` (see [`private_sddl`]), so nothing the parent grants
/// (`C:\ProgramData` lets users create files) reaches it.
///
/// # Errors
/// The OS error, or `PermissionDenied` naming the owner when it is not ours.
pub fn private_dir(path: &Path, mode: u32) -> io::Result<()> {
    let sd = sddl_descriptor(&private_sddl(mode))?;
    // Made with its DACL, so nothing the parent grants (users may create
    // files in a new directory of C:\ProgramData) holds for a moment.
    let attributes = SECURITY_ATTRIBUTES {
        nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
        lpSecurityDescriptor: sd.0,
        bInheritHandle: 0,
    };
    let wide: Vec<u16> = path.as_os_str().encode_wide().chain([0]).collect();
    // SAFETY: a NUL-terminated path and attributes that outlive the call.
    if unsafe { CreateDirectoryW(wide.as_ptr(), &attributes) } == 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    let dir = open_itself(path, true)?;
    let info = information(&dir)?;
    if is_reparse_point(info.dwFileAttributes)
        || info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY == 0
    {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a directory (a reparse point or a file); refused",
        ));
    }
    let security = Security::of(&dir)?;
    if !acl::trusted_sid(&security.owner_sid, me()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "owned by {}, not by Administrators or uvmctl's own user",
                security.owner
            ),
        ));
    }
    let (mut present, mut dacl, mut defaulted): (i32, *mut ACL, i32) = (0, std::ptr::null_mut(), 0);
    // SAFETY: the descriptor just built; out-pointers to locals.
    if unsafe { GetSecurityDescriptorDacl(sd.0, &mut present, &mut dacl, &mut defaulted) } == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a live handle opened with WRITE_DAC; the DACL lives in `sd`.
    let err = unsafe {
        SetSecurityInfo(
            dir.as_raw_handle() as HANDLE,
            SE_FILE_OBJECT,
            DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            dacl,
            std::ptr::null(),
        )
    };
    if err != 0 {
        return Err(io::Error::from_raw_os_error(err as i32));
    }
    Ok(())
}

/// Creates `path` and whatever directories above it are missing, each as
/// [`private_dir`] makes it; existing ones are left as they are.
///
/// # Errors
/// The OS error of the first directory that could not be made.
pub fn create_dirs(path: &Path, mode: u32) -> io::Result<()> {
    if std::fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dirs(parent, mode)?;
    }
    private_dir(path, mode)
}

/// Opens a file uvmctl owns in its state (creating it if missing): never
/// through a reparse point, and only a regular file of one name owned by
/// an administrator or uvmctl's own user; truncated once known to be so.
/// `mode` is unix's: the directory's DACL is what guards it here.
///
/// # Errors
/// The OS error; `PermissionDenied` for a file that is not ours alone.
pub fn open_state_file(path: &Path, _mode: u32, truncate: bool) -> io::Result<File> {
    let file = open_ours(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
        path,
    )?;
    if truncate {
        file.set_len(0)?;
    }
    Ok(file)
}

/// Opens a log uvmctl keeps in its state for appending, as
/// [`open_state_file`] checks it.
///
/// # Errors
/// As [`open_state_file`].
pub fn open_state_log(path: &Path, _mode: u32) -> io::Result<File> {
    open_ours(std::fs::OpenOptions::new().append(true).create(true), path)
}

/// Opens a file uvmctl keeps in its state for reading, as
/// [`open_state_file`] checks it.
///
/// # Errors
/// As [`open_state_file`].
pub fn open_state_reader(path: &Path) -> io::Result<File> {
    open_ours(std::fs::OpenOptions::new().read(true), path)
}

fn open_ours(opts: &mut std::fs::OpenOptions, path: &Path) -> io::Result<File> {
    let file = opts.custom_flags(FILE_FLAG_OPEN_REPARSE_POINT).open(path)?;
    let info = information(&file)?;
    let owner_ok = Security::of(&file)
        .map(|s| acl::trusted_sid(&s.owner_sid, me()))
        .unwrap_or(false);
    if is_reparse_point(info.dwFileAttributes)
        || info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY != 0
        || info.nNumberOfLinks != 1
        || !owner_ok
    {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "not a regular file of uvmctl's alone (another name, owner or kind); refused",
        ));
    }
    Ok(file)
}

/// Opens the regular file `path` for reading without following a reparse
/// point.
///
/// # Errors
/// The OS error; `InvalidInput` for a reparse point or what is not a
/// regular file.
pub fn open_read_nofollow(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(FILE_FLAG_OPEN_REPARSE_POINT)
        .open(path)?;
    let info = information(&file)?;
    if is_reparse_point(info.dwFileAttributes)
        || info.dwFileAttributes & FILE_ATTRIBUTE_DIRECTORY != 0
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a reparse point or a directory)",
        ));
    }
    Ok(file)
}

/// The [`Stamp`] of what `path` names (a reparse point's target when
/// `follow`).
///
/// # Errors
/// The OS error.
pub fn stamp(path: &Path, follow: bool) -> io::Result<Stamp> {
    let file = std::fs::OpenOptions::new()
        .access_mode(FILE_READ_ATTRIBUTES)
        .custom_flags(
            FILE_FLAG_BACKUP_SEMANTICS
                | if follow {
                    0
                } else {
                    FILE_FLAG_OPEN_REPARSE_POINT
                },
        )
        .open(path)?;
    file_stamp(&file)
}

/// The [`Stamp`] of an open file.
///
/// # Errors
/// The OS error.
pub fn file_stamp(file: &File) -> io::Result<Stamp> {
    let info = information(file)?;
    // SAFETY: FileBasicInfo fills a FILE_BASIC_INFO.
    let basic: FILE_BASIC_INFO = unsafe { information_ex(file, FileBasicInfo) }?;
    // FILETIMEs count 100 ns.
    Ok(Stamp {
        dev: u64::from(info.dwVolumeSerialNumber),
        ino: (u64::from(info.nFileIndexHigh) << 32) | u64::from(info.nFileIndexLow),
        len: (u64::from(info.nFileSizeHigh) << 32) | u64::from(info.nFileSizeLow),
        mtime_ns: i128::from(basic.LastWriteTime) * 100,
        ctime_ns: i128::from(basic.ChangeTime) * 100,
        is_file: info.dwFileAttributes & (FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_REPARSE_POINT)
            == 0,
    })
}

/// Replaces `path` with `bytes` atomically: a new temporary file
/// (`create_new`) renamed over it (`MoveFileExW` with replace, which NTFS
/// does in one step). A failed write removes the temporary file again.
///
/// # Errors
/// The OS error of the step that failed.
pub fn replace_file(path: &Path, bytes: &[u8], _mode: u32) -> io::Result<()> {
    let tmp = temp_name(path);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(FILE_FLAG_OPEN_REPARSE_POINT)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        // A reader (or a virus scanner) holding the old file without
        // FILE_SHARE_DELETE makes the rename fail for a moment.
        let mut wait = std::time::Duration::from_millis(5);
        loop {
            match std::fs::rename(&tmp, path) {
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied && wait.as_millis() < 500 => {
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                done => return done,
            }
        }
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Whether `file` (a config file) may be trusted: owned by an
/// administrator or uvmctl's own user, and nobody else may change it.
///
/// # Errors
/// What is wrong with it.
pub fn check_trusted_file(file: &File) -> Result<(), String> {
    let security = Security::of(file).map_err(|e| e.to_string())?;
    security
        .judge(true)
        .map_err(|why| format!("owned by {}: {why}", security.owner))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_from_sddl_is_judged_as_acl_says() {
        // The decision on descriptors Windows would hand out, built here
        // because Wine keeps no DACL a test sets on a Linux file system.
        let ok = Security::from_sddl("O:BAD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;FRFX;;;BU)")
            .expect("sddl");
        assert_eq!(ok.owner_sid, acl::ADMINISTRATORS);
        assert_eq!(ok.judge(true), Ok(()));
        let users =
            Security::from_sddl("O:BAD:(A;OICI;FA;;;BA)(A;OICI;0x1301bf;;;BU)").expect("sddl");
        let why = users.judge(true).expect_err("users may modify");
        assert!(why.contains("S-1-5-32-545"), "{why}");
        assert!(why.contains("may delete"), "{why}");
        // What the root passes on to what is made in it counts.
        let inherited = Security::from_sddl("O:SYD:(A;;FA;;;SY)(A;OICIIO;FA;;;BU)").expect("sddl");
        assert!(inherited.judge(true).is_err());
        assert_eq!(inherited.judge(false), Ok(()));
        let placeholder =
            Security::from_sddl("O:SYD:(A;;FA;;;SY)(A;OICIIO;FA;;;CO)").expect("sddl");
        assert_eq!(placeholder.judge(true), Ok(()));
        let theirs = Security::from_sddl("O:BUD:(A;;FA;;;BA)").expect("sddl");
        assert!(theirs.judge(true).is_err());
    }

    /// What a test's host looks like: every path a trusted directory but
    /// those given.
    fn host<'a>(
        odd: &'a [(&'a str, u32, &'a str)],
    ) -> impl Fn(&Path) -> Result<Seen, TrustError> + 'a {
        move |at: &Path| {
            let text = at.display().to_string();
            let (attributes, sddl) = odd
                .iter()
                .find(|(p, _, _)| *p == text)
                .map_or((FILE_ATTRIBUTE_DIRECTORY, TRUSTED), |(_, a, s)| (*a, *s));
            Ok(Seen {
                attributes,
                security: Security::from_sddl(sddl).expect("sddl"),
            })
        }
    }

    const TRUSTED: &str = "O:BAD:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;FRFX;;;BU)";

    /// Wine 8 shows a unix link as the directory it names and cannot make
    /// a junction (`mklink /J` fails), so the walk is given the attributes
    /// a junction has on Windows; the descriptors are real, built by
    /// advapi32 from SDDL.
    #[test]
    fn a_junction_or_link_in_an_allowed_root_is_refused_with_its_name() {
        let same = |p: &Path| Ok(p.to_path_buf());
        let root = Path::new(r"C:\roots\vhds");
        assert_eq!(check_with(root, &host(&[]), &same).expect("trusted"), root);
        let link = Path::new(r"C:\roots\vhds\boot");
        let odd = [(
            r"C:\roots\vhds\boot",
            FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_REPARSE_POINT,
            TRUSTED,
        )];
        let err = check_with(link, &host(&odd), &same).expect_err("a junction");
        let text = err.to_string();
        assert!(text.starts_with(r"C:\roots\vhds\boot: owned by "), "{text}");
        assert!(
            text.contains("a reparse point (symbolic link or junction)"),
            "{text}"
        );
        // One met only once resolved (the path given had none) is refused too.
        let resolved = |_: &Path| Ok(PathBuf::from(r"C:\elsewhere\boot"));
        let odd = [(
            r"C:\elsewhere",
            FILE_ATTRIBUTE_DIRECTORY | FILE_ATTRIBUTE_REPARSE_POINT,
            TRUSTED,
        )];
        let err = check_with(root, &host(&odd), &resolved).expect_err("on the way");
        assert!(err.to_string().starts_with(r"C:\elsewhere: "), "{err}");
    }

    #[test]
    fn a_root_users_may_write_is_refused_naming_users() {
        let same = |p: &Path| Ok(p.to_path_buf());
        let root = Path::new(r"C:\roots\vhds");
        let odd = [(
            r"C:\roots\vhds",
            FILE_ATTRIBUTE_DIRECTORY,
            "O:BAD:(A;OICI;FA;;;BA)(A;OICI;0x1301bf;;;BU)",
        )];
        let err = check_with(root, &host(&odd), &same).expect_err("users may write");
        let text = err.to_string();
        assert!(text.starts_with(r"C:\roots\vhds: owned by "), "{text}");
        assert!(
            text.contains("(S-1-5-32-545) may delete, rename or re-permit"),
            "{text}"
        );
        // Above the root, letting users make folders (as C:\ does) is fine;
        // letting them delete what is in it is not.
        let odd = [(
            r"C:\roots",
            FILE_ATTRIBUTE_DIRECTORY,
            "O:BAD:(A;;FA;;;BA)(A;;0x100004;;;AU)",
        )];
        assert!(check_with(root, &host(&odd), &same).is_ok());
        let odd = [(
            r"C:\roots",
            FILE_ATTRIBUTE_DIRECTORY,
            "O:BAD:(A;;FA;;;BA)(A;;0x100040;;;AU)",
        )];
        let err = check_with(root, &host(&odd), &same).expect_err("delete child");
        assert!(err.to_string().starts_with(r"C:\roots: "), "{err}");
        // A root that is a file is no root.
        let odd = [(r"C:\roots\vhds", 0x20, TRUSTED)];
        let err = check_with(root, &host(&odd), &same).expect_err("a file");
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn the_error_names_the_directory_its_owner_and_what_is_wrong() {
        let users = Security::from_sddl("O:BAD:(A;;FA;;;BA)(A;;FA;;;BU)").expect("sddl");
        let why = users.judge(true).expect_err("refused");
        let err = untrusted(Path::new(r"C:\vhds"), Some(&users), why);
        let text = err.to_string();
        assert!(text.starts_with(r"C:\vhds: owned by "), "{text}");
        assert!(text.contains("S-1-5-32-544"), "{text}");
        assert!(text.contains("Users"), "{text}");
        assert!(text.contains("non-administrator"), "{text}");
    }
}
