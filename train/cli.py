"""Command line of the trainer: ``vlmcore-train --config FILE.yaml [key=value ...]``.

Single process: ``vlmcore-train --config clip_tiny.yaml``. Several GPUs or CPU ranks:
``deepspeed --num_gpus N $(which vlmcore-train) --config ...``; several nodes: add ``--hostfile``.
Overrides use dotted keys with YAML values: ``max_steps=50 deepspeed.zero_optimization.stage=3``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vlmcore.train.config import ConfigError, load_config

if TYPE_CHECKING:
    from vlmcore.train.runtime.trainer import StepEndHook


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vlmcore-train", description="vlmcore DeepSpeed trainer")
    parser.add_argument("--config", required=True, help="YAML file (see vlmcore/train/configs/)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="set by the deepspeed launcher; LOCAL_RANK from the environment otherwise")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides (values parsed as YAML)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, on_step_end: Sequence[StepEndHook] = ()) -> dict:
    """Validate the config, then train in this process; returns the final evaluation metrics.

    The demo's inputs (``data.shapes``, ``tokenizer.train_from_shapes``) are made by a setup hook of the
    Trainer; ``on_step_end`` callables ``(trainer, step)`` run after every step (tests inject faults there).
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_config(args.config, args.overrides)
    from vlmcore.train.runtime.trainer import train
    from vlmcore.train.tools.demo_inputs import prepare_demo_inputs

    return train(cfg, args.local_rank, on_setup=[prepare_demo_inputs], on_step_end=on_step_end)


def console_main() -> None:
    try:
        main()
    except ConfigError as e:
        print(f"vlmcore-train: {e}", file=sys.stderr)
        sys.exit(2)


