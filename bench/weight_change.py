"""How far each trained LoRA-family adapter of a comparison moved the base weights.

For every adapter given (``NAME=DIR``), load it on its base, merge it, and compare each merged
layer with the original weight: the relative change ``||W' - W|| / ||W||`` (Frobenius), and the
share of that change (squared norm) that touches the span of W's top-r left or right singular
directions (one minus the share orthogonal to both). Reads
the adapters of ``peftkit compare recipes/compare-sentiment.yaml``; prints a Markdown table.

    .venv/bin/python bench/weight_change.py lora=runs/compare-sentiment/lora/adapter \\
        pissa=runs/compare-sentiment/pissa/adapter
"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _shared import command  # noqa: E402


def change(name_dir: str) -> tuple[str, float, float, int]:
    from peftkit.methods import merge_and_unload
    from peftkit.multi import load_adapted_classifier

    name, _, folder = name_dir.partition("=")
    clf = load_adapted_classifier(folder)
    model = clf.model
    layers = {n: model.get_submodule(n) for n in model.peftkit.replaced}
    original = {}
    for n, layer in layers.items():  # the base weight before any residual init: W = W_res + s B0 A0
        w = layer.base_layer.weight.detach().float().clone()
        initial = getattr(layer, "initial", None)
        if initial is not None:
            a0, b0 = initial
            w = w + layer.scaling * (b0.float() @ a0.float())
        original[n] = (w, layer.r)
    merge_and_unload(model)
    rel, inside = [], []
    for n, (w, r) in original.items():
        delta = model.get_submodule(n).weight.detach().float() - w
        u, _, vh = torch.linalg.svd(w, full_matrices=False)
        u, v = u[:, :r], vh[:r].T
        rest = delta - u @ (u.T @ delta)  # the part of delta away from the top-r left directions...
        rest = rest - (rest @ v) @ v.T  # ...and from the top-r right ones
        rel.append((delta.norm() / w.norm()).item())
        inside.append(1 - (rest.norm() ** 2 / delta.norm().clamp_min(1e-30) ** 2).item())
    return name, sum(rel) / len(rel), sum(inside) / len(inside), len(rel)


def main(argv: list[str]) -> None:
    print(f"command: `{command('weight_change.py')}`\n")
    print("| adapter | layers | mean relative change of W | share of the change touching W's top-r directions |")
    print("|---|---|---|---|")
    for spec in argv:
        name, rel, inside, n = change(spec)
        print(f"| {name} | {n} | {rel:.4f} | {inside:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
