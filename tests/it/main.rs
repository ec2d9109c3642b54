//! Integration tests: the `uvmctl` binary as users run it, on Linux (real
//! QEMU guests, unix sockets, namespaces). uvmctl.exe is driven through
//! Wine by `tests/wine.rs` instead.
#![cfg(unix)]

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
