//! The graph inputs calibration and evaluation data must feed: name and declared dims
//! (fixed or symbolic), read from the model's graph inputs that are not initializers.

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

/// A float graph input the calibration data must feed.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: String,
    pub dims: Vec<InputDim>,
}

impl InputSpec {
    /// The fixed batch size (leading dimension), if the model pins it.
    pub fn fixed_batch(&self) -> Option<usize> {
        match self.dims.first() {
            Some(InputDim::Fixed(b)) => Some(*b),
            _ => None,
        }
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
        format!("'{}' [{}]", self.name, dims.join(", "))
    }
}

/// The graph inputs the runtime feeds (graph inputs that are not initializers), in order.
pub fn model_inputs(model: &Model) -> Result<Vec<InputSpec>> {
    model
        .graph
        .inputs
        .iter()
        .filter(|v| !model.graph.initializers.contains_key(v.name()))
        .map(input_spec)
        .collect()
}

/// Fix dims from user-given full shapes (same rank only; a mismatch is reported later as a
/// data error against the declared shape).
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
        elem == DataType::Float,
        "model input '{}' is {}; calibration feeds float32 inputs only",
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
            Some(Dim::DimValue(v)) if *v >= 0 => InputDim::Fixed(*v as usize),
            Some(Dim::DimParam(p)) => InputDim::Symbolic(p.clone()),
            _ => InputDim::Symbolic(String::new()),
        })
        .collect();
    Ok(InputSpec {
        name: v.name().to_string(),
        dims,
    })
}
