"""BLIP zero-shot text <-> video retrieval by frame concatenation (salesforce/BLIP ``eval_retrieval_video.py``).

A video is ``F`` frames sampled uniformly (BLIP: 8 for MSRVTT). Every frame goes through the image
encoder on its own; then, as BLIP does:

- ITC: each frame's ``vision_proj(CLS)``, averaged over the frames, then L2-normalized (the
  projection is affine, so project-then-mean equals mean-then-project; the normalization comes last);
- ITM: the caption (first token ``[ENC]``) cross-attends to all frames' tokens concatenated,
  ``[F * N, width]``;
- ranking: the ITC top ``k_test`` of each query re-ranked by ``ITM logit(match) + ITC`` (the image
  retrieval code, :meth:`vlmcore.blip.BLIP.rerank_scores`).

Padded frames (a video shorter than ``F`` frames) carry ``frame_mask`` False: they are left out of
the ITC mean and their tokens out of the ITM keys, so a padded video scores as the unpadded one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from vlmcore._checks import check_frames, check_positive_int
from vlmcore.blip.model import BLIP
from vlmcore.retrieval import video_retrieval_metrics


class VideoEncoding(NamedTuple):
    """What :func:`encode_video` returns.

    Attributes:
        features: ``[B, embed_dim]`` normalized ITC video features.
        tokens: ``[B, F * N, width]`` every frame's image tokens, frame after frame (the ITM's keys).
        token_mask: bool ``[B, F * N]`` (False = a padded frame's token), or None when no frame is padded.
    """

    features: torch.Tensor
    tokens: torch.Tensor
    token_mask: torch.Tensor | None


def encode_video(model: BLIP, frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> VideoEncoding:
    """BLIP's video encoding (module docstring): ITC features and the concatenated frame tokens.

    Args:
        model: a :class:`vlmcore.blip.BLIP`.
        frames: ``[B, F, C, H, W]`` the sampled frames, each normalized as an image.
        frame_mask: bool ``[B, F]``, False for a padded frame; None = every frame is real.

    Returns:
        :class:`VideoEncoding` (``features [B, embed_dim]``, ``tokens [B, F * N, width]``, ``token_mask``).
    """
    check_frames(frames, frame_mask)
    if frame_mask is not None and not bool(frame_mask.any(dim=1).all()):  # eval-time check: one host read
        raise ValueError("frame_mask must keep at least one frame of every video")
    b, f = frames.shape[:2]
    tokens = model.encode_image(frames.flatten(0, 1))  # [B * F, N, width]
    per_frame = model.vision_proj(tokens[:, 0]).view(b, f, -1)  # [B, F, embed_dim]
    if frame_mask is None:
        mean = per_frame.mean(dim=1)
        token_mask = None
    else:
        weight = frame_mask.to(per_frame.dtype)[..., None]  # [B, F, 1]
        mean = (per_frame * weight).sum(dim=1) / weight.sum(dim=1)
        token_mask = frame_mask.repeat_interleave(tokens.shape[1], dim=1)  # [B, F * N]
    return VideoEncoding(F.normalize(mean, dim=-1), tokens.reshape(b, f * tokens.shape[1], -1), token_mask)


@torch.no_grad()
def video_retrieval_scores(model: BLIP, frames: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None, frame_mask: torch.Tensor | None = None, *,
                           k_test: int = 128, batch_size: int = 16, tokens_on_cpu: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's text <-> video retrieval scores: ITC, each query's top ``k_test`` re-ranked by ITM
    (Recall@k and ranks: :func:`vlmcore.retrieval.video_retrieval_metrics`).

    Args:
        frames: ``[N_vid, F, C, H, W]``; frame_mask: bool ``[N_vid, F]`` or None.
        input_ids, attention_mask: ``[N_txt, L]`` captions (``[CLS]`` first).
        k_test: candidates re-ranked per query (BLIP's MSRVTT setting: 128).
        batch_size: videos per image-encoder pass (``batch_size * F`` frames) and captions per text pass.
        tokens_on_cpu: keep the frame tokens (``F`` times an image's) on the CPU, as BLIP does, moving
            each query's candidates to the model's device.

    Returns:
        ``(score_v2t [N_vid, N_txt], score_t2v [N_txt, N_vid])`` fp32; entries outside a query's
        top ``k_test`` are -100 (all tied: a correct answer among them ranks after every other, see
        :mod:`vlmcore.retrieval`'s tie rule).
    """
    check_positive_int("batch_size", batch_size)
    check_frames(frames, frame_mask)
    encoded = []
    for i in range(0, len(frames), batch_size):
        chunk_mask = None if frame_mask is None else frame_mask[i:i + batch_size]
        chunk = encode_video(model, frames[i:i + batch_size], chunk_mask)
        encoded.append(VideoEncoding(chunk.features, chunk.tokens.cpu() if tokens_on_cpu else chunk.tokens,
                                     chunk.token_mask))
    features = torch.cat([e.features for e in encoded])
    tokens = torch.cat([e.tokens for e in encoded])
    token_mask = None if frame_mask is None else torch.cat([e.token_mask for e in encoded])
    return model.rerank_scores(features, tokens, input_ids, attention_mask, image_mask=token_mask, k_test=k_test,
                               batch_size=batch_size)


__all__ = ["VideoEncoding", "encode_video", "video_retrieval_metrics", "video_retrieval_scores"]
