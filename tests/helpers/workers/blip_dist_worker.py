"""One rank of the 2-process BLIP check (tests/models/test_blip_distributed.py): queues enqueued from all
ranks (with their image ids), all-rank ITM hard negatives with image-id masking, backward through
the gathers."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

# Run as a script: make the tests folder importable (for helpers.*).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import vlmcore.blip.model as blip  # noqa: E402
from helpers.tiny_blip import tiny_batch, tiny_blip  # noqa: E402

B = 4
IMAGE_IDS = [[0, 1, 2, 3], [3, 4, 5, 6]]  # image 3 is on both ranks: never a negative of either


def main(rank: int, world: int, init_file: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = tiny_blip(queue_size=16, momentum=0.9).train()
    images, ids, mask = tiny_batch(b=B, seed=10 + rank)
    recorded = []
    real = blip.sample_hard_negatives

    def record(similarity, positive_mask, generator=None):
        index, valid = real(similarity, positive_mask, generator=generator)
        recorded.append((positive_mask.clone(), index.clone(), valid.clone()))
        return index, valid

    blip.sample_hard_negatives = record
    image_ids = torch.tensor(IMAGE_IDS[rank])
    out = model(images, ids, mask, losses=("itc", "itm"), image_ids=image_ids, group=dist.group.WORLD,
                all_rank_negatives=True, generator=torch.Generator().manual_seed(rank))
    out["loss"].backward()
    with torch.no_grad():
        image_m, text_m = model.momentum_features(images, ids, mask)
    torch.save({"recorded": recorded, "image_queue": model.image_queue[:2 * B].clone(), "image_m": image_m,
                "idx_queue": model.idx_queue.clone(),
                "loss": out["loss"].detach(), "itm": out["itm"].detach(),
                "vision_grad": model.visual_encoder.conv1.weight.grad.clone()}, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
