"""BLIP retrieval fine-tuning: ITC (momentum distillation) with image-id positives over the batch
and the queue + ITM with hard negatives drawn from every rank's batch, same-image pairs masked by
image id (BLIP's ``blip_retrieval.py``). Eval: Recall@k with ITM re-ranking of the ITC top
``k_test``. Config section ``model.blip_retrieval``.

Zero-shot text <-> video retrieval (BLIP's MSRVTT transfer, :mod:`vlmcore.blip.video`): the
:class:`BlipVideoEncoder` of :meth:`BlipRetrievalTask.video_eval_encoder` turns a video sample into
the batch fields :func:`vlmcore.eval.video_retrieval.video_retrieval` scores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import torch
from vlmcore.train.data.blip_text import BlipText
from vlmcore.train.data.pipeline import BadSample
from vlmcore.train.tasks.blip_common import BlipTaskBase

#: A video sample -> ``(frames [F, 3, S, S], frame_mask [F] bool, caption)`` (``common.VideoDecoder``).
VideoFields = Callable[[dict], tuple[torch.Tensor, torch.Tensor, str]]


def _video_id(sample: dict) -> int:
    """The sample's ``video_id`` from its JSON (several captions of one video share it), else a hash of
    its key (one caption per video, as MSRVTT's 1k-A test); 56 bits, never negative."""
    if "json" in sample:
        try:
            value = json.loads(sample["json"].decode("utf-8")).get("video_id")
        except (UnicodeDecodeError, ValueError, AttributeError):
            value = None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return int.from_bytes(hashlib.sha1(sample["__key__"].encode("utf-8")).digest()[:7], "little")


class BlipVideoEncoder:
    """Video sample -> ``{"frames" [F, 3, S, S], "frame_mask" [F], "input_ids" [T], "attention_mask" [T],
    "video_ids" []}`` (the caption's first line; ``[CLS]`` first). Picklable when ``video`` is."""

    def __init__(self, text: BlipText, video: VideoFields):
        self.text, self.video = text, video

    def __call__(self, sample: dict) -> dict:
        frames, frame_mask, caption = self.video(sample)
        line = next((line.strip() for line in caption.split("\n") if line.strip()), "")
        if not line:
            raise BadSample(f"sample {sample['__key__']} has an empty caption")
        ids, mask = self.text.encode([line])
        return {"frames": frames, "frame_mask": frame_mask, "input_ids": ids[0], "attention_mask": mask[0],
                "video_ids": torch.tensor(_video_id(sample), dtype=torch.long)}


class BlipRetrievalTask(BlipTaskBase):
    name = "blip_retrieval"
    losses = ("itc", "itm")
    all_rank_negatives = True
    use_prompt = False
    with_momentum = True
    hf_exports = {"hf": "BlipForImageTextRetrieval"}
    eval_kinds = ("retrieval",)

    def video_eval_encoder(self, video: VideoFields) -> BlipVideoEncoder:
        """The encoder of held-out video-caption samples, over ``video`` (the run's eval frame decoder)."""
        return BlipVideoEncoder(self.text, video)
