"""Input validation shared by the ops: every error names the offending argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(name: str, value: object, ndim: int) -> torch.Tensor:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is a floating tensor of rank ``ndim``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    return value


def check_same(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise unless ``value`` has the dtype and device of ``ref``."""
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}; they must match")
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; they must match")


def check_shape(name: str, value: torch.Tensor, expected: tuple[int, ...], described: str) -> None:
    """Raise ``ValueError`` unless ``value.shape == expected``; ``described`` spells the expected layout."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {described} = {tuple(expected)}, got {tuple(value.shape)}")


def check_softmax_scale(softmax_scale: float | None, head_dim: int) -> float:
    """Default ``1/sqrt(head_dim)``; reject non-finite or non-positive scales."""
    if softmax_scale is None:
        return head_dim**-0.5
    scale = float(softmax_scale)
    if not (scale > 0.0 and scale < float("inf")):
        raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale!r}")
    return scale
