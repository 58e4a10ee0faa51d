#!/usr/bin/env bash
# Data parallelism on one machine: one process with T threads against T ranks of one thread
# (mpirun), the same global batch in the same micro-batches, alternated so that drift hits both;
# prints tokens/s, the all-reduce time per step and its share, with the CPU.
#   scripts/bench_dp.sh [CONFIG] [ROUNDS] [STEPS] [RANKS]
# Needs a build with `--features mpi` (cargo build --release --features mpi).
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/bench-dense.toml} rounds=${2:-3} steps=${3:-5} ranks=${4:-2}
bin=./target/release/motrain
export OMPI_MCA_btl_vader_single_copy_mechanism=none
# Two micro-batches per rank-share: batch 16 in micro-batches of 16/ranks.
set_micro="train.micro_batch_size=$((16 / ranks))"
echo "cpu: $(lscpu | sed -n 's/^Model name: *//p') | $(grep -o -w 'avx512f\|avx512_bf16\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')| $(nproc) cores | $(date -u +%F)"
json() { tail -1 | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["tokens_per_s"], d["comm_s_per_step"], d["comm_share"], d["step_time_s"])'; }
for r in $(seq "$rounds"); do
  read -r a _ _ sa < <(RAYON_NUM_THREADS=$ranks $bin bench --config "$config" --steps "$steps" --set "$set_micro" 2>/dev/null | json)
  read -r b c share sb < <(mpirun --allow-run-as-root --oversubscribe -n "$ranks" -x RAYON_NUM_THREADS=1 \
      -x OMPI_MCA_btl_vader_single_copy_mechanism $bin bench --config "$config" --steps "$steps" --set "$set_micro" 2>/dev/null | json)
  python3 -c "print(f'round $r: 1 process x $ranks threads {float(\"$a\"):7.0f} tok/s ({float(\"$sa\"):.3f} s/step) | $ranks ranks x 1 thread {float(\"$b\"):7.0f} tok/s ({float(\"$sb\"):.3f} s/step), all-reduce {float(\"$c\")*1e3:.1f} ms/step = {100*float(\"$share\"):.1f} % | ranks/process {float(\"$b\")/float(\"$a\"):.3f}')"
done
