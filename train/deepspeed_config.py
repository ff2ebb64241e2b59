"""The ``deepspeed:`` section of a run: its keys checked against the installed DeepSpeed, and the
mapping handed to ``deepspeed.initialize``.

The section is DeepSpeed's own config (a mapping, or the path of a JSON file); the trainer fills
in the batch sizes and the precision and checks the few keys it depends on. DeepSpeed has no list
of its keys: :func:`deepspeed_keys` records the ones it reads. Importing this module installs
:func:`deepspeed_problems` as a check of every ``config.parse_config`` (config.py, a leaf of the
import graph, does not import it).
"""

from __future__ import annotations

import difflib
import functools
import json
import os

from vlmcore.train.config import ConfigError, TrainConfig, install_check


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


def deepspeed_section_problems(ds, precision: str = "auto", accum_freq: int = 1) -> list[str]:
    """Problems of a ``deepspeed`` section (a mapping, or the path of a JSON file: only its existence);
    ``accum_freq``: the run's ``optim.accum_freq``."""
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
        if zero.get("stage", 0) == 3 and accum_freq > 1:
            # The features-to-loss step reads the temperature outside the engine's forward, where
            # ZeRO-3 holds only this rank's shard of it.
            out.append("deepspeed.zero_optimization.stage: 3 is not available with optim.accum_freq > 1 "
                       "(use stage 0, 1 or 2)")
    fp16 = ds.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled", False) and precision != "fp16":
        out.append("deepspeed.fp16.enabled: the trainer's precision decides; set precision: fp16 instead")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in ds:
            source = ("optim.accumulation_steps x optim.accum_freq" if key == "gradient_accumulation_steps"
                      else "data.train[*].batch_size")
            out.append(f"deepspeed.{key}: set by the trainer from {source}; remove it")
    if "gradient_clipping" in ds and not (isinstance(ds["gradient_clipping"], (int, float))
                                           and ds["gradient_clipping"] >= 0):
        out.append(f"deepspeed.gradient_clipping: must be a number >= 0, got {ds['gradient_clipping']!r}")
    return out


def deepspeed_problems(cfg: TrainConfig) -> list[str]:
    """The ``config.ConfigCheck`` of the ``deepspeed`` section (a JSON path is read later, by
    :func:`deepspeed_dict`)."""
    return deepspeed_section_problems(cfg.deepspeed, cfg.precision, cfg.optim.accum_freq)


def deepspeed_dict(cfg: TrainConfig) -> dict:
    """The DeepSpeed config as a mapping (a copy; JSON file read and checked if a path was given)."""
    if isinstance(cfg.deepspeed, str):
        with open(cfg.deepspeed, encoding="utf-8") as f:
            ds = json.load(f)
        problems = deepspeed_section_problems(ds, cfg.precision, cfg.optim.accum_freq)
        if problems:
            raise ConfigError(problems, cfg.deepspeed)
        return ds
    return json.loads(json.dumps(cfg.deepspeed))


install_check("deepspeed", deepspeed_problems)
