"""BLIP-2 zero-shot text <-> video retrieval by frame concatenation (the stage-1 Q-Former).

LAVIS has no BLIP-2 video retrieval: its video models (InstructBLIP's ``blip2_t5_instruct``) run the
Q-Former once per frame and concatenate the frames' query outputs for the LLM. For retrieval this
module follows BLIP's video recipe instead (salesforce/BLIP ``eval_retrieval_video.py``): every
frame goes through the frozen image encoder on its own, and the frames' tokens are concatenated,
``[F * S, width]``, as the keys of the Q-Former's cross-attention. Everything after that is the
image protocol of :meth:`vlmcore.blip2.Blip2Stage1.retrieval_scores` (LAVIS ``compute_sim_matrix``):
ITC = the max over the queries of query . text, each query's top ``k`` re-ranked by
``ITM logit(match) + ITC``. The queries thus attend over the whole clip at once (one set of
query features per video), where InstructBLIP's per-frame pass gives ``F`` sets.

Padded frames (``frame_mask`` False) are kept out of the cross-attention keys, so a padded video
scores as the unpadded one.
"""

from __future__ import annotations

import torch

from vlmcore._checks import check_frames, check_positive_int
from vlmcore.blip2.stage1 import Blip2Stage1


@torch.no_grad()
def encode_video(model: Blip2Stage1, frames: torch.Tensor, frame_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frames' image tokens concatenated, the Q-Former's cross-attention input for a video.

    Args:
        model: a :class:`vlmcore.blip2.Blip2Stage1` with a ``vision_encoder``.
        frames: ``[B, F, C, H, W]`` the sampled frames, each normalized as an image.
        frame_mask: bool ``[B, F]``, False for a padded frame; None = every frame is real.

    Returns:
        ``(tokens [B, F * S, width], token_mask bool [B, F * S] or None)``.
    """
    check_frames(frames, frame_mask)
    if frame_mask is not None and not bool(frame_mask.any(dim=1).all()):  # eval-time check: one host read
        raise ValueError("frame_mask must keep at least one frame of every video")
    b, f = frames.shape[:2]
    tokens = model.image_embeddings(frames.flatten(0, 1), None)  # [B * F, S, width]
    token_mask = None if frame_mask is None else frame_mask.repeat_interleave(tokens.shape[1], dim=1)
    return tokens.reshape(b, f * tokens.shape[1], -1), token_mask


@torch.no_grad()
def video_retrieval_scores(model: Blip2Stage1, frames: torch.Tensor, text_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None, frame_mask: torch.Tensor | None = None, *,
                           k: int = 16, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """BLIP-2's text <-> video retrieval scores over concatenated frame tokens (module docstring).

    Args:
        frames: ``[N_vid, F, C, H, W]``; frame_mask: bool ``[N_vid, F]`` or None.
        text_ids, attention_mask: ``[N_txt, L]`` captions.
        k: candidates re-ranked per query; batch_size: videos per image-encoder pass and pairs per
            Q-Former pass.

    Returns:
        ``{"itc": [N_vid, N_txt], "itm_i2t": [N_vid, N_txt], "itm_t2i": [N_txt, N_vid]}`` (fp32), as
        :meth:`~vlmcore.blip2.Blip2Stage1.retrieval_scores`; Recall@k and ranks:
        :func:`vlmcore.retrieval.video_retrieval_metrics` (``itm_i2t``, ``itm_t2i``).
    """
    check_positive_int("batch_size", batch_size)
    check_frames(frames, frame_mask)
    chunks = []
    for i in range(0, len(frames), batch_size):
        chunk_mask = None if frame_mask is None else frame_mask[i:i + batch_size]
        chunks.append(encode_video(model, frames[i:i + batch_size], chunk_mask))
    tokens = torch.cat([c[0] for c in chunks])
    token_mask = None if frame_mask is None else torch.cat([c[1] for c in chunks])
    return model.retrieval_scores(tokens, text_ids, attention_mask, k=k, batch_size=batch_size, image_mask=token_mask)


__all__ = ["encode_video", "video_retrieval_scores"]
