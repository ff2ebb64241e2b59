"""RICES equals a brute-force cosine search (features cached once); ROC AUC equals the pairwise
definition (and scikit-learn where installed); log-likelihood metrics as OpenFlamingo reports them."""

import itertools
import math

import pytest
import torch

from vlmcore.eval.classification import classification_metrics, roc_auc
from vlmcore.eval.rices import Rices, cached_features, image_features


def brute_force(train, queries, k):
    """For each query, the k training rows of highest cosine similarity, most similar last."""
    out = []
    for q in queries:
        sims = [float(q @ t / (q.norm() * t.norm())) for t in train]
        best = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        out.append(list(reversed(best)))
    return out


@pytest.mark.parametrize("k", [0, 1, 4, 32])
def test_rices_equals_brute_force_cosine_search(k):
    gen = torch.Generator().manual_seed(k)
    train, queries = torch.randn(32, 7, generator=gen) * 3, torch.randn(5, 7, generator=gen)
    assert Rices(train).find(queries, k) == brute_force(train, queries, k)


def test_features_are_computed_once_and_cached(tmp_path):
    calls = []
    encode = torch.nn.Linear(12, 4)

    def compute():
        calls.append(1)
        return image_features(lambda x: encode(x.flatten(1)), [torch.randn(3, 3, 2, 2), torch.randn(2, 3, 2, 2)])

    first = cached_features(str(tmp_path / "f.pt"), compute)
    second = cached_features(str(tmp_path / "f.pt"), compute)
    assert len(calls) == 1 and first.shape == (5, 4) and torch.equal(first, second)
    assert torch.allclose(first.norm(dim=-1), torch.ones(5))
    with pytest.raises(ValueError, match="k must be in \\[0, 5\\]"):
        Rices(first).find(first[:1], 6)


def pairwise_auc(labels, scores):
    pairs = [(p, n) for p, n in itertools.product(range(len(labels)), repeat=2) if labels[p] == 1 and labels[n] == 0]
    return sum(1.0 if scores[p] > scores[n] else 0.5 if scores[p] == scores[n] else 0.0 for p, n in pairs) / len(pairs)


def test_roc_auc():
    labels, scores = [1, 0, 1, 1, 0, 0, 1], [0.9, 0.1, 0.4, 0.4, 0.4, 0.8, 0.7]
    assert roc_auc(labels, scores) == pytest.approx(pairwise_auc(labels, scores), abs=1e-12)
    assert roc_auc([1, 0], [0.2, 0.8]) == 0.0
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(200, generator=gen) > 0.4).int().tolist()
    scores = torch.randint(0, 20, (200,), generator=gen).float().tolist()  # many ties
    assert roc_auc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores), abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.1, 0.2])


def test_classification_metrics_rank_the_greater_class_name():
    names = ["no", "yes"]  # HatefulMemes: "yes" (the greater name) is the positive class
    results = [{"label": 1, "pred": 1, "probs": [0.2, 0.8]}, {"label": 0, "pred": 1, "probs": [0.4, 0.6]},
               {"label": 0, "pred": 0, "probs": [0.9, 0.1]}]
    m = classification_metrics(results, names)
    assert m["top1"] == pytest.approx(200 / 3) and m["roc_auc"] == 1.0
    assert "roc_auc" not in classification_metrics(results, ["a", "b", "c"])
    assert not math.isnan(m["top1"])
