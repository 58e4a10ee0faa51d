"""The anchor for scripts/bench_prepare.sh: llm.c's fineweb.py pipeline (tiktoken GPT-2 with a
multiprocessing.Pool, imap with chunksize 16, one end-of-text before each document, uint16 llm.c
shards of --shard-tokens) reading the same .jsonl.zst corpus as `motrain prepare`.

The GPT-2 ranks come from the r50k_base.tiktoken file that the tiktoken-rs crate ships (the same
ranks as tiktoken's "gpt2"), since this machine cannot download tiktoken's files."""
import argparse, io, json, multiprocessing as mp, os, sys, time

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
enc = None


def init(ranks_path):
    global enc
    enc = tiktoken.Encoding("gpt2", pat_str=PAT, mergeable_ranks=load_tiktoken_bpe(ranks_path), special_tokens={"<|endoftext|>": 50256})


def tokenize(line):
    # As fineweb.py: the document's tokens after one end-of-text, as uint16.
    tokens = [50256]
    tokens.extend(enc.encode_ordinary(json.loads(line)["text"]))
    return np.array(tokens, dtype=np.uint16)


def lines(path):
    import zstandard

    with open(path, "rb") as f:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(f), encoding="utf-8")
        for line in reader:
            if line.strip():
                yield line


def write_shard(path, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ranks", required=True)
    ap.add_argument("--procs", type=int, default=os.cpu_count())
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    start = time.time()
    buf = np.empty(a.shard_tokens, dtype=np.uint16)
    n, shard, docs, total = 0, 0, 0, 0
    with mp.Pool(a.procs, initializer=init, initargs=(a.ranks,)) as pool:
        for tokens in pool.imap(tokenize, lines(a.input), chunksize=16):
            docs += 1
            total += len(tokens)
            while len(tokens):
                take = min(len(tokens), a.shard_tokens - n)
                buf[n : n + take] = tokens[:take]
                n += take
                tokens = tokens[take:]
                if n == a.shard_tokens:
                    write_shard(os.path.join(a.out, f"anchor_train_{shard:06d}.bin"), buf[:n])
                    shard, n = shard + 1, 0
    if n:
        write_shard(os.path.join(a.out, f"anchor_train_{shard:06d}.bin"), buf[:n])
    print(json.dumps({"documents": docs, "tokens": total, "seconds": time.time() - start}))


if __name__ == "__main__":
    main()
