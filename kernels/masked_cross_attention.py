"""Flamingo masked per-image cross-attention: a text token attends only to its image's visual tokens.

Public op: :func:`masked_cross_attention`. Helpers: :func:`media_index_from_locations`,
:func:`masked_cross_attention_plan` (the launch plan the launchers themselves use).

Block-sparse Triton kernels (flash-attention style, online softmax, fp32 log-sum-exp). Every grid
puts batch x heads on axis 0 (up to 2^31 - 1 programs; axis 1 would cap B * H at 65535).

- forward ``_mxa_fwd_kernel``: a program owns ``BLOCK_M`` text tokens of one (batch, head). From
  the block's valid media indices it loads only key rows ``min(idx) * R .. (max(idx) + 1) * R``
  (``immediate``) or ``0 .. (max(idx) + 1) * R`` (``all_previous``); a per-element mask inside the
  tile keeps exactly the allowed (token, key) pairs. It saves the fp32 LSE per row (``-inf`` for
  rows that attend nothing; their output is written as exact zeros).
- span table ``_mxa_spans_kernel`` (one launch per backward): per sample and image, the first and
  last text position referencing it (``all_previous``: referencing it or a later image), and, in
  ``immediate`` mode, whether the sample's indices are non-decreasing along L ("monotone").
- backward, without float atomics (deterministic, bit-identical across runs):

  * ``_mxa_bwd_dq_kernel`` over query blocks: dq (forward's sparsity) and ``delta = rowsum(o * do)``
    for the samples that need the two-pass plan. For a monotone ``immediate`` sample it only
    writes the zero dq of the rows before its first image and exits: the one-pass kernel below
    does everything else. The flag is read on the device, so choosing costs no host sync.
  * ``_mxa_bwd_kv_kernel`` over image-aligned key blocks (``BLOCK_N // R`` whole images when
    ``R <= BLOCK_N``, else plain ``BLOCK_N``-row blocks): visits the query blocks between the
    first and last text position referencing the block's images, accumulates dk and dv. For a
    monotone ``immediate`` sample it is the whole backward in ONE pass: each visited text row
    that indexes one of the block's images attends only keys of this block, so the program also
    computes its delta and its complete dq (5 matmuls per tile; q, do, o read once, not twice).
    Otherwise it reads the delta the dq kernel stored.

Cost model (per batch row and head). With ``media_index`` non-decreasing along L (always true for
indices built by :func:`media_index_from_locations`), a query block spans only the images whose
tokens fall inside it, so in ``immediate`` mode the forward touches about ``(L + M * BLOCK_M) * R``
(query, key) pairs, rounded up to key tiles, and each key block visits only the query blocks of its
own images: work grows with the useful pairs (``L * R``), not with the ``L * M * R`` that a masked
dense attention computes. In ``all_previous`` mode the useful pairs themselves are
``~ L * M * R / 2`` and the kernels visit about those. Text before the first image (index -1) costs
nothing beyond writing zeros. For non-monotone indices the results are still exact (masking is per
element), but a block works over the hull of its indices' range. :func:`masked_cross_attention_plan`
counts the exact tiles, FLOPs and modelled bytes of every launch for a given ``media_index``.

Indices outside ``[0, M)`` (including ``-1``) select nothing: the kernels clamp them to -1 before
use, so they never address memory outside ``k``/``v``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._backend import interpreter_enabled, use_triton
from ._checks import check_float_tensor, check_same, check_softmax_scale
from ._host import cdiv, next_power_of_2
from ._plan import KernelLaunch, OpPlan
from .reference import masked_cross_attention_reference

MODES = ("immediate", "all_previous")
# Head dims the kernels take (padded inside to a power of two >= 16); larger ones run the reference.
MAX_KERNEL_HEAD_DIM = 256

_LOG2E = 1.4426950408889634
# Span-table kernel tiles: images per program, text positions per loop step.
_SPAN_BLOCK_J = 32
_SPAN_BLOCK_L = 128


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_media_index(p_idx_row, stride_il, offs_m, L, M):
    """Media index of text rows ``offs_m`` ``[BLOCK_M]`` (int32), -1 where none, out of range or past L."""
    m_m = (offs_m >= 0) & (offs_m < L)
    b_idx = tl.load(p_idx_row + offs_m.to(tl.int64) * stride_il, mask=m_m, other=-1)
    return tl.where((b_idx >= 0) & (b_idx < M), b_idx, -1).to(tl.int32)  # range check before narrowing


@triton.jit
def _key_range(b_idx, R, M, IMMEDIATE: tl.constexpr):
    """Key rows ``[n_lo, n_hi)`` a query block with indices ``b_idx`` ``[BLOCK_M]`` may attend (empty if none)."""
    idx_max = tl.max(b_idx, axis=0)  # -1 when no row of the block attends anything
    n_hi = (idx_max + 1) * R
    if IMMEDIATE:
        n_lo = tl.min(tl.where(b_idx >= 0, b_idx, M), axis=0) * R
    else:
        n_lo = n_hi * 0
    return n_lo, n_hi


@triton.jit
def _allowed(b_idx, offs_n, R, IMMEDIATE: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` bool: text row with index ``b_idx`` may attend key row ``offs_n``.

    Needs no bounds mask: key rows past ``(max(b_idx) + 1) * R`` (including the padding of the last
    tile, and everything past M * R) belong to images no row of the block references.
    """
    media_n = offs_n // R  # [BLOCK_N] image owning each key row
    if IMMEDIATE:
        return media_n[None, :] == b_idx[:, None]
    return (media_n[None, :] <= b_idx[:, None]) & (b_idx[:, None] >= 0)


@triton.jit
def _row_offsets(i_b, i_h, offs_m, L, H, HEAD_DIM: tl.constexpr):
    """``[BLOCK_M, 1]`` int64 element offsets of rows ``offs_m`` in a contiguous ``[B, L, H, Dh]`` tensor
    (the outputs and gradients this op allocates itself, so their strides are not launch arguments)."""
    return ((i_b * L + offs_m[:, None].to(tl.int64)) * H + i_h) * HEAD_DIM


@triton.jit
def _mxa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ib, stride_il,
    H, L, R, M, qk_scale_log2,
    L_BUCKET,  # autotune key only (next power of two of L)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IMMEDIATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: ``BLOCK_M`` text rows of one (batch, head) -> o ``[BLOCK_M, Dh]`` (contiguous
    ``[B, L, H, Dh]``), lse ``[BLOCK_M]`` (``[B, H, L]``)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H

    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_m = offs_m < L
    m_d = offs_d < HEAD_DIM

    b_idx = _load_media_index(idx_ptr + i_b * stride_ib, stride_il, offs_m, L, M)  # [BLOCK_M]
    n_lo, n_hi = _key_range(b_idx, R, M, IMMEDIATE)

    p_q = (q_ptr + i_b * stride_qb + i_h * stride_qh
           + offs_m[:, None].to(tl.int64) * stride_ql + offs_d[None, :] * stride_qd)
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
    v_base = v_ptr + i_b * stride_vb + i_h * stride_vh

    # Running max starts finite so that a row with no allowed key in a tile keeps alpha = 1, p = 0.
    b_mx = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # [BLOCK_M] running max, log2 units
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BLOCK_M] running sum of exp2
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(n_lo, n_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        m_kv = (offs_n < n_hi)[:, None] & m_d[None, :]
        o_n = offs_n[:, None].to(tl.int64)
        b_k = tl.load(k_base + o_n * stride_kn + offs_d[None, :] * stride_kd, mask=m_kv, other=0.0)
        b_v = tl.load(v_base + o_n * stride_vn + offs_d[None, :] * stride_vd, mask=m_kv, other=0.0)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, BLOCK_N]
        b_s = tl.where(_allowed(b_idx, offs_n, R, IMMEDIATE), b_s, float("-inf"))
        b_mx_new = tl.maximum(b_mx, tl.max(b_s, axis=1))
        b_alpha = tl.exp2(b_mx - b_mx_new)
        b_p = tl.exp2(b_s - b_mx_new[:, None])  # [BLOCK_M, BLOCK_N], 0 where not allowed
        b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
        b_acc = b_acc * b_alpha[:, None]
        b_acc = tl.dot(b_p.to(b_v.dtype), b_v, b_acc, input_precision=DOT_PRECISION)
        b_mx = b_mx_new

    has_keys = b_l > 0.0
    b_o = b_acc / tl.where(has_keys, b_l, 1.0)[:, None]  # rows with no key: acc = 0 -> exact zeros
    tl.store(o_ptr + _row_offsets(i_b, i_h, offs_m, L, H, HEAD_DIM) + offs_d[None, :],
             b_o.to(o_ptr.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    b_lse = tl.where(has_keys, (b_mx + tl.log2(tl.where(has_keys, b_l, 1.0))) * 0.6931471805599453,
                     float("-inf"))  # natural-log LSE of the scaled scores; -inf = empty row
    tl.store(lse_ptr + i_bh * L + offs_m, b_lse, mask=m_m)


@triton.jit
def _mxa_spans_kernel(
    idx_ptr, span_ptr, stride_ib, stride_il, L, M,
    IMMEDIATE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """One program: images ``BLOCK_J`` of one sample -> int32 first / last referencing text position.

    ``span_ptr`` is int32 ``[B, 2 M + 1]``: first positions ``[0, M)`` (``L`` if none), last
    positions ``[M, 2 M)`` (``-1`` if none), then 1 if the sample's clamped indices are
    non-decreasing along L (written by the programs of images 0 .. BLOCK_J - 1, ``immediate`` only).
    ``immediate``: positions whose index equals the image; ``all_previous``: whose index is >= it.
    """
    i_b = tl.program_id(0).to(tl.int64)
    i_j = tl.program_id(1)
    offs_j = i_j * BLOCK_J + tl.arange(0, BLOCK_J)  # [BLOCK_J]
    idx_row = idx_ptr + i_b * stride_ib
    b_first = tl.full([BLOCK_J], L, dtype=tl.int32)
    b_last = tl.full([BLOCK_J], -1, dtype=tl.int32)
    b_descents = tl.zeros([BLOCK_L], dtype=tl.int32)  # positions whose successor has a smaller index
    for start_l in range(0, L, BLOCK_L):
        offs_l = start_l + tl.arange(0, BLOCK_L)  # [BLOCK_L]
        b_idx = _load_media_index(idx_row, stride_il, offs_l, L, M)
        if IMMEDIATE:
            refers = b_idx[None, :] == offs_j[:, None]  # [BLOCK_J, BLOCK_L]
            b_next = _load_media_index(idx_row, stride_il, offs_l + 1, L, M)
            b_descents += ((b_next < b_idx) & (offs_l + 1 < L)).to(tl.int32)
        else:
            refers = b_idx[None, :] >= offs_j[:, None]
        b_first = tl.minimum(b_first, tl.min(tl.where(refers, offs_l[None, :], L), axis=1))
        b_last = tl.maximum(b_last, tl.max(tl.where(refers, offs_l[None, :], -1), axis=1))
    p_span = span_ptr + i_b * (2 * M + 1)
    m_j = offs_j < M
    tl.store(p_span + offs_j, b_first, mask=m_j)
    tl.store(p_span + M + offs_j, b_last, mask=m_j)
    if IMMEDIATE:
        monotone = (tl.sum(b_descents, axis=0) == 0).to(tl.int32)
        tl.store(p_span + 2 * M, monotone, mask=i_j == 0)


@triton.jit
def _is_monotone(span_ptr, i_b, M):
    """Whether sample ``i_b``'s clamped media indices are non-decreasing (the span table's flag)."""
    return tl.load(span_ptr + i_b * (2 * M + 1) + 2 * M) != 0


@triton.jit
def _mxa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, span_ptr, dq_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ib, stride_il,
    stride_dob, stride_dol, stride_doh, stride_dod,
    H, L, R, M, sm_scale, qk_scale_log2,
    L_BUCKET,  # autotune key only (next power of two of L)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IMMEDIATE: tl.constexpr, ONE_PASS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: ``BLOCK_M`` text rows of one (batch, head) -> dq ``[BLOCK_M, Dh]`` (forward's sparsity)
    and delta ``[BLOCK_M]`` = rowsum(o * do) in fp32, which the dK/dV kernel reads afterwards.

    With ``ONE_PASS``, for a sample whose indices are monotone it only writes zeros to the dq rows
    that attend nothing (the one-pass kv kernel writes every other row)."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H

    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_m = offs_m < L
    m_d = offs_d < HEAD_DIM
    m_md = m_m[:, None] & m_d[None, :]
    o_m = offs_m[:, None].to(tl.int64)
    p_dq = dq_ptr + _row_offsets(i_b, i_h, offs_m, L, H, HEAD_DIM) + offs_d[None, :]

    b_idx = _load_media_index(idx_ptr + i_b * stride_ib, stride_il, offs_m, L, M)
    if ONE_PASS:
        owned_by_one_pass = _is_monotone(span_ptr, i_b, M)
    else:
        owned_by_one_pass = False
    if owned_by_one_pass:
        tl.store(p_dq, tl.zeros([BLOCK_M, BLOCK_D], dtype=dq_ptr.dtype.element_ty),
                 mask=m_md & (b_idx < 0)[:, None])
    else:
        n_lo, n_hi = _key_range(b_idx, R, M, IMMEDIATE)
        b_q = tl.load(q_ptr + i_b * stride_qb + i_h * stride_qh + o_m * stride_ql + offs_d[None, :] * stride_qd,
                      mask=m_md, other=0.0)  # [BLOCK_M, BLOCK_D]
        b_do = tl.load(do_ptr + i_b * stride_dob + i_h * stride_doh + o_m * stride_dol
                       + offs_d[None, :] * stride_dod, mask=m_md, other=0.0)
        b_o = tl.load(o_ptr + _row_offsets(i_b, i_h, offs_m, L, H, HEAD_DIM) + offs_d[None, :], mask=m_md, other=0.0)
        b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1)  # [BLOCK_M]
        tl.store(delta_ptr + i_bh * L + offs_m, b_delta, mask=m_m)
        b_lse2 = tl.load(lse_ptr + i_bh * L + offs_m, mask=m_m, other=0.0) * 1.4426950408889634  # [BLOCK_M]
        k_base = k_ptr + i_b * stride_kb + i_h * stride_kh
        v_base = v_ptr + i_b * stride_vb + i_h * stride_vh

        b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(n_lo, n_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            m_kv = (offs_n < n_hi)[:, None] & m_d[None, :]
            o_n = offs_n[:, None].to(tl.int64)
            b_k = tl.load(k_base + o_n * stride_kn + offs_d[None, :] * stride_kd, mask=m_kv, other=0.0)
            b_v = tl.load(v_base + o_n * stride_vn + offs_d[None, :] * stride_vd, mask=m_kv, other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_M, BLOCK_N]
            b_p = tl.where(_allowed(b_idx, offs_n, R, IMMEDIATE), tl.exp2(b_s - b_lse2[:, None]), 0.0)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dq = tl.dot(b_ds.to(b_k.dtype), b_k, b_dq, input_precision=DOT_PRECISION)
        tl.store(p_dq, (b_dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=m_md)


@triton.jit
def _mxa_bwd_kv_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, span_ptr, dq_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ib, stride_il,
    stride_dob, stride_dol, stride_doh, stride_dod,
    H, L, R, M, sm_scale, qk_scale_log2,
    L_BUCKET,  # autotune key only (next power of two of L)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IMMEDIATE: tl.constexpr, ONE_PASS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: one key block of one (batch, head) -> dk, dv (contiguous ``[B, M*R, H, Dh]``).

    The block holds ``BLOCK_N // R`` whole images when ``R <= BLOCK_N`` (else ``BLOCK_N`` rows of one
    image). It visits the query blocks between the first and last text position that references one
    of its images (``span_ptr``, see :func:`_mxa_spans_kernel`). For a sample the one-pass plan owns
    (``ONE_PASS``, monotone indices; then the pruner guarantees ``R <= BLOCK_N``) it also computes
    delta and the complete dq of the visited rows whose image is in the block.
    """
    i_bh = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    MR = M * R

    rows_per_block = tl.where(R <= BLOCK_N, (BLOCK_N // R) * R, BLOCK_N)
    row_lo = i_n * rows_per_block
    row_hi = tl.minimum(row_lo + rows_per_block, MR)
    offs_n = row_lo + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)
    m_n = offs_n < row_hi
    m_d = offs_d < HEAD_DIM
    m_nd = m_n[:, None] & m_d[None, :]
    o_n = offs_n[:, None].to(tl.int64)
    b_k = tl.load(k_ptr + i_b * stride_kb + i_h * stride_kh + o_n * stride_kn + offs_d[None, :] * stride_kd,
                  mask=m_nd, other=0.0)  # [BLOCK_N, BLOCK_D]
    b_v = tl.load(v_ptr + i_b * stride_vb + i_h * stride_vh + o_n * stride_vn + offs_d[None, :] * stride_vd,
                  mask=m_nd, other=0.0)
    # Rows past the block (the next block's images) get image M, which no clamped index reaches.
    media_n = tl.where(m_n, offs_n // R, M)  # [BLOCK_N]

    # Images a .. b of this key block (at most BLOCK_N of them) -> text span [first, last].
    media_a = row_lo // R
    media_b = (row_hi - 1) // R
    offs_j = media_a + tl.arange(0, BLOCK_N)
    m_j = offs_j <= media_b
    p_span = span_ptr + i_b * (2 * M + 1) + offs_j
    q_first = tl.min(tl.load(p_span, mask=m_j, other=L), axis=0)
    q_last = tl.max(tl.load(p_span + M, mask=m_j, other=-1), axis=0)
    if ONE_PASS:
        one_pass = _is_monotone(span_ptr, i_b, M) & (R <= BLOCK_N)
    else:
        one_pass = False

    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = q_ptr + i_b * stride_qb + i_h * stride_qh
    do_base = do_ptr + i_b * stride_dob + i_h * stride_doh
    idx_row = idx_ptr + i_b * stride_ib
    for start_m in range((q_first // BLOCK_M) * BLOCK_M, q_last + 1, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        m_m = offs_m < L
        m_md = m_m[:, None] & m_d[None, :]
        o_m = offs_m[:, None].to(tl.int64)
        b_idx = _load_media_index(idx_row, stride_il, offs_m, L, M)
        b_q = tl.load(q_base + o_m * stride_ql + offs_d[None, :] * stride_qd, mask=m_md, other=0.0)
        b_do = tl.load(do_base + o_m * stride_dol + offs_d[None, :] * stride_dod, mask=m_md, other=0.0)
        b_lse2 = tl.load(lse_ptr + i_bh * L + offs_m, mask=m_m, other=0.0) * 1.4426950408889634  # [BLOCK_M]
        if one_pass:
            b_o = tl.load(o_ptr + _row_offsets(i_b, i_h, offs_m, L, H, HEAD_DIM) + offs_d[None, :],
                          mask=m_md, other=0.0)
            b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), axis=1)  # [BLOCK_M]
        else:
            b_delta = tl.load(delta_ptr + i_bh * L + offs_m, mask=m_m, other=0.0)  # [BLOCK_M]
        if IMMEDIATE:
            allowed_t = media_n[:, None] == b_idx[None, :]  # [BLOCK_N, BLOCK_M]
        else:
            allowed_t = (media_n[:, None] <= b_idx[None, :]) & (b_idx[None, :] >= 0)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_N, BLOCK_M]
        b_pt = tl.where(allowed_t, tl.exp2(b_st - b_lse2[None, :]), 0.0)
        b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        b_dst = (b_pt * (b_dpt - b_delta[None, :])).to(b_q.dtype)
        b_dk = tl.dot(b_dst, b_q, b_dk, input_precision=DOT_PRECISION)
        if one_pass:
            # Rows indexing an image of this block attend only this block's keys: their dq is complete.
            b_dq = tl.dot(tl.trans(b_dst), b_k, input_precision=DOT_PRECISION) * sm_scale  # [BLOCK_M, BLOCK_D]
            owned = m_m & (b_idx >= media_a) & (b_idx <= media_b)
            tl.store(dq_ptr + _row_offsets(i_b, i_h, offs_m, L, H, HEAD_DIM) + offs_d[None, :],
                     b_dq.to(dq_ptr.dtype.element_ty), mask=owned[:, None] & m_d[None, :])

    b_dk = b_dk * sm_scale
    p_out = _row_offsets(i_b, i_h, offs_n, MR, H, HEAD_DIM) + offs_d[None, :]
    tl.store(dk_ptr + p_out, b_dk.to(dk_ptr.dtype.element_ty), mask=m_nd)
    tl.store(dv_ptr + p_out, b_dv.to(dv_ptr.dtype.element_ty), mask=m_nd)


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------

# The interpreter runs programs one by one in Python: one small tile shape, no autotuning.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
_AUTOTUNE_KEY = ["L_BUCKET", "R", "BLOCK_D", "IMMEDIATE"]
_KV_AUTOTUNE_KEY = _AUTOTUNE_KEY + ["ONE_PASS"]


def _cuda_configs(block_m: tuple[int, ...], block_n: tuple[int, ...]) -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm in block_m
        for bn in block_n
        for warps in (4, 8)
        for stages in (2, 3)
    ]


# Autotune spaces on CUDA (before pruning).
_CUDA_CONFIGS = {
    "fwd": _cuda_configs((64, 128), (32, 64, 128)),  # BLOCK_M text rows resident, BLOCK_N keys streamed
    "dq": _cuda_configs((64, 128), (32, 64, 128)),
    "kv": _cuda_configs((32, 64, 128), (64, 128)),  # BLOCK_N key rows resident, BLOCK_M text rows streamed
}


def _configs(name: str) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config(dict(_INTERPRETER_CONFIG), num_warps=4, num_stages=1)]
    return list(_CUDA_CONFIGS[name])


_SHARED_MEMORY_BYTES = 220 * 1024  # H100 / H200: 227 KB per block
# fp32 values live per thread above which the sm_90a compiles of these kernels spill registers
# (ptxas over the whole config space, bf16, Dh 64 and 128: ``tests/helpers/compile_checks/masked_compile_check.py all``,
# 2026-12-01). kv kernel, counting its pipelined operand tiles: the three configs that spilled
# (8-112 B) scored 160-176, the heaviest spill-free one 152.
_MAX_LIVE_PER_THREAD = 128
_MAX_LIVE_PER_THREAD_KV = 152


def _pruner(streamed: str, resident_tiles: int, accumulators: int, score_tiles: int, one_pass_kernel: bool = False):
    """Config filter for a kernel that streams two ``streamed``-row operand tiles (pipelined over
    ``num_stages``) past ``resident_tiles`` tiles of the other block size, with ``accumulators``
    fp32 ``[resident, Dh]`` accumulators and ``score_tiles`` fp32 ``[BLOCK_M, BLOCK_N]`` temporaries.
    ``one_pass_kernel`` (the kv kernel): with ``ONE_PASS`` it streams one more tile (o), holds one
    more fp32 ``[BLOCK_M, Dh]`` (dq) and must hold whole images (``BLOCK_N >= R``).
    Drops configs that overflow shared memory or would spill registers; keeps the lightest if none fit."""
    resident = "BLOCK_N" if streamed == "BLOCK_M" else "BLOCK_M"

    def live_per_thread(config, block_d: int, one_pass: bool) -> float:
        tiles = config.kwargs
        live = accumulators * tiles[resident] * block_d + score_tiles * tiles["BLOCK_M"] * tiles["BLOCK_N"]
        if one_pass:
            live += tiles["BLOCK_M"] * block_d
        if one_pass_kernel:  # its pipelined 16-bit q / do tiles also occupy registers (2 per 32-bit one)
            live += config.num_stages * tiles[streamed] * block_d / 2
        return live / (32 * config.num_warps)

    max_live = _MAX_LIVE_PER_THREAD_KV if one_pass_kernel else _MAX_LIVE_PER_THREAD

    def prune(configs, named_args, **kwargs):
        block_d = kwargs["BLOCK_D"]
        one_pass = one_pass_kernel and bool(kwargs.get("ONE_PASS", False))
        if one_pass:  # the dq kernel has already skipped these rows: a smaller key tile would be wrong
            configs = [config for config in configs if config.kwargs["BLOCK_N"] >= named_args["R"]]
        streams = 3 if one_pass else 2
        row_bytes = block_d * named_args["q_ptr"].element_size()
        kept = [
            config for config in configs
            if row_bytes * (streams * config.num_stages * config.kwargs[streamed]
                            + resident_tiles * config.kwargs[resident]) <= _SHARED_MEMORY_BYTES
            and live_per_thread(config, block_d, one_pass) <= max_live
        ]
        return kept or [min(configs, key=lambda config: live_per_thread(config, block_d, one_pass))]

    return prune


# The configs the plan (and the sm_90a compile check) assume the autotuner picks on an H100 for
# bf16; the autotuner measures and may choose another surviving one. Under
# ``VLMCORE_AUTOTUNE=preferred`` they are each kernel's one config: every pruner rule keeps them at
# Dh <= 128 in fp32 and 16-bit (checked in tests), and the one-pass backward is chosen only when the
# kv config holds a whole image (:func:`_one_pass` reads the kernel's configs).
PREFERRED_CONFIGS = {
    "fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    "kv": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
}


def _autotuned(name: str, key: list[str], prune):
    """Autotune decorator of kernel ``name`` over :func:`_configs` (kernels/_autotune.py)."""
    configs = _configs(name)
    if interpreter_enabled():
        preferred = configs[0]
    else:
        tiles = {k: v for k, v in PREFERRED_CONFIGS[name].items() if k.startswith("BLOCK_")}
        preferred = triton.Config(tiles, num_warps=PREFERRED_CONFIGS[name]["num_warps"],
                                  num_stages=PREFERRED_CONFIGS[name]["num_stages"])
    return autotune(configs, preferred, key, prune)


# Forward and dQ: BLOCK_M text rows resident (q; dq also do, o), BLOCK_N key rows (k, v) streamed.
_fwd_kernel = _autotuned("fwd", _AUTOTUNE_KEY, _pruner("BLOCK_N", 1, accumulators=1, score_tiles=2))(_mxa_fwd_kernel)
_dq_kernel = _autotuned("dq", _AUTOTUNE_KEY, _pruner("BLOCK_N", 2, accumulators=1, score_tiles=3))(_mxa_bwd_dq_kernel)
# dK/dV (and the one-pass dQ): BLOCK_N key rows resident (k, v), BLOCK_M text rows (q, do; o) streamed.
_kv_kernel = _autotuned("kv", _KV_AUTOTUNE_KEY, _pruner("BLOCK_M", 2, accumulators=2, score_tiles=3,
                                                       one_pass_kernel=True))(_mxa_bwd_kv_kernel)
_spans_kernel = _mxa_spans_kernel  # no tiles to tune: a few loads per text position


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow ``torch.backends.cuda.matmul.allow_tf32`` (exact fp32 by default)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------------------------
# Launch plan: the grids and choices the launchers use, and the exact work they imply
# --------------------------------------------------------------------------------------------------


def _one_pass(mode: str, tokens_per_media: int, kv_configs: list[triton.Config]) -> bool:
    """Whether the backward may run in one pass for monotone samples: ``immediate`` and some kv config
    holds a whole image (``BLOCK_N >= R``). Which samples are monotone is decided on the device."""
    return mode == "immediate" and any(c.kwargs["BLOCK_N"] >= tokens_per_media for c in kv_configs)


def _query_grid(batch_heads: int, length: int, block_m: int) -> tuple[int, int]:
    """Forward and dQ grid: (batch x heads, query blocks)."""
    return batch_heads, cdiv(length, block_m)


def _kv_rows_per_block(tokens_per_media: int, block_n: int) -> int:
    """Key rows of one kv program: whole images (``BLOCK_N // R`` of them) when ``R <= BLOCK_N``."""
    return (block_n // tokens_per_media) * tokens_per_media if tokens_per_media <= block_n else block_n


def _kv_grid(batch_heads: int, num_media: int, tokens_per_media: int, block_n: int) -> tuple[int, int]:
    """dK/dV grid: (batch x heads, key blocks)."""
    return batch_heads, cdiv(num_media * tokens_per_media, _kv_rows_per_block(tokens_per_media, block_n))


def _spans_grid(batch: int, num_media: int) -> tuple[int, int]:
    """Span-table grid: (samples, image blocks)."""
    return batch, cdiv(num_media, _SPAN_BLOCK_J)


def media_spans_reference(media_index: torch.Tensor, num_media: int, immediate: bool) -> torch.Tensor:
    """Host (torch) twin of the span table :func:`_mxa_spans_kernel` builds: int32 ``[B, 2 M + 1]``.

    Used by the plan (tile counts without a launch) and by tests against the kernel's table. The
    monotone flag (last column) is 0 in ``all_previous`` mode, where the kernel leaves it unwritten.
    """
    batch, length = media_index.shape
    index = media_index.long()
    index = torch.where((index >= 0) & (index < num_media), index, -1)
    images = torch.arange(num_media, device=index.device)
    refers = (index[:, None, :] == images[None, :, None]) if immediate else (index[:, None, :] >= images[None, :, None])
    positions = torch.arange(length, device=index.device)
    first = torch.where(refers, positions, length).amin(2) if length else torch.full((batch, num_media), length)
    last = torch.where(refers, positions, -1).amax(2) if length else torch.full((batch, num_media), -1)
    if immediate:
        monotone = (index[:, 1:] >= index[:, :-1]).all(1, keepdim=True)
    else:
        monotone = torch.zeros(batch, 1, dtype=torch.bool, device=index.device)
    return torch.cat([first, last, monotone.to(first.dtype)], dim=1).to(torch.int32)


def _config_dict(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _planned_config(name: str, tuned, dtype: torch.dtype, block_d: int, tokens: int, one_pass: bool,
                    configs: dict | None) -> dict:
    """The config the plan assumes: ``configs[name]`` if given, else the preferred one if the kernel's
    pruner keeps it from the CUDA space, else the first config the pruner keeps."""
    if configs is not None and name in configs:
        return configs[name]
    kept = tuned.early_config_prune(_CUDA_CONFIGS[name], {"q_ptr": torch.empty(0, dtype=dtype), "R": tokens},
                                    BLOCK_D=block_d, ONE_PASS=one_pass)
    kept = [_config_dict(c) for c in kept]
    preferred = PREFERRED_CONFIGS[name]
    return preferred if preferred in kept else kept[0]


def typical_media_index(batch: int, length: int, num_media: int) -> torch.Tensor:
    """The monotone layout the plan assumes by default: image j owns text positions
    ``[j L / M, (j + 1) L / M)`` (the first at position 0, every token has an image)."""
    return (torch.arange(length) * num_media // max(length, 1)).expand(batch, length).contiguous()


def _cdiv_tensor(a: torch.Tensor, b: int) -> torch.Tensor:
    return torch.div(a + b - 1, b, rounding_mode="floor")


def masked_cross_attention_plan(batch: int, length: int, num_media: int, tokens: int, heads: int, head_dim: int,
                                mode: str = "immediate", media_index: torch.Tensor | None = None,
                                dtype: torch.dtype = torch.bfloat16, configs: dict | None = None) -> OpPlan:
    """Exact launches, tiles, FLOPs and modelled HBM bytes of one forward + backward.

    Args:
        batch, length, num_media, tokens, heads, head_dim: B, L, M, R, H, Dh.
        mode: ``immediate`` or ``all_previous``.
        media_index: ``[B, L]`` indices; default :func:`typical_media_index` (monotone).
        dtype: input dtype (element size of the bytes model, pruning of the configs).
        configs: ``{"fwd" | "dq" | "kv": {"BLOCK_M", "BLOCK_N", ...}}`` to override the assumed
            configs (tests pass the interpreter's); default :data:`PREFERRED_CONFIGS` where the
            pruners keep them.

    Tiles are inner loop iterations summed over programs (one per query block in the forward, dQ
    and kv kernels; the span kernel's are text chunks). Bytes count every tile load and store as
    HBM traffic (no L2 reuse): inputs, outputs, LSE, delta, indices and the span table.
    """
    layout = "given media_index" if media_index is not None else \
        "image j owns text positions [j L / M, (j + 1) L / M) (monotone, every token has an image)"
    if media_index is None:
        media_index = typical_media_index(batch, length, num_media)
    media_index = media_index.detach().cpu().long()
    immediate = mode == "immediate"
    elem = torch.empty(0, dtype=dtype).element_size()
    block_d = _block_d(head_dim)
    if configs is not None and "kv" in configs:
        one_pass = mode == "immediate" and configs["kv"]["BLOCK_N"] >= tokens
    else:
        one_pass = _one_pass(mode, tokens, _CUDA_CONFIGS["kv"])
    fwd = _planned_config("fwd", _fwd_kernel, dtype, block_d, tokens, False, configs)
    dqc = _planned_config("dq", _dq_kernel, dtype, block_d, tokens, False, configs)
    kvc = _planned_config("kv", _kv_kernel, dtype, block_d, tokens, one_pass, configs)
    bh = batch * heads
    row = head_dim * elem  # bytes of one q / k / v / o row of one head
    index = torch.where((media_index >= 0) & (media_index < num_media), media_index, -1)
    spans = media_spans_reference(index, num_media, immediate)
    monotone = spans[:, -1].bool() & one_pass  # [B] samples the one-pass kernel owns
    valid = index >= 0
    if immediate:
        pairs = int(valid.sum()) * tokens * heads
    else:
        pairs = int(((index + 1) * valid).sum()) * tokens * heads

    def query_block_tiles(block_m: int, block_n: int) -> torch.Tensor:
        """[B, query blocks] key tiles each forward / dQ program loops over."""
        blocks = cdiv(length, block_m)
        padded = torch.full((batch, blocks * block_m), -1, dtype=torch.long)
        padded[:, :length] = index
        padded = padded.view(batch, blocks, block_m)
        hi = (padded.amax(2) + 1) * tokens
        lo = torch.where(padded >= 0, padded, num_media).amin(2) * tokens if immediate else torch.zeros_like(hi)
        return torch.where(hi > lo, _cdiv_tensor(hi - lo, block_n), 0)

    launches = []
    # Forward.
    fwd_tiles = query_block_tiles(fwd["BLOCK_M"], fwd["BLOCK_N"])
    n_fwd = int(fwd_tiles.sum()) * heads
    grid = _query_grid(bh, length, fwd["BLOCK_M"])
    launches.append(KernelLaunch(
        "_mxa_fwd_kernel", grid, fwd, n_fwd,
        executed_flops=4 * n_fwd * fwd["BLOCK_M"] * fwd["BLOCK_N"] * block_d, useful_flops=4 * pairs * head_dim,
        hbm_bytes=bh * length * (2 * row + 8 + 4) + n_fwd * 2 * fwd["BLOCK_N"] * row))
    # Span table.
    sgrid = _spans_grid(batch, num_media)
    chunks = cdiv(length, _SPAN_BLOCK_L)
    launches.append(KernelLaunch(
        "_mxa_spans_kernel", sgrid, {"BLOCK_J": _SPAN_BLOCK_J, "BLOCK_L": _SPAN_BLOCK_L}, sgrid[0] * sgrid[1] * chunks,
        executed_flops=0, useful_flops=0,
        hbm_bytes=sgrid[0] * sgrid[1] * chunks * _SPAN_BLOCK_L * 8 * (2 if immediate else 1)
        + batch * (2 * num_media + 1) * 4))
    # dQ (+ delta) for the samples the one-pass kernel does not own.
    dq_tiles = query_block_tiles(dqc["BLOCK_M"], dqc["BLOCK_N"]) * (~monotone)[:, None]
    n_dq = int(dq_tiles.sum()) * heads
    grid = _query_grid(bh, length, dqc["BLOCK_M"])
    two_pass_programs = int((~monotone).sum()) * heads * grid[1]
    empty_rows = int((valid.logical_not() & monotone[:, None]).sum()) * heads
    two_pass_pairs = pairs if not immediate else int((valid & ~monotone[:, None]).sum()) * tokens * heads
    launches.append(KernelLaunch(
        "_mxa_bwd_dq_kernel", grid, dqc, n_dq,
        executed_flops=6 * n_dq * dqc["BLOCK_M"] * dqc["BLOCK_N"] * block_d, useful_flops=6 * two_pass_pairs * head_dim,
        hbm_bytes=grid[0] * grid[1] * dqc["BLOCK_M"] * 8 + (grid[0] * grid[1] * 4 if one_pass else 0)
        + two_pass_programs * dqc["BLOCK_M"] * (4 * row + 4 + 4) + n_dq * 2 * dqc["BLOCK_N"] * row
        + empty_rows * row))
    # dK/dV over image-aligned key blocks (one pass for monotone samples).
    grid = _kv_grid(bh, num_media, tokens, kvc["BLOCK_N"])
    rows_per_block = _kv_rows_per_block(tokens, kvc["BLOCK_N"])
    kv_tiles = torch.zeros(batch, grid[1], dtype=torch.long)
    for block in range(grid[1]):
        row_lo = block * rows_per_block
        row_hi = min(row_lo + rows_per_block, num_media * tokens)
        media_a, media_b = row_lo // tokens, (row_hi - 1) // tokens
        first = spans[:, media_a:media_b + 1].amin(1).long()
        last = spans[:, num_media + media_a:num_media + media_b + 1].amax(1).long()
        start = torch.div(first, kvc["BLOCK_M"], rounding_mode="floor") * kvc["BLOCK_M"]
        kv_tiles[:, block] = torch.where(last + 1 > start, _cdiv_tensor(last + 1 - start, kvc["BLOCK_M"]), 0)
    n_kv = int(kv_tiles.sum()) * heads
    n_kv_one_pass = int((kv_tiles * monotone[:, None]).sum()) * heads
    owned_rows = int((valid & monotone[:, None]).sum()) * heads
    bm, bn = kvc["BLOCK_M"], kvc["BLOCK_N"]
    launches.append(KernelLaunch(
        "_mxa_bwd_kv_kernel", grid, kvc, n_kv,
        executed_flops=8 * n_kv * bm * bn * block_d + 2 * n_kv_one_pass * bm * bn * block_d,
        useful_flops=8 * pairs * head_dim + (2 * (pairs - two_pass_pairs) * head_dim if immediate else 0),
        hbm_bytes=bh * num_media * tokens * 4 * row + grid[0] * grid[1] * 2 * bn * 4
        + n_kv * bm * (2 * row + 8 + 4) + n_kv_one_pass * bm * row + (n_kv - n_kv_one_pass) * bm * 4
        + owned_rows * row))
    q_bytes = batch * length * heads * row
    k_bytes = batch * num_media * tokens * heads * row
    notes = [f"media layout: {layout}; {int(monotone.sum())} of {batch} samples take the one-pass backward"
             f"{'' if one_pass else ' (one pass needs immediate mode and R <= 128)'}",
             f"bytes: every tile load/store counted as HBM traffic (no L2 reuse); floor = q, k, v, o forward "
             f"and q, o, do, dq, k, v, dk, dv backward once each ({(2 * q_bytes + 2 * k_bytes) / 1e9:.3f} + "
             f"{(4 * q_bytes + 4 * k_bytes) / 1e9:.3f} GB)",
             f"backward alone: {sum(x.hbm_bytes for x in launches[1:]) / 1e9:.3f} GB modelled"]
    return OpPlan(
        op="masked_xattn",
        shape=dict(B=batch, L=length, M=num_media, R=tokens, H=heads, Dh=head_dim, mode=mode),
        mode="fwd_bwd", launches=launches, floor_flops=14 * pairs * head_dim,
        floor_bytes=6 * q_bytes + 6 * k_bytes,
        peak_extra_bytes=batch * heads * length * 4 * 2 + batch * (2 * num_media + 1) * 4,
        notes=notes)


# --------------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------------


def _media_spans(media_index: torch.Tensor, num_media: int, immediate: bool) -> torch.Tensor:
    """Launch the span-table kernel: int32 ``[B, 2 M + 1]`` (see :func:`_mxa_spans_kernel`)."""
    batch, length = media_index.shape
    spans = torch.empty(batch, 2 * num_media + 1, dtype=torch.int32, device=media_index.device)
    _spans_kernel[_spans_grid(batch, num_media)](
        media_index, spans, *media_index.stride(), length, num_media,
        IMMEDIATE=immediate, BLOCK_J=_SPAN_BLOCK_J, BLOCK_L=_SPAN_BLOCK_L,
    )
    return spans


def _forward(q, k, v, media_index, tokens_per_media: int, mode: str, scale: float):
    """Launch the forward: ``(out [B, L, H, Dh] in q.dtype (contiguous), lse [B, H, L] fp32)``."""
    batch, length, heads, head_dim = q.shape
    num_media = k.shape[1] // tokens_per_media
    out = torch.empty(batch, length, heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if num_media == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    _fwd_kernel[lambda meta: _query_grid(batch * heads, length, meta["BLOCK_M"])](
        q, k, v, media_index, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *media_index.stride(),
        heads, length, tokens_per_media, num_media, scale * _LOG2E, next_power_of_2(length),
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), IMMEDIATE=mode == "immediate",
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse


def _backward(grad_out, q, k, v, media_index, out, lse, tokens_per_media: int, mode: str, scale: float):
    """Launch the span table, dQ (+ delta, or only the empty rows of monotone samples), then dK/dV
    (one pass for monotone ``immediate`` samples): ``(dq, dk, dv)`` shaped like q, k, v (contiguous)."""
    batch, length, heads, head_dim = q.shape
    num_media = k.shape[1] // tokens_per_media
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or num_media == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    out = out.contiguous()  # ours, so already contiguous: the kernels derive its strides
    immediate = mode == "immediate"
    one_pass = _one_pass(mode, tokens_per_media, _kv_kernel.configs)
    spans = _media_spans(media_index, num_media, immediate)
    delta = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), IMMEDIATE=immediate, ONE_PASS=one_pass,
                DOT_PRECISION=_dot_precision(q.dtype))
    sizes = (heads, length, tokens_per_media, num_media, scale, scale * _LOG2E, next_power_of_2(length))
    strides = (*q.stride(), *k.stride(), *v.stride(), *media_index.stride(), *grad_out.stride())
    _dq_kernel[lambda m: _query_grid(batch * heads, length, m["BLOCK_M"])](
        q, k, v, media_index, out, grad_out, lse, delta, spans, dq, *strides, *sizes, **meta,
    )
    _kv_kernel[lambda m: _kv_grid(batch * heads, num_media, tokens_per_media, m["BLOCK_N"])](
        q, k, v, media_index, out, grad_out, lse, delta, spans, dq, dk, dv, *strides, *sizes, **meta,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# torch.library ops (torch.compile, opcheck) and the eager autograd.Function
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("vlmcore::masked_cross_attention_fwd", mutates_args=())
def _masked_cross_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, media_index: torch.Tensor,
    tokens_per_media: int, mode: str, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward: ``(out [B, L, H, Dh], lse [B, H, L] fp32, -inf for rows attending nothing)``."""
    return _forward(q, k, v, media_index, tokens_per_media, mode, softmax_scale)


@_masked_cross_attention_fwd.register_fake
def _(q, k, v, media_index, tokens_per_media, mode, softmax_scale):
    batch, length, heads, head_dim = q.shape
    return q.new_empty(batch, length, heads, head_dim), q.new_empty(batch, heads, length, dtype=torch.float32)


@torch.library.custom_op("vlmcore::masked_cross_attention_bwd", mutates_args=())
def _masked_cross_attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, media_index: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, tokens_per_media: int, mode: str, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: ``(dq, dk, dv)``, deterministic (no atomics)."""
    return _backward(grad_out, q, k, v, media_index, out, lse, tokens_per_media, mode, softmax_scale)


@_masked_cross_attention_bwd.register_fake
def _(grad_out, q, k, v, media_index, out, lse, tokens_per_media, mode, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, media_index, tokens_per_media, mode, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, media_index, out, lse)
    ctx.mark_non_differentiable(lse)
    ctx.tokens_per_media, ctx.mode, ctx.softmax_scale = tokens_per_media, mode, softmax_scale


def _backward_autograd(ctx, grad_out, grad_lse):
    q, k, v, media_index, out, lse = ctx.saved_tensors
    dq, dk, dv = _masked_cross_attention_bwd(
        grad_out, q, k, v, media_index, out, lse, ctx.tokens_per_media, ctx.mode, ctx.softmax_scale
    )
    return dq, dk, dv, None, None, None, None


_masked_cross_attention_fwd.register_autograd(_backward_autograd, setup_context=_setup_context)


class _MaskedCrossAttention(torch.autograd.Function):
    """The eager path: the same launchers as the custom ops, without the dispatcher round trips
    of two ``custom_op`` calls (the custom ops stay for ``torch.compile`` and ``opcheck``)."""

    @staticmethod
    def forward(ctx, q, k, v, media_index, tokens_per_media, mode, softmax_scale):
        out, lse = _forward(q, k, v, media_index, tokens_per_media, mode, softmax_scale)
        ctx.save_for_backward(q, k, v, media_index, out, lse)
        ctx.args = (tokens_per_media, mode, softmax_scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, media_index, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(grad_out, q, k, v, media_index, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def media_index_from_locations(media_locations: torch.Tensor, *, use_cached_media: bool = False) -> torch.Tensor:
    """Index of the last image at or before each text position.

    Args:
        media_locations: bool ``[B, L]``, True at image (``<image>``) tokens.
        use_cached_media: generation with cached media (OpenFlamingo ``use_cached_media``): every
            token attends to the LAST image of its sample, wherever it stands.

    Returns:
        int64 ``[B, L]``: ``cumsum(media_locations) - 1`` (the image token belongs to its own image,
        tokens before the first image get -1); with ``use_cached_media``, ``num_images - 1`` everywhere.
    """
    if not isinstance(media_locations, torch.Tensor) or media_locations.dim() != 2:
        got = (tuple(media_locations.shape) if isinstance(media_locations, torch.Tensor)
               else type(media_locations).__name__)
        raise ValueError(f"media_locations must be a 2-D [B, L] tensor, got {got}")
    counts = media_locations.to(torch.int64).cumsum(dim=1)
    if use_cached_media:
        return (counts[:, -1:] - 1).expand_as(counts).contiguous()
    return counts - 1


def _validate(q, k, v, media_index, tokens_per_media, mode, softmax_scale) -> float:
    check_float_tensor("q", q, 4)
    check_float_tensor("k", k, 4)
    check_float_tensor("v", v, 4)
    check_same("k", k, "q", q)
    check_same("v", v, "q", q)
    batch, length, heads, head_dim = q.shape
    if isinstance(tokens_per_media, bool) or not isinstance(tokens_per_media, int) or tokens_per_media < 1:
        raise ValueError(f"tokens_per_media must be a positive int, got {tokens_per_media!r}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[2] != heads or k.shape[3] != head_dim:
        raise ValueError(
            f"k must be [B, M*R, H, Dh] with B={batch}, H={heads}, Dh={head_dim} from q, got {tuple(k.shape)}"
        )
    if k.shape[1] % tokens_per_media != 0:
        raise ValueError(
            f"k has {k.shape[1]} media tokens, not a multiple of tokens_per_media={tokens_per_media}"
        )
    if (not isinstance(media_index, torch.Tensor) or media_index.dtype.is_floating_point
            or media_index.dtype.is_complex or media_index.dtype == torch.bool):
        raise TypeError("media_index must be an integer tensor [B, L]")
    if tuple(media_index.shape) != (batch, length):
        raise ValueError(f"media_index must have shape [B, L] = {(batch, length)}, got {tuple(media_index.shape)}")
    if media_index.device != q.device:
        raise ValueError(f"media_index is on {media_index.device} but q is on {q.device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return check_softmax_scale(softmax_scale, head_dim)


def masked_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    media_index: torch.Tensor,
    tokens_per_media: int,
    *,
    mode: str = "immediate",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Masked per-image cross-attention (Flamingo).

    Args:
        q: ``[B, L, H, Dh]`` text queries.
        k, v: ``[B, M*R, H, Dh]`` media keys/values, media-major: image j owns rows j*R .. j*R+R-1.
            Any strides: a view of a projection's output (``kv[..., :H*Dh].view(B, M*R, H, Dh)``) is
            read in place, without a copy.
        media_index: integer ``[B, L]``, last image at or before each position, -1 for none
            (see :func:`media_index_from_locations`). Indices outside ``[-1, M)`` select nothing.
        tokens_per_media: R, visual tokens per image.
        mode: ``"immediate"`` (Flamingo; attend image ``media_index`` only) or ``"all_previous"``
            (images ``0 .. media_index``). Tokens with index -1 get exactly zero in both modes
            (OpenFlamingo's ``all_previous`` lets them attend everything uniformly; we do not).
        softmax_scale: default ``Dh ** -0.5``.

    Returns:
        ``[B, L, H, Dh]`` in q's dtype. Rows that attend nothing are exactly zero, and so are their
        gradients.

    Runs the block-sparse Triton kernels when ``vlmcore.kernels`` selects Triton for ``q`` (CUDA
    tensors under the ``auto`` backend) and ``Dh <= 256``; otherwise the plain-PyTorch reference.
    Eager calls go through an ``autograd.Function`` straight to the launchers; under
    ``torch.compile`` the ``vlmcore::masked_cross_attention_fwd`` / ``_bwd`` custom ops are traced.

    Raises:
        TypeError: bfloat16 CPU tensors under ``backend("triton")`` (the interpreter computes bf16
            wrongly), and the type errors of the arguments.

    Example::

        idx = media_index_from_locations(input_ids == image_token_id)   # [B, L]
        out = masked_cross_attention(q, k, v, idx, tokens_per_media=64)  # [B, L, H, Dh]
    """
    scale = _validate(q, k, v, media_index, tokens_per_media, mode, softmax_scale)
    if use_triton(q) and q.shape[3] <= MAX_KERNEL_HEAD_DIM:
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            raise TypeError(
                "q is bfloat16 on CPU: the Triton interpreter computes bfloat16 dots wrongly; use float32 / "
                "float16, or vlmcore.kernels.backend('reference') on CPU"
            )
        if torch.compiler.is_compiling():
            out, _ = _masked_cross_attention_fwd(q, k, v, media_index, tokens_per_media, mode, scale)
            return out
        return _MaskedCrossAttention.apply(q, k, v, media_index, tokens_per_media, mode, scale)
    return masked_cross_attention_reference(
        q, k, v, media_index, tokens_per_media, mode=mode, softmax_scale=scale
    )
