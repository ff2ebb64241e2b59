"""Argument checks shared by the model modules: every error names the offending argument.

Host-side only (types, ranks, shapes, dtypes): nothing here reads tensor values.
"""

from __future__ import annotations

import math

import torch


def check_positive_int(name: str, value: object) -> int:
    """Raise ``ValueError`` unless ``value`` is an int >= 1 (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_positive_number(name: str, value: object) -> float:
    """Raise ``ValueError`` unless ``value`` is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_token_ids(name: str, value: object) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is an integer ``[B, L]`` tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids [B, L], got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {value.dtype}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, L], got shape {tuple(value.shape)}")
    return value


def check_lm_extras(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                    *, has_past: bool, ids_name: str) -> None:
    """Check an LM call's ``attention_mask`` and ``labels`` against its ``[B, L]`` token ids.

    ``labels`` must be ``[B, L]``. A 2-D ``attention_mask`` must be ``[B, L]``, or ``[B, past + L]``
    (at least ``L`` columns) when ``has_past`` (incremental decoding with a KV cache); masks of
    other ranks (custom 4-D masks) only have their batch checked.
    """
    batch, length = input_ids.shape
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        wrong_batch = attention_mask.dim() == 0 or attention_mask.shape[0] != batch
        wrong_length = attention_mask.dim() == 2 and (
            attention_mask.shape[1] < length if has_past else attention_mask.shape[1] != length)
        if wrong_batch or wrong_length:
            expected = f"[B, past + L] with B={batch}, L>={length}" if has_past else f"[B, L] = {(batch, length)}"
            raise ValueError(f"attention_mask must be {expected} (the shape of {ids_name}), "
                             f"got {tuple(attention_mask.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if tuple(labels.shape) != (batch, length):
            raise ValueError(f"labels must have the shape of {ids_name} {(batch, length)}, got {tuple(labels.shape)}")


def check_frames(frames: object, frame_mask: object) -> None:
    """Raise ``ValueError`` unless ``frames`` is a ``[B, F, C, H, W]`` tensor (B, F >= 1) and ``frame_mask``
    None or a bool ``[B, F]`` tensor (False = padded frame)."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or 0 in frames.shape[:2]:
        got = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames must be a [B, F, C, H, W] tensor with B, F >= 1, got {got}")
    if frame_mask is None:
        return
    if not isinstance(frame_mask, torch.Tensor) or frame_mask.dtype != torch.bool or \
            tuple(frame_mask.shape) != tuple(frames.shape[:2]):
        got = (frame_mask.dtype, tuple(frame_mask.shape)) if isinstance(frame_mask, torch.Tensor) else frame_mask
        raise ValueError(f"frame_mask must be a bool [B, F] = {tuple(frames.shape[:2])} tensor (False = padded "
                         f"frame), got {got}")
