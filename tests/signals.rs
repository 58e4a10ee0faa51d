//! Preemption in one process: SIGTERM, SIGINT or SIGUSR1 stops at the next step boundary,
//! saves a checkpoint and exits 128 + the signal; `--resume` then equals a run that was never
//! interrupted. And ZeRO-1 without a second rank is refused.

mod common;

use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn stop_and_resume(sig: &str, code: i32) {
    let f = Fixture::new();
    let config = f.config();
    // Far more steps than the signal needs, so that the run cannot end before the signal lands
    // however fast the machine is.
    let common = ["train.steps=600", "train.ckpt_every=1000", "train.eval_every=0"];
    f.train(&config, "whole", &common).ok();
    let name = format!("stopped-{sig}");
    let set_name = format!("run.name={name}");
    let mut args = vec!["train", "--config", config.to_str().unwrap(), "--set", &set_name];
    common.iter().for_each(|c| args.extend(["--set", c]));
    let mut child = std::process::Command::new(bin())
        .args(&args)
        .current_dir(f.cwd())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A step between 3 and 30 that differs from run to run of the test.
    let at = 3 + (std::process::id() as usize % 28);
    let start = Instant::now();
    let metrics = f.run_dir(&name).join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < at {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step {at}");
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    let status = std::process::Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = Out::from(&args, child.wait_with_output().unwrap());
    assert_eq!(out.code, Some(code), "{}", out.describe());
    assert!(out.stdout.contains(&format!("stopped by SIG{sig}")), "{}", out.describe());
    let last = step_of(train_lines(&f.run_dir(&name)).last().unwrap());
    let (ckpt, _) = latest(&f.run_dir(&name)).expect("a checkpoint at the stop");
    assert_eq!(ckpt, format!("step-{last:06}"));
    f.train(&config, &name, &[&common[..], &["--resume"]].concat()).ok();
    assert_eq!(losses(&f.run_dir("whole")), losses(&f.run_dir(&name)), "bit for bit on CPU");
    assert_no_duplicate_steps(&f.run_dir(&name));
}

#[test]
fn sigterm_saves_exits_143_and_resumes_exactly() {
    stop_and_resume("TERM", 143);
}

#[test]
fn sigusr1_saves_exits_138_and_resumes_exactly() {
    stop_and_resume("USR1", 138);
}

#[test]
fn zero_without_a_second_rank_is_refused_before_anything_is_written() {
    let f = Fixture::new();
    let out = f.train(&f.config(), "zero", &["train.zero=1"]);
    assert_bad_input(&out, &["train.zero", "mpirun"]);
    assert!(!f.run_dir("zero").exists());
}
