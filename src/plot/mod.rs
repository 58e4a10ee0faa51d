//! `motrain plot`: loss curves of one or more runs, read from their `metrics.jsonl`
//! (`metrics::Record`: train lines have no `split`, eval lines `"val"`) and drawn by `render`
//! into one SVG or PNG figure.
//!
//! The y range is clipped to what matters: the first steps' loss (about ln(vocab)) would squash
//! the rest, so the top of the range is the highest loss after the first 5% of each run's steps.

mod render;

use crate::metrics::Record;
use anyhow::{anyhow, bail, Context, Result};
use render::{Point, Run};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

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
        Format::Svg => render::svg(&loaded)?.into_bytes(),
        Format::Png => render::png(&loaded)?,
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
        _ => bail!(
            "{}: unknown output format: the file name must end in .svg or .png",
            out.display()
        ),
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
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read {}", file.display()))?;
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
        if !v.is_object() {
            return Err(at("not a JSON object".into()));
        }
        let record: Record = serde_path_to_error::deserialize(v).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner().to_string();
            let kind = if field == "step" { "a non-negative integer" } else { "a number" };
            at(format!("\"{field}\" is not {kind}: {inner}"))
        })?;
        let Some(loss) = record.loss else { continue };
        let Some(step) = record.step else {
            return Err(at("a loss without a \"step\"".into()));
        };
        if !loss.is_finite() {
            continue;
        }
        let point = Point { step: step as f64, tokens: record.tokens.map(|t| t as f64), loss };
        match record.split.as_deref() {
            None => {
                train.insert(step, point);
            }
            Some("val") => {
                val.insert(step, point);
            }
            Some(_) => {} // another split (say "test"): not plotted
        }
    }
    Ok((train.into_values().collect(), val.into_values().collect()))
}

#[cfg(test)]
mod tests {
    use super::render::y_range;
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
                r#"{{"step":{step},"loss":{loss},"lr":0.001,"grad_norm":0.5,"tokens":{tokens},"tokens_per_s":5000.0,"elapsed_s":1.0,"routing":[]}}"#
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
        vec![
            write_run(root, "dense-small", &fake_lines(1.0)),
            write_run(root, "moe-small", &fake_lines(0.8)),
        ]
    }

    #[test]
    fn plots_svg_with_both_runs_in_the_legend() {
        let tmp = tempfile::tempdir().unwrap();
        let runs = two_runs(tmp.path());
        let out = tmp.path().join("loss.svg");
        let summary = plot(&runs, &out).unwrap();
        assert_eq!(
            summary,
            PlotSummary { out: out.clone(), runs: 2, train_points: 40, val_points: 8 }
        );
        let svg = std::fs::read_to_string(&out).unwrap();
        assert!(svg.len() > 2000, "SVG too small: {} bytes", svg.len());
        assert!(svg.starts_with("<svg"));
        for label in [
            "dense-small train",
            "dense-small val",
            "moe-small train",
            "moe-small val",
            "step",
            "tokens",
        ] {
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
        assert!(msg(plot(&[bad_type], &out))
            .contains("metrics.jsonl:1: malformed metrics line: \"loss\" is not a number"));

        let no_loss = write_run(tmp.path(), "noloss", &[r#"{"step":1,"lr":0.1}"#.into()]);
        assert!(msg(plot(&[no_loss], &out)).contains("no loss lines"));

        assert!(msg(plot(&runs, &tmp.path().join("x.pdf"))).contains("must end in .svg or .png"));
        assert!(msg(plot(&runs, &tmp.path().join("noext"))).contains("must end in .svg or .png"));
        assert!(msg(plot(&[], &out)).contains("no runs"));

        let unwritable = tmp.path().join("no/such/dir/x.png");
        assert!(msg(plot(&runs, &unwritable))
            .starts_with(&format!("cannot write {}", unwritable.display())));
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
        assert!(
            svg.contains(&format!("{} val", a.display()))
                && svg.contains(&format!("{} val", b.display()))
        );
    }
}
