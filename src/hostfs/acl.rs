//! Whether a Windows security descriptor lets someone other than an
//! administrator change a directory: the decision alone, on the owner and
//! the DACL's entries as SID strings and access masks, so it is tested on
//! every platform (Wine does not keep every ACL a test would set). Reading
//! a real descriptor into these terms is `windows.rs`'s.

/// `NT AUTHORITY\SYSTEM`.
pub const SYSTEM: &str = "S-1-5-18";
/// `BUILTIN\Administrators`.
pub const ADMINISTRATORS: &str = "S-1-5-32-544";
/// `NT SERVICE\TrustedInstaller`, which owns Windows' own directories.
pub const TRUSTED_INSTALLER: &str =
    "S-1-5-80-956008885-3418522649-1831038044-1853292631-2271478464";
/// `CREATOR OWNER`: a placeholder for inheritance, granting nobody now.
const CREATOR_OWNER: &str = "S-1-3-0";
/// `OWNER RIGHTS`: whoever owns it, who is checked as the owner.
const OWNER_RIGHTS: &str = "S-1-3-4";

/// `FILE_ADD_FILE` (`FILE_WRITE_DATA` on a directory).
const ADD_FILE: u32 = 0x2;
/// `FILE_ADD_SUBDIRECTORY` (`FILE_APPEND_DATA` on a directory).
const ADD_SUBDIRECTORY: u32 = 0x4;
/// `FILE_DELETE_CHILD`.
const DELETE_CHILD: u32 = 0x40;
/// `DELETE`.
const DELETE: u32 = 0x1_0000;
/// `WRITE_DAC`.
const WRITE_DAC: u32 = 0x4_0000;
/// `WRITE_OWNER`.
const WRITE_OWNER: u32 = 0x8_0000;
/// `GENERIC_ALL`.
const GENERIC_ALL: u32 = 0x1000_0000;
/// `GENERIC_WRITE`.
const GENERIC_WRITE: u32 = 0x4000_0000;

/// Rights that let their holder remove, rename or re-permit what is in a
/// directory (or the directory itself): refused on every directory on the
/// way, as a non-sticky writable one is on unix.
const REPLACE: u32 = DELETE_CHILD | DELETE | WRITE_DAC | WRITE_OWNER | GENERIC_ALL;
/// Rights that let their holder add entries beside uvmctl's: acceptable on
/// a directory above (like `C:\`, where any user may make a folder, as a
/// sticky `/tmp`), refused on the directory itself.
const CREATE: u32 = ADD_FILE | ADD_SUBDIRECTORY | GENERIC_WRITE;

/// One entry of a DACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ace {
    /// What it does: allows, denies, or is of a kind uvmctl does not read.
    pub kind: AceKind,
    /// `INHERIT_ONLY_ACE`: it applies to what is made inside, not here.
    pub inherit_only: bool,
    /// Its access mask.
    pub mask: u32,
    /// Whom it names, as a SID string.
    pub sid: String,
    /// Whom it names, for people: `BUILTIN\Users (S-1-5-32-545)`.
    pub who: String,
}

/// The kind of a DACL entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AceKind {
    /// `ACCESS_ALLOWED_ACE_TYPE`.
    Allow,
    /// `ACCESS_DENIED_ACE_TYPE`.
    Deny,
    /// Any other type (object or callback entries), by number.
    Other(u8),
}

/// Whether `sid` may change what uvmctl relies on: the administrators,
/// the system, Windows' installer, and uvmctl's own user (`me`).
pub fn trusted_sid(sid: &str, me: Option<&str>) -> bool {
    [SYSTEM, ADMINISTRATORS, TRUSTED_INSTALLER].contains(&sid) || me == Some(sid)
}

/// Judges one directory: owned by a trusted SID, and its DACL granting
/// nobody else [`REPLACE`] rights, nor, for the directory itself (`last`),
/// [`CREATE`] rights. For the directory itself, entries it only passes on
/// (inherit-only) count too: what is made in it would grant them. `dacl`
/// is `None` for a null DACL (everyone may do anything). Deny entries are
/// not weighed (they only narrow what an allow grants, so ignoring them
/// refuses more, never less).
///
/// # Errors
/// What is wrong, for a [`TrustError::UntrustedAcl`](super::TrustError).
pub fn judge(
    owner_sid: &str,
    dacl: Option<&[Ace]>,
    me: Option<&str>,
    last: bool,
) -> Result<(), String> {
    if !trusted_sid(owner_sid, me) {
        return Err("not owned by Administrators, SYSTEM or uvmctl's own user".into());
    }
    let Some(dacl) = dacl else {
        return Err("it has no DACL, so everyone has full control".into());
    };
    for ace in dacl.iter().filter(|a| last || !a.inherit_only) {
        match ace.kind {
            AceKind::Deny => continue,
            AceKind::Other(n) => {
                return Err(format!(
                    "an access entry of type {n} for {}, which uvmctl cannot judge",
                    ace.who
                ));
            }
            AceKind::Allow => {}
        }
        if trusted_sid(&ace.sid, me) || ace.sid == CREATOR_OWNER || ace.sid == OWNER_RIGHTS {
            continue;
        }
        let inherited = if ace.inherit_only {
            ", in what is made in it"
        } else {
            ""
        };
        if ace.mask & REPLACE != 0 {
            return Err(format!(
                "{} may delete, rename or re-permit what is in it{inherited} (access mask {:#x})",
                ace.who, ace.mask
            ));
        }
        if last && ace.mask & CREATE != 0 {
            return Err(format!(
                "{} may create files or directories in it{inherited} (access mask {:#x})",
                ace.who, ace.mask
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const USERS: &str = "S-1-5-32-545";
    const ME: &str = "S-1-5-21-1-2-3-1001";

    fn allow(sid: &str, mask: u32) -> Ace {
        Ace {
            kind: AceKind::Allow,
            inherit_only: false,
            mask,
            sid: sid.into(),
            who: format!("who ({sid})"),
        }
    }

    /// `FILE_ALL_ACCESS`, `FILE_GENERIC_READ | FILE_GENERIC_EXECUTE`, and
    /// `Modify` as `icacls` grants them.
    const FULL: u32 = 0x1f_01ff;
    const READ_EXECUTE: u32 = 0x12_00a9;
    const MODIFY: u32 = 0x13_01bf;

    #[test]
    fn an_administrators_directory_read_by_users_is_trusted() {
        let dacl = [
            allow(SYSTEM, FULL),
            allow(ADMINISTRATORS, FULL),
            allow(USERS, READ_EXECUTE),
        ];
        assert_eq!(judge(ADMINISTRATORS, Some(&dacl), None, true), Ok(()));
        assert_eq!(judge(ME, Some(&dacl), Some(ME), true), Ok(()));
    }

    #[test]
    fn a_directory_users_may_write_is_refused_naming_them() {
        let dacl = [allow(ADMINISTRATORS, FULL), allow(USERS, MODIFY)];
        let why = judge(ADMINISTRATORS, Some(&dacl), None, true).expect_err("writable");
        assert!(why.contains("who (S-1-5-32-545) may delete"), "{why}");
        assert!(judge(ADMINISTRATORS, Some(&dacl), None, false).is_err());
        let generic = [allow(USERS, GENERIC_ALL)];
        assert!(judge(SYSTEM, Some(&generic), None, false).is_err());
    }

    #[test]
    fn creating_beside_is_acceptable_above_and_refused_on_the_directory_itself() {
        // C:\ grants Authenticated Users "create folders" on itself.
        let dacl = [
            allow(ADMINISTRATORS, FULL),
            allow("S-1-5-11", ADD_SUBDIRECTORY),
        ];
        assert_eq!(judge(ADMINISTRATORS, Some(&dacl), None, false), Ok(()));
        let why = judge(ADMINISTRATORS, Some(&dacl), None, true).expect_err("itself");
        assert!(why.contains("may create files"), "{why}");
    }

    #[test]
    fn what_a_root_passes_on_counts_and_placeholders_grant_nothing() {
        let mut inherited = allow(USERS, FULL);
        inherited.inherit_only = true;
        let dacl = [
            allow(ADMINISTRATORS, FULL),
            inherited,
            allow(CREATOR_OWNER, FULL),
        ];
        // A directory above passes it on to its own children only.
        assert_eq!(judge(ADMINISTRATORS, Some(&dacl), None, false), Ok(()));
        // The root would give it to every directory and disk made in it.
        let why = judge(ADMINISTRATORS, Some(&dacl), None, true).expect_err("inherited");
        assert!(why.contains("in what is made in it"), "{why}");
        let dacl = [allow(ADMINISTRATORS, FULL), allow(CREATOR_OWNER, FULL)];
        assert_eq!(judge(ADMINISTRATORS, Some(&dacl), None, true), Ok(()));
    }

    #[test]
    fn a_foreign_owner_a_null_dacl_and_unread_entries_are_refused() {
        let why = judge(USERS, Some(&[]), Some(ME), true).expect_err("owner");
        assert!(why.contains("not owned by"), "{why}");
        let why = judge(ADMINISTRATORS, None, None, true).expect_err("null dacl");
        assert!(why.contains("no DACL"), "{why}");
        let mut object = allow(USERS, READ_EXECUTE);
        object.kind = AceKind::Other(5);
        let why = judge(ADMINISTRATORS, Some(&[object]), None, true).expect_err("type");
        assert!(why.contains("type 5"), "{why}");
        // A deny is not weighed: refusing more, never less.
        let mut deny = allow(USERS, FULL);
        deny.kind = AceKind::Deny;
        assert_eq!(judge(ADMINISTRATORS, Some(&[deny]), None, true), Ok(()));
    }
}
