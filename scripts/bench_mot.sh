#!/usr/bin/env bash
# Mixture of Tokens against dense, measured back to back in one run (idle machine!):
#  - the FLOP-matched MoT model of configs/bench-mot.toml (d 256, 4 blocks, E 16, G 16, seq 256,
#    batch 32) against the same dense model (target: >= 0.85x its tokens/s, <= 1.3x its peak RSS);
#  - the same MoT model with the plain tensor formulation of the mixing ops (MOTRAIN_MOT_OPS=plain),
#    to show what the fused kernels buy;
#  - the same MoT model with train.recompute_experts = true (the experts' hidden activations are
#    recomputed in backward instead of kept): what the memory target costs in speed.
# Rounds alternate the three, so a machine whose speed drifts hurts them alike.
# Usage: scripts/bench_mot.sh [STEPS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-6}
rounds=${2:-2}
cargo build --release -q
run() { ./target/release/motrain bench --steps "$steps" --warmup 2 "$@" 2>/dev/null | tail -1; }
for r in $(seq "$rounds"); do
  dense=$(run --config configs/bench-dense.toml --set train.batch_size=32)
  mot=$(run --config configs/bench-mot.toml)
  plain=$(MOTRAIN_MOT_OPS=plain run --config configs/bench-mot.toml)
  recomp=$(run --config configs/bench-mot.toml --set train.recompute_experts=true)
  python3 - "$r" "$dense" "$mot" "$plain" "$recomp" <<'PY'
import json, sys
r = sys.argv[1]
d, m, p, c = (json.loads(x) for x in sys.argv[2:])
t = lambda x: x["tokens_per_s"]
mib = lambda x: x["peak_rss_bytes"] / 2**20
print(f"round {r}: dense {t(d):.0f} tok/s | MoT fused {t(m):.0f} tok/s ({t(m)/t(d):.2f}x dense) | "
      f"MoT plain ops {t(p):.0f} tok/s (fused {t(m)/t(p):.2f}x plain) | "
      f"peak RSS dense {mib(d):.0f} MiB, MoT {mib(m):.0f} MiB ({mib(m)/mib(d):.2f}x), plain {mib(p):.0f} MiB")
print(f"         MoT recompute_experts {t(c):.0f} tok/s ({t(c)/t(d):.2f}x dense) | peak RSS {mib(c):.0f} MiB ({mib(c)/mib(d):.2f}x dense)")
x = m["experts"]
print(f"         experts alone, one layer, forward + backward: kept {x['kept_ms']:.1f} ms, recomputed {x['recomputed_ms']:.1f} ms ({x['cost']:.2f}x)")
o = m["mot_ops"]
print(f"         mixing ops alone, one layer, forward + backward: fused {o['fused_ms']:.2f} ms, plain {o['plain_ms']:.2f} ms ({o['speedup']:.2f}x)")
PY
done
