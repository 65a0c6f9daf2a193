//! What both fuzz targets run on a candidate model, and the properties they assert: the
//! library's load -> fuse, cleanup, quantize (synthetic calibration) -> save path, in process.
//!
//! Properties (a violation aborts, which libFuzzer records as a crash with its input):
//! - no panic outside tract (libfuzzer-sys turns a panic into an abort; panics inside tract are
//!   caught by the runtime's guard and become errors);
//! - every error is one line;
//! - an accepted model's output encodes, decodes and loads again, and its graph checks.

use onnx_compress::ir::Model;
use onnx_compress::onnx::proto::ModelProto;
use onnx_compress::passes::{self, PassContext};
use prost::Message;

pub const PASSES: [&str; 3] = ["fuse", "cleanup", "quantize"];

fn one_line(stage: &str, e: anyhow::Error) {
    let text = format!("{e:#}");
    assert!(!text.contains('\n'), "{stage}: error is not one line: {text}");
}

/// Load `bytes` as the CLI would (decode, build the IR), run the passes, save and reload.
pub fn load_passes_save(bytes: &[u8]) {
    let proto = match onnx_compress::onnx::load::decode(bytes) {
        Ok(p) => p,
        Err(e) => return one_line("decode", e),
    };
    run_proto(proto);
}

pub fn run_proto(proto: ModelProto) {
    let mut model = match Model::from_proto(proto) {
        Ok(m) => m,
        Err(e) => return one_line("load", e),
    };
    let ctx = PassContext::default();
    if let Err(e) = passes::run_passes(&mut model, &PASSES, &ctx) {
        return one_line("passes", e);
    }
    let out = match model.to_proto() {
        Ok(p) => p,
        Err(e) => return one_line("save", e),
    };
    let bytes = out.encode_to_vec();
    let again = onnx_compress::onnx::load::decode(&bytes).expect("our output decodes");
    let again = Model::from_proto(again).expect("our output loads again");
    again.graph.check().expect("our output's graph checks");
}
