//! Reaching a running guest as an operator: its first serial port (the
//! socket `uvmctl console` relays), the test guest's agent (`uvmctl agent`,
//! guest/README.md), and what QEMU and the console said (`uvmctl logs`).

use super::state::StateDir;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// The byte that detaches `uvmctl console`: Ctrl-], as in telnet and virsh.
pub const DETACH: u8 = 0x1d;

/// How long a console whose input has ended (a pipe) keeps printing, once
/// the guest has gone quiet.
pub const QUIET_AFTER_INPUT: Duration = Duration::from_secs(1);

/// The longest a console keeps printing after its input ended.
pub const MAX_LINGER: Duration = Duration::from_secs(10);

/// Why a console relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// The detach key was typed.
    Detached,
    /// The input ended and the guest went quiet.
    InputClosed,
    /// QEMU closed the console (the VM stopped).
    ConsoleClosed,
}

/// Relays `input` to the console and the console to `output` until the
/// detach byte (when given) arrives, the input ends, or QEMU hangs up.
///
/// # Errors
/// A read or write error on either side.
pub async fn relay<W: AsyncWrite + Unpin>(
    console: UnixStream,
    mut input: mpsc::Receiver<Vec<u8>>,
    output: &mut W,
    detach: Option<u8>,
) -> io::Result<RelayEnd> {
    let (mut from_guest, mut to_guest) = console.into_split();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = from_guest.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    return Ok(RelayEnd::ConsoleClosed);
                }
                output.write_all(&buf[..n]).await?;
                output.flush().await?;
            }
            chunk = input.recv() => match chunk {
                Some(chunk) => {
                    let (send, detached) = match detach.and_then(|d| chunk.iter().position(|b| *b == d)) {
                        Some(at) => (&chunk[..at], true),
                        None => (&chunk[..], false),
                    };
                    to_guest.write_all(send).await?;
                    if detached {
                        return Ok(RelayEnd::Detached);
                    }
                }
                None => break,
            },
        }
    }
    // Input ended (a pipe): print the answer until the guest goes quiet.
    let deadline = tokio::time::Instant::now() + MAX_LINGER;
    loop {
        let quiet = tokio::time::Instant::now() + QUIET_AFTER_INPUT;
        match tokio::time::timeout_at(quiet.min(deadline), from_guest.read(&mut buf)).await {
            Ok(Ok(0)) => return Ok(RelayEnd::ConsoleClosed),
            Ok(Ok(n)) => {
                output.write_all(&buf[..n]).await?;
                output.flush().await?;
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(RelayEnd::InputClosed),
        }
    }
}

/// Why an agent command failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The command cannot be sent as one line.
    #[error("agent command words cannot contain a newline, a carriage return or a NUL")]
    BadWord,
    /// The agent socket could not be reached.
    #[error("cannot reach the guest agent at {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("guest agent: {0}")]
    Io(#[from] io::Error),
    /// No final line in time.
    #[error("guest agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent closed the connection before its final line.
    #[error("guest agent hung up before answering")]
    HungUp,
    /// The answer went past its bound.
    #[error("guest agent answer is over {MAX_AGENT_ANSWER_BYTES} bytes; refused")]
    TooLong,
    /// The agent answered `ERR <message>` (shown escaped: it is the
    /// guest's text, on its way to a terminal).
    #[error("guest agent: {}", crate::escape::escaped(.0))]
    Refused(String),
}

/// The most an agent answer may hold (`cat` gives up to 1 MiB, `dmesg` less).
pub const MAX_AGENT_ANSWER_BYTES: usize = 4 << 20;

/// Sends one command to the agent listening on `socket` and returns its
/// data lines, dot-stuffing removed (protocol: guest/README.md).
///
/// # Errors
/// [`AgentError`]; `Refused` carries the agent's own `ERR` message.
pub async fn agent_command(
    socket: &Path,
    words: &[String],
    timeout: Duration,
) -> Result<Vec<String>, AgentError> {
    if words.iter().any(|w| w.contains(['\n', '\r', '\0'])) {
        return Err(AgentError::BadWord);
    }
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| AgentError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
        let (read, mut write) = stream.into_split();
        let mut line = words.join(" ");
        line.push('\n');
        write.write_all(line.as_bytes()).await?;
        let mut reader = BufReader::new(read).take(MAX_AGENT_ANSWER_BYTES as u64);
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            if reader.read_until(b'\n', &mut raw).await? == 0 {
                return Err(if reader.limit() == 0 {
                    AgentError::TooLong
                } else {
                    AgentError::HungUp
                });
            }
            let text = String::from_utf8_lossy(&raw);
            let text = text.trim_end_matches('\n').trim_end_matches('\r');
            if text == "OK" {
                return Ok(lines);
            }
            if text == "ERR" || text.starts_with("ERR ") {
                return Err(AgentError::Refused(
                    text.trim_start_matches("ERR").trim_start().to_string(),
                ));
            }
            lines.push(text.strip_prefix('.').unwrap_or(text).to_string());
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(AgentError::Timeout(timeout)))
}

/// A log `uvmctl logs` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// Where it is.
    pub path: PathBuf,
    /// Printed once, never followed: the earlier part of a rotated log,
    /// which is replaced at every rotation by what was already printed.
    pub once: bool,
}

/// The logs of a VM: QEMU's stderr, then what the guest wrote to its
/// console (its earlier part first, where the log was rotated); with
/// `previous`, the console of the launch before.
pub fn logs(dir: &StateDir, name: &str, previous: bool) -> Vec<Log> {
    let log = |path, once| Log { path, once };
    if previous {
        vec![log(dir.previous_console_log(name), false)]
    } else {
        vec![
            log(dir.stderr_log(name), false),
            log(super::conlog::old_log(dir, name), true),
            log(dir.console_log(name), false),
        ]
    }
}

/// Prints logs as `tail` does several files: a `==> path <==` header
/// before output from a file other than the one printed last.
pub struct LogPrinter {
    files: Vec<Followed>,
    last: Option<usize>,
    /// Control characters shown as escapes (`crate::escape`); `None`:
    /// the bytes as the guest wrote them (`--raw`).
    escaper: Option<crate::escape::Escaper>,
    /// The first print is done.
    printed_once: bool,
}

struct Followed {
    path: PathBuf,
    once: bool,
    file: Option<std::fs::File>,
    inode: Option<(u64, u64)>,
    offset: u64,
}

impl LogPrinter {
    /// Printing these logs from their start.
    pub fn new(logs: &[Log]) -> Self {
        LogPrinter {
            files: logs
                .iter()
                .map(|l| Followed {
                    path: l.path.clone(),
                    once: l.once,
                    file: None,
                    inode: None,
                    offset: 0,
                })
                .collect(),
            last: None,
            escaper: Some(crate::escape::Escaper::default()),
            printed_once: false,
        }
    }

    /// Prints the guest's bytes as they are, escape sequences and all.
    #[must_use]
    pub fn raw(mut self, raw: bool) -> Self {
        if raw {
            self.escaper = None;
        }
        self
    }

    /// Prints what each log gained since the last call (a log replaced by a
    /// new launch is read from its start; one cut short, from the cut).
    /// Returns whether anything was printed.
    ///
    /// # Errors
    /// Writing `out` failed, or a log is not uvmctl's own regular file.
    pub fn print_new(&mut self, out: &mut impl Write) -> io::Result<bool> {
        let mut printed = false;
        let first = !self.printed_once;
        for i in 0..self.files.len() {
            // The rest of the file already open first: a log a new launch
            // replaced may still hold the old guest's last words.
            printed |= self.drain(i, out)?;
            let f = &mut self.files[i];
            let now = std::fs::symlink_metadata(&f.path)
                .ok()
                .map(|m| (m.dev(), m.ino()));
            // A once-only log is opened at the first print or never.
            if now.is_none() || now == f.inode || (f.once && !first) {
                continue;
            }
            // Never through a link planted where a log goes.
            match crate::hostfs::open_state_reader(&f.path) {
                Ok(file) => {
                    f.file = Some(file);
                    f.inode = now;
                    f.offset = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}: {e}", f.path.display()),
                    ));
                }
            }
            printed |= self.drain(i, out)?;
        }
        self.printed_once = true;
        out.flush()?;
        Ok(printed)
    }

    fn drain(&mut self, i: usize, out: &mut impl Write) -> io::Result<bool> {
        let f = &mut self.files[i];
        let Some(file) = f.file.as_mut() else {
            return Ok(false);
        };
        if file.metadata()?.len() < f.offset {
            f.offset = 0;
        }
        file.seek(SeekFrom::Start(f.offset))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut printed = false;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(printed);
            }
            if self.last != Some(i) {
                if self.last.is_some() {
                    if let Some(e) = self.escaper.as_mut() {
                        let mut rest = Vec::new();
                        e.finish(&mut rest);
                        out.write_all(&rest)?;
                    }
                    writeln!(out)?;
                }
                writeln!(out, "==> {} <==", f.path.display())?;
                self.last = Some(i);
            }
            match self.escaper.as_mut() {
                Some(e) => {
                    let mut shown = Vec::with_capacity(n + n / 8);
                    e.push(&buf[..n], &mut shown);
                    out.write_all(&shown)?;
                }
                None => out.write_all(&buf[..n])?,
            }
            f.offset += n as u64;
            printed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_detach_key_ends_the_relay_and_is_not_sent() {
        let (ours, qemus) = UnixStream::pair().expect("pair");
        let (tx, rx) = mpsc::channel(4);
        tx.send(b"ls\n".to_vec()).await.expect("send");
        tx.send(vec![b'x', DETACH, b'y']).await.expect("send");
        let mut out = Vec::new();
        let end = relay(ours, rx, &mut out, Some(DETACH))
            .await
            .expect("relay");
        assert_eq!(end, RelayEnd::Detached);
        drop(tx);
        let mut got = Vec::new();
        let mut qemus = qemus;
        qemus.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"ls\nx");
    }

    #[tokio::test]
    async fn after_the_input_ends_the_answer_is_still_printed() {
        let (ours, mut qemus) = UnixStream::pair().expect("pair");
        let (tx, rx) = mpsc::channel(4);
        tx.send(b"uname\n".to_vec()).await.expect("send");
        drop(tx);
        let guest = tokio::spawn(async move {
            let mut line = [0u8; 6];
            qemus.read_exact(&mut line).await.expect("read");
            tokio::time::sleep(Duration::from_millis(200)).await;
            qemus.write_all(b"Linux\r\n").await.expect("write");
            qemus
        });
        let mut out = Vec::new();
        let end = relay(ours, rx, &mut out, None).await.expect("relay");
        assert_eq!(end, RelayEnd::InputClosed);
        assert_eq!(out, b"Linux\r\n");
        drop(guest.await);
    }

    #[tokio::test]
    async fn agent_answers_are_unstuffed_and_errors_typed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
        let agent = tokio::spawn(async move {
            for answer in [
                &b".OK\n..x\nplain\nOK\n"[..],
                b"ERR usage: ls <dir>\n",
                b"half",
            ] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while s.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                    line.push(byte[0]);
                }
                s.write_all(answer).await.expect("answer");
            }
        });
        let t = Duration::from_secs(5);
        let words = |w: &[&str]| w.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            agent_command(&sock, &words(&["cat", "/f"]), t)
                .await
                .expect("ok"),
            ["OK", ".x", "plain"]
        );
        match agent_command(&sock, &words(&["ls"]), t).await {
            Err(AgentError::Refused(m)) => assert_eq!(m, "usage: ls <dir>"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            agent_command(&sock, &words(&["ping"]), t).await,
            Err(AgentError::HungUp)
        ));
        assert!(matches!(
            agent_command(&sock, &words(&["cat", "a\nreboot"]), t).await,
            Err(AgentError::BadWord)
        ));
        agent.await.expect("agent");
    }

    #[test]
    fn logs_print_what_they_gained_with_a_header_per_switch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = dir.path().join("qemu.log");
        let b = dir.path().join("console.log");
        std::fs::write(&a, "warning\n").expect("write");
        let mut p = LogPrinter::new(&[
            Log {
                path: a.clone(),
                once: false,
            },
            Log {
                path: b.clone(),
                once: false,
            },
        ]);
        let mut out = Vec::new();
        assert!(p.print_new(&mut out).expect("print"));
        std::fs::write(&b, "boot\n").expect("write");
        assert!(p.print_new(&mut out).expect("print"));
        assert!(!p.print_new(&mut out).expect("print"));
        // A new launch: a fresh console log replaces the old one.
        std::fs::remove_file(&b).expect("rm");
        std::fs::write(&b, "again\n").expect("write");
        assert!(p.print_new(&mut out).expect("print"));
        let text = String::from_utf8(out).expect("utf8");
        assert_eq!(
            text,
            format!(
                "==> {} <==\nwarning\n\n==> {} <==\nboot\nagain\n",
                a.display(),
                b.display()
            )
        );
        // Never through a link.
        std::fs::remove_file(&b).expect("rm");
        std::os::unix::fs::symlink("/etc/hostname", &b).expect("link");
        let mut p = LogPrinter::new(&[Log {
            path: b,
            once: false,
        }]);
        assert!(p.print_new(&mut Vec::new()).is_err());
    }
}
