"""Benchmark: decoding speed of peftkit's step decoder (the one GRPO samples with and the server
answers with) against transformers' ``generate`` and llama.cpp, on SmolLM2-135M-Instruct with a
LoRA adapter (``--adapter``).

Greedy decoding of 128 new tokens after one chat prompt, one stream and then 8 streams at once;
tokens per second, the median of ``--repeats`` runs after a warm-up, all in this process:

* the step decoder with the adapter unmerged in float32 (a model as it trains);
* the same inside :class:`peftkit.accel.DecodeProducts` (merged, cast, prepacked, stacked
  products), through the model's own forward and through ``DecodeProducts.step`` (the decoding
  step written out for LLaMA-architecture models), in float32, bf16 and float16 (on this CPU a
  float16 product of one row runs PyTorch's half-precision matrix-vector kernel, the fastest
  here; of several rows it is far slower than bf16);
* transformers' ``generate`` on the unmerged model, float32;
* llama.cpp through llama-cpp-python (2 threads) on the same adapter merged into an f16 GGUF by
  ``peftkit export`` (one stream).

    .venv/bin/python bench/decode.py --adapter runs/smollm2-sentiment-lora/adapter  # writes bench/RESULTS-decode.md
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _shared import header, write_report

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a long review of a movie you liked, scene by scene."
NEW = 128
LLAMA = "llama.cpp, f16 GGUF (llama-cpp-python, 2 threads)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", required=True, help="a SmolLM2 causal-LM LoRA adapter")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/peftkit-bench-decode")
    parser.add_argument("--output", default=str(ROOT / "bench" / "RESULTS-decode.md"))
    args = parser.parse_args()

    import torch

    from peftkit.accel import DecodeProducts
    from peftkit.generation import Sequence, StepDecoder
    from peftkit.multi import load_adapted_lm

    lm = load_adapted_lm(args.adapter)
    model = lm.model.eval()
    prompt = lm.prompt_ids(PROMPT)
    pad = lm.tokenizer.pad_token_id

    def median(run, rows: int) -> float:
        run(rows)  # warm-up
        return statistics.median(run(rows) for _ in range(args.repeats))

    def stepper(step):
        def run(rows: int) -> float:
            seqs = [Sequence(list(prompt), NEW) for _ in range(rows)]
            began = time.perf_counter()
            StepDecoder(model, pad, decode_step=step).run(seqs)
            return sum(len(s.tokens) for s in seqs) / (time.perf_counter() - began)

        return run

    def hf(rows: int) -> float:
        ids = torch.tensor([prompt] * rows)
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
                pad_token_id=pad,
            )
        return (out.shape[1] - ids.shape[1]) * rows / (time.perf_counter() - began)

    decoders = [
        ("step decoder, float32, adapter unmerged", None, False),
        ("step decoder + DecodeProducts, float32, model forward", torch.float32, False),
        ("step decoder + DecodeProducts, float32, DecodeProducts.step", torch.float32, True),
        ("step decoder + DecodeProducts, bf16, model forward", torch.bfloat16, False),
        ("step decoder + DecodeProducts, bf16, DecodeProducts.step", torch.bfloat16, True),
        ("step decoder + DecodeProducts, float16, DecodeProducts.step", torch.float16, True),
    ]
    result: dict[str, dict[str, float]] = {}
    for name, dtype, own_step in decoders:
        with DecodeProducts(model, dtype) if dtype is not None else contextlib.nullcontext() as prepared:
            step = prepared.step if own_step else None
            assert not own_step or step is not None, "SmolLM2 is a LLaMA model: DecodeProducts.step should apply"
            result[name] = {str(rows): median(stepper(step), rows) for rows in (1, 8)}
        print(name, result[name], flush=True)
    result["transformers generate, float32, adapter unmerged"] = {str(rows): median(hf, rows) for rows in (1, 8)}
    result[LLAMA] = {"1": llama_cpp(args, lm)}

    llama = result[LLAMA]["1"]
    lines = [
        "# Decoding speed: peftkit's step decoder against transformers and llama.cpp",
        "",
        *header("decode.py"),
        f"- SmolLM2-135M-Instruct with {args.adapter}; greedy, {NEW} new tokens after one chat prompt; "
        f"tokens per second, the median of {args.repeats} runs after a warm-up",
        "",
        "| decoder | tokens/s, 1 stream | tokens/s, 8 streams | 1 stream / llama.cpp f16 |",
        "|---|---|---|---|",
    ]
    for name, r in result.items():
        batched = f"{r['8']:.1f}" if "8" in r else ""
        lines.append(f"| {name} | {r['1']:.1f} | {batched} | {r['1'] / llama:.2f} |")
    write_report(args.output, lines)


def llama_cpp(args, lm) -> float:
    """llama.cpp's single-stream tokens per second on the adapter merged into an f16 GGUF."""
    from llama_cpp import Llama

    gguf = Path(args.work) / "gguf" / "model.gguf"
    if not gguf.is_file():
        subprocess.run(
            [sys.executable, "-m", "peftkit", "export", "--adapter", args.adapter, "--format", "gguf"]
            + ["--output", str(gguf.parent), "--overwrite"],
            check=True,
            capture_output=True,
        )
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=2, verbose=False, seed=0)
    tokens = llm.tokenize(lm.tokenizer.decode(lm.prompt_ids(PROMPT)).encode(), special=True, add_bos=False)

    def run() -> float:
        llm.reset()
        llm.eval(tokens)
        began = time.perf_counter()
        for _ in range(NEW):
            llm.eval([llm.sample(temp=0.0)])
        return NEW / (time.perf_counter() - began)

    run()
    return statistics.median(run() for _ in range(args.repeats))


if __name__ == "__main__":
    main()
