//! The command line: a thin layer over the library.

use crate::calibrate::{CalibrationSet, DataOptions};
use crate::ir::Model;
use crate::onnx::{load, save};
use crate::passes::mixed_precision::{Budget, MixedPrecisionOptions};
use crate::passes::quantize::QuantizeOptions;
use crate::passes::{self, PassContext, PassRecord};
use crate::report::gate::{self, GateReport};
use crate::report::stats::{self, ModelStats, ValueSummary};
use crate::validate::{self, ValidateOptions, ValidationReport};
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const AFTER_HELP: &str = "\
Examples:
  onnx-compress model.onnx -o model_int8.onnx
  onnx-compress model.onnx -o same.onnx --passes none        # lossless round trip, validated
  onnx-compress inspect model.onnx

Every output is written atomically (never a partial file) and, unless --no-validate, run side
by side with the original in tract; the summary says what was checked and how.";

#[derive(Debug, Parser)]
#[command(
    name = "onnx-compress",
    version,
    about = "Make trained ONNX models small and fast without retraining, and prove the result in tract.",
    after_help = AFTER_HELP,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub compress: CompressArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a model's inputs, outputs, op histogram, parameters, bytes by type and MACs.
    Inspect(InspectArgs),
    /// Recipes: print every option of the main command with its default, as TOML.
    Config(ConfigArgs),
    /// Estimate each layer's Hessian trace (Hutchinson) on calibration data, without changing
    /// the model: which layers are sensitive to quantization.
    Sensitivity(SensitivityArgs),
}

#[derive(Debug, Args)]
pub struct SensitivityArgs {
    /// The ONNX model (BatchNormalization is folded first, as in the main pipeline).
    pub model: PathBuf,
    /// Calibration data (same formats as the main command's --calib); default: synthetic.
    #[arg(long, value_name = "PATH")]
    pub calib: Option<PathBuf>,
    /// Use at most N calibration samples.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub calib_samples: usize,
    #[command(flatten)]
    pub image: crate::calibrate::image::ImageArgs,
    /// Most Hutchinson probes per layer.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub hessian_samples: usize,
    /// Output comparison for the traces: auto (KL for classifier logits, MSE otherwise), kl, mse.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kl", "mse"])]
    pub hessian_loss: String,
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Print a recipe with every option at its default.
    #[arg(long, required = true)]
    pub print_default: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The ONNX model to describe.
    pub model: PathBuf,
    /// Fix symbolic input dims for shape-dependent figures, e.g. `x:1x3x224x224`.
    #[arg(long = "input-shape", value_name = "NAME:DIMS")]
    pub input_shapes: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CompressArgs {
    /// The ONNX model to compress.
    #[arg(required = true)]
    pub model: Option<PathBuf>,
    /// Where to write the compressed model.
    #[arg(short, long, required = true, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Comma-separated passes to run (in pipeline order), or `none` for a plain round trip.
    /// Default: the full pipeline.
    #[arg(long, value_name = "LIST")]
    pub passes: Option<String>,
    /// Fix symbolic input dims, e.g. `--input-shape x:1x3x224x224` (repeatable).
    #[arg(long = "input-shape", value_name = "NAME:DIMS")]
    pub input_shapes: Vec<String>,
    /// Write the run summary and validation as JSON.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Write the run summary, validation and per-pass plots as one self-contained HTML page.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Store large tensors in `<OUT>.data` next to the model (needed above 2 GiB; the
    /// default when the input model used external data).
    #[arg(long)]
    pub external_data: bool,
    /// Allow OUT to be the input file (it is replaced atomically).
    #[arg(long)]
    pub force: bool,
    /// Skip the side-by-side check in tract.
    #[arg(long)]
    pub no_validate: bool,
    /// Seed of everything random: synthetic validation and calibration inputs, stochastic
    /// rounding, Hutchinson probes.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seed: u64,
    /// Number of synthetic validation batches (when no --eval data is given).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub samples: usize,
    /// Stop each rule-driven pass after N rewrites (to bisect a bad rewrite).
    #[arg(long, value_name = "N", hide_short_help = true)]
    pub max_patches: Option<usize>,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
    // ---- calibration and quantization ----
    /// Calibration data: a directory of .npy files (one sample or a batch each; several graph
    /// inputs as `<input>_NNN.npy`), a .npy, an .npz (keys = input names), or png/jpg images
    /// (see the image options). Without it ranges come from synthetic data (a warning says so).
    #[arg(long, value_name = "PATH", help_heading = "Quantization")]
    pub calib: Option<PathBuf>,
    /// Use at most N calibration samples.
    #[arg(long, value_name = "N", help_heading = "Quantization")]
    pub calib_samples: Option<usize>,
    // Image preprocessing for png/jpg calibration (and --eval) data.
    #[command(flatten)]
    pub image: crate::calibrate::image::ImageArgs,
    /// Activation range method: minmax, percentile, percentile:P, entropy, mse.
    #[arg(
        long,
        default_value = "percentile",
        value_name = "METHOD",
        help_heading = "Quantization"
    )]
    pub method: String,
    /// Percentile for --method percentile.
    #[arg(long, value_name = "P", help_heading = "Quantization")]
    pub percentile: Option<f64>,
    /// Moving-average min-max with this averaging constant (minmax only), e.g. 0.01.
    #[arg(long, value_name = "A", help_heading = "Quantization")]
    pub moving_average: Option<f32>,
    /// Per-tensor weight scales instead of per-channel.
    #[arg(long, help_heading = "Quantization")]
    pub per_tensor: bool,
    /// Symmetric int8 activations instead of asymmetric uint8.
    #[arg(long, help_heading = "Quantization")]
    pub symmetric_activations: bool,
    /// 7-bit weights, for ONNX Runtime's u8xs8 kernels on x86 CPUs without VNNI.
    #[arg(long, help_heading = "Quantization")]
    pub reduce_range: bool,
    /// Names of the added Q/DQ tensors and nodes: compact ids (a7_s, w3_q, ...; ~1% smaller
    /// files) or descriptive ({tensor}_scale, {tensor}_QuantizeLinear, ...).
    #[arg(long, default_value = "compact", value_parser = ["compact", "descriptive"], help_heading = "Quantization")]
    pub names: String,
    /// Weight rounding: nearest or stochastic (seeded by --seed).
    #[arg(long, default_value = "nearest", value_parser = ["nearest", "stochastic"], help_heading = "Quantization")]
    pub rounding: String,
    /// Leave every node of this op type in float (repeatable).
    #[arg(long = "exclude-op", value_name = "OP", help_heading = "Quantization")]
    pub exclude_ops: Vec<String>,
    /// Leave nodes whose name matches (name or regex, full match) in float (repeatable).
    #[arg(
        long = "exclude-node",
        value_name = "NAME",
        help_heading = "Quantization"
    )]
    pub exclude_nodes: Vec<String>,
    /// Quantize only nodes whose name matches (repeatable).
    #[arg(
        long = "include-node",
        value_name = "NAME",
        help_heading = "Quantization"
    )]
    pub include_nodes: Vec<String>,

    // ---- equalization ----
    /// Move biases past ReLU layers where activations stay linear (high-bias absorption).
    #[arg(long, help_heading = "Equalization")]
    pub absorb_high_bias: bool,
    /// Cross-layer equalization: auto (skipped when per-channel int8 weights follow, where it
    /// measured no better on average) or always. Naming `equalize` in --passes means always.
    #[arg(long, default_value = "auto", value_parser = ["auto", "always"], help_heading = "Equalization")]
    pub equalize: String,
    /// Bias correction for quantized weights: off, empirical (needs --calib) or analytic (from
    /// the folded BatchNormalization statistics, data-free).
    #[arg(long, default_value = "off", value_parser = ["off", "empirical", "analytic"], help_heading = "Equalization")]
    pub bias_correction: String,

    // ---- pruning ----
    /// Remove this fraction of the channels of prunable groups (e.g. 0.3).
    #[arg(long, value_name = "FRACTION", help_heading = "Pruning")]
    pub prune: Option<f64>,
    /// Remove this fraction of the MACs (e.g. 0.3 keeps at most 70%); wins over --prune.
    #[arg(long, value_name = "FRACTION", help_heading = "Pruning")]
    pub prune_flops: Option<f64>,
    /// Rank channels over all layers (global) or within each layer (per-layer).
    #[arg(long, default_value = "global", value_parser = ["global", "per-layer"], help_heading = "Pruning")]
    pub prune_ranking: String,
    /// Channel importance: l1, l2, bn-gamma, activation or combined.
    #[arg(long, default_value = "combined", value_parser = ["l1", "l2", "bn-gamma", "activation", "combined"], help_heading = "Pruning")]
    pub prune_criterion: String,
    /// Never remove more than this fraction of one layer's channels.
    #[arg(
        long,
        default_value_t = 0.9,
        value_name = "FRACTION",
        help_heading = "Pruning"
    )]
    pub prune_max_fraction: f64,
    /// Keep channel counts multiples of N where possible.
    #[arg(long, default_value_t = 1, value_name = "N", help_heading = "Pruning")]
    pub round_to: usize,
    /// Refit consumers after pruning: least-squares, bias or none.
    #[arg(long, default_value = "least-squares", value_parser = ["least-squares", "bias", "none"], help_heading = "Pruning")]
    pub reconstruct: String,

    // ---- mixed precision ----
    /// Size budget for Hessian-guided mixed precision: bytes of weights (e.g. 2000000) or a
    /// fraction of the fp32 weight bytes (e.g. 0.2). Enables the mixed-precision pass.
    #[arg(long, value_name = "BYTES|RATIO", help_heading = "Mixed precision")]
    pub target_size: Option<String>,
    /// Budget as average bits per weight (e.g. 4.5). Enables the mixed-precision pass.
    #[arg(
        long,
        value_name = "BITS",
        conflicts_with = "target_size",
        help_heading = "Mixed precision"
    )]
    pub avg_bits: Option<f64>,
    /// Keep layers whose node or weight name matches in fp32 (repeatable, regex).
    #[arg(
        long = "keep-fp32",
        value_name = "REGEX",
        help_heading = "Mixed precision"
    )]
    pub keep_fp32: Vec<String>,
    /// Never choose int4 (e.g. for runtimes without INT4 DequantizeLinear, such as tract).
    #[arg(long, help_heading = "Mixed precision")]
    pub no_int4: bool,
    /// Never choose fp16.
    #[arg(long, help_heading = "Mixed precision")]
    pub no_fp16: bool,
    /// Most Hutchinson probes per layer.
    #[arg(
        long,
        default_value_t = 64,
        value_name = "N",
        help_heading = "Mixed precision"
    )]
    pub hessian_samples: usize,
    /// Output comparison for the traces: auto (KL for classifier logits, MSE otherwise), kl, mse.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kl", "mse"], help_heading = "Mixed precision")]
    pub hessian_loss: String,
    /// How precisions are chosen. joint: minimize the second-order loss of the actual
    /// quantization errors with cross-layer terms (3 extra runs of each layer's downstream part;
    /// measured better on the digits models, BENCHMARKS.md). trace: HAWQ-v2, minimize
    /// Σ Tr(H)/n·‖ΔW‖² exactly (per-layer additive).
    #[arg(long, default_value = "joint", value_parser = ["joint", "trace"], help_heading = "Mixed precision")]
    pub selection: String,
    /// int4 weights in blocks of N values along the input-channel axis, one scale per block
    /// (ONNX block-wise DequantizeLinear, opset 21); layers whose input axis is shorter than N
    /// stay per output channel. Default: per output channel.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(2..), help_heading = "Mixed precision")]
    pub block_size: Option<u64>,
    /// Print the size-vs-sensitivity frontier (minimum ΣΩ, and the joint selection's predicted
    /// loss, per weight size) after the per-layer table; it is always in --report and --html.
    #[arg(long, help_heading = "Mixed precision")]
    pub pareto: bool,

    // ---- validation data ----
    /// Held-out inputs for validation (same formats as --calib); default: synthetic.
    #[arg(long, value_name = "PATH")]
    pub eval: Option<PathBuf>,
    /// Class labels (.npy of integers) of the --eval samples: reports both models' accuracy.
    #[arg(long, value_name = "FILE")]
    pub eval_labels: Option<PathBuf>,

    // ---- fidelity gate and verbosity ----
    /// Fail (exit 1) when the accuracy drops by more than POINTS percentage points (needs
    /// --eval-labels). A failed gate names the quantized layers most responsible.
    #[arg(long, value_name = "POINTS", help_heading = "Fidelity gate")]
    pub max_drop: Option<f64>,
    /// Fail when any output's SQNR against the original is below DB.
    #[arg(long, value_name = "DB", help_heading = "Fidelity gate")]
    pub min_sqnr: Option<f64>,
    /// Fail when the top-1 agreement with the original is below FRACTION (e.g. 0.99).
    #[arg(long, value_name = "FRACTION", help_heading = "Fidelity gate")]
    pub min_agreement: Option<f64>,
    /// Write no output when the gate fails (default: write it, then fail).
    #[arg(long, help_heading = "Fidelity gate")]
    pub no_write_on_fail: bool,
    /// Measure at most N quantized layers when blaming a failed gate.
    #[arg(
        long,
        default_value_t = 12,
        value_name = "N",
        help_heading = "Fidelity gate"
    )]
    pub blame_layers: usize,
    /// Print each pass's key figures too.
    #[arg(short, long, conflicts_with = "quiet")]
    pub verbose: bool,

    /// Read options from a TOML recipe (command-line options win).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Write this run's effective options as a recipe, to repeat it with --config.
    #[arg(long, value_name = "FILE")]
    pub save_recipe: Option<PathBuf>,
}

/// Parse `name:1x3x224x224`.
pub fn parse_input_shape(spec: &str) -> Result<(String, Vec<usize>)> {
    let (name, dims) = spec.rsplit_once(':').with_context(|| {
        format!("--input-shape '{spec}': expected NAME:DIMS like x:1x3x224x224")
    })?;
    ensure!(
        !name.is_empty(),
        "--input-shape '{spec}': the input name is empty"
    );
    let dims = dims
        .split(['x', ','])
        .map(|d| {
            d.trim().parse::<usize>().with_context(|| {
                format!(
                    "--input-shape '{spec}': '{d}' is not a dimension (expected e.g. 1x3x224x224)"
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((name.to_string(), dims))
}

fn parse_shapes(model: &Model, specs: &[String]) -> Result<Vec<(String, Vec<usize>)>> {
    let shapes = specs
        .iter()
        .map(|s| parse_input_shape(s))
        .collect::<Result<Vec<_>>>()?;
    for (name, _) in &shapes {
        if !model.graph.is_graph_input(name) {
            let inputs: Vec<&str> = model.graph.inputs.iter().map(|i| i.name()).collect();
            bail!("--input-shape names '{name}', which is not a graph input (inputs: {inputs:?})");
        }
    }
    Ok(shapes)
}

/// Held-out validation inputs (one batch per input, all samples) and optional labels.
#[allow(clippy::type_complexity)]
fn load_eval(
    args: &CompressArgs,
    model: &Model,
) -> Result<Option<(Vec<(String, ndarray::ArrayD<f32>)>, Option<Vec<i64>>)>> {
    let Some(path) = &args.eval else {
        ensure!(args.eval_labels.is_none(), "--eval-labels needs --eval");
        return Ok(None);
    };
    let opts = DataOptions {
        image: args.image.options(),
        ..Default::default()
    };
    let set = CalibrationSet::load(path, model, &opts)
        .with_context(|| format!("--eval {}", path.display()))?;
    let inputs = set
        .input_names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let parts: Vec<_> = set.batches.iter().map(|b| b[i].view()).collect();
            let joined = ndarray::concatenate(ndarray::Axis(0), &parts)
                .with_context(|| format!("--eval: joining batches of '{name}'"))?;
            Ok((name.clone(), joined))
        })
        .collect::<Result<Vec<_>>>()?;
    let labels = match &args.eval_labels {
        None => None,
        Some(p) => {
            let labels = read_labels(p)?;
            ensure!(
                labels.len() == set.samples,
                "--eval-labels {}: {} labels for {} --eval samples",
                p.display(),
                labels.len(),
                set.samples
            );
            Some(labels)
        }
    };
    Ok(Some((inputs, labels)))
}

/// Integer class labels from a 1-D .npy (int64, int32 or uint8).
fn read_labels(path: &Path) -> Result<Vec<i64>> {
    use ndarray_npy::ReadNpyExt;
    let open = || {
        std::fs::File::open(path).with_context(|| format!("cannot read labels {}", path.display()))
    };
    if let Ok(a) = ndarray::Array1::<i64>::read_npy(open()?) {
        return Ok(a.to_vec());
    }
    if let Ok(a) = ndarray::Array1::<i32>::read_npy(open()?) {
        return Ok(a.iter().map(|&v| v as i64).collect());
    }
    if let Ok(a) = ndarray::Array1::<u8>::read_npy(open()?) {
        return Ok(a.iter().map(|&v| v as i64).collect());
    }
    bail!(
        "labels {}: expected a 1-D .npy of int64, int32 or uint8 class indices",
        path.display()
    )
}

/// The options of every pass, from the command line, with calibration data loaded once.
fn pass_context(
    args: &CompressArgs,
    model: &Model,
    input_shapes: &[(String, Vec<usize>)],
) -> Result<PassContext> {
    use crate::passes::{equalize, prune, quantize};
    let data_opts = DataOptions {
        max_samples: args.calib_samples,
        input_shapes: input_shapes.to_vec(),
        image: args.image.options(),
        ..Default::default()
    };
    let calibration = match &args.calib {
        Some(path) => Some(Arc::new(
            CalibrationSet::load(path, model, &data_opts)
                .with_context(|| format!("--calib {}", path.display()))?,
        )),
        None => None,
    };
    let mut method = crate::calibrate::observe::Method::parse(&args.method)
        .with_context(|| format!("--method {}", args.method))?;
    if let Some(p) = args.percentile {
        ensure!(
            matches!(method, crate::calibrate::observe::Method::Percentile(_)),
            "--percentile needs --method percentile"
        );
        method = crate::calibrate::observe::Method::parse(&format!("percentile:{p}"))
            .context("--percentile")?;
    }
    let quantize = quantize::QuantizeOptions {
        method,
        moving_average: args.moving_average,
        activation_scheme: if args.symmetric_activations {
            crate::calibrate::params::ActScheme::I8Symmetric
        } else {
            crate::calibrate::params::ActScheme::U8Asymmetric
        },
        per_channel: !args.per_tensor,
        reduce_range: args.reduce_range,
        rounding: if args.rounding == "stochastic" {
            quantize::Rounding::Stochastic { seed: args.seed }
        } else {
            quantize::Rounding::Nearest
        },
        exclude_ops: args.exclude_ops.clone(),
        exclude_nodes: args.exclude_nodes.clone(),
        include_nodes: args.include_nodes.clone(),
        seed: args.seed,
        bias_correction: args
            .bias_correction
            .parse()
            .map_err(|e| anyhow::anyhow!("--bias-correction: {e}"))?,
        input_shapes: input_shapes.to_vec(),
        naming: if args.names == "descriptive" {
            quantize::Naming::Descriptive
        } else {
            quantize::Naming::Compact
        },
        ..Default::default()
    };
    ensure!(
        args.bias_correction != "empirical" || calibration.is_some(),
        "--bias-correction empirical needs calibration data (--calib)"
    );
    // Equalization and pruning take named batches.
    let named: Option<Vec<crate::calibrate::NamedBatch>> =
        calibration.as_ref().map(|c| c.named_batches());
    let equalize = equalize::EqualizeOptions {
        absorb_high_bias: args.absorb_high_bias,
        with_per_channel: args.equalize == "always"
            || args
                .passes
                .as_deref()
                .is_some_and(|p| p.split(',').any(|n| n.trim() == "equalize")),
        calibration: named.clone().map(Arc::new),
        ..Default::default()
    };
    for (flag, v) in [("--prune", args.prune), ("--prune-flops", args.prune_flops)] {
        if let Some(v) = v {
            ensure!(
                (0.0..1.0).contains(&v),
                "{flag} {v}: expected a fraction in [0, 1)"
            );
        }
    }
    let prune = prune::PruneOptions {
        ratio: args.prune.unwrap_or(0.0),
        flops: args.prune_flops.unwrap_or(0.0),
        ranking: match args.prune_ranking.as_str() {
            "per-layer" => prune::Ranking::PerLayer,
            _ => prune::Ranking::Global,
        },
        criterion: match args.prune_criterion.as_str() {
            "l1" => prune::Criterion::L1,
            "l2" => prune::Criterion::L2,
            "bn-gamma" => prune::Criterion::BnGamma,
            "activation" => prune::Criterion::Activation,
            _ => prune::Criterion::Combined,
        },
        max_fraction: args.prune_max_fraction,
        round_to: args.round_to.max(1),
        reconstruct: match args.reconstruct.as_str() {
            "none" => prune::Reconstruct::None,
            "bias" => prune::Reconstruct::Bias,
            _ => prune::Reconstruct::LeastSquares,
        },
        calibration: named.and_then(|b| b.into_iter().next()),
        input_shapes: input_shapes.to_vec(),
        ..Default::default()
    };
    let mixed = MixedPrecisionOptions {
        budget: match (&args.target_size, args.avg_bits) {
            (Some(t), _) => Some(parse_budget(t)?),
            (None, Some(b)) => {
                ensure!(
                    b > 0.0 && b <= 32.0,
                    "--avg-bits {b}: expected 0 < bits <= 32"
                );
                Some(Budget::AvgBits(b))
            }
            (None, None) => None,
        },
        keep_fp32: args.keep_fp32.clone(),
        allow_int4: !args.no_int4,
        allow_fp16: !args.no_fp16,
        block_size: args.block_size.map(|b| b as usize),
        print_pareto: args.pareto,
        selection: match args.selection.as_str() {
            "trace" => crate::passes::mixed_precision::Selection::Trace,
            _ => crate::passes::mixed_precision::Selection::Joint,
        },
        hessian: crate::hessian::HessianOptions {
            max_samples: args.hessian_samples.max(1),
            seed: args.seed,
            loss: hessian_loss(&args.hessian_loss),
            ..Default::default()
        },
        ..Default::default()
    };
    // Without --calib, quantize and mixed-precision calibrate on synthetic data (loudly); made
    // here so that --input-shape fixes symbolic dims. Prune and equalize get no synthetic data.
    let calibration = match calibration {
        Some(c) => Some(c),
        None if !input_shapes.is_empty() => Some(Arc::new(CalibrationSet::synthetic(
            model,
            QuantizeOptions::default().synthetic_samples,
            args.seed,
            &data_opts,
        )?)),
        None => None,
    };
    Ok(PassContext {
        mixed,
        max_patches: args.max_patches,
        quantize,
        calibration,
        equalize,
        prune,
    })
}

/// `--target-size`: whole bytes (`2000000`) or a fraction of the fp32 weight bytes (`0.2`).
fn parse_budget(spec: &str) -> Result<Budget> {
    let v: f64 = spec.trim().parse().with_context(|| {
        format!("--target-size '{spec}': expected bytes (e.g. 2000000) or a ratio (e.g. 0.2)")
    })?;
    if v > 0.0 && v < 1.0 {
        Ok(Budget::Ratio(v))
    } else if v >= 1.0 && v.fract() == 0.0 {
        Ok(Budget::Bytes(v as u64))
    } else {
        bail!("--target-size '{spec}': expected bytes (a whole number) or a ratio in (0, 1)")
    }
}

/// Whether two paths name the same file (the output must never clobber the input).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[derive(Debug, Serialize)]
pub struct ModelSide {
    pub path: String,
    pub file_bytes: u64,
    pub stats: ModelStats,
}

/// The run summary, also written as JSON by `--report` (keys are documented in the README).
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub tool: String,
    pub version: String,
    pub input: ModelSide,
    pub output: ModelSide,
    pub passes: Vec<PassRecord>,
    /// The side-by-side check in tract (absent with --no-validate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation: Option<ValidationReport>,
    /// The fidelity gate (absent without --max-drop / --min-sqnr / --min-agreement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateReport>,
    pub size_ratio: f64,
    pub seconds_total: f64,
}

/// The clap command with recipe support: later options override earlier ones.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().args_override_self(true)
}

/// Parse the process arguments (expanding `--config` recipes) and run.
pub fn main_with_args(args: Vec<std::ffi::OsString>) -> Result<()> {
    use clap::FromArgMatches;
    let cmd = command();
    let args = crate::recipe::expand_config(&cmd, args)?;
    let matches = cmd.clone().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{e}"))?;
    let save_recipe = cli.compress.save_recipe.clone();
    run(cli)?;
    if let Some(path) = save_recipe {
        write_text(&path, &crate::recipe::recipe_from_matches(&cmd, &matches))?;
    }
    Ok(())
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Inspect(args)) => inspect(&args),
        Some(Command::Sensitivity(args)) => sensitivity(&args),
        Some(Command::Config(_)) => {
            print!("{}", crate::recipe::default_recipe(&command()));
            Ok(())
        }
        None => compress(&cli.compress),
    }
}

fn compress(args: &CompressArgs) -> Result<()> {
    let start = Instant::now();
    let input = args.model.as_deref().context("no input model given")?;
    let output = args
        .output
        .as_deref()
        .context("no output path given (-o OUT)")?;
    if same_file(input, output) && !args.force {
        bail!(
            "refusing to overwrite the input model {}: choose another -o, or pass --force",
            input.display()
        );
    }
    let names = match &args.passes {
        Some(spec) => passes::select(spec)?,
        None => passes::default_pass_names(),
    };
    crate::report::progress::set_enabled(!args.quiet);
    crate::report::progress::set_verbose(args.verbose);
    let bounds = gate_bounds(args)?;
    let (original, info) = load::read_model(input)?;
    let mut model = Model::from_proto(original.clone())
        .with_context(|| format!("{}: invalid model", input.display()))?;
    let input_shapes = parse_shapes(&model, &args.input_shapes)?;
    let stats_before = stats::model_stats(
        &model,
        &stats::inferred_shapes(&model, &original, &input_shapes),
    );

    // Data problems surface before any work starts.
    let eval_data = load_eval(args, &model)?;
    let ctx = pass_context(args, &model, &input_shapes)?;
    let records = crate::Pipeline::from_parts(names.clone(), ctx.clone()).run(&mut model)?;

    let out_proto = model.to_proto()?;
    let save_opts = save::SaveOptions {
        external_data: args.external_data || info.had_external_data,
        ..Default::default()
    };
    // With --no-write-on-fail the file is written only once the gate has passed.
    let defer_write = args.no_write_on_fail && bounds.is_active();
    if !defer_write {
        save::save_proto(out_proto.clone(), output, &save_opts)?;
    }
    let gate_eval = if bounds.is_active() {
        eval_data.clone()
    } else {
        None
    };
    let validation = if args.no_validate {
        None
    } else {
        let mut opts = ValidateOptions {
            seed: args.seed,
            samples: args.samples,
            input_shapes: input_shapes.clone(),
            ..Default::default()
        };
        if let Some((inputs, labels)) = eval_data {
            opts.inputs = Some(inputs);
            opts.labels = labels;
        }
        // The output is written: a validation that cannot run is reported, not a failure.
        Some(
            validate::validate(&original, &out_proto, &opts)
                .unwrap_or_else(|e| ValidationReport::not_checked(format!("{e:#}"))),
        )
    };
    let gate = bounds
        .is_active()
        .then(|| {
            let rerun_input = Model::from_proto(original.clone());
            run_gate(
                args,
                &bounds,
                validation.as_ref(),
                &records,
                &model,
                rerun_input,
                &original,
                &names,
                &ctx,
                &input_shapes,
                gate_eval,
            )
        })
        .transpose()?;
    let gate_failed = gate.as_ref().is_some_and(|g| !g.passed);
    if defer_write && !gate_failed {
        save::save_proto(out_proto.clone(), output, &save_opts)?;
    }
    let written = !(defer_write && gate_failed);
    let out_bytes = if !written {
        prost::Message::encoded_len(&out_proto) as u64
    } else {
        std::fs::metadata(output)?.len()
            + if save_opts.external_data {
                std::fs::metadata(output.with_file_name(format!(
                    "{}.data",
                    output.file_name().unwrap_or_default().to_string_lossy()
                )))
                .map(|m| m.len())
                .unwrap_or(0)
            } else {
                0
            }
    };
    let stats_after = stats::model_stats(
        &model,
        &stats::inferred_shapes(&model, &out_proto, &input_shapes),
    );
    let report = RunReport {
        tool: "onnx-compress".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        size_ratio: out_bytes as f64 / info.file_bytes.max(1) as f64,
        input: ModelSide {
            path: input.display().to_string(),
            file_bytes: info.file_bytes,
            stats: stats_before,
        },
        output: ModelSide {
            path: output.display().to_string(),
            file_bytes: out_bytes,
            stats: stats_after,
        },
        passes: records,
        validation,
        gate,
        seconds_total: start.elapsed().as_secs_f64(),
    };
    if !args.quiet {
        print_summary(&report);
        if let Some(g) = &report.gate {
            for line in gate::lines(g) {
                println!("{line}");
            }
        }
    }
    if let Some(path) = &args.report {
        write_json(path, &report)?;
    }
    if let Some(p) = &args.html {
        crate::report::html::write(p, &report)?;
    }
    if let Some(g) = report.gate.as_ref().filter(|g| !g.passed) {
        let mut line = gate::error_line(g);
        if !written {
            line += &format!("; {} not written (--no-write-on-fail)", output.display());
        }
        bail!(line);
    }
    Ok(())
}

/// The gate's bounds, checked before any work.
fn gate_bounds(args: &CompressArgs) -> Result<gate::Bounds> {
    let bounds = gate::Bounds {
        max_drop_points: args.max_drop,
        min_sqnr_db: args.min_sqnr,
        min_agreement: args.min_agreement,
    };
    ensure!(
        args.max_drop.is_none() || args.eval_labels.is_some(),
        "--max-drop needs labelled held-out data: --eval FILE --eval-labels FILE"
    );
    if let Some(v) = args.max_drop {
        ensure!(
            v >= 0.0,
            "--max-drop {v}: expected points >= 0 (e.g. 1 for one point)"
        );
    }
    if let Some(v) = args.min_agreement {
        ensure!(
            (0.0..=1.0).contains(&v),
            "--min-agreement {v}: expected a fraction in [0, 1] (e.g. 0.99)"
        );
    }
    if let Some(v) = args.min_sqnr {
        ensure!(v.is_finite(), "--min-sqnr {v}: expected a number of dB");
    }
    ensure!(
        !(bounds.is_active() && args.no_validate),
        "--max-drop / --min-sqnr / --min-agreement are checked by validation; drop --no-validate"
    );
    ensure!(
        !args.no_write_on_fail || bounds.is_active(),
        "--no-write-on-fail needs a bound: --max-drop, --min-sqnr or --min-agreement"
    );
    Ok(bounds)
}

/// Check the gate and, when it fails, rank the quantized layers by re-running the pipeline.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn run_gate(
    args: &CompressArgs,
    bounds: &gate::Bounds,
    validation: Option<&ValidationReport>,
    records: &[PassRecord],
    model: &Model,
    input: Result<Model>,
    original: &crate::onnx::proto::ModelProto,
    names: &[&str],
    ctx: &PassContext,
    input_shapes: &[(String, Vec<usize>)],
    eval: Option<(Vec<(String, ndarray::ArrayD<f32>)>, Option<Vec<i64>>)>,
) -> Result<GateReport> {
    let input = input.context("re-reading the input model for the gate")?;
    let mut opts = ValidateOptions {
        seed: args.seed,
        samples: args.samples,
        input_shapes: input_shapes.to_vec(),
        ..Default::default()
    };
    if let Some((inputs, labels)) = eval {
        opts.inputs = Some(inputs);
        opts.labels = labels;
    }
    let layers = gate::quantized_layers(records, model);
    let rerun = gate::Rerun {
        input: &input,
        original,
        passes: names,
        ctx,
        validate: &opts,
    };
    Ok(gate::evaluate(
        bounds,
        validation,
        &layers,
        &rerun,
        args.blame_layers,
        5,
    ))
}

/// Write JSON atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_text(path, &serde_json::to_string_pretty(value)?)
}

/// Write a text file atomically (temp file + rename).
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, text.as_bytes())?;
    // On failure, drop the temp file (PersistError holds it) so nothing is left behind.
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn print_summary(r: &RunReport) {
    println!("{} -> {}", r.input.path, r.output.path);
    println!(
        "  size   {} -> {} ({:.1}% of the input)",
        human_bytes(r.input.file_bytes),
        human_bytes(r.output.file_bytes),
        100.0 * r.size_ratio
    );
    println!(
        "  nodes  {} -> {}",
        r.input.stats.nodes, r.output.stats.nodes
    );
    if r.passes.is_empty() {
        println!("  passes none (round trip)");
    }
    for p in &r.passes {
        println!(
            "  pass {:<16} {:>5} change(s)  {:>7.3}s  nodes {} -> {}",
            p.name, p.changes, p.seconds, p.nodes_before, p.nodes_after
        );
        for n in &p.notes {
            println!("       note: {n}");
        }
        for line in &p.table {
            println!("       {line}");
        }
        if crate::report::progress::verbose() {
            for line in detail_lines(&p.details) {
                println!("       {line}");
            }
        }
    }
    match &r.validation {
        None => println!("  validation skipped (--no-validate)"),
        Some(v) => print_validation(v),
    }
    println!("  total {:.2}s", r.seconds_total);
}

fn fmt_db(v: f64) -> String {
    if v.is_infinite() {
        "inf (identical)".into()
    } else {
        format!("{v:.1} dB")
    }
}

fn print_validation(v: &ValidationReport) {
    use crate::validate::{InputSource, Method, Status};
    let how = match v.method {
        Method::Direct => "both models run as they are",
        Method::Simulation => {
            "on simulation graphs (quantized constants dequantized ahead of time)"
        }
    };
    let inputs = match v.input_source {
        InputSource::User => format!("{} batch(es) of given inputs", v.samples),
        InputSource::Synthetic => format!("{} synthetic batch(es), seed {}", v.samples, v.seed),
    };
    match v.status {
        Status::Checked => println!("  validated in {} ({how}), {inputs}:", v.runtime),
        Status::NotChecked => println!(
            "  NOT validated in {}: {}",
            v.runtime,
            v.reason.as_deref().unwrap_or("unknown reason")
        ),
        Status::Mismatch => println!(
            "  MISMATCH in {}: {}",
            v.runtime,
            v.reason.as_deref().unwrap_or("unknown reason")
        ),
    }
    for o in &v.outputs {
        let mut line = format!(
            "    {:<16} max|err| {:.3e}  mean|err| {:.3e}  cos {:.6}  SQNR {}",
            o.name,
            o.max_abs_err,
            o.mean_abs_err,
            o.cosine,
            fmt_db(o.sqnr_db)
        );
        if let Some(t) = o.top1_agreement {
            line += &format!("  top-1 agree {:.2}%", 100.0 * t);
        }
        println!("{line}");
        if let (Some(a), Some(b)) = (o.accuracy_original, o.accuracy_candidate) {
            println!(
                "    {:<16} accuracy {:.2}% -> {:.2}% ({:+.2} points)",
                "",
                100.0 * a,
                100.0 * b,
                100.0 * (b - a)
            );
        }
    }
    for r in &v.rewrites {
        println!("    simulation: {r}");
    }
    for n in &v.notes {
        println!("    note: {n}");
    }
}

fn sensitivity(args: &SensitivityArgs) -> Result<()> {
    let mut model = load::load(&args.model)?;
    let data_opts = DataOptions {
        max_samples: Some(args.calib_samples),
        image: args.image.options(),
        ..Default::default()
    };
    let calib = match &args.calib {
        Some(p) => CalibrationSet::load(p, &model, &data_opts)
            .with_context(|| format!("--calib {}", p.display()))?,
        None => {
            eprintln!("warning: no --calib data; traces are measured on synthetic inputs");
            CalibrationSet::synthetic(&model, args.calib_samples, args.seed, &data_opts)?
        }
    };
    crate::Pipeline::new().fuse().cleanup().run(&mut model)?;
    let opts = crate::hessian::HessianOptions {
        max_samples: args.hessian_samples.max(1),
        seed: args.seed,
        loss: hessian_loss(&args.hessian_loss),
        ..Default::default()
    };
    let layers = crate::hessian::sensitivity(&model, &calib.batches, &opts)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&layers)?);
        return Ok(());
    }
    println!(
        "{:<40} {:>10} {:>12} {:>10} {:>12} {:>7}",
        "layer (node)", "params", "trace", "stderr", "trace/param", "probes"
    );
    let mut sorted: Vec<_> = layers.iter().collect();
    sorted.sort_by(|a, b| b.trace_per_param.total_cmp(&a.trace_per_param));
    for l in sorted {
        println!(
            "{:<40} {:>10} {:>12.4e} {:>10.2e} {:>12.4e} {:>7}",
            l.node, l.params, l.hessian_trace, l.hessian_trace_stderr, l.trace_per_param, l.samples
        );
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Inspection {
    path: String,
    file_bytes: u64,
    ir_version: i64,
    producer: String,
    inputs: Vec<ValueSummary>,
    outputs: Vec<ValueSummary>,
    stats: ModelStats,
}

fn inspect(args: &InspectArgs) -> Result<()> {
    let (proto, info) = load::read_model(&args.model)?;
    let model = Model::from_proto(proto.clone())
        .with_context(|| format!("{}: invalid model", args.model.display()))?;
    let input_shapes = parse_shapes(&model, &args.input_shapes)?;
    let shapes = stats::inferred_shapes(&model, &proto, &input_shapes);
    let insp = Inspection {
        path: args.model.display().to_string(),
        file_bytes: info.file_bytes,
        ir_version: model.shell.ir_version(),
        producer: format!(
            "{} {}",
            model.shell.producer_name(),
            model.shell.producer_version()
        )
        .trim()
        .to_string(),
        inputs: model
            .graph
            .inputs
            .iter()
            .map(stats::value_summary)
            .collect(),
        outputs: model
            .graph
            .outputs
            .iter()
            .map(stats::value_summary)
            .collect(),
        stats: stats::model_stats(&model, &shapes),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&insp)?);
        return Ok(());
    }
    println!("{} ({})", insp.path, human_bytes(insp.file_bytes));
    println!(
        "  ir_version {}, opsets {}, producer '{}'",
        insp.ir_version,
        insp.stats
            .opsets
            .iter()
            .map(|(d, v)| format!("{d}:{v}"))
            .collect::<Vec<_>>()
            .join(" "),
        insp.producer
    );
    for i in &insp.inputs {
        println!("  input  {:<24} {}", i.name, i.describe());
    }
    for o in &insp.outputs {
        println!("  output {:<24} {}", o.name, o.describe());
    }
    let s = &insp.stats;
    println!(
        "  {} nodes, {} parameters, {} in initializers",
        s.nodes,
        s.parameters,
        human_bytes(s.initializer_bytes as u64)
    );
    for (dt, b) in &s.bytes_by_dtype {
        println!("    {dt:<10} {}", human_bytes(*b as u64));
    }
    if s.macs_unknown_nodes > 0 {
        println!(
            "  MACs {} (+{} heavy node(s) with unknown shapes; pass --input-shape to fix symbolic dims)",
            s.macs, s.macs_unknown_nodes
        );
    } else {
        println!("  MACs {}", s.macs);
    }
    println!("  ops:");
    let mut ops: Vec<_> = s.op_histogram.iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in ops {
        println!("    {op:<24} {n}");
    }
    Ok(())
}

/// `-v`: a pass's key figures, from its JSON details: scalars (two levels deep) and the
/// length of each list.
fn detail_lines(details: &serde_json::Value) -> Vec<String> {
    use serde_json::Value;
    fn scalar(v: &Value) -> Option<String> {
        match v {
            Value::Null => None,
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(match n.as_f64() {
                Some(f) if n.is_f64() => format!("{f:.4}"),
                _ => n.to_string(),
            }),
            Value::String(s) => Some(s.clone()),
            Value::Array(a) => Some(format!("{} item(s)", a.len())),
            Value::Object(_) => None,
        }
    }
    let Value::Object(map) = details else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in map {
        match v {
            Value::Object(inner) => {
                let parts: Vec<String> = inner
                    .iter()
                    .filter_map(|(k2, v2)| scalar(v2).map(|s| format!("{k2}={s}")))
                    .collect();
                if !parts.is_empty() {
                    out.push(format!("{k}: {}", parts.join(", ")));
                }
            }
            _ => {
                if let Some(s) = scalar(v) {
                    out.push(format!("{k}: {s}"));
                }
            }
        }
    }
    out
}

/// `--hessian-loss` (clap has already limited it to these values).
fn hessian_loss(v: &str) -> crate::hessian::Loss {
    match v {
        "kl" => crate::hessian::Loss::Kl,
        "mse" => crate::hessian::Loss::Mse,
        _ => crate::hessian::Loss::Auto,
    }
}
