"""Generation-based and few-shot in-context evaluation: captioning (CIDEr, ...) and VQA (accuracy).

OpenFlamingo's ``evaluate_captioning`` / ``evaluate_vqa`` over vlmcore models: for each shot count
and each trial seed, draw the evaluated samples and each query's demonstrations
(:mod:`vlmcore.eval.demos`, or RICES: :mod:`vlmcore.eval.rices`), build the prompts
(:mod:`vlmcore.eval.prompts`), decode (:mod:`vlmcore.eval.generation`), post-process as the reference
does, write the predictions file and score it with :func:`vlmcore.eval.captions.score_captions` /
:func:`vlmcore.eval.vqa.vqa_accuracy`. Every rank decodes its share; predictions are gathered.

Samples are dicts: captioning ``{"id", "image" [C, H, W], "captions": [str, ...]}`` (the first
caption is the demonstration text, all of them the references); VQA ``{"id" (question id),
"image", "question", "answers": [str, ...]}`` (the first answer is the demonstration's).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlmcore.eval.demos import plan_trial, prompt_images
from vlmcore.eval.prompts import (
    OPENFLAMINGO,
    PromptStyle,
    caption_few_shot_prompt,
    effective_num_shots,
    postprocess_caption,
    postprocess_vqa,
    vqa_few_shot_prompt,
)
from vlmcore.eval.rices import Rices

KINDS = ("caption", "vqa")


@dataclass
class FewShotSettings:
    """How a few-shot evaluation runs (OpenFlamingo's flags in brackets).

    ``shots`` [--shots], ``trial_seeds`` [--trial_seeds], ``num_samples`` [--num_samples; 0 = all],
    ``query_set_size`` [--query_set_size], ``batch_size``, decoding (``max_new_tokens`` 20 for
    captions and 5 for VQA in OpenFlamingo, ``num_beams`` 3, ``length_penalty`` 0), ``rank`` /
    ``world_size`` (this rank's share), ``progress`` (a tqdm bar on rank 0), ``out_dir`` (where the
    predictions files go; None = not written), ``style`` (:data:`vlmcore.eval.prompts.OPENFLAMINGO`
    or ``TRAINER``).
    """

    shots: Sequence[int] = (0,)
    trial_seeds: Sequence[int] = (42,)
    num_samples: int = 0
    query_set_size: int = 2048
    batch_size: int = 8
    max_new_tokens: int = 20
    num_beams: int = 3
    length_penalty: float = 0.0
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    out_dir: str | None = None
    style: PromptStyle = OPENFLAMINGO


def build_prompt(kind: str, demos: Sequence[dict], query: dict, num_shots: int,
                 style: PromptStyle = OPENFLAMINGO) -> str:
    """The prompt of ``query`` after ``demos`` (samples as in the module docstring)."""
    if kind == "caption":
        return caption_few_shot_prompt([d["captions"][0] for d in demos], num_shots, style)
    return vqa_few_shot_prompt([(d["question"], d["answers"][0]) for d in demos], query["question"], num_shots,
                               style)


def _prediction(kind: str, sample: dict, text: str) -> dict:
    """One entry of the predictions file (COCO results / VQA results format)."""
    if kind == "caption":
        return {"image_id": sample["id"], "caption": postprocess_caption(text)}
    return {"question_id": sample["id"], "answer": postprocess_vqa(text)}


def predict(model, kind: str, train: Sequence[dict], eval_set: Sequence[dict], num_shots: int, seed: int,
            settings: FewShotSettings, rices: Rices | None = None, eval_features: torch.Tensor | None = None
            ) -> list[dict]:
    """This rank's predictions for one (shot count, trial seed); demos random, or RICES when given
    (``eval_features`` ``[len(eval_set), D]``: the eval images in the RICES embedding)."""
    from tqdm import tqdm

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    plan = plan_trial(len(eval_set), len(train), seed=seed, num_samples=settings.num_samples,
                      query_set_size=settings.query_set_size, rank=settings.rank, world_size=settings.world_size)
    if num_shots > 0 and not train:
        raise ValueError(f"{num_shots}-shot evaluation needs a demonstration set")
    k = effective_num_shots(num_shots) if train else 0  # no demonstration set: the bare query prompt
    predictions = []
    starts = range(0, len(plan.eval_indices), settings.batch_size)
    bar = tqdm(starts, desc=f"{kind} {num_shots}-shot seed {seed}", disable=not settings.progress or settings.rank > 0)
    for start in bar:
        batch = [eval_set[i] for i in plan.eval_indices[start:start + settings.batch_size]]
        if rices is not None:
            chosen = rices.find(eval_features[plan.eval_indices[start:start + settings.batch_size]], k)
        else:
            chosen = [plan.random_demos(k) for _ in batch]
        demos = [[train[j] for j in row] for row in chosen]
        images = prompt_images(demos, batch, num_shots)
        prompts = [build_prompt(kind, row, q, num_shots, settings.style) for row, q in zip(demos, batch)]
        texts = model.generate(images, prompts, max_new_tokens=settings.max_new_tokens, num_beams=settings.num_beams,
                               length_penalty=settings.length_penalty)
        predictions += [_prediction(kind, q, t) for q, t in zip(batch, texts)]
    return predictions


def gather_predictions(predictions: list[dict], world_size: int) -> list[dict]:
    """Every rank's predictions, on every rank (``all_gather_object``; as is with one rank)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return predictions
    shares = [None] * world_size
    torch.distributed.all_gather_object(shares, predictions)
    seen, out = set(), []
    for item in (p for share in shares for p in share):  # DistributedSampler pads by repeating samples
        key = item.get("image_id", item.get("question_id"))
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def references(kind: str, samples: Sequence[dict]) -> dict:
    """The ground truth of ``samples``: COCO captions annotations, or ``{"questions", "annotations"}``
    in the VQAv2 formats (each answer given by one annotator)."""
    if kind == "caption":
        return {"images": [{"id": s["id"]} for s in samples],
                "annotations": [{"image_id": s["id"], "id": n, "caption": c}
                                for n, (s, c) in enumerate((s, c) for s in samples for c in s["captions"])]}
    questions = [{"question_id": s["id"], "image_id": s["id"], "question": s["question"]} for s in samples]
    annotations = [{"question_id": s["id"], "image_id": s["id"], "question_type": "", "answer_type": "other",
                    "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(s["answers"])]}
                   for s in samples]
    return {"questions": {"questions": questions}, "annotations": {"annotations": annotations}}


def score(kind: str, predictions: list[dict], samples: Sequence[dict]) -> dict:
    """The metrics of ``predictions`` against the ground truth of the ``samples`` they cover."""
    covered = {p.get("image_id", p.get("question_id")) for p in predictions}
    truth = references(kind, [s for s in samples if s["id"] in covered])
    # Imported on use: the scorers need pycocoevalcap (and Java); decoding does not.
    if kind == "caption":
        from vlmcore.eval.captions import score_captions

        return score_captions(predictions, truth)
    from vlmcore.eval.vqa import vqa_accuracy

    return vqa_accuracy(predictions, truth["questions"], truth["annotations"])


def evaluate(model, kind: str, train: Sequence[dict], eval_set: Sequence[dict], settings: FewShotSettings,
             rices: Rices | None = None, eval_features: torch.Tensor | None = None) -> dict:
    """Every shot count x trial: ``{"<shots>": {"trials": [metrics...], "<metric>": mean,
    "<metric>_std": std}}`` (identical on every rank); predictions files in ``settings.out_dir``."""
    results = {}
    for num_shots in settings.shots:
        trials = []
        for seed in settings.trial_seeds:
            preds = gather_predictions(predict(model, kind, train, eval_set, num_shots, seed, settings, rices,
                                               eval_features), settings.world_size)
            if settings.out_dir and settings.rank == 0:
                os.makedirs(settings.out_dir, exist_ok=True)
                path = os.path.join(settings.out_dir, f"{kind}_{num_shots}shot_seed{seed}.json")
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(preds, f, indent=1)
            trials.append(score(kind, preds, eval_set))
        summary = {"trials": trials}
        # The numbers are averaged over trials; breakdowns (VQA's per answer type) stay in ``trials``.
        for metric in [m for m, v in trials[0].items() if isinstance(v, (int, float))]:
            values = [t[metric] for t in trials]
            summary[metric] = statistics.fmean(values)
            summary[f"{metric}_std"] = statistics.pstdev(values)
        results[str(num_shots)] = summary
    return results
