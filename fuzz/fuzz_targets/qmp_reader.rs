//! The qmp_reader target (libFuzzer): the properties are the harness's
//! (`fuzz/harness/qmp_reader.rs`), which the normal suite also replays over the
//! corpus (`tests/fuzz_corpus_qmp_reader.rs`).

#![no_main]

#[path = "../harness/qmp_reader.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::check(data));
