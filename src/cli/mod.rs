//! The command line, the binary's own module (not part of the library): parse arguments
//! ([`args`], recipes in [`recipe`]), turn them into library options ([`options`]), call
//! [`onnx_compress::session`], print what comes back ([`print`]).

mod args;
mod options;
mod print;
mod recipe;

use anyhow::{bail, Result};
use args::{Cli, Command, CompressArgs, InspectArgs, SensitivityArgs};
use onnx_compress::session::{self, write};

/// The clap command with recipe support: later options override earlier ones.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().args_override_self(true)
}

/// Longest error line printed: tract's messages can carry a debug dump of its graph patch
/// (kilobytes over many lines); the cause chain before it says what went wrong.
const ERROR_LINE_MAX_CHARS: usize = 1500;

/// The whole cause chain of `e` as one line (outermost first): line breaks inside a message
/// become spaces, and a line past [`ERROR_LINE_MAX_CHARS`] is cut with a marker.
pub fn error_line(e: &anyhow::Error) -> String {
    let flat = format!("{e:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    match flat.char_indices().nth(ERROR_LINE_MAX_CHARS) {
        Some((cut, _)) => format!("{} ... (cut)", &flat[..cut]),
        None => flat,
    }
}

/// Parse the process arguments (expanding `--config` recipes) and run.
pub fn main_with_args(args: Vec<std::ffi::OsString>) -> Result<()> {
    use clap::FromArgMatches;
    let cmd = command();
    let args = recipe::expand_config(&cmd, args)?;
    let matches = cmd.clone().get_matches_from(args);
    let cli = Cli::from_arg_matches(&matches).map_err(|e| anyhow::anyhow!("{e}"))?;
    let save_recipe = cli.compress.save_recipe.clone();
    run(cli)?;
    if let Some(path) = save_recipe {
        write::write_text(&path, &recipe::recipe_from_matches(&cmd, &matches))?;
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let threads = match &cli.command {
        Some(Command::Sensitivity(args)) => args.threads,
        None => cli.compress.threads,
        _ => None,
    };
    if let Some(n) = threads {
        use_threads(n as usize)?;
    }
    match cli.command {
        Some(Command::Inspect(args)) => inspect(&args),
        Some(Command::Sensitivity(args)) => sensitivity(&args),
        Some(Command::Config(_)) => {
            print!("{}", recipe::default_recipe(&command()));
            Ok(())
        }
        None => compress(&cli.compress),
    }
}

/// Run every parallel part of the work (rayon's global pool: calibration, validation, the
/// passes) on `n` threads. The pool can be set once per process; a second call asking for the
/// size it already has is fine.
fn use_threads(n: usize) -> Result<()> {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
    {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == n => Ok(()),
        Err(e) => anyhow::bail!(
            "--threads {n}: the thread pool already runs {} thread(s) in this process: {e}",
            rayon::current_num_threads()
        ),
    }
}

/// End the process with one error line when registered work (tract's analysis) outlives its
/// budget ([`onnx_compress::limits::watch`]): nothing has been written yet, since outputs are
/// only renamed into place at the end of a run.
fn start_watchdog(input: Option<&std::path::Path>) {
    let input = input.map_or("the model".to_string(), |p| p.display().to_string());
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(250));
        if let Some((what, budget)) = onnx_compress::limits::watch::overdue() {
            eprintln!(
                "error: {input}: {what} did not finish within {} s of CPU time (tract's shape expressions for this model grow without bound; check the model with onnx.checker, or fix its input dims with --input-shape)",
                budget.as_secs()
            );
            std::process::exit(1);
        }
    });
}

fn compress(args: &CompressArgs) -> Result<()> {
    start_watchdog(args.model.as_deref());
    onnx_compress::progress::set_enabled(!args.quiet);
    onnx_compress::progress::set_verbose(args.verbose);
    let opts = options::compress_options(args)?;
    let outcome = session::compress(&opts)?;
    let report = &outcome.report;
    if !args.quiet {
        print::summary(report);
        if let Some(g) = &report.gate {
            for line in print::gate_lines(g) {
                println!("{line}");
            }
        }
    }
    if let Some(path) = &args.report {
        write::write_json(path, report)?;
    }
    if let Some(p) = &args.html {
        onnx_compress::report::html::write(p, report)?;
    }
    if let Some(line) = outcome.gate_failure() {
        bail!(line);
    }
    Ok(())
}

fn sensitivity(args: &SensitivityArgs) -> Result<()> {
    let opts = session::inspect::SensitivityOptions {
        model: args.model.clone(),
        calib: args.calib.clone(),
        calib_samples: args.calib_samples,
        image: args.image.options(),
        seed: args.seed,
        hessian: onnx_compress::hessian::HessianOptions {
            max_samples: args.hessian_samples.max(1),
            seed: args.seed,
            loss: options::hessian_loss(args.hessian_loss),
            ..Default::default()
        },
    };
    let (layers, synthetic) = session::inspect::sensitivity(&opts)?;
    if synthetic {
        eprintln!("warning: no --calib data; traces are measured on synthetic inputs");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&layers)?);
        return Ok(());
    }
    print::sensitivity_table(&layers);
    Ok(())
}

fn inspect(args: &InspectArgs) -> Result<()> {
    let shapes = options::parse_input_shapes(&args.input_shapes)?;
    let insp = session::inspect::inspect(&args.model, &shapes)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&insp)?);
        return Ok(());
    }
    print::inspection(&insp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_one_bounded_line() {
        let e = anyhow::anyhow!("Trying to substitute\nModelPatch {{\n  a\r\n}}")
            .context("preparing the calibration run");
        assert_eq!(
            error_line(&e),
            "preparing the calibration run: Trying to substitute ModelPatch { a }"
        );
        let long = anyhow::anyhow!("{}", "x ".repeat(5000));
        let line = error_line(&long);
        assert!(!line.contains('\n'));
        assert!(line.ends_with("... (cut)"));
        assert!(line.chars().count() <= ERROR_LINE_MAX_CHARS + 10);
    }
}
