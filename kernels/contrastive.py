"""Fused symmetric contrastive (CLIP InfoNCE / BLIP ITC) loss that never builds the n x n logits.

Public op: :func:`contrastive_loss`. (The tiled Triton kernel is being added in this file; until
then every backend runs the reference.)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._backend import use_triton  # noqa: F401  (used once the Triton path lands)
from ._checks import check_float_tensor, check_same
from .reference import contrastive_accuracy_reference, contrastive_loss_reference


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather ``[n, d]`` rows from every rank into ``[world * n, d]``, differentiable.

    Backward sums the incoming gradient over ranks (all-reduce) and returns this rank's slice:
    the same gradient as OpenCLIP's ``gather_with_grad=True`` (``torch.distributed.nn.all_gather``),
    but built on all-reduce so it also runs on gloo, which has no reduce-scatter.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        grad = grad_gathered.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def all_gather_with_grad(local: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather of equal-sized ``[n, d]`` blocks over ``group`` (rank order)."""
    return _AllGatherWithGrad.apply(local, group)


def _validate(image_features, text_features, logit_scale, label_smoothing) -> None:
    check_float_tensor("image_features", image_features, 2)
    check_float_tensor("text_features", text_features, 2)
    check_same("text_features", text_features, "image_features", image_features)
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} "
            "must have the same [n, d] shape (row i of each is a matching pair)"
        )
    if image_features.shape[0] == 0 or image_features.shape[1] == 0:
        raise ValueError(f"image_features must be a non-empty [n, d] batch, got {tuple(image_features.shape)}")
    if not isinstance(logit_scale, torch.Tensor):
        raise TypeError(f"logit_scale must be a 0-dim torch.Tensor, got {type(logit_scale).__name__}")
    if logit_scale.numel() != 1 or logit_scale.dim() > 1:
        raise ValueError(f"logit_scale must be a 0-dim tensor, got shape {tuple(logit_scale.shape)}")
    if not logit_scale.dtype.is_floating_point:
        raise TypeError(f"logit_scale must be a floating tensor, got {logit_scale.dtype}")
    if logit_scale.device != image_features.device:
        raise ValueError(f"logit_scale is on {logit_scale.device} but image_features is on {image_features.device}")
    if not math.isfinite(float(logit_scale.detach())):
        raise ValueError(f"logit_scale must be finite, got {float(logit_scale.detach())}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    group=None,
    local_loss: bool = False,
    label_smoothing: float = 0.0,
    output_dict: bool = False,
):
    """Symmetric contrastive loss ``(CE(s I T^T, arange) + CE(s T I^T, arange)) / 2``.

    Equal in value and in the gradients of all three inputs to OpenCLIP's ``ClipLoss`` in one
    process; with ``group`` set, to ``ClipLoss(gather_with_grad=True, local_loss=local_loss)``.

    Args:
        image_features, text_features: ``[n, d]`` matching rows, fp32/fp16/bf16, normalized by the
            caller. With ``group``: this rank's local batch (equal n on every rank).
        logit_scale: 0-dim multiplier s (OpenCLIP passes ``logit_scale.exp()``); gets a gradient.
        group: a ``torch.distributed`` process group (or ``dist.group.WORLD``); None = one process.
        local_loss: with ``group``: this rank's rows against all gathered columns, labels offset by
            rank; otherwise the global loss on every rank.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        output_dict: return ``{"loss", "i2t_acc", "t2i_acc"}`` (top-1 accuracy of the local rows,
            for logging, no gradient) instead of the loss alone.

    Returns:
        fp32 scalar loss (or the dict).
    """
    _validate(image_features, text_features, logit_scale, label_smoothing)
    label_offset = 0
    all_image = all_text = None
    if group is not None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group was given but torch.distributed is not initialized")
        all_image = all_gather_with_grad(image_features, group)
        all_text = all_gather_with_grad(text_features, group)
        if local_loss:
            label_offset = dist.get_rank(group) * image_features.shape[0]
        else:
            image_features, text_features = all_image, all_text
            all_image = all_text = None
    loss = contrastive_loss_reference(
        image_features, text_features, logit_scale, label_smoothing=float(label_smoothing),
        label_offset=label_offset, all_image_features=all_image, all_text_features=all_text,
    )
    if not output_dict:
        return loss
    with torch.no_grad():
        i2t, t2i = contrastive_accuracy_reference(
            image_features, text_features, label_offset=label_offset,
            all_image_features=all_image, all_text_features=all_text,
        )
    return {"loss": loss, "i2t_acc": i2t, "t2i_acc": t2i}
