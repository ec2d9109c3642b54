//! Replays a fuzz target's corpus (`fuzz/corpus/TARGET`) through its
//! harness's `check`, naming the input that breaks a property.

use std::path::Path;

/// Every input of `target`'s corpus, in name order, through `check`.
pub fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let dir = fuzz.join("corpus").join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .expect("the corpus")
        .map(|e| e.expect("an entry").path())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "no corpus in {}", dir.display());
    for input in &inputs {
        let data = std::fs::read(input).expect("an input");
        let checked = std::panic::catch_unwind(|| check(&data));
        assert!(
            checked.is_ok(),
            "{} breaks a property (above); rerun it with the fuzz target: (cd fuzz && cargo fuzz run --sanitizer none -O {target} {})",
            input.display(),
            input.strip_prefix(&fuzz).unwrap_or(input).display()
        );
    }
}
