//! A deterministic, line-oriented description of dependency groups, one line per member
//! (producer, depthwise, consumer, param) and the channel-carrying values on one line; used by
//! snapshots and reports, so its format is stable.

use super::{label, Group, Member};
use crate::ir::Graph;
use std::fmt::Write;

/// A deterministic, line-oriented description of groups (for snapshots and reports).
pub fn describe_groups(graph: &Graph, groups: &[Group]) -> String {
    let mut s = String::new();
    for g in groups {
        let status = if g.prunable() {
            "prunable".to_string()
        } else {
            format!("unprunable: {}", g.unprunable.join("; "))
        };
        let _ = writeln!(s, "group {}: {} channels, {status}", g.id, g.channels);
        let mut values = Vec::new();
        for m in &g.members {
            match m {
                Member::Producer {
                    node,
                    weight,
                    axis,
                    bias,
                } => {
                    let _ = writeln!(
                        s,
                        "  producer  {} weight '{weight}' axis {axis}{}",
                        label(graph, *node),
                        bias.as_ref()
                            .map(|b| format!(", bias '{b}'"))
                            .unwrap_or_default()
                    );
                }
                Member::Depthwise {
                    node,
                    weight,
                    offset,
                    ..
                } => {
                    let _ = writeln!(
                        s,
                        "  depthwise {} weight '{weight}' at {offset}",
                        label(graph, *node)
                    );
                }
                Member::Consumer {
                    node,
                    weight,
                    axis,
                    offset,
                    block,
                    ..
                } => {
                    let blk = if *block > 1 {
                        format!(" x{block}")
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        s,
                        "  consumer  {} weight '{weight}' axis {axis} at {offset}{blk}",
                        label(graph, *node)
                    );
                }
                Member::Param {
                    node,
                    slot,
                    tensor,
                    axis,
                    offset,
                    ..
                } => {
                    let _ = writeln!(
                        s,
                        "  param     {} input {slot} '{tensor}' axis {axis} at {offset}",
                        label(graph, *node)
                    );
                }
                Member::Value { name, offset, .. } => values.push(if *offset > 0 {
                    format!("{name}@{offset}")
                } else {
                    name.clone()
                }),
            }
        }
        if !values.is_empty() {
            let _ = writeln!(s, "  values    {}", values.join(", "));
        }
    }
    s
}
