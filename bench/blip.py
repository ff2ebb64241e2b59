"""Benchmark of BLIP's ITC with momentum distillation against [momentum batch; queue].

Providers: ``vlmcore`` (the fused op, kernels/momentum_contrastive.py: the ``[b, b + Q]`` logits
are never stored) and ``reference`` (BLIP's math with the logits and the soft targets materialized
in fp32, kernels/reference.py).

Floors, both directions together, N = b + Q columns: forward 8 b N e FLOPs (online and momentum
scores), backward 12 b N e (both recomputed + the row-gradient product), forward + backward 20 b N e.
Bytes: per direction the online and momentum rows (2 b e) and the columns (N e) read; backward
also writes the row gradients (b e).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vlmcore.kernels import momentum_contrastive_loss
from vlmcore.kernels.reference import momentum_contrastive_loss_reference

from .harness import Case, Provider, RunContext, run_op

OP = "blip_itc"
GPU_SHAPES = ((75, 57600), (256, 57600), (512, 65536))  # (b per rank, queue): BLIP's 75 x 57,600 first
QUICK_SHAPES = ((16, 48), (32, 96))
DIM = 256
QUICK_DIM = 32
ALPHA = 0.4


def floors(b: int, q: int, e: int, element_size: int) -> tuple[dict[str, float], dict[str, float]]:
    n = b + q
    flops = {"fwd": 8.0 * b * n * e, "bwd": 12.0 * b * n * e, "fwd_bwd": 20.0 * b * n * e}
    read = 2.0 * (2 * b * e + n * e) * element_size
    written = 2.0 * b * e * element_size
    return flops, {"fwd": read, "bwd": read + written, "fwd_bwd": read + written}


def make_case(b: int, q: int, e: int, ctx: RunContext) -> Case:
    def make_inputs():
        g = torch.Generator(device=ctx.device).manual_seed(b + q)

        def unit(rows):
            return F.normalize(torch.randn(rows, e, device=ctx.device, generator=g), dim=-1).to(ctx.dtype)

        return {"image": unit(b).requires_grad_(), "text": unit(b).requires_grad_(), "image_m": unit(b),
                "text_m": unit(b), "image_queue": unit(q), "text_queue": unit(q),
                "temp": torch.tensor(0.07, device=ctx.device).requires_grad_()}

    flops, nbytes = floors(b, q, e, torch.tensor([], dtype=ctx.dtype).element_size())
    return Case(shape=f"b={b} Q={q} e={e}", x=b + q, make_inputs=make_inputs, flops=flops, bytes=nbytes)


def _vlmcore(case, inputs):
    i = inputs
    return lambda: momentum_contrastive_loss(i["image"], i["text"], i["image_m"], i["text_m"], i["temp"], ALPHA,
                                             image_queue=i["image_queue"], text_queue=i["text_queue"])


def _reference(case, inputs):
    i = inputs
    # the user's concat of [momentum batch; queue] is part of both providers' timed call
    return lambda: momentum_contrastive_loss_reference(
        i["image"], i["text"], i["image_m"], i["text_m"], torch.cat([i["image_m"], i["image_queue"]]),
        torch.cat([i["text_m"], i["text_queue"]]), i["temp"], ALPHA)


PROVIDERS = [Provider("vlmcore", _vlmcore, backend="triton"), Provider("reference", _reference, backend="reference")]


def cases(ctx: RunContext) -> list[Case]:
    if ctx.quick:
        return [make_case(b, q, QUICK_DIM, ctx) for b, q in QUICK_SHAPES]
    return [make_case(b, q, DIM, ctx) for b, q in GPU_SHAPES]


def run(ctx: RunContext) -> None:
    run_op(OP, cases(ctx), PROVIDERS, ctx)
