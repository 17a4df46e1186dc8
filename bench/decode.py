"""Benchmark: decoding speed of peftkit's step decoder (the one GRPO samples with and the server
answers with) against transformers' ``generate`` and llama.cpp, on SmolLM2-135M-Instruct with a
LoRA adapter (``--adapter``).

Greedy decoding of 128 new tokens after one chat prompt, one stream and then 8 streams at once;
tokens per second, the median of ``--repeats`` runs after a warm-up, each decoder in a process of
its own:

* the step decoder with the adapter unmerged in float32 (a model as it trains);
* the same inside :class:`peftkit.accel.DecodeProducts` (merged, cast, prepacked, stacked
  products), through the model's own forward and through ``DecodeProducts.step`` (the decoding
  step written out for LLaMA-architecture models), in float32, bf16 and float16 (on this CPU a
  float16 product of one row runs PyTorch's half-precision matrix-vector kernel, the fastest
  here; of several rows it is far slower than bf16);
* transformers' ``generate`` on the unmerged model, float32;
* llama.cpp through llama-cpp-python (2 threads) on the same adapter merged into an f16 GGUF by
  ``peftkit export`` (one stream);
* the server's chat path: ``peftkit serve`` on loopback with each ``--decode`` setting, one chat
  request at a time over HTTP; its decoding rate is ``(n - 1) / (t_n - t_1)`` from the times of
  a request for ``n`` = 128 tokens and one for a single token (the prefill and HTTP cancel out),
  beside the server's peak RSS.

    .venv/bin/python bench/decode.py --adapter runs/smollm2-sentiment-lora/adapter  # writes bench/RESULTS-decode.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
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


#: the decoders measured in processes of their own: (dtype of DecodeProducts or None, its own step)
DECODERS = {
    "step decoder, float32, adapter unmerged": (None, False),
    "step decoder + DecodeProducts, float32, model forward": ("float32", False),
    "step decoder + DecodeProducts, float32, DecodeProducts.step": ("float32", True),
    "step decoder + DecodeProducts, bf16, model forward": ("bfloat16", False),
    "step decoder + DecodeProducts, bf16, DecodeProducts.step": ("bfloat16", True),
    "step decoder + DecodeProducts, float16, DecodeProducts.step": ("float16", True),
    "transformers generate, float32, adapter unmerged": ("generate", False),
    LLAMA: ("llama.cpp", False),
}


def part(args, name: str) -> dict[str, float]:
    """One decoder's tokens per second, one stream and 8 (llama.cpp: one)."""
    import torch

    from peftkit.accel import DecodeProducts
    from peftkit.generation import Sequence, StepDecoder
    from peftkit.multi import load_adapted_lm

    lm = load_adapted_lm(args.adapter)
    model = lm.model.eval()
    prompt = lm.prompt_ids(PROMPT)
    pad = lm.tokenizer.pad_token_id
    kind, own_step = DECODERS[name]
    if kind == "llama.cpp":
        return {"1": llama_cpp(args, lm)}

    def median(run, rows: int) -> float:
        run(rows)  # warm-up
        return statistics.median(run(rows) for _ in range(args.repeats))

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

    if kind == "generate":
        return {str(rows): median(hf, rows) for rows in (1, 8)}
    dtype = getattr(torch, kind) if kind else None
    with DecodeProducts(model, dtype) if dtype is not None else contextlib.nullcontext() as prepared:
        step = prepared.step if own_step else None
        assert not own_step or step is not None, "SmolLM2 is a LLaMA model: DecodeProducts.step should apply"

        def run(rows: int) -> float:
            seqs = [Sequence(list(prompt), NEW) for _ in range(rows)]
            began = time.perf_counter()
            StepDecoder(model, pad, decode_step=(lambda: step) if step else None).run(seqs)
            return sum(len(s.tokens) for s in seqs) / (time.perf_counter() - began)

        return {str(rows): median(run, rows) for rows in (1, 8)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", required=True, help="a SmolLM2 causal-LM LoRA adapter")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="/tmp/peftkit-bench-decode")
    parser.add_argument("--output", default=str(ROOT / "bench" / "RESULTS-decode.md"))
    parser.add_argument("--part", choices=sorted(DECODERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(part(args, args.part)))
        return
    result: dict[str, dict[str, float]] = {}
    for name in DECODERS:
        done = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--part", name],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
        result[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, result[name], flush=True)
    served = {mode: serve(args, mode) for mode in ("off", "float32", "bfloat16", "float16")}

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
    lines += [
        "",
        "## The server's chat path (one request at a time)",
        "",
        "| peftkit serve | tokens/s | / llama.cpp f16 | completion tokens | server peak RSS (MiB) |",
        "|---|---|---|---|---|",
    ]
    for mode, r in served.items():
        lines.append(
            f"| --decode {mode} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / llama:.2f} | {r['tokens']} "
            f"| {r['peak_rss'] / 2**20:.0f} |"
        )
    write_report(args.output, lines)


def serve(args, mode: str) -> dict:
    """The chat path's decoding rate and the server's peak RSS with ``--decode mode``."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "peftkit", "serve", "--adapter", f"a={args.adapter}", "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--decode", mode, "--max-tokens", str(NEW), "--timeout", "300"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

        def ask(tokens: int) -> tuple[float, int]:
            body = {"model": "a", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": tokens}
            began = time.perf_counter()
            answer = httpx.post(url + "/v1/chat/completions", json={**body, "temperature": 0}, timeout=600).json()
            return time.perf_counter() - began, answer["usage"]["completion_tokens"]

        ask(NEW)  # warm-up
        rates, n = [], 0
        for _ in range(args.repeats):
            one, _ = ask(1)
            full, n = ask(NEW)
            rates.append((n - 1) / (full - one))
        status = Path(f"/proc/{proc.pid}/status").read_text()
        peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"tokens_per_s": statistics.median(rates), "tokens": n, "peak_rss": peak}


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
