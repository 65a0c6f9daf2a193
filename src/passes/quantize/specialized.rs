//! Observing a model tract cannot analyse (an `If` whose branches give different shapes, on a
//! sample rate or a batch of one) on a copy specialized to what the calibration data says.
//!
//! ```text
//! model:        graph (float[b, n] input, float[2, b, 128] state, int64 sr) {
//!                 out = If(sr == 16000) then {...16 kHz net, If(Shape(x)[0] == 1)...} else {...}
//!               }
//! calibration:  400 files, each input [1, 576], state [2, 1, 128], sr = 16000
//! observed on:  specialize::fix_inputs(model, sr = 16000, input 1x576, state 2x1x128)
//!               = the 16 kHz net inlined, the batch-of-one Ifs folded: a flat graph
//! ```
//! The specialization is the one `--fix-input` / `--input-shape` make
//! ([`crate::passes::specialize`]): fixed values are the calibration inputs that have no batch
//! axis and hold an integer or bool value of at most [`MAX_FIXED_VALUES`] values (a sample
//! rate, a mode flag; the same in every feed by construction of the calibration set); shapes
//! are those of one calibration sample (every batch cut into samples of batch size one, the
//! streaming shape of the files). Tensors of the main graph keep their names in the copy, so the
//! ranges observed there are the ranges of the original's tensors on that data. The model
//! written keeps its interface: every input, every branch.
//!
//! Used only when observing on the model itself fails (see `quantize_static`), so models tract
//! can run are observed exactly as before.

use crate::calibrate::data::CalibrationSet;
use crate::onnx::proto::tensor_proto::DataType;
use crate::onnx::proto::ModelProto;
use anyhow::{ensure, Context, Result};
use std::collections::{HashMap, HashSet};

/// Calibration inputs without a batch axis holding more values than this are not fixed.
pub const MAX_FIXED_VALUES: usize = 16;

/// The specialized copy and the calibration data cut to fit it.
#[derive(Debug, Clone)]
pub struct ForObservation {
    pub proto: ModelProto,
    pub calib: CalibrationSet,
    /// `name = value` per fixed input, `name: AxB` per input shape (for the report).
    pub fixed: Vec<String>,
    pub shapes: Vec<String>,
    pub collapsed_ifs: usize,
    /// One line per `If` folded to the branch the data takes.
    pub collapsed: Vec<String>,
    /// Fixes and shapes as `specialize::fix_inputs` takes them (validation reuses them).
    pub fixes: Vec<(String, Vec<f64>)>,
    pub input_shapes: Vec<(String, Vec<usize>)>,
}

impl ForObservation {
    /// One line saying what the copy was specialized to.
    pub fn describe(&self) -> String {
        let mut parts = self.fixed.clone();
        parts.extend(self.shapes.iter().cloned());
        parts.join(", ")
    }
}

fn is_config(dt: DataType) -> bool {
    matches!(
        dt,
        DataType::Int64
            | DataType::Int32
            | DataType::Int16
            | DataType::Int8
            | DataType::Uint8
            | DataType::Uint16
            | DataType::Uint32
            | DataType::Uint64
            | DataType::Bool
    )
}

/// `(input, values)` per fixed input, as `specialize::fix_inputs` takes them.
pub type Fixes = Vec<(String, Vec<f64>)>;
/// `(input, full shape)` per remaining input.
pub type Shapes = Vec<(String, Vec<usize>)>;

/// The fixes and sample shapes of `calib` (module docs), without specializing anything.
pub fn fixes_and_shapes(calib: &CalibrationSet) -> Result<(Fixes, Shapes)> {
    ensure!(!calib.batches.is_empty(), "no calibration batches");
    let mut fixes = Vec::new();
    let mut shapes = Vec::new();
    for (i, name) in calib.input_names.iter().enumerate() {
        let feed = &calib.batches[0][i];
        match calib.batch_axes[i] {
            None if is_config(feed.data_type())
                && feed.shape().iter().product::<usize>() <= MAX_FIXED_VALUES =>
            {
                let values: Vec<f64> = feed.to_f64().iter().copied().collect();
                for b in &calib.batches[1..] {
                    ensure!(
                        b[i].to_f64().iter().copied().collect::<Vec<_>>() == values,
                        "calibration input '{name}' holds different values in different feeds; observing needs one value"
                    );
                }
                fixes.push((name.clone(), values));
            }
            None => shapes.push((name.clone(), feed.shape().to_vec())),
            Some(axis) => {
                let mut s = feed.shape().to_vec();
                s[axis] = 1;
                shapes.push((name.clone(), s));
            }
        }
    }
    Ok((fixes, shapes))
}

/// Specialize `original` to `calib` and cut `calib` into batches of one sample (module docs).
pub fn for_observation(original: &ModelProto, calib: &CalibrationSet) -> Result<ForObservation> {
    let (fixes, input_shapes) = fixes_and_shapes(calib)?;
    let mut proto = original.clone();
    let s = crate::passes::specialize::fix_inputs(&mut proto, &fixes, &input_shapes)
        .context("specializing a copy to the calibration data")?;
    let fixed_names: HashSet<&str> = fixes.iter().map(|(n, _)| n.as_str()).collect();
    let keep: Vec<usize> = (0..calib.input_names.len())
        .filter(|&i| !fixed_names.contains(calib.input_names[i].as_str()))
        .collect();
    let mut batches = Vec::new();
    for (b, batch) in calib.batches.iter().enumerate() {
        for r in 0..calib.rows(b) {
            let row: Vec<_> = keep
                .iter()
                .map(|&i| match calib.batch_axes[i] {
                    Some(axis) => batch[i].slice_axis(axis, r..r + 1),
                    None => batch[i].clone(),
                })
                .collect();
            for (&i, f) in keep.iter().zip(&row) {
                let want = &input_shapes
                    .iter()
                    .find(|(n, _)| *n == calib.input_names[i])
                    .context("input shape")?
                    .1;
                ensure!(
                    f.shape() == want.as_slice(),
                    "calibration input '{}' has samples of shape {:?} and {:?}; observing on a specialized copy needs one shape",
                    calib.input_names[i],
                    want,
                    f.shape()
                );
            }
            batches.push(row);
        }
    }
    let calib_rows = CalibrationSet {
        input_names: keep.iter().map(|&i| calib.input_names[i].clone()).collect(),
        batch_axes: keep.iter().map(|&i| calib.batch_axes[i]).collect(),
        batches,
        samples: calib.samples,
        source: calib.source.clone(),
        synthetic: calib.synthetic,
        fixed_batch: true,
        notes: Vec::new(),
        sequence: None,
        reference: None,
    };
    let fixed = s.fixed.clone();
    let shapes = input_shapes
        .iter()
        .map(|(n, s)| {
            format!(
                "{n}: {}",
                s.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x")
            )
        })
        .collect();
    Ok(ForObservation {
        proto,
        calib: calib_rows,
        fixed,
        shapes,
        collapsed_ifs: s.collapsed_ifs.len(),
        collapsed: s.collapsed_ifs.clone(),
        fixes,
        input_shapes,
    })
}

/// Every value name of `proto`'s main graph (inputs, initializers, node outputs).
pub fn main_graph_names(proto: &ModelProto) -> HashSet<String> {
    let mut names = HashSet::new();
    if let Some(g) = &proto.graph {
        names.extend(g.input.iter().map(|v| v.name().to_string()));
        names.extend(g.initializer.iter().map(|t| t.name().to_string()));
        names.extend(g.node.iter().flat_map(|n| n.output.iter().cloned()));
    }
    names
}

/// An `If` branch a specialized copy inlined, and where its values went.
#[derive(Debug, Clone, PartialEq)]
pub struct InlinedBranch {
    /// From the main graph down: per `If`, its first output (unique in the model) and the
    /// branch attribute (`then_branch` / `else_branch`).
    pub path: Vec<(String, String)>,
    /// `If 'name' then_branch` (nested: joined with " > "), for notes.
    pub label: String,
    /// Body value or node name -> its name in the copy, for the values found there produced by
    /// the same op at the same output slot (or the same initializer).
    pub names: HashMap<String, String>,
}

/// The branches `copy` (`original` specialized by [`crate::passes::specialize::fix_inputs`])
/// inlined, each with its values' names in the copy.
///
/// The fold ([`crate::runtime::simulate`]) inlines a taken branch of `If` `base` (its node name,
/// else its first output, as named in the graph holding it) under the prefix
/// `base/then/` or `base/else/` (`_k` appended on a clash). Every mapped name is checked: the
/// copy must produce it by a node of the same op type, named `prefix + node name`, at the same
/// output slot. A value that fails the check (a clash, a node folded to a constant) is left out,
/// so its tensor is never given another tensor's range. Nested `If`s are followed inside the
/// branches found.
pub fn inlined_branches(original: &ModelProto, copy: &ModelProto) -> Vec<InlinedBranch> {
    let (Some(g), Some(c)) = (&original.graph, &copy.graph) else {
        return Vec::new();
    };
    let mut produced: HashMap<&str, (&crate::onnx::proto::NodeProto, usize)> = HashMap::new();
    for n in &c.node {
        for (k, o) in n.output.iter().enumerate() {
            produced.insert(o.as_str(), (n, k));
        }
    }
    let initializers: HashSet<&str> = c.initializer.iter().map(|t| t.name()).collect();
    let mut out = Vec::new();
    walk_ifs(
        g,
        &HashMap::new(),
        &[],
        "",
        &produced,
        &initializers,
        &mut out,
    );
    out
}

#[allow(clippy::too_many_arguments)]
fn walk_ifs(
    g: &crate::onnx::proto::GraphProto,
    renamed: &HashMap<String, String>,
    path: &[(String, String)],
    label: &str,
    produced: &HashMap<&str, (&crate::onnx::proto::NodeProto, usize)>,
    initializers: &HashSet<&str>,
    out: &mut Vec<InlinedBranch>,
) {
    let in_copy = |name: &str| {
        renamed
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_string())
    };
    for n in g.node.iter().filter(|n| n.op_type() == "If") {
        let Some(first) = n.output.first() else {
            continue;
        };
        let base = if n.name().is_empty() {
            in_copy(first)
        } else {
            in_copy(n.name())
        };
        for a in &n.attribute {
            let Some(body) = a.g.as_ref() else { continue };
            let short = match a.name() {
                "then_branch" => "then",
                "else_branch" => "else",
                _ => continue,
            };
            let prefix = format!("{base}/{short}/");
            let mut names = HashMap::new();
            let mut found = false;
            for bn in &body.node {
                let node_name = format!("{prefix}{}", bn.name());
                for (k, o) in bn.output.iter().enumerate().filter(|(_, o)| !o.is_empty()) {
                    let want = format!("{prefix}{o}");
                    let same = produced.get(want.as_str()).is_some_and(|(cn, ck)| {
                        *ck == k
                            && cn.op_type() == bn.op_type()
                            && (bn.name().is_empty() || cn.name() == node_name)
                    });
                    if same {
                        names.insert(o.clone(), want);
                        found = true;
                    }
                }
                if !bn.name().is_empty() {
                    names.insert(bn.name().to_string(), node_name);
                }
            }
            for t in &body.initializer {
                let want = format!("{prefix}{}", t.name());
                if initializers.contains(want.as_str()) {
                    names.insert(t.name().to_string(), want);
                    found = true;
                }
            }
            if !found {
                continue;
            }
            let mut p = path.to_vec();
            p.push((first.clone(), a.name().to_string()));
            let here = format!(
                "{label}{}If '{}' {}",
                if label.is_empty() { "" } else { " > " },
                crate::ir::op::node_label(n),
                a.name()
            );
            let mut all = renamed.clone();
            all.extend(names.iter().map(|(k, v)| (k.clone(), v.clone())));
            walk_ifs(body, &all, &p, &here, produced, initializers, out);
            out.push(InlinedBranch {
                path: p,
                label: here,
                names,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::node;
    use crate::onnx::proto::{attribute_proto::AttributeType, AttributeProto, GraphProto};

    fn model(nodes: Vec<crate::onnx::proto::NodeProto>) -> ModelProto {
        ModelProto {
            graph: Some(GraphProto {
                node: nodes,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn with_branches(
        mut n: crate::onnx::proto::NodeProto,
        then_b: Vec<crate::onnx::proto::NodeProto>,
    ) -> crate::onnx::proto::NodeProto {
        for (name, nodes) in [("then_branch", then_b), ("else_branch", vec![])] {
            n.attribute.push(AttributeProto {
                name: Some(name.into()),
                r#type: Some(AttributeType::Graph as i32),
                g: Some(GraphProto {
                    node: nodes,
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        n
    }

    #[test]
    fn inlined_values_map_only_when_op_name_and_slot_match() {
        // Original: If 'branch' { then: conv_then(x) -> t; relu_then(t) -> u; inner If 'sq' }.
        // Copy: the then-branch inlined under "branch/then/", except 'u', whose name is taken
        // by a node of another op (a clash the fold resolves with a suffix): left out.
        let inner = with_branches(
            node("If", "sq", &["c2"], &["v"]),
            vec![node("Squeeze", "s", &["u"], &["w"])],
        );
        let original = model(vec![with_branches(
            node("If", "branch", &["c"], &["y"]),
            vec![
                node("Conv", "conv_then", &["x", "W"], &["t"]),
                node("Relu", "relu_then", &["t"], &["u"]),
                inner,
            ],
        )]);
        let copy = model(vec![
            node(
                "Conv",
                "branch/then/conv_then",
                &["x", "W"],
                &["branch/then/t"],
            ),
            node("Sigmoid", "other", &["x"], &["branch/then/u"]),
            node(
                "Relu",
                "branch/then/relu_then",
                &["branch/then/t"],
                &["branch/then/u_1"],
            ),
            node(
                "Squeeze",
                "branch/then/sq/then/s",
                &["branch/then/u_1"],
                &["branch/then/sq/then/w"],
            ),
        ]);
        let found = inlined_branches(&original, &copy);
        assert_eq!(found.len(), 2, "{found:?}");
        let outer = found.iter().find(|b| b.path.len() == 1).unwrap();
        assert_eq!(outer.label, "If 'branch' then_branch");
        assert_eq!(
            outer.names.get("t").map(String::as_str),
            Some("branch/then/t")
        );
        assert!(!outer.names.contains_key("u"));
        let inner = found.iter().find(|b| b.path.len() == 2).unwrap();
        assert_eq!(
            inner.path,
            vec![
                ("y".to_string(), "then_branch".to_string()),
                ("v".to_string(), "then_branch".to_string())
            ]
        );
        assert_eq!(inner.label, "If 'branch' then_branch > If 'sq' then_branch");
        assert_eq!(
            inner.names.get("w").map(String::as_str),
            Some("branch/then/sq/then/w")
        );
    }
}
