"""BLIP-2 stage 1: :class:`vlmcore.Blip2Stage1`, the Q-Former trained with ITC + ITM + ITG on a frozen tower.

Trains on pairs. Text: ``[CLS] caption <eos>`` padded to ``tokenizer.context_length``; ``[CLS]``
and ``[DEC]`` (the ITG start token) are two ids after the tokenizer's vocabulary, known only to the
Q-Former. Loss: ``loss_itc + loss_itm + loss_itg`` over the data-parallel group (hard negatives
exchanged index-wise); logged with the three losses, ITC / ITM accuracies and the temperature.
Eval: retrieval Recall@1/5/10 over the held-out pairs (up to ``data.eval.max_batches``) by ITC and
re-ranked by ITM over each query's top ``eval_k`` (BLIP-2's protocol); a caption identical to the
image's own counts as correct too (the shapes captions repeat); every rank scores the whole
held-out set (it is small; the result is identical on all ranks). Config section ``model.blip2_stage1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import torch
from torch import nn
from vlmcore.train.config import Bounds, PositiveInt, Rate
from vlmcore.train.data.pipeline import DEFAULT_MAX_IMAGE_PIXELS, decode_image, eval_batches, pair_fields
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks.base import EvalContext, Task
from vlmcore.train.tasks.common import build_vision, move

import vlmcore
from vlmcore.blip2 import recall_at_k

#: The range of the learnable ITC temperature's initial value (it is clamped to [0.001, 0.5]).
Temperature = Annotated[float, Bounds(gt=0, le=0.5)]


@dataclass
class QFormerSection:
    """The Q-Former's size (BLIP-2: 768 x 12 layers x 12 heads, 3072, 32 queries, cross-attention every 2nd)."""

    hidden_size: PositiveInt = 64  # BERT width (BLIP-2: 768)
    num_layers: PositiveInt = 2  # BLIP-2: 12
    num_heads: PositiveInt = 4  # BLIP-2: 12
    intermediate_size: PositiveInt = 128  # feed-forward width (BLIP-2: 3072)
    num_query_tokens: PositiveInt = 8  # learned queries (BLIP-2: 32)
    cross_attention_freq: PositiveInt = 2  # cross-attention to the image every n-th layer
    max_position_embeddings: PositiveInt = 512  # text positions
    dropout: Rate = 0.1  # hidden-state dropout
    attention_dropout: Rate = 0.1  # dropout on the self-attention probabilities

    def check(self, where: str) -> list[str]:
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            return [f"{where}.hidden_size: {self.hidden_size} is not divisible by num_heads {self.num_heads}"]
        return []


def build_qformer(section: QFormerSection, vision_width: int, vocab_size: int) -> vlmcore.QFormer:
    """The :class:`vlmcore.QFormer` of a ``qformer`` section (text vocabulary: the tokenizer's + [CLS], [DEC])."""
    return vlmcore.QFormer(
        vision_width, hidden_size=section.hidden_size, num_layers=section.num_layers, num_heads=section.num_heads,
        intermediate_size=section.intermediate_size, num_query_tokens=section.num_query_tokens,
        cross_attention_freq=section.cross_attention_freq, vocab_size=vocab_size + 2,
        max_position_embeddings=section.max_position_embeddings, dropout=section.dropout,
        attention_dropout=section.attention_dropout)


def frozen_vision_check(cfg) -> list[str]:
    """BLIP-2 keeps the image encoder frozen."""
    return [] if cfg.model.vision.freeze else [f"model.vision.freeze: task {cfg.task!r} keeps the image encoder "
                                               "frozen (BLIP-2); set it to true"]


@dataclass
class Blip2Stage1Config:
    """``model.blip2_stage1``: the Q-Former, the ITC projection / temperature, the distributed gather, eval."""

    qformer: QFormerSection = field(default_factory=QFormerSection)
    embed_dim: PositiveInt = 32  # ITC projection width (BLIP-2: 256)
    init_temperature: Temperature = 0.07  # ITC temperature at start (learnable, clamped to [0.001, 0.5])
    label_smoothing: Rate = 0.1  # ITC and ITG label smoothing
    gather_with_grad: bool = False  # False: LAVIS (the gathered ITC columns carry no gradient)
    eval_k: PositiveInt = 16  # ITM re-ranks each query's top eval_k ITC candidates


class Blip2TextEncoder:
    """Pair sample -> ``images [3, H, W]``, ``text_ids`` / ``attention_mask`` ``[T]`` (``[CLS] caption <eos>``);
    images above ``max_pixels`` are skipped undecoded."""

    def __init__(self, tokenizer: Tokenizer, image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.tok, self.image_size, self.max_pixels = tokenizer, image_size, max_pixels
        self.cls_token_id = tokenizer.vocab_size

    def __call__(self, sample: dict) -> dict:
        image, caption = pair_fields(sample)
        ids = [self.cls_token_id] + self.tok.encode(caption)[: self.tok.context_length - 2] + [self.tok.eos_token_id]
        ids, mask = self.tok.pad(ids)
        return {"images": decode_image(image, self.image_size, max_pixels=self.max_pixels),
                "text_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


class Blip2Stage1Task(Task):
    name = "blip2_stage1"
    Config = Blip2Stage1Config
    data_kinds = ("pairs",)

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        out = frozen_vision_check(cfg)
        if cfg.tokenizer.context_length > cfg.model.blip2_stage1.qformer.max_position_embeddings:
            out.append(f"tokenizer.context_length: {cfg.tokenizer.context_length} exceeds "
                       f"model.blip2_stage1.qformer.max_position_embeddings "
                       f"({cfg.model.blip2_stage1.qformer.max_position_embeddings})")
        if cfg.model.gradient_checkpointing:
            out.append("model.gradient_checkpointing: not available for task 'blip2_stage1'")
        return out

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        c = self.config
        vision = build_vision(self.cfg)
        qformer = build_qformer(c.qformer, vision.width, self.tok.vocab_size)
        return vlmcore.Blip2Stage1(qformer, vision, embed_dim=c.embed_dim, dec_token_id=self.tok.vocab_size + 1,
                                   init_temperature=c.init_temperature, label_smoothing=c.label_smoothing,
                                   gather_with_grad=c.gather_with_grad)

    def prepare_for_engine(self, model: nn.Module, zero_stage: int) -> None:
        if zero_stage == 3:
            import deepspeed

            # Read outside their modules' forward: the queries (encode_image / encode_text are methods)
            # and the word embeddings (tied to the ITG output layer).
            deepspeed.zero.register_external_parameter(model, model.qformer.query_tokens)
            deepspeed.zero.register_external_parameter(model, model.qformer.word_embeddings.weight)

    def encoder(self, kind: str, max_images: int) -> Blip2TextEncoder:
        return Blip2TextEncoder(self.tok, self.cfg.model.vision.image_size, self.cfg.data.max_image_pixels)

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        batch = move(batch, device)
        out = model(batch["images"], batch["text_ids"], batch["attention_mask"], group=group)
        metrics = {k: out[k].detach().float().reshape(())
                   for k in ("loss_itc", "loss_itm", "loss_itg", "itc_i2t_acc", "itc_t2i_acc", "itm_acc")}
        module = getattr(model, "module", model)
        metrics["temperature"] = module.temp.detach().float().reshape(-1)[0]
        return out["loss"].float(), metrics

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        device, ev = ctx.info.device, ctx.eval
        images, text_ids, masks = [], [], []
        # Every rank takes the whole held-out set (same forwards on every rank, also under ZeRO-3).
        for batch, _ in eval_batches(ctx.shards, ctx.encoder, ev.batch_size, 0, 1, ev.max_batches):
            images.append(module.vision_encoder(batch["images"].to(device, ctx.dtype)))
            text_ids.append(batch["text_ids"].to(device))
            masks.append(batch["attention_mask"].to(device))
        if not images:  # no usable sample: run_evaluation's counts raise the EvalDataError that says why
            return {"eval_samples": 0}
        text_ids = torch.cat(text_ids)
        scores = module.retrieval_scores(torch.cat(images), text_ids, torch.cat(masks),
                                         k=self.config.eval_k, batch_size=ev.batch_size)
        # A pair is correct when the image's own caption is the text, or the same text (duplicate captions).
        positive = (text_ids[:, None, :] == text_ids[None, :, :]).all(dim=-1)
        results = {f"itc_{k}": v for k, v in recall_at_k(scores["itc"], scores["itc"].T, positive=positive).items()}
        results.update({f"itm_{k}": v for k, v in
                        recall_at_k(scores["itm_i2t"], scores["itm_t2i"], positive=positive).items()})
        results["eval_samples"] = int(scores["itc"].shape[0])
        return results
