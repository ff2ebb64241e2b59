"""CLIP: :class:`vlmcore.CLIP` trained with the fused contrastive loss; retrieval and zero-shot eval.

Loss: the fused contrastive loss over the data-parallel group (``local_loss=True``: each rank's
rows against all gathered columns); logged with the logit scale and the in-batch i2t / t2i
accuracies. On a mixture (several ``data.train`` datasets) each dataset's batch is its own
contrastive problem (negatives from the same dataset), and the loop sums ``weight_i * loss_i``.

Eval on the held-out pairs: image<->text retrieval Recall@1/5/10 over the whole eval set
(``model.clip.retrieval_eval``; features gathered from every rank), and zero-shot top-1 when the
data allows it: each sample's ``KEY.json`` holds an integer ``label`` and a class set is known:
``model.clip.zero_shot: imagenet`` (the bundled ImageNet-1k names with OpenAI's 80 templates,
``imagenet_simple`` with the 7 short ones; :mod:`vlmcore.eval.zero_shot`) or a classes file
(``data.eval.classes``, default ``classes.json`` next to the first eval shard, ``{"classnames":
[...], "templates": ["a photo of a {}.", ...]}``). Eval shards without labels (plain img2dataset
output) get the retrieval metrics only. Export: the trainable weights and ``vision.safetensors``
(the vision tower; for the built-in ViT usable as ``model.vision.init``; for adapter towers the
adapter's keys, e.g. ``visual.conv1.weight`` of an open_clip tower). Config section ``model.clip``.

Locking (LiT, OpenCLIP's ``--lock-image`` / ``--lock-text``): ``model.vision.freeze`` with
``model.vision.unlocked_layers``, and ``model.clip.text.lock`` with ``model.clip.text.unlocked_layers``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
import torch.distributed as dist
from torch import nn
from vlmcore.kernels import contrastive_loss
from vlmcore.train.config import PositiveFloat, PositiveInt
from vlmcore.train.data.pipeline import eval_batches, pair_fields
from vlmcore.train.data.shards import first_local_shard
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.runtime.distributed import all_reduce_sum
from vlmcore.train.tasks.base import EvalContext, Task
from vlmcore.train.tasks.common import (
    ImageDecoder,
    build_vision,
    checkpoint_blocks,
    image_decoder,
    in_step,
    lock_tower,
    move,
)
from vlmcore.train.tasks.towers import freeze_vision

import vlmcore
from vlmcore.eval.zero_shot import zero_shot_classes

#: ``model.clip.zero_shot`` / ``model.siglip.zero_shot``: a class set bundled in :mod:`vlmcore.eval.zero_shot`.
ZeroShotSet = Literal["imagenet", "imagenet_simple"]


@dataclass
class TextConfig:
    """CLIP's text tower (its context length is ``tokenizer.context_length``)."""

    width: PositiveInt = 64  # text transformer width
    depth: PositiveInt = 2  # text transformer blocks
    heads: PositiveInt = 4  # attention heads
    lock: bool = False  # freeze the text tower and its projection (OpenCLIP --lock-text)
    unlocked_layers: int = 0  # with lock: the last N blocks, ln_final and the projection stay trainable

    def check(self, where: str) -> list[str]:
        out = []
        if not 0 <= self.unlocked_layers <= max(self.depth, 0):
            out.append(f"{where}.unlocked_layers: must be in [0, depth={self.depth}], got {self.unlocked_layers}")
        if self.unlocked_layers and not self.lock:
            out.append(f"{where}.unlocked_layers: only meaningful with {where}.lock: true")
        if self.heads >= 1 and self.width % self.heads:
            out.append(f"{where}.width: {self.width} is not divisible by heads {self.heads}")
        return out


@dataclass
class InitConfig:
    """``model.clip.init`` / ``model.siglip.init``: start from a peer's whole CLIP / SigLIP (local files only).

    The architecture (widths, depths, embedding, activations, pooling) comes from the checkpoint's own
    config, so the architecture keys of the section and of ``model.vision`` stay unset; the tokenizer
    must be the checkpoint's (same vocabulary size and end token).
    """

    format: Literal["open_clip", "hf"] = "open_clip"  # open_clip's ViT CLIP, or a transformers CLIPModel / SiglipModel
    path: str = ""  # open_clip: checkpoint file (+ name) or dir with open_clip_config.json; hf: the model dir
    name: str = ""  # open_clip with a checkpoint file: its model name (e.g. ViT-B-32-quickgelu)
    allow_missing: list = field(default_factory=list)  # glob patterns of checkpoint keys that may be absent
    allow_unexpected: list = field(default_factory=list)  # glob patterns of checkpoint keys to ignore

    def check(self, where: str) -> list[str]:
        out = []
        is_dir = os.path.isdir(self.path)
        if not self.path or not (is_dir or os.path.isfile(self.path)):
            out.append(f"{where}.path: {self.path!r} is not a local file or directory")
        elif self.format == "hf" and not os.path.isfile(os.path.join(self.path, "config.json")):
            out.append(f"{where}.path: {self.path!r} has no config.json (a transformers model directory)")
        elif self.format == "open_clip" and not is_dir and not self.name:
            out.append(f"{where}.name: required with a checkpoint file (the open_clip model name, e.g. ViT-B-32)")
        if self.name and (self.format == "hf" or is_dir):
            out.append(f"{where}.name: only for format open_clip with a checkpoint file (the directory's config "
                       "names the architecture)")
        return out


#: The keys whose value an ``init`` checkpoint brings: a non-default value conflicts with it.
INIT_OWNED_VISION = ("type", "patch_size", "width", "depth", "heads", "mlp_ratio", "act", "init", "name",
                     "checkpoint", "model_kwargs", "path")


def init_conflicts(cfg, name: str, owned: tuple[str, ...]) -> list[str]:
    """ConfigError lines for the keys set next to ``model.<name>.init`` that its checkpoint decides.

    ``owned``: the keys of the task's section the checkpoint decides (``text`` means its widths)."""
    section, init = getattr(cfg.model, name), f"model.{name}.init"
    defaults, vision_defaults = type(section)(), type(cfg.model.vision)()
    clashes = [f"model.vision.{k}" for k in INIT_OWNED_VISION
               if getattr(cfg.model.vision, k) != getattr(vision_defaults, k)]
    for key in owned:
        if key == "text":
            clashes += [f"model.{name}.text.{k}" for k in ("width", "depth", "heads")
                        if getattr(section.text, k) != getattr(defaults.text, k)]
        elif getattr(section, key) != getattr(defaults, key):
            clashes.append(f"model.{name}.{key}")
    return [f"{key}: conflicts with {init} (the checkpoint's config sets the architecture and its initial "
            "values; remove the key)" for key in clashes]


def load_init(task, loss: str) -> nn.Module:
    """The whole model of ``model.<task>.init`` (vlmcore.clip.convert), checked against the config:
    the task's loss, ``model.vision.image_size`` and the tokenizer (vocabulary size, end token, context)."""
    from vlmcore.clip import clip_from_hf, clip_from_open_clip

    init, where = task.config.init, f"model.{task.name}.init"
    allow = dict(allow_missing=init.allow_missing, allow_unexpected=init.allow_unexpected)
    if init.format == "hf":
        model = clip_from_hf(init.path, **allow)
    elif os.path.isdir(init.path):
        model = clip_from_open_clip(init.path, **allow)
    else:
        model = clip_from_open_clip(init.name, pretrained=init.path, **allow)
    text, tok, size = model.text, task.tok, task.cfg.model.vision.image_size
    problems = []
    if model.loss != loss:
        problems.append(f"{where}: the checkpoint is a {model.loss} model (loss), not one for task {task.name!r}")
    if size != model.visual.image_size:
        wanted = model.visual.image_size
        problems.append(f"model.vision.image_size: {size}, but the checkpoint of {where} takes {wanted}-pixel "
                        f"images (set model.vision.image_size: {wanted})")
    if tok.vocab_size != text.vocab_size:
        problems.append(f"tokenizer: vocabulary size {tok.vocab_size} != {text.vocab_size} of {where}'s text tower "
                        "(use the checkpoint's tokenizer)")
    eot = text.vocab_size - 1 if text.eot_token_id is None else text.eot_token_id
    if text.pool == "eot" and tok.eos_token_id != eot:
        problems.append(f"tokenizer: end token {tok.eos_token_id} != {eot}, where {where}'s text tower pools")
    length, limit = task.cfg.tokenizer.context_length, text.context_length
    if length > limit or (text.pool == "last" and length != limit):
        problems.append(f"tokenizer.context_length: {length}, but {where}'s text tower takes "
                        f"{'exactly' if text.pool == 'last' else 'at most'} {limit} tokens")
    if problems:
        raise ValueError("; ".join(problems))
    freeze_vision(model.visual, task.cfg.model.vision)
    return model


@dataclass
class ClipConfig:
    """``model.clip``: the text tower, the joint embedding and the temperature."""

    embed_dim: PositiveInt = 64  # joint embedding width
    text: TextConfig = field(default_factory=TextConfig)  # the text tower
    init_temperature: PositiveFloat = 0.07  # initial softmax temperature (logit scale = 1 / temperature)
    max_logit_scale: PositiveFloat = 100.0  # clamp of the logit scale
    retrieval_eval: bool = True  # image<->text Recall@1/5/10 on data.eval (besides zero-shot when labelled)
    zero_shot: Union[ZeroShotSet, None] = None  # bundled classes for zero-shot (null: data.eval.classes / classes.json)
    init: Union[InitConfig, None] = None  # a whole open_clip / HF CLIP to start from (null: random init)


class ClipEncoder:
    """Pair sample -> ``{"images": [3, H, W], "tokens": [T]}``."""

    def __init__(self, tokenizer: Tokenizer, images: ImageDecoder):
        self.tok, self.images = tokenizer, images

    def __call__(self, sample: dict) -> dict:
        image, caption = pair_fields(sample)
        return {"images": self.images(image, sample), "tokens": self.tok([caption])[0]}


def clip_module(model) -> nn.Module:
    """The :class:`vlmcore.CLIP` of ``model`` (the DeepSpeed engine during training, or the module)."""
    return getattr(model, "module", model)


class ClipTask(Task):
    name = "clip"
    Config = ClipConfig
    data_kinds = ("pairs",)
    media_tokens = False  # CLIP text has no image placeholders: keep the CLIP vocabulary as it is
    caches_features = True  # optim.accum_freq: features() + loss_from_features()

    @classmethod
    def check_config(cls, cfg) -> list[str]:
        if cfg.model.clip.init is None:
            return []
        return init_conflicts(cfg, "clip", ("embed_dim", "text", "init_temperature"))

    def build_model(self, dtype: torch.dtype) -> nn.Module:
        c, tok = self.config, self.tok
        if c.init is not None:
            model = load_init(self, "clip")
            model.criterion.max_scale = float(c.max_logit_scale)
        else:
            model = vlmcore.CLIP(
                c.embed_dim, vision_encoder=build_vision(self.cfg), vocab_size=tok.vocab_size,
                context_length=self.cfg.tokenizer.context_length, text_width=c.text.width, text_depth=c.text.depth,
                text_heads=c.text.heads, pad_token_id=tok.pad_token_id, eot_token_id=tok.eos_token_id,
                init_temperature=c.init_temperature, max_logit_scale=c.max_logit_scale)
        if c.text.lock:  # the final norm and projection follow the last block: frozen unless blocks are unlocked
            lock_tower(model.text, model.text.blocks, c.text.unlocked_layers,
                       after=[model.text.ln_final, model.text_projection])
        if self.cfg.model.gradient_checkpointing:
            checkpoint_blocks(list(model.visual.blocks) if hasattr(model.visual, "blocks") else [])
            checkpoint_blocks(list(model.text.blocks))
        return model

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

    def features(self, model, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """``{"image_features": [B, E], "text_features": [B, E]}`` (normalized) of the batch."""
        batch = move(batch, device)
        # Through the model's forward, not encode_*: the engine's forward hooks its outputs so that
        # DeepSpeed's backward set-up runs. Without a group, the loss it also computes is this batch's
        # alone (B x B, small beside the towers) and is dropped.
        out = model(batch["images"], batch["tokens"])
        return {"image_features": out["image_features"], "text_features": out["text_features"]}

    def loss_from_features(self, model, features: dict[str, torch.Tensor], group=None, *,
                           criterion_grad: bool = True) -> tuple[torch.Tensor, dict]:
        """:meth:`loss` from ``features`` ``{"image_features": [N, E], "text_features": [N, E]}``: the
        criterion :meth:`vlmcore.CLIP.forward` applies, on the same op."""
        criterion = clip_module(model).criterion
        images = features["image_features"]
        scale = criterion.scale().to(images.device)
        out = contrastive_loss(images, features["text_features"].to(images.dtype),
                               scale if criterion_grad else scale.detach(), group=group,
                               local_loss=group is not None, label_smoothing=criterion.label_smoothing,
                               output_dict=True)
        metrics = {"logit_scale": scale.detach().float().reshape(()),
                   **{k: out[k].detach().float().reshape(()) for k in ("i2t_acc", "t2i_acc")}}
        return out["loss"].float(), metrics

    def classes_path(self) -> str:
        """``data.eval.classes``, or ``classes.json`` next to the first local eval shard ("" without one)."""
        ev = self.cfg.data.eval
        if ev.classes:
            return ev.classes
        shard = first_local_shard(ev.shards)
        return os.path.join(os.path.dirname(shard), "classes.json") if shard else ""

    def zero_shot_classes(self) -> dict | None:
        """``{"classnames", "templates"}``: the bundled set ``zero_shot`` names, else the classes file
        (:meth:`classes_path`); None without either."""
        if self.config.zero_shot:
            return zero_shot_classes(self.config.zero_shot)
        path = self.classes_path()
        if not (path and os.path.isfile(path)):
            return None
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def check_eval_sample(self, sample: dict) -> list[str]:
        out = super().check_eval_sample(sample)
        if out:
            return out
        try:
            has_label = "label" in json.loads(sample["json"]) if "json" in sample else False
        except (ValueError, TypeError):
            has_label = False
        explicit = self.cfg.data.eval.classes
        path = self.classes_path()
        if explicit and not has_label:
            out.append(f"data.eval.classes: zero-shot needs an integer 'label' in each eval sample's json; the "
                       f"first sample ({sample['__key__']}) has none (remove data.eval.classes for retrieval "
                       "metrics only)")
        if self.config.zero_shot and not has_label:
            out.append(f"model.{self.name}.zero_shot: zero-shot needs an integer 'label' in each eval sample's json; "
                       f"the first sample ({sample['__key__']}) has none (ImageNet shards: vlmcore-eval prepare "
                       "imagenet)")
        if not has_label and not self.config.retrieval_eval:
            out.append("model.clip.retrieval_eval: false and the eval samples have no 'label' (zero-shot "
                       "impossible): there would be no eval metric")
        if has_label and not self.config.zero_shot and path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    classes = json.load(f)
                if not (isinstance(classes.get("classnames"), list) and classes["classnames"]
                        and isinstance(classes.get("templates"), list) and classes["templates"]):
                    raise ValueError("needs non-empty lists 'classnames' and 'templates'")
            except (ValueError, OSError, AttributeError) as e:
                out.append(f"data.eval.classes: {path!r} is not a valid classes file: {e}")
        return out

    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        info, ev = ctx.info, ctx.eval
        classes = self.zero_shot_classes()
        classifier = None
        if classes is not None:
            classifier = vlmcore.zero_shot_classifier(module, self.tok, classes["classnames"], classes["templates"])
        correct = labelled = total = 0
        image_features, text_features, captions = [], [], []
        batches = eval_batches(ctx.shards, ctx.encoder, ev.batch_size, info.rank, info.world_size, ev.max_batches)
        for batch, metas, real in in_step(batches, info, ctx.zero_stage, ctx.shards, ctx.encoder):
            images = batch["images"].to(info.device, ctx.dtype)
            features = module.encode_image(images)
            texts = module.encode_text(batch["tokens"].to(info.device)) if self.config.retrieval_eval else None
            if not real:
                continue
            total += len(metas)
            if texts is not None:
                image_features.append(features.float().cpu())
                text_features.append(texts.float().cpu())
                captions.append(batch["tokens"].cpu())
            has = [i for i, m in enumerate(metas) if isinstance(m.get("label"), int)]
            if classifier is not None and has:
                preds = (features.float() @ classifier.float()).argmax(dim=-1)
                labels = torch.tensor([metas[i]["label"] for i in has], device=preds.device)
                correct += int((preds[has] == labels).sum())
                labelled += len(has)
        correct, labelled, total = all_reduce_sum([correct, labelled, total], info.device)
        results: dict = {"eval_samples": int(total)}
        if labelled:
            results["zero_shot_top1"] = correct / labelled
            results["zero_shot_samples"] = int(labelled)
        if self.config.retrieval_eval:
            images, texts = _gather_rows(image_features, info), _gather_rows(text_features, info)
            if images is not None:
                results.update(_retrieval_over_distinct_captions(images, texts, _gather_rows(captions, info)))
        return results

    def peer_exporters(self) -> dict[str, Callable[[nn.Module, str], None]]:
        """``{format: function(module, out_dir)}`` writing the model as the peer's own files:
        ``open_clip`` (``open_clip_config.json`` + state dict) and ``hf`` (``save_pretrained``); each raises
        ValueError naming what the peer cannot express (e.g. an adapter tower, SigLIP's head in open_clip)."""
        from vlmcore.clip import export_hf, export_open_clip

        return {"open_clip": export_open_clip, "hf": export_hf}

    def export(self, module: nn.Module) -> dict[str, tuple[list[str], str]]:
        names = super().export(module)
        names["vision.safetensors"] = ([n for n, _ in module.named_parameters() if n.startswith("visual.")],
                                       "visual.")
        return names


def _retrieval_over_distinct_captions(images: torch.Tensor, texts: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Recall@k where identical captions are one candidate (held-out sets such as the shapes eval
    repeat captions; ranked separately, equal scores would tie and every copy but one would rank
    behind the others). Image i's target is its caption text; caption c's targets are all images
    captioned c. Without repeated captions this is the plain image<->text Recall@k."""
    distinct, image_to_caption = torch.unique(tokens, dim=0, return_inverse=True)
    first = torch.full((len(distinct),), len(tokens), dtype=torch.long)
    first.scatter_reduce_(0, image_to_caption, torch.arange(len(tokens)), reduce="amin")
    # retrieval_metrics takes several captions per image; here one caption has several images, so
    # the roles are swapped: its "i2t" is caption -> images (our t2i) and its "t2i" our i2t.
    swapped = vlmcore.retrieval_metrics(texts[first], images, text_to_image=image_to_caption)
    rename = {"i2t": "t2i", "t2i": "i2t"}
    return {(rename[key[:3]] + key[3:] if key[:3] in rename else key): value for key, value in swapped.items()}


def _gather_rows(chunks: list[torch.Tensor], info) -> torch.Tensor | None:
    """The rows of every rank's ``chunks`` concatenated (rank order); None when there is none."""
    local = torch.cat(chunks) if chunks else None
    if info.world_size > 1 and dist.is_initialized():
        everyone: list = [None] * info.world_size
        dist.all_gather_object(everyone, local)
        parts = [t for t in everyone if t is not None]
    else:
        parts = [local] if local is not None else []
    return torch.cat(parts) if parts else None
