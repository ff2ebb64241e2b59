"""The one home of the all-gathers every op and model uses (``vlmcore.distributed`` re-exports them).

- :func:`rank_and_world`: ``(rank, world size)`` of a process group, ``(0, 1)`` without one.
- :func:`all_gather_with_grad`: differentiable gather of equal ``[n, ...]`` blocks (OpenCLIP's
  ``gather_with_grad=True``), built on all-reduce so it also runs on gloo.
- :func:`all_gather_no_grad`: the same without a graph (LAVIS ``concat_all_gather``), e.g. ids,
  momentum features, hard-negative candidates.
- :func:`gather_rows`: one of the two by flag, and a no-op with one process.

Nothing here reads a tensor to the host.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world(group) -> tuple[int, int]:
    """``(rank, world size)`` of ``group``, ``(0, 1)`` without one (or without torch.distributed)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_no_grad(local: torch.Tensor, group) -> torch.Tensor:
    """``[world * n, ...]``: every rank's ``local`` ``[n, ...]`` in rank order, detached."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather ``[n, ...]`` blocks from every rank into ``[world * n, ...]``, differentiable.

    Backward sums the incoming gradient over ranks (all-reduce) and returns this rank's slice:
    the same gradient as OpenCLIP's ``gather_with_grad=True`` (``torch.distributed.nn.all_gather``),
    but built on all-reduce so it also runs on gloo, which has no reduce-scatter.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor):
        grad = grad_gathered.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def all_gather_with_grad(local: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather of equal-sized ``[n, ...]`` blocks over ``group`` (rank order)."""
    return _AllGatherWithGrad.apply(local, group)


def gather_rows(local: torch.Tensor, group, *, with_grad: bool) -> torch.Tensor:
    """``[world * b, ...]``: every rank's ``local`` ``[b, ...]`` in rank order.

    ``with_grad``: differentiable (:func:`all_gather_with_grad`); else detached
    (:func:`all_gather_no_grad`), also with one process.
    """
    _, world = rank_and_world(group)
    if world == 1:
        return local if with_grad else local.detach()
    return all_gather_with_grad(local, group) if with_grad else all_gather_no_grad(local, group)
