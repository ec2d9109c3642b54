//! What is read from a VM: its observation (standing while it holds), its
//! statistics, its guest's readiness, console, logs and agent.

use super::error::QemuError;
use super::host::{down_state, now_unix};
use super::machine::Machine;
use super::{conlog, guest, observe, vsock};
use crate::hostfs;
use crate::vm::ObservedVm;
use crate::vm::config::{Probe, ProbeKind};
use crate::vm::health::{Answer, ProbeCursor};
use std::path::PathBuf;
use std::time::Duration;

/// How long one agent or exec probe may take.
const PROBE_AGENT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most of the console log one console probe reads.
const PROBE_CONSOLE_BYTES: u64 = 1 << 20;

impl Machine<'_> {
    /// The full current state of one VM, read from QEMU itself.
    pub async fn observe(&self) -> Result<ObservedVm, QemuError> {
        if let Some(vm) = self.still_seen() {
            return Ok(vm);
        }
        let vm = self.observe_now().await?;
        if vm.state.is_live() {
            self.keep_seen(&vm);
        }
        Ok(vm)
    }

    /// The VM as QEMU has it this moment (no standing observation).
    pub(super) async fn observe_now(&self) -> Result<ObservedVm, QemuError> {
        let name = self.name;
        let rec = self.record()?;
        if !self.alive(&rec) {
            self.forget_all();
            let state = down_state(&rec);
            let memory_hotplug = rec.saved.as_ref().and_then(|s| s.memory_hotplug);
            let exit_error = self.exit_error();
            return Ok(ObservedVm {
                config: rec.config,
                state,
                managed: true,
                exit_error,
                memory_hotplug,
            });
        }
        let q = self.qmp().await?;
        // Listeners relay only while the backend runs; a dead one shows as
        // none, so the next apply puts them (and the backend) back.
        let vsock = (rec.shared_memory
            && vsock::backend_alive(rec.vsock_pid, &self.host.opts.state_dir, name))
        .then(|| vsock::spec_listeners(&self.host.opts.state_dir, name));
        observe::observe(&q, &rec, vsock)
            .await
            .map_err(|source| QemuError::Qmp {
                vm: name.into(),
                source,
            })
    }

    /// Memory and processor statistics of a running VM (hcsshim's `Stats`):
    /// guest RAM from QEMU, host RSS of its process, and the CPU time of its
    /// vCPU threads from `/proc/<pid>/task/<tid>/schedstat`.
    pub async fn stats(&self) -> Result<crate::vm::VmStats, QemuError> {
        let name = self.name;
        let rec = self.running_record()?;
        let q = self.qmp().await?;
        let qerr = |source| QemuError::Qmp {
            vm: name.into(),
            source,
        };
        let mem = q
            .execute("query-memory-size-summary", None)
            .await
            .map_err(qerr)?;
        let field = |v: &serde_json::Value, k: &str| {
            v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0)
        };
        let cpus = q.execute("query-cpus-fast", None).await.map_err(qerr)?;
        let pid = rec.pid.unwrap_or(0);
        let total_runtime_ns = cpus
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("thread-id").and_then(serde_json::Value::as_u64))
            .filter_map(|tid| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).ok()
            })
            .filter_map(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .sum();
        let rss_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        Ok(crate::vm::VmStats {
            assigned_memory_bytes: field(&mem, "base-memory") + field(&mem, "plugged-memory"),
            working_set_bytes: rss_kb * 1024,
            total_runtime_ns,
            uptime_seconds: rec.started_at.map(|t| now_unix().saturating_sub(t)),
        })
    }

    /// Whether the guest has opened its agent port (`uvmctl.agent`): the
    /// sign a guest with uvmctl's agent has booted. QEMU reports the guest's
    /// side of a virtio-serial port as the chardev's `frontend-open`.
    pub async fn guest_ready(&self) -> Result<bool, QemuError> {
        let agent = self.chardev("agent").await?;
        Ok(
            agent.and_then(|c| c.get("frontend-open").and_then(serde_json::Value::as_bool))
                == Some(true),
        )
    }

    /// What `query-chardev` says of the running VM's chardev `label`.
    async fn chardev(&self, label: &str) -> Result<Option<serde_json::Value>, QemuError> {
        let name = self.name;
        let q = self.running_qmp().await?;
        let chardevs = q
            .execute("query-chardev", None)
            .await
            .map_err(|source| QemuError::Qmp {
                vm: name.into(),
                source,
            })?;
        Ok(chardevs
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c.get("label").and_then(serde_json::Value::as_str) == Some(label))
            .cloned())
    }

    /// Where the guest agent channel of a VM listens.
    pub fn agent_socket(&self) -> PathBuf {
        let name = self.name;
        self.host.opts.state_dir.agent_socket(name)
    }

    /// A connection to the running VM's first serial port, for `uvmctl
    /// console`: refused when the spec relays that port to a listener of its
    /// own, or another client holds it (QEMU would accept a second one and
    /// never serve it).
    pub async fn console(&self) -> Result<tokio::net::UnixStream, QemuError> {
        let name = self.name;
        let rec = self.record()?;
        if let Some(s) = rec.config.serial_consoles.iter().find(|s| s.port == 0) {
            return Err(QemuError::Refused {
                vm: name.into(),
                reason: format!(
                    "its COM1 is relayed to {} (spec.serialConsoles); the console is there",
                    s.listener_path.display()
                ),
            });
        }
        let serial0 = self.chardev("serial0").await?;
        let console = serial0
            .as_ref()
            .and_then(|c| c.get("filename").and_then(serde_json::Value::as_str))
            .unwrap_or_default();
        let socket = self.host.opts.state_dir.console_socket(name);
        if !console.contains(&socket.display().to_string()) {
            return Err(QemuError::Refused {
                vm: name.into(),
                reason: "it was launched without a console socket (by an older uvmctl); \
                         restart it to get one"
                    .into(),
            });
        }
        if !console.starts_with("disconnected:") {
            return Err(QemuError::Refused {
                vm: name.into(),
                reason: "its console is in use by another client".into(),
            });
        }
        tokio::net::UnixStream::connect(&socket)
            .await
            .map_err(|e| QemuError::Os {
                vm: name.into(),
                what: format!("cannot connect to its console: {e}"),
            })
    }

    /// The logs `uvmctl logs` prints for a VM uvmctl manages here.
    pub fn logs(&self, previous: bool) -> Result<Vec<guest::Log>, QemuError> {
        let name = self.name;
        self.record()?;
        Ok(guest::logs(&self.host.opts.state_dir, name, previous))
    }

    /// Runs one command of the test guest's agent (guest/README.md) on the
    /// running VM; its data lines.
    pub async fn agent(
        &self,
        words: &[String],
        timeout: Duration,
    ) -> Result<Vec<String>, QemuError> {
        let name = self.name;
        self.running_record()?;
        guest::agent_command(&self.host.opts.state_dir.agent_socket(name), words, timeout)
            .await
            .map_err(|source| QemuError::Agent {
                vm: name.into(),
                source,
            })
    }

    /// Asks the guest one health probe: the agent's `ping`, an agent
    /// command, or the console log past `cursor`. A VM that does not run
    /// fails the probe; it is no error.
    pub async fn probe(
        &self,
        probe: &Probe,
        cursor: &mut ProbeCursor,
    ) -> Result<Answer, QemuError> {
        let refused = |why: &str| QemuError::Refused {
            vm: self.name.into(),
            reason: format!("{} probes: {why}", probe.kind.as_str()),
        };
        if let Some(why) = self.host.caps.probe_refused.get(&probe.kind) {
            return Err(refused(why));
        }
        match self.running_record() {
            Ok(_) => {}
            Err(e @ QemuError::NotRunning { .. }) => return Ok(Answer::fail(e.to_string())),
            Err(e) => return Err(e),
        }
        let socket = self.host.opts.state_dir.agent_socket(self.name);
        let ask = |words: Vec<String>| async move {
            guest::agent_command(&socket, &words, PROBE_AGENT_TIMEOUT).await
        };
        Ok(match probe.kind {
            ProbeKind::Agent => match ask(vec!["ping".into()]).await {
                Ok(lines) if lines.iter().any(|l| l == "pong") => Answer::pass("pong"),
                Ok(lines) => Answer::fail(format!(
                    "the agent answered {:?}, not pong",
                    lines.first().map(String::as_str).unwrap_or_default()
                )),
                Err(guest::AgentError::Refused(said)) => Answer::fail(said),
                Err(e) => Answer::fail(e.to_string()),
            },
            ProbeKind::Exec => match ask(probe.command.clone()).await {
                Ok(lines) => Answer::pass(lines.into_iter().next().unwrap_or_else(|| "OK".into())),
                Err(guest::AgentError::Refused(said)) => Answer::fail(said),
                Err(e) => Answer::fail(e.to_string()),
            },
            ProbeKind::Console => self.console_probe(probe, cursor)?,
            ProbeKind::Notify => {
                match super::notify::heard(&self.host.opts.state_dir.notify_ready(self.name)) {
                    Some(said) => Answer::pass(said),
                    None => Answer::fail(format!(
                        "no READY=1 from the guest on vsock port {} in this launch yet",
                        crate::vm::config::NOTIFY_VSOCK_PORT
                    )),
                }
            }
        })
    }

    /// A console probe: the first whole line past `cursor` that matches.
    fn console_probe(&self, probe: &Probe, cursor: &mut ProbeCursor) -> Result<Answer, QemuError> {
        if let Some(line) = &cursor.matched {
            return Ok(Answer::pass(line.clone()));
        }
        let pattern =
            crate::vm::health::console_pattern(probe.pattern.as_deref().unwrap_or_default())
                .map_err(|e| QemuError::Refused {
                    vm: self.name.into(),
                    reason: format!("console probe pattern: {e}"),
                })?;
        let os = |e: std::io::Error| QemuError::Os {
            vm: self.name.into(),
            what: format!("cannot read its console log: {e}"),
        };
        let dir = &self.host.opts.state_dir;
        let (mut file, id, len) = match hostfs::open_state_file_read(&dir.console_log(self.name)) {
            Ok(opened) => opened,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Answer::fail("no console log yet"));
            }
            Err(e) => return Err(os(e)),
        };
        let mut scan = Vec::new();
        let from = match (cursor.at, cursor.file) {
            (None, _) => {
                // A live change: what comes after it, from the next line.
                let last = match len.checked_sub(1) {
                    Some(at) => hostfs::read_file_from(&mut file, at, 1).map_err(os)?,
                    None => Vec::new(),
                };
                cursor.mid_line = last.first().is_some_and(|b| *b != b'\n');
                (cursor.at, cursor.file) = (Some(len), Some(id));
                return Ok(Answer::fail("no line on COM1 matches yet"));
            }
            (Some(at), Some(was)) if was != id => {
                // Rotated since: what followed `at` is in the old log now.
                if let Ok((mut old, old_id, _)) =
                    hostfs::open_state_file_read(&conlog::old_log(dir, self.name))
                    && old_id == was
                {
                    scan = hostfs::read_file_from(&mut old, at, PROBE_CONSOLE_BYTES).map_err(os)?;
                }
                0
            }
            // Shorter than where it was read to: written anew.
            (Some(at), _) if at > len => 0,
            (Some(at), _) => at,
        };
        let mut bytes = hostfs::read_file_from(&mut file, from, PROBE_CONSOLE_BYTES).map_err(os)?;
        let mut start = from;
        if cursor.mid_line && !scan.is_empty() {
            skip_line(&mut scan, &mut cursor.mid_line, &mut 0);
        }
        if cursor.mid_line {
            skip_line(&mut bytes, &mut cursor.mid_line, &mut start);
        }
        // Whole lines only: a line still being written is read again next
        // time (unless a whole read holds no line end at all).
        let whole = match bytes.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None if bytes.len() as u64 == PROBE_CONSOLE_BYTES => bytes.len(),
            None => 0,
        };
        (cursor.at, cursor.file) = (Some(start + whole as u64), Some(id));
        if !scan.is_empty() && !scan.ends_with(b"\n") {
            scan.push(b'\n');
        }
        scan.extend_from_slice(&bytes[..whole]);
        let text = String::from_utf8_lossy(&scan);
        Ok(match text.lines().find(|l| pattern.is_match(l)) {
            Some(line) => {
                let answer = Answer::pass(line.trim_end_matches('\r'));
                cursor.matched = Some(answer.said.clone());
                answer
            }
            None => Answer::fail("no line on COM1 matches yet"),
        })
    }
}

/// Drops the rest of a line begun before the change from `bytes` (moving
/// `start` past it); `mid_line` stays set while its end has not come.
fn skip_line(bytes: &mut Vec<u8>, mid_line: &mut bool, start: &mut u64) {
    match bytes.iter().position(|b| *b == b'\n') {
        Some(i) => {
            bytes.drain(..=i);
            *start += i as u64 + 1;
            *mid_line = false;
        }
        None => {
            *start += bytes.len() as u64;
            bytes.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::config::ProbeKind;

    fn append(path: &std::path::Path, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("log");
        std::io::Write::write_all(&mut f, bytes).expect("append");
    }

    /// Issue 34 (review): a console probe reads whole lines past its
    /// cursor; after a live change it skips the line being written; across
    /// a rotation it finishes the old log, then reads the new one from its
    /// start, however long that has grown.
    #[test]
    fn a_console_probe_reads_each_line_once_across_rotation() {
        let (_dir, qemu) = crate::virtstack::qemu::test_host();
        let vm = qemu.vm("web");
        let log = qemu.opts.state_dir.console_log("web");
        std::fs::create_dir_all(log.parent().expect("vm dir")).expect("vm dir");
        let probe = Probe {
            pattern: Some("^READY$".into()),
            ..Probe::of(ProbeKind::Console)
        };
        let ask = |cursor: &mut ProbeCursor| vm.console_probe(&probe, cursor).expect("probe");

        // A launch reads this launch's whole log; a line still being
        // written is not read yet.
        std::fs::write(&log, "boot\nREA").expect("log");
        let mut launch = ProbeCursor::from_start();
        assert!(!ask(&mut launch).passed);
        assert_eq!(launch.at, Some(5));
        append(&log, b"DY\n");
        assert_eq!(ask(&mut launch), Answer::pass("READY"));
        assert_eq!(ask(&mut launch), Answer::pass("READY"), "a match stays");

        // A live change: the line being written when it came is not its.
        std::fs::write(&log, "READY\nREA").expect("log");
        let mut live = ProbeCursor::default();
        assert!(!ask(&mut live).passed);
        append(&log, b"DY\nmore\n");
        assert!(!ask(&mut live).passed, "READY was begun before the change");

        // Rotated: the old log's rest, then the new log from its start.
        let mut rotated = ProbeCursor::from_start();
        std::fs::write(&log, "one\n").expect("log");
        assert!(!ask(&mut rotated).passed);
        append(&log, b"READY\n");
        std::fs::rename(&log, conlog::old_log(&qemu.opts.state_dir, "web")).expect("rotate");
        std::fs::write(&log, "a much longer line than before\n").expect("new log");
        assert_eq!(
            ask(&mut rotated),
            Answer::pass("READY"),
            "found in the old log"
        );

        let mut fresh = ProbeCursor::from_start();
        std::fs::write(&log, "one\n").expect("log");
        assert!(!ask(&mut fresh).passed);
        std::fs::rename(&log, conlog::old_log(&qemu.opts.state_dir, "web")).expect("rotate");
        std::fs::write(&log, "a much longer first line\nREADY\n").expect("new log");
        assert_eq!(
            ask(&mut fresh),
            Answer::pass("READY"),
            "the new log from its start"
        );
    }
}
