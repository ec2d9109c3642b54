//! The fuzz corpus of the QMP reader (`fuzz/corpus/qmp_reader`), replayed on every run
//! of the suite through the fuzz target's own properties
//! (`fuzz/harness/qmp_reader.rs`): each input found once stays checked.
//! Fuzzing campaigns, which find new ones, are `scripts/fuzz`'s.
//! QMP is the qemu virtstack's: unix only.
#![cfg(unix)]

#[path = "../fuzz/harness/qmp_reader.rs"]
mod harness;
#[path = "support/fuzz_replay.rs"]
mod replay;

#[test]
fn every_input_of_the_corpus_keeps_the_targets_properties() {
    replay::replay("qmp_reader", harness::check, replay::Panics::Any);
}
