//! Signature verification: a revision is put in force only when its commit
//! carries one SSH signature, by a key of the allowed signers.

use super::git::bounded;
use super::{GitSource, Revision, SourceError};
use std::path::Path;

impl GitSource {
    pub(super) async fn verify(
        &self,
        revision: &Revision,
        signers: &Path,
    ) -> Result<(), SourceError> {
        // `verify-commit` picks its verifier from the signature's kind: an
        // OpenPGP signature would be checked against whatever keyrings the
        // host has. The allowed signers are SSH keys, so nothing else is
        // even handed to git (and its other verifiers are disabled).
        let object = self
            .git_bytes(
                &["cat-file", "commit"],
                &[std::ffi::OsStr::new(&revision.sha)],
                "cat-file",
            )
            .await?;
        if let Err(why) = ssh_signed(&object) {
            return Err(SourceError::Unverified {
                revision: revision.clone(),
                reason: why.to_string(),
            });
        }
        let mut cmd = self.command(&self.mirror());
        cmd.arg("-c")
            .arg(format!("gpg.ssh.allowedSignersFile={}", signers.display()))
            .args([
                "-c",
                "gpg.openpgp.program=false",
                "-c",
                "gpg.program=false",
                "-c",
                "gpg.x509.program=false",
            ])
            .arg("verify-commit")
            .arg(&revision.sha);
        let out = Self::finish(cmd, "verify-commit").await?;
        if out.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&out.stderr);
        let reason = said
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("no signature");
        Err(SourceError::Unverified {
            revision: revision.clone(),
            reason: bounded(reason),
        })
    }
}

/// Whether a commit object carries an SSH signature (and nothing else):
/// the `gpgsig` (or `gpgsig-sha256`) header of an SSH signature.
pub(super) fn ssh_signed(object: &[u8]) -> Result<(), &'static str> {
    let headers = object
        .split(|&b| b == b'\n')
        .take_while(|line| !line.is_empty());
    let mut kinds = headers.filter_map(|line| {
        line.strip_prefix(b"gpgsig ")
            .or_else(|| line.strip_prefix(b"gpgsig-sha256 "))
    });
    match kinds.next() {
        None => Err("no signature"),
        Some(first) if first.starts_with(b"-----BEGIN SSH SIGNATURE-----") => {
            if kinds.next().is_some() {
                Err("more than one signature")
            } else {
                Ok(())
            }
        }
        Some(_) => Err(
            "not an SSH signature (OpenPGP or X.509): --allowed-signers admits SSH signatures only",
        ),
    }
}
