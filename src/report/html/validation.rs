//! The Validation section: the verdict badge (checked / MISMATCH / NOT CHECKED, or skipped
//! under `--no-validate`), the method and inputs, one table row per output with its error
//! metrics (SQNR = 10·log10(signal power / error power)), accuracy when labels were given, and
//! the simulation rewrites and notes the validator recorded.

use std::fmt::Write as _;

use serde_json::Value;

use super::helpers::{arr, esc, f64_at, list, str_at, text};

pub(super) fn validation(h: &mut String, r: &Value) {
    h.push_str("<section id=\"validation\"><h2>Validation</h2>\n");
    let Some(v) = r.get("validation").filter(|v| v.is_object()) else {
        h.push_str("<p><span class=\"badge warn\">skipped</span> The output was not checked (<code>--no-validate</code>).</p></section>\n");
        return;
    };
    let runtime = str_at(v, &["runtime"]).unwrap_or("the runtime");
    let status = str_at(v, &["status"]).unwrap_or("unknown");
    let (class, label) = match status {
        "checked" => ("ok", "checked"),
        "mismatch" => ("bad", "MISMATCH"),
        "failed" => ("bad", "FAILED"),
        _ => ("warn", "NOT CHECKED"),
    };
    let _ = write!(
        h,
        "<p><span class=\"badge {class}\">{}</span> in {}",
        esc(label),
        esc(runtime)
    );
    if let Some(reason) = str_at(v, &["reason"]) {
        let _ = write!(h, ": {}", esc(reason));
    }
    h.push_str("</p>\n");
    let how = match str_at(v, &["method"]) {
        Some("simulation") => {
            "Original and output ran side by side on simulation graphs: quantized constants \
             dequantized ahead of time, so both run in float and differ only by the compression \
             (the rewrites are listed below)."
        }
        Some("direct") => "Original and output ran side by side in tract as they are.",
        _ => "",
    };
    if !how.is_empty() && status != "not_checked" {
        let _ = writeln!(h, "<p>{}</p>", esc(how));
    }
    let samples = f64_at(v, &["samples"]).unwrap_or(0.0);
    let inputs_desc = match str_at(v, &["input_source"]) {
        Some("user") => format!("{samples:.0} batch(es) of given inputs (--eval)"),
        Some("calibration") => format!(
            "{samples:.0}{} calibration sample(s): in-sample (no --eval given), optimistic for held-out data",
            match f64_at(v, &["samples_given"]) {
                Some(given) if given > samples => format!(" of {given:.0}"),
                _ => String::new(),
            }
        ),
        Some("synthetic") => format!(
            "{samples:.0} synthetic batch(es), seed {}: random inputs, a smoke test, not a fidelity measure",
            v.get("seed").map(text).unwrap_or_default()
        ),
        _ => String::new(),
    };
    let ins = arr(v, "inputs");
    if !inputs_desc.is_empty() && status != "not_checked" {
        let shapes: Vec<String> = ins
            .iter()
            .map(|i| {
                format!(
                    "{} {}[{}]",
                    str_at(i, &["name"]).unwrap_or("?"),
                    str_at(i, &["elem_type_name"]).unwrap_or(""),
                    i.get("shape").map(text).unwrap_or_default()
                )
            })
            .collect();
        let _ = writeln!(
            h,
            "<p>Inputs: {}{}</p>",
            esc(&inputs_desc),
            if shapes.is_empty() {
                String::new()
            } else {
                format!(" — {}", esc(&shapes.join(", ")))
            }
        );
    }
    let outs = arr(v, "outputs");
    if !outs.is_empty() {
        h.push_str("<table><tr><th>output</th><th>shape</th><th class=\"n\">max |err|</th><th class=\"n\">mean |err|</th><th class=\"n\">cosine</th><th class=\"n\">SQNR</th><th class=\"n\">top-1 agree</th><th class=\"n\">accuracy</th></tr>");
        for o in outs {
            let num = |k: &str, f: &dyn Fn(f64) -> String| {
                f64_at(o, &[k]).map(f).unwrap_or_else(|| "—".into())
            };
            let identical = f64_at(o, &["max_abs_err"]) == Some(0.0);
            let sqnr = match f64_at(o, &["sqnr_db"]) {
                Some(d) => format!("{d:.1} dB"),
                // Non-finite values serialize as null; +inf SQNR means identical outputs.
                None if identical => "∞ (identical)".into(),
                None => "—".into(),
            };
            let acc = match (
                f64_at(o, &["accuracy_original"]),
                f64_at(o, &["accuracy_candidate"]),
            ) {
                (Some(a), Some(b)) => format!(
                    "{:.2}% → {:.2}% ({:+.2} pt)",
                    100.0 * a,
                    100.0 * b,
                    100.0 * (b - a)
                ),
                _ => "—".into(),
            };
            let _ = write!(
                h,
                "<tr><td class=\"code\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
                esc(str_at(o, &["name"]).unwrap_or("?")),
                esc(&o.get("shape").map(text).unwrap_or_default()),
                num("max_abs_err", &|x| format!("{x:.3e}")),
                num("mean_abs_err", &|x| format!("{x:.3e}")),
                num("cosine", &|x| format!("{x:.6}")),
                esc(&sqnr),
                num("top1_agreement", &|x| format!("{:.2}%", 100.0 * x)),
                esc(&acc),
            );
            if let Some(n) = f64_at(o, &["nonfinite_mismatches"]).filter(|n| *n > 0.0) {
                let _ = write!(
                    h,
                    "<tr><td></td><td colspan=\"7\"><span class=\"badge bad\">NON-FINITE</span> {n:.0} element(s) NaN/inf in one model and finite in the other: the output is wrong there (the figures above cover the remaining elements)</td></tr>"
                );
            }
        }
        h.push_str("</table>\n");
        h.push_str("<p class=\"muted\">Errors compare the output model against the original on the same inputs. SQNR = 10·log10(signal power / error power): higher is better, ~6 dB per bit. Top-1 agreement: rows whose argmax is the same in both.</p>\n");
    }
    if let Some(l) = v.get("latency").filter(|l| l.is_object()) {
        let num = |k: &str| f64_at(l, &[k]).unwrap_or(f64::NAN);
        let speedup = num("speedup");
        let _ = writeln!(
            h,
            "<p>Latency in {}: original {:.2} ms, output {:.2} ms, <b>{:.2}x {}</b> (median of {:.0} interleaved runs on a batch of {:.0}, {}).</p>",
            esc(runtime),
            num("original_ms"),
            num("candidate_ms"),
            if speedup >= 1.0 { speedup } else { 1.0 / speedup },
            if speedup >= 1.0 { "faster" } else { "slower" },
            num("runs"),
            num("batch_rows"),
            esc(str_at(l, &["timed"]).unwrap_or("")),
        );
    }
    list(h, "Simulation rewrites", arr(v, "rewrites"));
    list(h, "Notes", arr(v, "notes"));
    h.push_str("</section>\n");
}
