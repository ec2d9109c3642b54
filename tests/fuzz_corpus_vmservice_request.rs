//! The fuzz corpus of the vmservice server's request handlers (`fuzz/corpus/vmservice_request`), replayed on every run
//! of the suite through the fuzz target's own properties
//! (`fuzz/harness/vmservice_request.rs`): each input found once stays checked.
//! Fuzzing campaigns, which find new ones, are `scripts/fuzz`'s.

#[path = "../fuzz/harness/vmservice_request.rs"]
mod harness;
#[path = "support/fuzz_replay.rs"]
mod replay;

#[test]
fn every_input_of_the_corpus_keeps_the_targets_properties() {
    replay::replay("vmservice_request", harness::check, replay::Panics::Any);
}
