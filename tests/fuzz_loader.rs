//! Mutation fuzzing of the loader and the IR: corrupted bytes and corrupted-but-decodable
//! models must give errors, never panics. The CI run is short; for a long run:
//! `FUZZ_ITERATIONS=200000 cargo test --test fuzz_loader -- --nocapture`.

mod common;
use common::*;
use onnx_compress::ir::Model;
use onnx_compress::ir::facts;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn iterations() -> usize {
    std::env::var("FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// Everything a user-facing run does with a model, short of tract.
fn exercise(bytes: &[u8]) {
    let Ok(proto) = onnx_compress::onnx::load::decode(bytes) else {
        return;
    };
    let Ok(model) = Model::from_proto(proto) else {
        return;
    };
    let _ = facts::model_stats(&model, &facts::known_shapes(&model));
    let _ = model.to_proto().map(|p| p.encode_to_vec());
    for t in model.graph.initializers.values() {
        let _ = onnx_compress::onnx::tensor::to_f64(t);
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let mut v = vec![conv_relu().encode_to_vec()];
    for p in testdata_models().into_iter().take(6) {
        if let Ok(b) = std::fs::read(&p) {
            if b.len() < 64 * 1024 {
                v.push(b);
            }
        }
    }
    v
}

#[test]
fn byte_mutations_never_panic() {
    let seeds = seeds();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for i in 0..iterations() {
        let mut b = seeds[i % seeds.len()].clone();
        for _ in 0..rng.random_range(1..6) {
            if b.is_empty() {
                break;
            }
            let at = rng.random_range(0..b.len());
            match rng.random_range(0..4) {
                0 => b[at] ^= 1 << rng.random_range(0..8),
                1 => b[at] = rng.random(),
                2 => b.truncate(at),
                _ => {
                    let extra: Vec<u8> =
                        (0..rng.random_range(1..8)).map(|_| rng.random()).collect();
                    b.splice(at..at, extra);
                }
            }
        }
        let result = std::panic::catch_unwind(|| exercise(&b));
        assert!(result.is_ok(), "panic on mutated input #{i}: {:?}", b);
    }
}

#[test]
fn structural_mutations_never_panic() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for i in 0..iterations() / 3 {
        let mut m = conv_relu();
        let g = m.graph.as_mut().unwrap();
        match rng.random_range(0..7) {
            0 => g.node[0].input.clear(),
            1 => g.node[1].output[0] = "x".into(),
            2 => g.initializer[0].dims = vec![-1, 3],
            3 => g.initializer[0].dims = vec![i64::MAX, i64::MAX],
            4 => g.initializer[1].data_type = Some(rng.random_range(-3..40)),
            5 => g.node.swap(0, 1),
            _ => g.output[0].name = Some("ghost".into()),
        }
        let bytes = m.encode_to_vec();
        let result = std::panic::catch_unwind(|| exercise(&bytes));
        assert!(result.is_ok(), "panic on structural mutation #{i}");
    }
}
