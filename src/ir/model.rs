//! A model: the ModelProto shell (everything but the main graph, verbatim) plus the graph IR.

use crate::ir::check;
use crate::ir::graph::Graph;
use crate::onnx::proto::{GraphProto, ModelProto, OperatorSetIdProto, ValueInfoProto};
use crate::onnx::{load, save};
use anyhow::{Context, Result};
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Model {
    /// The ModelProto with `graph` taken out: opsets, metadata, functions, training info...
    pub shell: ModelProto,
    pub graph: Graph,
}

impl Model {
    /// Load a model file into the IR, external data inlined. Errors name the file.
    pub fn load(path: &Path) -> Result<Model> {
        let (model, _) = load::read_model(path)?;
        Model::from_proto(model).with_context(|| format!("{}: invalid model", path.display()))
    }

    /// Write the model atomically ([`save::save_proto`]).
    pub fn save(&self, path: &Path, opts: &save::SaveOptions) -> Result<()> {
        save::save_proto(self.to_proto()?, path, opts)
    }

    /// Build the IR of a decoded model, after [`check::check_model`] (versions, schemas,
    /// producers) so a model the tool cannot handle is refused before any work. Subgraph nodes
    /// are put in topological order first ([`crate::ir::subgraph_order`]), and declared dims of
    /// -1 become unknown ([`unset_minus_one_dims`]).
    pub fn from_proto(mut proto: ModelProto) -> Result<Model> {
        if let Some(g) = proto.graph.as_mut() {
            crate::ir::subgraph_order::sort_subgraphs(g)?;
            unset_minus_one_dims(g);
        }
        check::check_model(&proto)?;
        let gp = proto
            .graph
            .take()
            .context("the model has no graph (ModelProto.graph is missing)")?;
        let graph = Graph::from_proto(gp, HashSet::new())?;
        Ok(Model {
            shell: proto,
            graph,
        })
    }

    pub fn to_proto(&self) -> Result<ModelProto> {
        let mut proto = self.shell.clone();
        let mut graph = self.graph.to_proto()?;
        if proto.ir_version() < 4 {
            initializers_as_inputs(&mut graph);
        }
        proto.graph = Some(graph);
        Ok(proto)
    }

    /// The imported version of an operator set domain (`""` = the standard ONNX domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        let aliases = |d: &str| if d == "ai.onnx" { "" } else { d }.to_string();
        self.shell
            .opset_import
            .iter()
            .find(|o| aliases(o.domain()) == aliases(domain))
            .map(|o| o.version())
    }

    /// Import `domain` at `version`, raising an existing import if it is lower.
    pub fn require_opset(&mut self, domain: &str, version: i64) {
        match self
            .shell
            .opset_import
            .iter_mut()
            .find(|o| o.domain() == domain)
        {
            Some(o) if o.version() >= version => {}
            Some(o) => o.version = Some(version),
            None => self.shell.opset_import.push(OperatorSetIdProto {
                domain: Some(domain.to_string()),
                version: Some(version),
            }),
        }
    }
}

/// Before IR 4 every initializer must also be a graph input (it gave the input's default).
/// Passes add initializers (folded constants, quantization parameters): list them as inputs,
/// typed and shaped from the tensor, after the existing ones.
fn initializers_as_inputs(g: &mut GraphProto) {
    use crate::onnx::proto::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto};
    let listed: HashSet<String> = g.input.iter().map(|i| i.name().to_string()).collect();
    let missing: Vec<ValueInfoProto> = g
        .initializer
        .iter()
        .filter(|t| !listed.contains(t.name()))
        .map(|t| ValueInfoProto {
            name: Some(t.name().to_string()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(t.data_type()),
                    shape: Some(TensorShapeProto {
                        dim: t
                            .dims
                            .iter()
                            .map(|&d| tensor_shape_proto::Dimension {
                                value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    g.input.extend(missing);
}

/// Declared dims of -1 (how Paddle2ONNX and older tf2onnx write a dynamic dim) become unknown
/// dims, in every graph: runtimes read them so, but ONNX shape inference compares -1 with the
/// dim it infers and rejects the model, so an output must not carry them.
fn unset_minus_one_dims(g: &mut GraphProto) {
    use crate::onnx::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto};
    for v in g
        .input
        .iter_mut()
        .chain(&mut g.output)
        .chain(&mut g.value_info)
    {
        if let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            for d in t.shape.iter_mut().flat_map(|s| s.dim.iter_mut()) {
                if d.value == Some(Dim::DimValue(-1)) {
                    d.value = None;
                }
            }
        }
    }
    for node in &mut g.node {
        for a in &mut node.attribute {
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                unset_minus_one_dims(sub);
            }
        }
    }
}
