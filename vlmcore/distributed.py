"""Distributed helpers of the models: rank / world of a group and the all-gathers with and without
gradient. One implementation, in :mod:`vlmcore.kernels._distributed` (the ops need it and import
nothing of the models); this module is its public name for models and the trainer."""

from vlmcore.kernels._distributed import all_gather_no_grad, all_gather_with_grad, gather_rows, rank_and_world

__all__ = ["all_gather_no_grad", "all_gather_with_grad", "gather_rows", "rank_and_world"]
