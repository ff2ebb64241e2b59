"""Training configuration: a typed schema, YAML loading, ``key=value`` overrides, validation.

A run is described by one YAML file (see ``train/configs/``) plus optional command-line
overrides ``dotted.key=value`` (the value is parsed as YAML: ``max_steps=20``,
``data.train.0.weight=0.2``, ``deepspeed.zero_optimization.stage=3``).

:func:`load_config` validates everything before any work starts: unknown keys, wrong types and
impossible values are all collected and raised together as one :class:`ConfigError`. The schema is
plain dataclasses (no pydantic: the GPU image lacks it). The ``deepspeed`` section is DeepSpeed's
own config (a mapping, or the path of a JSON file); the trainer fills in the batch sizes and the
precision and checks the few keys it depends on.

The schema is the common part below plus the section ``model.<task>`` of the task named by
``task:``: its ``Config`` dataclass, found through the task registry (``train/tasks/``); this
module names no task.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """Raised with every problem of a configuration, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source} ({len(self.problems)} problem(s)):\n{lines}")


# ----------------------------------------------------------------------------------------- schema


@dataclass
class DatasetConfig:
    """One training dataset (WebDataset shards) of the mixture."""

    shards: Union[str, list]  # brace pattern "dir/train-{000..007}.tar" or a list of paths/patterns
    name: str = ""  # for logging; defaults to "kind<index>"
    kind: Literal["pairs", "interleaved"] = "pairs"  # pairs: image + caption; interleaved: MMC4-like documents
    weight: float = 1.0  # loss weight in the mixture (Flamingo: M3W 1.0, ALIGN 0.2, LTIP 0.2, VTP 0.03)
    batch_size: int = 8  # per rank
    max_images: int = 3  # interleaved: images kept per document (the rest are dropped)
    shuffle_buffer: int = 256  # samples in the shuffle buffer (0 = shard order)
    resampled: bool = True  # shards drawn with replacement per rank/worker (webdataset "resampled")
    min_image_similarity: float = 0.0  # interleaved (MMC4): drop images with matched_sim below it (OpenFlamingo: 0.24)

    def check(self, where: str) -> list[str]:
        out = []
        if not 0 <= self.min_image_similarity <= 1:
            out.append(f"{where}.min_image_similarity: must be in [0, 1], got {self.min_image_similarity}")
        if self.min_image_similarity > 0 and self.kind != "interleaved":
            out.append(f"{where}.min_image_similarity: only for kind: interleaved (MMC4 documents)")
        if isinstance(self.shards, list) and (not self.shards or not all(isinstance(s, str) for s in self.shards)):
            out.append(f"{where}.shards: must be a pattern string or a non-empty list of strings")
        if isinstance(self.shards, str) and not self.shards:
            out.append(f"{where}.shards: must not be empty")
        if not self.weight > 0:
            out.append(f"{where}.weight: must be > 0, got {self.weight}")
        if self.batch_size < 1:
            out.append(f"{where}.batch_size: must be >= 1, got {self.batch_size}")
        if self.max_images < 1:
            out.append(f"{where}.max_images: must be >= 1, got {self.max_images}")
        if self.shuffle_buffer < 0:
            out.append(f"{where}.shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        return out


@dataclass
class EvalConfig:
    """Held-out image-text pairs used for evaluation every ``eval_every`` steps and at the end."""

    shards: Union[str, list]  # brace pattern / glob / list, like data.train[].shards
    batch_size: int = 64  # per rank
    max_batches: int = 0  # 0 = the whole split
    classes: str = ""  # JSON file with {"classnames": [...], "templates": [...]} (CLIP zero-shot)

    def check(self, where: str) -> list[str]:
        out = []
        if self.batch_size < 1:
            out.append(f"{where}.batch_size: must be >= 1, got {self.batch_size}")
        if self.max_batches < 0:
            out.append(f"{where}.max_batches: must be >= 0, got {self.max_batches}")
        return out


@dataclass
class ShapesConfig:
    """Generate the embedded shapes dataset into ``dir`` when its shards are missing."""

    dir: str  # output directory (shards, captions.txt, classes.json)
    n_train: int = 4000  # training pairs
    n_eval: int = 480  # held-out pairs
    n_docs: int = 1000  # interleaved documents
    image_size: int = 64  # pixels (square)
    shard_size: int = 1000  # samples per tar shard
    seed: int = 0  # generator seed
    def check(self, where: str) -> list[str]:
        out = []
        for name in ("n_train", "n_eval", "n_docs", "shard_size"):
            if getattr(self, name) < 1:
                out.append(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.image_size < 16:
            out.append(f"{where}.image_size: must be >= 16, got {self.image_size}")
        return out


@dataclass
class PreprocessConfig:
    """``data.preprocess``: image transforms (``train/preprocess.py``). Null values: the vision tower's
    own (open_clip ``preprocess_cfg``, timm ``pretrained_cfg``, HF ``preprocessor_config.json``;
    built-in ViT: OpenAI mean / std, bicubic, shortest side + center crop)."""

    train: Literal["random_resized_crop", "resize"] = "random_resized_crop"  # resize = the eval transform
    scale: list = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop area fraction (OpenCLIP)
    ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop aspect ratio range
    resize_mode: Union[Literal["shortest", "squash"], None] = None  # eval / resize: shortest side + crop, or squash
    crop_pct: Union[float, None] = None  # eval: resize the short side to size / crop_pct, center crop size
    interpolation: Union[Literal["bicubic", "bilinear", "nearest", "lanczos"], None] = None  # resampling filter
    mean: Union[list, None] = None  # per-channel mean (null: the tower's)
    std: Union[list, None] = None  # per-channel std (null: the tower's)

    def options(self) -> dict:
        return {k: getattr(self, k) for k in ("train", "scale", "ratio", "resize_mode", "crop_pct", "interpolation",
                                              "mean", "std")}

    def check(self, where: str) -> list[str]:
        from vlmcore.train.data.preprocess import ImageTransform

        options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.options().items() if v is not None}
        try:
            ImageTransform(size=1, **options)
        except (ValueError, TypeError) as e:
            return [f"{where}: {e}"]
        return []


@dataclass
class DataConfig:
    train: list[DatasetConfig]  # the training datasets (a mixture: one batch of each per step)
    eval: Union[EvalConfig, None] = None  # held-out data (null = no evaluation)
    num_workers: int = 0  # DataLoader workers per dataset and rank
    shapes: Union[ShapesConfig, None] = None  # generate the embedded shapes dataset (null = off)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    max_consecutive_bad_samples: int = 5000  # unusable samples in a row that stop the run with the reasons

    def check(self, where: str) -> list[str]:
        out = []
        if not self.train:
            out.append(f"{where}.train: needs at least one dataset")
        if self.num_workers < 0:
            out.append(f"{where}.num_workers: must be >= 0, got {self.num_workers}")
        if self.max_consecutive_bad_samples < 1:
            out.append(f"{where}.max_consecutive_bad_samples: must be >= 1, got {self.max_consecutive_bad_samples}")
        names = [d.name for d in self.train if d.name]
        if len(names) != len(set(names)):
            out.append(f"{where}.train: dataset names must be unique, got {names}")
        return out


@dataclass
class TokenizerConfig:
    """A ``tokenizers`` JSON file or a local Hugging Face tokenizer directory (``type: auto``), or
    open_clip's own CLIP tokenizer (``type: open_clip``, no path; OpenCLIP uses context_length 77)."""

    path: str = ""  # tokenizers JSON file or local HF tokenizer directory (type auto; none for open_clip)
    type: Literal["auto", "open_clip"] = "auto"  # open_clip: open_clip's own tokenizer (SOT/EOT, zero padding)
    context_length: int = 32  # T: text tokens per sample (truncated / padded)
    train_from_shapes: bool = False  # train a small word-level tokenizer on the shapes captions if missing

    def check(self, where: str) -> list[str]:
        out = [] if self.context_length >= 4 else [f"{where}.context_length: must be >= 4, got {self.context_length}"]
        if self.type == "auto" and not self.path:
            out.append(f"{where}.path: required (a tokenizers JSON file or a local HF tokenizer directory) "
                       "unless type is open_clip")
        if self.type == "open_clip" and (self.path or self.train_from_shapes):
            out.append(f"{where}: type open_clip uses open_clip's bundled vocabulary; remove path / train_from_shapes")
        return out


@dataclass
class VisionConfig:
    """``model.vision``: the vision tower (see ``train/towers.py``)."""

    type: Literal["builtin", "open_clip", "timm", "hf"] = "builtin"  # builtin = vlmcore.VisionTransformer
    image_size: int = 32  # builtin: input pixels (square)
    patch_size: int = 8  # builtin: ViT patch size
    width: int = 64  # builtin: ViT width
    depth: int = 2  # builtin: ViT blocks
    heads: int = 4  # builtin: attention heads
    mlp_ratio: float = 4.0  # builtin: MLP hidden = mlp_ratio * width
    act: Literal["gelu", "quick_gelu"] = "gelu"  # builtin: quick_gelu for OpenAI CLIP weights
    init: str = ""  # builtin: safetensors file with VisionTransformer weights (e.g. a CLIP run's vision.safetensors)
    name: str = ""  # open_clip / timm: the model name (e.g. ViT-B-32, vit_base_patch16_224)
    checkpoint: Union[str, None] = None  # open_clip / timm: a local checkpoint file (null = random init)
    model_kwargs: dict = field(default_factory=dict)  # open_clip / timm: create_model keyword arguments
    path: str = ""  # hf: a local CLIPVisionModel / SiglipVisionModel (or full CLIP / SigLIP) directory
    prefix_tokens: Union[Literal["drop", "keep"], None] = None  # CLS token policy (null: builtin keeps, adapters drop)
    freeze: bool = False  # the vision encoder is frozen (as in the Flamingo / Frozen papers, LiT) when True
    unlocked_layers: int = 0  # with freeze: the last N blocks (+ final norm / pooling) still train (LiT)

    def check(self, where: str) -> list[str]:
        out = []
        if self.unlocked_layers < 0:
            out.append(f"{where}.unlocked_layers: must be >= 0, got {self.unlocked_layers}")
        elif self.type == "builtin" and self.unlocked_layers > max(self.depth, 0):
            out.append(f"{where}.unlocked_layers: must be in [0, depth={self.depth}], got {self.unlocked_layers}")
        if self.unlocked_layers and not self.freeze:
            out.append(f"{where}.unlocked_layers: only meaningful with {where}.freeze: true")
        if self.type != "builtin":
            return out + self._check_external(where)
        for name in ("image_size", "patch_size", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                out.append(f"{where}.{name}: must be >= 1, got {getattr(self, name)}")
        if self.patch_size >= 1 and self.image_size % self.patch_size:
            out.append(f"{where}.image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.heads >= 1 and self.width % self.heads:
            out.append(f"{where}.width: {self.width} is not divisible by heads {self.heads}")
        if not self.mlp_ratio > 0:
            out.append(f"{where}.mlp_ratio: must be > 0, got {self.mlp_ratio}")
        for name in ("name", "checkpoint", "path"):
            if getattr(self, name):
                out.append(f"{where}.{name}: not used by type builtin (weights: init)")
        if self.model_kwargs:
            out.append(f"{where}.model_kwargs: not used by type builtin")
        return out

    def _check_external(self, where: str) -> list[str]:
        out = []
        if self.init:
            out.append(f"{where}.init: only for type builtin (use checkpoint / path)")
        if self.type in ("open_clip", "timm"):
            if not self.name:
                out.append(f"{where}.name: type {self.type} needs a model name (e.g. ViT-B-32, vit_base_patch16_224)")
            elif self.name.startswith("hf-hub:"):
                out.append(f"{where}.name: hub names download weights; give a local checkpoint instead")
            if self.path:
                out.append(f"{where}.path: only for type hf")
        else:  # hf
            if not self.path:
                out.append(f"{where}.path: type hf needs a local transformers model directory")
            for name in ("name", "checkpoint"):
                if getattr(self, name):
                    out.append(f"{where}.{name}: not used by type hf (the weights are in path)")
            if self.model_kwargs:
                out.append(f"{where}.model_kwargs: not used by type hf")
        return out


@dataclass
class LMConfig:
    """The frozen language model: a local HF directory (``path``) or a config built with random weights."""

    path: str = ""  # local Hugging Face model directory (with config.json)
    config: dict = field(default_factory=dict)  # e.g. {model_type: llama, hidden_size: 64, ...}

    def check(self, where: str) -> list[str]:
        if bool(self.path) == bool(self.config):
            return [f"{where}: give exactly one of 'path' (local HF model dir) or 'config' (random init)"]
        if self.config and "model_type" not in self.config:
            return [f"{where}.config: needs 'model_type' (e.g. llama, gpt2)"]
        return []


@dataclass
class ModelConfig:
    """The parts shared by tasks; each task adds its own section ``model.<task>`` (its ``Config``
    dataclass, see ``train/tasks/base.py``), composed in by :func:`parse_config`."""

    vision: VisionConfig = field(default_factory=VisionConfig)  # the vision tower
    lm: Union[LMConfig, None] = None  # the frozen language model of the tasks that use one
    gradient_checkpointing: bool = False  # activation checkpointing (all tasks; CLIP: every tower block)
@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.1  # AdamW decay (not on 1-D parameters)
    betas: list = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps to lr
    schedule: Literal["cosine", "constant", "linear", "warmup_constant_cooldown"] = "cosine"  # after the warmup
    min_lr_ratio: float = 0.0  # cosine / linear / cooldown end at lr * min_lr_ratio at the last step
    cooldown_fraction: float = 0.1  # warmup_constant_cooldown: the last fraction of the steps decays linearly
    accumulation_steps: int = 1  # micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)

    def check(self, where: str) -> list[str]:
        out = []
        if not self.lr > 0:
            out.append(f"{where}.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            out.append(f"{where}.weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            out.append(f"{where}.betas: must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            out.append(f"{where}.eps: must be > 0, got {self.eps}")
        if self.warmup_steps < 0:
            out.append(f"{where}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(f"{where}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.cooldown_fraction <= 1:
            out.append(f"{where}.cooldown_fraction: must be in (0, 1], got {self.cooldown_fraction}")
        if self.accumulation_steps < 1:
            out.append(f"{where}.accumulation_steps: must be >= 1, got {self.accumulation_steps}")
        return out


@dataclass
class TrainConfig:
    task: str  # a name of the task registry (train/tasks/__init__.py)
    out_dir: str  # metrics.jsonl, checkpoints/, exported weights
    data: DataConfig  # datasets
    tokenizer: TokenizerConfig  # the text tokenizer
    max_steps: int = 0  # optimizer steps; 0 = derived from epochs x train_num_samples (OpenCLIP)
    epochs: int = 0  # with train_num_samples: max_steps = epochs * ceil(train_num_samples / samples per step)
    train_num_samples: int = 0  # samples per epoch, all datasets and ranks together (OpenCLIP --train-num-samples)
    model: ModelConfig = field(default_factory=ModelConfig)  # the model sections (common + model.<task>)
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and the lr schedule
    deepspeed: Union[dict, str] = field(default_factory=dict)  # DeepSpeed's own keys, or a JSON path
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2  # checkpoints kept
    eval_every: int = 0  # 0 = only at the end (when data.eval is set)
    log_every: int = 1  # steps between metrics lines
    seed: int = 0  # base seed (rank r uses seed + r)
    resume: Union[str, None] = None  # "latest" or a checkpoint tag ("step_00000040")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU; fp16: CUDA only
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row abort the run
    progress_bar: bool = True  # tqdm bar on rank 0
    def check(self, where: str) -> list[str]:
        out = []
        by_epochs = self.epochs != 0 or self.train_num_samples != 0
        if by_epochs:
            if self.max_steps:
                out.append("max_steps: give either max_steps or epochs + train_num_samples, not both")
            for name in ("epochs", "train_num_samples"):
                if getattr(self, name) < 1:
                    out.append(f"{name}: must be >= 1 with {'train_num_samples' if name == 'epochs' else 'epochs'} "
                               f"set, got {getattr(self, name)}")
        elif self.max_steps < 1:
            out.append(f"max_steps: must be >= 1 (or set epochs and train_num_samples), got {self.max_steps}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                out.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("keep_last", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.out_dir:
            out.append("out_dir: must not be empty")
        out += _check_deepspeed(self.deepspeed, self.precision)
        return out


@functools.lru_cache(maxsize=1)
def deepspeed_keys() -> tuple[frozenset, frozenset]:
    """(top-level keys, ``zero_optimization`` keys) that the installed DeepSpeed reads.

    Top level: the keys ``DeepSpeedConfig._initialize_params`` looks up, recorded by running it on
    an empty mapping that logs every lookup (DeepSpeed has no single list of them), plus the
    ``autotuning`` section read by its launcher (its constant). Keys DeepSpeed has removed are in
    neither set (:func:`removed_deepspeed_keys` explains them). ZeRO: the fields and aliases of
    DeepSpeed's pydantic ``DeepSpeedZeroConfig``.
    """
    from deepspeed.autotuning.constants import AUTOTUNING
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    seen: set = set()

    class Recording(dict):  # starts empty; DeepSpeed may insert defaults into it while parsing
        def get(self, key, default=None):
            seen.add(key)
            return super().get(key, default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def keys(self):  # ``KEY in param_dict.keys()`` is recorded too
            return self

    probe = object.__new__(DeepSpeedConfig)
    probe.global_rank, probe.world_size, probe.mpu = 0, 1, None
    probe._param_dict = Recording()
    probe._initialize_params(probe._param_dict)
    top = ({k for k in seen if isinstance(k, str)} | {AUTOTUNING}) - set(removed_deepspeed_keys()[0])
    zero = set(DeepSpeedZeroConfig.model_fields)
    zero |= {f.alias for f in DeepSpeedZeroConfig.model_fields.values() if f.alias}
    return frozenset(top), frozenset(zero)


def removed_deepspeed_keys() -> tuple[dict, dict]:
    """DeepSpeed's own messages for the (top-level, ZeRO) keys it has removed (empty if it has none)."""
    import deepspeed.runtime.config as ds_config

    return (getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}),
            getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {}))


def _unknown_keys(section: dict, known: frozenset, where: str, removed: dict) -> list[str]:
    out = []
    for key in sorted(k for k in section if k not in known):
        if key in removed:
            out.append(f"{where}.{key}: removed from DeepSpeed: {removed[key].strip()}")
            continue
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        out.append(f"{where}.{key}: not a DeepSpeed config key{hint}")
    return out


def _check_deepspeed(ds, precision: str = "auto") -> list[str]:
    if isinstance(ds, str):
        if not os.path.isfile(ds):
            return [f"deepspeed: JSON file {ds!r} does not exist"]
        return []
    top, zero_keys = deepspeed_keys()
    removed_top, removed_zero = removed_deepspeed_keys()
    out = _unknown_keys(ds, top, "deepspeed", removed_top)
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        out.append("deepspeed.zero_optimization: must be a mapping")
    else:
        out += _unknown_keys(zero, zero_keys, "deepspeed.zero_optimization", removed_zero)
        if zero.get("stage", 0) not in (0, 1, 2, 3):
            out.append(f"deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got {zero.get('stage')!r}")
    fp16 = ds.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled", False) and precision != "fp16":
        out.append("deepspeed.fp16.enabled: the trainer's precision decides; set precision: fp16 instead")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds:
            source = "optim.accumulation_steps" if key == "gradient_accumulation_steps" else "data.train[*].batch_size"
            out.append(f"deepspeed.{key}: set by the trainer from {source}; remove it")
    if "gradient_clipping" in ds and not (isinstance(ds["gradient_clipping"], (int, float))
                                           and ds["gradient_clipping"] >= 0):
        out.append(f"deepspeed.gradient_clipping: must be a number >= 0, got {ds['gradient_clipping']!r}")
    return out


# ------------------------------------------------------------------------------- generic loader


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value, tp, where: str, errors: list[str]):
    """Check ``value`` against the annotation ``tp``; returns the converted value (or None on error)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            converted = _convert(value, option, where, trial)
            if not trial:
                return converted
        names = " or ".join("null" if o is type(None) else _type_name(o) for o in options)
        errors.append(f"{where}: expected {names}, got {type(value).__name__} {value!r}")
        return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            errors.append(f"{where}: must be one of {list(allowed)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, errors)
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return None
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}.{i}", errors) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number, got {type(value).__name__} {value!r}")
            return value
        return float(value)
    if tp in (str, dict, list):
        if not isinstance(value, tp):
            errors.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def _build(cls, raw, where: str, errors: list[str]):
    prefix = f"{where}." if where else ""
    if not isinstance(raw, dict):
        errors.append(f"{where or 'config'}: expected a mapping, got {type(raw).__name__} {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    for key in unknown:
        errors.append(f"{prefix}{key}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], prefix + name, errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}{name}: required key is missing")
    try:
        obj = cls(**kwargs)
    except TypeError:  # a required key was missing: already reported above
        return None
    return obj


def _walk_checks(obj, where: str) -> list[str]:
    """Run ``check(where)`` on every dataclass in the tree (value constraints)."""
    out = []
    if dataclasses.is_dataclass(obj):
        if hasattr(obj, "check"):
            try:
                out += obj.check(where)
            except (TypeError, AttributeError):  # a field of the wrong type: already reported
                pass
        for f in dataclasses.fields(obj):
            out += _walk_checks(getattr(obj, f.name), f"{where}.{f.name}" if where else f.name)
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            out += _walk_checks(item, f"{where}.{i}")
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` strings (values parsed as YAML) to a nested dict/list tree."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected key=value")
            continue
        value = yaml.safe_load(text) if text else ""
        node = raw
        parts = key.split(".")
        try:
            for part in parts[:-1]:
                if isinstance(node, list):
                    node = node[int(part)]
                else:
                    node = node.setdefault(part, {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            elif isinstance(node, dict):
                node[last] = value
            else:
                raise TypeError
        except (ValueError, IndexError, TypeError):
            problems.append(f"override {item!r}: {key!r} does not name a place in the config")
    if problems:
        raise ConfigError(problems, "overrides")
    return raw


KIND_NAMES = {"pairs": "image-text pairs", "interleaved": "interleaved documents"}


def _schema_for(task_cls) -> type:
    """:class:`TrainConfig` with ``model.<task name>`` = the task's ``Config`` section (cached)."""
    if task_cls in _SCHEMAS:
        return _SCHEMAS[task_cls]
    name = task_cls.name
    if name in {f.name for f in dataclasses.fields(ModelConfig)}:
        raise TypeError(f"task name {name!r} clashes with the common key model.{name}")
    suffix = "".join(part.capitalize() for part in name.split("_"))
    model_cls = dataclasses.make_dataclass(
        f"ModelConfig{suffix}", [(name, task_cls.Config, field(default_factory=task_cls.Config))],
        bases=(ModelConfig,))
    train_cls = dataclasses.make_dataclass(
        f"TrainConfig{suffix}", [("model", model_cls, field(default_factory=model_cls))], bases=(TrainConfig,))
    for cls in (model_cls, train_cls):  # findable by pickle / copy as train.config.<name>
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
        globals()[cls.__name__] = cls
    _SCHEMAS[task_cls] = train_cls
    return train_cls


_SCHEMAS: dict[type, type] = {}


def _check_task(task_cls, cfg: TrainConfig) -> list[str]:
    """The data kinds the task accepts, then the task's own cross-section checks."""
    out = []
    kinds = task_cls.data_kinds
    if any(d.kind not in kinds for d in cfg.data.train):
        accepted = " and ".join(KIND_NAMES.get(k, k) for k in kinds)
        out.append(f"data.train: task {task_cls.name!r} trains on {accepted} only (kind: {' | '.join(kinds)})")
    return out + task_cls.check_config(cfg)


def parse_config(raw: dict, source: str = "config") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a plain mapping; raises :class:`ConfigError`.

    The schema is the common part plus the section ``model.<task>`` of the task named by ``task``
    (looked up in the task registry): an unknown task, or an unknown key inside the section, is
    reported like any other problem.
    """
    from vlmcore.train.tasks import UnknownTaskError, get_task

    errors: list[str] = []
    schema, task_cls = TrainConfig, None
    name = raw.get("task") if isinstance(raw, dict) else None
    if isinstance(name, str):
        try:
            task_cls = get_task(name)
            schema = _schema_for(task_cls)
        except UnknownTaskError as e:
            errors.append(f"task: {e}")
    cfg = _build(schema, raw, "", errors)
    if cfg is not None:
        errors += _walk_checks(cfg, "")
        if task_cls is not None:
            try:
                errors += _check_task(task_cls, cfg)
            except (TypeError, AttributeError):  # a field of the wrong type: already reported
                pass
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (or start from ``{}``), apply overrides, validate. Raises :class:`ConfigError`."""
    raw: Any = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError([f"config file {path!r} does not exist"])
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    raw = apply_overrides(raw, list(overrides))
    return parse_config(raw, source=path or "config")


def deepspeed_dict(cfg: TrainConfig) -> dict:
    """The DeepSpeed config as a mapping (a copy; JSON file read if a path was given)."""
    if isinstance(cfg.deepspeed, str):
        with open(cfg.deepspeed, encoding="utf-8") as f:
            ds = json.load(f)
        problems = _check_deepspeed(ds, cfg.precision)
        if problems:
            raise ConfigError(problems, cfg.deepspeed)
        return ds
    return json.loads(json.dumps(cfg.deepspeed))


def to_dict(cfg: TrainConfig) -> dict:
    """The resolved configuration as plain data (written to ``<out_dir>/config.yaml``)."""
    return dataclasses.asdict(cfg)

