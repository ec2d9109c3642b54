//! The fuzz corpus of the spec loader (`fuzz/corpus/spec_loader`), replayed on every run
//! of the suite through the fuzz target's own properties
//! (`fuzz/harness/spec_loader.rs`): each input found once stays checked.
//! Fuzzing campaigns, which find new ones, are `scripts/fuzz`'s.

#[path = "../fuzz/harness/spec_loader.rs"]
mod harness;

#[test]
fn every_input_of_the_corpus_keeps_the_targets_properties() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/spec_loader");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .expect("the corpus")
        .map(|e| e.expect("an entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
    // The loader contains a parser's panic to its file; the default hook
    // would take a backtrace for it, which counts against the memory budget.
    std::panic::set_hook(Box::new(|info| eprintln!("{info}")));
    for input in &inputs {
        let data = std::fs::read(input).expect("an input");
        let checked = std::panic::catch_unwind(|| harness::check(&data));
        assert!(
            checked.is_ok(),
            "{} breaks a property (above); rerun it with the fuzz target: (cd fuzz && cargo fuzz run --sanitizer none -O spec_loader {})",
            input.display(),
            input
                .strip_prefix(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz"))
                .unwrap_or(input)
                .display()
        );
    }
}
