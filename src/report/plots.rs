//! Inline SVG charts for the HTML report, drawn with plotters' SVG backend.
//!
//! Two shapes cover every plot the report needs:
//! - [`hbars`]: one row per layer (names on the left, readable however long the model's node
//!   names are), each row holding bars (`Segment`) and dots (`Mark`) on a shared x axis that
//!   can be logarithmic;
//! - [`xy`]: a line of points (a Pareto frontier) with one highlighted point; [`xy_lines`]
//!   several such lines on shared axes (e.g. predicted and measured, with and without pruning).
//!
//! Logarithmic axes are drawn as linear axes over `log10(value)` with labels printed as
//! `10^v`: one code path for both scales, and decade ticks stay round numbers.
//!
//! Text is handed to plotters raw: its SVG backend escapes `<`, `>`, `&` and quotes, so node
//! names cannot inject markup (the report's tests check this). Output is deterministic.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

pub type Rgb = RGBColor;

pub const BLUE: RGBColor = RGBColor(0x2b, 0x6c, 0xb0);
pub const LIGHT_BLUE: RGBColor = RGBColor(0x9c, 0xc3, 0xe6);
pub const RED: RGBColor = RGBColor(0xd6, 0x45, 0x45);
pub const LIGHT_RED: RGBColor = RGBColor(0xf2, 0xb8, 0xb8);
pub const GREY: RGBColor = RGBColor(0x8a, 0x8a, 0x8a);
pub const LIGHT_GREY: RGBColor = RGBColor(0xcc, 0xcc, 0xcc);
pub const GREEN: RGBColor = RGBColor(0x2f, 0x9e, 0x44);
pub const ORANGE: RGBColor = RGBColor(0xe8, 0x8a, 0x1a);
pub const PURPLE: RGBColor = RGBColor(0x7b, 0x4f, 0xb5);

const WIDTH: u32 = 920;
const ROW_PX: u32 = 22;
/// Characters of a row label that fit the label area; longer names keep their tail (the
/// distinctive end of `/features/features.4/features.4.0/Conv`).
const LABEL_CHARS: usize = 40;

/// A horizontal bar from `lo` to `hi` (clamped to the axis) of a given thickness in pixels.
#[derive(Debug, Clone)]
pub struct Segment {
    pub lo: f64,
    pub hi: f64,
    pub color: RGBColor,
    pub thickness: u32,
}

/// A dot at `x`.
#[derive(Debug, Clone)]
pub struct Mark {
    pub x: f64,
    pub color: RGBColor,
}

/// One row of an [`hbars`] chart.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub label: String,
    pub segments: Vec<Segment>,
    pub marks: Vec<Mark>,
    /// Printed right of the row's largest value.
    pub value_text: Option<String>,
}

/// Shorten a label to `LABEL_CHARS`, keeping its end.
pub fn short_label(s: &str) -> String {
    let n = s.chars().count();
    if n <= LABEL_CHARS {
        return s.to_string();
    }
    let tail: String = s.chars().skip(n - (LABEL_CHARS - 1)).collect();
    format!("…{tail}")
}

/// Axis range for `values`: `[min, max]` widened to include `zero` when asked, padded, and
/// never empty. On a log axis the values are log10s and the range snaps to whole decades.
fn axis_range(values: &[f64], log: bool, include_zero: bool) -> (f64, f64) {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if finite.is_empty() {
        (lo, hi) = (0.0, 1.0);
    }
    if log {
        lo = lo.floor();
        hi = hi.ceil();
        if hi - lo < 1.0 {
            hi = lo + 1.0;
        }
        return (lo, hi);
    }
    if include_zero {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let pad = if hi == 0.0 { 1.0 } else { hi.abs() * 0.1 };
        return (lo - pad, hi + pad);
    }
    let pad = 0.06 * (hi - lo);
    (
        if include_zero && lo == 0.0 {
            0.0
        } else {
            lo - pad
        },
        hi + pad,
    )
}

fn to_axis(v: f64, log: bool) -> f64 {
    if log {
        if v > 0.0 {
            v.log10()
        } else {
            f64::NEG_INFINITY
        }
    } else {
        v
    }
}

/// Tick label: plain numbers compactly, log axes as the value the decade stands for.
fn tick(v: f64, log: bool) -> String {
    let x = if log { 10f64.powf(v) } else { v };
    compact(x)
}

/// A short, stable rendering of a number (at most 4 significant digits).
pub fn compact(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    if x == 0.0 {
        return "0".into();
    }
    let a = x.abs();
    if !(1e-3..1e5).contains(&a) {
        let s = format!("{x:.2e}");
        // 1.00e-4 -> 1e-4
        return s.replace(".00e", "e").replace("0e", "e");
    }
    let s = format!("{x:.4}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    // Keep at most 4 significant digits for mid-size values.
    if a >= 100.0 {
        format!("{x:.0}")
    } else {
        s
    }
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e}")
}

/// Horizontal rows sharing an x axis; row 0 on top. `log_x` plots log10 of the values.
pub fn hbars(rows: &[Row], x_label: &str, log_x: bool, include_zero: bool) -> Result<String> {
    let n = rows.len().max(1) as i32;
    let mut values = Vec::new();
    for r in rows {
        for s in &r.segments {
            values.push(to_axis(s.lo, log_x));
            values.push(to_axis(s.hi, log_x));
        }
        values.extend(r.marks.iter().map(|m| to_axis(m.x, log_x)));
    }
    let (x0, mut x1) = axis_range(&values, log_x, include_zero && !log_x);
    if rows.iter().any(|r| r.value_text.is_some()) {
        // Room for the value printed after the longest bar.
        x1 += 0.12 * (x1 - x0);
    }
    let height = 70 + ROW_PX * n as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(8)
            .margin_right(20)
            .x_label_area_size(40)
            .y_label_area_size(290)
            // Rows sit at y = 0..n (row 0 on top); labels are drawn below, one per row.
            .build_cartesian_2d(x0..x1, -0.5..(n as f64 - 0.5))
            .map_err(err)?;
        let row_y = |i: usize| (n - 1 - i as i32) as f64;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_labels(if log_x {
                (x1 - x0).round() as usize + 1
            } else {
                8
            })
            .x_label_formatter(&|v| tick(*v, log_x))
            .x_desc(x_label)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(LIGHT_GREY.mix(0.6))
            .draw()
            .map_err(err)?;
        let clamp = |v: f64| {
            let a = to_axis(v, log_x);
            if a.is_nan() {
                x0
            } else {
                a.clamp(x0, x1)
            }
        };
        for (i, r) in rows.iter().enumerate() {
            let yv = row_y(i);
            let y = || yv;
            let pos = chart.backend_coord(&(x0, yv));
            root.draw(&Text::new(
                short_label(&r.label),
                (pos.0 - 8, pos.1),
                ("sans-serif", 15)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Right, VPos::Center)),
            ))
            .map_err(err)?;
            let mut right = x0;
            for s in &r.segments {
                let (a, b) = (clamp(s.lo), clamp(s.hi));
                right = right.max(a).max(b);
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(a, y()), (b, y())],
                        s.color.stroke_width(s.thickness),
                    )))
                    .map_err(err)?;
            }
            for m in &r.marks {
                let x = clamp(m.x);
                right = right.max(x);
                chart
                    .draw_series(std::iter::once(Circle::new((x, y()), 4, m.color.filled())))
                    .map_err(err)?;
            }
            if let Some(t) = &r.value_text {
                let pos = chart.backend_coord(&(right, y()));
                root.draw(&Text::new(
                    t.clone(),
                    (pos.0 + 8, pos.1),
                    ("sans-serif", 14)
                        .into_font()
                        .color(&BLACK.mix(0.75))
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// A line through `points` (sorted by x) with dots, `highlight` drawn larger in red.
/// `log_y` plots log10 of y; points with y <= 0 cannot be shown there and are skipped.
pub fn xy(
    points: &[(f64, f64)],
    highlight: Option<(f64, f64)>,
    x_label: &str,
    y_label: &str,
    log_y: bool,
) -> Result<String> {
    let line = Series {
        points: points.to_vec(),
        color: BLUE,
        dots_only: false,
    };
    xy_lines(&[line], highlight, x_label, y_label, log_y)
}

/// One line of an [`xy_lines`] chart: its points, colour, and whether it is dashed (drawn as
/// dots only, without a connecting line).
pub struct Series {
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub dots_only: bool,
}

/// Several lines on shared axes (each sorted by x), `highlight` drawn larger in red; with
/// `log_y`, points with y <= 0 are skipped.
pub fn xy_lines(
    series: &[Series],
    highlight: Option<(f64, f64)>,
    x_label: &str,
    y_label: &str,
    log_y: bool,
) -> Result<String> {
    let map = |&(x, y): &(f64, f64)| (x, to_axis(y, log_y));
    let lines: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            let mut pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(map)
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
            pts
        })
        .collect();
    let hl = highlight
        .map(|p| map(&p))
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let all: Vec<(f64, f64)> = lines.iter().flatten().chain(hl.iter()).copied().collect();
    let xs: Vec<f64> = all.iter().map(|p| p.0).collect();
    let ys: Vec<f64> = all.iter().map(|p| p.1).collect();
    let (x0, x1) = axis_range(&xs, false, false);
    let (y0, y1) = axis_range(&ys, log_y, false);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 380)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .margin_right(30)
            .x_label_area_size(44)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(8)
            .y_labels(if log_y {
                (y1 - y0).round() as usize + 1
            } else {
                8
            })
            .x_label_formatter(&|v| compact(*v))
            .y_label_formatter(&|v| tick(*v, log_y))
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 16))
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(LIGHT_GREY.mix(0.6))
            .draw()
            .map_err(err)?;
        for (s, pts) in series.iter().zip(&lines) {
            if !s.dots_only {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        pts.clone(),
                        s.color.stroke_width(2),
                    )))
                    .map_err(err)?;
            }
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, s.color.filled())))
                .map_err(err)?;
        }
        if let Some(p) = hl {
            chart
                .draw_series(std::iter::once(Circle::new(p, 7, RED.filled())))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_numbers() {
        assert_eq!(compact(0.0), "0");
        assert_eq!(compact(1.0), "1");
        assert_eq!(compact(0.25), "0.25");
        assert_eq!(compact(1234.0), "1234");
        assert_eq!(compact(1e-4), "1e-4");
    }

    #[test]
    fn log_axis_snaps_to_decades() {
        assert_eq!(axis_range(&[-0.5, 1.2], true, false), (-1.0, 2.0));
        assert_eq!(axis_range(&[0.0], true, false), (0.0, 1.0));
    }

    #[test]
    fn long_labels_keep_their_tail() {
        let l = short_label(&format!("{}/Conv_final", "x".repeat(80)));
        assert_eq!(l.chars().count(), LABEL_CHARS);
        assert!(l.ends_with("/Conv_final"));
    }
}
