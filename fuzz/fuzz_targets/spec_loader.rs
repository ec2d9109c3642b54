//! The spec loader target (libFuzzer): the properties are the harness's
//! (`fuzz/harness/spec_loader.rs`), which the normal suite also replays
//! over the corpus (`tests/fuzz_corpus_spec_loader.rs`).

#![no_main]

#[path = "../harness/spec_loader.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // libfuzzer-sys aborts on every panic, from its panic hook, even one the
    // loader catches (it contains a parser panic to its file): print the
    // message only (a backtrace would count against the memory budget), and
    // abort on a panic that escapes.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| std::panic::set_hook(Box::new(|info| eprintln!("{info}"))));
    if std::panic::catch_unwind(|| harness::check(data)).is_err() {
        std::process::abort();
    }
});
