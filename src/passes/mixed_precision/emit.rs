//! Emission in `mixed-precision`: rewrite the model with the chosen precision per weight, and
//! with `quantize_activations` quantize the activations and int32 biases around int8/int4 layers
//! through the `quantize` pass's placement rules and its materialize step.
//!
//! ```text
//! fp32:          W stays
//! fp16:          W_fp16 -> Cast(to = FLOAT) -> W
//! int8 / int4:   W_int, s[C], z[C] (zeros) -> DequantizeLinear(axis = out axis) -> W
//! int4 blocked:  W_int4, s[.., ⌈I/B⌉, ..] -> DequantizeLinear(axis = in axis, block_size = B) -> W
//! ```
//! Each new node produces the weight's own name, so its readers are untouched. The opset goes to
//! 13 when anything is quantized and on to 21 (IR version 10) when int4 is used
//! ([`crate::passes::quantize::opset`]). Activations: the placement plan is restricted to the
//! nodes reading an int8/int4 weight ([`NodeSelection::Only`]); their activations get uint8 Q/DQ
//! pairs observed on the calibration data, their biases int32 with scale `s_in · s_w[c]` where
//! the weight has per-channel scales (block-wise int4 keeps a float bias: ORT runs blocked
//! weights as DequantizeLinear + float op anyway).
//!
//! All or nothing: the model is rewritten on a copy and replaced only on success.

use super::weights::{int4_block, quantize_blocked, quantize_weight};
use super::{MixedPrecisionOptions, Precision};
use crate::calibrate::data::CalibrationSet;
use crate::hessian;
use crate::ir::op::{self, attr_int};
use crate::ir::{Graph, Model};
use crate::onnx::tensor;
use crate::passes::quantize::placement::{self, NodeSelection};
use crate::passes::quantize::{self, insert, materialize, opset, QuantizeOptions};
use anyhow::{ensure, Context, Result};
use indexmap::IndexMap;
use ndarray::{ArrayD, IxDyn};
use std::collections::HashSet;

/// Store weight `w` at precision `p`; returns the per-channel scales for int8/int4 (none for
/// block-wise int4, whose bias then stays float).
fn emit_weight(
    g: &mut Graph,
    namer: &mut insert::Namer,
    w: &str,
    (axis, in_axis): (usize, usize),
    p: Precision,
    block: Option<usize>,
) -> Result<Option<Vec<f32>>> {
    let t = g
        .constant(w)
        .with_context(|| format!("weight '{w}' is not a constant initializer"))?;
    let a = tensor::to_f32(t).with_context(|| format!("decoding weight '{w}'"))?;
    ensure!(
        axis < a.ndim(),
        "weight '{w}' has rank {} but axis {axis}",
        a.ndim()
    );
    let shape = a.shape().to_vec();
    if let (Precision::Int4, Some(b)) = (p, int4_block(&shape, in_axis, block)) {
        let (q, scales, _) = quantize_blocked(&a, in_axis, b, 4);
        let names = namer.take(
            g,
            'w',
            w,
            [
                ("quantized", "q"),
                ("scale", "s"),
                ("DequantizeLinear", "DQ"),
            ],
        );
        let wq = tensor::from_4bit(&names[0], &shape, &q, true);
        let s = tensor::from_f32(&names[1], &scales);
        let mut dq = op::node("DequantizeLinear", &names[2], &[&names[0], &names[1]], &[w]);
        op::set_attr(&mut dq, attr_int("axis", in_axis as i64));
        op::set_attr(&mut dq, attr_int("block_size", b as i64));
        insert::replace_constant(g, w, vec![wq, s], dq)?;
        return Ok(None);
    }
    match p {
        Precision::Fp32 => Ok(None),
        Precision::Fp16 => {
            let names = namer.take(g, 'w', w, [("fp16", "h"), ("Cast", "Cast")]);
            let mut cast = op::node("Cast", &names[1], &[&names[0]], &[w]);
            op::set_attr(&mut cast, attr_int("to", 1));
            insert::replace_constant(g, w, vec![tensor::from_f16(&names[0], &a)], cast)?;
            Ok(None)
        }
        Precision::Int8 | Precision::Int4 => {
            let bits = if p == Precision::Int8 { 8 } else { 4 };
            let (q, scales, _) = quantize_weight(&a, axis, bits);
            let names = namer.take(
                g,
                'w',
                w,
                [
                    ("quantized", "q"),
                    ("scale", "s"),
                    ("zero_point", "z"),
                    ("DequantizeLinear", "DQ"),
                ],
            );
            let c = scales.len();
            let zeros = vec![0i8; c];
            let (wq, zp) = if bits == 8 {
                (
                    tensor::from_i8(&names[0], &shape, &q),
                    tensor::from_i8(&names[2], &[c], &zeros),
                )
            } else {
                (
                    tensor::from_4bit(&names[0], &shape, &q, true),
                    tensor::from_4bit(&names[2], &[c], &zeros, true),
                )
            };
            let s = tensor::from_f32(
                &names[1],
                &ArrayD::from_shape_vec(IxDyn(&[c]), scales.clone())?,
            );
            let mut dq = op::node(
                "DequantizeLinear",
                &names[3],
                &[&names[0], &names[1], &names[2]],
                &[w],
            );
            op::set_attr(&mut dq, attr_int("axis", axis as i64));
            insert::replace_constant(g, w, vec![wq, s, zp], dq)?;
            Ok(Some(scales))
        }
    }
}

/// Rewrite `model` with one precision per weight (`(weight name, precision)`). Returns notes.
pub fn apply_assignment(
    model: &mut Model,
    assignment: &[(String, Precision)],
    opts: &MixedPrecisionOptions,
    calib: &CalibrationSet,
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let layers = hessian::layers(&model.graph)?;
    let layer_of = |w: &str| layers.iter().find(|l| l.weight == w);
    let uses = |p: Precision| assignment.iter().any(|a| a.1 == p);
    let quantized = uses(Precision::Int8) || uses(Precision::Int4);
    let mut work = model.clone();
    if quantized {
        notes.extend(opset::upgrade(&mut work, opset::PER_CHANNEL, &[])?);
        if opts.quantize_activations {
            // As in the quantize pass: an int32 bias belongs to one layer's s_in * s_w.
            quantize::unshare_biases(&mut work.graph)?;
        }
    }
    if uses(Precision::Int4) {
        // After the bias copies: stage 21's initializers come after them in the file.
        notes.extend(opset::upgrade(&mut work, opset::INT4, &[])?);
    }
    // Activations (and int32 biases) around int8/int4 layers, with the quantize pass's rules:
    // planned and observed on the float graph, inserted after the weights.
    let mut activations = None;
    if quantized && opts.quantize_activations {
        let int_weights: Vec<&str> = assignment
            .iter()
            .filter(|a| matches!(a.1, Precision::Int8 | Precision::Int4))
            .filter_map(|a| layer_of(&a.0))
            .map(|l| l.weight.as_str())
            .collect();
        let g = &work.graph;
        let readers: Vec<_> = int_weights
            .iter()
            .flat_map(|w| g.consumers(w).iter().map(|c| c.0))
            .collect();
        // Unnamed readers stay float, as when the selection went by node name: selecting them
        // too would change outputs, which this step must not do.
        let unnamed = |ix: &_| g.node(*ix).name().is_empty();
        if readers.iter().any(unnamed) {
            notes.push("some int8/int4 nodes have no name: their activations stay float".into());
        }
        let selected: HashSet<_> = readers.into_iter().filter(|ix| !unnamed(ix)).collect();
        if !selected.is_empty() {
            let qopts = QuantizeOptions::default();
            let mut plan = placement::plan(g, &qopts, &NodeSelection::Only(selected))?;
            let ranges = materialize::calibrate(&plan, &work, &work.to_proto()?, calib, &qopts)?;
            // The same rule as the quantize pass: a grid too coarse for the quiet batches.
            let quiet = crate::passes::quantize::keep_quiet_float(&mut plan, &ranges)?;
            if !quiet.is_empty() {
                notes.push(format!(
                    "{} activation(s) kept float, their int8 step too coarse for the quietest tenth of the calibration batches: {}",
                    quiet.len(),
                    quiet
                        .iter()
                        .map(|q| format!("'{}' {:.1} dB", q.tensor, q.quiet_sqnr_db))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            activations = Some((plan, ranges, qopts));
        }
    }
    let g = &mut work.graph;
    let mut namer = insert::Namer::default();
    let mut scales: IndexMap<String, Vec<f32>> = IndexMap::new();
    for (w, p) in assignment {
        let l = layer_of(w)
            .with_context(|| format!("'{w}' is not the constant weight of a Conv/Gemm/MatMul"))?;
        let axes = (l.out_axis(), l.in_axis());
        if let Some(s) = emit_weight(g, &mut namer, w, axes, *p, opts.block_size)? {
            scales.insert(w.clone(), s);
        }
    }
    if let Some((plan, ranges, qopts)) = activations {
        let biases = materialize::insert(
            g,
            &mut namer,
            &plan,
            &ranges,
            &scales,
            qopts.activation_scheme,
        )?;
        notes.push(format!(
            "activations around int8/int4 layers quantized with the quantize pass's rules: {} Q/DQ pairs (uint8, {}), {} int32 biases",
            plan.activations.len(),
            qopts.method.label(),
            biases.len()
        ));
    } else if quantized {
        notes.push("weight-only quantization: activations stay float".into());
    }
    g.remove_unused_initializers();
    *model = work;
    Ok(notes)
}
