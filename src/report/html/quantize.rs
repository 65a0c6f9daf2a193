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
