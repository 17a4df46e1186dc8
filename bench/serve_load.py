"""`peftkit serve` under load, over loopback: requests/s, latency, batch sizes and memory.

Phases, each against a real server process started here:
1. classification, batching on: N clients (default 16) send one-review requests, alternating
   two MiniLM adapters, for --seconds;
2. the same with batching off (--max-batch 1, no waiting: one request per forward pass, what
   single-request serving such as one `peftkit predict` per request at best achieves);
3. generation: chat completions from two SmolLM2 adapters (with `make llm`), batching on and off;
4. a soak: phase 1's load for --soak seconds, the server's memory (VmRSS) read at its start and
   end.
Targets (issue 20): classification requests/s with 16 clients >= 5x batching off; memory growth
over the soak < 5%. Adapters: --classify-adapter/--lm-adapter NAME=DIR, else short training runs
of the shipped recipes made here (throughput does not depend on how well they are trained).

    .venv/bin/python bench/serve_load.py                        # writes bench/RESULTS-serve-load.md
    .venv/bin/python bench/serve_load.py --seconds 10 --soak 30 --gen-seconds 20   # a quick look
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _shared import header, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `peftkit serve` process on loopback."""

    def __init__(self, adapters: dict[str, Path], *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [PY, "-m", "peftkit", "serve", "--port", str(self.port), "--max-queue", "4096", *extra]
        for name, path in adapters.items():
            args += ["--adapter", f"{name}={path}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise SystemExit("the server did not start")

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024

    def batch_rows(self) -> tuple[float, float]:
        """(forward passes, rows) so far, from /metrics."""
        values = {
            line.split()[0]: float(line.split()[-1])
            for line in httpx.get(self.url + "/metrics").text.splitlines()
            if line and not line.startswith("#")
        }
        return values.get("peftkit_batch_rows_count", 0.0), values.get("peftkit_batch_rows_sum", 0.0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def load(server: Server, clients: int, seconds: float, request) -> dict[str, float]:
    """``clients`` threads calling ``request(client, i)`` for ``seconds``; requests/s, latency
    percentiles, failures and rows per forward pass."""
    latencies: list[float] = []
    failures = [0]
    stop = time.monotonic() + seconds
    passes0, rows0 = server.batch_rows()

    def client(k: int) -> None:
        http = Client(server.port)
        i = 0
        while time.monotonic() < stop:
            began = time.perf_counter()
            if request(http, k, i):
                latencies.append(time.perf_counter() - began)
            else:
                failures[0] += 1
            i += 1
        http.close()

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    passes, rows = server.batch_rows()
    latencies.sort()

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {
        "requests": len(latencies),
        "failures": failures[0],
        "rps": len(latencies) / elapsed,
        "p50": pct(0.5),
        "p99": pct(0.99),
        "rows_per_pass": (rows - rows0) / max(1.0, passes - passes0),
    }


class Client:
    """One keep-alive HTTP/1.1 connection (the standard library's: the clients share the
    server's cores, so they should cost as little as possible)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def post(self, path: str, body: dict) -> int:
        data = json.dumps(body).encode()
        try:
            self.conn.request("POST", path, data, {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            self.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
            return 0

    def close(self) -> None:
        self.conn.close()


def classify_request(texts: list[str], names: list[str]):
    def request(http: Client, k: int, i: int) -> bool:
        rng = random.Random(k * 100003 + i)
        return http.post("/v1/classify", {"adapter": names[(k + i) % len(names)], "texts": [rng.choice(texts)]}) == 200

    return request


def chat_request(prompts: list[str], names: list[str], max_tokens: int):
    def request(http: Client, k: int, i: int) -> bool:
        body = {
            "model": names[(k + i) % len(names)],
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": prompts[(k * 7 + i) % len(prompts)]}],
        }
        return http.post("/v1/chat/completions", body) == 200

    return request


def ceiling(adapters: dict[str, Path], texts: list[str], batch: int, seconds: float) -> float:
    """Texts/s of the model itself, no HTTP: ``predict_rows`` on batches of ``batch`` random
    texts alternating the adapters, in this process (the most any server could reach)."""
    from peftkit.multi import load_named, predict_rows

    named = load_named(list(adapters.items()))
    rng = random.Random(0)
    names = [list(adapters)[i % len(adapters)] for i in range(batch)]
    predict_rows(named, texts[:batch], names)
    done, began = 0, time.monotonic()
    while time.monotonic() - began < seconds:
        predict_rows(named, [rng.choice(texts) for _ in range(batch)], names)
        done += batch
    return done / (time.monotonic() - began)


def trained(recipe: str, out: Path, *overrides: str) -> Path:
    """A short training run of a shipped recipe; its adapter folder."""
    args = [
        PY,
        "-m",
        "peftkit",
        "train",
        str(ROOT / "recipes" / recipe),
        f"output_dir={out}",
        "overwrite=true",
        *overrides,
    ]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return out / "adapter"


def specs(values: list[str]) -> dict[str, Path]:
    return {v.split("=", 1)[0]: Path(v.split("=", 1)[1]) for v in values}


def row(name: str, r: dict[str, float]) -> str:
    return (
        f"| {name} | {r['requests']} | {r['failures']} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} | "
        f"{r['rows_per_pass']:.2f} |"
    )


def phases(
    adapters: dict[str, Path],
    modes: tuple,
    clients: int,
    seconds: float,
    request,
    lines: list[str],
    results: dict,
    *args: str,
) -> None:
    """One server per (label, extra flags) mode: a short warm-up, then ``clients`` for ``seconds``."""
    for label, extra in modes:
        server = Server(adapters, *args, *extra)
        load(server, min(clients, 4), 3, request(server))  # warm-up
        results[label] = load(server, clients, seconds, request(server))
        server.stop()
        lines.append(row(label, results[label]))
        print(lines[-1], flush=True)


def lm_adapters(given: list[str], work: Path, lines: list[str]) -> dict[str, Path]:
    """The chat adapters: those given, else a short SmolLM2 run (nothing without make llm)."""
    if given:
        return specs(given)
    try:
        from peftkit.assets import resolve_model

        resolve_model("smollm2-135m")
        return {
            "sent": trained(
                "smollm2-sentiment-lora.yaml",
                work / "sent",
                "data.max_train_samples=64",
                "data.max_eval_samples=16",
                "train.eval_steps=8",
            )
        }
    except Exception as exc:  # no make llm: the generation phase is left out, and said so
        lines.append(f"| generation | not run: {str(exc)[:120]} | | | | | |")
        return {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30, help="each classification phase")
    p.add_argument("--soak", type=float, default=300, help="the soak phase, seconds")
    p.add_argument("--gen-clients", type=int, default=8)
    p.add_argument("--gen-seconds", type=float, default=60, help="each generation phase")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per chat answer")
    p.add_argument("--classify-adapter", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--lm-adapter", action="append", default=[], metavar="NAME=DIR")
    p.add_argument("--output", default=str(ROOT / "bench" / "RESULTS-serve-load.md"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from peftkit.assets import load_rotten_tomatoes

    reviews = load_rotten_tomatoes()["test"]["text"][:500]
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    few = ("data.max_train_samples=256", "data.max_eval_samples=64", "train.epochs=1")
    classifiers = specs(args.classify_adapter) or {
        "lora": trained("sentiment-minilm-lora.yaml", work / "lora", *few),
        "ia3": trained("sentiment-minilm-lora.yaml", work / "ia3", *few, "method={name: ia3}", "train.lr=1.0e-2"),
    }
    lines = [
        "# peftkit serve under load (bench/serve_load.py)",
        "",
        *header("serve_load.py"),
        f"- classification adapters: {', '.join(f'{n} ({p})' for n, p in classifiers.items())}; one review "
        f"per request, from the Rotten Tomatoes test split; {args.clients} clients",
        "",
        "| phase | requests | failed | requests/s | p50 (ms) | p99 (ms) | rows per forward pass |",
        "|---|---|---|---|---|---|---|",
    ]
    results: dict[str, dict[str, float]] = {}
    ask = classify_request(reviews, list(classifiers))
    phases(
        classifiers,
        (("classify, batching on", ()), ("classify, batching off", ("--max-batch", "1", "--batch-wait-ms", "0"))),
        args.clients,
        args.seconds,
        lambda server: ask,
        lines,
        results,
    )
    ratio = results["classify, batching on"]["rps"] / results["classify, batching off"]["rps"]
    alone, batched = (ceiling(classifiers, reviews, n, min(20.0, args.seconds)) for n in (1, args.clients))

    lms = lm_adapters(args.lm_adapter, work, lines)
    if lms:
        prompts = [f"Review: {t}\nIs this review positive or negative? Answer in a sentence." for t in reviews[:50]]

        def chat(server: Server):  # the adapters and the base, by the id the server gives it
            base = httpx.get(server.url + "/v1/models").json()["data"][-1]["id"]
            return chat_request(prompts, [*lms, base], args.max_tokens)

        phases(
            lms,
            (("chat, batching on", ()), ("chat, batching off", ("--max-batch", "1"))),
            args.gen_clients,
            args.gen_seconds,
            chat,
            lines,
            results,
            "--max-tokens",
            str(args.max_tokens),
        )

    server = Server(classifiers)
    load(server, args.clients, 3, ask)
    start_mb = server.rss_mb()
    soak = load(server, args.clients, args.soak, ask)
    end_mb = server.rss_mb()
    server.stop()
    lines.append(row(f"soak, {args.soak:.0f} s", soak))
    growth = 100 * (end_mb - start_mb) / start_mb
    lines += [
        "",
        f"- classification with batching on / off: **{ratio:.1f}x** requests/s (target >= 5x)",
        f"- the model itself, in process without HTTP: {alone:.1f} texts/s one at a time, {batched:.1f} texts/s "
        f"in batches of {args.clients} ({batched / alone:.1f}x: the most batching can give on this machine); "
        f"the server with batching on reaches {100 * results['classify, batching on']['rps'] / batched:.0f}% "
        "of the batched figure",
        f"- soak: server memory {start_mb:.0f} MB at its start, {end_mb:.0f} MB at its end: "
        f"**{growth:+.1f}%** (target < 5%) over {soak['requests']} requests",
    ]
    if "chat, batching off" in results:
        gen = results["chat, batching on"]["rps"] / results["chat, batching off"]["rps"]
        lines.append(
            f"- chat with continuous batching on / off: **{gen:.1f}x** requests/s, {args.gen_clients} "
            f"clients, {args.max_tokens} tokens per answer at most (adapters {', '.join(lms)} and the base)"
        )
    lines.append(
        "- clients and server share the machine's cores; `rows per forward pass` is texts per "
        "classification pass, or sequences per decoding step"
    )
    write_report(args.output, lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
