//! `--html`: the self-contained report page.
//!
//! Intent: the page for a real run carries the summary, validation and one chart per pass
//! with plottable details; it is a pure function of the JSON report; no node name can inject
//! markup; the file is written atomically (nothing on failure, never a partial page).

use std::path::{Path, PathBuf};
use std::process::Command;

use onnx_compress::report::html;
use prost::Message;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_onnx-compress");

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name)
}

/// Run the digits model through the default pipeline plus 30% FLOP pruning, placed by
/// `--target generic` (under the CLI default `ort` its layers are too small to go int8, and the
/// page's int8 sections are what these tests read).
fn run_digits(model: &Path, dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg(model)
        .args(["--target", "generic"])
        .arg("-o")
        .arg(dir.join("out.onnx"))
        .arg("--calib")
        .arg(testdata("digits_calib_x.npy"))
        .arg("--eval")
        .arg(testdata("digits_test_x.npy"))
        .arg("--eval-labels")
        .arg(testdata("digits_test_y.npy"))
        .args(["--prune-flops", "0.3", "-q"])
        .args(extra)
        .output()
        .expect("running onnx-compress")
}

/// The `<section ...>...</section>` whose opening tag contains `id`.
fn section<'a>(page: &'a str, id: &str) -> Option<&'a str> {
    let start = page.find(&format!("<section id=\"{id}\""))?;
    let end = page[start..].find("</section>")? + start;
    Some(&page[start..end])
}

#[test]
fn digits_run_writes_a_page_with_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let page_path = dir.path().join("report.html");
    let json_path = dir.path().join("report.json");
    let out = run_digits(
        &testdata("digits_cnn.onnx"),
        dir.path(),
        &[
            "--html",
            page_path.to_str().unwrap(),
            "--report",
            json_path.to_str().unwrap(),
            // The equalization section needs the pass to run (per-channel skips it).
            "--equalize",
            "always",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&page_path).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"));
    assert!(page.trim_end().ends_with("</html>"));
    for title in [
        "<h2>Summary</h2>",
        "<h3>Time per stage</h3>",
        "<h2>Validation</h2>",
        "<h2>Pass notes</h2>",
        "Weight SQNR per layer",
        "Activation ranges",
        "Channel range ratio per pair",
        "Channels kept per group",
    ] {
        assert!(page.contains(title), "missing {title}");
    }
    // Validation with labels: status and the accuracy of both models.
    let v = section(&page, "validation").unwrap();
    assert!(v.contains("badge ok"), "{v}");
    assert!(v.contains("logits") && v.contains("% → "), "{v}");
    // One chart (or more) in each plotted pass's section, and each chart has its caption.
    for (id, title, charts) in [
        ("pass-quantize", "Quantization", 2),
        ("pass-equalize", "Cross-layer equalization", 2),
        ("pass-prune", "Pruning", 1),
    ] {
        let s = section(&page, id).unwrap_or_else(|| panic!("no section {id}"));
        assert!(s.contains(title));
        assert_eq!(s.matches("<svg").count(), charts, "{id}");
        assert_eq!(s.matches("<figcaption>").count(), charts, "{id}");
    }
    // Self-contained: no scripts, no external references.
    assert!(!page.to_lowercase().contains("<script"));
    // plotters' SVG roots carry the SVG namespace; nothing else may reference the web.
    assert_eq!(
        page.matches("http").count(),
        page.matches("xmlns=\"http://www.w3.org/2000/svg\"").count()
    );
    assert!(!page.contains("https://"));
    assert!(!page.contains("<link") && !page.contains("<img"));

    // The page is a function of the JSON report alone (deterministic, data-driven).
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(html::render(&report).unwrap(), page);
}

/// A report in `--report` form with every plotted field, each name carrying `name`.
fn synthetic_report(name: &str) -> Value {
    json!({
        "tool": "onnx-compress", "version": "0.0.0",
        "input": {"path": format!("{name}.onnx"), "file_bytes": 4000,
                  "stats": {"nodes": 3, "parameters": 1000, "macs": 5000, "macs_unknown_nodes": 0,
                            "bytes_by_dtype": {"float": 4000}}},
        "output": {"path": "out.onnx", "file_bytes": 1000,
                   "stats": {"nodes": 9, "parameters": 1000, "macs": 5000, "macs_unknown_nodes": 0,
                             "bytes_by_dtype": {"int8": 1000}}},
        "size_ratio": 0.25, "seconds_total": 1.5,
        "validation": {"status": "mismatch", "method": "direct", "reason": format!("output {name} missing"),
                       "runtime": "tract", "rewrites": [name], "notes": [name], "input_source": "synthetic",
                       "inputs": [{"name": name, "shape": [1, "N"], "elem_type_name": "float"}],
                       "samples": 4, "seed": 0,
                       "outputs": [{"name": name, "shape": [1, 10], "max_abs_err": 0.0, "mean_abs_err": 0.0,
                                    "cosine": 1.0, "sqnr_db": null, "top1_agreement": 1.0,
                                    "nonfinite_mismatches": 0, "accuracy_original": null,
                                    "accuracy_candidate": null}]},
        "passes": [
            {"name": "quantize", "changes": 1, "seconds": 0.1, "nodes_before": 3, "nodes_after": 9,
             "notes": [format!("note about {name}")],
             "details": {"method": "minmax", "per_channel": true,
                         "weights": [{"tensor": name, "node": name, "sqnr_db": 40.0}],
                         "activations": [{"tensor": name, "range": [0.0, 2.0], "observed_min": 0.0,
                                          "observed_max": 3.0, "scale": 0.01, "shared_with": name}]}},
            {"name": "equalize", "changes": 1, "seconds": 0.1, "nodes_before": 3, "nodes_after": 3,
             "notes": [], "details": {"pairs": [{"l1": name, "l2": name, "range_ratio_before": 8.0,
                                                "range_ratio_after": 2.0,
                                                "sqnr_db": {"l1_before": 30.0, "l1_after": 35.0,
                                                            "l2_before": 31.0, "l2_after": 30.0}}],
                                      "excluded": [{"from": name, "to": name, "reason": name}]}},
            {"name": "prune", "changes": 1, "seconds": 0.1, "nodes_before": 3, "nodes_after": 3,
             "notes": [], "details": {"groups": [
                 {"group": 0, "channels_before": 8, "channels_after": 4, "prunable": true,
                  "members": [format!("Conv '{name}'")], "unprunable_reasons": []},
                 {"group": 1, "channels_before": 10, "channels_after": 10, "prunable": false,
                  "members": [name], "unprunable_reasons": [name]}],
                 "reconstruction": [{"node": name, "method": "least_squares", "rel_error": 0.1}]}},
            {"name": "mixed-precision", "changes": 3, "seconds": 2.0, "nodes_before": 3, "nodes_after": 9,
             "notes": [],
             "details": {"selection": {
                 "fp32_bytes": 4000, "total_bytes": 900, "avg_bits": 7.2, "sum_omega": 0.02,
                 "budget": {"bytes": 1000},
                 "selection": "joint",
                 "joint": {"predicted_loss": 0.0125, "omega_choice_loss": 0.0375,
                           "per_layer_choice_loss": 0.05, "moves": 2, "started_from": "omega"},
                 "layers": [
                     {"node": name, "weight": "w0", "hessian_trace": 120.0, "precision": "fp16", "bytes": 400,
                      "omega": {"fp16": 0.0, "int8": 0.01}},
                     {"node": "conv2", "weight": "w1", "hessian_trace": 3.5, "precision": "int8", "bytes": 300},
                     {"node": "fc", "weight": "w2", "hessian_trace": 0.02, "precision": "int4", "bytes": 200}],
                 "pareto": [{"bytes": 600, "sum_omega": 0.5}, {"bytes": 900, "sum_omega": 0.02},
                            {"bytes": 2000, "sum_omega": 1e-5}, {"bytes": 4000, "sum_omega": 0.0}]}}}
        ]
    })
}

#[test]
fn mixed_precision_section_from_synthetic_details() {
    let page = html::render(&synthetic_report("conv1")).unwrap();
    let s = section(&page, "pass-mixed-precision").expect("mixed-precision section");
    assert!(s.contains("Mixed precision"));
    assert!(s.contains("Hessian trace per layer"));
    assert!(s.contains("Pareto frontier"));
    assert!(s.contains("selection: joint"), "{s}");
    assert!(s.contains("1.250e-2") && s.contains("3.750e-2"), "{s}");
    assert_eq!(s.matches("<svg").count(), 2);
    // The legend names each chosen precision, in fp32/fp16/int8/int4 order.
    let (a, b, c) = (
        s.find("</i>fp16").unwrap(),
        s.find("</i>int8").unwrap(),
        s.find("</i>int4").unwrap(),
    );
    assert!(a < b && b < c);
    // Σ Ω = 0 cannot sit on a log axis: the caption says a point was left out.
    assert!(s.contains("1 point(s) with Σ Ω = 0"));
    // Log-scale Hessian axis spans the decades of the traces (0.01 .. 1000).
    assert!(
        s.contains(">\n0.01\n</text>") && s.contains(">\n1000\n</text>"),
        "{s}"
    );
    // Mismatch status and the identical-output SQNR (null in JSON) read correctly.
    let v = section(&page, "validation").unwrap();
    assert!(v.contains("MISMATCH"));
    assert!(v.contains("∞ (identical)"));
}

#[test]
fn sections_appear_only_with_their_data() {
    let mut r = synthetic_report("x");
    r["passes"] = json!([{"name": "fuse", "changes": 0, "seconds": 0.0, "nodes_before": 3,
                          "nodes_after": 3, "notes": [], "details": {"folded": {}}}]);
    r.as_object_mut().unwrap().remove("validation");
    let page = html::render(&r).unwrap();
    assert!(!page.contains("<svg"));
    assert!(!page.contains("<section id=\"pass-"));
    assert!(page.contains("--no-validate"));
    assert!(page.contains("No pass left a note."));
    // Malformed details are skipped or shown as far as they go, never an error.
    r["passes"] = json!([{"name": "q", "details": {"weights": [{}, 3, "a"], "pairs": "no",
                          "groups": [{"channels_before": "many"}],
                          "selection": {"layers": [{"hessian_trace": -1.0}], "pareto": [{}]}}}]);
    html::render(&r).unwrap();
}

#[test]
fn names_cannot_inject_markup() {
    let evil = "<script>alert(1)</script><img src=x onerror=alert(2)>\"'&";
    let page = html::render(&synthetic_report(evil)).unwrap();
    let lower = page.to_lowercase();
    assert!(!lower.contains("<script"), "unescaped <script");
    assert!(!lower.contains("<img"), "unescaped <img");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    // Charts carry the names too (plotters escapes SVG text).
    let s = section(&page, "pass-quantize").unwrap();
    assert!(s.contains("<svg") && s.contains("alert(2)"), "{s}");
}

/// The digits model with its first Conv renamed to `name`.
fn renamed_digits(dir: &Path, name: &str) -> PathBuf {
    let bytes = std::fs::read(testdata("digits_cnn.onnx")).unwrap();
    let mut m = onnx_compress::onnx::proto::ModelProto::decode(bytes.as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    let conv = g
        .node
        .iter_mut()
        .find(|n| n.op_type() == "Conv")
        .expect("a Conv");
    conv.name = Some(name.to_string());
    let path = dir.join("evil.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    path
}

#[test]
fn node_name_with_script_tag_is_escaped_in_a_real_run() {
    let dir = tempfile::tempdir().unwrap();
    let evil = "<script>alert('x')</script>";
    let model = renamed_digits(dir.path(), evil);
    let page_path = dir.path().join("r.html");
    let out = run_digits(&model, dir.path(), &["--html", page_path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(&page_path).unwrap();
    assert!(
        page.contains("&lt;script&gt;alert("),
        "the renamed node should appear, escaped"
    );
    assert!(!page.to_lowercase().contains("<script"));
}

#[test]
fn page_is_written_atomically() {
    let dir = tempfile::tempdir().unwrap();
    // A failing run writes no page.
    let page_path = dir.path().join("r.html");
    let out = Command::new(BIN)
        .arg(dir.path().join("missing.onnx"))
        .arg("-o")
        .arg(dir.path().join("o.onnx"))
        .arg("--html")
        .arg(&page_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!page_path.exists());

    // A page that cannot be placed (the path is a directory) fails the run, names the path,
    // and leaves no temporary file behind.
    let blocked = dir.path().join("blocked.html");
    std::fs::create_dir(&blocked).unwrap();
    let before: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    let out = run_digits(
        &testdata("digits_cnn.onnx"),
        dir.path(),
        &["--html", blocked.to_str().unwrap(), "--passes", "fuse"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("blocked.html"), "{err}");
    let after: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "out.onnx")
        .collect();
    assert_eq!(after.len(), before.len(), "left behind: {after:?}");
    assert!(blocked.is_dir());

    // An existing page is replaced whole.
    std::fs::write(&page_path, "stale").unwrap();
    let out = run_digits(
        &testdata("digits_cnn.onnx"),
        dir.path(),
        &["--html", page_path.to_str().unwrap(), "--passes", "fuse"],
    );
    assert!(out.status.success());
    let page = std::fs::read_to_string(&page_path).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && !page.contains("stale"));
}

#[test]
fn size_plan_section_from_synthetic_details() {
    let mut r = synthetic_report("conv1");
    r["passes"][2]["details"]["size_plan"] = json!({
        "budget_bytes": 1500, "fp32_bytes": 10000, "chosen_level": 0.25,
        "candidates": [
            {"level": 0.0, "channels_removed": 0, "macs_after": 100, "predicted_prune": 0.0,
             "predicted_quant": 5.0e-4, "predicted": 5.0e-4, "bytes": 1490, "measured": 7.0e-4},
            {"level": 0.25, "channels_removed": 9, "macs_after": 80, "predicted_prune": 1.0e-6,
             "predicted_quant": 2.0e-5, "predicted": 2.1e-5, "bytes": 1480, "measured": 2.5e-5},
            {"level": 0.6, "channels_removed": 20, "macs_after": 40, "predicted_prune": 1.0e-5,
             "predicted_quant": null, "predicted": null, "bytes": null, "measured": null}],
        "frontier": [
            {"bytes": 800, "fraction": 0.08, "level": 0.6, "predicted": 1.0e-3, "measured": 2.0e-3,
             "predicted_precision_only": null, "measured_precision_only": null},
            {"bytes": 1500, "fraction": 0.15, "level": 0.25, "predicted": 2.1e-5, "measured": 2.5e-5,
             "predicted_precision_only": 5.0e-4, "measured_precision_only": 7.0e-4}]
    });
    let page = html::render(&r).unwrap();
    let s = section(&page, "pass-prune").expect("prune section");
    assert!(s.contains("One size budget for channels and bits"), "{s}");
    assert!(s.contains("15.0% of fp32"), "{s}");
    // The chosen row is marked, an infeasible level shows dashes, the frontier has both rows.
    assert!(s.contains("2.500e-5</td><td>chosen"), "{s}");
    assert!(s.contains("<td class=\"n\">60%</td><td class=\"n\">20</td><td class=\"n\">-</td>"));
    assert!(s.contains("Size frontier") && s.contains("7.000e-4"));
    // Channels per group and the frontier plot.
    assert_eq!(s.matches("<svg").count(), 2);
}
