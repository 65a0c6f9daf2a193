//! `--weight-bits 4`: int4 weight-only for the linear layers (MatMul / Gemm with a constant
//! weight, the LM head included), activations float, rounding chosen per layer by its output
//! error on the calibration data ([`super::rounding`]).
//!
//! ```text
//! before: x[.., K] -> MatMul(x, W[K, N]) -> y                      (Gemm(x, W, C): + Add(y, C))
//! MatMulNBits (default; ONNX Runtime and tract run it, tract on its Q4_0 kernels for B = 32):
//!         x -> com.microsoft.MatMulNBits<K, N, bits = 4, block_size = B>(x, Q[N, ⌈K/B⌉, B/2] uint8,
//!                                                                         s[N·⌈K/B⌉]) -> y
//! DequantizeLinear (opset 21, `--weight-format dq`):
//!         W = DequantizeLinear<axis = K axis, block_size = B>(W_int4, s[⌈K/B⌉, N]) ; MatMul(x, W)
//! ```
//! MatMulNBits stores code `q + 8` (two per byte, low nibble first, a partial last block padded
//! with 8 = zero) and no zero point (the default 8: symmetric); `y = x · ((Q − 8) · s)ᵀ`. Gemm
//! (`alpha = 1`, `transA = 0`, 1-D bias, [`Layer::of`]) becomes MatMulNBits followed by `Add(y, C)`.
//!
//! Conditions: the weight is a float initializer of at least [`super::MIN_ELEMENTS`] finite
//! values read by this node only, with at least one full block of inputs (`K ≥ B`; narrower
//! layers are left to the int8 rules), and the node passes the user's filters. With calibration
//! data, one streaming run accumulates every layer's input Gram matrix `G = XᵀX`
//! ([`crate::calibrate::gram`], on the model as it enters the pass: the float model), and each
//! layer takes the rounding with the lowest `tr(ΔW G ΔWᵀ)`; without data, the lowest weight
//! error among `nearest` and `clip`. Layers are rounded in parallel and emitted in graph order:
//! the output does not depend on the thread count.
//!
//! Layers fed by a LayerNormalization first get an activation-aware input-channel scaling
//! searched on the same Gram matrices and folded into the LayerNorm's `γ`, `β` ([`awq`]); the
//! other layers (attention output projection, MLP output after GELU) have no producer to fold
//! `1/s` into without an extra op and are rounded as they are.

use super::awq;
use super::rounding::{self, Blocked, Candidate, Method};
use super::Filter;
use crate::calibrate::data::CalibrationSet;
use crate::calibrate::gram::gram_matrices;
use crate::ir::facts::static_rank;
use crate::ir::layer::{Layer, LayerKind};
use crate::ir::op::{self, attr_int, node_label};
use crate::ir::{Graph, InSlot, Model, Patch};
use crate::onnx::tensor;
use crate::passes::quantize::insert::{self, Namer};
use crate::passes::quantize::opset;
use anyhow::{Context, Result};
use ndarray::{Array1, Array2, ArrayD, IxDyn};
use rayon::prelude::*;
use serde::Serialize;

/// How int4 weights are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `com.microsoft.MatMulNBits`: ONNX Runtime's int4 kernels; tract maps block 32 to Q4_0.
    #[default]
    MatMulNBits,
    /// Opset-21 block-wise `DequantizeLinear` of an INT4 tensor (ONNX Runtime; tract 0.23.9
    /// cannot load INT4 tensors).
    DequantizeLinear,
}

/// One linear layer to store as int4.
#[derive(Debug, Clone)]
struct Site {
    node: String,
    /// The node's first output: how the node is found again after earlier patches.
    output: String,
    weight: String,
    input: String,
    kind: LayerKind,
    k: usize,
    n: usize,
}

/// One layer's rounding and the output SQNR of every candidate.
type Choice = (Candidate, Vec<(Method, f64)>);

/// What one layer got, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    pub node: String,
    pub weight: String,
    pub k: usize,
    pub n: usize,
    pub method: Method,
    /// The AWQ exponent folded into the feeding LayerNorm (0: none).
    pub awq_alpha: f64,
    /// Output SQNR (dB) of each candidate on the calibration rows, `10 log10(tr(W G Wᵀ) / E)`;
    /// weight SQNR without data.
    pub sqnr_db: Vec<(Method, f64)>,
    pub bytes: usize,
}

/// The layers this pass may store as int4, in topological order.
fn plan(g: &Graph, filter: &Filter, block: usize) -> Result<Vec<Site>> {
    let mut sites = Vec::new();
    for ix in g.topo_order()? {
        let n = g.node(ix);
        let Some(layer) = Layer::of(g, ix) else {
            continue;
        };
        if !matches!(layer.kind, LayerKind::MatMul | LayerKind::Gemm { .. })
            || !filter.allows(n)
            || !super::candidate(g, &layer.weight)
            || g.is_graph_output(&layer.weight)
            || g.consumers(&layer.weight) != [(ix, InSlot::Arg(1))]
        {
            continue;
        }
        let (k, out) = (layer.in_channels(), layer.out_channels());
        let input = n.input[0].clone();
        if k < block || input.is_empty() || static_rank(g, &input).is_some_and(|r| r < 2) {
            continue;
        }
        sites.push(Site {
            node: node_label(n).to_string(),
            output: n.output.first().cloned().unwrap_or_default(),
            weight: layer.weight.clone(),
            input,
            kind: layer.kind,
            k,
            n: out,
        });
    }
    Ok(sites)
}

/// `W` as `[N, K]` (one row per output).
fn rows(g: &Graph, s: &Site) -> Result<Array2<f64>> {
    let w = tensor::to_f32(g.constant(&s.weight).context("checked constant")?)?;
    let w = w.into_dimensionality::<ndarray::Ix2>()?.mapv(f64::from);
    Ok(match s.kind {
        LayerKind::Gemm { trans_b: true } => w,
        _ => w.reversed_axes().as_standard_layout().into_owned(),
    })
}

fn sqnr_db(signal: f64, error: f64) -> f64 {
    if error <= 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / error).log10()
    }
}

/// Store the planned layers as int4; returns the per-layer reports and notes.
pub(super) fn int4(
    model: &mut Model,
    filter: &Filter,
    opts: &super::WeightOnlyOptions,
    naming: crate::passes::quantize::insert::Naming,
    calibration: Option<&CalibrationSet>,
) -> Result<(Vec<LayerReport>, Vec<String>)> {
    let mut notes = Vec::new();
    let block = opts.block_size;
    let sites = plan(&model.graph, filter, block)?;
    if sites.is_empty() {
        notes.push(format!(
            "no MatMul/Gemm with a constant float weight of at least {block} inputs: nothing stored as int4"
        ));
        return Ok((vec![], notes));
    }
    // Synthetic inputs say nothing about real activations: weight error only, as without data.
    let grams = match calibration.filter(|c| !c.synthetic) {
        Some(calib) => {
            let mut tensors: Vec<(String, usize)> = Vec::new();
            for s in &sites {
                if !tensors.iter().any(|(t, _)| *t == s.input) {
                    tensors.push((s.input.clone(), s.k));
                }
            }
            Some(
                gram_matrices(&model.to_proto()?, &tensors, calib)
                    .context("accumulating the linear layers' input Gram matrices")?,
            )
        }
        None => {
            notes.push(
                "no calibration data: int4 scales chosen by weight error only (nearest or clip); give --calib for GPTQ and output-error search".into(),
            );
            None
        }
    };
    let methods: Vec<Method> = match opts.rounding {
        Some(m) => vec![m],
        None => Method::ALL.to_vec(),
    };
    let mut weights: Vec<Array2<f64>> = sites
        .iter()
        .map(|s| rows(&model.graph, s).with_context(|| format!("weight '{}'", s.weight)))
        .collect::<Result<_>>()?;
    // AWQ-class scaling of the LayerNorm-fed layers (only when the rounding is chosen freely:
    // a forced method is a baseline).
    let mut grams = grams;
    let original = weights.clone();
    let mut original_grams: std::collections::HashMap<String, Array2<f64>> = Default::default();
    let mut folds: Vec<(awq::Group, Array1<f64>)> = Vec::new();
    let mut alpha_of = vec![0.0; sites.len()];
    if let (Some(gr), None) = (grams.as_mut(), opts.rounding) {
        let inputs: Vec<(String, usize)> = sites.iter().map(|s| (s.input.clone(), s.k)).collect();
        let groups = awq::groups(&model.graph, &inputs);
        let alphas: Vec<f64> = groups
            .par_iter()
            .map(|grp| {
                let gm = &gr[&grp.input];
                let ws: Vec<&Array2<f64>> = grp.sites.iter().map(|&i| &weights[i]).collect();
                awq::search(&ws, &gm.xtx, gm.rows, block)
            })
            .collect();
        for (grp, alpha) in groups.into_iter().zip(alphas) {
            if alpha == 0.0 {
                continue;
            }
            let gm = gr.get_mut(&grp.input).context("gram of a group input")?;
            original_grams.insert(grp.input.clone(), gm.xtx.clone());
            let s = awq::scales(&gm.xtx, gm.rows, alpha);
            gm.xtx = awq::scale_gram(&gm.xtx, &s);
            for &i in &grp.sites {
                weights[i] = awq::scale_rows(&weights[i], &s);
                alpha_of[i] = alpha;
            }
            folds.push((grp, s));
        }
    }
    // One layer's choice: the lowest output error among `methods`, with every candidate's SQNR.
    let round = |w: &Array2<f64>, g: Option<&Array2<f64>>| {
        let cands = rounding::candidates(w, g, block, &methods);
        let signal = match g {
            Some(g) => (w.dot(g) * w).sum(),
            None => w.iter().map(|v| v * v).sum(),
        };
        let sq: Vec<(Method, f64)> = cands
            .iter()
            .map(|c| (c.method, sqnr_db(signal, c.error)))
            .collect();
        // A forced GPTQ without data has no candidate: fall back to clip, said below.
        let best = match rounding::best(cands) {
            Some(b) => b,
            None => rounding::best(rounding::candidates(w, g, block, &[Method::Clip]))
                .expect("clip always gives a candidate"),
        };
        (best, sq)
    };
    // Parallel over layers, collected in order: the same bytes whatever the thread count.
    let mut chosen: Vec<Choice> = sites
        .par_iter()
        .zip(weights.par_iter())
        .map(|(s, w)| round(w, grams.as_ref().map(|gr| &gr[&s.input].xtx)))
        .collect();
    // The scaling was searched with round-to-nearest; a LayerNorm keeps it only when its
    // readers' final roundings (GPTQ included) are better with it than without.
    let unscaled: Vec<Vec<Choice>> = folds
        .par_iter()
        .map(|(grp, _)| {
            grp.sites
                .iter()
                .map(|&i| round(&original[i], Some(&original_grams[&grp.input])))
                .collect()
        })
        .collect();
    let mut kept = Vec::new();
    for ((grp, sc), plain) in folds.into_iter().zip(unscaled) {
        let with: f64 = grp.sites.iter().map(|&i| chosen[i].0.error).sum();
        let without: f64 = plain.iter().map(|c| c.0.error).sum();
        if without <= with {
            for (&i, c) in grp.sites.iter().zip(plain) {
                chosen[i] = c;
                alpha_of[i] = 0.0;
            }
        } else {
            kept.push((grp, sc));
        }
    }
    let folds = kept;
    if !folds.is_empty() {
        notes.push(format!(
            "activation-aware scaling folded into {} LayerNorm(s): {}",
            folds.len(),
            folds
                .iter()
                .map(|(g, _)| format!("'{}' (α {})", g.node, alpha_of[g.sites[0]]))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if opts.rounding == Some(Method::Gptq) && grams.is_none() {
        notes.push("--weight-rounding gptq needs --calib; used clip instead".into());
    }
    let mut work = model.clone();
    for (grp, s) in &folds {
        awq::fold(&mut work.graph, grp, s)
            .with_context(|| format!("folding scales into LayerNorm '{}'", grp.node))?;
    }
    match opts.format {
        Format::MatMulNBits => work.require_opset("com.microsoft", 1),
        Format::DequantizeLinear => notes.extend(opset::upgrade(&mut work, opset::INT4, &[])?),
    }
    let mut namer = Namer::new(naming);
    let mut reports = Vec::new();
    for ((s, (c, sq)), alpha) in sites.iter().zip(chosen).zip(alpha_of) {
        let bytes = match opts.format {
            Format::MatMulNBits => emit_matmul_nbits(&mut work.graph, &mut namer, s, &c.blocked),
            Format::DequantizeLinear => emit_dq(&mut work.graph, &mut namer, s, &c.blocked),
        }
        .with_context(|| format!("int4 weight of node '{}'", s.node))?;
        reports.push(LayerReport {
            node: s.node.clone(),
            weight: s.weight.clone(),
            k: s.k,
            n: s.n,
            method: c.method,
            awq_alpha: alpha,
            sqnr_db: sq,
            bytes,
        });
    }
    work.graph.remove_unused_initializers();
    *model = work;
    Ok((reports, notes))
}

/// MatMul/Gemm -> MatMulNBits (+ Add for Gemm's bias); returns the bytes of B and scales.
fn emit_matmul_nbits(g: &mut Graph, namer: &mut Namer, s: &Site, q: &Blocked) -> Result<usize> {
    let ix = g
        .producer_node(&s.output)
        .with_context(|| format!("node producing '{}' not found", s.output))?;
    let old = g.node(ix).clone();
    let nb = q.blocks();
    let blob = s_blob(q.block);
    let mut packed = vec![0x88u8; s.n * nb * blob];
    for r in 0..s.n {
        for c in 0..s.k {
            let nibble = (q.codes[r * s.k + c] + 8) as u8 & 0x0f;
            let (j, i) = (c / q.block, c % q.block);
            let byte = &mut packed[(r * nb + j) * blob + i / 2];
            *byte = if i % 2 == 0 {
                (*byte & 0xf0) | nibble
            } else {
                (*byte & 0x0f) | (nibble << 4)
            };
        }
    }
    let names = namer.take(
        g,
        'w',
        &s.weight,
        [
            ("int4", "q4"),
            ("scale", "s"),
            ("MatMulNBits", "MatMulNBits"),
            ("matmul", "mm"),
            ("Add", "Add"),
        ],
    );
    let b = tensor::from_u8(&names[0], &[s.n, nb, blob], &packed);
    let scales = tensor::from_f32(
        &names[1],
        &ArrayD::from_shape_vec(IxDyn(&[s.n * nb]), q.scales.clone())?,
    );
    let bias = old.input.get(2).filter(|b| !b.is_empty()).cloned();
    let y = if bias.is_some() {
        names[3].as_str()
    } else {
        s.output.as_str()
    };
    let mut mm = op::node(
        "MatMulNBits",
        &names[2],
        &[&old.input[0], &names[0], &names[1]],
        &[y],
    );
    mm.domain = Some("com.microsoft".into());
    for (k, v) in [("K", s.k), ("N", s.n), ("bits", 4), ("block_size", q.block)] {
        op::set_attr(&mut mm, attr_int(k, v as i64));
    }
    let mut add = vec![mm];
    if let Some(c) = &bias {
        add.push(op::node("Add", &names[4], &[y, c], &[&s.output]));
    }
    g.apply(Patch {
        add,
        remove: vec![ix],
        initializers: vec![b, scales],
        anchor: Some(ix),
        ..Default::default()
    })?;
    Ok(s.n * nb * (blob + 4))
}

/// Bytes per block in MatMulNBits' B (two 4-bit codes per byte).
fn s_blob(block: usize) -> usize {
    block.div_ceil(2)
}

/// W -> DequantizeLinear(W_int4, s, axis = K axis, block_size); returns the bytes written.
fn emit_dq(g: &mut Graph, namer: &mut Namer, s: &Site, q: &Blocked) -> Result<usize> {
    let nb = q.blocks();
    // Back to the weight's own layout: [K, N] (MatMul, Gemm transB = 0) or [N, K].
    let trans = matches!(s.kind, LayerKind::Gemm { trans_b: true });
    let (shape, codes, sshape, scales, axis) = if trans {
        (
            vec![s.n, s.k],
            q.codes.clone(),
            vec![s.n, nb],
            q.scales.clone(),
            1,
        )
    } else {
        let mut codes = vec![0i8; s.k * s.n];
        let mut scales = vec![0f32; nb * s.n];
        for r in 0..s.n {
            for c in 0..s.k {
                codes[c * s.n + r] = q.codes[r * s.k + c];
            }
            for j in 0..nb {
                scales[j * s.n + r] = q.scales[r * nb + j];
            }
        }
        (vec![s.k, s.n], codes, vec![nb, s.n], scales, 0)
    };
    let names = namer.take(
        g,
        'w',
        &s.weight,
        [
            ("quantized", "q"),
            ("scale", "s"),
            ("DequantizeLinear", "DQ"),
        ],
    );
    let wq = tensor::from_4bit(&names[0], &shape, &codes, true);
    let st = tensor::from_f32(&names[1], &ArrayD::from_shape_vec(IxDyn(&sshape), scales)?);
    let mut dq = op::node(
        "DequantizeLinear",
        &names[2],
        &[&names[0], &names[1]],
        &[&s.weight],
    );
    op::set_attr(&mut dq, attr_int("axis", axis));
    op::set_attr(&mut dq, attr_int("block_size", q.block as i64));
    insert::replace_constant(g, &s.weight, vec![wq, st], dq)?;
    Ok((s.k * s.n).div_ceil(2) + 4 * nb * s.n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::text::parse_model;
    use crate::passes::quantize::QuantizeOptions;

    fn values(n: usize, seed: u32) -> String {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                format!("{:.4}", (s as f32 / u32::MAX as f32) * 2.0 - 1.0)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Gemm with `transB = 1` and a bias, then a MatMul with a partial last block (K = 40):
    /// both layouts packed for MatMulNBits, run by tract, close to the float model.
    #[test]
    fn gemm_and_matmul_layouts_run_in_tract_close_to_float() {
        let text = format!(
            r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[3,64] x) => (float[3,24] y)
< float[40,64] w1 = {{{}}}, float[40] b1 = {{{}}}, float[40,24] w2 = {{{}}} >
{{
   [fc1] h = Gemm <transB: int = 1> (x, w1, b1)
   [act] r = Relu (h)
   [fc2] y = MatMul (r, w2)
}}"#,
            values(40 * 64, 1),
            values(40, 2),
            values(40 * 24, 3)
        );
        let original = Model::from_proto(parse_model(&text).unwrap()).unwrap();
        let mut m = original.clone();
        let filter = Filter::new(&QuantizeOptions::default()).unwrap();
        let opts = super::super::WeightOnlyOptions {
            bits: 4,
            ..Default::default()
        };
        let (layers, _) = int4(&mut m, &filter, &opts, Default::default(), None).unwrap();
        assert_eq!(layers.len(), 2);
        let ops: Vec<String> = m
            .graph
            .node_indices()
            .map(|ix| m.graph.node(ix).op_type().to_string())
            .collect();
        assert_eq!(ops.iter().filter(|o| *o == "MatMulNBits").count(), 2);
        assert!(ops.iter().any(|o| o == "Add"), "Gemm's bias: {ops:?}");
        let x = ArrayD::from_shape_fn(IxDyn(&[3, 64]), |i| {
            ((i[0] * 64 + i[1]) % 13) as f32 / 6.5 - 1.0
        });
        let run = |m: &Model| {
            crate::runtime::run_model(&m.to_proto().unwrap(), &[("x".to_string(), x.clone())], &[])
                .unwrap()
                .remove(0)
                .1
        };
        let (want, got) = (run(&original), run(&m));
        let noise: f64 = want
            .iter()
            .zip(&got)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let signal: f64 = want.iter().map(|a| f64::from(*a).powi(2)).sum();
        let db = 10.0 * (signal / noise).log10();
        // int4 with per-32 scales: ~20 dB on uniform weights; a wrong layout gives ~0 dB.
        assert!(db > 15.0, "output SQNR {db:.1} dB");
    }
}
