//! The shape of the source tree, checked: imports between source files form no circle (so the
//! layers of `docs/architecture.md` hold), and no source file grows past 700 lines.
//!
//! The import graph is read from the text of `src/`: every `use crate::…`, `use super::…` and
//! `use self::…` (with `{…}` groups expanded) and every inline `crate::…` or `super::…` path,
//! resolved to the file that defines the longest matching module path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            source_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// `src/model/moe.rs` → ["model", "moe"]; `src/model/mod.rs` → ["model"]; `src/lib.rs` → [].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().to_string()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// Expands `a::{b, c::{d, e}}` into `a::b`, `a::c::d`, `a::c::e`.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.to_string()];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let (mut depth, mut start, mut items) = (0, 0, Vec::new());
    for (i, ch) in inner.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .flat_map(|s| expand(s).into_iter().map(move |t| format!("{prefix}{t}")))
        .collect()
}

/// The module path a `use` path names, absolute from the crate root.
fn absolute(here: &[String], path: &str) -> Option<Vec<String>> {
    let segs: Vec<&str> = path.split("::").map(str::trim).filter(|s| !s.is_empty()).collect();
    let mut out: Vec<String> = Vec::new();
    let mut rest = segs.as_slice();
    match rest.first()? {
        &"crate" => rest = &rest[1..],
        &"self" | &"super" => {
            // In `moe.rs` the module is `model::moe` and `super` is `model`; in `mod.rs` the
            // module is `model` itself.
            out = here.to_vec();
            while let Some(&s) = rest.first() {
                match s {
                    "self" => {}
                    "super" => {
                        out.pop()?;
                    }
                    _ => break,
                }
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    out.extend(rest.iter().map(|s| s.split_whitespace().next().unwrap_or("").to_string()));
    Some(out)
}

fn resolve(files: &BTreeMap<Vec<String>, PathBuf>, path: &[String]) -> Option<PathBuf> {
    (0..=path.len()).rev().find_map(|n| files.get(&path[..n]).cloned())
}

fn import_graph() -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    source_files(&src, &mut paths);
    let files: BTreeMap<Vec<String>, PathBuf> = paths
        .iter()
        .filter(|p| !p.ends_with("main.rs"))
        .map(|p| (module_path(&src, p), p.clone()))
        .collect();
    let mut graph = BTreeMap::new();
    for file in &paths {
        let here = module_path(&src, file);
        let code: String = std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let mut targets = Vec::new();
        // `use` statements, possibly spanning lines.
        for stmt in code.split(';') {
            let stmt = stmt.trim();
            let Some(at) = stmt.find("use ") else {
                continue;
            };
            if !(at == 0 || stmt[..at].ends_with(' ') || stmt[..at].ends_with('\n')) {
                continue;
            }
            let tree = stmt[at + 4..].replace('\n', " ");
            for p in expand(&tree) {
                let p = p.split(" as ").next().unwrap_or("").trim().to_string();
                targets.extend(absolute(&here, &p));
            }
        }
        // Inline `crate::a::b` and `super::a::b` paths.
        let inline = code.match_indices("crate::").chain(code.match_indices("super::"));
        for (i, _) in inline {
            if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let tail: String = code[i..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            targets.extend(absolute(&here, &tail));
        }
        let edges: BTreeSet<PathBuf> =
            targets.iter().filter_map(|t| resolve(&files, t)).filter(|t| t != file).collect();
        graph.insert(file.clone(), edges);
    }
    graph
}

#[test]
fn no_import_circles_between_source_files() {
    let graph = import_graph();
    // Depth-first search with colours; a grey target is a back edge, that is a circle.
    fn visit(
        n: &PathBuf, g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>, colour: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>, circles: &mut Vec<String>,
    ) {
        colour.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match colour.get(m).copied().unwrap_or(0) {
                0 => visit(m, g, colour, stack, circles),
                1 => {
                    let from = stack.iter().position(|s| s == m).unwrap();
                    let names: Vec<String> =
                        stack[from..].iter().map(|p| p.display().to_string()).collect();
                    circles.push(format!("{} -> {}", names.join(" -> "), m.display()));
                }
                _ => {}
            }
        }
        stack.pop();
        colour.insert(n.clone(), 2);
    }
    let (mut colour, mut circles) = (BTreeMap::new(), Vec::new());
    for n in graph.keys() {
        if !colour.contains_key(n) {
            visit(n, &graph, &mut colour, &mut Vec::new(), &mut circles);
        }
    }
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
    // The reader sees real edges (so an empty graph cannot pass): the model imports the config.
    let edges: usize = graph.values().map(BTreeSet::len).sum();
    assert!(edges > 50, "only {edges} import edges found: the reader is broken");
}

#[test]
fn the_reader_expands_groups_and_resolves_super() {
    assert_eq!(expand("crate::{a, b::{c, d}}"), vec!["crate::a", "crate::b::c", "crate::b::d"]);
    let here = vec!["model".to_string(), "moe".to_string()];
    assert_eq!(
        absolute(&here, "super::router::Router").unwrap(),
        vec!["model", "router", "Router"]
    );
    assert_eq!(absolute(&here, "crate::ops::grouped").unwrap(), vec!["ops", "grouped"]);
    assert_eq!(absolute(&here, "candle_core::Tensor"), None);
}

#[test]
fn no_source_file_over_700_lines() {
    let mut paths = Vec::new();
    source_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut paths);
    let long: Vec<String> = paths
        .iter()
        .map(|p| (p, std::fs::read_to_string(p).unwrap().lines().count()))
        .filter(|(_, n)| *n > 700)
        .map(|(p, n)| format!("{}: {n} lines", p.display()))
        .collect();
    assert!(long.is_empty(), "split these by concern:\n{}", long.join("\n"));
}
