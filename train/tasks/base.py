"""The protocol between the training loop and a task: :class:`Task`.

A task is one file in ``train/tasks/`` with one :class:`Task` subclass, plus one line in the
registry (``train/tasks/__init__.py``). The loop, the config loader and the data pipeline talk to
a task only through the methods below; none of them knows a task by name.

Life of a run, as the loop sees it::

    task_cls = get_task(cfg.task)                     # registry lookup (lazy import)
    # config loading: cfg.model.<name> is parsed into task_cls.Config, then
    # task_cls.check_config(cfg) adds the cross-section checks
    task = task_cls(cfg, tokenizer)
    model = task.build_model(dtype)                   # full model, trainable parameters requires_grad
    task.prepare_for_engine(model, zero_stage)        # before deepspeed.initialize
    encoder = task.encoder(kind, max_images)          # one per training dataset (data.train[i])
    loss, metrics = task.loss(engine, batch, device, group)    # every step, every dataset
    # or, with optim.accum_freq = k > 1 (tasks with caches_features; runtime/feature_cache.py):
    features = task.features(engine, batch, device)   # k times without grad, then once more per batch
    loss, metrics = task.loss_from_features(engine, cached, group, criterion_grad=j == 0)
    tokens = task.batch_tokens(batch)                 # for tokens_per_s
    problems = task.check_eval_sample(sample)         # before DeepSpeed starts (train/validate.py)
    results = task.run_evaluation(module, info, zero_stage)    # calls task.evaluate(module, ctx)
                                                      # (+ generation metrics under data.eval.eval: generate)
    files = task.export(module)                       # written at the end of the run
    writers = task.peer_exporters()                   # vlmcore-export: format -> writer(module, out_dir)
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from vlmcore.train.data.eval_counts import EvalTally
from vlmcore.train.data.pipeline import BadSample, batch_tokens, expand_shards
from vlmcore.train.tasks.generation import generation_metrics

if TYPE_CHECKING:
    from vlmcore.train.config import EvalConfig, TrainConfig
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.runtime.distributed import DistInfo

#: The per-sample encoder the data pipeline calls: raw WebDataset sample (``{"__key__", "__url__",
#: ext: bytes, ...}``, see ``train/data.py``) -> dict of tensors of one example, stacked into a
#: batch by ``data.collate``. It raises ``data.BadSample`` for a sample it cannot use (counted as
#: skipped). It is pickled into DataLoader workers: make it a module-level class holding only what
#: it needs (tokenizer, sizes, the task's section), not the whole config.
SampleEncoder = Callable[[dict], dict]


@dataclass
class EvalContext:
    """What :meth:`Task.evaluate` needs besides the module (built by :meth:`Task.run_evaluation`).

    Attributes:
        info: this rank's ``DistInfo`` (``rank``, ``world_size``, ``device``, ``is_main``).
        zero_stage: DeepSpeed ZeRO stage (0-3). Under ZeRO-3 every forward is a collective: use
            ``common.in_step`` so that all ranks run as many forwards.
        shards: the expanded paths of ``data.eval.shards``.
        eval: the ``data.eval`` section (``batch_size``, ``max_batches``, ``classes``).
        encoder: ``task.eval_encoder()``: the eval data is image-text pairs.
        dtype: the floating dtype of the module's parameters (cast images to it).
    """

    info: DistInfo
    zero_stage: int
    shards: list[str]
    eval: EvalConfig
    encoder: SampleEncoder
    dtype: torch.dtype


def gathered(module: nn.Module, zero_stage: int):
    """All parameters materialized on every rank under ZeRO-3 (for evaluation); a no-op otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def model_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating-point parameter."""
    return next(p.dtype for p in module.parameters() if p.dtype.is_floating_point)


class Task(abc.ABC):
    """One training task (model + loss + data encoding + evaluation + export).

    Class attributes a subclass sets:
        name: the ``task:`` value of the config, equal to its registry key.
        Config: a dataclass for the task's own section ``model.<name>`` of the YAML. Fields are
            typed (int, float, bool, str, list, dict, Literal, nested dataclasses, ``X | None``);
            every field needs a default. Unknown keys, wrong types and missing keys are reported by
            the config loader; value constraints go in an optional method
            ``check(self, where: str) -> list[str]`` returning one message per problem, each
            starting with ``f"{where}.<field>: "`` (``where`` is ``"model.<name>"``), as the
            sections of ``train/config.py`` do.
        data_kinds: the ``data.train[*].kind`` values the task trains on (``"pairs"``,
            ``"interleaved"``, ``"video"``); others are a ConfigError.
        media_tokens: whether the tokenizer must hold ``<image>`` / ``<|endofchunk|>`` (added when
            missing; default True). A task that never writes images into its text sets False.
        generates: whether the model decodes text (default False). A task that sets True implements
            :meth:`eval_model` and :meth:`eval_images`, and so supports ``data.eval.eval: generate``
            and ``vlmcore-eval run`` (``train/tasks/generation.py``).
        caches_features: whether the loss is a function of per-row features (default False). A task
            that sets True implements :meth:`features` and :meth:`loss_from_features`, and so supports
            ``optim.accum_freq`` (OpenCLIP's exact large-batch accumulation,
            ``train/runtime/feature_cache.py``).

    The common sections stay where they are: ``model.vision`` (the vision tower, see
    ``common.build_vision``), ``model.lm`` (a frozen causal LM, ``common.build_language_model``),
    ``model.gradient_checkpointing``, ``tokenizer``, ``data``, ``optim``, ``deepspeed``.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    data_kinds: ClassVar[tuple[str, ...]] = ("pairs",)
    media_tokens: ClassVar[bool] = True
    generates: ClassVar[bool] = False
    caches_features: ClassVar[bool] = False

    @classmethod
    def check_config(cls, cfg: TrainConfig) -> list[str]:
        """Checks that involve more than the task's section (e.g. "needs model.lm", "one dataset only").

        Args:
            cfg: the whole parsed config (its types are right; ``cfg.model.<name>`` is a ``Config``).
        Returns:
            one message per problem, each starting with the dotted key it concerns (``"model.lm: ..."``).
        """
        return []

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer):
        """Args: the validated config and the loaded tokenizer (``tokenizer.context_length`` = T)."""
        self.cfg = cfg
        self.tok = tokenizer
        self.config = getattr(cfg.model, self.name)  # this task's section, an instance of Config

    @abc.abstractmethod
    def build_model(self, dtype: torch.dtype) -> nn.Module:
        """The model on CPU, parameters in ``dtype`` where they come from a checkpoint/LM directory.

        Args:
            dtype: the training precision's parameter dtype (``torch.float32``, or ``torch.bfloat16``
                under ``precision: bf16``); pass it to ``common.build_language_model``.
        Returns:
            the ``nn.Module`` handed to DeepSpeed. Frozen parts have ``requires_grad=False``: the
            optimizer gets the trainable parameters only. 0-dim parameters are reshaped to ``[1]``
            by the loop afterwards (DeepSpeed cannot broadcast 0-dim tensors).
        """

    def prepare_for_engine(self, model: nn.Module, zero_stage: int) -> None:
        """Hook called after the model is built, before ``deepspeed.initialize``; default: nothing.

        E.g. under ZeRO-3 a parameter read by a module other than its owner must be registered
        with ``deepspeed.zero.register_external_parameter(model, param)``.
        """
        return None

    @abc.abstractmethod
    def encoder(self, kind: str, max_images: int) -> SampleEncoder:
        """The per-sample encoder of a dataset (see :data:`SampleEncoder`).

        Args:
            kind: the dataset's ``kind``, one of :attr:`data_kinds` (``"pairs"``: image + caption,
                decoded by ``data.pair_fields``; ``"interleaved"``: MMC4-like documents,
                ``data.doc_fields``; ``"video"``: a clip + caption, ``common.VideoDecoder``).
                Evaluation asks for ``("pairs", 1)``.
            max_images: the visual inputs per sample: ``data.train[i].max_images`` (interleaved:
                images kept per document), for ``"video"`` its ``num_frames`` (frames per clip).
        Returns:
            a picklable callable ``sample -> {name: tensor}``; every example of a dataset must have
            the same keys and shapes (they are stacked). Images: ``common.image_decoder(cfg, train)``
            gives the tower's input ``[3, S, S]`` (normalized floats, ``data.preprocess`` applied;
            ``S`` the tower's input size); ``data.decode_image`` is the plain squash resize.
        """

    def eval_encoder(self) -> SampleEncoder:
        """The encoder of the held-out pairs; default ``self.encoder("pairs", 1)``. The built-in tasks
        return their encoder with the evaluation image transform (resize + center crop, no random crop)."""
        return self.encoder("pairs", 1)

    @abc.abstractmethod
    def loss(self, model, batch: dict, device: torch.device, group=None) -> tuple[torch.Tensor, dict]:
        """The training loss of one batch of one dataset.

        Args:
            model: the DeepSpeed engine during training (call it like the module), or the module.
            batch: the collated output of :meth:`encoder` (tensors ``[B, ...]`` on CPU; move them to
                ``device``).
            device: this rank's device.
            group: the data-parallel process group, or None (single process / tests). Contrastive
                losses gather over it.
        Returns:
            ``(loss, metrics)``: ``loss`` a 0-dim fp32 tensor with its graph (the loop weights it by
            ``data.train[i].weight``, sums over datasets and calls backward); ``metrics`` a dict of
            extra per-step scalars (floats or 0-dim tensors, e.g. ``{"logit_scale": ...}``), the
            same keys on every rank and step (the loop averages them over ranks and logs them).
        """

    def features(self, model, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """The per-row features the loss is computed from (``caches_features`` tasks).

        Args:
            model, batch, device: as for :meth:`loss`.
        Returns:
            ``{name: [B, ...]}`` with row i of every tensor from example i. Called under ``no_grad`` and
            with grad, in training mode; its random ops (dropout) are replayed from the same RNG state.
        """
        raise NotImplementedError(f"task {self.name!r} has no features step (optim.accum_freq)")

    def loss_from_features(self, model, features: dict[str, torch.Tensor], group=None, *,
                           criterion_grad: bool = True) -> tuple[torch.Tensor, dict]:
        """The loss of a batch given its :meth:`features` (``caches_features`` tasks).

        ``loss_from_features(model, features(model, batch, device), group)`` equals
        ``loss(model, batch, device, group)`` in value, metrics and gradients.

        Args:
            model, group: as for :meth:`loss`.
            features: :meth:`features` of k batches, concatenated per key: ``{name: [k * B, ...]}``.
            criterion_grad: whether the loss's own parameters (a temperature, a bias) get a gradient
                from this loss. The scheme computes the loss k times, once per batch recomputed with
                grad; these parameters enter all k, so exactly one of them passes True.
        Returns:
            ``(loss, metrics)`` as :meth:`loss`.
        """
        raise NotImplementedError(f"task {self.name!r} has no features step (optim.accum_freq)")

    def batch_tokens(self, batch: dict) -> int:
        """Non-padding text tokens of a batch (for ``tokens_per_s``); default ``data.batch_tokens``
        (``attention_mask`` sum, else ``tokens`` up to the first eos)."""
        return batch_tokens(batch, self.tok.pad_token_id, self.tok.eos_token_id)

    @abc.abstractmethod
    def evaluate(self, module: nn.Module, ctx: EvalContext) -> dict:
        """Held-out metrics; called on every rank with the module in eval mode, under ``no_grad``,
        with all parameters gathered (ZeRO-3).

        Args:
            module: ``engine.module`` (not the engine).
            ctx: see :class:`EvalContext`. Split the eval set over ranks with
                ``data.eval_batches(ctx.shards, ctx.encoder, ctx.eval.batch_size, ctx.info.rank,
                ctx.info.world_size, ctx.eval.max_batches)`` wrapped in ``common.in_step``.
        Returns:
            ``{metric: float | int}``, global (reduced over ranks with ``distributed.all_reduce_sum``),
            identical on every rank; written to ``metrics.jsonl`` and ``eval.json``.
        """

    def check_eval_sample(self, sample: dict) -> list[str]:
        """Problems of the eval data, found on its first raw sample before training starts.

        Args:
            sample: the first sample of the first eval shard (``{"__key__", "__url__", ext: bytes}``).
        Returns:
            ConfigError lines starting with ``"data.eval"``; default: the eval encoder
            (:meth:`eval_encoder`) must accept the sample. Override to add required fields.
        """
        try:
            self.eval_encoder()(sample)
        except BadSample as e:
            return [f"data.eval.shards: the first sample ({sample.get('__url__')}: {sample.get('__key__')}) is not "
                    f"usable by task {self.name!r}: {e}"]
        return []

    def eval_model(self, module: nn.Module):
        """The :mod:`vlmcore.eval.generation` model that decodes text with ``module`` (``generates`` tasks)."""
        raise NotImplementedError(f"task {self.name!r} does not generate text")

    def eval_images(self) -> Callable[[bytes, dict], torch.Tensor]:
        """Image bytes (and the raw sample) -> the model's input ``[C, H, W]`` for evaluation
        (``generates`` tasks): the task's held-out image transform."""
        raise NotImplementedError(f"task {self.name!r} does not generate text")

    def export(self, module: nn.Module) -> dict[str, tuple[list[str], str]]:
        """Files written into ``out_dir`` at the end of the run.

        Returns:
            ``{filename: (parameter names of module, prefix stripped from the saved keys)}``;
            default: ``{"trainable.safetensors": (every parameter with requires_grad, "")}``.
        """
        return {"trainable.safetensors": ([n for n, p in module.named_parameters() if p.requires_grad], "")}

    def peer_exporters(self) -> dict[str, Callable[[nn.Module, str], None]]:
        """The peer formats ``vlmcore-export --to FORMAT`` writes the trained model in (``train/tools/export.py``).

        Returns:
            ``{format: writer}``; ``writer(module, out_dir)`` writes into the existing directory
            ``out_dir`` the files the peer library loads (e.g. ``"hf"``: a ``save_pretrained``
            directory; ``"openflamingo"``: a ``checkpoint.pt``), raising ``ValueError`` when this run's
            model has no counterpart there (naming the config key that rules it out). Default ``{}``:
            the task exports to no peer format (the CLI then says so, listing nothing).
        """
        return {}

    def load_exported(self, run_dir: str) -> nn.Module | None:
        """The model rebuilt from the exported files of ``run_dir`` alone, for evaluate-only
        (``train/tasks/run_loader.py``), when they hold all of it; default None: the loader builds the
        model with :meth:`build_model` and fills the exported parameters in."""
        return None

    @torch.no_grad()
    def run_evaluation(self, module: nn.Module, info: DistInfo, zero_stage: int) -> dict:
        """Called by the loop: eval mode, parameters gathered under ZeRO-3, then :meth:`evaluate`; the
        results get the counts of usable and skipped eval samples (``eval_counts.EvalTally``), and no
        usable sample at all is an ``EvalDataError``."""
        tally = EvalTally()  # counts every sample the encoder sees, whatever the task's split over ranks
        ctx = EvalContext(info=info, zero_stage=zero_stage, shards=expand_shards(self.cfg.data.eval.shards),
                          eval=self.cfg.data.eval, encoder=tally.wrap(self.eval_encoder()), dtype=model_dtype(module))
        was_training = module.training
        module.eval()
        try:
            with gathered(module, zero_stage):
                results = self.evaluate(module, ctx)
                if ctx.eval.eval == "generate":
                    results.update(generation_metrics(self, module, ctx))
        finally:
            module.train(was_training)
        return {**results, **tally.summary(ctx.shards)}


