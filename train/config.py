"""Training configuration: a typed schema, YAML loading, ``key=value`` overrides, validation.

A run is described by one YAML file (see ``train/configs/``) plus optional command-line
overrides ``dotted.key=value`` (the value is parsed as YAML: ``max_steps=20``,
``data.train.0.weight=0.2``, ``deepspeed.zero_optimization.stage=3``).

:func:`load_config` validates everything before any work starts: unknown keys, wrong types and
impossible values are all collected and raised together as one :class:`ConfigError`. The schema is
plain dataclasses (no pydantic: the GPU image lacks it). A numeric field declares its range on its
type (``batch_size: PositiveInt``, ``Annotated[float, Bounds(ge=0, le=1)]``) and one walker reports
every value out of range with the same message; a section's ``check(where)`` method holds only the
rules that involve several fields.

The schema is the common part below plus the section ``model.<task>`` of the task named by
``task:``: its ``Config`` dataclass. This module is a leaf of the import graph: it imports nothing
of ``vlmcore.train``. What it needs from the rest of the trainer is handed in (see
:func:`parse_config`): the task lookup (``vlmcore.train.tasks.get_task``) and the checks of sections
owned elsewhere (the ``deepspeed`` section: ``vlmcore.train.deepspeed_config``), which install
themselves as the defaults when imported (``import vlmcore.train`` imports both).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """Raised with every problem of a configuration, one per line."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {source} ({len(self.problems)} problem(s)):\n{lines}")


class UnknownTaskError(ValueError):
    """A ``task:`` name that the task registry does not hold (raised by a :data:`TaskLookup`)."""


# ----------------------------------------------------------------------------------------- bounds


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric field, declared on its type: ``Annotated[int, Bounds(ge=1)]``.

    ``ge`` / ``gt``: lower bound, inclusive / exclusive; ``le`` / ``lt``: upper bound; ``finite``:
    infinities and NaN refused. NaN is outside every range. :func:`bound_problems` checks the
    declared bounds of a whole config tree and writes the standard message for each value outside.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = False

    def holds(self, value: float) -> bool:
        """Whether ``value`` is inside the range (written positively, so that NaN never is)."""
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
                and (not self.finite or math.isfinite(value)))

    def describe(self) -> str:
        """The range in words: ``>= 1``, ``in [0, 1)``, ``a finite number > 0``, ``finite``."""
        low = f">= {self.ge}" if self.ge is not None else f"> {self.gt}" if self.gt is not None else ""
        high = f"<= {self.le}" if self.le is not None else f"< {self.lt}" if self.lt is not None else ""
        if low and high:
            opening, closing = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
            return f"in {opening}{low.split()[1]}, {high.split()[1]}{closing}"
        if self.finite:
            return f"a finite number {low or high}".rstrip() if low or high else "finite"
        return low or high


PositiveInt = Annotated[int, Bounds(ge=1)]
NonNegativeInt = Annotated[int, Bounds(ge=0)]
PositiveFloat = Annotated[float, Bounds(gt=0)]
NonNegativeFloat = Annotated[float, Bounds(ge=0)]
Unit = Annotated[float, Bounds(ge=0, le=1)]  # a number in the unit interval [0, 1]
Fraction = Annotated[float, Bounds(gt=0, le=1)]  # a non-zero fraction, in (0, 1]
Rate = Annotated[float, Bounds(ge=0, lt=1)]  # a rate below one, in [0, 1): dropout, label smoothing, EMA decay


def _declared_bounds(tp) -> list[Bounds]:
    """The :class:`Bounds` in an annotation (looked for inside ``X | None`` too)."""
    if typing.get_origin(tp) is Annotated:
        return [m for m in tp.__metadata__ if isinstance(m, Bounds)]
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [b for option in typing.get_args(tp) for b in _declared_bounds(option)]
    return []


def bound_problems(obj, where: str) -> list[str]:
    """``"<key>: must be <range>, got <value>"`` for each field of the dataclass ``obj`` outside its
    declared :class:`Bounds` (fields only; nested sections are walked by :func:`_walk_checks`).

    A value of the wrong type is skipped: the loader has reported it already.
    """
    out = []
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for bounds in _declared_bounds(hints[f.name]):
            if not bounds.holds(value):
                key = f"{where}.{f.name}" if where else f.name
                out.append(f"{key}: must be {bounds.describe()}, got {value}")
    return out


# ----------------------------------------------------------------------------------------- schema


@dataclass
class DatasetConfig:
    """One training dataset (WebDataset shards) of the mixture."""

    shards: Union[str, list]  # brace pattern "dir/train-{000..007}.tar" or a list of paths/patterns
    name: str = ""  # for logging; defaults to "kind<index>"
    kind: Literal["pairs", "interleaved", "video", "vqa", "nlvr"] = "pairs"  # interleaved = MMC4 documents
    weight: PositiveFloat = 1.0  # loss weight (Flamingo: M3W 1.0, ALIGN 0.2, LTIP 0.2, VTP 0.03); sample: draw odds
    batch_size: PositiveInt = 8  # per rank
    max_images: PositiveInt = 3  # interleaved: images kept per document (the rest are dropped)
    num_frames: PositiveInt = 8  # video: frames per clip (segment centres; in training a random frame per segment)
    shuffle_buffer: NonNegativeInt = 256  # samples in the shuffle buffer (0 = shard order)
    resampled: bool = True  # shards drawn with replacement per rank/worker (webdataset "resampled")
    min_image_similarity: Unit = 0.0  # interleaved (MMC4): drop images with matched_sim below it (OpenFlamingo: 0.24)

    def check(self, where: str) -> list[str]:
        out = []
        if self.min_image_similarity > 0 and self.kind != "interleaved":
            out.append(f"{where}.min_image_similarity: only for kind: interleaved (MMC4 documents)")
        if isinstance(self.shards, list) and (not self.shards or not all(isinstance(s, str) for s in self.shards)):
            out.append(f"{where}.shards: must be a pattern string or a non-empty list of strings")
        if isinstance(self.shards, str) and not self.shards:
            out.append(f"{where}.shards: must not be empty")
        return out


@dataclass
class GenerationConfig:
    """``data.eval.generation``: how ``eval: generate`` decodes (OpenFlamingo's captioning defaults)."""

    max_new_tokens: PositiveInt = 20  # tokens decoded per caption
    num_beams: PositiveInt = 3  # beam search width (1 = greedy)
    prompt_style: Literal["openflamingo", "trainer"] = "trainer"  # trainer: "<image>" as pairs are trained


@dataclass
class EvalConfig:
    """Held-out image-text pairs used for evaluation every ``eval_every`` steps and at the end."""

    shards: Union[str, list]  # brace pattern / glob / list, like data.train[].shards
    batch_size: PositiveInt = 64  # per rank
    max_batches: NonNegativeInt = 0  # 0 = the whole split
    classes: str = ""  # JSON file with {"classnames": [...], "templates": [...]} (CLIP zero-shot)
    eval: Literal["default", "generate"] = "default"  # generate: also decode captions, log CIDEr / BLEU-4 / ...
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # decoding of eval: generate


@dataclass
class ShapesConfig:
    """Generate the embedded shapes dataset into ``dir`` when its shards are missing."""

    dir: str  # output directory (shards, captions.txt, classes.json)
    n_train: PositiveInt = 4000  # training pairs
    n_eval: PositiveInt = 480  # held-out pairs
    n_docs: PositiveInt = 1000  # interleaved documents
    image_size: Annotated[int, Bounds(ge=16)] = 64  # pixels (square)
    shard_size: PositiveInt = 1000  # samples per tar shard
    seed: int = 0  # generator seed


def _numbers(value, n: int) -> bool:
    """Whether ``value`` is a list of ``n`` numbers."""
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


@dataclass
class PreprocessConfig:
    """``data.preprocess``: image transforms (``train/preprocess.py``). Null values: the vision tower's
    own (open_clip ``preprocess_cfg``, timm ``pretrained_cfg``, HF ``preprocessor_config.json``;
    built-in ViT: OpenAI mean / std, bicubic, shortest side + center crop)."""

    train: Literal["random_resized_crop", "resize"] = "random_resized_crop"  # resize = the eval transform
    scale: list = field(default_factory=lambda: [0.9, 1.0])  # RandomResizedCrop area fraction (OpenCLIP)
    ratio: list = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop aspect ratio range
    resize_mode: Union[Literal["shortest", "squash"], None] = None  # eval / resize: shortest side + crop, or squash
    crop_pct: Union[Fraction, None] = None  # eval: resize the short side to size / crop_pct, center crop size
    interpolation: Union[Literal["bicubic", "bilinear", "nearest", "lanczos"], None] = None  # resampling filter
    mean: Union[list, None] = None  # per-channel mean (null: the tower's)
    std: Union[list, None] = None  # per-channel std (null: the tower's)

    def options(self) -> dict:
        return {k: getattr(self, k) for k in ("train", "scale", "ratio", "resize_mode", "crop_pct", "interpolation",
                                              "mean", "std")}

    def check(self, where: str) -> list[str]:
        """The rules of the data pipeline's ``ImageTransform`` on the lists given (messages in its words)."""
        out = []
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list) and not _numbers(value, 3):
                out.append(f"{where}: {name} must be 3 numbers (R, G, B), got {tuple(value)!r}")
        if _numbers(self.std, 3) and not all(v > 0 for v in self.std):
            out.append(f"{where}: std must be positive, got {tuple(self.std)!r}")
        if isinstance(self.scale, list) and not (_numbers(self.scale, 2) and 0 < self.scale[0] <= self.scale[1] <= 1):
            out.append(f"{where}: scale must be (low, high) with 0 < low <= high <= 1, got {tuple(self.scale)!r}")
        if isinstance(self.ratio, list) and not (_numbers(self.ratio, 2) and 0 < self.ratio[0] <= self.ratio[1]):
            out.append(f"{where}: ratio must be (low, high) with 0 < low <= high, got {tuple(self.ratio)!r}")
        return out


#: Images with more pixels are skipped undecoded (a 13000 x 13000 PNG of 0.5 MB took 1.6 GB and 3.7 s to
#: decode): the default of ``data.max_image_pixels`` and of ``vlmcore-capfilt --max-image-pixels``.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000


@dataclass
class DataConfig:
    train: list[DatasetConfig]  # the training datasets (a mixture: optim.mixture decides which a step reads)
    eval: Union[EvalConfig, None] = None  # held-out data (null = no evaluation)
    num_workers: NonNegativeInt = 0  # DataLoader workers per dataset and rank
    shapes: Union[ShapesConfig, None] = None  # generate the embedded shapes dataset (null = off)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    max_consecutive_bad_samples: PositiveInt = 5000  # unusable samples in a row that stop the run with the reasons
    max_image_pixels: PositiveInt = DEFAULT_MAX_IMAGE_PIXELS  # larger images are skipped undecoded (image_too_large)

    def check(self, where: str) -> list[str]:
        out = []
        if not self.train:
            out.append(f"{where}.train: needs at least one dataset")
        names = [d.name for d in self.train if d.name]
        if len(names) != len(set(names)):
            out.append(f"{where}.train: dataset names must be unique, got {names}")
        return out


#: The largest ``tokenizer.context_length`` accepted (the LM's own maximum is checked against the model).
MAX_CONTEXT_LENGTH = 65536
#: Bounded above: attention costs T^2, a context far past any LM's would make no step for minutes.
ContextLength = Annotated[int, Bounds(ge=4, le=MAX_CONTEXT_LENGTH)]


@dataclass
class TokenizerConfig:
    """A ``tokenizers`` JSON file or a local Hugging Face tokenizer directory (``type: auto``), or
    open_clip's own CLIP tokenizer (``type: open_clip``, no path; OpenCLIP uses context_length 77)."""

    path: str = ""  # tokenizers JSON file or local HF tokenizer directory (type auto; none for open_clip)
    type: Literal["auto", "open_clip"] = "auto"  # open_clip: open_clip's own tokenizer (SOT/EOT, zero padding)
    context_length: ContextLength = 32  # T: text tokens per sample (truncated / padded)
    train_from_shapes: bool = False  # train a small word-level tokenizer on the shapes captions if missing

    def check(self, where: str) -> list[str]:
        out = []
        if self.type == "auto" and not self.path:
            out.append(f"{where}.path: required (a tokenizers JSON file or a local HF tokenizer directory) "
                       "unless type is open_clip")
        if self.type == "open_clip" and (self.path or self.train_from_shapes):
            out.append(f"{where}: type open_clip uses open_clip's bundled vocabulary; remove path / train_from_shapes")
        return out


@dataclass
class VisionConfig:
    """``model.vision``: the vision tower (see ``train/tasks/towers.py``)."""

    type: Literal["builtin", "open_clip", "timm", "hf"] = "builtin"  # builtin = vlmcore.VisionTransformer
    image_size: PositiveInt = 32  # builtin: input pixels (square)
    patch_size: PositiveInt = 8  # builtin: ViT patch size
    width: PositiveInt = 64  # builtin: ViT width
    depth: PositiveInt = 2  # builtin: ViT blocks
    heads: PositiveInt = 4  # builtin: attention heads
    mlp_ratio: PositiveFloat = 4.0  # builtin: MLP hidden = mlp_ratio * width
    act: Literal["gelu", "quick_gelu"] = "gelu"  # builtin: quick_gelu for OpenAI CLIP weights
    init: str = ""  # builtin: safetensors file with VisionTransformer weights (e.g. a CLIP run's vision.safetensors)
    name: str = ""  # open_clip / timm: the model name (e.g. ViT-B-32, vit_base_patch16_224)
    checkpoint: Union[str, None] = None  # open_clip / timm: a local checkpoint file (null = random init)
    model_kwargs: dict = field(default_factory=dict)  # open_clip / timm: create_model keyword arguments
    path: str = ""  # hf: a local CLIP / SigLIP / BLIP-2 vision model (or full model) directory
    prefix_tokens: Union[Literal["drop", "keep"], None] = None  # CLS token policy (null: builtin keeps, adapters drop)
    freeze: bool = False  # the vision encoder is frozen (as in the Flamingo / Frozen papers, LiT) when True
    unlocked_layers: NonNegativeInt = 0  # with freeze: the last N blocks (+ final norm / pooling) still train (LiT)

    def check(self, where: str) -> list[str]:
        out = []
        if self.type == "builtin" and self.unlocked_layers > max(self.depth, 0):
            out.append(f"{where}.unlocked_layers: must be in [0, depth={self.depth}], got {self.unlocked_layers}")
        if self.unlocked_layers and not self.freeze:
            out.append(f"{where}.unlocked_layers: only meaningful with {where}.freeze: true")
        if self.type != "builtin":
            return out + self._check_external(where)
        if self.patch_size >= 1 and self.image_size % self.patch_size:
            out.append(f"{where}.image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.heads >= 1 and self.width % self.heads:
            out.append(f"{where}.width: {self.width} is not divisible by heads {self.heads}")
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
    lr: PositiveFloat = 1e-3  # peak learning rate (AdamW)
    weight_decay: NonNegativeFloat = 0.1  # AdamW decay (not on 1-D parameters)
    betas: list = field(default_factory=lambda: [0.9, 0.98])  # AdamW betas
    eps: PositiveFloat = 1e-6  # AdamW epsilon
    warmup_steps: NonNegativeInt = 0  # linear warmup from lr / warmup_steps to lr
    schedule: Literal["cosine", "constant", "linear", "warmup_constant_cooldown"] = "cosine"  # after the warmup
    min_lr_ratio: Unit = 0.0  # cosine / linear / cooldown end at lr * min_lr_ratio at the last step
    cooldown_fraction: Fraction = 0.1  # warmup_constant_cooldown: the last fraction of the steps decays linearly
    accumulation_steps: PositiveInt = 1  # micro-batches per optimizer step (DeepSpeed gradient_accumulation_steps)
    # The dataset mixture (train/runtime/mixture.py). accumulate: every dataset every step; round_robin: one
    # per step in data.train order; sample: one per step, drawn with odds data.train[i].weight (loss unweighted).
    mixture: Literal["accumulate", "round_robin", "sample"] = "accumulate"  # every dataset / one in turn / one drawn
    # joint: one backward of sum_i weight_i * loss_i; per_dataset: one forward + backward per dataset (the
    # activation peak is the largest dataset's, not the sum; under ZeRO-2/3 one gradient reduction per backward).
    mixture_backward: Literal["joint", "per_dataset"] = "joint"  # one backward per step, or one per dataset
    accum_freq: PositiveInt = 1  # clip / siglip: k batches form one exact contrastive batch of k x b (OpenCLIP)

    def check(self, where: str) -> list[str]:
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            return [f"{where}.betas: must be two numbers in [0, 1), got {self.betas}"]
        if self.accum_freq > 1 and self.accumulation_steps > 1:
            # Both would be windows of micro-batches; mixing them gives a batch that is exact over k x b
            # rows and averaged over the rest. One of them says what the batch is.
            return [f"{where}.accum_freq: {self.accum_freq} replaces {where}.accumulation_steps (the exact form of "
                    f"it for contrastive losses); set accumulation_steps: 1, got {self.accumulation_steps}"]
        return []


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
    save_every: NonNegativeInt = 0  # 0 = only at the end
    keep_last: PositiveInt = 2  # checkpoints kept
    eval_every: NonNegativeInt = 0  # 0 = only at the end (when data.eval is set)
    log_every: PositiveInt = 1  # steps between metrics lines
    seed: int = 0  # base seed (rank r uses seed + r)
    resume: Union[str, None] = None  # "latest" or a checkpoint tag ("step_00000040")
    resume_fallback: bool = False  # resume: latest with a damaged newest checkpoint: load the previous complete one
    collective_timeout_s: PositiveInt = 600  # a rank waiting this long in a collective for a stalled rank stops the run
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU; fp16: CUDA only
    max_nonfinite_steps: PositiveInt = 5  # this many non-finite losses in a row abort the run
    progress_bar: bool = True  # tqdm bar on rank 0

    def check(self, where: str) -> list[str]:
        """The length of the run: ``max_steps``, or ``epochs`` with ``train_num_samples``; a non-empty out_dir."""
        out = []
        if self.epochs != 0 or self.train_num_samples != 0:
            if self.max_steps:
                out.append("max_steps: give either max_steps or epochs + train_num_samples, not both")
            for name in ("epochs", "train_num_samples"):
                if getattr(self, name) < 1:
                    out.append(f"{name}: must be >= 1 with {'train_num_samples' if name == 'epochs' else 'epochs'} "
                               f"set, got {getattr(self, name)}")
        elif self.max_steps < 1:
            out.append(f"max_steps: must be >= 1 (or set epochs and train_num_samples), got {self.max_steps}")
        if not self.out_dir:
            out.append("out_dir: must not be empty")
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
    """The declared bounds, then ``check(where)``, of every dataclass in the tree (value constraints)."""
    out = []
    if dataclasses.is_dataclass(obj):
        out += bound_problems(obj, where)
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


KIND_NAMES = {"pairs": "image-text pairs", "interleaved": "interleaved documents", "video": "video-text clips",
              "vqa": "VQA questions", "nlvr": "NLVR2 image pairs"}

# ------------------------------------------------------------- what the rest of the trainer hands in

#: ``task:`` name -> the task's class (``vlmcore.train.tasks.get_task``): it has ``name``, ``Config``
#: (the dataclass of ``model.<name>``), ``data_kinds``, ``generates`` and ``check_config(cfg)``; raises
#: UnknownTaskError.
TaskLookup = Callable[[str], type]
#: A check of the whole parsed config (one message per problem), for sections this module types but
#: another owns (``deepspeed``: DeepSpeed's own keys).
ConfigCheck = Callable[["TrainConfig"], list[str]]

_default_tasks: list[TaskLookup] = []
_default_checks: dict[str, ConfigCheck] = {}


def install_task_lookup(lookup: TaskLookup) -> None:
    """Make ``lookup`` the task lookup of callers that pass none (the registry does it on import)."""
    _default_tasks[:] = [lookup]


def install_check(name: str, check: ConfigCheck) -> None:
    """Run ``check`` in every :func:`parse_config` whose caller passes no ``checks`` (once per ``name``)."""
    _default_checks[name] = check


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


def _accum_freq_problems(task_cls, cfg: TrainConfig) -> list[str]:
    """``optim.accum_freq > 1``: a task with a features step (``Task.caches_features``) and one training
    dataset (its batches are the micro-batches). ZeRO-3 is refused with the ``deepspeed`` section
    (``deepspeed_config.py``, which also reads a JSON file)."""
    out = []
    if not getattr(task_cls, "caches_features", False):
        out.append(f"optim.accum_freq: task {task_cls.name!r} has no features step (clip and siglip have); "
                   "use optim.accumulation_steps")
    if len(cfg.data.train) != 1:
        out.append(f"optim.accum_freq: needs exactly one data.train dataset (its batches are the micro-batches), "
                   f"got {len(cfg.data.train)}")
    return out


def _check_task(task_cls, cfg: TrainConfig) -> list[str]:
    """The data kinds the task accepts, then the task's own cross-section checks."""
    out = []
    kinds = task_cls.data_kinds
    if any(d.kind not in kinds for d in cfg.data.train):
        accepted = " and ".join(KIND_NAMES.get(k, k) for k in kinds)
        out.append(f"data.train: task {task_cls.name!r} trains on {accepted} only (kind: {' | '.join(kinds)})")
    if cfg.optim.accum_freq > 1:
        out += _accum_freq_problems(task_cls, cfg)
    if cfg.data.eval is not None and cfg.data.eval.eval == "generate" and not getattr(task_cls, "generates", False):
        out.append(f"data.eval.eval: task {task_cls.name!r} does not generate text; 'generate' is for the "
                   "captioning tasks (flamingo, frozen, blip2_stage2, blip_caption)")
    return out + task_cls.check_config(cfg)


def parse_config(raw: dict, source: str = "config", tasks: TaskLookup | None = None,
                 checks: Iterable[ConfigCheck] | None = None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a plain mapping; raises :class:`ConfigError`.

    The schema is the common part plus the section ``model.<task>`` of the task named by ``task``,
    found with ``tasks`` (default: the installed registry, ``vlmcore.train.tasks.get_task``): an unknown
    task, or an unknown key inside the section, is reported like any other problem. ``checks`` (default:
    the installed ones, DeepSpeed's keys) run on the built config with the task's own checks.
    """
    if tasks is None and not _default_tasks:
        raise TypeError("parse_config: no task registry installed; pass tasks=vlmcore.train.tasks.get_task")
    lookup = tasks or _default_tasks[0]
    errors: list[str] = []
    schema, task_cls = TrainConfig, None
    name = raw.get("task") if isinstance(raw, dict) else None
    if isinstance(name, str):
        try:
            task_cls = lookup(name)
            schema = _schema_for(task_cls)
        except UnknownTaskError as e:
            errors.append(f"task: {e}")
    cfg = _build(schema, raw, "", errors)
    if cfg is not None:
        errors += _walk_checks(cfg, "")
        whole = list(_default_checks.values() if checks is None else checks)
        if task_cls is not None:
            whole.append(functools.partial(_check_task, task_cls))
        for check in whole:
            try:
                errors += check(cfg)
            except (TypeError, AttributeError):  # a field of the wrong type: already reported
                pass
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_config(path: str | None, overrides: list[str] = (), tasks: TaskLookup | None = None,
                checks: Iterable[ConfigCheck] | None = None) -> TrainConfig:
    """Read a YAML file (or start from ``{}``), apply overrides, validate (``tasks`` / ``checks``: see
    :func:`parse_config`). Raises :class:`ConfigError`."""
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
    return parse_config(raw, source=path or "config", tasks=tasks, checks=checks)


def to_dict(cfg: TrainConfig) -> dict:
    """The resolved configuration as plain data (written to ``<out_dir>/config.yaml``)."""
    return dataclasses.asdict(cfg)
