"""ITM hard negatives (BLIP, BLIP-2): one non-positive candidate per row, drawn on the device.

BLIP and LAVIS draw each row's negative with ``torch.multinomial(softmax(similarity), 1)`` in a
host loop over the rows. Here the same distribution is drawn for all rows at once with the
Gumbel-max trick: ``argmax(log w + G)`` with ``G ~ Gumbel(0, 1)`` picks column j with probability
``w_j / sum w``. The positives get ``log w = -inf``, so a positive is never drawn, and nothing is
read on the host.
"""

from __future__ import annotations

import torch


def sample_hard_negatives(similarity: torch.Tensor, positive_mask: torch.Tensor, *, weight_floor: float,
                          noise: torch.Tensor | None = None, generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative column per row, drawn with probability ``softmax(similarity) + weight_floor``
    restricted to the non-positive columns, entirely on the tensors' device (no host sync).

    Args:
        similarity: ``[b, N]`` scores (ITC similarity / temperature).
        positive_mask: bool ``[b, N]``, True where the column is a positive of the row (never drawn).
        weight_floor: added to every softmax weight (BLIP: 1e-4, so that no candidate has weight 0;
            BLIP-2: 0).
        noise: ``[b, N]`` uniform(0, 1) draws to use; default: drawn here from ``generator``.
        generator: random generator on the tensors' device (default: the global one); only
            without ``noise``.

    Returns:
        ``(index long [b], valid bool [b])``; ``valid`` is False for a row whose columns are all
        positives (its index is then meaningless and must be weighted out).
    """
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2:
        raise ValueError("similarity must be a [b, N] tensor")
    if not isinstance(positive_mask, torch.Tensor) or positive_mask.dtype != torch.bool \
            or positive_mask.shape != similarity.shape:
        raise ValueError(f"positive_mask must be a bool tensor of the similarity's shape {tuple(similarity.shape)}")
    if noise is None:
        noise = torch.rand(similarity.shape, device=similarity.device, generator=generator)
    elif noise.shape != similarity.shape:
        raise ValueError(f"noise must be uniform draws of the similarity's shape {tuple(similarity.shape)}, "
                         f"got {tuple(noise.shape)}")
    log_weights = similarity.detach().float()
    if weight_floor:
        log_weights = (torch.softmax(log_weights, dim=1) + weight_floor).log()
    # Without a floor the scores themselves serve: log softmax differs from them by one constant per
    # row, which does not move the argmax.
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(noise.float().clamp(min=tiny, max=1.0 - 1e-7)))
    index = (log_weights.masked_fill(positive_mask, float("-inf")) + gumbel).argmax(dim=1)
    return index, (~positive_mask).any(dim=1)


__all__ = ["sample_hard_negatives"]
