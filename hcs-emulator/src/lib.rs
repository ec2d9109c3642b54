//! A stand-in for Windows' `computecore.dll` (the Host Compute Service) on Linux.
//!
//! uvmctl's hcs virtstack loads this library by path and calls the same exported C symbols it
//! calls in computecore.dll. The emulator keeps compute systems in memory (and, with
//! `UVMCTL_HCS_EMULATOR_DIR`, in a directory shared by processes) and refuses what HCS would
//! refuse, checking documents against its own statement of the HCS schema ([`schema`]),
//! written from Microsoft's reference. See README.md.
//!
//! - [`abi`]: the exported functions (all `unsafe` code is there);
//! - [`store`]: compute systems and their lifecycle;
//! - [`schema`]: the schema statement and its validator;
//! - [`modify`]: the HcsModifyComputeSystem resource path table;
//! - [`hresult`]: the HRESULTs.

pub mod abi;
pub mod hresult;
pub mod modify;
pub mod schema;
pub mod store;

#[cfg(test)]
mod tests;
