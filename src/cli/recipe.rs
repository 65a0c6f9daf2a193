//! Recipes: every option of the main command in a TOML file, so a CI job can repeat a
//! compression exactly.
//!
//! A recipe's keys are the long option names (`passes = "fuse,quantize"`, `method = "entropy"`,
//! `input-shape = ["x:1x3x224x224"]`, `per-tensor = true`). `--config FILE` expands the recipe
//! into options placed before the command line's own, so anything given on the command line
//! wins. `--save-recipe FILE` writes the effective options of a run (explicit and default) so
//! `--config FILE` repeats it; `onnx-compress config --print-default` prints every option with
//! its default. Both are generated from the clap definitions, so they cannot drift from the CLI.

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};
use std::ffi::OsString;
use std::path::Path;

/// Options that describe where a run reads and writes, how loud it is or on how many threads
/// it runs, not how it compresses.
const NOT_IN_RECIPES: &[&str] = &[
    "model",
    "output",
    "config",
    "save_recipe",
    "report",
    "html",
    "quiet",
    "threads",
    "force",
    "help",
    "version",
];

fn recipe_args(cmd: &Command) -> impl Iterator<Item = &clap::Arg> {
    cmd.get_arguments()
        .filter(|a| a.get_long().is_some() && !NOT_IN_RECIPES.contains(&a.get_id().as_str()))
}

/// Expand `--config FILE` (or `--config=FILE`) into the options the recipe holds, inserted
/// right after the program name so explicit command-line options override them.
pub fn expand_config(cmd: &Command, args: Vec<OsString>) -> Result<Vec<OsString>> {
    let mut path = None;
    let mut rest = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    let program = iter.next();
    while let Some(a) = iter.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            path = Some(iter.next().context("--config needs a recipe file")?);
        } else if let Some(p) = s.strip_prefix("--config=") {
            path = Some(OsString::from(p));
        } else {
            rest.push(a);
        }
    }
    let mut out: Vec<OsString> = program.into_iter().collect();
    if let Some(path) = path {
        out.extend(recipe_to_args(cmd, Path::new(&path))?);
    }
    out.extend(rest);
    Ok(out)
}

fn recipe_to_args(cmd: &Command, path: &Path) -> Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read recipe {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("recipe {}", path.display()))?;
    let mut args = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let Some(arg) = recipe_args(cmd).find(|a| a.get_long() == Some(long.as_str())) else {
            let valid: Vec<&str> = recipe_args(cmd).filter_map(|a| a.get_long()).collect();
            bail!(
                "recipe {}: unknown option '{key}' (valid: {})",
                path.display(),
                valid.join(", ")
            );
        };
        let flag = format!("--{long}");
        let is_switch = matches!(arg.get_action(), ArgAction::SetTrue);
        let scalar = |v: &toml::Value| -> Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!(
                    "recipe {}: option '{key}' has a {} value; expected a string or number",
                    path.display(),
                    other.type_str()
                ),
            })
        };
        match (&value, is_switch) {
            (toml::Value::Boolean(b), true) => {
                if *b {
                    args.push(flag.into());
                }
            }
            (_, true) => bail!(
                "recipe {}: option '{key}' is a switch; write {key} = true or false",
                path.display()
            ),
            (toml::Value::Array(items), false) => {
                for item in items {
                    args.push(flag.clone().into());
                    args.push(scalar(item)?.into());
                }
            }
            (v, false) => {
                args.push(flag.into());
                args.push(scalar(v)?.into());
            }
        }
    }
    Ok(args)
}

fn toml_value(arg: &clap::Arg, values: Vec<String>) -> toml::Value {
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return toml::Value::Boolean(values.first().is_some_and(|v| v == "true"));
    }
    if matches!(arg.get_action(), ArgAction::Append) {
        return toml::Value::Array(values.into_iter().map(toml::Value::String).collect());
    }
    let v = values.into_iter().next().unwrap_or_default();
    if let Ok(i) = v.parse::<i64>() {
        toml::Value::Integer(i)
    } else if let Ok(f) = v.parse::<f64>() {
        toml::Value::Float(f)
    } else {
        toml::Value::String(v)
    }
}

/// The effective options of a run as a recipe (explicit values and defaults).
pub fn recipe_from_matches(cmd: &Command, matches: &ArgMatches) -> String {
    let mut table = toml::Table::new();
    for arg in recipe_args(cmd) {
        let id = arg.get_id().as_str();
        let long = arg.get_long().expect("recipe args have long names");
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            let on = matches.get_flag(id);
            table.insert(long.into(), toml::Value::Boolean(on));
            continue;
        }
        let Some(raw) = matches.get_raw(id) else {
            continue;
        };
        let values: Vec<String> = raw.map(|v| v.to_string_lossy().into_owned()).collect();
        if values.is_empty() && matches.value_source(id) != Some(ValueSource::CommandLine) {
            continue;
        }
        table.insert(long.into(), toml_value(arg, values));
    }
    format!(
        "# onnx-compress {} recipe: repeat with `onnx-compress MODEL -o OUT --config THIS_FILE`\n{}",
        env!("CARGO_PKG_VERSION"),
        toml::to_string(&table).expect("a TOML table serialises")
    )
}

/// Every recipe option with its help and default, as a commented TOML file.
pub fn default_recipe(cmd: &Command) -> String {
    let mut out = format!(
        "# onnx-compress {} recipe with every option at its default.\n\
         # Use: onnx-compress MODEL -o OUT --config recipe.toml (command-line options win).\n",
        env!("CARGO_PKG_VERSION")
    );
    for arg in recipe_args(cmd) {
        let long = arg.get_long().expect("recipe args have long names");
        let help = arg
            .get_help()
            .map(|h| h.to_string())
            .unwrap_or_default()
            .replace('\n', " ");
        out.push_str(&format!("\n# {help}\n"));
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let line = match arg.get_action() {
            ArgAction::SetTrue => format!("{long} = false"),
            ArgAction::Append => format!("# {long} = []"),
            _ if defaults.is_empty() => format!("# {long} = \"\""),
            _ => {
                let v = &defaults[0];
                if v.parse::<f64>().is_ok() {
                    format!("{long} = {v}")
                } else {
                    format!("{long} = \"{v}\"")
                }
            }
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}
