"""Loss modules on the vlmcore ops."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmcore.kernels import contrastive_loss


class ContrastiveLoss(nn.Module):
    """CLIP's symmetric contrastive loss with its learnable temperature.

    Holds ``logit_scale`` = theta, initialized to ``ln(1 / 0.07)``; the multiplier is
    ``s = exp(theta)`` clamped to at most ``max_scale`` (100 in CLIP). The loss is the fused op
    :func:`vlmcore.kernels.contrastive_loss`.

    Args:
        init_temperature: initial temperature tau (s = 1 / tau).
        max_scale: upper clamp of s.
        group, local_loss: distributed settings passed to the op (see its docstring).
        label_smoothing: as in ``F.cross_entropy``.

    Shapes: ``forward(image_features [n, d], text_features [n, d])`` -> fp32 scalar
    (or a dict with accuracies and the scale when ``output_dict=True``).
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, *, group=None,
                 local_loss: bool = False, label_smoothing: float = 0.0):
        super().__init__()
        if not 0 < init_temperature < math.inf:
            raise ValueError(f"init_temperature must be a finite number > 0, got {init_temperature!r}")
        if not 0 < max_scale < math.inf:
            raise ValueError(f"max_scale must be a finite number > 0, got {max_scale!r}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_scale = float(max_scale)
        self.group = group
        self.local_loss = local_loss
        self.label_smoothing = label_smoothing

    def scale(self) -> torch.Tensor:
        """``exp(theta)`` clamped to ``max_scale`` (the clamp stops the gradient above it, as in CLIP)."""
        return self.logit_scale.exp().clamp(max=self.max_scale)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, *, output_dict: bool = False):
        scale = self.scale().to(image_features.device)
        out = contrastive_loss(
            image_features, text_features, scale, group=self.group, local_loss=self.local_loss,
            label_smoothing=self.label_smoothing, output_dict=output_dict,
        )
        if output_dict:
            out["logit_scale"] = scale.detach()
        return out
