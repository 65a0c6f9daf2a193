//! The mixed-precision diagnostics behind BENCHMARKS.md on a trained digits model: per layer,
//! ½Ω_int4 and the joint model's term vs the measured KL of that layer alone at int4, the KL
//! gained by upgrading it alone to int8, and every feasible int4/int8 assignment ranked by test
//! KL with the predicted joint loss.
//! `cargo bench --bench mixed_precision_digits -- [digits_deep.onnx|digits_smooth.onnx|digits_cnn.onnx] [avg_bits]`
//! (defaults: digits_deep.onnx, 4.5).
#[path = "../tests/common/mod.rs"]
mod common;

fn main() {
    // cargo bench appends `--bench`: positional arguments only.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let file = args
        .first()
        .map(String::as_str)
        .unwrap_or("digits_deep.onnx");
    let avg_bits: f64 = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(4.5);
    common::digits_mp::digits_diagnostics(file, avg_bits);
}
