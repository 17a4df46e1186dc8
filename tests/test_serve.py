"""`peftkit serve` for real: the server started on loopback in its own process, a real HTTP client,
concurrent clients for different adapters, bad input of every kind, a full queue and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import tiny_recipe

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "s3cret-key"
TEXTS = ["what a superb story", "terrible acting", "a wonderful film", "dull and boring", "great fun", "weak plot"]


@pytest.fixture(scope="module")
def adapters(tiny_bert_dir, sentiment_dir, tmp_path_factory) -> dict[str, Path]:
    """Two classifiers of one base: LoRA and IA3."""
    from peftkit import load_recipe
    from peftkit.train import train

    out = {}
    for name, method in (
        ("lora", {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["query", "value"]}),
        ("ia3", {"name": "ia3"}),
    ):
        tmp = tmp_path_factory.mktemp(name)
        train(
            load_recipe(tiny_recipe(tmp, tiny_bert_dir, sentiment_dir, method=method, **{"train.epochs": 2})),
            echo=lambda _: None,
        )
        out[name] = tmp / "run" / "adapter"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(adapters: dict[str, Path], *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "peftkit", "serve", "--port", str(port), "--api-key", KEY, *extra]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.communicate()[1]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start")


@pytest.fixture(scope="module")
def server(adapters):
    proc, url = start_server(adapters)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)


@pytest.fixture(scope="module")
def offline(adapters) -> dict[str, dict[str, dict[str, float]]]:
    """Each adapter's scores for every text, the way `peftkit predict` computes them."""
    from peftkit.multi import load_named, predict_rows

    named = load_named(list(adapters.items()))
    return {
        name: {
            t: dict(zip(named.label_names[name], map(float, row)))
            for t, row in zip(TEXTS, predict_rows(named, TEXTS, [name] * len(TEXTS)))
        }
        for name in adapters
    }


def wait_for(predicate, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def classify(url: str, adapter: str, texts: list[str]) -> httpx.Response:
    return httpx.post(url + "/v1/classify", json={"adapter": adapter, "texts": texts}, headers=auth(), timeout=60)


def assert_matches(results: list[dict], texts: list[str], expected: dict[str, dict[str, float]]) -> None:
    assert len(results) == len(texts)
    for text, result in zip(texts, results):
        want = expected[text]
        assert set(result["scores"]) == set(want)
        assert max(abs(result["scores"][k] - want[k]) for k in want) <= 1e-5, (text, result, want)
        assert result["label"] == max(want, key=want.get)


def test_health_models_and_classify_give_predict_s_numbers(server, offline):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    models = httpx.get(server + "/v1/models", headers=auth()).json()["data"]
    assert {m["id"] for m in models} == {"lora", "ia3"}
    assert all(m["labels"] == ["negative", "positive"] and m["task"] == "classification" for m in models)
    for name in ("lora", "ia3"):
        answer = classify(server, name, TEXTS)
        assert answer.status_code == 200, answer.text
        assert_matches(answer.json()["results"], TEXTS, offline[name])
        assert not any(r["truncated"] for r in answer.json()["results"])
    long = classify(server, "lora", ["good " * 200]).json()
    assert long["results"][0]["truncated"] is True and long["max_tokens"] == 32


def batch_counters(url: str) -> tuple[float, float]:
    """(forward passes, texts in them) that the server has run so far."""
    lines = httpx.get(url + "/metrics").text.splitlines()
    value = lambda name: float(next(line.split()[-1] for line in lines if line.startswith(name + " ")))  # noqa: E731
    return value("peftkit_batch_rows_count"), value("peftkit_batch_rows_sum")


def test_concurrent_clients_for_different_adapters_are_batched_and_never_mixed_up(server, offline):
    jobs = [(("lora", "ia3")[i % 2], TEXTS[i % 6 : i % 6 + 1 + i % 3]) for i in range(96)]
    before = batch_counters(server)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: classify(server, *job), jobs))
    for (name, texts), answer in zip(jobs, answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["adapter"] == name
        assert_matches(answer.json()["results"], texts, offline[name])
    after = batch_counters(server)
    batches, texts = after[0] - before[0], after[1] - before[1]
    assert texts == sum(len(t) for _, t in jobs)  # every text went through a forward pass once
    # 96 requests in far fewer forward passes: requests of different clients and adapters shared them
    # (without batching there would be one pass per request at least)
    assert batches <= len(jobs) / 2, (batches, len(jobs))
    metrics = httpx.get(server + "/metrics").text
    assert 'peftkit_requests_total{adapter="ia3",endpoint="classify",status="200"}' in metrics
    assert "peftkit_request_seconds_bucket" in metrics and "peftkit_queue_depth" in metrics


@pytest.mark.parametrize(
    ("body", "headers", "status", "needle"),
    [
        (b"{not json", {}, 400, "not valid JSON"),
        (b'{"adapter": "lora", "texts": "one"}', {}, 400, "'texts' must be"),
        (b'{"adapter": 3, "texts": ["a"]}', {}, 400, "'adapter' must be a string"),
        (b"[1, 2]", {}, 400, "expected a JSON object"),
        (b'{"adapter": "lora", "texts": ["\xff\xfe"]}', {}, 400, "not valid UTF-8"),
        (b'{"adapter": "nope", "texts": ["a"]}', {}, 404, "no adapter named 'nope'"),
        (b'{"adapter": "../lora", "texts": ["a"]}', {}, 404, "no adapter named"),
        (b'{"adapter": "/etc/passwd", "texts": ["a"]}', {}, 404, "no adapter named"),
        (json.dumps({"adapter": "lora", "texts": ["a"] * 65}).encode(), {}, 400, "at most 64"),
        (json.dumps({"adapter": "lora", "texts": ["a" * (1 << 20)]}).encode(), {}, 413, "over 1048576 bytes"),
        (b'{"adapter": "lora", "texts": ["a"]}', {"Authorization": ""}, 401, "Bearer"),
        (b'{"adapter": "lora", "texts": ["a"]}', {"Authorization": "Bearer wrong"}, 401, "Bearer"),
    ],
)
def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, offline, body, headers, status, needle):
    sent = {**auth(), "Content-Type": "application/json", **headers}
    answer = httpx.post(server + "/v1/classify", content=body, headers=sent, timeout=60)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert needle in error["message"] and error["type"].endswith("_error")
    again = classify(server, "lora", TEXTS[:2])
    assert again.status_code == 200
    assert_matches(again.json()["results"], TEXTS[:2], offline["lora"])


def test_a_full_queue_answers_429_with_retry_after(adapters):
    # a batch waits up to 1 s for a second request, so the one-place queue fills and the rest are turned away
    proc, url = start_server(adapters, "--max-queue", "1", "--batch-wait-ms", "1000", "--max-batch", "2")
    try:
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda i: classify(url, "lora", TEXTS[:1]), range(12)))
        codes = [a.status_code for a in answers]
        assert 429 in codes and 200 in codes, codes
        busy = next(a for a in answers if a.status_code == 429)
        assert busy.headers["Retry-After"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
        assert classify(url, "lora", TEXTS[:1]).status_code == 200  # and then it serves again
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_sigterm_during_load_drains_and_exits_0(adapters):
    proc, url = start_server(adapters, "--max-batch", "61")  # about one 60-text request a forward pass
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(classify, url, "ia3", TEXTS * 10) for _ in range(48)]
        assert wait_for(lambda: httpx.get(url + "/health").json()["queue"] >= 2)
        proc.send_signal(signal.SIGTERM)  # while requests wait in the queue
        answered_before = sum(f.done() for f in futures)
        done = []
        for f in futures:
            try:
                done.append(f.result().status_code)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                # refused, or a connection still without a request when the server closed it
                done.append("not accepted")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert set(done) <= {200, "not accepted"}, done  # nothing accepted was dropped or failed
    assert done.count(200) > answered_before  # requests in flight at the signal were answered


def test_serve_refuses_bad_setups_on_one_line(capsys, tmp_path):
    from .test_errors import expect_error

    expect_error(capsys, ["serve"], "--adapter NAME=DIR")
    expect_error(capsys, ["serve", "--adapter", f"a={tmp_path}"], "adapter_config.json")
    expect_error(capsys, ["serve", "--adapters-dir", str(tmp_path / "missing")], "is not a folder")
    expect_error(capsys, ["serve", "--adapters-dir", str(tmp_path)], "nothing to serve")
    expect_error(capsys, ["serve", "--adapters-dir", str(tmp_path), "--max-batch", "0"], "--max-batch must be")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "target_modules": ["query"]}')
    (legacy / "adapter_model.bin").write_bytes(b"not read")
    expect_error(capsys, ["serve", "--adapter", f"old={legacy}"], "serve reads safetensors only")


def test_adapters_dir_follows_its_folder_during_traffic(adapters, offline, tmp_path):
    import shutil
    import threading

    from .conftest import copy_tree

    folder = tmp_path / "served"
    folder.mkdir()
    copy_tree(adapters["lora"], folder / "lora")
    (folder / "escape").symlink_to(copy_tree(adapters["ia3"], tmp_path / "outside"), target_is_directory=True)
    pickled = folder / "pickled"
    pickled.mkdir()
    shutil.copy(adapters["ia3"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
    proc, url = start_server({}, "--adapters-dir", str(folder), "--max-adapters", "1")
    stop, answers = threading.Event(), []

    def traffic() -> None:  # one client keeps asking the first adapter throughout
        while not stop.is_set():
            answers.append(classify(url, "lora", TEXTS[:3]))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        models = {m["id"]: m for m in httpx.get(url + "/v1/models", headers=auth()).json()["data"]}
        assert set(models) == {"lora"}  # the symlink out of the folder and the pickle file are not served
        copy_tree(adapters["ia3"], folder / "ia3.tmp").rename(folder / "ia3")  # added while serving
        added = classify(url, "ia3", TEXTS)
        assert added.status_code == 200, added.text
        assert_matches(added.json()["results"], TEXTS, offline["ia3"])
        assert {m["id"] for m in httpx.get(url + "/v1/models", headers=auth()).json()["data"]} == {"lora", "ia3"}
        loaded = [
            line
            for line in httpx.get(url + "/metrics").text.splitlines()
            if line.startswith("peftkit_adapters_loaded ")
        ]
        assert float(loaded[0].split()[-1]) <= 2  # at most one beyond --max-adapters, while both are in use
        shutil.rmtree(folder / "ia3")  # removed while serving
        gone = classify(url, "ia3", TEXTS[:1])
        assert gone.status_code == 404 and "no adapter named 'ia3'" in gone.json()["error"]["message"]
        for name in ("escape", "pickled", "../lora", "lora/../lora", "/etc/passwd"):
            assert classify(url, name, TEXTS[:1]).status_code == 404, name
        assert wait_for(lambda: len(answers) >= 10, timeout=60)
    finally:
        stop.set()
        thread.join()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert answers and all(a.status_code == 200 for a in answers), {a.status_code for a in answers}
    for answer in answers:
        assert_matches(answer.json()["results"], TEXTS[:3], offline["lora"])


def test_classify_without_an_adapter_uses_the_only_one_served(adapters, offline, server):
    proc, url = start_server({"lora": adapters["lora"]})
    try:
        answer = httpx.post(url + "/v1/classify", json={"texts": TEXTS[:2]}, headers=auth(), timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["adapter"] == "lora"
        assert_matches(answer.json()["results"], TEXTS[:2], offline["lora"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    two = httpx.post(server + "/v1/classify", json={"texts": TEXTS[:1]}, headers=auth(), timeout=60)
    assert two.status_code == 400 and "may be left out when the server has one" in two.json()["error"]["message"]


def test_a_layernorm_tuned_adapter_is_served_beside_lora_in_mixed_batches(
    adapters, tiny_bert_dir, sentiment_dir, tmp_path
):
    from peftkit import load_recipe
    from peftkit.multi import load_named, predict_rows
    from peftkit.train import train

    train(
        load_recipe(
            tiny_recipe(
                tmp_path,
                tiny_bert_dir,
                sentiment_dir,
                method={"name": "ln_tuning"},
                **{"train.epochs": 2, "train.lr": 0.05},
            )
        ),
        echo=lambda _: None,
    )
    served = {"lora": adapters["lora"], "norms": tmp_path / "run" / "adapter"}
    named = load_named(list(served.items()))
    expected = {
        name: {
            t: dict(zip(named.label_names[name], map(float, row)))
            for t, row in zip(TEXTS, predict_rows(named, TEXTS, [name] * len(TEXTS)))
        }
        for name in served
    }
    assert expected["norms"] != expected["lora"]
    proc, url = start_server(served)
    try:
        jobs = [(("lora", "norms")[i % 2], TEXTS[i % 6 : i % 6 + 1 + i % 3]) for i in range(32)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda job: classify(url, *job), jobs))
        for (name, texts), answer in zip(jobs, answers):
            assert answer.status_code == 200, answer.text
            assert_matches(answer.json()["results"], texts, expected[name])
        assert batch_counters(url)[0] < len(jobs)  # rows of both adapters shared forward passes
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_a_body_over_the_limit_gets_its_413_even_when_the_client_sends_it_all_first(server):
    """Python's urllib writes the whole body before it reads a byte of the answer: the server
    reads and discards what it refused, then answers, so the client sees the 413, not a reset."""
    import urllib.error
    import urllib.request

    body = json.dumps({"adapter": "lora", "texts": ["a" * (16 << 20)]}).encode()
    request = urllib.request.Request(
        server + "/v1/classify", data=body, method="POST", headers={**auth(), "Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 413
    assert "over 1048576 bytes" in json.loads(caught.value.read())["error"]["message"]
    assert classify(server, "lora", TEXTS[:1]).status_code == 200  # and it keeps serving
