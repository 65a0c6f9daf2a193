//! Structured pruning, printed: the digits classifier's accuracy at 10..50% of its MACs
//! removed (least squares, bias and plain reconstruction), then a prune-and-validate trial
//! (groups, MACs, tract latency, cosine) on each model given.
//! `cargo bench --bench prune_curve -- [MODEL.onnx:INPUT:1x3x224x224 ...]`
#[path = "../tests/common/mod.rs"]
mod common;

use common::prune_trial::{digits_accuracy_curve, trial};
use std::path::Path;

fn main() {
    digits_accuracy_curve();
    // cargo bench appends `--bench`: positional arguments only.
    for spec in std::env::args().skip(1).filter(|a| !a.starts_with("--")) {
        let mut parts = spec.split(':');
        let (Some(path), Some(input), Some(shape)) = (parts.next(), parts.next(), parts.next())
        else {
            eprintln!("{spec}: expected MODEL.onnx:INPUT:1x3x224x224");
            std::process::exit(2);
        };
        let shape: Vec<usize> = shape.split('x').filter_map(|d| d.parse().ok()).collect();
        trial(Path::new(path), input, &shape, 4, 0.3, 5);
    }
}
