//! ONNX text syntax: `parse(print(m)) == m` on models covering the grammar, summaries,
//! error positions, no panics on truncated input, and cross-checks against Python's
//! `onnx.parser` / `onnx.printer` (not run, with a note, when python3 lacks onnx; a failure
//! under CI).

mod common;

use onnx_compress::onnx::proto::{
    self, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto,
};
use onnx_compress::onnx::text::{canonicalize_model, parse_model, print_model, PrintOptions};
use prost::Message;

// ---- builders -----------------------------------------------------------------------------

enum D {
    V(i64),
    P(&'static str),
    Unknown,
}

fn tensor_type(elem: DataType, shape: Option<Vec<D>>) -> TypeProto {
    let shape = shape.map(|dims| proto::TensorShapeProto {
        dim: dims
            .into_iter()
            .map(|d| tensor_shape_proto::Dimension {
                value: match d {
                    D::V(v) => Some(tensor_shape_proto::dimension::Value::DimValue(v)),
                    D::P(p) => Some(tensor_shape_proto::dimension::Value::DimParam(p.into())),
                    D::Unknown => None,
                },
                denotation: None,
            })
            .collect(),
    });
    TypeProto {
        value: Some(type_proto::Value::TensorType(type_proto::Tensor {
            elem_type: Some(elem as i32),
            shape,
        })),
        denotation: None,
    }
}

fn vi(name: &str, t: TypeProto) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(t),
        ..Default::default()
    }
}

fn ft(name: &str, dims: Vec<i64>) -> ValueInfoProto {
    vi(
        name,
        tensor_type(DataType::Float, Some(dims.into_iter().map(D::V).collect())),
    )
}

fn raw(name: Option<&str>, dt: DataType, dims: &[i64], bytes: Vec<u8>) -> TensorProto {
    TensorProto {
        name: name.map(Into::into),
        data_type: Some(dt as i32),
        dims: dims.to_vec(),
        raw_data: Some(bytes.into()),
        ..Default::default()
    }
}

fn f32s(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    raw(
        Some(name),
        DataType::Float,
        dims,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn attr(name: &str, t: AttributeType, f: impl FnOnce(&mut AttributeProto)) -> AttributeProto {
    let mut a = AttributeProto {
        name: Some(name.into()),
        r#type: Some(t as i32),
        ..Default::default()
    };
    f(&mut a);
    a
}

fn opset(d: &str, v: i64) -> proto::OperatorSetIdProto {
    proto::OperatorSetIdProto {
        domain: Some(d.into()),
        version: Some(v),
    }
}

fn kv(k: &str, v: &str) -> proto::StringStringEntryProto {
    proto::StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    }
}

fn branch(name: &str, out: &str, value: f32) -> GraphProto {
    GraphProto {
        name: Some(name.into()),
        initializer: vec![f32s("k", &[2], &[value, -value])],
        output: vec![ft(out, vec![2])],
        node: vec![node("Identity", &["k"], &[out], vec![])],
        ..Default::default()
    }
}

/// A model touching every construct the syntax has.
fn kitchen_sink() -> ModelProto {
    use AttributeType as A;
    let inputs = vec![
        vi(
            "x",
            tensor_type(
                DataType::Float,
                Some(vec![D::V(1), D::V(3), D::Unknown, D::P("N")]),
            ),
        ),
        vi("scalar", tensor_type(DataType::Float, Some(vec![]))),
        vi("any_rank", tensor_type(DataType::Float, None)),
        vi(
            "odd dims",
            tensor_type(DataType::Int64, Some(vec![D::P("batch size"), D::V(4)])),
        ),
        vi("cond", tensor_type(DataType::Bool, Some(vec![]))),
        vi(
            "s",
            TypeProto {
                value: Some(type_proto::Value::SequenceType(Box::new(
                    type_proto::Sequence {
                        elem_type: Some(Box::new(tensor_type(
                            DataType::Float,
                            Some(vec![D::V(3)]),
                        ))),
                    },
                ))),
                denotation: None,
            },
        ),
        vi(
            "m",
            TypeProto {
                value: Some(type_proto::Value::MapType(Box::new(type_proto::Map {
                    key_type: Some(DataType::Int64 as i32),
                    value_type: Some(Box::new(tensor_type(DataType::Float, Some(vec![])))),
                }))),
                denotation: None,
            },
        ),
        vi(
            "o",
            TypeProto {
                value: Some(type_proto::Value::OptionalType(Box::new(
                    type_proto::Optional {
                        elem_type: Some(Box::new(tensor_type(
                            DataType::Float16,
                            Some(vec![D::V(2)]),
                        ))),
                    },
                ))),
                denotation: None,
            },
        ),
        vi(
            "sp",
            TypeProto {
                value: Some(type_proto::Value::SparseTensorType(
                    type_proto::SparseTensor {
                        elem_type: Some(DataType::Float as i32),
                        shape: Some(proto::TensorShapeProto {
                            dim: vec![tensor_shape_proto::Dimension {
                                value: Some(tensor_shape_proto::dimension::Value::DimValue(5)),
                                denotation: None,
                            }],
                        }),
                    },
                )),
                denotation: None,
            },
        ),
    ];
    let f16 = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    let bf16 = |v: f32| half::bf16::from_f32(v).to_bits().to_le_bytes();
    let initializer = vec![
        f32s(
            "conv.weight",
            &[2, 1, 1, 2],
            &[0.1, -2.5, 1e-7, f32::INFINITY],
        ),
        f32s("b", &[2], &[0.0, -0.0]),
        f32s("scalar_init", &[], &[3.25]),
        raw(
            Some("d"),
            DataType::Double,
            &[2],
            [0.1f64, 1e300]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        raw(
            Some("h"),
            DataType::Float16,
            &[3],
            [f16(0.1), f16(-65504.0), f16(6e-8)].concat(),
        ),
        raw(
            Some("bh"),
            DataType::Bfloat16,
            &[2],
            [bf16(1.5), bf16(-3e38)].concat(),
        ),
        raw(Some("i8"), DataType::Int8, &[3], vec![0x80, 0x7f, 0xff]),
        raw(Some("u8"), DataType::Uint8, &[2], vec![0, 255]),
        raw(
            Some("i16"),
            DataType::Int16,
            &[2],
            [i16::MIN, 7].iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        raw(
            Some("u16"),
            DataType::Uint16,
            &[1],
            65535u16.to_le_bytes().to_vec(),
        ),
        raw(
            Some("i32"),
            DataType::Int32,
            &[2],
            [i32::MIN, i32::MAX]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        raw(
            Some("u32"),
            DataType::Uint32,
            &[1],
            u32::MAX.to_le_bytes().to_vec(),
        ),
        raw(
            Some("shape"),
            DataType::Int64,
            &[2],
            [i64::MIN, -1]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        raw(
            Some("u64"),
            DataType::Uint64,
            &[1],
            u64::MAX.to_le_bytes().to_vec(),
        ),
        raw(Some("flags"), DataType::Bool, &[3], vec![1, 0, 1]),
        // int4: -8, 7, -1 packed LSB first: (0x8 | 0x7 << 4), 0xf
        raw(Some("q4"), DataType::Int4, &[3], vec![0x78, 0x0f]),
        raw(Some("u4"), DataType::Uint4, &[2], vec![0xf1]),
        raw(Some("f8"), DataType::Float8e4m3fn, &[2], vec![0x38, 0xff]),
        raw(Some("empty"), DataType::Float, &[0, 3], vec![]),
        TensorProto {
            name: Some("names".into()),
            data_type: Some(DataType::String as i32),
            dims: vec![3],
            string_data: vec![
                "plain".into(),
                "quote \" and \\ backslash\nnewline".into(),
                bytes::Bytes::from_static(&[0xff, b'#', 0x00]),
            ],
            ..Default::default()
        },
        TensorProto {
            name: Some("big_external".into()),
            data_type: Some(DataType::Float as i32),
            dims: vec![1000, 1000],
            data_location: Some(proto::tensor_proto::DataLocation::External as i32),
            external_data: vec![
                kv("location", "weights.bin"),
                kv("offset", "0"),
                kv("length", "4000000"),
            ],
            ..Default::default()
        },
    ];
    let mut clip = node("Clip", &["c", "", "max"], &["clipped"], vec![]);
    clip.name = Some("/model/clip/Clip".into());
    let mut ms = node(
        "Foo",
        &["clipped", ""],
        &["z", "", "z2"],
        vec![
            attr("f", A::Float, |a| a.f = Some(0.1)),
            attr("i", A::Int, |a| a.i = Some(-3)),
            attr("s", A::String, |a| a.s = Some("a \"b\"".into())),
            attr("fs", A::Floats, |a| a.floats = vec![1.0, -0.5, 1e30]),
            attr("is", A::Ints, |a| a.ints = vec![]),
            attr("ss", A::Strings, |a| {
                a.strings = vec!["x".into(), "".into()]
            }),
            attr("t", A::Tensor, |a| {
                a.t = Some(raw(
                    None,
                    DataType::Int64,
                    &[1],
                    5i64.to_le_bytes().to_vec(),
                ))
            }),
            attr("tn", A::Tensor, |a| a.t = Some(f32s("named", &[], &[1.0]))),
            attr("ts", A::Tensors, |a| {
                a.tensors = vec![
                    f32s("t0", &[1], &[2.0]),
                    raw(None, DataType::Uint8, &[2], vec![1, 2]),
                ]
            }),
            attr("tp", A::TypeProto, |a| {
                a.tp = Some(tensor_type(DataType::Float, Some(vec![D::P("N")])))
            }),
            attr("tps", A::TypeProtos, |a| {
                a.type_protos = vec![
                    tensor_type(DataType::Int8, None),
                    tensor_type(DataType::Double, Some(vec![])),
                ]
            }),
        ],
    );
    ms.domain = Some("com.microsoft".into());
    ms.overload = Some("v2".into());
    let mut if_node = node(
        "If",
        &["cond"],
        &["t1"],
        vec![
            attr("then_branch", A::Graph, |a| {
                let mut g = branch("then_g", "a", 1.0);
                // A nested If inside the branch.
                g.node.push(node(
                    "If",
                    &["cond"],
                    &["inner"],
                    vec![
                        attr("then_branch", A::Graph, |a| {
                            a.g = Some(branch("t2", "p", 2.0))
                        }),
                        attr("else_branch", A::Graph, |a| {
                            a.g = Some(branch("e2", "q", 3.0))
                        }),
                    ],
                ));
                a.g = Some(g)
            }),
            attr("else_branch", A::Graph, |a| {
                a.g = Some(branch("else_g", "a", 4.0))
            }),
        ],
    );
    if_node.name = Some("if0".into());
    let loopish = node(
        "Scanish",
        &["x"],
        &["w"],
        vec![attr("bodies", A::Graphs, |a| {
            a.graphs = vec![branch("g0", "o0", 5.0), branch("g1", "o1", 6.0)]
        })],
    );
    let graph = GraphProto {
        name: Some("main".into()),
        input: inputs,
        output: vec![
            ft("out", vec![1, 2, 8, 8]),
            vi("z", tensor_type(DataType::Float, None)),
            vi("t1", tensor_type(DataType::Float, Some(vec![D::V(2)]))),
        ],
        initializer,
        value_info: vec![ft("c", vec![1, 2, 8, 8])],
        node: vec![
            node(
                "Conv",
                &["x", "conv.weight", "b"],
                &["c"],
                vec![
                    attr("kernel_shape", A::Ints, |a| a.ints = vec![1, 2]),
                    attr("pads", A::Ints, |a| a.ints = vec![0, 0, 0, 1]),
                ],
            ),
            node("Relu", &["c"], &["out"], vec![]),
            clip,
            ms,
            if_node,
            loopish,
            node("Custom", &[], &[], vec![]),
        ],
        ..Default::default()
    };
    let function = proto::FunctionProto {
        name: Some("MyFn".into()),
        domain: Some("local".into()),
        doc_string: Some("a function".into()),
        opset_import: vec![opset("", 17)],
        attribute: vec!["alpha".into()],
        attribute_proto: vec![attr("beta", A::Float, |a| a.f = Some(0.5))],
        input: vec!["x".into()],
        output: vec!["y".into()],
        value_info: vec![ft("t", vec![2])],
        node: vec![
            node(
                "LeakyRelu",
                &["x"],
                &["t"],
                vec![AttributeProto {
                    name: Some("alpha".into()),
                    ref_attr_name: Some("alpha".into()),
                    r#type: Some(A::Float as i32),
                    ..Default::default()
                }],
            ),
            node("Identity", &["t"], &["y"], vec![]),
        ],
        ..Default::default()
    };
    ModelProto {
        ir_version: Some(10),
        opset_import: vec![opset("", 17), opset("com.microsoft", 1), opset("local", 1)],
        producer_name: Some("test \"quoted\"".into()),
        producer_version: Some("1.0".into()),
        domain: Some("ai.example".into()),
        model_version: Some(3),
        doc_string: Some("multi\nline".into()),
        metadata_props: vec![kv("k", "v"), kv("empty", "")],
        graph: Some(graph),
        functions: vec![function],
        ..Default::default()
    }
}

fn wide() -> PrintOptions {
    PrintOptions {
        max_inline_elements: 64,
    }
}

// ---- round trip ---------------------------------------------------------------------------

#[test]
fn kitchen_sink_round_trips_exactly() {
    let m = kitchen_sink();
    let text = print_model(&m, &wide());
    let back = parse_model(&text).unwrap_or_else(|e| panic!("{e:#}\n--- text ---\n{text}"));
    if back != m {
        let g0 = m.graph.as_ref().unwrap();
        let g1 = back.graph.as_ref().unwrap();
        for (a, b) in g0.initializer.iter().zip(&g1.initializer) {
            assert_eq!(a, b, "initializer differs");
        }
        for (a, b) in g0.node.iter().zip(&g1.node) {
            assert_eq!(a, b, "node differs");
        }
        assert_eq!(m, back, "\n--- text ---\n{text}");
    }
    // The text is a fixed point: printing the parsed model gives the same text.
    assert_eq!(print_model(&back, &wide()), text);
}

#[test]
fn printer_output_shape_is_as_documented() {
    let text = print_model(&kitchen_sink(), &wide());
    for needle in [
        "<\n   ir_version: 10,\n   opset_import: [\"\" : 17, \"com.microsoft\" : 1, \"local\" : 1],",
        "main (float[1,3,?,N] x, float scalar, float[] any_rank, int64[\"batch size\",4] \"odd dims\"",
        "seq(float[3]) s, map(int64, float) m, optional(float16[2]) o, sparse_tensor(float[5]) sp",
        "   float[2,1,1,2] \"conv.weight\" = {0.1, -2.5, 1e-7, inf},",
        "   float16[3] h = {0.1, -65500.0, 6e-8},",
        "   int4[3] q4 = {-8, 7, -1},",
        "   c = Conv <kernel_shape: ints = [1, 2], pads: ints = [0, 0, 0, 1]> (x, \"conv.weight\", b)\n",
        "   [\"/model/clip/Clip\"] clipped = Clip (c, \"\", max)\n",
        "z, \"\", z2 = com.microsoft.Foo:v2 <f: float = 0.1, i: int = -3, s: string = \"a \\\"b\\\"\"",
        "is: ints = []",
        "t: tensor = int64[1] {5}, tn: tensor = float named {1.0}",
        "tps: type_protos = [int8[], double]",
        "   [if0] t1 = If (cond) <then_branch: graph = then_g () => (float[2] a)\n      <\n         float[2] k = {1.0, -1.0}\n      >\n      {\n",
        "float[1000,1000] big_external = [\"location\": \"weights.bin\", \"offset\": \"0\", \"length\": \"4000000\"]",
        "MyFn <alpha, beta: float = 0.5> (x) => (y)",
        "LeakyRelu <alpha: float = @alpha> (x)",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
}

#[test]
fn printing_is_deterministic() {
    let m = kitchen_sink();
    assert_eq!(
        print_model(&m, &PrintOptions::default()),
        print_model(&m.clone(), &PrintOptions::default())
    );
}

#[test]
fn typed_field_tensors_parse_back_in_canonical_raw_form() {
    let mut m = kitchen_sink();
    let g = m.graph.as_mut().unwrap();
    g.initializer.push(TensorProto {
        name: Some("typed".into()),
        data_type: Some(DataType::Int64 as i32),
        dims: vec![3],
        int64_data: vec![1, -2, 3],
        ..Default::default()
    });
    g.initializer.push(TensorProto {
        name: Some("typed_h".into()),
        data_type: Some(DataType::Float16 as i32),
        dims: vec![1],
        int32_data: vec![half::f16::from_f32(0.5).to_bits() as i32],
        ..Default::default()
    });
    g.node[1].domain = Some(String::new());
    let back = parse_model(&print_model(&m, &wide())).unwrap();
    assert_ne!(back, m);
    assert_eq!(back, canonicalize_model(&m));
}

// ---- summaries ----------------------------------------------------------------------------

fn big_model(values: &[f32]) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![opset("", 17)],
        graph: Some(GraphProto {
            name: Some("g".into()),
            input: vec![ft("x", vec![values.len() as i64])],
            output: vec![ft("y", vec![values.len() as i64])],
            initializer: vec![f32s("w", &[values.len() as i64], values)],
            node: vec![node("Mul", &["x", "w"], &["y"], vec![])],
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn large_tensors_are_summarised_with_stats_and_checksum() {
    let vals: Vec<f32> = (0..100).map(|i| i as f32 / 100.0).collect();
    let text = print_model(&big_model(&vals), &PrintOptions::default());
    let line = text.lines().find(|l| l.contains(" w = ")).unwrap();
    assert!(
        line.contains(
            "float[100] w = {... 100 values: mean=0.495 std=0.2887 min=0 max=0.99 crc32="
        ),
        "{line}"
    );
    // Any change in the data changes the summary.
    let mut vals2 = vals.clone();
    vals2[37] = f32::from_bits(vals2[37].to_bits() + 1);
    let text2 = print_model(&big_model(&vals2), &PrintOptions::default());
    assert_ne!(text, text2);
    // A summary is not data.
    let err = format!("{:#}", parse_model(&text).unwrap_err());
    assert!(err.contains("summarised") && err.contains("line "), "{err}");
    // With a larger limit everything is inline and round-trips.
    let full = print_model(
        &big_model(&vals),
        &PrintOptions {
            max_inline_elements: 100,
        },
    );
    assert_eq!(parse_model(&full).unwrap(), big_model(&vals));
}

// ---- errors -------------------------------------------------------------------------------

#[test]
fn errors_name_line_column_and_expectation() {
    let text = "# passes: fuse\n<ir_version: 8, opset_import: [\"\" : 17]>\ng (float[2] x) => (float[2] y)\n{\n   y = Relu <alpha: flaot = 1> (x)\n}\n";
    let e = format!("{:#}", parse_model(text).unwrap_err());
    assert!(e.contains("line 5:21"), "{e}");
    assert!(e.contains("expected an attribute type"), "{e}");
    assert!(e.contains("found 'flaot'"), "{e}");

    let e = format!(
        "{:#}",
        parse_model("<ir_version: 8>\ng (float x) => (float y) {\n  y = Relu (x)\n").unwrap_err()
    );
    assert!(e.contains("line 4:1") && e.contains("end of input"), "{e}");

    let e = format!(
        "{:#}",
        parse_model("<ir_vers: 8> g () => () {}").unwrap_err()
    );
    assert!(
        e.contains("line 1:2") && e.contains("model header keyword"),
        "{e}"
    );
}

#[test]
fn comments_are_ignored() {
    let text = "# passes: fuse\n# expect: no BatchNormalization\n<ir_version: 8, # trailing\n opset_import: [\"\" : 17]>\ng (float[2] x) => (float[2] y) {\n # a comment line\n y = Relu (x) # after\n}\n";
    let m = parse_model(text).unwrap();
    assert_eq!(m.graph.unwrap().node.len(), 1);
}

#[test]
fn truncated_and_mangled_inputs_never_panic() {
    let text = print_model(&kitchen_sink(), &wide());
    let mut ok = 0;
    for (i, _) in text.char_indices() {
        if parse_model(&text[..i]).is_ok() {
            ok += 1;
        }
    }
    // Only prefixes that end right after a complete graph or function can parse.
    assert!(ok < 10, "{ok} prefixes parsed");
    // Replace single characters with structural ones.
    let chars: Vec<char> = text.chars().collect();
    for (k, i) in (0..chars.len()).step_by(7).enumerate() {
        let mut c = chars.clone();
        c[i] = [
            '"', '<', '>', '{', '}', '[', ']', '(', ')', ',', '=', '-', '.', '9', 'x', '#',
        ][k % 16];
        let s: String = c.into_iter().collect();
        let _ = parse_model(&s);
    }
}

// ---- cross-checks with Python's onnx --------------------------------------------------------

/// Whether the Python cross-checks can run (a failure under CI when python lacks onnx).
fn python_onnx() -> bool {
    common::python::require_python(&["onnx", "numpy"], "Python onnx cross-check")
}

fn run_python(script: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A small valid model in the subset onnx's parser understands (no fp16 decoded values,
/// no summaries).
fn checkable_model() -> ModelProto {
    use AttributeType as A;
    let mut clip = node("Clip", &["r", "", "hi"], &["y"], vec![]);
    clip.name = Some("clip/0".into());
    let mut if_node = node(
        "If",
        &["cond"],
        &["z"],
        vec![
            attr("then_branch", A::Graph, |a| {
                a.g = Some(branch("then_g", "a", 1.0))
            }),
            attr("else_branch", A::Graph, |a| {
                a.g = Some(branch("else_g", "b", 2.0))
            }),
        ],
    );
    if_node.name = Some("if0".into());
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![opset("", 17), opset("local", 1)],
        producer_name: Some("onnx-compress".into()),
        metadata_props: vec![kv("k", "v")],
        graph: Some(GraphProto {
            name: Some("main".into()),
            input: vec![
                vi(
                    "x",
                    tensor_type(
                        DataType::Float,
                        Some(vec![D::P("N"), D::V(1), D::V(4), D::V(4)]),
                    ),
                ),
                vi("cond", tensor_type(DataType::Bool, Some(vec![]))),
            ],
            output: vec![
                vi(
                    "y",
                    tensor_type(
                        DataType::Float,
                        Some(vec![D::P("N"), D::V(2), D::V(4), D::V(4)]),
                    ),
                ),
                vi("z", tensor_type(DataType::Float, Some(vec![D::V(2)]))),
                vi("f", tensor_type(DataType::Float, Some(vec![D::V(2)]))),
            ],
            initializer: vec![
                f32s("conv.w", &[2, 1, 3, 3], &[0.1; 18]),
                f32s("conv.b", &[2], &[0.5, -1e-7]),
                f32s("hi", &[], &[6.0]),
                raw(
                    Some("shape"),
                    DataType::Int64,
                    &[2],
                    [1i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
            ],
            node: vec![
                node(
                    "Conv",
                    &["x", "conv.w", "conv.b"],
                    &["c"],
                    vec![
                        attr("kernel_shape", A::Ints, |a| a.ints = vec![3, 3]),
                        attr("pads", A::Ints, |a| a.ints = vec![1, 1, 1, 1]),
                    ],
                ),
                node(
                    "LeakyRelu",
                    &["c"],
                    &["r"],
                    vec![attr("alpha", A::Float, |a| a.f = Some(0.01))],
                ),
                clip,
                if_node,
                NodeProto {
                    domain: Some("local".into()),
                    ..node("Double", &["z"], &["f"], vec![])
                },
            ],
            ..Default::default()
        }),
        functions: vec![proto::FunctionProto {
            name: Some("Double".into()),
            domain: Some("local".into()),
            opset_import: vec![opset("", 17)],
            input: vec!["a".into()],
            output: vec!["b".into()],
            node: vec![node("Add", &["a", "a"], &["b"], vec![])],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn python_onnx_parser_accepts_our_text() {
    if !python_onnx() {
        return;
    }
    let m = checkable_model();
    let text = print_model(&m, &wide());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnxtxt");
    let out_pb = dir.path().join("m.pb");
    std::fs::write(&path, &text).unwrap();
    run_python(
        "import sys, onnx, onnx.parser, onnx.checker\n\
         m = onnx.parser.parse_model(open(sys.argv[1]).read())\n\
         onnx.checker.check_model(m, full_check=True)\n\
         open(sys.argv[2], 'wb').write(m.SerializeToString())\n",
        &[path.to_str().unwrap(), out_pb.to_str().unwrap()],
    );
    // And Python read the same model we meant.
    let py = ModelProto::decode(std::fs::read(&out_pb).unwrap().as_slice()).unwrap();
    assert_eq!(canonicalize_model(&py), m, "\n{text}");
}

#[test]
fn we_parse_onnx_printer_output() {
    if !python_onnx() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    run_python(
        r#"
import sys, os, numpy as np, onnx, onnx.parser, onnx.printer
from onnx import helper, numpy_helper, TensorProto as T
d = sys.argv[1]
models = []

# 1: conv net, optional empty input, named node, raw and typed initializers, metadata
n0 = helper.make_node('Conv', ['x', 'w', 'b'], ['c'], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
n1 = helper.make_node('Clip', ['c', '', 'hi'], ['y'], name='clip0')
g = helper.make_graph([n0, n1], 'g',
    [helper.make_tensor_value_info('x', T.FLOAT, ['N', 3, None, 8])],
    [helper.make_tensor_value_info('y', T.FLOAT, ['N', 4, 8, 8])],
    [numpy_helper.from_array(np.linspace(-1, 1, 108).astype(np.float32).reshape(4, 3, 3, 3), 'w'),
     helper.make_tensor('b', T.FLOAT, [4], [0.1, 0.2, -0.3, 1e-8]),
     helper.make_tensor('hi', T.FLOAT, [], [6.0])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 17)], producer_name='pt')
helper.set_model_props(m, {'a': 'b'})
models.append(m)

# 2: If with subgraphs, Constant tensor attr, custom domain op with every list kind
then_g = helper.make_graph([helper.make_node('Constant', [], ['a'], value=numpy_helper.from_array(np.array([1, 2], dtype=np.int64)))], 'then_g', [], [helper.make_tensor_value_info('a', T.INT64, [2])])
else_g = helper.make_graph([helper.make_node('Identity', ['k'], ['a'])], 'else_g', [], [helper.make_tensor_value_info('a', T.INT64, [2])], [numpy_helper.from_array(np.array([3, 4], dtype=np.int64), 'k')])
n0 = helper.make_node('If', ['cond'], ['r'], then_branch=then_g, else_branch=else_g)
n1 = helper.make_node('Foo', ['r'], ['s'], domain='com.microsoft', alpha=0.25, beta=3, name_s='hi', fs=[1.5, 2.0], ss=['p', 'q'],
    t=helper.make_tensor('tt', T.FLOAT16, [2], np.array([1.5, -2], dtype=np.float16).view(np.uint16).tolist(), raw=False))
g = helper.make_graph([n0, n1], 'g2', [helper.make_tensor_value_info('cond', T.BOOL, [])], [helper.make_tensor_value_info('s', T.FLOAT, None)])
m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 17), helper.make_opsetid('com.microsoft', 1)])
models.append(m)

# 3: model-local function, fp16 raw initializer, int8/uint8/bool data
f = helper.make_function('local', 'Twice', ['a'], ['b'], [helper.make_node('Add', ['a', 'a'], ['b'])], [helper.make_opsetid('', 17)])
g = helper.make_graph([helper.make_node('Twice', ['x'], ['y'], domain='local')], 'g3',
    [helper.make_tensor_value_info('x', T.FLOAT16, [2])], [helper.make_tensor_value_info('y', T.FLOAT16, [2])],
    [numpy_helper.from_array(np.array([0.5, -1], dtype=np.float16), 'h'),
     numpy_helper.from_array(np.array([-128, 127], dtype=np.int8), 'i8'),
     numpy_helper.from_array(np.array([0, 255], dtype=np.uint8), 'u8'),
     numpy_helper.from_array(np.array([True, False]), 'flags'),
     numpy_helper.from_array(np.array([1.0, 2.0]), 'dbl')])
m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 17), helper.make_opsetid('local', 1)], functions=[f])
models.append(m)

for i, m in enumerate(models):
    text = onnx.printer.to_text(m)
    open(os.path.join(d, f'{i}.txt'), 'w').write(text)
    open(os.path.join(d, f'{i}.pb'), 'wb').write(onnx.parser.parse_model(text).SerializeToString())
"#,
        &[dir.path().to_str().unwrap()],
    );
    for i in 0..3 {
        let text = std::fs::read_to_string(dir.path().join(format!("{i}.txt"))).unwrap();
        let py = ModelProto::decode(
            std::fs::read(dir.path().join(format!("{i}.pb")))
                .unwrap()
                .as_slice(),
        )
        .unwrap();
        let ours = parse_model(&text).unwrap_or_else(|e| panic!("model {i}: {e:#}\n{text}"));
        assert_eq!(ours, canonicalize_model(&py), "model {i}:\n{text}");
        // Our printer reproduces a text that parses to the same model.
        let all = PrintOptions {
            max_inline_elements: 1000,
        };
        let again = parse_model(&print_model(&ours, &all)).unwrap();
        assert_eq!(again, ours, "model {i}");
    }
}
