//! The main command end to end: round trip validated in tract, JSON report keys, inspect.

mod common;
use common::*;

#[test]
fn round_trip_of_every_testdata_model_validates_with_zero_error() {
    let dir = tempfile::tempdir().unwrap();
    for model in testdata_models() {
        let out = dir.path().join("out.onnx");
        let report = dir.path().join("report.json");
        let (code, stdout, err) = run(&[
            model.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--passes",
            "none",
            "--report",
            report.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{}: {err}", model.display());
        assert!(stdout.contains("validated in tract"), "{stdout}");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        for key in [
            "tool",
            "version",
            "input",
            "output",
            "passes",
            "validation",
            "size_ratio",
        ] {
            assert!(json.get(key).is_some(), "report lacks '{key}'");
        }
        let v = &json["validation"];
        assert_eq!(v["status"], "checked", "{}", model.display());
        assert_eq!(v["method"], "direct");
        for o in v["outputs"].as_array().unwrap() {
            assert_eq!(o["max_abs_err"], 0.0, "{}", model.display());
            assert!(
                o["sqnr_db"].is_null(),
                "identical outputs have infinite SQNR"
            );
        }
        let (orig, _) = onnx_compress::onnx::load::read_model(&model).unwrap();
        let (back, _) = onnx_compress::onnx::load::read_model(&out).unwrap();
        assert!(
            orig == back,
            "{}: output differs from input",
            model.display()
        );
    }
}

#[test]
fn inspect_reports_ops_params_and_macs() {
    let m = testdata().join("digits_cnn.onnx");
    let (code, stdout, err) = run(&["inspect", m.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["stats"]["op_histogram"]["BatchNormalization"], 5);
    assert!(json["stats"]["parameters"].as_u64().unwrap() > 1000);
    assert!(json["stats"]["bytes_by_dtype"]["float"].as_u64().unwrap() > 4000);
    assert_eq!(json["inputs"][0]["name"], "input");
    let (code, stdout, _) = run(&["inspect", m.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("Conv") && stdout.contains("MACs"),
        "{stdout}"
    );
}

#[test]
fn help_and_version() {
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("inspect") && stdout.contains("--passes"),
        "{stdout}"
    );
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, 0);
    assert!(stdout.starts_with("onnx-compress "), "{stdout}");
}

#[test]
fn a_saved_recipe_repeats_the_run_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let m = testdata().join("conv_bn_relu.onnx");
    let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
    let (code, _, err) = run(&[
        m.to_str().unwrap(),
        "-o",
        &p("a.onnx"),
        "--seed",
        "5",
        "--samples",
        "2",
        "--save-recipe",
        &p("recipe.toml"),
        "-q",
    ]);
    assert_eq!(code, 0, "{err}");
    let recipe = std::fs::read_to_string(p("recipe.toml")).unwrap();
    assert!(
        recipe.contains("seed = 5") && recipe.contains("samples = 2"),
        "{recipe}"
    );
    let (code, _, err) = run(&[
        m.to_str().unwrap(),
        "-o",
        &p("b.onnx"),
        "--config",
        &p("recipe.toml"),
        "--report",
        &p("b.json"),
        "-q",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(p("a.onnx")).unwrap(),
        std::fs::read(p("b.onnx")).unwrap()
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("b.json")).unwrap()).unwrap();
    assert_eq!(
        report["validation"]["seed"], 5,
        "recipe options reach the run"
    );
    // Command-line options override the recipe.
    let (code, _, _) = run(&[
        m.to_str().unwrap(),
        "-o",
        &p("c.onnx"),
        "--config",
        &p("recipe.toml"),
        "--seed",
        "9",
        "--report",
        &p("c.json"),
        "-q",
    ]);
    assert_eq!(code, 0);
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("c.json")).unwrap()).unwrap();
    assert_eq!(report["validation"]["seed"], 9);
}

#[test]
fn recipes_reject_unknown_keys_and_print_defaults() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.toml");
    std::fs::write(&bad, "sede = 3\n").unwrap();
    let out = d.path().join("o.onnx");
    let m = testdata().join("mlp.onnx");
    let (code, _, err) = run(&[
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--config",
        bad.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("unknown option 'sede'") && err.contains("bad.toml"),
        "{err}"
    );
    assert!(!out.exists());
    let (code, stdout, _) = run(&["config", "--print-default"]);
    assert_eq!(code, 0);
    let table: toml::Table = toml::from_str(&stdout).expect("the default recipe parses");
    assert_eq!(table["seed"].as_integer(), Some(0));
    assert_eq!(table["no-validate"].as_bool(), Some(false));
}

/// The README's main command, read from README.md and run exactly as written (default target,
/// from the repository root, `-o` moved into a temporary directory, `--report` added): int8
/// Q/DQ inserted, fp32 vs int8 accuracy on the held-out digits test set.
#[test]
fn readme_main_command_quantizes_and_keeps_digits_accuracy() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo run -- "))
        .expect("README.md shows a `cargo run -- ...` command");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("digits_int8.onnx");
    let report = d.path().join("r.json");
    let mut args: Vec<String> = Vec::new();
    let mut words = line["cargo run -- ".len()..].split_whitespace();
    while let Some(w) = words.next() {
        if w == "-o" {
            words.next().expect("-o names a file");
            args.extend(["-o".into(), out.to_str().unwrap().into()]);
        } else if w.starts_with("testdata/") {
            args.push(root.join(w).to_str().unwrap().into());
        } else {
            args.push(w.into());
        }
    }
    args.extend(["--report".into(), report.to_str().unwrap().into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, err) = run_as_is(&args);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("accuracy"),
        "the summary prints accuracy: {stdout}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let o = &r["validation"]["outputs"][0];
    let (fp32, int8) = (
        o["accuracy_original"].as_f64().unwrap(),
        o["accuracy_candidate"].as_f64().unwrap(),
    );
    assert!(
        fp32 - int8 <= 0.005,
        "accuracy drop {fp32} -> {int8} above 0.5 points"
    );
    assert!(
        1.0 - o["top1_agreement"].as_f64().unwrap() <= 0.002,
        "top-1 disagreement above 0.2 points"
    );
    assert_eq!(r["validation"]["method"], "simulation");
    let ops = &r["output"]["stats"]["op_histogram"];
    assert!(ops["QuantizeLinear"].as_u64().unwrap() > 0 && ops.get("BatchNormalization").is_none());
    // The output is int8 where the README says so: well under half the input's bytes.
    assert!(
        r["size_ratio"].as_f64().unwrap() < 0.5,
        "{}",
        r["size_ratio"]
    );
}

/// Pruning composes with the default int8 pipeline in one run.
#[test]
fn pruning_and_quantization_compose() {
    let d = tempfile::tempdir().unwrap();
    let t = testdata();
    let out = d.path().join("pq.onnx");
    let report = d.path().join("r.json");
    let (code, _, err) = run(&[
        t.join("digits_cnn.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        t.join("digits_calib_x.npy").to_str().unwrap(),
        "--prune-flops",
        "0.3",
        "--report",
        report.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let (before, after) = (&r["input"]["stats"], &r["output"]["stats"]);
    let count = |stats: &serde_json::Value, key: &str| {
        stats[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no '{key}' in {stats}"))
    };
    assert!(
        count(after, "parameters") < count(before, "parameters"),
        "pruning removed parameters"
    );
    assert!(
        after["macs"].as_u64().unwrap() as f64 <= 0.71 * before["macs"].as_u64().unwrap() as f64
    );
    assert!(
        after["bytes_by_dtype"]["int8"].as_u64().unwrap() > 0,
        "weights are int8"
    );
    assert_eq!(r["validation"]["status"], "checked");
}

/// The command-line interface is documented by its help: any change to an option shows here.
#[test]
fn help_snapshot() {
    let (code, stdout, _) = run(&["--help"]);
    assert_eq!(code, 0);
    insta::assert_snapshot!("main_help", stdout);
    for sub in ["inspect", "sensitivity", "config"] {
        let (code, stdout, _) = run(&[sub, "--help"]);
        assert_eq!(code, 0);
        insta::assert_snapshot!(format!("{sub}_help"), stdout);
    }
}

fn digits_sqnr(extra: &[&str]) -> f64 {
    let d = tempfile::tempdir().unwrap();
    let t = testdata();
    let out = d.path().join("o.onnx");
    let report = d.path().join("r.json");
    let mut args = vec![
        t.join("digits_cnn.onnx").to_str().unwrap().to_string(),
        "-o".into(),
        out.to_str().unwrap().into(),
        "--calib".into(),
        t.join("digits_calib_x.npy").to_str().unwrap().into(),
        "--eval".into(),
        t.join("digits_test_x.npy").to_str().unwrap().into(),
        "--report".into(),
        report.to_str().unwrap().into(),
        "-q".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (code, _, err) = run(&refs);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    r["validation"]["outputs"][0]["sqnr_db"].as_f64().unwrap()
}

/// Bias correction (data-free from BN statistics, or measured) moves per-tensor int8 closer to
/// fp32, and equalization does too.
#[test]
fn bias_correction_and_equalization_improve_per_tensor_int8() {
    let base = ["--per-tensor", "--passes", "fuse,cleanup,quantize"];
    let plain = digits_sqnr(&base);
    let analytic = digits_sqnr(&[&base[..], &["--bias-correction", "analytic"]].concat());
    let empirical = digits_sqnr(&[&base[..], &["--bias-correction", "empirical"]].concat());
    let cle = digits_sqnr(&["--per-tensor", "--passes", "fuse,cleanup,equalize,quantize"]);
    assert!(
        analytic > plain + 0.3,
        "analytic {analytic} vs plain {plain}"
    );
    assert!(
        empirical > analytic,
        "empirical {empirical} vs analytic {analytic}"
    );
    assert!(cle > plain + 1.0, "CLE {cle} vs plain {plain}");
}

#[cfg(unix)]
#[test]
fn output_file_gets_the_umask_mode_not_the_temp_file_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let model = testdata().join("conv_bn_relu.onnx");
    let (code, _, err) = run(&[
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--passes",
        "none",
        "--no-validate",
    ]);
    assert_eq!(code, 0, "{err}");
    // Read the umask (the call sets it; put it straight back).
    let umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    };
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666 & !umask, "mode {mode:o} with umask {umask:o}");
}

#[test]
fn sensitivity_loss_is_selectable() {
    let traces = |loss: &str| -> Vec<f64> {
        let (code, stdout, err) = run(&[
            "sensitivity",
            testdata().join("digits_cnn.onnx").to_str().unwrap(),
            "--calib",
            testdata().join("digits_calib_x.npy").to_str().unwrap(),
            "--calib-samples",
            "16",
            "--hessian-samples",
            "8",
            "--hessian-loss",
            loss,
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|l| l["hessian_trace"].as_f64().unwrap())
            .collect()
    };
    // digits_cnn's logits are a classifier's: auto means KL.
    assert_eq!(traces("auto"), traces("kl"));
    let (kl, mse) = (traces("kl"), traces("mse"));
    assert_eq!(kl.len(), mse.len());
    assert!(
        kl.iter().zip(&mse).all(|(a, b)| a != b),
        "{kl:?} vs {mse:?}"
    );
    let (code, _, err) = run(&["sensitivity", "x.onnx", "--hessian-loss", "l1"]);
    assert_ne!(code, 0);
    assert!(err.contains("l1"), "{err}");
}

#[test]
fn mixed_precision_prints_the_layer_table_and_reports_both_selections() {
    let d = tempfile::tempdir().unwrap();
    let compress = |selection: &str| -> (String, serde_json::Value) {
        let out = d.path().join(format!("{selection}.onnx"));
        let report = d.path().join(format!("{selection}.json"));
        let (code, stdout, err) = run(&[
            testdata().join("digits_cnn.onnx").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--avg-bits",
            "5",
            "--calib",
            testdata().join("digits_calib_x.npy").to_str().unwrap(),
            "--calib-samples",
            "32",
            "--hessian-samples",
            "8",
            "--selection",
            selection,
            "--pareto",
            "--no-validate",
            "--report",
            report.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        let pass = json["passes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "mixed-precision")
            .unwrap()
            .clone();
        (stdout, pass["details"]["selection"].clone())
    };
    let (stdout, sel) = compress("joint");
    assert_eq!(sel["selection"], "joint");
    let layers = sel["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 6);
    // The table: a header with Ω and ΔL columns, then one row per layer by node name.
    let header = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("layer "))
        .unwrap_or_else(|| panic!("no table in:\n{stdout}"));
    for col in [
        "params", "Tr(H)", "Ω int4", "Ω int8", "ΔL int4", "chosen", "bytes",
    ] {
        assert!(header.contains(col), "'{col}' missing from '{header}'");
    }
    for l in layers {
        let node = l["node"].as_str().unwrap();
        let line = stdout
            .lines()
            .find(|x| x.trim_start().starts_with(node))
            .unwrap_or_else(|| panic!("no row for {node}"));
        assert!(line.contains(l["precision"].as_str().unwrap()), "{line}");
        assert!(l["loss"]["int4"].as_f64().unwrap() > 0.0);
    }
    // The local search starts from the ΣΩ knapsack's choice: never worse than it.
    let j = &sel["joint"];
    let chosen = j["predicted_loss"].as_f64().unwrap();
    assert!(chosen <= j["omega_choice_loss"].as_f64().unwrap());
    assert!(chosen <= j["per_layer_choice_loss"].as_f64().unwrap());
    assert!(stdout.contains("predicted loss increase"), "{stdout}");
    // --pareto: the frontier after the table, one row per reported point, ΣΩ falling with size.
    let pareto = sel["pareto"].as_array().unwrap();
    assert!(pareto.len() >= 2);
    let at = stdout
        .find("size-vs-sensitivity frontier")
        .expect("frontier printed");
    let rows: Vec<&str> = stdout[at..].lines().skip(2).take(pareto.len()).collect();
    for (row, p) in rows.iter().zip(pareto) {
        assert!(
            row.trim_start().starts_with(&p["bytes"].to_string()),
            "{row} vs {p}"
        );
        assert!(p["predicted_loss"].as_f64().is_some(), "{p}");
    }
    let sum_omega = |p: &serde_json::Value| {
        p["sum_omega"]
            .as_f64()
            .unwrap_or_else(|| panic!("no sum_omega in {p}"))
    };
    assert!(
        pareto
            .windows(2)
            .all(|w| sum_omega(&w[1]) <= sum_omega(&w[0])),
        "{pareto:?}"
    );

    let (stdout, sel) = compress("trace");
    assert_eq!(sel["selection"], "trace");
    assert!(sel.get("joint").is_none(), "{sel}");
    assert!(!stdout.contains("ΔL int4"), "{stdout}");
}

fn typed_model(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/models")
        .join(name)
}

#[test]
fn int64_token_ids_calibrate_and_validate() {
    use ndarray::{ArrayD, IxDyn};
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib");
    std::fs::create_dir(&calib).unwrap();
    for k in 0..6 {
        let f = std::fs::File::create(calib.join(format!("feed_{k}.npz"))).unwrap();
        let mut z = ndarray_npy::NpzWriter::new(f);
        let ids = ArrayD::from_shape_fn(IxDyn(&[1, 6]), |i| ((k * 7 + i[1] * 3) % 50) as i32);
        let feat = ArrayD::from_shape_fn(IxDyn(&[1, 4]), |i| (i[1] as f32 - 1.5) * 0.7);
        z.add_array("ids", &ids).unwrap();
        z.add_array("feat", &feat).unwrap();
        z.finish().unwrap();
    }
    let out = dir.path().join("out.onnx");
    let (code, stdout, err) = run(&[
        typed_model("token_embed.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("quantized 2 node(s)"), "{stdout}");
    assert!(stdout.contains("validated in tract"), "{stdout}");
}

#[test]
fn fix_input_collapses_the_if_and_the_output_validates_in_tract() {
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib.npz");
    let mut z = ndarray_npy::NpzWriter::new(std::fs::File::create(&calib).unwrap());
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 3, 8, 8]), |i| {
        ((i[0] * 7 + i[1] * 5 + i[2] * 3 + i[3]) % 11) as f32 / 5.0 - 1.0
    });
    z.add_array("x", &x).unwrap();
    z.finish().unwrap();
    let model = typed_model("if_scalar.onnx");
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let (code, stdout, err) = run(&[
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--fix-input",
        "mode=1",
        "--calib",
        calib.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("1 If(s) collapsed"), "{stdout}");
    assert!(stdout.contains("validated in tract"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["validation"]["status"], "checked");
    assert_eq!(
        json["specialized"]["collapsed_ifs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let m = onnx_compress::ir::Model::load(&out).unwrap();
    assert!(m
        .graph
        .node_indices()
        .all(|ix| m.graph.node(ix).op_type() != "If"));
    assert!(!m.graph.is_graph_input("mode"));
    assert!(m
        .graph
        .node_indices()
        .any(|ix| m.graph.node(ix).op_type() == "QuantizeLinear"));

    // Unfixed, the If's branches differ in shape: tract cannot check it.
    let (code, stdout, _) = run(&[
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(code, 0);
    assert!(stdout.contains("NOT validated"), "{stdout}");
    // A fix that is not an input, or of the wrong type, is one line naming it.
    let (code, _, err) = run(&[
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--force",
        "--fix-input",
        "mode=0.5",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("mode") && err.contains("whole number"),
        "{err}"
    );
}

#[test]
fn input_shape_alone_collapses_an_if_on_the_batch_size() {
    // Intent: `If(Shape(x)[0] == 1)` (silero-vad squeezing a batch of one) cannot be analysed
    // by tract with a symbolic batch; `--input-shape x:1x3x8x8` with no `--fix-input` settles
    // the condition, the If collapses to its then-branch, the Conv is quantized and the output
    // validates. Without the shape the model is left as it was (no If collapsed).
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib");
    std::fs::create_dir(&calib).unwrap();
    for k in 0..4 {
        let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[1, 3, 8, 8]), |i| {
            ((k * 7 + i[1] * 5 + i[2] * 3 + i[3]) % 11) as f32 / 5.0 - 1.0
        });
        ndarray_npy::write_npy(calib.join(format!("x_{k}.npy")), &x).unwrap();
    }
    let model = typed_model("if_batch.onnx");
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let (code, stdout, err) = run(&[
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--input-shape",
        "x:1x3x8x8",
        "--calib",
        calib.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("input shapes (--input-shape)"), "{stdout}");
    assert!(stdout.contains("1 If(s) collapsed"), "{stdout}");
    assert!(stdout.contains("validated in tract"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["validation"]["status"], "checked");
    let m = onnx_compress::ir::Model::load(&out).unwrap();
    let ops: Vec<String> = m
        .graph
        .node_indices()
        .map(|ix| m.graph.node(ix).op_type().to_string())
        .collect();
    assert!(!ops.iter().any(|o| o == "If" || o == "MaxPool"), "{ops:?}");
    assert!(ops.iter().any(|o| o == "QuantizeLinear"), "{ops:?}");

    let (code, stdout, _) = run(&[
        model.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert_eq!(code, 0);
    assert!(!stdout.contains("collapsed"), "{stdout}");
}

#[test]
fn validation_metrics_are_the_same_whatever_the_thread_count() {
    // Validation runs the calibration rows on all cores; the metrics are summed in row order.
    let d = tempfile::tempdir().unwrap();
    let t = testdata();
    let mut validations = Vec::new();
    for threads in ["1", "2", "3"] {
        let out = d.path().join(format!("v_{threads}.onnx"));
        let report = d.path().join(format!("v_{threads}.json"));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-compress"))
            .args([
                t.join("digits_cnn.onnx").to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--calib",
                t.join("digits_calib_x.npy").to_str().unwrap(),
                "--report",
                report.to_str().unwrap(),
                "--latency",
                "-q",
            ])
            .env("RAYON_NUM_THREADS", threads)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let v = &r["validation"];
        assert_eq!(v["status"], "checked", "{v}");
        // Up to 64 calibration rows, each run on its own (as many whatever the threads: the
        // early stop reads sums in row order); latency timed at batch 1.
        assert_eq!(v["samples_given"], 64, "{v}");
        assert_eq!(v["latency"]["batch_rows"], 1, "{v}");
        validations.push((v["samples"].clone(), v["outputs"].clone()));
    }
    assert_eq!(validations[0], validations[1]);
    assert_eq!(validations[0], validations[2]);
}

#[test]
fn calibrated_int8_is_the_same_whatever_the_thread_count() {
    let d = tempfile::tempdir().unwrap();
    let t = testdata();
    let m = t.join("digits_deep.onnx");
    let calib = t.join("digits_calib_x.npy");
    for method in ["percentile", "auto"] {
        let mut bytes = Vec::new();
        // `--threads N` sets the count (and the report says it); RAYON_NUM_THREADS, which the
        // flag overrides, asks for another.
        for threads in ["1", "2"] {
            let out = d.path().join(format!("{method}_{threads}.onnx"));
            let report = d.path().join(format!("{method}_{threads}.json"));
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_onnx-compress"))
                .args([
                    m.to_str().unwrap(),
                    "-o",
                    out.to_str().unwrap(),
                    "--calib",
                    calib.to_str().unwrap(),
                    "--method",
                    method,
                    "--no-validate",
                    "--threads",
                    threads,
                    "--report",
                    report.to_str().unwrap(),
                    "-q",
                ])
                .env("RAYON_NUM_THREADS", "3")
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{method} {threads}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
            assert_eq!(r["threads"].to_string(), threads, "{method}");
            bytes.push(std::fs::read(&out).unwrap());
        }
        assert!(
            bytes[0] == bytes[1],
            "--method {method}: 1 and 2 threads give different outputs"
        );
    }
}

/// `tests/models/if_weights.onnx` (make_testdata.py --branch-weight-models): a Conv, then an
/// `If` on the int64 scalar `mode == 1` whose branches hold the weights (a Constant inside
/// `then`, a main-graph initializer read by `else`) and give different shapes, so tract cannot
/// analyse it. Plain `--calib` (mode = 1 in every feed, nothing fixed): the main graph's
/// activations are observed on a copy specialized to mode = 1, both branches' weights are
/// stored int8 in the main graph, the interface is unchanged, and validation says it compared
/// copies specialized to the calibration data.
#[test]
fn plain_calib_on_an_if_model_observes_and_validates_on_a_specialized_copy() {
    use ndarray::{ArrayD, IxDyn};
    let dir = tempfile::tempdir().unwrap();
    let calib = dir.path().join("calib");
    std::fs::create_dir(&calib).unwrap();
    for k in 0..6 {
        let f = std::fs::File::create(calib.join(format!("feed_{k}.npz"))).unwrap();
        let mut z = ndarray_npy::NpzWriter::new(f);
        let x = ArrayD::from_shape_fn(IxDyn(&[1, 3, 8, 8]), |i| {
            ((k * 5 + i[1] * 7 + i[2] * 3 + i[3]) % 13) as f32 / 6.0 - 1.0
        });
        z.add_array("x", &x).unwrap();
        z.add_array("mode", &ndarray::arr0(1i64)).unwrap();
        z.finish().unwrap();
    }
    let out = dir.path().join("out.onnx");
    let report = dir.path().join("r.json");
    let (code, stdout, err) = run(&[
        typed_model("if_weights.onnx").to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--calib",
        calib.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("activation ranges observed on a copy specialized to the calibration data (mode = 1 (int64), x: 1x3x8x8; 1 If(s) collapsed)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 weight(s) read inside If/Loop/Scan bodies stored int8"),
        "{stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["validation"]["status"], "checked", "{json}");
    let first_note = json["validation"]["notes"][0].as_str().unwrap();
    assert!(
        first_note.starts_with("validated on copies of the input and the output specialized to the calibration data (mode = 1 (int64), x: 1x3x8x8"),
        "{first_note}"
    );
    assert!(first_note.contains("were not checked"), "{first_note}");

    // The interface is the original's; the main graph holds the Q/DQ of the Conv before the
    // If and a DequantizeLinear for each branch weight; the bodies read them by name and hold
    // no Constant any more.
    let m = onnx_compress::onnx::load::read_model(&out).unwrap().0;
    let g = m.graph.as_ref().unwrap();
    let inputs: Vec<&str> = g.input.iter().map(|i| i.name()).collect();
    assert_eq!(inputs, ["x", "mode"]);
    let produced_by = |name: &str| {
        g.node
            .iter()
            .find(|n| n.output.iter().any(|o| o == name))
            .map(|n| n.op_type().to_string())
    };
    for w in ["Wt", "We", "W0"] {
        assert_eq!(produced_by(w).as_deref(), Some("DequantizeLinear"), "{w}");
    }
    assert!(g.node.iter().any(|n| n.op_type() == "QuantizeLinear"));
    let branch = g.node.iter().find(|n| n.op_type() == "If").unwrap();
    for a in &branch.attribute {
        let ops: Vec<&str> =
            a.g.as_ref()
                .unwrap()
                .node
                .iter()
                .map(|n| n.op_type())
                .collect();
        assert!(!ops.contains(&"Constant"), "{}: {ops:?}", a.name());
    }
    if common::python::require_python(&["onnx", "onnxruntime", "numpy"], "if_weights ORT") {
        // Both branches still run in ONNX Runtime, close to the original's.
        let script = format!(
            r#"
import numpy as np, onnx, onnxruntime as ort
onnx.checker.check_model(onnx.load(r"{out}"), full_check=True)
a = ort.InferenceSession(r"{src}", providers=["CPUExecutionProvider"])
b = ort.InferenceSession(r"{out}", providers=["CPUExecutionProvider"])
x = np.load(r"{feed}")["x"]  # data like the calibration's (the Q/DQ ranges clip beyond)
for mode, shape in ((1, (1, 16, 8, 8)), (0, (1, 16, 4, 4))):
    ya = a.run(None, {{"x": x, "mode": np.array(mode, np.int64)}})[0]
    yb = b.run(None, {{"x": x, "mode": np.array(mode, np.int64)}})[0]
    assert yb.shape == shape, yb.shape
    err = float(np.abs(ya - yb).max() / np.abs(ya).max())
    assert err < 0.1, (mode, err)
print("ok")
"#,
            src = typed_model("if_weights.onnx").display(),
            out = out.display(),
            feed = calib.join("feed_3.npz").display()
        );
        let o = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}
