//! Checks a run makes after loading the model and before any work: the buffers it will size
//! from the model fit the memory budget, and the weights are finite.
//!
//! **Memory** ([`check_inputs`], [`check_values`]). Each graph input's size is its declared dims (symbolic ones
//! at 1, or as `--input-shape` says), counted with checked arithmetic ([`element_count`]); then,
//! before anything is allocated:
//! - synthetic validation inputs: `--samples` batches of every input (without `--eval`);
//! - synthetic calibration data: `synthetic_samples` samples of every float input (without
//!   `--calib`, when `quantize` or `mixed-precision` may calibrate);
//! - the largest value the model computes for one run at those shapes (observers, histograms,
//!   Hessian probes and pruning matrices all hold at least one such activation per batch).
//!
//! Synthetic data is also bounded in work ([`crate::limits::SYNTHETIC_MAX_VALUES`]): its cost
//! is linear in its values, and a declared dim under the memory budget could still take
//! minutes. Each check names the input or value, its size and the limit (see
//! [`crate::limits`]).
//!
//! **Declared shapes** ([`correct_declared_outputs`], [`check_declared_outputs`]): graph
//! outputs and declared dims that contradict what the graph computes are corrected (ONNX
//! Runtime loads them, `onnx.checker` does not); other contradictions tract finds are refused.
//!
//! **Non-finite weights** ([`nonfinite_initializers`]). A NaN or infinite float initializer
//! makes the model's outputs non-finite already; quantizing it would round NaN into an int8
//! value and validation would compare garbage. The default refuses ([`refuse_nonfinite`]);
//! with `--allow-nonfinite` the run goes on and [`keep_float`] leaves every node reading such
//! a tensor float, through the passes' own filters: quantize's `exclude_nodes` and mixed
//! precision's `keep_fp32` (mixed precision itself is refused with such weights: the Hessian
//! of a NaN loss ranks nothing, [`refuse_nonfinite_for_mixed_precision`]). Filtering by node rather than by tensor name survives passes that
//! rename weights before quantization (fuse, equalize, prune give rewritten weights new names;
//! the nodes keep theirs).

use crate::ir::check::DimContradiction;
use crate::ir::op::node_label;
use crate::ir::Model;
use crate::limits::{check_synthetic, element_count, MemoryBudget};
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::tensor_shape_proto::dimension::Value as Dim;
use crate::onnx::proto::{type_proto, ModelProto};
use crate::onnx::tensor;
use crate::passes::PassContext;
use crate::runtime::ValueShape;
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};

/// What the run will allocate from the model's sizes, as the checks need it.
pub struct MemoryPlan<'a> {
    pub budget: MemoryBudget,
    pub input_shapes: &'a [(String, Vec<usize>)],
    /// Synthetic validation batches, when validation runs without `--eval` data.
    pub validation_samples: Option<usize>,
    /// Synthetic calibration samples, when a calibrating pass runs without `--calib`.
    pub calibration_samples: Option<usize>,
}

/// One graph input at the shape the run uses.
struct SizedInput {
    name: String,
    shape: Vec<usize>,
    elements: u64,
    elem_bytes: u64,
    float: bool,
}

fn shown(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// The real graph inputs (not initializers) with a tensor shape, at the run's shapes.
fn sized_inputs(model: &Model, input_shapes: &[(String, Vec<usize>)]) -> Result<Vec<SizedInput>> {
    let mut out = Vec::new();
    for v in &model.graph.inputs {
        let name = v.name();
        if model.graph.initializers.contains_key(name) {
            continue;
        }
        let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            continue;
        };
        let Some(declared) = t.shape.as_ref() else {
            continue;
        };
        let shape: Vec<usize> = match input_shapes.iter().find(|(n, _)| n == name) {
            Some((_, user)) => user.clone(),
            None => declared
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(Dim::DimValue(v)) if v >= 0 => v as usize,
                    _ => 1,
                })
                .collect(),
        };
        let elements = element_count(&format!("model input '{name}'"), &shape)? as u64;
        let dt = DataType::try_from(t.elem_type()).unwrap_or(DataType::Undefined);
        out.push(SizedInput {
            name: name.to_string(),
            elements,
            elem_bytes: (tensor::bits_per_element(dt).div_ceil(8)).max(1) as u64,
            float: matches!(dt, DataType::Float | DataType::Float16 | DataType::Double),
            shape,
        });
    }
    Ok(out)
}

/// Refuse the run when a buffer sized from the graph inputs exceeds the budget (synthetic
/// validation and calibration data), or an input's element count overflows. Reads declared
/// shapes only: runs before any shape analysis.
pub fn check_inputs(model: &Model, plan: &MemoryPlan) -> Result<()> {
    let budget = &plan.budget;
    for input in sized_inputs(model, plan.input_shapes)? {
        let (name, shape) = (&input.name, shown(&input.shape));
        if let Some(samples) = plan.validation_samples {
            let samples = samples.max(1) as u64;
            let what = format!("synthetic validation input '{name}' {shape} ({samples} batches)");
            let values = input.elements.saturating_mul(samples);
            budget.check_elements(&what, values, input.elem_bytes)?;
            if input.float {
                check_synthetic(&what, values)?;
            }
        }
        if let (Some(samples), true) = (plan.calibration_samples, input.float) {
            // One sample is the shape without its batch dim; f32 whatever the input's type.
            let per_sample = element_count(
                &format!("model input '{name}'"),
                input.shape.get(1..).unwrap_or(&[]),
            )? as u64;
            let what = format!(
                "synthetic calibration data for input '{name}' {shape} ({samples} samples)"
            );
            let values = per_sample.saturating_mul(samples as u64);
            // Held twice while stacked into batches ([`crate::calibrate::CalibrationSet`]).
            budget.check_elements(
                &format!("{what}, held twice while batched"),
                values.saturating_mul(2),
                4,
            )?;
            check_synthetic(&what, values)?;
        }
    }
    Ok(())
}

/// Refuse the run when the largest value the model computes at the run's input shapes
/// (`value_shapes`) exceeds the budget. Initializers are in memory already (the file bounds
/// them) and are not counted.
pub fn check_values(
    model: &Model,
    value_shapes: &HashMap<String, Vec<usize>>,
    budget: &MemoryBudget,
) -> Result<()> {
    let largest = value_shapes
        .iter()
        .filter(|(name, _)| !model.graph.initializers.contains_key(name.as_str()))
        .map(|(name, shape)| {
            let n = element_count(&format!("value '{name}'"), shape).map(|n| n as u64);
            (n.unwrap_or(u64::MAX), name, shape)
        })
        .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)));
    if let Some((elements, name, shape)) = largest {
        budget.check_elements(
            &format!("value '{name}' {} (one run of the model)", shown(shape)),
            elements,
            4,
        )?;
    }
    Ok(())
}

/// A float initializer holding NaN or infinite values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NonFinite {
    pub tensor: String,
    pub nan: usize,
    pub inf: usize,
}

impl NonFinite {
    /// `initializer 'w' has 3 NaN and 1 inf values`.
    pub fn describe(&self) -> String {
        let counts = match (self.nan, self.inf) {
            (0, i) => format!("{i} inf value{}", plural(i)),
            (n, 0) => format!("{n} NaN value{}", plural(n)),
            (n, i) => format!("{n} NaN and {i} inf values"),
        };
        format!("initializer '{}' has {counts}", self.tensor)
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Float initializers of the main graph holding NaN or ±inf, in graph order. Tensors that do
/// not decode are left to the passes, which name them when they need their values.
pub fn nonfinite_initializers(model: &Model) -> Vec<NonFinite> {
    let mut out = Vec::new();
    for (name, t) in &model.graph.initializers {
        let float = matches!(
            tensor::data_type(t),
            Ok(DataType::Float | DataType::Float16 | DataType::Bfloat16 | DataType::Double)
        );
        let Some((nan, inf)) = float.then(|| tensor::count_nonfinite(t).ok()).flatten() else {
            continue;
        };
        // Scanned once: a mapped weight's pages need not stay resident until a pass reads it.
        if let Some(raw) = &t.raw_data {
            crate::onnx::pages::release_pages(raw);
        }
        if nan + inf > 0 {
            out.push(NonFinite {
                tensor: name.clone(),
                nan,
                inf,
            });
        }
    }
    out
}

/// The default: refuse a model with non-finite weights, naming the first (and how many more).
pub fn refuse_nonfinite(found: &[NonFinite]) -> Result<()> {
    let Some(first) = found.first() else {
        return Ok(());
    };
    let more = match found.len() - 1 {
        0 => String::new(),
        n => format!(" (and {n} more initializer{})", plural(n)),
    };
    bail!(
        "{}{more}: the model's outputs are already non-finite; --allow-nonfinite keeps such tensors float",
        first.describe()
    )
}

/// Mixed precision ranks layers by the Hessian of a loss on the model's outputs, which a
/// non-finite weight makes NaN everywhere: no ranking exists, so a budget is refused up front.
pub fn refuse_nonfinite_for_mixed_precision(found: &[NonFinite], mixed_runs: bool) -> Result<()> {
    match found.first() {
        Some(first) if mixed_runs => bail!(
            "{}: mixed precision measures every layer through the model's outputs, which it makes non-finite; drop --avg-bits/--target-size (quantize keeps such layers float)",
            first.describe()
        ),
        _ => Ok(()),
    }
}

/// Keep every node reading a non-finite tensor float: quantize excludes it by label, mixed
/// precision keeps it (and the tensor, when the weight is the one matched) fp32.
pub fn keep_float(ctx: &mut PassContext, model: &Model, found: &[NonFinite]) {
    let mut nodes = BTreeSet::new();
    for nf in found {
        ctx.mixed.keep_fp32.push(regex::escape(&nf.tensor));
        for &(ix, _) in model.graph.consumers(&nf.tensor) {
            nodes.insert(ix);
        }
    }
    for ix in nodes {
        let node = model.graph.node(ix);
        ctx.quantize
            .exclude_nodes
            .push(regex::escape(node_label(node)));
        if !node.name().is_empty() {
            ctx.mixed.keep_fp32.push(regex::escape(node.name()));
        }
    }
}

/// Graph outputs whose declared rank (or fixed dims) contradict what the graph computes, as
/// tract infers it (`proto` is the model as loaded), get the computed shape declared instead;
/// one note each. ONNX shape inference (`onnx.checker` full check) rejects a contradicting
/// declaration, ONNX Runtime loads it (ddddocr's shipped `common.onnx` declares its output
/// [1, ?] and computes [1, 1, 8210]): the output keeps what runs and becomes valid. Only ranks
/// and dims both sides know are compared.
///
/// Where tract cannot compute an output (`If` branches fed by symbolic values), the ranks
/// inferred over the graph ([`crate::ir::check::check_model_ranks`]) still catch a declared
/// rank that contradicts the producer: that output is declared with the inferred rank and
/// unknown dims, which ONNX shape inference fills in itself. Declared dims the same inference
/// contradicts, anywhere in the model (`If` branches included), are declared unknown
/// ([`correct_declared_dims`]).
///
/// `inferred` is tract's analysis of `proto` (`None`: tract could not analyse it).
pub fn correct_declared_outputs(
    model: &mut Model,
    proto: &crate::onnx::proto::ModelProto,
    inferred: Option<&[ValueShape]>,
    input_shapes: &[(String, Vec<usize>)],
) -> Result<Vec<String>> {
    let mut notes = match inferred {
        Some(inferred) => correct_outputs_by_tract(model, inferred, input_shapes)?,
        // A model tract cannot analyse keeps its declarations; later stages report it.
        None => Vec::new(),
    };
    let found = proto
        .graph
        .as_ref()
        .and_then(|g| crate::ir::check::check_model_ranks(g).ok())
        .unwrap_or_default();
    notes.extend(correct_declared_dims(model, &found.dims)?);
    for c in found.ranks {
        let Some(out) = model
            .graph
            .outputs
            .iter_mut()
            .find(|o| o.name() == c.output)
        else {
            continue;
        };
        let Some(type_proto::Value::TensorType(tt)) =
            out.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            continue;
        };
        if let Some(shape) = tt.shape.as_mut().filter(|s| s.dim.len() != c.inferred) {
            // onnx.checker wants a main-graph output's shape present: the rank, dims unknown.
            shape.dim = vec![Default::default(); c.inferred];
            notes.push(format!(
                "graph output '{}' is declared with rank {} but the graph computes rank {}: declared with {} unknown dims in the output (ONNX shape inference rejects the contradiction)",
                c.output, c.declared, c.inferred, c.inferred
            ));
        }
    }
    Ok(notes)
}

/// Declared dims (graph outputs and value_info, in the main graph and every subgraph) that
/// contradict the dim their producer gives, as inferred over the graph
/// ([`crate::ir::check::DimContradiction`]), are declared unknown; one note each. ONNX
/// Runtime loads such a model (it warns and merges leniently), `onnx.checker` rejects it
/// ("Inferred shape and existing shape differ in dimension 1: (1) vs (17)"): the output keeps
/// what runs and becomes valid. Unknown rather than the inferred value: dropping a
/// declaration can never contradict anything.
fn correct_declared_dims(model: &mut Model, found: &[DimContradiction]) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    if found.is_empty() {
        return Ok(notes);
    }
    let mut cleared = Vec::new();
    clear_dims(&mut model.graph.outputs, found, &mut cleared);
    clear_dims(&mut model.graph.value_info, found, &mut cleared);
    let nodes: Vec<_> = model.graph.node_indices().collect();
    for ix in nodes {
        let node = model.graph.node(ix);
        if !crate::ir::graph::has_subgraphs(node) {
            continue;
        }
        let mut changed = node.clone();
        let before = cleared.len();
        for a in &mut changed.attribute {
            for g in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                clear_dims_in_graph(g, found, &mut cleared);
            }
        }
        if cleared.len() > before {
            model.graph.replace_node(ix, changed)?;
        }
    }
    for c in cleared {
        notes.push(format!(
            "value '{}' (output of {}) is declared with dim {} = {}, but its producer gives {}: declared unknown in the output (ONNX shape inference rejects the contradiction)",
            c.value, c.node, c.axis, c.declared, c.inferred
        ));
    }
    Ok(notes)
}

/// [`clear_dims`] over `g`'s outputs and value_info and its nodes' subgraphs.
fn clear_dims_in_graph(
    g: &mut crate::onnx::proto::GraphProto,
    found: &[DimContradiction],
    cleared: &mut Vec<DimContradiction>,
) {
    clear_dims(&mut g.output, found, cleared);
    clear_dims(&mut g.value_info, found, cleared);
    for n in &mut g.node {
        for a in &mut n.attribute {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                clear_dims_in_graph(sub, found, cleared);
            }
        }
    }
}

/// Each declaration in `decls` of a contradicted value whose dim still holds the declared
/// value gets that dim unset; what was cleared is appended to `cleared`.
fn clear_dims(
    decls: &mut [crate::onnx::proto::ValueInfoProto],
    found: &[DimContradiction],
    cleared: &mut Vec<DimContradiction>,
) {
    for v in decls.iter_mut() {
        let name = v.name().to_string();
        let Some(type_proto::Value::TensorType(tt)) =
            v.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            continue;
        };
        let Some(shape) = tt.shape.as_mut() else {
            continue;
        };
        for c in found.iter().filter(|c| c.value == name) {
            if let Some(d) = shape.dim.get_mut(c.axis) {
                if d.value == Some(Dim::DimValue(c.declared)) {
                    *d = Default::default();
                    cleared.push(c.clone());
                }
            }
        }
    }
}

/// `proto` with the contradicting dims [`correct_declared_dims`] clears declared unknown, so
/// the checks below compare what the output will declare.
fn with_dims_cleared(proto: &ModelProto) -> Option<ModelProto> {
    let found = proto
        .graph
        .as_ref()
        .and_then(|g| crate::ir::check::check_model_ranks(g).ok())?
        .dims;
    if found.is_empty() {
        return None;
    }
    let mut fixed = proto.clone();
    if let Some(g) = fixed.graph.as_mut() {
        clear_dims_in_graph(g, &found, &mut Vec::new());
    }
    Some(fixed)
}

fn correct_outputs_by_tract(
    model: &mut Model,
    inferred: &[ValueShape],
    input_shapes: &[(String, Vec<usize>)],
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let dims_known = input_dims_known(model, input_shapes);
    // Dims computed from `--input-shape` hold for that shape only: declared as values only
    // when the model itself fixes every input.
    let declared_inputs_fixed = model
        .graph
        .inputs
        .iter()
        .filter(|i| !model.graph.initializers.contains_key(i.name()))
        .all(declares_fixed_dims);
    for out in model.graph.outputs.iter_mut() {
        let name = out.name().to_string();
        let Some(type_proto::Value::TensorType(tt)) =
            out.r#type.as_mut().and_then(|t| t.value.as_mut())
        else {
            continue;
        };
        let Some(declared_shape) = &mut tt.shape else {
            continue;
        };
        let Some(computed) = inferred
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.shape.clone())
        else {
            continue;
        };
        let show = |d: &[Option<i64>]| {
            d.iter()
                .map(|x| x.map_or("?".to_string(), |v| v.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let declared: Vec<Option<i64>> = declared_shape
            .dim
            .iter()
            .map(|d| match d.value {
                Some(Dim::DimValue(v)) => Some(v),
                _ => None,
            })
            .collect();
        let computed: Vec<Option<i64>> = computed.iter().map(|d| d.map(|v| v as i64)).collect();
        // A declared symbolic dim matches anything. Tract pins symbolic input dims to 1, so
        // computed dims are compared only when every input dim is known.
        let contradicts = declared.len() != computed.len()
            || (dims_known
                && declared
                    .iter()
                    .zip(&computed)
                    .any(|(d, c)| matches!((d, c), (Some(d), Some(c)) if d != c)));
        if contradicts {
            // Symbolic input dims were pinned to 1 for the inference: only dims it computed
            // with every input known are declared as values.
            let corrected: Vec<Option<i64>> = computed
                .iter()
                .map(|c| c.filter(|_| dims_known && declared_inputs_fixed))
                .collect();
            notes.push(format!(
                "graph output '{name}' is declared [{}] but the graph computes [{}]: declared [{}] in the output (ONNX shape inference rejects the contradiction)",
                show(&declared),
                show(&computed),
                show(&corrected)
            ));
            declared_shape.dim = corrected
                .iter()
                .map(|c| crate::onnx::proto::tensor_shape_proto::Dimension {
                    value: c.map(Dim::DimValue),
                    ..Default::default()
                })
                .collect();
        }
    }
    Ok(notes)
}

/// Graph outputs and `value_info` (main graph and `If` branches,
/// [`super::branch_shapes`]) whose declared rank (or fixed dims) contradict what the graph
/// computes, as
/// tract infers it (`proto` is the model as loaded): ONNX shape inference rejects such a model,
/// so its output would be rejected too. Only ranks and dims both sides know are compared.
///
/// `inferred` is tract's analysis of `proto` (`None`: tract could not analyse it, and the
/// model keeps its declarations; later stages report it).
pub fn check_declared_outputs(
    model: &Model,
    proto: &crate::onnx::proto::ModelProto,
    inferred: Option<&[ValueShape]>,
    input_shapes: &[(String, Vec<usize>)],
) -> Result<()> {
    // Declarations as the output will carry them; the model is analysed again only when
    // that changed a declaration (a contradicting dim cleared).
    let fixed = with_dims_cleared(proto);
    let reanalysed = fixed
        .as_ref()
        .map(|f| crate::runtime::infer_value_shapes(f, input_shapes).ok());
    let proto = fixed.as_ref().unwrap_or(proto);
    let Some(inferred) = reanalysed.unwrap_or_else(|| inferred.map(<[ValueShape]>::to_vec)) else {
        return Ok(());
    };
    let dims_known = input_dims_known(model, input_shapes);
    let value_info = proto.graph.iter().flat_map(|g| &g.value_info);
    let declared_values = model
        .graph
        .outputs
        .iter()
        .map(|v| ("graph output", v))
        .chain(value_info.map(|v| ("value_info", v)));
    super::branch_shapes::compare_declared(declared_values, &inferred, dims_known)?;
    if let Some(graph) = &proto.graph {
        super::branch_shapes::check_if_branches(proto, graph, &inferred, &HashMap::new())?;
    }
    Ok(())
}

/// Whether `v` declares a tensor shape whose every dim is a value.
fn declares_fixed_dims(v: &crate::onnx::proto::ValueInfoProto) -> bool {
    match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(tt)) => tt.shape.as_ref().is_some_and(|s| {
            s.dim
                .iter()
                .all(|d| matches!(d.value, Some(Dim::DimValue(v)) if v >= 0))
        }),
        _ => false,
    }
}

/// Whether every non-constant input's dims are known: declared as values, or given by
/// `--input-shape` (only then are dims computed from them comparable with declared ones).
fn input_dims_known(model: &Model, input_shapes: &[(String, Vec<usize>)]) -> bool {
    model
        .graph
        .inputs
        .iter()
        .filter(|i| !model.graph.initializers.contains_key(i.name()))
        .all(|i| declares_fixed_dims(i) || input_shapes.iter().any(|(n, _)| n == i.name()))
}
