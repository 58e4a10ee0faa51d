#!/usr/bin/env python3
"""Builds the tiny random Hugging Face models in tests/fixtures/hf/ that `motrain import --hf`
is tested against. Nothing is downloaded: every model is constructed from a transformers Config,
every parameter (norm weights, biases, routers and gates included) is re-drawn from a seeded
generator so that each tensor moves the logits, and the folder is written with
`save_pretrained(..., safe_serialization=True)` in the dtype listed below.

    python scripts/make_hf_fixtures.py [--out tests/fixtures/hf] [--only llama,mixtral]

Each folder holds config.json (as transformers writes it), the weights (model.safetensors, or
shards with model.safetensors.index.json) and expected.safetensors with `input_ids` (int64
[2, 12], seeded, in [0, vocab_size)) and `logits` (float32 [2, 12, vocab_size]): the logits of
the model reloaded from that folder with AutoModelForCausalLM.from_pretrained(dir, float32,
eager attention), eval, no attention mask (full causal). A model saved in bf16/f16 therefore has
the logits of its rounded weights, computed in f32.

After writing, each folder is checked: the saved tensor names are the classic Hub layout
(Mixtral `block_sparse_moe.experts.{j}.w1/w2/w3`, Qwen2-MoE `mlp.experts.{j}.gate_proj/...`,
`mlp.shared_expert.*`, `mlp.shared_expert_gate`), the reload reproduces the rounded weights and
logits exactly, the logits are not degenerate, and an independent plain-torch forward that
reads only config.json and the safetensors files (no transformers) gives the same logits.

Made with transformers 4.55.4, torch 2.15.0, tokenizers 0.21.4, safetensors 0.8.0 (CPU):
    /work/venv-torch/bin/pip install "transformers==4.55.4"
A 4.x older than 4.56 on purpose, so that config.json is what the Hub checkpoints hold
(`torch_dtype`, `rope_theta`, `rope_scaling`). 4.56 and later write `dtype` instead of
`torch_dtype`; 5.x also moves `rope_theta` and `rope_scaling` into `rope_parameters`, adds
`layer_types`, and stores experts fused in memory (it still writes the per-expert names above,
but draws the random values in a different order, so the MoE weights would change). transformers
5.24 loads these folders and reproduces expected.safetensors within 6e-7. With another version the
script still runs and checks itself, but the committed files would change.
"""
import argparse
import json
import math
import os
import shutil
import sys

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

TEXT = (
    "The quick brown fox jumps over the lazy dog. A tiny model reads a short paragraph of "
    "plain English text, learns which pairs of bytes appear together most often, and merges "
    "them into new tokens. The rain in Spain stays mainly in the plain, and the weather in the "
    "north is colder than the weather in the south. She sells sea shells by the sea shore; the "
    "shells she sells are surely sea shells. Peter Piper picked a peck of pickled peppers. "
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood? Training a "
    "transformer on a small machine takes patience: the loss goes down slowly, then quickly, "
    "then slowly again, and the tokens it predicts start to look like words, then like "
    "sentences. Testing the importer with these models makes sure that every weight ends up "
    "in the right place, that the rotary embedding is the one the checkpoint expects, and that "
    "the mixture of experts routes every token to the same experts as the reference does. "
    "Numbers such as 12, 345 and 6789 appear in text too, as do punctuation marks: commas, "
    "periods, question marks and exclamation marks!\n"
)
PINNED = "4.55.4"
TOKENIZER_VOCAB = 300
SEQ = (2, 12)

# name -> (config class, config kwargs, saved dtype, save_pretrained kwargs, seed)
COMMON = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2)


def model_specs(tok_vocab):
    T = transformers
    return {
        "llama": (T.LlamaConfig, dict(
            COMMON, vocab_size=tok_vocab, intermediate_size=64, num_hidden_layers=2,
            # original_max_position_embeddings=64 (not 16) so that the three llama3 bands each
            # hold a frequency at head_dim 8 (wavelengths 6.3, 63, 628, 6283 against the band
            # edges 64/4 = 16 and 64/1 = 64): kept, blended, and divided by the factor.
            max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
            bos_token_id=0, eos_token_id=1, tie_word_embeddings=False),
            torch.bfloat16, dict(max_shard_size="20KB"), 1),
        "mistral": (T.MistralConfig, dict(
            COMMON, vocab_size=96, intermediate_size=64, num_hidden_layers=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
            sliding_window=None, tie_word_embeddings=False),
            torch.float16, {}, 2),
        "qwen2": (T.Qwen2Config, dict(
            COMMON, vocab_size=96, intermediate_size=64, num_hidden_layers=2,
            max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
            use_sliding_window=False, tie_word_embeddings=False),
            torch.float32, {}, 3),
        "qwen2_tied": (T.Qwen2Config, dict(
            COMMON, vocab_size=96, intermediate_size=64, num_hidden_layers=2,
            max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=1000000.0,
            use_sliding_window=False, tie_word_embeddings=True),
            torch.bfloat16, {}, 4),
        "mixtral": (T.MixtralConfig, dict(
            COMMON, vocab_size=96, intermediate_size=48, num_hidden_layers=2,
            num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None,
            tie_word_embeddings=False),
            torch.float32, {}, 5),
        "qwen2_moe": (T.Qwen2MoeConfig, dict(
            COMMON, vocab_size=96, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
            num_hidden_layers=3, max_position_embeddings=64, rms_norm_eps=1e-6,
            rope_theta=10000.0, use_sliding_window=False, tie_word_embeddings=False),
            torch.float32, {}, 6),
        "qwen2_moe_norm": (T.Qwen2MoeConfig, dict(
            COMMON, vocab_size=96, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-6,
            rope_theta=10000.0, use_sliding_window=False, tie_word_embeddings=False),
            torch.bfloat16, {}, 7),
    }


def build_tokenizer(out_dir):
    """A byte-level BPE trained on TEXT; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("</s>") == 1
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>")
    fast.save_pretrained(out_dir)
    # Keep only what a checkpoint needs: tokenizer.json and tokenizer_config.json.
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(out_dir, extra)):
            os.remove(os.path.join(out_dir, extra))
    with open(os.path.join(out_dir, "tokenizer.json")) as f:
        n = len(json.load(f)["model"]["vocab"])
    assert n == tok.get_vocab_size() and n <= TOKENIZER_VOCAB
    return n


@torch.no_grad()
def randomize(model, gen):
    """Every parameter gets seeded random values that matter to the logits."""
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif p.dim() == 1:  # biases
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
            # routers: wider so the top-k choices are far from ties
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        elif name.endswith("shared_expert_gate.weight"):
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def dtype_kwarg(dtype):
    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": dtype}


def load_kwargs(dtype):
    return {**dtype_kwarg(dtype), "attn_implementation": "eager"}


def saved_tensors(d):
    """name -> tensor over all safetensors weight files of a folder (not expected.safetensors)."""
    out = {}
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors") and fn != "expected.safetensors":
            with safe_open(os.path.join(d, fn), "pt") as f:
                for k in f.keys():
                    assert k not in out, f"{k} in two files"
                    out[k] = f.get_tensor(k)
    return out


def make_one(name, spec, out_root):
    cfg_cls, cfg_kw, dtype, save_kw, seed = spec
    d = os.path.join(out_root, name)
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    if name == "llama":
        n = build_tokenizer(d)
        assert n == cfg_kw["vocab_size"]

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    cfg = cfg_cls(**cfg_kw)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    randomize(model, gen)
    model = model.to(dtype).eval()
    model.save_pretrained(d, safe_serialization=True, **save_kw)
    gc = os.path.join(d, "generation_config.json")
    if os.path.exists(gc):
        os.remove(gc)

    ids = torch.randint(0, cfg.vocab_size, SEQ, generator=gen, dtype=torch.int64)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(d, **load_kwargs(torch.float32)).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits.float().contiguous()
    save_file({"input_ids": ids.contiguous(), "logits": logits}, os.path.join(d, "expected.safetensors"),
              metadata={"format": "pt"})

    # Round trip: the reload holds exactly the rounded weights and computes the same logits.
    # (A fresh f32 model, not model.float(): .to(bf16) also rounded the RoPE inv_freq buffer.)
    rounded = transformers.AutoModelForCausalLM.from_config(cfg, **dtype_kwarg(torch.float32))
    rounded.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    rounded.eval()
    ref_sd, new_sd = rounded.state_dict(), reloaded.state_dict()
    assert ref_sd.keys() == new_sd.keys(), (ref_sd.keys() ^ new_sd.keys())
    for k in ref_sd:
        assert ref_sd[k].dtype == new_sd[k].dtype == torch.float32, k
        assert torch.equal(ref_sd[k], new_sd[k]), f"{name}: {k} differs after reload"
    with torch.no_grad():
        again = rounded(input_ids=ids).logits.float()
    rt = (again - logits).abs().max().item()
    assert rt < 1e-5, f"{name}: round trip max |dlogit| {rt}"
    std = logits.std().item()
    assert std > 0.05, f"{name}: logits std {std}"
    return d, ids, logits, rt


# ----------------------------------------------------------------------------------------------
# Independent reference: plain torch, reading only config.json and the weight files.

def rope_inv_freq(cfg, hd):
    # transformers 4.x: rope_theta and rope_scaling; 5.x: both inside rope_parameters.
    rp = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rp.get("rope_theta", 10000.0))
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.get("rope_scaling") or rp
    kind = rs.get("rope_type", rs.get("type", "default"))
    assert kind in ("default", "llama3"), kind
    if kind == "llama3":
        f, lo, hi, old = (rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"],
                          rs["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        lo_wl, hi_wl = old / lo, old / hi
        scaled = torch.where(wavelen > lo_wl, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= hi_wl) & (wavelen <= lo_wl)
        inv = torch.where(medium, blended, scaled)
    return inv.float()


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_logits(d, ids):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    W = {k: v.float() for k, v in saved_tensors(d).items()}
    arch = cfg["architectures"][0]
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = cfg.get("head_dim") or D // H
    eps = cfg["rms_norm_eps"]
    B, T = ids.shape
    inv = rope_inv_freq(cfg, hd)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # [B, h, T, hd], rotate-half convention
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def lin(x, p, bias=True):
        y = x @ W[p + ".weight"].T
        return y + W[p + ".bias"] if bias and (p + ".bias") in W else y

    def swiglu(x, g, u, dn):
        return lin(torch.nn.functional.silu(lin(x, g)) * lin(x, u), dn)

    gaps = []

    def moe(x, p, experts, k, renorm, names):
        logits = lin(x, p + ".gate")
        probs = logits.softmax(-1)
        top = probs.topk(k + 1 if k < experts else k, -1)
        if k < experts:
            gaps.append((top.values[..., k - 1] - top.values[..., k]).min().item())
        w, idx = top.values[..., :k], top.indices[..., :k]
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for j in range(experts):
            wj = (w * (idx == j)).sum(-1, keepdim=True)
            e = f"{p}.experts.{j}."
            out = out + wj * swiglu(x, e + names[0], e + names[1], e + names[2])
        return out

    x = W["model.embed_tokens.weight"][ids]
    mask = torch.full((T, T), float("-inf")).triu(1)
    n_layers = cfg["num_hidden_layers"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        h = rms(x, W[p + "input_layernorm.weight"], eps)
        q = lin(h, p + "self_attn.q_proj").view(B, T, H, hd).transpose(1, 2)
        k = lin(h, p + "self_attn.k_proj").view(B, T, KV, hd).transpose(1, 2)
        v = lin(h, p + "self_attn.v_proj").view(B, T, KV, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(hd) + mask).softmax(-1) @ v
        x = x + lin(a.transpose(1, 2).reshape(B, T, H * hd), p + "self_attn.o_proj")
        h = rms(x, W[p + "post_attention_layernorm.weight"], eps)
        if arch == "MixtralForCausalLM":
            m = moe(h, p + "block_sparse_moe", cfg["num_local_experts"], cfg["num_experts_per_tok"],
                    True, ("w1", "w3", "w2"))
        elif arch == "Qwen2MoeForCausalLM" and i not in cfg["mlp_only_layers"] and \
                cfg["num_experts"] > 0 and (i + 1) % cfg["decoder_sparse_step"] == 0:
            m = moe(h, p + "mlp", cfg["num_experts"], cfg["num_experts_per_tok"], cfg["norm_topk_prob"],
                    ("gate_proj", "up_proj", "down_proj"))
            s = p + "mlp.shared_expert."
            m = m + torch.sigmoid(lin(h, p + "mlp.shared_expert_gate")) * \
                swiglu(h, s + "gate_proj", s + "up_proj", s + "down_proj")
        else:
            m = swiglu(h, p + "mlp.gate_proj", p + "mlp.up_proj", p + "mlp.down_proj")
        x = x + m
    x = rms(x, W["model.norm.weight"], eps)
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    if "lm_head.weight" not in W:
        assert cfg.get("tie_word_embeddings", True), "no lm_head.weight in an untied model"
    return x @ head.T, (min(gaps) if gaps else None), set(W)


def expected_names(d):
    """The classic Hub names for the folder's config (Llama/Mistral/Qwen2/Mixtral/Qwen2-MoE)."""
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    arch = cfg["architectures"][0]
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.get("tie_word_embeddings", False):
        names.add("lm_head.weight")
    bias = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for proj in "qkvo":
            names.add(f"{p}self_attn.{proj}_proj.weight")
            if bias and proj != "o":
                names.add(f"{p}self_attn.{proj}_proj.bias")
        dense = {f"{p}mlp.{w}_proj.weight" for w in ("gate", "up", "down")}
        if arch == "MixtralForCausalLM":
            names.add(p + "block_sparse_moe.gate.weight")
            names |= {f"{p}block_sparse_moe.experts.{j}.{w}.weight"
                      for j in range(cfg["num_local_experts"]) for w in ("w1", "w2", "w3")}
        elif arch == "Qwen2MoeForCausalLM" and i not in cfg["mlp_only_layers"]:
            names |= {p + "mlp.gate.weight", p + "mlp.shared_expert_gate.weight"}
            names |= {f"{p}mlp.experts.{j}.{w}_proj.weight"
                      for j in range(cfg["num_experts"]) for w in ("gate", "up", "down")}
            names |= {f"{p}mlp.shared_expert.{w}_proj.weight" for w in ("gate", "up", "down")}
        else:
            names |= dense
    return names


def check_folder(d, ids, logits):
    ref, gap, names = reference_logits(d, ids)
    want = expected_names(d)
    assert names == want, f"{d}: unexpected {sorted(names - want)}, missing {sorted(want - names)}"
    diff = (ref - logits).abs().max().item()
    assert diff < 1e-4, f"{d}: plain-torch reference differs by {diff}"
    return diff, gap


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "hf"))
    ap.add_argument("--only", default="", help="comma-separated names (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if transformers.__version__ != PINNED:
        print(f"note: transformers {transformers.__version__}, the committed fixtures were made with "
              f"{PINNED}; config.json (and, with 5.x, the MoE weights) will differ", file=sys.stderr)
    transformers.logging.set_verbosity_error()
    os.makedirs(a.out, exist_ok=True)

    # The llama vocabulary is the tokenizer's size, known once it is trained.
    tmp = os.path.join(a.out, ".tokenizer-tmp")
    os.makedirs(tmp, exist_ok=True)
    tok_vocab = build_tokenizer(tmp)
    shutil.rmtree(tmp)

    specs = model_specs(tok_vocab)
    only = [s for s in a.only.split(",") if s]
    for s in only:
        if s not in specs:
            sys.exit(f"unknown fixture {s}; known: {', '.join(specs)}")
    for name, spec in specs.items():
        if only and name not in only:
            continue
        d, ids, logits, rt = make_one(name, spec, a.out)
        diff, gap = check_folder(d, ids, logits)
        files = sorted(f for f in os.listdir(d))
        print(f"{name:15s} {str(spec[2]).replace('torch.', ''):9s} V={logits.shape[-1]:3d} "
              f"logit std {logits.std().item():.3f}  reload {rt:.1e}  reference {diff:.1e}"
              + (f"  min top-k gap {gap:.2e}" if gap is not None else "") + f"  [{', '.join(files)}]")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
