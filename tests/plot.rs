//! `motrain plot` end to end: two runs into one SVG and one PNG; bad arguments refused.

mod common;

use common::*;

#[test]
fn plots_several_runs_and_refuses_bad_arguments() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "dense-run", &["train.steps=6", "train.eval_every=3"]).ok();
    f.train(
        &cfg,
        "mot-run",
        &[
            "train.steps=6",
            "train.eval_every=3",
            "model.ffn=mot",
            "model.mot.n_experts=2",
            "model.mot.group_size=2",
        ],
    )
    .ok();
    let (a, b) = (f.run_dir("dense-run"), f.run_dir("mot-run"));
    let svg = f.root().join("curves.svg");
    let out = f
        .run(&["plot", a.to_str().unwrap(), b.to_str().unwrap(), "--out", svg.to_str().unwrap()])
        .ok();
    assert!(out.stdout.contains("2 runs"), "{}", out.stdout);
    let text = String::from_utf8(read(&svg)).unwrap();
    for label in
        ["dense-run train", "dense-run val", "mot-run train", "mot-run val", "tokens", "step"]
    {
        assert!(text.contains(label), "the SVG lacks {label:?}");
    }
    let png = f.root().join("curves.png");
    f.run(&["plot", a.to_str().unwrap(), "--out", png.to_str().unwrap()]).ok();
    assert!(read(&png).starts_with(b"\x89PNG"));

    assert_bad_input(
        &f.run(&["plot", a.to_str().unwrap(), "--out", "curves.pdf"]),
        &[".svg or .png"],
    );
    assert_bad_input(&f.run(&["plot", "no-such-run", "--out", "x.svg"]), &["no-such-run"]);
    assert!(!f.cwd().join("x.svg").exists());
}
