//! The terminal table of a `mixed-precision` selection: one line per layer with its parameter
//! count, Hessian trace (± relative standard error), `Ω` per precision, with the joint
//! selection the per-layer second-order loss `ΔL` per precision, then the choice and its bytes;
//! the joint model's predicted loss of the choice vs the knapsack choices; optionally the
//! size-vs-sensitivity frontier. Layer names longer than 40 characters keep their tail.

use super::{MixedPrecisionReport, Precision};
use std::collections::BTreeMap;

/// The per-layer table of a selection, for the terminal: params, trace (± standard error), `Ω`
/// per precision, with the joint selection the per-layer second-order loss `ΔL` per precision,
/// then the choice and its bytes; with `frontier`, the size-vs-sensitivity frontier after it.
pub fn table(report: &MixedPrecisionReport, frontier: bool) -> Vec<String> {
    let precisions: Vec<Precision> = Precision::ALL
        .into_iter()
        .rev()
        .filter(|&p| p != Precision::Fp32 && report.layers.iter().any(|l| l.omega.contains_key(&p)))
        .collect();
    let joint = report.joint.is_some();
    let width = report
        .layers
        .iter()
        .map(|l| l.node.chars().count())
        .max()
        .unwrap_or(5)
        .clamp(5, 40);
    let short = |name: &str| -> String {
        let n = name.chars().count();
        if n <= width {
            name.to_string()
        } else {
            let tail: String = name.chars().skip(n - (width - 1)).collect();
            format!("…{tail}")
        }
    };
    let mut head = format!(
        "{:<width$} {:>8} {:>9} {:>4}",
        "layer", "params", "Tr(H)", "±%"
    );
    for p in &precisions {
        head += &format!(" {:>9}", format!("Ω {}", p.label()));
    }
    if joint {
        for p in &precisions {
            head += &format!(" {:>9}", format!("ΔL {}", p.label()));
        }
    }
    head += &format!(" {:>6} {:>9}", "chosen", "bytes");
    let mut lines = vec![head];
    let cell = |m: &BTreeMap<Precision, f64>, p: &Precision| match m.get(p) {
        Some(v) => format!(" {v:>9.2e}"),
        None => format!(" {:>9}", "-"),
    };
    for l in &report.layers {
        let rel = if l.hessian_trace != 0.0 {
            format!(
                "{:.0}",
                100.0 * l.hessian_trace_stderr / l.hessian_trace.abs()
            )
        } else {
            "-".into()
        };
        let mut line = format!(
            "{:<width$} {:>8} {:>9.2e} {:>4}",
            short(&l.node),
            l.params,
            l.hessian_trace,
            rel
        );
        for p in &precisions {
            line += &cell(&l.omega, p);
        }
        if joint {
            for p in &precisions {
                line += &cell(&l.loss, p);
            }
        }
        line += &format!(" {:>6} {:>9}", l.precision.label(), l.bytes);
        lines.push(line);
    }
    if let Some(j) = &report.joint {
        lines.push(format!(
            "predicted loss increase (second order, cross-layer terms included): chosen {:.3e}; exact ΣΩ knapsack (HAWQ-v2) {:.3e}; exact knapsack on the per-layer ΔL {:.3e}",
            j.predicted_loss, j.omega_choice_loss, j.per_layer_choice_loss
        ));
    }
    if frontier {
        lines.push(format!(
            "size-vs-sensitivity frontier ({} points; weight bytes of the selected layers, fp32 {}):",
            report.pareto.len(),
            report.fp32_bytes
        ));
        lines.push(format!(
            "{:>12} {:>7} {:>10} {:>15}",
            "bytes", "% fp32", "min ΣΩ", "predicted loss"
        ));
        for p in &report.pareto {
            lines.push(format!(
                "{:>12} {:>6.1}% {:>10.3e} {:>15}",
                p.bytes,
                100.0 * p.bytes as f64 / report.fp32_bytes.max(1) as f64,
                p.sum_omega,
                p.predicted_loss
                    .map_or("-".to_string(), |v| format!("{v:.3e}"))
            ));
        }
    }
    lines
}
