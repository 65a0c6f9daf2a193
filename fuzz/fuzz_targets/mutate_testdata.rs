//! Structure-aware: a testdata model (chosen by the first input byte) mutated by the test
//! suite's mutator (`tests/common/mutate.rs`: dims, initializers, wiring, attributes, op
//! types, opsets, external data, outputs, NaN weights, byte flips), with every choice the
//! mutator makes read from the fuzzer's input bytes, so coverage feedback steers the
//! mutations. Then the load -> passes -> save path of `common.rs`. Needs no corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
#[allow(dead_code)]
#[path = "../../tests/common/mutate.rs"]
mod mutate;

const MODELS: [&[u8]; 6] = [
    include_bytes!("../../testdata/digits_cnn.onnx"),
    include_bytes!("../../testdata/mlp.onnx"),
    include_bytes!("../../testdata/mobilenet_like.onnx"),
    include_bytes!("../../testdata/residual.onnx"),
    include_bytes!("../../testdata/conv_bn_relu.onnx"),
    include_bytes!("../../testdata/if_model.onnx"),
];

/// Random numbers read from the fuzzer's bytes; once they run out, a ChaCha8 stream seeded by
/// the input's length (deterministic, and no rejection loop can spin on a constant).
struct FuzzerBytes<'a> {
    data: &'a [u8],
    rest: ChaCha8Rng,
}

impl RngCore for FuzzerBytes<'_> {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        for d in dst {
            match self.data.split_first() {
                Some((first, rest)) => {
                    *d = *first;
                    self.data = rest;
                }
                None => *d = self.rest.next_u32() as u8,
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let model = <onnx_compress::onnx::proto::ModelProto as prost::Message>::decode(
        MODELS[choice as usize % MODELS.len()],
    )
    .expect("testdata model decodes");
    let mut rng = FuzzerBytes {
        data: rest,
        rest: ChaCha8Rng::seed_from_u64(data.len() as u64),
    };
    let count = 1 + (choice as usize / MODELS.len()) % 3;
    let mutated = mutate::mutate(&model, count, &mut rng);
    common::load_passes_save(&mutated.bytes);
});
