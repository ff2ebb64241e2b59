"""Fused symmetric contrastive (CLIP InfoNCE / BLIP ITC) loss that never builds the n x n logits.

Public op: :func:`contrastive_loss`.

Triton path (CUDA tensors, or any tensors under ``backend("triton")``). Notation: rows A ``[m, d]``,
columns B ``[N, d]``, X = A B^T (never stored), S = s X, label of row i = column i + offset.

- ``vlmcore::contrastive_loss`` (one process, or the global loss over gathered features): the
  symmetric loss of one square matrix, A = image, B = text, both directions from ONE logits pass.
  ``_contrastive_fwd_kernel`` with ``COL_STATS``: G <= 512 programs ("row groups"), each owning a
  contiguous range of rows. A program keeps the online row log-sum-exp of its current row block in
  registers while it walks all column blocks, and folds each tile's column log-sum-exp into its own
  row ``g`` of an fp32 ``[G, N]`` partial buffer (only program g touches row g: no atomics).
  ``_contrastive_merge_cols_kernel`` then reduces the G partials in a fixed order -> column LSE.
  Groups have 64 rows below n = 32768, 128 above, more when G would exceed 512. Extra memory:
  ``4 G N`` bytes (32 MB at n = 32768, 2 GB at n = 2^20; x3 with accuracies) plus O(n) vectors.
- ``vlmcore::contrastive_loss_rows`` (``local_loss=True``): one direction, local rows against the
  gathered columns with a label offset; the loss is the mean of the two directions.
- backward (both ops), the window path (always for d > ``REGISTER_BACKWARD_MAX_D`` = 256, and below
  where the launch plan predicts it faster): ONE recompute of the logits. For each row window and,
  inside it, each column chunk (fixed order; at most ``WINDOW_BYTES`` = 64 MiB, one window alive at
  a time, at every n), ``_contrastive_grad_window_kernel`` writes G = dL/dS (for label smoothing
  eps: ``P_ij - (1 - eps) [j = label_i] - eps / N``, plus the column term in the symmetric case) in
  the input dtype; ``_contrastive_window_matmul_kernel`` then forms dA_window = s G B (fp32
  accumulator across column chunks; its last step also yields the per-row ``sum_j G_ij X_ij`` of
  the logit-scale gradient as ``sum_k (G B)_ik A_ik``) and dB += s G^T A_window (fp32 accumulator
  ``[N, d]`` across row windows). 8 n^2 d FLOPs in all (forward 2, backward 6), ~6 n^2 bytes of
  window traffic inside compute-bound kernels.
- backward, the register path (d <= 256 where faster): ``_contrastive_bwd_rows_kernel`` (a program
  per row block x d chunk) recomputes S tile by tile, forms G and accumulates dA = s G B in
  registers (and the logit-scale partials); ``_contrastive_bwd_cols_kernel`` accumulates
  dB = s G^T A the same way. No n^2 traffic, (4 + 2 x d chunks) n^2 d FLOPs.

Every launch decision (row groups, backward path, window shape, preferred configs) comes from
:func:`_choose`; :func:`contrastive_plan` turns the same decisions into an exact work plan
(``python -m vlmcore.bench plan``). Group ids (``image_ids`` / ``text_ids``) run the symmetric op
without a diagonal target and add the multi-positive target term in O(n d).

A frozen tower (features that need no gradient) skips its half of the backward: the column kernel
or window pass (the symmetric op swaps image and text when the image side is the frozen one).

Every output element has exactly one writer and every reduction a fixed order (no atomics): results
are bit-identical from run to run. Statistics are fp32 (exp2 / log2 domain); matrix products run in
the input dtype with fp32 accumulation (fp32 inputs: IEEE fp32 products, like the reference). Offsets
are int64, so n * d >= 2^31 is fine.

Accuracies (``output_dict``) come from the same forward pass when asked for: a running argmax of X per
row, and per column through the same group partials; ties go to the lowest index, as ``argmax``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._autotune import autotune
from ._backend import interpreter_enabled, use_triton
from ._checks import check_float_tensor, check_same, check_scalar, dot_precision
from ._distributed import all_gather_no_grad, all_gather_with_grad
from ._plan import KernelLaunch, OpPlan
from .reference import (
    contrastive_accuracy_reference,
    contrastive_loss_multi_positive_reference,
    contrastive_loss_reference,
)

_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)
LN2 = tl.constexpr(0.6931471805599453)
# Bounds the forward's [G, N] column-partial buffer (G <= 512 row groups: 2 GB at N = 2^20).
MAX_ROW_GROUPS = 512
# Rows per group are a multiple of 64 (below 32768 rows: more groups = more parallel programs) or
# of 128; configs whose BLOCK_M does not divide them are pruned.
_SMALL_GROUP_ROWS, _LARGE_GROUP_ROWS, _LARGE_N = 64, 128, 32768
# The register backward keeps a [BLOCK_M, BLOCK_DO] gradient tile per program and recomputes the
# logits once per d chunk; for d above this it runs the window backward instead (G' windows written
# in the input dtype, then two matrix products per window), which recomputes the logits only twice.
REGISTER_BACKWARD_MAX_D = 256
# The window backward's one G' window alive at a time: at most this many bytes at every n, and at
# most WINDOW_MAX_COLS columns (wider matrices are cut into column chunks inside a row window).
WINDOW_BYTES = 64 * 2**20
WINDOW_MAX_COLS = 8192


# ----------------------------------------------------------------------------------------------
# shared tile helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_dot(
    p_a, p_b, o_m, o_n, m_m, m_n, d, stride_a, stride_b,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """X tile = A[o_m] B[o_n]^T in fp32, ``[BLOCK_M, BLOCK_N]``, looping over d in BLOCK_D chunks (masked)."""
    o_am = o_m.to(tl.int64) * stride_a  # [BLOCK_M]
    o_bn = o_n.to(tl.int64) * stride_b  # [BLOCK_N]
    b_x = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i_k in range(0, d, BLOCK_D):
        o_k = i_k + tl.arange(0, BLOCK_D)
        m_k = o_k < d
        # [BLOCK_M, BLOCK_D], [BLOCK_N, BLOCK_D]
        b_a = tl.load(p_a + o_am[:, None] + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_b = tl.load(p_b + o_bn[:, None] + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_x = tl.dot(b_a, tl.trans(b_b), b_x, input_precision=PRECISION)
    return b_x


@triton.jit
def _grad_tile(
    b_x, scale2, b_lse_row, b_lse_col, o_m, o_n, m_m, m_n, n_rows, n_cols, label_offset, smoothing,
    SYMMETRIC: tl.constexpr,
):
    """G' = dL/dS without the factor upstream / (rows [x 2]): ``[BLOCK_M, BLOCK_N]`` fp32, 0 outside.

    Row direction: ``P_ij - (1 - eps) [j = i + offset] - eps / N`` with P = softmax over the row;
    the symmetric op adds the column direction ``Q_ij - (1 - eps) [i = j] - eps / m`` (Q = softmax
    over the column). ``b_lse_row`` / ``b_lse_col`` are natural-log LSEs of S.
    """
    b_s2 = b_x * scale2  # S in log2 units
    m_target = o_n[None, :] == (o_m + label_offset)[:, None]  # [BLOCK_M, BLOCK_N]
    b_hit = tl.where(m_target, 1.0 - smoothing, 0.0)
    b_g = tl.exp2(b_s2 - (b_lse_row * LOG2E)[:, None]) - b_hit - smoothing / n_cols
    if SYMMETRIC:
        b_g += tl.exp2(b_s2 - (b_lse_col * LOG2E)[None, :]) - b_hit - smoothing / n_rows
    return tl.where(m_m[:, None] & m_n[None, :], b_g, 0.0)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _contrastive_fwd_kernel(
    p_a, p_b, p_scale,
    p_row_lse, p_row_tgt, p_row_arg,
    p_part_lse, p_part_max, p_part_arg,
    n_rows, n_cols, d, size_bucket, stride_a, stride_b, label_offset, rows_per_group, row_tile,
    COL_STATS: tl.constexpr, ACCURACY: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One pass over X = A B^T: row LSE, target logit, (row argmax), (column partials per group).

    A ``[n_rows, d]``, B ``[n_cols, d]`` (feature stride 1); scale ``[1]`` fp32 = s.
    Writes row_lse / row_tgt fp32 ``[n_rows]`` (natural log; tgt = S[i, i + label_offset]),
    row_arg int32 ``[n_rows]`` (ACCURACY). COL_STATS: program g owns rows
    ``[g * rows_per_group, (g + 1) * rows_per_group)`` and row g of part_lse fp32 ``[G, n_cols]``
    (log2 units), part_max fp32 / part_arg int32 ``[G, n_cols]`` (ACCURACY: column max of X and its
    row). Without COL_STATS a program owns one row block. ``size_bucket`` and ``row_tile`` are read
    by the autotuner only (its key).
    """
    i_g = tl.program_id(0)
    if COL_STATS:
        row_lo = i_g * rows_per_group
        row_hi = tl.minimum(row_lo + rows_per_group, n_rows)
    else:
        row_lo = i_g * BLOCK_M
        row_hi = tl.minimum(row_lo + BLOCK_M, n_rows)
    scale = tl.load(p_scale)
    scale2 = scale * LOG2E
    o_part = i_g.to(tl.int64) * n_cols  # start of this group's partial row
    for i_r in range(row_lo, row_hi, BLOCK_M):
        o_m = i_r + tl.arange(0, BLOCK_M)
        m_m = o_m < row_hi
        b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of S (log2 units)
        b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(S - max)
        b_tgt = tl.zeros([BLOCK_M], dtype=tl.float32)
        b_best = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of X (ACCURACY)
        b_arg = tl.zeros([BLOCK_M], dtype=tl.int32)
        for i_c in range(0, n_cols, BLOCK_N):
            o_n = i_c + tl.arange(0, BLOCK_N)
            m_n = o_n < n_cols
            m_mn = m_m[:, None] & m_n[None, :]
            b_x = _tile_dot(p_a, p_b, o_m, o_n, m_m, m_n, d, stride_a, stride_b,
                            PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)  # [BLOCK_M, BLOCK_N]
            b_s2 = tl.where(m_mn, b_x * scale2, float("-inf"))
            # rows: online log-sum-exp (rows outside the matrix keep a finite 0 max: no NaN)
            b_max_new = tl.where(m_m, tl.maximum(b_max, tl.max(b_s2, 1)), 0.0)
            b_sum = b_sum * tl.exp2(b_max - b_max_new) + tl.sum(tl.exp2(b_s2 - b_max_new[:, None]), 1)
            b_max = b_max_new
            if (i_c < i_r + BLOCK_M + label_offset) & (i_c + BLOCK_N > i_r + label_offset):
                m_target = (o_n[None, :] == (o_m + label_offset)[:, None]) & m_mn
                b_tgt += tl.sum(tl.where(m_target, b_x * scale, 0.0), 1)
            if ACCURACY:
                b_xm = tl.where(m_mn, b_x, float("-inf"))
                b_tile_best, b_tile_arg = tl.max(b_xm, 1, return_indices=True)  # ties: lowest column
                m_take = b_tile_best > b_best  # strict: an earlier column block wins ties
                b_arg = tl.where(m_take, b_tile_arg + i_c, b_arg)
                b_best = tl.where(m_take, b_tile_best, b_best)
            if COL_STATS:
                m_old = m_n & (i_r != row_lo)  # the group's first row block writes, later ones merge
                b_cmax = tl.where(m_n, tl.max(b_s2, 0), 0.0)  # [BLOCK_N]
                b_csum = tl.sum(tl.exp2(b_s2 - b_cmax[None, :]), 0)
                b_clse = b_cmax + tl.log2(tl.where(m_n, b_csum, 1.0))  # columns outside: a finite 0
                p_part = p_part_lse + o_part + o_n
                b_old = tl.load(p_part, mask=m_old, other=float("-inf"))
                b_hi = tl.maximum(b_old, b_clse)
                tl.store(p_part, b_hi + tl.log2(tl.exp2(b_old - b_hi) + tl.exp2(b_clse - b_hi)), mask=m_n)
                if ACCURACY:
                    b_cbest, b_carg = tl.max(tl.where(m_mn, b_x, float("-inf")), 0, return_indices=True)
                    b_obest = tl.load(p_part_max + o_part + o_n, mask=m_old, other=float("-inf"))
                    b_oarg = tl.load(p_part_arg + o_part + o_n, mask=m_old, other=0)
                    m_ctake = b_cbest > b_obest  # strict: the group's earlier rows win ties
                    tl.store(p_part_max + o_part + o_n, tl.where(m_ctake, b_cbest, b_obest), mask=m_n)
                    tl.store(p_part_arg + o_part + o_n, tl.where(m_ctake, b_carg + i_r, b_oarg), mask=m_n)
        tl.store(p_row_lse + o_m, (b_max + tl.log2(tl.where(m_m, b_sum, 1.0))) * LN2, mask=m_m)
        tl.store(p_row_tgt + o_m, b_tgt, mask=m_m)
        if ACCURACY:
            tl.store(p_row_arg + o_m, b_arg, mask=m_m)
        if COL_STATS:
            # the next row block re-reads this group's partials, possibly through other threads
            tl.debug_barrier()


@triton.jit
def _contrastive_merge_cols_kernel(
    p_part_lse, p_part_max, p_part_arg, p_col_lse, p_col_arg, n_cols, n_groups,
    ACCURACY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Column LSE (natural log, fp32 ``[n_cols]``) and argmax (int32) from the ``[G, n_cols]`` partials.

    Groups are folded in increasing order (fixed order: deterministic); group g holds lower rows than
    group g + 1, so the strict comparison keeps the lowest row on ties.
    """
    o_n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < n_cols
    b_lse = tl.full([BLOCK], float("-inf"), tl.float32)
    b_best = tl.full([BLOCK], float("-inf"), tl.float32)
    b_arg = tl.zeros([BLOCK], dtype=tl.int32)
    p_lse, p_max, p_arg = p_part_lse + o_n, p_part_max + o_n, p_part_arg + o_n
    for _ in range(0, n_groups):
        b_part = tl.load(p_lse, mask=m_n, other=0.0)
        b_hi = tl.maximum(b_lse, b_part)
        b_lse = b_hi + tl.log2(tl.exp2(b_lse - b_hi) + tl.exp2(b_part - b_hi))
        if ACCURACY:
            b_pmax = tl.load(p_max, mask=m_n, other=0.0)
            m_take = b_pmax > b_best
            b_arg = tl.where(m_take, tl.load(p_arg, mask=m_n, other=0), b_arg)
            b_best = tl.where(m_take, b_pmax, b_best)
        p_lse += n_cols
        p_max += n_cols
        p_arg += n_cols
    tl.store(p_col_lse + o_n, b_lse * LN2, mask=m_n)
    if ACCURACY:
        tl.store(p_col_arg + o_n, b_arg, mask=m_n)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _contrastive_bwd_rows_kernel(
    p_a, p_b, p_scale, p_coef, p_row_lse, p_col_lse, p_da, p_ds_rows,
    n_rows, n_cols, d, size_bucket, stride_a, stride_b, stride_da, label_offset, smoothing,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """dA = coef * G' B for one row block and one d chunk (``[BLOCK_M, BLOCK_DO]`` of dA ``[n_rows, d]``).

    coef ``[1]`` fp32 = s * upstream / (n_rows [x 2]). The programs of d chunk 0 also write
    ds_rows fp32 ``[n_rows]`` = ``sum_j G'_ij X_ij`` (the logit-scale gradient before the coefficient).
    """
    i_m = tl.program_id(0)
    i_do = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < n_rows
    o_do = i_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    m_do = o_do < d
    scale2 = tl.load(p_scale) * LOG2E
    b_lse_row = tl.load(p_row_lse + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
    b_da = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    b_ds = tl.zeros([BLOCK_M], dtype=tl.float32)
    for i_c in range(0, n_cols, BLOCK_N):
        o_n = i_c + tl.arange(0, BLOCK_N)
        m_n = o_n < n_cols
        b_x = _tile_dot(p_a, p_b, o_m, o_n, m_m, m_n, d, stride_a, stride_b,
                        PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)  # [BLOCK_M, BLOCK_N]
        b_lse_col = tl.zeros([BLOCK_N], dtype=tl.float32)  # read only by the symmetric op
        if SYMMETRIC:
            b_lse_col = tl.load(p_col_lse + o_n, mask=m_n, other=0.0)  # [BLOCK_N]
        b_g = _grad_tile(b_x, scale2, b_lse_row, b_lse_col, o_m, o_n, m_m, m_n, n_rows, n_cols,
                         label_offset, smoothing, SYMMETRIC)
        b_bo = tl.load(p_b + o_n.to(tl.int64)[:, None] * stride_b + o_do[None, :],
                       mask=m_n[:, None] & m_do[None, :], other=0.0)  # [BLOCK_N, BLOCK_DO]
        b_da = tl.dot(b_g.to(b_bo.dtype), b_bo, b_da, input_precision=PRECISION)
        if i_do == 0:
            b_ds += tl.sum(b_g * b_x, 1)
    b_da = b_da * tl.load(p_coef)
    p_out = p_da + o_m.to(tl.int64)[:, None] * stride_da + o_do[None, :]
    tl.store(p_out, b_da.to(p_da.dtype.element_ty), mask=m_m[:, None] & m_do[None, :])
    if i_do == 0:
        tl.store(p_ds_rows + o_m, b_ds, mask=m_m)


@triton.jit
def _contrastive_bwd_cols_kernel(
    p_a, p_b, p_scale, p_coef, p_row_lse, p_col_lse, p_db,
    n_rows, n_cols, d, size_bucket, stride_a, stride_b, stride_db, label_offset, smoothing,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    """dB = coef * G'^T A for one column block and one d chunk (``[BLOCK_N, BLOCK_DO]`` of dB ``[n_cols, d]``)."""
    i_n = tl.program_id(0)
    i_do = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < n_cols
    o_do = i_do * BLOCK_DO + tl.arange(0, BLOCK_DO)
    m_do = o_do < d
    scale2 = tl.load(p_scale) * LOG2E
    b_lse_col = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SYMMETRIC:
        b_lse_col = tl.load(p_col_lse + o_n, mask=m_n, other=0.0)  # [BLOCK_N]
    b_db = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for i_r in range(0, n_rows, BLOCK_M):
        o_m = i_r + tl.arange(0, BLOCK_M)
        m_m = o_m < n_rows
        b_x = _tile_dot(p_a, p_b, o_m, o_n, m_m, m_n, d, stride_a, stride_b,
                        PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)  # [BLOCK_M, BLOCK_N]
        b_lse_row = tl.load(p_row_lse + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
        b_g = _grad_tile(b_x, scale2, b_lse_row, b_lse_col, o_m, o_n, m_m, m_n, n_rows, n_cols,
                         label_offset, smoothing, SYMMETRIC)
        b_ao = tl.load(p_a + o_m.to(tl.int64)[:, None] * stride_a + o_do[None, :],
                       mask=m_m[:, None] & m_do[None, :], other=0.0)  # [BLOCK_M, BLOCK_DO]
        b_db = tl.dot(tl.trans(b_g.to(b_ao.dtype)), b_ao, b_db, input_precision=PRECISION)
    b_db = b_db * tl.load(p_coef)
    p_out = p_db + o_n.to(tl.int64)[:, None] * stride_db + o_do[None, :]
    tl.store(p_out, b_db.to(p_db.dtype.element_ty), mask=m_n[:, None] & m_do[None, :])


@triton.jit
def _contrastive_grad_window_kernel(
    p_a, p_b, p_scale, p_row_lse, p_col_lse, p_g,
    row0, col0, win_rows, win_cols,
    n_rows, n_cols, d, size_bucket, stride_a, stride_b, label_offset, smoothing,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """G' of one window ``[row0, row0 + win_rows) x [col0, col0 + win_cols)`` of the logits, one tile
    per program, into g ``[win_rows, win_cols]`` (input dtype, row-major): the backward's only
    recompute of the logits."""
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    o_wm = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # row inside the window
    o_wn = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_wm < win_rows
    m_n = o_wn < win_cols
    o_m = row0 + o_wm
    o_n = col0 + o_wn
    scale2 = tl.load(p_scale) * LOG2E
    b_x = _tile_dot(p_a, p_b, o_m, o_n, m_m, m_n, d, stride_a, stride_b,
                    PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)  # [BLOCK_M, BLOCK_N]
    b_lse_row = tl.load(p_row_lse + o_m, mask=m_m, other=0.0)
    b_lse_col = tl.zeros([BLOCK_N], dtype=tl.float32)  # read only by the symmetric op
    if SYMMETRIC:
        b_lse_col = tl.load(p_col_lse + o_n, mask=m_n, other=0.0)
    b_g = _grad_tile(b_x, scale2, b_lse_row, b_lse_col, o_m, o_n, m_m, m_n, n_rows, n_cols,
                     label_offset, smoothing, SYMMETRIC)
    p_out = p_g + o_wm.to(tl.int64)[:, None] * win_cols + o_wn[None, :]
    tl.store(p_out, b_g.to(p_g.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _contrastive_window_matmul_kernel(
    p_x, p_y, p_acc, p_out, p_coef, p_rows, p_ds,
    M, N, K, stride_xm, stride_xk, stride_y, stride_rows, stride_ds,
    FIRST: tl.constexpr, LAST: tl.constexpr, TRANS_X: tl.constexpr, WRITE_DS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One window's gradient product: ``acc [M, N] (+)= X [M, K] Y [K, N]`` in fp32.

    X is a G' window (``TRANS_X``: its transpose, read as ``[BLOCK_K, BLOCK_M]`` tiles along the
    window's rows) in the input dtype, Y ``[K, N]`` row-major feature rows (N = d). ``FIRST``: the
    accumulator starts at zero (not read); otherwise it is read from p_acc fp32 ``[M, N]``.
    ``LAST``: the result times coef ``[1]`` is written to p_out (input dtype, row stride N) instead
    of p_acc. ``WRITE_DS`` (with LAST, for the row-gradient product): also writes this tile's
    ``sum_n acc[m, n] rows[m, n]`` (= ``sum_j G'_mj X_mj``, the logit-scale gradient per row before
    the coefficient) to ``p_ds + program_id(1) * stride_ds + m``. One program per output tile and a
    fixed K order: deterministic.
    """
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    m_mn = m_m[:, None] & m_n[None, :]
    o_acc = o_m.to(tl.int64)[:, None] * N + o_n[None, :]
    if FIRST:
        b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        b_acc = tl.load(p_acc + o_acc, mask=m_mn, other=0.0)
    o_xm = o_m.to(tl.int64) * stride_xm
    for i_k in range(0, K, BLOCK_K):
        o_k = i_k + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        if TRANS_X:  # X[m, k] = G'[k, m]: load the contiguous [BLOCK_K, BLOCK_M] tile, transpose
            b_xt = tl.load(p_x + o_k.to(tl.int64)[:, None] * stride_xk + o_xm[None, :],
                           mask=m_k[:, None] & m_m[None, :], other=0.0)
            b_x = tl.trans(b_xt)
        else:
            b_x = tl.load(p_x + o_xm[:, None] + o_k.to(tl.int64)[None, :] * stride_xk,
                          mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_y = tl.load(p_y + o_k.to(tl.int64)[:, None] * stride_y + o_n[None, :],
                      mask=m_k[:, None] & m_n[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        b_acc = tl.dot(b_x, b_y, b_acc, input_precision=PRECISION)
    if LAST:
        tl.store(p_out + o_acc, (b_acc * tl.load(p_coef)).to(p_out.dtype.element_ty), mask=m_mn)
        if WRITE_DS:
            b_rows = tl.load(p_rows + o_m.to(tl.int64)[:, None] * stride_rows + o_n[None, :], mask=m_mn, other=0.0)
            tl.store(p_ds + i_n.to(tl.int64) * stride_ds + o_m, tl.sum(b_acc * b_rows.to(tl.float32), 1), mask=m_m)
    else:
        tl.store(p_acc + o_acc, b_acc, mask=m_mn)


# ----------------------------------------------------------------------------------------------
# launch settings
# ----------------------------------------------------------------------------------------------

# Kernels take ``size_bucket`` only as an autotune key: the next power of two of max(m, N), capped,
# so a config tuned at n = 65536 serves 131072 and 2^20 too (tuning at 2^20 would run each config
# several times at seconds per run). The forward's groups enter the key only as their row-tile
# class (``row_tile``: 64 or 128, see :func:`_row_tile`), not as ``rows_per_group`` itself, which
# grows with n past 65536. Every argument the pruning reads and every mode flag that changes the
# work is in the key, so a pruned space is chosen (and tuned) per key; the winners are cached on
# disk (kernels/_autotune.py).
_FWD_KEY = ["size_bucket", "d", "row_tile", "COL_STATS", "ACCURACY", "PRECISION"]
_BWD_KEY = ["size_bucket", "d", "SYMMETRIC", "PRECISION"]
_WINDOW_KEY = ["size_bucket", "d", "SYMMETRIC", "PRECISION"]
_MATMUL_KEY = ["M", "N", "K", "FIRST", "LAST", "TRANS_X", "WRITE_DS", "PRECISION"]
_MAX_SIZE_BUCKET = 65536


def _size_bucket(m: int, n_cols: int) -> int:
    return min(triton.next_power_of_2(max(m, n_cols)), _MAX_SIZE_BUCKET)


def _pow2(x: int) -> int:
    """Next power of two >= x, at least 16 (tl.dot needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(x))


# Autotune spaces, preferred config first, one per product precision: "tf32" = 16-bit inputs on
# tensor cores (wgmma), "ieee" = fp32 inputs with IEEE fp32 products (no tensor cores; far more
# registers per tile, so smaller tiles). Every config here is spill-free on sm_90a in the modes it is
# kept for (tests/helpers/compile_checks/contrastive_compile_check.py, bench/evidence/contrastive_sm90.json).
# Forward, 16-bit: 128 x 64 tiles with 4 warps use <= 255 registers and 72 KB of shared memory, so
# TWO CTAs reside per SM and one CTA's exp2 / column-statistics epilogue overlaps the other's MMA.
# The 8-warp configs fit one CTA per SM; the autotuner may still measure them faster.
# "no_accuracy": spills registers with ACCURACY, pruned there.
_FWD_SPACE = {
    "tf32": ((128, 64, 64, 4, 3, ""), (64, 64, 64, 4, 4, ""), (64, 64, 128, 4, 3, ""),
             (128, 64, 128, 8, 3, ""), (128, 128, 64, 8, 4, "no_accuracy")),
    "ieee": ((64, 64, 32, 4, 3, ""), (64, 64, 64, 8, 3, "no_accuracy")),
}
# (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DO, warps, stages): BLOCK_DO = the d chunk of the output tile.
_BWD_SPACE = {
    "tf32": ((64, 64, 64, 64, 4, 3), (64, 128, 64, 128, 8, 3), (128, 64, 64, 128, 8, 3),
             (64, 64, 128, 128, 4, 3)),
    "ieee": ((32, 64, 32, 64, 4, 3), (64, 64, 64, 64, 8, 2)),
}
# Window products (BLOCK_M, BLOCK_K, warps, stages); BLOCK_N is fixed per precision (the row
# product's logit-scale partials have one row per d tile, so the host must know it).
_MATMUL_SPACE = {
    "tf32": ((128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 2), (64, 128, 4, 3)),
    "ieee": ((64, 32, 4, 3),),
}
_MATMUL_BLOCK_N = {"tf32": 128, "ieee": 64}
_PRECISIONS = ("tf32", "ieee")


def _fwd_configs(precision: str | None = None) -> list[triton.Config]:
    """CUDA autotune space of the forward for ``precision`` (None: both, pruned per launch by ``PRECISION``)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for p in _PRECISIONS if precision in (None, p) for bm, bn, bd, w, s, _ in _FWD_SPACE[p]]


def _bwd_configs(precision: str | None = None) -> list[triton.Config]:
    """CUDA autotune space of both register-backward kernels for ``precision`` (None: both)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DO": bdo}, num_warps=w, num_stages=s)
            for p in _PRECISIONS if precision in (None, p) for bm, bn, bd, bdo, w, s in _BWD_SPACE[p]]


def _config_key(config: triton.Config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def _allowed(config: triton.Config, precision: str, accuracy: bool) -> bool:
    """Whether ``config`` belongs to the ``precision`` space and does not spill in this mode."""
    kw, key = config.kwargs, (config.num_warps, config.num_stages)
    if "BLOCK_DO" in kw:
        return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_D"], kw["BLOCK_DO"], *key) in _BWD_SPACE[precision]
    if "BLOCK_N" in kw:
        for bm, bn, bd, w, s, tag in _FWD_SPACE[precision]:
            if (bm, bn, bd, w, s) == (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_D"], *key):
                return not (accuracy and tag == "no_accuracy")
        return False
    if "BLOCK_K" in kw:
        return (kw["BLOCK_M"], kw["BLOCK_K"], *key) in _MATMUL_SPACE[precision]
    return True  # the window kernel: one space for both (its tile depends on the dtype instead)


def _prune(configs, named_args, **kwargs):
    """Keep the configs of the launch's precision that do not spill in its mode, whose d tiles do
    not exceed the padded feature width, and (forward) whose BLOCK_M divides the row tile of the
    groups (correct either way, masked, but wasted work). Each space has a config that qualifies
    everywhere (:func:`_kept_everywhere`), so the result is never empty."""
    width = max(64, _pow2(named_args["d"]))
    row_tile = named_args.get("row_tile", 0)
    accuracy = bool(named_args.get("ACCURACY", False))
    precision = named_args.get("PRECISION", "tf32")
    return [c for c in configs if _allowed(c, precision, accuracy) and c.kwargs["BLOCK_D"] <= width
            and c.kwargs.get("BLOCK_DO", 0) <= width and row_tile % c.kwargs.get("BLOCK_M", 1) == 0]


def _rows_per_group(m: int) -> int:
    """Rows of one forward row group: at most MAX_ROW_GROUPS groups, a multiple of 64 or 128."""
    quantum = _LARGE_GROUP_ROWS if m >= _LARGE_N else _SMALL_GROUP_ROWS
    return quantum * triton.cdiv(triton.cdiv(m, MAX_ROW_GROUPS), quantum)


def _row_tile(rows_per_group: int) -> int:
    """The forward's row-tile class: the largest row tile (128 or 64) that divides the group rows;
    128 without groups (``rows_per_group`` 0: a program owns one row block of any height). Every n
    >= 32768 is in class 128, so one tuning of a size bucket serves all of them."""
    return _LARGE_GROUP_ROWS if rows_per_group % _LARGE_GROUP_ROWS == 0 else _SMALL_GROUP_ROWS


def _window_configs() -> list[triton.Config]:
    """CUDA autotune space of the window kernel (its tiles are fixed: see :func:`_window_block`)."""
    space = ((64, 8, 3), (64, 8, 4), (128, 8, 2))  # 4 warps spill a 128 x 128 fp32 tile
    return [triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=s) for bd, w, s in space]


def _matmul_configs(precision: str | None = None) -> list[triton.Config]:
    """CUDA autotune space of the window products for ``precision`` (None: both)."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for p in _PRECISIONS if precision in (None, p) for bm, bk, w, s in _MATMUL_SPACE[p]]


def _prune_matmul(configs, named_args, **kwargs):
    """The launch precision's configs, without K tiles longer than the padded reduction."""
    depth = max(64, _pow2(named_args["K"]))
    kept = [c for c in configs if _allowed(c, named_args.get("PRECISION", "tf32"), False)]
    return [c for c in kept if c.kwargs["BLOCK_K"] <= depth] or kept[:1]


def _window_block(dtype: torch.dtype, interpreter: bool) -> int:
    """Tile of the window kernel, fixed per device and dtype (window sizes are multiples of it);
    fp32 products run without tensor cores and spill registers at 128 x 128 tiles."""
    return 64 if interpreter or dtype == torch.float32 else 128


def _matmul_block_n(interpreter: bool, dtype: torch.dtype) -> int:
    return 64 if interpreter else _MATMUL_BLOCK_N[dot_precision(dtype)]


def _interpreter_meta(d: int, backward: bool) -> dict:
    """The one fixed config used in the Triton interpreter (CPU): big tiles = few interpreted steps."""
    meta = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": min(128, _pow2(d)), "num_warps": 4, "num_stages": 1}
    if backward:
        meta["BLOCK_DO"] = min(256, _pow2(d))
    return meta


_INTERPRETER_MATMUL_META = {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}


def _kept_everywhere(configs: list[triton.Config], prune, cases: list[dict]) -> triton.Config:
    """The first of ``configs`` that ``prune`` keeps in every one of ``cases`` (named arguments): the
    kernel's preferred config under ``VLMCORE_AUTOTUNE=preferred``, valid at every key."""
    return next(c for c in configs if all(prune([c], named) == [c] for named in cases))


def _tuned(kernel, configs_of, key: list[str], cases_of, prune=_prune, restore=None) -> dict:
    """``{precision: kernel autotuned over configs_of(precision)}`` (CUDA only; the interpreter launches
    the plain kernel). One autotuner per precision, because the precisions' spaces are disjoint: in
    ``preferred`` mode each then holds its one config (kernels/_autotune.py)."""
    return {precision: autotune(configs_of(precision), _kept_everywhere(configs_of(precision), prune,
                                                                        cases_of(precision)),
                                key, prune, restore)(kernel)
            for precision in _PRECISIONS}


# d = 16 pads to the narrowest width the pruners allow (64): a config kept there is kept at every d.
_fwd_tuned = _tuned(_contrastive_fwd_kernel, _fwd_configs, _FWD_KEY, lambda precision: [
    {"d": 16, "row_tile": row_tile, "ACCURACY": accuracy, "PRECISION": precision}
    for row_tile in (_SMALL_GROUP_ROWS, _LARGE_GROUP_ROWS) for accuracy in (False, True)])
_bwd_rows_tuned = _tuned(_contrastive_bwd_rows_kernel, _bwd_configs, _BWD_KEY,
                         lambda precision: [{"d": 16, "PRECISION": precision}])
_bwd_cols_tuned = _tuned(_contrastive_bwd_cols_kernel, _bwd_configs, _BWD_KEY,
                         lambda precision: [{"d": 16, "PRECISION": precision}])
_window_tuned = _tuned(_contrastive_grad_window_kernel, lambda precision: _window_configs(), _WINDOW_KEY,
                       lambda precision: [{"d": 16, "PRECISION": precision}])
# Tuning runs a middle window's product several times: p_acc is restored between runs.
_matmul_tuned = _tuned(_contrastive_window_matmul_kernel, _matmul_configs, _MATMUL_KEY,
                       lambda precision: [{"K": 16, "PRECISION": precision}], prune=_prune_matmul, restore=["p_acc"])


def _launch(kernel, tuned: dict, grid, args: tuple, d: int, backward: bool) -> None:
    """Autotuned launch on CUDA (``tuned[PRECISION]``, the last argument); the fixed interpreter config
    on CPU. ``grid(meta)`` -> grid tuple."""
    if interpreter_enabled():
        meta = _interpreter_meta(d, backward)
        kernel[grid(meta)](*args, **meta)
    else:
        tuned[args[-1]][grid](*args)


# ----------------------------------------------------------------------------------------------
# the launch plan (used by the launchers below and by ``python -m vlmcore.bench plan``)
# ----------------------------------------------------------------------------------------------

# Ceilings the plan predicts with (H100, ANCHORS.md): only used to choose between the register and
# the window backward, where both are possible.
_PLAN_MATMUL_FLOPS_PER_S = 807e12
_PLAN_COPY_BYTES_PER_S = 3.0e12
_SMS = 132  # H100 SXM / H200: concurrent programs share L2, so a wave of them reads B once
_DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class _Choice:
    """Every host-side decision of one op call: what the launchers run (see :func:`_choose`)."""

    m: int
    n_cols: int
    d: int
    dtype: torch.dtype
    interpreter: bool
    symmetric: bool
    accuracy: bool
    with_cols: bool
    rows_per_group: int  # 0 without column statistics
    groups: int
    backward: str  # "register" or "window"
    window_block: int
    window_rows: int
    window_cols: int

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize


def _window_shape(m: int, n_cols: int, element_size: int, block: int) -> tuple[int, int]:
    """``(rows, cols)`` of a G' window: multiples of ``block``, at most WINDOW_MAX_COLS columns, and
    ``rows * cols * element_size <= WINDOW_BYTES`` at every n."""
    if WINDOW_BYTES < block * block * element_size:
        raise ValueError(f"WINDOW_BYTES = {WINDOW_BYTES} is below one {block} x {block} tile")
    cols = min(block * triton.cdiv(n_cols, block), max(block, WINDOW_MAX_COLS // block * block),
               WINDOW_BYTES // (block * element_size) // block * block)
    rows = min(block * triton.cdiv(m, block), WINDOW_BYTES // (cols * element_size) // block * block)
    return rows, cols


def _choose(m: int, n_cols: int, d: int, dtype: torch.dtype, *, symmetric: bool, accuracy: bool,
            with_cols: bool, interpreter: bool, backward: str | None = None) -> _Choice:
    """:func:`_choose_cached` keyed also on the module limits (tests change them)."""
    return _choose_cached(m, n_cols, d, dtype, symmetric, accuracy, with_cols, interpreter, backward,
                          (WINDOW_BYTES, WINDOW_MAX_COLS, REGISTER_BACKWARD_MAX_D, MAX_ROW_GROUPS, _SMALL_GROUP_ROWS,
                           _LARGE_GROUP_ROWS, _LARGE_N))


@functools.lru_cache(maxsize=256)
def _choose_cached(m: int, n_cols: int, d: int, dtype: torch.dtype, symmetric: bool, accuracy: bool,
                   with_cols: bool, interpreter: bool, backward: str | None, limits: tuple) -> _Choice:
    """The launch decisions for ``rows [m, d]`` against ``cols [n_cols, d]``: row groups of the
    forward, and the backward path (``backward``: force one): the register backward where d <=
    REGISTER_BACKWARD_MAX_D and the plan predicts it faster than the window backward."""
    rows_per_group = _rows_per_group(m) if symmetric else 0
    groups = triton.cdiv(m, rows_per_group) if symmetric else 0
    block = _window_block(dtype, interpreter)
    element_size = dtype.itemsize
    window_rows, window_cols = _window_shape(m, n_cols, element_size, block)
    base = _Choice(m, n_cols, d, dtype, interpreter, symmetric, accuracy, with_cols, rows_per_group, groups,
                   "window", block, window_rows, window_cols)
    if backward is not None:
        if backward not in ("register", "window"):
            raise ValueError(f"backward must be 'register' or 'window', got {backward!r}")
        return replace(base, backward=backward)
    if d > REGISTER_BACKWARD_MAX_D:
        return base
    register = replace(base, backward="register")
    times = [_plan_of(choice, "bwd").predicted_ms(_PLAN_MATMUL_FLOPS_PER_S, _PLAN_COPY_BYTES_PER_S)[0]
             for choice in (register, base)]
    return register if times[0] <= times[1] else base


def _fwd_meta(c: _Choice) -> dict:
    if c.interpreter:
        meta = _interpreter_meta(c.d, backward=False)
    else:
        precision = dot_precision(c.dtype)
        named = {"d": c.d, "row_tile": _row_tile(c.rows_per_group), "ACCURACY": c.accuracy, "PRECISION": precision}
        config = _prune(_fwd_tuned[precision].configs, named)[0]
        meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return {"COL_STATS": c.symmetric, "ACCURACY": c.accuracy, "PRECISION": dot_precision(c.dtype), **meta}


def _bwd_meta(c: _Choice) -> dict:
    if c.interpreter:
        meta = _interpreter_meta(c.d, backward=True)
    else:
        precision = dot_precision(c.dtype)
        config = _prune(_bwd_rows_tuned[precision].configs, {"d": c.d, "PRECISION": precision})[0]
        meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return {"SYMMETRIC": c.symmetric, "PRECISION": dot_precision(c.dtype), **meta}


def _window_meta(c: _Choice) -> dict:
    block = {"BLOCK_M": c.window_block, "BLOCK_N": c.window_block}
    if c.interpreter:
        meta = {"BLOCK_D": min(128, _pow2(c.d)), "num_warps": 4, "num_stages": 1}
    else:
        config = _prune(_window_tuned[dot_precision(c.dtype)].configs, {"d": c.d})[0]
        meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return {"SYMMETRIC": c.symmetric, "PRECISION": dot_precision(c.dtype), **block, **meta}


def _matmul_meta(c: _Choice, k: int) -> dict:
    if c.interpreter:
        meta = dict(_INTERPRETER_MATMUL_META)
    else:
        precision = dot_precision(c.dtype)
        config = _prune_matmul(_matmul_tuned[precision].configs, {"K": k, "PRECISION": precision})[0]
        meta = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    return {"PRECISION": dot_precision(c.dtype), "BLOCK_N": _matmul_block_n(c.interpreter, c.dtype), **meta}


def _waves(programs: int, c: _Choice) -> int:
    return 1 if c.interpreter else triton.cdiv(programs, 2 * _SMS)


def _forward_launches(c: _Choice) -> list[KernelLaunch]:
    meta = _fwd_meta(c)
    bm, bn, bd = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"]
    es, m, n, d = c.element_size, c.m, c.n_cols, c.d
    kn, kd = triton.cdiv(n, bn), triton.cdiv(d, bd)
    if c.symmetric:
        last = m - (c.groups - 1) * c.rows_per_group
        row_blocks = (c.groups - 1) * triton.cdiv(c.rows_per_group, bm) + triton.cdiv(last, bm)
        programs = c.groups
        # partials: the first row block of a group writes its [N] row, later ones read + write it
        partial_bytes = 4 * n * (2 * row_blocks - c.groups) * (3 if c.accuracy else 1)
    else:
        row_blocks = programs = triton.cdiv(m, bm)
        partial_bytes = 0
    tiles = row_blocks * kn * kd
    hbm = m * d * es + _waves(programs, c) * n * d * es + partial_bytes + 4 * m * (3 if c.accuracy else 2)
    launches = [KernelLaunch("_contrastive_fwd_kernel", (programs,), meta, tiles, tiles * 2 * bm * bn * bd,
                             2 * m * n * d, hbm)]
    if c.symmetric:
        block = 1024
        parts = 4 * c.groups * n * (3 if c.accuracy else 1)
        launches.append(KernelLaunch("_contrastive_merge_cols_kernel", (triton.cdiv(n, block),),
                                     {"ACCURACY": c.accuracy, "BLOCK": block, "num_warps": 4}, 0, 0, 0,
                                     parts + 4 * n * (2 if c.accuracy else 1)))
    return launches


def _register_backward_launches(c: _Choice) -> list[KernelLaunch]:
    meta = _bwd_meta(c)
    bm, bn, bd, bdo = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"], meta["BLOCK_DO"]
    es, m, n, d = c.element_size, c.m, c.n_cols, c.d
    kd, kdo = triton.cdiv(d, bd), triton.cdiv(d, bdo)
    flops_per_tile = kd * 2 * bm * bn * bd + 2 * bm * bn * bdo

    def side(kernel: str, own: int, other: int, own_block: int, other_block: int) -> KernelLaunch:
        programs = triton.cdiv(own, own_block) * kdo
        steps = programs * triton.cdiv(other, other_block)
        hbm = 2 * own * d * es + 2 * _waves(programs, c) * other * d * es + 4 * (m + n)
        return KernelLaunch(kernel, (triton.cdiv(own, own_block), kdo), meta, steps * (kd + 1),
                            steps * flops_per_tile, 2 * m * n * d * (kdo + 1), hbm)

    launches = [side("_contrastive_bwd_rows_kernel", m, n, bm, bn)]
    if c.with_cols:
        launches.append(side("_contrastive_bwd_cols_kernel", n, m, bn, bm))
    return launches


def _window_classes(total: int, step: int) -> list[tuple[bool, bool, int, int]]:
    """Windows of ``step`` over ``range(total)`` as ``(first, last, size, count)`` classes (at most 3)."""
    count = triton.cdiv(total, step)
    last = total - (count - 1) * step
    if count == 1:
        return [(True, True, last, 1)]
    middle = [(False, False, step, count - 2)] if count > 2 else []
    return [(True, False, step, 1), *middle, (False, True, last, 1)]


def _window_backward_launches(c: _Choice) -> list[KernelLaunch]:
    """The window backward's launches: per row window, per column chunk: G' (the one recompute),
    the row product (dA), the column product (dB); then the logit-scale sum. Identical launches are
    merged (``count``), so the plan costs O(1) host time at any n."""
    es, m, n, d = c.element_size, c.m, c.n_cols, c.d
    wmeta = _window_meta(c)
    block, bd = c.window_block, wmeta["BLOCK_D"]
    kd = triton.cdiv(d, bd)
    merged: dict[tuple, KernelLaunch] = {}

    def add(launch: KernelLaunch, count: int) -> None:
        key = (launch.kernel, launch.grid, repr(sorted(launch.config.items())), launch.tiles, launch.hbm_bytes)
        merged[key] = replace(launch, count=count + (merged[key].count if key in merged else 0))

    def product(flags: dict, rows_out: int, k: int, first: bool, last: bool) -> KernelLaunch:
        meta = {**_matmul_meta(c, k), **flags, "FIRST": first, "LAST": last}
        bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
        grid = (triton.cdiv(rows_out, bm), triton.cdiv(d, bn))
        tiles = grid[0] * grid[1] * triton.cdiv(k, bk)
        acc = 4 * rows_out * d * ((0 if first else 1) + (0 if last else 1))
        hbm = rows_out * k * es + k * d * es + acc + (rows_out * d * es if last else 0)
        if flags["WRITE_DS"] and last:
            hbm += rows_out * d * es + 4 * rows_out * grid[1]
        return KernelLaunch("_contrastive_window_matmul_kernel", grid, meta, tiles, tiles * 2 * bm * bn * bk,
                            2 * rows_out * k * d, hbm)

    for row_first, row_last, rows, row_count in _window_classes(m, c.window_rows):
        for col_first, col_last, cols, col_count in _window_classes(n, c.window_cols):
            count = row_count * col_count
            grid = (triton.cdiv(rows, block), triton.cdiv(cols, block))
            tiles = grid[0] * grid[1] * kd
            add(KernelLaunch("_contrastive_grad_window_kernel", grid, wmeta, tiles, tiles * 2 * block * block * bd,
                             2 * rows * cols * d, rows * cols * es + (rows + cols) * d * es + 4 * (rows + cols)),
                count)
            add(product({"TRANS_X": False, "WRITE_DS": True}, rows, cols, col_first, col_last), count)
            if c.with_cols:
                add(product({"TRANS_X": True, "WRITE_DS": False}, cols, rows, row_first, row_last), count)
    d_tiles = triton.cdiv(d, _matmul_block_n(c.interpreter, c.dtype))
    add(KernelLaunch("torch.sum", (), {"dim": 0}, 0, 0, 0, 4 * d_tiles * m + 4 * m), 1)
    return list(merged.values())


def _peak_extra_bytes(c: _Choice) -> tuple[int, list[str]]:
    """Most temporary memory alive at once (input gradients excluded), and notes on it."""
    f32 = 4
    m, n, d = c.m, c.n_cols, c.d
    stats = f32 * (3 * m + 2 * n)  # row LSE / target / argmax, column LSE / argmax
    forward = stats + (f32 * c.groups * n * (3 if c.accuracy else 1) if c.symmetric else 0)
    if c.backward == "register":
        backward = stats + f32 * m
        return max(forward, backward), ["backward: register (G' never stored)"]
    rows_windows = triton.cdiv(m, c.window_rows)
    chunks = triton.cdiv(n, c.window_cols)
    window = c.window_rows * c.window_cols * c.element_size
    row_acc = f32 * c.window_rows * d if chunks > 1 else 0
    col_acc = f32 * n * d if rows_windows > 1 and c.with_cols else 0
    d_tiles = triton.cdiv(d, _matmul_block_n(c.interpreter, c.dtype))
    backward = stats + window + row_acc + col_acc + f32 * (d_tiles + 1) * m
    notes = [f"backward: window, one G' window alive at a time: {c.window_rows} x {c.window_cols} = "
             f"{window / 2**20:.1f} MiB (cap {WINDOW_BYTES / 2**20:.0f} MiB); {rows_windows} row windows x "
             f"{chunks} column chunks",
             f"fp32 accumulators: dB {col_acc / 2**20:.1f} MiB, dA window {row_acc / 2**20:.1f} MiB"]
    return max(forward, backward), notes


def _plan_of(c: _Choice, mode: str) -> OpPlan:
    if mode not in ("fwd", "bwd", "fwd_bwd"):
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd_bwd', got {mode!r}")
    launches = _forward_launches(c) if mode != "bwd" else []
    if mode != "fwd":
        launches += _register_backward_launches(c) if c.backward == "register" else _window_backward_launches(c)
    es, m, n, d = c.element_size, c.m, c.n_cols, c.d
    floor = {"fwd": 2, "bwd": 6, "fwd_bwd": 8}[mode] * m * n * d
    floor_bytes = (m + n) * d * es * (1 if mode == "fwd" else 2)
    peak, notes = _peak_extra_bytes(c)
    grads = (m + (n if c.with_cols else 0)) * d * es if mode != "fwd" else 0
    notes = [f"peak extra memory with the input gradients: {(peak + grads) / 2**20:.0f} MiB"] + notes
    if c.symmetric:
        notes.append(f"forward: {c.groups} row groups of {c.rows_per_group} rows")
    notes.append("HBM model: one wave of resident programs (2 per SM x 132 SMs) reads the column "
                 "features once through L2; G' windows are written once and read once per product")
    shape = {"n": m} if m == n else {"m": m, "n_cols": n}
    shape.update({"d": d, "dtype": {v: k for k, v in _DTYPE_NAMES.items()}[c.dtype]})
    return OpPlan("contrastive", shape, mode, launches, floor, floor_bytes, peak, notes)


def contrastive_plan(n: int, d: int, dtype: str | torch.dtype = "bf16", *, n_cols: int | None = None,
                     symmetric: bool = True, accuracy: bool = False, with_cols: bool = True,
                     mode: str = "fwd_bwd", interpreter: bool = False, backward: str | None = None) -> OpPlan:
    """The exact launches of one contrastive-loss call for ``[n, d]`` rows against ``[n_cols, d]``
    columns (default square, the symmetric op), computed by the same decisions the launchers make.

    ``interpreter``: the fixed configs of the Triton interpreter (tile counts then equal what the
    interpreter runs); otherwise the preferred sm_90 config of each autotuned kernel (the autotuner
    may pick another one on the GPU). ``tiles`` count ``tl.dot`` block products. Returns an
    :class:`~vlmcore.kernels._plan.OpPlan` (a prediction, never a measurement).
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPE_NAMES)} or a torch dtype, got {dtype!r}")
        dtype = _DTYPE_NAMES[dtype]
    n_cols = n if n_cols is None else n_cols
    choice = _choose(n, n_cols, d, dtype, symmetric=symmetric, accuracy=accuracy, with_cols=with_cols,
                     interpreter=interpreter, backward=backward)
    return _plan_of(choice, mode)


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------


def _forward(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, label_offset: int,
             symmetric: bool, accuracy: bool):
    """Statistics of S = s rows cols^T, fp32 ``[m]`` / ``[N]``.

    Returns ``(row_lse, row_tgt, row_arg, col_lse, col_arg)``: natural-log row LSE, target logits
    ``S[i, i + label_offset]``, int32 row argmax of X (``None`` without ``accuracy``); column LSE and
    argmax only when ``symmetric`` (else ``None``).
    """
    m, d = rows.shape
    n_cols = cols.shape[0]
    plan = _choose(m, n_cols, d, rows.dtype, symmetric=symmetric, accuracy=accuracy, with_cols=True,
                   interpreter=interpreter_enabled(), backward="window")
    f32 = {"device": rows.device, "dtype": torch.float32}
    i32 = {"device": rows.device, "dtype": torch.int32}
    row_lse, row_tgt = torch.empty(m, **f32), torch.empty(m, **f32)
    row_arg = torch.empty(m, **i32) if accuracy else row_lse  # stand-in pointers are never touched
    if symmetric:
        groups = plan.groups
        part_lse = torch.empty((groups, n_cols), **f32)
        part_max = torch.empty((groups, n_cols), **f32) if accuracy else part_lse
        part_arg = torch.empty((groups, n_cols), **i32) if accuracy else part_lse
        grid = lambda meta: (groups,)  # noqa: E731
    else:
        groups = 0
        part_lse = part_max = part_arg = row_lse
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    args = (rows, cols, scale, row_lse, row_tgt, row_arg, part_lse, part_max, part_arg,
            m, n_cols, d, _size_bucket(m, n_cols), rows.stride(0), cols.stride(0), label_offset,
            plan.rows_per_group, _row_tile(plan.rows_per_group), symmetric, accuracy, dot_precision(rows.dtype))
    _launch(_contrastive_fwd_kernel, _fwd_tuned, grid, args, d, backward=False)
    if not symmetric:
        return row_lse, row_tgt, row_arg if accuracy else None, None, None
    col_lse = torch.empty(n_cols, **f32)
    col_arg = torch.empty(n_cols, **i32) if accuracy else col_lse
    block = 1024
    _contrastive_merge_cols_kernel[(triton.cdiv(n_cols, block),)](
        part_lse, part_max, part_arg, col_lse, col_arg, n_cols, groups, accuracy, BLOCK=block, num_warps=4,
    )
    return row_lse, row_tgt, row_arg if accuracy else None, col_lse, col_arg if accuracy else None


def _backward(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor, coef: torch.Tensor,
              row_lse: torch.Tensor, col_lse: torch.Tensor | None, label_offset: int, smoothing: float,
              with_cols: bool):
    """``(d_rows [m, d], d_cols [N, d], ds_rows fp32 [m])`` with dL/dS = coef / s * G' (symmetric when
    ``col_lse`` is given); ``ds_rows.sum() * coef / s`` is the logit-scale gradient. Without
    ``with_cols`` (frozen columns) the column half of the work is skipped and d_cols is ``[0]``.
    The path (register or window backward) and the window shape come from :func:`_choose`."""
    m, d = rows.shape
    n_cols = cols.shape[0]
    symmetric = col_lse is not None
    plan = _choose(m, n_cols, d, rows.dtype, symmetric=symmetric, accuracy=False, with_cols=with_cols,
                   interpreter=interpreter_enabled())
    if plan.backward == "window":
        return _backward_windows(plan, rows, cols, scale, coef, row_lse, col_lse, label_offset, smoothing)
    col_lse = col_lse if symmetric else row_lse
    d_rows = torch.empty_like(rows)
    d_cols = torch.empty_like(cols) if with_cols else cols.new_empty(0)
    ds_rows = torch.empty(m, device=rows.device, dtype=torch.float32)
    tail = (m, n_cols, d, _size_bucket(m, n_cols), rows.stride(0), cols.stride(0))
    rest = (label_offset, smoothing, symmetric, dot_precision(rows.dtype))
    _launch(_contrastive_bwd_rows_kernel, _bwd_rows_tuned,
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, meta["BLOCK_DO"])),
            (rows, cols, scale, coef, row_lse, col_lse, d_rows, ds_rows, *tail, d_rows.stride(0), *rest),
            d, backward=True)
    if with_cols:
        _launch(_contrastive_bwd_cols_kernel, _bwd_cols_tuned,
                lambda meta: (triton.cdiv(n_cols, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_DO"])),
                (rows, cols, scale, coef, row_lse, col_lse, d_cols, *tail, d_cols.stride(0), *rest),
                d, backward=True)
    return d_rows, d_cols, ds_rows


def _window_product(x: torch.Tensor, y: torch.Tensor, acc: torch.Tensor, out: torch.Tensor, coef: torch.Tensor,
                    rows: torch.Tensor, ds: torch.Tensor, *, trans_x: bool, first: bool, last: bool,
                    write_ds: bool, interpreter: bool) -> None:
    """``out (or acc) = [acc +] op(x) @ y`` for one window (see ``_contrastive_window_matmul_kernel``);
    x is a row-major G' window ``[R, C]`` (``trans_x``: use its transpose), y ``[K, d]`` rows."""
    win_rows, win_cols = x.shape
    m_out, k = (win_cols, win_rows) if trans_x else (win_rows, win_cols)
    stride_xm, stride_xk = (1, win_cols) if trans_x else (win_cols, 1)
    d = y.shape[1]
    block_n = _matmul_block_n(interpreter, x.dtype)
    args = (x, y, acc, out, coef, rows, ds, m_out, d, k, stride_xm, stride_xk, y.stride(0), rows.stride(0),
            ds.stride(0) if ds.dim() == 2 else 0, first, last, trans_x, write_ds, dot_precision(x.dtype))
    grid = lambda meta: (triton.cdiv(m_out, meta["BLOCK_M"]), triton.cdiv(d, block_n))  # noqa: E731
    if interpreter:
        meta = _INTERPRETER_MATMUL_META
        _contrastive_window_matmul_kernel[grid(meta)](*args, BLOCK_N=block_n, **meta)
    else:
        _matmul_tuned[dot_precision(x.dtype)][grid](*args, BLOCK_N=block_n)


def _backward_windows(plan: _Choice, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor,
                      coef: torch.Tensor, row_lse: torch.Tensor, col_lse: torch.Tensor | None,
                      label_offset: int, smoothing: float):
    """:func:`_backward` for large d, recomputing the logits once.

    For each row window ``[r0, r1)`` and, inside it, each column chunk ``[c0, c1)`` (fixed order;
    the window ``[r1 - r0, c1 - c0]`` holds at most ``WINDOW_BYTES``): G' is written once in the
    input dtype; ``dA[r0:r1] (+)= G' B[c0:c1]`` (fp32 accumulator across chunks, written with the
    coefficient at the last chunk, which also forms the per-row ``sum_j G'_ij X_ij`` as
    ``sum_k (G' B)_ik A_ik``); ``dB[c0:c1] (+)= G'^T A[r0:r1]`` (fp32 accumulator across row
    windows, written at the last one). The window is freed before the next one is allocated, so one
    is alive at a time. FLOPs: 2 n^2 d (recompute) + 2 x 2 n^2 d (products).
    """
    m, d = rows.shape
    n_cols = cols.shape[0]
    symmetric = col_lse is not None
    col_lse = col_lse if symmetric else row_lse
    interpreter = plan.interpreter
    row_windows = range(0, m, plan.window_rows)
    chunks = range(0, n_cols, plan.window_cols)
    f32 = {"device": rows.device, "dtype": torch.float32}
    d_rows = torch.empty_like(rows)
    d_cols = torch.empty_like(cols) if plan.with_cols else cols.new_empty(0)
    # fp32 accumulators only where a sum spans several windows
    row_acc = torch.empty((plan.window_rows, d), **f32) if len(chunks) > 1 else coef
    col_acc = torch.empty((n_cols, d), **f32) if len(row_windows) > 1 and plan.with_cols else coef
    ds_part = torch.empty((triton.cdiv(d, _matmul_block_n(interpreter, rows.dtype)), m), **f32)
    for i, row0 in enumerate(row_windows):
        row1 = min(row0 + plan.window_rows, m)
        for j, col0 in enumerate(chunks):
            col1 = min(col0 + plan.window_cols, n_cols)
            g = _grad_window(plan, rows, cols, scale, row_lse, col_lse, (row0, row1), (col0, col1),
                             label_offset, smoothing)
            _window_product(g, cols[col0:col1], row_acc, d_rows[row0:row1], coef, rows[row0:row1],
                            ds_part[:, row0:row1], trans_x=False, first=j == 0, last=j == len(chunks) - 1,
                            write_ds=True, interpreter=interpreter)
            if plan.with_cols:
                _window_product(g, rows[row0:row1], col_acc[col0:col1] if col_acc.dim() == 2 else col_acc,
                                d_cols[col0:col1], coef, rows, ds_part, trans_x=True, first=i == 0,
                                last=i == len(row_windows) - 1, write_ds=False, interpreter=interpreter)
            del g  # the last reference: the next window is allocated only after this one is freed
    return d_rows, d_cols, ds_part.sum(0)


def _grad_window(plan: _Choice, rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor,
                 row_lse: torch.Tensor, col_lse: torch.Tensor, row_range: tuple[int, int],
                 col_range: tuple[int, int], label_offset: int, smoothing: float) -> torch.Tensor:
    """G' of rows ``[r0, r1)`` x columns ``[c0, c1)``: a new ``[r1 - r0, c1 - c0]`` window in the input
    dtype. Its launch arguments live only in this frame, so once the caller drops the window nothing
    else holds it (a launch tuple kept in the caller's loop kept the previous window alive while the
    next was allocated: two windows, not one)."""
    (row0, row1), (col0, col1) = row_range, col_range
    g = torch.empty((row1 - row0, col1 - col0), device=rows.device, dtype=rows.dtype)
    args = (rows, cols, scale, row_lse, col_lse, g, row0, col0, row1 - row0, col1 - col0,
            rows.shape[0], cols.shape[0], rows.shape[1], _size_bucket(rows.shape[0], cols.shape[0]),
            rows.stride(0), cols.stride(0), label_offset, smoothing, plan.symmetric,
            dot_precision(rows.dtype))
    block = plan.window_block
    grid = (triton.cdiv(row1 - row0, block), triton.cdiv(col1 - col0, block))
    if plan.interpreter:
        meta = _window_meta(plan)
        _contrastive_grad_window_kernel[grid](*args, **{k: meta[k] for k in
                                                        ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")})
    else:
        _window_tuned[dot_precision(rows.dtype)][grid](*args, BLOCK_M=block, BLOCK_N=block)
    return g


def _scale_vector(logit_scale: torch.Tensor) -> torch.Tensor:
    """s as an fp32 ``[1]`` device tensor (read by the kernels: no host sync)."""
    return logit_scale.detach().reshape(1).to(torch.float32)


def _sum_of_logits(rows: torch.Tensor, cols: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``sum_ij S_ij = s (sum_i a_i) . (sum_j b_j)`` in fp32, O(n d): the label-smoothing term."""
    return scale[0] * torch.dot(rows.sum(0, dtype=torch.float32), cols.sum(0, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------
# custom ops + autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("vlmcore::contrastive_loss", mutates_args=())
def _symmetric_op(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, label_smoothing: float, accuracy: bool,
    diagonal_targets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric loss of S = s I T^T, ``[n, d]`` inputs -> ``(loss fp32 [], row_lse fp32 [n],
    col_lse fp32 [n], acc fp32 [2] = (i2t, t2i) or [0] without accuracy)``.

    ``diagonal_targets=False`` drops the target term (the label offset n puts every label outside
    the columns): what remains is the log-sum-exp (and smoothing) part, to which the multi-positive
    loss adds its own O(n d) target term (see :func:`_multi_positive_target`)."""
    image, text = image.contiguous(), text.contiguous()
    n = image.shape[0]
    scale = _scale_vector(logit_scale)
    offset = 0 if diagonal_targets else n
    row_lse, row_tgt, row_arg, col_lse, col_arg = _forward(image, text, scale, offset, True, accuracy)
    eps = label_smoothing
    loss = (0.5 * (row_lse.mean() + col_lse.mean()) - (1.0 - eps) * row_tgt.mean()
            - eps * _sum_of_logits(image, text, scale) / (n * n))
    if accuracy:
        labels = torch.arange(n, device=image.device, dtype=torch.int32)
        acc = torch.stack([(row_arg == labels).float().mean(), (col_arg == labels).float().mean()])
    else:
        acc = image.new_zeros(0, dtype=torch.float32)
    return loss, row_lse, col_lse, acc


@_symmetric_op.register_fake
def _(image, text, logit_scale, label_smoothing, accuracy, diagonal_targets=True):
    n = image.shape[0]
    f32 = torch.float32
    return (image.new_empty((), dtype=f32), image.new_empty(n, dtype=f32), image.new_empty(n, dtype=f32),
            image.new_empty(2 if accuracy else 0, dtype=f32))


@torch.library.custom_op("vlmcore::contrastive_loss_backward", mutates_args=())
def _symmetric_backward_op(
    grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
    row_lse: torch.Tensor, col_lse: torch.Tensor, label_smoothing: float, with_text: bool,
    diagonal_targets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(d_image [n, d], d_text [n, d] or [0] without with_text, d_logit_scale)`` of
    ``grad * loss``. (The loss is symmetric in image and text: swap them, and the LSEs, to get
    d_text alone.)"""
    image, text = image.contiguous(), text.contiguous()
    scale = _scale_vector(logit_scale)
    factor = grad.detach().reshape(1).to(torch.float32) / (2 * image.shape[0])  # dL/dS = factor * G'
    offset = 0 if diagonal_targets else image.shape[0]
    d_image, d_text, ds_rows = _backward(image, text, scale, factor * scale, row_lse, col_lse, offset,
                                         label_smoothing, with_text)
    d_scale = (factor * ds_rows.sum()).reshape(logit_scale.shape).to(logit_scale.dtype)
    return d_image, d_text, d_scale


@_symmetric_backward_op.register_fake
def _(grad, image, text, logit_scale, row_lse, col_lse, label_smoothing, with_text, diagonal_targets=True):
    d_text = torch.empty_like(text) if with_text else text.new_empty(0)
    return torch.empty_like(image), d_text, torch.empty_like(logit_scale)


def _symmetric_setup_context(ctx, inputs, output):
    image, text, logit_scale, label_smoothing, _, *rest = inputs
    _, row_lse, col_lse, acc = output
    ctx.mark_non_differentiable(row_lse, col_lse, acc)
    ctx.save_for_backward(image, text, logit_scale, row_lse, col_lse)
    ctx.label_smoothing = label_smoothing
    ctx.diagonal_targets = rest[0] if rest else True


def _symmetric_backward(ctx, grad_loss, grad_row_lse, grad_col_lse, grad_acc):
    image, text, logit_scale, row_lse, col_lse = ctx.saved_tensors
    need_image, need_text, need_scale = ctx.needs_input_grad[:3]
    if need_image or not need_text:
        d_image, d_text, d_scale = _symmetric_backward_op(
            grad_loss, image, text, logit_scale, row_lse, col_lse, ctx.label_smoothing, need_text,
            ctx.diagonal_targets,
        )
    else:  # frozen image tower: only the text half of the work
        d_text, d_image, d_scale = _symmetric_backward_op(
            grad_loss, text, image, logit_scale, col_lse, row_lse, ctx.label_smoothing, False,
            ctx.diagonal_targets,
        )
    return (d_image if need_image else None, d_text if need_text else None, d_scale if need_scale else None,
            None, None, None)


_symmetric_op.register_autograd(_symmetric_backward, setup_context=_symmetric_setup_context)


def _check_label_offset(rows: torch.Tensor, cols: torch.Tensor, label_offset: int) -> None:
    if not 0 <= label_offset <= cols.shape[0] - rows.shape[0]:
        raise ValueError(
            f"label_offset must put the {rows.shape[0]} labels inside the {cols.shape[0]} columns, got {label_offset}"
        )


@torch.library.custom_op("vlmcore::contrastive_loss_rows", mutates_args=())
def _rows_op(
    rows: torch.Tensor, cols: torch.Tensor, logit_scale: torch.Tensor, label_smoothing: float,
    label_offset: int, accuracy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction: ``mean_i CE(s rows_i cols^T, i + label_offset)``; rows ``[m, d]``, cols ``[N, d]``.

    Returns ``(loss fp32 [], row_lse fp32 [m], acc fp32 [1] (top-1 of the rows) or [0])``.
    """
    _check_label_offset(rows, cols, label_offset)
    rows, cols = rows.contiguous(), cols.contiguous()
    m, n_cols = rows.shape[0], cols.shape[0]
    scale = _scale_vector(logit_scale)
    row_lse, row_tgt, row_arg, _, _ = _forward(rows, cols, scale, label_offset, False, accuracy)
    eps = label_smoothing
    loss = (row_lse.mean() - (1.0 - eps) * row_tgt.mean()
            - eps * _sum_of_logits(rows, cols, scale) / (m * n_cols))
    if accuracy:
        labels = torch.arange(m, device=rows.device, dtype=torch.int32) + label_offset
        acc = (row_arg == labels).float().mean().reshape(1)
    else:
        acc = rows.new_zeros(0, dtype=torch.float32)
    return loss, row_lse, acc


@_rows_op.register_fake
def _(rows, cols, logit_scale, label_smoothing, label_offset, accuracy):
    f32 = torch.float32
    return (rows.new_empty((), dtype=f32), rows.new_empty(rows.shape[0], dtype=f32),
            rows.new_empty(1 if accuracy else 0, dtype=f32))


@torch.library.custom_op("vlmcore::contrastive_loss_rows_backward", mutates_args=())
def _rows_backward_op(
    grad: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, logit_scale: torch.Tensor,
    row_lse: torch.Tensor, label_smoothing: float, label_offset: int, with_cols: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(d_rows [m, d], d_cols [N, d] or [0] without with_cols, d_logit_scale)`` of
    ``grad * loss`` of the rows op."""
    rows, cols = rows.contiguous(), cols.contiguous()
    scale = _scale_vector(logit_scale)
    factor = grad.detach().reshape(1).to(torch.float32) / rows.shape[0]  # dL/dS = factor * G'
    d_rows, d_cols, ds_rows = _backward(rows, cols, scale, factor * scale, row_lse, None, label_offset, label_smoothing,
                                        with_cols)
    d_scale = (factor * ds_rows.sum()).reshape(logit_scale.shape).to(logit_scale.dtype)
    return d_rows, d_cols, d_scale


@_rows_backward_op.register_fake
def _(grad, rows, cols, logit_scale, row_lse, label_smoothing, label_offset, with_cols):
    d_cols = torch.empty_like(cols) if with_cols else cols.new_empty(0)
    return torch.empty_like(rows), d_cols, torch.empty_like(logit_scale)


def _rows_setup_context(ctx, inputs, output):
    rows, cols, logit_scale, label_smoothing, label_offset, _ = inputs
    _, row_lse, acc = output
    ctx.mark_non_differentiable(row_lse, acc)
    ctx.save_for_backward(rows, cols, logit_scale, row_lse)
    ctx.label_smoothing = label_smoothing
    ctx.label_offset = label_offset


def _rows_backward(ctx, grad_loss, grad_row_lse, grad_acc):
    rows, cols, logit_scale, row_lse = ctx.saved_tensors
    need_rows, need_cols, need_scale = ctx.needs_input_grad[:3]
    d_rows, d_cols, d_scale = _rows_backward_op(
        grad_loss, rows, cols, logit_scale, row_lse, ctx.label_smoothing, ctx.label_offset, need_cols
    )
    return (d_rows if need_rows else None, d_cols if need_cols else None, d_scale if need_scale else None,
            None, None, None)


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup_context)


# ----------------------------------------------------------------------------------------------
# multi-positive targets (group ids): O(n d) on the host side, never n x n
# ----------------------------------------------------------------------------------------------


def _sum_by_key(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """``out[q] = sum of values[i] over i with keys[i] == queries[q]``, fp32 ``[len(queries), d]``.

    Sorted keys, an fp32 prefix sum and two binary searches: O((n + q) d), no atomics, no host
    sync, deterministic."""
    order = torch.argsort(keys, stable=True)
    sorted_keys = keys[order]
    prefix = torch.cat([values.new_zeros((1, values.shape[1]), dtype=torch.float32),
                        torch.cumsum(values[order].float(), dim=0)])
    lo = torch.searchsorted(sorted_keys, queries, right=False)
    hi = torch.searchsorted(sorted_keys, queries, right=True)
    return prefix[hi] - prefix[lo]


class _SumByKey(torch.autograd.Function):
    """:func:`_sum_by_key` with a deterministic backward: the gradient of ``values`` is the same
    sum with keys and queries swapped (every pair with equal keys carries the gradient back)."""

    @staticmethod
    def forward(ctx, keys, values, queries):
        ctx.save_for_backward(keys, queries)
        ctx.dtype = values.dtype
        return _sum_by_key(keys, values, queries)

    @staticmethod
    def backward(ctx, grad):
        keys, queries = ctx.saved_tensors
        return None, _sum_by_key(queries, grad, keys).to(ctx.dtype), None


def _count_by_key(keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """How many ``keys`` equal each query (int64 ``[len(queries)]``)."""
    sorted_keys = torch.sort(keys).values
    return torch.searchsorted(sorted_keys, queries, right=True) - torch.searchsorted(sorted_keys, queries)


def _multi_positive_target(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                           image_ids: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """``(mean_i sum_j q_ij S_ij + mean_j sum_i q'_ij S_ij) / 2``: the target term of the
    multi-positive loss, fp32 scalar, differentiable in all three inputs.

    With ``q_ij = [image_ids[i] == text_ids[j]] / |P_i|``, ``sum_j q_ij S_ij = s a_i . mean_{j in P_i}
    b_j``: the positives' mean features come from sums by id, O(n d). A row without positives
    divides 0 by 0: NaN, never a silently wrong number."""
    text_means = _SumByKey.apply(text_ids, text, image_ids) / _count_by_key(text_ids, image_ids)[:, None]
    image_means = _SumByKey.apply(image_ids, image, text_ids) / _count_by_key(image_ids, text_ids)[:, None]
    i2t = (image.float() * text_means).sum(1).mean()
    t2i = (text.float() * image_means).sum(1).mean()
    return logit_scale.reshape(()).float() * (i2t + t2i) / 2


def _check_group_ids(image_ids, text_ids, image_features, group, local_loss, output_dict) -> None:
    if (image_ids is None) != (text_ids is None):
        missing = "text_ids" if text_ids is None else "image_ids"
        raise ValueError(f"{missing} must be given too: group ids go on both sides (or on neither)")
    n = image_features.shape[0]
    for name, ids in (("image_ids", image_ids), ("text_ids", text_ids)):
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be an integer torch.Tensor of shape [n], got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
        if ids.shape != (n,):
            raise ValueError(f"{name} must have shape [{n}] (one id per feature row), got {tuple(ids.shape)}")
        if ids.device != image_features.device:
            raise ValueError(f"{name} is on {ids.device} but image_features is on {image_features.device}")
    if group is not None and local_loss:
        raise ValueError("local_loss=True is not available with group ids (image_ids / text_ids): "
                         "use the global loss (local_loss=False)")
    if output_dict:
        raise ValueError("output_dict (top-1 accuracies) is not available with group ids (image_ids / text_ids)")


def _check_every_row_has_a_positive(image_ids: torch.Tensor, text_ids: torch.Tensor) -> None:
    """Caught where it costs no device sync (CPU tensors); on a GPU such a row gives a NaN loss."""
    if image_ids.device.type == "cpu" and not torch.compiler.is_compiling():
        for name, rows, cols in (("image_ids", image_ids, text_ids), ("text_ids", text_ids, image_ids)):
            if bool((_count_by_key(cols, rows) == 0).any()):
                raise ValueError(f"every id in {name} needs at least one equal id on the other side (a positive)")


# ----------------------------------------------------------------------------------------------
# public op (validation, distributed gather, dispatch)
# ----------------------------------------------------------------------------------------------


def _validate(image_features, text_features, logit_scale, label_smoothing) -> None:
    check_float_tensor("image_features", image_features, 2)
    check_float_tensor("text_features", text_features, 2)
    check_same("text_features", text_features, "image_features", image_features)
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features {tuple(image_features.shape)} and text_features {tuple(text_features.shape)} "
            "must have the same [n, d] shape (row i of each is a matching pair)"
        )
    if image_features.shape[0] == 0 or image_features.shape[1] == 0:
        raise ValueError(f"image_features must be a non-empty [n, d] batch, got {tuple(image_features.shape)}")
    check_scalar("logit_scale", logit_scale, image_features)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {type(label_smoothing).__name__}")
    if not (0.0 <= float(label_smoothing) <= 1.0):
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")


def _check_process_group(group) -> None:
    """``group`` must be a ProcessGroup of an initialized torch.distributed."""
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialized")


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    group=None,
    local_loss: bool = False,
    label_smoothing: float = 0.0,
    output_dict: bool = False,
    image_ids: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
):
    """Symmetric contrastive loss ``(CE(s I T^T, arange) + CE(s T I^T, arange)) / 2``.

    Equal in value and in the gradients of all three inputs to OpenCLIP's ``ClipLoss`` in one
    process; with ``group`` set, to ``ClipLoss(gather_with_grad=True, local_loss=local_loss)``.

    Args:
        image_features, text_features: ``[n, d]`` matching rows, fp32/fp16/bf16, normalized by the
            caller. With ``group``: this rank's local batch (equal n on every rank).
        logit_scale: 0-dim multiplier s (OpenCLIP passes ``logit_scale.exp()``); gets a gradient.
        group: a ``torch.distributed`` process group (or ``dist.group.WORLD``); None = one process.
        local_loss: with ``group``: this rank's rows against all gathered columns, labels offset by
            rank; otherwise the global loss on every rank.
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        output_dict: return ``{"loss", "i2t_acc", "t2i_acc"}`` (top-1 accuracy of the local rows,
            for logging, no gradient) instead of the loss alone.
        image_ids, text_ids: optional integer group ids ``[n]`` per side (both or neither; with
            ``group``: this rank's ids, the global loss only; no ``output_dict``): pairs with equal
            ids are positives, and each row's soft target spreads uniformly over its positives
            (several captions per image, COCO style). All-unique ids equal on both sides give the
            plain loss. Never n x n: the target term is O(n d) (sums of features by id); the
            kernels do the log-sum-exp part. A row without any positive is refused on CPU and
            gives a NaN loss on a GPU (no host sync).

    Returns:
        fp32 scalar loss (or the dict).

    Backend (``vlmcore.kernels.backend``): the Triton kernels (module docstring) for CUDA tensors or
    when forced, extra memory O(n) plus bounded buffers, never the n x n logits, bit-reproducible;
    otherwise :func:`~vlmcore.kernels.reference.contrastive_loss_reference` (materialized logits).

    Example::

        loss = contrastive_loss(F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1), theta.exp())
    """
    _validate(image_features, text_features, logit_scale, label_smoothing)
    if image_ids is not None or text_ids is not None:
        _check_group_ids(image_ids, text_ids, image_features, group, local_loss, output_dict)
        if group is not None:  # the global loss over the gathered batch, on every rank
            _check_process_group(group)
            image_features = all_gather_with_grad(image_features, group)
            text_features = all_gather_with_grad(text_features, group)
            image_ids, text_ids = all_gather_no_grad(image_ids, group), all_gather_no_grad(text_ids, group)
        _check_every_row_has_a_positive(image_ids, text_ids)
        return _multi_positive_loss(image_features, text_features, logit_scale, image_ids, text_ids,
                                    float(label_smoothing))
    label_offset = 0
    all_image = all_text = None
    if group is not None:
        _check_process_group(group)
        all_image = all_gather_with_grad(image_features, group)
        all_text = all_gather_with_grad(text_features, group)
        if local_loss:
            label_offset = dist.get_rank(group) * image_features.shape[0]
        else:
            image_features, text_features = all_image, all_text
            all_image = all_text = None
    smoothing = float(label_smoothing)
    if use_triton(image_features):
        if image_features.device.type == "cpu" and image_features.dtype == torch.bfloat16:
            raise TypeError(
                "image_features is bfloat16 on CPU: the Triton interpreter computes bfloat16 dots wrongly "
                "(silently wrong losses); use float32 / float16, or vlmcore.kernels.backend('reference') on CPU"
            )
        if all_image is None:
            loss, _, _, acc = _symmetric_op(image_features, text_features, logit_scale, smoothing, output_dict)
        else:
            loss_i2t, _, acc_i2t = _rows_op(image_features, all_text, logit_scale, smoothing, label_offset, output_dict)
            loss_t2i, _, acc_t2i = _rows_op(text_features, all_image, logit_scale, smoothing, label_offset, output_dict)
            loss = (loss_i2t + loss_t2i) / 2
            acc = torch.cat([acc_i2t, acc_t2i])
        if not output_dict:
            return loss
        return {"loss": loss, "i2t_acc": acc[0], "t2i_acc": acc[1]}
    loss = contrastive_loss_reference(
        image_features, text_features, logit_scale, label_smoothing=smoothing,
        label_offset=label_offset, all_image_features=all_image, all_text_features=all_text,
    )
    if not output_dict:
        return loss
    with torch.no_grad():
        i2t, t2i = contrastive_accuracy_reference(
            image_features, text_features, label_offset=label_offset,
            all_image_features=all_image, all_text_features=all_text,
        )
    return {"loss": loss, "i2t_acc": i2t, "t2i_acc": t2i}


def _multi_positive_loss(image, text, logit_scale, image_ids, text_ids, smoothing: float) -> torch.Tensor:
    """The multi-positive loss (validated inputs): the kernels' log-sum-exp / smoothing part with no
    diagonal target, plus ``-(1 - eps)`` times :func:`_multi_positive_target`."""
    if not use_triton(image):
        return contrastive_loss_multi_positive_reference(image, text, logit_scale, image_ids, text_ids,
                                                         label_smoothing=smoothing)
    if image.device.type == "cpu" and image.dtype == torch.bfloat16:
        raise TypeError(
            "image_features is bfloat16 on CPU: the Triton interpreter computes bfloat16 dots wrongly "
            "(silently wrong losses); use float32 / float16, or vlmcore.kernels.backend('reference') on CPU"
        )
    lse_part, _, _, _ = _symmetric_op(image, text, logit_scale, smoothing, False, False)
    return lse_part - (1.0 - smoothing) * _multi_positive_target(image, text, logit_scale, image_ids, text_ids)
