#!/usr/bin/env bash
# PESC on a Hugging Face model, end to end (the README's "Start from a Hugging Face model"):
#   1. transformers builds a small random Llama (GQA, Llama 3 RoPE scaling) with the quickstart
#      tokenizer and saves it (no download: LlamaConfig(...) → save_pretrained);
#   2. `motrain import` makes it a run; its loss on Shakespeare (tokenized with the model's own
#      tokenizer.json) equals transformers' on the same windows;
#   3. continued pretraining: `train --init-from` the imported run on that data;
#   4. `motrain upcycle` turns it into PESC (4 adapter experts, top-2); its logits equal the dense
#      model's at step 0; only adapters and routers then train;
#   5. `motrain export` writes a Hugging Face folder (MotrainPescForCausalLM: a Llama whose FFNs
#      carry the adapters, with its modeling file, as the PESC authors publish Camelidae), which
#      transformers loads with trust_remote_code and whose loss equals motrain's.
# Usage: PYTHON=/path/to/venv/bin/python scripts/pesc_hf_demo.sh [WORK_DIR] [STEPS]
# Needs torch and transformers in $PYTHON (not part of CI).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
work=${1:-runs/pesc-hf-demo}
steps=${2:-200}
cargo build --release -q
m=./target/release/motrain
rm -rf "$work"
mkdir -p "$work"

echo "== 1. a random Llama from transformers"
"$py" - "$work/hf-llama" <<'PY'
import shutil, sys, torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
out = sys.argv[1]
tok = "data/quickstart/tokenizer.json"
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=Tokenizer.from_file(tok).get_vocab_size(), hidden_size=128, intermediate_size=344,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rope_theta=10000.0, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
LlamaForCausalLM(cfg).save_pretrained(out)
shutil.copy(tok, out)
print(f"saved {out}: {sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())} parameters")
PY

echo "== 2. import, and its loss against transformers'"
$m import --hf "$work/hf-llama" --out "$work/llama"
$m prepare --tokenizer "$work/llama/tokenizer.json" --input data/raw/shakespeare --out "$work/shards" \
  --name shakespeare --val-fraction 0.1 >/dev/null
val="$work/shards/shakespeare_val_*.bin"
data=(--set "data.train=$work/shards/shakespeare_train_*.bin" --set "data.val=$val" --set data.seq_len=128)
"$py" scripts/check_hf_export.py --checkpoint "$work/llama" --hf "$work/hf-llama" --data "$val" --seq-len 128

echo "== 3. continued pretraining from the imported run"
$m train --config "$work/llama/config.toml" --init-from "$work/llama" "${data[@]}" \
  --set run.out_dir="$work" --set run.name=llama-shakespeare --set train.steps="$steps" \
  --set train.batch_size=16 --set train.micro_batch_size=16 --set train.lr=3e-3 --set train.warmup_steps=20 \
  --set train.eval_every="$steps" --set train.ckpt_every="$steps" --set train.log_every=50

echo "== 4. PESC upcycling, then adapters and routers train"
$m upcycle --checkpoint "$work/llama-shakespeare" --out "$work/pesc" --experts 4 --top-k 2 --adapter-dim 16
$m train --config "$work/pesc/config.toml" --init-from "$work/pesc" --set run.name=pesc-tuned \
  --set train.steps="$steps" --set train.batch_size=16 --set train.micro_batch_size=16 --set train.lr=1e-2 \
  --set train.warmup_steps=20 --set train.eval_every="$steps" --set train.ckpt_every="$steps" --set train.log_every=50

echo "== 5. export as a Hugging Face folder and load it in transformers"
$m export --checkpoint "$work/pesc-tuned" --out "$work/hf-pesc"
"$py" scripts/check_hf_export.py --checkpoint "$work/pesc-tuned" --hf "$work/hf-pesc" --trust-remote-code
