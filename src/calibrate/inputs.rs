//! The graph inputs calibration and evaluation data must feed: name, element type, declared
//! dims (fixed or symbolic) and the batch axis data is split and joined along, read from the
//! model's graph inputs that are not initializers.
//!
//! ## The batch axis of each input, in this order
//! 1. `--batch-axis NAME=AXIS` (or `NAME=none`) names it.
//! 2. A rank-0 input (a scalar such as silero-vad's sample rate `sr`) has none.
//! 3. A symbolic dim name that at least two inputs share is the batch: `input [batch, sequence]`
//!    and `state [2, batch, 128]` give axes 0 and 1. When several names are shared (BERT's
//!    `batch` and `sequence`), the one that sits at axis 0 of every input holding it wins; if
//!    none or more than one does, or a name appears twice in one input, the run stops and asks
//!    for `--batch-axis`.
//! 4. Otherwise (one input, unnamed or fixed dims, or an input without the shared name): axis
//!    0 when it is symbolic or fixed to 1, else the first symbolic dim, else the first dim fixed
//!    to 1, else axis 0. So `[N, 3, 32, 32]`, `[1, 3, 32, 32]` and `[1, seq]` batch on axis 0
//!    as always, silero's unnamed `state [2, ?, 128]` on axis 1, and its openvino export's
//!    fixed `state [2, 1, 128]` on axis 1 too.
//!
//! An input without a batch axis takes the same value in every feed (checked when data is read).

use crate::ir::Model;
use crate::onnx::proto::{
    tensor_proto::DataType, tensor_shape_proto::dimension::Value as Dim, type_proto, ValueInfoProto,
};
use anyhow::{bail, ensure, Context, Result};

/// One dimension of a model input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputDim {
    Fixed(usize),
    Symbolic(String),
}

/// A graph input the calibration data must feed.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: String,
    pub dims: Vec<InputDim>,
    /// The declared element type; data of another type is converted when exact, else refused.
    pub elem_type: DataType,
    /// The axis feeds are split and joined along (see the module docs); `None`: every feed
    /// holds the same whole value.
    pub batch_axis: Option<usize>,
}

impl InputSpec {
    /// The fixed batch size (size of the batch axis), if the model pins it.
    pub fn fixed_batch(&self) -> Option<usize> {
        match self.dims.get(self.batch_axis?) {
            Some(InputDim::Fixed(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn type_name(&self) -> String {
        self.elem_type.as_str_name().to_ascii_lowercase()
    }

    pub(crate) fn describe(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|d| match d {
                InputDim::Fixed(v) => v.to_string(),
                InputDim::Symbolic(s) if s.is_empty() => "?".into(),
                InputDim::Symbolic(s) => s.clone(),
            })
            .collect();
        let ty = if self.elem_type == DataType::Float {
            String::new()
        } else {
            format!("{} ", self.type_name())
        };
        format!("'{}' {ty}[{}]", self.name, dims.join(", "))
    }
}

/// The graph inputs the runtime feeds (graph inputs that are not initializers), in order, with
/// batch axes from rules 2-4 of the module docs.
pub fn model_inputs(model: &Model) -> Result<Vec<InputSpec>> {
    model_inputs_with(model, &[])
}

/// [`model_inputs`] with `--batch-axis` overrides (rule 1) applied first.
pub fn model_inputs_with(
    model: &Model,
    overrides: &[(String, Option<usize>)],
) -> Result<Vec<InputSpec>> {
    let mut specs: Vec<InputSpec> = model
        .graph
        .inputs
        .iter()
        .filter(|v| !model.graph.initializers.contains_key(v.name()))
        .map(input_spec)
        .collect::<Result<_>>()?;
    assign_batch_axes(&mut specs, overrides)?;
    Ok(specs)
}

/// Sets every input's batch axis: `overrides` (`--batch-axis`, `None` = no batch axis) first,
/// then the rules of the module docs.
fn assign_batch_axes(specs: &mut [InputSpec], overrides: &[(String, Option<usize>)]) -> Result<()> {
    for (name, axis) in overrides {
        let spec = specs
            .iter()
            .find(|s| &s.name == name)
            .with_context(|| format!("--batch-axis names '{name}', which is not a model input"))?;
        if let Some(a) = axis {
            ensure!(
                *a < spec.dims.len(),
                "--batch-axis {name}={a}: input {} has rank {}",
                spec.describe(),
                spec.dims.len()
            );
        }
    }
    let shared = shared_batch_name(specs, overrides)?;
    for spec in specs.iter_mut() {
        if let Some((_, axis)) = overrides.iter().find(|(n, _)| *n == spec.name) {
            spec.batch_axis = *axis;
            continue;
        }
        if spec.dims.is_empty() {
            spec.batch_axis = None;
            continue;
        }
        let by_name = shared.as_ref().and_then(|name| {
            spec.dims
                .iter()
                .position(|d| matches!(d, InputDim::Symbolic(s) if s == name))
        });
        let leading = matches!(spec.dims[0], InputDim::Symbolic(_) | InputDim::Fixed(1));
        let first_symbolic = spec
            .dims
            .iter()
            .position(|d| matches!(d, InputDim::Symbolic(_)));
        let first_one = spec.dims.iter().position(|d| *d == InputDim::Fixed(1));
        let fallback = if leading {
            0
        } else {
            first_symbolic.or(first_one).unwrap_or(0)
        };
        spec.batch_axis = Some(by_name.unwrap_or(fallback));
    }
    Ok(())
}

/// Rule 3: the symbolic name shared by at least two inputs that are not overridden.
fn shared_batch_name(
    specs: &[InputSpec],
    overrides: &[(String, Option<usize>)],
) -> Result<Option<String>> {
    let free: Vec<&InputSpec> = specs
        .iter()
        .filter(|s| !overrides.iter().any(|(n, _)| *n == s.name))
        .collect();
    let mut names: Vec<String> = Vec::new();
    for s in &free {
        for d in &s.dims {
            if let InputDim::Symbolic(n) = d {
                if !n.is_empty() && !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
    }
    let holders = |name: &str| -> Vec<&InputSpec> {
        free.iter()
            .copied()
            .filter(|s| {
                s.dims
                    .iter()
                    .any(|d| matches!(d, InputDim::Symbolic(x) if x == name))
            })
            .collect()
    };
    let shared: Vec<String> = names
        .into_iter()
        .filter(|n| holders(n).len() >= 2)
        .collect();
    let hint = "pass --batch-axis NAME=AXIS (or NAME=none) for the inputs";
    let chosen = match shared.len() {
        0 => return Ok(None),
        1 => shared[0].clone(),
        _ => {
            let leading: Vec<&String> = shared
                .iter()
                .filter(|n| {
                    holders(n)
                        .iter()
                        .all(|s| matches!(&s.dims[0], InputDim::Symbolic(x) if x == *n))
                })
                .collect();
            match leading.as_slice() {
                [one] => (*one).clone(),
                _ => bail!(
                    "the model inputs share symbolic dims {}, so the batch axis is ambiguous: {hint} ({})",
                    shared.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", "),
                    free.iter().map(|s| s.describe()).collect::<Vec<_>>().join(", ")
                ),
            }
        }
    };
    for s in holders(&chosen) {
        let count = s
            .dims
            .iter()
            .filter(|d| matches!(d, InputDim::Symbolic(x) if *x == chosen))
            .count();
        ensure!(
            count == 1,
            "input {} holds the shared dim '{chosen}' {count} times, so its batch axis is ambiguous: {hint}",
            s.describe()
        );
    }
    Ok(Some(chosen))
}

/// Fix dims from user-given full shapes (same rank only; a mismatch is reported later as a
/// data error against the declared shape). Batch axes stay as the declared dims gave them.
pub(crate) fn with_shapes(
    mut specs: Vec<InputSpec>,
    shapes: &[(String, Vec<usize>)],
) -> Vec<InputSpec> {
    for spec in &mut specs {
        if let Some((_, shape)) = shapes.iter().find(|(n, _)| *n == spec.name) {
            if shape.len() == spec.dims.len() {
                spec.dims = shape.iter().map(|&d| InputDim::Fixed(d)).collect();
            }
        }
    }
    specs
}

fn input_spec(v: &ValueInfoProto) -> Result<InputSpec> {
    let Some(type_proto::Value::TensorType(t)) = v.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        bail!("model input '{}' is not a tensor", v.name());
    };
    let elem = DataType::try_from(t.elem_type()).unwrap_or(DataType::Undefined);
    ensure!(
        matches!(
            elem,
            DataType::Float
                | DataType::Double
                | DataType::Float16
                | DataType::Int64
                | DataType::Int32
                | DataType::Int16
                | DataType::Int8
                | DataType::Uint64
                | DataType::Uint32
                | DataType::Uint16
                | DataType::Uint8
                | DataType::Bool
        ),
        "model input '{}' is {}; data can feed float, float16, double, integer and bool inputs",
        v.name(),
        crate::onnx::tensor::type_name(elem)
    );
    let shape = t
        .shape
        .as_ref()
        .with_context(|| format!("model input '{}' has no shape", v.name()))?;
    let dims = shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(Dim::DimValue(v)) if *v > 0 => InputDim::Fixed(*v as usize),
            Some(Dim::DimParam(p)) => InputDim::Symbolic(p.clone()),
            _ => InputDim::Symbolic(String::new()),
        })
        .collect();
    Ok(InputSpec {
        name: v.name().to_string(),
        dims,
        elem_type: elem,
        batch_axis: None,
    })
}
