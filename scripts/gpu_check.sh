#!/usr/bin/env bash
# The GPU check: on a machine with NVIDIA GPUs, everything the CPU-only CI cannot run (see
# docs/cuda.md). About 8 minutes on one GPU once the CUDA build is cached; the first build adds
# candle's kernels (a few minutes on a many-core machine).
#
#   1. builds `--features cuda` (and `--features nccl`, i.e. cuda + nccl + mpi, with 2+ GPUs
#      and mpirun), for the first GPU's compute capability, into target/gpu;
#   2. runs every CUDA test: the MoT kernels against a naive loop (forward, gradients, bf16),
#      and with 2+ GPUs the one-rank NCCL sum;
#   3. `motrain bench` on one GPU: configs/bench-dense.toml, configs/bench-mot.toml, and MoT
#      in bf16;
#   4. with 2+ GPUs: `mpirun -n 2 motrain train` with NCCL against one rank with micro-batches
#      of B/2, the per-step losses equal to 1e-5 relative (tests/data_parallel.rs on the CPU),
#      and the 2-rank bench of the dense config;
#
# then prints one table (check, result, figure) and exits 1 if any check failed. Without a GPU
# it stops at once with "no GPU".
#
# Environment: CUDA_COMPUTE_CAP (default: the first GPU's, from nvidia-smi),
# MOTRAIN_GPU_TARGET_DIR (default target/gpu), MOTRAIN_GPU_CHECK_DIR (scratch runs; default a
# temporary directory, removed at the end), MPIRUN (default mpirun; Open MPI's, for -x).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# One line per GPU, "index, name, compute capability" (drivers older than 510 know no
# compute_cap field: then candle asks nvidia-smi itself). "No devices were found" is no GPU.
query() { nvidia-smi --query-gpu="$1" --format=csv,noheader 2>/dev/null | grep -E '^[0-9]+,' || true; }
gpus=$(query index,name,compute_cap)
[ -n "$gpus" ] || gpus=$(query index,name)
if [ -z "$gpus" ]; then
  echo "gpu_check: no GPU (nvidia-smi finds none, or is not installed)" >&2
  exit 1
fi
n_gpus=$(printf '%s\n' "$gpus" | wc -l)
cap=$(printf '%s\n' "$gpus" | head -n 1 | awk -F', *' '{ gsub(/\./, "", $3); print $3 }')
if [ -z "${CUDA_COMPUTE_CAP:-}" ] && [ -n "$cap" ]; then
  export CUDA_COMPUTE_CAP=$cap
fi
target=${MOTRAIN_GPU_TARGET_DIR:-$root/target/gpu}
mpirun=${MPIRUN:-mpirun}
if [ -n "${MOTRAIN_GPU_CHECK_DIR:-}" ]; then
  work=$MOTRAIN_GPU_CHECK_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
echo "gpu_check: $n_gpus GPU(s), CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-from nvidia-smi}, target dir $target"
printf '%s\n' "$gpus" | sed 's/^/  /'

multi=0
if [ "$n_gpus" -ge 2 ]; then
  if command -v "$mpirun" >/dev/null 2>&1; then
    multi=1
  else
    echo "gpu_check: $n_gpus GPUs but no $mpirun: the NCCL checks are skipped" >&2
  fi
fi

results=()
failed=0
# record CHECK RESULT FIGURE
record() {
  results+=("$1|$2|$3")
  if [ "$2" = FAIL ]; then failed=1; fi
  printf '== %-44s %-5s %s (%ds so far)\n' "$1" "$2" "$3" "$SECONDS"
}
# run LOG CMD...: runs CMD with its output in LOG; on failure prints LOG's tail.
run() {
  local log=$1
  shift
  if "$@" >"$log" 2>&1; then
    return 0
  fi
  echo "-- failed: $* (last lines of $log)" >&2
  tail -n 25 "$log" >&2
  return 1
}
# json_field LINE KEY: a number from a flat JSON object line.
json_field() {
  printf '%s\n' "$1" | grep -oE "\"$2\":[-0-9.eE+]+" | head -n 1 | cut -d: -f2
}

# 1. Builds.
cuda_bin=$work/motrain-cuda
t0=$SECONDS
if run "$work/build-cuda.log" env CARGO_TARGET_DIR="$target" cargo build --release --features cuda; then
  cp "$target/release/motrain" "$cuda_bin"
  record "build --features cuda" PASS "$((SECONDS - t0)) s"
else
  record "build --features cuda" FAIL "$((SECONDS - t0)) s"
  cuda_bin=
fi
nccl_bin=
if [ "$multi" = 1 ]; then
  t0=$SECONDS
  if run "$work/build-nccl.log" env CARGO_TARGET_DIR="$target" cargo build --release --features nccl; then
    nccl_bin=$work/motrain-nccl
    cp "$target/release/motrain" "$nccl_bin"
    record "build --features nccl (cuda, nccl, mpi)" PASS "$((SECONDS - t0)) s"
  else
    record "build --features nccl (cuda, nccl, mpi)" FAIL "$((SECONDS - t0)) s"
  fi
fi

# 2. The CUDA tests (their names hold "cuda" or "nccl"; the NCCL one needs the nccl build).
t0=$SECONDS
features=cuda
filters=(cuda)
if [ -n "$nccl_bin" ]; then
  features=nccl
  filters=(cuda nccl)
fi
if run "$work/test.log" env CARGO_TARGET_DIR="$target" \
  cargo test --release --features "$features" --lib -- "${filters[@]}"; then
  passed=$(grep -oE '[0-9]+ passed' "$work/test.log" | tail -n 1)
  record "cargo test --features $features (CUDA tests)" PASS "${passed:-?}, $((SECONDS - t0)) s"
else
  record "cargo test --features $features (CUDA tests)" FAIL "$((SECONDS - t0)) s"
fi

# 3. One-GPU benches.
run_bench() { # NAME LOG BIN CONFIG [--set K=V ...]
  local name=$1 log=$2 bin=$3 config=$4
  shift 4
  local t0=$SECONDS line
  if [ -n "$bin" ] &&
    run "$log" "$bin" bench --config "$config" --steps 10 --warmup 3 --set run.device=cuda "$@"; then
    line=$(grep -E '^\{' "$log" | tail -n 1)
    record "$name" PASS "$(printf '%.0f tokens/s, %.3f s/step' \
      "$(json_field "$line" tokens_per_s)" "$(json_field "$line" step_time_s)")"
  else
    record "$name" FAIL "$((SECONDS - t0)) s"
  fi
}
run_bench "bench dense (1 GPU, f32)" "$work/bench-dense.log" "$cuda_bin" configs/bench-dense.toml
run_bench "bench MoT (1 GPU, f32)" "$work/bench-mot.log" "$cuda_bin" configs/bench-mot.toml
run_bench "bench MoT (1 GPU, bf16)" "$work/bench-mot-bf16.log" "$cuda_bin" configs/bench-mot.toml \
  --set run.dtype=bf16

# 4. Two ranks with NCCL against one rank.
if [ -n "$nccl_bin" ]; then
  t0=$SECONDS
  common=(--config configs/dense-tiny.toml --set run.device=cuda --set "run.out_dir=$work/runs"
    --set train.steps=30 --set train.batch_size=16 --set train.micro_batch_size=8
    --set train.log_every=1 --set train.eval_every=15 --set train.ckpt_every=0)
  # Open MPI passes exported variables to the ranks with -x; root needs its consent.
  export MOTRAIN_COLLECTIVE_TIMEOUT_S=${MOTRAIN_COLLECTIVE_TIMEOUT_S:-60}
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  mpi=("$mpirun" -n 2 -x MOTRAIN_COLLECTIVE_TIMEOUT_S)
  if run "$work/train-one.log" "$nccl_bin" train "${common[@]}" --set run.name=one &&
    run "$work/train-two.log" "${mpi[@]}" "$nccl_bin" train "${common[@]}" --set run.name=two; then
    # Training lines (no "split") as "step loss", one per line.
    losses() {
      awk 'function field(key,   m) {
             if (!match($0, "\"" key "\":[-0-9.eE+]+")) return "?"
             m = substr($0, RSTART, RLENGTH); sub(/^[^:]*:/, "", m); return m }
           !/"split"/ { print field("step"), field("loss") }' "$1"
    }
    one=$work/runs/one/metrics.jsonl two=$work/runs/two/metrics.jsonl
    verdict=$(paste -d' ' <(losses "$one") <(losses "$two") | awk '
      $2 == "?" || $4 == "?" || $2 == 0 { bad = "unreadable loss at step " $1; next }
      { n++; d = $2 - $4; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2)
        if ($1 != $3) bad = "steps out of line at " $1 " / " $3
        if (r > worst) worst = r }
      END { if (n < 30) bad = bad " only " n " steps"
            if (worst > 1e-5) bad = bad " max rel. diff " worst
            sub(/^ /, "", bad); if (bad != "") print "FAIL " bad; else printf "PASS 30 steps, max rel. diff %.1e\n", worst }')
    if ! grep -q '2 ranks, NCCL' "$work/train-two.log"; then
      verdict="FAIL the 2-rank run did not use NCCL (no \"2 ranks, NCCL\" line)"
    fi
    record "2 ranks (NCCL) = 1 rank, B/2 micro-batches" "${verdict%% *}" "${verdict#* }"
  else
    record "2 ranks (NCCL) = 1 rank, B/2 micro-batches" FAIL "$((SECONDS - t0)) s"
  fi
  t0=$SECONDS
  if run "$work/bench-two.log" "${mpi[@]}" "$nccl_bin" bench --config configs/bench-dense.toml \
    --steps 10 --warmup 3 --set run.device=cuda; then
    line=$(grep -E '^\{' "$work/bench-two.log" | tail -n 1)
    record "bench dense (2 GPUs, NCCL)" PASS "$(printf '%.0f tokens/s, comm %.1f%% of a step' \
      "$(json_field "$line" tokens_per_s)" "$(awk -v c="$(json_field "$line" comm_share)" 'BEGIN { print 100 * c }')")"
  else
    record "bench dense (2 GPUs, NCCL)" FAIL "$((SECONDS - t0)) s"
  fi
else
  why="the nccl build failed"
  [ "$multi" = 1 ] || why="needs $mpirun"
  [ "$n_gpus" -ge 2 ] || why="needs 2 GPUs"
  record "2 ranks (NCCL) = 1 rank, B/2 micro-batches" SKIP "$why"
fi

echo
printf '%-46s %-6s %s\n' check result figure
printf '%-46s %-6s %s\n' ----- ------ ------
for r in "${results[@]}"; do
  IFS='|' read -r check result figure <<<"$r"
  printf '%-46s %-6s %s\n' "$check" "$result" "$figure"
done
echo "total: ${SECONDS} s"
exit "$failed"
