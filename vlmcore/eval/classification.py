"""Classification by log-likelihood (OpenFlamingo ``evaluate_classification``): top-1 and ROC AUC.

Each class name is scored by the model's log-likelihood right after the few-shot prompt
(:meth:`vlmcore.eval.generation.FlamingoEval.class_logprobs`, KV-cached prompt); with
``ensembles > 1`` the demonstrations are shuffled that many times (OpenFlamingo: ``min(6, k!)``
orders) and the scores averaged. Reported: top-1 accuracy, and for two classes (HatefulMemes) the
ROC AUC of the probability of the greater class name (OpenFlamingo's convention).

Samples are dicts ``{"id", "image" [C, H, W], "label": class index}`` plus, for HatefulMemes,
``"text"`` (the meme's OCR text).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vlmcore.eval.demos import plan_trial, prompt_images
from vlmcore.eval.prompts import class_prompt, classification_few_shot_prompt, effective_num_shots, hateful_memes_prompt


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve of binary ``labels`` (1 = positive) ranked by ``scores``: the
    Mann-Whitney statistic, ties counted half (what ``sklearn.metrics.roc_auc_score`` computes)."""
    labels_t, scores_t = torch.as_tensor(labels, dtype=torch.float64), torch.as_tensor(scores, dtype=torch.float64)
    positives, negatives = int(labels_t.sum()), int((1 - labels_t).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("ROC AUC needs both classes among the labels")
    pos, neg = scores_t[labels_t == 1], scores_t[labels_t == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins) / (positives * negatives)


def chunk(sample: dict, class_names: Sequence[str], label: int | None) -> str:
    """The prompt chunk of a sample: HatefulMemes' when it has ``text``, else the class-name caption."""
    name = None if label is None else class_names[label]
    return hateful_memes_prompt(sample["text"], name) if "text" in sample else class_prompt(name)


def classify(model, train: Sequence[dict], eval_set: Sequence[dict], class_names: Sequence[str], *,
             num_shots: int, seed: int, num_samples: int = 0, query_set_size: int = 2048, ensembles: int = 1,
             batch_size: int = 8, rank: int = 0, world_size: int = 1) -> list[dict]:
    """This rank's ``{"id", "label", "pred", "probs"}`` per evaluated sample (``probs``: softmax over
    the ensembled class log-likelihoods)."""
    plan = plan_trial(len(eval_set), len(train), seed=seed, num_samples=num_samples, query_set_size=query_set_size,
                      rank=rank, world_size=world_size)
    if num_shots > 0 and not train:
        raise ValueError(f"{num_shots}-shot classification needs a demonstration set")
    k = effective_num_shots(num_shots) if train else 0  # no demonstration set: the bare query prompt
    orders = max(1, min(ensembles, math.factorial(k)))
    out = []
    for start in range(0, len(plan.eval_indices), batch_size):
        batch = [eval_set[i] for i in plan.eval_indices[start:start + batch_size]]
        demos = [[train[j] for j in plan.random_demos(k)] for _ in batch]
        scores = []
        for _ in range(orders):
            if orders > 1:
                for row in demos:
                    plan.demo_rng.shuffle(row)
            images = prompt_images(demos, batch, num_shots)
            prompts = [classification_few_shot_prompt([chunk(d, class_names, d["label"]) for d in row],
                                                      chunk(q, class_names, None), num_shots)
                       for row, q in zip(demos, batch)]
            scores.append(model.class_logprobs(images, prompts, class_names))
        probs = torch.stack(scores).mean(0).softmax(-1)  # [B, classes]
        out += [{"id": q["id"], "label": int(q["label"]), "pred": int(p.argmax()), "probs": p.tolist()}
                for q, p in zip(batch, probs)]
    return out


def classification_metrics(results: Sequence[dict], class_names: Sequence[str]) -> dict:
    """``{"top1"}`` (percent), plus ``"roc_auc"`` for two classes: the score of the greater class
    name (``max(class_names)``, HatefulMemes' ``"yes"``) as OpenFlamingo ranks it."""
    metrics = {"top1": 100.0 * sum(r["pred"] == r["label"] for r in results) / len(results)}
    if len(class_names) == 2:
        positive = class_names.index(max(class_names))
        metrics["roc_auc"] = roc_auc([int(r["label"] == positive) for r in results],
                                     [r["probs"][positive] for r in results])
    return metrics
