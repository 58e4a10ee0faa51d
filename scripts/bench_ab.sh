#!/usr/bin/env bash
# Two motrain binaries (say, before and after a change) on one bench config, alternated A B A B
# so that drift in the machine's speed hits both alike; prints each run's tokens/s and the
# median ratio B/A, with the CPU it ran on.
#   scripts/bench_ab.sh BIN_A BIN_B CONFIG [ROUNDS] [STEPS] [-- --set KEY=VALUE ...]
set -euo pipefail
a=$1 b=$2 config=$3 rounds=${4:-4} steps=${5:-5}
shift $(( $# < 5 ? $# : 5 ))
[ "${1:-}" = "--" ] && shift
cpu=$(lscpu | sed -n 's/^Model name: *//p')
simd=$(grep -o -w 'avx512f\|avx512_bf16\|amx_tile\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')
echo "cpu: $cpu | $simd| $(nproc) cores | $(date -u +%F)"
tps() { "$1" bench --config "$config" --steps "$steps" "${@:2}" | tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_s"])'; }
ratios=()
for r in $(seq "$rounds"); do
  ta=$(tps "$a" "$@"); tb=$(tps "$b" "$@")
  ratio=$(python3 -c "print(f'{$tb/$ta:.3f}')")
  ratios+=("$ratio")
  printf 'round %d: A %8.0f tok/s | B %8.0f tok/s | B/A %s\n' "$r" "$ta" "$tb" "$ratio"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{v[NR]=$1} END {m=(NR%2)?v[(NR+1)/2]:(v[NR/2]+v[NR/2+1])/2; print "median B/A: " m}'
