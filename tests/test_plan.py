"""`peftkit plan`: parameter counts equal the real run's, memory parts per process, FSDP and gradient
checkpointing reflected, a clear verdict, and --measure beside the estimate."""

from __future__ import annotations

from peftkit.cli import main

from .conftest import tiny_recipe


def test_plan_counts_what_training_trains_and_splits_memory_by_part(tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    from peftkit import load_recipe
    from peftkit.train import train

    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir, **{"train.epochs": 1})
    assert main(["plan", str(recipe)]) == 0
    out = capsys.readouterr().out
    summary = train(load_recipe(recipe), echo=lambda _: None)
    first = out.splitlines()[0]
    assert first.startswith(f"parameters: {summary['total_params']:,} total, {summary['trainable_params']:,} trainable")
    for part in ("runtime", "base weights", "speed layer", "trainable weights", "gradients", "optimizer state"):
        assert part in out
    assert "activations with gradient checkpointing" in out and "fits:" in out
    assert "rows x" in out and "longest training example" in out


def parts(out: str) -> dict[str, float]:
    found = {}
    for line in out.splitlines():
        if line.startswith("  ") and line.rstrip().endswith("MiB") and ":" not in line:
            name, value = line.strip().rsplit(None, 2)[0], line.split()[-2]
            found[name] = float(value.replace(",", ""))
    return found


def test_fsdp_splits_the_base_and_checkpointing_shrinks_activations(tiny_llama_dir, sentiment_dir, tmp_path, capsys):
    from peftkit.config import load_recipe
    from peftkit.plan import estimate

    from .conftest import LM_PROMPT

    recipe = tiny_recipe(
        tmp_path,
        tiny_llama_dir,
        sentiment_dir,
        task="causal_lm",
        **{"method.target_modules": "all-linear", "data.prompt_template": LM_PROMPT, "train.batch_size": 64},
    )
    one = estimate(load_recipe(recipe))
    two = estimate(load_recipe(recipe, ["train.distributed.strategy=fsdp"]), processes=2)
    assert two.parts["base weights"] == one.parts["base weights"] // 2
    assert two.parts["optimizer state"] == one.parts["optimizer state"] // 2
    assert "speed layer (frozen linear weights, prepared)" in one.parts and "speed layer" not in " ".join(two.parts)
    checkpointed = estimate(load_recipe(recipe, ["train.gradient_checkpointing=true"]))
    assert 0 < checkpointed.parts["activations"] < one.parts["activations"]
    one.available = one.peak - 1
    verdict = "\n".join(one.lines())
    assert "does not fit" in verdict and "try: train.gradient_checkpointing=true" in verdict


def test_plan_measure_reports_a_real_run_beside_the_estimate(tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    assert main(["plan", str(recipe), "--measure", "--steps", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("measured: peak resident memory") and "over 2 steps" in line and "predicted" in line
    assert not (tmp_path / "run").exists()  # the measuring run wrote in a temporary folder


def test_plan_bad_recipe_is_one_line(tiny_bert_dir, sentiment_dir, tmp_path, capsys):
    from .test_errors import expect_error

    recipe = tiny_recipe(tmp_path, tiny_bert_dir, sentiment_dir)
    expect_error(capsys, ["plan", str(recipe), "train.batch_siz=4"], "train.batch_size")
    expect_error(capsys, ["plan", str(recipe), "--processes", "0"], "--processes")
