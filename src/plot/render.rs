//! Drawing the loss figure with `plotters`: two panels side by side (loss against steps and
//! against tokens), one color per run, train a thin line and val a thick line with markers,
//! and a legend strip under the panels so it never hides a curve. Curves that leave the y
//! range are clipped at its edge, not dropped.
//!
//! Rendering is pure Rust (no fontconfig or freetype): text is laid out with `ab_glyph` from an
//! embedded DejaVu Sans, so the PNG looks the same on any machine.

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Size of the figure in pixels (and in SVG user units): the legend strip under the panels adds
/// a row of height per line of legend.
const WIDTH: u32 = 1500;
const PANELS_HEIGHT: u32 = 600;

/// The font family plotters asks for; we register DejaVu Sans under this name.
const FONT: &str = "sans-serif";

/// Tableau 10: distinct colors that stay distinct for most color-blind readers.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One logged loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub step: f64,
    pub tokens: Option<f64>,
    pub loss: f64,
}

/// One run's curves, sorted by step with one point per step.
#[derive(Debug, Clone)]
pub struct Run {
    pub name: String,
    pub train: Vec<Point>,
    pub val: Vec<Point>,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans 2.37 (from the `dejavu` crate): Bitstream Vera Fonts license plus public
        // domain changes, free to embed and redistribute. A valid TTF, so this cannot fail.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

pub fn svg(runs: &[Run]) -> Result<String> {
    register_font();
    let legend = legend_layout(runs)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, PANELS_HEIGHT + legend.height))
            .into_drawing_area();
        draw_figure(&root, runs, &legend)?;
        root.present().map_err(|e| anyhow!("rendering the SVG: {e}"))?;
    }
    Ok(svg)
}

pub fn png(runs: &[Run]) -> Result<Vec<u8>> {
    register_font();
    let legend = legend_layout(runs)?;
    let height = PANELS_HEIGHT + legend.height;
    let mut rgb = vec![0u8; (WIDTH * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, height)).into_drawing_area();
        draw_figure(&root, runs, &legend)?;
        root.present().map_err(|e| anyhow!("rendering the PNG: {e}"))?;
    }
    let mut png_bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut png_bytes, WIDTH, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(&rgb))
        .map_err(|e| anyhow!("encoding the PNG: {e}"))?;
    Ok(png_bytes)
}

/// The x value of a point in a panel, if it has one there.
type XOf = fn(&Point) -> Option<f64>;

fn draw_figure<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>, runs: &[Run], legend: &LegendLayout,
) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e}");
    root.fill(&WHITE).map_err(err)?;

    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    let mut title = format!("loss: {}", names.join(", "));
    if title.chars().count() > 110 {
        title = format!("loss: {} runs", runs.len());
    }
    let body = root
        .margin(10, 6, 0, 0)
        .titled(&title, (FONT, 26).into_font().color(&BLACK))
        .map_err(err)?;

    let (w, h) = body.dim_in_pixel();
    let (panels, legend_area) = body.split_vertically(h.saturating_sub(legend.height));
    let (left, right) = panels.split_horizontally(w / 2);

    let (y_lo, y_hi) = y_range(runs);
    let step_of: XOf = |p| Some(p.step);
    let tokens_of: XOf = |p| p.tokens;
    draw_panel(&left, runs, "loss vs steps", "step", step_of, (y_lo, y_hi))?;
    draw_panel(&right, runs, "loss vs tokens", "tokens", tokens_of, (y_lo, y_hi))?;
    draw_legend(&legend_area, legend)?;
    Ok(())
}

/// The y range: from a little under the lowest loss to a little over the highest loss once the
/// first 5% of each run's steps are past (falling back to all points when that leaves none).
pub(super) fn y_range(runs: &[Run]) -> (f64, f64) {
    let all = || runs.iter().flat_map(|r| r.train.iter().chain(&r.val));
    let lo = all().map(|p| p.loss).fold(f64::INFINITY, f64::min);
    let late_max = runs
        .iter()
        .flat_map(|r| {
            let last = r.train.iter().chain(&r.val).map(|p| p.step).fold(0.0, f64::max);
            let first = r.train.iter().chain(&r.val).map(|p| p.step).fold(f64::INFINITY, f64::min);
            let cut = first + 0.05 * (last - first);
            r.train.iter().chain(&r.val).filter(move |p| p.step > cut)
        })
        .map(|p| p.loss)
        .fold(f64::NEG_INFINITY, f64::max);
    let hi = if late_max.is_finite() {
        late_max
    } else {
        all().map(|p| p.loss).fold(f64::NEG_INFINITY, f64::max)
    };
    let (lo, hi) = if lo.is_finite() && hi.is_finite() { (lo, hi.max(lo)) } else { (0.0, 1.0) };
    let span = hi - lo;
    let margin = if span > 1e-9 { 0.06 * span } else { 0.5 * lo.abs().max(1.0) * 0.1 };
    (lo - margin, hi + margin)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>, runs: &[Run], caption: &str, x_desc: &str, x_of: XOf,
    (y_lo, y_hi): (f64, f64),
) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e}");
    let x_max = runs
        .iter()
        .flat_map(|r| r.train.iter().chain(&r.val))
        .filter_map(x_of)
        .filter(|x| x.is_finite())
        .fold(0.0, f64::max);
    let x_hi = if x_max > 0.0 { x_max * 1.02 } else { 1.0 };
    let x_lo = 0.0;

    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 20))
        .margin_top(8)
        .margin_left(12)
        .margin_right(28)
        .x_label_area_size(52)
        .y_label_area_size(66)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(err)?;
    let y_decimals = (-((y_hi - y_lo) / 8.0).log10()).ceil().clamp(0.0, 4.0) as usize;
    let x_fmt = |v: &f64| human(*v);
    let y_fmt = |v: &f64| format!("{v:.y_decimals$}");
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("loss")
        .axis_desc_style((FONT, 18))
        .label_style((FONT, 15))
        .x_labels(8)
        .y_labels(8)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .bold_line_style(RGBColor(220, 220, 220))
        .light_line_style(TRANSPARENT)
        .axis_style(RGBColor(90, 90, 90))
        .draw()
        .map_err(err)?;

    let bounds = ((x_lo, x_hi), (y_lo, y_hi));
    for (i, run) in runs.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let train: Vec<(f64, f64)> =
            run.train.iter().filter_map(|p| Some((x_of(p)?, p.loss))).collect();
        let val: Vec<(f64, f64)> =
            run.val.iter().filter_map(|p| Some((x_of(p)?, p.loss))).collect();
        let train_style = color.mix(0.75).stroke_width(1);
        let val_style = color.stroke_width(3);
        for piece in clip_polyline(&train, bounds) {
            chart
                .draw_series(std::iter::once(PathElement::new(piece, train_style)))
                .map_err(err)?;
        }
        if train.len() == 1 && inside(train[0], bounds) {
            chart
                .draw_series(std::iter::once(Circle::new(train[0], 2, color.filled())))
                .map_err(err)?;
        }
        for piece in clip_polyline(&val, bounds) {
            chart.draw_series(std::iter::once(PathElement::new(piece, val_style))).map_err(err)?;
        }
        let markers = val.iter().copied().filter(|&p| inside(p, bounds));
        chart
            .draw_series(markers.map(|p| {
                EmptyElement::at(p)
                    + Circle::new((0, 0), 5, WHITE.filled())
                    + Circle::new((0, 0), 4, color.filled())
            }))
            .map_err(err)?;
    }
    Ok(())
}

type Bounds = ((f64, f64), (f64, f64));

fn inside((x, y): (f64, f64), ((x0, x1), (y0, y1)): Bounds) -> bool {
    x >= x0 && x <= x1 && y >= y0 && y <= y1
}

/// Cuts a polyline to the chart's box (Liang-Barsky on each segment): plotters would clamp the
/// points outside onto the border instead, which bends the curve.
fn clip_polyline(points: &[(f64, f64)], bounds: Bounds) -> Vec<Vec<(f64, f64)>> {
    let mut pieces: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    for pair in points.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        match clip_segment(a, b, bounds) {
            Some((ca, cb)) => {
                if current.is_empty() || ca != a {
                    if current.len() >= 2 {
                        pieces.push(std::mem::take(&mut current));
                    }
                    current = vec![ca];
                }
                current.push(cb);
                if cb != b {
                    pieces.push(std::mem::take(&mut current));
                }
            }
            None => {
                if current.len() >= 2 {
                    pieces.push(std::mem::take(&mut current));
                }
                current.clear();
            }
        }
    }
    if current.len() >= 2 {
        pieces.push(current);
    }
    pieces
}

fn clip_segment(
    a: (f64, f64), b: (f64, f64), ((x0, x1), (y0, y1)): Bounds,
) -> Option<((f64, f64), (f64, f64))> {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let (mut t0, mut t1) = (0.0f64, 1.0f64);
    for (p, q) in [(-dx, a.0 - x0), (dx, x1 - a.0), (-dy, a.1 - y0), (dy, y1 - a.1)] {
        if p == 0.0 {
            if q < 0.0 {
                return None;
            }
        } else {
            let r = q / p;
            if p < 0.0 {
                t0 = t0.max(r);
            } else {
                t1 = t1.min(r);
            }
            if t0 > t1 {
                return None;
            }
        }
    }
    let at = |t: f64| {
        if t == 0.0 {
            a
        } else if t == 1.0 {
            b
        } else {
            (a.0 + t * dx, a.1 + t * dy)
        }
    };
    Some((at(t0), at(t1)))
}

/// 1234 -> "1.23k", 1500000 -> "1.5M", 2e9 -> "2B": axis labels that stay short.
fn human(v: f64) -> String {
    let a = v.abs();
    let (scaled, suffix) = if a >= 1e9 {
        (v / 1e9, "B")
    } else if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = format!("{scaled:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    let s = if s == "-0" { "0" } else { s };
    format!("{s}{suffix}")
}

const LEGEND_FONT: u32 = 17;
const SWATCH: i32 = 36;
const SWATCH_GAP: i32 = 8;
const PAIR_GAP: i32 = 20;
const ENTRY_GAP: i32 = 40;
const ROW_HEIGHT: i32 = 28;

/// One legend entry: a sample of the line and its label.
struct LegendItem {
    run: usize,
    is_val: bool,
    label: String,
    width: i32,
}

/// The legend strip: rows of runs, each run's items ("<run> train", "<run> val") kept together.
struct LegendLayout {
    rows: Vec<Vec<Vec<LegendItem>>>,
    height: u32,
}

fn legend_layout(runs: &[Run]) -> Result<LegendLayout> {
    let font = (FONT, LEGEND_FONT).into_font();
    let max_w = WIDTH as i32 - 40;
    let mut rows: Vec<Vec<Vec<LegendItem>>> = vec![Vec::new()];
    let mut row_w = 0;
    for (i, run) in runs.iter().enumerate() {
        let mut unit = Vec::new();
        for (is_val, kind, points) in [(false, "train", &run.train), (true, "val", &run.val)] {
            if points.is_empty() {
                continue;
            }
            let label = format!("{} {kind}", run.name);
            let (tw, _) =
                font.box_size(&label).map_err(|e| anyhow!("laying out the legend: {e}"))?;
            unit.push(LegendItem { run: i, is_val, label, width: SWATCH + SWATCH_GAP + tw as i32 });
        }
        let w = unit_width(&unit);
        let row = rows.last_mut().expect("at least one row");
        if !row.is_empty() && row_w + ENTRY_GAP + w > max_w {
            rows.push(Vec::new());
            row_w = 0;
        }
        let row = rows.last_mut().expect("at least one row");
        row_w += if row.is_empty() { w } else { ENTRY_GAP + w };
        row.push(unit);
    }
    let height = (rows.len() as i32 * ROW_HEIGHT + 18) as u32;
    Ok(LegendLayout { rows, height })
}

fn unit_width(unit: &[LegendItem]) -> i32 {
    unit.iter().map(|e| e.width).sum::<i32>() + PAIR_GAP * (unit.len() as i32 - 1).max(0)
}

fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>, layout: &LegendLayout,
) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the legend: {e}");
    let (w, _) = area.dim_in_pixel();
    let text =
        TextStyle::from((FONT, LEGEND_FONT).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (r, row) in layout.rows.iter().enumerate() {
        let total: i32 = row.iter().map(|u| unit_width(u)).sum::<i32>()
            + ENTRY_GAP * (row.len() as i32 - 1).max(0);
        let mut x = ((w as i32 - total) / 2).max(0);
        let y = 6 + r as i32 * ROW_HEIGHT + ROW_HEIGHT / 2;
        for unit in row {
            for item in unit {
                let color = PALETTE[item.run % PALETTE.len()];
                let line = vec![(x, y), (x + SWATCH, y)];
                if item.is_val {
                    area.draw(&PathElement::new(line, color.stroke_width(3))).map_err(err)?;
                    area.draw(&Circle::new((x + SWATCH / 2, y), 5, WHITE.filled())).map_err(err)?;
                    area.draw(&Circle::new((x + SWATCH / 2, y), 4, color.filled())).map_err(err)?;
                } else {
                    area.draw(&PathElement::new(line, color.mix(0.75).stroke_width(1)))
                        .map_err(err)?;
                }
                area.draw(&Text::new(
                    item.label.clone(),
                    (x + SWATCH + SWATCH_GAP, y),
                    text.clone(),
                ))
                .map_err(err)?;
                x += item.width + PAIR_GAP;
            }
            x += ENTRY_GAP - PAIR_GAP;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_segments_at_the_box() {
        let bounds = ((0.0, 10.0), (0.0, 5.0));
        let pieces =
            clip_polyline(&[(0.0, 10.0), (2.0, 4.0), (4.0, 2.0), (6.0, 8.0), (8.0, 1.0)], bounds);
        assert_eq!(pieces.len(), 2);
        assert!((pieces[0][0].0 - 2.0 / 6.0 * 5.0).abs() < 1e-9 && pieces[0][0].1 == 5.0);
        assert_eq!(pieces[0][1], (2.0, 4.0));
        assert!(pieces.iter().flatten().all(|&p| inside(p, bounds)));
    }

    #[test]
    fn formats_axis_numbers_short() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(250.0), "250");
        assert_eq!(human(1500.0), "1.5k");
        assert_eq!(human(1_228_800.0), "1.23M");
        assert_eq!(human(2e9), "2B");
    }
}
