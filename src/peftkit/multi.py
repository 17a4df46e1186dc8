"""Several adapters of one base, by name: load them (``NAME=DIR`` each, or a peft multi-adapter
folder), classify rows that each name their adapter in mixed batches, evaluate every adapter, and
generate with each.

The adapters share one copy of the base; each keeps its own head, label names and prompt format
(:mod:`peftkit.methods.named` does the layer work).
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapter_io import CONFIG_FILE, AdapterFiles, read_adapter, read_adapter_weights, write_adapter
from .config import QuantizationConfig
from .data import LengthGroupedBatches, collate, tokenize
from .errors import PeftkitError
from .fsio import atomic_dir
from .generation import generate
from .methods.base import resolve_modules_to_save
from .methods.combine import LoRAFactors, check_combination, combine_heads, combine_lora
from .methods.configs import LoraConfig
from .methods.named import NAME, NamedAdapters, check_name
from .methods.registry import check_quantizable
from .models import load_causal_lm, load_classifier
from .predict import (
    AdaptedClassifier,
    AdaptedLM,
    check_merge_output,
    evaluate_adapter,
    evaluate_lm_adapter,
    label_names_of,
    lm_encoder,
)
from .quantize import quantize_model
from .rewards import ScoreHead

#: the adapter name peft gives the adapter it saves at a folder's root
DEFAULT_NAME = "default"


def parse_specs(values: list[str]) -> list[tuple[str, Path]]:
    """``(name, folder)`` per ``--adapter`` value: ``NAME=DIR``, or ``DIR`` alone (named after its
    folder, or, for a peft multi-adapter folder, every adapter in it under peft's names).

    Raises:
        PeftkitError: a name given twice or not allowed, or a folder that holds no adapter.
    """
    specs: list[tuple[str, Path]] = []
    for value in values:
        name, sep, rest = value.partition("=")
        if sep and NAME.fullmatch(name) and not Path(value).exists():
            specs.append((check_name(name), Path(rest)))
            if not (Path(rest) / CONFIG_FILE).is_file():
                read_adapter(rest)  # says on one line what is wrong with the folder
        else:
            specs += folder_adapters(Path(value))
    seen: set[str] = set()
    for name, _ in specs:
        if name in seen:
            raise PeftkitError(
                f"adapter name {name!r} is given twice",
                "--adapter",
                "give each adapter its own name: --adapter NAME=DIR",
            )
        seen.add(name)
    return specs


def folder_adapters(path: Path) -> list[tuple[str, Path]]:
    """The adapters of one folder: itself when it is an adapter, and, as peft saves several, each
    subfolder holding an adapter_config.json (named after the subfolder; the root is "default")."""
    subs = sorted(p for p in path.iterdir() if (p / CONFIG_FILE).is_file()) if path.is_dir() else []
    found = [(DEFAULT_NAME if subs else check_name(_folder_name(path)), path)] if (path / CONFIG_FILE).is_file() else []
    found += [(check_name(p.name), p) for p in subs]
    if not found:
        read_adapter(path)  # says what is missing, on one line
    return found


def _folder_name(path: Path) -> str:
    """A run's adapter folder is named after its run (runs/NAME/adapter -> NAME)."""
    path = path.resolve()
    name = path.parent.name if path.name == "adapter" else path.name
    return name if NAME.fullmatch(name) else DEFAULT_NAME


def row_adapters(rows: list[dict[str, Any]], known: list[str], where: str) -> list[str]:
    """The adapter each input row names in its ``adapter`` field (the first loaded one where it
    names none), checked against the loaded ones."""
    names = [r.get("adapter", known[0]) for r in rows]
    check_rows(names, known, where)
    return names


def check_rows(names: list[Any], known: list[str], where: str) -> None:
    """Every row names a loaded adapter; else a one-line error naming the first row that does not."""
    loaded = set(known)
    for i, name in enumerate(names, 1):
        if not isinstance(name, str) or name not in loaded:
            raise PeftkitError(
                f"row {i} names adapter {name!r}, which is not loaded",
                where,
                f"loaded: {', '.join(known)}; load it with --adapter NAME=DIR",
            )


@dataclass
class _Loaded:
    files: AdapterFiles
    state: dict[str, torch.Tensor]


@dataclass
class NamedModel:
    """One base with several named adapters; ``files[name]`` says what each adapter's folder says."""

    model: Any
    tokenizer: Any
    adapters: NamedAdapters
    files: dict[str, AdapterFiles]
    base_model: str
    label_names: dict[str, list[str]] = field(default_factory=dict)
    task: str = "classification"  # or "causal_lm"
    #: reward adapters beside causal-LM ones on a decoder base: each one's score head
    scorers: dict[str, ScoreHead] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return self.adapters.names

    def attach(self, name: str, path: str | Path) -> None:
        """Load one more adapter (its folder at ``path``) onto the base, under ``name``.

        Raises:
            PeftkitError: the folder is unreadable, for the other task, or does not fit the base;
                nothing is changed then.
        """
        _, task, loaded = read_specs([(check_name(name), Path(path))], self.base_model)
        if task == "reward" and self.task == "causal_lm":
            _add_scorer(self, name, loaded[name])
            return
        task = "classification" if task == "reward" else task
        if task != self.task:
            raise PeftkitError(
                f"the adapter is a {task} adapter; these adapters are {self.task} ones",
                str(path),
                "serve adapters of one task together",
            )
        item = loaded[name]
        labels = None
        if task == "classification":
            keep = list(item.files.method_config().modules_to_save or [])
            labels = label_names_of(item.files, item.state, keep, self.base_model)
        self.adapters.add(name, item.files.method_config(), item.state, where=str(item.files.path))
        self.files[name] = item.files
        if labels is not None:
            self.label_names[name] = labels

    def detach(self, name: str) -> None:
        """Take the adapter ``name`` off the base."""
        self.adapters.delete(name)
        self.files.pop(name, None)
        self.label_names.pop(name, None)
        self.scorers.pop(name, None)

    def is_reward(self, name: str) -> bool:
        """Whether adapter ``name`` is a reward model: its one output is a score, not a class."""
        return name in self.scorers or self.files[name].meta.get("task") == "reward"

    def max_length(self, name: str) -> int:
        """Tokens per text: the training's limit; for an adapter that records none (peft's), the
        tokenizer's, at most 512 and at most the positions the model has."""
        if self.files[name].meta.get("max_length"):
            return int(self.files[name].meta["max_length"])
        positions = getattr(self.model.config, "max_position_embeddings", None) or 512
        return int(min(512, self.tokenizer.model_max_length, positions))


def adapter_task(files: AdapterFiles) -> str:
    """What an adapter folder was trained for: causal_lm, reward or classification."""
    if files.meta.get("task") == "causal_lm" or files.config.get("task_type") == "CAUSAL_LM":
        return "causal_lm"
    return "reward" if files.meta.get("task") == "reward" else "classification"


def read_specs(specs: list[tuple[str, Path]], model: str | None) -> tuple[str | None, str, dict[str, _Loaded]]:
    """The base (``model`` wins; None where no adapter names one), the task (classification or causal_lm) and each adapter's files and
    tensors, checked to belong together before anything is loaded.

    Raises:
        PeftkitError: adapters of different bases or tasks, unreadable files.
    """
    loaded: dict[str, _Loaded] = {}
    bases: dict[str, str] = {}
    tasks: dict[str, str] = {}
    for name, path in specs:
        files = read_adapter(path)
        if files.base_model:
            bases[name] = files.base_model
        tasks[name] = adapter_task(files)
        loaded[name] = _Loaded(files, read_adapter_weights(path, files.method_config()))
    kinds = set(tasks.values())
    if kinds == {"reward"} or kinds == {"reward", "classification"}:
        kinds = {"classification"}  # reward models are classifiers with one output, on their own
    if kinds == {"causal_lm", "reward"}:
        kinds = {"causal_lm"}  # reward models beside the policy, on its base (ScoreHead)
    if len(kinds) > 1:
        shown = ", ".join(f"{n}: {t}" for n, t in tasks.items())
        raise PeftkitError(
            f"the adapters are for different tasks ({shown})",
            "--adapter",
            "load classifiers and causal-LM adapters separately",
        )
    if model is None and len(set(bases.values())) > 1:
        shown = ", ".join(f"{n}: {b}" for n, b in bases.items())
        raise PeftkitError(
            f"the adapters were trained on different bases ({shown})",
            "--adapter",
            "load adapters of one base together (--model names the base if they only differ in how they name it)",
        )
    task = next(iter(kinds))
    if len(specs) == 1:
        task = next(iter(tasks.values()))
    return model or next(iter(bases.values()), None), task, loaded


def load_named(specs: list[tuple[str, Path]], model: str | None = None, quantize: int | None = None) -> NamedModel:
    """Load the adapters ``specs`` (:func:`parse_specs`) onto one copy of their base.

    Raises:
        PeftkitError: bad names, mixed bases or tasks, methods that cannot share a base, tensors
            that do not fit it.
    """
    base, task, loaded = read_specs(specs, model)
    if not base:
        raise PeftkitError("no adapter names its base model", "--adapter", "pass --model")
    task = "classification" if task == "reward" else task
    labels = {}
    scored = {}
    if task == "causal_lm":  # reward adapters among them sit on the causal LM's own base
        scored = {n: i for n, i in loaded.items() if i.files.meta.get("task") == "reward"}
        loaded = {n: i for n, i in loaded.items() if n not in scored}
    if task == "classification":
        for name, item in loaded.items():
            keep = list(item.files.method_config().modules_to_save or [])
            labels[name] = label_names_of(item.files, item.state, keep, base)
        base_model = load_classifier(base, next(iter(labels.values())))
    else:
        base_model = load_causal_lm(base)
    if quantize:
        _quantize(base_model.model, [item.files for item in loaded.values()], quantize)
    adapters = NamedAdapters(base_model.model)
    for name, item in loaded.items():
        adapters.add(name, item.files.method_config(), item.state, where=str(item.files.path))
    adapters.set_active(next(iter(loaded), None))
    base_model.model.eval()
    named = NamedModel(
        base_model.model, base_model.tokenizer, adapters, {n: i.files for n, i in loaded.items()}, base, labels, task
    )
    for name, item in scored.items():
        _add_scorer(named, name, item)
    return named


def _add_scorer(named: NamedModel, name: str, item: _Loaded) -> None:
    """Put a reward adapter on a causal-LM base: its layer updates as a named adapter, its score
    head kept apart (:class:`ScoreHead`)."""
    method = item.files.method_config()
    keep = list(method.modules_to_save or [])
    head, rest = ScoreHead.split_off(item.state, keep, named.tokenizer.pad_token_id)
    if head is None:
        raise PeftkitError(
            "the reward adapter holds no one-output score head",
            str(item.files.path),
            "train it with task reward (the head is saved with the adapter)",
        )
    named.adapters.add(name, method.model_copy(update={"modules_to_save": None}), rest, where=str(item.files.path))
    named.files[name] = item.files
    named.label_names[name] = ["score"]
    named.scorers[name] = head


@torch.inference_mode()
def score_rows(named: NamedModel, texts: list[str], name: str, batch_size: int = 64) -> list[np.ndarray]:
    """A reward adapter's score of each text, on a causal-LM base (:class:`ScoreHead`)."""
    from .lm_loss import final_hidden_states

    head = named.scorers[name]
    features = tokenize(named.tokenizer, texts, named.max_length(name))
    out: list[np.ndarray] = [np.zeros(1)] * len(texts)
    device = next(named.model.parameters()).device
    with named.adapters.using(name):
        for idx in LengthGroupedBatches([len(f["input_ids"]) for f in features], batch_size, shuffle=False):
            batch = {k: v.to(device) for k, v in collate([features[i] for i in idx], head.pad_id or 0).items()}
            hidden = final_hidden_states(named.model, **batch)
            for i, row in zip(idx, head.scores(hidden, batch["input_ids"]).cpu().numpy()):
                out[i] = row
    return out


def _quantize(model: Any, files: list[AdapterFiles], bits: int) -> None:
    keep: list[str] = []
    for f in files:
        check_quantizable(f.method_config())
        keep += [m for m in (f.method_config().modules_to_save or []) if m not in keep]
    quantize_model(model, QuantizationConfig(bits=bits), skip=resolve_modules_to_save(model, keep))


@torch.inference_mode()
def predict_rows(named: NamedModel, texts: list[str], names: list[str], batch_size: int = 64) -> list[np.ndarray]:
    """Each text's class probabilities under its own adapter (and head), in mixed batches: one
    forward pass per batch for the rows of LoRA and IA3 adapters, whatever adapters they name
    (one more for each prompt or prefix adapter among them). A reward model's row is its score."""
    check_rows(names, named.names, "input")
    out: list[np.ndarray] = [np.zeros(0)] * len(texts)
    if named.scorers:  # reward adapters on a causal-LM base: each with its own head
        for name in dict.fromkeys(names):
            idx = [i for i, n in enumerate(names) if n == name]
            for i, row in zip(idx, score_rows(named, [texts[i] for i in idx], name, batch_size)):
                out[i] = row
        return out
    features: list[dict[str, list[int]]] = [{}] * len(texts)
    for name in dict.fromkeys(names):
        idx = [i for i, n in enumerate(names) if n == name]
        for i, f in zip(idx, tokenize(named.tokenizer, [texts[i] for i in idx], named.max_length(name))):
            features[i] = f
    device = next(named.model.parameters()).device
    for idx in LengthGroupedBatches([len(f["input_ids"]) for f in features], batch_size, shuffle=False):
        batch = collate([features[i] for i in idx], named.tokenizer.pad_token_id)
        logits = named.adapters.forward_rows([names[i] for i in idx], **{k: v.to(device) for k, v in batch.items()})
        probs = logits.float().softmax(-1).cpu().numpy()
        for row, raw, i in zip(probs, logits.float().cpu().numpy(), idx):
            out[i] = (raw if named.is_reward(names[i]) else row)[: len(named.label_names[names[i]])]
    return out


def evaluate_each(named: NamedModel, source: str, split: str = "test", **options: Any) -> dict[str, Any]:
    """Every adapter's metrics on the split (accuracy, macro-F1, loss, confusion matrix for
    classifiers; loss and perplexity, and label scores, for causal LMs), keyed by adapter."""
    results = {}
    for name in named.names:
        with named.adapters.using(name):
            results[name] = _evaluate_one(named, name, source, split, **options)
    return {"dataset": source, "split": split, "adapters": results}


def _evaluate_one(named: NamedModel, name: str, source: str, split: str, **options: Any) -> dict[str, Any]:
    if named.is_reward(name):
        from .reward import evaluate_reward

        options = {k: v for k, v in options.items() if k in ("max_samples", "batch_size")}
        return evaluate_reward(classifier(named, name), source, split, **options)
    if name in named.label_names:
        return evaluate_adapter(classifier(named, name), source, split, **options)
    options = {k: v for k, v in options.items() if k in ("max_samples", "batch_size")}
    return evaluate_lm_adapter(language_model(named, name), source, split, **options)


def classifier(named: NamedModel, name: str) -> AdaptedClassifier:
    """The classification adapter ``name`` seen alone (its head, labels, length); the caller makes
    it active (``named.adapters.using(name)``)."""
    return AdaptedClassifier(
        named.model,
        named.tokenizer,
        named.label_names[name],
        named.max_length(name),
        named.files[name],
        named.base_model,
        named.adapters,
        name,
    )


def language_model(named: NamedModel, name: str) -> AdaptedLM:
    """The adapter ``name`` seen as one adapted causal LM (its own prompt format); the caller makes
    it active (``named.adapters.using(name)``)."""
    return AdaptedLM(
        named.model,
        named.tokenizer,
        lm_encoder(named.tokenizer, named.files[name]),
        named.files[name],
        named.base_model,
        named.adapters,
        name,
    )


def load_adapted_classifier(
    adapter_dir: str | Path, model: str | None = None, quantize: int | None = None
) -> AdaptedClassifier:
    """Load the classification adapter in ``adapter_dir`` onto its base (or onto ``model``): the
    one-adapter case of :func:`load_named`. Works for adapters written by peftkit and by ``peft``.
    ``quantize`` (4 or 8) quantizes the base's linear layers first, whether or not the adapter was
    trained on a quantized base.

    Raises:
        PeftkitError: unreadable adapter, unknown base, or an adapter that does not fit the base.
    """
    named = load_named([(DEFAULT_NAME, Path(adapter_dir))], model, quantize)
    if named.task != "classification":
        raise PeftkitError(
            "this is a causal-LM adapter, not a classifier",
            str(adapter_dir),
            "use peftkit generate, or load it with load_adapted_lm",
        )
    return classifier(named, DEFAULT_NAME)


def load_adapted_lm(adapter_dir: str | Path, model: str | None = None, quantize: int | None = None) -> AdaptedLM:
    """Load a causal-LM adapter (peftkit's or ``peft``'s) onto its base (or onto ``model``): the
    one-adapter case of :func:`load_named`.

    Raises:
        PeftkitError: unreadable adapter, unknown base, or an adapter that does not fit the base.
    """
    named = load_named([(DEFAULT_NAME, Path(adapter_dir))], model, quantize)
    if named.task != "causal_lm":
        raise PeftkitError(
            "this is a classification adapter, not a causal LM",
            str(adapter_dir),
            "use peftkit predict, or load it with load_adapted_classifier",
        )
    return language_model(named, DEFAULT_NAME)


def generate_rows(
    named: NamedModel, prompts: list[str], names: list[str], *, raw: bool = False, batch_size: int = 16, **options: Any
) -> list[str]:
    """Each prompt's answer from its own adapter, in its prompt format. Where the adapters stop
    on the same tokens (always with ``raw``) and none adds tokens (prompt, prefix), rows of
    different adapters share batches, each row routed to its adapter in every forward; otherwise
    each adapter's rows are generated apart."""
    check_rows(names, named.names, "input")
    lms = {n: language_model(named, n) for n in dict.fromkeys(names)}
    ids = [lms[n].prompt_ids(p, raw=raw) for p, n in zip(prompts, names)]
    stops = {tuple(lm.encoder.stop_ids) for lm in lms.values()}
    if (raw or len(stops) == 1) and not any(named.adapters.adds_tokens(n) for n in lms):
        return generate(
            named.model,
            named.tokenizer,
            ids,
            batch_size=batch_size,
            stop_ids=None if raw else list(stops.pop()),
            around=lambda idx: named.adapters.per_row([names[i] for i in idx]),
            **options,
        )
    answers = [""] * len(prompts)
    for name, lm in lms.items():
        idx = [i for i, n in enumerate(names) if n == name]
        with named.adapters.using(name):
            got = generate(
                named.model,
                named.tokenizer,
                [ids[i] for i in idx],
                batch_size=batch_size,
                stop_ids=lm.encoder.stop_ids,
                **options,
            )
        for i, answer in zip(idx, got):
            answers[i] = answer
    return answers


def combine_folders(
    specs: list[tuple[str, Path]],
    weights: list[float],
    combination: str,
    output: str | Path,
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    head: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Combine LoRA adapter folders into one adapter folder at ``output`` (peft's format), heads
    included: weighted like the factors, or ``head``'s alone.

    Returns:
        What the new adapter's peftkit.json says of how it was made.

    Raises:
        PeftkitError: a non-empty ``output`` (unless ``overwrite``), adapters that are not LoRA or
            of different bases, tasks or label sets, bad weights, density or rank; nothing is written.
    """
    output = check_merge_output(output, overwrite)
    _, task, loaded = read_specs(specs, None)
    for name, item in loaded.items():
        if not isinstance(item.files.method_config(), LoraConfig):
            raise PeftkitError(
                f"adapter {name!r} is {item.files.method_config().name}, not LoRA",
                str(item.files.path),
                "combine takes LoRA adapters",
            )
    factors, heads = {}, {}
    for name, item in loaded.items():
        factors[name], heads[name] = _split_lora(item)
    check_combination(combination, len(specs), weights, density, [f.rank for f in factors.values()])
    if rank is not None and rank < 1:
        raise PeftkitError(f"rank {rank} is not positive", "--rank", "pass a rank of 1 or more")
    _check_same_layers(factors)
    labels = _same_labels(loaded, heads)
    layers, new_rank = combine_lora(list(factors.values()), weights, combination, density=density, rank=rank, seed=seed)
    state = {f"{p}.lora_A.weight": a for p, (a, _) in layers.items()} | {
        f"{p}.lora_B.weight": b for p, (_, b) in layers.items()
    }
    if head is not None:
        if head not in heads:
            raise PeftkitError(
                f"--head names {head!r}, which is not among the adapters", "--head", f"use one of: {', '.join(heads)}"
            )
        state |= heads[head]
    elif any(heads.values()):
        state |= combine_heads(list(heads.values()), weights)
    first = next(iter(loaded.values())).files
    method = first.method_config()
    config = {
        **first.config,
        "r": new_rank,
        "lora_alpha": new_rank,
        "use_rslora": False,
        "target_modules": sorted(layers),
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    made = {
        "combination": combination,
        "weights": weights,
        "density": density,
        "seed": seed,
        "adapters": [{"name": n, "path": str(p)} for n, p in specs],
        "head": head,
    }
    meta = {**first.meta, "task": task, "base_model": first.base_model, "combined": made}
    if labels:
        meta["id2label"] = dict(enumerate(labels))
    write_adapter(output, config, {method.file_key(k): v for k, v in state.items()}, meta)
    return made


def _split_lora(item: _Loaded) -> tuple[Any, dict[str, torch.Tensor]]:
    """An adapter's LoRA factors per layer, and its other tensors (saved modules, heads)."""
    method = item.files.method_config()
    if method.variant():
        raise PeftkitError(
            f"combine takes plain LoRA adapters; this one uses {method.variant()}",
            str(item.files.path),
            "combine adapters without DoRA, lora_bias, residual inits or rank/alpha patterns",
        )
    layers: dict[str, list] = {}
    rest = {}
    for key, t in item.state.items():
        for i, leaf in enumerate((".lora_A.weight", ".lora_B.weight")):
            if key.endswith(leaf):
                layers.setdefault(key[: -len(leaf)], [None, None])[i] = t.float()
                break
        else:
            rest[key] = t.float()
    broken = [p for p, (a, b) in layers.items() if a is None or b is None or a.shape[0] != b.shape[1]]
    if broken:
        raise PeftkitError(
            f"the adapter's LoRA tensors for {broken[0]} do not pair up", str(item.files.path), "save the adapter again"
        )
    return LoRAFactors({p: (a, b) for p, (a, b) in layers.items()}, method.scaling(), method.r), rest


def _check_same_layers(factors: dict[str, Any]) -> None:
    """Layers that several adapters target have one shape in all of them (else: different bases)."""
    shapes: dict[str, tuple[str, tuple[int, int]]] = {}
    for name, f in factors.items():
        for path, (a, b) in f.layers.items():
            shape = (a.shape[1], b.shape[0])
            seen = shapes.setdefault(path, (name, shape))
            if seen[1] != shape:
                raise PeftkitError(
                    f"{path} is {seen[1][0]} -> {seen[1][1]} in {seen[0]!r} and {shape[0]} -> "
                    f"{shape[1]} in {name!r}: the adapters are of different bases",
                    "--adapter",
                    "combine adapters of one base model",
                )


def _same_labels(loaded: dict[str, _Loaded], heads: dict[str, dict]) -> list[str] | None:
    """The label names the adapters share (None for adapters without labels)."""
    named = {n: i.files.meta.get("id2label") for n, i in loaded.items()}
    lists = {n: [v[k] for k in sorted(v, key=int)] for n, v in named.items() if v}
    if len({tuple(v) for v in lists.values()}) > 1:
        shown = "; ".join(f"{n}: {', '.join(v)}" for n, v in lists.items())
        raise PeftkitError(
            f"the adapters' label sets differ ({shown})",
            "--adapter",
            "combine classifiers of the same labels, in the same order",
        )
    sizes = {
        n: min((t.shape[0] for k, t in h.items() if k.endswith(".weight") and t.ndim == 2), default=None)
        for n, h in heads.items()
    }
    if len({s for s in sizes.values() if s is not None}) > 1:
        raise PeftkitError(
            "the adapters' heads have different numbers of labels",
            "--adapter",
            "combine classifiers of the same labels",
        )
    return next(iter(lists.values()), None)


def write_folder(specs: list[tuple[str, Path]], output: str | Path, overwrite: bool = False) -> Path:
    """Write several adapters as one folder in peft's layout: the adapter named "default" at the
    root, every other one in a subfolder of its name (``PeftModel.from_pretrained(model, DIR/NAME,
    adapter_name=NAME)`` and ``load_adapter`` read them; so does :func:`folder_adapters`).

    Raises:
        PeftkitError: a non-empty ``output`` (unless ``overwrite``), unreadable adapters.
    """
    output = check_merge_output(output, overwrite)
    for _, path in specs:
        read_adapter(path)
    with atomic_dir(output) as tmp:
        for name, path in specs:
            target = tmp if name == DEFAULT_NAME else tmp / name
            target.mkdir(exist_ok=True)
            for f in path.iterdir():
                if f.is_file():
                    shutil.copy2(f, target / f.name)
    return Path(output)


def evaluate_preference(
    adapter: str,
    data: str,
    cfg: Any,
    *,
    split: str = "test",
    model: str | None = None,
    quantize: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    max_samples: int | None = None,
    bf16: bool = False,
) -> dict[str, Any]:
    """TRL's preference metrics of a causal-LM adapter (peftkit's or ``peft``'s) on ``data``:
    ``cfg.reference`` (an adapter folder) or the base alone is the reference. ``max_length``
    defaults to the adapter's own (else 1024, TRL's default). ``cfg.precompute_reference``
    reads the reference's log-probabilities from peftkit's cache (computing them once), so
    several adapters of one base are scored against it at the cost of their own passes; ``bf16``
    runs the passes under bfloat16 autocast.

    Raises:
        PeftkitError: an adapter that is not a causal-LM one, or rows that cannot be scored.
    """
    from .config import DataConfig
    from .data import load_one_split, subsample
    from .pairs import PairEncoder, check_layout, to_pair_rows
    from .preference import REFERENCE, PreferenceTask, Reference, folder_digest

    specs = [("policy", Path(adapter))]
    if cfg.reference and cfg.uses_reference:
        specs.append((REFERENCE, Path(cfg.reference)))
    named = load_named(specs, model, quantize)
    if named.task != "causal_lm":
        raise PeftkitError(
            "preference metrics score a causal-LM adapter; this is a classifier",
            adapter,
            "pass an adapter trained with task causal_lm or preference",
        )
    named.adapters.set_active("policy")
    meta = named.files["policy"].meta
    data_cfg = DataConfig(max_length=max_length or int(meta.get("max_length") or 1024))
    data_cfg.system_prompt = meta.get("system_prompt")
    rows = subsample(load_one_split(data, split, data_cfg, convert=to_pair_rows), max_samples, 0)
    check_layout(cfg.loss, {rows.kind}, data)
    group = batch_size if cfg.loss == "kto" else 0
    encoded = PairEncoder(named.tokenizer, data_cfg).encode_split(rows, f"{data}, {split} split", group)
    reference = Reference(cfg.reference if len(specs) > 1 else None)
    task = PreferenceTask(cfg, {split: encoded}, named.tokenizer.pad_token_id, reference)
    device = next(named.model.parameters()).device

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    if cfg.precompute_reference and cfg.uses_reference:
        reference_id = folder_digest(Path(cfg.reference)) if len(specs) > 1 else "base"
        task.cache_key = f"{named.base_model}\0{quantize}\0{bf16}\0{batch_size}\0{reference_id}"
        task.start(named.model, device, autocast, lambda line: None)
    with autocast():
        metrics = task.evaluate(named.model, split, batch_size, device)
    return {
        "dataset": data,
        "split": split,
        "adapter": adapter,
        "reference": cfg.reference if len(specs) > 1 else "base (adapter disabled)",
        **cfg.model_dump(mode="json", include={"loss", "beta"}),
        "truncation": {"over_max_length": encoded.truncated, "prompt_fills_max_length": encoded.dropped},
        **metrics,
    }
