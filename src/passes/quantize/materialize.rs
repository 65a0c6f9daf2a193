//! Materializing a placement [`Plan`]: the one observe -> parameters -> insert flow behind both
//! `quantize` and `mixed-precision` (ONNX Runtime's quantizer has the same split: per-op rules
//! only mark, one central step inserts).
//!
//! ```text
//! placement::plan(graph, options, selection)   which activations, weights, biases; how
//! calibrate(plan, model, data)                  one streaming tract run observes every marked
//!                                               activation; a sharing group (Concat, pass-through
//!                                               ops) takes the union of its members' ranges
//! (caller) weights                              inserted once each; their scales kept by name
//! insert(graph, plan, ranges, weight scales)    activations, then int32 biases
//! ```
//! The weights stay with the caller because the two passes store them differently: `quantize`
//! as the plan's int8 weights ([`super::insert::weight`]), `mixed-precision` at one precision per
//! layer (int8, int4, block-wise int4, fp16), whatever the plan marked.
//!
//! [`insert()`] adds, in marking order, one QuantizeLinear -> DequantizeLinear pair per marked
//! activation `t` (scale and zero point from its group's range), then per marked bias `b` whose
//! weight has per-channel scales `s_w`: `b_int32 = round(b / (s_in · s_w[c]))`, `s_in` the scale of
//! the layer's input activation. A bias whose weight the caller left without scales (float,
//! fp16, block-wise int4) stays float.
//!
//! Invariants: each tensor is quantized once however many nodes read it; readers keep reading
//! the original names (see [`super::insert`]); nothing is inserted for a tensor the plan does
//! not mark.

use super::auto;
use super::insert::{self, BiasReport, Namer};
use super::placement::Plan;
use super::QuantizeOptions;
use crate::calibrate::data::CalibrationSet;
use crate::calibrate::observe::{observe_model_keeping, Method, ObserveOptions, Observed};
use crate::calibrate::params::{ActScheme, QParams};
use crate::ir::{Graph, Model};
use crate::onnx::proto::ModelProto;
use anyhow::{Context, Result};
use indexmap::IndexMap;

/// What calibration found for every activation the plan marks, in marking order.
#[derive(Debug, Clone)]
pub struct ActivationRanges {
    /// The observed range of the tensor itself.
    pub observed: IndexMap<String, Observed>,
    /// Quantization parameters from its sharing group's range.
    pub params: IndexMap<String, QParams>,
    /// What `Method::Auto` chose and why (None for a fixed method).
    pub auto: Option<auto::AutoReport>,
}

impl ActivationRanges {
    /// The parameters of marked activation `t`.
    pub fn params_of(&self, t: &str) -> Result<QParams> {
        self.params
            .get(t)
            .copied()
            .with_context(|| format!("activation '{t}' has no quantization parameters"))
    }
}

/// Observe every activation `plan` marks by running `observe_on` in tract over `calib`, with
/// the options' method and activation scheme, and derive each group's parameters. `float` is
/// the model the plan was made on; `Method::Auto` scores its choices on it (see [`auto`]).
pub fn calibrate(
    plan: &Plan,
    float: &Model,
    observe_on: &ModelProto,
    calib: &CalibrationSet,
    opts: &QuantizeOptions,
) -> Result<ActivationRanges> {
    if opts.method == Method::Auto {
        let (observed, report) = auto::choose(plan, float, observe_on, calib, opts)?;
        let params = plan.activation_params(&observed, opts.activation_scheme)?;
        return Ok(ActivationRanges {
            observed,
            params,
            auto: Some(report),
        });
    }
    let tensors: Vec<String> = plan.activations.iter().cloned().collect();
    let obs_opts = ObserveOptions {
        method: opts.method,
        moving_average: opts.moving_average,
        scheme: opts.activation_scheme,
    };
    // Validation's original, observed as it is: its outputs on these rows are kept for it.
    let mut capture = calib
        .reference
        .as_ref()
        .and_then(|r| r.capture_for(observe_on));
    let observed = observe_model_keeping(observe_on, &tensors, calib, &obs_opts, capture.as_mut())
        .context("observing activation ranges")?;
    if let (Some(request), Some(capture)) = (&calib.reference, capture) {
        request.keep(capture);
    }
    let params = plan.activation_params(&observed, opts.activation_scheme)?;
    Ok(ActivationRanges {
        observed,
        params,
        auto: None,
    })
}

/// Insert a Q/DQ pair for every marked activation, then an int32 bias for every marked bias
/// whose weight has scales in `weight_scales` (by weight name). Returns the bias reports.
pub fn insert(
    g: &mut Graph,
    namer: &mut Namer,
    plan: &Plan,
    ranges: &ActivationRanges,
    weight_scales: &IndexMap<String, Vec<f32>>,
    scheme: ActScheme,
) -> Result<Vec<BiasReport>> {
    for t in &plan.activations {
        insert::activation(g, namer, t, &ranges.params_of(t)?, scheme)?;
    }
    super::scalar::insert_constants(g, namer, plan)?;
    super::scalar::insert_scaled(g, namer, plan, |t| ranges.params_of(t), scheme)?;
    let mut biases = Vec::new();
    for (b, mark) in &plan.biases {
        let Some(s_w) = weight_scales.get(&mark.weight) else {
            continue;
        };
        let s_in = ranges.params_of(&mark.input)?.scale;
        let report = insert::bias(g, namer, b, s_in, s_w, &mark.node)
            .with_context(|| format!("node '{}'", mark.node))?;
        biases.push(report);
    }
    Ok(biases)
}

/// Rewire every `Shape(t)`, `t` a DequantizeLinear output, to read the DequantizeLinear's int8
/// input: the same shape without running the DequantizeLinear (see
/// [`crate::passes::target::Policy::shape_reads_int8`]).
pub fn shapes_read_int8(g: &mut Graph) -> Result<()> {
    let rewires: Vec<_> = g
        .node_indices()
        .filter(|&ix| g.node(ix).op_type() == "Shape")
        .filter_map(|ix| {
            let t = g.node(ix).input.first()?;
            let dq = g.producer_node(t)?;
            let dq = g.node(dq);
            (dq.op_type() == "DequantizeLinear").then(|| (ix, dq.input.first().cloned()))
        })
        .filter_map(|(ix, q)| Some((ix, q?)))
        .collect();
    let mut touched = Vec::new();
    for (ix, q) in rewires {
        let mut node = g.node(ix).clone();
        touched.push(node.input[0].clone());
        node.input[0] = q;
        g.replace_node(ix, node)
            .context("letting a Shape read the int8 tensor")?;
    }
    // A DequantizeLinear only Shapes read is dead now (ONNX Runtime would still run it).
    let dead: Vec<_> = touched
        .iter()
        .filter(|t| g.use_count(t) == 0)
        .filter_map(|t| g.producer_node(t))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if !dead.is_empty() {
        g.apply(crate::ir::Patch {
            remove: dead,
            ..Default::default()
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(text: &str) -> Graph {
        Model::from_proto(crate::onnx::text::parse_model(text).unwrap())
            .unwrap()
            .graph
    }

    #[test]
    fn a_shape_reads_the_int8_tensor_and_an_unread_dequantize_goes() {
        let mut g = graph(
            r#"<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2] x) => (int64[2] s, float[1,2] y)
<float sc = {0.1}, uint8 zp = {0}>
{
   q = QuantizeLinear (x, sc, zp)
   d = DequantizeLinear (q, sc, zp)
   s = Shape (d)
   q2 = QuantizeLinear (x, sc, zp)
   d2 = DequantizeLinear (q2, sc, zp)
   s2 = Shape (d2)
   y = Relu (d2)
}"#,
        );
        shapes_read_int8(&mut g).unwrap();
        let ops: Vec<(String, Vec<String>)> = g
            .topo_order()
            .unwrap()
            .into_iter()
            .map(|ix| (g.node(ix).op_type().to_string(), g.node(ix).input.clone()))
            .collect();
        // `d` was read only by its Shape: gone; `d2` still feeds the Relu.
        assert!(g.producer_node("d").is_none());
        assert!(g.producer_node("d2").is_some());
        for (op, inputs) in &ops {
            if op == "Shape" {
                assert!(inputs[0] == "q" || inputs[0] == "q2", "{inputs:?}");
            }
        }
    }
}
