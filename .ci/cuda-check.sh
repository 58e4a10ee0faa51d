#!/usr/bin/env bash
# CI: the `cuda` and `nccl` features build and link, and the Mixture of Tokens kernels assemble
# for sm_80 (A100) and sm_90 (H100). CI has no GPU, so nothing here runs a kernel (docs/cuda.md).
#
# - One build, `--features cuda,nccl`: `nccl` brings `cuda` and `mpi` along, so it compiles
#   every GPU code path (NCCL's gradient sums, bootstrapped over MPI) as well as the plain CUDA
#   one. The `mpi` part needs libopenmpi-dev and libclang-dev, which .ci/run's host has.
# - The toolchain is the build-only CUDA 13.0 from PyPI wheels that .ci/cuda-toolchain.sh
#   installs: nvcc, headers, link stubs. It is the project's ../shared/tools/cuda-toolchain.sh
#   plus a link stub for libnccl, which the shared recipe does not make (yet); both install the
#   same layout, so a cache made by either serves. It goes outside the repository, into ~/.cache
#   unless MOTRAIN_CUDA_TOOLCHAIN says otherwise.
# - The build has its own target dir, so it never invalidates the CPU build of `cargo test`.
#   Cold, it is dominated by candle's own CUDA kernels (~15 min on 2 cores); keep the dir
#   between runs to skip that.
# - CUDA_COMPUTE_CAP=80: the embedded PTX then targets the oldest GPU we support and ptxas can
#   assemble it for both sm_80 and sm_90 (PTX for 9.0 does not assemble for 8.0).
#
# Overrides: MOTRAIN_CUDA_TOOLCHAIN (install prefix), MOTRAIN_CUDA_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# Ours, not ../shared/tools/cuda-toolchain.sh: the `nccl` feature links libnccl (see above).
toolchain_script=$root/.ci/cuda-toolchain.sh
prefix=${MOTRAIN_CUDA_TOOLCHAIN:-${XDG_CACHE_HOME:-$HOME/.cache}/motrain/cuda-toolchain}
# Kept outside the clone, like the toolchain, so that a fresh clone reuses candle's compiled CUDA
# kernels (a cold build of `cuda,nccl` takes 15-35 min on 2 cores; the script works cold too).
target=${MOTRAIN_CUDA_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/motrain/cuda-target}

stage() { printf '\n== cuda-check: %s (%ds so far)\n' "$1" "$SECONDS"; }

if [ ! -f "$toolchain_script" ]; then
  echo "cuda-check: $toolchain_script not found" >&2
  exit 1
fi

stage "toolchain into $prefix"
# The stub generator reads cudarc's sources; fetching the locked dependencies provides them.
cargo fetch >/dev/null
export CUDA_COMPUTE_CAP=80
# Captured first: a failure inside eval "$(...)" would go unnoticed.
toolchain_env=$(bash "$toolchain_script" "$prefix")
eval "$toolchain_env"
nvcc --version | tail -n 2

stage "cargo build --release --features cuda,nccl (target dir $target)"
CARGO_TARGET_DIR=$target cargo build --release --features cuda,nccl

stage "cargo clippy --release --all-targets --features cuda,nccl -- -D warnings"
# The GPU-only code (src/ops/mot_cuda.rs, src/dist/nccl.rs, their tests) is compiled nowhere
# else. --release reuses the build's kernels (a dev-profile check would compile them again).
CARGO_TARGET_DIR=$target cargo clippy --release --all-targets --features cuda,nccl -- -D warnings

stage "ptxas -v on the embedded PTX"
# The newest build of the package holds the PTX just embedded (older ones may linger).
ptx=$(ls -t "$target"/release/build/motrain-*/out/mot.ptx 2>/dev/null | head -n 1 || true)
if [ -z "$ptx" ]; then
  echo "cuda-check: the build produced no mot.ptx under $target/release/build" >&2
  exit 1
fi
echo "$ptx"
grep -m1 '^\.target' "$ptx"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '%-6s %-24s %9s %11s %15s\n' arch kernel registers "smem (B)" "spills (B st/ld)"
for arch in 80 90; do
  ptxas -arch=sm_$arch -v "$ptx" -o "$tmp/mot.cubin" 2>"$tmp/report" || { cat "$tmp/report" >&2; exit 1; }
  # ptxas -v reports per entry: "Compiling entry function 'K' for 'sm_80'", then
  # "N bytes stack frame, A bytes spill stores, B bytes spill loads", then "Used R registers,
  # ..., S bytes smem, ..." (smem is omitted when zero).
  awk -v arch="sm_$arch" '
    /Compiling entry function/ { split($0, q, "'\''"); k = q[2]; st = 0; ld = 0 }
    /bytes spill stores/       { for (i = 1; i <= NF; i++) { if ($(i+1) $(i+2) $(i+3) == "bytesspillstores,") st = $i; if ($(i+1) $(i+2) $(i+3) == "bytesspillloads") ld = $i } }
    /Used [0-9]+ registers/    { r = ""; s = 0
                                 for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^registers/) r = $i; if ($(i+1) == "bytes" && $(i+2) ~ /^smem/) s = $i }
                                 printf "%-6s %-24s %9s %11s %15s\n", arch, k, r, s, st "/" ld
                                 if (st + ld > 0) spilled = 1 }
    END { if (spilled) print "warning: " arch " kernels spill registers to local memory" }
  ' "$tmp/report"
done

stage "done"
