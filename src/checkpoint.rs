//! Checkpoints on disk: `model.safetensors`, `optimizer.safetensors` and `state.json` in
//! `checkpoints/step-NNNNNN/`, written to a temporary directory, synced and renamed, then
//! `latest` replaced atomically; retention of the newest N. Loading checks everything it reads,
//! including the digests of the tensor files that `state.json` records.

use crate::config::Config;
use crate::run_dir::{self, checkpoints_dir, sync, write_atomic, RunDirError};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    /// Saving failed (disk full, unwritable directory): not the user's input at fault.
    #[error("saving a checkpoint failed: {0}")]
    Write(Box<CheckpointError>),
}

impl CheckpointError {
    fn invalid(path: &Path, message: impl Into<String>) -> CheckpointError {
        CheckpointError::Invalid { path: path.to_path_buf(), message: message.into() }
    }
    fn io(path: &Path, source: std::io::Error) -> CheckpointError {
        CheckpointError::Io { path: path.to_path_buf(), error: source }
    }
}

type Result<T> = std::result::Result<T, CheckpointError>;

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub tokens: u64,
    /// Train windows drawn so far: the data loader's whole state (a mixture's: over all sources).
    pub data_cursor: u64,
    /// A mixture of `[[data.sources]]`: the windows drawn from each source, which are its whole
    /// state. Absent for a single-source config, whose state `data_cursor` is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_cursors: Vec<u64>,
    /// Adam's update count.
    pub optimizer_t: u64,
    /// Updates skipped for a non-finite loss or gradient (`train.on_nan = "skip"`).
    #[serde(default)]
    pub skipped_steps: u64,
    pub seed: u64,
    pub elapsed_s: f64,
    pub motrain_version: String,
    pub config: Config,
}

impl TrainState {
    /// A run of `config` that has not trained yet: what `upcycle` and `import` write.
    pub fn at_start(config: &Config) -> TrainState {
        TrainState {
            step: 0,
            tokens: 0,
            data_cursor: 0,
            source_cursors: Vec::new(),
            optimizer_t: 0,
            skipped_steps: 0,
            seed: config.run.seed,
            elapsed_s: 0.0,
            motrain_version: env!("CARGO_PKG_VERSION").to_string(),
            config: config.clone(),
        }
    }

    /// The windows drawn from each of `n` train sources, or why they do not fit `n` sources.
    pub fn source_cursors(&self, n: usize) -> std::result::Result<Vec<u64>, String> {
        match (self.source_cursors.len(), n) {
            (0, 1) => Ok(vec![self.data_cursor]),
            // A run that has drawn nothing (an upcycled one at step 0) fits any sources.
            (0, _) if self.data_cursor == 0 => Ok(vec![0; n]),
            (k, n) if k == n => Ok(self.source_cursors.clone()),
            (k, n) => Err(format!(
                "the checkpoint holds the data state of {} train source(s), but the config has {n}: resume with the sources the run was started with",
                k.max(1)
            )),
        }
    }
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub model: HashMap<String, Tensor>,
    /// What `state.json` recorded of the tensor files; [`Checkpoint::optimizer`] verifies against it.
    pub digests: FileDigests,
}

/// The digest algorithm of the files a checkpoint lists, named in `state.json` (see `digest`).
pub const DIGEST_ALGORITHM: &str = crate::digest::ALGORITHM;

/// The tensor files' digests in `state.json`: `"files_digest": "xxh3-128"` and
/// `"files": {"model.safetensors": "<32 hex digits>", ...}`. Kept beside [`TrainState`], not in
/// it, because they describe the bytes of one particular save, not the training state that
/// conversions (`transition-tune`, `upcycle`) copy into new checkpoints. Checkpoints from
/// before digests have neither key and load unverified.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FileDigests {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_digest: Option<String>,
    #[serde(default)]
    pub files: BTreeMap<String, String>,
}

impl FileDigests {
    /// The recorded digest of `name`, or None for a checkpoint that records none at all. One that
    /// records some but not this file has lost an entry: that is refused, not waved through.
    fn expected(&self, state_path: &Path, name: &str) -> Result<Option<&str>> {
        if self.files.is_empty() {
            return Ok(None);
        }
        match self.files_digest.as_deref() {
            Some(DIGEST_ALGORITHM) => {}
            Some(other) => {
                return Err(CheckpointError::invalid(
                    state_path,
                    format!(
                        "files_digest {other:?} is not supported (valid: {DIGEST_ALGORITHM:?})"
                    ),
                ))
            }
            None => {
                return Err(CheckpointError::invalid(
                    state_path,
                    format!("lists file digests but no files_digest (valid: {DIGEST_ALGORITHM:?})"),
                ))
            }
        }
        match self.files.get(name) {
            Some(d) => Ok(Some(d)),
            None => {
                Err(CheckpointError::invalid(state_path, format!("records no digest for {name}")))
            }
        }
    }
}

pub use crate::digest::digest;

fn digest_file(path: &Path) -> Result<String> {
    crate::digest::digest_file(path).map_err(|e| CheckpointError::io(path, e))
}

/// `state.json` as written: the state with the files' digests beside it.
#[derive(Serialize)]
struct StateFile<'a> {
    #[serde(flatten)]
    state: &'a TrainState,
    #[serde(flatten)]
    digests: &'a FileDigests,
}

fn step_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Writes a checkpoint and returns its directory. A crash at any point leaves the previous
/// checkpoint and `latest` intact.
pub fn save(
    run_dir: &Path, state: &TrainState, model: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>, keep: usize,
) -> Result<PathBuf> {
    let fin = write_checkpoint(run_dir, state, |tmp| {
        let m = tmp.join("model.safetensors");
        let o = tmp.join("optimizer.safetensors");
        for (tensors, path) in [(model, &m), (optimizer, &o)] {
            candle_core::safetensors::save(tensors, path)
                .map_err(|e| CheckpointError::invalid(path, e.to_string()))?;
            crate::run_dir::share_like_created(path)
                .map_err(|e| CheckpointError::invalid(path, e.to_string()))?;
        }
        Ok(vec![m, o])
    })?;
    prune(&checkpoints_dir(run_dir), keep)?;
    Ok(fin)
}

/// Writes a checkpoint whose `model.safetensors` the caller streams to the path it is given, and
/// which holds no optimizer state: `motrain import`'s step 0, for a model too large to hold in
/// memory twice. Like [`save`], the checkpoint appears whole or not at all.
pub fn save_streamed(
    run_dir: &Path, state: &TrainState, write_model: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<PathBuf> {
    write_checkpoint(run_dir, state, |tmp| {
        let m = tmp.join("model.safetensors");
        write_model(&m).map_err(|e| CheckpointError::io(&m, e))?;
        Ok(vec![m])
    })
}

/// Creates `checkpoints/step-N` from a temporary directory that `write_tensors` fills (it
/// returns the files it wrote), with `state.json` and the files' digests, then points `latest`
/// at it.
fn write_checkpoint(
    run_dir: &Path, state: &TrainState, write_tensors: impl FnOnce(&Path) -> Result<Vec<PathBuf>>,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).map_err(|e| CheckpointError::io(&root, e))?;
    remove_stale_temporaries(&root);
    let name = step_name(state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    let fin = root.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| CheckpointError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp)
        .map_err(|e| CheckpointError::Write(Box::new(CheckpointError::io(&tmp, e))))?;
    let write = || -> Result<()> {
        let files = write_tensors(&tmp)?;
        // Hashed from the files rather than from the tensors, so that the digest covers the bytes
        // a later load reads, whatever serialisation wrote them.
        let mut digests = FileDigests {
            files_digest: Some(DIGEST_ALGORITHM.to_string()),
            files: BTreeMap::new(),
        };
        for f in &files {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            digests.files.insert(name, digest_file(f)?);
        }
        let s = tmp.join("state.json");
        let json = serde_json::to_string_pretty(&StateFile { state, digests: &digests })
            .expect("state serialises");
        std::fs::write(&s, json).map_err(|e| CheckpointError::io(&s, e))?;
        for f in files.iter().chain([&s]) {
            sync(f)?;
        }
        sync(&tmp)?;
        // Re-saving a step (a resumed run reaching it again) replaces the old copy; it is first
        // renamed out of sight, so no half-deleted `step-*` is ever visible.
        let replaced = fin.exists().then(|| hide(&fin)).transpose()?;
        std::fs::rename(&tmp, &fin).map_err(|e| CheckpointError::io(&fin, e))?;
        if let Some(old) = replaced {
            let _ = std::fs::remove_dir_all(old);
        }
        sync(&root)?;
        Ok(write_atomic(&root.join("latest"), name.as_bytes())?)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(CheckpointError::Write(Box::new(e)));
    }
    Ok(fin)
}

/// Renames a checkpoint directory to a temporary name (atomically), for deleting it.
fn hide(dir: &Path) -> Result<PathBuf> {
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let hidden = dir.with_file_name(format!(".tmp-old-{name}-{}", std::process::id()));
    std::fs::rename(dir, &hidden).map_err(|e| CheckpointError::io(dir, e))?;
    Ok(hidden)
}

/// Half-written checkpoints of killed runs. (One process trains into a run at a time.)
fn remove_stale_temporaries(root: &Path) {
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let run_dir = root.parent().unwrap_or(root);
    let all = run_dir::checkpoints(run_dir);
    let latest = std::fs::read_to_string(root.join("latest")).unwrap_or_default();
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        if dir.file_name().is_some_and(|n| n.to_string_lossy() == latest.trim()) {
            continue;
        }
        let hidden = hide(dir)?;
        std::fs::remove_dir_all(&hidden).map_err(|e| CheckpointError::io(&hidden, e))?;
    }
    Ok(())
}

/// A checkpoint directory, or a run directory (then the checkpoint its `latest` names).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("state.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = checkpoints_dir(path).join("latest");
    if latest.is_file() {
        let name = std::fs::read_to_string(&latest).map_err(|e| CheckpointError::io(&latest, e))?;
        let dir = checkpoints_dir(path).join(name.trim());
        if !dir.join("state.json").is_file() {
            return Err(CheckpointError::invalid(
                &latest,
                format!("names {:?}, which is not a complete checkpoint", name.trim()),
            ));
        }
        return Ok(dir);
    }
    // A crash between renaming a checkpoint into place and writing `latest` leaves no
    // `latest`; the newest complete checkpoint is then the one to use.
    if let Some((_, dir)) = run_dir::checkpoints(path).pop() {
        return Ok(dir);
    }
    if !path.exists() {
        return Err(CheckpointError::invalid(path, "no such checkpoint or run directory"));
    }
    Err(CheckpointError::invalid(
        path,
        "neither a checkpoint (no state.json) nor a run directory with checkpoints/latest",
    ))
}

pub fn load_state(dir: &Path) -> Result<TrainState> {
    Ok(load_state_and_digests(dir)?.0)
}

/// `state.json` of the checkpoint in `dir`: the training state and the recorded file digests.
pub fn load_state_and_digests(dir: &Path) -> Result<(TrainState, FileDigests)> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).map_err(|e| CheckpointError::io(&p, e))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::invalid(&p, format!("corrupt state: {e}")))?;
    state
        .config
        .validate()
        .map_err(|m| CheckpointError::invalid(&p, format!("config inside is invalid: {m}")))?;
    // Resuming from a step that is not the directory's would save over another checkpoint.
    let named = dir.file_name().and_then(|n| n.to_str()?.strip_prefix("step-")?.parse().ok());
    if let Some(n) = named.filter(|&n: &usize| n != state.step) {
        let m = format!("corrupt state: step {} in the directory of step {n}", state.step);
        return Err(CheckpointError::invalid(&p, m));
    }
    if let Some(m) = counter_problem(&state) {
        return Err(CheckpointError::invalid(&p, format!("corrupt state: {m}")));
    }
    let digests: FileDigests = serde_json::from_str(&text)
        .map_err(|e| CheckpointError::invalid(&p, format!("corrupt file digests: {e}")))?;
    Ok((state, digests))
}

/// Why the counters of `state` cannot come from a run, if they cannot. No run updates more
/// often than it steps (a larger count wrapped or was edited); every window drawn trains at
/// least one token, so no run draws more windows than it trained tokens; a mixture's total is
/// its sources' sum; and all stay far below u64's end, so that resuming never wraps one.
fn counter_problem(state: &TrainState) -> Option<String> {
    const MAX_TOKENS: u64 = 1 << 62;
    if state.optimizer_t > state.step as u64 {
        return Some(format!("optimizer_t {} exceeds step {}", state.optimizer_t, state.step));
    }
    if state.tokens > MAX_TOKENS {
        return Some(format!("tokens {} is beyond 2^62", state.tokens));
    }
    if state.data_cursor > state.tokens {
        return Some(format!(
            "data_cursor {} exceeds tokens {}: every window drawn trains a token at least",
            state.data_cursor, state.tokens
        ));
    }
    let sum = state.source_cursors.iter().try_fold(0u64, |a, &c| a.checked_add(c));
    match sum {
        Some(s) if state.source_cursors.is_empty() || s == state.data_cursor => None,
        _ => Some(format!(
            "source_cursors {:?} do not sum to data_cursor {}",
            state.source_cursors, state.data_cursor
        )),
    }
}

pub fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_tensors_verified(path, device, None)
}

/// Loads a safetensors file, first checking its bytes against `expected` (a hex digest from
/// `state.json`) when given. The digest streams through the page cache, and each tensor is
/// copied out of the mapping and its pages released behind it, so loading holds the tensors
/// and little more: what lets a model of many GB load on a machine not much larger.
pub fn load_tensors_verified(
    path: &Path, device: &Device, expected: Option<&str>,
) -> Result<HashMap<String, Tensor>> {
    read_tensors(path, device, expected, false)
}

/// [`load_tensors_verified`]; with `variables`, f32 tensors on the CPU come back as variables
/// (what a model's parameters are), filled straight from the file: a model built from them
/// takes them over without copying.
fn read_tensors(
    path: &Path, device: &Device, expected: Option<&str>, variables: bool,
) -> Result<HashMap<String, Tensor>> {
    use candle_core::safetensors::Load;
    if !path.is_file() {
        return Err(CheckpointError::invalid(path, "missing"));
    }
    if let Some(want) = expected {
        let found = digest_file(path)?;
        if !found.eq_ignore_ascii_case(want) {
            return Err(CheckpointError::invalid(
                path,
                format!("contents do not match the {DIGEST_ALGORITHM} digest state.json records ({want}, found {found}): the file is corrupt or was changed after saving"),
            ));
        }
    }
    let file = std::fs::File::open(path).map_err(|e| CheckpointError::io(path, e))?;
    // SAFETY: the mapping is read-only and dropped before returning; a file truncated under us
    // by another process would fault, as candle's own loader (also a mapping) would.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CheckpointError::io(path, e))?;
    let bad = |e: &dyn std::fmt::Display| {
        CheckpointError::invalid(path, format!("not a valid safetensors file: {e}"))
    };
    let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| bad(&e))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        // Weights and moments are floats (motrain writes f32; a file recoded to a narrower
        // float still loads): integers would be read as numbers that mean nothing.
        use safetensors::Dtype::{BOOL, I16, I32, I64, I8, U16, U32, U64, U8};
        if matches!(view.dtype(), BOOL | I8 | I16 | I32 | I64 | U8 | U16 | U32 | U64) {
            return Err(CheckpointError::invalid(
                path,
                format!("tensor `{name}` is {:?}; a checkpoint holds float tensors", view.dtype()),
            ));
        }
        let t = if variables && device.is_cpu() && view.dtype() == safetensors::Dtype::F32 {
            let values: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            candle_core::Var::from_vec(values, view.shape(), device)
                .map(candle_core::Var::into_inner)
        } else {
            view.load(device)
        }
        .map_err(|e| bad(&e))?;
        let start = view.data().as_ptr() as usize - map.as_ptr() as usize;
        release_pages(&map, start, start + view.data().len());
        out.insert(name, t);
    }
    Ok(out)
}

/// Tells the kernel that a range of a read-only file mapping is no longer needed, so its pages
/// leave the process's resident set (they stay in the page cache).
pub fn release_pages(map: &memmap2::Mmap, start: usize, end: usize) {
    let page = 4096;
    let (a, b) = (start.div_ceil(page) * page, end / page * page);
    if b > a {
        // SAFETY: a read-only, file-backed mapping: after DONTNEED a later access reads the same
        // bytes from the file again, so nothing the program relies on is lost.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
    }
}

/// Loads state and weights of the checkpoint at `path` (see [`resolve`]).
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    load_weights(path, device, false)
}

fn load_weights(path: &Path, device: &Device, variables: bool) -> Result<Checkpoint> {
    let dir = resolve(path)?;
    let (state, digests) = load_state_and_digests(&dir)?;
    let name = "model.safetensors";
    let expected = digests.expected(&dir.join("state.json"), name)?;
    let model = read_tensors(&dir.join(name), device, expected, variables)?;
    Ok(Checkpoint { dir, state, model, digests })
}

/// A checkpoint's model for inference (eval, generation, conversions), built from its
/// state.json on the device it names and filled with its weights; the checkpoint comes back too
/// (its state, weights and directory).
///
/// The model is built from the checkpoint's tensors, each moved into its parameter (no random
/// initialisation, no second copy), so memory peaks at the model's size plus one tensor; the
/// returned checkpoint's `model` then holds the model's own tensors (shared, not copied).
pub fn load_model(path: &Path) -> anyhow::Result<(Checkpoint, crate::model::Transformer)> {
    let dir = resolve(path)?;
    let cfg = load_state(&dir)?.config;
    let dev = crate::device::device(&cfg.run.device)?;
    let mut ckpt = load_weights(&dir, &dev, true)?;
    ckpt.check_config(&cfg.model)?;
    let file = ckpt.dir.join("model.safetensors");
    let weights = std::mem::take(&mut ckpt.model);
    // For inference: frozen parameters enter the model outside the autograd graph, so a
    // forward pass keeps no intermediate (a layer's stacked weights, its activations) alive.
    let mut params = crate::model::Params::new(&dev, cfg.run.seed, cfg.model.init_scale)
        .pretrained(weights)
        .freezing(|_| true);
    let model = crate::model::Transformer::new(&cfg.model, &mut params).map_err(|e| {
        CheckpointError::invalid(&file, e.to_string().lines().next().unwrap_or_default())
    })?;
    params.unused_pretrained().map_err(|m| CheckpointError::invalid(&file, m))?;
    ckpt.model = params.tensors();
    Ok((ckpt, model))
}

impl Checkpoint {
    /// The weights must be of the model state.json describes; checked on the largest tensor
    /// before that model is built, so a lying state.json cannot make us allocate a giant.
    pub fn check_config(&self, model: &crate::config::ModelConfig) -> Result<()> {
        let name = "model.embed_tokens.weight";
        let want = [model.vocab_size, model.d_model];
        match self.model.get(name) {
            Some(t) if t.dims() == want => Ok(()),
            Some(t) => Err(CheckpointError::invalid(
                &self.dir.join("model.safetensors"),
                format!(
                    "holds `{name}` of shape {:?}, but state.json describes {want:?}",
                    t.dims()
                ),
            )),
            None => Err(CheckpointError::invalid(
                &self.dir.join("model.safetensors"),
                format!("tensor `{name}` is missing"),
            )),
        }
    }

    /// Copies the weights into `params`, naming the file and the tensor on a mismatch.
    pub fn restore(&self, params: &crate::model::Params) -> Result<()> {
        params
            .load(&self.model)
            .map_err(|m| CheckpointError::invalid(&self.dir.join("model.safetensors"), m))
    }

    pub fn optimizer(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let name = "optimizer.safetensors";
        let expected = self.digests.expected(&self.dir.join("state.json"), name)?;
        load_tensors_verified(&self.dir.join(name), device, expected)
    }
}
