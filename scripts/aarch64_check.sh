#!/usr/bin/env bash
# aarch64 (NEON) build check from an x86-64 machine: cross-build with Debian's gcc-aarch64,
# run the library tests (every fused kernel against its plain formulation and finite
# differences) and a tiny training run under qemu-aarch64. Takes ~15 min cold on 2 cores.
# Usage: scripts/aarch64_check.sh   (needs rustup's aarch64-unknown-linux-gnu target)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
rustup target add "$target"
command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null \
  || { apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user || { apt-get update -q && apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user; }; }
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
dir=target/cross
# Three tests re-run their own test binary as a child process; without binfmt_misc for qemu
# (containers) the kernel cannot exec an aarch64 binary, so they are left out here.
cargo test --release --target "$target" --target-dir "$dir" --lib -- \
  --skip dist::watchdog::tests::a_hung_collective --skip dist::watchdog::tests::collectives_that \
  --skip signals::tests::one_sigint
cargo build --release --target "$target" --target-dir "$dir"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
first=$($CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER "$dir/$target/release/motrain" train \
  --config configs/quickstart.toml --set run.out_dir="$out" --set train.steps=3 \
  --set model.d_model=16 --set model.n_layers=1 --set model.n_heads=2 --set model.d_ff=32 \
  --set train.batch_size=2 --set data.seq_len=16 --set train.eval_every=0)
echo "aarch64: ${first%%$'\n'*}"
[[ "${first%%$'\n'*}" == *"| simd neon" ]] || { echo "aarch64-check: expected the neon path"; exit 1; }
echo "aarch64-check: ok"
