//! The Pruning section (details with `groups`): per channel group, the channels kept and the
//! channels removed (groups that may not be pruned are grey), how well the consumers were
//! reconstructed, and the groups left alone with the reason. With `--prune auto`
//! (`size_plan`): the candidate plans at the size budget and the size frontier, predicted and
//! measured, with and without pruning, as tables and a plot.

use std::fmt::Write as _;

use anyhow::Result;
use serde_json::Value;

use super::helpers::{arr, esc, f64_at, figure, human_count, legend, short_node, text};
use crate::report::plots::{self, Row, Segment};

pub(super) fn prune_plots(h: &mut String, d: &Value) -> Result<()> {
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
    if let Some(sp) = d.get("size_plan").filter(|v| v.is_object()) {
        size_plan(h, sp)?;
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

fn cell(v: Option<f64>) -> String {
    v.map_or("-".to_string(), |v| format!("{v:.3e}"))
}

/// `--prune auto`: channels and bits under one budget.
fn size_plan(h: &mut String, sp: &Value) -> Result<()> {
    let budget = f64_at(sp, &["budget_bytes"]).unwrap_or(0.0);
    let fp32 = f64_at(sp, &["fp32_bytes"]).unwrap_or(0.0).max(1.0);
    let chosen = f64_at(sp, &["chosen_level"]);
    let _ = writeln!(
        h,
        "<h3>One size budget for channels and bits</h3><p>Budget {} weight bytes ({:.1}% of fp32). Each row prunes a share of the weights (allocated by predicted loss per weight) and gives the rest the precisions that minimize the predicted loss under the budget; predicted = pruning's second-order cost + the precisions' per-layer second-order loss; measured = the pruned model (reconstructed) with its weights rounded to those precisions, against the original on the calibration data. The emitted plan is the least measured loss.</p>",
        budget,
        100.0 * budget / fp32
    );
    h.push_str("<table><tr><th class=\"n\">weights pruned</th><th class=\"n\">channels</th><th class=\"n\">bytes</th><th class=\"n\">predicted (pruning)</th><th class=\"n\">predicted (precisions)</th><th class=\"n\">predicted</th><th class=\"n\">measured</th><th></th></tr>");
    for c in arr(sp, "candidates") {
        let level = f64_at(c, &["level"]).unwrap_or(0.0);
        let _ = write!(
            h,
            "<tr><td class=\"n\">{:.0}%</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            100.0 * level,
            c.get("channels_removed").map(text).unwrap_or_default(),
            f64_at(c, &["bytes"]).map_or("-".into(), |b| format!("{b:.0}")),
            cell(f64_at(c, &["predicted_prune"])),
            cell(f64_at(c, &["predicted_quant"])),
            cell(f64_at(c, &["predicted"])),
            cell(f64_at(c, &["measured"])),
            if Some(level) == chosen { "chosen" } else { "" }
        );
    }
    h.push_str("</table>\n<h4>Size frontier</h4><table><tr><th class=\"n\">weight bytes</th><th class=\"n\">% fp32</th><th class=\"n\">weights pruned</th><th class=\"n\">predicted</th><th class=\"n\">measured</th><th class=\"n\">precision only, predicted</th><th class=\"n\">precision only, measured</th></tr>");
    let frontier = arr(sp, "frontier");
    for p in frontier {
        let _ = write!(
            h,
            "<tr><td class=\"n\">{:.0}</td><td class=\"n\">{:.1}%</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            f64_at(p, &["bytes"]).unwrap_or(0.0),
            100.0 * f64_at(p, &["fraction"]).unwrap_or(0.0),
            f64_at(p, &["level"]).map_or("-".into(), |l| format!("{:.0}%", 100.0 * l)),
            cell(f64_at(p, &["predicted"])),
            cell(f64_at(p, &["measured"])),
            cell(f64_at(p, &["predicted_precision_only"])),
            cell(f64_at(p, &["measured_precision_only"])),
        );
    }
    h.push_str("</table>\n");
    let series = |key: &str| -> Vec<(f64, f64)> {
        frontier
            .iter()
            .filter_map(|p| Some((f64_at(p, &["bytes"])?, f64_at(p, &[key])?)))
            .collect()
    };
    let lines = [
        ("measured", plots::BLUE, false),
        ("predicted", plots::LIGHT_BLUE, true),
        ("measured_precision_only", plots::ORANGE, false),
        ("predicted_precision_only", plots::ORANGE, true),
    ];
    let chosen_point = frontier
        .iter()
        .find(|p| f64_at(p, &["bytes"]) == Some(budget))
        .and_then(|p| Some((budget, f64_at(p, &["measured"])?)));
    legend(
        h,
        &[
            ("pruning + precisions, measured", plots::BLUE),
            ("predicted (dots)", plots::LIGHT_BLUE),
            ("precisions only, measured (dots: predicted)", plots::ORANGE),
        ],
    );
    figure(
        h,
        &plots::xy_lines(
            &lines
                .iter()
                .map(|(k, c, dots)| plots::Series {
                    points: series(k),
                    color: *c,
                    dots_only: *dots,
                })
                .collect::<Vec<_>>(),
            chosen_point,
            "weight bytes",
            "output loss vs original (log scale)",
            true,
        )?,
        "At each size, the best plan with pruning allowed (blue) and with precisions only (orange); lines are measured on the calibration data, dots alone are the second-order predictions. The red dot is the emitted plan. Down and left is better.",
    );
    Ok(())
}
