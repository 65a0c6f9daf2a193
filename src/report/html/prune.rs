//! The Pruning section (details with `groups`): per channel group, the channels kept and the
//! channels removed (groups that may not be pruned are grey), how well the consumers were
//! reconstructed, and the groups left alone with the reason.

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
