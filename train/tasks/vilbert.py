"""ViLBERT pre-training (:class:`vlmcore.ViLBERT`) on region-feature pairs.

Data: ``kind: pairs`` shards whose samples are ``KEY.npz`` (detector region features, see
:mod:`vlmcore.train.data.regions`) + ``KEY.txt``; ``vlmcore-make-shapes --regions`` writes such shards.
Text: ``[CLS] caption [SEP]`` padded to ``tokenizer.context_length``.

Loss (every step, on the device, with the global torch RNG so that resume is exact): half of the
captions swapped for another sample's (alignment labels), BERT masking of 15% of the text tokens
(80/10/10), masking of 15% of the regions (90% zeroed, overlapping regions left out of region 0);
``mlm + masked-region KL + alignment`` (:func:`vlmcore.vilbert.vilbert_pretraining_loss`).

Eval (held-out pairs): alignment accuracy (each sample with its own caption and with the next
sample's), and image->text / text->image R@1 by alignment score among the candidates of each eval
batch (a hit when the top caption's text equals the true caption, so duplicate captions count).

Config section ``model.vilbert``: the model sizes (:class:`vlmcore.ViLBERTConfig` fields that a
tiny run changes) and the corruption rates. The detector's class count ``v_target_size`` (the
width of ``class_probs``) is read from the first training sample unless the section sets it.

Weights: ``model.vilbert.init`` starts from a vilbert-multi-task state dict; ``vlmcore-export --to
vilbert_multitask`` writes its ``pytorch_model.bin`` + ``config.json`` (:mod:`vlmcore.vilbert_convert`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Annotated

import torch
from safetensors.torch import load_file
from torch import nn
from vlmcore.train.config import Bounds
from vlmcore.train.data.pipeline import BadSample, eval_batches, expand_shards, read_tar
from vlmcore.train.data.regions import class_count, decode_regions, pad_regions
from vlmcore.train.data.tokenizer import EOC, EOS, Tokenizer
from vlmcore.train.runtime.distributed import all_reduce_sum
from vlmcore.train.tasks.base import EvalContext, Task
from vlmcore.train.tasks.common import in_step, move

import vlmcore
from vlmcore.vilbert import (
    alignment_scores,
    mask_regions,
    mask_tokens,
    mismatch_captions,
    vilbert_pretraining_loss,
)
from vlmcore.vilbert_convert import (
    load_vilbert_multitask_state_dict,
    vilbert_multitask_config,
    vilbert_multitask_state_dict,
)

LOG_HALF = math.log(0.5)

#: A share of tokens / regions / captions corrupted: some, never all, in (0, 1).
Share = Annotated[float, Bounds(gt=0, lt=1)]


@dataclass
class RegionBertConfig:
    """``model.vilbert`` / ``model.vlbert``: sizes (vilbert-multi-task's names) and corruption rates."""

    hidden_size: int = 64  # text stream width (ViLBERT: 768)
    num_hidden_layers: int = 3  # text layers (ViLBERT: 12)
    num_attention_heads: int = 4  # text heads
    intermediate_size: int = 128  # text feed-forward width
    v_feature_size: int = 2048  # region feature width F (BUTD: 2048)
    v_hidden_size: int = 64  # visual stream width (ViLBERT: 1024)
    v_num_hidden_layers: int = 2  # visual layers (ViLBERT: 6; VL-BERT: unused)
    v_num_attention_heads: int = 4  # visual heads
    v_intermediate_size: int = 128  # visual feed-forward width
    bi_hidden_size: int = 64  # co-attention width (ViLBERT: 1024)
    bi_num_attention_heads: int = 4  # co-attention heads
    v_biattention_id: list = field(default_factory=lambda: [0, 1])  # visual layers before each co-attention block
    t_biattention_id: list = field(default_factory=lambda: [1, 2])  # text layers before each co-attention block
    v_target_size: int | None = None  # detector classes C of class_probs (null: read from the first training sample)
    max_regions: int = 16  # regions per sample, global region 0 included (more are cut)
    hidden_dropout_prob: float = 0.1  # hidden-state dropout
    pooler_activation: str = "relu"  # relu (vilbert-multi-task) or tanh (BERT)
    mlm_probability: Share = 0.15  # share of text tokens masked
    region_mask_probability: Share = 0.15  # share of regions masked
    mismatch_probability: Share = 0.5  # share of captions swapped (ViLBERT alignment)

    def check(self, where: str) -> list[str]:
        """The sizes fit together (what :class:`vlmcore.ViLBERTConfig` refuses); the rates' ranges are
        declared on their fields."""
        # Left to the data (null), the class count is unknown here: any count checks the other sizes.
        sized = self if self.v_target_size is not None else dataclasses.replace(self, v_target_size=1)
        try:
            sized.model_config(vocab_size=8, max_positions=8)
        except ValueError as error:
            return [f"{where}: {error}"]
        return []

    def model_config(self, vocab_size: int, max_positions: int, pad_token_id: int = 0) -> vlmcore.ViLBERTConfig:
        """The :class:`vlmcore.ViLBERTConfig` of this section (raises ValueError on inconsistent sizes or
        an unset ``v_target_size``: :attr:`RegionTask.region_config` sets it from the data)."""
        sizes = {k: getattr(self, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "v_feature_size",
            "v_hidden_size", "v_num_hidden_layers", "v_num_attention_heads", "v_intermediate_size",
            "bi_hidden_size", "bi_num_attention_heads", "v_target_size", "max_regions", "hidden_dropout_prob",
            "pooler_activation")}
        return vlmcore.ViLBERTConfig(vocab_size=vocab_size, max_position_embeddings=max_positions,
                                     v_biattention_id=list(self.v_biattention_id),
                                     t_biattention_id=list(self.t_biattention_id), pad_token_id=pad_token_id,
                                     **sizes)


def bert_special_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """``(cls, sep, mask)`` token ids.

    A BERT vocabulary (an HF tokenizer directory with ``[CLS]``/``[SEP]``/``[MASK]``) supplies its own.
    The trainer's word-level tokenizers carry only ``<pad> <eos> <unk> <image> <|endofchunk|>``:
    there ``<eos>`` plays [CLS] and [SEP] and ``<|endofchunk|>`` plays [MASK] — roles no other part
    of these tasks gives them; their embeddings are trained like any token's.
    """
    hf = getattr(tok, "_hf", None)
    if hf is not None and None not in (hf.cls_token_id, hf.sep_token_id, hf.mask_token_id):
        return hf.cls_token_id, hf.sep_token_id, hf.mask_token_id
    eos = tok.eos_token_id
    mask = tok.encode(EOC)
    if len(mask) != 1 or tok.encode(EOS) != [eos]:
        raise ValueError(f"tokenizer {tok.path!r} has no [CLS]/[SEP]/[MASK] tokens and no single-token "
                         f"{EOS!r} / {EOC!r} to stand in for them")
    return eos, eos, mask[0]


class UnknownRegionClasses(ValueError):
    """``v_target_size`` is not set and the training data does not give it."""


def classes_in_first_sample(shards) -> int:
    """C of the first training sample whose ``KEY.npz`` has a readable ``class_probs [R, C]`` (in the
    first shard of ``shards``); raises :class:`UnknownRegionClasses` when there is none."""
    try:
        shard = expand_shards(shards)[0]
    except ValueError as error:
        raise UnknownRegionClasses(f"the training shards cannot give the class count: {error}") from None
    with contextlib.closing(read_tar(shard)) as samples:  # a pipe: shard's command ends with the reading
        for sample in samples:
            if "npz" in sample:
                with contextlib.suppress(BadSample):
                    return class_count(sample["npz"], sample["__key__"])
    raise UnknownRegionClasses(f"no sample of the first training shard {shard} has a readable class_probs to "
                               "read the class count from: set it")


class RegionPairEncoder:
    """Region sample -> ``input_ids``/``attention_mask`` ``[T]`` ([CLS] caption [SEP], padded),
    ``region_features [R, F]``, ``region_boxes [R, 5]``, ``class_probs [R, C]``, ``region_mask [R]``
    (R = ``max_regions``, region 0 = the global image feature)."""

    def __init__(self, tokenizer: Tokenizer, config: RegionBertConfig):
        self.tok, self.config = tokenizer, config
        self.cls_id, self.sep_id, _ = bert_special_ids(tokenizer)

    def __call__(self, sample: dict) -> dict:
        key = sample.get("__key__", "?")
        if "__error__" in sample:
            raise BadSample(sample["__error__"])
        if "npz" not in sample:
            raise BadSample(f"sample {key} has no region features (npz)")
        if "txt" not in sample:
            raise BadSample(f"sample {key} has no caption (txt)")
        try:
            caption = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise BadSample(f"sample {key}: txt is not UTF-8: {error}") from None
        if not caption:
            raise BadSample(f"sample {key} has an empty caption")
        c = self.config
        regions = decode_regions(sample["npz"], max_regions=c.max_regions, feature_dim=c.v_feature_size,
                                 num_classes=c.v_target_size, key=key)
        length = self.tok.context_length
        ids = [self.cls_id] + self.tok.encode(caption)[: length - 2] + [self.sep_id]
        ids, mask = self.tok.pad(ids)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
                **pad_regions(regions, c.max_regions)}


class RegionTask(Task):
    """What ViLBERT and VL-BERT share: the region-pair data and the BERT text layout."""

    data_kinds = ("pairs",)

    def __init__(self, cfg, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        self.cls_id, self.sep_id, self.mask_id = bert_special_ids(tokenizer)

    @functools.cached_property
    def region_config(self) -> RegionBertConfig:
        """The task's section with ``v_target_size`` set: as configured, else the width of
        ``class_probs`` in the first training sample (read once; the model's region head and the
        encoder's check of every sample use it)."""
        if self.config.v_target_size is not None:
            return self.config
        return dataclasses.replace(self.config, v_target_size=classes_in_first_sample(self.cfg.data.train[0].shards))

    def check_eval_sample(self, sample: dict) -> list[str]:
        """The default check with the resolved class count (an eval set whose ``class_probs`` width
        differs from the training data's is reported), or why the count cannot be read."""
        try:
            return super().check_eval_sample(sample)
        except UnknownRegionClasses as error:
            return [f"model.{self.name}.v_target_size: {error}"]

    def encoder(self, kind: str, max_images: int) -> RegionPairEncoder:
        return RegionPairEncoder(self.tok, self.region_config)

    def model_config(self) -> vlmcore.ViLBERTConfig:
        return self.region_config.model_config(self.tok.vocab_size, self.cfg.tokenizer.context_length + 1,
                                               self.tok.pad_token_id)

    def special_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """bool ``[B, T]``: positions BERT masking never picks (padding, [CLS], [SEP])."""
        return (ids == self.tok.pad_token_id) | (ids == self.cls_id) | (ids == self.sep_id)

    def batch_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())


@dataclass
class VilbertConfig(RegionBertConfig):
    """``model.vilbert``: sizes (vilbert-multi-task's names), corruption rates and the weights to start from.

    ``init``: a ``BertForMultiModalPreTraining`` / ``VILBertForVLTasks`` state dict (keys may carry
    ``module.``); the sizes and the co-attention plan (``v_biattention_id`` / ``t_biattention_id``, which
    the weights do not show) must be its config's, the vocabulary the tokenizer's."""

    init: str = ""  # a vilbert-multi-task .bin state dict to start from ("" = random init)


class VilbertTask(RegionTask):
    name = "vilbert"
    Config = VilbertConfig

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        """The ViLBERT of the section, loaded from ``init`` when set (every bad key named in one
        :class:`~vlmcore.checkpoint_keys.CheckpointKeysError`, see :mod:`vlmcore.vilbert_convert`)."""
        model = vlmcore.ViLBERT(self.model_config())
        init = self.config.init
        if init:
            if not os.path.isfile(init):
                raise ValueError(f"model.vilbert.init: {init!r} does not exist")
            state = torch.load(init, map_location="cpu", weights_only=True)
            load_vilbert_multitask_state_dict(model, state, f"model.vilbert.init {init}")
        return model

    def load_exported(self, run_dir: str) -> nn.Module | None:
        """With ``init`` set: the run's ViLBERT from its exported file alone (every parameter trains, so
        it holds the whole model) and ``init`` is not read again: it may be gone since, and a real one
        is ~1 GB. Without ``init``: None, the loader's default."""
        if not self.config.init:
            return None
        model = vlmcore.ViLBERT(self.model_config())
        (filename, _), = self.export(model).items()
        path = os.path.join(run_dir, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the run did not finish its export")
        model.load_state_dict(load_file(path), strict=True)
        return model

    def peer_exporters(self) -> dict:
        return {"vilbert_multitask": self._write_vilbert_multitask}

    def _write_vilbert_multitask(self, module: nn.Module, out_dir: str) -> None:
        """``pytorch_model.bin`` (``BertForMultiModalPreTraining``'s state dict; ``VILBertForVLTasks`` loads it
        with fresh task heads) and ``config.json`` (``bert_base_6layer_6conect.json``'s keys) for
        vilbert-multi-task; ValueError naming the ``model.vilbert`` key it cannot build."""
        config = vilbert_multitask_config(module.config, where="model.vilbert")
        torch.save(vilbert_multitask_state_dict(module), os.path.join(out_dir, "pytorch_model.bin"))
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        b = move(batch, device)
        c = self.config
        ids, mask, aligned = mismatch_captions(b["input_ids"], b["attention_mask"], probability=c.mismatch_probability)
        ids, mlm_labels = mask_tokens(ids, mask_token_id=self.mask_id, vocab_size=self.tok.vocab_size,
                                      special_tokens=self.special_tokens(ids), probability=c.mlm_probability)
        features, region_labels = mask_regions(b["region_features"], b["region_boxes"], b["region_mask"],
                                               probability=c.region_mask_probability)
        out = model(ids, features, b["region_boxes"], mask, b["region_mask"])
        losses = vilbert_pretraining_loss(out, mlm_labels, b["class_probs"], region_labels, aligned)
        accuracy = (out["alignment_logits"].argmax(-1) == aligned).float().mean()
        metrics = {k: v.detach() for k, v in losses.items() if k != "loss"}
        metrics["alignment_acc"] = accuracy.detach()
        return losses["loss"].float(), metrics

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        info, ev = ctx.info, ctx.eval
        counts = [0.0] * 5  # alignment hits, alignment pairs, i2t R@1 hits, t2i R@1 hits, samples
        batches = eval_batches(ctx.shards, ctx.encoder, ev.batch_size, info.rank, info.world_size, ev.max_batches)
        for batch, _, real in in_step(batches, info, ctx.zero_stage, ctx.shards, ctx.encoder):
            b = move(batch, info.device)
            feats = b["region_features"].to(ctx.dtype)
            n = feats.shape[0]
            # Every image with every caption of the batch: [n images, n captions] alignment scores.
            img = torch.arange(n, device=info.device).repeat_interleave(n)
            txt = torch.arange(n, device=info.device).repeat(n)
            scores = alignment_scores(module, b["input_ids"][txt], feats[img], b["region_boxes"][img].to(ctx.dtype),
                                      b["attention_mask"][txt], b["region_mask"][img]).view(n, n)
            same_text = (b["input_ids"][:, None, :] == b["input_ids"][None, :, :]).all(-1)  # [n, n]
            rows = torch.arange(n, device=info.device)
            nxt = torch.roll(rows, -1)
            # A pair is called aligned when P(match) > 0.5; the "next sample" pair counts as a
            # mismatch only where its caption text differs.
            matched_ok = scores.diagonal() > LOG_HALF
            is_mismatch = ~same_text[rows, nxt]
            mismatched_ok = (scores[rows, nxt] <= LOG_HALF) & is_mismatch
            i2t = same_text[rows, scores.argmax(1)]
            t2i = same_text[scores.argmax(0), rows]
            if not real:
                continue
            counts[0] += float(matched_ok.sum() + mismatched_ok.sum())
            counts[1] += float(n + is_mismatch.sum())
            counts[2] += float(i2t.sum())
            counts[3] += float(t2i.sum())
            counts[4] += n
        hits, pairs, i2t_hits, t2i_hits, samples = all_reduce_sum(counts, info.device)
        return {"alignment_acc": hits / max(pairs, 1), "i2t_r1": i2t_hits / max(samples, 1),
                "t2i_r1": t2i_hits / max(samples, 1), "eval_samples": int(samples)}
