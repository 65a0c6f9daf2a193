//! Timing of the Hessian trace estimation: `cargo bench --bench hessian_timing -- MODEL.onnx
//! [samples] [max_probes]` (seeded standard-normal inputs, batch 1 per sample).
use onnx_compress::calibrate::{CalibrationSet, DataOptions};
use onnx_compress::hessian::{sensitivity, HessianOptions};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    // cargo bench appends `--bench`: positional arguments only.
    let args: Vec<String> = std::env::args().filter(|a| !a.starts_with("--")).collect();
    let path = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("testdata/digits_cnn.onnx");
    let samples: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
    let max: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let m = onnx_compress::ir::Model::load(std::path::Path::new(path))?;
    let calib = CalibrationSet::synthetic(
        &m,
        samples,
        0,
        &DataOptions {
            batch_size: samples,
            ..Default::default()
        },
    )?;
    let opts = HessianOptions {
        max_samples: max,
        ..Default::default()
    };
    let t = Instant::now();
    let s = sensitivity(&m, &calib.batches, &opts)?;
    let wall = t.elapsed().as_secs_f64();
    let probes: usize = s.iter().map(|l| l.samples).sum();
    for l in &s {
        println!(
            "{:40} n={:>8} Tr/n={:.3e} ±{:.1}% probes={:>3} {:.2}s",
            l.node,
            l.params,
            l.trace_per_param,
            100.0 * l.hessian_trace_stderr / l.hessian_trace.abs().max(1e-30),
            l.samples,
            l.seconds
        );
    }
    println!(
        "{} layers, {samples} samples, {probes} probes, wall {wall:.1}s",
        s.len()
    );
    Ok(())
}
