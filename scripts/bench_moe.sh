#!/usr/bin/env bash
# Sparse MoE against dense, measured back to back in one run (idle machine!):
#  - token-choice top-1, E = 8, expert_size = d_ff, capacity 1.25, vs the dense model (target ≥ 0.85×);
#  - the same with E = 16 (compute scales with top_k, not E: the step time should barely move).
# Usage: scripts/bench_moe.sh [CONFIG] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/bench-dense.toml}
steps=${2:-8}
cargo build --release -q
run() { ./target/release/motrain bench --config "$config" --steps "$steps" --warmup 2 "$@" 2>/dev/null | tail -1; }
dense=$(run --set model.ffn=dense)
e8=$(run --set model.ffn=moe --set model.moe.n_experts=8 --set model.moe.top_k=1 --set model.moe.capacity_factor=1.25)
e16=$(run --set model.ffn=moe --set model.moe.n_experts=16 --set model.moe.top_k=1 --set model.moe.capacity_factor=1.25)
python3 - "$dense" "$e8" "$e16" <<'PY'
import json, sys
d, a, b = (json.loads(x) for x in sys.argv[1:])
t = lambda r: r["tokens_per_s"]
print(f"dense {t(d):.0f} tok/s | moe E=8 {t(a):.0f} tok/s ({t(a)/t(d):.2f}x dense) | moe E=16 {t(b):.0f} tok/s ({t(b)/t(a):.2f}x E=8)")
print(f"peak RSS: dense {d['peak_rss_bytes']/2**20:.0f} MiB, E=8 {a['peak_rss_bytes']/2**20:.0f} MiB, E=16 {b['peak_rss_bytes']/2**20:.0f} MiB")
PY
