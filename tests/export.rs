//! `motrain export --format hf` end to end: the folder's files and architecture for dense and
//! MoE runs, and the models without a Hugging Face counterpart refused by name. (That the
//! exported weights compute our logits is checked in `src/export.rs` against
//! candle-transformers, and by `scripts/check_hf_export.py` against `transformers`.)

mod common;

use common::*;

fn config_json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&read(&dir.join("config.json"))).unwrap()
}

#[test]
fn exports_dense_and_moe_runs_and_refuses_the_rest() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "dense", &["train.steps=2"]).ok();
    let out = f.root().join("hf-dense");
    let o = f
        .run(&[
            "export",
            "--checkpoint",
            f.run_dir("dense").to_str().unwrap(),
            "--format",
            "hf",
            "--out",
            out.to_str().unwrap(),
        ])
        .ok();
    assert!(o.stdout.contains("LlamaForCausalLM"), "{}", o.stdout);
    assert_eq!(config_json(&out)["architectures"][0], "LlamaForCausalLM");
    assert!(out.join("model.safetensors").exists() && out.join("generation_config.json").exists());
    // A second export into it would mix two models' files: refused, the first left as it was.
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let again = f.run(&[
        "export",
        "--checkpoint",
        f.run_dir("dense").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_bad_input(&again, &["is not empty", "--out"]);
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), before);

    f.train(
        &cfg,
        "mixtral",
        &[
            "train.steps=2",
            "model.ffn=moe",
            "model.moe.n_experts=2",
            "model.moe.top_k=2",
            "model.moe.gate=softmax_topk",
        ],
    )
    .ok();
    let out = f.root().join("hf-mixtral");
    f.run(&[
        "export",
        "--checkpoint",
        f.run_dir("mixtral").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .ok();
    let c = config_json(&out);
    assert_eq!(
        (c["architectures"][0].as_str(), c["num_local_experts"].as_u64()),
        (Some("MixtralForCausalLM"), Some(2))
    );

    f.train(
        &cfg,
        "qwen",
        &["train.steps=2", "model.ffn=moe", "model.moe.n_experts=2", "model.ffn_layers=[1]"],
    )
    .ok();
    let out = f.root().join("hf-qwen");
    f.run(&[
        "export",
        "--checkpoint",
        f.run_dir("qwen").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .ok();
    let c = config_json(&out);
    assert_eq!(c["architectures"][0], "Qwen2MoeForCausalLM");
    assert_eq!(c["mlp_only_layers"], serde_json::json!([0]));
    assert_eq!(c["norm_topk_prob"], false);

    f.train(
        &cfg,
        "mot",
        &["train.steps=2", "model.ffn=mot", "model.mot.n_experts=2", "model.mot.group_size=2"],
    )
    .ok();
    let refused = f.root().join("hf-mot");
    assert_bad_input(
        &f.run(&[
            "export",
            "--checkpoint",
            f.run_dir("mot").to_str().unwrap(),
            "--out",
            refused.to_str().unwrap(),
        ]),
        &["transition-tune"],
    );
    f.train(&cfg, "paper", &["train.steps=2", "model.norm=layernorm"]).ok();
    assert_bad_input(
        &f.run(&[
            "export",
            "--checkpoint",
            f.run_dir("paper").to_str().unwrap(),
            "--out",
            refused.to_str().unwrap(),
        ]),
        &["model.norm"],
    );
    assert!(!refused.exists(), "nothing is written for a refused export");
    assert_bad_input(
        &f.run(&[
            "export",
            "--checkpoint",
            f.run_dir("dense").to_str().unwrap(),
            "--format",
            "onnx",
            "--out",
            "x",
        ]),
        &["hf"],
    );
}
