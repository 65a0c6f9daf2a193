//! The intermediate representation passes work on.
pub mod check;
pub mod facts;
pub mod graph;
pub mod layer;
pub mod model;
pub mod op;
pub mod subgraph_order;

pub use graph::{Graph, InSlot, Patch, Source};
pub use model::Model;
