#!/usr/bin/env bash
# motrain prepare against the anchor pipeline (llm.c's fineweb.py: tiktoken GPT-2 with a
# multiprocessing.Pool) on the same generated .jsonl.zst corpus, alternated, same core count.
#
#   scripts/bench_prepare.sh [SIZE_MB]        # default 1000 MB of JSONL before compression
#   ROUNDS=2 THREADS=$(nproc) WORK=/tmp/motrain-bench-prepare VENV=/work/venv-bench
#   MOTRAIN_ONLY=1 skips the anchor (for the memory figure on a large corpus);
#   BIN=path/to/motrain skips the cargo build.
#
# The corpus is documents of 1-8 paragraphs of the repo's public-domain texts (data/raw), about
# FineWeb's average document length. Peak RSS is /usr/bin/time's maximum resident set size: for
# the anchor that is its largest single process (the Pool's workers are separate processes).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MB=${1:-1000}
ROUNDS=${ROUNDS:-2}
THREADS=${THREADS:-$(nproc)}
WORK=${WORK:-/tmp/motrain-bench-prepare}
VENV=${VENV:-/work/venv-bench}
mkdir -p "$WORK"

if [ -z "${MOTRAIN_ONLY:-}" ] && ! "$VENV/bin/python" -c 'import tiktoken, numpy, zstandard' 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q tiktoken numpy zstandard
fi
if [ -z "${BIN:-}" ]; then
    nice -n 15 cargo build --release -q
    BIN=target/release/motrain
fi
RANKS=$(ls ~/.cargo/registry/src/*/tiktoken-rs-*/assets/r50k_base.tiktoken 2>/dev/null | head -1)
[ -n "$RANKS" ] || { echo "no r50k_base.tiktoken in the cargo registry (cargo fetch first)" >&2; exit 1; }

CORPUS="$WORK/corpus_${SIZE_MB}mb.jsonl.zst"
if [ ! -f "$CORPUS" ]; then
    echo "generating $CORPUS ..." >&2
    python3 - "$SIZE_MB" <<'PY' | zstd -q -T0 -3 -o "$CORPUS"
import glob, json, random, sys
limit = int(sys.argv[1]) << 20
paras = []
for p in sorted(glob.glob("data/raw/*/*.txt")):
    paras += [x.strip() for x in open(p, encoding="utf-8").read().split("\n\n") if len(x.strip()) > 40]
r = random.Random(0)
pool = ["\n\n".join(r.choice(paras) for _ in range(r.randint(1, 8))) for _ in range(20000)]
out, n, i = sys.stdout, 0, 0
while n < limit:
    line = json.dumps({"id": i, "url": f"https://example.com/{i}", "text": r.choice(pool)}) + "\n"
    out.write(line)
    n += len(line)
    i += 1
PY
fi
echo "corpus: $CORPUS ($(du -m "$CORPUS" | cut -f1) MB compressed, ${SIZE_MB} MB JSONL)" >&2

# seconds and peak RSS (MiB) from a /usr/bin/time -v report
timing() {
    python3 - "$1" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
w = re.search(r"Elapsed \(wall clock\) time.*: (.*)", t).group(1).split(":")
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(w)))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1)) / 1024
print(f"{secs:.2f} {rss:.0f}")
PY
}

results="$WORK/results.txt"
: > "$results"
for round in $(seq 1 "$ROUNDS"); do
    rm -rf "$WORK/out_motrain"
    /usr/bin/time -v -o "$WORK/time_motrain" "$BIN" prepare --tokenizer gpt2 --input "$CORPUS" --out "$WORK/out_motrain" \
        --val-fraction 0 --threads "$THREADS" > "$WORK/motrain.out" 2> "$WORK/motrain.err"
    read -r secs rss < <(timing "$WORK/time_motrain")
    read -r docs tokens < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["documents"]["train"], m["tokens"]["train"])' "$WORK/out_motrain/prepare.json")
    echo "motrain $round $secs $rss $docs $tokens" | tee -a "$results" >&2
    if [ -z "${MOTRAIN_ONLY:-}" ]; then
        rm -rf "$WORK/out_anchor"
        /usr/bin/time -v -o "$WORK/time_anchor" "$VENV/bin/python" scripts/bench_prepare_anchor.py --input "$CORPUS" \
            --out "$WORK/out_anchor" --ranks "$RANKS" --procs "$THREADS" > "$WORK/anchor.out"
        read -r secs rss < <(timing "$WORK/time_anchor")
        read -r docs tokens < <(python3 -c 'import json,sys; m=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(m["documents"], m["tokens"])' "$WORK/anchor.out")
        echo "anchor $round $secs $rss $docs $tokens" | tee -a "$results" >&2
        # Same tokenizer, same shard size: the shards must be the same bytes.
        for f in "$WORK"/out_anchor/anchor_train_*.bin; do
            cmp -s "$f" "$WORK/out_motrain/data_train_${f##*_}" || echo "warning: $f differs from motrain's shard" >&2
        done
        rm -rf "$WORK/out_anchor"
    fi
    rm -rf "$WORK/out_motrain"
done

echo
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p') ($(nproc) cores visible, $THREADS threads/processes used); $(date -u +%F)"
echo "corpus: ${SIZE_MB} MB JSONL, $(du -m "$CORPUS" | cut -f1) MB .zst; best of $ROUNDS alternated runs"
python3 - "$results" <<'PY'
import sys
best = {}
for line in open(sys.argv[1]):
    who, _, secs, rss, docs, tokens = line.split()
    secs, rss, docs, tokens = float(secs), float(rss), int(docs), int(tokens)
    if who not in best or secs < best[who][0]:
        best[who] = (secs, rss, docs, tokens)
    else:
        best[who] = (best[who][0], max(best[who][1], rss), docs, tokens)
print(f"{'pipeline':<28}{'seconds':>10}{'docs/s':>12}{'tokens/s':>14}{'peak RSS MiB':>14}")
names = {"motrain": "motrain prepare", "anchor": "tiktoken + Pool (fineweb.py)"}
for who, (secs, rss, docs, tokens) in best.items():
    print(f"{names[who]:<28}{secs:>10.1f}{docs / secs:>12.0f}{tokens / secs:>14.0f}{rss:>14.0f}")
if len(best) == 2:
    m, a = best["motrain"], best["anchor"]
    if (m[2], m[3]) != (a[2], a[3]):
        print(f"warning: different counts: motrain {m[2]} docs {m[3]} tokens, anchor {a[2]} docs {a[3]} tokens")
    print(f"motrain / anchor documents per second: {(m[2] / m[0]) / (a[2] / a[0]):.2f}x")
PY
