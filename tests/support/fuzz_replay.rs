//! Replays a fuzz target's corpus (`fuzz/corpus/TARGET`) through its
//! harness's `check`, naming the input that breaks a property.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// A panic happened anywhere (a spawned task's included).
static PANICKED: AtomicBool = AtomicBool::new(false);

/// How a panic inside `check` that does not reach it counts.
#[allow(dead_code, reason = "each replay test uses one of them")]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Panics {
    /// Any panic breaks the input, as under libFuzzer, whose hook aborts on
    /// every panic (a spawned task's too, which tokio would swallow here).
    Any,
    /// Only one that escapes `check` (the target contains some by design).
    Escaping,
}

/// Every input of `target`'s corpus, in name order, through `check`.
pub fn replay(target: &str, check: fn(&[u8]), panics: Panics) {
    if panics == Panics::Any {
        std::panic::set_hook(Box::new(|info| {
            PANICKED.store(true, Ordering::SeqCst);
            eprintln!("{info}");
        }));
    }
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
            checked.is_ok() && !PANICKED.load(Ordering::SeqCst),
            "{} breaks a property (above); rerun it with the fuzz target: (cd fuzz && cargo fuzz run --sanitizer none -O {target} {})",
            input.display(),
            input.strip_prefix(&fuzz).unwrap_or(input).display()
        );
    }
}
