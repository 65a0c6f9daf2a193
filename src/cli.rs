//! The command line: a thin layer over the library.

use crate::ir::Model;
use crate::onnx::{load, save};
use crate::passes::{self, PassContext, PassRecord};
use crate::report::stats::{self, ModelStats, ValueSummary};
use crate::validate::{self, ValidateOptions, ValidationReport};
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::{Path, PathBuf};
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
    /// Seed of synthetic validation inputs.
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
    let (original, info) = load::read_model(input)?;
    let mut model = Model::from_proto(original.clone())
        .with_context(|| format!("{}: invalid model", input.display()))?;
    let input_shapes = parse_shapes(&model, &args.input_shapes)?;
    let stats_before = stats::model_stats(
        &model,
        &stats::inferred_shapes(&model, &original, &input_shapes),
    );

    let ctx = PassContext {
        max_patches: args.max_patches,
        ..Default::default()
    };
    let records = passes::run_passes(&mut model, &names, &ctx)?;

    let out_proto = model.to_proto()?;
    let save_opts = save::SaveOptions {
        external_data: args.external_data || info.had_external_data,
        ..Default::default()
    };
    save::save_proto(out_proto.clone(), output, &save_opts)?;
    let validation = if args.no_validate {
        None
    } else {
        let opts = ValidateOptions {
            seed: args.seed,
            samples: args.samples,
            input_shapes: input_shapes.clone(),
            ..Default::default()
        };
        // The output is written: a validation that cannot run is reported, not a failure.
        Some(
            validate::validate(&original, &out_proto, &opts)
                .unwrap_or_else(|e| ValidationReport::not_checked(format!("{e:#}"))),
        )
    };
    let out_bytes = std::fs::metadata(output)?.len()
        + if save_opts.external_data {
            std::fs::metadata(output.with_file_name(format!(
                "{}.data",
                output.file_name().unwrap_or_default().to_string_lossy()
            )))
            .map(|m| m.len())
            .unwrap_or(0)
        } else {
            0
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
        seconds_total: start.elapsed().as_secs_f64(),
    };
    if !args.quiet {
        print_summary(&report);
    }
    if let Some(path) = &args.report {
        write_json(path, &report)?;
    }
    Ok(())
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
    tmp.persist(path)
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
