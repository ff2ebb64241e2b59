"""The training runtime: the loop, checkpoints, distributed helpers, metrics logging."""
