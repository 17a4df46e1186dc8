"""Long run (not in CI): LoRA on all 25,000 IMDb training reviews, one epoch, max length 256;
test accuracy on all 25,000 test reviews, and the total time.

IMDb has no validation split. The run monitors a fixed 1,000-review sample of the test set
(one evaluation, at the end of the only epoch, so it chooses nothing: the adapter tested is
the final one) and then scores the whole test set.

    .venv/bin/python bench/imdb_long.py                  # writes bench/RESULTS-imdb.md
    .venv/bin/python bench/imdb_long.py train.epochs=0.02 # overrides go to peftkit train
"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "imdb"
RECIPE = ROOT / "recipes" / "sentiment-minilm-lora.yaml"
SETTINGS = [
    "data.max_length=256",
    "train.epochs=1",
    "train.batch_size=32",
    "train.eval_steps=null",
    "method.r=16",
    "method.alpha=32",
    "method.target_modules=all-linear",
    "train.lr=1e-3",
]


def data_folder(out: Path) -> Path:
    """train = every training review; validation = 1,000 test reviews (seeded); test = all."""
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(DATA / "test.jsonl.gz", "rt", encoding="utf-8") as f:
        test = f.read().rstrip("\n").split("\n")
    sample = sorted(random.Random(0).sample(range(len(test)), 1000))
    (folder / "validation.jsonl").write_text("\n".join(test[i] for i in sample) + "\n", encoding="utf-8")
    for split in ("train", "test"):
        link = folder / f"{split}.jsonl.gz"
        if not link.exists():
            link.symlink_to(DATA / f"{split}.jsonl.gz")
    return folder


def main() -> int:
    if not DATA.is_dir():
        print(f"no IMDb data at {DATA} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    out = ROOT / "runs" / "bench-imdb"
    folder = data_folder(out)
    cmd = [
        sys.executable,
        "-m",
        "peftkit",
        "train",
        str(RECIPE),
        f"dataset={folder}",
        f"output_dir={out / 'run'}",
        "overwrite=true",
        *SETTINGS,
        *sys.argv[1:],
    ]
    print("$", " ".join(cmd[1:]), flush=True)
    began = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    total = time.perf_counter() - began
    s = json.loads((out / "run" / "summary.json").read_text())
    test = s["test"]
    lines = [
        "# IMDb long run: LoRA on MiniLM, all 25,000 training reviews, one epoch, max length 256",
        "",
        *header("imdb_long.py"),
        f"- settings: recipes/sentiment-minilm-lora.yaml with {' '.join(SETTINGS)}",
        "",
        "| train reviews | steps | precision | test reviews | test accuracy | test F1 | train loop (s) "
        "| test eval (s) | total, process start to end (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['train_examples']} | {s['steps']} | {s.get('mixed_precision', 'no')} | {test['n']} "
        f"| {test['accuracy']:.4f} | {test['f1']:.4f} | {s['train_seconds']:.0f} "
        f"| {s.get('test_seconds', float('nan')):.0f} | {total:.0f} | {s['peak_rss_bytes'] / 2**20:.0f} |",
    ]
    write_report(ROOT / "bench" / "RESULTS-imdb.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
