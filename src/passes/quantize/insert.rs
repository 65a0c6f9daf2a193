//! The one central insertion step: a QuantizeLinear -> DequantizeLinear pair per activation,
//! a DequantizeLinear per weight and bias. Each tensor is handled once, however many quantized
//! nodes read it.
//!
//! Activation produced by a node, value `t`:
//! ```text
//! before: P -> t -> {consumers, graph output}
//! after:  P -> t_float -> QuantizeLinear -> t_quantized -> DequantizeLinear -> t
//! ```
//! The producer's output is renamed, so every reader (quantized or float, subgraph captures and
//! a graph output named `t` included) reads the dequantized value under the original name
//! (ORT's choice: all consumers read the DQ output, which is also what lets ORT fuse
//! DQ -> op -> Q into QLinear kernels). A graph input `x` cannot be renamed, nor, inside an
//! `If` body, a value of an enclosing graph: its node readers are rewired to `x_dequantized`
//! (subgraph captures keep reading the float value).
//!
//! Weight `w` (constant float initializer): replaced by `w_quantized` (int8), `w_scale`
//! (`[C]` per channel or scalar), `w_zero_point` (int8 zeros; left out for Conv weights, see
//! [`super::placement::WeightMark`]) and a DequantizeLinear (with `axis` when per-channel) whose
//! output is named `w`, so readers are untouched. The names shown are [`Naming::Descriptive`];
//! by default they are compact ids.
//! Bias `b`: `b_quantized` (int32), `b_scale = s_in * s_w[c]`, no zero point (0 by definition),
//! same scheme.

use crate::calibrate::params::{self, ActScheme, QParams};
use crate::ir::op::{self, attr_int};
use crate::ir::{Graph, InSlot, Patch};
use crate::onnx::proto::{NodeProto, TensorProto};
use crate::onnx::tensor;
use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Weight rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Rounding {
    #[default]
    Nearest,
    /// `floor(x / s + u)`, u uniform in [0, 1), seeded per tensor from `seed` and its name.
    Stochastic { seed: u64 },
}

/// How the tensors and nodes a quantizer adds are named. The names the model already had stay:
/// a quantized activation or weight is still produced under its own name (by its
/// DequantizeLinear), so readers, graph outputs and the report keep pointing at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Naming {
    /// Short ids: `a7_q`, `a7_s`, `a7_z`, `a7_f`, nodes `a7_Q` / `a7_DQ` for the 7th added name
    /// group (`a` activation, `w` weight, `b` bias). Exported models carry long scoped tensor
    /// names (`/features/features.4/.../Conv_output_0`) and a Q/DQ pair repeats its base name
    /// nine times: ~1% of an int8 EfficientNet-B0 file.
    #[default]
    Compact,
    /// `{t}_quantized`, `{t}_scale`, `{t}_zero_point`, `{t}_QuantizeLinear`, ... (ORT's style).
    Descriptive,
}

/// Hands out the generated names of one quantization run.
#[derive(Debug, Clone, Default)]
pub struct Namer {
    pub naming: Naming,
    next: usize,
    /// Names in use, read from the graph once: every name added afterwards comes from here.
    taken: Option<std::collections::HashSet<String>>,
    /// Compact ids whose names are taken are skipped (not suffixed): set by [`Namer::avoiding`].
    skip_taken_ids: bool,
}

impl Namer {
    pub fn new(naming: Naming) -> Namer {
        Namer {
            naming,
            ..Default::default()
        }
    }

    /// A namer that avoids `taken` (every name of a model, all scopes: see
    /// [`super::bodies`]) and skips compact ids already used there, so a second quantization
    /// stage over the same model gets `a12_q` rather than `a0_q_1`.
    pub fn avoiding(naming: Naming, taken: std::collections::HashSet<String>) -> Namer {
        Namer {
            naming,
            next: 0,
            taken: Some(taken),
            skip_taken_ids: true,
        }
    }

    /// Every name this namer has handed out or avoids.
    pub fn is_taken(&self, name: &str) -> bool {
        self.taken.as_ref().is_some_and(|t| t.contains(name))
    }

    /// Fresh names for the parts of quantized value `base`; `kind` is `'a'`, `'w'` or `'b'`,
    /// each part is (descriptive suffix, compact suffix).
    pub fn take<const N: usize>(
        &mut self,
        g: &Graph,
        kind: char,
        base: &str,
        parts: [(&str, &str); N],
    ) -> [String; N] {
        let naming = self.naming;
        // Names defined inside the graph's If/Loop/Scan bodies count as taken too: a body value
        // of the same name as a new main-graph value would shadow it (invalid ONNX).
        let taken = self.taken.get_or_insert_with(|| {
            let mut names: std::collections::HashSet<String> =
                g.all_names().into_iter().map(String::from).collect();
            for ix in g.node_indices() {
                for sub in crate::ir::graph::subgraphs(g.node(ix)) {
                    body_names(sub, &mut names);
                }
            }
            names
        });
        if self.skip_taken_ids && naming == Naming::Compact {
            while parts
                .iter()
                .any(|(_, short)| taken.contains(&format!("{kind}{}_{short}", self.next)))
            {
                self.next += 1;
            }
        }
        let id = self.next;
        self.next += 1;
        let names: Vec<String> = parts
            .iter()
            .map(|(long, short)| {
                let base = match naming {
                    Naming::Compact => format!("{kind}{id}_{short}"),
                    Naming::Descriptive => format!("{base}_{long}"),
                };
                let name = if taken.contains(&base) {
                    (1..)
                        .map(|i| format!("{base}_{i}"))
                        .find(|n| !taken.contains(n))
                        .expect("an unused suffix exists")
                } else {
                    base
                };
                taken.insert(name.clone());
                name
            })
            .collect();
        <[String; N]>::try_from(names).expect("one name per part")
    }
}

/// Every name a body defines or reads (inputs, initializers, node names and outputs), at any
/// depth.
pub(crate) fn body_names(
    b: &crate::onnx::proto::GraphProto,
    names: &mut std::collections::HashSet<String>,
) {
    names.extend(b.input.iter().map(|v| v.name().to_string()));
    names.extend(b.output.iter().map(|v| v.name().to_string()));
    names.extend(b.initializer.iter().map(|t| t.name().to_string()));
    for n in &b.node {
        names.insert(n.name().to_string());
        names.extend(n.output.iter().cloned());
        names.extend(n.input.iter().cloned());
        for sub in crate::ir::graph::subgraphs(n) {
            body_names(sub, names);
        }
    }
}

fn scalar_zp(name: &str, scheme: ActScheme, zp: i32) -> TensorProto {
    match scheme {
        ActScheme::U8Asymmetric => tensor::from_u8(name, &[], &[zp as u8]),
        ActScheme::I8Symmetric => tensor::from_i8(name, &[], &[zp as i8]),
    }
}

pub(crate) fn scale_tensor(name: &str, scales: &[f32], per_axis: bool) -> TensorProto {
    let shape: Vec<usize> = if per_axis { vec![scales.len()] } else { vec![] };
    let a = ArrayD::from_shape_vec(ndarray::IxDyn(&shape), scales.to_vec())
        .expect("scale shape matches its length");
    tensor::from_f32(name, &a)
}

/// Insert the Q/DQ pair for activation `t` with parameters `p`.
pub fn activation(
    g: &mut Graph,
    namer: &mut Namer,
    t: &str,
    p: &QParams,
    scheme: ActScheme,
) -> Result<()> {
    let [t_float, t_q, s, zp, qn, dqn, t_dq] = namer.take(
        g,
        'a',
        t,
        [
            ("float", "f"),
            ("quantized", "q"),
            ("scale", "s"),
            ("zero_point", "z"),
            ("QuantizeLinear", "Q"),
            ("DequantizeLinear", "DQ"),
            ("dequantized", "dq"),
        ],
    );
    let mut patch = Patch {
        initializers: vec![
            scale_tensor(&s, &[p.scale], false),
            scalar_zp(&zp, scheme, p.zero_point),
        ],
        ..Default::default()
    };
    if let Some((prod, slot)) = g.producer(t) {
        let mut node = g.node(prod).clone();
        node.output[slot] = t_float.clone();
        patch.remove.push(prod);
        patch.add.push(node);
        patch.add.push(op::node(
            "QuantizeLinear",
            &qn,
            &[&t_float, &s, &zp],
            &[&t_q],
        ));
        patch
            .add
            .push(op::node("DequantizeLinear", &dqn, &[&t_q, &s, &zp], &[t]));
        patch.anchor = Some(prod);
    } else if g.is_graph_input(t) || g.source(t) == Some(crate::ir::graph::Source::Outer) {
        // A graph input, or inside a body a value of an enclosing graph: neither can be
        // renamed here, so this graph's readers are rewired to the dequantized copy.
        patch
            .add
            .push(op::node("QuantizeLinear", &qn, &[t, &s, &zp], &[&t_q]));
        patch.add.push(op::node(
            "DequantizeLinear",
            &dqn,
            &[&t_q, &s, &zp],
            &[&t_dq],
        ));
        let mut seen = Vec::new();
        for &(ix, slot) in g.consumers(t) {
            if slot == InSlot::Capture || seen.contains(&ix) {
                continue;
            }
            seen.push(ix);
            let mut node = g.node(ix).clone();
            for i in node.input.iter_mut() {
                if i == t {
                    *i = t_dq.clone();
                }
            }
            patch.remove.push(ix);
            patch.add.push(node);
        }
        patch.anchor = seen.first().copied();
    } else {
        bail!("activation '{t}' is neither a node output nor a graph input");
    }
    g.apply(patch)
        .with_context(|| format!("inserting QuantizeLinear/DequantizeLinear for '{t}'"))
}

/// What weight quantization did, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WeightReport {
    pub tensor: String,
    pub node: String,
    pub axis: Option<usize>,
    pub channels: usize,
    pub min_scale: f32,
    pub max_scale: f32,
    /// Channels that were all zero (scale 1, exact).
    pub zero_channels: usize,
    pub sqnr_db: f64,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a of the name, mixed with the seed: stable across runs and tensor order.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^ seed.wrapping_mul(0x9e3779b97f4a7c15)
}

/// The int8 values and per-channel parameters of a float weight (no graph change).
pub(crate) fn quantize_values(
    a: &ArrayD<f32>,
    axis: Option<usize>,
    w: &str,
    reduce_range: bool,
    rounding: Rounding,
) -> (ArrayD<i8>, Vec<QParams>, usize) {
    // Channel views: per-channel along `axis`, or the whole tensor as one channel.
    let channels: Vec<ndarray::ArrayViewD<f32>> = match axis {
        Some(ax) => a.axis_iter(Axis(ax)).collect(),
        None => vec![a.view()],
    };
    let qps: Vec<QParams> = channels
        .iter()
        .map(|c| params::weight_params(c.iter().fold(0f32, |m, v| m.max(v.abs())), reduce_range))
        .collect();
    let zero_channels = channels
        .iter()
        .filter(|c| c.iter().all(|&v| v == 0.0))
        .count();
    let mut rng = match rounding {
        Rounding::Stochastic { seed } => Some(ChaCha8Rng::seed_from_u64(name_seed(seed, w))),
        Rounding::Nearest => None,
    };
    // Flat iteration in logical (row-major) order: the channel of element i is
    // (i / inner) % C. Indexing by IxDyn per element was most of the pass's own time.
    let inner: usize = axis.map_or(1, |ax| a.shape()[ax + 1..].iter().product());
    let code = |v: f32, p: &QParams, rng: &mut Option<ChaCha8Rng>| {
        let x = v / p.scale;
        let r = match rng.as_mut() {
            Some(rng) => (x + rng.random::<f32>()).floor(),
            None => x.round_ties_even(),
        };
        r.clamp(p.qmin as f32, p.qmax as f32) as i8
    };
    let vals: Vec<i8> = match a.as_slice() {
        // Runs of `inner` values share a channel: no division per value (same values, same
        // order, so the same codes and random draws).
        Some(flat) if inner > 0 => {
            let mut vals = Vec::with_capacity(flat.len());
            let run_len = axis.map_or(flat.len().max(1), |_| inner);
            for (run, values) in flat.chunks(run_len).enumerate() {
                let p = &qps[axis.map_or(0, |_| run % qps.len())];
                vals.extend(values.iter().map(|&v| code(v, p, &mut rng)));
            }
            vals
        }
        _ => {
            let channel_of = |i: usize| axis.map_or(0, |_| (i / inner.max(1)) % qps.len());
            a.iter()
                .enumerate()
                .map(|(i, &v)| code(v, &qps[channel_of(i)], &mut rng))
                .collect()
        }
    };
    let q = ArrayD::from_shape_vec(a.raw_dim(), vals).expect("same element count");
    (q, qps, zero_channels)
}

/// [`quantize_values`]: the codes, the per-channel scales and the weight's report row (scales, dead
/// channels, SQNR of the dequantized values against the float ones).
pub(crate) fn quantize_reported(
    a: &ArrayD<f32>,
    axis: Option<usize>,
    w: &str,
    node: &str,
    reduce_range: bool,
    rounding: Rounding,
) -> (ArrayD<i8>, Vec<f32>, WeightReport) {
    let (q, qps, zero_channels) = quantize_values(a, axis, w, reduce_range, rounding);
    let deq = dequantize_values(&q, &qps, axis);
    let orig: std::borrow::Cow<[f32]> = match a.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(a.iter().copied().collect()),
    };
    let scales: Vec<f32> = qps.iter().map(|p| p.scale).collect();
    let report = WeightReport {
        tensor: w.to_string(),
        node: node.to_string(),
        axis,
        channels: scales.len(),
        min_scale: scales.iter().copied().fold(f32::INFINITY, f32::min),
        max_scale: scales.iter().copied().fold(0.0, f32::max),
        zero_channels,
        sqnr_db: params::sqnr_db(&orig, &deq),
    };
    (q, scales, report)
}

/// The dequantized values of `q` in logical order.
pub(crate) fn dequantize_values(q: &ArrayD<i8>, qps: &[QParams], axis: Option<usize>) -> Vec<f32> {
    let inner: usize = axis.map_or(1, |ax| q.shape()[ax + 1..].iter().product());
    if let (Some(flat), true) = (q.as_slice(), inner > 0) {
        // Runs of `inner` values share a channel (as in `quantize_values`).
        let mut out = Vec::with_capacity(flat.len());
        let run_len = axis.map_or(flat.len().max(1), |_| inner);
        for (run, values) in flat.chunks(run_len).enumerate() {
            let p = &qps[axis.map_or(0, |_| run % qps.len())];
            out.extend(values.iter().map(|&v| p.dequantize(v as i32)));
        }
        return out;
    }
    q.iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = axis.map_or(0, |_| (i / inner.max(1)) % qps.len());
            qps[c].dequantize(v as i32)
        })
        .collect()
}

/// `dq(q(W))`: the weight as the quantized model will see it, exactly as [`weight`] would
/// quantize it (for bias correction before insertion).
pub fn fake_quant(
    g: &Graph,
    w: &str,
    axis: Option<usize>,
    reduce_range: bool,
    rounding: Rounding,
) -> Result<ArrayD<f32>> {
    let t = g
        .constant(w)
        .with_context(|| format!("weight '{w}' is not a constant initializer"))?;
    let a = tensor::to_f32(t).with_context(|| format!("decoding weight '{w}'"))?;
    let (q, qps, _) = quantize_values(&a, axis, w, reduce_range, rounding);
    let deq = dequantize_values(&q, &qps, axis);
    Ok(ArrayD::from_shape_vec(q.raw_dim(), deq)?)
}

/// Quantize constant weight `w`; returns the per-channel (or single) scales and a report.
/// Without `with_zero_point` the DequantizeLinear has no zero-point input (0 by definition,
/// the type comes from the int8 data).
#[allow(clippy::too_many_arguments)]
pub fn weight(
    g: &mut Graph,
    namer: &mut Namer,
    w: &str,
    axis: Option<usize>,
    with_zero_point: bool,
    node: &str,
    reduce_range: bool,
    rounding: Rounding,
) -> Result<(Vec<f32>, WeightReport)> {
    let t = g
        .constant(w)
        .with_context(|| format!("weight '{w}' is not a constant initializer"))?;
    let a = tensor::to_f32(t).with_context(|| format!("decoding weight '{w}'"))?;
    if let Some(ax) = axis {
        if ax >= a.ndim() {
            bail!(
                "weight '{w}' of node '{node}' has rank {} but per-channel axis is {ax}",
                a.ndim()
            );
        }
    }
    let (q, scales, report) = quantize_reported(&a, axis, w, node, reduce_range, rounding);
    let shape = a.shape().to_vec();
    let [wq, s, zp, dqn] = namer.take(
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
    let q_vals: Vec<i8> = q.iter().copied().collect();
    let zp_shape: Vec<usize> = if axis.is_some() {
        vec![scales.len()]
    } else {
        vec![]
    };
    let mut initializers = vec![
        tensor::from_i8(&wq, &shape, &q_vals),
        scale_tensor(&s, &scales, axis.is_some()),
    ];
    let mut dq = if with_zero_point {
        initializers.push(tensor::from_i8(
            &zp,
            &zp_shape,
            &vec![0i8; zp_shape.iter().product()],
        ));
        op::node("DequantizeLinear", &dqn, &[&wq, &s, &zp], &[w])
    } else {
        op::node("DequantizeLinear", &dqn, &[&wq, &s], &[w])
    };
    if let Some(ax) = axis {
        op::set_attr(&mut dq, attr_int("axis", ax as i64));
    }
    replace_constant(g, w, initializers, dq)?;
    Ok((scales, report))
}

/// What bias quantization did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BiasReport {
    pub tensor: String,
    pub node: String,
    pub max_abs_int: i64,
    /// Values that hit the int32 limits.
    pub clamped: usize,
    /// Largest |b - dequantized b|.
    pub max_error: f32,
}

/// Quantize bias `b` to int32 with scale `s_in * s_w[c]`.
pub fn bias(
    g: &mut Graph,
    namer: &mut Namer,
    b: &str,
    s_in: f32,
    s_w: &[f32],
    node: &str,
) -> Result<BiasReport> {
    let t = g
        .constant(b)
        .with_context(|| format!("bias '{b}' is not a constant initializer"))?;
    let a = tensor::to_f32(t).with_context(|| format!("decoding bias '{b}'"))?;
    let shape = a.shape().to_vec();
    let vals: Vec<f32> = a.iter().copied().collect();
    let per_channel = s_w.len() > 1;
    if per_channel && (shape.len() != 1 || vals.len() != s_w.len()) {
        bail!(
            "bias '{b}' of node '{node}' has shape {shape:?} but the weight has {} output channels",
            s_w.len()
        );
    }
    let scales: Vec<f32> = if per_channel {
        s_w.iter().map(|&s| params::bias_scale(s_in, s)).collect()
    } else {
        vec![params::bias_scale(s_in, s_w[0])]
    };
    let scale_of = |i: usize| scales[if per_channel { i } else { 0 }];
    let q: Vec<i32> = vals
        .iter()
        .enumerate()
        .map(|(i, &v)| params::quantize_bias(v, scale_of(i)))
        .collect();
    let clamped = q
        .iter()
        .filter(|&&v| v == i32::MIN || v == i32::MAX)
        .count();
    let max_error = vals
        .iter()
        .enumerate()
        .map(|(i, &v)| (v - q[i] as f32 * scale_of(i)).abs())
        .fold(0.0, f32::max);
    let report = BiasReport {
        tensor: b.to_string(),
        node: node.to_string(),
        max_abs_int: q.iter().map(|&v| (v as i64).abs()).max().unwrap_or(0),
        clamped,
        max_error,
    };
    // No zero point: it is 0 by definition for int32 bias, and an explicit per-channel int32
    // zeros tensor would cost 4 bytes per channel (0.5% of a MobileNetV2).
    let [bq, s, dqn] = namer.take(
        g,
        'b',
        b,
        [
            ("quantized", "q"),
            ("scale", "s"),
            ("DequantizeLinear", "DQ"),
        ],
    );
    let mut dq = op::node("DequantizeLinear", &dqn, &[&bq, &s], &[b]);
    if per_channel {
        op::set_attr(&mut dq, attr_int("axis", 0));
    }
    replace_constant(
        g,
        b,
        vec![
            tensor::from_i32(&bq, &shape, &q),
            scale_tensor(&s, &scales, per_channel),
        ],
        dq,
    )?;
    Ok(report)
}

/// Swap constant initializer `name` for `node`, which produces `name` from the new
/// `initializers` (a DequantizeLinear here and for `mixed-precision`'s int weights, a Cast for
/// its fp16 weights), so every reader is untouched. The node goes in before the constant's
/// first reader. All or nothing: on error the graph is restored.
pub fn replace_constant(
    g: &mut Graph,
    name: &str,
    initializers: Vec<TensorProto>,
    node: NodeProto,
) -> Result<()> {
    let anchor = g.consumers(name).first().map(|&(ix, _)| ix);
    let op_type = node.op_type().to_string();
    let backup = g.clone();
    g.initializers.shift_remove(name);
    let patch = Patch {
        add: vec![node],
        initializers,
        anchor,
        ..Default::default()
    };
    if let Err(e) = g.apply(patch) {
        *g = backup;
        return Err(e).with_context(|| format!("replacing '{name}' by its {op_type}"));
    }
    Ok(())
}
