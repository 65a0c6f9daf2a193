//! `--html FILE`: the run report as one self-contained page (inline CSS and SVG, no scripts,
//! no external assets) to open after a run.
//!
//! The page is rendered from the report's JSON form (`serde_json::Value`), the same document
//! `--report` writes, so it is data-driven and tolerant: each section appears only when its
//! data is there, whichever pass produced it and in whatever order the passes ran.
//!
//! - header: input → output, size, nodes, parameters, MACs, time per stage;
//! - validation: status, method, inputs, per-output metrics, accuracy, simulation rewrites, notes;
//! - one plot section per pass whose details carry plottable data:
//!   weights/activations (quantize), pairs (equalize), groups (prune),
//!   selection.layers/pareto (mixed precision);
//! - the per-pass notes.
//!
//! Every string from the report goes through [`esc`] (node names are user data); chart text
//! is escaped by plotters' SVG backend. Output is deterministic: nothing but the report's own
//! values (its timings included) reaches the page.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use super::plots::{self, Mark, Row, Segment};
use crate::session::write::write_text;
use crate::session::RunReport;

/// Render `report` and write it atomically to `path`.
pub fn write(path: &Path, report: &RunReport) -> Result<()> {
    let page = render_report(report)?;
    write_text(path, &page)
        .with_context(|| format!("writing the HTML report {}", path.display()))
}

/// The page for a run report.
pub fn render_report(report: &RunReport) -> Result<String> {
    let v = serde_json::to_value(report).context("serializing the run report")?;
    render(&v)
}

/// The page for a run report in its JSON form (as written by `--report`).
pub fn render(r: &Value) -> Result<String> {
    let mut h = String::new();
    let input = str_at(r, &["input", "path"]).unwrap_or("input");
    let output = str_at(r, &["output", "path"]).unwrap_or("output");
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(
        h,
        "<title>onnx-compress: {} → {}</title>",
        esc(input),
        esc(output)
    );
    let _ = writeln!(h, "<style>{CSS}</style>\n</head>\n<body>\n<main>");
    header(&mut h, r);
    validation(&mut h, r);
    for p in arr(r, "passes") {
        pass_plots(&mut h, p)?;
    }
    notes(&mut h, r);
    h.push_str("</main>\n</body>\n</html>\n");
    Ok(h)
}

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#f6f8fa;margin:0}
main{max-width:980px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.25em;margin:0 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:1.05em;margin:18px 0 6px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;margin:16px 0}
.paths{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all;color:#57606a;margin:0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{flex:1 1 150px;border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;background:#fbfcfd}
.card .k{font-size:.8em;color:#57606a;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:1.2em;font-weight:600;margin-top:2px}
.card .s{font-size:.85em;color:#57606a}
table{border-collapse:collapse;width:100%;font-size:.9em;margin:6px 0}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em;word-break:break-all}
.bar{display:inline-block;height:10px;background:#2b6cb0;border-radius:2px;vertical-align:middle}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;color:#fff}
.ok{background:#2f9e44}.bad{background:#d64545}.warn{background:#e88a1a}
figure{margin:14px 0 20px}
figure svg{width:100%;height:auto;display:block}
figcaption{font-size:.88em;color:#57606a;margin-top:4px}
.legend span{display:inline-block;margin-right:14px;font-size:.88em}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;vertical-align:-1px}
ul{margin:4px 0;padding-left:22px}
.muted{color:#57606a}
"#;

// ---- small helpers ------------------------------------------------------------------------

/// HTML-escape text (element content and attribute values).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}
fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}
fn f64_at(v: &Value, path: &[&str]) -> Option<f64> {
    at(v, path).and_then(Value::as_f64)
}
fn arr<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}
/// Any JSON value as short display text (strings unquoted).
fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map(plots::compact).unwrap_or_default(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join("×"),
        other => other.to_string(),
    }
}

fn human_bytes(b: f64) -> String {
    const K: f64 = 1024.0;
    if b >= K * K * K {
        format!("{:.2} GiB", b / (K * K * K))
    } else if b >= K * K {
        format!("{:.2} MiB", b / (K * K))
    } else if b >= K {
        format!("{:.1} KiB", b / K)
    } else {
        format!("{b:.0} B")
    }
}

fn human_count(x: f64) -> String {
    if x >= 1e9 {
        format!("{:.2} G", x / 1e9)
    } else if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn seconds(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn card(h: &mut String, key: &str, value: &str, sub: &str) {
    let _ = write!(
        h,
        "<div class=\"card\"><div class=\"k\">{}</div><div class=\"v\">{}</div><div class=\"s\">{}</div></div>",
        esc(key),
        esc(value),
        esc(sub)
    );
}

fn figure(h: &mut String, svg: &str, caption: &str) {
    let _ = writeln!(
        h,
        "<figure>{svg}<figcaption>{}</figcaption></figure>",
        esc(caption)
    );
}

fn legend(h: &mut String, items: &[(&str, plots::Rgb)]) {
    h.push_str("<div class=\"legend\">");
    for (name, c) in items {
        let _ = write!(
            h,
            "<span><i style=\"background:#{:02x}{:02x}{:02x}\"></i>{}</span>",
            c.0,
            c.1,
            c.2,
            esc(name)
        );
    }
    h.push_str("</div>\n");
}

// ---- header -------------------------------------------------------------------------------

fn header(h: &mut String, r: &Value) {
    let input = str_at(r, &["input", "path"]).unwrap_or("?");
    let output = str_at(r, &["output", "path"]).unwrap_or("?");
    let _ = writeln!(
        h,
        "<header><h1>onnx-compress report</h1><p class=\"paths\">{} → {}</p><p class=\"muted\">{} {}</p></header>",
        esc(input),
        esc(output),
        esc(str_at(r, &["tool"]).unwrap_or("onnx-compress")),
        esc(str_at(r, &["version"]).unwrap_or(""))
    );
    h.push_str("<section id=\"summary\"><h2>Summary</h2>\n<div class=\"cards\">");
    let (b0, b1) = (
        f64_at(r, &["input", "file_bytes"]),
        f64_at(r, &["output", "file_bytes"]),
    );
    if let (Some(b0), Some(b1)) = (b0, b1) {
        let ratio = f64_at(r, &["size_ratio"]).unwrap_or(b1 / b0.max(1.0));
        card(
            h,
            "File size",
            &format!("{} → {}", human_bytes(b0), human_bytes(b1)),
            &format!(
                "{:.1}% of the input ({:.2}× smaller)",
                100.0 * ratio,
                1.0 / ratio.max(1e-12)
            ),
        );
    }
    let pair = |key: &str| {
        (
            f64_at(r, &["input", "stats", key]),
            f64_at(r, &["output", "stats", key]),
        )
    };
    if let (Some(a), Some(b)) = pair("nodes") {
        card(h, "Nodes", &format!("{a:.0} → {b:.0}"), "graph nodes");
    }
    if let (Some(a), Some(b)) = pair("parameters") {
        card(
            h,
            "Parameters",
            &format!("{} → {}", human_count(a), human_count(b)),
            "initializer elements",
        );
    }
    if let (Some(a), Some(b)) = pair("macs") {
        let unknown = f64_at(r, &["output", "stats", "macs_unknown_nodes"]).unwrap_or(0.0);
        let sub = if unknown > 0.0 {
            format!("{unknown:.0} node(s) with unknown shapes not counted")
        } else if a > 0.0 {
            format!("{:.1}% of the input", 100.0 * b / a)
        } else {
            String::new()
        };
        // Zero MACs with uncounted nodes means "unknown", not "free".
        let after = if b == 0.0 && unknown > 0.0 {
            "?".to_string()
        } else {
            human_count(b)
        };
        card(h, "MACs", &format!("{} → {after}", human_count(a)), &sub);
    }
    if let Some(t) = f64_at(r, &["seconds_total"]) {
        card(h, "Time", &seconds(t), "whole run, validation included");
    }
    h.push_str("</div>\n");

    // Weight bytes by element type, before and after.
    let dt0 = at(r, &["input", "stats", "bytes_by_dtype"]).and_then(Value::as_object);
    let dt1 = at(r, &["output", "stats", "bytes_by_dtype"]).and_then(Value::as_object);
    if dt0.is_some() || dt1.is_some() {
        let mut keys: Vec<&String> = dt0
            .iter()
            .chain(dt1.iter())
            .flat_map(|m| m.keys())
            .collect();
        keys.sort();
        keys.dedup();
        h.push_str("<h3>Initializer bytes by element type</h3><table><tr><th>type</th><th class=\"n\">input</th><th class=\"n\">output</th></tr>");
        let cell = |m: Option<&serde_json::Map<String, Value>>, k: &str| {
            m.and_then(|m| m.get(k))
                .and_then(Value::as_f64)
                .map(human_bytes)
                .unwrap_or_else(|| "—".into())
        };
        for k in keys {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(k),
                cell(dt0, k),
                cell(dt1, k)
            );
        }
        h.push_str("</table>\n");
    }

    let passes = arr(r, "passes");
    h.push_str("<h3>Time per stage</h3>\n");
    if passes.is_empty() {
        h.push_str("<p class=\"muted\">No passes ran (plain round trip).</p>\n");
    } else {
        let max = passes
            .iter()
            .filter_map(|p| f64_at(p, &["seconds"]))
            .fold(0.0f64, f64::max);
        h.push_str("<table><tr><th>pass</th><th class=\"n\">changes</th><th class=\"n\">nodes</th><th class=\"n\">time</th><th style=\"width:35%\"></th></tr>");
        for p in passes {
            let s = f64_at(p, &["seconds"]).unwrap_or(0.0);
            let width = if max > 0.0 { 100.0 * s / max } else { 0.0 };
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{} → {}</td><td class=\"n\">{}</td><td><span class=\"bar\" style=\"width:{width:.1}%\"></span></td></tr>",
                esc(str_at(p, &["name"]).unwrap_or("?")),
                p.get("changes").map(text).unwrap_or_default(),
                p.get("nodes_before").map(text).unwrap_or_default(),
                p.get("nodes_after").map(text).unwrap_or_default(),
                seconds(s),
            );
        }
        // What the passes do not account for: loading, saving, statistics, validation.
        let total = f64_at(r, &["seconds_total"]);
        let in_passes: f64 = passes.iter().filter_map(|p| f64_at(p, &["seconds"])).sum();
        if let Some(rest) = total.map(|t| t - in_passes).filter(|r| *r > 0.0) {
            let _ = write!(
                h,
                "<tr><td class=\"muted\">other (load, save, validation)</td><td></td><td></td><td class=\"n\">{}</td><td></td></tr>",
                seconds(rest)
            );
        }
        h.push_str("</table>\n");
    }
    h.push_str("</section>\n");
}

// ---- validation ---------------------------------------------------------------------------

fn validation(h: &mut String, r: &Value) {
    h.push_str("<section id=\"validation\"><h2>Validation</h2>\n");
    let Some(v) = r.get("validation").filter(|v| v.is_object()) else {
        h.push_str("<p><span class=\"badge warn\">skipped</span> The output was not checked (<code>--no-validate</code>).</p></section>\n");
        return;
    };
    let runtime = str_at(v, &["runtime"]).unwrap_or("the runtime");
    let status = str_at(v, &["status"]).unwrap_or("unknown");
    let (class, label) = match status {
        "checked" => ("ok", "checked"),
        "mismatch" => ("bad", "MISMATCH"),
        "failed" => ("bad", "FAILED"),
        _ => ("warn", "NOT CHECKED"),
    };
    let _ = write!(
        h,
        "<p><span class=\"badge {class}\">{}</span> in {}",
        esc(label),
        esc(runtime)
    );
    if let Some(reason) = str_at(v, &["reason"]) {
        let _ = write!(h, ": {}", esc(reason));
    }
    h.push_str("</p>\n");
    let how = match str_at(v, &["method"]) {
        Some("simulation") => {
            "Original and output ran side by side on simulation graphs: quantized constants \
             dequantized ahead of time, so both run in float and differ only by the compression \
             (the rewrites are listed below)."
        }
        Some("direct") => "Original and output ran side by side in tract as they are.",
        _ => "",
    };
    if !how.is_empty() && status != "not_checked" {
        let _ = writeln!(h, "<p>{}</p>", esc(how));
    }
    let samples = f64_at(v, &["samples"]).unwrap_or(0.0);
    let inputs_desc = match str_at(v, &["input_source"]) {
        Some("user") => format!("{samples:.0} batch(es) of given inputs (--eval)"),
        Some("synthetic") => format!(
            "{samples:.0} synthetic batch(es), seed {}",
            v.get("seed").map(text).unwrap_or_default()
        ),
        _ => String::new(),
    };
    let ins = arr(v, "inputs");
    if !inputs_desc.is_empty() && status != "not_checked" {
        let shapes: Vec<String> = ins
            .iter()
            .map(|i| {
                format!(
                    "{} {}[{}]",
                    str_at(i, &["name"]).unwrap_or("?"),
                    str_at(i, &["elem_type_name"]).unwrap_or(""),
                    i.get("shape").map(text).unwrap_or_default()
                )
            })
            .collect();
        let _ = writeln!(
            h,
            "<p>Inputs: {}{}</p>",
            esc(&inputs_desc),
            if shapes.is_empty() {
                String::new()
            } else {
                format!(" — {}", esc(&shapes.join(", ")))
            }
        );
    }
    let outs = arr(v, "outputs");
    if !outs.is_empty() {
        h.push_str("<table><tr><th>output</th><th>shape</th><th class=\"n\">max |err|</th><th class=\"n\">mean |err|</th><th class=\"n\">cosine</th><th class=\"n\">SQNR</th><th class=\"n\">top-1 agree</th><th class=\"n\">accuracy</th></tr>");
        for o in outs {
            let num = |k: &str, f: &dyn Fn(f64) -> String| {
                f64_at(o, &[k]).map(f).unwrap_or_else(|| "—".into())
            };
            let identical = f64_at(o, &["max_abs_err"]) == Some(0.0);
            let sqnr = match f64_at(o, &["sqnr_db"]) {
                Some(d) => format!("{d:.1} dB"),
                // Non-finite values serialize as null; +inf SQNR means identical outputs.
                None if identical => "∞ (identical)".into(),
                None => "—".into(),
            };
            let acc = match (
                f64_at(o, &["accuracy_original"]),
                f64_at(o, &["accuracy_candidate"]),
            ) {
                (Some(a), Some(b)) => format!(
                    "{:.2}% → {:.2}% ({:+.2} pt)",
                    100.0 * a,
                    100.0 * b,
                    100.0 * (b - a)
                ),
                _ => "—".into(),
            };
            let _ = write!(
                h,
                "<tr><td class=\"code\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(str_at(o, &["name"]).unwrap_or("?")),
                esc(&o.get("shape").map(text).unwrap_or_default()),
                num("max_abs_err", &|x| format!("{x:.3e}")),
                num("mean_abs_err", &|x| format!("{x:.3e}")),
                num("cosine", &|x| format!("{x:.6}")),
                esc(&sqnr),
                num("top1_agreement", &|x| format!("{:.2}%", 100.0 * x)),
                esc(&acc),
            );
            if let Some(n) = f64_at(o, &["nonfinite_mismatches"]).filter(|n| *n > 0.0) {
                let _ = write!(
                    h,
                    "<tr><td></td><td colspan=\"7\"><span class=\"badge bad\">NON-FINITE</span> {n:.0} element(s) NaN/inf in one model and finite in the other: the output is wrong there (the figures above cover the remaining elements)</td></tr>"
                );
            }
        }
        h.push_str("</table>\n");
        h.push_str("<p class=\"muted\">Errors compare the output model against the original on the same inputs. SQNR = 10·log10(signal power / error power): higher is better, ~6 dB per bit. Top-1 agreement: rows whose argmax is the same in both.</p>\n");
    }
    list(h, "Simulation rewrites", arr(v, "rewrites"));
    list(h, "Notes", arr(v, "notes"));
    h.push_str("</section>\n");
}

fn list(h: &mut String, title: &str, items: &[Value]) {
    if items.is_empty() {
        return;
    }
    let _ = write!(h, "<h3>{}</h3><ul>", esc(title));
    for i in items {
        let _ = write!(h, "<li>{}</li>", esc(&text(i)));
    }
    h.push_str("</ul>\n");
}

// ---- per-pass plots -----------------------------------------------------------------------

fn pass_plots(h: &mut String, p: &Value) -> Result<()> {
    let name = str_at(p, &["name"]).unwrap_or("?");
    let Some(d) = p.get("details").filter(|d| d.is_object()) else {
        return Ok(());
    };
    let mut body = String::new();
    let mut title = "";
    if !arr(d, "weights").is_empty() || !arr(d, "activations").is_empty() {
        title = "Quantization";
        quantize_plots(&mut body, d)?;
    }
    if !arr(d, "pairs").is_empty() {
        title = "Cross-layer equalization";
        equalize_plots(&mut body, d)?;
    }
    if !arr(d, "groups").is_empty() {
        title = "Pruning";
        prune_plots(&mut body, d)?;
    }
    let sel = d.get("selection").unwrap_or(d);
    let layers = arr(sel, "layers");
    if layers.iter().any(|l| l.get("hessian_trace").is_some()) || !arr(sel, "pareto").is_empty() {
        title = "Mixed precision";
        mixed_plots(&mut body, sel)?;
    }
    if !body.is_empty() {
        let _ = write!(
            h,
            "<section id=\"pass-{}\"><h2>{} <span class=\"muted\">(pass {})</span></h2>\n{body}</section>\n",
            esc(name),
            esc(title),
            esc(name)
        );
    }
    Ok(())
}

fn quantize_plots(h: &mut String, d: &Value) -> Result<()> {
    let mut facts = Vec::new();
    if let Some(m) = str_at(d, &["method"]) {
        facts.push(format!("calibration {m}"));
    }
    if let Some(s) = str_at(d, &["activation_scheme"]) {
        facts.push(format!("activations {s}"));
    }
    if let Some(pc) = d.get("per_channel").and_then(Value::as_bool) {
        facts.push(
            if pc {
                "per-channel weights"
            } else {
                "per-tensor weights"
            }
            .into(),
        );
    }
    if let Some(c) = d.get("calibration").filter(|c| c.is_object()) {
        facts.push(format!(
            "calibrated on {} sample(s) from {}",
            c.get("samples").map(text).unwrap_or_default(),
            if c.get("synthetic").and_then(Value::as_bool) == Some(true) {
                "synthetic data".to_string()
            } else {
                c.get("source").map(text).unwrap_or_default()
            }
        ));
    }
    if !facts.is_empty() {
        let _ = writeln!(h, "<p>{}</p>", esc(&facts.join("; ")));
    }
    let weights = arr(d, "weights");
    if !weights.is_empty() {
        let rows: Vec<Row> = weights
            .iter()
            .map(|w| {
                let sqnr = f64_at(w, &["sqnr_db"]);
                Row {
                    label: layer_label(w),
                    segments: vec![Segment {
                        lo: 0.0,
                        hi: sqnr.unwrap_or(0.0),
                        color: if sqnr.unwrap_or(0.0) < 20.0 {
                            plots::RED
                        } else {
                            plots::BLUE
                        },
                        thickness: 12,
                    }],
                    marks: vec![],
                    value_text: Some(match sqnr {
                        Some(s) => format!("{s:.1} dB"),
                        None => "∞".into(),
                    }),
                }
            })
            .collect();
        h.push_str("<h3>Weight SQNR per layer</h3>\n");
        figure(
            h,
            &plots::hbars(&rows, "weight SQNR after int quantization (dB)", false, true)?,
            "One bar per quantized weight: signal-to-quantization-noise of the weights alone. Longer is better; each 6 dB is about one bit. Red bars (below 20 dB) lose noticeable precision.",
        );
    }
    let acts = arr(d, "activations");
    if !acts.is_empty() {
        let rows: Vec<Row> = acts
            .iter()
            .map(|a| {
                let range = arr(a, "range");
                let (lo, hi) = (
                    range.first().and_then(Value::as_f64).unwrap_or(0.0),
                    range.get(1).and_then(Value::as_f64).unwrap_or(0.0),
                );
                let mut marks = Vec::new();
                for k in ["observed_min", "observed_max"] {
                    if let Some(x) = f64_at(a, &[k]) {
                        marks.push(Mark {
                            x,
                            color: plots::GREY,
                        });
                    }
                }
                let shared = str_at(a, &["shared_with"]);
                Row {
                    label: str_at(a, &["tensor"]).unwrap_or("?").to_string(),
                    segments: vec![Segment {
                        lo,
                        hi,
                        color: if shared.is_some() {
                            plots::LIGHT_BLUE
                        } else {
                            plots::BLUE
                        },
                        thickness: 10,
                    }],
                    marks,
                    value_text: f64_at(a, &["scale"])
                        .map(|s| format!("scale {}", plots::compact(s))),
                }
            })
            .collect();
        h.push_str("<h3>Activation ranges</h3>\n");
        figure(
            h,
            &plots::hbars(&rows, "activation value", false, true)?,
            "One row per quantized activation tensor: the bar is the range the 8-bit grid covers after calibration, grey dots the observed minimum and maximum on the calibration data. Dots beyond the bar are clipped outliers; light bars share another tensor's scale.",
        );
    }
    Ok(())
}

/// `node` (falling back to `tensor`) for a per-layer row.
fn layer_label(w: &Value) -> String {
    str_at(w, &["node"])
        .or_else(|| str_at(w, &["tensor"]))
        .or_else(|| str_at(w, &["weight"]))
        .unwrap_or("?")
        .to_string()
}

fn equalize_plots(h: &mut String, d: &Value) -> Result<()> {
    let pairs = arr(d, "pairs");
    let rows: Vec<Row> = pairs
        .iter()
        .map(|p| {
            let before = f64_at(p, &["range_ratio_before"]).unwrap_or(f64::NAN);
            let after = f64_at(p, &["range_ratio_after"]).unwrap_or(f64::NAN);
            let l1 = str_at(p, &["l1"]).unwrap_or("?");
            let l2 = str_at(p, &["l2"]).unwrap_or("?");
            Row {
                label: format!("{} → {}", short_node(l1), short_node(l2)),
                segments: vec![Segment {
                    lo: after.min(before),
                    hi: after.max(before),
                    color: plots::LIGHT_GREY,
                    thickness: 3,
                }],
                marks: vec![
                    Mark {
                        x: before,
                        color: plots::GREY,
                    },
                    Mark {
                        x: after,
                        color: plots::BLUE,
                    },
                ],
                value_text: Some(format!(
                    "{} → {}",
                    plots::compact(before),
                    plots::compact(after)
                )),
            }
        })
        .collect();
    h.push_str("<h3>Channel range ratio per pair</h3>\n");
    legend(
        h,
        &[("before equalization", plots::GREY), ("after", plots::BLUE)],
    );
    figure(
        h,
        &plots::hbars(&rows, "channel range ratio (max over channels / min, log scale)", true, false)?,
        "One row per equalized layer pair (first → second layer): the spread of per-channel weight ranges, which per-tensor quantization must cover with one scale. Lower is better; 1 means all channels share the same range.",
    );
    // The SQNR effect, when recorded. A layer in two pairs (second of one, first of the
    // next) gets one row: its first "before" and its last "after".
    let mut per_layer: Vec<(String, f64, f64)> = Vec::new();
    for p in pairs {
        for key in ["l1", "l2"] {
            let b = f64_at(p, &["sqnr_db", &format!("{key}_before")]);
            let a = f64_at(p, &["sqnr_db", &format!("{key}_after")]);
            let (Some(b), Some(a)) = (b, a) else { continue };
            let layer = str_at(p, &[key]).unwrap_or("?").to_string();
            match per_layer.iter_mut().find(|(l, _, _)| *l == layer) {
                Some(row) => row.2 = a,
                None => per_layer.push((layer, b, a)),
            }
        }
    }
    let srows: Vec<Row> = per_layer
        .into_iter()
        .map(|(label, b, a)| Row {
            label,
            segments: vec![Segment {
                lo: a.min(b),
                hi: a.max(b),
                color: plots::LIGHT_GREY,
                thickness: 3,
            }],
            marks: vec![
                Mark {
                    x: b,
                    color: plots::GREY,
                },
                Mark {
                    x: a,
                    color: if a >= b { plots::GREEN } else { plots::RED },
                },
            ],
            value_text: Some(format!("{:+.1} dB", a - b)),
        })
        .collect();
    if !srows.is_empty() {
        h.push_str("<h3>Per-tensor int8 weight SQNR, before and after</h3>\n");
        figure(
            h,
            &plots::hbars(&srows, "int8 per-tensor weight SQNR (dB)", false, false)?,
            "Each equalized layer: grey dot before equalization, coloured dot after (green when it improved, red when it got worse). Higher is better.",
        );
    }
    let excluded = arr(d, "excluded");
    if !excluded.is_empty() {
        h.push_str(
            "<h3>Pairs not equalized</h3><table><tr><th>from</th><th>to</th><th>reason</th></tr>",
        );
        for e in excluded {
            let _ = write!(
                h,
                "<tr><td class=\"code\">{}</td><td class=\"code\">{}</td><td>{}</td></tr>",
                esc(str_at(e, &["from"]).unwrap_or("?")),
                esc(str_at(e, &["to"]).unwrap_or("?")),
                esc(&e.get("reason").map(text).unwrap_or_default())
            );
        }
        h.push_str("</table>\n");
    }
    Ok(())
}

/// The last two path components of an exporter-style node name (`features.4.0/Conv`).
fn short_node(s: &str) -> String {
    let parts: Vec<&str> = s.split('/').filter(|p| !p.is_empty()).collect();
    if parts.len() <= 2 {
        return s.to_string();
    }
    parts[parts.len() - 2..].join("/")
}

fn prune_plots(h: &mut String, d: &Value) -> Result<()> {
    let groups = arr(d, "groups");
    let rows: Vec<Row> = groups
        .iter()
        .map(|g| {
            let before = f64_at(g, &["channels_before"]).unwrap_or(0.0);
            let after = f64_at(g, &["channels_after"]).unwrap_or(before);
            let prunable = g.get("prunable").and_then(Value::as_bool).unwrap_or(true);
            // Members read `Conv '/a/b/Conv'`: label the group by its first member's node.
            let first = arr(g, "members")
                .first()
                .map(text)
                .unwrap_or_else(|| "?".into());
            let first = match (first.find('\''), first.rfind('\'')) {
                (Some(a), Some(b)) if b > a => short_node(&first[a + 1..b]),
                _ => first,
            };
            let kept = if prunable {
                plots::BLUE
            } else {
                plots::LIGHT_GREY
            };
            let mut segments = vec![Segment {
                lo: 0.0,
                hi: after,
                color: kept,
                thickness: 12,
            }];
            if before > after {
                segments.push(Segment {
                    lo: after,
                    hi: before,
                    color: plots::LIGHT_RED,
                    thickness: 12,
                });
            }
            Row {
                label: format!(
                    "g{}: {}",
                    g.get("group").map(text).unwrap_or_default(),
                    first
                ),
                segments,
                marks: vec![],
                value_text: Some(if before > 0.0 && before > after {
                    format!(
                        "{after:.0}/{before:.0} kept, {:.0}% removed",
                        100.0 * (before - after) / before
                    )
                } else if prunable {
                    format!("{before:.0} kept")
                } else {
                    "not prunable".into()
                }),
            }
        })
        .collect();
    let mut facts = Vec::new();
    if let (Some(a), Some(b)) = (f64_at(d, &["macs_before"]), f64_at(d, &["macs_after"])) {
        facts.push(format!(
            "MACs {} → {} (modeled)",
            human_count(a),
            human_count(b)
        ));
    }
    if let (Some(a), Some(b)) = (f64_at(d, &["params_before"]), f64_at(d, &["params_after"])) {
        facts.push(format!(
            "prunable parameters {} → {}",
            human_count(a),
            human_count(b)
        ));
    }
    if !facts.is_empty() {
        let _ = writeln!(h, "<p>{}</p>", esc(&facts.join("; ")));
    }
    h.push_str("<h3>Channels kept per group</h3>\n");
    legend(
        h,
        &[
            ("kept", plots::BLUE),
            ("removed", plots::LIGHT_RED),
            ("not prunable", plots::LIGHT_GREY),
        ],
    );
    figure(
        h,
        &plots::hbars(&rows, "channels", false, true)?,
        "One bar per dependency group (channels that must be removed together; labelled by its first member): blue channels kept, red removed. Grey groups cannot be pruned (e.g. they reach a graph output).",
    );
    let rec = arr(d, "reconstruction");
    if !rec.is_empty() {
        h.push_str("<h3>Reconstruction of consumers</h3><table><tr><th>node</th><th>method</th><th class=\"n\">rel. error</th><th class=\"n\">without reconstruction</th></tr>");
        for r in rec {
            let _ = write!(
                h,
                "<tr><td class=\"code\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(&r.get("node").map(text).unwrap_or_default()),
                esc(&r.get("method").map(text).unwrap_or_default()),
                esc(&r.get("rel_error").map(text).unwrap_or_default()),
                esc(&r.get("rel_error_plain").map(text).unwrap_or_default()),
            );
        }
        h.push_str("</table>\n");
    }
    let blocked: Vec<&Value> = groups
        .iter()
        .filter(|g| !arr(g, "unprunable_reasons").is_empty())
        .collect();
    if !blocked.is_empty() {
        h.push_str(
            "<h3>Groups not pruned</h3><table><tr><th>group</th><th>members</th><th>why</th></tr>",
        );
        for g in blocked {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"code\">{}</td><td>{}</td></tr>",
                esc(&g.get("group").map(text).unwrap_or_default()),
                esc(&arr(g, "members")
                    .iter()
                    .map(text)
                    .collect::<Vec<_>>()
                    .join("; ")),
                esc(&arr(g, "unprunable_reasons")
                    .iter()
                    .map(text)
                    .collect::<Vec<_>>()
                    .join("; ")),
            );
        }
        h.push_str("</table>\n");
    }
    Ok(())
}

/// Colour of a precision label (unknown labels get purple).
fn precision_color(p: &str) -> plots::Rgb {
    match p {
        "fp32" => plots::GREY,
        "fp16" => plots::GREEN,
        "int8" => plots::BLUE,
        "int4" => plots::ORANGE,
        _ => plots::PURPLE,
    }
}

fn mixed_plots(h: &mut String, sel: &Value) -> Result<()> {
    let mut facts = Vec::new();
    if let (Some(a), Some(b)) = (f64_at(sel, &["fp32_bytes"]), f64_at(sel, &["total_bytes"])) {
        facts.push(format!("weights {} → {}", human_bytes(a), human_bytes(b)));
    }
    if let Some(b) = f64_at(sel, &["avg_bits"]) {
        facts.push(format!("{b:.2} bits/weight on average"));
    }
    if let Some(b) = sel.get("budget").filter(|b| !b.is_null()) {
        let desc = match b.as_object() {
            Some(m) => m
                .iter()
                .map(|(k, v)| format!("{k} {}", text(v)))
                .collect::<Vec<_>>()
                .join(", "),
            None => text(b),
        };
        facts.push(format!("budget: {desc}"));
    }
    if let Some(s) = str_at(sel, &["selection"]) {
        facts.push(format!("selection: {s}"));
    }
    if let Some(j) = sel.get("joint").filter(|j| j.is_object()) {
        let at = |k: &str| f64_at(j, &[k]).map_or("?".to_string(), |v| format!("{v:.3e}"));
        facts.push(format!(
            "predicted loss increase (second order, cross-layer terms included) {}, vs {} for the exact ΣΩ knapsack's choice (HAWQ-v2)",
            at("predicted_loss"),
            at("omega_choice_loss")
        ));
    }
    if !facts.is_empty() {
        let _ = writeln!(h, "<p>{}</p>", esc(&facts.join("; ")));
    }
    let layers: Vec<&Value> = arr(sel, "layers")
        .iter()
        .filter(|l| f64_at(l, &["hessian_trace"]).is_some())
        .collect();
    if !layers.is_empty() {
        let mut seen: Vec<String> = Vec::new();
        let rows: Vec<Row> = layers
            .iter()
            .map(|l| {
                let t = f64_at(l, &["hessian_trace"]).unwrap_or(0.0);
                let p = str_at(l, &["precision"]).unwrap_or("?").to_string();
                if !seen.contains(&p) {
                    seen.push(p.clone());
                }
                Row {
                    label: layer_label(l),
                    segments: vec![Segment {
                        lo: 0.0, // clamped to the axis start on a log axis
                        hi: t,
                        color: precision_color(&p),
                        thickness: 12,
                    }],
                    marks: vec![],
                    value_text: Some(match f64_at(l, &["bytes"]) {
                        Some(b) => format!("{p}, {}", human_bytes(b)),
                        None => p,
                    }),
                }
            })
            .collect();
        h.push_str("<h3>Hessian trace per layer and chosen precision</h3>\n");
        let order = ["fp32", "fp16", "int8", "int4"];
        seen.sort_by_key(|p| order.iter().position(|o| o == p).unwrap_or(order.len()));
        let items: Vec<(&str, plots::Rgb)> = seen
            .iter()
            .map(|p| (p.as_str(), precision_color(p)))
            .collect();
        legend(h, &items);
        figure(
            h,
            &plots::hbars(&rows, "Hessian trace of the loss w.r.t. the layer's weights (log scale)", true, false)?,
            "One bar per layer: how sharply the loss reacts to noise in its weights (longer = more sensitive). Colour is the precision chosen; sensitive layers should keep more bits.",
        );
    }
    let pareto: Vec<(f64, f64)> = arr(sel, "pareto")
        .iter()
        .filter_map(|p| Some((f64_at(p, &["bytes"])?, f64_at(p, &["sum_omega"])?)))
        .collect();
    if !pareto.is_empty() {
        let chosen = match (f64_at(sel, &["total_bytes"]), f64_at(sel, &["sum_omega"])) {
            (Some(b), Some(o)) => Some((b, o)),
            _ => None,
        };
        let dropped = pareto.iter().filter(|p| p.1 <= 0.0).count();
        h.push_str("<h3>Pareto frontier: size vs sensitivity</h3>\n");
        figure(
            h,
            &plots::xy(
                &pareto,
                chosen,
                "weight bytes",
                "Σ Ω (predicted loss increase, log scale)",
                true,
            )?,
            &format!(
                "Each dot is the least-sensitive assignment of precisions at that size; the red dot is the one chosen under the budget. Down and left is better; the curve shows what extra bytes buy.{}",
                if dropped > 0 {
                    format!(" ({dropped} point(s) with Σ Ω = 0 cannot be shown on the log axis.)")
                } else {
                    String::new()
                }
            ),
        );
    }
    Ok(())
}

// ---- notes --------------------------------------------------------------------------------

fn notes(h: &mut String, r: &Value) {
    let passes = arr(r, "passes");
    let any = passes.iter().any(|p| !arr(p, "notes").is_empty());
    h.push_str("<section id=\"notes\"><h2>Pass notes</h2>\n");
    if !any {
        h.push_str("<p class=\"muted\">No pass left a note.</p></section>\n");
        return;
    }
    h.push_str("<table><tr><th style=\"width:16%\">pass</th><th>note</th></tr>");
    for p in passes {
        let name = str_at(p, &["name"]).unwrap_or("?");
        for n in arr(p, "notes") {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td></tr>",
                esc(name),
                esc(&text(n))
            );
        }
    }
    h.push_str("</table>\n</section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<script>a&\"b'</script>"),
            "&lt;script&gt;a&amp;&quot;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn short_node_keeps_last_two_components() {
        assert_eq!(
            short_node("/features/features.4/features.4.0/Conv"),
            "features.4.0/Conv"
        );
        assert_eq!(short_node("conv1"), "conv1");
    }

    #[test]
    fn empty_report_renders() {
        let page = render(&serde_json::json!({})).unwrap();
        assert!(page.contains("<h2>Summary</h2>"));
        assert!(!page.contains("<svg"));
    }
}
