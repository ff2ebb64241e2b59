"""Checks of everything a run reads, done before DeepSpeed starts (one :class:`ConfigError` for all).

:func:`config.load_config` checks the configuration itself (keys, types, values, and DeepSpeed's
keys through ``deepspeed_config``). This module checks what the configuration points at, once the
shapes data and the tokenizer that the run may generate exist (the Trainer's setup, after its setup
hooks such as ``tools/demo_inputs.py``):

- every training and eval shard that is a local path exists (a ``pipe:`` command or a URL is
  accepted unchecked: only reading it can tell);
- the tokenizer (a ``tokenizers`` JSON file or a local HF tokenizer directory) loads;
- ``model.lm.path`` is a directory with a ``config.json`` (transformers would otherwise report a
  missing directory as "Repo id must be in the form ...");
- ``model.vision.init`` and ``data.eval.classes`` exist;
- the first eval sample is usable by the task (``Task.check_eval_sample``: e.g. CLIP zero-shot
  needs ``label`` in the sample's json and a classes file), and most of the next few are
  (``eval_counts.eval_sample_problems``).
"""

from __future__ import annotations

import glob
import os
from typing import TYPE_CHECKING

from braceexpand import braceexpand
from vlmcore.train.config import ConfigError
from vlmcore.train.data.eval_counts import eval_sample_problems
from vlmcore.train.data.shards import expand_shard_spec, is_remote, spec_patterns
from vlmcore.train.tasks import get_task

if TYPE_CHECKING:
    from vlmcore.train.config import TrainConfig
    from vlmcore.train.data.tokenizer import Tokenizer


def shard_problems(spec, where: str) -> list[str]:
    """Missing local shards of ``spec`` (brace patterns / globs / ``a::b`` lists, or a list of them)."""
    patterns = spec_patterns(spec)
    missing, count = [], 0
    for pattern in patterns:
        if is_remote(pattern):
            count += 1
            continue
        for path in braceexpand(pattern):
            if any(c in path for c in "*?["):
                matches = glob.glob(path)
                count += len(matches)
                if not matches:
                    missing.append(f"{path} (no match)")
            else:
                count += 1
                if not os.path.isfile(path):
                    missing.append(path)
    if missing:
        shown = ", ".join(missing[:5]) + (f" ... ({len(missing) - 5} more)" if len(missing) > 5 else "")
        return [f"{where}: {len(missing)} of {max(count, len(missing))} shard(s) missing: {shown}"]
    if count == 0:
        return [f"{where}: {spec!r} names no shard"]
    return []


def tokenizer_problems(cfg: TrainConfig) -> list[str]:
    path = cfg.tokenizer.path
    if cfg.tokenizer.type == "open_clip":  # its vocabulary ships inside the open_clip package
        return []
    if os.path.isfile(path):
        return []
    if os.path.isdir(path):
        known = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
        if not any(os.path.isfile(os.path.join(path, name)) for name in known):
            return [f"tokenizer.path: directory {path!r} holds no tokenizer file ({', '.join(known)})"]
        return []
    hint = " (or set tokenizer.train_from_shapes with data.shapes)" if not cfg.tokenizer.train_from_shapes else ""
    return [f"tokenizer.path: {path!r} does not exist{hint}"]


def model_path_problems(cfg: TrainConfig) -> list[str]:
    out = []
    lm = cfg.model.lm
    if lm is not None and lm.path:
        if not os.path.isdir(lm.path):
            out.append(f"model.lm.path: {lm.path!r} is not a directory (a local Hugging Face model directory "
                       "is expected; nothing is downloaded)")
        elif not os.path.isfile(os.path.join(lm.path, "config.json")):
            out.append(f"model.lm.path: directory {lm.path!r} has no config.json (not a Hugging Face model "
                       "directory: save it with save_pretrained)")
    vision = cfg.model.vision
    if vision.init and not os.path.exists(vision.init):
        out.append(f"model.vision.init: {vision.init!r} does not exist")
    if vision.checkpoint and not os.path.isfile(vision.checkpoint):
        out.append(f"model.vision.checkpoint: {vision.checkpoint!r} does not exist")
    if vision.type == "hf" and vision.path and not os.path.isfile(os.path.join(vision.path, "config.json")):
        out.append(f"model.vision.path: {vision.path!r} is not a Hugging Face model directory (no config.json)")
    return out


def input_problems(cfg: TrainConfig) -> list[str]:
    """Every missing path of ``cfg`` (shards, tokenizer, LM directory, vision init, classes file)."""
    out = []
    for i, d in enumerate(cfg.data.train):
        out += shard_problems(d.shards, f"data.train.{i}.shards")
    if cfg.data.eval is not None:
        out += shard_problems(cfg.data.eval.shards, "data.eval.shards")
        classes = cfg.data.eval.classes
        if classes and not os.path.isfile(classes):
            out.append(f"data.eval.classes: {classes!r} does not exist")
    return out + tokenizer_problems(cfg) + model_path_problems(cfg)


#: The keys of a transformers config that hold the longest sequence its position embeddings cover.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def context_length_problems(cfg: TrainConfig, tok: Tokenizer) -> list[str]:
    """``tokenizer.context_length`` above the LM's position limit (``model.lm``) or the tokenizer's
    ``model_max_length``: a run that would fail, or crawl, at its first long text."""
    import json

    limits = []
    lm = cfg.model.lm
    lm_config = dict(lm.config) if lm is not None else {}
    if lm is not None and lm.path and os.path.isfile(os.path.join(lm.path, "config.json")):
        with open(os.path.join(lm.path, "config.json"), encoding="utf-8") as f:
            lm_config = json.load(f)
    key = next((k for k in POSITION_KEYS if isinstance(lm_config.get(k), int)), None)
    if key is not None:
        limits.append((lm_config[key], f"the language model's {key}"))
    model_max = getattr(getattr(tok, "_hf", None), "model_max_length", None)
    if isinstance(model_max, int) and model_max < 10**6:  # transformers' "no limit" is 1e30
        limits.append((model_max, "the tokenizer's model_max_length"))
    T = cfg.tokenizer.context_length
    return [f"tokenizer.context_length: {T} is above {what} ({limit})" for limit, what in limits if T > limit]


def validate_inputs(cfg: TrainConfig, load_tokenizer) -> Tokenizer:
    """Check every input of the run; returns the loaded tokenizer. Raises :class:`ConfigError`.

    ``load_tokenizer()`` loads ``cfg.tokenizer`` (called only when the path exists; its ValueError
    becomes a problem line). The eval data is checked on its first sample by the task
    (``Task.check_eval_sample``) once the tokenizer is there.
    """
    problems = input_problems(cfg)
    tok = None
    if not any(p.startswith("tokenizer.") for p in problems):
        try:
            tok = load_tokenizer()
        except (ValueError, OSError) as e:
            problems.append(f"tokenizer.path: {cfg.tokenizer.path!r} does not load: {e}")
    if tok is not None:
        problems += context_length_problems(cfg, tok)
    if tok is not None and cfg.data.eval is not None and not any(p.startswith("data.eval") for p in problems):
        local = [s for s in expand_shard_spec(cfg.data.eval.shards) if not is_remote(s)]
        problems += eval_sample_problems(get_task(cfg.task)(cfg, tok), local)  # the first sample and a few more
    if problems:
        raise ConfigError(problems, "inputs")
    return tok
