//! Finding equalizable pairs: `L1 -> (activation / pass-through)* -> L2`, where every value in
//! between has exactly one reader and is not a graph output, and every op in between commutes
//! with a positive per-channel scale (`f(s·x) = s·f(x)` for `s > 0`, channel `i` stays channel
//! `i`).

use crate::ir::facts::{clip_bounds, const_scalar, const_tensor, static_shape};
use crate::ir::layer::Layer;
use crate::ir::op::Attrs;
use crate::ir::{Graph, InSlot};
use crate::onnx::tensor;
use petgraph::stable_graph::NodeIndex;

/// A pair found by [`walk`].
#[derive(Debug, Clone)]
pub struct Pair {
    pub l1: NodeIndex,
    pub l2: NodeIndex,
    /// Nodes between L1 and L2, in order.
    pub via: Vec<NodeIndex>,
    /// A ReLU (Relu or Clip(0, +inf)) sits between them: high-bias absorption may apply.
    pub relu: bool,
    /// Where a constant shift of L1's output would not pass exactly to L2 (zero padding in a
    /// pass-through or in L2): high-bias absorption is approximate at borders there.
    pub border_effects: Vec<String>,
}

/// What the walk from one layer's output found.
#[derive(Debug, Clone)]
pub enum Walk {
    Pair(Pair),
    /// Reached an op that stops equalization; `to` is the layer behind it, if one was found.
    Excluded {
        reason: String,
        to: Option<NodeIndex>,
    },
    /// Nothing to report (the output is a graph output, or unused).
    End,
}

fn fmt_bound(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.to_string()
    } else {
        format!("{v}")
    }
}

fn any_nonzero(v: &[i64]) -> bool {
    v.iter().any(|&p| p != 0)
}

/// What a node between two layers does to a per-channel positive scale.
enum Step {
    /// Commutes with the scale; `relu` marks a ReLU, `border` a zero-padding effect.
    Pass { relu: bool, border: Option<String> },
    /// Commutes with nothing useful; stop.
    Stop(String),
    /// Not positively homogeneous, but channel-preserving: stop, naming the next layer.
    NotHomogeneous(String),
}

fn step(graph: &Graph, ix: NodeIndex, prev: Option<NodeIndex>) -> Step {
    let n = graph.node(ix);
    let what = format!("{} '{}'", n.op_type(), n.name());
    if !crate::ir::op::is_standard_domain(n.domain()) {
        return Step::Stop(format!("{what} is a custom-domain op"));
    }
    let extra_outputs_used = n
        .output
        .iter()
        .skip(1)
        .any(|o| !o.is_empty() && graph.use_count(o) > 0);
    if extra_outputs_used {
        return Step::Stop(format!("{what} has a second output in use"));
    }
    match n.op_type() {
        "Relu" => Step::Pass {
            relu: true,
            border: None,
        },
        // LeakyRelu(s·x) = s·LeakyRelu(x) and PRelu(s·x, a) = s·PRelu(x, a) for s > 0, for any
        // slope a: both are linear on each half-line.
        "LeakyRelu" | "Identity" | "Dropout" | "GlobalMaxPool" | "GlobalAveragePool" => {
            Step::Pass {
                relu: false,
                border: None,
            }
        }
        "PRelu" => Step::Pass {
            relu: false,
            border: None,
        },
        "MaxPool" | "AveragePool" => {
            let pads = n.attr_ints("pads").ok().flatten().unwrap_or_default();
            let auto = n.attr_string("auto_pad").ok().flatten().unwrap_or_default();
            let padded = any_nonzero(&pads) || auto.starts_with("SAME");
            let counts_pad = n.op_type() == "AveragePool"
                && n.attr_int("count_include_pad").ok().flatten().unwrap_or(0) != 0;
            let border = (padded && counts_pad).then(|| format!("{what} averages zero padding"));
            Step::Pass {
                relu: false,
                border,
            }
        }
        "Pad" => {
            let mode = n
                .attr_string("mode")
                .ok()
                .flatten()
                .unwrap_or_else(|| "constant".into());
            if mode != "constant" {
                return Step::Stop(format!("{what} pads in mode '{mode}'"));
            }
            let value = match n.input.get(2).filter(|s| !s.is_empty()) {
                Some(v) => const_scalar(graph, v),
                None => Some(f64::from(
                    n.attr_float("value").ok().flatten().unwrap_or(0.0),
                )),
            };
            if value != Some(0.0) {
                return Step::Stop(format!("{what} pads with a non-zero or unknown value"));
            }
            let pads: Option<Vec<i64>> = match n.input.get(1).filter(|s| !s.is_empty()) {
                Some(p) => const_tensor(graph, p).and_then(|t| tensor::to_i64(t).ok()),
                None => n.attr_ints("pads").ok().flatten(),
            };
            let has_axes = n.input.get(3).is_some_and(|s| !s.is_empty());
            match pads {
                Some(p) if !has_axes && p.len() >= 4 && p.len() % 2 == 0 => {
                    let r = p.len() / 2;
                    if p[0] != 0 || p[1] != 0 || p[r] != 0 || p[r + 1] != 0 {
                        Step::Stop(format!("{what} pads the batch or channel axis"))
                    } else {
                        Step::Pass {
                            relu: false,
                            border: Some(format!("{what} adds zero borders")),
                        }
                    }
                }
                _ => Step::Stop(format!("{what} has non-constant pads or explicit axes")),
            }
        }
        "Flatten" => {
            let axis = n.attr_int("axis").ok().flatten().unwrap_or(1);
            let after_global = prev.is_some_and(|p| {
                matches!(
                    graph.node(p).op_type(),
                    "GlobalAveragePool" | "GlobalMaxPool"
                )
            });
            let spatial_one = static_shape(graph, &n.input[0])
                .is_some_and(|s| s.len() >= 2 && s[2..].iter().all(|d| *d == Some(1)));
            if axis == 1 && (after_global || spatial_one) {
                Step::Pass {
                    relu: false,
                    border: None,
                }
            } else {
                Step::Stop(format!("{what} mixes channels with spatial positions"))
            }
        }
        "Clip" => match clip_bounds(graph, graph.node(ix)) {
            Some((lo, hi)) if lo == 0.0 && hi == f64::INFINITY => Step::Pass {
                relu: true,
                border: None,
            },
            Some((lo, hi)) if lo == f64::NEG_INFINITY && hi == f64::INFINITY => Step::Pass {
                relu: false,
                border: None,
            },
            Some((lo, hi)) => Step::NotHomogeneous(format!(
                "Clip({},{}) is not positively homogeneous",
                fmt_bound(lo),
                fmt_bound(hi)
            )),
            None => Step::NotHomogeneous("Clip with non-constant bounds".into()),
        },
        "Add" | "Sub" | "Mul" | "Div" | "Sum" | "Concat" | "Split" | "Max" | "Min" | "Mean" => {
            Step::Stop(format!(
                "{what} couples channels or branches (residual / concat / elementwise)"
            ))
        }
        _ => Step::Stop(format!(
            "{what} is not known to commute with per-channel scaling"
        )),
    }
}

/// Follow `l1`'s output to the next weighted layer.
pub fn walk(graph: &Graph, l1: NodeIndex) -> Walk {
    let mut value = match graph.node(l1).output.first() {
        Some(v) if !v.is_empty() => v.clone(),
        _ => return Walk::End,
    };
    let mut via: Vec<NodeIndex> = Vec::new();
    let mut relu = false;
    let mut border_effects = Vec::new();
    let mut blocked: Option<String> = None;
    loop {
        if graph.is_graph_output(&value) {
            return match blocked {
                Some(reason) => Walk::Excluded { reason, to: None },
                None if via.is_empty() => Walk::End,
                None => Walk::Excluded {
                    reason: format!("'{value}' is a graph output"),
                    to: None,
                },
            };
        }
        let readers = graph.consumers(&value);
        let (next, slot) = match readers {
            [] => return Walk::End,
            [one] => *one,
            many => {
                let reason = blocked
                    .unwrap_or_else(|| format!("'{value}' has {} readers (branches)", many.len()));
                return Walk::Excluded { reason, to: None };
            }
        };
        if Layer::of(graph, next).is_some() {
            if slot != InSlot::Arg(0) {
                return Walk::Excluded {
                    reason: format!(
                        "'{value}' is not the data input of '{}'",
                        graph.node(next).name()
                    ),
                    to: None,
                };
            }
            if let Some(reason) = blocked {
                return Walk::Excluded {
                    reason,
                    to: Some(next),
                };
            }
            let pads = graph
                .node(next)
                .attr_ints("pads")
                .ok()
                .flatten()
                .unwrap_or_default();
            let auto = graph
                .node(next)
                .attr_string("auto_pad")
                .ok()
                .flatten()
                .unwrap_or_default();
            let is_conv = matches!(graph.node(next).op_type(), "Conv" | "ConvTranspose");
            if is_conv && (any_nonzero(&pads) || auto.starts_with("SAME")) {
                border_effects.push(format!("'{}' zero-pads its input", graph.node(next).name()));
            }
            return Walk::Pair(Pair {
                l1,
                l2: next,
                via,
                relu,
                border_effects,
            });
        }
        if slot != InSlot::Arg(0) {
            let reason = blocked.unwrap_or_else(|| match step(graph, next, via.last().copied()) {
                Step::Stop(r) => r,
                _ => {
                    let n = graph.node(next);
                    format!("'{value}' is not input 0 of {} '{}'", n.op_type(), n.name())
                }
            });
            return Walk::Excluded { reason, to: None };
        }
        match step(graph, next, via.last().copied()) {
            Step::Pass { relu: r, border } => {
                relu |= r;
                border_effects.extend(border);
            }
            Step::Stop(reason) => {
                return Walk::Excluded {
                    reason: blocked.unwrap_or(reason),
                    to: None,
                };
            }
            Step::NotHomogeneous(reason) => {
                if blocked.is_none() {
                    blocked = Some(reason);
                }
            }
        }
        via.push(next);
        value = match graph.node(next).output.first() {
            Some(v) if !v.is_empty() => v.clone(),
            _ => return Walk::End,
        };
    }
}
