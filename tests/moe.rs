//! Sparse MoE end to end: training logs and eval report routing statistics, the checkpoint
//! holds the spec's tensor names, bad MoE settings are refused, and resume stays exact.

mod common;

use common::*;

const MOE: [&str; 4] =
    ["model.ffn=moe", "model.moe.n_experts=4", "train.steps=12", "train.eval_every=12"];

fn safetensors_shapes(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u64>> {
    let bytes = read(path);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            (
                k.clone(),
                v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect(),
            )
        })
        .collect()
}

#[test]
fn token_choice_moe_trains_and_reports_routing() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(&cfg, "moe", &MOE).ok();
    let run = f.run_dir("moe");
    let lines = train_lines(&run);
    for l in &lines {
        let routing = l["routing"].as_array().unwrap_or_else(|| panic!("no routing stats in {l}"));
        assert_eq!(routing.len(), 2, "one entry per MoE layer");
        for r in routing {
            let load: Vec<f64> =
                r["load"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(load.len(), 4);
            let dropped = r["dropped"].as_f64().unwrap();
            assert!(
                (load.iter().sum::<f64>() + dropped - 1.0).abs() < 1e-9,
                "load + dropped must cover every slot: {r}"
            );
            assert!(
                r["entropy"].as_f64().unwrap() > 0.0
                    && r["aux_loss"].as_f64().unwrap() > 0.0
                    && r["z_loss"].as_f64().unwrap() > 0.0
            );
        }
    }
    let shapes = safetensors_shapes(&latest(&run).unwrap().1.join("model.safetensors"));
    assert_eq!(shapes["model.layers.1.mlp.router.weight"], vec![4, 32]);
    assert_eq!(shapes["model.layers.1.mlp.experts.gate"], vec![4, 64, 32]);
    assert_eq!(shapes["model.layers.1.mlp.experts.up"], vec![4, 64, 32]);
    assert_eq!(shapes["model.layers.1.mlp.experts.down"], vec![4, 32, 64]);
    assert!(!shapes.contains_key("model.layers.0.mlp.up_proj.weight"));

    let out = f.run(&["eval", "--checkpoint", run.to_str().unwrap()]).ok();
    let j = out.last_json();
    let routing = j["routing"].as_array().unwrap();
    assert_eq!(routing.len(), 2);
    assert_eq!(routing[0]["dropped"], 0.0, "eval is dropless");
    let cos = routing[0]["token_cosine"].as_f64().unwrap();
    assert!(cos > -1.0 && cos < 1.0 && cos != 0.0, "token cosine {cos}");
    assert!(
        out.stderr.contains("load per expert"),
        "eval prints a routing table on stderr:\n{}",
        out.stderr
    );
}

#[test]
fn expert_choice_and_xmoe_train() {
    let f = Fixture::new();
    let cfg = f.config();
    f.train(
        &cfg,
        "ec",
        &[
            &MOE[..],
            &[
                "model.moe.routing=expert_choice",
                "model.moe.group_size=2",
                "model.moe.capacity_factor=2.0",
            ],
        ]
        .concat(),
    )
    .ok();
    // Hugging Face has no expert-choice MoE: export refuses it, naming the setting as written.
    let out = f.run(&[
        "export",
        "--checkpoint",
        f.run_dir("ec").to_str().unwrap(),
        "--out",
        f.runs().join("ec-hf").to_str().unwrap(),
    ]);
    assert_bad_input(&out, &["`model.moe.routing` = \"expert_choice\""]);
    assert!(!f.runs().join("ec-hf").exists(), "a refused export wrote its --out");
    let run = f.run_dir("xmoe");
    f.train(
        &cfg,
        "xmoe",
        &[&MOE[..], &["model.moe.router=xmoe", "model.moe.xmoe_dim=8", "model.ffn_layers=[1]"]]
            .concat(),
    )
    .ok();
    let shapes = safetensors_shapes(&latest(&run).unwrap().1.join("model.safetensors"));
    assert_eq!(shapes["model.layers.1.mlp.router.proj.weight"], vec![8, 32]);
    assert_eq!(shapes["model.layers.1.mlp.router.expert_embeddings"], vec![4, 8]);
    assert_eq!(shapes["model.layers.1.mlp.router.log_temperature"], Vec::<u64>::new());
    assert_eq!(
        shapes["model.layers.0.mlp.up_proj.weight"],
        vec![64, 32],
        "block 0 keeps its dense FFN"
    );
}

#[test]
fn moe_resume_is_exact() {
    let f = Fixture::new();
    let cfg = f.config();
    let sets = [
        "model.ffn=moe",
        "model.moe.n_experts=4",
        "model.moe.top_k=2",
        "model.moe.capacity_factor=1.0",
        "train.steps=10",
        "train.ckpt_every=5",
        "train.schedule=constant",
    ];
    f.train(&cfg, "a", &sets).ok();
    f.train(&cfg, "b", &[&sets[..], &["train.steps=5"]].concat()).ok();
    f.train(&cfg, "b", &[&sets[..], &["--resume"]].concat()).ok();
    assert_eq!(losses(&f.run_dir("a")), losses(&f.run_dir("b")));
}

#[test]
fn bad_moe_settings_are_refused() {
    let f = Fixture::new();
    let cfg = f.config();
    let out = f.train(&cfg, "x", &["model.ffn=moe", "model.moe.n_experts=2", "model.moe.top_k=3"]);
    assert_bad_input(&out, &["top_k", "n_experts"]);
    let out = f.train(
        &cfg,
        "x",
        &["model.ffn=moe", "model.moe.routing=expert_choice", "model.moe.group_size=3"],
    );
    assert_bad_input(&out, &["group_size", "micro_batch_size"]);
    let out = f.train(&cfg, "x", &["model.ffn=moe", "model.moe.gate=sparse"]);
    assert_bad_input(&out, &["model.moe.gate"]);
}
