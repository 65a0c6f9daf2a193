//! Validation runs activation QuantizeLinears as float ops and a Cast, and where tract keeps the
//! scale multiplication apart their DequantizeLinears as a float Mul
//! (`runtime::fake_quant_as_float_ops`): on every testdata model, quantized by the default
//! `quantize` pass, the rewritten simulation graph gives the same output bits as tract's own
//! QuantizeLinear and DequantizeLinear on the same inputs, so validation's outputs and metrics
//! are unchanged (external_data.onnx's BatchNormalization after a DequantizeLinear is the case
//! where a float Mul would not be).

use onnx_compress::calibrate::{CalibrationSet, DataOptions};
use onnx_compress::ir::Model;
use onnx_compress::passes::quantize::{quantize, QuantizeOptions};
use onnx_compress::runtime::{fake_quant_as_float_ops, run_model, simulation_graph};
use std::path::Path;

/// (file, whether its default quantization holds activation QuantizeLinears the rewrite takes).
const MODELS: [(&str, bool); 14] = [
    ("conv_bn_relu.onnx", true),
    ("residual.onnx", true),
    ("mobilenet_like.onnx", true),
    ("mlp.onnx", true),
    ("if_model.onnx", false),
    ("external_data.onnx", true),
    ("digits_cnn.onnx", true),
    ("digits_deep.onnx", true),
    ("digits_smooth.onnx", true),
    ("digits_vgg.onnx", true),
    ("digits_reswide.onnx", true),
    ("recurrent.onnx", true),
    ("embedding.onnx", true),
    ("tiny_gpt.onnx", true),
];

#[test]
fn float_fake_quant_gives_the_same_bits_on_every_testdata_model() {
    for (file, rewritten) in MODELS {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(file);
        let mut model = Model::load(&path).unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let opts = DataOptions {
            input_shapes: if file == "tiny_gpt.onnx" {
                vec![("input_ids".to_string(), vec![1, 16])]
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let data = CalibrationSet::synthetic(&model, 4, 7, &opts)
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        quantize(&mut model, &QuantizeOptions::default(), Some(&data))
            .unwrap_or_else(|e| panic!("{file}: {e:#}"));
        let (sim, _) = simulation_graph(&model.to_proto().unwrap()).unwrap();
        let mut fast = sim.clone();
        let count = fake_quant_as_float_ops(&mut fast)
            .unwrap()
            .map_or(0, |(n, _)| n);
        assert_eq!(count > 0, rewritten, "{file}: {count} rewritten");
        for batch in data.named_batches() {
            let a = run_model(&sim, &batch, &[]).unwrap_or_else(|e| panic!("{file}: {e:#}"));
            let b = run_model(&fast, &batch, &[]).unwrap_or_else(|e| panic!("{file}: {e:#}"));
            assert_eq!(a.len(), b.len(), "{file}");
            for ((name, x), (_, y)) in a.iter().zip(&b) {
                let bits =
                    |v: &ndarray::ArrayD<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(x), bits(y), "{file}: output {name} differs");
            }
        }
    }
}
