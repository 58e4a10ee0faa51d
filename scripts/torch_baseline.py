#!/usr/bin/env python3
"""PyTorch reference of motrain's transformer (dense FFN, token-choice MoE or Mixture of Tokens) and training step.

Two jobs:
  * bench: time training steps of the same model (dense, `model.ffn = "moe"` or "mot") on the same data, to compare
    motrain's tokens/s with PyTorch (CPU by default);
  * eval:  load a motrain checkpoint (model.safetensors, HF-Llama names) and compute the eval
    loss with the deterministic protocol of shared/spec/product.md, to cross-check motrain's
    numbers (optionally in float64).
and a helper for tests:
  * make-checkpoint: build (and optionally train) a model and write it as a motrain run
    directory (config.toml, checkpoints/step-N/{model.safetensors,state.json}, latest).

Usage:
  python scripts/torch_baseline.py bench --config configs/bench-dense.toml \
      [--set key=value ...] [--steps N] [--warmup W] [--threads T] [--adamw fused|foreach|forloop] \
      [--autocast none|bf16]
  python scripts/torch_baseline.py eval --checkpoint RUN_OR_CKPT_DIR [--data GLOB] \
      [--batches N] [--batch-size B] [--group-size G] [--dtype f32|f64] [--threads T]
  python scripts/torch_baseline.py make-checkpoint --config FILE [--set ...] --out RUN_DIR \
      [--train-steps N] [--dtype f32|f64]

The last stdout line of bench and eval is one JSON object; progress goes to stderr.
Errors: one line on stderr starting with `error:`; exit 2 for bad usage/config/input, 1 otherwise.

Dependencies: Python >= 3.11 (tomllib), torch, numpy, safetensors.

Notes:
  * bench times full optimizer steps: for each micro batch (train.batch_size /
    train.micro_batch_size of them) draw windows at random offsets, forward, mean token CE,
    backward; then global-norm clipping, AdamW (weight decay only on tensors of >= 2 dims,
    lr from the config's schedule), zero_grad(set_to_none=True). Default AdamW implementation:
    fused (fastest on CPU: ~7 ms per optimizer step on bench-dense against ~30 ms for
    foreach/for-loop, torch 2.15, 2 cores).
  * bench --autocast bf16 (CPU or CUDA): forward and loss under torch.autocast(device,
    dtype=torch.bfloat16) -- matmuls in bf16, the log-softmax/CE in f32 -- while the master
    weights, gradients and AdamW state stay f32 (mixed precision, not a bf16 model). The JSON
    then says "autocast": "bf16"; "peak_rss_bytes" is getrusage's ru_maxrss of this process.
    `run.dtype` = "bf16" in a config means the same thing and needs CUDA.
  * With OpenMP, PyTorch degrades badly when another process competes for the cores
    (e.g. 2 threads on a 2-core machine during a cargo build); benchmark on an idle machine.
  * Model: `model.ffn` = "dense", "moe" or "mot" (in the blocks of `model.ffn_layers`, the others
    keep the dense FFN; PESC is refused with exit 2). MoT follows models.md and motrain's tensor
    names: rows [kG, kG+G) of a batch at one position form a group; x [B, S, d] is viewed as
    [K, G, S, d], the controller logits z = x C^T are divided by T (`temperature`, or
    exp(`log_temperature`)) and softmaxed over the G axis per expert (in f32 under autocast);
    merge and emit are einsums and the experts batched matmuls over the stacked weights
    [E, f, d] / [E, d, f]. The batch (micro and eval) must be a multiple of G; eval groups exactly
    as motrain eval does (consecutive rows of each eval batch; --group-size G overrides the
    trained group size, like motrain's flag).
  * MoE follows models.md ("Sparse MoE, token choice") and motrain's src/model/{moe,router,experts}.rs
    and tensor names (mlp.router.weight [E, d], mlp.experts.{gate,up,down} [E, f, d] / [E, d, f],
    f = `expert_size` or d_ff; with `shared_expert_size` > 0 also Qwen2-MoE's mlp.shared_expert.*
    and mlp.shared_expert_gate.weight [1, d], out += sigmoid(x g^T) * FFN_shared(x)). Only
    `routing = "token_choice"` with `router = "linear"`: expert choice and the X-MoE router are
    refused with exit 2. The forward: router logits z = x R^T and p = softmax(z) in f32 (autocast
    off, as motrain); each of the B*S tokens (flattened b*S + s) picks its top_k experts by p, ties
    to the lower expert index (a stable descending sort; torch.topk does not promise an order
    for ties), decided on f32 probabilities like motrain's host code (also under --dtype f64);
    gate p_e (`softmax`, Switch) or p_e over the sum of the chosen p (`softmax_topk`, Mixtral). In
    training with capacity_factor > 0 each expert takes at most C = max(1, floor(cf * N * top_k /
    E)) slots, granted rank-major (every token's first choice in token order, then every second
    choice, ...); a dropped choice adds nothing and the kept gates are not renormalised. Eval
    (model.eval()) is dropless, as motrain eval. Then per expert: index its tokens, two or three
    matmuls on its slice of the stacked weights, scale by the gates, index_add back (tokens
    without a slot get zeros; the residual carries them). Training adds motrain's auxiliary
    losses to the CE: aux_loss_weight * mean over MoE layers of the Switch loss E * sum_e frac_e *
    mean_p_e (frac_e: share of tokens whose choice includes e, before dropping) plus
    z_loss_weight * mean over layers of mean(logsumexp(z)^2); bench reports the CE, as motrain
    logs it. Checked on small motrain MoE checkpoints (top_k 1-3, both gates, capacity 0/1/1.25,
    swiglu/gelu/relu, ffn_layers subsets, a shared expert, router rows made to tie exactly):
    eval loss within 2e-8 relative of `motrain eval` (f32 and f64) with the same per-expert
    loads; in training mode (motrain's step-1 record of `train --init-from` on a one-window
    shard) the same dropped shares and loads, CE within f32 rounding, aux/z within 5e-7 and the
    gradient norm of CE + aux + z within 3e-8 relative.
  * RoPE follows HF Llama exactly: inv_freq, angles and cos/sin in f32, even with --dtype f64
    (f64 then applies only to everything else). Verified against transformers'
    LlamaForCausalLM (max |logit diff| 5e-7 in f32).
"""

from __future__ import annotations

import argparse
import copy
import glob as globmod
import json
import math
import os
import resource
import sys
import time
import tomllib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class UsageError(Exception):
    """Bad usage, config or input file: exit code 2."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Config: the schema and defaults of product.md
# --------------------------------------------------------------------------------------------

REQUIRED = object()

DEFAULTS = {
    "run": {
        "name": REQUIRED,
        "out_dir": "runs",
        "seed": 0,
        "device": "auto",
        "dtype": "f32",
    },
    "data": {
        "train": REQUIRED,
        "val": None,
        "format": "llmc",
        "seq_len": 128,
        "tokenizer": None,  # motrain extension: the tokenizer that made the shards
    },
    "model": {
        "vocab_size": REQUIRED,
        "d_model": 128,
        "n_layers": 4,
        "n_heads": 4,
        "d_ff": 512,
        "norm": "rmsnorm",
        "position": "rope",
        "max_seq_len": 0,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "activation": "swiglu",
        "bias": "none",
        "tie_embeddings": False,
        "final_norm": True,
        "init_scale": 0.1,
        "ffn": "dense",
        "ffn_layers": "all",
        "mot": {
            "n_experts": 32,
            "group_size": 32,
            "expert_size": 0,
            "temperature": 1.0,
            "learn_temperature": False,
        },
        "moe": {
            "routing": "token_choice",
            "router": "linear",
            "n_experts": 8,
            "top_k": 1,
            "expert_size": 0,
            "shared_expert_size": 0,
            "gate": "softmax",
            "capacity_factor": 1.25,
            "group_size": 32,
            "aux_loss_weight": 0.01,
            "z_loss_weight": 0.001,
            "xmoe_dim": 16,
            "xmoe_temperature": 0.07,
        },
        "pesc": {
            "n_experts": 8,
            "top_k": 2,
            "adapter_dim": 64,
            "adapter_scale": 1.0,
            "adapter_dropout": 0.0,
            "aux_loss_weight": 0.01,
            "z_loss_weight": 0.0,
            "train_only_adapters": True,
        },
    },
    "train": {
        "batch_size": 32,
        "micro_batch_size": 0,
        "steps": 1000,
        "lr": 1e-3,
        "min_lr_ratio": 0.1,
        "warmup_steps": 100,
        "schedule": "cosine",
        "weight_decay": 0.1,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "grad_clip": 1.0,
        "log_every": 10,
        "eval_every": 200,
        "eval_batches": 20,
        "eval_batch_size": 0,
        "ckpt_every": 500,
        "keep_checkpoints": 3,
    },
}

DATA_PATH_KEYS = ("train", "val", "tokenizer")


def _merge(defaults: dict, given: dict, where: str, strict: bool) -> dict:
    out = {}
    for key, value in given.items():
        if key not in defaults:
            msg = f"unknown key `{key}` in table [{where}]; valid keys: {', '.join(defaults)}"
            if strict:
                raise UsageError(msg)
            log(f"warning: {msg} (ignored)")
    for key, default in defaults.items():
        path = f"{where}.{key}"
        if isinstance(default, dict):
            sub = given.get(key, {})
            if not isinstance(sub, dict):
                raise UsageError(f"`{path}` must be a table")
            out[key] = _merge(default, sub, path, strict)
        elif key in given:
            out[key] = given[key]
        elif default is REQUIRED:
            raise UsageError(f"missing required key `{path}`")
        else:
            out[key] = copy.deepcopy(default)
    return out


def merge_defaults(given: dict, origin: str, strict: bool = True) -> dict:
    for key in given:
        if key not in DEFAULTS:
            msg = f"{origin}: unknown table [{key}]; valid tables: {', '.join(DEFAULTS)}"
            if strict:
                raise UsageError(msg)
            log(f"warning: {msg} (ignored)")
    cfg = {}
    for table, defaults in DEFAULTS.items():
        sub = given.get(table, {})
        if not isinstance(sub, dict):
            raise UsageError(f"{origin}: `{table}` must be a table")
        try:
            cfg[table] = _merge(defaults, sub, table, strict)
        except UsageError as e:
            raise UsageError(f"{origin}: {e}") from None
    return cfg


def parse_set_value(raw: str):
    """`--set` values are TOML; a bare word is a string."""
    raw = raw.strip()
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def apply_override(table: dict, arg: str) -> None:
    if "=" not in arg:
        raise UsageError(f"--set {arg}: expected KEY=VALUE, e.g. model.d_model=256")
    key, raw = arg.split("=", 1)
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise UsageError(f"--set {arg}: `{key}` is not a dotted key path")
    value = parse_set_value(raw)
    # Paths given on the command line are relative to the current directory.
    if len(parts) == 2 and parts[0] == "data" and parts[1] in DATA_PATH_KEYS and isinstance(value, str):
        if not (parts[1] == "tokenizer" and value == "gpt2"):
            value = os.path.abspath(value)
    t = table
    for p in parts[:-1]:
        t = t.setdefault(p, {})
        if not isinstance(t, dict):
            raise UsageError(f"--set {arg}: `{p}` is a value, not a table")
    t[parts[-1]] = value


def anchor_data_paths(table: dict, base: str) -> None:
    data = table.get("data")
    if not isinstance(data, dict):
        return
    for key in DATA_PATH_KEYS:
        v = data.get(key)
        if isinstance(v, str) and not (key == "tokenizer" and v == "gpt2"):
            data[key] = os.path.abspath(os.path.join(base, v))


def resolve_and_validate(cfg: dict, origin: str) -> dict:
    m, t, d = cfg["model"], cfg["train"], cfg["data"]

    def bad(msg):
        raise UsageError(f"{origin}: {msg}")

    def want_int(path, v, lo=1):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            bad(f"`{path}` must be an integer >= {lo}, got {v!r}")

    def want_num(path, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            bad(f"`{path}` must be a number, got {v!r}")

    def want_choice(path, v, choices):
        if v not in choices:
            bad(f"`{path}` = {v!r}: expected one of {', '.join(choices)}")

    for key in ("seq_len",):
        want_int(f"data.{key}", d[key])
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
        want_int(f"model.{key}", m[key])
    want_int("model.max_seq_len", m["max_seq_len"], 0)
    for key in ("batch_size",):
        want_int(f"train.{key}", t[key])
    for key in ("micro_batch_size", "eval_batch_size", "eval_batches", "steps", "warmup_steps"):
        want_int(f"train.{key}", t[key], 0)
    for key in ("rope_theta", "norm_eps", "init_scale"):
        want_num(f"model.{key}", m[key])
    for key in ("lr", "min_lr_ratio", "weight_decay", "eps", "grad_clip"):
        want_num(f"train.{key}", t[key])
    if not (isinstance(t["betas"], list) and len(t["betas"]) == 2):
        bad(f"`train.betas` must be a list of two numbers, got {t['betas']!r}")
    want_choice("data.format", d["format"], ("llmc", "nanogpt"))
    want_choice("model.norm", m["norm"], ("rmsnorm", "layernorm"))
    want_choice("model.position", m["position"], ("rope", "learned"))
    want_choice("model.activation", m["activation"], ("swiglu", "gelu", "relu"))
    want_choice("model.bias", m["bias"], ("none", "ffn", "all"))
    want_choice("model.ffn", m["ffn"], ("dense", "moe", "mot", "pesc"))
    want_choice("train.schedule", t["schedule"], ("cosine", "linear", "constant", "wsd"))
    want_choice("run.dtype", cfg["run"]["dtype"], ("f32", "bf16"))
    if m["ffn"] not in ("dense", "moe", "mot"):
        bad(f"`model.ffn` = {m['ffn']!r}: this PyTorch baseline only implements the dense FFN, token-choice MoE and Mixture of Tokens; "
            f"expected \"dense\", \"moe\" or \"mot\"")
    try:
        ffn_layer_mask(m)
    except ValueError as e:
        bad(str(e))
    if m["d_model"] % m["n_heads"]:
        bad(f"`model.d_model` ({m['d_model']}) must be divisible by `model.n_heads` ({m['n_heads']})")
    if m["position"] == "rope" and (m["d_model"] // m["n_heads"]) % 2:
        bad(f"rope needs an even head width, got d_model/n_heads = {m['d_model'] // m['n_heads']}")
    if m["max_seq_len"] == 0:
        m["max_seq_len"] = d["seq_len"]
    if d["seq_len"] > m["max_seq_len"]:
        bad(f"`data.seq_len` ({d['seq_len']}) exceeds `model.max_seq_len` ({m['max_seq_len']})")
    if t["micro_batch_size"] == 0:
        t["micro_batch_size"] = t["batch_size"]
    if t["batch_size"] % t["micro_batch_size"]:
        bad(f"`train.batch_size` ({t['batch_size']}) must be a multiple of `train.micro_batch_size` ({t['micro_batch_size']})")
    if t["eval_batch_size"] == 0:
        t["eval_batch_size"] = t["micro_batch_size"]
    if m["ffn"] == "mot":
        mot = m["mot"]
        want_int("model.mot.n_experts", mot["n_experts"])
        want_int("model.mot.group_size", mot["group_size"])
        want_int("model.mot.expert_size", mot["expert_size"], 0)
        want_num("model.mot.temperature", mot["temperature"])
        if not (mot["temperature"] > 0 and math.isfinite(mot["temperature"])):
            bad(f"`model.mot.temperature` must be > 0, got {mot['temperature']}")
        if not isinstance(mot["learn_temperature"], bool):
            bad(f"`model.mot.learn_temperature` must be true or false, got {mot['learn_temperature']!r}")
        if mot["expert_size"] == 0 and m["d_ff"] * mot["group_size"] < mot["n_experts"]:
            bad(f"the FLOP-matched expert width d_ff*group_size/n_experts = {m['d_ff']}*{mot['group_size']}/{mot['n_experts']} "
                f"rounds to 0: set `model.mot.expert_size`")
        g = mot["group_size"]
        for key in ("micro_batch_size", "eval_batch_size"):
            if t[key] % g:
                bad(f"Mixture of Tokens mixes `model.mot.group_size` = {g} sequences at one position, "
                    f"so `train.{key}` ({t[key]}) must be a multiple of it")
    if m["ffn"] == "moe":
        moe = m["moe"]
        want_choice("model.moe.routing", moe["routing"], ("token_choice", "expert_choice"))
        want_choice("model.moe.router", moe["router"], ("linear", "xmoe"))
        want_choice("model.moe.gate", moe["gate"], ("softmax", "softmax_topk"))
        if moe["routing"] != "token_choice":
            bad(f"`model.moe.routing` = {moe['routing']!r}: this PyTorch baseline only implements token-choice routing")
        if moe["router"] != "linear":
            bad(f"`model.moe.router` = {moe['router']!r}: this PyTorch baseline only implements the linear router")
        want_int("model.moe.n_experts", moe["n_experts"])
        want_int("model.moe.top_k", moe["top_k"])
        if moe["top_k"] > moe["n_experts"]:
            bad(f"`model.moe.top_k` ({moe['top_k']}) must be between 1 and `model.moe.n_experts` ({moe['n_experts']})")
        want_int("model.moe.expert_size", moe["expert_size"], 0)
        want_int("model.moe.shared_expert_size", moe["shared_expert_size"], 0)
        for key in ("capacity_factor", "aux_loss_weight", "z_loss_weight"):
            want_num(f"model.moe.{key}", moe[key])
            if not (moe[key] >= 0 and math.isfinite(moe[key])):
                bad(f"`model.moe.{key}` must be >= 0{' (0 = dropless)' if key == 'capacity_factor' else ''}, got {moe[key]}")
    return cfg


def ffn_layer_mask(m: dict) -> list[bool]:
    """For each block, whether it gets `model.ffn` (True) or keeps a dense FFN (`model.ffn_layers`:
    "all", "second_half" = blocks n/2.., or a list of block indices)."""
    n, spec = m["n_layers"], m["ffn_layers"]
    if spec == "all":
        return [True] * n
    if spec == "second_half":
        return [i >= n // 2 for i in range(n)]
    if isinstance(spec, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in spec):
        mask = [False] * n
        for i in spec:
            if i >= n:
                raise ValueError(f"`model.ffn_layers` names block {i}, but the model has {n} blocks (0..{n - 1})")
            mask[i] = True
        return mask
    raise ValueError(f"`model.ffn_layers` = {spec!r}: expected \"all\", \"second_half\" or a list of block indices")


def mot_expert_width(m: dict) -> int:
    """MoT expert width f: `mot.expert_size`, or FLOP-matched d_ff * G / E (integer division)."""
    mot = m["mot"]
    return mot["expert_size"] or m["d_ff"] * mot["group_size"] // max(mot["n_experts"], 1)


def moe_expert_width(m: dict) -> int:
    """MoE expert width f: `moe.expert_size`, or d_ff."""
    return m["moe"]["expert_size"] or m["d_ff"]


def load_config_file(path: str, overrides: list[str]) -> dict:
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: malformed TOML: {e}") from None
    anchor_data_paths(table, os.path.dirname(os.path.abspath(path)))
    for arg in overrides:
        apply_override(table, arg)
    cfg = merge_defaults(table, path, strict=True)
    return resolve_and_validate(cfg, path)


# --------------------------------------------------------------------------------------------
# Shards (llm.c format, or headerless nanoGPT uint16)
# --------------------------------------------------------------------------------------------

MAGIC_U16, VERSION_U16 = 20240520, 1
MAGIC_U32, VERSION_U32 = 20240801, 7


def open_shard(path: str, fmt: str) -> np.ndarray:
    size = os.path.getsize(path)
    if fmt == "nanogpt":
        if size % 2:
            raise UsageError(f"{path}: a nanoGPT shard holds uint16 tokens, but its size ({size}) is odd")
        return np.memmap(path, dtype=np.uint16, mode="r")
    if size < 1024:
        raise UsageError(f"{path}: too small for an llm.c shard (needs a 1024-byte header)")
    header = np.fromfile(path, dtype="<i4", count=256)
    magic, version, count = int(header[0]), int(header[1]), int(header[2])
    if (magic, version) == (MAGIC_U16, VERSION_U16):
        dtype, width = np.dtype("<u2"), 2
    elif (magic, version) == (MAGIC_U32, VERSION_U32):
        dtype, width = np.dtype("<u4"), 4
    else:
        raise UsageError(
            f"{path}: not an llm.c shard (magic {magic}, version {version}; expected "
            f"{MAGIC_U16}/{VERSION_U16} for uint16 or {MAGIC_U32}/{VERSION_U32} for uint32)"
        )
    if size != 1024 + count * width:
        raise UsageError(f"{path}: header says {count} tokens of {width} bytes, but the file has {size} bytes (expected {1024 + count * width})")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=1024, shape=(count,))


def shard_paths(pattern: str, what: str) -> list[str]:
    paths = sorted(globmod.glob(pattern))
    if not paths:
        raise UsageError(f"{what}: no shard matches {pattern!r}")
    return paths


def check_vocab(tokens: np.ndarray, vocab: int, where: str) -> None:
    if tokens.size and int(tokens.max()) >= vocab:
        raise UsageError(f"{where}: token id {int(tokens.max())} is not below `model.vocab_size` ({vocab})")


class TrainWindows:
    """Windows of seq_len+1 tokens at random offsets from the train shards (seeded)."""

    def __init__(self, pattern: str, fmt: str, seq_len: int, vocab: int, seed: int):
        self.shards = []
        for p in shard_paths(pattern, "data.train"):
            toks = open_shard(p, fmt)
            check_vocab(toks, vocab, p)
            if toks.size >= seq_len + 1:
                self.shards.append(toks)
        if not self.shards:
            raise UsageError(f"data.train: no shard matching {pattern!r} holds seq_len+1 = {seq_len + 1} tokens")
        self.seq_len = seq_len
        counts = np.array([s.size - seq_len for s in self.shards], dtype=np.float64)
        self.weights = counts / counts.sum()
        self.rng = np.random.default_rng(seed)

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        S = self.seq_len
        buf = np.empty((b, S + 1), dtype=np.int64)
        which = self.rng.choice(len(self.shards), size=b, p=self.weights)
        for i, k in enumerate(which):
            shard = self.shards[k]
            off = int(self.rng.integers(0, shard.size - S))  # inclusive start range [0, n-S-1]
            buf[i] = shard[off:off + S + 1]
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]


def eval_stream(pattern: str, fmt: str, seq_len: int, batch_size: int, batches: int, vocab: int):
    """Yields (inputs, targets) for the first `batches` full batches of the deterministic protocol:
    val shards sorted, one token stream, window k = tokens k*S .. k*S+S (inclusive)."""
    S = seq_len
    paths = shard_paths(pattern, "data.val")
    shards = [open_shard(p, fmt) for p in paths]
    total = sum(s.size for s in shards)
    n_windows = (total - 1) // S if total > 0 else 0
    available = n_windows // batch_size
    if available == 0:
        raise UsageError(
            f"data.val: {total} tokens in {len(paths)} shard(s) do not make one full batch of "
            f"{batch_size} windows of {S}+1 tokens"
        )
    if batches > available:
        log(f"note: only {available} full eval batches available (asked for {batches})")
    n = min(batches, available)
    need = n * batch_size * S + 1
    parts, got = [], 0
    for p, s in zip(paths, shards):
        if got >= need:
            break
        take = min(s.size, need - got)
        part = np.asarray(s[:take], dtype=np.int64)
        check_vocab(part, vocab, p)
        parts.append(part)
        got += take
    stream = np.concatenate(parts)
    for bi in range(n):
        base = bi * batch_size * S
        idx = base + np.arange(batch_size)[:, None] * S + np.arange(S + 1)[None, :]
        w = torch.from_numpy(stream[idx])
        yield w[:, :-1], w[:, 1:]


# --------------------------------------------------------------------------------------------
# Model (parameter names = motrain's safetensors names, HF Llama layout)
# --------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        # HF Llama: weight * (x * rsqrt(mean(x^2) + eps)), computed in at least f32.
        dt = x.dtype
        h = x.float() if dt in (torch.float16, torch.bfloat16) else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def make_norm(m: dict) -> nn.Module:
    return RMSNorm(m["d_model"], m["norm_eps"]) if m["norm"] == "rmsnorm" else LayerNorm(m["d_model"], m["norm_eps"])


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly HF Llama's default rotary embedding: inv_freq = 1/theta^(2i/dh) in f32, positions
    times inv_freq in f32, cos/sin of cat(freqs, freqs) in f32 (cast to the model dtype later)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Attention(nn.Module):
    def __init__(self, m: dict):
        super().__init__()
        d, bias = m["d_model"], m["bias"] == "all"
        self.n_heads = m["n_heads"]
        self.head_dim = d // self.n_heads
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x, rope):
        B, S, d = x.shape
        H, dh = self.n_heads, self.head_dim
        # head h owns rows [h*dh, (h+1)*dh) of q/k/v_proj
        q = self.q_proj(x).view(B, S, H, dh).transpose(1, 2)
        k = self.k_proj(x).view(B, S, H, dh).transpose(1, 2)
        v = self.v_proj(x).view(B, S, H, dh).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            cos, sin = cos[:S].to(q.dtype), sin[:S].to(q.dtype)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        # causal, scale 1/sqrt(dh) (SDPA default)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, d))


class DenseFFN(nn.Module):
    def __init__(self, m: dict, width: int | None = None, bias: bool | None = None):
        super().__init__()
        d, f = m["d_model"], width or m["d_ff"]
        bias = m["bias"] in ("ffn", "all") if bias is None else bias
        self.activation = m["activation"]
        if self.activation == "swiglu":
            self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        if self.activation == "swiglu":
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.activation == "gelu":
            h = F.gelu(self.up_proj(x))  # exact erf form
        else:
            h = F.relu(self.up_proj(x))
        return self.down_proj(h)


def activate(h: torch.Tensor, activation: str, u: torch.Tensor | None = None) -> torch.Tensor:
    """swiglu: silu(h) * u (h the gate); gelu (exact erf form) / relu: act(h)."""
    if activation == "swiglu":
        return F.silu(h) * u
    return F.gelu(h) if activation == "gelu" else F.relu(h)


class Experts(nn.Module):
    """E FFNs of width f with stacked weights (motrain's `mlp.experts.{gate,up,down}`):
    gate, up [E, f, d] (gate only for swiglu), down [E, d, f]; no biases."""

    def __init__(self, e: int, d: int, f: int, activation: str):
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.gate = nn.Parameter(torch.empty(e, f, d))
        self.up = nn.Parameter(torch.empty(e, f, d))
        self.down = nn.Parameter(torch.empty(e, d, f))

    def forward(self, x):
        """x [E, N, d] (expert e's N rows) -> [E, N, d]: batched matmuls over the experts."""
        u = torch.bmm(x, self.up.transpose(1, 2))  # [E, N, f]
        if self.activation == "swiglu":
            h = activate(torch.bmm(x, self.gate.transpose(1, 2)), "swiglu", u)
        else:
            h = activate(u, self.activation)
        return torch.bmm(h, self.down.transpose(1, 2))

    def unbound(self) -> list[tuple]:
        """Each expert's (gate or None, up, down) weights, for running the experts one by one (MoE).
        One unbind per stacked tensor, so backward stacks the experts' gradients once (indexing
        expert by expert would add E zero-padded full-size gradients)."""
        gate = self.gate.unbind(0) if self.activation == "swiglu" else [None] * self.up.shape[0]
        return list(zip(gate, self.up.unbind(0), self.down.unbind(0)))

    def expert(self, w: tuple, x):
        """One expert (weights `w` from unbound()) on its rows x [n, d] -> [n, d]."""
        gate, up, down = w
        u = F.linear(x, up)
        h = activate(F.linear(x, gate), "swiglu", u) if gate is not None else activate(u, self.activation)
        return F.linear(h, down)


class MixtureOfTokens(nn.Module):
    """Mixture of Tokens (models.md, arXiv 2310.15961). Batch rows [kG, kG+G) at one position
    form group k; per expert, softmax(x C^T / T) over the G tokens of the group mixes them into one
    token, the expert runs on it, and every token gets back the sum over experts of its weight
    times the expert's output. Tensor names: controller.weight [E, d], experts.{gate,up,down},
    log_temperature [] (learn_temperature)."""

    def __init__(self, m: dict):
        super().__init__()
        mot, d = m["mot"], m["d_model"]
        e = mot["n_experts"]
        self.group_size = mot["group_size"]
        self.controller = nn.Linear(d, e, bias=False)
        self.experts = Experts(e, d, mot_expert_width(m), m["activation"])
        self.temperature = float(mot["temperature"])
        if mot["learn_temperature"]:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(self.temperature)))

    def forward(self, x):
        B, S, d = x.shape
        G = self.group_size
        if B % G:
            raise UsageError(f"Mixture of Tokens groups {G} sequences at one position, so the batch ({B} sequences) must be a multiple of {G}")
        K = B // G
        z = self.controller(x)  # [B, S, E]
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()  # the softmax in f32 (under autocast the controller matmul ran in bf16)
        if hasattr(self, "log_temperature"):
            z = z / self.log_temperature.exp().to(z.dtype)
        elif self.temperature != 1.0:
            z = z / self.temperature
        E = z.shape[-1]
        w = torch.softmax(z.view(K, G, S, E), dim=1)  # over the G tokens of a group, per expert
        merged = torch.einsum("kgse,kgsd->eksd", w, x.reshape(K, G, S, d))  # one token per expert and group
        y = self.experts(merged.reshape(E, K * S, d)).view(E, K, S, d)
        out = torch.einsum("kgse,eksd->kgsd", w, y)  # each token: sum_e w[., e] * y_e
        return out.reshape(B, S, d)


class MixtureOfExperts(nn.Module):
    """Token-choice sparse MoE with a linear router (models.md; motrain's src/model/moe.rs and
    router.rs). The B*S tokens (flattened b*S + s, as motrain) each pick their top_k experts by
    p = softmax(x R^T), ties to the lower index; with a capacity (training only) slots are granted
    rank-major in token order; each expert runs on its tokens and out_t = sum over t's slots of
    gate * expert(x_t). Tensor names: router.weight [E, d], experts.{gate,up,down}, and with
    `shared_expert_size` shared_expert.{gate,up,down}_proj.weight and shared_expert_gate.weight."""

    def __init__(self, m: dict):
        super().__init__()
        moe, d = m["moe"], m["d_model"]
        self.n_experts = e = moe["n_experts"]
        self.top_k = moe["top_k"]
        self.renormalise = moe["gate"] == "softmax_topk"
        self.capacity_factor = float(moe["capacity_factor"])
        self.router = nn.Linear(d, e, bias=False)
        self.experts = Experts(e, d, moe_expert_width(m), m["activation"])
        if moe["shared_expert_size"]:
            self.shared_expert = DenseFFN(m, width=moe["shared_expert_size"], bias=False)
            self.shared_expert_gate = nn.Linear(d, 1, bias=False)
        self.want_losses = True
        self.aux_loss = self.z_loss = None  # this forward's Switch aux loss and z-loss (training)

    def forward(self, x):
        B, S, d = x.shape
        xf = x.reshape(B * S, d)
        N, E, k = B * S, self.n_experts, self.top_k
        # Router logits and probabilities in f32 (in f64 for an f64 model), never in bf16.
        with torch.autocast(x.device.type, enabled=False):
            xr = xf.float() if xf.dtype in (torch.float16, torch.bfloat16) else xf
            z = F.linear(xr, self.router.weight.to(xr.dtype))  # [N, E]
            p = torch.softmax(z, dim=-1)
        # Top-k by p, ties to the lower expert index: a stable descending sort keeps equal values
        # in index order. Decided on the f32 probabilities, as motrain decides on the host.
        choice = torch.sort(p.detach().float(), dim=-1, descending=True, stable=True).indices[:, :k]  # [N, k]
        w = p.gather(1, choice)  # [N, k]
        if self.renormalise:
            w = w / w.sum(dim=-1, keepdim=True)
        if self.training and self.want_losses:
            frac = torch.bincount(choice.reshape(-1), minlength=E).to(p.dtype) / N  # before dropping
            self.aux_loss = E * (p.mean(0) * frac).sum()
            self.z_loss = torch.logsumexp(z, dim=-1).square().mean()
        # Slots in rank-major order: every token's first choice (tokens in order), then every second ...
        expert = choice.t().reshape(-1)  # [k*N]
        token = torch.arange(N, device=x.device).repeat(k)
        gate = w.t().reshape(-1)
        if self.training and self.capacity_factor > 0:
            cap = max(1, math.floor(self.capacity_factor * (N * k) / E))
            # a slot's place in its expert's queue: how many earlier slots chose the same expert
            place = F.one_hot(expert, E).cumsum(0).gather(1, expert[:, None]).squeeze(1) - 1
            keep = place < cap
            expert, token, gate = expert[keep], token[keep], gate[keep]
        order = torch.argsort(expert, stable=True)  # group the slots by expert, keeping their order
        token, gate = token[order], gate[order]
        counts = torch.bincount(expert, minlength=E).tolist()
        out = torch.zeros_like(xf)
        for weights, tok, g in zip(self.experts.unbound(), token.split(counts), gate.split(counts)):
            if tok.numel():
                y = self.experts.expert(weights, xf[tok])
                out.index_add_(0, tok, (y * g[:, None].to(y.dtype)).to(out.dtype))
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(xf)) * self.shared_expert(xf)
        return out.view(B, S, d)


class Block(nn.Module):
    def __init__(self, m: dict, sparse: bool = False):
        super().__init__()
        self.input_layernorm = make_norm(m)
        self.self_attn = Attention(m)
        self.post_attention_layernorm = make_norm(m)
        if sparse and m["ffn"] == "mot":
            self.mlp = MixtureOfTokens(m)
        elif sparse and m["ffn"] == "moe":
            self.mlp = MixtureOfExperts(m)
        else:
            self.mlp = DenseFFN(m)

    def forward(self, h, rope):
        h = h + self.self_attn(self.input_layernorm(h), rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class Body(nn.Module):
    def __init__(self, m: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(m["vocab_size"], m["d_model"])
        if m["position"] == "learned":
            self.embed_positions = nn.Embedding(m["max_seq_len"], m["d_model"])
        self.layers = nn.ModuleList([Block(m, sparse) for sparse in ffn_layer_mask(m)])
        if m["final_norm"]:
            self.norm = make_norm(m)


class Transformer(nn.Module):
    def __init__(self, m: dict):
        super().__init__()
        self.cfg = m
        self.model = Body(m)
        self.tied = bool(m["tie_embeddings"])
        if not self.tied:
            self.lm_head = nn.Linear(m["d_model"], m["vocab_size"], bias=False)
        self.use_rope = m["position"] == "rope"
        self._rope_cache = None
        moe = m["moe"]
        for layer in self.moe_layers():  # the aux/z losses only when training adds them
            layer.want_losses = moe["aux_loss_weight"] > 0 or moe["z_loss_weight"] > 0

    def rope(self, S, device):
        if not self.use_rope:
            return None
        c = self._rope_cache
        if c is None or c[0].shape[0] < S or c[0].device != device:
            m = self.cfg
            c = rope_cos_sin(m["max_seq_len"] if S <= m["max_seq_len"] else S, m["d_model"] // m["n_heads"], m["rope_theta"], device)
            self._rope_cache = c
        return c

    def mot_layers(self) -> list[MixtureOfTokens]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MixtureOfTokens)]

    def moe_layers(self) -> list[MixtureOfExperts]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MixtureOfExperts)]

    def routing_loss(self) -> torch.Tensor | None:
        """What training adds to the CE after a forward in train mode, as motrain: aux_loss_weight *
        mean over MoE layers of the Switch aux loss + z_loss_weight * mean of the z-losses (a term
        whose weight is 0 is left out); None without MoE layers or with both weights 0."""
        layers = self.moe_layers()
        if not layers:
            return None
        moe = self.cfg["moe"]
        total = None
        for name, weight in (("aux_loss", moe["aux_loss_weight"]), ("z_loss", moe["z_loss_weight"])):
            if weight > 0:
                term = torch.stack([getattr(l, name) for l in layers]).mean() * weight
                total = term if total is None else total + term
        return total

    def set_group_size(self, g: int) -> None:
        """MoT layers mix groups of g sequences instead of `mot.group_size` (eval --group-size)."""
        for mot in self.mot_layers():
            mot.group_size = g

    def batch_multiple(self) -> int:
        """Sequences a batch must be a multiple of: the MoT group size, or 1."""
        mots = self.mot_layers()
        return mots[0].group_size if mots else 1

    def forward(self, idx):
        B, S = idx.shape
        body = self.model
        h = body.embed_tokens(idx)
        if hasattr(body, "embed_positions"):
            h = h + body.embed_positions(torch.arange(S, device=idx.device))
        rope = self.rope(S, idx.device)
        for layer in body.layers:
            h = layer(h, rope)
        if hasattr(body, "norm"):
            h = body.norm(h)
        w = body.embed_tokens.weight if self.tied else self.lm_head.weight
        return F.linear(h, w)

    @torch.no_grad()
    def init_weights(self, init_scale: float, generator: torch.Generator | None = None) -> None:
        """models.md: matrices truncated normal, std sqrt(init_scale/fan_in), cut at +-2*init_scale
        (absolute), fan_in the last axis (also of stacked experts); embeddings fan_in 1; biases 0;
        norm weights 1; MoT log-temperatures ln(temperature)."""
        for name, p in self.named_parameters():
            if name.endswith(".log_temperature"):
                p.fill_(math.log(self.cfg["mot"]["temperature"]))
            elif name.endswith(".bias"):
                p.zero_()
            elif p.ndim == 1:  # norm weights
                p.fill_(1.0)
            else:
                fan_in = 1 if "embed_" in name else p.shape[-1]
                std = math.sqrt(init_scale / fan_in)
                nn.init.trunc_normal_(p, mean=0.0, std=std, a=-2 * init_scale, b=2 * init_scale, generator=generator)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean token cross-entropy from logits (log-sum-exp), in at least f32."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


def lr_at(step: int, t: dict) -> float:
    lr, N, W, r = t["lr"], t["steps"], t["warmup_steps"], t["min_lr_ratio"]
    if step < W:
        return lr * (step + 1) / W
    sched = t["schedule"]
    if sched == "constant" or N <= W:
        return lr
    frac = min(max((step - W) / (N - W), 0.0), 1.0)
    if sched == "cosine":
        return lr * (r + (1 - r) / 2 * (1 + math.cos(math.pi * frac)))
    if sched == "linear":
        return lr * (1 - (1 - r) * frac)
    # wsd: constant, then linear decay to r*lr over the last 20 % of the steps
    decay_start = int(N * 0.8)
    if step < decay_start:
        return lr
    return lr * (1 - (1 - r) * min((step - decay_start) / max(N - decay_start, 1), 1.0))


# --------------------------------------------------------------------------------------------
# Device / threads
# --------------------------------------------------------------------------------------------

def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {spec!r}: CUDA is not available to this PyTorch")
    if spec == "cpu" or spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        return torch.device(spec)
    raise UsageError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N")


def set_threads(n: int | None) -> int:
    if n is None:
        n = os.cpu_count() or 1
    if n < 1:
        raise UsageError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return n


def cpu_capability() -> str:
    """The ATen CPU kernel level this torch dispatches to (e.g. AVX512, AVX2, DEFAULT)."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        return "unknown"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------

def make_optimizer(model: nn.Module, t: dict, impl: str) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=t["lr"], betas=tuple(t["betas"]), eps=t["eps"])
    if impl == "fused":
        kw["fused"] = True
    elif impl == "foreach":
        kw["foreach"] = True
    else:
        kw["foreach"] = False
    return torch.optim.AdamW(groups, **kw)


class Trainer:
    def __init__(self, model, cfg, data: TrainWindows, device, adamw_impl: str, autocast_bf16: bool):
        self.model, self.cfg, self.data, self.device = model, cfg, data, device
        t = cfg["train"]
        self.opt = make_optimizer(model, t, adamw_impl)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.micro = t["micro_batch_size"]
        self.accum = t["batch_size"] // self.micro
        self.clip = float(t["grad_clip"])
        self.autocast = autocast_bf16
        self.step_no = 0

    def step(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        lr = lr_at(self.step_no, self.cfg["train"])
        for g in self.opt.param_groups:
            g["lr"] = lr
        total = torch.zeros((), device=self.device)
        for _ in range(self.accum):
            x, y = self.data.batch(self.micro)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # forward + loss under autocast (loss_fn upcasts the logits, so the CE is f32 either way);
            # backward and the optimizer run outside it, on the f32 master weights
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(x)
                loss = loss_fn(logits, y) / self.accum
                aux = self.model.routing_loss()  # MoE: weighted aux + z losses (motrain's LossParts::total)
            (loss if aux is None else loss + aux / self.accum).backward()
            total += loss.detach()  # the CE, as motrain logs it
        gnorm = None
        if self.clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        return total, gnorm


def build_model(cfg: dict, device, dtype=torch.float32) -> Transformer:
    torch.manual_seed(cfg["run"]["seed"])
    model = Transformer(cfg["model"])
    model.init_weights(cfg["model"]["init_scale"])
    return model.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

def cmd_bench(args) -> None:
    cfg = load_config_file(args.config, args.set or [])
    threads = set_threads(args.threads)
    device = pick_device(args.device or cfg["run"]["device"])
    if cfg["run"]["dtype"] == "bf16" and device.type != "cuda":
        raise UsageError(f"{args.config}: `run.dtype` = \"bf16\" needs a CUDA device")
    if args.steps < 1 or args.warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    m, t, d = cfg["model"], cfg["train"], cfg["data"]
    data = TrainWindows(d["train"], d["format"], d["seq_len"], m["vocab_size"], cfg["run"]["seed"])
    model = build_model(cfg, device)
    model.train()
    params = model.num_params()
    autocast = args.autocast == "bf16" or cfg["run"]["dtype"] == "bf16"
    trainer = Trainer(model, cfg, data, device, args.adamw, autocast)
    tokens_per_step = t["batch_size"] * d["seq_len"]
    log(
        f"torch {torch.__version__} on {device} ({cpu_capability()}), {threads} thread(s); {params:,} params; "
        f"batch {t['batch_size']} (micro {t['micro_batch_size']}) x seq {d['seq_len']} = {tokens_per_step} tokens/step; "
        f"AdamW impl: {args.adamw}; autocast: {'bf16' if autocast else 'none'}"
    )
    for i in range(args.warmup):
        t0 = time.perf_counter()
        loss, _ = trainer.step()
        sync(device)
        log(f"warmup {i}: loss {loss.item():.4f}  {time.perf_counter() - t0:.3f}s")
    losses, times = [], []
    sync(device)
    start = time.perf_counter()
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss, gn = trainer.step()
        if device.type == "cuda":
            sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    sync(device)
    elapsed = time.perf_counter() - start
    losses = [float(x) for x in losses]
    step_time = elapsed / args.steps
    log(
        f"{args.steps} steps in {elapsed:.3f}s: {step_time * 1000:.1f} ms/step (median {sorted(times)[len(times) // 2] * 1000:.1f}, "
        f"min {min(times) * 1000:.1f}); loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    )
    out = {
        "impl": "pytorch",
        "tokens_per_s": tokens_per_step * args.steps / elapsed,
        "step_time_s": step_time,
        "steps": args.steps,
        "threads": threads,
        "torch_version": torch.__version__,
        "params": params,
        "device": str(device),
        "adamw": args.adamw,
        "autocast": "bf16" if autocast else "none",
        "cpu_capability": cpu_capability(),
        "tokens_per_step": tokens_per_step,
        "seq_len": d["seq_len"],
        "batch_size": t["batch_size"],
        "peak_rss_bytes": peak_rss_bytes(),
        "final_loss": losses[-1],
    }
    print(json.dumps(out), flush=True)


def find_checkpoint(path: str) -> tuple[str, str | None]:
    """Returns (checkpoint dir, run dir or None)."""
    if not os.path.isdir(path):
        raise UsageError(f"{path}: not a directory (expected a checkpoint or run directory)")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        parent = os.path.dirname(os.path.abspath(path))
        run = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else None
        return path, run
    latest = os.path.join(path, "checkpoints", "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        ckpt = os.path.join(path, "checkpoints", name)
        if not os.path.isfile(os.path.join(ckpt, "model.safetensors")):
            raise UsageError(f"{latest} names {name!r}, but {ckpt} holds no model.safetensors")
        return ckpt, path
    raise UsageError(f"{path}: neither a checkpoint (no model.safetensors) nor a run directory (no checkpoints/latest)")


def load_checkpoint_config(ckpt: str, run: str | None) -> dict:
    state_path = os.path.join(ckpt, "state.json")
    if os.path.isfile(state_path):
        with open(state_path) as f:
            try:
                state = json.load(f)
            except json.JSONDecodeError as e:
                raise UsageError(f"{state_path}: malformed JSON: {e}") from None
        if isinstance(state, dict) and isinstance(state.get("config"), dict):
            table = copy.deepcopy(state["config"])
            # a resolved config holds absolute paths; anything relative is taken from the cwd
            anchor_data_paths(table, os.getcwd())
            return resolve_and_validate(merge_defaults(table, state_path, strict=False), state_path)
    if run is not None:
        cpath = os.path.join(run, "config.toml")
        if os.path.isfile(cpath):
            with open(cpath, "rb") as f:
                try:
                    table = tomllib.load(f)
                except tomllib.TOMLDecodeError as e:
                    raise UsageError(f"{cpath}: malformed TOML: {e}") from None
            anchor_data_paths(table, os.path.dirname(os.path.abspath(cpath)))
            return resolve_and_validate(merge_defaults(table, cpath, strict=False), cpath)
    raise UsageError(f"{ckpt}: no config found (state.json key \"config\", or the run's config.toml)")


def load_weights(model: Transformer, path: str) -> None:
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"{path}: cannot read safetensors: {e}") from None
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    extra = [k for k in tensors if k not in expected]
    if missing or extra:
        msg = []
        if missing:
            msg.append(f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if extra:
            msg.append(f"unexpected {extra[:6]}{' ...' if len(extra) > 6 else ''}")
        raise UsageError(f"{path}: tensors do not match the config's model: {'; '.join(msg)}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise UsageError(f"{path}: tensor {k} has shape {list(tensors[k].shape)}, the config implies {list(v.shape)}")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(tensors[k].to(v.dtype))


def save_weights(model: Transformer, path: str) -> None:
    from safetensors.torch import save_file

    sd = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, path)


def check_eval_batch(model: Transformer, batch_size: int) -> int:
    """MoT mixes groups of consecutive rows of an eval batch, as motrain eval does: the batch must be a
    multiple of the group size (returned; 1 without MoT layers)."""
    g = model.batch_multiple()
    if batch_size % g:
        raise UsageError(
            f"this Mixture of Tokens model mixes groups of {g} sequences, so the eval batch ({batch_size}) must be a "
            f"multiple of {g}; pass --batch-size, or --group-size to mix smaller groups"
        )
    return g


@torch.no_grad()
def evaluate(model: Transformer, cfg: dict, val_glob: str, batches: int, batch_size: int, device, dtype) -> dict:
    g = check_eval_batch(model, batch_size)
    model.eval()
    d, m = cfg["data"], cfg["model"]
    total, count, nb = 0.0, 0, 0
    for x, y in eval_stream(val_glob, d["format"], d["seq_len"], batch_size, batches, m["vocab_size"]):
        logits = model(x.to(device))
        ce = loss_fn(logits, y.to(device), reduction="none")
        total += float(ce.double().sum())
        count += ce.numel()
        nb += 1
    loss = total / count
    res = {"loss": loss, "ppl": math.exp(loss) if loss < 700 else float("inf"), "tokens": count,
           "batches": nb, "batch_size": batch_size, "dtype": "f64" if dtype == torch.float64 else "f32"}
    if model.mot_layers():
        res["group_size"] = g
    return res


def eval_settings(cfg: dict, args) -> tuple[str, int, int]:
    val = args.data or cfg["data"]["val"]
    if not val:
        raise UsageError("no validation data: the config has no `data.val`; pass --data GLOB")
    if args.data:
        val = os.path.abspath(args.data)
    batches = args.batches if args.batches is not None else cfg["train"]["eval_batches"]
    bs = args.batch_size if args.batch_size is not None else cfg["train"]["eval_batch_size"]
    if batches < 1 or bs < 1:
        raise UsageError(f"eval needs at least one batch of at least one sequence (batches {batches}, batch size {bs})")
    return val, batches, bs


DTYPES = {"f32": torch.float32, "f64": torch.float64}


def cmd_eval(args) -> None:
    threads = set_threads(args.threads)
    ckpt, run = find_checkpoint(args.checkpoint)
    cfg = load_checkpoint_config(ckpt, run)
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype]
    val, batches, bs = eval_settings(cfg, args)
    model = Transformer(cfg["model"]).to(device=device, dtype=dtype)
    load_weights(model, os.path.join(ckpt, "model.safetensors"))
    if args.group_size is not None:
        if args.group_size < 1:
            raise UsageError("--group-size must be at least 1")
        model.set_group_size(args.group_size)
    check_eval_batch(model, bs)
    grouping = f"; MoT groups of {model.batch_multiple()}" if model.mot_layers() else ""
    if model.moe_layers():
        grouping += f"; {len(model.moe_layers())} MoE layer(s), dropless"
    log(f"torch {torch.__version__} on {device}, {threads} thread(s), {args.dtype}; checkpoint {ckpt}; "
        f"{model.num_params():,} params; val {val}; {batches} batches x {bs} x {cfg['data']['seq_len']}{grouping}")
    t0 = time.perf_counter()
    res = evaluate(model, cfg, val, batches, bs, device, dtype)
    log(f"eval loss {res['loss']:.6f} ppl {res['ppl']:.4f} over {res['tokens']} tokens in {time.perf_counter() - t0:.2f}s")
    print(json.dumps(res), flush=True)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: dict) -> str:
    lines = []

    def table(name, t):
        scalars = {k: v for k, v in t.items() if not isinstance(v, dict) and v is not None}
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in scalars.items())
        lines.append("")
        for k, v in t.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, t in cfg.items():
        table(name, t)
    return "\n".join(lines)


def strip_none(x):
    if isinstance(x, dict):
        return {k: strip_none(v) for k, v in x.items() if v is not None}
    return x


def cmd_make_checkpoint(args) -> None:
    cfg = load_config_file(args.config, args.set or [])
    threads = set_threads(args.threads)
    device = pick_device(args.device or "cpu")
    model = build_model(cfg, device)
    step = 0
    if args.train_steps > 0:
        d, m = cfg["data"], cfg["model"]
        data = TrainWindows(d["train"], d["format"], d["seq_len"], m["vocab_size"], cfg["run"]["seed"])
        trainer = Trainer(model, cfg, data, device, args.adamw, False)
        model.train()
        for i in range(args.train_steps):
            loss, gn = trainer.step()
            log(f"step {i}: loss {loss.item():.4f} grad_norm {float(gn) if gn is not None else float('nan'):.4f}")
        step = args.train_steps
    run = os.path.abspath(args.out)
    name = f"step-{step:06d}"
    ckpt = os.path.join(run, "checkpoints", name)
    os.makedirs(ckpt, exist_ok=True)
    save_weights(model, os.path.join(ckpt, "model.safetensors"))
    clean = strip_none(cfg)
    # motrain's TrainState: windows drawn (data_cursor) and Adam's t as a motrain run of `step`
    # steps would have them (no optimizer state is written: `eval` and `--init-from` need none).
    state = {"step": step, "tokens": step * cfg["train"]["batch_size"] * cfg["data"]["seq_len"],
             "data_cursor": step * cfg["train"]["batch_size"], "optimizer_t": step, "skipped_steps": 0,
             "seed": cfg["run"]["seed"], "elapsed_s": 0.0, "motrain_version": "torch_baseline", "config": clean}
    with open(os.path.join(ckpt, "state.json"), "w") as f:
        json.dump(state, f, indent=1)
    with open(os.path.join(run, "config.toml"), "w") as f:
        f.write(to_toml(clean))
    with open(os.path.join(run, "checkpoints", "latest"), "w") as f:
        f.write(name + "\n")
    log(f"wrote {ckpt} ({threads} thread(s))")
    if cfg["data"]["val"] and args.eval:
        dtype = DTYPES[args.dtype]
        model = model.to(dtype=dtype)
        val, batches, bs = eval_settings(cfg, argparse.Namespace(data=None, batches=args.batches, batch_size=args.batch_size))
        res = evaluate(model, cfg, val, batches, bs, device, dtype)
        log(f"in-memory eval loss {res['loss']:.6f} ({res['dtype']})")
        print(json.dumps(res), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="torch_baseline.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("bench", help="time training steps of the dense, MoE or MoT model")
    b.add_argument("--config", required=True)
    b.add_argument("--set", action="append", metavar="KEY=VALUE")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    b.add_argument("--device", default=None, help="override run.device (auto|cpu|cuda|cuda:N)")
    b.add_argument("--adamw", choices=("fused", "foreach", "forloop"), default="fused",
                   help="torch.optim.AdamW implementation (default fused: fastest on CPU, ~7 ms vs ~30 ms per step for foreach/forloop on bench-dense)")
    b.add_argument("--autocast", choices=("none", "bf16"), default="none",
                   help="bf16: forward and loss under torch.autocast(device, dtype=torch.bfloat16); weights and AdamW stay f32")

    e = sub.add_parser("eval", help="eval loss of a motrain checkpoint")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", default=None, help="glob of val shards (default: the config's data.val)")
    e.add_argument("--batches", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--group-size", type=int, default=None,
                   help="MoT: mix groups of this many sequences instead of the trained model.mot.group_size (as motrain eval)")
    e.add_argument("--dtype", choices=("f32", "f64"), default="f32")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--device", default="cpu")

    c = sub.add_parser("make-checkpoint", help="write a (randomly initialised or briefly trained) model as a motrain run dir")
    c.add_argument("--config", required=True)
    c.add_argument("--set", action="append", metavar="KEY=VALUE")
    c.add_argument("--out", required=True, help="run directory to write")
    c.add_argument("--train-steps", type=int, default=0)
    c.add_argument("--adamw", choices=("fused", "foreach", "forloop"), default="fused")
    c.add_argument("--no-eval", dest="eval", action="store_false", help="skip the in-memory eval after saving")
    c.add_argument("--batches", type=int, default=None)
    c.add_argument("--batch-size", type=int, default=None)
    c.add_argument("--dtype", choices=("f32", "f64"), default="f32")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--device", default=None)

    args = p.parse_args(argv)
    try:
        {"bench": cmd_bench, "eval": cmd_eval, "make-checkpoint": cmd_make_checkpoint}[args.cmd](args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
