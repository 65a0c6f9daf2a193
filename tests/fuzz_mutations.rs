//! Structure-aware fuzzing of the whole tool: testdata models mutated by
//! [`common::mutate`] (one or two mutations per case, seeded ChaCha8, deterministic) and run
//! through the BINARY as a child process, so an abort is seen as a signal and a hang as a
//! timeout. Most cases run `--passes fuse,cleanup,quantize --no-validate`, a quarter the full
//! default pipeline with validation.
//!
//! Every case must end in one of two ways:
//! - exit 1: stderr is exactly one line starting with `error:`, and nothing is left in the output
//!   folder;
//! - exit 0: the output passes `onnx.checker.check_model(full_check=True)`, and loads in ONNX
//!   Runtime whenever the mutated input does (both checked by one python process per run);
//!
//! and never: death by a signal (abort, segfault, or the memory cap below), a timeout, a panic
//! message, another exit code. A case whose model still holds a NaN/Inf weight must be refused or
//! name that tensor in its `--report`.
//!
//! Each child runs with an address-space cap (`FUZZ_MAX_MEMORY_MB`, default 4096) so an
//! allocation sized from a hostile model fails fast (SIGABRT, reported) instead of taking the
//! shared machine's memory; a case gets `FUZZ_TIMEOUT_SECS` (default 60) and is killed after.
//!
//! Knobs: `FUZZ_SEED` (default 21), `FUZZ_CASES` (default 300), `FUZZ_CASE=N` (run case N only:
//! the reproducer printed for every failure), `FUZZ_JOBS` (default 2), `FUZZ_KEEP=1` (keep the
//! case folders and print where). E.g.
//! `FUZZ_CASE=17 FUZZ_KEEP=1 cargo test --test fuzz_mutations -- --nocapture`.

mod common;
use common::mutate::{self, Kind, Mutated};
use common::python::require_python;
use common::testdata;
use onnx_compress::onnx::proto::ModelProto;
use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Models the cases draw from: trained CNN and MLP, depthwise/concat, residual adds, BN chains,
/// a control-flow subgraph. (`external_data.onnx` is left out: its data file would have to
/// travel with every mutated copy.)
const MODELS: [&str; 6] = [
    "digits_cnn",
    "mlp",
    "mobilenet_like",
    "residual",
    "conv_bn_relu",
    "if_model",
];

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One case, fully determined by (seed, index).
struct Case {
    index: usize,
    model: &'static str,
    mutated: Mutated,
    full_pipeline: bool,
}

impl Case {
    fn new(seed: u64, index: usize, models: &BTreeMap<&'static str, ModelProto>) -> Case {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(index as u64);
        let model = MODELS[rng.random_range(0..MODELS.len())];
        let count = rng.random_range(1..=2);
        let full_pipeline = rng.random_range(0..4) == 0;
        let mutated = mutate::mutate(&models[model], count, &mut rng);
        Case {
            index,
            model,
            mutated,
            full_pipeline,
        }
    }

    fn pipeline(&self) -> &'static str {
        if self.full_pipeline {
            "default pipeline"
        } else {
            "--passes fuse,cleanup,quantize --no-validate"
        }
    }

    fn describe(&self) -> String {
        format!(
            "case {} ({}.onnx, {}): {}",
            self.index,
            self.model,
            self.pipeline(),
            self.mutated.describe()
        )
    }
}

/// How one run ended, before the python checks.
#[derive(Debug)]
struct Run {
    case: usize,
    dir: PathBuf,
    code: Option<i32>,
    failures: Vec<(String, String)>,
    /// Exit 0 with an output file: to be checked by onnx/onnxruntime.
    accepted: bool,
    seconds: f64,
}

fn run_case(case: &Case, root: &Path, timeout: Duration, max_memory: u64) -> Run {
    let dir = root.join(format!("case_{:04}", case.index));
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let input = dir.join("in.onnx");
    std::fs::write(&input, &case.mutated.bytes).unwrap();
    let output = out_dir.join("out.onnx");
    let report = dir.join("report.json");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_onnx-compress"));
    // The int8 path is what the mutations probe: under the CLI default (`ort`) testdata's tiny
    // models stay float and a mutated constant nobody reads would pass through untouched.
    cmd.arg(&input)
        .arg("-o")
        .arg(&output)
        .arg("-q")
        .args(["--target", "generic"]);
    if !case.full_pipeline {
        cmd.args(["--passes", "fuse,cleanup,quantize", "--no-validate"]);
    }
    if case.mutated.nonfinite_tensor.is_some() {
        cmd.arg("--report").arg(&report);
    }
    cmd.stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
    // SAFETY: only async-signal-safe calls (setrlimit) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: max_memory,
                rlim_max: max_memory,
            };
            libc::setrlimit(libc::RLIMIT_AS, &limit);
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn onnx-compress");
    let mut failures = Vec::new();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            failures.push((
                format!("hang: no exit within {} s", timeout.as_secs()),
                String::new(),
            ));
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let seconds = started.elapsed().as_secs_f64();
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    let first_line = stderr
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect::<String>();
    let code = status.and_then(|s| s.code());
    if let Some(signal) = status.and_then(|s| s.signal()) {
        let name = match signal {
            libc::SIGABRT => "SIGABRT (abort)",
            libc::SIGSEGV => "SIGSEGV (segfault)",
            libc::SIGKILL => "SIGKILL",
            libc::SIGBUS => "SIGBUS",
            _ => "another signal",
        };
        failures.push((format!("killed by {name}"), first_line.clone()));
    }
    if stderr.contains("panicked") {
        let at = stderr
            .lines()
            .find(|l| l.contains("panicked"))
            .unwrap_or("");
        failures.push(("panic".into(), at.chars().take(200).collect()));
    }
    let mut accepted = false;
    match code {
        Some(0) => {
            if output.exists() {
                accepted = true;
            } else {
                failures.push(("exit 0 without an output file".into(), String::new()));
            }
            if let Some(tensor) = &case.mutated.nonfinite_tensor {
                let report = std::fs::read_to_string(&report).unwrap_or_default();
                if !nonfinite_named(&report, tensor) {
                    failures.push((
                        "non-finite weight accepted without naming it in the report".into(),
                        format!("tensor '{tensor}'"),
                    ));
                }
            }
        }
        Some(1) => {
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            if lines.len() != 1 || !lines[0].starts_with("error:") {
                failures.push((
                    "refusal is not exactly one 'error:' line".into(),
                    format!("{} line(s), first: {first_line}", lines.len()),
                ));
            }
            let left: Vec<String> = std::fs::read_dir(&out_dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !left.is_empty() {
                failures.push((
                    "refusal left files in the output folder".into(),
                    left.join(", "),
                ));
            }
        }
        Some(other) => failures.push((format!("exit code {other}"), first_line.clone())),
        None => {}
    }
    Run {
        case: case.index,
        dir,
        code,
        failures,
        accepted,
        seconds,
    }
}

/// Whether a JSON report names `tensor` as non-finite: one string holding both the name and a
/// non-finite word, or one object whose own keys/strings (and strings in its arrays) hold both.
fn nonfinite_named(report: &str, tensor: &str) -> bool {
    fn nonfinite_word(s: &str) -> bool {
        let s = s.to_ascii_lowercase();
        s.contains("non-finite")
            || s.contains("non_finite")
            || s.split(|c: char| !c.is_ascii_alphanumeric()).any(|word| {
                word == "nan"
                    || word == "inf"
                    || word.starts_with("nonfinite")
                    || word.starts_with("infinit")
            })
    }
    fn visit(v: &serde_json::Value, tensor: &str) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains(tensor) && nonfinite_word(s),
            serde_json::Value::Array(items) => items.iter().any(|x| visit(x, tensor)),
            serde_json::Value::Object(map) => {
                let mut own: Vec<&str> = Vec::new();
                for (k, x) in map {
                    own.push(k);
                    match x {
                        serde_json::Value::String(s) => own.push(s),
                        serde_json::Value::Array(items) => {
                            own.extend(items.iter().filter_map(|i| i.as_str()))
                        }
                        _ => {}
                    }
                }
                (own.iter().any(|s| s.contains(tensor)) && own.iter().any(|s| nonfinite_word(s)))
                    || map.values().any(|x| visit(x, tensor))
            }
            _ => false,
        }
    }
    serde_json::from_str::<serde_json::Value>(report).is_ok_and(|v| visit(&v, tensor))
}

/// Checks every accepted output in one python process: `onnx.checker` (full check) on the
/// output, and ONNX Runtime loading input and output. One JSON line per case; a python crash
/// (a runtime aborting on some model) is recorded against the case it was on and the rest go
/// to a new process.
const PYTHON_CHECKS: &str = r#"
import json, sys
import onnx, onnxruntime as ort
ort.set_default_logger_severity(4)

def err(e):
    # One line; runtimes put the reason last, after a long location.
    text = " ".join((type(e).__name__ + ": " + str(e)).split())
    return text if len(text) <= 320 else text[:100] + " ... " + text[-220:]

def load(path):
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return None
    except Exception as e:
        return err(e)

for line in sys.stdin:
    case = json.loads(line)
    print(json.dumps({"start": case["id"]}), flush=True)
    r = {"id": case["id"], "checker": None}
    try:
        onnx.checker.check_model(case["output"], full_check=True)
    except Exception as e:
        r["checker"] = err(e)
    r["ort_input"] = load(case["input"])
    r["ort_output"] = load(case["output"])
    print(json.dumps(r), flush=True)
"#;

#[derive(Debug, Default)]
struct Interop {
    checker: Option<String>,
    ort_input: Option<String>,
    ort_output: Option<String>,
}

fn python_checks(runs: &[&Run]) -> BTreeMap<usize, Interop> {
    let mut results = BTreeMap::new();
    let mut pending: Vec<&Run> = runs.to_vec();
    while !pending.is_empty() {
        let mut child = Command::new("python3")
            .args(["-c", PYTHON_CHECKS])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3");
        let mut stdin = child.stdin.take().unwrap();
        let manifest: Vec<String> = pending
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.case,
                    "input": r.dir.join("in.onnx"),
                    "output": r.dir.join("out").join("out.onnx"),
                })
                .to_string()
            })
            .collect();
        let writer = std::thread::spawn(move || {
            for line in manifest {
                if writeln!(stdin, "{line}").is_err() {
                    break;
                }
            }
        });
        let mut started = None;
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let Ok(line) = line else { break };
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if let Some(id) = v.get("start") {
                started = id.as_u64().map(|i| i as usize);
                continue;
            }
            let text = |k: &str| v[k].as_str().map(str::to_string);
            let id = v["id"].as_u64().unwrap() as usize;
            results.insert(
                id,
                Interop {
                    checker: text("checker"),
                    ort_input: text("ort_input"),
                    ort_output: text("ort_output"),
                },
            );
            started = None;
        }
        let _ = writer.join();
        let status = child.wait().unwrap();
        match started {
            // Died inside a case: blame neither side's model, say what happened.
            Some(id) => {
                results.insert(
                    id,
                    Interop {
                        checker: Some(format!("python died ({status}) checking this case")),
                        ort_input: Some("python died".into()),
                        ort_output: None,
                    },
                );
            }
            None => assert!(status.success(), "python checks failed: {status}"),
        }
        pending.retain(|r| !results.contains_key(&r.case));
    }
    results
}

fn load_models() -> BTreeMap<&'static str, ModelProto> {
    MODELS
        .iter()
        .map(|&m| {
            let path = testdata().join(format!("{m}.onnx"));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (m, ModelProto::decode(bytes.as_slice()).unwrap())
        })
        .collect()
}

#[test]
fn mutated_models_are_refused_cleanly_or_give_valid_outputs() {
    let seed: u64 = env_or("FUZZ_SEED", 21);
    let cases: usize = env_or("FUZZ_CASES", 300);
    let jobs: usize = env_or("FUZZ_JOBS", 2).max(1);
    let timeout = Duration::from_secs(env_or("FUZZ_TIMEOUT_SECS", 60));
    let max_memory: u64 = env_or::<u64>("FUZZ_MAX_MEMORY_MB", 4096) << 20;
    let only: Option<usize> = std::env::var("FUZZ_CASE").ok().and_then(|v| v.parse().ok());
    let interop = require_python(&["onnx", "onnxruntime"], "fuzz_mutations");

    let models = load_models();
    let indices: Vec<usize> = match only {
        Some(i) => vec![i],
        None => (0..cases).collect(),
    };
    let plan: Vec<Case> = indices
        .iter()
        .map(|&i| Case::new(seed, i, &models))
        .collect();
    let root = tempfile::Builder::new()
        .prefix("fuzz_mutations")
        .tempdir()
        .unwrap();

    let started = Instant::now();
    let next = AtomicUsize::new(0);
    let runs = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = plan.get(k) else { break };
                let run = run_case(case, root.path(), timeout, max_memory);
                runs.lock().unwrap().push(run);
            });
        }
    });
    let mut runs = runs.into_inner().unwrap();
    runs.sort_by_key(|r| r.case);
    let run_seconds = started.elapsed().as_secs_f64();

    // Outputs of accepted cases: valid ONNX, and loadable wherever the input is.
    let accepted: Vec<&Run> = runs.iter().filter(|r| r.accepted).collect();
    let checks = if interop && !accepted.is_empty() {
        python_checks(&accepted)
    } else {
        BTreeMap::new()
    };
    let mut input_refused_by_ort = 0;
    for run in runs.iter_mut().filter(|r| r.accepted) {
        let Some(check) = checks.get(&run.case) else {
            continue;
        };
        if let Some(e) = &check.checker {
            run.failures.push((
                "exit 0 but onnx.checker rejects the output".into(),
                e.clone(),
            ));
        }
        match (&check.ort_input, &check.ort_output) {
            (None, Some(e)) => run.failures.push((
                "exit 0 but ONNX Runtime rejects the output while it loads the input".into(),
                e.clone(),
            )),
            (Some(_), _) => input_refused_by_ort += 1,
            _ => {}
        }
    }

    // The summary: outcomes, then outcomes by mutation kind, then each failure class.
    let by_case: BTreeMap<usize, &Case> = plan.iter().map(|c| (c.index, c)).collect();
    let outcome = |r: &Run| -> &'static str {
        if !r.failures.is_empty() {
            "FAILED"
        } else if r.code == Some(1) {
            "refused cleanly (exit 1, one line)"
        } else {
            "accepted, output valid (exit 0)"
        }
    };
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut kinds: BTreeMap<Kind, [usize; 3]> = BTreeMap::new();
    let mut classes: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for run in &runs {
        *outcomes.entry(outcome(run)).or_default() += 1;
        let column = match (run.failures.is_empty(), run.code) {
            (false, _) => 2,
            (true, Some(1)) => 0,
            _ => 1,
        };
        for m in &by_case[&run.case].mutated.mutations {
            kinds.entry(m.kind).or_default()[column] += 1;
        }
        for (class, detail) in &run.failures {
            classes
                .entry(class.clone())
                .or_default()
                .push((run.case, detail.clone()));
        }
    }
    let slowest = runs.iter().map(|r| r.seconds).fold(0.0, f64::max);
    println!(
        "\nfuzz_mutations: seed {seed}, {} case(s), {jobs} job(s), {run_seconds:.1} s (slowest case {slowest:.1} s)",
        runs.len()
    );
    println!("| outcome | cases |\n|---|---|");
    for (o, n) in &outcomes {
        println!("| {o} | {n} |");
    }
    println!("| (of the accepted: ONNX Runtime refuses the mutated input itself) | {input_refused_by_ort} |");
    if !interop {
        println!("(python checks not run: outputs were not checked)");
    }
    println!("\n| mutation | refused | accepted | failed |\n|---|---|---|---|");
    for (k, [refused, ok, failed]) in &kinds {
        println!("| {} | {refused} | {ok} | {failed} |", k.name());
    }
    // Within a class, one example per combination of mutation kinds: the causes differ.
    let mut report = String::new();
    for (class, cases) in &classes {
        report += &format!("\n{class}: {} case(s)\n", cases.len());
        let mut by_kinds: BTreeMap<Vec<&str>, Vec<&(usize, String)>> = BTreeMap::new();
        for c in cases {
            let mut kinds: Vec<&str> = by_case[&c.0]
                .mutated
                .mutations
                .iter()
                .map(|m| m.kind.name())
                .collect();
            kinds.sort();
            kinds.dedup();
            by_kinds.entry(kinds).or_default().push(c);
        }
        for (kinds, cases) in &by_kinds {
            let (i, detail) = cases[0];
            report += &format!(
                "  [{}] {} case(s), e.g. {}\n",
                kinds.join(" + "),
                cases.len(),
                by_case[i].describe()
            );
            if !detail.is_empty() {
                report += &format!("    -> {detail}\n");
            }
        }
    }
    if !report.is_empty() {
        println!("\nfailure classes (reproduce one: FUZZ_SEED={seed} FUZZ_CASE=N FUZZ_KEEP=1 cargo test --test fuzz_mutations -- --nocapture):{report}");
    }
    if std::env::var_os("FUZZ_KEEP").is_some() {
        println!("case folders kept in {}", root.keep().display());
    }
    assert!(
        classes.is_empty(),
        "{} of {} mutated cases failed:{report}",
        runs.iter().filter(|r| !r.failures.is_empty()).count(),
        runs.len()
    );
}

/// A NaN in a trained model's first Conv weight makes every output NaN: the default pipeline
/// must refuse the model or name the tensor in its report (not round it into int8 silently).
#[test]
fn nan_weight_is_refused_or_named() {
    let mut model = load_models().remove("digits_cnn").unwrap();
    let g = model.graph.as_mut().unwrap();
    let conv = g
        .node
        .iter()
        .find(|n| n.op_type.as_deref() == Some("Conv"))
        .unwrap();
    let weight = conv.input[1].clone();
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.name.as_deref() == Some(weight.as_str()))
        .unwrap();
    let mut raw = t.raw_data.take().unwrap().to_vec();
    raw[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    t.raw_data = Some(raw.into());

    let dir = tempfile::tempdir().unwrap();
    let input = common::write(dir.path(), "nan.onnx", &model);
    let output = dir.path().join("out.onnx");
    let report = dir.path().join("report.json");
    let (code, _, stderr) = common::run(&[
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "-q",
        "--report",
        report.to_str().unwrap(),
    ]);
    match code {
        1 => {
            assert!(
                stderr.trim().starts_with("error:") && stderr.contains(&weight),
                "the refusal names the tensor '{weight}': {stderr}"
            );
            assert!(!output.exists(), "a refused run leaves no output");
        }
        0 => {
            let text = std::fs::read_to_string(&report).unwrap();
            assert!(
                nonfinite_named(&text, &weight),
                "exit 0 but the report does not name the NaN in '{weight}'"
            );
        }
        _ => panic!("exit {code}: {stderr}"),
    }
}

#[test]
fn nonfinite_named_finds_the_tensor_beside_a_nonfinite_word() {
    assert!(nonfinite_named(
        r#"{"warnings": ["tensor 'w' has 3 NaN values"]}"#,
        "w"
    ));
    assert!(nonfinite_named(
        r#"{"a": {"tensor": "w", "nonfinite": 3}}"#,
        "w"
    ));
    assert!(nonfinite_named(r#"{"nonfinite_weights": ["w"]}"#, "w"));
    assert!(!nonfinite_named(r#"{"tensor": "w", "sqnr": 9.5}"#, "w"));
    assert!(!nonfinite_named(
        r#"{"nonfinite": 3, "x": {"tensor": "w"}}"#,
        "w"
    ));
    assert!(!nonfinite_named(
        r#"{"tensor": "w", "note": "dominant channel"}"#,
        "w"
    ));
    assert!(!nonfinite_named("not json", "w"));
}
