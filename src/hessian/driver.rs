//! The sensitivity driver: one run of the full model over the calibration batches gives every
//! layer's boundary values and reference outputs; then per layer (in parallel under
//! `parallel`) its sub-model is planned once, Hutchinson probes feed `w0 ± εv`
//! (`ε = rel_eps · ‖w0‖ / √n`) and turn the forward difference
//! `2 L(w0 + εv) / ε²` into `vᵀGv`, and the candidate weights' responses are
//! recorded. The probe directions are seeded from `seed` and the weight name, so
//! results do not depend on layer order or thread count.

use super::loss::{hutchinson, loss_sum};
use super::response::{response, response_dim, rows, ResponseLayout};
use super::submodel::{kl_outputs, sub_model, SubModel};
use super::{layers, Candidates, HessianOptions, LayerSensitivity};
use crate::ir::layer::Layer;
use crate::ir::Model;
use crate::runtime::{infer_value_shapes, Feed, Runner};
use anyhow::{bail, ensure, Context, Result};
use ndarray::ArrayD;
use rayon::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

fn fnv(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325 ^ seed.wrapping_mul(0x9e3779b97f4a7c15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Per-layer Hessian traces of the label-free loss (see the module docs). `calib` holds batches,
/// each one array per model input (graph input order, initializer-backed inputs excluded).
pub fn sensitivity(
    model: &Model,
    calib: &[Vec<Feed>],
    opts: &HessianOptions,
) -> Result<Vec<LayerSensitivity>> {
    sensitivity_with(model, calib, opts, &|_, _| Vec::new())
}

/// [`sensitivity`], plus each layer's whitened output responses to the weights `candidates`
/// returns for it (in that order; see the module docs).
pub fn sensitivity_with(
    model: &Model,
    calib: &[Vec<Feed>],
    opts: &HessianOptions,
    candidates: &Candidates,
) -> Result<Vec<LayerSensitivity>> {
    ensure!(!calib.is_empty(), "no calibration batches given");
    let layers = layers(&model.graph)?;
    if layers.is_empty() {
        return Ok(vec![]);
    }
    let proto = model.to_proto()?;
    let input_names: Vec<String> = model
        .graph
        .inputs
        .iter()
        .filter(|v| !model.graph.initializers.contains_key(v.name()))
        .map(|v| v.name().to_string())
        .collect();
    ensure!(
        calib.iter().all(|b| b.len() == input_names.len()),
        "each calibration batch must hold {} array(s), one per model input ({})",
        input_names.len(),
        input_names.join(", ")
    );
    let shapes0: Vec<(String, Vec<usize>)> = input_names
        .iter()
        .cloned()
        .zip(calib[0].iter().map(|a| a.shape().to_vec()))
        .collect();
    let elem_types: HashMap<String, i32> = infer_value_shapes(&proto, &shapes0)
        .context("inferring value types")?
        .into_iter()
        .filter_map(|v| v.elem_type.map(|t| (v.name, t as i32)))
        .collect();

    // Pass 1: the full model once per batch, exposing every layer's upstream values.
    let probe = Runner::new(&proto, &shapes0, &[]).context("loading the model in tract")?;
    let first_out = probe.run(&calib[0]).context("running the model")?;
    let out_shapes: Vec<Vec<usize>> = first_out.iter().map(|a| a.shape().to_vec()).collect();
    let kl = kl_outputs(model, opts.loss, &out_shapes);
    let mut subs = Vec::new();
    for l in &layers {
        let name = model.graph.node(l.node).name().to_string();
        subs.push(
            sub_model(model, l, &elem_types, &kl)
                .with_context(|| format!("building the downstream model of layer '{name}'"))?,
        );
    }
    let extra: Vec<String> = subs
        .iter()
        .flatten()
        .flat_map(|s| s.boundary.iter())
        .filter(|b| !input_names.contains(b))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut values: Vec<HashMap<String, Feed>> = Vec::new();
    let mut runners: Vec<(Vec<Vec<usize>>, Runner)> = Vec::new();
    for (b, batch) in calib.iter().enumerate() {
        let key: Vec<Vec<usize>> = batch.iter().map(|a| a.shape().to_vec()).collect();
        if !runners.iter().any(|(k, _)| *k == key) {
            let shapes: Vec<(String, Vec<usize>)> = input_names
                .iter()
                .cloned()
                .zip(key.iter().cloned())
                .collect();
            let r = Runner::new(&proto, &shapes, &extra)
                .context("loading the model in tract with layer inputs exposed")?;
            runners.push((key.clone(), r));
        }
        let runner = &runners.iter().find(|(k, _)| *k == key).expect("inserted").1;
        let out = runner
            .run(batch)
            .with_context(|| format!("running calibration batch {b}"))?;
        let mut map: HashMap<String, Feed> = input_names
            .iter()
            .cloned()
            .zip(batch.iter().cloned())
            .collect();
        for (name, v) in runner.output_names().iter().zip(out) {
            map.entry(name.clone()).or_insert(Feed::F32(v));
        }
        values.push(map);
    }
    drop(runners);
    let layout = ResponseLayout::new(
        &values
            .iter()
            .map(|v| {
                model
                    .graph
                    .outputs
                    .iter()
                    .map(|o| {
                        v.get(o.name())
                            .and_then(Feed::as_f32)
                            .context("a graph output was not computed as float")
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?,
        response_dim(layers.len()),
    );

    let run_layer = |(l, sub): (&Layer, &Option<SubModel>)| -> Result<LayerSensitivity> {
        let start = Instant::now();
        let node = model.graph.node(l.node);
        let w0 = l.weight_f32(&model.graph)?;
        let n = w0.len();
        let mut result = LayerSensitivity {
            node: node.name().to_string(),
            op_type: node.op_type().to_string(),
            weight: l.weight.clone(),
            weight_shape: l.weight_shape.clone(),
            out_axis: l.out_axis(),
            in_axis: l.in_axis(),
            params: n,
            hessian_trace: 0.0,
            hessian_trace_stderr: 0.0,
            trace_per_param: 0.0,
            samples: 0,
            eps: 0.0,
            seconds: 0.0,
            responses: Vec::new(),
        };
        let wanted = candidates(l, &w0);
        let Some(sub) = sub else {
            // No graph output depends on this weight: every change has zero response.
            result.responses = vec![Vec::new(); wanted.len()];
            return Ok(result);
        };
        let rms = (w0.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n.max(1) as f64).sqrt();
        let eps = opts.rel_eps * if rms > 0.0 { rms } else { 1.0 };
        // One runner per distinct set of input shapes.
        let mut runners: Vec<(Vec<Vec<usize>>, Runner)> = Vec::new();
        let mut feeds: Vec<(usize, Vec<Feed>)> = Vec::new();
        for vals in &values {
            let mut feed = Vec::with_capacity(sub.boundary.len() + 1);
            for b in &sub.boundary {
                feed.push(
                    vals.get(b)
                        .with_context(|| format!("value '{b}' was not computed"))?
                        .clone(),
                );
            }
            feed.push(Feed::F32(w0.clone()));
            let key: Vec<Vec<usize>> = feed.iter().map(|a| a.shape().to_vec()).collect();
            let pos = match runners.iter().position(|(k, _)| *k == key) {
                Some(p) => p,
                None => {
                    let mut names: Vec<String> = sub.boundary.clone();
                    names.push(l.weight.clone());
                    let shapes: Vec<(String, Vec<usize>)> =
                        names.into_iter().zip(key.iter().cloned()).collect();
                    runners.push((key, Runner::new(&sub.proto, &shapes, &[])?));
                    runners.len() - 1
                }
            };
            feeds.push((pos, feed));
        }
        let mut refs = Vec::new();
        let mut total_rows = 0usize;
        for (pos, feed) in &feeds {
            let out = runners[*pos].1.run(feed)?;
            total_rows += rows(&out[0]);
            refs.push(out);
        }
        let loss_at = |w: ArrayD<f32>, feeds: &mut Vec<(usize, Vec<Feed>)>| -> Result<f64> {
            let mut total = 0f64;
            for ((pos, feed), r) in feeds.iter_mut().zip(&refs) {
                *feed.last_mut().expect("weight input") = Feed::F32(w.clone());
                let out = runners[*pos].1.run(feed)?;
                for (k, (a, b)) in r.iter().zip(&out).enumerate() {
                    total += loss_sum(a, b, sub.kl[k]);
                }
            }
            Ok(total / total_rows as f64)
        };
        for w in wanted {
            ensure!(
                w.shape() == w0.shape(),
                "candidate weight shape {:?} differs from {:?}",
                w.shape(),
                w0.shape()
            );
            let mut outs = Vec::with_capacity(feeds.len());
            for (pos, feed) in feeds.iter_mut() {
                *feed.last_mut().expect("weight input") = Feed::F32(w.clone());
                outs.push(runners[*pos].1.run(feed)?);
            }
            result.responses.push(response(&layout, sub, &refs, &outs));
        }
        let w0_flat: Vec<f32> = w0.iter().copied().collect();
        let shape = w0.shape().to_vec();
        let est = hutchinson(n, fnv(opts.seed, &l.weight), opts, |v| {
            let step = |sign: f32| -> Result<ArrayD<f32>> {
                let w: Vec<f32> = w0_flat
                    .iter()
                    .zip(v)
                    .map(|(&w, &d)| w + sign * eps as f32 * d)
                    .collect();
                Ok(ArrayD::from_shape_vec(shape.clone(), w)?)
            };
            // L(w0) = 0 and ∇L(w0) = 0: one run per probe (see the module docs).
            let plus = loss_at(step(1.0)?, &mut feeds)?;
            Ok(2.0 * plus / (eps * eps))
        })
        .with_context(|| format!("Hutchinson estimate for weight '{}'", l.weight))?;
        result.hessian_trace = est.mean;
        result.hessian_trace_stderr = est.stderr;
        result.trace_per_param = est.mean / n.max(1) as f64;
        result.samples = est.samples;
        result.eps = eps;
        result.seconds = start.elapsed().as_secs_f64();
        Ok(result)
    };
    let pairs: Vec<(&Layer, &Option<SubModel>)> = layers.iter().zip(&subs).collect();
    let results: Vec<Result<LayerSensitivity>> = if opts.parallel {
        pairs.into_par_iter().map(run_layer).collect()
    } else {
        pairs.into_iter().map(run_layer).collect()
    };
    let mut out = Vec::new();
    for (r, l) in results.into_iter().zip(&layers) {
        let name = model.graph.node(l.node).name().to_string();
        out.push(r.with_context(|| format!("layer '{name}' (weight '{}')", l.weight))?);
    }
    if out.iter().all(|s| s.samples == 0) {
        bail!("no weighted layer feeds a graph output");
    }
    Ok(out)
}
