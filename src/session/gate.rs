//! The fidelity gate: bounds a compressed model must meet in the side-by-side validation, and
//! when it misses one, the quantized layers most responsible for the loss.
//!
//! Bounds (all optional): accuracy drop in percentage points (needs labels), SQNR of every
//! output in dB, top-1 agreement as a fraction. A bound the validation could not check
//! (validation not run, no labelled `[N, C]` output, ...) counts as missed: the gate never
//! passes on evidence it does not have.
//!
//! Blame, by quantizing one layer at a time: for each quantized layer (nodes that own a
//! quantized weight, lowest weight SQNR first, at most `max_layers`), the same pipeline is
//! re-run with only that layer quantized (`include_nodes = [exact name]`) and validated on the
//! same inputs. A layer's figure is the output SQNR (and accuracy drop) it causes alone; the
//! worst ones are named with the option that keeps them float. This costs one pipeline run
//! plus one validation per layer, hence the bound. A last run excludes the named layers
//! together and reports whether that would pass, so the advice is checked, not guessed.
//! Chosen over comparing intermediate activations because it needs no mapping between the
//! two graphs' tensor names (fusion renames them) and measures exactly what the advice does.
//!
//! Limits: only layers with a quantized constant weight are ranked (activation-only Q/DQ on
//! Add/Concat/pooling are not); interactions between layers are seen only in the final run.

use crate::ir::op::node_label;
use crate::ir::Model;
use crate::onnx::proto::ModelProto;
use crate::passes::{self, PassContext, PassRecord};
use crate::progress::Progress;
use crate::validate::{self, finite_or_null, Status, ValidateOptions, ValidationReport};
use anyhow::Result;
use serde::Serialize;

/// The bounds given on the command line.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Bounds {
    /// Largest accuracy drop allowed, in percentage points.
    pub max_drop_points: Option<f64>,
    /// Smallest SQNR allowed on every output, in dB.
    pub min_sqnr_db: Option<f64>,
    /// Smallest top-1 agreement allowed, as a fraction.
    pub min_agreement: Option<f64>,
}

impl Bounds {
    pub fn is_active(&self) -> bool {
        self.max_drop_points.is_some() || self.min_sqnr_db.is_some() || self.min_agreement.is_some()
    }
}

/// One missed bound.
#[derive(Debug, Clone, Serialize)]
pub struct Miss {
    /// The option: `--max-drop`, `--min-sqnr` or `--min-agreement`.
    pub bound: String,
    /// The output it concerns, when one.
    pub output: Option<String>,
    /// The required value (in the option's unit).
    pub required: f64,
    /// The measured value in the same unit; `None` when it could not be measured.
    pub actual: Option<f64>,
    /// One line for humans.
    pub message: String,
}

/// One quantized layer's share of the loss.
#[derive(Debug, Clone, Serialize)]
pub struct LayerBlame {
    pub node: String,
    pub op_type: String,
    /// Lowest output SQNR (dB) with only this layer quantized; `null` when identical.
    #[serde(serialize_with = "finite_or_null")]
    pub sqnr_db_alone: f64,
    /// Lowest top-1 agreement with only this layer quantized.
    pub agreement_alone: Option<f64>,
    /// Accuracy drop (points) with only this layer quantized (with labels).
    pub drop_points_alone: Option<f64>,
    /// Output values that become NaN/inf (where the original's are finite) with only this
    /// layer quantized.
    pub nonfinite_alone: usize,
    /// The option that keeps this layer float.
    pub advice: String,
}

/// What the gate found.
#[derive(Debug, Clone, Serialize)]
pub struct GateReport {
    pub passed: bool,
    pub bounds: Bounds,
    pub misses: Vec<Miss>,
    /// Worst layers first (only when the gate failed and something was quantized).
    pub blame: Vec<LayerBlame>,
    /// Layers measured out of the quantized ones.
    pub layers_measured: usize,
    pub layers_quantized: usize,
    /// The re-run with the named layers kept float: misses left (empty = it would pass).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub with_advice: Option<AdviceCheck>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
/// The smallest prefix of the ranking whose exclusion passes (or all of it, failing).
pub struct AdviceCheck {
    /// The options, as one would type them.
    pub options: String,
    /// The `--exclude-node` patterns themselves (unquoted).
    pub exclude_nodes: Vec<String>,
    pub passed: bool,
    pub misses: Vec<Miss>,
}

/// Checks the bounds against a validation (`None` = validation skipped).
pub fn check(bounds: &Bounds, validation: Option<&ValidationReport>) -> Vec<Miss> {
    let mut misses = Vec::new();
    let active = [
        ("--max-drop", bounds.max_drop_points),
        ("--min-sqnr", bounds.min_sqnr_db),
        ("--min-agreement", bounds.min_agreement),
    ];
    let unchecked = |misses: &mut Vec<Miss>, why: &str| {
        for (flag, v) in active {
            if let Some(v) = v {
                misses.push(Miss {
                    bound: flag.into(),
                    output: None,
                    required: v,
                    actual: None,
                    message: format!("{flag} {v} could not be checked: {why}"),
                });
            }
        }
    };
    let v = match validation {
        None => {
            unchecked(&mut misses, "validation was skipped (--no-validate)");
            return misses;
        }
        Some(v) if !v.status.ran() => {
            let status = match v.status {
                Status::Mismatch => "the models do not match",
                _ => "validation did not run",
            };
            let why = format!(
                "{status}: {}",
                v.reason.as_deref().unwrap_or("unknown reason")
            );
            unchecked(&mut misses, &why);
            return misses;
        }
        Some(v) => v,
    };
    // A value that is NaN/inf in the output where the original's is finite fails every bound,
    // whatever the metrics over the remaining elements say.
    for o in v.outputs.iter().filter(|o| o.nonfinite_mismatches > 0) {
        for (flag, bound) in active {
            if let Some(required) = bound {
                misses.push(Miss {
                    bound: flag.into(),
                    output: Some(o.name.clone()),
                    required,
                    actual: None,
                    message: format!(
                        "output '{}' has {} non-finite value(s) where the original's are finite (of {} elements): {flag} {required} fails",
                        o.name, o.nonfinite_mismatches, o.elements
                    ),
                });
            }
        }
    }
    if let Some(min) = bounds.min_sqnr_db {
        for o in &v.outputs {
            // +inf (identical) passes; NaN fails.
            if o.sqnr_db.is_nan() || o.sqnr_db < min {
                misses.push(Miss {
                    bound: "--min-sqnr".into(),
                    output: Some(o.name.clone()),
                    required: min,
                    actual: Some(o.sqnr_db),
                    message: format!(
                        "SQNR of '{}' is {:.1} dB, {:.1} dB below --min-sqnr {min}",
                        o.name,
                        o.sqnr_db,
                        min - o.sqnr_db
                    ),
                });
            }
        }
    }
    if let Some(min) = bounds.min_agreement {
        let with: Vec<_> = v
            .outputs
            .iter()
            .filter_map(|o| o.top1_agreement.map(|a| (o, a)))
            .collect();
        if with.is_empty() {
            misses.push(Miss {
                bound: "--min-agreement".into(),
                output: None,
                required: min,
                actual: None,
                message: format!(
                    "--min-agreement {min} could not be checked: no output is [N, C] with C > 1"
                ),
            });
        }
        for (o, a) in with {
            if a < min {
                misses.push(Miss {
                    bound: "--min-agreement".into(),
                    output: Some(o.name.clone()),
                    required: min,
                    actual: Some(a),
                    message: format!(
                        "top-1 agreement of '{}' is {:.4}, {:.4} below --min-agreement {min}",
                        o.name,
                        a,
                        min - a
                    ),
                });
            }
        }
    }
    if let Some(max) = bounds.max_drop_points {
        let with: Vec<_> = v
            .outputs
            .iter()
            .filter_map(|o| Some((o, o.accuracy_original?, o.accuracy_candidate?)))
            .collect();
        if with.is_empty() {
            misses.push(Miss {
                bound: "--max-drop".into(),
                output: None,
                required: max,
                actual: None,
                message: format!(
                    "--max-drop {max} could not be checked: no accuracy was measured (needs --eval, --eval-labels and an [N, C] output)"
                ),
            });
        }
        for (o, a, b) in with {
            let drop = 100.0 * (a - b);
            if drop > max {
                misses.push(Miss {
                    bound: "--max-drop".into(),
                    output: Some(o.name.clone()),
                    required: max,
                    actual: Some(drop),
                    message: format!(
                        "accuracy of '{}' dropped {drop:.2} points ({:.2}% -> {:.2}%), {:.2} over --max-drop {max}",
                        o.name,
                        100.0 * a,
                        100.0 * b,
                        drop - max
                    ),
                });
            }
        }
    }
    misses
}

/// `'text'` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A `--exclude-node` pattern matching exactly `name` among `all` node names: the name itself
/// when, read as the tool reads it (a full-match regex), it selects only that node; otherwise
/// the regex-escaped name.
pub fn exact_pattern(name: &str, all: &[String]) -> String {
    match regex::Regex::new(&format!("^(?:{name})$")) {
        Ok(re) if all.iter().filter(|n| re.is_match(n)).count() == 1 && re.is_match(name) => {
            name.to_string()
        }
        _ => regex::escape(name),
    }
}

/// Quantized layers of a run, as `(node, op_type)`, lowest weight SQNR first (the quantize
/// pass's weight reports).
pub fn quantized_layers(records: &[PassRecord], model: &Model) -> Vec<(String, String)> {
    let Some(q) = records.iter().find(|r| r.name == "quantize") else {
        return Vec::new();
    };
    let Some(weights) = q.details.get("weights").and_then(|w| w.as_array()) else {
        return Vec::new();
    };
    let mut rows: Vec<(f64, String)> = weights
        .iter()
        .filter_map(|w| {
            let node = w.get("node")?.as_str()?.to_string();
            let sqnr = w
                .get("sqnr_db")
                .and_then(|s| s.as_f64())
                .unwrap_or(f64::NAN);
            Some((sqnr, node))
        })
        .collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(String, String)> = Vec::new();
    for (_, node) in rows {
        if out.iter().any(|(n, _)| *n == node) {
            continue;
        }
        let op = model
            .graph
            .node_indices()
            .map(|ix| model.graph.node(ix))
            .find(|n| node_label(n) == node)
            .map(|n| n.op_type().to_string())
            .unwrap_or_default();
        out.push((node, op));
    }
    out
}

/// Everything [`blame`] needs to re-run the pipeline.
pub struct Rerun<'a> {
    /// The input model as loaded (before any pass).
    pub input: &'a Model,
    /// The compressed model (its node labels are what the reports name).
    pub output: &'a Model,
    pub original: &'a ModelProto,
    pub passes: &'a [&'a str],
    pub ctx: &'a PassContext,
    pub validate: &'a ValidateOptions,
}

impl Rerun<'_> {
    fn run(&self, ctx: &PassContext) -> Result<ValidationReport> {
        let mut m = self.input.clone();
        passes::run_passes(&mut m, self.passes, ctx)?;
        let proto = m.to_proto()?;
        validate::validate(self.original, &proto, self.validate)
    }
}

fn worst(v: &ValidationReport) -> (f64, Option<f64>, Option<f64>) {
    let sqnr = v
        .outputs
        .iter()
        .map(|o| o.sqnr_db)
        .fold(f64::INFINITY, f64::min);
    let agree = v
        .outputs
        .iter()
        .filter_map(|o| o.top1_agreement)
        .reduce(f64::min);
    let drop = v
        .outputs
        .iter()
        .filter_map(|o| Some(100.0 * (o.accuracy_original? - o.accuracy_candidate?)))
        .reduce(f64::max);
    (sqnr, agree, drop)
}

/// The gate: check, and when it fails, rank the quantized layers and check the advice.
/// `layers` come from [`quantized_layers`]; at most `max_layers` are measured and `top` named.
pub fn evaluate(
    bounds: &Bounds,
    validation: Option<&ValidationReport>,
    layers: &[(String, String)],
    rerun: &Rerun,
    max_layers: usize,
    top: usize,
) -> GateReport {
    let misses = check(bounds, validation);
    let mut report = GateReport {
        passed: misses.is_empty(),
        bounds: bounds.clone(),
        misses,
        blame: Vec::new(),
        layers_measured: 0,
        layers_quantized: layers.len(),
        with_advice: None,
        notes: Vec::new(),
    };
    let checked = validation.is_some_and(|v| v.status.ran());
    if report.passed || !checked {
        return report;
    }
    if layers.is_empty() {
        report
            .notes
            .push("no quantized layer to blame (per-layer blame covers quantized layers)".into());
        return report;
    }
    let mut all_nodes: Vec<String> = [rerun.input, rerun.output]
        .iter()
        .flat_map(|m| {
            m.graph
                .node_indices()
                .map(|ix| node_label(m.graph.node(ix)).to_string())
        })
        .collect();
    all_nodes.sort();
    all_nodes.dedup();
    let measured = &layers[..layers.len().min(max_layers)];
    if measured.len() < layers.len() {
        report.notes.push(format!(
            "measured {} of {} quantized layers (lowest weight SQNR first)",
            measured.len(),
            layers.len()
        ));
    }
    let progress = Progress::bar("blaming", measured.len() as u64);
    for (node, op) in measured {
        progress.inc(1);
        let mut ctx = rerun.ctx.clone();
        ctx.quantize.include_nodes = vec![regex::escape(node)];
        match rerun.run(&ctx) {
            Ok(v) if v.status.ran() => {
                let (sqnr, agree, drop) = worst(&v);
                report.blame.push(LayerBlame {
                    node: node.clone(),
                    op_type: op.clone(),
                    sqnr_db_alone: sqnr,
                    agreement_alone: agree,
                    drop_points_alone: drop,
                    nonfinite_alone: v.outputs.iter().map(|o| o.nonfinite_mismatches).sum(),
                    advice: format!(
                        "--exclude-node {}",
                        shell_quote(&exact_pattern(node, &all_nodes))
                    ),
                });
            }
            Ok(v) => report.notes.push(format!(
                "layer '{node}' alone: not checked ({})",
                v.reason.unwrap_or_default()
            )),
            Err(e) => report.notes.push(format!("layer '{node}' alone: {e:#}")),
        }
    }
    drop(progress);
    report.layers_measured = report.blame.len();
    // Worst first: more non-finite values, larger accuracy drop, then lower agreement, then
    // lower SQNR.
    report.blame.sort_by(|a, b| {
        let d = |x: &LayerBlame| x.drop_points_alone.unwrap_or(0.0);
        let g = |x: &LayerBlame| x.agreement_alone.unwrap_or(1.0);
        b.nonfinite_alone
            .cmp(&a.nonfinite_alone)
            .then(d(b).total_cmp(&d(a)))
            .then(g(a).total_cmp(&g(b)))
            .then(a.sqnr_db_alone.total_cmp(&b.sqnr_db_alone))
    });
    report.blame.truncate(top.max(1));
    // Check the advice: keep the worst 1, 2, ... named layers float together (everything else
    // as given) and stop at the first set that passes.
    let names: Vec<String> = report
        .blame
        .iter()
        .map(|b| exact_pattern(&b.node, &all_nodes))
        .collect();
    for k in 1..=names.len() {
        let mut ctx = rerun.ctx.clone();
        ctx.quantize
            .exclude_nodes
            .extend(names[..k].iter().cloned());
        let options = names[..k]
            .iter()
            .map(|n| format!("--exclude-node {}", shell_quote(n)))
            .collect::<Vec<_>>()
            .join(" ");
        match rerun.run(&ctx) {
            Ok(v) => {
                let misses = check(bounds, Some(&v));
                let passed = misses.is_empty();
                report.with_advice = Some(AdviceCheck {
                    options,
                    exclude_nodes: names[..k].to_vec(),
                    passed,
                    misses,
                });
                if passed {
                    break;
                }
            }
            Err(e) => {
                report
                    .notes
                    .push(format!("re-run with the advice failed: {e:#}"));
                break;
            }
        }
    }
    report
}

/// The one-line error for a failed gate.
pub fn error_line(r: &GateReport) -> String {
    let misses: Vec<&str> = r.misses.iter().map(|m| m.message.as_str()).collect();
    let mut line = format!("fidelity gate failed: {}", misses.join("; "));
    if let Some(a) = r.with_advice.as_ref().filter(|a| a.passed) {
        line += &format!("; it passes with {}", a.options);
    } else if !r.blame.is_empty() {
        let names: Vec<&str> = r.blame.iter().take(3).map(|b| b.node.as_str()).collect();
        line += &format!(" (worst layers: {})", names.join(", "));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_exact_patterns() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        let all = vec![
            "conv.1".to_string(),
            "convX1".to_string(),
            "/a/Conv".to_string(),
        ];
        assert_eq!(exact_pattern("/a/Conv", &all), "/a/Conv");
        assert_eq!(exact_pattern("conv.1", &all), r"conv\.1");
        assert_eq!(exact_pattern("x(", &all), r"x\(");
    }

    #[test]
    fn unchecked_bounds_fail() {
        let b = Bounds {
            min_sqnr_db: Some(30.0),
            ..Default::default()
        };
        let m = check(&b, None);
        assert_eq!(m.len(), 1);
        assert!(
            m[0].message.contains("could not be checked"),
            "{}",
            m[0].message
        );
        let nc = ValidationReport::not_checked("no tract".into());
        assert_eq!(check(&b, Some(&nc)).len(), 1);
    }
}
