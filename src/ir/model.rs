//! A model: the ModelProto shell (everything but the main graph, verbatim) plus the graph IR.

use crate::ir::check;
use crate::ir::graph::Graph;
use crate::onnx::proto::{ModelProto, OperatorSetIdProto};
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
    /// are put in topological order first ([`crate::ir::subgraph_order`]).
    pub fn from_proto(mut proto: ModelProto) -> Result<Model> {
        if let Some(g) = proto.graph.as_mut() {
            crate::ir::subgraph_order::sort_subgraphs(g)?;
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
        proto.graph = Some(self.graph.to_proto()?);
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
