"""Benchmark of BLIP's ITC with momentum distillation against [momentum batch; queue].

Providers: ``vlmcore`` (the fused op, kernels/momentum_contrastive.py: the ``[b, b + Q]`` logits
are never stored) and ``reference`` (BLIP's math with the logits and the soft targets materialized
in fp32, kernels/reference.py).

Floors, both directions together, N = b + Q columns: forward 8 b N e FLOPs (online and momentum
scores), backward 12 b N e (both recomputed + the row-gradient product), forward + backward 20 b N e.
Bytes: per direction the online and momentum rows (2 b e) and the columns (N e) read; backward
also writes the row gradients (b e).

Op ``blip_itc_ids``: the same loss with image-id positives, as in BLIP's retrieval fine-tuning
(COCO: five captions per image, so ids repeat in the batch and in the queue); the floor adds the
int64 row and column ids read once per direction (8 (b + N) bytes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vlmcore.kernels import momentum_contrastive_loss
from vlmcore.kernels.reference import momentum_contrastive_loss_reference

from .harness import Case, Gate, Provider, RunContext, run_op

OP = "blip_itc"
OP_IDS = "blip_itc_ids"
CAPTIONS_PER_IMAGE = 5  # COCO
GPU_SHAPES = ((75, 57600), (256, 57600), (512, 65536))  # (b per rank, queue): BLIP's 75 x 57,600 first
QUICK_SHAPES = ((16, 48), (32, 96))
DIM = 256
QUICK_DIM = 32
ALPHA = 0.4


def floors(b: int, q: int, e: int, element_size: int, with_ids: bool = False
           ) -> tuple[dict[str, float], dict[str, float]]:
    n = b + q
    flops = {"fwd": 8.0 * b * n * e, "bwd": 12.0 * b * n * e, "fwd_bwd": 20.0 * b * n * e}
    read = 2.0 * (2 * b * e + n * e) * element_size
    written = 2.0 * b * e * element_size
    ids = 2.0 * 8 * (b + n) if with_ids else 0.0  # row and column ids, read once per direction
    return flops, {"fwd": read + ids, "bwd": read + written + ids, "fwd_bwd": read + written + ids}


def make_case(b: int, q: int, e: int, ctx: RunContext, with_ids: bool = False) -> Case:
    def make_inputs():
        g = torch.Generator(device=ctx.device).manual_seed(b + q)

        def unit(rows):
            return F.normalize(torch.randn(rows, e, device=ctx.device, generator=g), dim=-1).to(ctx.dtype)

        inputs = {"image": unit(b).requires_grad_(), "text": unit(b).requires_grad_(), "image_m": unit(b),
                  "text_m": unit(b), "image_queue": unit(q), "text_queue": unit(q),
                  "temp": torch.tensor(0.07, device=ctx.device).requires_grad_(), "ids": None, "queue_ids": None}
        if with_ids:  # consecutive captions share an image; the queue holds the previous steps' images
            inputs["ids"] = torch.arange(q, q + b, device=ctx.device) // CAPTIONS_PER_IMAGE
            inputs["queue_ids"] = torch.arange(q, device=ctx.device) // CAPTIONS_PER_IMAGE
        return inputs

    flops, nbytes = floors(b, q, e, torch.tensor([], dtype=ctx.dtype).element_size(), with_ids)
    return Case(shape=f"b={b} Q={q} e={e}", x=b + q, make_inputs=make_inputs, flops=flops, bytes=nbytes)


def _vlmcore(case, inputs):
    i = inputs
    return lambda: momentum_contrastive_loss(i["image"], i["text"], i["image_m"], i["text_m"], i["temp"], ALPHA,
                                             image_queue=i["image_queue"], text_queue=i["text_queue"],
                                             ids=i["ids"], queue_ids=i["queue_ids"])


def _reference(case, inputs):
    i = inputs
    # the user's concat of [momentum batch; queue] is part of both providers' timed call
    column_ids = None if i["ids"] is None else torch.cat([i["ids"], i["queue_ids"]])
    return lambda: momentum_contrastive_loss_reference(
        i["image"], i["text"], i["image_m"], i["text_m"], torch.cat([i["image_m"], i["image_queue"]]),
        torch.cat([i["text_m"], i["text_queue"]]), i["temp"], ALPHA, ids=i["ids"], column_ids=column_ids)


PROVIDERS = [Provider("vlmcore", _vlmcore, backend="triton"), Provider("reference", _reference, backend="reference")]


def cases(ctx: RunContext, with_ids: bool = False) -> list[Case]:
    if ctx.quick:
        return [make_case(b, q, QUICK_DIM, ctx, with_ids) for b, q in QUICK_SHAPES]
    return [make_case(b, q, DIM, ctx, with_ids) for b, q in GPU_SHAPES]


def run(ctx: RunContext) -> None:
    run_op(OP, cases(ctx), PROVIDERS, ctx, gate=Gate(PROVIDERS[1]))
    run_op(OP_IDS, cases(ctx, with_ids=True), PROVIDERS, ctx, gate=Gate(PROVIDERS[1]))
