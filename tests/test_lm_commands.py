"""Commands on causal-LM adapters that used to crash or point the wrong way: eval of several
labelled adapters, predict on an LM adapter, 4-bit commands' log, serve on a busy port."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

from peftkit.cli import main

from .conftest import LM_PROMPT
from .test_errors import expect_error
from .test_merge_export import lm_adapter

LABELLED = {"prompt_template": LM_PROMPT, "label_names": ["negative", "positive"], "chat_template": True}


def test_eval_of_several_labelled_lm_adapters_writes_each(tiny_llama_dir, sentiment_dir, tmp_path, capsys):
    a = lm_adapter(tiny_llama_dir, tmp_path / "a", 1, meta=LABELLED)
    b = lm_adapter(tiny_llama_dir, tmp_path / "b", 2, meta=LABELLED)
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--adapter",
                f"a={a}",
                "--adapter",
                f"b={b}",
                "--data",
                str(sentiment_dir),
                "--max-samples",
                "16",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())["adapters"]
    assert set(result) == {"a", "b"}
    for one in result.values():
        assert one["label_names"] == ["negative", "positive"] and one["n"] == 16
        assert 0 <= one["accuracy"] <= 1 and len(one["confusion_matrix"]) == 2
    assert result["a"]["loss"] != result["b"]["loss"]  # two adapters, two results
    said = capsys.readouterr().out
    assert "== a" in said and "confusion matrix" in said


def test_predict_on_an_lm_adapter_points_to_generate(tiny_llama_dir, tmp_path, capsys):
    a = lm_adapter(tiny_llama_dir, tmp_path / "a", 1)
    (tmp_path / "in.txt").write_text("a fun film\n")
    expect_error(
        capsys,
        ["predict", "--adapter", str(a), "--input", str(tmp_path / "in.txt"), "--output", "-"],
        f"answer with: peftkit generate --adapter {a}",
    )


def test_a_4bit_command_logs_no_kernel_package_warning(tiny_llama_dir, tmp_path):
    a = lm_adapter(tiny_llama_dir, tmp_path / "a", 1)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "peftkit",
            "generate",
            "--adapter",
            str(a),
            "--quantize",
            "4",
            "--prompt",
            "hello",
            "--raw",
            "--max-new-tokens",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "kernels" not in done.stderr, done.stderr


def test_serve_on_a_busy_port_says_so_before_loading(tiny_llama_dir, tmp_path):
    a = lm_adapter(tiny_llama_dir, tmp_path / "a", 1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "peftkit", "serve", "--adapter", f"x={a}", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2
    assert (
        done.stderr.startswith(f"peftkit: error: cannot listen on 127.0.0.1:{port}") and done.stderr.count("\n") == 1
    ), done.stderr
    assert "serving" not in done.stdout  # refused before anything was loaded or announced


def test_generate_reads_stdin_and_writes_json_lines_to_stdout(tiny_llama_dir, tmp_path):
    a = lm_adapter(tiny_llama_dir, tmp_path / "a", 1)
    run = [sys.executable, "-m", "peftkit", "generate", "--adapter", str(a), "--max-new-tokens", "3", "--raw"]
    streamed = subprocess.run([*run, "--prompt", "hello"], capture_output=True, text=True, timeout=300)
    asked = subprocess.run([*run, "--prompt", "hello", "--output", "-"], capture_output=True, text=True, timeout=300)
    piped = subprocess.run(
        [*run, "--input", "-", "--output", "-"],
        input="hello\n\nhi how are you\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    for done in (streamed, asked, piped):
        assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in piped.stdout.splitlines()]
    assert [(r["line"], r["prompt"]) for r in rows] == [(1, "hello"), (3, "hi how are you")]
    assert json.loads(asked.stdout) == {"prompt": "hello", "answer": rows[0]["answer"]}  # - asks for JSON, not a stream
    assert streamed.stdout.strip() == rows[0]["answer"].strip()
