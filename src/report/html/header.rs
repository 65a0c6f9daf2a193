//! The page's header and Summary section: input → output paths, the tool and version, then one
//! card per fact the report has (file size and ratio, nodes, parameters, MACs, time per stage).
//! A fact missing from the report leaves its card out.

use std::fmt::Write as _;

use serde_json::Value;

use super::helpers::{arr, at, card, esc, f64_at, human_bytes, human_count, seconds, str_at, text};

pub(super) fn header(h: &mut String, r: &Value) {
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
