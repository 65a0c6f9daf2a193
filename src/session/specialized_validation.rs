//! Validation of a model tract cannot analyse as given (its `If`s), on copies of the input and
//! the output specialized the way calibration observed them ([`crate::passes::quantize::specialized`]):
//! the calibration data's fixed values (a sample rate) and one-sample shapes.
//!
//! ```text
//! validate(original, output)                        -> tract: "could not analyse ... If"
//! validate(fix(original), fix(output)) on the first VALIDATION_SAMPLES calibration samples
//!   fix = specialize::fix_inputs(sr = 16000, input: 1x576, state: 2x1x128)
//! ```
//! The report's first note says exactly what was compared: the fixes and shapes, the `If`
//! branches the copies inlined (with the activation Q/DQ pairs each holds in the output, see
//! [`crate::passes::quantize::bodies`]), and that other values of the fixed inputs (the branches
//! the data never takes) were not checked.

use crate::calibrate::data::CalibrationSet;
use crate::onnx::proto::ModelProto;
use crate::passes::quantize::specialized;
use crate::validate::{self, ValidateOptions, ValidationReport};
use anyhow::{Context, Result};

/// Calibration samples compared (one run each).
pub const VALIDATION_SAMPLES: usize = 64;

/// Compare `output` with `original`, both specialized to `calib` (module docs).
pub fn validate(
    original: &ModelProto,
    output: &ModelProto,
    calib: &CalibrationSet,
    base: &ValidateOptions,
) -> Result<ValidationReport> {
    let s = specialized::for_observation(original, calib)?;
    let mut out = output.clone();
    crate::passes::specialize::fix_inputs(&mut out, &s.fixes, &s.input_shapes)
        .context("specializing the output like the input")?;
    let branches = inlined_with_qdq(output, &out);
    let inputs: Vec<crate::calibrate::NamedBatch> = s
        .calib
        .named_batches()
        .into_iter()
        .take(VALIDATION_SAMPLES)
        .collect();
    let opts = ValidateOptions {
        inputs: Some(inputs),
        input_shapes: s.input_shapes.clone(),
        in_sample: true,
        ..base.clone()
    };
    let mut report = validate::validate(&s.proto, &out, &opts)?;
    report.notes.insert(
        0,
        format!(
            "validated on copies of the input and the output specialized to the calibration data ({}; {} If(s) collapsed in the input), {} sample(s) of it: tract cannot analyse the models' If(s) as given; {}other values of the fixed inputs and other shapes (the branches this data never takes) were not checked",
            s.describe(),
            s.collapsed_ifs,
            opts.inputs.as_ref().map_or(0, |i| i.len()),
            if branches.is_empty() {
                String::new()
            } else {
                format!("the copies hold {}; ", branches.join(", "))
            }
        ),
    );
    Ok(report)
}

/// The bodies of `output` that `out_copy` (its specialized copy) inlined, each with the
/// activation Q/DQ pairs (QuantizeLinear nodes) it holds: `If 'If_0' then_branch with 12
/// activation Q/DQ pair(s)`, then how many inlined branches hold none.
fn inlined_with_qdq(output: &ModelProto, out_copy: &ModelProto) -> Vec<String> {
    let (mut found, mut plain) = (Vec::new(), 0);
    for b in specialized::inlined_branches(output, out_copy) {
        let mut body = output.graph.as_ref();
        for (first, attr) in &b.path {
            body = body
                .and_then(|g| g.node.iter().find(|n| n.output.first() == Some(first)))
                .and_then(|n| n.attribute.iter().find(|a| a.name() == attr))
                .and_then(|a| a.g.as_ref());
        }
        let pairs = body.map_or(0, |g| {
            g.node
                .iter()
                .filter(|n| n.op_type() == "QuantizeLinear")
                .count()
        });
        if pairs > 0 {
            found.push(format!("{} with {pairs} activation Q/DQ pair(s)", b.label));
        } else {
            plain += 1;
        }
    }
    found.sort();
    if plain > 0 {
        found.push(format!("{plain} other inlined branch(es) without Q/DQ"));
    }
    found
}
