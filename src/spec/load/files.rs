//! Finding and reading spec files: the walk of a spec directory (hidden
//! entries skipped, symlinks followed only to files inside it) and the
//! bounded read of one regular file.

use super::parse::parse_str;
use super::{FileResult, MAX_SPEC_FILE_BYTES, SpecFile, is_spec_file_name};
use crate::spec::error::SpecError;
use std::fs;
use std::io::Read;
use std::path::Path;

/// Lists spec files under `root` (or `root` itself if it is a file), sorted.
/// Hidden directories are skipped and symlinked directories are not followed,
/// so a `.git` or a link loop never gets walked.
///
/// A spec file that is a symlink is followed only to a target inside the
/// (resolved) root: a `*.yaml` link to `/etc/shadow` in a spec directory that
/// came from a pull request is refused by name, never opened. `root` itself
/// may be a symlink: the user named it.
pub(in crate::spec) fn list_files(root: &Path, errors: &mut Vec<SpecError>) -> Vec<SpecFile> {
    let mut out = Vec::new();
    let resolved = |path: &Path, errors: &mut Vec<SpecError>| match fs::canonicalize(path) {
        Ok(p) => Some(p),
        Err(e) => {
            errors.push(SpecError::whole_file(path, format!("cannot read: {e}")));
            None
        }
    };
    let root_target = match fs::metadata(root) {
        Ok(m) if m.is_file() => {
            return resolved(root, errors)
                .map(|read| SpecFile {
                    name: root.to_path_buf(),
                    read,
                })
                .into_iter()
                .collect();
        }
        Ok(m) if m.is_dir() => match resolved(root, errors) {
            Some(r) => r,
            None => return out,
        },
        Ok(_) => {
            errors.push(SpecError::whole_file(
                root,
                "not a directory or regular file",
            ));
            return out;
        }
        Err(e) => {
            errors.push(SpecError::whole_file(root, format!("cannot read: {e}")));
            return out;
        }
    };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                errors.push(SpecError::whole_file(
                    &dir,
                    format!("cannot read directory: {e}"),
                ));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    errors.push(SpecError::whole_file(
                        &dir,
                        format!("cannot read directory: {e}"),
                    ));
                    continue;
                }
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            // The rollout policy beside the specs is no VM's (policy.rs),
            // under either spelling (the other one is refused there).
            if dir == root && crate::spec::policy::is_policy_name(&name) {
                continue;
            }
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(path),
                Ok(t) if t.is_symlink() && is_spec_file_name(&name) => {
                    match fs::canonicalize(&path) {
                        Ok(read) if read.starts_with(&root_target) => {
                            out.push(SpecFile { name: path, read });
                        }
                        Ok(_) => errors.push(SpecError::whole_file(
                            &path,
                            "symlink to a file outside the spec directory; not read",
                        )),
                        Err(e) => errors.push(SpecError::whole_file(
                            &path,
                            format!("symlink that does not resolve ({e}); not read"),
                        )),
                    }
                }
                Ok(_) if is_spec_file_name(&name) => out.push(SpecFile {
                    read: path.clone(),
                    name: path,
                }),
                Ok(_) => {}
                Err(e) => errors.push(SpecError::whole_file(&path, format!("cannot stat: {e}"))),
            }
        }
    }
    // Byte order: as deterministic as component order, and much cheaper.
    out.sort_by(|a, b| a.name.as_os_str().cmp(b.name.as_os_str()));
    out
}

pub(in crate::spec) fn load_file(file: &SpecFile) -> FileResult {
    let path = file.name.as_path();
    match read_text(&file.read) {
        Ok(text) => parse_str(path, text),
        Err(msg) => FileResult {
            path: path.to_path_buf(),
            file_errors: vec![SpecError::whole_file(path, msg)],
            whole: true,
            ..FileResult::default()
        },
    }
}

/// The text of the spec file at `read` (no symlink), bounded; why not.
pub(in crate::spec) fn read_text(read: &Path) -> Result<String, String> {
    // Read only regular files: a FIFO or a device would block or stream
    // forever. `read` holds no symlink (list_files resolved it), so a link
    // put in its place since is refused (O_NOFOLLOW), as is anything swapped
    // in that is not a regular file (checked again on the open file).
    let meta = fs::symlink_metadata(read).map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".to_string());
    }
    if meta.len() > MAX_SPEC_FILE_BYTES {
        return Err(format!(
            "file is {} bytes, over the {MAX_SPEC_FILE_BYTES}-byte limit",
            meta.len()
        ));
    }
    let f = crate::hostfs::open_read_nofollow(read).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidInput {
            "not a regular file".to_string()
        } else {
            format!("cannot read: {e}")
        }
    })?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // The file may grow between stat and read: never read past the limit.
    f.take(MAX_SPEC_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_SPEC_FILE_BYTES {
        return Err(format!("file is over the {MAX_SPEC_FILE_BYTES}-byte limit"));
    }
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}
