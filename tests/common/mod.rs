//! Helpers for the end-to-end tests: tiny llm.c shards, configs, running the real binary, and
//! reading what it leaves behind.
#![allow(dead_code)]

pub mod corpus;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub const MAGIC_U16: i32 = 20240520;

/// The `motrain` binary cargo built for these tests.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_motrain"))
}

/// What one run of the binary did.
#[derive(Debug)]
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub args: Vec<String>,
}

impl Out {
    pub fn from(args: &[&str], o: Output) -> Out {
        Out {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "motrain {}\n  exit: {:?}\n  stdout:\n{}\n  stderr:\n{}",
            self.args.join(" "),
            self.code,
            indent(&self.stdout),
            indent(&self.stderr)
        )
    }

    /// Panics with the whole transcript unless the command exited 0.
    pub fn ok(self) -> Out {
        assert_eq!(self.code, Some(0), "expected success\n{}", self.describe());
        self
    }

    /// The last non-empty stdout line, parsed as one JSON object.
    pub fn last_json(&self) -> Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("no stdout\n{}", self.describe()));
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("last stdout line is not JSON ({e}): {line:?}\n{}", self.describe())
        });
        assert!(v.is_object(), "last stdout line is not a JSON object: {line}");
        v
    }

    /// The stderr lines that start with `error:`.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr.lines().filter(|l| l.starts_with("error:")).collect()
    }
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    | {l}")).collect::<Vec<_>>().join("\n")
}

/// Runs `motrain ARGS...` in `cwd` and waits for it.
pub fn motrain(cwd: &Path, args: &[&str]) -> Out {
    run_motrain(Command::new(bin()), cwd, args)
}

/// Runs `program ARGS...` (motrain, or a wrapper that execs it) in `cwd` as every test runs
/// motrain, and waits for it.
pub fn run_motrain(mut program: Command, cwd: &Path, args: &[&str]) -> Out {
    let o = program
        .args(args)
        .current_dir(cwd)
        // A panic or an anyhow debug print would show a backtrace with this set: user input must
        // never produce one.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .expect("spawn motrain");
    Out::from(args, o)
}

/// A bad-input failure: exit code 2 (unless `code` says otherwise), an `error:` line naming
/// every needle (case-insensitively), and no panic or backtrace.
pub fn assert_bad_input_code(out: &Out, code: Option<i32>, needles: &[&str]) {
    match code {
        Some(c) => assert_eq!(out.code, Some(c), "wrong exit code\n{}", out.describe()),
        None => assert!(
            matches!(out.code, Some(c) if c != 0),
            "expected a non-zero exit code\n{}",
            out.describe()
        ),
    }
    let errors = out.error_lines();
    assert!(!errors.is_empty(), "no stderr line starts with `error:`\n{}", out.describe());
    let text = errors.join("\n").to_lowercase();
    for n in needles {
        assert!(
            text.contains(&n.to_lowercase()),
            "the error does not name {n:?}\n{}",
            out.describe()
        );
    }
    let lower = out.stderr.to_lowercase();
    for bad in ["panicked", "backtrace", "internal error", "stack backtrace"] {
        assert!(!lower.contains(bad), "stderr mentions {bad:?}\n{}", out.describe());
    }
    assert!(
        out.stderr.lines().count() <= 8,
        "the error should be one or a few lines\n{}",
        out.describe()
    );
}

pub fn assert_bad_input(out: &Out, needles: &[&str]) {
    assert_bad_input_code(out, Some(2), needles)
}

/// Writes an llm.c uint16 shard.
pub fn write_shard(path: &Path, tokens: &[u16]) {
    std::fs::write(path, shard_bytes(MAGIC_U16, 1, tokens.len() as i32, tokens)).unwrap();
}

/// The bytes of a shard with any header fields (for corrupt ones).
pub fn shard_bytes(magic: i32, version: i32, count: i32, tokens: &[u16]) -> Vec<u8> {
    let mut header = [0i32; 256];
    header[0] = magic;
    header[1] = version;
    header[2] = count;
    let mut bytes = Vec::with_capacity(1024 + 2 * tokens.len());
    for h in header {
        bytes.extend_from_slice(&h.to_le_bytes());
    }
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    bytes
}

/// Reads an llm.c uint16 shard, checking its header and size.
pub fn read_shard(path: &Path) -> Vec<u16> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(b.len() >= 1024, "{}: shorter than the header", path.display());
    let h = |i: usize| i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
    assert_eq!(h(0), MAGIC_U16, "{}: magic", path.display());
    assert_eq!(h(1), 1, "{}: version", path.display());
    for i in 3..256 {
        assert_eq!(h(i), 0, "{}: header[{i}] should be 0", path.display());
    }
    let count = h(2) as usize;
    assert_eq!(b.len(), 1024 + 2 * count, "{}: size vs header count", path.display());
    b[1024..].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// A tiny deterministic generator for token ids (no rand dependency in tests).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A repeating sequence of period 13 over distinct ids (each token determines the next, so a
/// tiny model learns it to near-zero loss).
pub fn pattern_tokens(n: usize, vocab: u16) -> Vec<u16> {
    let period: Vec<u16> = (0..13u16).map(|i| (i * 7 + 3) % vocab).collect();
    (0..n).map(|i| period[i % period.len()]).collect()
}

pub fn random_tokens(n: usize, vocab: u16, seed: u64) -> Vec<u16> {
    let mut r = Lcg(seed);
    (0..n).map(|_| r.below(vocab as u64) as u16).collect()
}

/// A scratch area: `shards/` with tiny train/val shards, a config file at the root (its data
/// paths relative to it), `runs/` for run directories and `cwd/`, an unrelated working
/// directory the binary runs in (so that config-relative paths are really config-relative).
pub struct Fixture {
    pub tmp: tempfile::TempDir,
}

impl Fixture {
    /// Pattern shards over vocab 64: 4000 train tokens, 600 val tokens.
    pub fn new() -> Fixture {
        let f = Fixture::empty();
        f.shards("tiny", &pattern_tokens(4000, 64), &pattern_tokens(600, 64));
        f
    }

    pub fn empty() -> Fixture {
        let tmp = tempfile::Builder::new().prefix("motrain-e2e-").tempdir().unwrap();
        for d in ["shards", "runs", "cwd"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        Fixture { tmp }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    pub fn cwd(&self) -> PathBuf {
        self.root().join("cwd")
    }

    pub fn runs(&self) -> PathBuf {
        self.root().join("runs")
    }

    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.runs().join(name)
    }

    /// Writes `shards/{name}_train_000000.bin` and `shards/{name}_val_000000.bin`.
    pub fn shards(&self, name: &str, train: &[u16], val: &[u16]) {
        write_shard(&self.root().join("shards").join(format!("{name}_train_000000.bin")), train);
        write_shard(&self.root().join("shards").join(format!("{name}_val_000000.bin")), val);
    }

    /// Writes a tiny dense config named `file` whose data are the `shards` set of shards.
    pub fn config_for(&self, file: &str, shards: &str, vocab: usize) -> PathBuf {
        let data = format!(
            "train = \"shards/{shards}_train_*.bin\"\nval = \"shards/{shards}_val_*.bin\"\n"
        );
        self.config_with_data(file, &data, vocab)
    }

    /// Writes a tiny dense config named `file` that mixes the `(shards, weight)` sets of shards
    /// as `[[data.sources]]`, each with its val.
    pub fn mixture_config(&self, file: &str, sources: &[(&str, f64)], vocab: usize) -> PathBuf {
        let mut tables = String::new();
        for (shards, weight) in sources {
            tables += &format!(
                "\n[[data.sources]]\ntrain = \"shards/{shards}_train_*.bin\"\nval = \"shards/{shards}_val_*.bin\"\nweight = {weight:?}\n"
            );
        }
        self.config_with_data(file, &tables, vocab)
    }

    /// Writes a tiny dense config named `file` with `data` (TOML: train and val keys, or
    /// `[[data.sources]]` tables) after the `[data]` keys every test config shares.
    pub fn config_with_data(&self, file: &str, data: &str, vocab: usize) -> PathBuf {
        let text = format!(
            r#"# tiny end-to-end test config
[run]
name = "base"
out_dir = "{out}"
seed = 0
device = "cpu"

[data]
seq_len = 16
{data}

[model]
vocab_size = {vocab}
d_model = 32
n_layers = 2
n_heads = 2
d_ff = 64

[train]
batch_size = 4
steps = 60
lr = 1e-2
warmup_steps = 5
log_every = 1
eval_every = 20
eval_batches = 4
ckpt_every = 20
keep_checkpoints = 3
"#,
            out = self.runs().display()
        );
        let p = self.root().join(file);
        std::fs::write(&p, text).unwrap();
        p
    }

    pub fn config(&self) -> PathBuf {
        self.config_for("tiny.toml", "tiny", 64)
    }

    /// `motrain ARGS...` run in the fixture's `cwd/`.
    pub fn run(&self, args: &[&str]) -> Out {
        motrain(&self.cwd(), args)
    }

    /// `motrain train --config CONFIG --set run.name=NAME --set EXTRA...`.
    pub fn train(&self, config: &Path, name: &str, extra: &[&str]) -> Out {
        self.train_with(Command::new(bin()), config, name, extra)
    }

    /// [`Fixture::train`] through `program` (motrain with its own environment, or a wrapper).
    pub fn train_with(&self, program: Command, config: &Path, name: &str, extra: &[&str]) -> Out {
        let name_set = format!("run.name={name}");
        let mut args = vec!["train", "--config", config.to_str().unwrap(), "--set", &name_set];
        // `--flag` and the value after `--init-from` go as they are, the rest as `--set KEY=VALUE`.
        let mut raw_next = false;
        for e in extra {
            if raw_next || e.starts_with("--") {
                raw_next = *e == "--init-from";
                args.push(e);
            } else {
                args.push("--set");
                args.push(e);
            }
        }
        run_motrain(program, &self.cwd(), &args)
    }
}

/// Every line of a run's metrics.jsonl, each parsed.
pub fn metrics(run_dir: &Path) -> Vec<Value> {
    let p = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: line {l:?} is not JSON: {e}", p.display()))
        })
        .collect()
}

pub fn is_eval(v: &Value) -> bool {
    v.get("split").is_some()
}

pub fn train_lines(run_dir: &Path) -> Vec<Value> {
    metrics(run_dir).into_iter().filter(|v| !is_eval(v)).collect()
}

pub fn eval_lines(run_dir: &Path) -> Vec<Value> {
    metrics(run_dir).into_iter().filter(is_eval).collect()
}

pub fn step_of(v: &Value) -> u64 {
    v["step"].as_u64().unwrap_or_else(|| panic!("no integer step in {v}"))
}

pub fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or_else(|| panic!("no number {key:?} in {v}"))
}

/// (step, loss) of each training line.
pub fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    train_lines(run_dir).iter().map(|v| (step_of(v), num(v, "loss"))).collect()
}

/// The name in `checkpoints/latest`, and the directory it names.
pub fn latest(run_dir: &Path) -> Option<(String, PathBuf)> {
    let p = run_dir.join("checkpoints").join("latest");
    let name = std::fs::read_to_string(p).ok()?.trim().to_string();
    let dir = run_dir.join("checkpoints").join(&name);
    Some((name, dir))
}

pub fn state_json(ckpt_dir: &Path) -> Value {
    let p = ckpt_dir.join("state.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", p.display()))
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Asserts that no (split, step) pair appears twice among the lines.
pub fn assert_no_duplicate_steps(run_dir: &Path) {
    let mut seen = std::collections::HashSet::new();
    for v in metrics(run_dir) {
        let key = (v.get("split").map(|s| s.to_string()), step_of(&v));
        assert!(
            seen.insert(key.clone()),
            "{}: step {} logged twice ({:?})",
            run_dir.display(),
            key.1,
            key.0
        );
    }
}

/// `mpirun -n RANKS motrain ARGS...` in `cwd`, one thread per rank, as the MPI tests run it
/// (root in a container: `--allow-run-as-root`; more ranks than cores: `--oversubscribe`).
pub fn mpirun(cwd: &Path, ranks: usize, args: &[&str]) -> Out {
    let (cmd, _session) = mpirun_command(ranks);
    run_motrain(cmd, cwd, args)
}

/// The `mpirun ... motrain` prefix of [`mpirun`], for a test that starts it itself, with its
/// session directory (keep it until mpirun is done; it is removed when dropped).
pub fn mpirun_command(ranks: usize) -> (Command, tempfile::TempDir) {
    let session = own_session_dir();
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-n", &ranks.to_string()])
        .args(["-x", "RAYON_NUM_THREADS=1", "-x", "OMPI_MCA_btl_vader_single_copy_mechanism=none"])
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_orte_tmpdir_base", session.path())
        .arg(bin());
    (c, session)
}

/// A session directory base of its own for one mpirun: Open MPI 4 creates
/// `/tmp/ompi.<host>.<uid>` as it starts, and two mpiruns starting at the same moment (tests run
/// in parallel) can both fail at that `mkdir` ("File exists", orte_init failed). Removed when
/// dropped, so keep it until mpirun is done.
pub fn own_session_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("motrain-ompi-").tempdir().unwrap()
}
