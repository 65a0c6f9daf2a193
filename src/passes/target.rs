//! Runtime targets as data: one [`Policy`] per runtime the output is meant for, read by the
//! passes that place quantization (`quantize` asks whether activations join an int8 region,
//! which region boundaries are worth their Q/DQ, whether layer outputs are quantized;
//! `weight-only` which ops get their constant weights stored as int8 behind a
//! DequantizeLinear). No pass tests `target == ...`; a new runtime is one more constant here
//! and one more [`Target`] variant. The CLI default is `ort`; the library default stays
//! `generic` (today's placement, byte-identical outputs).
//!
//! | target | int8 activations (`quantize`) | weight-only int8 (`weight-only`) |
//! |---|---|---|
//! | `ort` | before placement, shape arithmetic under a dynamic batch folded to constants (`batch-shapes`) and scalar Conv affines folded into the Conv (`conv-affine`); the `quantize` rules plus Slice as a pass-through op and Shape reading the int8 tensor, then per int8 region: kept only when its Conv/Gemm/MatMul MACs exceed the cost of its boundaries ([`ORT_BOUNDARY_COST`]); a transformer's Conv layers by the CNN rules, calibrated (static) | LSTM, GRU, RNN, Gather only (a DQ before a float Conv runs at every inference in ORT) |
//! | `openvino` | Q/DQ only on the activation inputs of Conv/ConvTranspose/Gemm/MatMul (NNCF's placement), static on transformers too; kept float one by one ([`OPENVINO_FLOAT_LAYERS`]): depthwise convs unless their output (through a Relu/Clip) only feeds heavy ops, convs below 1.5 M MACs, an image stem (a Conv on a graph input of fewer than 4 channels) below 100 M MACs, Gemm/MatMul with fewer than 16384 weight values | LSTM, GRU, RNN, Gather |
//! | `generic` | today's maximal placement | the weight-heavy ops without integer kernels (LSTM, GRU, RNN, Gather tables) and any Conv/ConvTranspose/Gemm/MatMul weight the activation rules left float |
//! | `tract` | none: activations stay float | every Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU/RNN/Gather weight, in chunks of at most 4 MiB of float (what tract folds at load) |
//!
//! Evidence behind `ort` (ONNX Runtime 1.32 CPU, 1 thread, batch 1, `benches/runtime_speed.py`,
//! BENCHMARKS.md "Runtime targets"): under `generic`, MobileNetV3-small ran at 0.80x fp32 and
//! PP-OCR cls at 0.64x. Profiles of the ORT-optimized graphs: QLinearConv saves little on
//! these thin layers (MobileNetV3-small: 2.4 ms QLinearConv vs 3.2 ms Conv in profile), while
//! every HardSwish (no integer kernel) splits the int8 region and costs a DequantizeLinear, a
//! QuantizeLinear and NHWC<->NCHW Transposes (18 Transposes, 29 Q, 30 DQ). Boundary cost
//! constants: at 100k MACs + 40 per value MobileNetV3-small kept part int8 and measured 0.63x;
//! at 400k + 150 its regions all go float (1.0x) while ResNet-18, ConvNeXt, MobileNetV2,
//! ShuffleNetV2 and EfficientNet-B0 keep their single large region. PP-OCRv4 rec: `generic`
//! placed it by the transformer table (dynamic MatMul only) with its conv weights
//! weight-only, and ORT then ran the float Convs 1.9x slower (17.0 -> 32.4 ms: DQ at every
//! run, no NCHWc kernels); `ort` quantizes its convs statically.
//!
//! Second round (BENCHMARKS.md "Third run", CPU-time ratios): ShuffleNetV2 splits channels
//! with two Slices and recomputes its reshape targets from `Shape` at every run (dynamic
//! batch); a float Slice ended each int8 region, and each Shape of a dequantized tensor ran a
//! DequantizeLinear and counted as a region boundary, so the region rule left 42 of 57 layers
//! float (1.15x). With Slice carrying its input's grid (ORT runs it on uint8) and Shape reading
//! the int8 tensor: 57/57 int8, 1.41x. Measured and left off (`decompose`, `scalar_operands`):
//! HardSwish/HardSigmoid decomposed into QLinearAdd/QLinearMul (see
//! [`crate::passes::quantize::decompose`]) make MobileNetV3-small entirely int8 in ORT, yet
//! 0.90-0.98x fp32 (its stem and depthwise QLinearConvs are slower than ORT's NCHWc float
//! kernels, which fuse HardSwish), and PP-OCRv4 rec 2.1-2.3x but at 7-9 dB SQNR (19 dB float
//! backbone); SiLU stays QLinearSigmoid + QLinearMul (EfficientNet-B0 1.05x; float SiLU 0.84x).
//!
//! Third round (branch effspeed, BENCHMARKS.md "issue 20, session 12, branch effspeed";
//! CPU-time ratios, interleaved against main's outputs): two float rewrites before placement
//! in the `ort` row. `batch-shapes` ([`crate::passes::quantize::batch_shapes`]): ShuffleNetV2
//! (dynamic batch) recomputed its 32 reshape targets and 26 slice bounds from `Shape` at every
//! run (80 Gather, 80 Unsqueeze, 29 Shape, 29 Div, 32 Concat on int64 scalars: ~20% of its
//! ORT profile); folded, 1.62x -> 1.80x at the same SQNR. `conv-affine`: PP-OCRv4 rec's 28
//! Conv -> Mul -> Add (learnable scalar affine) folded into the Conv, 1.26x -> 1.34x, SQNR
//! 19.12 -> 19.01 dB. The other nine zoo models are byte-identical. EfficientNet-B0, profiled
//! per op: every op already runs on an integer kernel (QLinearConv, QLinearSigmoid,
//! QLinearMul, QLinearGlobalAveragePool); what keeps it near 1.4x is that SiLU as
//! QLinearSigmoid + QLinearMul costs 1.6x ORT's fused float QuickGelu, and the depthwise and
//! stem QLinearConvs are slower than the NCHWc float ones. Moving the depthwise convs (with
//! their SiLU and squeeze-excitation) or the SiLUs to float measured slower (boundaries:
//! Reorders, Transposes, Q, DQ), so its placement is unchanged.
//!
//! The fidelity guard ([`Policy::guard`], [`crate::passes::quantize::guard`]) measures in tract
//! what each layer those rules add costs and keeps only what fits 0.5 dB of the conservative
//! placement; it is `None` in every row. Measured with it on in `ort` (decompositions and
//! scalar operands on, BENCHMARKS.md "Fidelity guard"): seven of the eight issue-20 models
//! byte-identical to `ort` (MobileNetV3-small's conservative output is all float, which no int8
//! layer matches within a relative margin; six have no optional layer). PP-OCRv4 rec: 19
//! groups measured (25 tract plans, +50 s), 2 kept, whose regions the boundary rule then drops:
//! today's 4 int8 convs on the decomposed graph (conv-affine folded), 18.85 dB / 1.35x against
//! `ort`'s 19.12 dB / 1.25x in the same run, one measurement at load 8-10. Not switched on yet:
//! the speed comes from the float rewrites, not from a kept int8 layer, and one run is not a
//! default (see BENCHMARKS.md for what is left to check).
//!
//! Evidence behind `openvino` (OpenVINO 2026.4 CPU plugin): the runtime graph's
//! `runtimePrecision` shows u8 convolutions either way; quantizing only the heavy ops' inputs
//! lets the low-precision transformations choose output precisions themselves, and static
//! activations replace the dynamic MatMul that OpenVINO ran in float (ConvNeXt-tiny under
//! `generic`: 0/59 int8 layers, 0.42x; under `openvino`: 59/59).
//!
//! Per-layer rule of `openvino` (BENCHMARKS.md "Runtime targets: openvino per-layer rule"):
//! OpenVINO runs the fp32 file's float layers in bf16 by default on a CPU with AVX512-BF16
//! (the benchmark machine's), so an int8 kernel competes with a bf16 one, not an f32 one.
//! Per-layer profiles (`PERF_COUNT`, fp32 file and `openvino` output interleaved) over six
//! CNNs (MobileNetV3-small, PP-OCR cls, EfficientNet-B0, ShuffleNetV2, MobileNetV2,
//! ResNet-18), u8 time against the fp32 file's: depthwise convs 0.65-0.94x as fast in every
//! model and MAC range; pointwise convs below 1 M MACs 0.74-0.82x, 1-2 M 1.02x, 2-4 M 1.34x,
//! above 4 M 1.6-3x; linear layers 1.3-1.7x from 0.6 M weights (PP-OCR cls's 400-weight FC
//! 1.07x, noise). Keeping the depthwise convs float: EfficientNet-B0 1.09x -> 1.14x,
//! MobileNetV3-small 0.98-1.03x -> 1.02-1.05x, but MobileNetV2 1.31x -> 1.18x: there the
//! depthwise conv sits between two int8 pointwise convs behind a Relu6, and float costs a
//! layout reorder at each end and bf16 instead of u8 expanded tensors (+300 us of Reorders
//! in its profile), hence the chain exception. PP-OCR cls (largest conv 1.23 M MACs, all
//! layers float): 0.79x -> 1.0x (an all-float file; int8 cannot pay on layers this thin).
//! The stem conv (3 input channels, plus the input's FakeQuantize and reorder): see the stem
//! rule below. Untuned checks: ResNet-50,
//! RegNetX-400MF, DenseNet-121 and SqueezeNet 1.1 have no layer the rule touches at 1.5 M
//! (byte-identical outputs; at a 2 M floor 2-16 of their layers went float, 1-2% slower).
//!
//! Stem rule of `openvino` (BENCHMARKS.md "issue 20, session 13: the stem"): a Conv reading
//! the image input (fewer than 4 channels: u8 dot products run over groups of 4 input
//! channels, so 3 channels leave a quarter of each idle) gains little from u8, while
//! quantizing the image costs output SQNR. Float stem vs u8 stem, `openvino` output, OpenVINO
//! speedup and ORT SQNR on eval.npy (interleaved, 3 repeats): ConvNeXt-tiny (14 M MACs) 1.47x
//! -> 1.46x, +0.32 dB; MobileNetV2 (11 M) 1.31x -> 1.28x, +0.28 dB; MobileNetV3-small (5 M)
//! 1.04x -> 1.08x, +0.61 dB; ShuffleNetV2 (8 M) 1.11x -> 1.13x, +0.07; PP-OCRv4 rec 1.34x ->
//! 1.34x, +0.08; EfficientNet-B0 (11 M) 1.13x -> 1.14x, -0.13 dB; untuned checks RegNetX-400MF
//! (11 M) 1.52x -> 1.49x, +0.38 dB; SqueezeNet 1.1 (21 M) 1.47x -> 1.45x, -0.13 dB; PP-OCRv3 det
//! 1.44x -> 1.45x, +0.00; ViT-S/16's patch embedding (58 M) 1.62x -> 1.59x, +0.42 dB.
//! ResNet-18's 7x7 stem (118 M MACs) pays in u8: float 1.77x -> 1.66x (+0.46 dB), hence the
//! 100 M bound (ResNet-50, DenseNet-121: 118 M, unchanged).
//!
//! Range method of `openvino` ([`Policy::activation_method`], BENCHMARKS.md "openvino fidelity"):
//! the CLI calibrates its activation ranges by quantization MSE, not by the 99.999th
//! percentile, unless `--method`/`--percentile` is given. PP-OCRv4 rec under `openvino` lost 8
//! dB to one range: `p2o.Conv.2`'s input (HardSwish + affine shift, a quarter of its values one
//! constant per channel on the text lines' background) quantized alone cost 15.6 dB of output
//! SQNR; weights alone (per-channel, 30-47 dB each) 18.0 dB on 16 lines. Its MSE range alone
//! took the output from 12.2 to 17.9 dB; the whole MSE output measured 18.1 dB on 200 lines
//! (percentile 10.3, `ort` 19.1) and character accuracy 99.89% (= fp32; percentile 99.43%).
//! The other ten models checked moved by -0.4..+0.14 dB (EfficientNet-B0 -0.24,
//! MobileNetV3-small -0.40, ConvNeXt-tiny +0.14); `ort`/`generic`/`tract` keep the percentile.
//!
//! Evidence behind `tract` (issue 20, measured with tract-onnx 0.23.9): tract runs Q/DQ graphs
//! in float, about 2x slower than fp32, and QLinearConv about 50x slower; DequantizeLinear of a
//! constant is folded at load when its float output stays within 4 MiB (see
//! [`Policy::split_weights_above`]), so int8 weights cost nothing at run time and the file is
//! ~4x smaller.

use serde::Serialize;

/// The runtime an output is placed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Maximal int8 placement (QDQ around every op with a rule), for any runtime.
    #[default]
    Generic,
    /// Weights stored compressed, activations float: tract folds constant DequantizeLinear at
    /// load and runs the float kernels.
    Tract,
    /// ONNX Runtime (CPU): int8 only where a QLinear kernel is faster than float plus the
    /// Q/DQ it needs.
    Ort,
    /// OpenVINO (CPU): NNCF-style placement, int8 on the activation inputs of the heavy ops.
    Openvino,
}

/// What one boundary of an int8 region costs, in MACs an int8 kernel must save to break even:
/// `fixed_macs + macs_per_value * values crossing it`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BoundaryCost {
    /// Per boundary (node dispatch of the Q or DQ and of the layout Transpose).
    pub fixed_macs: u64,
    /// Per value crossing it (quantize or dequantize, transpose).
    pub macs_per_value: u64,
}

/// Heavy ops a target keeps float one by one, whatever their int8 region: the layers whose
/// integer kernel is measured slower than the runtime's own float kernel (see
/// [`Policy::float_layers`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FloatLayers {
    /// Depthwise convolutions (`group > 1`, one input channel per group).
    pub depthwise: bool,
    /// A Conv/ConvTranspose doing fewer MACs than this (at the calibration shapes) stays float.
    pub conv_min_macs: u64,
    /// A Gemm/MatMul with a constant weight of fewer values than this stays float (at batch 1
    /// a linear layer reads each weight once, so its int8 gain is the weight bytes it saves).
    pub linear_min_weights: u64,
    /// The stem: a Conv reading a graph input of fewer than 4 channels (an image) with fewer MACs
    /// than this stays float (0 = never): its integer kernel saves nothing (dot products run
    /// over groups of 4 input channels) while the input's quantization costs output SQNR.
    pub stem_max_macs: u64,
}

/// How one target places quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The `--target` value.
    pub name: &'static str,
    /// Calibrated int8 activations around the ops the `quantize` rules cover.
    pub int8_activations: bool,
    /// Why activations stay float, when they do (the note of the skipped `quantize` pass).
    pub float_activations_because: &'static str,
    /// Ops whose constant float weights `weight-only` stores as int8 + DequantizeLinear (the
    /// rows of [`crate::passes::weight_only::RULES`] with these op types apply).
    pub weight_only_ops: &'static [&'static str],
    /// Store a weight-only tensor whose float form exceeds this many bytes as chunks (each
    /// dequantized on its own, then concatenated), `None` = one DequantizeLinear per tensor.
    /// tract 0.23.9's constant folding (`PropConst`) skips a node whose output exceeds
    /// max(its inputs, `CONST_FOLD_MEM_BUDGET` = 4 MiB): one DequantizeLinear of a 2.4 M value
    /// int8 weight then runs at every inference (ResNet-18 `--target tract` measured 1.2x
    /// slower than fp32 that way); chunks of at most 4 MiB fold, and so does their Concat
    /// (output = inputs).
    pub split_weights_above: Option<usize>,
    /// Quantize the outputs of the heavy ops (and what reads them, by the `quantize` rules):
    /// QDQ between consecutive layers, which ORT fuses into QLinearConv chains. `false` = only
    /// the activation inputs of Conv/ConvTranspose/Gemm/MatMul get Q/DQ (OpenVINO's low
    /// precision transformations then decide the output precision themselves).
    pub int8_outputs: bool,
    /// A Conv/ConvTranspose/Gemm/MatMul stays in the int8 region only when its MACs pay for
    /// the region boundaries it sits on (`None` = always): the int8 kernel saves time per MAC,
    /// while each boundary (an input produced, or an output read, by a float op such as
    /// HardSwish) costs a QuantizeLinear or DequantizeLinear and, in ORT, a layout Transpose.
    pub boundary_cost: Option<BoundaryCost>,
    /// Heavy ops kept float one by one (`None` = none), before the regions are formed: where
    /// the runtime's float kernel beats its integer one on that kind of layer.
    pub float_layers: Option<FloatLayers>,
    /// In a graph the transformer table places (a layer norm or attention is present), still
    /// quantize its Conv layers by the CNN rules (a conv backbone before a transformer neck,
    /// as in PP-OCRv4's recognizer).
    pub convs_in_transformers: bool,
    /// `--activations auto` may pick dynamic activations (DynamicQuantizeLinear +
    /// MatMulInteger) on a transformer. OpenVINO runs those in float around an integer MatMul
    /// and is faster with calibrated FakeQuantize (static) placement.
    pub dynamic_activations: bool,
    /// Rewrites run before placement so that ops without an integer kernel become ops with
    /// one ([`crate::passes::quantize::decompose::RULES`], by name): HardSwish and HardSigmoid
    /// into Add/Clip/Mul, a Conv's scalar affine into the Conv; and `batch-shapes`
    /// ([`crate::passes::quantize::batch_shapes`]): shape arithmetic under a dynamic batch
    /// into constants.
    pub decompose: &'static [&'static str],
    /// `Add`/`Mul` of an int8 value and a scalar constant join the int8 region: a positive
    /// gain is absorbed into the DequantizeLinear scale (no op), other constants are stored as
    /// exact uint8 values (QLinearAdd/QLinearMul in ONNX Runtime). See
    /// [`crate::passes::quantize::scalar`].
    pub scalar_operands: bool,
    /// Ops that carry their input's int8 grid on this target, on top of the placement's
    /// pass-through list (they only select values).
    pub pass_through: &'static [&'static str],
    /// `Shape` nodes read the int8 tensor instead of its DequantizeLinear output (same shape),
    /// so a shape computation is no region boundary and runs no DequantizeLinear.
    pub shape_reads_int8: bool,
    /// Measure, in tract on calibration samples, what each layer the `scalar_operands` rules
    /// add to the int8 region costs in output SQNR, and keep only those that fit within a
    /// margin of the placement without them ([`crate::passes::quantize::guard`]). `None` =
    /// every placement the rules make is kept (the other rows' behaviour).
    pub guard: Option<FidelityGuard>,
    /// The activation range method (`--method` syntax, see
    /// [`crate::calibrate::observe::Method::parse`]) the CLI uses when the user names none.
    pub activation_method: &'static str,
}

/// Settings of the fidelity guard ([`crate::passes::quantize::guard`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FidelityGuard {
    /// Output SQNR the kept optional layers together may cost against the conservative
    /// placement, in hundredths of a dB (50 = the 0.5 dB fidelity margin).
    pub margin_centi_db: u32,
    /// Calibration samples each measurement runs (the first of the set, in order).
    pub samples: usize,
}

/// See [`Policy::guard`].
pub const DEFAULT_GUARD: FidelityGuard = FidelityGuard {
    margin_centi_db: 50,
    samples: 16,
};

const GENERIC: Policy = Policy {
    name: "generic",
    int8_activations: true,
    float_activations_because: "",
    split_weights_above: None,
    int8_outputs: true,
    boundary_cost: None,
    convs_in_transformers: false,
    dynamic_activations: true,
    decompose: &[],
    scalar_operands: false,
    pass_through: &[],
    shape_reads_int8: false,
    guard: None,
    activation_method: "percentile",
    // Conv/Gemm/MatMul weights the activation rules quantized are DequantizeLinear outputs by
    // the time `weight-only` runs, so only the ones they skipped (a constant A operand, an
    // excluded consumer's neighbour...) are still float constants here.
    weight_only_ops: &[
        "LSTM",
        "GRU",
        "RNN",
        "Gather",
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
    ],
    float_layers: None,
};

/// Op types whose constant weights every policy stores int8 behind a DequantizeLinear (no
/// integer kernel anywhere).
const NO_INTEGER_KERNEL_OPS: &[&str] = &["LSTM", "GRU", "RNN", "Gather"];

const ORT: Policy = Policy {
    name: "ort",
    int8_activations: true,
    float_activations_because: "",
    split_weights_above: None,
    // A Conv left float keeps its float weight: ORT does not constant-fold DequantizeLinear
    // (it keeps Q/DQ for its fusions), so DQ(W) -> Conv runs the DQ at every inference and
    // loses the NCHWc float kernels (PP-OCRv4 rec: float Conv time 17.0 ms -> 32.4 ms).
    weight_only_ops: NO_INTEGER_KERNEL_OPS,
    int8_outputs: true,
    boundary_cost: Some(ORT_BOUNDARY_COST),
    convs_in_transformers: true,
    dynamic_activations: true,
    // HardSwish/HardSigmoid decompositions and scalar operands make MobileNetV3-small and
    // PP-OCRv4 rec entirely int8 in ORT (QLinearAdd/QLinearMul, no float op left), but
    // measured: MobileNetV3-small 0.90-0.98x fp32 (float: 1.0x; its depthwise and stem
    // QLinearConvs are slower than ORT's NCHWc float kernels), PP-OCRv4 rec 2.1-2.3x at 7-9 dB
    // SQNR instead of 19 dB (BENCHMARKS.md "Runtime targets, third run"). With the fidelity
    // guard (`guard: Some(DEFAULT_GUARD)`) seven issue-20 models came out byte-identical and
    // PP-OCRv4 rec 1.35x / 18.85 dB (vs 1.25x / 19.12 dB) after 50 s of measuring, in one run
    // (BENCHMARKS.md "Fidelity guard"): off until repeated. What is on: two float rewrites
    // (BENCHMARKS.md "issue 20, session 12, branch effspeed"): `conv-affine` (PP-OCRv4 rec's
    // learnable scalar affines folded into its Convs: 1.26x -> 1.34x, 19.12 -> 19.01 dB) and
    // `batch-shapes` (ShuffleNetV2's shape arithmetic under a dynamic batch made constant:
    // 1.62x -> 1.80x, same SQNR); the other nine zoo models byte-identical.
    decompose: &["conv-affine", "batch-shapes"],
    scalar_operands: false,
    pass_through: &["Slice"],
    shape_reads_int8: true,
    float_layers: None,
    guard: None,
    activation_method: "percentile",
};

/// See [`Policy::boundary_cost`] and the module docs (measured on MobileNetV3-small).
pub const ORT_BOUNDARY_COST: BoundaryCost = BoundaryCost {
    fixed_macs: 400_000,
    macs_per_value: 150,
};

const OPENVINO: Policy = Policy {
    name: "openvino",
    int8_activations: true,
    float_activations_because: "",
    split_weights_above: None,
    weight_only_ops: NO_INTEGER_KERNEL_OPS,
    int8_outputs: false,
    boundary_cost: None,
    convs_in_transformers: true,
    dynamic_activations: false,
    decompose: &[],
    scalar_operands: false,
    pass_through: &[],
    shape_reads_int8: false,
    float_layers: Some(OPENVINO_FLOAT_LAYERS),
    guard: None,
    // Ranges by quantization MSE, not the 99.999th percentile: see the module docs ("Range
    // method of `openvino`").
    activation_method: "mse",
};

/// See [`Policy::float_layers`] and the module docs (per-layer OpenVINO profiles of six CNNs:
/// depthwise convolutions ran 0.65-0.94x as fast in u8 as OpenVINO's default float kernels,
/// pointwise convolutions below 1 M MACs 0.74-0.82x, 1-2 M 1.02x, 2-4 M 1.34x).
pub const OPENVINO_FLOAT_LAYERS: FloatLayers = FloatLayers {
    depthwise: true,
    conv_min_macs: 1_500_000,
    linear_min_weights: 16_384,
    stem_max_macs: 100_000_000,
};

const TRACT: Policy = Policy {
    name: "tract",
    int8_activations: false,
    split_weights_above: Some(4 << 20),
    int8_outputs: true,
    boundary_cost: None,
    convs_in_transformers: false,
    dynamic_activations: true,
    decompose: &[],
    scalar_operands: false,
    pass_through: &[],
    shape_reads_int8: false,
    guard: None,
    activation_method: "percentile",
    float_activations_because: "target tract: activations stay float (tract runs QuantizeLinear/DequantizeLinear graphs in float, measured ~2x slower than fp32); weights are stored int8 by weight-only",
    weight_only_ops: &[
        "LSTM",
        "GRU",
        "RNN",
        "Gather",
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
    ],
    float_layers: None,
};

impl Target {
    /// This target's placement policy.
    pub fn policy(self) -> &'static Policy {
        match self {
            Target::Generic => &GENERIC,
            Target::Tract => &TRACT,
            Target::Ort => &ORT,
            Target::Openvino => &OPENVINO,
        }
    }
}

impl Policy {
    /// Whether `weight-only` stores `op`'s constant weights as int8 under this policy.
    pub fn weight_only(&self, op: &str) -> bool {
        self.weight_only_ops.contains(&op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ops without integer kernels anywhere we ship to, whose weights dominate recurrent and
    /// embedding models (ddddocr's CRNN: the LSTM holds a third of the parameters).
    const NO_INTEGER_KERNEL: &[&str] = &["LSTM", "GRU", "RNN", "Gather"];

    #[test]
    fn every_policy_covers_the_ops_without_integer_kernels() {
        for t in [
            Target::Generic,
            Target::Tract,
            Target::Ort,
            Target::Openvino,
        ] {
            for op in NO_INTEGER_KERNEL {
                assert!(t.policy().weight_only(op), "{op} under {}", t.policy().name);
            }
        }
        assert!(Target::Generic.policy().int8_activations);
        assert!(!Target::Tract.policy().int8_activations);
    }

    #[test]
    fn only_ort_rewrites_before_placement_and_every_name_is_known() {
        // generic bytes must not change; ort folds scalar conv affines and batch shapes.
        for t in [Target::Generic, Target::Tract, Target::Openvino] {
            assert!(t.policy().decompose.is_empty(), "{}", t.policy().name);
        }
        let ort = Target::Ort.policy().decompose;
        assert!(ort.contains(&"conv-affine") && ort.contains(&"batch-shapes"));
        let rules = crate::passes::quantize::decompose::rules(ort);
        for name in ort {
            assert!(
                *name == crate::passes::quantize::decompose::BATCH_SHAPES
                    || rules.iter().any(|(n, _)| n == name),
                "unknown decomposition {name}"
            );
        }
    }

    #[test]
    fn only_openvino_keeps_layers_float_one_by_one() {
        // ORT, generic and tract outputs do not change with the per-layer rule.
        for t in [Target::Generic, Target::Tract, Target::Ort] {
            assert_eq!(t.policy().float_layers, None, "{}", t.policy().name);
        }
        let f = Target::Openvino
            .policy()
            .float_layers
            .expect("openvino rule");
        assert!(f.depthwise && f.conv_min_macs > 0 && f.linear_min_weights > 0);
    }

    #[test]
    fn every_default_range_method_parses_and_only_openvino_leaves_the_percentile() {
        use crate::calibrate::observe::Method;
        for t in [Target::Generic, Target::Tract, Target::Ort] {
            let m = Method::parse(t.policy().activation_method).unwrap();
            assert_eq!(m, Method::DEFAULT_FIXED, "{}", t.policy().name);
        }
        let ov = Method::parse(Target::Openvino.policy().activation_method).unwrap();
        assert_eq!(ov, Method::Mse);
    }
}
