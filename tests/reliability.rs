//! What survives which failure: SIGKILL at random moments, a full disk, NaNs, two processes on
//! one run. Each test drives the real binary on a tiny model.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn spawn_train(
    f: &Fixture, cfg: &std::path::Path, name: &str, sets: &[&str], resume: bool,
) -> Child {
    let mut c = Command::new(bin());
    c.current_dir(f.cwd()).args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &format!("run.name={name}"),
    ]);
    for s in sets {
        c.args(["--set", s]);
    }
    if resume {
        c.arg("--resume");
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn motrain")
}

/// No directory a loader could pick up is half-written: `latest` names a complete checkpoint.
fn assert_consistent(run: &std::path::Path, what: &str) {
    if let Some((name, dir)) = latest(run) {
        assert!(!name.starts_with(".tmp"), "{what}: latest names a temporary directory {name}");
        for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            assert!(dir.join(file).is_file(), "{what}: {name} has no {file}");
        }
    }
    for e in std::fs::read_dir(run.join("checkpoints")).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("step-") {
            assert!(e.path().join("state.json").is_file(), "{what}: {n} is visible but incomplete");
        }
    }
}

#[test]
fn sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run() {
    let f = Fixture::empty();
    f.shards("k", &random_tokens(20_000, 256, 7), &random_tokens(2_000, 256, 8));
    let cfg = f.config_for("k.toml", "k", 256);
    let sets = [
        "model.d_model=64",
        "model.d_ff=128",
        "train.steps=40",
        "train.ckpt_every=1",
        "train.eval_every=10",
        "train.keep_checkpoints=2",
    ];
    f.train(&cfg, "straight", &sets).ok();

    let run = f.run_dir("killed");
    let mut rng =
        Lcg(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64);
    let started = Instant::now();
    let (mut kills, mut finished) = (0, false);
    let step_of_latest =
        |run: &std::path::Path| latest(run).map_or(0, |(n, _)| n[5..].parse::<u64>().unwrap());
    while !finished {
        assert!(started.elapsed() < Duration::from_secs(90), "did not finish after {kills} kills");
        let resume = latest(&run).is_some();
        let mut child = spawn_train(&f, &cfg, "killed", &sets, resume);
        // Kill at a random moment a few checkpoints on (so the kill lands whatever the
        // machine's speed): mid-step or mid-save, 0–30 ms after the k-th new checkpoint.
        let target = step_of_latest(&run) + 1 + rng.below(4);
        while kills < 5 && step_of_latest(&run) < target && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        if kills < 5 {
            std::thread::sleep(Duration::from_millis(rng.below(30)));
        }
        match child.try_wait().unwrap() {
            Some(status) => {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                assert!(status.success(), "run after {kills} kills failed: {status}\n{err}");
                finished = true;
            }
            None if kills < 5 => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                assert_consistent(&run, &format!("after kill {kills} (target step {target})"));
            }
            None => {
                finished = child.wait().unwrap().success();
            }
        }
    }
    assert!(kills >= 3, "only {kills} kills landed: the run finished too fast to test anything");
    let a = f.run_dir("straight");
    assert_eq!(
        losses(&run),
        losses(&a),
        "the loss log of the killed run differs from the uninterrupted one"
    );
    let (ma, mb) = (latest(&a).unwrap().1, latest(&run).unwrap().1);
    assert_eq!(latest(&run).unwrap().0, "step-000040");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            read(&ma.join(file)) == read(&mb.join(file)),
            "{file} differs from the uninterrupted run after {kills} kills"
        );
    }
}

#[test]
fn a_nan_with_on_nan_stop_saves_nothing_corrupt_and_names_the_step() {
    let f = Fixture::new();
    let cfg = f.config();
    let out = motrain_env(
        &f,
        &[("MOTRAIN_FAULT_NAN_STEP", "7")],
        &cfg,
        "nanstop",
        &["train.ckpt_every=3", "train.steps=20"],
    );
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with("error:") && l.contains("step 7") && l.contains("NaN")),
        "{}",
        out.describe()
    );
    assert!(!out.stderr.contains("panicked"));
    let run = f.run_dir("nanstop");
    assert_eq!(latest(&run).unwrap().0, "step-000006");
    assert!(
        losses(&run).iter().all(|(s, l)| *s <= 6 && l.is_finite()),
        "a line past step 6 or a non-finite loss was logged"
    );
    let eval = f.run(&["eval", "--checkpoint", run.to_str().unwrap()]).ok();
    assert!(num(&eval.last_json(), "loss").is_finite());
}

/// The hook is for tests, but a typo in it must not pass for a run without a fault.
#[test]
fn a_nan_fault_step_that_is_not_a_number_is_refused_before_anything_is_written() {
    let f = Fixture::new();
    let cfg = f.config();
    let out = motrain_env(&f, &[("MOTRAIN_FAULT_NAN_STEP", "abc")], &cfg, "nanbad", &[]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(out.stderr.starts_with("error: MOTRAIN_FAULT_NAN_STEP"), "{}", out.describe());
    assert!(!f.run_dir("nanbad").exists());
}

#[test]
fn a_nan_with_on_nan_skip_skips_that_update_and_counts_it() {
    let f = Fixture::new();
    let cfg = f.config();
    let sets =
        ["train.on_nan=skip", "train.ckpt_every=1", "train.steps=10", "train.keep_checkpoints=20"];
    motrain_env(&f, &[("MOTRAIN_FAULT_NAN_STEP", "5")], &cfg, "nanskip", &sets).ok();
    let run = f.run_dir("nanskip");
    let ck = |s: u32| run.join("checkpoints").join(format!("step-{s:06}"));
    assert!(
        read(&ck(4).join("model.safetensors")) == read(&ck(5).join("model.safetensors")),
        "step 5 changed the weights"
    );
    assert!(
        read(&ck(5).join("model.safetensors")) != read(&ck(6).join("model.safetensors")),
        "step 6 did not train"
    );
    assert_eq!(state_json(&ck(10))["skipped_steps"], 1);
    assert_eq!(state_json(&ck(10))["optimizer_t"], 9);
    let lines = train_lines(&run);
    assert_eq!(lines.iter().find(|l| step_of(l) == 5).unwrap()["skipped_steps"], 1);
    assert!(num(lines.last().unwrap(), "loss").is_finite());
}

#[test]
fn a_second_process_cannot_train_into_a_locked_run() {
    let f = Fixture::new();
    let cfg = f.config();
    let sets = ["train.steps=100000", "train.ckpt_every=50", "train.eval_every=0"];
    let mut first = spawn_train(&f, &cfg, "locked", &sets, false);
    let run = f.run_dir("locked");
    let t0 = Instant::now();
    while latest(&run).is_none() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no checkpoint from the first process");
        std::thread::sleep(Duration::from_millis(10));
    }
    let second = f.train(&cfg, "locked", &["train.steps=100000", "--resume"]);
    first.kill().unwrap();
    first.wait().unwrap();
    assert_bad_input(&second, &["another motrain process", "pid"]);
    // The kernel released the lock with the killed process: a resume now proceeds.
    let steps = latest(&run).map(|(n, _)| n[5..].parse::<u32>().unwrap()).unwrap() + 2;
    f.train(&cfg, "locked", &["train.eval_every=0", &format!("train.steps={steps}"), "--resume"])
        .ok();
}

/// A tmpfs too small for a second checkpoint: the save fails like on a full disk.
#[test]
fn a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_stops_cleanly() {
    let f = Fixture::new();
    let cfg = f.config();
    let mnt = f.root().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    // 52k parameters: model + two moments ≈ 630 KB per checkpoint; room for one and a half.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=960k", "tmpfs", mnt.to_str().unwrap()])
        .status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED a_full_disk_during_a_save: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let out_dir = format!("run.out_dir={}", mnt.display());
    let out = f.train(
        &cfg,
        "full",
        &[
            &out_dir,
            "model.d_model=48",
            "model.d_ff=96",
            "train.ckpt_every=5",
            "train.steps=20",
            "train.keep_checkpoints=3",
        ],
    );
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.lines().any(|l| l.starts_with("error:") && l.contains("No space left")),
        "{}",
        out.describe()
    );
    assert!(!out.stderr.contains("panicked"));
    let run = mnt.join("full");
    let (name, _) = latest(&run).expect("the first checkpoint survives");
    assert_eq!(name, "step-000005");
    assert_consistent(&run, "after the failed save");
    let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "the failed save left its temporary directory behind");
    let eval = f.run(&["eval", "--checkpoint", run.to_str().unwrap()]).ok();
    assert!(num(&eval.last_json(), "loss").is_finite());
}

/// `motrain train` with extra environment variables.
fn motrain_env(
    f: &Fixture, env: &[(&str, &str)], cfg: &std::path::Path, name: &str, sets: &[&str],
) -> Out {
    let mut c = Command::new(bin());
    c.current_dir(f.cwd()).args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &format!("run.name={name}"),
    ]);
    for s in sets {
        c.args(["--set", s]);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Out::from(&args, c.stdin(Stdio::null()).output().expect("run motrain"))
}
