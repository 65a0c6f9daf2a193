//! `--html FILE`: the run report as one self-contained page (inline CSS and SVG, no scripts,
//! no external assets) to open after a run.
//!
//! The page is rendered from the report's JSON form (`serde_json::Value`), the same document
//! `--report` writes, so it is data-driven and tolerant: each section appears only when its
//! data is there, whichever pass produced it and in whatever order the passes ran.
//!
//! - header: input → output, size, nodes, parameters, MACs, time per stage;
//! - validation: status, method, inputs, per-output metrics, accuracy, simulation rewrites, notes;
//! - one plot section per pass whose details carry plottable data:
//!   weights/activations (quantize), pairs (equalize), groups (prune),
//!   selection.layers/pareto (mixed precision);
//! - the per-pass notes.
//!
//! Every string from the report goes through [`esc`] (node names are user data); chart text
//! is escaped by plotters' SVG backend. Output is deterministic: nothing but the report's own
//! values (its timings included) reaches the page.
//!
//! Files: `helpers` (escaping, JSON access, number formatting, cards, figures, legends),
//! `header` (summary cards and stage timings), `validation`, and one file per pass section:
//! `quantize`, `equalize`, `prune`, `mixed_precision`. This file assembles the page:
//! the document shell and its CSS, which section a pass's details select, and the notes.

mod equalize;
mod header;
mod helpers;
mod mixed_precision;
mod prune;
mod quantize;
mod validation;

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::session::write::write_text;
use crate::session::RunReport;
use equalize::equalize_plots;
use header::header;
pub use helpers::esc;
use helpers::{arr, str_at, text};
use mixed_precision::mixed_plots;
use prune::prune_plots;
use quantize::quantize_plots;
use validation::validation;

/// Render `report` and write it atomically to `path`.
pub fn write(path: &Path, report: &RunReport) -> Result<()> {
    let page = render_report(report)?;
    write_text(path, &page).with_context(|| format!("writing the HTML report {}", path.display()))
}

/// The page for a run report.
pub fn render_report(report: &RunReport) -> Result<String> {
    let v = serde_json::to_value(report).context("serializing the run report")?;
    render(&v)
}

/// The page for a run report in its JSON form (as written by `--report`).
pub fn render(r: &Value) -> Result<String> {
    let mut h = String::new();
    let input = str_at(r, &["input", "path"]).unwrap_or("input");
    let output = str_at(r, &["output", "path"]).unwrap_or("output");
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    let _ = writeln!(
        h,
        "<title>onnx-compress: {} → {}</title>",
        esc(input),
        esc(output)
    );
    let _ = writeln!(h, "<style>{CSS}</style>\n</head>\n<body>\n<main>");
    header(&mut h, r);
    validation(&mut h, r);
    for p in arr(r, "passes") {
        pass_plots(&mut h, p)?;
    }
    notes(&mut h, r);
    h.push_str("</main>\n</body>\n</html>\n");
    Ok(h)
}

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#f6f8fa;margin:0}
main{max-width:980px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px}
h2{font-size:1.25em;margin:0 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
h3{font-size:1.05em;margin:18px 0 6px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;margin:16px 0}
.paths{font-family:ui-monospace,Menlo,Consolas,monospace;word-break:break-all;color:#57606a;margin:0}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{flex:1 1 150px;border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;background:#fbfcfd}
.card .k{font-size:.8em;color:#57606a;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:1.2em;font-weight:600;margin-top:2px}
.card .s{font-size:.85em;color:#57606a}
table{border-collapse:collapse;width:100%;font-size:.9em;margin:6px 0}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eaeef2;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em;word-break:break-all}
.bar{display:inline-block;height:10px;background:#2b6cb0;border-radius:2px;vertical-align:middle}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;color:#fff}
.ok{background:#2f9e44}.bad{background:#d64545}.warn{background:#e88a1a}
figure{margin:14px 0 20px}
figure svg{width:100%;height:auto;display:block}
figcaption{font-size:.88em;color:#57606a;margin-top:4px}
.legend span{display:inline-block;margin-right:14px;font-size:.88em}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;vertical-align:-1px}
ul{margin:4px 0;padding-left:22px}
.muted{color:#57606a}
"#;

// ---- per-pass plots -----------------------------------------------------------------------

fn pass_plots(h: &mut String, p: &Value) -> Result<()> {
    let name = str_at(p, &["name"]).unwrap_or("?");
    let Some(d) = p.get("details").filter(|d| d.is_object()) else {
        return Ok(());
    };
    let mut body = String::new();
    let mut title = "";
    if !arr(d, "weights").is_empty() || !arr(d, "activations").is_empty() {
        title = "Quantization";
        quantize_plots(&mut body, d)?;
    }
    if !arr(d, "pairs").is_empty() {
        title = "Cross-layer equalization";
        equalize_plots(&mut body, d)?;
    }
    if !arr(d, "groups").is_empty() {
        title = "Pruning";
        prune_plots(&mut body, d)?;
    }
    let sel = d.get("selection").unwrap_or(d);
    let layers = arr(sel, "layers");
    if layers.iter().any(|l| l.get("hessian_trace").is_some()) || !arr(sel, "pareto").is_empty() {
        title = "Mixed precision";
        mixed_plots(&mut body, sel)?;
    }
    if !body.is_empty() {
        let _ = write!(
            h,
            "<section id=\"pass-{}\"><h2>{} <span class=\"muted\">(pass {})</span></h2>\n{body}</section>\n",
            esc(name),
            esc(title),
            esc(name)
        );
    }
    Ok(())
}

// ---- notes --------------------------------------------------------------------------------

fn notes(h: &mut String, r: &Value) {
    let passes = arr(r, "passes");
    let any = passes.iter().any(|p| !arr(p, "notes").is_empty());
    h.push_str("<section id=\"notes\"><h2>Pass notes</h2>\n");
    if !any {
        h.push_str("<p class=\"muted\">No pass left a note.</p></section>\n");
        return;
    }
    h.push_str("<table><tr><th style=\"width:16%\">pass</th><th>note</th></tr>");
    for p in passes {
        let name = str_at(p, &["name"]).unwrap_or("?");
        for n in arr(p, "notes") {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td></tr>",
                esc(name),
                esc(&text(n))
            );
        }
    }
    h.push_str("</table>\n</section>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_report_renders() {
        let page = render(&serde_json::json!({})).unwrap();
        assert!(page.contains("<h2>Summary</h2>"));
        assert!(!page.contains("<svg"));
    }
}
