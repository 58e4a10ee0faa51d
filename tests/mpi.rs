//! `motrain::dist` on two real MPI ranks: `examples/dist_selftest.rs` run under
//! `mpirun --allow-run-as-root --oversubscribe -n 2` (Open MPI; see .ci/mpi-setup.sh).
//!
//! Finding the selftest binary: `$MOTRAIN_DIST_SELFTEST` when set, else `examples/dist_selftest`
//! in the profile directory this test binary was built into (`target/<profile>/`), where
//! `cargo test --features mpi` (without `--test`) puts it, as does
//! `cargo build [--release] --example dist_selftest --features mpi`. With `--test mpi` alone
//! cargo skips examples: build it first.
#![cfg(feature = "mpi")]

mod common;

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn selftest() -> PathBuf {
    if let Some(p) = std::env::var_os("MOTRAIN_DIST_SELFTEST") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary under target/<profile>/deps");
    let p = profile_dir.join("examples").join("dist_selftest");
    assert!(
        p.is_file(),
        "{} does not exist: build it with `cargo build{} --example dist_selftest --features mpi`, or set MOTRAIN_DIST_SELFTEST",
        p.display(),
        if profile_dir.ends_with("release") { " --release" } else { "" }
    );
    p
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "exit {:?} after {:.1} s\nstdout:\n{}\nstderr:\n{}",
            self.code,
            self.took.as_secs_f64(),
            self.stdout,
            self.stderr
        )
    }
}

/// `mpirun -n RANKS dist_selftest MODE` with `env`, killed (with every rank, through its process
/// group) if it outlives `deadline`.
fn mpirun(ranks: usize, mode: &str, env: &[(&str, &str)], deadline: Duration) -> Run {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-n", &ranks.to_string()]);
    for (k, v) in env {
        cmd.args(["-x", &format!("{k}={v}")]);
    }
    cmd.arg(selftest()).arg(mode);
    run(cmd, deadline)
}

fn run(mut cmd: Command, deadline: Duration) -> Run {
    let session = common::own_session_dir();
    // Shared memory's single-copy mechanisms (CMA, KNEM) need ptrace rights containers lack.
    cmd.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("OMPI_MCA_orte_tmpdir_base", session.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn mpirun (is Open MPI installed? .ci/mpi-setup.sh)");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > deadline {
            // SAFETY: signals the process group we created for this child.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = start.elapsed();
    Run {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        took,
    }
}

#[test]
fn collectives_give_the_same_results_as_arithmetic_on_two_ranks() {
    let r = mpirun(2, "collectives", &[("SELFTEST_EXPECT_SIZE", "2")], Duration::from_secs(120));
    assert_eq!(r.code, Some(0), "{}", r.describe());
    for rank in 0..2 {
        assert!(r.stdout.contains(&format!("rank {rank}/2: collectives ok")), "{}", r.describe());
    }
}

#[test]
fn without_a_launcher_the_world_is_one_rank_and_mpi_is_not_initialised() {
    let mut cmd = Command::new(selftest());
    cmd.arg("collectives").env("SELFTEST_EXPECT_SIZE", "1");
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "PMIX_RANK"] {
        cmd.env_remove(var);
    }
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert!(r.stdout.contains("rank 0/1: collectives ok"), "{}", r.describe());
}

#[test]
fn a_hung_rank_makes_the_others_exit_through_the_watchdog() {
    let r = mpirun(2, "hang", &[("MOTRAIN_COLLECTIVE_TIMEOUT_S", "3")], Duration::from_secs(60));
    assert!(matches!(r.code, Some(c) if c != 0), "expected a failure\n{}", r.describe());
    let line = "error: rank 0: collective all_reduce_sum(f32) (#2) did not complete within 3.0 s; a peer rank was lost or hung";
    assert!(r.stderr.contains(line), "no watchdog line\n{}", r.describe());
    assert!(
        r.stderr.contains("(rank 1 has not reached it)"),
        "the hung rank is not named\n{}",
        r.describe()
    );
    // 3 s of timeout, a poll interval, then mpirun tearing down the hung rank.
    assert!(r.took < Duration::from_secs(30), "{}", r.describe());
}

#[test]
fn a_killed_rank_makes_the_others_exit_nonzero_within_60_s() {
    // The default timeout: whatever ends the survivor (mpirun noticing the death, or the
    // watchdog), it must be within the 60 s the issue allows.
    let r = mpirun(2, "kill9", &[], Duration::from_secs(90));
    eprintln!("observed:\n{}", r.describe());
    assert!(matches!(r.code, Some(c) if c != 0), "expected a failure\n{}", r.describe());
    assert!(r.took < Duration::from_secs(60), "{}", r.describe());
    assert!(r.stderr.contains("rank 1"), "the killed rank is not named\n{}", r.describe());
    assert!(!r.stderr.contains("completed without the last rank"), "{}", r.describe());
}

#[test]
fn ranks_disagreeing_on_a_collective_are_stopped_before_it_runs() {
    let r = mpirun(2, "mismatch", &[], Duration::from_secs(60));
    assert!(matches!(r.code, Some(c) if c != 0), "expected a failure\n{}", r.describe());
    let line = "at collective #1 all_reduce_sum(f32) of 10 values, rank 1 is at #1 all_reduce_sum(f32) of 11 values";
    assert!(r.stderr.contains(line), "{}", r.describe());
    assert!(!r.stderr.contains("of different lengths completed"), "{}", r.describe());
}

#[test]
fn a_launcher_announcing_more_ranks_than_mpi_sees_is_refused() {
    // What `srun --mpi=none` does: N tasks, each initialising MPI as a world of one.
    let mut cmd = Command::new(selftest());
    cmd.arg("collectives").env("SLURM_STEP_NUM_TASKS", "2");
    for var in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"] {
        cmd.env_remove(var);
    }
    let r = run(cmd, Duration::from_secs(60));
    assert_eq!(r.code, Some(2), "{}", r.describe());
    assert!(
        r.stderr.starts_with(
            "error: the launcher started 2 ranks (SLURM_STEP_NUM_TASKS), but MPI sees a world of 1"
        ),
        "{}",
        r.describe()
    );
    assert!(r.stderr.contains("--mpi=pmix"), "{}", r.describe());
}
