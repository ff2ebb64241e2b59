"""Image <-> text retrieval Recall@k, one set of rules for every family (CLIP, SigLIP, BLIP, BLIP-2).

A query counts at k when any of its positives ranks in the top k; a positive's rank is the number
of NON-positive candidates scoring at least as high (ties rank pessimistically: an equal score
counts as better). :func:`recall_at_k` takes score matrices (BLIP / BLIP-2 re-ranked scores);
:func:`retrieval_metrics` takes features and ranks them chunk by chunk, never holding the whole
``[N_img, N_txt]`` similarity.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmcore._checks import check_positive_int


def best_positive_rank(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Rank of each query's best-scoring positive, int64 ``[Q]``.

    Args:
        scores: ``[Q, C]`` query x candidate scores.
        positive: bool ``[Q, C]``, True where the candidate is a correct answer of the query.

    The rank counts the non-positive candidates scoring ``>=`` the best positive, so a tie ranks
    the positive after the other candidate.
    """
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # [Q, 1]
    return ((scores >= best) & ~positive).sum(dim=1)


def recall_from_ranks(i2t_rank: torch.Tensor, t2i_rank: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """``{"i2t_R@k", "t2i_R@k"}``: the fraction of queries whose rank (0 = first) is below k, for every k."""
    _check_ks(ks)
    metrics = {f"i2t_R@{k}": float((i2t_rank < k).float().mean()) for k in ks}
    metrics.update({f"t2i_R@{k}": float((t2i_rank < k).float().mean()) for k in ks})
    return metrics


def with_mean_recall(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` plus ``"mean_recall"``, the mean of its entries (the CLIP and BLIP evaluations' summary)."""
    return {**metrics, "mean_recall": sum(metrics.values()) / len(metrics)}


def _check_ks(ks: Sequence[int]) -> None:
    """Raise ``ValueError`` unless ``ks`` is a non-empty sequence of positive ints."""
    if isinstance(ks, int) or len(ks) == 0:
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    for k in ks:
        check_positive_int("ks entries", k)


def _text_to_image_indices(text_to_image: torch.Tensor | None, n_img: int, n_txt: int,
                           device: torch.device) -> torch.Tensor:
    """The checked int64 ``[N_txt]`` image index of every caption on ``device`` (default ``arange``)."""
    if text_to_image is not None and (not isinstance(text_to_image, torch.Tensor)
                                      or text_to_image.dtype.is_floating_point or text_to_image.dtype == torch.bool):
        got = text_to_image.dtype if isinstance(text_to_image, torch.Tensor) else type(text_to_image).__name__
        raise TypeError(f"text_to_image must be an integer tensor [N_txt], got {got}")
    if text_to_image is None:
        if n_img != n_txt:
            raise ValueError(f"text_to_image is required when N_img ({n_img}) != N_txt ({n_txt})")
        text_to_image = torch.arange(n_txt)
    text_to_image = text_to_image.to(device=device, dtype=torch.int64)
    if tuple(text_to_image.shape) != (n_txt,):
        raise ValueError(f"text_to_image must be [N_txt={n_txt}] image indices, got shape {tuple(text_to_image.shape)}")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= n_img:
        raise ValueError(f"text_to_image must be [N_txt={n_txt}] image indices in [0, {n_img})")
    return text_to_image


def retrieval_ranks(scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, text_to_image: torch.Tensor | None = None,
                    *, positive: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query's rank (0 = first; rules in the module docstring) from score matrices.

    Args:
        scores_i2t: ``[N_img, N_txt]``; scores_t2i: ``[N_txt, N_img]``.
        text_to_image: int ``[N_txt]``, the image each caption describes; default ``arange``.
        positive: instead of ``text_to_image``, a bool ``[N_img, N_txt]`` of the correct pairs.

    Returns:
        ``(i2t_rank [N_img], t2i_rank [N_txt])`` int64.
    """
    n_img, n_txt = scores_i2t.shape
    if tuple(scores_t2i.shape) != (n_txt, n_img):
        raise ValueError(f"scores_t2i must be [N_txt, N_img] = {(n_txt, n_img)}, got {tuple(scores_t2i.shape)}")
    if positive is None:
        text_to_image = _text_to_image_indices(text_to_image, n_img, n_txt, scores_i2t.device)
        positive = text_to_image[None, :] == torch.arange(n_img, device=scores_i2t.device)[:, None]
    elif tuple(positive.shape) != (n_img, n_txt) or positive.dtype != torch.bool:
        raise ValueError(f"positive must be a bool [N_img, N_txt] = {(n_img, n_txt)} tensor")
    return best_positive_rank(scores_i2t, positive), best_positive_rank(scores_t2i, positive.T)


def recall_at_k(scores_i2t: torch.Tensor, scores_t2i: torch.Tensor, text_to_image: torch.Tensor | None = None,
                ks: Sequence[int] = (1, 5, 10), *, positive: torch.Tensor | None = None) -> dict[str, float]:
    """Image->text and text->image Recall@k (fractions in [0, 1]) from score matrices.

    Args:
        scores_i2t: ``[N_img, N_txt]``; scores_t2i: ``[N_txt, N_img]`` (e.g. ``scores_i2t.T``, or
            the ITM-re-ranked matrices of BLIP / BLIP-2 ``retrieval_scores``).
        text_to_image: int ``[N_txt]``, the image each caption describes (several captions per
            image, as in COCO / Flickr30k); default ``arange`` (one caption per image).
        ks: the k of Recall@k.
        positive: instead of ``text_to_image``, a bool ``[N_img, N_txt]`` of the correct pairs (e.g.
            also the other images whose caption is identical).

    Returns:
        ``{"i2t_R@k": ..., "t2i_R@k": ...}`` for every k (rules in the module docstring).
    """
    _check_ks(ks)  # before the ranking work
    return recall_from_ranks(*retrieval_ranks(scores_i2t, scores_t2i, text_to_image, positive=positive), ks)


def video_retrieval_metrics(score_v2t: torch.Tensor, score_t2v: torch.Tensor,
                            text_to_video: torch.Tensor | None = None, ks: Sequence[int] = (1, 5, 10)
                            ) -> dict[str, float]:
    """Video->text and text->video Recall@k and ranks from score matrices (BLIP / BLIP-2 video retrieval).

    Args:
        score_v2t: ``[N_vid, N_txt]``; score_t2v: ``[N_txt, N_vid]``.
        text_to_video: int ``[N_txt]``, the video each caption describes; default ``arange`` (MSRVTT's
            1k-A test: one caption per video).
        ks: the k of Recall@k.

    Returns:
        ``{"v2t_R@k", "t2v_R@k"}`` for every k (the rules of :func:`recall_at_k`),
        ``"mean_recall"``, and the 1-based rank of the correct answer: ``"t2v_median_rank"`` (BLIP's
        ``vid_mdR``), ``"t2v_mean_rank"``, ``"v2t_median_rank"``, ``"v2t_mean_rank"``.
    """
    v2t_rank, t2v_rank = retrieval_ranks(score_v2t, score_t2v, text_to_video)
    recalls = {name.replace("i2t", "v2t").replace("t2i", "t2v"): value
               for name, value in recall_from_ranks(v2t_rank, t2v_rank, ks).items()}
    out = with_mean_recall(recalls)
    for direction, rank in (("t2v", t2v_rank), ("v2t", v2t_rank)):
        one_based = (rank + 1).float()
        out[f"{direction}_median_rank"] = float(one_based.quantile(0.5))  # numpy's median, as BLIP's
        out[f"{direction}_mean_rank"] = float(one_based.mean())
    return out


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """Raise ``ValueError`` unless both are non-empty ``[N, d]`` tensors of one width ``d``."""
    for name, value in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] == 0:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{name} must be a non-empty 2-D [N, d] tensor, got {got}")
    if image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features and text_features must have the same width d, got "
                         f"{image_features.shape[1]} and {text_features.shape[1]}")


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: torch.Tensor | None = None, ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int = 1024) -> dict[str, float]:
    """Image->text and text->image Recall@k from features, as in the CLIP and BLIP evaluations.

    Args:
        image_features: ``[N_img, d]``; text_features: ``[N_txt, d]`` (normalized; similarity = dot;
            a SigLIP model's scores ``sigmoid(s dot + b)`` rank exactly the same, so one function serves both).
        text_to_image: int ``[N_txt]``, the image each caption describes; default ``arange``.
        ks: the k of Recall@k.
        chunk_size: rows of the similarity matrix computed at a time.

    Returns:
        ``{"i2t_R@k": ..., "t2i_R@k": ...}`` for every k (the rules of :func:`recall_at_k`: an image
        counts at k if ANY of its captions ranks in the top k), plus ``"mean_recall"`` (their mean).
    """
    _check_features(image_features, text_features)
    _check_ks(ks)
    check_positive_int("chunk_size", chunk_size)
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    text_to_image = _text_to_image_indices(text_to_image, n_img, n_txt, image_features.device)
    img = image_features.float()
    txt = text_features.float().to(img.device)
    image_ids = torch.arange(n_img, device=img.device)
    i2t_rank = torch.cat([
        best_positive_rank(img[start:start + chunk_size] @ txt.T,  # [c, N_txt]
                           text_to_image[None, :] == image_ids[start:start + chunk_size, None])
        for start in range(0, n_img, chunk_size)])
    t2i_rank = torch.cat([
        best_positive_rank(txt[start:start + chunk_size] @ img.T,  # [c, N_img]
                           text_to_image[start:start + chunk_size, None] == image_ids[None, :])
        for start in range(0, n_txt, chunk_size)])
    return with_mean_recall(recall_from_ranks(i2t_rank, t2i_rank, ks))


__all__ = ["best_positive_rank", "recall_at_k", "recall_from_ranks", "retrieval_metrics", "retrieval_ranks",
           "video_retrieval_metrics", "with_mean_recall"]
