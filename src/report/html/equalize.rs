//! The Cross-layer equalization section (details with `pairs`): per equalized pair
//! `l1 → l2`, the ratio of the channel ranges before and after scaling (1 is perfectly
//! balanced), the per-tensor int8 weight SQNR before and after, and the pairs left alone with
//! the reason.

use std::fmt::Write as _;

use anyhow::Result;
use serde_json::Value;

use super::helpers::{arr, esc, f64_at, figure, legend, short_node, str_at, text};
use crate::report::plots::{self, Mark, Row, Segment};

pub(super) fn equalize_plots(h: &mut String, d: &Value) -> Result<()> {
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
