"""Frozen (Tsimpoukelli et al. 2021): :class:`vlmcore.FrozenPrefix`, a visual prefix for a frozen LM.

Trains on pairs: ``num_prefix_tokens`` ``<image>`` placeholders, then the caption. Loss: the LM
loss. Eval: caption token accuracy with and without the images. Config section ``model.frozen``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from vlmcore.train.config import PositiveInt
from vlmcore.train.data.pipeline import lm_text, pair_fields
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks.base import EvalContext, Task
from vlmcore.train.tasks.common import (
    ImageDecoder,
    build_language_model,
    build_vision,
    caption_accuracy,
    image_decoder,
    move,
    needs_language_model,
)

import vlmcore
from vlmcore.eval.generation import FrozenEval


@dataclass
class FrozenConfig:
    """``model.frozen``: how many LM token positions the image prefix takes."""

    num_prefix_tokens: PositiveInt = 2  # LM positions of the visual prefix


class FrozenEncoder:
    """Pair sample -> ``images [1, 3, H, W]`` and ``input_ids`` / ``attention_mask`` / ``labels`` ``[T]``
    (``num_prefix_tokens`` ``<image>`` placeholders, not trained on, then the caption)."""

    def __init__(self, tokenizer: Tokenizer, images: ImageDecoder, num_prefix_tokens: int):
        self.tok, self.images, self.num_prefix_tokens = tokenizer, images, num_prefix_tokens

    def __call__(self, sample: dict) -> dict:
        image, caption = pair_fields(sample)
        ids = [self.tok.media_token_id] * self.num_prefix_tokens + self.tok.encode(caption)
        return {"images": self.images(image, sample)[None], **lm_text(self.tok, ids)}


class FrozenTask(Task):
    name = "frozen"
    Config = FrozenConfig
    data_kinds = ("pairs",)
    generates = True

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        return needs_language_model(cfg)

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        vision = build_vision(self.cfg)
        lm = build_language_model(self.cfg, self.tok, dtype)
        model = vlmcore.FrozenPrefix(vision, lm, image_token_id=self.tok.media_token_id, vis_dim=vision.pooled_width,
                                     num_prefix_tokens=self.config.num_prefix_tokens)
        if self.cfg.model.gradient_checkpointing and hasattr(lm, "gradient_checkpointing_enable"):
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def encoder(self, kind: str, max_images: int, train: bool = True) -> FrozenEncoder:
        return FrozenEncoder(self.tok, image_decoder(self.cfg, train), self.config.num_prefix_tokens)

    def eval_encoder(self) -> FrozenEncoder:
        return self.encoder("pairs", 1, train=False)

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        batch = move(batch, device)
        out = model(batch["images"], batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
        return out.loss.float(), {}

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        return caption_accuracy(module, ctx, "images")

    def eval_model(self, module: nn.Module) -> FrozenEval:
        return FrozenEval(module, self.tok)

    def eval_images(self) -> ImageDecoder:
        return image_decoder(self.cfg, train=False)
