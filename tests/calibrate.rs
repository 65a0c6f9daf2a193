//! Calibration data loading: accepted layouts and the errors for bad data.

mod common;

use common::builder::Builder;
use ndarray::{ArrayD, IxDyn};
use ndarray_npy::{write_npy, NpzWriter};
use onnx_compress::calibrate::{CalibrationSet, DataOptions};
use onnx_compress::ir::Model;
use std::path::Path;

/// One input `x` [N, 2, 3] (symbolic batch) -> Relu.
fn one_input() -> Model {
    let mut b = Builder::new(13);
    b.input("x", &[-1, 2, 3]).output("y", &[-1, 2, 3]);
    b.node("Relu", "r", &["x"], &["y"], vec![]);
    b.model()
}

/// Two inputs `a` [N, 2] and `b:0` [N, 2] -> Add.
fn two_inputs() -> Model {
    let mut b = Builder::new(13);
    b.input("a", &[-1, 2])
        .input("b:0", &[-1, 2])
        .output("y", &[-1, 2]);
    b.node("Add", "add", &["a", "b:0"], &["y"], vec![]);
    b.model()
}

fn arr(shape: &[usize], v: f32) -> ArrayD<f32> {
    ArrayD::from_elem(IxDyn(shape), v)
}

fn err(path: &Path, m: &Model) -> String {
    format!(
        "{:#}",
        CalibrationSet::load(path, m, &DataOptions::default()).unwrap_err()
    )
}

#[test]
fn directory_of_samples_and_batches_is_stacked_and_rebatched() {
    let d = tempfile::tempdir().unwrap();
    write_npy(d.path().join("000.npy"), &arr(&[2, 3], 1.0)).unwrap(); // one sample
    write_npy(d.path().join("001.npy"), &arr(&[4, 2, 3], 2.0)).unwrap(); // a batch
    write_npy(
        d.path().join("002.npy"),
        &ArrayD::<f64>::from_elem(IxDyn(&[2, 3]), 3.0),
    )
    .unwrap();
    let opts = DataOptions {
        batch_size: 4,
        max_samples: None,
        ..Default::default()
    };
    let c = CalibrationSet::load(d.path(), &one_input(), &opts).unwrap();
    assert_eq!(c.samples, 6);
    let sizes: Vec<usize> = c.batches.iter().map(|b| b[0].shape()[0]).collect();
    assert_eq!(sizes, vec![4, 2]);
    assert_eq!(c.batches[0][0].as_f32().unwrap()[[0, 0, 0]], 1.0);
    assert_eq!(c.batches[1][0].as_f32().unwrap()[[1, 0, 0]], 3.0);
    assert!(c.notes.iter().any(|n| n.contains("float64")));
}

#[test]
fn single_npy_file_and_max_samples() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("calib.npy");
    write_npy(&p, &arr(&[10, 2, 3], 0.5)).unwrap();
    let opts = DataOptions {
        batch_size: 32,
        max_samples: Some(7),
        ..Default::default()
    };
    let c = CalibrationSet::load(&p, &one_input(), &opts).unwrap();
    assert_eq!(c.samples, 7);
}

#[test]
fn multiple_inputs_by_file_name_or_npz_keys() {
    let m = two_inputs();
    let d = tempfile::tempdir().unwrap();
    for k in 0..3 {
        write_npy(d.path().join(format!("a_{k:03}.npy")), &arr(&[2], 1.0)).unwrap();
        // `b:0` sanitized to `b_0`.
        write_npy(d.path().join(format!("b_0_{k:03}.npy")), &arr(&[2], 2.0)).unwrap();
    }
    let c = CalibrationSet::load(d.path(), &m, &DataOptions::default()).unwrap();
    assert_eq!(c.samples, 3);
    assert_eq!(c.input_names, vec!["a", "b:0"]);
    assert_eq!(c.batches[0][1].as_f32().unwrap()[[0, 0]], 2.0);

    let z = tempfile::tempdir().unwrap();
    let p = z.path().join("s.npz");
    let mut w = NpzWriter::new(std::fs::File::create(&p).unwrap());
    w.add_array("a", &arr(&[5, 2], 1.0)).unwrap();
    w.add_array("b:0", &arr(&[5, 2], 2.0)).unwrap();
    w.finish().unwrap();
    let c = CalibrationSet::load(&p, &m, &DataOptions::default()).unwrap();
    assert_eq!(c.samples, 5);
}

#[test]
fn bad_data_is_refused_naming_the_file_and_expectation() {
    let m = one_input();
    let d = tempfile::tempdir().unwrap();
    // Empty directory.
    let e = err(d.path(), &m);
    assert!(e.contains("no .npy or .npz"), "{e}");
    // Wrong fixed dim.
    let p = d.path().join("bad.npy");
    write_npy(&p, &arr(&[2, 4], 1.0)).unwrap();
    let e = err(&p, &m);
    assert!(
        e.contains("bad.npy") && e.contains("size 3 at dimension 2"),
        "{e}"
    );
    // Wrong rank.
    write_npy(&p, &arr(&[3], 1.0)).unwrap();
    let e = err(&p, &m);
    assert!(e.contains("bad.npy") && e.contains("rank"), "{e}");
    // Wrong dtype.
    write_npy(&p, &ArrayD::<i64>::zeros(IxDyn(&[2, 3]))).unwrap();
    let e = err(&p, &m);
    assert!(
        e.contains("bad.npy") && e.contains("expected float data, found int64"),
        "{e}"
    );
    // Unreadable file.
    std::fs::write(&p, b"not numpy").unwrap();
    let e = err(&p, &m);
    assert!(e.contains("bad.npy"), "{e}");
    // Missing path.
    let e = err(&d.path().join("nope"), &m);
    assert!(e.contains("does not exist"), "{e}");
    // Images for an input that is not an image batch: say so (more in calibrate_images.rs).
    let i = tempfile::tempdir().unwrap();
    std::fs::write(i.path().join("a.png"), b"\x89PNG").unwrap();
    let e = err(i.path(), &m);
    assert!(e.contains("images") && e.contains("rank-4"), "{e}");
    // Several inputs, stray file name.
    let t = tempfile::tempdir().unwrap();
    write_npy(t.path().join("c_000.npy"), &arr(&[2], 1.0)).unwrap();
    let e = err(t.path(), &two_inputs());
    assert!(
        e.contains("c_000.npy") && e.contains("<input>_NNN.npy"),
        "{e}"
    );
    // Several inputs, unequal counts.
    write_npy(t.path().join("c_000.npy"), &arr(&[2], 1.0)).unwrap();
    std::fs::remove_file(t.path().join("c_000.npy")).unwrap();
    write_npy(t.path().join("a_000.npy"), &arr(&[2], 1.0)).unwrap();
    write_npy(t.path().join("a_001.npy"), &arr(&[2], 1.0)).unwrap();
    write_npy(t.path().join("b_0_000.npy"), &arr(&[2], 1.0)).unwrap();
    let e = err(t.path(), &two_inputs());
    assert!(e.contains("same count"), "{e}");
    // NaN.
    write_npy(&p, &arr(&[2, 3], f32::NAN)).unwrap();
    assert!(err(&p, &m).contains("NaN"));
}

#[test]
fn synthetic_data_is_seeded_and_warns() {
    let mut b = Builder::new(13);
    b.input("x", &[1, 2, 3]).output("y", &[1, 2, 3]);
    b.node("Relu", "r", &["x"], &["y"], vec![]);
    let m = b.model();
    let a = CalibrationSet::synthetic(&m, 4, 9, &DataOptions::default()).unwrap();
    let c = CalibrationSet::synthetic(&m, 4, 9, &DataOptions::default()).unwrap();
    assert_eq!(a.batches, c.batches);
    assert_eq!(a.batches.len(), 4, "fixed batch 1");
    assert!(a.synthetic && a.notes[0].contains("WARNING"));
    // Symbolic non-batch dims need real data.
    let mut b = Builder::new(13);
    b.input("x", &[1, -1]).output("y", &[1, -1]);
    b.node("Relu", "r", &["x"], &["y"], vec![]);
    let e = CalibrationSet::synthetic(&b.model(), 4, 9, &DataOptions::default()).unwrap_err();
    assert!(e.to_string().contains("--calib"), "{e}");
}

#[test]
fn testdata_digits_calib_dir_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let model = root.join("digits_cnn.onnx");
    let m = onnx_compress::ir::Model::load(&model).unwrap();
    let c = CalibrationSet::load(&root.join("digits_calib"), &m, &DataOptions::default()).unwrap();
    assert_eq!(c.samples, 32);
    assert_eq!(c.batches[0][0].shape(), &[32, 1, 8, 8]);
}

/// `model` with input `k`'s dims named (`""` keeps a dim as it is) and its element type set.
fn typed(
    mut m: onnx_compress::onnx::proto::ModelProto,
    k: usize,
    names: &[&str],
    elem: i32,
) -> Model {
    use onnx_compress::onnx::proto::{tensor_shape_proto::dimension::Value, type_proto};
    let input = &mut m.graph.as_mut().unwrap().input[k];
    let Some(type_proto::Value::TensorType(t)) = input.r#type.as_mut().unwrap().value.as_mut()
    else {
        panic!("tensor input")
    };
    t.elem_type = Some(elem);
    for (d, n) in t.shape.as_mut().unwrap().dim.iter_mut().zip(names) {
        if !n.is_empty() {
            d.value = Some(Value::DimParam(n.to_string()));
        }
    }
    Model::from_proto(m).unwrap()
}

const FLOAT: i32 = 1;
const INT64: i32 = 7;

/// `input` [batch, 3] and `state` [2, batch, 4] (silero-vad's layout) -> Identity each.
fn streaming() -> Model {
    let mut b = Builder::new(13);
    b.input("input", &[-1, 3])
        .input("state", &[2, -1, 4])
        .output("y", &[-1, 3])
        .output("s", &[2, -1, 4]);
    b.node("Identity", "i", &["input"], &["y"], vec![]);
    b.node("Identity", "j", &["state"], &["s"], vec![]);
    let m = typed(b.proto(), 0, &["batch", ""], FLOAT);
    typed(m.to_proto().unwrap(), 1, &["", "batch", ""], FLOAT)
}

#[test]
fn stacked_archive_splits_each_input_on_its_shared_batch_axis() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("stacked.npz");
    let mut z = NpzWriter::new(std::fs::File::create(&p).unwrap());
    let state = ArrayD::from_shape_fn(IxDyn(&[2, 5, 4]), |i| i[1] as f32);
    z.add_array("input", &arr(&[5, 3], 1.0)).unwrap();
    z.add_array("state", &state).unwrap();
    z.finish().unwrap();
    let opts = DataOptions {
        batch_size: 2,
        ..Default::default()
    };
    let c = CalibrationSet::load(&p, &streaming(), &opts).unwrap();
    assert_eq!(c.batch_axes, vec![Some(0), Some(1)]);
    assert_eq!(c.samples, 5);
    let shapes: Vec<Vec<usize>> = c.batches.iter().map(|b| b[1].shape().to_vec()).collect();
    assert_eq!(shapes, vec![vec![2, 2, 4], vec![2, 2, 4], vec![2, 1, 4]]);
    // Sample 2 of the state is the first of the second batch.
    let second = c.batches[1][1].as_f32().unwrap();
    assert_eq!(second[[0, 0, 0]], 2.0);
}

#[test]
fn shared_dims_that_do_not_name_the_batch_are_an_error_with_the_hint() {
    // a [seq, batch], c [batch, seq]: two shared names, neither leading everywhere.
    let mut b = Builder::new(13);
    b.input("a", &[-1, -1])
        .input("c", &[-1, -1])
        .output("y", &[-1, -1]);
    b.node("Identity", "i", &["a"], &["y"], vec![]);
    let m = typed(b.proto(), 0, &["seq", "batch"], FLOAT);
    let m = typed(m.to_proto().unwrap(), 1, &["batch", "seq"], FLOAT);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.npz");
    let mut z = NpzWriter::new(std::fs::File::create(&p).unwrap());
    z.add_array("a", &arr(&[4, 2], 1.0)).unwrap();
    z.add_array("c", &arr(&[2, 4], 1.0)).unwrap();
    z.finish().unwrap();
    let e = err(&p, &m);
    assert!(e.contains("ambiguous") && e.contains("--batch-axis"), "{e}");
    let opts = DataOptions {
        batch_axes: vec![("a".into(), Some(1)), ("c".into(), Some(0))],
        ..Default::default()
    };
    let c = CalibrationSet::load(&p, &m, &opts).unwrap();
    assert_eq!(c.samples, 2);
}

#[test]
fn integer_inputs_keep_their_type_and_float_data_for_them_is_refused() {
    let mut b = Builder::new(13);
    b.input("ids", &[-1, 3])
        .input("sr", &[])
        .output("y", &[-1, 3]);
    b.node("Identity", "i", &["ids"], &["y"], vec![]);
    let mut proto = b.proto();
    {
        // The output is the ids themselves: declared int64 like them.
        use onnx_compress::onnx::proto::type_proto;
        let out = &mut proto.graph.as_mut().unwrap().output[0];
        if let Some(type_proto::Value::TensorType(t)) = out.r#type.as_mut().unwrap().value.as_mut()
        {
            t.elem_type = Some(INT64);
        }
    }
    let m = typed(proto, 0, &["", ""], INT64);
    let m = typed(m.to_proto().unwrap(), 1, &[], INT64);
    let dir = tempfile::tempdir().unwrap();
    for k in 0..3 {
        let mut z =
            NpzWriter::new(std::fs::File::create(dir.path().join(format!("f{k}.npz"))).unwrap());
        let ids = ArrayD::from_shape_fn(IxDyn(&[1, 3]), |i| (k * 3 + i[1]) as i32);
        z.add_array("ids", &ids).unwrap();
        z.add_array("sr", &ndarray::arr0(16000i64)).unwrap();
        z.finish().unwrap();
    }
    let c = CalibrationSet::load(dir.path(), &m, &DataOptions::default()).unwrap();
    assert_eq!(c.batch_axes, vec![Some(0), None]);
    let ids = &c.batches[0][0];
    assert_eq!(ids.type_name(), "int64");
    assert_eq!(
        ids.to_f64().iter().copied().collect::<Vec<_>>(),
        (0..9).map(f64::from).collect::<Vec<_>>()
    );
    assert_eq!(c.batches[0][1].describe_values(), "16000");

    // A second sample rate in one file: no batch axis, so it must agree.
    let mut z = NpzWriter::new(std::fs::File::create(dir.path().join("f9.npz")).unwrap());
    z.add_array("ids", &ArrayD::from_elem(IxDyn(&[1, 3]), 1i64))
        .unwrap();
    z.add_array("sr", &ndarray::arr0(8000i64)).unwrap();
    z.finish().unwrap();
    let e = err(dir.path(), &m);
    assert!(
        e.contains("'sr'") && e.contains("--fix-input sr=VALUE"),
        "{e}"
    );

    // Float data for an integer input names the input and both types.
    let p = dir.path().join("bad.npz");
    let mut z = NpzWriter::new(std::fs::File::create(&p).unwrap());
    z.add_array("ids", &arr(&[1, 3], 1.0)).unwrap();
    z.add_array("sr", &ndarray::arr0(16000i64)).unwrap();
    z.finish().unwrap();
    let e = err(&p, &m);
    assert!(
        e.contains("'ids'") && e.contains("expected int64 data, found float"),
        "{e}"
    );
}
