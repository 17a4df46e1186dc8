"""Classification metrics, checked against scikit-learn as the reference."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_match_scikit_learn(seed):
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    from peftkit.evaluate import classification_metrics

    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(2, 6)), int(rng.integers(1, 60))
    labels = rng.integers(0, k - (seed % 2), n).tolist()  # odd seeds: the last class never occurs
    probs = rng.random((n, k))
    if seed % 3 == 0:
        probs[:, 0] = 0  # class 0 is never predicted
    got = classification_metrics(labels, probs, [str(i) for i in range(k)], loss=0.5)
    preds = probs.argmax(-1)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, preds), abs=1e-12)
    assert got["f1"] == pytest.approx(
        f1_score(labels, preds, labels=list(range(k)), average="macro", zero_division=0), abs=1e-12
    )
    assert got["confusion_matrix"] == confusion_matrix(labels, preds, labels=list(range(k))).tolist()
    assert got["n"] == n and got["loss"] == 0.5
