#!/usr/bin/env bash
# Tokens/s of MoT and MoE top-1 training against dense on every SIMD path this CPU has, each
# pair timed step by step in turn in one process (`motrain bench --vs`), with MoT/dense and
# MoE/dense per path; MoT against dense at the same tokens per step (batch 32). Prints the CPU
# and its SIMD flags first.
# On a CPU with a bf16 dot product, the last paths run all three with run.dtype = "bf16" on
# each engine it has: `bf16-amx` (AMX tiles) and `bf16-dot` (AVX512_BF16's vdpbf16ps), the
# avx512 path for the rest.
# Usage: scripts/bench_paths.sh [STEPS] [ROUNDS]   (needs python3 for the JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
rounds=${2:-2}
cargo build --release -q
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "flags: $(grep -m1 -o -w -E 'avx2|fma|avx512(f|bw|cd|dq|vl|_bf16)|amx_(bf16|tile)' /proc/cpuinfo | sort -u | xargs)"
paths=()
for p in portable avx2 avx512; do
  # A path the CPU lacks is refused before the (missing) config is read. (Not a pipe into
  # grep: under pipefail the pipe would take motrain's exit 2 for grep's answer.)
  refusal=$(MOTRAIN_SIMD=$p ./target/release/motrain bench --config /nonexistent 2>&1 || true)
  [[ $refusal == *MOTRAIN_SIMD* ]] || paths+=("$p")
done
grep -q -w amx_bf16 /proc/cpuinfo && paths+=(bf16-amx)
grep -q -w avx512_bf16 /proc/cpuinfo && paths+=(bf16-dot)
moe_args=(--vs-set model.ffn=moe --vs-set model.moe.n_experts=8 --vs-set model.moe.top_k=1
          --vs-set model.moe.capacity_factor=1.25)
pair() { # path, then bench arguments: prints "dense_tok/s other_tok/s ratio" of one --vs run,
         # whose two models are timed step by step in turn
  local simd=$1 dtype=() engine=auto
  case $1 in bf16-amx) engine=amx ;; bf16-dot) engine=avx512bf16 ;; esac
  [ "$engine" != auto ] && simd=avx512 dtype=(--set run.dtype=bf16)
  local err out
  err=$(mktemp)
  # A failed run shows its own error rather than a JSON parse error.
  if ! out=$(MOTRAIN_SIMD=$simd MOTRAIN_BF16=$engine ./target/release/motrain bench "${@:2}" "${dtype[@]}" \
      --steps "$steps" --warmup 1 2>"$err"); then
    echo "error: motrain bench failed on path $1:" >&2
    tail -5 "$err" >&2
    rm -f "$err"
    return 1
  fi
  rm -f "$err"
  tail -1 <<<"$out" | python3 -c 'import json, sys; r = json.load(sys.stdin); print(*r["tokens_per_s"], r["ratio"])'
}
printf '%-6s %-9s %12s %10s %12s %10s %9s %9s\n' round path dense@32 mot dense@16 moe-top1 mot/dense moe/dense
for r in $(seq "$rounds"); do
  for p in "${paths[@]}"; do
    # MoT against dense at its batch (32: the same tokens per step); MoE top-1 at bench-dense's.
    mot_pair=$(pair "$p" --config configs/bench-dense.toml --set train.batch_size=32 \
      --vs configs/bench-mot.toml)
    moe_pair=$(pair "$p" --config configs/bench-dense.toml "${moe_args[@]}")
    read -r d32 mot rmot <<<"$mot_pair"
    read -r d16 moe rmoe <<<"$moe_pair"
    printf '%-6s %-9s %12.0f %10.0f %12.0f %10.0f %9.2f %9.2f\n' "$r" "$p" "$d32" "$mot" "$d16" "$moe" "$rmot" "$rmoe"
  done
done
