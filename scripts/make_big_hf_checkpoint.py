#!/usr/bin/env python3
"""Writes a random Llama-architecture Hugging Face checkpoint of about --params parameters, in
bfloat16, sharded, for the memory benchmark of `motrain import --hf`:

    python scripts/make_big_hf_checkpoint.py OUT_DIR [--params 1e9] [--shard-mb 500] [--seed 0]

OUT_DIR gets config.json (LlamaForCausalLM, untied, torch_dtype bfloat16), model-0000K-of-0000N
.safetensors shards of at most --shard-mb MB (one tensor larger than that gets a shard of its
own) and model.safetensors.index.json (metadata.total_size in bytes, weight_map). Tensor names,
shapes and order are those of transformers' LlamaForCausalLM.state_dict().

No transformers model is built: each tensor is drawn with torch (randn * 0.02, norms ones),
seeded per tensor (so the values do not depend on the sharding), in chunks straight into
bfloat16, and written one shard at a time, so memory stays near one shard (plus safetensors'
serialisation buffer). Needs only torch and safetensors.

The shape: vocab --vocab (32000), head_dim 64, num_key_value_heads = heads / 4, intermediate
size 2.75 x hidden rounded up to 256 (as Llama's 2048 -> 5632), and the hidden size (a multiple
of 256) and layer count that land within 3% of --params with about 128 hidden units per layer,
else the closest count (1e9 -> hidden 2048, 19 layers, 32 heads, 8 kv heads: 0.988e9).
--hidden / --layers / --intermediate override the choice.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from safetensors.torch import save_file

HEAD_DIM = 64


def dims_for(hidden, vocab, layers=None, intermediate=None):
    heads = hidden // HEAD_DIM
    kv = max(1, heads // 4)
    while heads % kv:  # only with a --hidden that is not a multiple of 256
        kv -= 1
    f = intermediate or 256 * math.ceil(2.75 * hidden / 256)
    return dict(hidden=hidden, heads=heads, kv=kv, intermediate=f, vocab=vocab, layers=layers)


def per_layer(d):
    h, kvd, f = d["hidden"], d["kv"] * HEAD_DIM, d["intermediate"]
    return 2 * h * h + 2 * h * kvd + 3 * h * f + 2 * h


def count(d):
    return 2 * d["vocab"] * d["hidden"] + d["hidden"] + d["layers"] * per_layer(d)


def choose(n, vocab, hidden=None, layers=None, intermediate=None):
    best = None
    for h in ([hidden] if hidden else range(4 * HEAD_DIM, 16384 + 1, 4 * HEAD_DIM)):
        d = dims_for(h, vocab, layers, intermediate)
        if layers is None:
            fixed = 2 * vocab * h + h
            d["layers"] = max(1, round((n - fixed) / per_layer(d)))
        err = abs(math.log(count(d) / n))
        shape = abs(math.log((h / d["layers"]) / 128.0))
        # within 3% of the target, the most Llama-like aspect; otherwise the closest count
        score = (0 if err < 0.03 else 1, shape if err < 0.03 else err)
        if best is None or score < best[0]:
            best = (score, d)
    return best[1]


def tensor_specs(d):
    """(name, shape, kind) in LlamaForCausalLM.state_dict() order."""
    h, f, v = d["hidden"], d["intermediate"], d["vocab"]
    q, kv = d["heads"] * HEAD_DIM, d["kv"] * HEAD_DIM
    out = [("model.embed_tokens.weight", (v, h), "w")]
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (q, h), "w"),
                (p + "self_attn.k_proj.weight", (kv, h), "w"),
                (p + "self_attn.v_proj.weight", (kv, h), "w"),
                (p + "self_attn.o_proj.weight", (h, q), "w"),
                (p + "mlp.gate_proj.weight", (f, h), "w"),
                (p + "mlp.up_proj.weight", (f, h), "w"),
                (p + "mlp.down_proj.weight", (h, f), "w"),
                (p + "input_layernorm.weight", (h,), "norm"),
                (p + "post_attention_layernorm.weight", (h,), "norm")]
    out += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "w")]
    return out


def make_tensor(shape, kind, seed, chunk=1 << 24):
    if kind == "norm":
        return torch.ones(shape, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    t = torch.empty(shape, dtype=torch.bfloat16)
    flat = t.view(-1)
    for s in range(0, flat.numel(), chunk):
        e = min(s + chunk, flat.numel())
        flat[s:e] = (torch.randn(e - s, generator=gen) * 0.02).to(torch.bfloat16)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--params", type=float, default=1e9, help="target parameter count (default 1e9)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, help="hidden size (a multiple of 64); default: chosen")
    ap.add_argument("--layers", type=int, help="default: chosen")
    ap.add_argument("--intermediate", type=int, help="default: 2.75 x hidden rounded up to 256")
    ap.add_argument("--shard-mb", type=float, default=500.0, help="shard size limit in MB (1e6 bytes)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.hidden is not None and (a.hidden <= 0 or a.hidden % HEAD_DIM):
        sys.exit(f"--hidden must be a positive multiple of {HEAD_DIM}")
    if a.params <= 0 or a.vocab <= 0 or a.shard_mb <= 0:
        sys.exit("--params, --vocab and --shard-mb must be positive")

    d = choose(a.params, a.vocab, a.hidden, a.layers, a.intermediate)
    specs = tensor_specs(d)
    n_params = sum(math.prod(s) for _, s, _ in specs)
    assert n_params == count(d)

    # Plan the shards first (the file names need their count).
    limit = int(a.shard_mb * 1e6)
    shards, cur, cur_bytes = [], [], 0
    for i, (name, shape, kind) in enumerate(specs):
        nbytes = math.prod(shape) * 2
        if cur and cur_bytes + nbytes > limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += nbytes
    shards.append(cur)
    n = len(shards)

    os.makedirs(a.out_dir, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": d["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": d["intermediate"],
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": d["heads"],
        "num_hidden_layers": d["layers"],
        "num_key_value_heads": d["kv"],
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": d["vocab"],
    }
    with open(os.path.join(a.out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"hidden {d['hidden']}, {d['layers']} layers, {d['heads']} heads ({d['kv']} kv), intermediate "
          f"{d['intermediate']}, vocab {d['vocab']}: {n_params:,} parameters, {n_params * 2 / 1e9:.2f} GB "
          f"bf16 in {n} shard(s)", flush=True)

    weight_map, t0 = {}, time.time()
    for k, idx in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for i in idx:
            name, shape, kind = specs[i]
            tensors[name] = make_tensor(shape, kind, a.seed * 1_000_003 + i)
            weight_map[name] = fn
        save_file(tensors, os.path.join(a.out_dir, fn), metadata={"format": "pt"})
        size = sum(t.numel() * 2 for t in tensors.values())
        del tensors
        print(f"  {fn}: {len(idx)} tensors, {size / 1e6:.1f} MB ({time.time() - t0:.0f} s)", flush=True)

    index = {"metadata": {"total_parameters": n_params, "total_size": n_params * 2},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(a.out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
