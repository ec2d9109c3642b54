//! The fuzz corpus of the QMP reader (`fuzz/corpus/qmp_reader`), replayed on every run
//! of the suite through the fuzz target's own properties
//! (`fuzz/harness/qmp_reader.rs`): each input found once stays checked.
//! Fuzzing campaigns, which find new ones, are `scripts/fuzz`'s.

#[path = "../fuzz/harness/qmp_reader.rs"]
mod harness;

#[test]
fn every_input_of_the_corpus_keeps_the_targets_properties() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/qmp_reader");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .expect("the corpus")
        .map(|e| e.expect("an entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
    for input in &inputs {
        let data = std::fs::read(input).expect("an input");
        let checked = std::panic::catch_unwind(|| harness::check(&data));
        assert!(
            checked.is_ok(),
            "{} breaks a property (above); rerun it with the fuzz target: (cd fuzz && cargo fuzz run --sanitizer none -O qmp_reader {})",
            input.display(),
            input
                .strip_prefix(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz"))
                .unwrap_or(input)
                .display()
        );
    }
}
