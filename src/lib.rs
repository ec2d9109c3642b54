//! uvmctl: a declarative manager for lightweight utility VMs.
//!
//! ```text
//! spec files ──spec::load_dir──▶ DesiredState ─┐
//!                                              ├─▶ plan::plan ──▶ Plan (ordered Ops,
//! virtstack ──Observe::observe_all─▶ ObservedState ┘     each classed by the Supported gate)
//!                                                        │
//!                                   plan::render ◀───────┘  text, JSON, --diff
//! ```
//!
//! The planner is pure: the same inputs give a byte-identical plan.

#![warn(missing_docs)]

pub mod apply;
pub mod plan;
pub mod spec;
pub mod virtstack;
pub mod vm;
