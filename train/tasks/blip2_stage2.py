"""BLIP-2 stage 2: :class:`vlmcore.Blip2LM`, the Q-Former's queries as soft visual prompts of a frozen LM.

Trains on pairs: ``num_query_tokens`` ``<image>`` placeholders (filled with the projected query
outputs, as HF ``Blip2ForConditionalGeneration`` does; not trained on), then the caption. Loss:
the LM loss. Eval: caption token accuracy with the images and with them blanked (the blind
control). The Q-Former starts from a stage-1 run (``stage1_init``: its ``trainable.safetensors``).
Config section ``model.blip2_stage2``. The LM of ``model.lm`` (a local directory or a config) is
either

- a causal LM (OPT, Llama, ...): placeholders + caption, the LM loss on the caption
  (:class:`Blip2CaptionEncoder`); or
- an encoder-decoder LM (T5 / FLAN-T5, ``config.is_encoder_decoder``): BLIP-2's prefix language
  modelling (paper, Sec. 3.3; LAVIS ``blip2_t5.py``): each caption is split in two at a word drawn
  uniformly from the sample's own RNG (:func:`split_caption`); placeholders + the prefix + ``</s>``
  are the encoder input, the suffix + ``</s>`` the decoder's target (:class:`Blip2PrefixLMEncoder`).
  LAVIS's ``forward`` takes the two halves as given (``text_input`` / ``text_output``) and tokenizes
  each on its own, as here; its released code draws no split.

``init``: a transformers ``Blip2ForConditionalGeneration`` directory (``config.json`` + safetensors)
gives the whole model: its vision model (every token to the Q-Former, CLS included, as HF), Q-Former,
queries, ``language_projection`` and, with ``model.lm`` unset, its LM (``model.lm.path`` replaces the
LM; the directory's LM weights are then read and dropped). Its config sets the architecture, so the
``qformer`` section and ``model.vision``'s architecture keys stay unset; ``model.vision.image_size``
must be the directory's. Export: ``vlmcore-export --to hf`` (:func:`vlmcore.blip2.hf.export_hf_blip2`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import torch
from torch import nn
from vlmcore.train.data.pipeline import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IGNORE_INDEX,
    decode_image,
    lm_text,
    pair_fields,
    sample_rng,
)
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks.base import EvalContext, Task
from vlmcore.train.tasks.blip2_stage1 import (
    INIT_OWNED_VISION,
    QFormerSection,
    build_qformer,
    frozen_vision_check,
    read_init_config,
)
from vlmcore.train.tasks.common import build_language_model, build_vision, caption_accuracy, move, needs_language_model
from vlmcore.train.tasks.generation import SquashDecoder

import vlmcore
from vlmcore.eval.generation import Blip2Eval


@dataclass
class Blip2Stage2Config:
    """``model.blip2_stage2``: the Q-Former (same section as stage 1) and the stage-1 weights to start from."""

    qformer: QFormerSection = field(default_factory=QFormerSection)
    stage1_init: str = ""  # trainable.safetensors of a blip2_stage1 run ("" = a random Q-Former)
    init: str = ""  # HF Blip2ForConditionalGeneration dir: vision, Q-Former, projection, LM ("" = none)

    def check(self, where: str) -> list[str]:
        out = []
        if self.stage1_init and not self.stage1_init.endswith(".safetensors"):
            out.append(f"{where}.stage1_init: must be a .safetensors file, got {self.stage1_init!r}")
        if self.init and self.stage1_init:
            out.append(f"{where}.stage1_init: conflicts with {where}.init (both give the Q-Former)")
        if self.init and not os.path.isfile(os.path.join(self.init, "config.json")):
            out.append(f"{where}.init: {self.init!r} has no config.json (a transformers "
                       "Blip2ForConditionalGeneration directory)")
        return out


def init_conflicts(cfg) -> list[str]:
    """ConfigError lines of the keys ``model.blip2_stage2.init`` decides that are set next to it."""
    init, where = cfg.model.blip2_stage2.init, "model.blip2_stage2.init"
    vision, defaults = cfg.model.vision, type(cfg.model.vision)()
    clashes = [f"model.vision.{k}" for k in INIT_OWNED_VISION if getattr(vision, k) != getattr(defaults, k)]
    if cfg.model.blip2_stage2.qformer != QFormerSection():
        clashes.append("model.blip2_stage2.qformer")
    if cfg.model.lm is not None and cfg.model.lm.config:
        clashes.append("model.lm.config")
    out = [f"{key}: conflicts with {where} (the directory's config sets it; remove the key)" for key in clashes]
    if os.path.isfile(os.path.join(init, "config.json")):
        size = read_init_config(init).get("vision_config", {}).get("image_size", 224)
        if vision.image_size != size:
            out.append(f"model.vision.image_size: {vision.image_size} is not the image size of {where} ({size})")
    return out


def num_query_tokens(cfg) -> int:
    """The queries of the run: the ``init`` directory's, else the ``qformer`` section's."""
    c = cfg.model.blip2_stage2
    if c.init and os.path.isfile(os.path.join(c.init, "config.json")):
        return int(read_init_config(c.init).get("num_query_tokens", 32))
    return c.qformer.num_query_tokens


class Blip2CaptionEncoder:
    """Pair sample -> ``images [3, H, W]`` and ``input_ids`` / ``attention_mask`` / ``labels`` ``[T]``
    (``num_query_tokens`` ``<image>`` placeholders, then the caption); images above ``max_pixels`` are
    skipped undecoded."""

    def __init__(self, tokenizer: Tokenizer, image_size: int, num_query_tokens: int,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.tok, self.image_size, self.num_query_tokens = tokenizer, image_size, num_query_tokens
        self.max_pixels = max_pixels

    def __call__(self, sample: dict) -> dict:
        image, caption = pair_fields(sample)
        ids = [self.tok.media_token_id] * self.num_query_tokens + self.tok.encode(caption)
        return {"images": decode_image(image, self.image_size, max_pixels=self.max_pixels), **lm_text(self.tok, ids)}


def split_caption(caption: str, rng: random.Random) -> tuple[str, str]:
    """BLIP-2's prefix-LM split of ``caption``: ``(prefix, suffix)`` at word ``k`` drawn uniformly from
    ``[0, n_words)`` by ``rng`` (an empty prefix is plain captioning; the suffix always keeps a word).
    Words are whitespace-separated, rejoined with single spaces."""
    words = caption.split()
    k = rng.randrange(len(words)) if words else 0
    return " ".join(words[:k]), " ".join(words[k:])


class Blip2PrefixLMEncoder:
    """Pair sample -> the encoder-decoder LM's inputs, all ``[T]`` (``T = context_length``):
    ``images [3, H, W]``; ``input_ids`` / ``attention_mask``: ``num_query_tokens`` ``<image>``
    placeholders, the prefix, ``</s>`` (cut to ``T``, padded); ``labels``: the suffix then ``</s>``
    (cut to ``T``), -100 on padding; ``decoder_attention_mask``: 1 on the label tokens.

    The split point comes from ``data.sample_rng(seed, sample)`` (seed, shard, key): the same split on
    every epoch and after a resume, whichever worker decodes the sample."""

    def __init__(self, tokenizer: Tokenizer, image_size: int, num_query_tokens: int, seed: int,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.tok, self.image_size, self.num_query_tokens = tokenizer, image_size, num_query_tokens
        self.seed, self.max_pixels = seed, max_pixels

    def __call__(self, sample: dict) -> dict:
        image, caption = pair_fields(sample)
        prefix, suffix = split_caption(caption, sample_rng(self.seed, sample))
        t, eos = self.tok.context_length, self.tok.eos_token_id
        encoder_ids = [self.tok.media_token_id] * self.num_query_tokens + self.tok.encode(prefix)
        ids, mask = self.tok.pad(encoder_ids[: t - 1] + [eos])
        target, target_mask = self.tok.pad(self.tok.encode(suffix)[: t - 1] + [eos])
        labels = [i if m else IGNORE_INDEX for i, m in zip(target, target_mask)]
        return {"images": decode_image(image, self.image_size, max_pixels=self.max_pixels),
                "input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                "labels": torch.tensor(labels), "decoder_attention_mask": torch.tensor(target_mask)}


def lm_is_encoder_decoder(cfg) -> bool:
    """Whether the run's LM is a seq2seq LM (its config's ``is_encoder_decoder``), read without weights:
    ``model.lm``'s, else (``init`` without ``model.lm``) the ``init`` directory's ``text_config``."""
    from transformers import AutoConfig

    lm = cfg.model.lm
    if lm is None:
        init = cfg.model.blip2_stage2.init
        return bool(AutoConfig.from_pretrained(init, local_files_only=True).text_config.is_encoder_decoder)
    if lm.path:
        return bool(AutoConfig.from_pretrained(lm.path, local_files_only=True).is_encoder_decoder)
    options = dict(lm.config)
    return bool(AutoConfig.for_model(options.pop("model_type"), **options).is_encoder_decoder)


class Blip2Stage2Task(Task):
    name = "blip2_stage2"
    Config = Blip2Stage2Config
    data_kinds = ("pairs",)
    generates = True

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        init = cfg.model.blip2_stage2.init
        out = (init_conflicts(cfg) if init else needs_language_model(cfg)) + frozen_vision_check(cfg)
        queries = num_query_tokens(cfg)
        if cfg.tokenizer.context_length < queries + 2:
            out.append(f"tokenizer.context_length: {cfg.tokenizer.context_length} leaves no room for a caption "
                       f"after the {queries} query placeholders")
        return out

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        c = self.config
        if c.init:
            return self._build_from_init(dtype)
        vision = build_vision(self.cfg)
        lm = build_language_model(self.cfg, self.tok, dtype, encoder_decoder=True)
        qformer = build_qformer(c.qformer, vision.width, self.tok.vocab_size + 2)  # [CLS], [DEC] (unused here)
        model = vlmcore.Blip2LM(qformer, lm, vision, image_token_id=self.tok.media_token_id)
        if c.stage1_init:
            from safetensors.torch import load_file

            if not os.path.isfile(c.stage1_init):
                raise ValueError(f"model.blip2_stage2.stage1_init: {c.stage1_init!r} does not exist")
            model.load_qformer_state_dict(load_file(c.stage1_init))
        if self.cfg.model.gradient_checkpointing and hasattr(lm, "gradient_checkpointing_enable"):
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _build_from_init(self, dtype: torch.dtype) -> nn.Module:
        """The model of ``init`` (see the module docstring); the LM's embedding grows to the tokenizer's size."""
        from vlmcore.blip2.hf import blip2_lm_from_hf, load_hf_blip2

        init = self.config.init
        hf = load_hf_blip2(init, source=f"model.blip2_stage2.init {init}", dtype=dtype)
        lm = (build_language_model(self.cfg, self.tok, dtype, encoder_decoder=True) if self.cfg.model.lm is not None
              else hf.language_model)
        if lm.get_input_embeddings().weight.shape[0] < self.tok.vocab_size:
            lm.resize_token_embeddings(self.tok.vocab_size)
        model = blip2_lm_from_hf(hf, lang_model=lm, image_token_id=self.tok.media_token_id,
                                 vocab_size=self.tok.vocab_size + 2)
        if self.cfg.model.gradient_checkpointing and hasattr(lm, "gradient_checkpointing_enable"):
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def peer_exporters(self) -> dict:
        from vlmcore.blip2.hf import export_hf_blip2

        return {"hf": export_hf_blip2}

    def prepare_for_engine(self, model: nn.Module, zero_stage: int) -> None:
        if zero_stage == 3:
            import deepspeed

            # encode_image is a method, not the Q-Former's forward: its queries are read directly.
            deepspeed.zero.register_external_parameter(model, model.qformer.query_tokens)

    def encoder(self, kind: str, max_images: int) -> Blip2CaptionEncoder | Blip2PrefixLMEncoder:
        size, queries = self.cfg.model.vision.image_size, num_query_tokens(self.cfg)
        if lm_is_encoder_decoder(self.cfg):
            return Blip2PrefixLMEncoder(self.tok, size, queries, self.cfg.seed, self.cfg.data.max_image_pixels)
        return Blip2CaptionEncoder(self.tok, size, queries, self.cfg.data.max_image_pixels)

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        batch = move(batch, device)
        decoder_mask = batch.get("decoder_attention_mask")  # encoder-decoder LMs only
        extra = {} if decoder_mask is None else {"decoder_attention_mask": decoder_mask}
        out = model(batch["images"], batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], **extra)
        return out.loss.float(), {}

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        return caption_accuracy(module, ctx, "images")

    def eval_model(self, module: nn.Module) -> Blip2Eval:
        return Blip2Eval(module, self.tok)

    def eval_images(self):
        return SquashDecoder(self.cfg.model.vision.image_size)
