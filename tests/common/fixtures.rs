//! The one fixture harness: `tests/fixtures/<pass>/<case>.onnxtxt`, snapshot beside it as
//! `tests/fixtures/<pass>/<case>.snap`. `tests/fixtures.rs` drives every folder by glob; pass
//! tests load single cases through [`run_case`] for structural checks of their own.
//!
//! A fixture is a model in ONNX text syntax whose leading `#` lines say what to run and what
//! must hold. One header syntax, `# key: value`; a `#` line without a key continues the
//! previous `intent` or `note`:
//!
//! ```text
//! # passes: fuse,cleanup          passes to run, in pipeline order (required)
//! # intent: BN folds into the     what the case is about (free text, may continue on
//! # conv, the ReLU stays          following `#` lines)
//! # note: ...                     any other remark (free text)
//! # options: prune=0.5, reconstruct=none
//! #                               pass options, spelled like the CLI flags without `--`
//! #                               (see [`apply_option`]); bare words are boolean flags
//! # expect: no BatchNormalization one check on the result (see [`check_expect`]); repeatable
//! # tolerance: 1e-4               max |original - result| over every output element in tract
//! #                               (default 1e-4; fixture outputs are O(1))
//! # idempotent: no, <reason>      opt out of the second-run check, saying why
//! # snapshot: before-after        layout of the snapshot body (see [`Layout`])
//! <ir_version: 8, opset_import: ["" : 17]>
//! g (float[1,3,8,8] x) => (float[1,4,8,8] y) { ... }
//! ```
//!
//! [`check_case`] asserts, naming the fixture in every failure: the graph is consistent after
//! the passes; every `expect` holds; the result printed as text parses back; a second run of
//! the same passes changes nothing (idempotence); and tract gives the original's outputs
//! within the tolerance on 4 batches of standard-normal inputs (seed 0, the validator's
//! synthetic inputs), where a value finite on one side and not on the other is a failure
//! whatever the tolerance ([`super::compare`]).
#![allow(dead_code)]

use super::compare::max_abs_diff;
use ndarray::ArrayD;
use onnx_compress::ir::Model;
use onnx_compress::onnx::proto::ModelProto;
use onnx_compress::onnx::text::{parse_model, print_model, PrintOptions};
use onnx_compress::passes::{mixed_precision, prune, run_passes, select, PassContext, PassRecord};
use onnx_compress::runtime::{resolve_input_shapes, run_model, simulation_graph};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// How a snapshot body is laid out. New fixtures use the default; the others keep the
/// bodies committed before the harnesses were merged into this one byte-identical.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `header-before-after` (default): the header lines, `=== before`, the fixture as
    /// parsed, `=== after`, the result.
    HeaderBeforeAfter,
    /// `before-after`: `--- before`, the fixture through the IR, `--- after`, the result.
    BeforeAfter,
    /// `stats-after`: `# changes`, `# note` and (equalize) `# pair` lines, then the result
    /// with tensors up to 64 values inline.
    StatsAfter,
    /// `prune-groups`: the prune pass's channel dependency groups of the fixture (the pass
    /// run itself is checked as usual).
    PruneGroups,
}

#[derive(Debug, Clone)]
pub struct Fixture {
    pub path: PathBuf,
    /// `<pass>/<case>`, for messages.
    pub name: String,
    pub passes: String,
    pub intent: String,
    pub options: Vec<String>,
    pub expects: Vec<String>,
    pub tolerance: f64,
    /// `Some(reason)` when the header says the passes are not idempotent on this case.
    pub not_idempotent: Option<String>,
    pub layout: Layout,
    /// The header lines verbatim (each ending in `\n`).
    pub header: String,
    pub text: String,
}

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `tests/fixtures/<pass>/<case>.onnxtxt`.
pub fn case_path(pass: &str, case: &str) -> PathBuf {
    fixtures_root().join(pass).join(format!("{case}.onnxtxt"))
}

/// Every fixture, sorted by path.
pub fn all_fixtures() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let dirs = std::fs::read_dir(fixtures_root()).expect("tests/fixtures exists");
    for dir in dirs.flatten().map(|e| e.path()).filter(|p| p.is_dir()) {
        let files = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        out.extend(
            files
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "onnxtxt")),
        );
    }
    out.sort();
    out
}

/// Parse the header; panics on a missing `passes`, an unknown key or a malformed value.
pub fn read_fixture(path: &Path) -> Fixture {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let name = format!(
        "{}/{}",
        path.parent()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
        path.file_stem().unwrap_or_default().to_string_lossy()
    );
    let mut fx = Fixture {
        path: path.to_path_buf(),
        name: name.clone(),
        passes: String::new(),
        intent: String::new(),
        options: Vec::new(),
        expects: Vec::new(),
        tolerance: 1e-4,
        not_idempotent: None,
        layout: Layout::HeaderBeforeAfter,
        header: String::new(),
        text: text.clone(),
    };
    let mut passes_seen = false;
    let mut last_free_text: Option<&str> = None;
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        fx.header.push_str(line);
        fx.header.push('\n');
        let body = line.trim_start_matches('#').trim();
        let key = body
            .split_once(':')
            .map(|(k, v)| (k, v.trim()))
            .filter(|(k, _)| {
                !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            });
        let Some((key, value)) = key else {
            // A continuation line.
            assert!(
                last_free_text.is_some(),
                "{name}: header line '{line}' has no key and continues no intent or note"
            );
            if last_free_text == Some("intent") {
                fx.intent.push(' ');
                fx.intent.push_str(body);
            }
            continue;
        };
        last_free_text = None;
        match key {
            "passes" => {
                fx.passes = value.to_string();
                passes_seen = true;
            }
            "intent" => {
                fx.intent = value.to_string();
                last_free_text = Some("intent");
            }
            "note" => last_free_text = Some("note"),
            "expect" => fx.expects.push(value.to_string()),
            "options" => fx.options.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .map(String::from),
            ),
            "tolerance" => {
                fx.tolerance = value
                    .parse()
                    .unwrap_or_else(|_| panic!("{name}: tolerance '{value}' is not a number"))
            }
            "idempotent" => match value.split_once(',') {
                Some(("no", why)) if !why.trim().is_empty() => {
                    fx.not_idempotent = Some(why.trim().to_string())
                }
                _ => panic!("{name}: write `# idempotent: no, <why>` (idempotence is the default)"),
            },
            "snapshot" => {
                fx.layout = match value {
                    "header-before-after" => Layout::HeaderBeforeAfter,
                    "before-after" => Layout::BeforeAfter,
                    "stats-after" => Layout::StatsAfter,
                    "prune-groups" => Layout::PruneGroups,
                    _ => panic!("{name}: unknown snapshot layout '{value}'"),
                }
            }
            _ => panic!(
                "{name}: unknown header key '{key}' (passes, intent, note, options, expect, \
                 tolerance, idempotent, snapshot)"
            ),
        }
    }
    assert!(passes_seen, "{name}: no `# passes:` line");
    assert!(!fx.intent.is_empty(), "{name}: no `# intent:` line");
    fx
}

/// Set one `# options:` entry on the pass context. Names and values are the CLI's.
pub fn apply_option(ctx: &mut PassContext, option: &str) -> Result<(), String> {
    let (key, value) = match option.split_once('=') {
        Some((k, v)) => (k.trim(), Some(v.trim())),
        None => (option.trim(), None),
    };
    let number = || -> Result<f64, String> {
        value
            .ok_or_else(|| format!("option '{key}' needs a value"))?
            .parse::<f64>()
            .map_err(|_| format!("option '{key}': '{}' is not a number", value.unwrap_or("")))
    };
    let word = || value.ok_or_else(|| format!("option '{key}' needs a value"));
    match key {
        "prune" => ctx.prune.ratio = number()?,
        "prune-flops" => ctx.prune.flops = number()?,
        "prune-ranking" => {
            ctx.prune.ranking = match word()? {
                "global" => prune::Ranking::Global,
                "per-layer" => prune::Ranking::PerLayer,
                v => return Err(format!("prune-ranking '{v}'")),
            }
        }
        "prune-criterion" => {
            ctx.prune.criterion = match word()? {
                "l1" => prune::Criterion::L1,
                "l2" => prune::Criterion::L2,
                "bn-gamma" => prune::Criterion::BnGamma,
                "activation" => prune::Criterion::Activation,
                "combined" => prune::Criterion::Combined,
                v => return Err(format!("prune-criterion '{v}'")),
            }
        }
        "reconstruct" => {
            ctx.prune.reconstruct = match word()? {
                "none" => prune::Reconstruct::None,
                "bias" => prune::Reconstruct::Bias,
                "least-squares" => prune::Reconstruct::LeastSquares,
                v => return Err(format!("reconstruct '{v}'")),
            }
        }
        "avg-bits" => ctx.mixed.budget = Some(mixed_precision::Budget::AvgBits(number()?)),
        "target-size" => {
            let v = number()?;
            ctx.mixed.budget = Some(if v < 1.0 {
                mixed_precision::Budget::Ratio(v)
            } else {
                mixed_precision::Budget::Bytes(v as u64)
            })
        }
        "no-int4" => ctx.mixed.allow_int4 = false,
        "no-fp16" => ctx.mixed.allow_fp16 = false,
        "selection" => {
            ctx.mixed.selection = match word()? {
                "joint" => mixed_precision::Selection::Joint,
                "trace" => mixed_precision::Selection::Trace,
                v => return Err(format!("selection '{v}'")),
            }
        }
        "block-size" => ctx.mixed.block_size = Some(number()? as usize),
        "target" => {
            ctx.target = match word()? {
                "generic" => onnx_compress::passes::target::Target::Generic,
                "tract" => onnx_compress::passes::target::Target::Tract,
                "ort" => onnx_compress::passes::target::Target::Ort,
                "openvino" => onnx_compress::passes::target::Target::Openvino,
                v => return Err(format!("target '{v}'")),
            }
        }
        _ => {
            return Err(format!(
                "unknown option '{key}' (prune, prune-flops, prune-ranking, prune-criterion, \
                 reconstruct, avg-bits, target-size, no-int4, no-fp16, selection, block-size, target)"
            ))
        }
    }
    Ok(())
}

/// The pass context a fixture runs with: the default one plus its `# options:`.
pub fn context(fx: &Fixture) -> PassContext {
    let mut ctx = PassContext::default();
    for o in &fx.options {
        apply_option(&mut ctx, o).unwrap_or_else(|e| panic!("{}: {e}", fx.name));
    }
    ctx
}

/// One fixture run: the parsed model, the model after the passes, and the pass records.
pub struct Run {
    pub fixture: Fixture,
    pub original: ModelProto,
    pub after: Model,
    pub records: Vec<PassRecord>,
}

impl Run {
    pub fn after_proto(&self) -> ModelProto {
        self.after.to_proto().expect("exportable")
    }
    /// Total changes over the passes that ran.
    pub fn changes(&self) -> usize {
        self.records.iter().map(|r| r.changes).sum()
    }
}

/// Parse and run one fixture's passes (no checks beyond "it runs").
pub fn run_fixture(path: &Path) -> Run {
    let fixture = read_fixture(path);
    let name = fixture.name.clone();
    let original = parse_model(&fixture.text).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let mut after = Model::from_proto(original.clone()).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let passes = select(&fixture.passes).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let records = run_passes(&mut after, &passes, &context(&fixture))
        .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    Run {
        fixture,
        original,
        after,
        records,
    }
}

/// [`run_fixture`] + [`check_run`] for `tests/fixtures/<pass>/<case>.onnxtxt`.
pub fn run_case(pass: &str, case: &str) -> Run {
    let run = run_fixture(&case_path(pass, case));
    check_run(&run);
    run
}

fn op_count(model: &Model, op: &str) -> usize {
    model
        .graph
        .node_indices()
        .filter(|&ix| model.graph.node(ix).op_type() == op)
        .count()
}

/// One `# expect:` line: `no OP`, `some OP`, `count OP N` (nodes of that type in the
/// result), `ops A, B` (the result's op types in graph order, exactly), `initializers a, b`
/// (the result's initializer names, exactly; empty: none), `type NAME TYPE` (element type of
/// the result's initializer NAME, lower case: `int8`, `int4`, `float16`), `shape NAME d0,d1`
/// (dims of the result's initializer NAME), `changes N` (total changes the
/// passes report), `note TEXT` (some pass note contains TEXT), `unchanged` (the result equals
/// the fixture).
pub fn check_expect(run: &Run, expect: &str) {
    let name = &run.fixture.name;
    let words: Vec<&str> = expect.split_whitespace().collect();
    let model = &run.after;
    match words.as_slice() {
        ["no", op] => assert_eq!(op_count(model, op), 0, "{name}: expected no {op}"),
        ["some", op] => assert!(op_count(model, op) > 0, "{name}: expected some {op}"),
        ["count", op, n] => assert_eq!(
            op_count(model, op),
            n.parse::<usize>()
                .unwrap_or_else(|_| panic!("{name}: '{expect}': count is not a number")),
            "{name}: expected {n} {op}"
        ),
        ["changes", n] => assert_eq!(
            run.changes(),
            n.parse::<usize>()
                .unwrap_or_else(|_| panic!("{name}: '{expect}': not a number")),
            "{name}: changes; notes {:?}",
            run.records
                .iter()
                .flat_map(|r| &r.notes)
                .collect::<Vec<_>>()
        ),
        ["note", ..] => {
            let text = expect["note".len()..].trim();
            assert!(
                run.records
                    .iter()
                    .flat_map(|r| &r.notes)
                    .any(|n| n.contains(text)),
                "{name}: no note containing '{text}' in {:?}",
                run.records
                    .iter()
                    .flat_map(|r| &r.notes)
                    .collect::<Vec<_>>()
            );
        }
        ["ops", ..] => {
            let want: Vec<&str> = expect["ops".len()..]
                .split(',')
                .map(str::trim)
                .filter(|w| !w.is_empty())
                .collect();
            let proto = run.after_proto();
            let got: Vec<&str> = proto
                .graph
                .as_ref()
                .map(|g| g.node.iter().map(|n| n.op_type()).collect())
                .unwrap_or_default();
            assert_eq!(got, want, "{name}: node op types in graph order");
        }
        ["initializers", ..] => {
            let mut want: Vec<&str> = expect["initializers".len()..]
                .split(',')
                .map(str::trim)
                .filter(|w| !w.is_empty())
                .collect();
            want.sort();
            let mut got: Vec<&str> = model
                .graph
                .initializers
                .keys()
                .map(|k| k.as_str())
                .collect();
            got.sort();
            assert_eq!(got, want, "{name}: initializer names");
        }
        ["type", tensor, ty] => {
            let t = model
                .graph
                .initializers
                .get(*tensor)
                .unwrap_or_else(|| panic!("{name}: '{expect}': no initializer '{tensor}'"));
            let got = onnx_compress::onnx::tensor::data_type(t)
                .map(|d| format!("{d:?}").to_lowercase())
                .unwrap_or_else(|e| format!("{e:#}"));
            assert_eq!(got, *ty, "{name}: element type of '{tensor}'");
        }
        ["shape", tensor, dims] => {
            let t = model
                .graph
                .initializers
                .get(*tensor)
                .unwrap_or_else(|| panic!("{name}: '{expect}': no initializer '{tensor}'"));
            let want: Vec<i64> = dims
                .split(',')
                .map(|d| {
                    d.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("{name}: '{expect}': bad dims"))
                })
                .collect();
            assert_eq!(t.dims, want, "{name}: dims of '{tensor}'");
        }
        ["unchanged"] => assert!(
            run.after_proto() == run.original,
            "{name}: expected the model unchanged"
        ),
        _ => panic!("{name}: unknown expectation '{expect}'"),
    }
}

/// The validator's synthetic inputs: `samples` batches of standard normals (ChaCha8, Box-Muller)
/// at the declared shapes, symbolic dims set to 1.
pub fn synthetic_inputs(
    model: &ModelProto,
    seed: u64,
    samples: usize,
) -> Vec<Vec<(String, ArrayD<f32>)>> {
    let (specs, _) = resolve_input_shapes(model, &[]).expect("fixture inputs have shapes");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut normal = move || {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    };
    (0..samples)
        .map(|_| {
            specs
                .iter()
                .map(|s| {
                    let n: usize = s.shape.iter().product();
                    let v: Vec<f32> = (0..n).map(|_| normal()).collect();
                    (
                        s.name.clone(),
                        ArrayD::from_shape_vec(s.shape.clone(), v).unwrap(),
                    )
                })
                .collect()
        })
        .collect()
}

/// Run a model in tract (through its simulation graph, as the validator does: QDQ and
/// low-precision weights become float arithmetic tract runs).
pub fn run_in_tract(
    model: &ModelProto,
    inputs: &[(String, ArrayD<f32>)],
) -> anyhow::Result<Vec<(String, ArrayD<f32>)>> {
    let (sim, _) = simulation_graph(model)?;
    run_model(&sim, inputs, &[])
}

/// Largest |original - candidate| in tract over the synthetic inputs; panics (naming the
/// fixture) on a run failure or a shape/finiteness mismatch.
pub fn tract_max_abs_error(name: &str, original: &ModelProto, candidate: &ModelProto) -> f64 {
    let mut worst = 0.0f64;
    for batch in synthetic_inputs(original, 0, 4) {
        let a = run_in_tract(original, &batch)
            .unwrap_or_else(|e| panic!("{name}: original in tract: {e:#}"));
        let b = run_in_tract(candidate, &batch)
            .unwrap_or_else(|e| panic!("{name}: result in tract: {e:#}"));
        let e = max_abs_diff(&a, &b).unwrap_or_else(|m| panic!("{name}: {m}"));
        if e > worst {
            worst = e;
        }
    }
    worst
}

/// Every check the header promises (see the module docs).
pub fn check_run(run: &Run) {
    let fx = &run.fixture;
    let name = &fx.name;
    run.after
        .graph
        .check()
        .unwrap_or_else(|e| panic!("{name}: inconsistent graph: {e:#}"));
    for e in &fx.expects {
        check_expect(run, e);
    }
    let once = run.after_proto();
    let full = PrintOptions {
        max_inline_elements: usize::MAX,
    };
    let printed = print_model(&once, &full);
    let reparsed = parse_model(&printed)
        .unwrap_or_else(|e| panic!("{name}: printed result does not parse: {e:#}"));
    assert!(
        print_model(&reparsed, &full) == printed,
        "{name}: the printed result does not read back the same"
    );
    if fx.not_idempotent.is_none() {
        let mut again = run.after.clone();
        let passes = select(&fx.passes).unwrap();
        let records = run_passes(&mut again, &passes, &context(fx))
            .unwrap_or_else(|e| panic!("{name}: second run: {e:#}"));
        assert!(
            again.to_proto().unwrap() == once,
            "{name}: not idempotent, the second run changed the model: {:?}",
            records
                .iter()
                .map(|r| (&r.name, r.changes))
                .collect::<Vec<_>>()
        );
    }
    let err = tract_max_abs_error(name, &run.original, &once);
    assert!(
        err <= fx.tolerance,
        "{name}: max abs error {err:e} in tract above the tolerance {:e}",
        fx.tolerance
    );
}

/// The snapshot body of a checked run, in the fixture's [`Layout`].
pub fn snapshot_body(run: &Run) -> String {
    let fx = &run.fixture;
    let default = PrintOptions::default();
    match fx.layout {
        Layout::HeaderBeforeAfter => format!(
            "{}\n=== before\n{}\n=== after\n{}",
            fx.header,
            print_model(&run.original, &default),
            print_model(&run.after_proto(), &default)
        ),
        Layout::BeforeAfter => {
            let before = Model::from_proto(run.original.clone())
                .and_then(|m| m.to_proto())
                .unwrap_or_else(|e| panic!("{}: {e:#}", fx.name));
            format!(
                "--- before\n{}\n--- after\n{}",
                print_model(&before, &default),
                print_model(&run.after_proto(), &default)
            )
        }
        Layout::StatsAfter => {
            let mut s = format!("# changes: {}\n", run.changes());
            for n in run.records.iter().flat_map(|r| &r.notes) {
                s += &format!("# note: {n}\n");
            }
            for r in &run.records {
                for p in r.details["pairs"].as_array().into_iter().flatten() {
                    let f = |k: &str| p[k].as_f64().map_or("null".into(), |v| format!("{v:.3}"));
                    s += &format!(
                        "# pair {} -> {} via {}: range ratio {} -> {}, scales [{}, {}]\n",
                        p["l1"].as_str().unwrap_or("?"),
                        p["l2"].as_str().unwrap_or("?"),
                        p["via"],
                        f("range_ratio_before"),
                        f("range_ratio_after"),
                        f("scale_min"),
                        f("scale_max"),
                    );
                }
            }
            let printed = print_model(
                &run.after_proto(),
                &PrintOptions {
                    max_inline_elements: 64,
                },
            );
            format!("{s}{printed}")
        }
        Layout::PruneGroups => {
            let model = Model::from_proto(run.original.clone()).unwrap();
            let shapes =
                onnx_compress::runtime::value_shapes(&model, &model.to_proto().unwrap(), &[]);
            let groups = prune::dependency_groups(&model.graph, &shapes).unwrap();
            prune::describe_groups(&model.graph, &groups)
        }
    }
}

/// Compare the body with `<case>.snap` beside the fixture.
pub fn assert_snapshot(run: &Run) {
    let path = &run.fixture.path;
    let case = path.file_stem().unwrap().to_string_lossy().to_string();
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(path.parent().unwrap());
    settings.set_prepend_module_to_snapshot(false);
    settings.set_omit_expression(true);
    settings.set_input_file(path);
    let mut body = snapshot_body(run);
    // Scales computed from activations tract produced carry the CPU's float rounding (FMA or
    // not, vector width): a last-digit difference in a float literal is not a change. When the
    // committed snapshot differs from this run only by such digits, it stands as is.
    let stored = path.parent().unwrap().join(format!("{case}.snap"));
    if let Ok(text) = std::fs::read_to_string(&stored) {
        if let Some(committed) = snap_body(&text) {
            if committed != body.trim_end()
                && same_up_to_float_rounding(committed, body.trim_end(), 1e-6)
            {
                body = committed.to_string();
            }
        }
    }
    settings.bind(|| insta::assert_snapshot!(case, body));
}

/// The body of an insta `.snap` file (after its `---` metadata block).
fn snap_body(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("---\n")?;
    let end = rest.find("\n---\n")?;
    Some(rest[end + "\n---\n".len()..].trim_end_matches('\n'))
}

/// Whether `a` and `b` are the same text except for float literals (with a `.` or an exponent)
/// that agree within `rel`; integers and everything else must be identical.
pub fn same_up_to_float_rounding(a: &str, b: &str, rel: f64) -> bool {
    let re = regex::Regex::new(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?").unwrap();
    let split = |s: &str| -> Vec<(bool, String)> {
        let mut out = Vec::new();
        let mut at = 0;
        for m in re.find_iter(s) {
            out.push((false, s[at..m.start()].to_string()));
            out.push((true, m.as_str().to_string()));
            at = m.end();
        }
        out.push((false, s[at..].to_string()));
        out
    };
    let (x, y) = (split(a), split(b));
    x.len() == y.len()
        && x.iter().zip(&y).all(|((num, u), (_, v))| {
            if !num || u == v {
                return u == v;
            }
            let float = |t: &str| t.contains(['.', 'e', 'E']);
            match (float(u) && float(v), u.parse::<f64>(), v.parse::<f64>()) {
                (true, Ok(p), Ok(q)) => (p - q).abs() <= rel * p.abs().max(q.abs()),
                _ => false,
            }
        })
}
