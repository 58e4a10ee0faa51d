//! The run directory on disk: its layout (`config.toml`, `metrics.jsonl`, `checkpoints/`,
//! `lock`), the lock that keeps two processes from training into one run, the checks that a
//! fresh run or a new directory does not overwrite what is there, and atomic replacement of
//! small files. What goes
//! inside a checkpoint is `checkpoint`'s business.

use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// The directory cannot be used as asked (locked, or holding checkpoints).
    #[error("{path}: {message}")]
    Unusable { path: PathBuf, message: String },
}

type Result<T> = std::result::Result<T, RunDirError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunDirError + '_ {
    move |source| RunDirError::Io { path: path.to_path_buf(), error: source }
}

pub fn config_path(run_dir: &Path) -> PathBuf {
    run_dir.join("config.toml")
}

pub fn metrics_path(run_dir: &Path) -> PathBuf {
    run_dir.join("metrics.jsonl")
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The files every complete checkpoint holds.
pub const CHECKPOINT_FILES: [&str; 3] =
    ["state.json", "model.safetensors", "optimizer.safetensors"];

/// Complete checkpoints of a run (`checkpoints/step-N` holding every file), oldest first.
pub fn checkpoints(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let entries = std::fs::read_dir(checkpoints_dir(run_dir)).into_iter().flatten().flatten();
    let mut out: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            let complete = CHECKPOINT_FILES.iter().all(|f| e.path().join(f).is_file());
            complete.then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// An error unless `dir` holds no checkpoints: a fresh run or a conversion must not mix its
/// checkpoints with another run's. `hint` tells the user what to do instead.
pub fn ensure_no_checkpoints(dir: &Path, hint: &str) -> Result<()> {
    if checkpoints(dir).is_empty() {
        return Ok(());
    }
    Err(RunDirError::Unusable {
        path: dir.to_path_buf(),
        message: format!("already holds checkpoints: {hint}"),
    })
}

/// An error unless `dir` is missing or empty (its `lock` file aside): a command that writes a
/// new directory (`export`, `upcycle`, `transition-tune`) must not replace or mix with what is
/// there. `hint` tells the user what to do instead.
pub fn ensure_empty(dir: &Path, hint: &str) -> Result<()> {
    ensure_nothing_lost(dir, |_| false, hint)
}

/// Locks `dir` (creating it) for a command that writes a new directory, and checks under the
/// lock that it is still [`ensure_empty`]: the lock keeps a `train` from starting there while
/// it is written.
pub fn claim_empty(dir: &Path, hint: &str) -> Result<RunLock> {
    let lock = RunLock::acquire_for(dir, &format!("is using this directory; {hint}"))?;
    ensure_empty(dir, hint)?;
    Ok(lock)
}

/// An error unless a fresh run, writing `config` as its config.toml, loses nothing in `dir`:
/// it may hold what an attempt that stopped before its first checkpoint leaves behind (the same
/// config.toml, empty files, a `checkpoints` directory without a complete checkpoint — checked
/// by [`ensure_no_checkpoints`] first), but not an earlier run's log or anyone's files.
pub fn ensure_fresh_run(dir: &Path, config: &str, hint: &str) -> Result<()> {
    let replaceable = |name: &str| {
        let path = dir.join(name);
        match name {
            "checkpoints" => checkpoints(dir).is_empty(),
            "config.toml" => std::fs::read(&path).is_ok_and(|b| b == config.as_bytes()),
            _ => std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == 0),
        }
    };
    ensure_nothing_lost(dir, replaceable, hint)
}

/// An error unless every entry of `dir` (if it exists) is its `lock` or `replaceable`.
fn ensure_nothing_lost(dir: &Path, replaceable: impl Fn(&str) -> bool, hint: &str) -> Result<()> {
    let unusable = |message: String| RunDirError::Unusable { path: dir.to_path_buf(), message };
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        return Err(unusable(format!("is not a directory: {hint}")));
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lock" && !replaceable(n))
        .collect();
    if names.is_empty() {
        return Ok(());
    }
    names.sort();
    let shown = names.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
    let more =
        if names.len() > 3 { format!(" and {} more", names.len() - 3) } else { String::new() };
    Err(unusable(format!("is not empty (it holds {shown}{more}): {hint}")))
}

/// Writes a small file by temp file + rename, so readers see the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(match path.extension() {
        Some(e) => format!("{}.tmp", e.to_string_lossy()),
        None => "tmp".into(),
    });
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync(dir),
        _ => Ok(()),
    }
}

/// Gives a file that a library wrote through a temporary file (safetensors' writer creates it
/// 0600) the mode a plain create would have: 0666 less the process's umask, so that whoever may
/// read the rest of the run (a group on a cluster) may read its weights too.
pub fn share_like_created(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // Linux reports the umask without changing it (`umask(2)` would set it, for every thread).
    let umask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Umask:"))?;
            u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
        })
        .unwrap_or(0o022);
    let mode = std::fs::Permissions::from_mode(0o666 & !umask);
    std::fs::set_permissions(path, mode).map_err(io(path))
}

/// Flushes a file or directory to disk.
pub fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(io(path))
}

/// An exclusive lock on a run directory (`flock` on `<run>/lock`), held while training: two
/// processes never train into the same run. The kernel drops it when the process dies, even by
/// SIGKILL, so a stale lock file never blocks a resume.
pub struct RunLock {
    _file: std::fs::File,
    /// The run directory, when taking the lock created it: a start refused before writing
    /// anything then leaves no empty run behind.
    created: Option<PathBuf>,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let Some(dir) = &self.created else { return };
        let only_lock = std::fs::read_dir(dir)
            .map(|entries| entries.flatten().all(|e| e.file_name() == "lock"))
            .unwrap_or(false);
        if only_lock {
            // Best effort: whatever stops the removal leaves only an empty run behind.
            let _ = std::fs::remove_file(dir.join("lock")).and_then(|_| std::fs::remove_dir(dir));
        }
    }
}

impl RunLock {
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        Self::acquire_for(run_dir, "is using this run; wait for it or choose another run.name")
    }

    /// [`RunLock::acquire`], whose refusal says `busy` after the holder's pid.
    fn acquire_for(run_dir: &Path, busy: &str) -> Result<RunLock> {
        use std::io::Seek;
        use std::os::fd::AsRawFd;
        let created = (!run_dir.exists()).then(|| run_dir.to_path_buf());
        std::fs::create_dir_all(run_dir).map_err(io(run_dir))?;
        let path = run_dir.join("lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        // SAFETY: flock only reads the descriptor, which `file` owns and keeps open for the
        // duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(RunDirError::Unusable {
                path: run_dir.to_path_buf(),
                message: format!("another motrain process (pid {}) {busy}", holder.trim()),
            });
        }
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| write!(file, "{}", std::process::id()))
            .map_err(io(&path))?;
        Ok(RunLock { _file: file, created })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        write_atomic(&p, b"a").unwrap();
        write_atomic(&p, b"b").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"b");
        let names: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("config.toml")]);
    }

    #[test]
    fn only_complete_checkpoints_count() {
        let dir = tempfile::tempdir().unwrap();
        let step = |n: usize, files: &[&str]| {
            let d = checkpoints_dir(dir.path()).join(format!("step-{n:06}"));
            std::fs::create_dir_all(&d).unwrap();
            files.iter().for_each(|f| std::fs::write(d.join(f), b"").unwrap());
        };
        ensure_no_checkpoints(dir.path(), "x").unwrap();
        step(2, &CHECKPOINT_FILES);
        step(1, &CHECKPOINT_FILES);
        step(3, &["state.json"]);
        let steps: Vec<usize> = checkpoints(dir.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![1, 2]);
        let e = ensure_no_checkpoints(dir.path(), "pass --resume").unwrap_err().to_string();
        assert!(e.contains("already holds checkpoints: pass --resume"), "{e}");
    }

    #[test]
    fn only_a_missing_or_empty_directory_is_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        ensure_empty(&run, "x").unwrap();
        let _lock = RunLock::acquire(&run).unwrap();
        ensure_empty(&run, "x").unwrap(); // the lock alone does not count
        std::fs::write(run.join("metrics.jsonl"), b"{}").unwrap();
        let e = ensure_empty(&run, "set another run.name").unwrap_err().to_string();
        assert!(e.contains("is not empty (it holds metrics.jsonl): set another run.name"), "{e}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let e = ensure_empty(&file, "x").unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
    }

    /// What a run killed before its first checkpoint leaves may be replaced; a log may not.
    #[test]
    fn a_fresh_run_replaces_only_what_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        std::fs::write(config_path(run), b"[run]\n").unwrap();
        std::fs::write(metrics_path(run), b"").unwrap();
        std::fs::create_dir_all(checkpoints_dir(run).join(".tmp-step-000002-7")).unwrap();
        ensure_fresh_run(run, "[run]\n", "x").unwrap();
        let e = ensure_fresh_run(run, "[run]\nname = 'other'\n", "x").unwrap_err().to_string();
        assert!(e.contains("config.toml"), "{e}");
        std::fs::write(metrics_path(run), b"{\"step\":1}\n").unwrap();
        let e = ensure_fresh_run(run, "[run]\n", "x").unwrap_err().to_string();
        assert!(e.contains("metrics.jsonl") && !e.contains("config.toml"), "{e}");
    }

    #[test]
    fn a_lock_that_made_its_directory_removes_it_if_nothing_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        drop(RunLock::acquire(&run).unwrap());
        assert!(!run.exists(), "an unused run directory was left behind");
        // One that existed stays, and so does one that something was written into.
        std::fs::create_dir_all(&run).unwrap();
        drop(RunLock::acquire(&run).unwrap());
        assert!(run.join("lock").exists());
        let other = dir.path().join("other");
        let lock = RunLock::acquire(&other).unwrap();
        std::fs::write(other.join("config.toml"), "x").unwrap();
        drop(lock);
        assert!(other.join("config.toml").exists());
    }

    #[test]
    fn a_second_lock_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _held = RunLock::acquire(dir.path()).unwrap();
        let e = RunLock::acquire(dir.path()).err().expect("locked").to_string();
        assert!(e.contains("another motrain process") && e.contains("run.name"), "{e}");
        // A conversion that loses the race for its --out is told about --out, not run.name.
        let e = claim_empty(dir.path(), "choose a new --out").err().expect("locked").to_string();
        assert!(e.contains("another motrain process") && e.ends_with("choose a new --out"), "{e}");
    }
}
