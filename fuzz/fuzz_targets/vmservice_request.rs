//! The vmservice_request target (libFuzzer): the properties are the harness's
//! (`fuzz/harness/vmservice_request.rs`), which the normal suite also replays over the
//! corpus (`tests/fuzz_corpus_vmservice_request.rs`).

#![no_main]

#[path = "../harness/vmservice_request.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::check(data));
