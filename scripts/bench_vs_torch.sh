#!/usr/bin/env bash
# motrain vs PyTorch on the same config, measured back to back in one run (idle machine!).
# Usage: scripts/bench_vs_torch.sh [CONFIG] [STEPS] [ROUNDS]
# Needs a venv with torch: python3 -m venv /work/venv-torch && /work/venv-torch/bin/pip install torch numpy safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/bench-dense.toml}
steps=${2:-10}
rounds=${3:-2}
py=${TORCH_PYTHON:-/work/venv-torch/bin/python}
cargo build --release -q
for r in $(seq "$rounds"); do
  m=$(./target/release/motrain bench --config "$config" --steps "$steps" --warmup 2 2>/dev/null | tail -1)
  t=$("$py" scripts/torch_baseline.py bench --config "$config" --steps "$steps" --warmup 2 --threads 2 2>/dev/null | tail -1)
  python3 - "$m" "$t" <<'PY'
import json, sys
m, t = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"motrain {m['tokens_per_s']:.0f} tok/s | pytorch {t['tokens_per_s']:.0f} tok/s | ratio {m['tokens_per_s'] / t['tokens_per_s']:.2f}")
PY
done
