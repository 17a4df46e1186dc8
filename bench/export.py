"""Benchmark: exported files in their runtimes, against peftkit with the adapter unmerged.

**GGUF** (llama.cpp through llama-cpp-python; ``make llama-cpp`` builds it). A SmolLM2-135M LoRA adapter
(default: ``runs/smollm2-sentiment-lora/adapter``, from ``peftkit train
recipes/smollm2-sentiment-lora.yaml``) is exported merged as f32, f16 and q8_0, and adapter-only on an
f32 base. Each file continues 5 prompts greedily for 32 tokens (``--raw``: the text as it is, so the
answer is long) and is compared with peftkit's greedy tokens (``peftkit generate --temperature 0``'s
path): tokens equal before the first difference, and the largest logit difference on the prompt
(llama.cpp's KV cache in float32, as the tests run it).

**ONNX** (ONNX Runtime). The demo classifier (default: ``runs/sentiment-minilm-lora/adapter``, from
``make demo``) exported as float32 and int8. On the Rotten Tomatoes test split, each runtime
classifies the same texts in batches of 32 in a process of its own (peak RSS is that process's
``VmHWM``): torch eager (the merged transformers model, float32), ONNX Runtime float32 and int8
through the exported ``classify.py`` in a process where ``torch`` cannot be imported.

    .venv/bin/python bench/export.py                   # writes bench/RESULTS-export.md
    .venv/bin/python bench/export.py --part onnx --limit 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The best way to spend a rainy afternoon is",
    "Review: A moving, funny film with a great cast.\nIs this review positive or negative?",
    "Here is a short story about a lighthouse keeper:",
    "The three most important things when learning to cook are",
    "Python is a programming language that",
]


def gguf_part(adapter: Path, work: Path) -> list[str]:
    import numpy as np
    import torch
    from llama_cpp import Llama

    from peftkit.export import export_gguf
    from peftkit.multi import load_adapted_lm

    lm = load_adapted_lm(adapter)
    prompts = [lm.prompt_ids(p, raw=True) for p in PROMPTS]
    stops = lm.encoder.stop_ids
    want, want_logits = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = lm.model.generate(x, max_new_tokens=32, do_sample=False, eos_token_id=stops, pad_token_id=0)
            tokens = out[0, len(ids) :].tolist()
            want.append(tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))])
            want_logits.append(lm.model(x).logits[0].float().numpy())
    files = {}
    for dtype in ("f32", "f16", "q8_0"):
        t = time.perf_counter()
        export_gguf(adapter, work / dtype, dtype=dtype)
        files[f"merged {dtype}"] = ((work / dtype / "model.gguf",), time.perf_counter() - t)
    t = time.perf_counter()
    export_gguf(adapter, work / "split", dtype="f32", adapter_only=True, with_base=True)
    files["base f32 + adapter.gguf"] = (
        (work / "split" / "base.gguf", work / "split" / "adapter.gguf"),
        time.perf_counter() - t,
    )
    rows = [
        "| file | size MiB | export s | prompts answered with the same tokens | tokens equal before the first "
        "difference (per prompt) | largest prompt-logit difference |",
        "|---|---|---|---|---|---|",
    ]
    for name, (paths, seconds) in files.items():
        extra = {"lora_path": str(paths[1])} if len(paths) > 1 else {}
        llm = Llama(str(paths[0]), n_ctx=0, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0, **extra)
        same, equal_all, diff = [], 0, 0.0
        for ids, tokens, logits in zip(prompts, want, want_logits):
            got: list[int] = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                if token in stops or len(got) == 32:
                    break
                got.append(token)
            n = next((i for i, (a, b) in enumerate(zip(got, tokens)) if a != b), min(len(got), len(tokens)))
            same.append(n if got != tokens else len(tokens))
            equal_all += got == tokens
            llm.reset()
            llm.eval(ids)
            diff = max(diff, float(np.abs(np.array(llm.scores[: len(ids)]) - logits).max()))
        llm.close()
        size = sum(p.stat().st_size for p in paths) / 2**20
        rows.append(
            f"| {name} | {size:.0f} | {seconds:.1f} | {equal_all}/{len(prompts)} | "
            f"{', '.join(map(str, same))} | {diff:.2e} |"
        )
    lengths = ", ".join(str(len(t)) for t in want)
    return [
        "## GGUF in llama.cpp (SmolLM2-135M-Instruct + LoRA)",
        "",
        f"- adapter: `{adapter}`; peftkit's answers have {lengths} tokens (32 unless a stop token came first)",
        "",
        *rows,
        "",
    ]


RUNNER = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
texts = json.loads(open(spec["texts"]).read())
if spec["kind"] == "torch":
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"]).eval()
    def probs(batch):
        enc = tok(batch, truncation=True, max_length=spec["max_length"], padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(**enc).logits.softmax(-1).numpy()
else:
    sys.modules["torch"] = None  # the exported folder must run without it
    sys.modules["transformers"] = None
    sys.path.insert(0, spec["folder"])
    from pathlib import Path
    from classify import Classifier
    clf = Classifier(Path(spec["folder"]), spec["kind"], threads=2)
    def probs(batch):
        return clf.probabilities(batch, batch_size=len(batch))
probs(texts[:32])  # warm up
start = time.perf_counter()
out = []
for i in range(0, len(texts), 32):
    out += probs(texts[i : i + 32]).argmax(-1).tolist()
seconds = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss would carry the parent's over fork and exec)
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"pred": out, "seconds": seconds, "rss": hwm / 1024,
                  "torch_importable": "torch" in sys.modules and sys.modules["torch"] is not None}))
"""


def onnx_part(adapter: Path, work: Path, limit: int | None) -> list[str]:
    from peftkit.assets import load_rotten_tomatoes
    from peftkit.export import export_onnx
    from peftkit.multi import load_adapted_classifier
    from peftkit.predict import merge_to_folder

    test = load_rotten_tomatoes()["test"]
    texts, labels = list(test["text"]), list(test["label"])
    if limit:
        texts, labels = texts[:limit], labels[:limit]
    clf = load_adapted_classifier(adapter)
    names = clf.label_names
    gold = [names.index(label) if isinstance(label, str) else int(label) for label in labels]
    max_length = clf.max_length
    merge_to_folder(clf, work / "merged")
    t = time.perf_counter()
    done = export_onnx(adapter, work / "onnx", int8=True)
    export_s = time.perf_counter() - t
    (work / "texts.json").write_text(json.dumps(texts))
    runs = {}
    for kind, label in (
        ("torch", "torch eager, float32"),
        ("model.onnx", "ONNX Runtime, float32"),
        ("model.int8.onnx", "ONNX Runtime, int8"),
    ):
        spec = {
            "kind": kind,
            "texts": str(work / "texts.json"),
            "model": str(work / "merged"),
            "folder": str(done.folder),
            "max_length": max_length,
        }
        out = subprocess.run(
            [sys.executable, "-c", RUNNER, json.dumps(spec)], capture_output=True, text=True, check=True
        )
        runs[label] = json.loads(out.stdout.strip().splitlines()[-1])
    base = runs["torch eager, float32"]
    rows = [
        "| runtime | texts/s | × torch | accuracy | agreement with torch | peak RSS MiB | torch importable |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run in runs.items():
        rate = len(texts) / run["seconds"]
        acc = sum(p == g for p, g in zip(run["pred"], gold)) / len(gold)
        agree = sum(p == q for p, q in zip(run["pred"], base["pred"])) / len(gold)
        rows.append(
            f"| {label} | {rate:.0f} | {rate / (len(texts) / base['seconds']):.2f} | {acc:.4f} | {agree:.4f} | "
            f"{run['rss']:.0f} | {'yes' if run['torch_importable'] else 'no'} |"
        )
    sizes = {p.name: p.stat().st_size / 2**20 for p in done.folder.glob("*.onnx")}
    return [
        "## ONNX Runtime (MiniLM-L6 + LoRA, the demo classifier)",
        "",
        f"- adapter: `{adapter}`; {len(texts)} Rotten Tomatoes test texts, batches of 32, 2 threads, max_length {max_length}",
        f"- export (float32 and int8) took {export_s:.1f} s; model.onnx {sizes.get('model.onnx', 0):.0f} MiB, "
        f"model.int8.onnx {sizes.get('model.int8.onnx', 0):.0f} MiB",
        "",
        *rows,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["gguf", "onnx", "all"], default="all")
    parser.add_argument("--lm-adapter", default=str(ROOT / "runs" / "smollm2-sentiment-lora" / "adapter"))
    parser.add_argument("--classifier", default=str(ROOT / "runs" / "sentiment-minilm-lora" / "adapter"))
    parser.add_argument("--limit", type=int, help="ONNX: the first N test texts only")
    parser.add_argument("--output", default=str(ROOT / "bench" / "RESULTS-export.md"))
    args = parser.parse_args()
    from peftkit.models import quiet_transformers

    quiet_transformers()
    lines = ["# Exported files in their runtimes", "", *header("export.py"), ""]
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-export-") as work:
        if args.part in ("onnx", "all"):
            lines += onnx_part(Path(args.classifier), Path(work), args.limit)
        if args.part in ("gguf", "all"):
            lines += gguf_part(Path(args.lm_adapter), Path(work))
    write_report(args.output, lines)


if __name__ == "__main__":
    main()
