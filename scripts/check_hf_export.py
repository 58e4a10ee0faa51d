#!/usr/bin/env python3
"""Checks a `motrain export --format hf` folder with the `transformers` package (CPU): loads it
with AutoModelForCausalLM, computes the mean token cross-entropy over the same val windows that
`motrain eval` uses, runs `motrain eval` on the checkpoint, and prints both losses and their
difference. Exit status 1 if they differ by more than --tolerance.

    python3 scripts/check_hf_export.py --checkpoint runs/quickstart --hf /tmp/hf-quickstart \
        [--batches 4] [--batch-size 8] [--motrain target/release/motrain]

It works the other way round too: with `--checkpoint` a run that `motrain import` made from the
folder `--hf`. Such a run has no data of its own: pass `--data GLOB --seq-len N`. A PESC export
carries its modeling file: pass `--trust-remote-code`.

Needs torch, transformers, numpy (not part of CI; see the README).
"""
import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_baseline import eval_stream  # noqa: E402  (the same window protocol as motrain eval)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="the motrain checkpoint or run that was exported")
    ap.add_argument("--hf", required=True, help="the exported folder")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--motrain", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "motrain"))
    ap.add_argument("--tolerance", type=float, default=1e-4)
    ap.add_argument("--data", help="val shards (default: the run's data.val)")
    ap.add_argument("--seq-len", type=int, help="window length (default: the run's data.seq_len)")
    ap.add_argument("--trust-remote-code", action="store_true", help="load a folder that carries its modeling file")
    a = ap.parse_args()

    cmd = [a.motrain, "eval", "--checkpoint", a.checkpoint, "--batches", str(a.batches), "--batch-size", str(a.batch_size)]
    if a.data:
        cmd += ["--data", a.data]
    if a.seq_len:
        cmd += ["--seq-len", str(a.seq_len)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return 2
    ours = json.loads(out.stdout.strip().splitlines()[-1])
    ckpt = ours["checkpoint"]
    with open(os.path.join(ckpt, "state.json")) as f:
        cfg = json.load(f)["config"]

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    remote = {"trust_remote_code": True} if a.trust_remote_code else {}
    # transformers 5 calls it `dtype`, 4.x `torch_dtype`.
    dtype = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.float32}
    hf_cfg = AutoConfig.from_pretrained(a.hf, **remote)
    model = AutoModelForCausalLM.from_pretrained(a.hf, **dtype, **remote).eval()
    seq_len = a.seq_len or cfg["data"]["seq_len"]
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in eval_stream(ours["data"], cfg["data"]["format"], seq_len, a.batch_size,
                                a.batches, cfg["model"]["vocab_size"]):
            logits = model(input_ids=x).logits
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
            n += 1
    theirs = total / n
    diff = abs(theirs - ours["loss"])
    print(f"{hf_cfg.architectures[0]} ({type(model).__name__}, transformers): loss {theirs:.9f}")
    print(f"motrain eval:                                  loss {ours['loss']:.9f}")
    print(f"difference {diff:.2e} over {n} batches of {a.batch_size} x {seq_len} tokens")
    return 0 if diff <= a.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
