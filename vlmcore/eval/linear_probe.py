"""Linear probe on frozen features: scikit-learn's ``LogisticRegression`` with a regularization sweep.

The CLIP paper's protocol (section 3.2, appendix A.3): an L2-regularized logistic regression (L-BFGS)
on frozen image features, its strength chosen on a validation split carved out of the training set
by a coarse sweep over decades refined around the best (CLIP's "parametric binary search"), then
refit with the chosen strength and scored once on the test features. The k-shot variant fits on
``k`` examples per class; the sweep still validates on a split disjoint from those shots, and the
final refit uses the shots only. Features come from any encoder (``module.encode_image`` of a
:class:`vlmcore.CLIP`, a vision tower's pooled output, ...).
"""

from __future__ import annotations

import numpy as np

#: The coarse sweep over the inverse regularization strength C = 1 / lambda: one value per decade.
COARSE_C = tuple(10.0 ** e for e in range(-6, 7))


def _as_numpy(x, dtype) -> np.ndarray:
    """A torch tensor or array-like as a numpy array of ``dtype`` (CPU, no grad)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def validation_split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random ``(fit indices, validation indices)`` of ``n`` samples, at least one on each side."""
    if n < 2:
        raise ValueError(f"the linear probe needs at least 2 training samples, got {n}")
    order = rng.permutation(n)
    n_val = min(max(1, round(fraction * n)), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def k_shot_indices(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``k`` random positions of each class in ``labels`` (all of a class with fewer), sorted."""
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def _fit_score(c: float, fit: tuple, score: tuple, max_iter: int) -> float:
    """Top-1 (fraction) on ``score`` = (features, labels) of a logistic regression with C fit on ``fit``."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c, max_iter=max_iter)
    model.fit(*fit)
    return float((model.predict(score[0]) == score[1]).mean())


def sweep_regularization(fit: tuple, val: tuple, max_iter: int = 1000, refine_rounds: int = 2) -> tuple[float, float]:
    """``(best C, its validation top-1)``: the decades of :data:`COARSE_C`, then ``refine_rounds`` rounds
    of trying half the previous step (in log10) on each side of the best; ties go to the smaller C."""
    scores = {c: _fit_score(c, fit, val, max_iter) for c in COARSE_C}
    best = max(scores, key=lambda c: (scores[c], -c))
    step = 0.5
    for _ in range(refine_rounds):
        for c in (best * 10.0 ** -step, best * 10.0 ** step):
            scores.setdefault(c, _fit_score(c, fit, val, max_iter))
        best = max(scores, key=lambda c: (scores[c], -c))
        step /= 2
    return best, scores[best]


def linear_probe(train_features, train_labels, test_features, test_labels, *, k_shot: int | None = None,
                 val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000) -> dict:
    """Fit and score a linear probe.

    Args:
        train_features: ``[N, D]`` frozen features (torch tensor or array); ``train_labels``: ``[N]`` ints.
        test_features: ``[M, D]``; ``test_labels``: ``[M]``.
        k_shot: fit on this many examples per class (None = the whole training set).
        val_fraction: share of the training set held out for the regularization sweep.
        seed: the split and the k-shot draw.

    Returns:
        ``{"top1": test accuracy in percent, "C": chosen inverse regularization, "val_top1": percent,
        "train_samples": examples in the final fit, "test_samples": M}``.
    """
    x, y = _as_numpy(train_features, np.float64), _as_numpy(train_labels, np.int64)
    x_test, y_test = _as_numpy(test_features, np.float64), _as_numpy(test_labels, np.int64)
    if x.ndim != 2 or x_test.ndim != 2 or len(x) != len(y) or len(x_test) != len(y_test):
        raise ValueError(f"features must be [N, D] with one label each; got train {x.shape} / {y.shape}, "
                         f"test {x_test.shape} / {y_test.shape}")
    rng = np.random.default_rng(seed)
    fit_idx, val_idx = validation_split(len(y), val_fraction, rng)
    if k_shot is not None:
        fit_idx = fit_idx[k_shot_indices(y[fit_idx], k_shot, rng)]
    best_c, val_top1 = sweep_regularization((x[fit_idx], y[fit_idx]), (x[val_idx], y[val_idx]), max_iter)
    final_idx = fit_idx if k_shot is not None else np.arange(len(y))  # full data: refit on train + validation
    top1 = _fit_score(best_c, (x[final_idx], y[final_idx]), (x_test, y_test), max_iter)
    return {"top1": 100 * top1, "C": best_c, "val_top1": 100 * val_top1, "train_samples": int(len(final_idx)),
            "test_samples": int(len(y_test))}
