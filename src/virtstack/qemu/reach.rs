//! What is read from a VM: its observation (standing while it holds), its
//! statistics, its guest's readiness, console, logs and agent.

use super::error::QemuError;
use super::host::{down_state, now_unix};
use super::machine::Machine;
use super::{guest, observe, vsock};
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
        .then(|| vsock::listeners(&self.host.opts.state_dir, name));
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
                Err(e) => Answer::fail(e.to_string()),
            },
            ProbeKind::Exec => match ask(probe.command.clone()).await {
                Ok(lines) => Answer::pass(lines.into_iter().next().unwrap_or_else(|| "OK".into())),
                Err(guest::AgentError::Refused(said)) => Answer::fail(said),
                Err(e) => Answer::fail(e.to_string()),
            },
            ProbeKind::Console => self.console_probe(probe, cursor)?,
            ProbeKind::Notify => return Err(refused("not run by the qemu virtstack")),
        })
    }

    /// A console probe: the first whole line past `cursor` that matches.
    fn console_probe(&self, probe: &Probe, cursor: &mut ProbeCursor) -> Result<Answer, QemuError> {
        let pattern =
            crate::vm::health::console_pattern(probe.pattern.as_deref().unwrap_or_default())
                .map_err(|e| QemuError::Refused {
                    vm: self.name.into(),
                    reason: format!("console probe pattern: {e}"),
                })?;
        if let Some(line) = &cursor.matched {
            return Ok(Answer::pass(line.clone()));
        }
        let path = self.host.opts.state_dir.console_log(self.name);
        let from = cursor.at;
        let (bytes, start) =
            match crate::hostfs::read_state_file_from(&path, from, PROBE_CONSOLE_BYTES) {
                Ok(read) => read,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(Answer::fail("no console log yet"));
                }
                Err(e) => {
                    return Err(QemuError::Os {
                        vm: self.name.into(),
                        what: format!("cannot read its console log: {e}"),
                    });
                }
            };
        // Whole lines only: a line still being written is read again next
        // time (unless a whole read holds no line end at all).
        let whole = match bytes.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            None if bytes.len() as u64 == PROBE_CONSOLE_BYTES => bytes.len(),
            None => 0,
        };
        cursor.at = Some(start + whole as u64);
        let text = String::from_utf8_lossy(&bytes[..whole]);
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
