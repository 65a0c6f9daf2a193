//! Lossless boundary: with no pass run, load then save gives back the same model.

mod common;
use common::*;
use onnx_compress::ir::Model;
use onnx_compress::onnx::{load, save};
use prost::Message;
use std::path::PathBuf;

/// Models to round-trip: testdata, plus any listed in ONNX_COMPRESS_EXTRA_MODELS (a directory
/// scanned recursively) for manual trials on real public models.
fn models() -> Vec<PathBuf> {
    let mut v = testdata_models();
    if let Ok(dir) = std::env::var("ONNX_COMPRESS_EXTRA_MODELS") {
        let mut stack = vec![PathBuf::from(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|e| e == "onnx") {
                    v.push(p);
                }
            }
        }
    }
    v
}

#[test]
fn ir_round_trip_is_exact_on_every_model() {
    let models = models();
    for path in &models {
        let (original, info) = load::read_model(path).unwrap();
        let model = Model::from_proto(original.clone())
            .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        let back = model.to_proto().unwrap();
        assert!(
            back == original,
            "{}: decoded protobuf differs after round trip",
            path.display()
        );
        if !info.had_external_data {
            let bytes = std::fs::read(path).unwrap();
            assert!(
                back.encode_to_vec() == bytes,
                "{}: bytes differ",
                path.display()
            );
        }
        eprintln!("round trip exact: {}", path.display());
    }
}

#[test]
fn built_models_round_trip_with_subgraphs_and_metadata() {
    use onnx_compress::onnx::proto::*;
    let mut m = conv_relu();
    m.metadata_props.push(StringStringEntryProto {
        key: Some("k".into()),
        value: Some("v".into()),
    });
    let g = m.graph.as_mut().unwrap();
    g.node[1].metadata_props.push(StringStringEntryProto {
        key: Some("node".into()),
        value: Some("meta".into()),
    });
    g.metadata_props.push(StringStringEntryProto {
        key: Some("graph".into()),
        value: Some("meta".into()),
    });
    g.node[1].doc_string = Some("keeps its doc".into());
    // An If whose branches read an outer-scope value.
    let branch = |name: &str, op: &str| GraphProto {
        name: Some(name.into()),
        node: vec![node(op, &format!("{name}_op"), &["y"], &["z_inner"])],
        output: vec![value_info("z_inner", &[1, 4, 8, 8])],
        ..Default::default()
    };
    let mut iff = node("If", "if0", &["cond"], &["z"]);
    iff.attribute.push(AttributeProto {
        name: Some("then_branch".into()),
        r#type: Some(attribute_proto::AttributeType::Graph as i32),
        g: Some(branch("then", "Relu")),
        ..Default::default()
    });
    iff.attribute.push(AttributeProto {
        name: Some("else_branch".into()),
        r#type: Some(attribute_proto::AttributeType::Graph as i32),
        g: Some(branch("else", "Neg")),
        ..Default::default()
    });
    g.node.push(iff);
    g.initializer.push(onnx_compress::onnx::tensor::raw_tensor(
        "cond",
        tensor_proto::DataType::Bool,
        &[],
        vec![1],
    ));
    g.output.push(value_info("z", &[1, 4, 8, 8]));
    let model = Model::from_proto(m.clone()).unwrap();
    // The If node captures 'y' from the outer scope: that is an edge in the IR.
    let relu = model.graph.producer_node("y").unwrap();
    assert!(model
        .graph
        .consumers("y")
        .iter()
        .any(|(_, s)| *s == onnx_compress::ir::InSlot::Capture));
    assert!(model.graph.dag().edges(relu).count() == 1);
    assert!(model.to_proto().unwrap() == m);
}

#[test]
fn external_data_round_trip_and_resave() {
    let d = tempfile::tempdir().unwrap();
    let input = write(d.path(), "m.onnx", &conv_relu());
    let model = onnx_compress::ir::Model::load(&input).unwrap();
    let ext = d.path().join("ext.onnx");
    onnx_compress::ir::Model::save(
        &model,
        &ext,
        &save::SaveOptions {
            external_data: true,
            external_threshold: 0,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(d.path().join("ext.onnx.data").exists());
    let (reloaded, info) = load::read_model(&ext).unwrap();
    assert!(info.had_external_data);
    let on_disk = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    let data = on_disk(&d.path().join("ext.onnx.data"));
    assert!(data > 0);
    assert_eq!(
        (info.file_bytes, info.external_bytes),
        (on_disk(&ext) + data, data),
        "the size on disk counts the external data file"
    );
    assert!(
        reloaded == conv_relu(),
        "external data must load back to the same tensors"
    );
}
