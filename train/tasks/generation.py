"""Text generation in the trainer: ``data.eval.eval: generate`` and the held-out samples it decodes.

- :func:`read_samples`: shards -> the sample dicts of :mod:`vlmcore.eval` (captioning: every line
  of ``KEY.txt`` is a reference; VQA: ``KEY.json`` ``question`` / ``answers``; classification:
  ``KEY.json`` ``label``; ``meta``: the whole ``KEY.json``), images through the task's evaluation
  transform.
- :func:`generation_metrics`: every ``eval_every`` steps, decode captions of the held-out pairs
  0-shot with the task's model (:meth:`Task.eval_model`) and score them (CIDEr, BLEU-4, METEOR,
  ROUGE-L), each rank decoding its share; predictions written to ``<out_dir>/predictions/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from torch import nn
from vlmcore.train.data.pipeline import BadSample, decode_image, expand_shards, pair_fields, read_tar

from vlmcore.eval import fewshot
from vlmcore.eval.prompts import PROMPT_STYLES


class SquashDecoder:
    """Image bytes -> ``[3, size, size]``, squash-resized (the BLIP / BLIP-2 task encoders' decoding)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: bytes, sample: dict) -> torch.Tensor:
        return decode_image(image, self.size)


def _sample(kind: str, raw: dict, index: int, images: Callable[[bytes, dict], torch.Tensor]) -> dict:
    """One :mod:`vlmcore.eval` sample of a raw shard sample (``BadSample`` when it lacks a field)."""
    image, text = pair_fields(raw)
    meta = json.loads(raw["json"]) if "json" in raw else {}
    sample = {"id": index, "key": raw["__key__"], "image": images(image, raw), "meta": meta}
    if kind == "caption":
        sample["captions"] = [line.strip() for line in text.split("\n") if line.strip()]
    elif kind == "vqa":
        if "question" not in meta or not meta.get("answers"):
            raise BadSample(f"{raw['__key__']}.json needs 'question' and 'answers' for VQA", "missing_field")
        sample.update(question=meta["question"], answers=list(meta["answers"]))
    else:
        if "label" not in meta:
            raise BadSample(f"{raw['__key__']}.json needs 'label' for classification", "missing_field")
        sample["label"] = int(meta["label"])
    return sample


def read_samples(shards, kind: str, images: Callable[[bytes, dict], torch.Tensor], limit: int = 0) -> list[dict]:
    """The usable samples of ``shards`` (a pattern or list) for ``kind`` (``caption`` / ``vqa`` /
    ``classify``), ids numbered in reading order; at most ``limit`` (0 = all)."""
    out = []
    for path in expand_shards(shards):
        for raw in read_tar(path):
            if "__error__" in raw:
                continue
            try:
                out.append(_sample(kind, raw, len(out), images))
            except BadSample:
                continue
            if limit and len(out) >= limit:
                return out
    if not out:
        raise ValueError(f"no usable {kind} samples in {shards!r}")
    return out


def generation_metrics(task, module: nn.Module, ctx) -> dict:
    """Caption metrics of the held-out pairs decoded 0-shot (no demonstrations: the bare query prompt
    of ``data.eval.generation.prompt_style``), over ``max_batches * batch_size`` samples (0 = all)."""
    g, info = ctx.eval.generation, ctx.info
    limit = ctx.eval.max_batches * ctx.eval.batch_size
    samples = read_samples(ctx.shards, "caption", task.eval_images(), limit)
    settings = fewshot.FewShotSettings(
        shots=(0,), trial_seeds=(task.cfg.seed,), batch_size=ctx.eval.batch_size, max_new_tokens=g.max_new_tokens,
        num_beams=g.num_beams, rank=info.rank, world_size=info.world_size, progress=False,
        out_dir=os.path.join(task.cfg.out_dir, "predictions"), style=PROMPT_STYLES[g.prompt_style])
    results = fewshot.evaluate(task.eval_model(module), "caption", [], samples, settings)
    return dict(results["0"]["trials"][0])
