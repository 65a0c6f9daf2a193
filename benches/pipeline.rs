//! `cargo bench --bench pipeline`: time the load/save round trip, each pass, and calibration
//! alone on one mid-size model. A hand-written loop (warmup, then the median of N runs) instead
//! of criterion: the passes take milliseconds to seconds, where a median of a few runs is stable
//! enough and no extra dependency is needed.
//!
//! Model: `$BENCH_MODEL`, else /work/models/torchvision/mobilenet_v2.onnx when present, else
//! testdata/mobilenet_like.onnx (so a fresh clone runs it). `$BENCH_ITERS` (default 5) runs per
//! row after one warmup. Calibration: `$BENCH_CALIB_SAMPLES` (default 8) seeded synthetic
//! samples, the same set for equalize, quantize, prune and calibration alone.

use anyhow::{Context, Result};
use onnx_compress::calibrate::{observe, CalibrationSet, DataOptions};
use onnx_compress::ir::Model;
use onnx_compress::onnx::save;
use onnx_compress::passes::{self, PassContext};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Warm up once, then return (median, min) seconds of `iters` runs of `f` on a fresh `setup()`.
fn time<S, T>(
    iters: usize,
    mut setup: impl FnMut() -> S,
    mut f: impl FnMut(S) -> Result<T>,
) -> Result<(f64, f64)> {
    f(setup())?;
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let s = setup();
        let t0 = Instant::now();
        let out = f(s)?;
        ts.push(t0.elapsed().as_secs_f64());
        drop(out);
    }
    ts.sort_by(f64::total_cmp);
    Ok((ts[ts.len() / 2], ts[0]))
}

fn run_pass(model: &Model, name: &'static str, ctx: &PassContext) -> Result<Model> {
    let mut m = model.clone();
    passes::run_passes(&mut m, &[name], ctx).with_context(|| format!("pass {name}"))?;
    Ok(m)
}

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_path = std::env::var_os("BENCH_MODEL")
        .map(PathBuf::from)
        .or_else(|| {
            let p = PathBuf::from("/work/models/torchvision/mobilenet_v2.onnx");
            p.is_file().then_some(p)
        })
        .unwrap_or_else(|| root.join("testdata/mobilenet_like.onnx"));
    let iters = env_usize("BENCH_ITERS", 5).max(1);
    let samples = env_usize("BENCH_CALIB_SAMPLES", 8).max(1);
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("out.onnx");

    let original = onnx_compress::ir::Model::load(&model_path)
        .with_context(|| format!("loading {}", model_path.display()))?;
    let calib = Arc::new(CalibrationSet::synthetic(
        &original,
        samples,
        0,
        &DataOptions::default(),
    )?);
    let named: Vec<onnx_compress::calibrate::NamedBatch> = calib.named_batches();
    let mut ctx = PassContext {
        calibration: Some(calib.clone()),
        ..Default::default()
    };
    ctx.equalize.calibration = Some(Arc::new(named.clone()));
    ctx.prune.calibration = named.first().cloned();
    let mut prune_ctx = ctx.clone();
    prune_ctx.prune.ratio = 0.3;

    // Each pass runs on the graph it sees in the pipeline.
    let fused = run_pass(&original, "fuse", &ctx)?;
    let cleaned = run_pass(&fused, "cleanup", &ctx)?;
    let equalized = run_pass(&cleaned, "equalize", &ctx)?;

    let mut rows: Vec<(String, (f64, f64))> = Vec::new();
    rows.push((
        "load (decode + IR)".into(),
        time(
            iters,
            || (),
            |_| onnx_compress::ir::Model::load(&model_path),
        )?,
    ));
    rows.push((
        "save (IR -> proto, encode, atomic write)".into(),
        time(
            iters,
            || (),
            |_| onnx_compress::ir::Model::save(&original, &out, &save::SaveOptions::default()),
        )?,
    ));
    rows.push((
        "fuse".into(),
        time(iters, || (), |_| run_pass(&original, "fuse", &ctx))?,
    ));
    rows.push((
        "cleanup".into(),
        time(iters, || (), |_| run_pass(&fused, "cleanup", &ctx))?,
    ));
    rows.push((
        "equalize".into(),
        time(iters, || (), |_| run_pass(&cleaned, "equalize", &ctx))?,
    ));
    rows.push((
        format!("quantize (percentile, {samples} calib samples)"),
        time(iters, || (), |_| run_pass(&equalized, "quantize", &ctx))?,
    ));
    rows.push((
        "prune 30% (combined, least-squares)".into(),
        time(iters, || (), |_| run_pass(&cleaned, "prune", &prune_ctx))?,
    ));
    // Calibration alone: observe every node output of the equalized float graph.
    let proto = equalized.to_proto()?;
    let tensors: Vec<String> = proto
        .graph
        .as_ref()
        .map(|g| {
            g.node
                .iter()
                .flat_map(|n| n.output.iter().cloned())
                .collect()
        })
        .unwrap_or_default();
    for method in ["minmax", "percentile"] {
        let opts = observe::ObserveOptions {
            method: observe::Method::parse(method)?,
            moving_average: None,
            scheme: onnx_compress::calibrate::ActScheme::U8Asymmetric,
        };
        rows.push((
            format!("calibration alone ({method}, {} tensors)", tensors.len()),
            time(
                iters,
                || (),
                |_| observe::observe_model(&proto, &tensors, &calib, &opts),
            )?,
        ));
    }

    println!(
        "model: {} ({} nodes), {iters} runs after 1 warmup, {samples} synthetic calibration samples",
        model_path.display(),
        original.graph.node_count()
    );
    println!("| step | median ms | min ms |");
    println!("|---|---|---|");
    for (name, (med, min)) in rows {
        println!("| {name} | {:.1} | {:.1} |", med * 1e3, min * 1e3);
    }
    Ok(())
}
