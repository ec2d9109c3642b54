//! The command line in two levels, as ripgrep has it: [`args`] holds the
//! clap definitions alone; [`host`] turns flags, environment and config
//! file into the library's host options once; each command's body is a
//! module of its own. `main` only dispatches and maps outcomes to exit
//! codes.

pub mod apply;
pub mod args;
// What reaches a QEMU guest, and the vmservice server: unix only.
#[cfg(unix)]
pub mod guest;
pub mod host;
pub mod plan;
#[cfg(unix)]
pub mod serve;
pub mod shared;
pub mod status;
pub mod watch;

pub const EXIT_ERROR: u8 = 1;
pub const EXIT_CHANGES: u8 = 2;
/// A policy stop: above --max-disruption, a recreate not allowed, a prune refused.
pub const EXIT_POLICY: u8 = 3;
pub const EXIT_LOCKED: u8 = 4;
pub const EXIT_STALE_PLAN: u8 = 5;

/// A write to standard output failed (only these may end a command quietly:
/// a broken pipe anywhere else, a QMP socket say, is an error).
#[derive(Debug, thiserror::Error)]
#[error("cannot write to standard output: {0}")]
pub struct StdoutError(pub std::io::Error);

/// Whether `e` is a write to a standard output nobody reads any more.
pub fn closed_stdout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<StdoutError>()
        .is_some_and(|StdoutError(io)| io.kind() == std::io::ErrorKind::BrokenPipe)
}
