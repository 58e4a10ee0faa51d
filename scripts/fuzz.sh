#!/usr/bin/env bash
# Fuzzes the parsers of untrusted files with cargo-fuzz (libFuzzer), each target for a bounded
# time. Not run by CI.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 60 s; shard checkpoint config)
#
# Targets (fuzz/fuzz_targets/, logic in fuzz/harness.rs, shared with tests/hostile_files.rs):
#   shard       Shard::open (llmc, nanogpt) + get/read + EvalStream batches
#   checkpoint  load_state + load_tensors + Params::load into the model the state describes
#   config      Config::from_toml_str / Config::load / apply_override + the config.toml round trip
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Only a stable toolchain exists here, so the
# nightly flags cargo-fuzz passes are unlocked with RUSTC_BOOTSTRAP=1. No sanitizer (motrain is
# safe Rust on jemalloc, whose allocations ASan would not see), but debug assertions and overflow
# checks are on (-a). One worker process (-fork=1) that goes on after a crash, timeout or OOM, so
# one run reports them all. A 1 GiB address-space limit: the harness needs under 100 MB, so an
# input that makes motrain allocate more is a memory bomb, and it aborts at once (a crash
# libFuzzer records) instead of eating the machine's memory.
#
# New corpus entries go to fuzz/work/<target>/ (git-ignored), seeded from the committed
# fuzz/corpus/<target>/ (regenerate with fuzz/make_corpus.sh); crashes land in
# fuzz/artifacts/<target>/. Reproduce one from fuzz/, keeping the limit (a memory bomb without
# it can take the machine):
#   (ulimit -v 1048576; target/x86_64-unknown-linux-gnu/release/TARGET artifacts/TARGET/crash-...)
# then add its bytes as a case in tests/hostile_files.rs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(shard checkpoint config)
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1
host="$(rustc -vV | sed -n 's/^host: //p')"
found=0
for t in "${targets[@]}"; do
  mkdir -p "work/$t" "artifacts/$t"
  before=$(ls "artifacts/$t" | wc -l)
  dict=()
  [ -f "dicts/$t.dict" ] && dict=("-dict=dicts/$t.dict")
  # Build outside the memory limit, then run the binary itself (`cargo fuzz run` would rebuild
  # under the limit whenever src/ changed in between).
  cargo fuzz build -s none -a "$t"
  echo "== $t: ${secs}s"
  set +e
  (
    ulimit -v 1048576
    exec "target/$host/release/$t" -artifact_prefix="artifacts/$t/" \
      -max_total_time="$secs" -timeout=10 -rss_limit_mb=768 -print_final_stats=1 \
      -fork=1 -ignore_crashes=1 -ignore_ooms=1 -ignore_timeouts=1 "${dict[@]}" "work/$t" "corpus/$t"
  ) >"work/$t.log" 2>&1
  rc=$?
  set -e
  grep -E '^#[0-9]+: ' "work/$t.log" | tail -n 1 || true
  after=$(ls "artifacts/$t" | wc -l)
  if [ "$rc" -ne 0 ] || [ "$after" -gt "$before" ]; then
    echo "!! $t: exit $rc, $((after - before)) new file(s) in fuzz/artifacts/$t/ (log: fuzz/work/$t.log)"
    found=1
  fi
done
rm -rf "${TMPDIR:-/tmp}"/motrain-fuzz-shard-* "${TMPDIR:-/tmp}"/motrain-fuzz-checkpoint-* "${TMPDIR:-/tmp}"/motrain-fuzz-config-*
exit $found
