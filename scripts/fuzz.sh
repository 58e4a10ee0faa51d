#!/usr/bin/env bash
# Fuzzes the parsers of untrusted files with cargo-fuzz (libFuzzer), each target for a bounded
# time. Not run by CI. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60 s,
# every target: shard, checkpoint, config).
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Only a stable toolchain exists here, so the
# nightly flags cargo-fuzz passes are unlocked with RUSTC_BOOTSTRAP=1. No sanitizer (motrain is
# safe Rust on jemalloc, which ASan would not see into), but debug assertions and overflow checks
# are on (-a). One worker, and a 4 GiB address-space limit, so that an input asking for a huge
# allocation fails fast (a crash libFuzzer records) instead of eating the machine.
#
# New corpus entries go to fuzz/work/<target> (git-ignored), seeded from the committed
# fuzz/corpus/<target>; crashes land in fuzz/artifacts/<target>/. Reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -a TARGET fuzz/artifacts/TARGET/crash-...
# (run from the repository root), then turn it into a test in tests/hostile_files.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(shard checkpoint config)
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1
cd fuzz
cargo fuzz build -s none -a
status=0
for t in "${targets[@]}"; do
  mkdir -p "work/$t" "artifacts/$t"
  echo "== fuzzing $t for ${secs}s"
  set +e
  (
    ulimit -v 4194304
    exec cargo fuzz run -s none -a "$t" "work/$t" "corpus/$t" -- \
      -max_total_time="$secs" -jobs=1 -workers=1 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
  ) >"work/$t.log" 2>&1
  rc=$?
  set -e
  grep -E "^#[0-9]+ +DONE|stat::number_of_executed_units|stat::average_exec_per_sec|panicked at|ERROR:|SUMMARY|Test unit written" "work/$t.log" || true
  if [ $rc -ne 0 ]; then
    echo "!! $t found a crash (exit $rc): see fuzz/work/$t.log and fuzz/artifacts/$t/"
    status=1
  fi
done
exit $status
