//! The command line's arguments: clap definitions of the main command and the subcommands.
//! Closed sets of values are `ValueEnum`s (their variants' kebab-case names are the values);
//! [`super::options`] turns them into the library's options.

use clap::{Args, Parser, Subcommand, ValueEnum};
use onnx_compress::calibrate::image::{parse_channels, parse_resize, parse_scale};
use onnx_compress::calibrate::{ImageOptions, Layout};
use std::path::PathBuf;

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
    pub image: ImageArgs,
    /// Most Hutchinson probes per layer.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub hessian_samples: usize,
    /// Worker threads (default: one per core); the estimates are the same whatever the count.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Output comparison for the traces: auto (KL for classifier logits, MSE otherwise), kl, mse.
    #[arg(long, value_enum, default_value = "auto")]
    pub hessian_loss: HessianLossArg,
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
    /// Fix symbolic input dims, e.g. `--input-shape x:1x3x224x224` (repeatable). When every
    /// input's shape is then fixed, `If`s on shapes (a batch of one squeezed) collapse to their
    /// taken branch, as with --fix-input
    #[arg(long = "input-shape", value_name = "NAME:DIMS")]
    pub input_shapes: Vec<String>,
    /// Specialize the model for one value of an input, e.g. `--fix-input sr=16000` or
    /// `--fix-input ids=1,2,3` (typed by the input's element type; repeatable): the input
    /// becomes a constant and what then is constant is folded, an `If` on it included.
    #[arg(long = "fix-input", value_name = "NAME=VALUE")]
    pub fix_inputs: Vec<String>,
    /// The axis --calib/--eval data of an input is split and joined along, e.g.
    /// `--batch-axis state=1`, or `NAME=none` for an input every feed gives whole (repeatable).
    /// Default: the symbolic dim the inputs share, else the first symbolic dim, else axis 0.
    #[arg(long = "batch-axis", value_name = "NAME=AXIS")]
    pub batch_axes: Vec<String>,
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
    /// Number of synthetic validation batches (only without --eval and --calib data).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub samples: usize,
    /// With --calib and no --eval: compare exactly the first N calibration samples in-sample.
    /// Default: from 16, doubled until the SQNR of both halves agrees within 1 dB, at most 64.
    #[arg(long, value_name = "N")]
    pub validate_samples: Option<usize>,
    /// Time both models in tract during validation even when the output quantizes activations
    /// (by default timed only when its activations run float: tract runs Q/DQ in float, which
    /// says nothing about ONNX Runtime's or OpenVINO's integer kernels).
    #[arg(long)]
    pub latency: bool,
    /// Most memory one buffer sized from the model may take (synthetic inputs, calibration
    /// batches, activations), e.g. `8G`, `512M` or bytes. Default: half of physical memory.
    #[arg(long, value_name = "SIZE")]
    pub max_memory: Option<String>,
    /// Go on when float weights hold NaN or inf (refused by default): the nodes reading them
    /// stay float and the report names them.
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Stop each rule-driven pass after N rewrites (to bisect a bad rewrite).
    #[arg(long, value_name = "N", hide_short_help = true)]
    pub max_patches: Option<usize>,
    /// Print nothing but errors.
    #[arg(short, long)]
    pub quiet: bool,
    /// Worker threads for calibration, validation and the passes' parallel work (default: one
    /// per core). The output bytes and the report's figures are the same whatever the count.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
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
    pub image: ImageArgs,
    /// Activation range method: percentile, percentile:P, minmax, mse, entropy, or auto (each
    /// tensor's range chosen among percentile, minmax and mse by the error it causes at the
    /// outputs on calibration samples). Default: the target's (percentile; mse for --target
    /// openvino).
    #[arg(long, value_name = "METHOD", help_heading = "Quantization")]
    pub method: Option<String>,
    /// Percentile for --method percentile (alone, it selects that method).
    #[arg(long, value_name = "P", help_heading = "Quantization")]
    pub percentile: Option<f64>,
    /// --method auto: calibration samples each candidate assignment is scored on (default: as
    /// many as a fixed activation-element budget affords, 16 to 256: all of them on small models).
    #[arg(long, value_name = "N", help_heading = "Quantization")]
    pub auto_samples: Option<usize>,
    /// --method auto: contiguous blocks of tensors refined one after the other, each costing
    /// two more scored assignments (default 0: one method for every tensor; blocks changed no
    /// choice on ten of eleven benchmark models).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        help_heading = "Quantization"
    )]
    pub auto_blocks: usize,
    /// --method auto: candidates tried per block besides its current one (1-2).
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2), help_heading = "Quantization")]
    pub auto_alternatives: u8,
    /// Moving-average min-max with this averaging constant (minmax only), e.g. 0.01.
    #[arg(long, value_name = "A", help_heading = "Quantization")]
    pub moving_average: Option<f32>,
    /// Per-tensor weight scales instead of per-channel.
    #[arg(long, help_heading = "Quantization")]
    pub per_tensor: bool,
    /// Symmetric int8 activations instead of asymmetric uint8.
    #[arg(long, help_heading = "Quantization")]
    pub symmetric_activations: bool,
    /// Activation quantization: static (calibrated Q/DQ pairs), dynamic (DynamicQuantizeLinear +
    /// MatMulInteger on linear layers, ranges taken at run time) or auto (transformers: both
    /// scored by output error on calibration samples, dynamic kept unless static is clearly
    /// better; other models: static).
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        help_heading = "Quantization"
    )]
    pub activations: ActivationsArg,
    /// Transformers: SmoothQuant migration of activation outliers into the weights after each
    /// LayerNorm: auto (none, 0.5 or 0.75, whichever gives the lowest output error on
    /// calibration samples), off, or a strength in [0, 1].
    #[arg(
        long,
        default_value = "auto",
        value_name = "auto|off|ALPHA",
        help_heading = "Quantization"
    )]
    pub smooth: String,
    /// Transformers: also quantize the attention products (Q x K^T, attention x V), which auto
    /// otherwise keeps float unless they measure harmless.
    #[arg(long, help_heading = "Quantization")]
    pub int8_attention: bool,
    /// Models with If branches holding Conv/Gemm/MatMul (silero-vad): Q/DQ on the activations
    /// inside the branches the calibration data takes (on), or float activations there with
    /// int8 weights only (off, the default: on costs silero_vad_op18_ifless 0.19 point of
    /// speech F1; BENCHMARKS.md).
    #[arg(
        long,
        value_name = "on|off",
        default_value = "off",
        value_parser = ["on", "off"],
        help_heading = "Quantization"
    )]
    pub body_activations: String,
    /// 7-bit weights, for ONNX Runtime's u8xs8 kernels on x86 CPUs without VNNI.
    #[arg(long, help_heading = "Quantization")]
    pub reduce_range: bool,
    /// Names of the added Q/DQ tensors and nodes: compact ids (a7_s, w3_q, ...; ~1% smaller
    /// files) or descriptive ({tensor}_scale, {tensor}_QuantizeLinear, ...).
    #[arg(
        long,
        value_enum,
        default_value = "compact",
        help_heading = "Quantization"
    )]
    pub names: NamesArg,
    /// Weight rounding: nearest, stochastic (seeded by --seed) or adaround (Conv/Gemm/MatMul
    /// weights: each layer's rounding learned to reproduce the float layer's output on --calib,
    /// see --adaround-inputs; costs minutes, the report says how long).
    #[arg(
        long,
        value_enum,
        default_value = "nearest",
        help_heading = "Quantization"
    )]
    pub rounding: RoundingArg,
    /// Adam iterations per layer of --rounding adaround.
    #[arg(long, default_value_t = 1000, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = "Quantization")]
    pub adaround_iterations: u64,
    /// Time budget of --rounding adaround's optimization in seconds: fewer iterations per layer
    /// (by a fixed cost model, so the output stays deterministic).
    #[arg(long, value_name = "SECONDS", help_heading = "Quantization")]
    pub adaround_budget: Option<f64>,
    /// What --rounding adaround fits each layer on: float (the float model's input to the layer,
    /// one run over --calib) or quantized (the input in the quantized upstream model, as AIMET;
    /// also corrects upstream error: higher output SQNR at W4A8 on five models, not a better
    /// task metric, 2-7x slower).
    #[arg(
        long,
        value_enum,
        default_value = "float",
        help_heading = "Quantization"
    )]
    pub adaround_inputs: AdaroundInputsArg,
    /// --adaround-inputs quantized: layers are learned in this many stages in graph order, each
    /// reading its inputs from the model with every earlier stage's learned weights (default 0:
    /// one layer per stage, as AIMET; two runs over --calib per stage; 4 stages collapsed
    /// PP-OCRv4 rec and MobileNetV2 at W4A8).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        help_heading = "Quantization"
    )]
    pub adaround_stages: usize,
    /// --rounding adaround: fit the layers whose output only a Relu or Clip reads on the
    /// activated outputs (the activation inside the loss, as AIMET; stored input rows in
    /// mini-batches). Helped W8A8 on small CNNs, not W4A8 on MobileNetV2 or ResNet-18.
    #[arg(long, help_heading = "Quantization")]
    pub adaround_activation_loss: bool,
    /// W4A8: int4 Conv/Gemm/MatMul weights (per channel, or per block of --block-size N input
    /// values; opset-21 DequantizeLinear of INT4, for ONNX Runtime) with int8 activations on
    /// every layer the rules cover; the first and the last layer and depthwise convs keep int8
    /// weights (--w4a8-all-layers: those too). Not --weight-bits 4, which is int4
    /// weight-only with float activations for language models.
    #[arg(long, help_heading = "Quantization")]
    pub w4a8: bool,
    /// With --w4a8: int4 weights in the first and the last layer and depthwise convs too.
    #[arg(long, requires = "w4a8", help_heading = "Quantization")]
    pub w4a8_all_layers: bool,
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
    /// The runtime the output is placed for: ort (default: int8 where ONNX Runtime's integer
    /// kernels pay for their Q/DQ; layer regions too small to do so stay float, the report says which),
    /// openvino (Q/DQ on the activation inputs of Conv/Gemm/MatMul only, as OpenVINO's
    /// low-precision transformations expect), generic (int8 activations around every op with a
    /// rule, int8 weights) or tract (int8 weights behind DequantizeLinear, which tract folds at
    /// load; activations float, so the output runs at fp32 speed in a quarter of the bytes).
    #[arg(long, value_enum, default_value = "ort", help_heading = "Quantization")]
    pub target: TargetArg,

    // ---- weight-only ----
    /// 4: store every MatMul/Gemm weight (the LM head included) as int4 in blocks of
    /// --block-size (default 32) along the input axis, activations float (no int8 activations),
    /// each layer rounded by GPTQ, a clipping search or round-to-nearest, whichever gives the
    /// lowest output error on --calib (layers fed by a LayerNormalization after an
    /// activation-aware channel scaling folded into it); Gather tables and layers narrower than
    /// one block go int8. For language models. Not with --target-size / --avg-bits.
    #[arg(long, value_name = "BITS", value_parser = ["4", "8"], help_heading = "Weight-only")]
    pub weight_bits: Option<String>,
    /// How int4 weights are written: matmulnbits (com.microsoft.MatMulNBits, run by ONNX
    /// Runtime and by tract on its Q4_0 kernels) or dq (opset-21 block-wise DequantizeLinear of
    /// INT4, ONNX Runtime only: tract 0.23.9 cannot load INT4).
    #[arg(
        long,
        value_enum,
        default_value = "matmulnbits",
        help_heading = "Weight-only"
    )]
    pub weight_format: WeightFormatArg,
    /// int4 rounding: auto (per layer, the lowest output error on --calib) or one of nearest,
    /// clip, gptq for every layer.
    #[arg(long, value_enum, default_value = "auto", help_heading = "Weight-only")]
    pub weight_rounding: WeightRoundingArg,

    // ---- equalization ----
    /// Move biases past ReLU layers where activations stay linear (high-bias absorption).
    #[arg(long, help_heading = "Equalization")]
    pub absorb_high_bias: bool,
    /// Cross-layer equalization: auto (skipped when per-channel int8 weights follow; before
    /// per-tensor weights, with --calib each pair is kept only where it lowers the quantized
    /// output error on the calibration data, without --calib every pair), measured (that gate
    /// before per-channel weights too), always (every pair) or off. Naming `equalize` in
    /// --passes means always.
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        help_heading = "Equalization"
    )]
    pub equalize: EqualizeArg,
    /// Bias correction for quantized weights: off, empirical (needs --calib), analytic (from
    /// the folded BatchNormalization statistics, data-free) or auto (empirical, kept per layer
    /// only where it lowers the quantized output error on --calib; off without --calib).
    #[arg(long, value_enum, default_value = "off", help_heading = "Equalization")]
    pub bias_correction: BiasCorrectionArg,

    // ---- pruning ----
    /// Remove this fraction of the channels of prunable groups (e.g. 0.3). `auto` (with
    /// --target-size and --calib): channels and bits share the one size budget. Plans that prune
    /// 0-60% of the weights (channels chosen by predicted loss per weight) each get the
    /// precisions that minimize the Hessian-predicted loss in the bytes left; each plan is built
    /// and measured on the calibration data, and the least measured loss wins (0% = precision
    /// alone, so never worse on that data). The report has every plan and the size frontier,
    /// predicted and measured. A flag rather than automatic, so plain --target-size runs stay as
    /// they were and the extra model runs are asked for. Without `auto`, --target-size spends its
    /// budget on precisions only, after any pruning asked for with --prune-flops.
    #[arg(long, value_name = "FRACTION|auto", help_heading = "Pruning")]
    pub prune: Option<String>,
    /// Remove this fraction of the MACs (e.g. 0.3 keeps at most 70%); wins over --prune.
    #[arg(long, value_name = "FRACTION", help_heading = "Pruning")]
    pub prune_flops: Option<f64>,
    /// Rank channels over all layers (global) or within each layer (per-layer).
    #[arg(long, value_enum, default_value = "global", help_heading = "Pruning")]
    pub prune_ranking: RankingArg,
    /// Channel criterion: loss (second-order cost of removal with least-squares refit,
    /// per-group cost curves; needs --calib, else combined), l1, l2, bn-gamma, activation or
    /// combined.
    #[arg(long, value_enum, default_value = "loss", help_heading = "Pruning")]
    pub prune_criterion: CriterionArg,
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
    #[arg(
        long,
        value_enum,
        default_value = "least-squares",
        help_heading = "Pruning"
    )]
    pub reconstruct: ReconstructArg,

    // ---- mixed precision ----
    /// Size budget for Hessian-guided mixed precision: bytes of weights (e.g. 2000000) or a
    /// fraction of the fp32 weight bytes (e.g. 0.2 or 20%). Enables the mixed-precision pass;
    /// with --prune auto, pruning shares the budget.
    #[arg(
        long,
        value_name = "BYTES|RATIO|PERCENT",
        help_heading = "Mixed precision"
    )]
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
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        help_heading = "Mixed precision"
    )]
    pub hessian_loss: HessianLossArg,
    /// How precisions are chosen. joint: minimize the second-order loss of the actual
    /// quantization errors with cross-layer terms (3 extra runs of each layer's downstream part;
    /// measured better on the digits models, BENCHMARKS.md). trace: HAWQ-v2, minimize
    /// Σ Tr(H)/n·‖ΔW‖² exactly (per-layer additive).
    #[arg(
        long,
        value_enum,
        default_value = "joint",
        help_heading = "Mixed precision"
    )]
    pub selection: SelectionArg,
    /// int4 weights in blocks of N values along the input-channel axis, one scale per block
    /// (ONNX block-wise DequantizeLinear, opset 21); layers whose input axis is shorter than N
    /// stay per output channel. Default: per output channel (with --weight-bits 4: 32). Also
    /// applies to --w4a8's int4 weights (their biases then stay float).
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

    // ---- decoders with a KV cache ----
    /// A state pair fed back step by step: input IN takes output OUT of the previous step
    /// (`IN=OUT:AXIS` names the axis that grows); repeatable. Pairs named like
    /// past_key_values.N.key / present.N.key (or past* / present*) are found without it.
    #[arg(
        long = "state",
        value_name = "IN=OUT",
        help_heading = "KV-cache decoders"
    )]
    pub states: Vec<String>,
    /// Decode steps (one token each, present fed back as past) run after the prefill of each
    /// calibration window.
    #[arg(long, value_name = "N", default_value_t = onnx_compress::calibrate::sequence::DEFAULT_DECODE_STEPS, help_heading = "KV-cache decoders")]
    pub decode_steps: usize,
    /// Prefill length of each calibration window. Default: the window less --decode-steps.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), help_heading = "KV-cache decoders")]
    pub prefill: Option<u64>,
    /// Greedy tokens both models generate per prompt to validate the output (0: no check).
    #[arg(long, value_name = "N", default_value_t = onnx_compress::validate::generate::DEFAULT_GENERATE_STEPS, help_heading = "KV-cache decoders")]
    pub generate_steps: usize,
    /// Prompts for the generation check (token ids, .npy [N, p]). Default: the --eval windows,
    /// else the calibration windows.
    #[arg(long, value_name = "FILE", help_heading = "KV-cache decoders")]
    pub prompts: Option<PathBuf>,
    /// Quantize the cache tensors (past inputs, present outputs) too; by default they stay
    /// float.
    #[arg(long, help_heading = "KV-cache decoders")]
    pub quantize_cache: bool,

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

// The value enums. Variants carry no doc comments on purpose: clap would then list each value
// with its text in `--help`, and the help snapshots show them inline.

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    Ort,
    Openvino,
    Generic,
    Tract,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightFormatArg {
    #[value(name = "matmulnbits")]
    MatMulNBits,
    Dq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WeightRoundingArg {
    Auto,
    Nearest,
    Clip,
    Gptq,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ActivationsArg {
    Static,
    Dynamic,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NamesArg {
    Compact,
    Descriptive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AdaroundInputsArg {
    Float,
    Quantized,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoundingArg {
    Nearest,
    Stochastic,
    Adaround,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EqualizeArg {
    Auto,
    Measured,
    Always,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BiasCorrectionArg {
    Off,
    Empirical,
    Analytic,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RankingArg {
    Global,
    PerLayer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CriterionArg {
    L1,
    L2,
    BnGamma,
    Activation,
    Combined,
    Loss,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReconstructArg {
    LeastSquares,
    Bias,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HessianLossArg {
    Auto,
    Kl,
    Mse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SelectionArg {
    Joint,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutArg {
    Nchw,
    Nhwc,
}

/// Image options on the command line (flattened into the main command and `sensitivity`).
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// Resize calibration images to exactly WxH (triangle/bilinear filter); default: the
    /// model input's fixed height and width.
    #[arg(long, value_name = "WxH", value_parser = parse_resize, help_heading = "Calibration images")]
    pub resize: Option<(usize, usize)>,
    /// Per-channel mean subtracted after --scale, e.g. 0.485,0.456,0.406 (one value: all channels).
    #[arg(long, value_name = "R,G,B", value_parser = parse_channel_values, help_heading = "Calibration images")]
    pub mean: Option<ChannelValues>,
    /// Per-channel divisor applied after --mean, e.g. 0.229,0.224,0.225.
    #[arg(long, value_name = "R,G,B", value_parser = parse_channel_values, help_heading = "Calibration images")]
    pub std: Option<ChannelValues>,
    /// Layout of the model's image input: nchw or nhwc; default: inferred (channel dim 1 or 3).
    #[arg(
        long,
        value_name = "LAYOUT",
        value_enum,
        help_heading = "Calibration images"
    )]
    pub layout: Option<LayoutArg>,
    /// Multiplies 0..255 pixel values before --mean/--std: a number or a fraction like 1/255.
    #[arg(long, value_name = "S", default_value = "1/255", value_parser = parse_scale, help_heading = "Calibration images")]
    pub scale: f64,
}

impl ImageArgs {
    /// The library options these flags stand for.
    pub fn options(&self) -> ImageOptions {
        let d = ImageOptions::default();
        ImageOptions {
            resize: self.resize,
            layout: self.layout.map(|l| match l {
                LayoutArg::Nchw => Layout::Nchw,
                LayoutArg::Nhwc => Layout::Nhwc,
            }),
            scale: self.scale,
            mean: self.mean.clone().map_or(d.mean, |v| v.0),
            std: self.std.clone().map_or(d.std, |v| v.0),
        }
    }
}

/// One option value holding a list (a newtype: clap reads `Option<Vec<_>>` as a repeated option).
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelValues(pub Vec<f32>);

fn parse_channel_values(s: &str) -> std::result::Result<ChannelValues, String> {
    parse_channels(s).map(ChannelValues)
}
