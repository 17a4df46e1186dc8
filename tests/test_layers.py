"""The package's layers point one way: read every import (inside functions too) and fail on an
import cycle, on an import against the direction below, or on a module no layer names.

Top to bottom; a module may import its own layer and the layers beneath it, never above:

    cli
    entry points    train, predict, multi, compare, prepare, serving, export (orchestrate; own no maths)
    run parts       tasks, data, causal, evaluate, ...      (what a run feeds and measures)
    methods         methods.base, methods.lora, ...         (what an adapter is)
    surgery         inject, models, quantize, adapter_io    (surgery, loading, the file format)
    ground          config, errors, fsio, method configs and registry

``peftkit.accel`` (the CPU speed layer) is applied from outside: only the entry points import it,
and it may import anything beneath them. Nothing in ``methods`` imports it, the loop, the entry
points or the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "peftkit"

LAYERS = [
    {"cli", "__main__"},
    {
        "train",
        "predict",
        "multi",
        "compare",
        "prepare",
        "serving",
        "serving.app",
        "serving.workers",
        "serving.protocol",
        "serving.page",
        "plan",
        "export",
        "export.gguf",
        "export.modelfile",
        "export.onnx",
        "export.run_onnx",
    },
    {
        "tasks",
        "data",
        "causal",
        "pairs",
        "preference",
        "reward",
        "evaluate",
        "generation",
        "lm_loss",
        "token_cache",
        "sharding",
        "grpo",
        "grpo_task",
        "rewards",
        "checkpoint",
        "monitor",
        "plot",
    },
    set(),  # the methods: every module of methods/ outside the ground floor (filled in below)
    {"inject", "models", "quantize", "adapter_io", "assets", "precision"},
    {"config", "errors", "fsio", "methods", "methods.configs", "methods.tuner_configs", "methods.registry", "__init__"},
]
LAYERS[3] = {f"methods.{p.stem}" for p in (PACKAGE / "methods").glob("*.py")} - LAYERS[5] - {"methods.__init__"}
ACCEL = {"accel", "accel.frozen", "accel.dropout", "accel.native", "accel.decode"}
#: who may import the speed layer (besides itself)
ACCEL_USERS = LAYERS[1]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, wherever the import statement stands."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package and name != "__init__" else name.split(".")[:-1]
    if name == "__init__":
        package = []
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("peftkit."):
                    out.add(alias.name.removeprefix("peftkit."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                base = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.startswith("peftkit"):
                base = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:
                full = ".".join([*base, alias.name])
                out.add(full if full in known else ".".join(base) or "__init__")
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer_of(name: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if name in layer), None)


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if layer_of(m) is None and m not in ACCEL)
    assert not unplaced, f"place these modules in a layer of tests/test_layers.py: {unplaced}"


def test_no_import_cycle():
    g = graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = path[path.index(node) :] + [node]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for nxt in sorted(g[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(g):
        visit(node, [])


def test_imports_point_down():
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if target in ACCEL:
                if name not in ACCEL and name not in ACCEL_USERS:
                    wrong.append(f"{name} -> {target} (only the entry points apply the speed layer)")
                continue
            if name in ACCEL:
                if layer_of(target) <= 1:
                    wrong.append(f"{name} -> {target} (the speed layer sits beneath the entry points)")
                continue
            if layer_of(target) < layer_of(name):
                wrong.append(f"{name} -> {target} (upwards)")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_the_checker_sees_what_it_must(tmp_path):
    """The reader itself: relative imports inside functions, packages and 'import peftkit.x'."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from ..train import Trainer\n    import peftkit.cli\n    from . import lora\n")
    known = {"train", "cli", "methods.lora", "methods.m"}
    assert imports("methods.m", src, known) == {"train", "cli", "methods.lora"}
