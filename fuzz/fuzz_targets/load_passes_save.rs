//! Raw bytes as an ONNX model through load -> fuse, cleanup, quantize -> save (see
//! `common.rs` for the properties). Seed the corpus with the testdata models, which libFuzzer
//! then mutates at the byte level: `mkdir -p fuzz/corpus/load_passes_save &&
//! cp testdata/*.onnx fuzz/corpus/load_passes_save/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

mod common;

fuzz_target!(|data: &[u8]| {
    common::load_passes_save(data);
});
