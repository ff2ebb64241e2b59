"""vlmcore.train: the DeepSpeed ZeRO trainer (CLIP, Flamingo, Frozen), WebDataset data, shapes demo.

``main(argv)`` runs a training in this process (a test or notebook can call it; under a launcher
every rank calls it); ``vlmcore-train`` / ``python -m vlmcore.train`` is the same from the shell.
"""

from vlmcore.train.cli import main
from vlmcore.train.config import ConfigError, TrainConfig, load_config
from vlmcore.train.runtime.trainer import NonFiniteLossError, Trainer, train

__all__ = ["ConfigError", "NonFiniteLossError", "TrainConfig", "Trainer", "load_config", "main", "train"]
