//! `--set KEY=VALUE` overrides and the path rules: `[data]` paths in a file are relative to
//! the file, paths on the command line to the current directory.

use super::{ConfigError, Result};
use std::path::{Path, PathBuf};

pub(super) fn one_line(s: &str) -> String {
    s.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Makes the relative `[data]` paths of a file absolute against its directory.
pub(super) fn anchor_data_paths(value: &mut toml::Table, base: &Path) {
    let Some(toml::Value::Table(data)) = value.get_mut("data") else {
        return;
    };
    for key in ["train", "val", "tokenizer"] {
        if let Some(toml::Value::String(s)) = data.get_mut(key) {
            if key == "tokenizer" && s == "gpt2" {
                continue;
            }
            *s = absolute(&base.join(&*s));
        }
    }
    if let Some(sources) = data.get_mut("sources") {
        anchor_source_paths(sources, base);
    }
}

/// Makes the `train` and `val` globs of `[[data.sources]]` tables absolute against `base`.
fn anchor_source_paths(sources: &mut toml::Value, base: &Path) {
    let Some(list) = sources.as_array_mut() else { return };
    for table in list.iter_mut().filter_map(toml::Value::as_table_mut) {
        for key in ["train", "val"] {
            if let Some(toml::Value::String(s)) = table.get_mut(key) {
                *s = absolute(&base.join(&*s));
            }
        }
    }
}

/// An absolute path with `.` and `..` folded away lexically (globs need not exist yet).
pub fn absolute(p: &Path) -> String {
    use std::path::Component;
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out.display().to_string()
}

/// The key and the raw value of a `KEY=VALUE` override, trimmed.
pub(super) fn split_override(arg: &str) -> Option<(&str, &str)> {
    arg.split_once('=').map(|(key, raw)| (key.trim(), raw.trim()))
}

/// Applies one `KEY=VALUE` override: the value is TOML, or a bare string.
pub fn apply_override(value: &mut toml::Table, arg: &str) -> Result<()> {
    let err = |message: String| ConfigError::Override { arg: arg.to_string(), message };
    let (key, raw) = split_override(arg)
        .ok_or_else(|| err("expected KEY=VALUE, e.g. model.d_model=256".into()))?;
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(format!("`{key}` is not a dotted key path")));
    }
    let mut parsed = parse_value(raw);
    // Paths given on the command line are relative to the current directory.
    match (parts.as_slice(), &parsed) {
        (["data", "train" | "val" | "tokenizer"], toml::Value::String(s)) if s != "gpt2" => {
            parsed = toml::Value::String(absolute(Path::new(s)));
        }
        (["data", "sources"], _) => anchor_source_paths(&mut parsed, Path::new("")),
        _ => {}
    }
    let mut table = value;
    for part in &parts[..parts.len() - 1] {
        let entry =
            table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(err(format!("`{part}` is a value, not a table"))),
        };
    }
    table.insert(parts[parts.len() - 1].to_string(), parsed);
    Ok(())
}

fn parse_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}
