#!/usr/bin/env bash
# motrain vs PyTorch on the same config, measured back to back in one run (idle machine!).
#
# Prints the CPU model and the SIMD flags found in /proc/cpuinfo, then for each round runs, in
# this order:
#   - motrain f32 on each SIMD path (forced with MOTRAIN_SIMD=portable|avx2|avx512; default: every
#     path this CPU supports: portable always, avx2 with avx2+fma, avx512 with avx512f+bw+cd+dq+vl);
#   - PyTorch f32 (scripts/torch_baseline.py bench, --threads T);
#   - PyTorch with torch.autocast("cpu", dtype=torch.bfloat16) around forward+loss (f32 master
#     weights and AdamW).
# Rounds alternate all rows, so a machine whose speed drifts hurts them alike. After each round a
# table with tokens/s, peak RSS and the ratio to the PyTorch f32 row of the same round; at the end
# the median of each column over the rounds. The "other CPU" column is the CPU time that other
# processes used while the row ran, in % of all cores (from /proc/stat minus this row's own
# CPU time): a row with more than a few % was disturbed (PyTorch's OpenMP threads suffer most).
#   - motrain bf16 (run.dtype = "bf16": bf16 matmuls, f32 weights and AdamW) on CPUs with a bf16
#     dot product, on the AVX-512 path: `bf16-amx` on AMX tiles, else `bf16-dot` on AVX512_BF16.
#
# Usage: scripts/bench_vs_torch.sh [--config C] [--steps N] [--warmup W] [--rounds R]
#            [--simd "portable avx2 avx512"] [--torch "f32 bf16"] [--threads T]
#            [--bin PATH] [--set key=value]... [--as-avx2]
#   --config   TOML config (default configs/bench-dense.toml)
#   --steps    timed steps per row (default 10), --warmup untimed steps before them (default 2)
#   --rounds   rounds (default 2)
#   --simd     motrain SIMD paths to run (default: all the CPU supports; "" runs none)
#   --torch    PyTorch rows: f32 and/or bf16 (default "f32 bf16" on a CPU with AVX512_BF16 or
#              AMX, else "f32": autocast without them is ~25x slower than f32; "" runs none)
#   --threads  PyTorch intra-op threads (default: all cores, as motrain uses)
#   --bin      motrain binary (default: cargo build --release, then target/release/motrain)
#   --set      config override, passed to both (e.g. --set data.seq_len=2048)
#   --as-avx2  this CPU as an AVX2-only one: motrain built without gemm's AVX-512 kernels
#              (--no-default-features, into target/as-avx2) on the avx2 path, PyTorch f32 with
#              ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2;
#              no bf16 rows. The same memory and clocks as this CPU, so an estimate of one.
# Environment: TORCH_PYTHON (default /work/venv-torch/bin/python), a Python with torch, numpy and
# safetensors: python3 -m venv /work/venv-torch && /work/venv-torch/bin/pip install torch numpy safetensors
# Needs python3 (system) for the JSON and the tables.
set -euo pipefail
cd "$(dirname "$0")/.."

config=configs/bench-dense.toml
steps=10
warmup=2
rounds=2
simd=auto
torch_modes=auto
threads=$(nproc)
bin=
sets=()
as_avx2=
py=${TORCH_PYTHON:-/work/venv-torch/bin/python}

usage() { sed -n '/^# Usage:/,/^# Needs/p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --config) config=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --warmup) warmup=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --simd) simd=$2; shift 2 ;;
    --torch) torch_modes=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    --as-avx2) as_avx2=1; shift ;;
    -h|--help) usage 0 ;;
    *) echo "error: unknown argument $1" >&2; usage 2 >&2 ;;
  esac
done

# --- CPU and SIMD paths --------------------------------------------------------------------------
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
[ -n "$cpu" ] || cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
flags=" $(sed -n 's/^flags[[:space:]]*: //p' /proc/cpuinfo | head -1) "
has() { for f in "$@"; do case $flags in *" $f "*) ;; *) return 1 ;; esac; done; }
supported=portable
has avx2 fma && supported="$supported avx2"
has avx512f avx512bw avx512cd avx512dq avx512vl && supported="$supported avx512"
found=
for f in sse4_2 fma avx2 avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni avx512_bf16 amx_tile amx_bf16; do
  has "$f" && found="$found $f"
done
[ "$simd" = auto ] && simd=$supported
# PyTorch's bf16 autocast on a CPU without a bf16 instruction converts every operand and runs
# ~25x slower than its f32 (67 tok/s on an AVX2-only AMD EPYC): off unless asked for there.
if [ "$torch_modes" = auto ]; then
  torch_modes=f32
  if has avx512_bf16 || has amx_bf16; then torch_modes="f32 bf16"; fi
fi
if [ -n "$as_avx2" ]; then
  has avx2 fma || { echo "error: --as-avx2 needs a CPU with AVX2 and FMA" >&2; exit 2; }
  simd=avx2
  torch_modes=${torch_modes/bf16/}
  export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
fi

if [ -z "$bin" ] && [ -n "$as_avx2" ]; then
  cargo build --release -q --no-default-features --target-dir target/as-avx2
  bin=./target/as-avx2/release/motrain
elif [ -z "$bin" ]; then
  cargo build --release -q
  bin=./target/release/motrain
fi
if [ -n "$torch_modes" ] && ! "$py" -c 'import torch' 2>/dev/null; then
  echo "error: $py cannot import torch (set TORCH_PYTHON, or --torch \"\" for motrain only)" >&2
  exit 2
fi

echo "== motrain vs PyTorch: $config ${sets[*]:-}"
echo "   $steps steps (warmup $warmup) per row, $rounds round(s), PyTorch threads $threads, motrain all $(nproc) cores"
echo "CPU:        $cpu ($(nproc) cores)"
echo "CPU flags:  ${found# }"
echo "SIMD paths: supported: $supported; running: ${simd:-none}"
[ -n "$torch_modes" ] && echo "PyTorch:    $("$py" -c 'import torch; print(torch.__version__, "ATen CPU capability", torch.backends.cpu.get_cpu_capability())')"
echo "motrain:    $bin"

# --- runs ----------------------------------------------------------------------------------------
results=$(mktemp)   # one line per row: round impl precision path other-cpu-% json-or-error
errlog=$(mktemp)
timesf=$(mktemp)
trap 'rm -f "$results" "$errlog" "$timesf"' EXIT
hz=$(getconf CLK_TCK)
ncpu=$(nproc)
# busy jiffies of the whole machine (user nice system irq softirq steal)
machine_busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# CPU seconds of this shell's finished children, into $child_cpu (the `times` builtin must run in
# this shell: in a $(subshell) it would see only the subshell's children)
children_cpu() {
  times >"$timesf"
  child_cpu=$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { f = $i; sub(/s$/, "", f); split(f, a, "m"); t += a[1] * 60 + a[2] } print t }' "$timesf")
}

# record ROUND IMPL PREC PATH -- CMD...: runs CMD, keeps the last stdout line (JSON) or the error
record() {
  local round=$1 impl=$2 prec=$3 path=$4; shift 5
  local out rc=0
  echo "   [$(date +%T)] round $round: $impl $prec $path" >&2
  local busy0 cpu0 wall0 busy1 cpu1 wall1 other
  busy0=$(machine_busy); children_cpu; cpu0=$child_cpu; wall0=$(date +%s.%N)
  out=$("$@" 2>"$errlog" | tail -1) || rc=$?
  busy1=$(machine_busy); children_cpu; cpu1=$child_cpu; wall1=$(date +%s.%N)
  other=$(awk -v b="$((busy1 - busy0))" -v hz="$hz" -v c0="$cpu0" -v c1="$cpu1" -v w0="$wall0" -v w1="$wall1" -v n="$ncpu" \
    'BEGIN { o = (b / hz - (c1 - c0)) / ((w1 - w0) * n) * 100; printf "%.0f", o < 0 ? 0 : o }')
  if [ "$rc" -ne 0 ] || [ "${out#\{}" = "$out" ]; then
    out="error (exit $rc): $(grep -m1 '^error' "$errlog" || tail -1 "$errlog")"
    echo "   $impl $prec $path: $out" >&2
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$impl" "$prec" "$path" "$other" "$out" >>"$results"
}

# report ROUND|median: a table of the rows of one round, or the medians over all rounds
report() {
  python3 - "$results" "$1" <<'PY'
import json, os, statistics, sys
path, which = sys.argv[1], sys.argv[2]
rows = []
for line in open(path):
    r, impl, prec, simd, other, out = line.rstrip("\n").split("\t", 5)
    j = json.loads(out) if out.startswith("{") else None
    rows.append({"round": r, "key": (impl, prec, simd), "other": int(other), "json": j, "err": out if j is None else ""})
ref = {r["round"]: r["json"]["tokens_per_s"] for r in rows
       if r["key"] == ("pytorch", "f32", "-") and r["json"]}
def ratio(r):
    return r["json"]["tokens_per_s"] / ref[r["round"]] if r["json"] and r["round"] in ref else None
keys = list(dict.fromkeys(r["key"] for r in rows))
hdr = f"{'impl':<8} {'precision':<13} {'simd':<9} {'tokens/s':>9} {'peak RSS MiB':>13} {'vs torch f32':>13} {'other CPU':>10}"
fmt = lambda v, f: "n/a" if v is None else format(v, f)
if which == "median":
    n = len({r["round"] for r in rows})
    print(f"\nmedian over {n} round(s) (ratio: median of the per-round ratios)")
    print(hdr)
    for k in keys:
        ok = [r for r in rows if r["key"] == k and r["json"]]
        tps = statistics.median(r["json"]["tokens_per_s"] for r in ok) if ok else None
        rss = statistics.median(r["json"]["peak_rss_bytes"] / 2**20 for r in ok) if ok else None
        rat = [x for x in map(ratio, ok) if x is not None]
        med = statistics.median(rat) if rat else None
        prec = {"pytorch": "bf16-autocast", "motrain": os.environ.get("BF16_ENGINE", "bf16")}[k[0]] if k[1] == "bf16" else k[1]
        spread = f"   (tokens/s {min(r['json']['tokens_per_s'] for r in ok):.0f}..{max(r['json']['tokens_per_s'] for r in ok):.0f})" if len(ok) > 1 else ""
        busy = max((r["other"] for r in rows if r["key"] == k), default=0)
        print(f"{k[0]:<8} {prec:<13} {k[2]:<9} {fmt(tps, '9.0f'):>9} {fmt(rss, '13.0f'):>13} {fmt(med, '12.2f') + ('x' if med else ''):>13} {f'max {busy}%':>10}{spread}")
else:
    print(f"\nround {which}")
    print(hdr)
    for r in rows:
        if r["round"] != which:
            continue
        impl, prec, simd = r["key"]
        prec = {"pytorch": "bf16-autocast", "motrain": os.environ.get("BF16_ENGINE", "bf16")}[impl] if prec == "bf16" else prec
        if r["json"] is None:
            print(f"{impl:<8} {prec:<13} {simd:<9} {r['err']}")
            continue
        j, rt = r["json"], ratio(r)
        print(f"{impl:<8} {prec:<13} {simd:<9} {j['tokens_per_s']:9.0f} {j['peak_rss_bytes'] / 2**20:13.0f} {fmt(rt, '12.2f') + ('x' if rt else ''):>13} {str(r['other']) + '%':>10}")
PY
}

# motrain's bf16 engine on this CPU (ops::bf16): the tiles where it has them.
if grep -qw amx_bf16 /proc/cpuinfo; then export BF16_ENGINE=bf16-amx; else export BF16_ENGINE=bf16-dot; fi
skip_torch=" "   # torch modes that failed with a usage/config error (exit 2): not retried
for r in $(seq "$rounds"); do
  for s in $simd; do
    record "$r" motrain f32 "$s" -- env MOTRAIN_SIMD="$s" "$bin" bench --config "$config" \
      --steps "$steps" --warmup "$warmup" "${sets[@]}"
  done
  if grep -qw avx512_bf16 /proc/cpuinfo && [ -n "$simd" ] && [ -z "$as_avx2" ]; then
    record "$r" motrain bf16 avx512 -- env MOTRAIN_SIMD=avx512 "$bin" bench --config "$config" \
      --steps "$steps" --warmup "$warmup" "${sets[@]}" --set 'run.dtype="bf16"'
  fi
  for m in $torch_modes; do
    case $skip_torch in *" $m "*) continue ;; esac
    ac=none; [ "$m" = bf16 ] && ac=bf16
    record "$r" pytorch "$m" - -- "$py" scripts/torch_baseline.py bench --config "$config" \
      --steps "$steps" --warmup "$warmup" --threads "$threads" --device cpu --autocast "$ac" "${sets[@]}"
    case $(tail -1 "$results") in *"error (exit 2)"*) skip_torch="$skip_torch$m " ;; esac
  done
  report "$r"
done
report median
