//! Load-time checks of a whole ModelProto against what ONNX allows and the tool supports, run
//! by [`crate::ir::Model::from_proto`] before the IR is built, so a model the tool cannot
//! handle (or would re-emit invalid) is refused up front with one line naming the problem.
//!
//! - `ir_version` within what `proto/onnx.proto` knows (1 to `Version::IrVersion`).
//! - Each imported opset of a domain with schemas (`""`/`ai.onnx`, `ai.onnx.ml`, the preview
//!   domains) within the range of the vendored schemas ([`crate::onnx::schema`]).
//! - The main graph has outputs; within each graph (subgraphs included) every value has one
//!   producer: a node, a graph input or an initializer, and every graph output has one; before IR 4 every initializer is also
//!   a graph input.
//! - Initializers: a defined element type, no negative dims, values in exactly one field, raw
//!   bytes matching dims x type. Declared graph inputs/outputs: no 0 or negative dims (-1
//!   reads as unknown), and a declared value that is a constant has its dims.
//! - Element types ([`types`]): inferred over every node's outputs, through subgraphs, equal
//!   to what `value_info` and graph outputs declare; every input's known type matches the
//!   op's type constraints (shared type parameters agree). An `If` output's declared rank
//!   agrees with its branches' when they agree.
//! - Ranks ([`ranks`]): inferred over node outputs through subgraphs, equal to what value_info
//!   and subgraph outputs declare (main-graph outputs are corrected by the session instead).
//!   Dims ([`dims`]) are inferred alongside; a contradicting declared dim is returned for the
//!   session to declare unknown, not refused.
//! - Every node's domain is imported (custom domains too); op_type is not empty.
//! - Every node of a domain with schemas, in every graph: the op exists at the model's opset
//!   (and is not deprecated there); input and output counts in the schema's range, required
//!   inputs/outputs not empty; attributes known, of the schema's type, appearing once, required
//!   ones present; and the values the tool relies on in range (Conv/pool group, kernel,
//!   strides, dilations, pads, auto_pad; axes and permutations against the rank of their input
//!   when the graph declares it or [`ranks`]' walk infers it; Cast's target type; one value per
//!   Constant; Resize from opset 11 given `scales` or `sizes`; Gemm's matrices and 0/1 flags;
//!   a recurrent op's rank-3 input; Concat's inputs of one rank; Conv's and pools' input of
//!   rank >= 3, and a weight of the input's rank).
//! - Operands that must agree where both dims are known ([`dims`]): MatMul/Gemm reduction
//!   dims, Conv input channels, and broadcasting ops' inputs (numpy rules).
//!
//! Custom domains and ops of model-local functions pass untouched. Errors name the node by
//! [`op::node_label`] and its op: `node 'c1' (Conv): attribute 'group' is 0, must be >= 1`.

use crate::ir::op::{self, Attrs};
use crate::onnx::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, Version,
};
use crate::onnx::schema::{self, canonical_domain, domain_display, Lookup, OpSchema, Param};
use anyhow::{bail, ensure, Context, Result};
use std::collections::{HashMap, HashSet};

mod declared;
mod dims;
mod ranks;
mod types;
use declared::{check_declared_shapes, check_initializers, check_input_types, graph_constants};
pub use ranks::{check_model_ranks, Contradictions, DimContradiction, RankContradiction};
use types::ValueTypes;

/// Check a model; see the module docs for what is checked.
pub fn check_model(model: &ModelProto) -> Result<()> {
    let newest_ir = Version::IrVersion as i64;
    let ir = model.ir_version();
    ensure!(
        (1..=newest_ir).contains(&ir),
        "ir_version {ir} is not supported: this tool reads ir_version 1 to {newest_ir}"
    );
    let opsets = imported_opsets(model)?;
    let graph = model
        .graph
        .as_ref()
        .context("the model has no graph (ModelProto.graph is missing)")?;
    ensure!(
        !graph.output.is_empty(),
        "graph has no outputs: nothing to compute"
    );
    let ctx = Ctx {
        opsets,
        functions: model
            .functions
            .iter()
            .map(|f| {
                (
                    canonical_domain(f.domain()).to_string(),
                    f.name().to_string(),
                )
            })
            .collect(),
        ir_version: ir,
    };
    check_graph(&ctx, graph, &HashMap::new(), &HashMap::new())?;
    // Main-graph output contradictions are the session's to correct (see `ranks`).
    check_model_ranks(graph)?;
    Ok(())
}

struct Ctx {
    /// Imported opset version per canonical domain.
    opsets: HashMap<String, i64>,
    /// Model-local functions `(domain, name)`: nodes calling them are not schema ops.
    functions: HashSet<(String, String)>,
    ir_version: i64,
}

impl Ctx {
    /// The opset a node of `domain` runs at; `None` when nothing is imported for it.
    fn opset(&self, domain: &str) -> Option<i64> {
        let domain = canonical_domain(domain);
        match self.opsets.get(domain) {
            Some(&v) => Some(v),
            // Before IR 3 a model without imports meant the default domain at opset 1.
            None if domain.is_empty() && self.ir_version < 3 => Some(1),
            None => None,
        }
    }
}

fn imported_opsets(model: &ModelProto) -> Result<HashMap<String, i64>> {
    let schemas = schema::schemas();
    let mut opsets = HashMap::new();
    for import in &model.opset_import {
        let domain = canonical_domain(import.domain());
        let version = import.version();
        if let Some((lo, hi)) = schemas.opset_range(domain) {
            ensure!(
                (lo..=hi).contains(&version),
                "opset {version} of domain {} is not supported: this tool knows opsets {lo} to {hi} (onnx {})",
                domain_display(domain),
                schemas.onnx_version
            );
        }
        if let Some(previous) = opsets.insert(domain.to_string(), version) {
            ensure!(
                previous == version,
                "domain {} is imported twice, at opsets {previous} and {version}",
                domain_display(domain)
            );
        }
    }
    Ok(opsets)
}

/// `node 'label' (Op)` for messages.
fn who(node: &NodeProto) -> String {
    format!("node '{}' ({})", op::node_label(node), node.op_type())
}

/// Check one graph and its subgraphs. `outer_ranks` and `outer_types` hold the declared ranks
/// and known element types of values visible from enclosing graphs. Returns the element types
/// of the graph's outputs, where known.
fn check_graph(
    ctx: &Ctx,
    g: &GraphProto,
    outer_ranks: &HashMap<String, usize>,
    outer_types: &HashMap<String, i32>,
) -> Result<Vec<Option<i32>>> {
    check_single_producers(g)?;
    check_initializers(g)?;
    check_declared_shapes(g)?;
    if ctx.ir_version < 4 {
        // Before IR 4 an initializer only gave a default value to a graph input.
        let inputs: HashSet<&str> = g.input.iter().map(|i| i.name()).collect();
        if let Some(t) = g.initializer.iter().find(|t| !inputs.contains(t.name())) {
            bail!(
                "initializer '{}' is not a graph input, which ir_version {} requires (from ir_version 4 on it need not be)",
                t.name(),
                ctx.ir_version
            );
        }
    }
    let ranks = declared_ranks(g, outer_ranks);
    let mut types = ValueTypes::new(g, outer_types)?;
    for node in &g.node {
        let mut subgraph_outputs = HashMap::new();
        for a in &node.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                let outputs = check_graph(ctx, sub, &ranks, &types.known)
                    .with_context(|| format!("in attribute '{}' of {}", a.name(), who(node)))?;
                subgraph_outputs.insert(a.name().to_string(), outputs);
            }
        }
        let schema = check_node(ctx, node, &ranks, &types.known)?;
        if node.op_type() == "If" && schema.is_some() {
            check_if_ranks(node, &ranks)?;
            check_if_outputs_typed(node, &subgraph_outputs)?;
        }
        types.add_node(node, schema, &subgraph_outputs)?;
    }
    Ok(types.outputs(g))
}

/// An `If` branch output that nothing types (no declaration, produced by a node of a domain
/// without ONNX schemas) while the other branch's output has a type: ONNX type inference merges
/// the two and fails ("Mismatched type: inferred=0 declared=1"); ONNX Runtime loads it only
/// when it knows the custom op. Fuzz (silero-vad): a branch's `Identity` moved to
/// `com.microsoft`. Both branches untyped is accepted by ONNX, so it is here.
fn check_if_outputs_typed(
    node: &NodeProto,
    subgraph_outputs: &HashMap<String, Vec<Option<i32>>>,
) -> Result<()> {
    let branches = ["then_branch", "else_branch"];
    for (this, other) in [(0, 1), (1, 0)] {
        let Some(branch) = node
            .attribute
            .iter()
            .find(|a| a.name() == branches[this])
            .and_then(|a| a.g.as_ref())
        else {
            continue;
        };
        let types = |b: usize, k: usize| {
            subgraph_outputs
                .get(branches[b])
                .and_then(|o| o.get(k).copied().flatten())
        };
        for (k, out) in branch.output.iter().enumerate() {
            if types(this, k).is_some() || types(other, k).is_none() {
                continue;
            }
            let Some(producer) = branch
                .node
                .iter()
                .find(|n| n.output.iter().any(|o| o == out.name()))
            else {
                continue;
            };
            let domain = canonical_domain(producer.domain());
            if schema::schemas().knows_domain(domain) {
                continue;
            }
            bail!(
                "{}: {} output '{}' has no declared type and its producer, {} of domain {}, has no ONNX schema, while {} gives {}: ONNX type inference cannot merge them (declare the output's type)",
                who(node),
                branches[this],
                out.name(),
                who(producer),
                domain_display(domain),
                branches[other],
                types::type_text(types(other, k).unwrap_or_default())
            );
        }
    }
    Ok(())
}

/// An `If` output declared (value_info, graph output) with a rank both branches' declared
/// outputs contradict: ONNX shape inference merges the branches' shapes into the node's.
fn check_if_ranks(node: &NodeProto, ranks: &HashMap<String, usize>) -> Result<()> {
    let branch_rank = |name: &str, k: usize| {
        let g = node
            .attribute
            .iter()
            .find(|a| a.name() == name)?
            .g
            .as_ref()?;
        match g.output.get(k)?.r#type.as_ref()?.value.as_ref()? {
            type_proto::Value::TensorType(t) => Some(t.shape.as_ref()?.dim.len()),
            _ => None,
        }
    };
    for (k, out) in node.output.iter().enumerate() {
        let (Some(then_rank), Some(else_rank), Some(&declared)) = (
            branch_rank("then_branch", k),
            branch_rank("else_branch", k),
            ranks.get(out),
        ) else {
            continue;
        };
        ensure!(
            then_rank != else_rank || then_rank == declared,
            "{}: output '{out}' is declared with rank {declared}, but both branches give rank {then_rank}",
            who(node)
        );
    }
    Ok(())
}

/// Every value of the graph has one producer: a node output, a graph input or an
/// initializer (an initializer may also be listed as a graph input: it is the default); every
/// graph output has one in the graph itself.
fn check_single_producers(g: &GraphProto) -> Result<()> {
    let mut producer: HashMap<&str, String> = HashMap::new();
    for input in &g.input {
        let name = input.name();
        ensure!(
            producer
                .insert(name, format!("graph input '{name}'"))
                .is_none(),
            "graph input '{name}' is declared twice"
        );
    }
    for t in &g.initializer {
        let name = t.name();
        if let Some(other) = producer.get(name) {
            ensure!(
                other.starts_with("graph input"),
                "initializer '{name}' is defined twice"
            );
        }
        producer.insert(name, format!("initializer '{name}'"));
    }
    for node in &g.node {
        for out in node.output.iter().filter(|o| !o.is_empty()) {
            if let Some(other) = producer.get(out.as_str()) {
                bail!(
                    "value '{out}' is produced twice, by {other} and by {}",
                    who(node)
                );
            }
            producer.insert(out, who(node));
        }
    }
    // onnx.checker wants every graph output produced inside its own graph (a subgraph's too).
    for out in &g.output {
        ensure!(
            producer.contains_key(out.name()),
            "graph output '{}' is not produced in its graph (by a node, an input or an initializer)",
            out.name()
        );
    }
    Ok(())
}

/// Ranks the graph declares: inputs, outputs and value_info with a shape, initializers, and
/// Constant nodes holding a tensor; plus those of enclosing graphs.
fn declared_ranks(g: &GraphProto, outer: &HashMap<String, usize>) -> HashMap<String, usize> {
    let mut ranks = outer.clone();
    for v in g.input.iter().chain(&g.output).chain(&g.value_info) {
        let shape = v.r#type.as_ref().and_then(|t| match &t.value {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref(),
            _ => None,
        });
        if let Some(shape) = shape {
            ranks.insert(v.name().to_string(), shape.dim.len());
        }
    }
    for (name, t) in graph_constants(g) {
        ranks.insert(name.to_string(), t.dims.len());
    }
    ranks
}

/// Check one node; returns its op's schema when it has one (a standard domain's op, not a
/// model-local function).
fn check_node(
    ctx: &Ctx,
    node: &NodeProto,
    ranks: &HashMap<String, usize>,
    types: &HashMap<String, i32>,
) -> Result<Option<&'static OpSchema>> {
    let schemas = schema::schemas();
    let domain = canonical_domain(node.domain());
    let op = node.op_type();
    ensure!(!op.is_empty(), "{}: the node has no op_type", who(node));
    // Every domain a node uses needs an opset import (custom ones too: runtimes resolve
    // custom ops and model-local functions through it).
    ensure!(
        ctx.opset(domain).is_some(),
        "{}: domain {} is used but the model imports no opset for it",
        who(node),
        domain_display(domain)
    );
    if !schemas.knows_domain(domain)
        || ctx
            .functions
            .contains(&(domain.to_string(), op.to_string()))
    {
        return Ok(None);
    }
    let Some(opset) = ctx.opset(domain) else {
        bail!(
            "{}: domain {} is used but the model imports no opset for it",
            who(node),
            domain_display(domain)
        );
    };
    let in_opset = if domain.is_empty() {
        format!("opset {opset}")
    } else {
        format!("opset {opset} of domain '{domain}'")
    };
    let schema = match schemas.lookup(domain, op, opset) {
        Lookup::Found(s) => s,
        Lookup::NotYet { since_version } => bail!(
            "{}: op {op} does not exist in {in_opset} (it arrives in opset {since_version})",
            who(node)
        ),
        Lookup::Removed { since_version } => bail!(
            "{}: op {op} does not exist in {in_opset} (deprecated since opset {since_version})",
            who(node)
        ),
        Lookup::Unknown => bail!("{}: op {op} does not exist in {in_opset}", who(node)),
    };
    check_counts(node, schema)?;
    check_attributes(node, schema)?;
    check_input_types(node, schema, types)?;
    check_values(node, &|n| ranks.get(n).copied())?;
    // Resize from opset 11 reads its output size from `scales` (input 2) or `sizes` (input 3);
    // the schema lists both as optional, ONNX shape inference and runtimes need one.
    if op == "Resize" && domain.is_empty() && opset >= 11 {
        let given = |k: usize| node.input.get(k).is_some_and(|n| !n.is_empty());
        ensure!(
            given(2) || given(3),
            "{}: neither input 2 (scales) nor input 3 (sizes) is given; Resize needs one of them",
            who(node)
        );
    }
    Ok(Some(schema))
}

fn range_text((lo, hi): (usize, usize)) -> String {
    if lo == hi {
        format!("{lo}")
    } else if hi == usize::MAX {
        format!("at least {lo}")
    } else {
        format!("{lo} to {hi}")
    }
}

fn check_counts(node: &NodeProto, schema: &OpSchema) -> Result<()> {
    let op = node.op_type();
    let (n_in, n_out) = (node.input.len(), node.output.len());
    let (lo, hi) = schema.inputs;
    ensure!(
        (lo..=hi).contains(&n_in),
        "{} has {n_in} input(s); {op} takes {}",
        who(node),
        range_text(schema.inputs)
    );
    let (lo, hi) = schema.outputs;
    ensure!(
        (lo..=hi).contains(&n_out),
        "{} has {n_out} output(s); {op} produces {}",
        who(node),
        range_text(schema.outputs)
    );
    for (kind, names, params) in [
        ("input", &node.input, &schema.input_params),
        ("output", &node.output, &schema.output_params),
    ] {
        for (slot, (name, param)) in names.iter().zip(params.iter()).enumerate() {
            ensure!(
                *param != Param::Single || !name.is_empty(),
                "{}: {kind} {slot} is required but its name is empty",
                who(node)
            );
        }
    }
    Ok(())
}

/// The type an attribute carries: its `type` field, or for writers that leave it unset the
/// one value field that is filled. `None` when nothing says (an unset type and no value).
fn attribute_kind(a: &AttributeProto) -> Option<AttributeType> {
    let declared = a.r#type();
    if declared != AttributeType::Undefined {
        return Some(declared);
    }
    let filled = [
        (a.f.is_some(), AttributeType::Float),
        (a.i.is_some(), AttributeType::Int),
        (a.s.is_some(), AttributeType::String),
        (a.t.is_some(), AttributeType::Tensor),
        (a.g.is_some(), AttributeType::Graph),
        (a.sparse_tensor.is_some(), AttributeType::SparseTensor),
        (a.tp.is_some(), AttributeType::TypeProto),
        (!a.floats.is_empty(), AttributeType::Floats),
        (!a.ints.is_empty(), AttributeType::Ints),
        (!a.strings.is_empty(), AttributeType::Strings),
        (!a.tensors.is_empty(), AttributeType::Tensors),
        (!a.graphs.is_empty(), AttributeType::Graphs),
        (!a.sparse_tensors.is_empty(), AttributeType::SparseTensors),
        (!a.type_protos.is_empty(), AttributeType::TypeProtos),
    ];
    filled.iter().find(|(set, _)| *set).map(|&(_, kind)| kind)
}

fn is_list(kind: AttributeType) -> bool {
    use AttributeType::*;
    matches!(
        kind,
        Floats | Ints | Strings | Tensors | Graphs | SparseTensors | TypeProtos
    )
}

fn check_attributes(node: &NodeProto, schema: &OpSchema) -> Result<()> {
    let op = node.op_type();
    let mut seen = HashSet::new();
    for a in &node.attribute {
        let name = a.name();
        ensure!(
            seen.insert(name),
            "{}: attribute '{name}' appears twice",
            who(node)
        );
        let Some(expected) = schema.attribute(name) else {
            let known: Vec<&str> = schema.attributes.iter().map(|a| a.name).collect();
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            bail!(
                "{}: unknown attribute '{name}' ({op}-{} has attributes: {known})",
                who(node),
                schema.since_version
            );
        };
        match attribute_kind(a) {
            Some(kind) if kind == expected.kind => {}
            // An empty list written without its type: nothing to contradict the schema.
            None if is_list(expected.kind) => {}
            Some(kind) => bail!(
                "{}: attribute '{name}' is {}, {op}-{} expects {}",
                who(node),
                kind.as_str_name(),
                schema.since_version,
                expected.kind.as_str_name()
            ),
            None => bail!("{}: attribute '{name}' has no value", who(node)),
        }
    }
    for required in schema.attributes.iter().filter(|a| a.required) {
        ensure!(
            seen.contains(required.name),
            "{}: required attribute '{}' is missing",
            who(node),
            required.name
        );
    }
    Ok(())
}

/// Ops whose kernel/stride/pad attributes describe a sliding window over `rank - 2` spatial
/// dims of input 0.
const WINDOW_OPS: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "ConvInteger",
    "QLinearConv",
    "MaxPool",
    "AveragePool",
    "LpPool",
    "MaxUnpool",
];

/// Ops with an `axis` attribute indexing input 0's dims, valid in `[-rank, rank - 1]`
/// (Flatten in `[-rank, rank]`: it may split after the last dim).
const AXIS_OPS: &[&str] = &[
    "Concat",
    "Softmax",
    "LogSoftmax",
    "Hardmax",
    "Flatten",
    "Gather",
    "GatherElements",
    "Split",
    "ArgMax",
    "ArgMin",
    "LayerNormalization",
    "Compress",
];

/// Ops with an `axes` attribute indexing input 0's dims.
const AXES_OPS: &[&str] = &[
    "Squeeze",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
];

/// The values the tool relies on, in range (see the module docs), where `rank_of` knows the
/// ranks of the node's inputs: the declared ones ([`check_node`]) and, where nothing declares
/// them, the inferred ones ([`ranks`]' walk).
pub(super) fn check_values(
    node: &NodeProto,
    rank_of: &dyn Fn(&str) -> Option<usize>,
) -> Result<()> {
    let op = node.op_type();
    let rank = node
        .input
        .first()
        .filter(|n| !n.is_empty())
        .and_then(|n| rank_of(n));
    // `ensure!(cond, fail(..))` passes the built error through unchanged.
    let fail = |what: String| anyhow::anyhow!("{}: {what}", who(node));
    if op == "BatchNormalization" {
        if let Some(mode) = node.attr_int("training_mode")? {
            ensure!(
                mode == 0 || mode == 1,
                fail(format!(
                    "attribute 'training_mode' is {mode}, must be 0 or 1"
                ))
            );
            ensure!(
                mode == 0 || node.output.len() == 3,
                fail(format!(
                    "training_mode 1 needs 3 outputs (Y, running mean, running var), it has {}",
                    node.output.len()
                ))
            );
        }
        // tract's BatchNormalization rules abort the process (a panic it cannot unwind) on
        // these: X needs a channel axis, the four statistics are vectors.
        if let Some(r) = rank {
            ensure!(
                r >= 2,
                fail(format!(
                    "input X has rank {r}; it needs at least 2 (N, C, ...)"
                ))
            );
        }
        for (k, what) in [(1, "scale"), (2, "B"), (3, "mean"), (4, "var")] {
            if let Some(r) = node.input.get(k).and_then(|n| rank_of(n)) {
                ensure!(
                    r == 1,
                    fail(format!(
                        "input {what} has rank {r}; it must be a vector (rank 1)"
                    ))
                );
            }
        }
    }
    if op == "Gemm" {
        // ONNX reads the flags through an `int` cast (2^62 is "not transposed"), runtimes as
        // any nonzero value: only 0 and 1 mean the same everywhere.
        for name in ["transA", "transB"] {
            if let Some(v) = node.attr_int(name)? {
                ensure!(
                    v == 0 || v == 1,
                    fail(format!("attribute '{name}' is {v}, must be 0 or 1"))
                );
            }
        }
        for (k, what) in [(0, "A"), (1, "B")] {
            if let Some(r) = node.input.get(k).and_then(|n| rank_of(n)) {
                ensure!(
                    r == 2,
                    fail(format!(
                        "input {what} has rank {r}; Gemm multiplies matrices (rank 2)"
                    ))
                );
            }
        }
    }
    if matches!(op, "LSTM" | "GRU" | "RNN") {
        if let Some(r) = rank {
            ensure!(
                r == 3,
                fail(format!(
                    "input X has rank {r}; {op} takes [sequence, batch, features] (rank 3)"
                ))
            );
        }
    }
    if op == "Concat" {
        let ranks: Vec<usize> = node.input.iter().filter_map(|n| rank_of(n)).collect();
        if let Some(r) = ranks.iter().find(|&&r| r != ranks[0]) {
            return Err(fail(format!(
                "its inputs have ranks {} and {r}; Concat joins tensors of one rank",
                ranks[0]
            )));
        }
    }
    if WINDOW_OPS.contains(&op) {
        // N, C and at least one spatial dim (ONNX: "Input tensor must have at least 3
        // dimensions").
        if let (Some(r), false) = (rank, matches!(op, "ConvTranspose" | "MaxUnpool")) {
            ensure!(
                r >= 3,
                fail(format!(
                    "input 0 has rank {r}; {op} needs at least 3 (N, C and a spatial dim)"
                ))
            );
        }
        if let Some(group) = node.attr_int("group")? {
            ensure!(
                group >= 1,
                fail(format!("attribute 'group' is {group}, must be >= 1"))
            );
        }
        // The spatial rank from input 0, else from the weight's rank, else from kernel_shape.
        let weight = match op {
            "Conv" | "ConvTranspose" | "ConvInteger" => Some(1),
            "QLinearConv" => Some(3),
            _ => None,
        };
        let weight_rank = weight
            .and_then(|k| node.input.get(k))
            .and_then(|w| rank_of(w));
        if let (Some(x), Some(w)) = (rank, weight_rank) {
            ensure!(
                x == w,
                fail(format!(
                    "the weight has rank {w}, input 0 has rank {x}; they must be equal (M, C/group, window...)"
                ))
            );
        }
        let kernel = node.attr_ints("kernel_shape")?.map(|k| k.len() + 2);
        let (spatial, source) = match (rank, weight_rank, kernel) {
            (Some(r), _, _) => (Some(r), "input 0"),
            (None, Some(r), _) => (Some(r), "the weight"),
            (None, None, k) => (k, "kernel_shape"),
        };
        let spatial = spatial.filter(|&r| r >= 2).map(|r| r - 2);
        for (name, min, per_dim) in [
            ("kernel_shape", 1, 1),
            ("strides", 1, 1),
            ("dilations", 1, 1),
            ("pads", 0, 2),
            ("output_padding", 0, 1),
        ] {
            let Some(values) = node.attr_ints(name)? else {
                continue;
            };
            if let Some(v) = values.iter().find(|&&v| v < min) {
                return Err(fail(format!(
                    "attribute '{name}' holds {v}, every value must be >= {min}"
                )));
            }
            if let Some(spatial) = spatial {
                ensure!(
                    values.len() == spatial * per_dim,
                    fail(format!(
                        "attribute '{name}' has {} values, {source} has {spatial} spatial dims (expected {})",
                        values.len(),
                        spatial * per_dim
                    ))
                );
            }
        }
        if let Some(pad) = node.attr_string("auto_pad")? {
            ensure!(
                matches!(pad.as_str(), "NOTSET" | "SAME_UPPER" | "SAME_LOWER" | "VALID"),
                fail(format!(
                    "attribute 'auto_pad' is '{pad}', expected NOTSET, SAME_UPPER, SAME_LOWER or VALID"
                ))
            );
        }
    }
    if AXIS_OPS.contains(&op) {
        if let (Some(axis), Some(rank)) = (node.attr_int("axis")?, rank) {
            let (lo, hi) = axis_range(rank);
            let range = if op == "Flatten" {
                (lo, hi + 1)
            } else {
                (lo, hi)
            };
            check_axis(axis, range, "axis", rank).map_err(fail)?;
        }
    }
    if AXES_OPS.contains(&op) {
        if let (Some(axes), Some(rank)) = (node.attr_ints("axes")?, rank) {
            for axis in axes {
                check_axis(axis, axis_range(rank), "axes", rank).map_err(fail)?;
            }
        }
    }
    if op == "Unsqueeze" {
        if let (Some(axes), Some(rank)) = (node.attr_ints("axes")?, rank) {
            let out_rank = rank + axes.len();
            for &axis in &axes {
                check_axis(axis, axis_range(out_rank), "axes", rank).map_err(fail)?;
            }
        }
    }
    if op == "Transpose" {
        if let Some(perm) = node.attr_ints("perm")? {
            let n = perm.len();
            let mut sorted = perm.clone();
            sorted.sort_unstable();
            ensure!(
                sorted.iter().copied().eq(0..n as i64),
                fail(format!(
                    "attribute 'perm' {perm:?} is not a permutation of 0..{n}"
                ))
            );
            if let Some(rank) = rank {
                ensure!(
                    n == rank,
                    fail(format!(
                        "attribute 'perm' has {n} values, input 0 has rank {rank}"
                    ))
                );
            }
        }
    }
    if matches!(op, "QuantizeLinear" | "DequantizeLinear") {
        // The axis matters only for per-axis scales (a 1-D scale); per-tensor ignores it.
        let per_axis = node.input.get(1).and_then(|s| rank_of(s)) == Some(1);
        if let (Some(axis), Some(rank), true) = (node.attr_int("axis")?, rank, per_axis) {
            check_axis(axis, axis_range(rank), "axis", rank).map_err(fail)?;
        }
    }
    if op == "Constant" {
        // The schema lists every value attribute as optional; exactly one must be set.
        let values = node.attribute.len();
        ensure!(
            values == 1,
            fail(format!(
                "has {values} value attributes, a Constant needs exactly one"
            ))
        );
    }
    if op == "Cast" {
        if let Ok(Some(to)) = node.attr_int("to") {
            let known = DataType::try_from(to as i32)
                .ok()
                .filter(|t| *t != DataType::Undefined && i64::from(*t as i32) == to);
            ensure!(
                known.is_some(),
                fail(format!(
                    "attribute 'to' is {to}, which is no ONNX element type"
                ))
            );
        }
    }
    Ok(())
}

/// Valid axes of a tensor of rank `rank`: `[-rank, rank - 1]`.
fn axis_range(rank: usize) -> (i64, i64) {
    (-(rank as i64), rank as i64 - 1)
}

/// `axis` must lie in `range` (see [`axis_range`]); the message names the attribute.
fn check_axis(axis: i64, (lo, hi): (i64, i64), name: &str, rank: usize) -> Result<(), String> {
    if (lo..=hi).contains(&axis) {
        Ok(())
    } else {
        Err(format!(
            "attribute '{name}' is {axis}, out of range [{lo}, {hi}] for input 0 of rank {rank}"
        ))
    }
}
