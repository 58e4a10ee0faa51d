#!/usr/bin/env bash
# Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/) from real files: tiny llm.c
# and nanoGPT shards, and a state.json + model.safetensors that `motrain train` writes for a tiny
# config. Run from anywhere after `cargo build --release`; the seeds are committed, so this is
# only needed when a file format changes.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="$root/target/release/motrain"
[ -x "$bin" ] || { echo "build motrain first: cargo build --release" >&2; exit 1; }
corpus="$root/fuzz/corpus"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$corpus/shard" "$corpus/checkpoint" "$corpus/config" "$work/shards"

# Shards: uint16 llm.c (train + val), uint32 llm.c, headerless nanoGPT, an empty llm.c shard.
python3 - "$work/shards" "$corpus/shard" <<'PY'
import struct, sys
work, corpus = sys.argv[1], sys.argv[2]
def llmc(tokens, wide=False):
    h = [0] * 256
    h[0], h[1], h[2] = (20240801, 7, len(tokens)) if wide else (20240520, 1, len(tokens))
    return struct.pack("<256i", *h) + struct.pack("<%d%s" % (len(tokens), "I" if wide else "H"), *tokens)
pattern = lambda n: [(i * 7 + 3) % 16 for i in range(n)]
open(f"{work}/tiny_train_000000.bin", "wb").write(llmc(pattern(200)))
open(f"{work}/tiny_val_000000.bin", "wb").write(llmc(pattern(40)))
open(f"{corpus}/llmc_u16.bin", "wb").write(llmc(pattern(40)))
open(f"{corpus}/llmc_u32.bin", "wb").write(llmc([0, 1, 70000, 15, 2, 3, 4, 5, 6, 7], wide=True))
open(f"{corpus}/llmc_empty.bin", "wb").write(llmc([]))
open(f"{corpus}/nanogpt.bin", "wb").write(struct.pack("<40H", *pattern(40)))
PY

cat > "$work/tiny.toml" <<'TOML'
[run]
name = "seed"
out_dir = "runs"
device = "cpu"

[data]
train = "shards/tiny_train_*.bin"
val = "shards/tiny_val_*.bin"
seq_len = 8

[model]
vocab_size = 16
d_model = 8
n_layers = 1
n_heads = 2
d_ff = 16

[train]
batch_size = 2
steps = 2
warmup_steps = 1
log_every = 1
eval_every = 2
eval_batches = 1
ckpt_every = 2
TOML
cp "$work/tiny.toml" "$corpus/config/tiny.toml"
(cd "$work" && "$bin" train --config tiny.toml >/dev/null)
ckpt="$work/runs/seed/checkpoints/$(cat "$work/runs/seed/checkpoints/latest")"
cp "$work/runs/seed/config.toml" "$corpus/config/resolved.toml"
# The config target reads NUL-separated `--set` overrides after the TOML text.
printf '%s\0model.d_model=16\0model.norm=layernorm\0train.betas=[0.8, 0.9]\0data.val=x/*.bin' \
  "$(cat "$work/tiny.toml")" > "$corpus/config/tiny_with_overrides"

# The checkpoint target reads [u32 LE length of state.json][state.json][model.safetensors].
python3 - "$ckpt" "$corpus/checkpoint" <<'PY'
import struct, sys
ckpt, corpus = sys.argv[1], sys.argv[2]
state = open(f"{ckpt}/state.json", "rb").read()
model = open(f"{ckpt}/model.safetensors", "rb").read()
open(f"{corpus}/tiny_checkpoint", "wb").write(struct.pack("<I", len(state)) + state + model)
# The same state with a minimal safetensors file (one F16 and one I64 tensor).
import json
def st(tensors):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data
small = st({"a": ("F16", [2, 2], b"\x00\x3c" * 4), "b": ("I64", [2], struct.pack("<2q", 1, -1))})
open(f"{corpus}/small_safetensors", "wb").write(struct.pack("<I", len(state)) + state + small)
# The real weights stored honestly in other dtypes: F16 (converted) and F8_E4M3 (one byte each).
n = struct.unpack("<Q", model[:8])[0]
header, data = json.loads(model[8:8 + n]), model[8 + n:]
def recode(dtype, width, encode):
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        values = struct.unpack("<%df" % ((b - a) // 4), data[a:b])
        out[name] = (dtype, t["shape"], b"".join(encode(v) for v in values))
    return st(dict(sorted(out.items(), key=lambda kv: header[kv[0]]["data_offsets"][0])))
f16 = recode("F16", 2, lambda v: struct.pack("<e", v))
f8 = recode("F8_E4M3", 1, lambda v: bytes([0x38 if v >= 0 else 0xb8]))
open(f"{corpus}/tiny_checkpoint_f16", "wb").write(struct.pack("<I", len(state)) + state + f16)
open(f"{corpus}/tiny_checkpoint_f8", "wb").write(struct.pack("<I", len(state)) + state + f8)
PY
du -sh "$corpus"
