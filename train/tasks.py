"""The three tasks: how each builds its model, computes its loss on a batch, and evaluates.

- ``clip``: :class:`vlmcore.CLIP`; loss = the fused contrastive loss over the data-parallel group
  (``local_loss=True``: each rank's rows against all gathered columns); eval = zero-shot top-1 on
  the held-out pairs with a classifier built from label text.
- ``flamingo``: :class:`vlmcore.Flamingo` over a frozen HF causal LM and a frozen
  :class:`vlmcore.VisionTransformer`; loss = the LM loss; eval = caption token accuracy on the
  held-out pairs, with the images and with the images blanked (``blind``).
- ``frozen``: :class:`vlmcore.FrozenPrefix`; loss and eval as for flamingo.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from torch import nn

import vlmcore

from .config import TrainConfig
from .data import IGNORE_INDEX, Encoder, eval_batches, expand_shards
from .distributed import DistInfo, all_reduce_sum
from .tokenizer import Tokenizer


def build_language_model(cfg: TrainConfig, tok: Tokenizer, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The frozen causal LM: loaded from a local directory or built from a config (random weights).

    ``dtype``: the training precision's parameter dtype. A directory is loaded in it, not in the
    dtype of its files (transformers 5 defaults to the latter: a bf16 checkpoint would otherwise make
    the model, and the bridge built at the LM's dtype, bf16 in an fp32 run, with no fp32 master weights).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    lm_cfg = cfg.model.lm
    if lm_cfg.path:
        lm = AutoModelForCausalLM.from_pretrained(lm_cfg.path, local_files_only=True, dtype=dtype)
    else:
        options = dict(lm_cfg.config)
        model_type = options.pop("model_type")
        options.setdefault("vocab_size", tok.vocab_size)
        options.setdefault("pad_token_id", tok.pad_token_id)
        options.setdefault("eos_token_id", tok.eos_token_id)
        options.setdefault("bos_token_id", tok.eos_token_id)
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **options))
    if lm.get_input_embeddings().weight.shape[0] < tok.vocab_size:
        lm.resize_token_embeddings(tok.vocab_size)
    return lm


def build_vision(cfg: TrainConfig) -> vlmcore.VisionTransformer:
    v = cfg.model.vision
    vit = vlmcore.VisionTransformer(v.image_size, v.patch_size, v.width, v.depth, v.heads, mlp_ratio=v.mlp_ratio)
    if v.init:
        from safetensors.torch import load_file

        if not os.path.isfile(v.init):
            raise ValueError(f"model.vision.init: {v.init!r} does not exist")
        vit.load_state_dict(load_file(v.init))
    if v.freeze:
        vit.requires_grad_(False)
    return vit


def build_model(cfg: TrainConfig, tok: Tokenizer, dtype: torch.dtype = torch.float32) -> nn.Module:
    m = cfg.model
    if cfg.task == "clip":
        return vlmcore.CLIP(
            m.embed_dim, vision_encoder=build_vision(cfg), vocab_size=tok.vocab_size,
            context_length=cfg.tokenizer.context_length, text_width=m.text.width, text_depth=m.text.depth,
            text_heads=m.text.heads, pad_token_id=tok.pad_token_id, eot_token_id=tok.eos_token_id,
            init_temperature=m.init_temperature, max_logit_scale=m.max_logit_scale)
    vision = build_vision(cfg)
    lm = build_language_model(cfg, tok, dtype)
    if cfg.task == "flamingo":
        f = m.flamingo
        new_tokens = [tok.media_token_id, tok.eoc_token_id] if f.train_new_token_embeddings else False
        return vlmcore.Flamingo(
            vision, lm, media_token_id=tok.media_token_id, vis_dim=vision.width,
            cross_attn_every_n_layers=f.cross_attn_every_n_layers, num_latents=f.num_latents,
            resampler_depth=f.resampler_depth, dim_head=f.dim_head, heads=f.heads,
            only_attend_immediate_media=f.only_attend_immediate_media, ff_mult=f.ff_mult,
            train_new_token_embeddings=new_tokens, gradient_checkpointing=m.gradient_checkpointing)
    model = vlmcore.FrozenPrefix(vision, lm, image_token_id=tok.media_token_id, vis_dim=vision.pooled_width,
                                 num_prefix_tokens=m.frozen.num_prefix_tokens)
    if m.gradient_checkpointing and hasattr(lm, "gradient_checkpointing_enable"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def encoder_for(cfg: TrainConfig, tok: Tokenizer, kind: str, max_images: int = 1) -> Encoder:
    return Encoder(cfg.task, kind, tok, cfg.model.vision.image_size, max_images=max_images,
                   num_prefix_tokens=cfg.model.frozen.num_prefix_tokens)


def compute_loss(model, batch: dict, task: str, device: torch.device, group=None) -> torch.Tensor:
    """The task's training loss (fp32 scalar) of one batch; ``model`` is the DeepSpeed engine or the module."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if task == "clip":
        out = model(batch["images"], batch["tokens"], group=group, local_loss=group is not None)
        return out["loss"].float()
    if task == "flamingo":
        out = model(batch["vision_x"], batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
    else:
        out = model(batch["images"], batch["input_ids"], attention_mask=batch["attention_mask"],
                    labels=batch["labels"])
    return out.loss.float()


def gathered(module: nn.Module, zero_stage: int):
    """All parameters materialized on every rank under ZeRO-3 (for evaluation); a no-op otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def _model_dtype(module: nn.Module) -> torch.dtype:
    return next(p.dtype for p in module.parameters() if p.dtype.is_floating_point)


@torch.no_grad()
def evaluate(module: nn.Module, cfg: TrainConfig, tok: Tokenizer, info: DistInfo, zero_stage: int) -> dict:
    """Held-out metrics of the task (every rank takes part; the results are global)."""
    ev = cfg.data.eval
    shards = expand_shards(ev.shards)
    encoder = encoder_for(cfg, tok, "pairs")
    dtype = _model_dtype(module)
    was_training = module.training
    module.eval()
    try:
        with gathered(module, zero_stage):
            if cfg.task == "clip":
                results = _eval_clip(module, cfg, tok, info, shards, encoder, dtype, zero_stage)
            else:
                results = _eval_captions(module, cfg, info, shards, encoder, dtype, zero_stage)
    finally:
        module.train(was_training)
    return results


def _in_step(batches, info: DistInfo, zero_stage: int, shards: list[str], encoder: Encoder):
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


def _eval_clip(model, cfg, tok, info, shards, encoder, dtype, zero_stage) -> dict:
    ev = cfg.data.eval
    classes_path = ev.classes or os.path.join(os.path.dirname(shards[0]), "classes.json")
    with open(classes_path, encoding="utf-8") as f:
        classes = json.load(f)
    classifier = vlmcore.zero_shot_classifier(model, tok, classes["classnames"], classes["templates"])
    correct = total = 0
    batches = eval_batches(shards, encoder, ev.batch_size, info.rank, info.world_size, ev.max_batches)
    for batch, metas, real in _in_step(batches, info, zero_stage, shards, encoder):
        _, preds = vlmcore.zero_shot_predict(model, batch["images"].to(info.device, dtype), classifier)
        if not real:
            continue
        labels = torch.tensor([m["label"] for m in metas], device=preds.device)
        correct += int((preds == labels).sum())
        total += len(metas)
    correct, total = all_reduce_sum([correct, total], info.device)
    return {"zero_shot_top1": correct / max(total, 1), "eval_samples": int(total)}


def _token_hits(module, task, batch, device, dtype, blind: bool) -> tuple[int, int]:
    images_key = "vision_x" if task == "flamingo" else "images"
    images = batch[images_key].to(device, dtype)
    if blind:
        images = torch.zeros_like(images)
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    logits = module(images, ids, attention_mask=mask).logits
    pred, target = logits[:, :-1].argmax(dim=-1), labels[:, 1:]
    valid = target != IGNORE_INDEX
    return int(((pred == target) & valid).sum()), int(valid.sum())


def _eval_captions(module, cfg, info, shards, encoder, dtype, zero_stage) -> dict:
    ev = cfg.data.eval
    hits = [0, 0, 0]  # with images, blind, tokens
    batches = eval_batches(shards, encoder, ev.batch_size, info.rank, info.world_size, ev.max_batches)
    for batch, _, real in _in_step(batches, info, zero_stage, shards, encoder):
        seen, n = _token_hits(module, cfg.task, batch, info.device, dtype, blind=False)
        blind, _ = _token_hits(module, cfg.task, batch, info.device, dtype, blind=True)
        if not real:
            continue
        hits = [hits[0] + seen, hits[1] + blind, hits[2] + n]
    seen, blind, n = all_reduce_sum(hits, info.device)
    return {"caption_token_acc": seen / max(n, 1), "blind_token_acc": blind / max(n, 1), "eval_tokens": int(n)}


def export_names(module: nn.Module, task: str) -> dict[str, tuple[list[str], str]]:
    """Files written at the end of a run -> (parameter names, prefix stripped from the keys): the
    trainable weights, and for CLIP the vision tower (``vision.safetensors``, for model.vision.init)."""
    names = {"trainable.safetensors": ([n for n, p in module.named_parameters() if p.requires_grad], "")}
    if task == "clip":
        names["vision.safetensors"] = ([n for n, _ in module.named_parameters() if n.startswith("visual.")],
                                       "visual.")
    return names
