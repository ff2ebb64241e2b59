"""Zero-shot text <-> video retrieval (MSRVTT style) of a BLIP or BLIP-2 stage-1 model.

Input: encoded video samples, one caption each, in batches of ``{"frames" [b, F, 3, S, S],
"frame_mask" [b, F] bool, "input_ids" [b, L], "attention_mask" [b, L], "video_ids" [b]}`` (the
trainer's video eval encoder writes these; several captions of one video share its id and its
frames are encoded once). Scores: :func:`vlmcore.blip.video_retrieval_scores` (BLIP: ITC of the
frame-averaged projections, ITM over the frames' tokens concatenated, ITC top ``k_test`` re-ranked) or
:func:`vlmcore.blip2.video.video_retrieval_scores` (the Q-Former over the frames' tokens
concatenated); metrics: :func:`vlmcore.retrieval.video_retrieval_metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from vlmcore.blip import BLIP, video_retrieval_scores
from vlmcore.blip2 import Blip2Stage1
from vlmcore.blip2.video import video_retrieval_scores as blip2_video_retrieval_scores
from vlmcore.retrieval import video_retrieval_metrics

FIELDS = ("frames", "frame_mask", "input_ids", "attention_mask", "video_ids")


def _concatenated(batches: Iterable[dict]) -> dict[str, torch.Tensor]:
    """Every batch's :data:`FIELDS` concatenated along the first dimension (a missing field is named)."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in FIELDS}
    for batch in batches:
        missing = [name for name in FIELDS if name not in batch]
        if missing:
            raise ValueError(f"a video retrieval batch lacks {missing}: it needs {list(FIELDS)}")
        for name in FIELDS:
            parts[name].append(batch[name])
    if not parts["frames"]:
        raise ValueError("video retrieval got no batch: the eval set holds no usable video")
    return {name: torch.cat(values) for name, values in parts.items()}


def videos_of_captions(video_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first [N_vid], text_to_video [N_txt])`` int64 on the CPU: each distinct video's first caption row,
    videos numbered in order of first appearance, and the video index of every caption."""
    index: dict[int, int] = {}
    first, text_to_video = [], []
    for row, video in enumerate(video_ids.tolist()):  # one host read of the ids
        if video not in index:
            index[video] = len(first)
            first.append(row)
        text_to_video.append(index[video])
    return torch.tensor(first, dtype=torch.long), torch.tensor(text_to_video, dtype=torch.long)


@torch.no_grad()
def video_retrieval(model: BLIP | Blip2Stage1, batches: Iterable[dict], *, k_test: int = 128, batch_size: int = 16,
                    ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k and ranks of text -> video and video -> text retrieval over ``batches`` (module docstring).

    Args:
        model: a :class:`vlmcore.blip.BLIP` or a :class:`vlmcore.blip2.Blip2Stage1` with its vision encoder,
            in eval mode; the tensors are moved to its device and dtype.
        k_test: candidates re-ranked by ITM per query (BLIP's MSRVTT setting: 128).
        batch_size: videos per image-encoder pass.

    Returns:
        :func:`vlmcore.retrieval.video_retrieval_metrics` plus ``"eval_videos"`` and ``"eval_captions"``.
    """
    data = _concatenated(batches)
    param = next(model.parameters())
    first, text_to_video = videos_of_captions(data["video_ids"])
    frames = data["frames"][first].to(param.device, param.dtype)
    frame_mask = data["frame_mask"][first].to(param.device)
    ids, mask = data["input_ids"].to(param.device), data["attention_mask"].to(param.device)
    if isinstance(model, BLIP):
        score_v2t, score_t2v = video_retrieval_scores(model, frames, ids, mask, frame_mask, k_test=k_test,
                                                      batch_size=batch_size)
    elif isinstance(model, Blip2Stage1):
        scores = blip2_video_retrieval_scores(model, frames, ids, mask, frame_mask, k=k_test, batch_size=batch_size)
        score_v2t, score_t2v = scores["itm_i2t"], scores["itm_t2i"]
    else:
        raise TypeError(f"model must be a vlmcore BLIP or Blip2Stage1 for video retrieval, got {type(model).__name__}")
    return {**video_retrieval_metrics(score_v2t, score_t2v, text_to_video, ks), "eval_videos": len(first),
            "eval_captions": len(text_to_video)}


__all__ = ["FIELDS", "video_retrieval", "videos_of_captions"]
