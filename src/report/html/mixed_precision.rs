//! The Mixed precision section (details, or their `selection`, with per-layer
//! `hessian_trace` or a `pareto` front): the budget and selection facts, the Hessian trace per
//! layer coloured by the chosen precision, and the Pareto frontier of size against summed sensitivity ΣΩ with the chosen point.

use std::fmt::Write as _;

use anyhow::Result;
use serde_json::Value;

use super::helpers::{arr, esc, f64_at, figure, human_bytes, layer_label, legend, str_at, text};
use crate::report::plots::{self, Row, Segment};

/// Colour of a precision label (unknown labels get purple).
pub(super) fn precision_color(p: &str) -> plots::Rgb {
    match p {
        "fp32" => plots::GREY,
        "fp16" => plots::GREEN,
        "int8" => plots::BLUE,
        "int4" => plots::ORANGE,
        _ => plots::PURPLE,
    }
}

pub(super) fn mixed_plots(h: &mut String, sel: &Value) -> Result<()> {
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
