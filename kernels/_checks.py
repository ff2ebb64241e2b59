"""Input validation and dtype policy shared by the ops: every error names the offending argument.

Scalar tensors (logit scale, bias): ONE host-sync policy for every op. Their values are read to the
host only where that is free, a CPU tensor outside ``torch.compile`` tracing. A CUDA scalar is never
read on the eager path (a read would stall the stream every step and break CUDA-graph capture);
there a non-finite value shows up as a non-finite loss instead.
"""

from __future__ import annotations

import math

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


def check_scalar(name: str, value: object, features: torch.Tensor, features_name: str = "image_features") -> None:
    """Raise unless ``value`` is a one-element floating tensor on ``features``' device; its value must
    be finite where reading it costs no device sync (module docstring)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a 0-dim torch.Tensor, got {type(value).__name__}")
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(f"{name} must be a 0-dim tensor, got shape {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.device != features.device:
        raise ValueError(f"{name} is on {value.device} but {features_name} is on {features.device}")
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        host_value = float(value.detach())
        if not math.isfinite(host_value):
            raise ValueError(f"{name} must be finite, got {host_value}")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs keep IEEE fp32 products (the references' math); 16-bit
    inputs run on tensor cores (the ``"tf32"`` setting is what Triton names that mode)."""
    return "ieee" if dtype == torch.float32 else "tf32"
