//! Integration tests: the `uvmctl` binary as users run it.

mod cli;
mod conformance;
mod fleet;
mod host;
mod interop;
mod qemu;
mod schema;
mod security;
mod serve;
mod vsock;
mod watch;
