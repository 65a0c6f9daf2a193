//! A minimal tract runner for calibration: runs a model on f32 inputs and returns its outputs
//! followed by requested intermediate tensors (by ONNX value name).
//!
//! Stand-in with the same shape as `validate::Runner` until that lands; calibration only needs
//! float models (before quantization), so no simulation rewrites are needed here.

use crate::onnx::proto::ModelProto;
use anyhow::{anyhow, Context, Result};
use ndarray::ArrayD;
use prost::Message;
use tract_onnx::prelude::*;

type Plan = Arc<TypedSimplePlan>;

pub struct Runner {
    plan: Plan,
    outputs: Vec<String>,
}

impl Runner {
    /// Load `model` into tract with fixed input shapes; outputs are the graph outputs followed
    /// by `extra_outputs`.
    pub fn new(
        model: &ModelProto,
        input_shapes: &[(String, Vec<usize>)],
        extra_outputs: &[String],
    ) -> Result<Self> {
        let bytes = model.encode_to_vec();
        let mut m = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| anyhow!("tract could not load the model: {e:?}"))?;
        for (i, (name, shape)) in input_shapes.iter().enumerate() {
            m.set_input_fact(i, InferenceFact::dt_shape(f32::datum_type(), shape.clone()))
                .map_err(|e| anyhow!("setting the shape of input '{name}' to {shape:?}: {e:?}"))?;
        }
        let graph_outputs: Vec<String> = model
            .graph
            .as_ref()
            .map(|g| g.output.iter().map(|o| o.name().to_string()).collect())
            .unwrap_or_default();
        let mut outputs = graph_outputs;
        outputs.extend(extra_outputs.iter().cloned());
        m.select_outputs_by_name(&outputs)
            .map_err(|e| anyhow!("tract does not expose the requested tensors: {e:?}"))?;
        let plan = m
            .into_optimized()
            .map_err(|e| anyhow!("tract could not optimize the model: {e:?}"))?
            .into_runnable()
            .map_err(|e| anyhow!("tract could not plan the model: {e:?}"))?;
        Ok(Runner { plan, outputs })
    }

    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }

    /// Run on one batch (one array per model input, in input order).
    pub fn run(&self, inputs: &[ArrayD<f32>]) -> Result<Vec<ArrayD<f32>>> {
        let feed: TVec<TValue> = inputs
            .iter()
            .map(|a| Tensor::from(a.clone()).into_tvalue())
            .collect();
        let out = self
            .plan
            .run(feed)
            .map_err(|e| anyhow!("tract run failed: {e:?}"))?;
        out.iter()
            .zip(&self.outputs)
            .map(|(t, name)| {
                let t = t
                    .cast_to::<f32>()
                    .map_err(|e| anyhow!("{e:?}"))
                    .with_context(|| format!("tensor '{name}' is not numeric"))?;
                Ok(t.to_plain_array_view::<f32>()
                    .map_err(|e| anyhow!("tensor '{name}': {e:?}"))?
                    .to_owned())
            })
            .collect()
    }
}
