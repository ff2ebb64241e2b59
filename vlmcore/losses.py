"""Loss modules on the vlmcore ops."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlmcore.kernels import contrastive_loss, sigmoid_contrastive_loss


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


class SigLIPLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss with its learnable log-scale and bias.

    Holds ``logit_scale`` = t' (init ``ln 10``, the multiplier is ``s = exp(t')``, optionally clamped
    to ``max_scale``) and ``logit_bias`` = b (init -10), as OpenCLIP and big_vision initialize them.
    The loss is the fused op :func:`vlmcore.kernels.sigmoid_contrastive_loss` (OpenCLIP ``SigLipLoss``
    semantics, divided by the local batch).

    Args:
        init_scale: initial multiplier s (t' = ln s).
        init_bias: initial b.
        max_scale: optional upper clamp of s (None: no clamp, as OpenCLIP's SigLIP recipe).
        group, dist_impl: distributed settings passed to the op (``"ring"`` or ``"gather"``).

    Shapes: ``forward(image_features [n, d], text_features [n, d], *, image_group_ids=None,
    text_group_ids=None)`` -> fp32 scalar (or ``{"loss", "logit_scale", "logit_bias"}`` with
    ``output_dict=True``).
    """

    def __init__(self, init_scale: float = 10.0, init_bias: float = -10.0, max_scale: float | None = None, *,
                 group=None, dist_impl: str = "ring"):
        super().__init__()
        if not 0 < init_scale < math.inf:
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}")
        if not math.isfinite(init_bias):
            raise ValueError(f"init_bias must be finite, got {init_bias!r}")
        if max_scale is not None and not 0 < max_scale < math.inf:
            raise ValueError(f"max_scale must be None or a finite number > 0, got {max_scale!r}")
        if dist_impl not in ("ring", "gather"):
            raise ValueError(f"dist_impl must be 'ring' or 'gather', got {dist_impl!r}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))
        self.max_scale = None if max_scale is None else float(max_scale)
        self.group = group
        self.dist_impl = dist_impl

    def scale(self) -> torch.Tensor:
        """``exp(t')``, clamped to ``max_scale`` when set (the clamp stops the gradient above it)."""
        scale = self.logit_scale.exp()
        return scale if self.max_scale is None else scale.clamp(max=self.max_scale)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, *,
                image_group_ids: torch.Tensor | None = None, text_group_ids: torch.Tensor | None = None,
                group=None, output_dict: bool = False):
        scale = self.scale().to(image_features.device)
        bias = self.logit_bias.to(image_features.device)
        loss = sigmoid_contrastive_loss(
            image_features, text_features, scale, bias, image_group_ids=image_group_ids,
            text_group_ids=text_group_ids, group=group if group is not None else self.group,
            dist_impl=self.dist_impl)
        if not output_dict:
            return loss
        return {"loss": loss, "logit_scale": scale.detach(), "logit_bias": bias.detach()}
