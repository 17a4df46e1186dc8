"""Where results go: ``-`` for standard input and output, and an output path that is not a
regular file (a symlink, a FIFO, a device) written through, never replaced by a plain file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from peftkit.fsio import atomic_path, atomic_write_text, write_json

from .conftest import run_cli, tiny_recipe


def test_a_symlinked_output_stays_a_symlink_and_its_target_gets_the_text(tmp_path):
    target = tmp_path / "real.txt"
    target.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    atomic_write_text(link, "new")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"


def test_a_fifo_output_is_written_through_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_json(fifo, {"a": 1})
    reader.join(timeout=30)
    assert json.loads(got[0]) == {"a": 1}
    assert fifo.is_fifo()


def test_a_regular_file_is_replaced_atomically_and_a_failed_write_leaves_it_whole(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("before")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert out.read_text() == "before" and os.listdir(tmp_path) == ["out.txt"]
    atomic_write_text(out, "after")
    assert out.read_text() == "after"


@pytest.fixture(scope="module")
def classifier(tiny_bert_dir, sentiment_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    proc = run_cli("train", str(tiny_recipe(tmp, tiny_bert_dir, sentiment_dir, **{"train.epochs": 2})))
    assert proc.returncode == 0, proc.stderr
    return tmp / "run" / "adapter"


def _peftkit(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peftkit", *args], input=stdin, capture_output=True, text=True, timeout=600
    )


def test_predict_reads_stdin_and_writes_stdout_with_line_numbers_and_texts(classifier):
    done = _peftkit(
        "predict",
        "--adapter",
        str(classifier),
        "--input",
        "-",
        "--output",
        "-",
        stdin="the movie was great and fun\n\na dull and boring film\n",
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]  # nothing but results on stdout
    assert [(r["line"], r["text"], r["label"]) for r in rows] == [
        (1, "the movie was great and fun", "positive"),
        (3, "a dull and boring film", "negative"),
    ]
    assert "wrote 2 predictions to -" in done.stderr
    jsonl = _peftkit(
        "predict",
        "--adapter",
        str(classifier),
        "--input",
        "-",
        "--output",
        "-",
        stdin=json.dumps({"id": "a7", "text": "a superb story"}) + "\n",
    )
    assert jsonl.returncode == 0, jsonl.stderr
    row = json.loads(jsonl.stdout)
    assert (row["line"], row["id"], row["text"], row["label"]) == (1, "a7", "a superb story", "positive")


def test_predict_to_a_link_to_stdout_writes_through_it(classifier, tmp_path):
    """The reported damage: ``--output /dev/stdout`` renamed a plain file onto the system's link.
    The same kind of link, made here so a regression cannot touch the machine's own."""
    (tmp_path / "in.txt").write_text("what a superb story\n")
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    done = _peftkit("predict", "--adapter", str(classifier), "--input", str(tmp_path / "in.txt"), "--output", str(link))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["label"] == "positive"
    assert link.is_symlink()


def test_eval_writes_its_json_to_stdout_and_the_report_to_stderr(classifier, sentiment_dir):
    done = _peftkit("eval", "--adapter", str(classifier), "--data", str(sentiment_dir), "--output", "-")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["n"] == 80 and result["accuracy"] >= 0.9
    assert "confusion matrix" in done.stderr
    assert not (classifier.parent / "eval-test.json").exists()  # nothing written where it was not asked


def test_a_missing_input_is_one_line_and_points_to_stdin(classifier, tmp_path):
    done = _peftkit("predict", "--adapter", str(classifier), "--input", str(tmp_path / "nope.txt"), "--output", "-")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("peftkit: error: input file not found") and len(done.stderr.splitlines()) == 1
