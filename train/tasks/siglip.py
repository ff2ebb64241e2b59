"""SigLIP: :class:`vlmcore.CLIP` with ``loss="siglip"``, trained with the fused sigmoid loss.

Same data pipeline (image-text pairs), DeepSpeed path, zero-shot evaluation and exports as the
``clip`` task (train/tasks/clip.py); only the model's criterion and the loss call differ. Config
section ``model.siglip``; its ``dist_impl`` picks how ranks see each other's text:

- ``local``: each rank's images against its own text only (no exchange);
- ``ring`` (default): OpenCLIP's distributed SigLIP, text blocks passed rank to rank with the
  exchange overlapped with the scoring (``vlmcore.kernels.sigmoid_contrastive_loss``);
- ``gather``: the same loss with one differentiable all-gather of the text.

Each rank's loss is divided by its local batch (OpenCLIP); DDP's gradient averaging then optimizes
the one-process loss of the global batch. Logged: the logit scale and bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

import torch
from torch import nn
from vlmcore.kernels import sigmoid_contrastive_loss
from vlmcore.train.config import Bounds, PositiveInt
from vlmcore.train.tasks.clip import (
    ClipTask,
    InitConfig,
    TextConfig,
    ZeroShotSet,
    clip_module,
    init_conflicts,
    load_init,
)
from vlmcore.train.tasks.common import build_vision, move

import vlmcore

PositiveFinite = Annotated[float, Bounds(gt=0, finite=True)]
Finite = Annotated[float, Bounds(finite=True)]


@dataclass
class SiglipConfig:
    """``model.siglip``: text tower, joint embedding, the loss's initial scale / bias, the exchange."""

    embed_dim: PositiveInt = 64  # joint embedding width
    text: TextConfig = field(default_factory=TextConfig)
    init_scale: PositiveFinite = 10.0  # initial logit scale s (the learnable log-scale starts at ln of it)
    init_bias: Finite = -10.0  # initial logit bias b
    dist_impl: Literal["local", "ring", "gather"] = "ring"  # how text blocks meet across ranks (local: no exchange)
    retrieval_eval: bool = True  # image<->text Recall@1/5/10 on data.eval (besides zero-shot when labelled)
    zero_shot: Union[ZeroShotSet, None] = None  # bundled classes for zero-shot (null: data.eval.classes / classes.json)
    init: Union[InitConfig, None] = None  # a whole HF SigLIP (or open_clip sigmoid CLIP) to start from (null: random)


class SiglipTask(ClipTask):
    name = "siglip"
    Config = SiglipConfig
    data_kinds = ("pairs",)

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        out = []
        if cfg.model.gradient_checkpointing:
            out.append("model.gradient_checkpointing: not available for task 'siglip' (flamingo and frozen only)")
        if len(cfg.data.train) != 1:
            out.append("data.train: task 'siglip' takes exactly one dataset")
        if cfg.model.siglip.init is not None:
            out += init_conflicts(cfg, "siglip", ("embed_dim", "text", "init_scale", "init_bias"))
        return out

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        c, tok = self.config, self.tok
        if c.init is not None:
            model = load_init(self, "siglip")
            model.criterion.dist_impl = "gather" if c.dist_impl == "gather" else "ring"
            return model
        return vlmcore.CLIP(
            c.embed_dim, vision_encoder=build_vision(self.cfg), vocab_size=tok.vocab_size,
            context_length=self.cfg.tokenizer.context_length, text_width=c.text.width, text_depth=c.text.depth,
            text_heads=c.text.heads, pad_token_id=tok.pad_token_id, eot_token_id=tok.eos_token_id,
            loss="siglip", siglip_init_scale=c.init_scale, siglip_init_bias=c.init_bias,
            siglip_dist_impl="gather" if c.dist_impl == "gather" else "ring")

    def prepare_for_engine(self, model: nn.Module, zero_stage: int) -> None:
        if zero_stage == 3:
            import deepspeed

            # CLIP's forward reads the scale and bias of its criterion submodule directly.
            deepspeed.zero.register_external_parameter(model, model.criterion.logit_scale)
            deepspeed.zero.register_external_parameter(model, model.criterion.logit_bias)

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        batch = move(batch, device)
        out = model(batch["images"], batch["tokens"], group=None if self.config.dist_impl == "local" else group)
        metrics = {k: out[k].detach().float().reshape(()) for k in ("logit_scale", "logit_bias")}
        return out["loss"].float(), metrics

    def loss_from_features(self, model, features: dict[str, torch.Tensor], group=None, *,
                           criterion_grad: bool = True) -> tuple[torch.Tensor, dict]:
        """:meth:`loss` from ``features`` ``{"image_features": [N, E], "text_features": [N, E]}``: the
        criterion :meth:`vlmcore.CLIP.forward` applies (:class:`vlmcore.SigLIPLoss`), on the same op."""
        criterion = clip_module(model).criterion
        images = features["image_features"]
        scale, bias = criterion.scale().to(images.device), criterion.logit_bias.to(images.device)
        if not criterion_grad:
            scale, bias = scale.detach(), bias.detach()
        loss = sigmoid_contrastive_loss(images, features["text_features"].to(images.dtype), scale, bias,
                                        group=None if self.config.dist_impl == "local" else group,
                                        dist_impl=criterion.dist_impl)
        metrics = {"logit_scale": scale.detach().float().reshape(()), "logit_bias": bias.detach().float().reshape(())}
        return loss.float(), metrics
