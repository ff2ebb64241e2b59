"""One gloo rank for tests/train/test_accum_freq.py (run as a script, not collected by pytest).

Usage: ``python accum_freq_worker.py RANK WORLD INIT_FILE OUT_FILE``

For each case (CLIP with ``local_loss`` over the gathered columns; SigLIP with the ring and the gather
exchange) every rank builds the same tiny model and its own K micro-batches of B pairs, then computes
over ``group=WORLD`` the task's plain loss of its K * B rows, and the feature-cache scheme over the K
micro-batches. Saves ``{case: {"big": (loss, gradients), "scheme": (loss, gradients)}}`` with ``torch.save``.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

# Run as a script: make the tests folder importable (for helpers.*).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from helpers.accum_freq import big_batch, micro_batches, model_and_task, scheme  # noqa: E402

K, B = 3, 4
CASES = {"clip": ("clip", "gather"), "siglip_ring": ("siglip", "ring"), "siglip_gather": ("siglip", "gather")}


def main(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    for case, (loss, dist_impl) in CASES.items():
        model, task = model_and_task(loss, dist_impl=dist_impl)
        batches = micro_batches(K, B, seed=100 + rank)
        big_loss, _, big_grads = big_batch(task, model, batches, dist.group.WORLD)
        loss_value, _, grads = scheme(task, model, batches, dist.group.WORLD)
        results[case] = {"big": (big_loss, big_grads), "scheme": (loss_value, grads)}
    torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
