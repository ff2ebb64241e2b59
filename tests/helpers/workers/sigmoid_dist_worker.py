"""One gloo rank for tests/kernels/test_sigmoid_contrastive_distributed.py (run as a script, not collected).

Usage: ``python sigmoid_dist_worker.py RANK WORLD INIT_FILE OUT_FILE``

Every rank builds the same global batch (:func:`global_batch`, fixed seed), keeps its slice, and for
each (backend, dist_impl, group ids, frozen text) case of :data:`CASES` runs the distributed SigLIP
loss forward + backward with ``group=WORLD``, the loss multiplied by a rank-dependent factor (so the
test sees that each rank's own incoming gradient scales the partials it sends home). Features live
on CUDA when present (gloo moves CUDA tensors through the host), else on CPU with the kernels in the
Triton interpreter. Saves ``{case: {loss, d_image, d_text, d_logit_scale, d_logit_bias}}`` and, under
``"ring_events"``, the order of the ring's posts, scores and waits (:func:`ring_events`).
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

N_LOCAL, DIM, SCALE, BIAS = 6, 24, 10.0, -5.0
# (backend, dist_impl, with group ids, text tower frozen)
CASES = [(name, impl, ids, False) for name in ("reference", "triton") for impl in ("ring", "gather")
         for ids in (False, True)] + [("triton", "ring", False, True)]


def upstream(rank: int) -> float:
    """The incoming gradient of rank ``rank``'s loss (different per rank)."""
    return 1.0 + 0.5 * rank


def global_batch(world: int):
    """``(image [W n, d], text [W n, d], ids [W n], scale, bias)``, identical on every rank.

    ids: pairs of consecutive rows share an id (two captions per image), and the first row of rank 1
    takes the last id of rank 0, so one positive pair spans the two ranks.
    """
    gen = torch.Generator().manual_seed(4321)
    image = F.normalize(torch.randn(world * N_LOCAL, DIM, generator=gen), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(world * N_LOCAL, DIM, generator=gen), dim=1)
    ids = torch.arange(world * N_LOCAL) // 2
    ids[N_LOCAL] = ids[N_LOCAL - 1]  # an id shared between rank 0 and rank 1
    return image, text, ids, torch.tensor(SCALE), torch.tensor(BIAS)


def ring_events(image, text, scale, bias) -> list[str]:
    """The order of the ring's forward: exchange posted, block scored, exchange waited on."""
    import vlmcore.kernels.sigmoid_contrastive as module
    from vlmcore.kernels import backend, sigmoid_contrastive_loss

    events = []
    real_exchange, real_block = module._exchange, module._triton_block

    class Logged:
        def __init__(self, request):
            self.request = request

        def wait(self):
            events.append("wait")
            return self.request.wait()

    def exchange(*args):
        received, requests = real_exchange(*args)
        events.append("post")
        return received, [Logged(r) for r in requests]

    def block(*args):
        events.append("score")
        return real_block(*args)

    module._exchange, module._triton_block = exchange, block
    try:
        with backend("triton"):
            sigmoid_contrastive_loss(image.requires_grad_(), text.requires_grad_(), scale, bias,
                                     group=dist.group.WORLD, dist_impl="ring").backward()
    finally:
        module._exchange, module._triton_block = real_exchange, real_block
    return events


def main(rank: int, world: int, init_file: str, out_file: str) -> None:
    from vlmcore.kernels import backend, sigmoid_contrastive_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    image, text, ids, scale, bias = (t.to(device) for t in global_batch(world))
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    results = {}
    for case in CASES:
        name, impl, with_ids, frozen_text = case
        leaves = [image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_(not frozen_text),
                  scale.clone().requires_grad_(), bias.clone().requires_grad_()]
        kwargs = {"image_group_ids": ids[rows], "text_group_ids": ids[rows]} if with_ids else {}
        with backend(name):
            loss = sigmoid_contrastive_loss(*leaves, group=dist.group.WORLD, dist_impl=impl, **kwargs)
        (loss * upstream(rank)).backward()
        results[case] = {key: (None if value is None else value.detach().cpu()) for key, value in (
            ("loss", loss), ("d_image", leaves[0].grad), ("d_text", leaves[1].grad),
            ("d_logit_scale", leaves[2].grad), ("d_logit_bias", leaves[3].grad))}
    results["ring_events"] = ring_events(image[rows], text[rows], scale, bias)
    torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
