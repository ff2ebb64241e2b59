"""BLIP-2 stage 1: :class:`vlmcore.Blip2Stage1`, the Q-Former trained with ITC + ITM + ITG on a frozen tower.

Trains on pairs. Text: ``[CLS] caption <eos>`` padded to ``tokenizer.context_length``, ids laid out
by :class:`Blip2Text`: with a BERT tokenizer directory, BERT's ``[CLS]`` / ``[SEP]`` and ``[DEC]``
the tokenizer's own ``[DEC]`` or the first id after its vocabulary (LAVIS / HF BLIP-2's layout, so
their checkpoints line up id for id); with any other tokenizer, ``[CLS]`` and ``[DEC]`` (the ITG
start token) are two ids after the vocabulary, known only to the Q-Former. Loss:
``loss_itc + loss_itm + loss_itg`` over the data-parallel group (hard negatives exchanged
index-wise); logged with the three losses, ITC / ITM accuracies and the temperature. Eval: retrieval
Recall@1/5/10 over the held-out pairs (up to ``data.eval.max_batches``) by ITC and re-ranked by ITM
over each query's top ``eval_k`` (BLIP-2's protocol); a caption identical to the image's own counts
as correct too (the shapes captions repeat); every rank scores the whole held-out set (it is small;
the result is identical on all ranks). Config section ``model.blip2_stage1``.

``init``: a transformers BLIP-2 directory (``config.json`` + safetensors;
:func:`vlmcore.blip2.hf.blip2_stage1_from_hf`). A ``Blip2ForImageTextRetrieval`` gives the whole model
but the ITG head and the temperature (HF has neither); a ``Blip2ForConditionalGeneration`` /
``Blip2Model`` gives the vision model, the Q-Former's query path and the queries, and the stage-1 text
embeddings, text feed-forwards, ITC projections and ITM head start at their initialization (the
documented allow-list :data:`vlmcore.blip2.hf.STAGE2_DIRECTORY_LACKS`; its LM is never read). The
directory's config sets the architecture, so ``qformer``, ``embed_dim`` and ``model.vision``'s
architecture keys stay unset, ``model.vision.image_size`` is the directory's, and the tokenizer must
give the Q-Former's text vocabulary (the checkpoint's BERT tokenizer directory). Export:
``vlmcore-export --to hf`` (a ``Blip2ForImageTextRetrieval``, :func:`vlmcore.blip2.hf.export_hf_blip2_stage1`).

Zero-shot text <-> video retrieval (``vlmcore-eval video-retrieval --run RUN_DIR``):
:meth:`Blip2Stage1Task.video_eval_encoder`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Annotated

import torch
from torch import nn
from vlmcore.train.config import Bounds, PositiveInt, Rate
from vlmcore.train.data.pipeline import DEFAULT_MAX_IMAGE_PIXELS, decode_image, eval_batches, pair_fields
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks.base import EvalContext, Task
from vlmcore.train.tasks.blip_retrieval import BlipVideoEncoder, VideoFields
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
    """The :class:`vlmcore.QFormer` of a ``qformer`` section with a text vocabulary of ``vocab_size`` ids."""
    return vlmcore.QFormer(
        vision_width, hidden_size=section.hidden_size, num_layers=section.num_layers, num_heads=section.num_heads,
        intermediate_size=section.intermediate_size, num_query_tokens=section.num_query_tokens,
        cross_attention_freq=section.cross_attention_freq, vocab_size=vocab_size,
        max_position_embeddings=section.max_position_embeddings, dropout=section.dropout,
        attention_dropout=section.attention_dropout)


def frozen_vision_check(cfg) -> list[str]:
    """BLIP-2 keeps the image encoder frozen."""
    return [] if cfg.model.vision.freeze else [f"model.vision.freeze: task {cfg.task!r} keeps the image encoder "
                                               "frozen (BLIP-2); set it to true"]


#: ``model.vision`` keys an ``init`` directory decides (its vision_config): set, they conflict with it.
INIT_OWNED_VISION = ("type", "patch_size", "width", "depth", "heads", "mlp_ratio", "act", "init", "name",
                     "checkpoint", "model_kwargs", "path")


def read_init_config(path: str) -> dict:
    """The ``config.json`` of an ``init`` directory."""
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        return json.load(f)


@dataclass
class Blip2Stage1Config:
    """``model.blip2_stage1``: the Q-Former, the ITC projection / temperature, the distributed gather, eval."""

    qformer: QFormerSection = field(default_factory=QFormerSection)
    embed_dim: PositiveInt = 32  # ITC projection width (BLIP-2: 256)
    init_temperature: Temperature = 0.07  # ITC temperature at start (learnable, clamped to [0.001, 0.5])
    label_smoothing: Rate = 0.1  # ITC and ITG label smoothing
    gather_with_grad: bool = False  # False: LAVIS (the gathered ITC columns carry no gradient)
    eval_k: PositiveInt = 16  # ITM re-ranks each query's top eval_k ITC candidates
    init: str = ""  # HF Blip2ForImageTextRetrieval dir (or captioning: query path only) ("" = none)

    def check(self, where: str) -> list[str]:
        if self.init and not os.path.isfile(os.path.join(self.init, "config.json")):
            return [f"{where}.init: {self.init!r} has no config.json (a transformers "
                    "Blip2ForImageTextRetrieval directory)"]
        return []


def init_conflicts(cfg) -> list[str]:
    """ConfigError lines of the keys ``model.blip2_stage1.init`` decides that are set next to it."""
    c, where = cfg.model.blip2_stage1, "model.blip2_stage1.init"
    vision, defaults = cfg.model.vision, type(cfg.model.vision)()
    clashes = [f"model.vision.{k}" for k in INIT_OWNED_VISION if getattr(vision, k) != getattr(defaults, k)]
    clashes += [f"model.blip2_stage1.{k}" for k, default in (("qformer", QFormerSection()), ("embed_dim", 32))
                if getattr(c, k) != default]
    out = [f"{key}: conflicts with {where} (the directory's config sets it; remove the key)" for key in clashes]
    if os.path.isfile(os.path.join(c.init, "config.json")):
        size = read_init_config(c.init).get("vision_config", {}).get("image_size", 224)
        if vision.image_size != size:
            out.append(f"model.vision.image_size: {vision.image_size} is not the image size of {where} ({size})")
    return out


class Blip2Text:
    """The Q-Former's text ids over ``tokenizer`` (layout in the module docstring): ``cls_token_id``,
    ``dec_token_id``, ``vocab_size`` (of the Q-Former's text embeddings), and :meth:`encode`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        base = tokenizer.vocab_size
        hf = getattr(tokenizer, "_hf", None)
        if hf is not None and hf.cls_token_id is not None and hf.sep_token_id is not None:
            # LAVIS's init_tokenizer: BERT's ids, [DEC] added as the next token (HF BLIP-2 tokenizers hold it)
            dec = hf.get_vocab().get("[DEC]")
            self.cls_token_id, self.dec_token_id = hf.cls_token_id, base if dec is None else dec
            self.vocab_size = max(base, self.dec_token_id + 1)
        else:
            self.cls_token_id, self.dec_token_id, self.vocab_size = base, base + 1, base + 2

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [n, T], attention mask [n, T])``: ``[CLS] tokens <eos>``, truncated to T, padded."""
        tok = self.tokenizer
        rows = [tok.pad([self.cls_token_id, *tok.encode(c)[: tok.context_length - 2], tok.eos_token_id])
                for c in captions]
        return (torch.tensor([ids for ids, _ in rows], dtype=torch.long),
                torch.tensor([mask for _, mask in rows], dtype=torch.long))


class Blip2TextEncoder:
    """Pair sample -> ``images [3, H, W]``, ``text_ids`` / ``attention_mask`` ``[T]`` (``[CLS] caption <eos>``,
    :class:`Blip2Text`); images above ``max_pixels`` are skipped undecoded."""

    def __init__(self, text: Blip2Text, image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.text, self.image_size, self.max_pixels = text, image_size, max_pixels

    def __call__(self, sample: dict) -> dict:
        image, caption = pair_fields(sample)
        ids, mask = self.text.encode([caption])
        return {"images": decode_image(image, self.image_size, max_pixels=self.max_pixels),
                "text_ids": ids[0], "attention_mask": mask[0]}


def max_text_positions(cfg) -> tuple[int, str]:
    """The Q-Former's text positions and where they are set: the ``init`` directory's, else the section's."""
    c = cfg.model.blip2_stage1
    if c.init and os.path.isfile(os.path.join(c.init, "config.json")):
        positions = read_init_config(c.init).get("qformer_config", {}).get("max_position_embeddings", 512)
        return int(positions), f"the Q-Former's max_position_embeddings of model.blip2_stage1.init ({positions})"
    return c.qformer.max_position_embeddings, (f"model.blip2_stage1.qformer.max_position_embeddings "
                                               f"({c.qformer.max_position_embeddings})")


class Blip2Stage1Task(Task):
    name = "blip2_stage1"
    Config = Blip2Stage1Config
    data_kinds = ("pairs",)
    media_tokens = False  # captions hold no image placeholders: a BERT vocabulary stays LAVIS / HF BLIP-2's

    def __init__(self, cfg, tok: Tokenizer):
        super().__init__(cfg, tok)
        self.text = Blip2Text(tok)

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        out = frozen_vision_check(cfg) + (init_conflicts(cfg) if cfg.model.blip2_stage1.init else [])
        positions, where = max_text_positions(cfg)
        if cfg.tokenizer.context_length > positions:
            out.append(f"tokenizer.context_length: {cfg.tokenizer.context_length} exceeds {where}")
        if cfg.model.gradient_checkpointing:
            out.append("model.gradient_checkpointing: not available for task 'blip2_stage1'")
        return out

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        c = self.config
        losses = dict(init_temperature=c.init_temperature, label_smoothing=c.label_smoothing,
                      gather_with_grad=c.gather_with_grad)
        if c.init:
            return self._build_from_init(losses)
        vision = build_vision(self.cfg)
        qformer = build_qformer(c.qformer, vision.width, self.text.vocab_size)
        return vlmcore.Blip2Stage1(qformer, vision, embed_dim=c.embed_dim, dec_token_id=self.text.dec_token_id,
                                   **losses)

    def _build_from_init(self, losses: dict) -> nn.Module:
        """The model of ``init`` (module docstring); a tokenizer whose layout is not the directory's
        Q-Former vocabulary is refused naming both."""
        from vlmcore.blip2.hf import blip2_stage1_from_hf

        init = self.config.init
        vocab = read_init_config(init).get("qformer_config", {}).get("vocab_size", 30522)
        if vocab != self.text.vocab_size:
            raise ValueError(
                f"model.blip2_stage1.init: its Q-Former has a text vocabulary of {vocab} ids, tokenizer.path "
                f"{self.tok.path!r} gives {self.text.vocab_size} ([CLS] {self.text.cls_token_id}, [DEC] "
                f"{self.text.dec_token_id}); use the checkpoint's own (BERT) tokenizer directory")
        return blip2_stage1_from_hf(init, source=f"model.blip2_stage1.init {init}",
                                    dec_token_id=self.text.dec_token_id, **losses)

    def peer_exporters(self) -> dict:
        from vlmcore.blip2.hf import export_hf_blip2_stage1

        return {"hf": export_hf_blip2_stage1}

    def video_eval_encoder(self, video: VideoFields) -> BlipVideoEncoder:
        """The encoder of held-out video-caption samples over ``video`` (the run's eval frame decoder): the
        fields :func:`vlmcore.eval.video_retrieval.video_retrieval` scores, captions as in training."""
        return BlipVideoEncoder(self.text, video)

    def prepare_for_engine(self, model: nn.Module, zero_stage: int) -> None:
        if zero_stage == 3:
            import deepspeed

            # Read outside their modules' forward: the queries (encode_image / encode_text are methods)
            # and the word embeddings (tied to the ITG output layer).
            deepspeed.zero.register_external_parameter(model, model.qformer.query_tokens)
            deepspeed.zero.register_external_parameter(model, model.qformer.word_embeddings.weight)

    def encoder(self, kind: str, max_images: int) -> Blip2TextEncoder:
        return Blip2TextEncoder(self.text, self.cfg.model.vision.image_size, self.cfg.data.max_image_pixels)

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
