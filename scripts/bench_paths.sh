#!/usr/bin/env bash
# Tokens/s of dense, MoT and MoE top-1 training on every SIMD path this CPU has, alternated
# round by round, with MoT/dense and MoE/dense per path. Prints the CPU and its SIMD flags first.
# On a CPU with AMX bf16 tiles, a last path `bf16` runs all three with run.dtype = "bf16"
# (matmuls on the tiles, the avx512 path for the rest).
# Usage: scripts/bench_paths.sh [STEPS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-5}
rounds=${2:-2}
cargo build --release -q
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)"
echo "flags: $(grep -m1 -o -w -E 'avx2|fma|avx512(f|bw|cd|dq|vl|_bf16)|amx_(bf16|tile)' /proc/cpuinfo | sort -u | xargs)"
paths=()
for p in portable avx2 avx512; do
  # A path the CPU lacks is refused before the (missing) config is read.
  MOTRAIN_SIMD=$p ./target/release/motrain bench --config /nonexistent 2>&1 | grep -q MOTRAIN_SIMD \
    || paths+=("$p")
done
grep -q -w amx_bf16 /proc/cpuinfo && paths+=(bf16)
declare -A model=(
  [dense]="--config configs/bench-dense.toml"
  [mot]="--config configs/bench-mot.toml"
  [moe-top1]="--config configs/bench-dense.toml --set model.ffn=moe --set model.moe.n_experts=8 --set model.moe.top_k=1 --set model.moe.capacity_factor=1.25"
)
tps() { # path, then bench arguments: prints tokens/s
  local simd=$1 dtype=()
  [ "$1" = bf16 ] && simd=avx512 dtype=(--set run.dtype=bf16)
  MOTRAIN_SIMD=$simd ./target/release/motrain bench "${@:2}" "${dtype[@]}" --steps "$steps" --warmup 1 2>/dev/null \
    | tail -1 | sed -E 's/.*"tokens_per_s":([0-9.]+).*/\1/'
}
printf '%-6s %-9s %-9s %10s %10s %10s %9s %9s\n' round path "" dense mot moe-top1 mot/dense moe/dense
for r in $(seq "$rounds"); do
  for p in "${paths[@]}"; do
    declare -A t=()
    for m in dense mot moe-top1; do
      # shellcheck disable=SC2086
      t[$m]=$(tps "$p" ${model[$m]})
    done
    awk -v r="$r" -v p="$p" -v d="${t[dense]}" -v m="${t[mot]}" -v e="${t[moe-top1]}" 'BEGIN {
      printf "%-6s %-9s %-9s %10.0f %10.0f %10.0f %9.2f %9.2f\n", r, p, "tok/s", d, m, e, m / d, e / d }'
  done
done
