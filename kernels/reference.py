"""Plain-PyTorch references of every vlmcore op.

They are three things at once: the oracle the Triton kernels are tested against, the CPU path
(``auto`` backend on CPU tensors), and the baseline of the benchmarks. They follow the math of the
public code our users come from (OpenCLIP ``ClipLoss``, OpenFlamingo ``MaskedCrossAttention`` and
``PerceiverAttention``): matrix products in the input dtype, softmax / log-sum-exp statistics in
fp32, outputs in the input dtype. Tests that want an exact oracle call them on fp32 copies.

No validation here: the public ops validate once, then dispatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_logits_reference(
    row_features: torch.Tensor, col_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """``s * A @ B^T`` in fp32, ``[m, d] x [N, d] -> [m, N]`` (the matrix the fused kernel never builds)."""
    return logit_scale.float() * (row_features @ col_features.T).float()


def contrastive_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    label_offset: int = 0,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss, OpenCLIP ``ClipLoss`` math, as an fp32 scalar.

    Args:
        image_features, text_features: ``[n, d]`` local rows (caller-normalized).
        logit_scale: 0-dim multiplier s (already exponentiated).
        label_smoothing: as in ``F.cross_entropy``.
        label_offset: index of the first local row among the columns (``rank * n`` for OpenCLIP's
            ``local_loss=True``); 0 in one process.
        all_image_features, all_text_features: ``[N, d]`` columns to score against (gathered over
            ranks); default: the local features themselves (one process, or the global loss).

    Returns:
        ``(CE(s I T_all^T, labels) + CE(s T I_all^T, labels)) / 2`` with ``labels = arange(n) + offset``.
    """
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    labels = torch.arange(image_features.shape[0], device=image_features.device) + label_offset
    logits_per_image = contrastive_logits_reference(image_features, all_text, logit_scale)
    logits_per_text = contrastive_logits_reference(text_features, all_image, logit_scale)
    return (
        F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    ) / 2


def contrastive_loss_multi_positive_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    image_ids: torch.Tensor,
    text_ids: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric contrastive loss with several positives per row, as an fp32 scalar.

    Pairs ``(i, j)`` with ``image_ids[i] == text_ids[j]`` are positives. Image row i's soft target
    spreads uniformly over its positive texts (``1 / |P_i|`` each), text row j's over its positive
    images; then ``F.cross_entropy`` with probability targets (label smoothing mixes in the uniform
    distribution, as there). All-unique ids equal on both sides (``arange``) give the plain loss.
    A row without any positive gives NaN.
    """
    logits = contrastive_logits_reference(image_features, text_features, logit_scale)
    positive = (image_ids[:, None] == text_ids[None, :]).float()  # [n, n]
    i2t = positive / positive.sum(1, keepdim=True)
    t2i = (positive / positive.sum(0, keepdim=True)).T
    return (
        F.cross_entropy(logits, i2t, label_smoothing=label_smoothing)
        + F.cross_entropy(logits.T, t2i, label_smoothing=label_smoothing)
    ) / 2


def contrastive_accuracy_reference(
    image_features: torch.Tensor, text_features: torch.Tensor, *, label_offset: int = 0,
    all_image_features: torch.Tensor | None = None, all_text_features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 retrieval accuracy (image->text, text->image) of the same logits, as fp32 scalars.

    Ties go to the lowest column index (``argmax``). The scale is irrelevant (s > 0).
    """
    all_image = image_features if all_image_features is None else all_image_features
    all_text = text_features if all_text_features is None else all_text_features
    labels = torch.arange(image_features.shape[0], device=image_features.device) + label_offset
    i2t = ((image_features @ all_text.T).float().argmax(dim=1) == labels).float().mean()
    t2i = ((text_features @ all_image.T).float().argmax(dim=1) == labels).float().mean()
    return i2t, t2i


def _masked_softmax_attention(
    scores: torch.Tensor, allowed: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """softmax over the last dim of ``scores`` restricted to ``allowed``; rows with nothing allowed give 0.

    ``scores`` ``[B, H, Q, K]``, ``allowed`` broadcastable bool, ``values`` ``[B, K, H, Dh]``.
    Empty rows are filled with 0 before the softmax and zeroed after it, so their output AND their
    gradients are exactly zero (a softmax over all ``-inf`` would give NaN gradients).
    """
    allowed = allowed.expand_as(scores)
    row_has_keys = allowed.any(dim=-1, keepdim=True)
    scores = scores.float().masked_fill(~allowed, float("-inf")).masked_fill(~row_has_keys, 0.0)
    probs = torch.softmax(scores, dim=-1) * row_has_keys
    out = torch.einsum("bhqk,bkhd->bqhd", probs.to(values.dtype), values)
    return out.to(out_dtype)


def masked_cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_index: torch.Tensor,
    tokens_per_media: int,
    *,
    mode: str = "immediate",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Flamingo masked cross-attention (OpenFlamingo ``MaskedCrossAttention`` math).

    Args:
        q: ``[B, L, H, Dh]`` text queries.
        k, v: ``[B, M*R, H, Dh]`` media keys/values, media-major (image j owns rows j*R .. j*R+R-1).
        media_index: integer ``[B, L]``: last image at or before each text token, -1 for none.
        tokens_per_media: R.
        mode: ``"immediate"`` (attend image ``media_index`` only) or ``"all_previous"``
            (images ``0 .. media_index``).
        softmax_scale: default ``Dh ** -0.5``.

    Returns:
        ``[B, L, H, Dh]`` in q's dtype. A token whose index is -1, or outside ``[0, M)``,
        attends nothing and gets exactly zero.
    """
    num_keys = k.shape[1]
    num_media = num_keys // tokens_per_media
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    media_of_key = torch.arange(num_keys, device=q.device) // tokens_per_media  # [M*R]
    index = media_index.long()[:, :, None]  # [B, L, 1]
    in_range = (index >= 0) & (index < num_media)
    if mode == "immediate":
        allowed = media_of_key == index
    elif mode == "all_previous":
        allowed = media_of_key <= index
    else:
        raise ValueError(f"mode must be 'immediate' or 'all_previous', got {mode!r}")
    allowed = (allowed & in_range)[:, None]  # [B, 1, L, M*R]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * scale
    return _masked_softmax_attention(scores, allowed, v, q.dtype)


def resampler_attention_reference(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor | None = None,
    v_latents: torch.Tensor | None = None,
    *,
    media_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Perceiver-resampler / Q-Former cross-attention, built the public way: with the concat.

    Args:
        q: ``[B, R, H, Dh]`` latent queries.
        k_media, v_media: ``[B, S, H, Dh]`` keys/values of the media tokens.
        k_latents, v_latents: ``[B, R, H, Dh]`` keys/values of the latents, or both None
            (Q-Former form: attend the media only).
        media_mask: optional bool ``[B, S]``, False = padding, not attended.
        softmax_scale: default ``Dh ** -0.5``.

    Returns:
        ``softmax(q [k_media; k_latents]^T * scale) [v_media; v_latents]``, ``[B, R, H, Dh]`` in q's
        dtype; a query with nothing to attend gets zeros.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    batch, num_media_tokens = k_media.shape[:2]
    keys, values = k_media, v_media
    allowed = torch.ones(batch, num_media_tokens, dtype=torch.bool, device=q.device)
    if media_mask is not None:
        allowed = media_mask.bool()
    if k_latents is not None:
        keys = torch.cat([k_media, k_latents], dim=1)
        values = torch.cat([v_media, v_latents], dim=1)
        allowed = torch.cat(
            [allowed, torch.ones(batch, k_latents.shape[1], dtype=torch.bool, device=q.device)], dim=1
        )
    scores = torch.einsum("bqhd,bkhd->bhqk", q, keys).float() * scale
    return _masked_softmax_attention(scores, allowed[:, None, None, :], values, q.dtype)


def sigmoid_contrastive_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    image_group_ids: torch.Tensor | None = None,
    text_group_ids: torch.Tensor | None = None,
    positive_offset: int = 0,
    negatives_only: bool = False,
    normalizer: int | None = None,
) -> torch.Tensor:
    """SigLIP pairwise sigmoid loss, OpenCLIP ``SigLipLoss._loss`` math with fp32 logits.

    Args:
        image_features: ``[m, d]`` rows x; text_features: ``[N, d]`` columns y (caller-normalized).
        logit_scale: 0-dim s (already exponentiated); logit_bias: 0-dim b.
        image_group_ids, text_group_ids: optional int ``[m]`` / ``[N]``: pairs with equal ids are the
            positives (several captions per image); otherwise pair (i, i + positive_offset) is.
        positive_offset: column of row 0's positive (``rank * n`` against gathered text).
        negatives_only: no positive pair at all (another rank's text block).
        normalizer: the divisor, default m (OpenCLIP divides by the local batch).

    Returns:
        fp32 scalar ``-(1/normalizer) sum_ij log sigmoid(z_ij (s x_i.y_j + b))``, z = +1 on positives,
        -1 elsewhere.
    """
    logits = logit_scale.float() * (image_features @ text_features.T).float() + logit_bias.float()
    m, n_cols = logits.shape
    if negatives_only:
        positive = torch.zeros_like(logits, dtype=torch.bool)
    elif image_group_ids is not None:
        positive = image_group_ids[:, None] == text_group_ids[None, :]
    else:
        rows = torch.arange(m, device=logits.device)
        positive = torch.arange(n_cols, device=logits.device)[None, :] == (rows + positive_offset)[:, None]
    signs = positive.float() * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / (m if normalizer is None else normalizer)


def momentum_contrastive_rows_reference(
    rows: torch.Tensor, rows_m: torch.Tensor, cols: torch.Tensor, temperature: torch.Tensor, alpha: float,
    *, label_offset: int = 0, row_ids: torch.Tensor | None = None, col_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One direction of ITC with momentum distillation (ALBEF / BLIP ``blip_pretrain.py`` math).

    Args:
        rows: ``[b, e]`` online features; rows_m: ``[b, e]`` momentum features of the same samples.
        cols: ``[N, e]`` columns (momentum batch of the other modality, then the queue).
        temperature: 0-dim; logits = similarities / temperature.
        alpha: weight of the momentum soft targets.
        label_offset: column of row 0's positive (0: the momentum batch comes first); unused with ids.
        row_ids, col_ids: int64 ``[b]`` / ``[N]`` image ids (BLIP ``blip_retrieval.py``): every
            column with the row's id is a positive, the hard target spread evenly over them. Each
            row must have at least one positive column (its own momentum feature).

    Returns:
        fp32 ``[b]``: ``-sum_j t_ij log_softmax(rows @ cols^T / temp)_ij`` with
        ``t = alpha * softmax(rows_m @ cols^T / temp) + (1 - alpha) * y``, ``y = onehot(i + label_offset)``
        or, with ids, ``y_ij = [row_ids_i == col_ids_j] / #positives_i``; the targets carry no
        gradient (BLIP computes them under ``no_grad``).
    """
    logits = (rows @ cols.T).float() / temperature.float()
    with torch.no_grad():
        soft = torch.softmax((rows_m @ cols.T).float() / temperature.float(), dim=1)
        if row_ids is None:
            labels = torch.arange(rows.shape[0], device=rows.device) + label_offset
            hard = F.one_hot(labels, cols.shape[0]).float()
        else:
            positive = (row_ids[:, None] == col_ids[None, :]).float()
            hard = positive / positive.sum(dim=1, keepdim=True)
        targets = alpha * soft + (1 - alpha) * hard
    return -(torch.log_softmax(logits, dim=1) * targets).sum(dim=1)


def momentum_contrastive_loss_reference(
    image_features: torch.Tensor, text_features: torch.Tensor, image_features_m: torch.Tensor,
    text_features_m: torch.Tensor, image_columns: torch.Tensor, text_columns: torch.Tensor,
    temperature: torch.Tensor, alpha: float, *, ids: torch.Tensor | None = None,
    column_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """BLIP's symmetric ITC loss with momentum distillation, an fp32 scalar (materialized logits).

    ``image_columns`` = ``[image_features_m; image_queue]`` ``[b + Q, e]`` (scored by the text rows),
    ``text_columns`` likewise; ``(mean_i loss_i2t + mean_i loss_t2i) / 2``. ``ids`` ``[b]`` and
    ``column_ids`` ``[b + Q]`` (= ``[ids; queue ids]``): image-id positives in both directions.
    """
    i2t = momentum_contrastive_rows_reference(image_features, image_features_m, text_columns, temperature, alpha,
                                              row_ids=ids, col_ids=column_ids)
    t2i = momentum_contrastive_rows_reference(text_features, text_features_m, image_columns, temperature, alpha,
                                              row_ids=ids, col_ids=column_ids)
    return (i2t.mean() + t2i.mean()) / 2
