"""The linear probe equals scikit-learn's LogisticRegression on the same features (0.1 points); k-shot: k per class."""

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the linear probe needs the eval extra (scikit-learn)")
from sklearn.linear_model import LogisticRegression  # noqa: E402

from vlmcore.eval.linear_probe import k_shot_indices, linear_probe, validation_split  # noqa: E402


def _features(n: int, classes: int = 5, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping Gaussian clusters: ``[n, dim]`` features and ``[n]`` labels (a probe cannot be perfect)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(classes, dim))
    labels = rng.integers(0, classes, size=n)
    return centers[labels] + 1.2 * rng.normal(size=(n, dim)), labels


def test_linear_probe_equals_sklearn_logistic_regression():
    x, y = _features(300)
    x_test, y_test = _features(200, seed=1)
    result = linear_probe(torch.from_numpy(x).float(), torch.from_numpy(y), x_test, y_test)
    reference = LogisticRegression(C=result["C"], max_iter=1000).fit(x.astype(np.float32).astype(np.float64), y)
    expected = 100 * (reference.predict(x_test) == y_test).mean()
    assert abs(result["top1"] - expected) <= 0.1
    assert 40 < result["top1"] < 100  # learnt something, and the clusters overlap
    assert result["train_samples"] == 300 and result["test_samples"] == 200


def test_the_sweep_picks_the_best_strength_on_the_validation_split():
    x, y = _features(200)
    result = linear_probe(x, y, *_features(50, seed=1))
    fit, val = validation_split(len(y), 0.2, np.random.default_rng(0))
    accuracy = {c: (LogisticRegression(C=c, max_iter=1000).fit(x[fit], y[fit]).predict(x[val]) == y[val]).mean()
                for c in (1e-6, 1e-3, 1.0, 1e3, result["C"])}
    assert 100 * accuracy[result["C"]] == pytest.approx(result["val_top1"])
    assert accuracy[result["C"]] >= max(accuracy.values())


def test_k_shot_fits_k_examples_per_class():
    x, y = _features(300)
    result = linear_probe(x, y, *_features(200, seed=1), k_shot=4)
    assert result["train_samples"] == 4 * 5
    assert result["top1"] > 30  # chance is 20
    picked = k_shot_indices(np.array([0, 0, 0, 1, 1, 2]), 2, np.random.default_rng(0))
    assert np.bincount(np.array([0, 0, 0, 1, 1, 2])[picked]).tolist() == [2, 2, 1]
