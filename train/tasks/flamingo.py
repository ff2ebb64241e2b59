"""Flamingo: :class:`vlmcore.Flamingo` over a frozen HF causal LM and a :class:`vlmcore.VisionTransformer`.

Trains on pairs, MMC4-like interleaved documents and video clips (a mixture; one batch per
dataset, so datasets may differ in frames per media). A clip is one media of F frames: the
resampler adds a learned time embedding per frame (``max_num_frames``) and resamples its F x v
tokens; padding frames of short clips are masked out. Loss: the LM loss. Eval: caption
token accuracy on the held-out pairs, with the images and with the images blanked (``blind``).
Config section ``model.flamingo`` (plus the common ``model.vision`` / ``model.lm``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from vlmcore.train.config import NonNegativeInt, PositiveInt
from vlmcore.train.data.pipeline import IGNORE_INDEX, doc_fields, lm_text, pair_fields
from vlmcore.train.data.tokenizer import EOC, MEDIA, Tokenizer
from vlmcore.train.tasks.base import EvalContext, Task
from vlmcore.train.tasks.common import (
    ImageDecoder,
    VideoDecoder,
    build_language_model,
    build_vision,
    caption_accuracy,
    image_decoder,
    move,
    needs_language_model,
    video_decoder,
)

import vlmcore
from vlmcore.eval.generation import FlamingoEval
from vlmcore.flamingo_convert import load_openflamingo_checkpoint, openflamingo_state_dict

#: The sizes OpenFlamingo's ``Flamingo`` hard-codes (its ``PerceiverResampler(dim)`` and
#: ``GatedCrossAttentionBlock(dim, dim_visual)`` defaults): an export needs ``model.flamingo`` to match.
OPENFLAMINGO_SIZES = {"num_latents": 64, "resampler_depth": 6, "dim_head": 64, "heads": 8, "ff_mult": 4,
                      "only_attend_immediate_media": True}


@dataclass
class FlamingoConfig:
    """``model.flamingo``: the perceiver resampler and the gated cross-attention layers."""

    cross_attn_every_n_layers: PositiveInt = 1  # a gated cross-attention layer every N LM layers
    num_latents: PositiveInt = 8  # perceiver resampler latents per image
    resampler_depth: PositiveInt = 1  # perceiver resampler layers
    dim_head: PositiveInt = 16  # cross-attention head width
    heads: PositiveInt = 4  # cross-attention heads
    ff_mult: PositiveInt = 2  # feed-forward hidden = ff_mult * LM width
    only_attend_immediate_media: bool = True  # text attends only to the last preceding image (OpenFlamingo default)
    train_new_token_embeddings: bool = False  # train the <image> / <|endofchunk|> embeddings (else frozen)
    mask_text_before_first_image: bool = False  # OpenFlamingo's MMC4 masking: no loss before the first <image>
    max_num_frames: NonNegativeInt = 0  # frames per media with a learned time embedding (video); 0 = images only
    init: str = ""  # an OpenFlamingo checkpoint.pt to start the bridge from ("" = random init)


class FlamingoEncoder:
    """Sample -> ``vision_x [M, F, 3, H, W]`` and ``input_ids`` / ``attention_mask`` / ``labels`` ``[T]``.

    Pairs: M = F = 1, text ``<image> caption <|endofchunk|>``. Documents: M = ``max_images`` (zero
    padded), F = 1; the document keeps its ``<image>`` / ``<|endofchunk|>`` markers. Videos (``video``
    a :class:`VideoDecoder`): M = 1, F = its ``num_frames``, text ``<image> caption <|endofchunk|>``,
    plus ``frame_mask [1, F]`` (False = a padding frame of a short clip).
    """

    def __init__(self, kind: str, tokenizer: Tokenizer, images: ImageDecoder, max_images: int,
                 mask_text_before_first_image: bool = False, video: VideoDecoder | None = None):
        if kind == "video" and video is None:
            raise ValueError("kind 'video' needs a VideoDecoder (video=...)")
        self.kind, self.tok, self.images, self.max_images = kind, tokenizer, images, max_images
        self.mask_text_before_first_image = mask_text_before_first_image
        self.video = video

    def __call__(self, sample: dict) -> dict:
        if self.kind == "video":
            frames, frame_mask, caption = self.video(sample)
            return {"vision_x": frames[None], "frame_mask": frame_mask[None],
                    **self._text(f"{MEDIA} {caption} {EOC}")}
        if self.kind == "interleaved":
            blobs, text = doc_fields(sample, self.max_images)
        else:
            image, caption = pair_fields(sample)
            blobs, text = [image], f"{MEDIA} {caption} {EOC}"
        images = [self.images(b, sample) for b in blobs]
        size = self.images.size
        vision = torch.zeros(self.max_images if self.kind == "interleaved" else 1, 1, 3, size, size)
        vision[: len(images), 0] = torch.stack(images)
        return {"vision_x": vision, **self._text(text)}

    def _text(self, text: str) -> dict:
        """input_ids / attention_mask / labels ``[T]`` of ``text`` (with the optional MMC4 masking)."""
        example = lm_text(self.tok, self.tok.encode(text))
        if self.mask_text_before_first_image:
            media = (example["input_ids"] == self.tok.media_token_id).nonzero()
            first = int(media[0, 0]) if len(media) else len(example["labels"])
            example["labels"][:first] = IGNORE_INDEX
        return example


class FlamingoTask(Task):
    name = "flamingo"
    Config = FlamingoConfig
    data_kinds = ("pairs", "interleaved", "video")
    generates = True

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        out = needs_language_model(cfg)
        max_frames = cfg.model.flamingo.max_num_frames
        for i, d in enumerate(cfg.data.train):
            if d.kind == "video" and d.num_frames > max_frames:
                out.append(f"data.train.{i}.num_frames: {d.num_frames} frames per clip need "
                           f"model.flamingo.max_num_frames >= {d.num_frames} (it is {max_frames}; 0 = images only)")
        return out

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        f, tok = self.config, self.tok
        vision = build_vision(self.cfg)
        lm = build_language_model(self.cfg, tok, dtype)
        new_tokens = [tok.media_token_id, tok.eoc_token_id] if f.train_new_token_embeddings else False
        model = vlmcore.Flamingo(
            vision, lm, media_token_id=tok.media_token_id, vis_dim=vision.width,
            cross_attn_every_n_layers=f.cross_attn_every_n_layers, num_latents=f.num_latents,
            resampler_depth=f.resampler_depth, dim_head=f.dim_head, heads=f.heads,
            only_attend_immediate_media=f.only_attend_immediate_media, ff_mult=f.ff_mult,
            train_new_token_embeddings=new_tokens, gradient_checkpointing=self.cfg.model.gradient_checkpointing,
            max_num_frames=f.max_num_frames or None)
        if f.init:
            if not os.path.isfile(f.init):
                raise ValueError(f"model.flamingo.init: {f.init!r} does not exist")
            checkpoint = torch.load(f.init, map_location="cpu", weights_only=True)
            state = checkpoint.get("model_state_dict", checkpoint)
            load_openflamingo_checkpoint(model, state, f"model.flamingo.init {f.init}")
        return model

    def peer_exporters(self) -> dict:
        return {"openflamingo": self._write_openflamingo}

    def _write_openflamingo(self, module: nn.Module, out_dir: str) -> None:
        """``checkpoint.pt`` (``{"model_state_dict": the full state}``) for OpenFlamingo's
        ``create_model_and_transforms(..., cross_attn_every_n_layers=N)`` model."""
        f = self.config
        differ = [f"{k}={getattr(f, k)} (OpenFlamingo: {v})" for k, v in OPENFLAMINGO_SIZES.items()
                  if getattr(f, k) != v]
        if f.max_num_frames:  # OpenFlamingo's factory builds its resampler without time embeddings
            differ.append(f"max_num_frames={f.max_num_frames} (OpenFlamingo: 0)")
        if differ:
            raise ValueError("model.flamingo: OpenFlamingo builds its resampler and cross-attention with fixed "
                             f"sizes; this run differs: {', '.join(differ)}")
        torch.save({"model_state_dict": openflamingo_state_dict(module)}, os.path.join(out_dir, "checkpoint.pt"))

    def encoder(self, kind: str, max_images: int, train: bool = True) -> FlamingoEncoder:
        """``max_images``: images kept per document, or for ``kind: video`` the frames per clip."""
        video = video_decoder(self.cfg, max_images, train) if kind == "video" else None
        return FlamingoEncoder(kind, self.tok, image_decoder(self.cfg, train), max_images,
                               self.config.mask_text_before_first_image, video)

    def eval_encoder(self) -> FlamingoEncoder:
        return self.encoder("pairs", 1, train=False)

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        batch = move(batch, device)
        out = model(batch["vision_x"], batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"], frame_mask=batch.get("frame_mask"))
        return out.loss.float(), {}

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        return caption_accuracy(module, ctx, "vision_x")

    def eval_model(self, module: nn.Module) -> FlamingoEval:
        return FlamingoEval(module, self.tok)

    def eval_images(self) -> ImageDecoder:
        return image_decoder(self.cfg, train=False)
