//! Mutation fuzzing of the loader and the IR: corrupted bytes never panic; corrupted but
//! decodable models that cannot be valid give a one-line error (see
//! `structural_mutations_give_errors_never_panics`). The CI run is short; for a long run:
//! `FUZZ_ITERATIONS=200000 cargo test --test fuzz_loader -- --nocapture`.

mod common;
use common::*;
use onnx_compress::ir::facts;
use onnx_compress::ir::Model;
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

/// The first error a run meets loading `bytes`: decoding, building the IR, the graph check, or
/// decoding an initializer. `None` when the model is accepted.
fn first_error(bytes: &[u8]) -> Option<String> {
    let proto = match onnx_compress::onnx::load::decode(bytes) {
        Ok(p) => p,
        Err(e) => return Some(format!("{e:#}")),
    };
    let model = match Model::from_proto(proto) {
        Ok(m) => m,
        Err(e) => return Some(format!("{e:#}")),
    };
    if let Err(e) = model.graph.check() {
        return Some(format!("{e:#}"));
    }
    for t in model.graph.initializers.values() {
        if let Err(e) = onnx_compress::onnx::tensor::to_f64(t) {
            return Some(format!("{e:#}"));
        }
    }
    None
}

/// Corruptions a model cannot survive: each must give an error (one line), not a panic and not
/// a silently accepted model. Mutations that may leave a valid model (a random element type
/// can be float again or another 4-byte type; node order is not part of validity) only must
/// not panic.
#[test]
fn structural_mutations_give_errors_never_panics() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for i in 0..iterations() / 3 {
        let mut m = conv_relu();
        let g = m.graph.as_mut().unwrap();
        let kind = rng.random_range(0..7);
        let must_fail = match kind {
            0 => {
                g.node[0].input.clear();
                Some("Conv without inputs")
            }
            1 => {
                g.node[1].output[0] = "x".into();
                Some("Relu writes the graph input x")
            }
            2 => {
                g.initializer[0].dims = vec![-1, 3];
                Some("negative initializer dim")
            }
            3 => {
                g.initializer[0].dims = vec![i64::MAX, i64::MAX];
                Some("initializer dims overflow")
            }
            4 => {
                g.initializer[1].data_type = Some(rng.random_range(-3..40));
                None
            }
            5 => {
                g.node.swap(0, 1);
                None
            }
            _ => {
                g.output[0].name = Some("ghost".into());
                Some("graph output nothing produces")
            }
        };
        let bytes = m.encode_to_vec();
        let result = std::panic::catch_unwind(|| (exercise(&bytes), first_error(&bytes)));
        let Ok(((), err)) = result else {
            panic!("panic on structural mutation #{i} (kind {kind})");
        };
        if let Some(what) = must_fail {
            let err = err.unwrap_or_else(|| panic!("{what}: the model was accepted"));
            assert!(!err.contains('\n'), "{what}: error is not one line: {err}");
        }
    }
}
