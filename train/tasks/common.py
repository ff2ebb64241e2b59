"""Builders and evaluation pieces shared by several tasks (no task is named here).

- :func:`build_language_model`: the frozen causal LM of ``model.lm`` (local directory or config).
- :func:`build_vision`: the vision tower of ``model.vision`` (built-in ViT, open_clip, timm, HF;
  ``train/towers.py``), frozen / partly unlocked as configured.
- :class:`ImageDecoder`, :func:`image_decoder`: image bytes -> the tower's input (``data.preprocess``
  over the tower's own preprocessing), for the task encoders.
- :class:`VideoDecoder`, :func:`video_decoder`: a video sample -> frames ``[F, 3, S, S]``, frame mask, caption.
- :func:`lock_tower` / :func:`checkpoint_blocks`: LiT-style locking, activation checkpointing of blocks.
- :func:`in_step`: the ZeRO-3 lock-step iterator over eval batches.
- :func:`caption_accuracy`: caption token accuracy with the images and with the images blanked.
- :func:`needs_language_model`: the config check of the tasks that need ``model.lm``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch
from torch import nn
from vlmcore.train.data.pipeline import DEFAULT_MAX_IMAGE_PIXELS, IGNORE_INDEX, decode_image, eval_batches, sample_rng
from vlmcore.train.data.preprocess import ImageTransform, build_transforms
from vlmcore.train.data.video import video_fields
from vlmcore.train.runtime.distributed import DistInfo, all_reduce_sum
from vlmcore.train.tasks.towers import build_tower, freeze_vision, vision_preprocess

if TYPE_CHECKING:
    from vlmcore.train.config import TrainConfig
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.tasks.base import EvalContext


def build_language_model(cfg: TrainConfig, tok: Tokenizer, dtype: torch.dtype = torch.float32, *,
                         encoder_decoder: bool = False) -> nn.Module:
    """The frozen causal LM: loaded from a local directory or built from a config (random weights).

    ``dtype``: the training precision's parameter dtype. A directory is loaded in it, not in the
    dtype of its files (transformers 5 defaults to the latter: a bf16 checkpoint would otherwise make
    the model, and the bridge built at the LM's dtype, bf16 in an fp32 run, with no fp32 master weights).
    ``encoder_decoder``: the task also takes a seq2seq LM (T5 / FLAN-T5): an LM whose config says
    ``is_encoder_decoder`` is then built as ``AutoModelForSeq2SeqLM`` (decoding starts at the pad id).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    lm_cfg = cfg.model.lm
    if lm_cfg.path:
        config = AutoConfig.from_pretrained(lm_cfg.path, local_files_only=True)
    else:
        options = dict(lm_cfg.config)
        model_type = options.pop("model_type")
        options.setdefault("vocab_size", tok.vocab_size)
        options.setdefault("pad_token_id", tok.pad_token_id)
        options.setdefault("eos_token_id", tok.eos_token_id)
        options.setdefault("bos_token_id", tok.eos_token_id)
        config = AutoConfig.for_model(model_type, **options)
        if config.is_encoder_decoder and "decoder_start_token_id" not in options:
            config.decoder_start_token_id = tok.pad_token_id  # T5 starts decoding at its pad token
    auto = AutoModelForSeq2SeqLM if encoder_decoder and config.is_encoder_decoder else AutoModelForCausalLM
    if lm_cfg.path:
        lm = auto.from_pretrained(lm_cfg.path, local_files_only=True, dtype=dtype)
    else:
        lm = auto.from_config(config)
    if lm.get_input_embeddings().weight.shape[0] < tok.vocab_size:
        lm.resize_token_embeddings(tok.vocab_size)
    return lm


def build_vision(cfg: TrainConfig) -> nn.Module:
    """The vision tower of ``model.vision`` (``width``, ``pooled_width``; tokens ``[N, v, width]``),
    with its weights (``init`` / ``checkpoint`` / ``path``) and ``freeze`` / ``unlocked_layers`` applied."""
    tower = build_tower(cfg.model.vision)
    freeze_vision(tower, cfg.model.vision)
    return tower


class ImageDecoder:
    """Image bytes of a sample -> ``[3, size, size]`` (the tower's input), decoded on the data workers.

    ``transform``: an :class:`ImageTransform` (random crops when it is a training transform, drawn from
    ``data.sample_rng(seed, sample)``: the same crops after a resume). ``max_pixels``: larger images
    are skipped undecoded (``data.max_image_pixels``).
    """

    def __init__(self, transform: ImageTransform, seed: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.transform, self.seed, self.max_pixels = transform, seed, max_pixels
        self.size = transform.size

    def __call__(self, data: bytes, sample: dict) -> torch.Tensor:
        return decode_image(data, self.size, self.transform, sample_rng(self.seed, sample), self.max_pixels)

    @classmethod
    def squash(cls, size: int) -> ImageDecoder:
        """The plain decoder: squash-resize to ``size`` x ``size``, OpenAI CLIP mean / std, no crop."""
        return cls(ImageTransform(size=size, resize_mode="squash"), seed=0)


def image_decoder(cfg: TrainConfig, train: bool = True) -> ImageDecoder:
    """The :class:`ImageDecoder` of training (``train``) or evaluation images for ``cfg``."""
    size, tower_values = vision_preprocess(cfg.model.vision)
    train_transform, eval_transform = build_transforms(size, tower_values, cfg.data.preprocess.options())
    return ImageDecoder(train_transform if train else eval_transform, cfg.seed, cfg.data.max_image_pixels)


class VideoDecoder:
    """A video sample -> ``(frames [F, 3, S, S], frame_mask [F] bool, caption)``, decoded on the data workers.

    ``F = num_frames``: the clip's frames (``data.video.video_fields``: segment centres, or with
    ``train`` one random frame per segment), each through the :class:`ImageDecoder`'s transform with
    ONE crop for the whole clip (the same box on every frame, so motion is not confused with crop
    jitter). A clip of fewer frames is padded with zero frames; ``frame_mask`` is True for real frames.
    Raises ``data.BadSample`` (a counted skip) for an unusable sample. Picklable.

    ``VideoDecoder(image_decoder(cfg, train), num_frames, train)`` is the whole interface; ``size`` is S.
    """

    def __init__(self, images: ImageDecoder, num_frames: int, train: bool):
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        self.images, self.num_frames, self.train = images, num_frames, train
        self.size = images.size

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor, str]:
        rng = sample_rng(self.images.seed, sample)
        frames, caption = video_fields(sample, self.num_frames, rng if self.train else None, self.images.max_pixels)
        crop_seed = rng.getrandbits(64)  # drawn after the frame positions: one crop for every frame
        out = torch.zeros(self.num_frames, 3, self.size, self.size)
        for i, frame in enumerate(frames):
            out[i] = self.images.transform(frame, random.Random(crop_seed))
        mask = torch.arange(self.num_frames) < len(frames)
        return out, mask, caption


def video_decoder(cfg: TrainConfig, num_frames: int, train: bool = True) -> VideoDecoder:
    """The :class:`VideoDecoder` of ``num_frames`` frames for training (``train``) or evaluation clips."""
    return VideoDecoder(image_decoder(cfg, train), num_frames, train)


def lock_tower(tower: nn.Module, blocks, unlocked_layers: int, after: list[nn.Module] = ()) -> None:
    """Freeze ``tower`` except its last ``unlocked_layers`` ``blocks`` and the ``after`` modules.

    ``after``: what follows the blocks in the forward (final norm, projection); it stays trainable
    when ``unlocked_layers > 0`` and is frozen with the rest when 0 (everything locked).
    """
    blocks = list(blocks)
    if not 0 <= unlocked_layers <= len(blocks):
        raise ValueError(f"unlocked_layers must be in [0, {len(blocks)}] (the tower's blocks), got {unlocked_layers}")
    tower.requires_grad_(False)
    for module in after:
        module.requires_grad_(unlocked_layers > 0)
    for block in blocks[len(blocks) - unlocked_layers:]:
        block.requires_grad_(True)


def checkpoint_blocks(blocks) -> None:
    """Activation checkpointing of each block (non-reentrant ``torch.utils.checkpoint``), in place.

    The blocks' forward is wrapped on the instance, so parameter names (and exported files) are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():  # eval: nothing to recompute
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def needs_language_model(cfg: TrainConfig) -> list[str]:
    """The ConfigError line of a task that needs ``model.lm`` when it is not set."""
    if cfg.model.lm is None:
        return [f"model.lm: task {cfg.task!r} needs a language model (model.lm.path or model.lm.config)"]
    return []


def in_step(batches, info: DistInfo, zero_stage: int, shards: list[str], encoder):
    """``(batch, metas, real)`` of this rank's ``batches``, with every rank running as many forwards.

    Under ZeRO-3 each forward gathers parameters with collectives (its hooks re-partition them even
    inside ``GatheredParameters``), and the ranks' shares of the held-out set can differ by a batch:
    a rank that has run out repeats a spare batch (``real`` False, its results dropped) until all are done.
    """
    if zero_stage != 3 or info.world_size == 1:
        for batch, metas in batches:
            yield batch, metas, True
        return
    spare = None
    batches = iter(batches)
    while True:
        item = next(batches, None)
        (busy,) = all_reduce_sum([float(item is not None)], info.device)
        if busy == 0:
            return
        if item is not None:
            spare = item
            yield (*item, True)
        else:
            if spare is None:  # this rank had no sample at all: borrow the first one of the set
                spare = next(eval_batches(shards, encoder, 1, 0, 1, 1))
            yield (*spare, False)


def _token_hits(module, images_key: str, batch, device, dtype, blind: bool) -> tuple[int, int]:
    images = batch[images_key].to(device, dtype)
    if blind:
        images = torch.zeros_like(images)
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    if "decoder_attention_mask" in batch:  # encoder-decoder: the decoder's logits line up with its labels
        logits = module(images, ids, attention_mask=mask, labels=labels,
                        decoder_attention_mask=batch["decoder_attention_mask"].to(device)).logits
        pred, target = logits.argmax(dim=-1), labels
    else:  # decoder-only: position t predicts token t + 1
        logits = module(images, ids, attention_mask=mask).logits
        pred, target = logits[:, :-1].argmax(dim=-1), labels[:, 1:]
    valid = target != IGNORE_INDEX
    return int(((pred == target) & valid).sum()), int(valid.sum())


def caption_accuracy(module: nn.Module, ctx: EvalContext, images_key: str) -> dict:
    """Next-token accuracy on the held-out captions, with the images and with them blanked (zeros).

    ``module(images, input_ids, attention_mask=...)`` must return an object with ``.logits``
    ``[B, T, V]`` (batches with a ``decoder_attention_mask``: an encoder-decoder, called with
    ``labels`` and that mask, its decoder logits scored against ``labels`` unshifted);
    ``images_key`` names the batch entry holding the images. Returns
    ``{"caption_token_acc", "blind_token_acc", "eval_tokens"}`` over all ranks.
    """
    info = ctx.info
    hits = [0, 0, 0]  # with images, blind, tokens
    batches = eval_batches(ctx.shards, ctx.encoder, ctx.eval.batch_size, info.rank, info.world_size,
                           ctx.eval.max_batches)
    for batch, _, real in in_step(batches, info, ctx.zero_stage, ctx.shards, ctx.encoder):
        seen, n = _token_hits(module, images_key, batch, info.device, ctx.dtype, blind=False)
        blind, _ = _token_hits(module, images_key, batch, info.device, ctx.dtype, blind=True)
        if not real:
            continue
        hits = [hits[0] + seen, hits[1] + blind, hits[2] + n]
    seen, blind, n = all_reduce_sum(hits, info.device)
    return {"caption_token_acc": seen / max(n, 1), "blind_token_acc": blind / max(n, 1), "eval_tokens": int(n)}


def move(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
