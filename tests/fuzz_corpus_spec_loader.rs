//! The fuzz corpus of the spec loader (`fuzz/corpus/spec_loader`), replayed on every run
//! of the suite through the fuzz target's own properties
//! (`fuzz/harness/spec_loader.rs`): each input found once stays checked.
//! Fuzzing campaigns, which find new ones, are `scripts/fuzz`'s.

#[path = "../fuzz/harness/spec_loader.rs"]
mod harness;
#[path = "support/fuzz_replay.rs"]
mod replay;

#[test]
fn every_input_of_the_corpus_keeps_the_targets_properties() {
    // The loader contains a parser's panic to its file; the default hook
    // would take a backtrace for it, which counts against the memory budget.
    std::panic::set_hook(Box::new(|info| eprintln!("{info}")));
    replay::replay("spec_loader", harness::check, replay::Panics::Escaping);
}
