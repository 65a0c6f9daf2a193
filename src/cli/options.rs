//! From arguments to the library's options: every check that needs only the command line
//! happens here, before any file is read; [`onnx_compress::session`] does the rest.

use super::args::*;
use anyhow::{bail, ensure, Context, Result};
use onnx_compress::calibrate::observe::Method;
use onnx_compress::calibrate::params::ActScheme;
use onnx_compress::calibrate::sequence::{SequenceOptions, StateDecl};
use onnx_compress::hessian::{HessianOptions, Loss};
use onnx_compress::limits::{parse_size, MemoryBudget};
use onnx_compress::passes::equalize::{BiasCorrection, EqualizeOptions};
use onnx_compress::passes::mixed_precision::{Budget, MixedPrecisionOptions, Selection};
use onnx_compress::passes::prune::{self, PruneOptions};
use onnx_compress::passes::quantize::adaround::{AdaRoundInputs, AdaRoundOptions, W4a8};
use onnx_compress::passes::quantize::{ActivationMode, Naming, QuantizeOptions, Rounding, Smooth};
use onnx_compress::passes::target::Target;
use onnx_compress::passes::weight_only::{self, WeightOnlyOptions};
use onnx_compress::passes::{self, PassContext};
use onnx_compress::session::{gate, CompressOptions, DataSources};
use onnx_compress::validate::latency::LatencyTiming;

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

pub fn parse_input_shapes(specs: &[String]) -> Result<Vec<(String, Vec<usize>)>> {
    specs.iter().map(|s| parse_input_shape(s)).collect()
}

/// Parse `--batch-axis state=1` or `sr=none`.
pub fn parse_batch_axis(spec: &str) -> Result<(String, Option<usize>)> {
    let (name, axis) = spec
        .rsplit_once('=')
        .with_context(|| format!("--batch-axis '{spec}': expected NAME=AXIS like state=1"))?;
    ensure!(
        !name.is_empty(),
        "--batch-axis '{spec}': the input name is empty"
    );
    let axis = match axis.trim() {
        "none" => None,
        a => Some(a.parse::<usize>().with_context(|| {
            format!("--batch-axis '{spec}': '{a}' is not an axis (expected a number or none)")
        })?),
    };
    Ok((name.to_string(), axis))
}

/// Parse `--fix-input sr=16000` or `ids=1,2,3` (`true`/`false` stand for 1/0); the values are
/// typed against the input's element type once the model is read.
pub fn parse_fix_input(spec: &str) -> Result<(String, Vec<f64>)> {
    let (name, values) = spec
        .split_once('=')
        .with_context(|| format!("--fix-input '{spec}': expected NAME=VALUE like sr=16000"))?;
    ensure!(
        !name.is_empty(),
        "--fix-input '{spec}': the input name is empty"
    );
    let values = values
        .split(',')
        .map(|v| match v.trim() {
            "true" => Ok(1.0),
            "false" => Ok(0.0),
            v => v
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .with_context(|| format!("--fix-input '{spec}': '{v}' is not a finite number")),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((name.to_string(), values))
}

/// `--hessian-loss`.
pub fn hessian_loss(v: HessianLossArg) -> Loss {
    match v {
        HessianLossArg::Kl => Loss::Kl,
        HessianLossArg::Mse => Loss::Mse,
        HessianLossArg::Auto => Loss::Auto,
    }
}

/// `--target-size`: whole bytes (`2000000`) or a fraction of the fp32 weight bytes (`0.2` or
/// `20%`).
fn parse_budget(spec: &str) -> Result<Budget> {
    if let Some(pct) = spec.trim().strip_suffix('%') {
        let v: f64 = pct
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| *v > 0.0 && *v < 100.0)
            .with_context(|| {
                format!("--target-size '{spec}': expected a percentage in (0, 100), e.g. 15%")
            })?;
        return Ok(Budget::Ratio(v / 100.0));
    }
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

/// The options of every pass (calibration data is attached by the session once the model is
/// loaded).
fn pass_context(args: &CompressArgs) -> Result<PassContext> {
    let target = match args.target {
        TargetArg::Generic => Target::Generic,
        TargetArg::Tract => Target::Tract,
        TargetArg::Ort => Target::Ort,
        TargetArg::Openvino => Target::Openvino,
    };
    let method_arg = args
        .method
        .as_deref()
        .unwrap_or(target.policy().activation_method);
    let mut method = Method::parse(method_arg).with_context(|| format!("--method {method_arg}"))?;
    if let Some(p) = args.percentile {
        ensure!(
            args.method.is_none() || matches!(method, Method::Percentile(_) | Method::Auto),
            "--percentile needs --method percentile"
        );
        method = Method::parse(&format!("percentile:{p}")).context("--percentile")?;
    }
    let bias_correction = match args.bias_correction {
        BiasCorrectionArg::Off => BiasCorrection::Off,
        BiasCorrectionArg::Empirical => BiasCorrection::Empirical,
        BiasCorrectionArg::Analytic => BiasCorrection::Analytic,
        BiasCorrectionArg::Auto if args.calib.is_some() => BiasCorrection::Measured,
        BiasCorrectionArg::Auto => BiasCorrection::Off,
    };
    ensure!(
        args.auto_samples != Some(0),
        "--auto-samples must be at least 1"
    );
    ensure!(
        args.validate_samples != Some(0),
        "--validate-samples must be at least 1"
    );
    let quantize = QuantizeOptions {
        target,
        method,
        auto: onnx_compress::passes::quantize::auto::AutoOptions {
            samples: args.auto_samples,
            blocks: args.auto_blocks,
            alternatives: args.auto_alternatives as usize,
        },
        moving_average: args.moving_average,
        activation_scheme: if args.symmetric_activations {
            ActScheme::I8Symmetric
        } else {
            ActScheme::U8Asymmetric
        },
        per_channel: !args.per_tensor,
        reduce_range: args.reduce_range,
        rounding: match args.rounding {
            RoundingArg::Stochastic => Rounding::Stochastic { seed: args.seed },
            RoundingArg::Nearest | RoundingArg::Adaround => Rounding::Nearest,
        },
        adaround: (args.rounding == RoundingArg::Adaround).then(|| AdaRoundOptions {
            iterations: args.adaround_iterations as usize,
            budget_seconds: args.adaround_budget,
            inputs: match args.adaround_inputs {
                AdaroundInputsArg::Float => AdaRoundInputs::Float,
                AdaroundInputsArg::Quantized => AdaRoundInputs::Quantized,
            },
            activation_loss: args.adaround_activation_loss,
            stages: args.adaround_stages,
            ..Default::default()
        }),
        w4a8: args.w4a8.then_some(W4a8 {
            all_layers: args.w4a8_all_layers,
            block_size: args.block_size.map(|b| b as usize),
        }),
        exclude_ops: args.exclude_ops.clone(),
        exclude_nodes: args.exclude_nodes.clone(),
        include_nodes: args.include_nodes.clone(),
        seed: args.seed,
        bias_correction,
        naming: match args.names {
            NamesArg::Descriptive => Naming::Descriptive,
            NamesArg::Compact => Naming::Compact,
        },
        activations: match args.activations {
            ActivationsArg::Static => ActivationMode::Static,
            ActivationsArg::Dynamic => ActivationMode::Dynamic,
            ActivationsArg::Auto => ActivationMode::Auto,
        },
        attention_int8: args.int8_attention,
        body_activations: args.body_activations == "on",
        smooth: match args.smooth.as_str() {
            "auto" => Smooth::Auto,
            "off" => Smooth::Off,
            a => {
                let alpha: f32 = a
                    .parse()
                    .ok()
                    .filter(|a: &f32| (0.0..=1.0).contains(a))
                    .with_context(|| {
                        format!("--smooth {a}: expected auto, off or a number in [0, 1]")
                    })?;
                Smooth::Alpha(alpha)
            }
        },
        ..Default::default()
    };
    ensure!(
        args.adaround_budget
            .is_none_or(|s| s.is_finite() && s > 0.0),
        "--adaround-budget must be a positive number of seconds"
    );
    ensure!(
        !(args.w4a8 && args.weight_bits.is_some()),
        "--w4a8 (int4 weights, int8 activations) and --weight-bits (weight-only, float activations) exclude each other"
    );
    ensure!(
        args.bias_correction != BiasCorrectionArg::Empirical || args.calib.is_some(),
        "--bias-correction empirical needs calibration data (--calib)"
    );
    ensure!(
        args.equalize != EqualizeArg::Measured || args.calib.is_some(),
        "--equalize measured needs calibration data (--calib)"
    );
    // Naming `equalize` in --passes means always.
    let named = args
        .passes
        .as_deref()
        .is_some_and(|p| p.split(',').any(|n| n.trim() == "equalize"));
    let equalize = EqualizeOptions {
        absorb_high_bias: args.absorb_high_bias,
        rescale: args.equalize != EqualizeArg::Off,
        // Needs calibration data at run time; without it every pair is applied.
        measured: args.equalize == EqualizeArg::Measured
            || (args.equalize == EqualizeArg::Auto && !named),
        with_per_channel: matches!(args.equalize, EqualizeArg::Always | EqualizeArg::Measured)
            || named,
        ..Default::default()
    };

    let (prune_ratio, fit_size) = match args.prune.as_deref().map(str::trim) {
        None => (None, false),
        Some("auto") => {
            ensure!(
                args.target_size.is_some(),
                "--prune auto shares a size budget between channels and bits: give it one with --target-size (e.g. 15% or bytes)"
            );
            ensure!(
                args.prune_flops.is_none(),
                "--prune auto chooses how much to prune; it does not combine with --prune-flops"
            );
            (None, true)
        }
        Some(v) => {
            (
                Some(v.parse::<f64>().ok().with_context(|| {
                    format!("--prune {v}: expected a fraction in [0, 1) or auto")
                })?),
                false,
            )
        }
    };
    for (flag, v) in [
        ("--prune", prune_ratio),
        ("--prune-flops", args.prune_flops),
    ] {
        if let Some(v) = v {
            ensure!(
                (0.0..1.0).contains(&v),
                "{flag} {v}: expected a fraction in [0, 1)"
            );
        }
    }
    let prune = PruneOptions {
        ratio: prune_ratio.unwrap_or(0.0),
        fit_size,
        flops: args.prune_flops.unwrap_or(0.0),
        ranking: match args.prune_ranking {
            RankingArg::PerLayer => prune::Ranking::PerLayer,
            RankingArg::Global => prune::Ranking::Global,
        },
        criterion: match args.prune_criterion {
            CriterionArg::L1 => prune::Criterion::L1,
            CriterionArg::L2 => prune::Criterion::L2,
            CriterionArg::BnGamma => prune::Criterion::BnGamma,
            CriterionArg::Activation => prune::Criterion::Activation,
            CriterionArg::Combined => prune::Criterion::Combined,
            CriterionArg::Loss => prune::Criterion::Loss,
        },
        max_fraction: args.prune_max_fraction,
        round_to: args.round_to.max(1),
        reconstruct: match args.reconstruct {
            ReconstructArg::None => prune::Reconstruct::None,
            ReconstructArg::Bias => prune::Reconstruct::Bias,
            ReconstructArg::LeastSquares => prune::Reconstruct::LeastSquares,
        },
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
        selection: match args.selection {
            SelectionArg::Trace => Selection::Trace,
            SelectionArg::Joint => Selection::Joint,
        },
        hessian: HessianOptions {
            max_samples: args.hessian_samples.max(1),
            seed: args.seed,
            loss: hessian_loss(args.hessian_loss),
            ..Default::default()
        },
        ..Default::default()
    };
    let weight_only = weight_only_options(args, &mixed)?;
    Ok(PassContext {
        weight_only,
        mixed,
        max_patches: args.max_patches,
        quantize,
        calibration: None,
        equalize,
        prune,
        target,
        ..Default::default()
    })
}

/// `--weight-bits`, `--weight-format`, `--weight-rounding`, `--block-size`.
fn weight_only_options(
    args: &CompressArgs,
    mixed: &MixedPrecisionOptions,
) -> Result<WeightOnlyOptions> {
    let bits = match args.weight_bits.as_deref() {
        Some("4") => 4,
        _ => 8,
    };
    ensure!(
        bits != 4 || mixed.budget.is_none(),
        "--weight-bits 4 stores every linear layer as int4; it does not combine with a mixed-precision budget (--target-size / --avg-bits)"
    );
    Ok(WeightOnlyOptions {
        bits,
        format: match args.weight_format {
            WeightFormatArg::MatMulNBits => weight_only::Format::MatMulNBits,
            WeightFormatArg::Dq => weight_only::Format::DequantizeLinear,
        },
        block_size: args.block_size.map_or(32, |b| b as usize),
        rounding: match args.weight_rounding {
            WeightRoundingArg::Auto => None,
            WeightRoundingArg::Nearest => Some(weight_only::Method::Nearest),
            WeightRoundingArg::Clip => Some(weight_only::Method::Clip),
            WeightRoundingArg::Gptq => Some(weight_only::Method::Gptq),
        },
    })
}

/// The main command's options for [`onnx_compress::session::compress`].
pub fn compress_options(args: &CompressArgs) -> Result<CompressOptions> {
    let input = args.model.clone().context("no input model given")?;
    let output = args
        .output
        .clone()
        .context("no output path given (-o OUT)")?;
    let passes = match &args.passes {
        Some(spec) => passes::select(spec)?,
        None => passes::default_pass_names(),
    };
    let gate = gate_bounds(args)?;
    let input_shapes = parse_input_shapes(&args.input_shapes)?;
    let ctx = pass_context(args)?;
    Ok(CompressOptions {
        input,
        output,
        force: args.force,
        passes,
        ctx,
        data: DataSources {
            calib: args.calib.clone(),
            calib_samples: args.calib_samples,
            image: args.image.options(),
            eval: args.eval.clone(),
            eval_labels: args.eval_labels.clone(),
            batch_axes: args
                .batch_axes
                .iter()
                .map(|s| parse_batch_axis(s))
                .collect::<Result<_>>()?,
            states: args
                .states
                .iter()
                .map(|s| StateDecl::parse(s))
                .collect::<Result<_>>()?,
            sequence: SequenceOptions {
                decode_steps: args.decode_steps,
                prefill: args.prefill.map(|p| p as usize),
                held_out: 0,
            },
            prompts: args.prompts.clone(),
        },
        fix_inputs: args
            .fix_inputs
            .iter()
            .map(|s| parse_fix_input(s))
            .collect::<Result<_>>()?,
        input_shapes,
        external_data: args.external_data,
        validate: !args.no_validate,
        seed: args.seed,
        samples: args.samples,
        validate_samples: args.validate_samples,
        latency: if args.latency {
            LatencyTiming::Always
        } else {
            LatencyTiming::default()
        },
        gate,
        blame_layers: args.blame_layers,
        no_write_on_fail: args.no_write_on_fail,
        memory: match &args.max_memory {
            Some(size) => MemoryBudget::user(
                parse_size(size).with_context(|| format!("--max-memory {size}"))?,
            ),
            None => MemoryBudget::default(),
        },
        allow_nonfinite: args.allow_nonfinite,
        generate_steps: args.generate_steps,
        quantize_cache: args.quantize_cache,
    })
}
