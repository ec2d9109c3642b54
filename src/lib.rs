//! uvmctl: a declarative manager for lightweight utility VMs.
//!
//! ```text
//! spec files ──spec::load_dir──▶ DesiredState ──┐
//!                                               ├─▶ plan::plan ──▶ Plan (ordered Ops,
//! Virtstack ──reconcile::observe_all─▶ ObservedState ┘   each classed by the Supported
//!   (per VM: observed or unknown)                       gate and the refusals)
//!                                                        │
//!                     apply::preflight, apply::apply ◀───┤──▶ plan::render (text, JSON, --diff)
//!                                 │
//!                     Virtstack trait (qemu, fake, ...) ──▶ the VMs
//! ```
//!
//! Layers depend only downward: `vm` (the vocabulary, `VmConfig`, observed
//! state, capabilities, the item model and the traits; no I/O) ← `spec` and
//! `plan` (pure) ← `virtstack` (implementations) and `apply` (the executor,
//! which knows virtstacks only through the trait) ← `reconcile` and
//! `inspect` ← the CLI. The planner is pure: the same inputs give a
//! byte-identical plan.

#![warn(missing_docs)]

pub mod vm;

pub mod spec;

pub mod plan;

pub mod virtstack;

pub mod apply;

pub mod reconcile;

pub mod inspect;
