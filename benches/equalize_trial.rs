//! Cross-layer equalization on real models: fuse + cleanup, then equalize; prints the time,
//! the pairs and exclusions, and the relative output change in tract on random inputs.
//! `cargo bench --bench equalize_trial -- [MODEL.onnx ...]` (default: the testdata
//! classifiers).
use onnx_compress::ir::Model;
use onnx_compress::passes::equalize::{self, EqualizeOptions};
use onnx_compress::passes::{run_passes, PassContext};
use onnx_compress::runtime::{resolve_input_shapes, run_model};
use rand::{Rng, SeedableRng};
use std::path::Path;

fn main() -> anyhow::Result<()> {
    // cargo bench appends `--bench`: positional arguments only.
    let mut paths: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if paths.is_empty() {
        paths = ["digits_cnn", "mobilenet_like", "residual"]
            .iter()
            .map(|m| format!("{}/testdata/{m}.onnx", env!("CARGO_MANIFEST_DIR")))
            .collect();
    }
    for path in paths {
        let mut model = onnx_compress::ir::Model::load(Path::new(&path))?;
        run_passes(&mut model, &["fuse", "cleanup"], &PassContext::default())?;
        let orig = model.to_proto()?;
        let t = std::time::Instant::now();
        let mut eq = Model::from_proto(orig.clone())?;
        let stats = equalize::run(&mut eq, &EqualizeOptions::default())?;
        let secs = t.elapsed().as_secs_f64();
        let out = eq.to_proto()?;
        let (specs, _) = resolve_input_shapes(&orig, &[])?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let inputs: Vec<(String, ndarray::ArrayD<f32>)> = specs
            .iter()
            .map(|s| {
                let a = ndarray::ArrayD::from_shape_fn(s.shape.clone(), |_| {
                    rng.random::<f32>() * 2.0 - 1.0
                });
                (s.name.clone(), a)
            })
            .collect();
        let a = run_model(&orig, &inputs, &[])?;
        let b = run_model(&out, &inputs, &[])?;
        // NaN-aware: a value finite on one side only is reported as infinite error.
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for ((_, x), (_, y)) in a.iter().zip(&b) {
            for (&p, &q) in x.iter().zip(y.iter()) {
                let e = if p.is_finite() && q.is_finite() {
                    f64::from((p - q).abs())
                } else if p.to_bits() == q.to_bits() {
                    0.0
                } else {
                    f64::INFINITY
                };
                // Written so that a NaN error also replaces the running maximum.
                #[allow(clippy::neg_cmp_op_on_partial_ord)]
                if !(e <= num) {
                    num = e;
                }
                if p.is_finite() && f64::from(p.abs()) > den {
                    den = f64::from(p.abs());
                }
            }
        }
        println!(
            "{path}: equalize {secs:.2}s, {} changes, {} pairs, {} excluded, relative output change {:.2e}",
            stats.changes,
            stats.details["pairs"].as_array().map_or(0, |p| p.len()),
            stats.details["excluded"].as_array().map_or(0, |p| p.len()),
            num / den.max(1e-30)
        );
        for n in &stats.notes {
            println!("  note: {n}");
        }
    }
    Ok(())
}
