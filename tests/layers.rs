//! The library's layering, checked from the code's own imports: a module may use only its own
//! layer's module or lower layers, and no two files import each other in a loop.
//!
//! ```text
//! onnx, progress, limits < ir < runtime < calibrate, hessian < passes, validate < pipeline < session < report
//! ```
//! (`src/main.rs` and `src/cli/`, the binary, sit above everything and are not checked.)
//! A `crate::<module>` path anywhere in a file (a `use` or an inline path) counts as an import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: &[&[&str]] = &[
    &["onnx", "progress", "limits"],
    &["ir"],
    &["runtime"],
    &["calibrate", "hessian"],
    &["passes", "validate"],
    &["pipeline"],
    &["session"],
    &["report"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `crate::a::b::c` paths in `text` (code only: line comments stripped), as segment lists.
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let tail = &rest[i + "crate::".len()..];
            let path: String = tail
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            out.push(
                path.split("::")
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            );
            rest = tail;
        }
    }
    out
}

/// The source file a crate path's longest module prefix names, if any.
fn resolve(src: &Path, path: &[String]) -> Option<PathBuf> {
    let mut best = None;
    let mut dir = src.to_path_buf();
    for seg in path {
        let file = dir.join(format!("{seg}.rs"));
        let module = dir.join(seg).join("mod.rs");
        if file.is_file() {
            best = Some(file);
        } else if module.is_file() {
            best = Some(module);
        } else {
            break;
        }
        dir = dir.join(seg);
    }
    best
}

fn library_files() -> (PathBuf, Vec<PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| {
        let rel = f.strip_prefix(&src).unwrap();
        !(rel == Path::new("main.rs") || rel == Path::new("lib.rs") || rel.starts_with("cli"))
    });
    files.sort();
    (src, files)
}

#[test]
fn every_import_points_down_or_sideways_within_its_module() {
    let (src, files) = library_files();
    let mut upward = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let own = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let own = own.trim_end_matches(".rs").to_string();
        let own_layer = layer_of(&own).unwrap_or_else(|| {
            panic!(
                "{}: module '{own}' has no layer in tests/layers.rs",
                rel.display()
            )
        });
        for path in crate_paths(&std::fs::read_to_string(f).unwrap()) {
            let Some(target) = path.first() else { continue };
            if *target == own {
                continue;
            }
            let Some(t) = layer_of(target) else {
                upward.push(format!(
                    "{} uses crate::{target}, which has no layer",
                    rel.display()
                ));
                continue;
            };
            if t >= own_layer {
                upward.push(format!(
                    "{} (layer {own_layer}, {own}) uses crate::{} (layer {t})",
                    rel.display(),
                    path.join("::")
                ));
            }
        }
    }
    upward.sort();
    upward.dedup();
    assert!(
        upward.is_empty(),
        "imports that do not point down:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_two_files_import_each_other_in_a_loop() {
    let (src, files) = library_files();
    // Edges between files; a module's mod.rs declares and re-exports its children, so edges to
    // and from mod.rs files are not loops of concern.
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for f in &files {
        if f.ends_with("mod.rs") {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let mut paths = crate_paths(&text);
        // `super::x` from a file in dir D means D/x.rs.
        let module_path: Vec<String> = f
            .strip_prefix(&src)
            .unwrap()
            .parent()
            .unwrap()
            .components()
            .map(|c| c.as_os_str().to_string_lossy().to_string())
            .collect();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("super::") {
                let tail = &code[i + "super::".len()..];
                let seg: String = tail
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let mut p = module_path.clone();
                p.push(seg);
                paths.push(p);
            }
        }
        for p in paths {
            if let Some(t) = resolve(&src, &p) {
                if t != *f && !t.ends_with("mod.rs") {
                    edges.entry(f.clone()).or_default().insert(t);
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        n: &PathBuf,
        edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        state: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>,
        loops: &mut Vec<String>,
    ) {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                0 => visit(m, edges, state, stack, loops),
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let names: Vec<String> = stack[at..]
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect();
                    loops.push(format!("{} -> {}", names.join(" -> "), m.display()));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
    }
    let mut state = BTreeMap::new();
    let mut loops = Vec::new();
    for f in edges.keys() {
        if state.get(f).copied().unwrap_or(0) == 0 {
            visit(f, &edges, &mut state, &mut Vec::new(), &mut loops);
        }
    }
    assert!(loops.is_empty(), "import loops:\n{}", loops.join("\n"));
}

#[test]
fn the_checker_sees_an_upward_import() {
    // The path extraction must see both `use` lines and inline paths, or the tests above
    // prove nothing.
    let paths = crate_paths(
        "use crate::session::gate;\nlet x = crate::report::html::esc(s); // crate::cli\n",
    );
    assert_eq!(
        paths,
        vec![
            vec!["session".to_string(), "gate".to_string()],
            vec!["report".to_string(), "html".to_string(), "esc".to_string()],
        ]
    );
    assert!(layer_of("report") > layer_of("session"));
    assert!(layer_of("ir") < layer_of("runtime"));
}
