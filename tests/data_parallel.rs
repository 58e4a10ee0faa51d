//! Data parallelism end to end under `mpirun` (cargo feature `mpi`; `.ci/run` runs these with
//! Open MPI): an N-rank run equals the one-rank run with the same micro-batches, with and
//! without ZeRO-1; checkpoints move between world sizes; SIGTERM saves and resumes exactly; a
//! lost rank ends the job; bad worlds are refused before anything is written.
#![cfg(feature = "mpi")]

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Train-line losses by step.
fn train_losses(run_dir: &Path) -> Vec<(u64, f64)> {
    train_lines(run_dir).iter().map(|v| (step_of(v), num(v, "loss"))).collect()
}

fn assert_close(what: &str, a: &[(u64, f64)], b: &[(u64, f64)], rtol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: {} vs {} steps", a.len(), b.len());
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb, "{what}: steps out of line");
        assert!((la - lb).abs() <= rtol * la.abs(), "{what}: step {sa}: {la} vs {lb}");
    }
}

fn train_args<'a>(config: &'a str, name: &'a str, extra: &'a [String]) -> Vec<&'a str> {
    let mut args = vec!["train", "--config", config, "--set", name];
    for e in extra {
        args.extend(["--set", e.as_str()]);
    }
    args
}

/// One rank with micro-batches of B/2 and two ranks with the same settings: the same losses.
fn check_equivalence(kind: &str, model: &[&str]) {
    let f = Fixture::new();
    check_equivalence_on(&f, &f.config(), kind, model);
}

fn check_equivalence_on(f: &Fixture, config: &Path, kind: &str, model: &[&str]) {
    let config = config.to_str().unwrap();
    let mut common: Vec<String> = model.iter().map(|s| s.to_string()).collect();
    common.extend(
        ["train.steps=50", "train.micro_batch_size=2", "train.eval_every=25"].map(String::from),
    );
    let one =
        f.train(Path::new(config), "one", &common.iter().map(String::as_str).collect::<Vec<_>>());
    one.ok();
    if kind == "moe" {
        let dropped = train_lines(&f.run_dir("one"))
            .iter()
            .any(|v| v["routing"][0]["dropped"].as_f64().is_some_and(|d| d > 0.0));
        assert!(dropped, "the MoE case must drop tokens");
    }
    for zero in ["0", "1"] {
        let name = format!("run.name=two-zero{zero}");
        let mut extra = common.clone();
        extra.push(format!("train.zero={zero}"));
        let out = mpirun(&f.cwd(), 2, &train_args(config, &name, &extra)).ok();
        assert!(out.stdout.contains("| 2 ranks"), "{}", out.describe());
        let what = format!("{kind}, zero = {zero}");
        let two = f.run_dir(&format!("two-zero{zero}"));
        assert_close(&what, &train_losses(&f.run_dir("one")), &train_losses(&two), 1e-5);
        let evals = |d: &Path| {
            eval_lines(d).iter().map(|v| (step_of(v), num(v, "loss"))).collect::<Vec<_>>()
        };
        assert_close(&format!("{what}, eval"), &evals(&f.run_dir("one")), &evals(&two), 1e-5);
    }
}

#[test]
fn two_ranks_equal_one_rank_dense() {
    check_equivalence("dense", &[]);
}

#[test]
fn two_ranks_equal_one_rank_mot() {
    check_equivalence("mot", &["model.ffn=mot", "model.mot.n_experts=4", "model.mot.group_size=2"]);
}

#[test]
fn two_ranks_equal_one_rank_moe_with_dropped_tokens() {
    check_equivalence(
        "moe",
        &[
            "model.ffn=moe",
            "model.moe.n_experts=4",
            "model.moe.top_k=2",
            "model.moe.capacity_factor=0.5",
        ],
    );
}

#[test]
fn two_ranks_equal_one_rank_on_a_mixture_of_sources() {
    let f = Fixture::new();
    f.shards("noise", &random_tokens(3000, 64, 5), &random_tokens(600, 64, 6));
    let config = f.mixture_config("mix.toml", &[("tiny", 0.7), ("noise", 0.3)], 64);
    check_equivalence_on(&f, &config, "mixture", &[]);
}

#[test]
fn a_two_rank_checkpoint_resumes_on_one_and_on_two_ranks() {
    let f = Fixture::new();
    let config = f.config();
    let c = config.to_str().unwrap();
    let common: Vec<String> = ["train.steps=20", "train.micro_batch_size=2", "train.ckpt_every=10"]
        .map(String::from)
        .to_vec();
    f.train(&config, "whole", &common.iter().map(String::as_str).collect::<Vec<_>>()).ok();
    mpirun(&f.cwd(), 2, &train_args(c, "run.name=two", &common)).ok();
    for (name, ranks) in [("on-one", 1), ("on-two", 2)] {
        // The two-rank run as it stood after step 10.
        let dir = f.run_dir(name);
        copy_dir(&f.run_dir("two"), &dir);
        std::fs::remove_dir_all(dir.join("checkpoints/step-000020")).unwrap();
        std::fs::remove_file(dir.join("checkpoints/latest")).unwrap();
        let run = format!("run.name={name}");
        let mut args = train_args(c, &run, &common);
        args.push("--resume");
        let out = if ranks == 1 { motrain(&f.cwd(), &args) } else { mpirun(&f.cwd(), 2, &args) };
        assert!(out.ok().stdout.contains("resumed"));
        assert_close(name, &train_losses(&f.run_dir("whole")), &train_losses(&dir), 1e-5);
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The pids of the motrain processes whose command line holds `needle` (the ranks, not mpirun).
fn rank_pids(needle: &str) -> Vec<u32> {
    let me = std::fs::canonicalize(bin()).unwrap();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let exe = std::fs::read_link(e.path().join("exe")).ok();
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if exe.as_deref() == Some(me.as_path()) && String::from_utf8_lossy(&cmd).contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits until the run has logged `steps` train lines.
fn wait_for_steps(run_dir: &Path, steps: usize, child: &mut std::process::Child) {
    let start = Instant::now();
    while std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
        < steps
    {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step {steps}");
        assert!(start.elapsed() < Duration::from_secs(120), "no step {steps} after 2 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_to_the_ranks_saves_and_the_resume_equals_the_uninterrupted_run() {
    let f = Fixture::new();
    let config = f.config();
    let c = config.to_str().unwrap();
    // Far more steps than the signal needs, so that the run cannot end before it lands.
    let common: Vec<String> = [
        "train.steps=300",
        "train.micro_batch_size=2",
        "train.ckpt_every=1000",
        "train.eval_every=0",
    ]
    .map(String::from)
    .to_vec();
    mpirun(&f.cwd(), 2, &train_args(c, "run.name=whole", &common)).ok();
    // A step between 3 and 30 that differs from run to run of the test.
    let at = 3 + (std::process::id() as usize % 28);
    let (mut cmd, _session) = mpirun_command(2);
    let mut child = cmd
        .args(train_args(c, "run.name=stopped", &common))
        .current_dir(f.cwd())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&f.run_dir("stopped"), at, &mut child);
    // As SLURM does on preemption: SIGTERM to every task.
    for pid in rank_pids("run.name=stopped") {
        send_signal(pid, "TERM");
    }
    let out = Out::from(&["mpirun"], child.wait_with_output().unwrap());
    assert_eq!(out.code, Some(143), "{}", out.describe());
    assert!(out.stdout.contains("stopped by SIGTERM"), "{}", out.describe());
    let (_, ckpt) = latest(&f.run_dir("stopped")).expect("a checkpoint at the stop");
    assert!(ckpt.ends_with(format!(
        "step-{:06}",
        step_of(&train_lines(&f.run_dir("stopped")).last().unwrap().clone())
    )));
    let mut args = train_args(c, "run.name=stopped", &common);
    args.push("--resume");
    mpirun(&f.cwd(), 2, &args).ok();
    assert_close(
        "resumed",
        &train_losses(&f.run_dir("whole")),
        &train_losses(&f.run_dir("stopped")),
        1e-5,
    );
}

/// `kill -SIG pid` through the `kill` command.
fn send_signal(pid: u32, sig: &str) {
    let s =
        std::process::Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status();
    assert!(s.unwrap().success() || sig == "KILL");
}

#[test]
fn a_killed_rank_ends_the_job_within_60_s_and_the_last_checkpoint_loads() {
    let f = Fixture::new();
    let config = f.config();
    let c = config.to_str().unwrap();
    let common: Vec<String> =
        ["train.steps=100000", "train.micro_batch_size=2", "train.ckpt_every=5"]
            .map(String::from)
            .to_vec();
    let (mut cmd, _session) = mpirun_command(2);
    let mut child = cmd
        .args(train_args(c, "run.name=lost", &common))
        .current_dir(f.cwd())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&f.run_dir("lost"), 12, &mut child);
    let pids = rank_pids("run.name=lost");
    assert_eq!(pids.len(), 2, "two ranks");
    let killed = Instant::now();
    send_signal(pids[1], "KILL");
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert!(killed.elapsed() < Duration::from_secs(60), "took {:?}", killed.elapsed());
    // No rank is left behind, and the checkpoint before the kill is whole.
    std::thread::sleep(Duration::from_millis(200));
    assert!(rank_pids("run.name=lost").is_empty(), "a rank survived");
    let dir = f.run_dir("lost");
    let eval = f.run(&["eval", "--checkpoint", dir.to_str().unwrap()]).ok();
    assert!(eval.last_json()["loss"].as_f64().unwrap().is_finite());
}

#[test]
fn different_configs_on_the_ranks_are_refused_before_anything_is_written() {
    let f = Fixture::new();
    let config = f.config();
    let c = config.to_str().unwrap();
    let one = train_args(c, "run.name=mixed", &[]);
    let (mut cmd, _session) = mpirun_command(1);
    cmd.args(&one)
        .args(["--set", "train.lr=0.01", ":", "-n", "1"])
        .arg(bin())
        .args(&one)
        .args(["--set", "train.lr=0.02"]);
    let out = run_motrain(cmd, &f.cwd(), &[]);
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(out.stderr.contains("not all given the same config"), "{}", out.describe());
    assert!(!f.run_dir("mixed").exists());
}

#[test]
fn a_world_the_batch_cannot_be_shared_by_is_refused() {
    let f = Fixture::new();
    let config = f.config();
    let extra = ["train.micro_batch_size=4".to_string()];
    let out = mpirun(&f.cwd(), 2, &train_args(config.to_str().unwrap(), "run.name=uneven", &extra));
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("cannot be shared evenly by 2 ranks"), "{}", out.describe());
    assert!(!f.run_dir("uneven").exists());
}
