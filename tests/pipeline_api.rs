//! The library API runs the same pipeline as the command line: same options, same bytes.

mod common;
use common::*;
use onnx_compress::calibrate::{CalibrationSet, DataOptions};
use onnx_compress::Pipeline;
use prost::Message;

#[test]
fn builder_and_cli_give_byte_identical_models() {
    let d = tempfile::tempdir().unwrap();
    let model_path = testdata().join("digits_cnn.onnx");
    let calib_path = testdata().join("digits_calib_x.npy");
    let out = d.path().join("cli.onnx");
    let (code, _, err) = run(&[
        model_path.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib_path.to_str().unwrap(),
        "--no-validate",
        "-q",
    ]);
    assert_eq!(code, 0, "{err}");

    let mut model = onnx_compress::ir::Model::load(&model_path).unwrap();
    let calib = CalibrationSet::load(&calib_path, &model, &DataOptions::default()).unwrap();
    let records = Pipeline::standard()
        .calibration(calib)
        .run(&mut model)
        .unwrap();
    assert!(records
        .iter()
        .any(|r| r.name == "quantize" && r.changes > 0));
    let api_bytes = model.to_proto().unwrap().encode_to_vec();
    assert!(
        api_bytes == std::fs::read(&out).unwrap(),
        "library and CLI outputs differ"
    );
}

#[test]
fn builder_runs_passes_in_pipeline_order_whatever_the_call_order() {
    let p = Pipeline::new().equalize().fuse().cleanup();
    let mut model = onnx_compress::ir::Model::load(&testdata().join("conv_bn_relu.onnx")).unwrap();
    let records = p.run(&mut model).unwrap();
    let names: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["fuse", "cleanup", "equalize"]);
}
