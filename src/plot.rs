//! `motrain plot`: loss curves of one or more runs, read from their `metrics.jsonl`, drawn with
//! `plotters` into one SVG or PNG figure.
//!
//! This module owns reading `metrics.jsonl` for plotting (train lines carry `step`, `loss` and
//! `tokens`; eval lines are the ones with a `split` key, of which `"val"` is plotted), and the
//! figure: two panels side by side, loss against steps and loss against tokens, one color per run,
//! its train loss a thin line and its val loss a thick line with markers, and a legend strip under
//! the panels ("<run> train", "<run> val") so it never hides a curve.
//!
//! The y range is clipped to what matters: the first steps' loss (about ln(vocab)) would squash
//! the rest, so the top of the range is the highest loss after the first 5% of each run's steps.
//! Curves that leave the range are clipped at its edge, not dropped.
//!
//! Rendering is pure Rust (no fontconfig or freetype): text is laid out with `ab_glyph` from an
//! embedded DejaVu Sans, so the PNG looks the same on any machine.

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

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

/// What was drawn, for the command to print.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotSummary {
    pub out: PathBuf,
    pub runs: usize,
    pub train_points: usize,
    pub val_points: usize,
}

impl fmt::Display for PlotSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wrote {}: {} run{}, {} train and {} val points",
            self.out.display(),
            self.runs,
            if self.runs == 1 { "" } else { "s" },
            self.train_points,
            self.val_points
        )
    }
}

/// One logged loss.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    step: f64,
    tokens: Option<f64>,
    loss: f64,
}

/// One run's curves, sorted by step with one point per step.
#[derive(Debug, Clone)]
struct Run {
    name: String,
    train: Vec<Point>,
    val: Vec<Point>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Format {
    Svg,
    Png,
}

/// Plots the loss curves of `runs` (run directories, or paths to `metrics.jsonl` files) into
/// `out`, an `.svg` or `.png` file. Errors are one line each and name the file (and line) at fault.
pub fn plot(runs: &[PathBuf], out: &Path) -> Result<PlotSummary> {
    let format = output_format(out)?;
    if runs.is_empty() {
        bail!("no runs to plot: give one or more run directories or metrics.jsonl files");
    }
    let mut loaded = runs.iter().map(|r| load_run(r)).collect::<Result<Vec<_>>>()?;
    disambiguate_names(&mut loaded, runs);

    let bytes = match format {
        Format::Svg => render_svg(&loaded)?.into_bytes(),
        Format::Png => render_png(&loaded)?,
    };
    std::fs::write(out, bytes).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(PlotSummary {
        out: out.to_path_buf(),
        runs: loaded.len(),
        train_points: loaded.iter().map(|r| r.train.len()).sum(),
        val_points: loaded.iter().map(|r| r.val.len()).sum(),
    })
}

fn output_format(out: &Path) -> Result<Format> {
    match out.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("svg") => Ok(Format::Svg),
        Some("png") => Ok(Format::Png),
        _ => bail!("{}: unknown output format: the file name must end in .svg or .png", out.display()),
    }
}

/// Finds a run's `metrics.jsonl` and its name (the run directory's name).
fn locate(arg: &Path) -> Result<(PathBuf, String)> {
    if arg.is_dir() {
        let file = arg.join("metrics.jsonl");
        if !file.is_file() {
            bail!("{}: no metrics.jsonl in this run directory", arg.display());
        }
        Ok((file, dir_name(arg)))
    } else if arg.is_file() {
        let dir = match arg.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Ok((arg.to_path_buf(), dir_name(&dir)))
    } else {
        bail!("{}: no such run directory or metrics.jsonl file", arg.display());
    }
}

fn dir_name(dir: &Path) -> String {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    // `.` or `..` have no file name of their own: ask the file system.
    name(dir)
        .filter(|n| n != "." && n != "..")
        .or_else(|| dir.canonicalize().ok().as_deref().and_then(name))
        .unwrap_or_else(|| dir.display().to_string())
}

/// Two runs with the same directory name are told apart by the path they were given as.
fn disambiguate_names(runs: &mut [Run], args: &[PathBuf]) {
    let names: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for (run, arg) in runs.iter_mut().zip(args) {
        if names.iter().filter(|n| **n == run.name).count() > 1 {
            run.name = arg.display().to_string();
        }
    }
}

fn load_run(arg: &Path) -> Result<Run> {
    let (file, name) = locate(arg)?;
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
    let (train, val) = parse_metrics(&text, &file)?;
    if train.is_empty() && val.is_empty() {
        bail!("{}: no loss lines (neither train nor val) to plot", file.display());
    }
    Ok(Run { name, train, val })
}

/// Parses `metrics.jsonl` text into (train, val) points, each sorted by step with the last line
/// of a step kept. Lines without a `loss` (other records) and non-finite losses (`null`) are
/// skipped; a last line without its newline that does not parse is a line still being written,
/// and is skipped too.
fn parse_metrics(text: &str, file: &Path) -> Result<(Vec<Point>, Vec<Point>)> {
    let mut train = BTreeMap::new();
    let mut val = BTreeMap::new();
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = |what: String| anyhow!("{}:{n}: malformed metrics line: {what}", file.display());
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == lines.len() => continue, // unterminated last line: being written
            Err(e) => {
                let msg = e.to_string();
                let msg = msg.split(" at line ").next().unwrap_or(&msg);
                return Err(at(format!("not JSON ({msg} at column {})", e.column())));
            }
        };
        let Some(obj) = v.as_object() else {
            return Err(at("not a JSON object".into()));
        };
        let loss = match obj.get("loss") {
            None | Some(Value::Null) => continue,
            Some(l) => l.as_f64().ok_or_else(|| at(format!("\"loss\" is not a number: {l}")))?,
        };
        let step = match obj.get("step") {
            Some(s) => s.as_u64().ok_or_else(|| at(format!("\"step\" is not a non-negative integer: {s}")))?,
            None => return Err(at("a loss without a \"step\"".into())),
        };
        let tokens = match obj.get("tokens") {
            None | Some(Value::Null) => None,
            Some(t) => Some(t.as_f64().ok_or_else(|| at(format!("\"tokens\" is not a number: {t}")))?),
        };
        if !loss.is_finite() {
            continue;
        }
        let point = Point { step: step as f64, tokens, loss };
        match obj.get("split") {
            None => {
                train.insert(step, point);
            }
            Some(Value::String(s)) if s == "val" => {
                val.insert(step, point);
            }
            Some(_) => {} // another split (say "test"): not plotted
        }
    }
    Ok((train.into_values().collect(), val.into_values().collect()))
}

// ---------------------------------------------------------------------------------------------
// Rendering

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans 2.37 (from the `dejavu` crate): Bitstream Vera Fonts license plus public
        // domain changes, free to embed and redistribute. A valid TTF, so this cannot fail.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

fn render_svg(runs: &[Run]) -> Result<String> {
    register_font();
    let legend = legend_layout(runs)?;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, PANELS_HEIGHT + legend.height)).into_drawing_area();
        draw_figure(&root, runs, &legend)?;
        root.present().map_err(|e| anyhow!("rendering the SVG: {e}"))?;
    }
    Ok(svg)
}

fn render_png(runs: &[Run]) -> Result<Vec<u8>> {
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
    encoder.write_header().and_then(|mut w| w.write_image_data(&rgb)).map_err(|e| anyhow!("encoding the PNG: {e}"))?;
    Ok(png_bytes)
}

/// The x value of a point in a panel, if it has one there.
type XOf = fn(&Point) -> Option<f64>;

fn draw_figure<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, runs: &[Run], legend: &LegendLayout) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e}");
    root.fill(&WHITE).map_err(err)?;

    let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    let mut title = format!("loss: {}", names.join(", "));
    if title.chars().count() > 110 {
        title = format!("loss: {} runs", runs.len());
    }
    let body = root.margin(10, 6, 0, 0).titled(&title, (FONT, 26).into_font().color(&BLACK)).map_err(err)?;

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
fn y_range(runs: &[Run]) -> (f64, f64) {
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
    let hi = if late_max.is_finite() { late_max } else { all().map(|p| p.loss).fold(f64::NEG_INFINITY, f64::max) };
    let (lo, hi) = if lo.is_finite() && hi.is_finite() { (lo, hi.max(lo)) } else { (0.0, 1.0) };
    let span = hi - lo;
    let margin = if span > 1e-9 { 0.06 * span } else { 0.5 * lo.abs().max(1.0) * 0.1 };
    (lo - margin, hi + margin)
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    runs: &[Run],
    caption: &str,
    x_desc: &str,
    x_of: XOf,
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
        let train: Vec<(f64, f64)> = run.train.iter().filter_map(|p| Some((x_of(p)?, p.loss))).collect();
        let val: Vec<(f64, f64)> = run.val.iter().filter_map(|p| Some((x_of(p)?, p.loss))).collect();
        let train_style = color.mix(0.75).stroke_width(1);
        let val_style = color.stroke_width(3);
        for piece in clip_polyline(&train, bounds) {
            chart.draw_series(std::iter::once(PathElement::new(piece, train_style))).map_err(err)?;
        }
        if train.len() == 1 && inside(train[0], bounds) {
            chart.draw_series(std::iter::once(Circle::new(train[0], 2, color.filled()))).map_err(err)?;
        }
        for piece in clip_polyline(&val, bounds) {
            chart.draw_series(std::iter::once(PathElement::new(piece, val_style))).map_err(err)?;
        }
        let markers = val.iter().copied().filter(|&p| inside(p, bounds));
        chart
            .draw_series(markers.map(|p| {
                EmptyElement::at(p) + Circle::new((0, 0), 5, WHITE.filled()) + Circle::new((0, 0), 4, color.filled())
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

fn clip_segment(a: (f64, f64), b: (f64, f64), ((x0, x1), (y0, y1)): Bounds) -> Option<((f64, f64), (f64, f64))> {
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
            let (tw, _) = font.box_size(&label).map_err(|e| anyhow!("laying out the legend: {e}"))?;
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

fn draw_legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, layout: &LegendLayout) -> Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the legend: {e}");
    let (w, _) = area.dim_in_pixel();
    let text = TextStyle::from((FONT, LEGEND_FONT).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (r, row) in layout.rows.iter().enumerate() {
        let total: i32 = row.iter().map(|u| unit_width(u)).sum::<i32>() + ENTRY_GAP * (row.len() as i32 - 1).max(0);
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
                    area.draw(&PathElement::new(line, color.mix(0.75).stroke_width(1))).map_err(err)?;
                }
                area.draw(&Text::new(item.label.clone(), (x + SWATCH + SWATCH_GAP, y), text.clone())).map_err(err)?;
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

    fn write_run(root: &Path, name: &str, lines: &[String]) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
        dir
    }

    /// A fake run: train lines every 10 steps, val every 50, loss falling from about 9.
    fn fake_lines(scale: f64) -> Vec<String> {
        let mut lines = Vec::new();
        for step in (10..=200).step_by(10) {
            let loss = 3.0 + 6.0 * scale * (-(step as f64) / 40.0).exp();
            let tokens = step * 2048;
            lines.push(format!(
                r#"{{"step":{step},"loss":{loss},"lr":0.001,"grad_norm":0.5,"tokens":{tokens},"tokens_per_s":5000.0,"elapsed_s":1.0,"routing":[[0.5,0.5]]}}"#
            ));
            if step % 50 == 0 {
                lines.push(format!(
                    r#"{{"step":{step},"split":"val","loss":{},"ppl":20.0,"tokens":{tokens}}}"#,
                    loss + 0.1
                ));
            }
        }
        lines
    }

    fn two_runs(root: &Path) -> Vec<PathBuf> {
        vec![write_run(root, "dense-small", &fake_lines(1.0)), write_run(root, "moe-small", &fake_lines(0.8))]
    }

    #[test]
    fn plots_svg_with_both_runs_in_the_legend() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = two_runs(tmp.path());
        let out = tmp.path().join("loss.svg");
        let summary = plot(&runs, &out).unwrap();
        assert_eq!(summary, PlotSummary { out: out.clone(), runs: 2, train_points: 40, val_points: 8 });
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.len() > 2000, "SVG too small: {} bytes", svg.len());
        assert!(svg.starts_with("<svg"));
        for label in ["dense-small train", "dense-small val", "moe-small train", "moe-small val", "step", "tokens"] {
            assert!(svg.contains(label), "SVG lacks {label:?}");
        }
    }

    #[test]
    fn plots_png() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = two_runs(tmp.path());
        let out = tmp.path().join("loss.PNG");
        let summary = plot(&runs, &out).unwrap();
        assert_eq!(summary.runs, 2);
        let bytes = std::fs::read(&out).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(bytes.len() > 10_000, "PNG too small: {} bytes", bytes.len());
    }

    #[test]
    fn accepts_a_metrics_file_and_names_the_run_by_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = two_runs(tmp.path());
        let out = tmp.path().join("one.svg");
        plot(&[runs[1].join("metrics.jsonl")], &out).unwrap();
        assert!(std::fs::read_to_string(&out).unwrap().contains("moe-small val"));
    }

    #[test]
    fn keeps_the_last_line_of_a_step_and_sorts() {
        let text = [
            r#"{"step":20,"loss":5.0,"tokens":40}"#,
            r#"{"step":10,"loss":6.0,"tokens":20}"#,
            r#"{"step":20,"loss":4.5,"tokens":40}"#,
            r#"{"step":20,"split":"val","loss":4.8,"ppl":1.0,"tokens":40}"#,
            r#"{"step":20,"split":"test","loss":9.9}"#,
            r#"{"step":30,"loss":null}"#,
            r#"{"event":"resume"}"#,
            "",
            r#"{"step":40,"lo"#, // a last line still being written
        ]
        .join("\n");
        let (train, val) = parse_metrics(&text, Path::new("m.jsonl")).unwrap();
        let train: Vec<(f64, f64)> = train.iter().map(|p| (p.step, p.loss)).collect();
        assert_eq!(train, vec![(10.0, 6.0), (20.0, 4.5)]);
        assert_eq!(val.len(), 1);
        assert_eq!(val[0].tokens, Some(40.0));
    }

    #[test]
    fn y_range_ignores_the_first_steps_but_not_the_minimum() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = write_run(tmp.path(), "r", &fake_lines(1.0));
        let run = load_run(&dir).unwrap();
        let (lo, hi) = y_range(std::slice::from_ref(&run));
        let first = run.train[0].loss;
        let min = run.train.iter().chain(&run.val).map(|p| p.loss).fold(f64::INFINITY, f64::min);
        assert!(hi < first, "first loss {first} should be clipped, hi = {hi}");
        assert!(lo < min);
    }

    #[test]
    fn clips_segments_at_the_box() {
        let bounds = ((0.0, 10.0), (0.0, 5.0));
        let pieces = clip_polyline(&[(0.0, 10.0), (2.0, 4.0), (4.0, 2.0), (6.0, 8.0), (8.0, 1.0)], bounds);
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

    #[test]
    fn errors_are_clear() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = two_runs(tmp.path());
        let out = tmp.path().join("x.svg");
        let msg = |r: Result<PlotSummary>| format!("{:#}", r.unwrap_err());

        let missing = tmp.path().join("nope");
        assert!(msg(plot(&[missing], &out)).contains("no such run directory"));

        let empty_dir = tmp.path().join("empty");
        std::fs::create_dir(&empty_dir).unwrap();
        assert!(msg(plot(&[empty_dir], &out)).contains("no metrics.jsonl"));

        let mut lines = fake_lines(1.0);
        lines[3] = r#"{"step": 40, "loss": }"#.into();
        let bad = write_run(tmp.path(), "bad", &lines);
        let m = msg(plot(&[runs[0].clone(), bad], &out));
        assert!(m.contains("bad/metrics.jsonl:4:") && m.contains("malformed"), "{m}");
        assert!(!m.contains('\n'));

        let bad_type = write_run(tmp.path(), "badtype", &[r#"{"step":1,"loss":"high"}"#.into()]);
        assert!(
            msg(plot(&[bad_type], &out)).contains("metrics.jsonl:1: malformed metrics line: \"loss\" is not a number")
        );

        let no_loss = write_run(tmp.path(), "noloss", &[r#"{"step":1,"lr":0.1}"#.into()]);
        assert!(msg(plot(&[no_loss], &out)).contains("no loss lines"));

        assert!(msg(plot(&runs, &tmp.path().join("x.pdf"))).contains("must end in .svg or .png"));
        assert!(msg(plot(&runs, &tmp.path().join("noext"))).contains("must end in .svg or .png"));
        assert!(msg(plot(&[], &out)).contains("no runs"));

        let unwritable = tmp.path().join("no/such/dir/x.png");
        assert!(msg(plot(&runs, &unwritable)).starts_with(&format!("cannot write {}", unwritable.display())));
        assert!(!out.exists());
    }

    #[test]
    fn same_named_runs_are_told_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let a = write_run(&tmp.path().join("a"), "run", &fake_lines(1.0));
        let b = write_run(&tmp.path().join("b"), "run", &fake_lines(0.9));
        let out = tmp.path().join("x.svg");
        plot(&[a.clone(), b.clone()], &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.contains(&format!("{} val", a.display())) && svg.contains(&format!("{} val", b.display())));
    }
}
