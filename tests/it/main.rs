//! Integration tests: the `uvmctl` binary as users run it.

mod cli;
mod qemu;
