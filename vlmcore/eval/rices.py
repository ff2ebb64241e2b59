"""RICES (Yang et al. 2022; Flamingo's retrieval-based in-context example selection): a query's
demonstrations are the training images closest to it in a CLIP image embedding.

OpenFlamingo ``eval/rices.py``: L2-normalized image features of the whole training set, computed
once; per query, the ``k`` highest cosine similarities, returned with the *most similar last*
(closest to the query in the prompt). Here the embedding is any callable ``images -> [N, D]``
(:meth:`vlmcore.CLIP.encode_image` of our CLIP, or any tower), and the training features are cached
to a file once (:func:`cached_features`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def image_features(encode: ImageEncoder, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """L2-normalized float32 features ``[N, D]`` of image batches ``[b, C, H, W]`` (in order), on CPU."""
    out = [torch.nn.functional.normalize(encode(images).float(), dim=-1).cpu() for images in batches]
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out)


def cached_features(path: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The features saved at ``path``, or ``compute()`` saved there first (written atomically)."""
    if os.path.isfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    features = compute()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(features, path + ".tmp")
    os.replace(path + ".tmp", path)
    return features


class Rices:
    """Nearest training images by cosine similarity.

    Args:
        train_features: ``[N, D]`` features of the demonstration set (normalized here again, so raw
            embeddings work too).
    """

    def __init__(self, train_features: torch.Tensor):
        if train_features.dim() != 2 or train_features.shape[0] == 0:
            raise ValueError(f"train_features must be [N, D] with N >= 1, got {tuple(train_features.shape)}")
        self.features = torch.nn.functional.normalize(train_features.float(), dim=-1)

    def find(self, query_features: torch.Tensor, k: int) -> list[list[int]]:
        """For each query ``[B, D]``: the indices of its ``k`` most similar training images, the most
        similar *last* (OpenFlamingo's order)."""
        if not 0 <= k <= self.features.shape[0]:
            raise ValueError(f"k must be in [0, {self.features.shape[0]}] (the training features), got {k}")
        queries = torch.nn.functional.normalize(query_features.float().reshape(-1, self.features.shape[1]), dim=-1)
        similarity = queries @ self.features.T  # [B, N]
        nearest = similarity.topk(k, dim=-1).indices  # [B, k], most similar first
        return [list(reversed(row)) for row in nearest.tolist()]
