//! The SIMD path and the bf16 engine from the command line: every path this CPU has trains the
//! same model, each repeats itself bit for bit, the path is named on the first line, and
//! `MOTRAIN_SIMD` or `MOTRAIN_BF16` naming an unknown path or one this CPU lacks is refused
//! before anything is written.

mod common;

use common::*;
use motrain::ops::simd::{self, Level};
use std::process::Command;

fn on(level: &str) -> Command {
    let mut c = Command::new(bin());
    c.env(simd::ENV, level);
    c
}

#[test]
fn every_path_trains_the_same_model_and_repeats_itself_bit_for_bit() {
    let f = Fixture::new();
    let config = f.config();
    let steps = ["train.steps=30", "train.eval_every=0"];
    let portable = f.train_with(on("portable"), &config, "portable", &steps).ok();
    assert!(portable.stdout.lines().next().unwrap().ends_with("| simd portable"));
    let reference = losses(&f.run_dir("portable"));
    for level in simd::available().into_iter().skip(1) {
        let name = level.name();
        let out = f.train_with(on(name), &config, name, &steps).ok();
        assert!(out.stdout.lines().next().unwrap().ends_with(&format!("| simd {name}")));
        for ((step, a), (_, b)) in losses(&f.run_dir(name)).iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-4 * b.abs(), "{name} step {step}: loss {a} vs {b}");
        }
    }
    let best = simd::best().name();
    f.train_with(on(best), &config, "again", &steps).ok();
    assert_eq!(losses(&f.run_dir("again")), losses(&f.run_dir(best)), "same path, same losses");
}

#[test]
fn an_unknown_path_or_one_this_cpu_lacks_is_refused_before_anything_is_written() {
    let f = Fixture::new();
    let config = f.config();
    let out = f.train_with(on("sse9"), &config, "unknown", &[]);
    assert_bad_input(&out, &["MOTRAIN_SIMD=sse9", "unknown", "avx512"]);
    assert!(!f.run_dir("unknown").exists());
    let mut bytes = Command::new(bin());
    bytes.env(simd::ENV, <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff"));
    let out = f.train_with(bytes, &config, "bytes", &[]);
    assert_bad_input(&out, &["MOTRAIN_SIMD", "not text"]);
    // Only a CPU without AVX-512 (or AVX2) can show this; CI also checks it under qemu's
    // Nehalem (.ci/portable-check.sh).
    for missing in Level::ALL.into_iter().filter(|l| !l.supported()) {
        let out = f.train_with(on(missing.name()), &config, missing.name(), &[]);
        assert_bad_input(&out, &[&format!("MOTRAIN_SIMD={missing}"), "this CPU has no"]);
        assert!(!f.run_dir(missing.name()).exists());
    }
}

/// `run.dtype = "bf16"` on the CPU: on each bf16 engine the CPU has (AMX tiles, AVX512_BF16's
/// dot product; `MOTRAIN_BF16` picks) it trains the f32 model, dense and MoT, with bf16
/// matmuls (the same losses to bf16's precision, the engine said on the first line); without
/// one it is refused with exit 2, naming f32, before anything is written.
#[test]
fn bf16_trains_on_every_engine_and_is_refused_without_one() {
    use motrain::ops::bf16::{self, engines};
    let f = Fixture::new();
    let config = f.config();
    let steps = ["train.steps=30", "train.eval_every=0"];
    let bf16 = ["train.steps=30", "train.eval_every=0", "run.dtype=\"bf16\""];
    // A CPU without a bf16 dot product, or one standing for it (a lower SIMD path), refuses it.
    let has = !engines().is_empty();
    for level in simd::available().into_iter().filter(|l| !(has && *l == Level::Avx512)) {
        let name = format!("bf16-{}", level.name());
        let out = f.train_with(on(level.name()), &config, &name, &bf16);
        assert_bad_input(&out, &["bf16", "dot product", "f32 is the fastest"]);
        assert!(!f.run_dir(&name).exists());
    }
    // MOTRAIN_BF16 naming no engine, or one this CPU lacks, is refused before anything runs.
    let lacking = bf16::Engine::ALL.into_iter().filter(|e| !engines().contains(e));
    for want in lacking.map(|e| e.name()).chain(["bogus"]) {
        let mut c = Command::new(bin());
        c.env(bf16::ENV, want);
        let out = f.train_with(c, &config, "bf16-bad-engine", &bf16);
        assert_bad_input(&out, &[bf16::ENV, want]);
        assert!(!f.run_dir("bf16-bad-engine").exists());
    }
    if !has {
        return;
    }
    // Dense, and MoT (whose merge's backward runs on the tiles in a bf16 run on AMX).
    let mot = ["model.ffn=mot", "model.mot.n_experts=4", "model.mot.group_size=2"];
    for (kind, model) in [("dense", &[][..]), ("mot", &mot[..])] {
        let extra = |base: &[&'static str]| [base, model].concat();
        f.train(&config, &format!("{kind}-f32"), &extra(&steps)).ok();
        let reference = losses(&f.run_dir(&format!("{kind}-f32")));
        for engine in engines() {
            let with = |name: &str| {
                let mut c = Command::new(bin());
                c.env(bf16::ENV, engine.name());
                f.train_with(c, &config, name, &extra(&bf16)).ok()
            };
            let name = format!("{kind}-bf16-{}", engine.name());
            let out = with(&name);
            let first = out.stdout.lines().next().unwrap().to_string();
            assert!(first.ends_with(&format!("bf16 matmuls on {}", engine.label())), "{first}");
            let a = losses(&f.run_dir(&name));
            assert_eq!(a.len(), reference.len());
            let mut differ = false;
            for ((step, x), (_, y)) in a.iter().zip(&reference) {
                assert!((x - y).abs() <= 2e-2 * y.abs(), "{name} step {step}: loss {x} vs f32 {y}");
                differ |= x != y;
            }
            assert!(differ, "{name}: bf16 matmuls must round: the losses cannot all be f32's");
            with(&format!("{name}-again"));
            let again = losses(&f.run_dir(&format!("{name}-again")));
            assert_eq!(again, a, "{name} repeats itself bit for bit");
        }
    }

    // `bench --vs` steps an f32 and a bf16 model of one process in turn: each keeps its own
    // matmuls, so each ends where it ends when benched alone.
    let cfg = config.to_str().unwrap();
    let dtype = "run.dtype=\"bf16\"";
    let bench = |extra: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec!["bench", "--config", cfg, "--steps", "3", "--warmup", "0"];
        args.extend(extra);
        let out = f.run(&args).ok();
        out.stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let both = bench(&["--vs-set", dtype]);
    let (alone_f32, alone_bf16) = (bench(&[]), bench(&["--set", dtype]));
    assert_eq!(both[0]["final_loss"], alone_f32[0]["final_loss"], "f32 beside bf16: {}", both[0]);
    assert_eq!(both[1]["final_loss"], alone_bf16[0]["final_loss"], "bf16 beside f32: {}", both[1]);
    assert_ne!(both[0]["final_loss"], both[1]["final_loss"]);
    let fastest = engines()[0].label();
    assert!(!both[0]["simd"].as_str().unwrap().contains("bf16"), "{}", both[0]);
    assert!(both[1]["simd"].as_str().unwrap().ends_with(fastest), "{}", both[1]);
}
