"""One gloo rank for tests/kernels/test_contrastive_distributed.py (run as a script, not collected by pytest).

Usage: ``python contrastive_dist_worker.py RANK WORLD INIT_FILE OUT_FILE``

Every rank builds the same global batch (:func:`global_batch`, fixed seed), keeps its slice, and for
each backend (reference, triton) and ``local_loss`` (False, True) runs the distributed loss forward +
backward with ``group=WORLD``. The features live on CUDA when it is present (every rank on the same
GPU; gloo gathers and reduces CUDA tensors through the host), so the triton cases run the compiled
kernels; otherwise on CPU, with the kernels in the Triton interpreter (the caller sets
``TRITON_INTERPRET=1``). Then the multi-positive global loss
with group ids (``IDS_CASES``). Saves ``{(backend, local_loss or "ids"): {loss, [i2t_acc, t2i_acc,]
d_image, d_text, d_logit_scale}}`` (CPU tensors) with ``torch.save``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

N_LOCAL, DIM, LABEL_SMOOTHING = 6, 24, 0.1
CASES = [(name, local) for name in ("reference", "triton") for local in (False, True)]
# Multi-positive (group ids) cases: the global loss with ids gathered across ranks.
IDS_CASES = ("reference", "triton")


def global_ids(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image_ids, text_ids)`` ``[world * N_LOCAL]``: groups of 3 that span both ranks' rows."""
    gen = torch.Generator().manual_seed(99)
    image_ids = torch.arange(world * N_LOCAL) // 3
    return image_ids, image_ids[torch.randperm(world * N_LOCAL, generator=gen)]


def global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(image [world * N_LOCAL, DIM], text [same], logit_scale [])``, identical on every rank."""
    gen = torch.Generator().manual_seed(1234)
    image = F.normalize(torch.randn(world * N_LOCAL, DIM, generator=gen), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(world * N_LOCAL, DIM, generator=gen), dim=1)
    return image, text, torch.tensor(12.0)


def main(rank: int, world: int, init_file: str, out_file: str) -> None:
    from vlmcore.kernels import backend, contrastive_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image, text, scale = (t.to(device) for t in global_batch(world))
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    results = {}
    for name, local in CASES:
        leaves = [t.clone().requires_grad_() for t in (image[rows], text[rows], scale)]
        with backend(name):
            out = contrastive_loss(*leaves, group=dist.group.WORLD, local_loss=local,
                                   label_smoothing=LABEL_SMOOTHING, output_dict=True)
        out["loss"].backward()
        results[(name, local)] = {
            key: value.detach().cpu() for key, value in (
                ("loss", out["loss"]), ("i2t_acc", out["i2t_acc"]), ("t2i_acc", out["t2i_acc"]),
                ("d_image", leaves[0].grad), ("d_text", leaves[1].grad), ("d_logit_scale", leaves[2].grad),
            )
        }
    image_ids, text_ids = (t.to(device) for t in global_ids(world))
    for name in IDS_CASES:
        leaves = [t.clone().requires_grad_() for t in (image[rows], text[rows], scale)]
        with backend(name):
            loss = contrastive_loss(*leaves, group=dist.group.WORLD, label_smoothing=LABEL_SMOOTHING,
                                    image_ids=image_ids[rows], text_ids=text_ids[rows])
        loss.backward()
        results[(name, "ids")] = {key: value.detach().cpu() for key, value in (
            ("loss", loss), ("d_image", leaves[0].grad), ("d_text", leaves[1].grad),
            ("d_logit_scale", leaves[2].grad))}
    torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
