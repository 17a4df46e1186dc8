"""Recipes, overrides and their validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from peftkit import PeftkitError, load_recipe
from peftkit.config import parse_override

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe):
    import yaml

    if "compare" in yaml.safe_load(recipe.read_text()):
        from peftkit.compare import load_comparison

        out, runs = load_comparison(recipe)
        assert {cfg.method.name for cfg in runs.values()} == {
            "lora",
            "vera",
            "loha",
            "adalora",
            "adapter",
            "prefix",
            "prompt",
            "ia3",
            "bitfit",
            "full",
        }
        assert {"lora+dora", "lora+pissa"} <= {cfg.method.label for cfg in runs.values()}
        assert all(cfg.output_dir == str(out / name) for name, cfg in runs.items())
    else:
        assert load_recipe(recipe).method.name == "lora"


def test_overrides_are_typed():
    cfg = load_recipe(
        None,
        ["train.lr=3e-4", "method.r=16", "output_dir=runs/x", "method.target_modules=[query,value]", "overwrite=true"],
    )
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.method.r == 16
    assert cfg.output_dir == "runs/x" and cfg.method.target_modules == ["query", "value"] and cfg.overwrite


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)
    assert parse_override("x=null") == (["x"], None)
    with pytest.raises(PeftkitError, match="key=value"):
        parse_override("train.lr")


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("method.rank=4", "did you mean 'method.r'"),
        ("trian.lr=1", "did you mean 'train'"),
    ],
)
def test_unknown_keys_suggest_the_close_match(override, needle):
    with pytest.raises(PeftkitError) as err:
        load_recipe(None, [override])
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.r=0", "method.r"),
        ("method.r=-2", "method.r"),
        ("method.dropout=1.0", "method.dropout"),
        ("method.dropout=-0.1", "method.dropout"),
        ("train.lr=-1e-4", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.scheduler=step", "train.scheduler"),
        ("method.name=magic", "method"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(PeftkitError) as err:
        load_recipe(None, [override])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(PeftkitError, match="not valid YAML"):
        load_recipe(bad)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(PeftkitError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")


def test_auto_mixed_precision_follows_the_hardware(monkeypatch):
    from peftkit import precision

    for native, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(precision, "native_bf16", lambda native=native: native)
        assert precision.resolve_mixed_precision("auto") == expected
        assert precision.resolve_mixed_precision("no") == "no"  # explicit settings are kept
        assert precision.resolve_mixed_precision("bf16") == "bf16"
    assert load_recipe(None, []).train.mixed_precision == "auto"


def test_validating_a_recipe_loads_neither_torch_nor_transformers(tmp_path):
    """Config errors answer before the heavy libraries load (a fresh interpreter, so
    nothing this test process imported counts)."""
    recipe = str(RECIPES[0].parent / "sentiment-minilm-lora.yaml")
    code = (
        "import sys\n"
        "from peftkit.config import load_recipe\n"
        "from peftkit.errors import PeftkitError\n"
        "from peftkit.prepare import check_output_dir\n"
        f"cfg = load_recipe({recipe!r}, ['method.name=ia3', 'quantization.bits=4'])\n"
        "check_output_dir(cfg)\n"
        "try:\n"
        "    load_recipe(None, ['train.lrr=1'])\n"
        "except PeftkitError:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
