"""vlmcore.train: the DeepSpeed ZeRO trainer for every model family, WebDataset data, demos.

Tasks (``task:`` in the config, one file each in :mod:`vlmcore.train.tasks`): ``clip``, ``siglip``,
``flamingo``, ``frozen``, ``blip_pretrain``, ``blip_retrieval``, ``blip_caption``, ``blip_vqa``,
``blip_nlvr``, ``blip2_stage1``, ``blip2_stage2``, ``vilbert``, ``vlbert``.

Command line, config schema and its validation at the top; :mod:`vlmcore.train.runtime` (the loop,
checkpoints, distributed helpers, metrics); :mod:`vlmcore.train.data` (shards, decoding,
preprocessing, tokenizers); :mod:`vlmcore.train.tasks` (the task protocol, registry and the
vision towers from the config); :mod:`vlmcore.train.tools` (demos, CapFilt, the shapes generators,
the config reference). The repository's ``docs/training/`` describes them.

``main(argv)`` runs a training in this process (a test or notebook can call it; under a launcher
every rank calls it); ``vlmcore-train`` / ``python -m vlmcore.train`` is the same from the shell.
"""

from vlmcore.train.cli import main
from vlmcore.train.config import ConfigError, TrainConfig, load_config
from vlmcore.train.runtime.trainer import NonFiniteLossError, Trainer, train

__all__ = ["ConfigError", "NonFiniteLossError", "TrainConfig", "Trainer", "load_config", "main", "train"]
