//! The Quantization section (details with `weights` or `activations`): the calibration facts,
//! weight SQNR per layer, and per activation tensor the range the 8-bit grid covers against
//! the observed minimum and maximum (dots beyond the bar are clipped outliers).

use std::fmt::Write as _;

use anyhow::Result;
use serde_json::Value;

use super::helpers::{arr, esc, f64_at, figure, layer_label, str_at, text};
use crate::report::plots::{self, Mark, Row, Segment};

pub(super) fn quantize_plots(h: &mut String, d: &Value) -> Result<()> {
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
    if let Some(auto) = d.get("auto").filter(|a| a.is_object()) {
        auto_tables(h, auto);
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

/// What `--method auto` scored: each fixed method on every tensor, then each block's trials.
fn auto_tables(h: &mut String, auto: &Value) {
    let _ = writeln!(
        h,
        "<h3>Range choice (auto): output loss ({}) on {} calibration sample(s), {} assignments scored</h3>",
        esc(&arr(auto, "losses").iter().map(text).collect::<Vec<_>>().join(" + ")),
        auto.get("samples").map(text).unwrap_or_default(),
        auto.get("evaluations").map(text).unwrap_or_default()
    );
    h.push_str("<table><tr><th>every tensor with</th><th class=\"n\">loss</th></tr>");
    for u in arr(auto, "uniform") {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"n\">{:.4e}</td></tr>",
            esc(&u.get(0).map(text).unwrap_or_default()),
            u.get(1).and_then(Value::as_f64).unwrap_or(f64::NAN)
        );
    }
    let _ = write!(
        h,
        "<tr><td><b>chosen per block</b></td><td class=\"n\"><b>{:.4e}</b></td></tr></table>",
        f64_at(auto, &["loss"]).unwrap_or(f64::NAN)
    );
    let blocks = arr(auto, "blocks");
    if !blocks.is_empty() {
        h.push_str("<table><tr><th>block (first .. last tensor)</th><th class=\"n\">tensors</th><th>tried (loss)</th><th>chosen</th><th class=\"n\">gain</th></tr>");
        for b in blocks {
            let tried: Vec<String> = arr(b, "tried")
                .iter()
                .map(|t| {
                    format!(
                        "{} {:.3e}",
                        t.get(0).map(text).unwrap_or_default(),
                        t.get(1).and_then(Value::as_f64).unwrap_or(f64::NAN)
                    )
                })
                .collect();
            let _ = write!(
                h,
                "<tr><td>{} .. {}</td><td class=\"n\">{}</td><td>{}</td><td>{}</td><td class=\"n\">{:.1}%</td></tr>",
                esc(str_at(b, &["first"]).unwrap_or_default()),
                esc(str_at(b, &["last"]).unwrap_or_default()),
                b.get("tensors").map(text).unwrap_or_default(),
                esc(&tried.join(", ")),
                esc(str_at(b, &["chosen"]).unwrap_or_default()),
                100.0 * f64_at(b, &["gain"]).unwrap_or(0.0)
            );
        }
        h.push_str("</table>");
    }
}
