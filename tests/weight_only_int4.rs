//! `--weight-bits 4` on the tiny GPT: every linear layer becomes an int4 MatMulNBits (or a
//! block-wise DequantizeLinear), tract loads and validates the output as written, the file is
//! small, the rounding chosen from the calibration windows beats round-to-nearest on held-out
//! windows, and the bytes do not depend on the thread count.

mod common;
use common::*;
use ndarray::{ArrayD, Axis};
use onnx_compress::onnx::proto::ModelProto;
use onnx_compress::runtime::Feed;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The tiny GPT's linear layers: qkv, proj, fc, out in 2 blocks, and the LM head.
const LINEAR_LAYERS: usize = 9;

fn compress(
    dir: &Path,
    name: &str,
    extra: &[&str],
    threads: Option<usize>,
) -> (PathBuf, Value, String) {
    let out = dir.join(format!("{name}.onnx"));
    let report = dir.join(format!("{name}.json"));
    let src = testdata().join("tiny_gpt.onnx");
    let calib = testdata().join("tiny_gpt_calib");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onnx-compress"));
    cmd.args([
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--weight-bits",
        "4",
    ])
    .args(extra);
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
    }
    let o = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let json = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    (out, json, stdout)
}

fn load(path: &Path) -> ModelProto {
    onnx_compress::onnx::load::read_model(path).unwrap().0
}

fn count(m: &ModelProto, op: &str) -> usize {
    let g = m.graph.as_ref().unwrap();
    g.node.iter().filter(|n| n.op_type() == op).count()
}

fn pass<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["passes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no '{name}' record"))
}

/// Held-out windows `[64, 33]`: 32 inputs, the next token of each position is the next column.
fn eval_windows() -> ArrayD<i64> {
    ndarray_npy::read_npy(testdata().join("tiny_gpt_eval.npy")).unwrap()
}

/// Logits `[64, 32, 256]` of `m` on the held-out windows, run in tract as written.
fn logits(m: &ModelProto) -> ArrayD<f32> {
    let w = eval_windows();
    let ids = w.slice_axis(Axis(1), (0..32).into()).to_owned();
    let out =
        onnx_compress::runtime::run_model(m, &[("input_ids".to_string(), Feed::I64(ids))], &[])
            .unwrap();
    out.into_iter().next().unwrap().1
}

/// Mean next-token cross-entropy (nats) of `logits` on the held-out windows.
fn cross_entropy(logits: &ArrayD<f32>) -> f64 {
    let w = eval_windows();
    let (b, t, v) = (logits.shape()[0], logits.shape()[1], logits.shape()[2]);
    let mut total = 0.0;
    for i in 0..b {
        for p in 0..t {
            let row: Vec<f64> = (0..v).map(|c| f64::from(logits[[i, p, c]])).collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            total += lse - row[w[[i, p + 1]] as usize];
        }
    }
    total / (b * t) as f64
}

fn mse(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn int4_matmulnbits_output_is_small_loads_in_tract_and_beats_round_to_nearest() {
    let dir = tempfile::tempdir().unwrap();
    let (auto, report, stdout) = compress(dir.path(), "auto", &[], None);
    let (nearest, _, _) = compress(
        dir.path(),
        "nearest",
        &["--weight-rounding", "nearest"],
        None,
    );
    let m = load(&auto);
    assert_eq!(count(&m, "MatMulNBits"), LINEAR_LAYERS, "{stdout}");
    assert_eq!(
        count(&m, "MatMul"),
        4,
        "only the attention MatMuls (2 per block) stay"
    );
    assert_eq!(count(&m, "QuantizeLinear"), 0);
    // Embedding tables: int8 weight-only behind DequantizeLinear.
    assert_eq!(count(&m, "DequantizeLinear"), 2);
    let q = pass(&report, "quantize");
    assert_eq!(q["changes"], 0, "activations stay float");
    // Size: int4 with an f32 scale per 32 values is 4.5 bits per weight; embeddings int8.
    let ratio = report["size_ratio"].as_f64().unwrap();
    // 21.1% measured: 64-wide layers, and the embeddings are 14% of the weights.
    assert!(ratio < 0.22, "output is {:.1}% of the input", 100.0 * ratio);
    // Validated in tract, and tract loads the file as written.
    assert_eq!(
        report["validation"]["status"], "checked",
        "{}",
        report["validation"]
    );
    onnx_compress::runtime::Runner::new(&m, &[("input_ids".into(), vec![1, 32])], &[])
        .expect("tract loads MatMulNBits as written");
    // Every layer's chosen rounding is at least as good as nearest on the calibration rows.
    let layers = pass(&report, "weight-only")["details"]["int4"]["layers"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(layers.len(), LINEAR_LAYERS);
    for l in &layers {
        let sq: Vec<(String, f64)> = l["sqnr_db"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_f64().unwrap()))
            .collect();
        let of = |m: &str| sq.iter().find(|s| s.0 == m).unwrap().1;
        assert!(of(l["method"].as_str().unwrap()) >= of("nearest"), "{l}");
    }
    // Held-out windows: closer to fp32 than round-to-nearest, in logits and in perplexity.
    let fp32 = logits(&load(&testdata().join("tiny_gpt.onnx")));
    let ours = logits(&m);
    let rtn = logits(&load(&nearest));
    let (e_ours, e_rtn) = (mse(&ours, &fp32), mse(&rtn, &fp32));
    assert!(
        e_ours < 0.8 * e_rtn,
        "held-out logits MSE: ours {e_ours:.3e}, round-to-nearest {e_rtn:.3e}"
    );
    let (ce, ce_ours, ce_rtn) = (
        cross_entropy(&fp32),
        cross_entropy(&ours),
        cross_entropy(&rtn),
    );
    eprintln!(
        "held-out: logits MSE ours {e_ours:.3e} nearest {e_rtn:.3e}; perplexity fp32 {:.4} ours {:.4} nearest {:.4}",
        ce.exp(),
        ce_ours.exp(),
        ce_rtn.exp()
    );
    assert!(
        (ce_ours - ce).abs() < (ce_rtn - ce).abs(),
        "held-out perplexity: fp32 {:.4}, ours {:.4}, round-to-nearest {:.4}",
        ce.exp(),
        ce_ours.exp(),
        ce_rtn.exp()
    );
}

#[test]
fn int4_output_does_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let (one, _, _) = compress(dir.path(), "t1", &["--no-validate"], Some(1));
    let (two, _, _) = compress(dir.path(), "t2", &["--no-validate"], Some(2));
    assert_eq!(std::fs::read(one).unwrap(), std::fs::read(two).unwrap());
}

#[test]
fn int4_block_dequantize_linear_format_is_opset_21_int4() {
    let dir = tempfile::tempdir().unwrap();
    let (out, report, _) = compress(
        dir.path(),
        "dq",
        &["--weight-format", "dq", "--block-size", "16"],
        None,
    );
    let m = load(&out);
    assert_eq!(count(&m, "MatMulNBits"), 0);
    let g = m.graph.as_ref().unwrap();
    let blocked: Vec<_> = g
        .node
        .iter()
        .filter(|n| {
            n.op_type() == "DequantizeLinear"
                && n.attribute
                    .iter()
                    .any(|a| a.name() == "block_size" && a.i() == 16)
        })
        .collect();
    assert_eq!(blocked.len(), LINEAR_LAYERS);
    let int4 = onnx_compress::onnx::proto::tensor_proto::DataType::Int4 as i32;
    for n in &blocked {
        let w = g
            .initializer
            .iter()
            .find(|t| t.name() == n.input[0])
            .unwrap();
        assert_eq!(w.data_type(), int4);
    }
    assert!(m
        .opset_import
        .iter()
        .any(|o| o.domain().is_empty() && o.version() == 21));
    let ratio = report["size_ratio"].as_f64().unwrap();
    // Block 16: one f32 scale per 16 values, 6 bits per weight.
    assert!(ratio < 0.26, "output is {:.1}% of the input", 100.0 * ratio);
}
