"""Flamingo masked per-image cross-attention: a text token attends only to its image's visual tokens.

Public op: :func:`masked_cross_attention`. Helper: :func:`media_index_from_locations`.

Block-sparse Triton kernels (flash-attention style, online softmax, fp32 log-sum-exp):

- forward: a program owns ``BLOCK_M`` text tokens of one (batch, head). From the block's valid
  media indices it loads only key rows ``min(idx) * R .. (max(idx) + 1) * R`` (``immediate``) or
  ``0 .. (max(idx) + 1) * R`` (``all_previous``); a per-element mask inside the tile keeps exactly
  the allowed (token, key) pairs. It saves the fp32 LSE per row (``-inf`` for rows that attend
  nothing; their output is written as exact zeros).
- backward, without float atomics (deterministic, bit-identical across runs): a dQ kernel over
  query blocks, with the forward's sparsity, that also computes and stores ``delta = rowsum(o * do)``
  (fp32; fused there because it reads ``do`` anyway), then a dK/dV kernel over key blocks that
  visits only the query blocks that can reference them.
- which query blocks a key block visits: a per-sample, per-image table of the first and last text
  position referencing that image (``all_previous``: referencing it or a later image), built once per
  backward with torch ops in O(B * L + B * M) (``scatter_reduce`` amin/amax, then a suffix
  cummin/cummax). A key block covering images ``a .. b`` scans the query blocks between
  ``min(first[a..b])`` and ``max(last[a..b])``.

Cost model (per batch row and head). With ``media_index`` non-decreasing along L (always true for
indices built by :func:`media_index_from_locations`), a query block spans only the images whose
tokens fall inside it, so in ``immediate`` mode the forward and dQ kernels touch about
``(L + M * BLOCK_M) * R`` (query, key) pairs, rounded up to key tiles, and each key block visits only
the query blocks of its own images: work grows with the useful pairs (``L * R``), not with the
``L * M * R`` that a masked dense attention computes. In interleaved documents images are hundreds
of tokens apart, so that is about ``L * R`` to ``2 * L * R``. In ``all_previous`` mode the useful
pairs themselves are ``~ L * M * R / 2`` and the kernels visit about those. Text before the first
image (index -1) costs nothing beyond writing zeros. For non-monotone indices the results are still
exact (masking is per element), but a block works over the hull of its indices' range: a query
block whose indices span images 0 and 31 loads all 32 images' keys, and a key block scans every
query block between the first and last token referencing its images.

Indices outside ``[0, M)`` (including ``-1``) select nothing: the kernels clamp them to -1 before
use, so they never address memory outside ``k``/``v``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreter_enabled, use_triton
from ._checks import check_float_tensor, check_same, check_softmax_scale
from .reference import masked_cross_attention_reference

MODES = ("immediate", "all_previous")
# Head dims the kernels take (padded inside to a power of two >= 16); larger ones run the reference.
MAX_KERNEL_HEAD_DIM = 256

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_media_index(p_idx_row, stride_il, offs_m, L, M):
    """Media index of text rows ``offs_m`` ``[BLOCK_M]`` (int32), -1 where none, out of range or past L."""
    m_m = offs_m < L
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
def _mxa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ib, stride_il,
    stride_ob, stride_ol, stride_oh, stride_od,
    H, L, R, M, qk_scale_log2,
    L_BUCKET,  # autotune key only (next power of two of L)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IMMEDIATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: ``BLOCK_M`` text rows of one (batch, head) -> o ``[BLOCK_M, Dh]``, lse ``[BLOCK_M]``."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
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
    p_o = (o_ptr + i_b * stride_ob + i_h * stride_oh
           + offs_m[:, None].to(tl.int64) * stride_ol + offs_d[None, :] * stride_od)
    tl.store(p_o, b_o.to(o_ptr.dtype.element_ty), mask=m_m[:, None] & m_d[None, :])
    b_lse = tl.where(has_keys, (b_mx + tl.log2(tl.where(has_keys, b_l, 1.0))) * 0.6931471805599453,
                     float("-inf"))  # natural-log LSE of the scaled scores; -inf = empty row
    tl.store(lse_ptr + i_bh * L + offs_m, b_lse, mask=m_m)


@triton.jit
def _mxa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, span_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ib, stride_il,
    stride_dob, stride_dol, stride_doh, stride_dod,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    H, L, R, M, sm_scale, qk_scale_log2,
    L_BUCKET,  # autotune key only (next power of two of L)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IMMEDIATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: ``BLOCK_N`` key rows of one (batch, head) -> dk, dv ``[BLOCK_N, Dh]``.

    Visits the query blocks between the first and last text position that references one of the
    block's images (``span_ptr``: int32 ``[B, 2, M]`` first / last positions per image).
    """
    i_n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    MR = M * R

    offs_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    offs_d = tl.arange(0, BLOCK_D)
    m_n = offs_n < MR
    m_d = offs_d < HEAD_DIM
    m_nd = m_n[:, None] & m_d[None, :]
    o_n = offs_n[:, None].to(tl.int64)
    b_k = tl.load(k_ptr + i_b * stride_kb + i_h * stride_kh + o_n * stride_kn + offs_d[None, :] * stride_kd,
                  mask=m_nd, other=0.0)  # [BLOCK_N, BLOCK_D]
    b_v = tl.load(v_ptr + i_b * stride_vb + i_h * stride_vh + o_n * stride_vn + offs_d[None, :] * stride_vd,
                  mask=m_nd, other=0.0)
    media_n = offs_n // R  # [BLOCK_N]

    # Images a .. b of this key block (at most BLOCK_N of them) -> text span [first, last].
    media_a = (i_n * BLOCK_N) // R
    media_b = (tl.minimum((i_n + 1) * BLOCK_N, MR) - 1) // R
    offs_j = media_a + tl.arange(0, BLOCK_N)
    m_j = offs_j <= media_b
    p_span = span_ptr + i_b * 2 * M + offs_j
    q_first = tl.min(tl.load(p_span, mask=m_j, other=L), axis=0)
    q_last = tl.max(tl.load(p_span + M, mask=m_j, other=-1), axis=0)

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
        b_delta = tl.load(delta_ptr + i_bh * L + offs_m, mask=m_m, other=0.0)  # [BLOCK_M]
        # [BLOCK_N, BLOCK_M]; key rows past M * R have media_n >= M, which no (clamped) index reaches.
        if IMMEDIATE:
            allowed_t = media_n[:, None] == b_idx[None, :]
        else:
            allowed_t = (media_n[:, None] <= b_idx[None, :]) & (b_idx[None, :] >= 0)
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK_N, BLOCK_M]
        b_pt = tl.where(allowed_t, tl.exp2(b_st - b_lse2[None, :]), 0.0)
        b_dv = tl.dot(b_pt.to(b_do.dtype), b_do, b_dv, input_precision=DOT_PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk = tl.dot(b_dst.to(b_q.dtype), b_q, b_dk, input_precision=DOT_PRECISION)

    b_dk = b_dk * sm_scale
    tl.store(dk_ptr + i_b * stride_dkb + i_h * stride_dkh + o_n * stride_dkn + offs_d[None, :] * stride_dkd,
             b_dk.to(dk_ptr.dtype.element_ty), mask=m_nd)
    tl.store(dv_ptr + i_b * stride_dvb + i_h * stride_dvh + o_n * stride_dvn + offs_d[None, :] * stride_dvd,
             b_dv.to(dv_ptr.dtype.element_ty), mask=m_nd)


@triton.jit
def _mxa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ib, stride_il,
    stride_ob, stride_ol, stride_oh, stride_od,
    stride_dob, stride_dol, stride_doh, stride_dod,
    stride_dqb, stride_dql, stride_dqh, stride_dqd,
    H, L, R, M, sm_scale, qk_scale_log2,
    L_BUCKET,  # autotune key only (next power of two of L)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IMMEDIATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: ``BLOCK_M`` text rows of one (batch, head) -> dq ``[BLOCK_M, Dh]`` (forward's sparsity)
    and delta ``[BLOCK_M]`` = rowsum(o * do) in fp32, which the dK/dV kernel reads afterwards."""
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H

    offs_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_m = offs_m < L
    m_d = offs_d < HEAD_DIM
    m_md = m_m[:, None] & m_d[None, :]
    o_m = offs_m[:, None].to(tl.int64)

    b_idx = _load_media_index(idx_ptr + i_b * stride_ib, stride_il, offs_m, L, M)
    n_lo, n_hi = _key_range(b_idx, R, M, IMMEDIATE)
    b_q = tl.load(q_ptr + i_b * stride_qb + i_h * stride_qh + o_m * stride_ql + offs_d[None, :] * stride_qd,
                  mask=m_md, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_do = tl.load(do_ptr + i_b * stride_dob + i_h * stride_doh + o_m * stride_dol + offs_d[None, :] * stride_dod,
                   mask=m_md, other=0.0)
    b_o = tl.load(o_ptr + i_b * stride_ob + i_h * stride_oh + o_m * stride_ol + offs_d[None, :] * stride_od,
                  mask=m_md, other=0.0)
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

    b_dq = b_dq * sm_scale
    tl.store(dq_ptr + i_b * stride_dqb + i_h * stride_dqh + o_m * stride_dql + offs_d[None, :] * stride_dqd,
             b_dq.to(dq_ptr.dtype.element_ty), mask=m_md)


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------

# The interpreter runs programs one by one in Python: one small tile shape, no autotuning.
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
_AUTOTUNE_KEY = ["L_BUCKET", "R", "BLOCK_D", "IMMEDIATE"]


def _configs(block_m: tuple[int, ...], block_n: tuple[int, ...]) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config(dict(_INTERPRETER_CONFIG), num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm in block_m
        for bn in block_n
        for warps in (4, 8)
        for stages in (2, 3)
    ]


_SHARED_MEMORY_BYTES = 220 * 1024  # H100 / H200: 227 KB per block
# fp32 values live per thread above which the sm_90 compiles of these kernels spill registers
# (measured with ptxas over the whole config space, bf16, Dh 64-128).
_MAX_LIVE_PER_THREAD = 160


def _pruner(streamed: str, resident_tiles: int, accumulators: int, score_tiles: int):
    """Config filter for a kernel that streams two ``streamed``-row operand tiles (pipelined over
    ``num_stages``) past ``resident_tiles`` tiles of the other block size, with ``accumulators``
    fp32 ``[resident, Dh]`` accumulators and ``score_tiles`` fp32 ``[BLOCK_M, BLOCK_N]`` temporaries.
    Drops configs that overflow shared memory or would spill registers; keeps the lightest if none fit."""
    resident = "BLOCK_N" if streamed == "BLOCK_M" else "BLOCK_M"

    def live_per_thread(config, block_d: int) -> float:
        tiles = config.kwargs
        live = accumulators * tiles[resident] * block_d + score_tiles * tiles["BLOCK_M"] * tiles["BLOCK_N"]
        return live / (32 * config.num_warps)

    def prune(configs, named_args, **kwargs):
        block_d = kwargs["BLOCK_D"]
        row_bytes = block_d * named_args["q_ptr"].element_size()
        kept = [
            config for config in configs
            if row_bytes * (2 * config.num_stages * config.kwargs[streamed] + resident_tiles * config.kwargs[resident])
            <= _SHARED_MEMORY_BYTES
            and live_per_thread(config, block_d) <= _MAX_LIVE_PER_THREAD
        ]
        return kept or [min(configs, key=lambda config: live_per_thread(config, block_d))]

    return prune


# Forward and dQ: BLOCK_M text rows resident (q; dq also do, o), BLOCK_N key rows (k, v) streamed.
_fwd_kernel = triton.autotune(
    configs=_configs((64, 128), (32, 64, 128)), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("BLOCK_N", 1, accumulators=1, score_tiles=2)},
)(_mxa_fwd_kernel)
_dq_kernel = triton.autotune(
    configs=_configs((64, 128), (32, 64, 128)), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("BLOCK_N", 2, accumulators=1, score_tiles=3)},
)(_mxa_bwd_dq_kernel)
# dK/dV: BLOCK_N key rows resident (k, v), BLOCK_M text rows (q, do) streamed.
_dkdv_kernel = triton.autotune(
    configs=_configs((32, 64, 128), (64, 128)), key=_AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("BLOCK_M", 2, accumulators=2, score_tiles=3)},
)(_mxa_bwd_dkdv_kernel)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow ``torch.backends.cuda.matmul.allow_tf32`` (exact fp32 by default)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------------


def _media_spans(media_index: torch.Tensor, num_media: int, immediate: bool) -> torch.Tensor:
    """int32 ``[B, 2, M]``: first and last text position attending each image (``L`` / ``-1`` if none).

    ``immediate``: positions whose index equals the image; ``all_previous``: whose index is >= it.
    O(B * L) (scatter_reduce, deterministic: amin/amax) + O(B * M) (suffix cummin/cummax).
    """
    batch, length = media_index.shape
    index = media_index.long()
    column = torch.where((index >= 0) & (index < num_media), index, num_media)  # invalid -> spare column
    positions = torch.arange(length, device=index.device).expand(batch, length)
    first = torch.full((batch, num_media + 1), length, dtype=torch.int64, device=index.device)
    first = first.scatter_reduce(1, column, positions, "amin")[:, :num_media]
    last = torch.full((batch, num_media + 1), -1, dtype=torch.int64, device=index.device)
    last = last.scatter_reduce(1, column, positions, "amax")[:, :num_media]
    if not immediate:  # image j is attended by every index >= j
        first = first.flip(1).cummin(1).values.flip(1)
        last = last.flip(1).cummax(1).values.flip(1)
    return torch.stack([first, last], dim=1).to(torch.int32).contiguous()


def _common_args(q: torch.Tensor, mode: str) -> dict:
    head_dim = q.shape[3]
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim),
        IMMEDIATE=mode == "immediate",
        DOT_PRECISION=_dot_precision(q.dtype),
    )


def _forward(q, k, v, media_index, tokens_per_media: int, mode: str, scale: float):
    """Launch the forward: ``(out [B, L, H, Dh] in q.dtype, lse [B, H, L] fp32)``."""
    batch, length, heads, head_dim = q.shape
    num_media = k.shape[1] // tokens_per_media
    out = torch.empty(batch, length, heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if num_media == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    grid = lambda meta: (triton.cdiv(length, meta["BLOCK_M"]), batch * heads)
    _fwd_kernel[grid](
        q, k, v, media_index, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *media_index.stride(), *out.stride(),
        heads, length, tokens_per_media, num_media, scale * _LOG2E, triton.next_power_of_2(length),
        **_common_args(q, mode),
    )
    return out, lse


def _backward(grad_out, q, k, v, media_index, out, lse, tokens_per_media: int, mode: str, scale: float):
    """Launch dQ (+ delta), then dK/dV: ``(dq, dk, dv)`` shaped like q, k, v (contiguous), input dtype."""
    batch, length, heads, head_dim = q.shape
    num_media = k.shape[1] // tokens_per_media
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or num_media == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta = _common_args(q, mode)
    l_bucket = triton.next_power_of_2(length)

    delta = torch.empty(batch, heads, length, dtype=torch.float32, device=q.device)
    grid_q = lambda m: (triton.cdiv(length, m["BLOCK_M"]), batch * heads)
    _dq_kernel[grid_q](
        q, k, v, media_index, out, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *media_index.stride(), *out.stride(), *grad_out.stride(),
        *dq.stride(),
        heads, length, tokens_per_media, num_media, scale, scale * _LOG2E, l_bucket,
        **meta,
    )
    spans = _media_spans(media_index, num_media, mode == "immediate")
    grid_kv = lambda m: (triton.cdiv(num_media * tokens_per_media, m["BLOCK_N"]), batch * heads)
    _dkdv_kernel[grid_kv](
        q, k, v, media_index, grad_out, lse, delta, spans, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *media_index.stride(), *grad_out.stride(),
        *dk.stride(), *dv.stride(),
        heads, length, tokens_per_media, num_media, scale, scale * _LOG2E, l_bucket,
        **meta,
    )
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# torch.library ops with autograd
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

    Example::

        idx = media_index_from_locations(input_ids == image_token_id)   # [B, L]
        out = masked_cross_attention(q, k, v, idx, tokens_per_media=64)  # [B, L, H, Dh]
    """
    scale = _validate(q, k, v, media_index, tokens_per_media, mode, softmax_scale)
    if use_triton(q) and q.shape[3] <= MAX_KERNEL_HEAD_DIM:
        out, _ = _masked_cross_attention_fwd(q, k, v, media_index, tokens_per_media, mode, scale)
        return out
    return masked_cross_attention_reference(
        q, k, v, media_index, tokens_per_media, mode=mode, softmax_scale=scale
    )
