"""CLIP: :class:`vlmcore.CLIP` trained with the fused contrastive loss; zero-shot eval.

Loss: the fused contrastive loss over the data-parallel group (``local_loss=True``: each rank's
rows against all gathered columns); logged with the logit scale and the in-batch i2t / t2i
accuracies. Eval: zero-shot top-1 on the held-out pairs with a classifier built from label text
(``data.eval.classes``, default ``classes.json`` next to the first eval shard; each sample's json
holds its ``label``). Export: the trainable weights and ``vision.safetensors`` (the vision tower;
for the built-in ViT usable as ``model.vision.init``; for adapter towers the adapter's keys, e.g.
``visual.conv1.weight`` of an open_clip tower). Config section ``model.clip``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

import vlmcore

from ..data import eval_batches, pair_fields
from ..distributed import all_reduce_sum
from ..tokenizer import Tokenizer
from .base import EvalContext, Task
from .common import ImageDecoder, build_vision, image_decoder, in_step, move


@dataclass
class TextConfig:
    """CLIP's text tower (its context length is ``tokenizer.context_length``)."""

    width: int = 64
    depth: int = 2
    heads: int = 4

    def check(self, where: str) -> list[str]:
        out = [f"{where}.{n}: must be >= 1, got {getattr(self, n)}" for n in ("width", "depth", "heads")
               if getattr(self, n) < 1]
        if self.heads >= 1 and self.width % self.heads:
            out.append(f"{where}.width: {self.width} is not divisible by heads {self.heads}")
        return out


@dataclass
class ClipConfig:
    """``model.clip``: the text tower, the joint embedding and the temperature."""

    embed_dim: int = 64
    text: TextConfig = field(default_factory=TextConfig)
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0

    def check(self, where: str) -> list[str]:
        out = []
        if self.embed_dim < 1:
            out.append(f"{where}.embed_dim: must be >= 1, got {self.embed_dim}")
        if not self.init_temperature > 0:
            out.append(f"{where}.init_temperature: must be > 0, got {self.init_temperature}")
        if not self.max_logit_scale > 0:
            out.append(f"{where}.max_logit_scale: must be > 0, got {self.max_logit_scale}")
        return out


class ClipEncoder:
    """Pair sample -> ``{"images": [3, H, W], "tokens": [T]}``."""

    def __init__(self, tokenizer: Tokenizer, images: ImageDecoder):
        self.tok, self.images = tokenizer, images

    def __call__(self, sample: dict) -> dict:
        image, caption = pair_fields(sample)
        return {"images": self.images(image, sample), "tokens": self.tok([caption])[0]}


class ClipTask(Task):
    name = "clip"
    Config = ClipConfig
    data_kinds = ("pairs",)
    media_tokens = False  # CLIP text has no image placeholders: keep the CLIP vocabulary as it is

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        out = []
        if cfg.model.gradient_checkpointing:
            out.append("model.gradient_checkpointing: not available for task 'clip' (flamingo and frozen only)")
        if len(cfg.data.train) != 1:
            out.append("data.train: task 'clip' takes exactly one dataset")
        return out

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        c, tok = self.config, self.tok
        return vlmcore.CLIP(
            c.embed_dim, vision_encoder=build_vision(self.cfg), vocab_size=tok.vocab_size,
            context_length=self.cfg.tokenizer.context_length, text_width=c.text.width, text_depth=c.text.depth,
            text_heads=c.text.heads, pad_token_id=tok.pad_token_id, eot_token_id=tok.eos_token_id,
            init_temperature=c.init_temperature, max_logit_scale=c.max_logit_scale)

    def prepare_for_engine(self, model: nn.Module, zero_stage: int) -> None:
        if zero_stage == 3:
            import deepspeed

            # CLIP's forward reads the temperature of its criterion submodule directly.
            deepspeed.zero.register_external_parameter(model, model.criterion.logit_scale)

    def encoder(self, kind: str, max_images: int, train: bool = True) -> ClipEncoder:
        return ClipEncoder(self.tok, image_decoder(self.cfg, train))

    def eval_encoder(self) -> ClipEncoder:
        return self.encoder("pairs", 1, train=False)

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        batch = move(batch, device)
        out = model(batch["images"], batch["tokens"], group=group, local_loss=group is not None)
        metrics = {k: out[k].detach().float().reshape(()) for k in ("logit_scale", "i2t_acc", "t2i_acc")}
        return out["loss"].float(), metrics

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        info, ev = ctx.info, ctx.eval
        classes_path = ev.classes or os.path.join(os.path.dirname(ctx.shards[0]), "classes.json")
        with open(classes_path, encoding="utf-8") as f:
            classes = json.load(f)
        classifier = vlmcore.zero_shot_classifier(module, self.tok, classes["classnames"], classes["templates"])
        correct = total = 0
        batches = eval_batches(ctx.shards, ctx.encoder, ev.batch_size, info.rank, info.world_size, ev.max_batches)
        for batch, metas, real in in_step(batches, info, ctx.zero_stage, ctx.shards, ctx.encoder):
            _, preds = vlmcore.zero_shot_predict(module, batch["images"].to(info.device, ctx.dtype), classifier)
            if not real:
                continue
            labels = torch.tensor([m["label"] for m in metas], device=preds.device)
            correct += int((preds == labels).sum())
            total += len(metas)
        correct, total = all_reduce_sum([correct, total], info.device)
        return {"zero_shot_top1": correct / max(total, 1), "eval_samples": int(total)}

    def export(self, module: nn.Module) -> dict[str, tuple[list[str], str]]:
        names = super().export(module)
        names["vision.safetensors"] = ([n for n, _ in module.named_parameters() if n.startswith("visual.")],
                                       "visual.")
        return names
