//! Fetching the ref into the mirror: by its full name (a bare name that is
//! both a branch and a tag is refused), bounded in size and in time.

use super::git::bounded;
use super::{GitSource, SourceError, io_err};
use std::path::Path;
use std::time::{Duration, Instant};

impl GitSource {
    /// `git fetch` of the ref into `refs/uvmctl/fetched`, stopped when the
    /// mirror grows past its bound or the time is up.
    pub(super) async fn fetch(&self) -> Result<(), SourceError> {
        let full = self.full_ref().await?;
        let refspec = format!("+{full}:refs/uvmctl/fetched");
        let mirror = self.mirror();
        let mut child = self
            .command_with_host_config(&mirror)
            .args([
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                "--",
            ])
            .arg(&self.opts.url)
            .arg(&refspec)
            .spawn()
            .map_err(io_err("cannot run git"))?;
        let stderr = child.stderr.take();
        let reading = tokio::spawn(async move {
            let mut text = String::new();
            if let Some(mut e) = stderr {
                use tokio::io::AsyncReadExt;
                let mut buf = Vec::new();
                let _ = (&mut e).take(64 << 10).read_to_end(&mut buf).await;
                text = String::from_utf8_lossy(&buf).into_owned();
            }
            text
        });
        let start = Instant::now();
        let exit = loop {
            tokio::select! {
                exit = child.wait() => break exit.map_err(io_err("git fetch"))?,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let over = dir_size(&mirror.join("objects")) > self.opts.max_bytes;
            if over || start.elapsed() > self.opts.fetch_timeout {
                let _ = child.kill().await;
                // A killed fetch leaves temporary packs; the refs are untouched.
                remove_temp_packs(&mirror);
                return Err(if over {
                    SourceError::TooLarge {
                        max: self.opts.max_bytes,
                    }
                } else {
                    SourceError::Timeout {
                        what: "fetch",
                        after: self.opts.fetch_timeout,
                    }
                });
            }
        };
        let stderr = reading.await.unwrap_or_default();
        if exit.success() {
            if dir_size(&mirror.join("objects")) > self.opts.max_bytes {
                // Back to what the revision in force needs.
                let _ = self
                    .git(
                        &["update-ref", "-d", "refs/uvmctl/fetched"],
                        &[],
                        "update-ref",
                    )
                    .await;
                let _ = self.git(&["repack", "-a", "-d", "-q"], &[], "repack").await;
                let _ = self.git(&["prune", "--expire=now"], &[], "prune").await;
                return Err(SourceError::TooLarge {
                    max: self.opts.max_bytes,
                });
            }
            return Ok(());
        }
        if stderr.contains("couldn't find remote ref") {
            return Err(SourceError::NoSuchRef(self.opts.reference.clone()));
        }
        Err(SourceError::Git {
            what: "fetch",
            stderr: bounded(&stderr),
        })
    }

    /// The ref to fetch, by its full name: one given in full (`refs/...`)
    /// as it is; a bare name as the branch or the tag of that name, asked
    /// of the remote, and refused when it is both. git itself would take
    /// the tag, so whoever may push tags could override a protected branch.
    async fn full_ref(&self) -> Result<String, SourceError> {
        let name = &self.opts.reference;
        if name.starts_with("refs/") {
            return Ok(name.clone());
        }
        let (branch, tag) = (format!("refs/heads/{name}"), format!("refs/tags/{name}"));
        let mut cmd = self.command_with_host_config(&self.mirror());
        cmd.args(["ls-remote", "--refs", "--"])
            .arg(&self.opts.url)
            .args([&branch, &tag]);
        // Part of the fetch, as far as anyone reading the error goes.
        let out = Self::finish(cmd, "fetch").await?;
        if !out.status.success() {
            return Err(SourceError::Git {
                what: "fetch",
                stderr: bounded(&String::from_utf8_lossy(&out.stderr)),
            });
        }
        // Patterns match a ref's tail: only the exact names count.
        let listed = String::from_utf8_lossy(&out.stdout);
        let has = |full: &str| listed.lines().any(|l| l.split('\t').nth(1) == Some(full));
        match (has(&branch), has(&tag)) {
            (true, true) => Err(SourceError::AmbiguousRef { name: name.clone() }),
            (true, false) => Ok(branch),
            (false, true) => Ok(tag),
            (false, false) => Err(SourceError::NoSuchRef(name.clone())),
        }
    }
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn remove_temp_packs(mirror: &Path) {
    let pack = mirror.join("objects/pack");
    if let Ok(entries) = std::fs::read_dir(&pack) {
        for e in entries.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with("tmp_") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
