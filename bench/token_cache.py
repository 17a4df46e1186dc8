"""The on-disk token cache: tokenizing a split afresh against reading it back, in one process.

    .venv/bin/python bench/token_cache.py            # IMDb train from ../shared/data, writes bench/RESULTS-token-cache.md

Each round tokenizes the split with peftkit's own ``data.tokenize`` three ways, in turn:
without the cache, with an empty cache (tokenize, then write the entry), and with the entry
present (read back). The cache lives in a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "imdb" / "train.jsonl.gz"))
    p.add_argument("--text-column", default="text")
    p.add_argument("--model", default="minilm")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-token-cache.md"))
    args = p.parse_args()
    if not Path(args.data).is_file():
        print(f"token_cache.py: no data file {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    opener = gzip.open if args.data.endswith(".gz") else open
    with opener(args.data, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)[args.text_column] for line in f if line.strip()]

    from transformers import AutoTokenizer

    from peftkit import token_cache
    from peftkit.assets import resolve_model
    from peftkit.data import tokenize

    tok = AutoTokenizer.from_pretrained(str(resolve_model(args.model)) if not Path(args.model).is_dir() else args.model)
    seconds: dict[str, list[float]] = {"no cache": [], "cold cache (tokenize + write)": [], "warm cache (read)": []}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PEFTKIT_CACHE"] = tmp
        reference = None
        for _ in range(args.rounds):
            for name in seconds:
                if name.startswith("cold"):
                    for entry in Path(tmp, "tokens").glob("*.npz"):
                        entry.unlink()
                began = time.perf_counter()
                feats = tokenize(tok, texts, args.max_length, cache=not name.startswith("no"))
                seconds[name].append(time.perf_counter() - began)
                reference = reference or feats
                assert feats == reference, f"{name} gave other features"
        size = sum(e.stat().st_size for e in Path(tmp, "tokens").glob("*.npz"))
    key = token_cache.cache_key(tok, texts, args.max_length)
    base = statistics.median(seconds["no cache"])
    lines = [
        "# Token cache: tokenizing afresh against reading the cached split",
        "",
        *header("token_cache.py"),
        f"- data: {args.data} ({len(texts):,} texts), model {args.model} tokenizer, max length {args.max_length}; "
        f"medians of {args.rounds} rounds, the three ways in turn each round; every way gave the same features",
        f"- cache entry: {size / 2**20:.1f} MiB (key {key})",
        "",
        "| way | seconds (median) | relative to no cache |",
        "|---|---|---|",
    ]
    for name, values in seconds.items():
        lines.append(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.3f} |")
    write_report(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
