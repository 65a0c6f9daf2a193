//! Structure-aware mutations of an ONNX `ModelProto`, for fuzzing the whole tool with models a
//! careful (or hostile) user could hand it: declared dims, initializer dims/types/bytes, node
//! wiring, attributes, op types and domains, opset and IR versions, external-data fields, graph
//! outputs, non-finite weights, and flipped bytes on the encoded result.
//!
//! [`mutate`] applies `count` mutations drawn from [`Kind::ALL`] and returns the encoded bytes
//! with a one-line description of each mutation (what a reproducer needs besides the model).
//! Everything random comes from the `rng` passed in, so a seeded `ChaCha8Rng` gives the same
//! mutations on every machine; the cargo-fuzz target (`fuzz/`) passes a generator that reads the
//! fuzzer's input bytes instead, so libFuzzer steers the choices.
//!
//! Invariants: no mutation panics on any model (missing graph, no nodes, empty lists); a
//! mutation that finds nothing to act on is not applied and another kind is drawn; a byte flip
//! acts on the encoded model and therefore comes last.

use onnx_compress::onnx::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType,
    tensor_shape_proto::dimension::Value as Dim, type_proto, AttributeProto, GraphProto,
    ModelProto, OperatorSetIdProto, StringStringEntryProto, TensorShapeProto, ValueInfoProto,
};
use prost::Message;
use rand::Rng;

/// The families of mutations; one is drawn per mutation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A declared dim of a graph input/output/value_info: 0, -1, 2^31, 2^40, i64::MAX, a huge
    /// symbolic name; or its rank changed.
    DeclaredDim,
    /// An initializer's dims no longer match its data (0, -1, doubled, 2^40, rank changed).
    InitializerDims,
    /// An initializer's element type replaced (another type, UNDEFINED, out of range).
    InitializerType,
    /// An initializer's raw bytes truncated, extended or emptied, or data in two fields.
    InitializerBytes,
    /// A node input renamed to a missing tensor, another tensor or the empty name.
    NodeInput,
    /// A node output duplicated: another node's output, a graph input, an initializer.
    NodeOutput,
    /// A node reads the output of itself or of a node that depends on it.
    Cycle,
    /// An attribute removed.
    AttributeRemoved,
    /// An attribute's type changed (payload converted or left disagreeing with the tag), or an
    /// attribute another op has added.
    AttributeType,
    /// An attribute's value made extreme (0, -1, i64::MAX/MIN, 2^40, NaN, Inf, empty list).
    AttributeValue,
    /// A node's op type swapped for another standard op (attributes kept).
    OpSwapped,
    /// An op type no schema knows, in the default domain.
    UnknownOp,
    /// A node moved to a custom domain (with or without an opset import for it).
    CustomDomain,
    /// The default domain's opset: 0, -1, 1, 99, 2^40, removed or imported twice.
    Opset,
    /// The model's IR version: 0, -1, 1, 99, 2^40.
    IrVersion,
    /// An initializer pointed at external data: a missing file, a path outside the model's
    /// folder, the model itself, absurd offsets and lengths.
    ExternalData,
    /// A graph output (or all of them) removed.
    GraphOutputRemoved,
    /// A graph output renamed to a missing tensor, an input, an initializer or an intermediate.
    GraphOutputRenamed,
    /// A NaN, +Inf or -Inf written into a float initializer.
    NonFinite,
    /// Bits flipped or bytes overwritten in the encoded model.
    ByteFlip,
}

impl Kind {
    pub const ALL: [Kind; 20] = [
        Kind::DeclaredDim,
        Kind::InitializerDims,
        Kind::InitializerType,
        Kind::InitializerBytes,
        Kind::NodeInput,
        Kind::NodeOutput,
        Kind::Cycle,
        Kind::AttributeRemoved,
        Kind::AttributeType,
        Kind::AttributeValue,
        Kind::OpSwapped,
        Kind::UnknownOp,
        Kind::CustomDomain,
        Kind::Opset,
        Kind::IrVersion,
        Kind::ExternalData,
        Kind::GraphOutputRemoved,
        Kind::GraphOutputRenamed,
        Kind::NonFinite,
        Kind::ByteFlip,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::DeclaredDim => "declared-dim",
            Kind::InitializerDims => "initializer-dims",
            Kind::InitializerType => "initializer-type",
            Kind::InitializerBytes => "initializer-bytes",
            Kind::NodeInput => "node-input",
            Kind::NodeOutput => "node-output",
            Kind::Cycle => "cycle",
            Kind::AttributeRemoved => "attribute-removed",
            Kind::AttributeType => "attribute-type",
            Kind::AttributeValue => "attribute-value",
            Kind::OpSwapped => "op-swapped",
            Kind::UnknownOp => "unknown-op",
            Kind::CustomDomain => "custom-domain",
            Kind::Opset => "opset",
            Kind::IrVersion => "ir-version",
            Kind::ExternalData => "external-data",
            Kind::GraphOutputRemoved => "graph-output-removed",
            Kind::GraphOutputRenamed => "graph-output-renamed",
            Kind::NonFinite => "nonfinite-weight",
            Kind::ByteFlip => "byte-flip",
        }
    }
}

/// One applied mutation: its family and what exactly changed (names the node/tensor).
#[derive(Debug, Clone)]
pub struct Mutation {
    pub kind: Kind,
    pub what: String,
}

impl std::fmt::Display for Mutation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.name(), self.what)
    }
}

/// A mutated model.
#[derive(Debug, Clone)]
pub struct Mutated {
    /// The encoded model (after any byte flips).
    pub bytes: Vec<u8>,
    pub mutations: Vec<Mutation>,
    /// A float initializer that still holds a NaN or infinity after every mutation (and no byte
    /// was flipped): a run must refuse the model or name this tensor.
    pub nonfinite_tensor: Option<String>,
}

impl Mutated {
    /// The mutations, `; `-separated (one line).
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self.mutations.iter().map(|m| m.to_string()).collect();
        parts.join("; ")
    }
}

/// Apply `count` mutations (kinds drawn uniformly; a kind with nothing to act on is redrawn)
/// to a copy of `model`.
pub fn mutate(model: &ModelProto, count: usize, rng: &mut impl Rng) -> Mutated {
    let mut proto = model.clone();
    let mut mutations = Vec::new();
    let mut flips = 0;
    for _ in 0..count {
        // A bounded number of redraws: a model with no graph at all has nothing to mutate
        // but its bytes and header fields.
        for _ in 0..32 {
            let kind = Kind::ALL[rng.random_range(0..Kind::ALL.len())];
            if kind == Kind::ByteFlip {
                flips += rng.random_range(1..=4);
                break;
            }
            if let Some(what) = apply(kind, &mut proto, rng) {
                mutations.push(Mutation { kind, what });
                break;
            }
        }
    }
    let nonfinite_tensor = if flips == 0 {
        mutations
            .iter()
            .filter(|m| m.kind == Kind::NonFinite)
            .filter_map(|m| m.what.split('\'').nth(1).map(str::to_string))
            .find(|name| holds_nonfinite(&proto, name))
    } else {
        None
    };
    let mut bytes = proto.encode_to_vec();
    if flips > 0 && !bytes.is_empty() {
        let mut at = Vec::new();
        for _ in 0..flips {
            let i = rng.random_range(0..bytes.len());
            if rng.random_bool(0.5) {
                bytes[i] ^= 1 << rng.random_range(0..8);
            } else {
                bytes[i] = rng.random();
            }
            at.push(i.to_string());
        }
        mutations.push(Mutation {
            kind: Kind::ByteFlip,
            what: format!("byte(s) at offset {} of {}", at.join(", "), bytes.len()),
        });
    }
    Mutated {
        bytes,
        mutations,
        nonfinite_tensor,
    }
}

fn pick<'a, T>(rng: &mut impl Rng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

/// Apply one mutation of `kind`; `None` when the model has nothing it can act on.
pub fn apply(kind: Kind, m: &mut ModelProto, rng: &mut impl Rng) -> Option<String> {
    match kind {
        Kind::Opset => return Some(opset(m, rng)),
        Kind::IrVersion => {
            let v = *pick(rng, &[0i64, -1, 1, 99, 1 << 40]);
            m.ir_version = Some(v);
            return Some(format!("ir_version = {v}"));
        }
        Kind::ByteFlip => return None,
        _ => {}
    }
    let mut domains = Vec::new();
    let g = m.graph.as_mut()?;
    let what = match kind {
        Kind::DeclaredDim => declared_dim(g, rng),
        Kind::InitializerDims => initializer_dims(g, rng),
        Kind::InitializerType => initializer_type(g, rng),
        Kind::InitializerBytes => initializer_bytes(g, rng),
        Kind::NodeInput => node_input(g, rng),
        Kind::NodeOutput => node_output(g, rng),
        Kind::Cycle => cycle(g, rng),
        Kind::AttributeRemoved => attribute_removed(g, rng),
        Kind::AttributeType => attribute_type(g, rng),
        Kind::AttributeValue => attribute_value(g, rng),
        Kind::OpSwapped => op_swapped(g, rng),
        Kind::UnknownOp => unknown_op(g, rng),
        Kind::CustomDomain => custom_domain(g, rng, &mut domains),
        Kind::ExternalData => external_data(g, rng),
        Kind::GraphOutputRemoved => graph_output_removed(g, rng),
        Kind::GraphOutputRenamed => graph_output_renamed(g, rng),
        Kind::NonFinite => nonfinite(g, rng),
        Kind::Opset | Kind::IrVersion | Kind::ByteFlip => unreachable!("handled above"),
    };
    for domain in domains {
        m.opset_import.push(OperatorSetIdProto {
            domain: Some(domain),
            version: Some(1),
        });
    }
    what
}

fn name(n: &Option<String>) -> &str {
    n.as_deref().unwrap_or("")
}

/// Every tensor name the graph mentions: inputs, initializers, node outputs.
fn tensor_names(g: &GraphProto) -> Vec<String> {
    let mut v: Vec<String> = g.input.iter().map(|i| name(&i.name).to_string()).collect();
    v.extend(g.initializer.iter().map(|t| name(&t.name).to_string()));
    for n in &g.node {
        v.extend(n.output.iter().cloned());
    }
    v.retain(|s| !s.is_empty());
    v
}

fn shape_of(vi: &mut ValueInfoProto) -> Option<&mut TensorShapeProto> {
    match vi.r#type.as_mut()?.value.as_mut()? {
        type_proto::Value::TensorType(t) => t.shape.as_mut(),
        _ => None,
    }
}

fn declared_dim(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    let initializers: Vec<String> = g
        .initializer
        .iter()
        .map(|t| name(&t.name).to_string())
        .collect();
    let list = match rng.random_range(0..10) {
        0..=6 => &mut g.input,
        7..=8 => &mut g.output,
        _ => &mut g.value_info,
    };
    let candidates: Vec<usize> = (0..list.len())
        .filter(|&i| !initializers.contains(&name(&list[i].name).to_string()))
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let vi = &mut list[*pick(rng, &candidates)];
    let who = name(&vi.name).to_string();
    let shape = shape_of(vi)?;
    if shape.dim.is_empty() || rng.random_range(0..8) == 0 {
        if !shape.dim.is_empty() && rng.random_bool(0.5) {
            shape.dim.pop();
            return Some(format!("'{who}' loses its last declared dim"));
        }
        shape.dim.push(Default::default());
        shape.dim.last_mut().unwrap().value = Some(Dim::DimValue(2));
        return Some(format!("'{who}' gains a declared dim 2"));
    }
    let i = rng.random_range(0..shape.dim.len());
    let (value, label) = match rng.random_range(0..8) {
        0 => (Dim::DimValue(0), "0".to_string()),
        1 => (Dim::DimValue(-1), "-1".to_string()),
        2 => (Dim::DimValue(1 << 31), "2^31".to_string()),
        3 => (Dim::DimValue(1 << 40), "2^40".to_string()),
        4 => (Dim::DimValue(i64::MAX), "i64::MAX".to_string()),
        5 => (Dim::DimValue(100_000), "100000".to_string()),
        6 => (
            Dim::DimParam("batch".into()),
            "symbolic 'batch'".to_string(),
        ),
        _ => (
            Dim::DimParam("n".repeat(4096)),
            "a 4096-character symbolic name".to_string(),
        ),
    };
    shape.dim[i].value = Some(value);
    Some(format!("'{who}' declared dim {i} = {label}"))
}

fn initializer_dims(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    if g.initializer.is_empty() {
        return None;
    }
    let at = rng.random_range(0..g.initializer.len());
    let t = &mut g.initializer[at];
    let who = name(&t.name).to_string();
    let before = format!("{:?}", t.dims);
    match rng.random_range(0..7) {
        0 if !t.dims.is_empty() => {
            t.dims.pop();
        }
        1 => t.dims.push(1),
        2 => t.dims.clear(),
        _ if t.dims.is_empty() => t.dims.push(*pick(rng, &[0, -1, 2, 1 << 40])),
        k => {
            let i = rng.random_range(0..t.dims.len());
            t.dims[i] = match k {
                3 => 0,
                4 => -1,
                5 => t.dims[i].saturating_mul(2).max(2),
                _ => 1 << 40,
            };
        }
    }
    Some(format!("initializer '{who}' dims {before} -> {:?}", t.dims))
}

fn initializer_type(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    if g.initializer.is_empty() {
        return None;
    }
    let at = rng.random_range(0..g.initializer.len());
    let t = &mut g.initializer[at];
    let types = [
        DataType::Undefined as i32,
        DataType::Uint8 as i32,
        DataType::Int8 as i32,
        DataType::Int32 as i32,
        DataType::Int64 as i32,
        DataType::String as i32,
        DataType::Bool as i32,
        DataType::Float16 as i32,
        DataType::Double as i32,
        DataType::Bfloat16 as i32,
        DataType::Complex64 as i32,
        DataType::Int4 as i32,
        99,
        -1,
    ];
    let before = t.data_type.unwrap_or(0);
    let mut to = *pick(rng, &types);
    if to == before {
        to = DataType::Int32 as i32;
    }
    t.data_type = Some(to);
    Some(format!(
        "initializer '{}' element type {before} -> {to}",
        name(&t.name)
    ))
}

fn initializer_bytes(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    let with_raw: Vec<usize> = (0..g.initializer.len())
        .filter(|&i| {
            g.initializer[i]
                .raw_data
                .as_ref()
                .is_some_and(|r| !r.is_empty())
        })
        .collect();
    if with_raw.is_empty() {
        return None;
    }
    let t = &mut g.initializer[*pick(rng, &with_raw)];
    let who = name(&t.name).to_string();
    let mut raw = t.raw_data.take().unwrap().to_vec();
    let before = raw.len();
    let what = match rng.random_range(0..5) {
        0 => {
            raw.truncate(rng.random_range(0..before));
            "truncated"
        }
        1 => {
            raw.truncate(before - 1);
            "one byte short"
        }
        2 => {
            let extra = rng.random_range(1..9);
            raw.extend((0..extra).map(|_| rng.random::<u8>()));
            "extended"
        }
        3 => {
            raw.clear();
            "emptied"
        }
        _ => {
            // Both encodings at once: the spec allows only one.
            t.float_data = vec![1.0; (before / 4).max(1)];
            "also given float_data"
        }
    };
    let after = raw.len();
    t.raw_data = Some(raw.into());
    Some(format!(
        "initializer '{who}' raw bytes {what}: {before} -> {after}"
    ))
}

fn node_input(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    let names = tensor_names(g);
    let with_inputs: Vec<usize> = (0..g.node.len())
        .filter(|&i| !g.node[i].input.is_empty())
        .collect();
    if with_inputs.is_empty() {
        return None;
    }
    let n = &mut g.node[*pick(rng, &with_inputs)];
    let slot = rng.random_range(0..n.input.len());
    let to = match rng.random_range(0..4) {
        0 | 1 => "fuzz_missing_tensor".to_string(),
        2 if !names.is_empty() => pick(rng, &names).clone(),
        _ => String::new(),
    };
    let before = std::mem::replace(&mut n.input[slot], to.clone());
    Some(format!(
        "node '{}' ({}) input {slot} '{before}' -> '{to}'",
        name(&n.name),
        name(&n.op_type)
    ))
}

fn node_output(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    let with_outputs: Vec<usize> = (0..g.node.len())
        .filter(|&i| !g.node[i].output.is_empty())
        .collect();
    if with_outputs.is_empty() {
        return None;
    }
    let i = *pick(rng, &with_outputs);
    let other_outputs: Vec<String> = g
        .node
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .flat_map(|(_, n)| n.output.iter().cloned())
        .filter(|s| !s.is_empty())
        .collect();
    let target = match rng.random_range(0..4) {
        0 if !other_outputs.is_empty() => pick(rng, &other_outputs).clone(),
        1 if !g.input.is_empty() => name(&pick(rng, &g.input).name).to_string(),
        2 if !g.initializer.is_empty() => name(&pick(rng, &g.initializer).name).to_string(),
        _ => {
            let n = &mut g.node[i];
            let dup = n.output[0].clone();
            n.output.push(dup.clone());
            return Some(format!(
                "node '{}' lists output '{dup}' twice",
                name(&n.name)
            ));
        }
    };
    let n = &mut g.node[i];
    let slot = rng.random_range(0..n.output.len());
    let before = std::mem::replace(&mut n.output[slot], target.clone());
    Some(format!(
        "node '{}' ({}) output {slot} '{before}' -> '{target}' (already produced elsewhere)",
        name(&n.name),
        name(&n.op_type)
    ))
}

fn cycle(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    let with_inputs: Vec<usize> = (0..g.node.len())
        .filter(|&i| !g.node[i].input.is_empty())
        .collect();
    if with_inputs.is_empty() {
        return None;
    }
    let reader = *pick(rng, &with_inputs);
    // The reader itself and every node fed (transitively) by it: reading any of their
    // outputs closes a loop through the reader.
    let mut downstream = vec![reader];
    let mut tensors: Vec<String> = g.node[reader].output.clone();
    while let Some(t) = tensors.pop() {
        for (j, n) in g.node.iter().enumerate() {
            if !downstream.contains(&j) && n.input.contains(&t) {
                downstream.push(j);
                tensors.extend(n.output.iter().cloned());
            }
        }
    }
    downstream.retain(|&j| g.node[j].output.first().is_some_and(|o| !o.is_empty()));
    if downstream.is_empty() {
        return None;
    }
    let producer = *pick(rng, &downstream);
    let tensor = g.node[producer].output[0].clone();
    let producer_name = name(&g.node[producer].name).to_string();
    let n = &mut g.node[reader];
    let slot = rng.random_range(0..n.input.len());
    n.input[slot] = tensor.clone();
    Some(format!(
        "node '{}' input {slot} reads '{tensor}' of node '{producer_name}', which depends on it (a cycle)",
        name(&n.name)
    ))
}

fn nodes_with_attributes(g: &GraphProto) -> Vec<usize> {
    (0..g.node.len())
        .filter(|&i| !g.node[i].attribute.is_empty())
        .collect()
}

fn attribute_removed(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    let nodes = nodes_with_attributes(g);
    if nodes.is_empty() {
        return None;
    }
    let n = &mut g.node[*pick(rng, &nodes)];
    let a = n.attribute.remove(rng.random_range(0..n.attribute.len()));
    Some(format!(
        "node '{}' ({}) loses attribute '{}'",
        name(&n.name),
        name(&n.op_type),
        name(&a.name)
    ))
}

fn attribute_type(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    let nodes = nodes_with_attributes(g);
    if nodes.is_empty() || rng.random_range(0..4) == 0 {
        // An attribute of another op: what an op swap or a careless exporter leaves behind.
        if g.node.is_empty() {
            return None;
        }
        let at = rng.random_range(0..g.node.len());
        let n = &mut g.node[at];
        let (attr, label) = match rng.random_range(0..3) {
            0 => (ints_attr("kernel_shape", &[3, 3]), "kernel_shape [3, 3]"),
            1 => (int_attr("axis", 7), "axis 7"),
            _ => (ints_attr("fuzz_unknown", &[1]), "fuzz_unknown [1]"),
        };
        n.attribute.retain(|a| a.name != attr.name);
        n.attribute.push(attr);
        return Some(format!(
            "node '{}' ({}) gains attribute {label}",
            name(&n.name),
            name(&n.op_type)
        ));
    }
    let n = &mut g.node[*pick(rng, &nodes)];
    let k = rng.random_range(0..n.attribute.len());
    let a = &mut n.attribute[k];
    let before = a.r#type.unwrap_or(0);
    let to = if rng.random_bool(0.5) {
        // Only the tag changes: tag and payload disagree.
        let to = rng.random_range(1..=14);
        a.r#type = Some(to);
        format!("tag {to} (payload kept)")
    } else if !a.ints.is_empty() || a.i.is_some() {
        let f = a.i.unwrap_or_else(|| a.ints.first().copied().unwrap_or(0)) as f32 + 0.5;
        a.ints.clear();
        a.i = None;
        a.f = Some(f);
        a.r#type = Some(AttributeType::Float as i32);
        format!("FLOAT {f}")
    } else {
        *a = AttributeProto {
            name: a.name.clone(),
            r#type: Some(AttributeType::Ints as i32),
            ints: vec![1, 2],
            ..Default::default()
        };
        "INTS [1, 2]".to_string()
    };
    Some(format!(
        "node '{}' ({}) attribute '{}' type {before} -> {to}",
        name(&n.name),
        name(&n.op_type),
        name(&n.attribute[k].name)
    ))
}

fn attribute_value(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    let nodes = nodes_with_attributes(g);
    if nodes.is_empty() {
        return None;
    }
    let n = &mut g.node[*pick(rng, &nodes)];
    let k = rng.random_range(0..n.attribute.len());
    let a = &mut n.attribute[k];
    let int = *pick(
        rng,
        &[0i64, -1, i64::MAX, i64::MIN, 1 << 31, 1 << 40, -(1 << 40)],
    );
    let float = *pick(
        rng,
        &[
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e38,
            -0.0,
            1e-45,
        ],
    );
    let to = if !a.ints.is_empty() {
        if rng.random_range(0..4) == 0 {
            a.ints.clear();
            "[] (emptied)".to_string()
        } else {
            let i = rng.random_range(0..a.ints.len());
            a.ints[i] = int;
            format!("ints[{i}] = {int}")
        }
    } else if a.i.is_some() {
        a.i = Some(int);
        format!("{int}")
    } else if a.f.is_some() {
        a.f = Some(float);
        format!("{float:e}")
    } else if !a.floats.is_empty() {
        let i = rng.random_range(0..a.floats.len());
        a.floats[i] = float;
        format!("floats[{i}] = {float:e}")
    } else if a.s.is_some() {
        a.s = Some(b"FUZZ_NOT_A_MODE".to_vec().into());
        "string 'FUZZ_NOT_A_MODE'".to_string()
    } else if let Some(t) = a.t.as_mut() {
        t.dims = vec![1 << 40];
        "its tensor's dims = [2^40]".to_string()
    } else {
        return None;
    };
    Some(format!(
        "node '{}' ({}) attribute '{}' = {to}",
        name(&n.name),
        name(&n.op_type),
        name(&n.attribute[k].name)
    ))
}

const STANDARD_OPS: [&str; 24] = [
    "Relu",
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "QuantizeLinear",
    "DequantizeLinear",
    "BatchNormalization",
    "Reshape",
    "Flatten",
    "Softmax",
    "MaxPool",
    "GlobalAveragePool",
    "Identity",
    "Concat",
    "Transpose",
    "Sigmoid",
    "ConvTranspose",
    "Dropout",
    "Clip",
    "If",
    "Constant",
    "Split",
];

fn op_swapped(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    if g.node.is_empty() {
        return None;
    }
    let at = rng.random_range(0..g.node.len());
    let n = &mut g.node[at];
    let before = name(&n.op_type).to_string();
    let mut to = *pick(rng, &STANDARD_OPS);
    if to == before {
        to = "Sigmoid";
    }
    n.op_type = Some(to.into());
    Some(format!(
        "node '{}' op {before} -> {to} (attributes kept)",
        name(&n.name)
    ))
}

fn unknown_op(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    if g.node.is_empty() {
        return None;
    }
    let at = rng.random_range(0..g.node.len());
    let n = &mut g.node[at];
    let before = name(&n.op_type).to_string();
    let to = *pick(rng, &["FuzzUnknownOp", "", "relu"]);
    n.op_type = Some(to.into());
    Some(format!(
        "node '{}' op {before} -> '{to}' (no such op in the default domain)",
        name(&n.name)
    ))
}

fn custom_domain(
    g: &mut GraphProto,
    rng: &mut impl Rng,
    imports: &mut Vec<String>,
) -> Option<String> {
    if g.node.is_empty() {
        return None;
    }
    let at = rng.random_range(0..g.node.len());
    let n = &mut g.node[at];
    n.domain = Some("com.example.fuzz".into());
    let imported = rng.random_bool(0.5);
    if imported {
        imports.push("com.example.fuzz".into());
    }
    Some(format!(
        "node '{}' ({}) moved to domain com.example.fuzz ({})",
        name(&n.name),
        name(&n.op_type),
        if imported {
            "imported at version 1"
        } else {
            "not imported"
        }
    ))
}

fn opset(m: &mut ModelProto, rng: &mut impl Rng) -> String {
    let default = |o: &OperatorSetIdProto| o.domain.as_deref().unwrap_or("").is_empty();
    match rng.random_range(0..8) {
        0 => {
            m.opset_import.retain(|o| !default(o));
            "default-domain opset import removed".into()
        }
        1 => {
            m.opset_import.push(OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(13),
            });
            "default domain imported twice (second at 13)".into()
        }
        k => {
            let v = [0i64, -1, 1, 99, 1 << 40, i64::MAX][k - 2];
            m.opset_import.retain(|o| !default(o));
            m.opset_import.push(OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(v),
            });
            format!("default-domain opset = {v}")
        }
    }
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: Some(key.into()),
        value: Some(value.into()),
    }
}

fn external_data(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    if g.initializer.is_empty() {
        return None;
    }
    let at = rng.random_range(0..g.initializer.len());
    let t = &mut g.initializer[at];
    let location = *pick(
        rng,
        &[
            "fuzz_missing.bin",
            "../../../../etc/hostname",
            "/etc/hostname",
            "",
            "in.onnx",
        ],
    );
    t.external_data = vec![entry("location", location)];
    let mut what = format!("location '{location}'");
    if rng.random_bool(0.5) {
        let offset = *pick(
            rng,
            &["0", "-1", "18446744073709551615", "abc", "1099511627776"],
        );
        t.external_data.push(entry("offset", offset));
        what += &format!(", offset {offset}");
    }
    if rng.random_bool(0.5) {
        let length = *pick(rng, &["0", "-1", "4", "1099511627776", "xyz"]);
        t.external_data.push(entry("length", length));
        what += &format!(", length {length}");
    }
    let flagged = rng.random_range(0..4) != 0;
    if flagged {
        t.data_location = Some(1); // EXTERNAL
        t.raw_data = None;
    } else {
        what += " (data_location left DEFAULT, raw data kept)";
    }
    Some(format!(
        "initializer '{}' external data: {what}",
        name(&t.name)
    ))
}

fn graph_output_removed(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    if g.output.is_empty() {
        return None;
    }
    if g.output.len() == 1 || rng.random_bool(0.3) {
        g.output.clear();
        return Some("every graph output removed".into());
    }
    let o = g.output.remove(rng.random_range(0..g.output.len()));
    Some(format!("graph output '{}' removed", name(&o.name)))
}

fn graph_output_renamed(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    if g.output.is_empty() {
        return None;
    }
    let k = rng.random_range(0..g.output.len());
    let before = name(&g.output[k].name).to_string();
    let intermediate: Vec<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .filter(|t| *t != before)
        .collect();
    let to = match rng.random_range(0..4) {
        0 if !g.input.is_empty() => name(&pick(rng, &g.input).name).to_string(),
        1 if !g.initializer.is_empty() => name(&pick(rng, &g.initializer).name).to_string(),
        2 if !intermediate.is_empty() => pick(rng, &intermediate).clone(),
        _ => "fuzz_missing_output".to_string(),
    };
    g.output[k].name = Some(to.clone());
    Some(format!("graph output '{before}' renamed to '{to}'"))
}

fn nonfinite(g: &mut GraphProto, rng: &mut impl Rng) -> Option<String> {
    let floats: Vec<usize> = (0..g.initializer.len())
        .filter(|&i| {
            let t = &g.initializer[i];
            t.data_type == Some(DataType::Float as i32)
                && (t.raw_data.as_ref().is_some_and(|r| r.len() >= 4) || !t.float_data.is_empty())
        })
        .collect();
    if floats.is_empty() {
        return None;
    }
    let t = &mut g.initializer[*pick(rng, &floats)];
    let value = *pick(rng, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
    let index;
    if let Some(raw) = t.raw_data.take().filter(|r| r.len() >= 4) {
        let mut raw = raw.to_vec();
        index = rng.random_range(0..raw.len() / 4);
        raw[index * 4..index * 4 + 4].copy_from_slice(&value.to_le_bytes());
        t.raw_data = Some(raw.into());
    } else {
        index = rng.random_range(0..t.float_data.len());
        t.float_data[index] = value;
    }
    Some(format!(
        "initializer '{}' element {index} = {value}",
        name(&t.name)
    ))
}

/// Whether `tensor` is still a float initializer holding a non-finite value.
fn holds_nonfinite(m: &ModelProto, tensor: &str) -> bool {
    let Some(g) = m.graph.as_ref() else {
        return false;
    };
    g.initializer.iter().any(|t| {
        name(&t.name) == tensor
            && t.data_type == Some(DataType::Float as i32)
            && t.data_location.unwrap_or(0) == 0
            && (t.float_data.iter().any(|v| !v.is_finite())
                || t.raw_data.as_ref().is_some_and(|r| {
                    r.chunks_exact(4)
                        .any(|c| !f32::from_le_bytes([c[0], c[1], c[2], c[3]]).is_finite())
                }))
    })
}

fn ints_attr(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: values.to_vec(),
        ..Default::default()
    }
}

fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(value),
        ..Default::default()
    }
}
