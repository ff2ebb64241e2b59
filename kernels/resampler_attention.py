"""Resampler attention: latents attend to [media tokens; latents] without building the concat.

Public op: :func:`resampler_attention` (Perceiver Resampler; Q-Former cross-attention when the
latent keys are None).

Triton path (flash-attention style: one forward kernel, two backward variants):

- forward ``_resampler_fwd_kernel``: one program per (batch x head, query block); the query block
  covers R (R <= 64 is one block). The key loop walks the media blocks, then the latent blocks,
  through two pointer sets, so ``[k_media; k_latents]`` never exists in memory. Online softmax in
  the log2 domain with fp32 max / sum, the natural-log LSE ``[B, H, R]`` is saved for backward.
- backward, fused (``_resampler_bwd_fused_kernel``, when R <= 64 and B x H fills the GPU): one
  program per (batch, head) computes delta = rowsum(o * do), walks the media then the latent key
  blocks, stores each block's dk / dv and keeps dq in registers. Every input is read once.
- backward, split (otherwise): ``_resampler_bwd_dq_kernel`` per query block computes delta (stored)
  and dq over both sources; then ``_resampler_bwd_dkdv_kernel``, one program per key block of either
  source (media blocks first, then latent blocks), iterates all R queries.
- Either way every gradient element is written by exactly one program: no atomics, deterministic.

Every tensor is read through its strides (views of a Linear output work without copies). Head
dims are padded to a power of two (96 -> 128) under masks. Padding keys (``media_mask`` False)
and queries with nothing to attend get zero probability; such queries output zeros and get zero
gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._backend import interpreter_enabled, use_triton
from ._checks import check_float_tensor, check_same, check_softmax_scale, dot_precision
from ._host import cdiv, next_power_of_2
from ._plan import KernelLaunch, OpPlan
from .reference import resampler_attention_reference

MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
LOG2E = tl.constexpr(_LOG2E)
# Running-max floor: a finite start keeps exp2(m_old - m_new) finite while a row has seen only
# masked keys (scores -inf), so rows with nothing to attend end with l = 0 and acc = 0, never NaN.
M_FLOOR = tl.constexpr(-1.0e30)


def _cuda_key_block_configs() -> list[triton.Config]:
    """Autotune space over the key tile on CUDA (before pruning)."""
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n in (32, 64, 128)
        for warps in (4, 8)
        for stages in (2, 3)
    ]


_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)
# ``VLMCORE_AUTOTUNE=preferred``: each kernel's one config, its :func:`planned_config` at Dh 128 (the
# compile check builds it), which its pruner also keeps at every narrower head (checked in tests).
PREFERRED_MODE_CONFIGS = {
    "fwd": triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2),
    "dq": triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2),
    "dkdv": triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2),
    "fused": triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2),
}


def _key_block_configs() -> list[triton.Config]:
    """The CUDA space on CUDA; one small fixed config in the interpreter."""
    if interpreter_enabled():
        return [_INTERPRETER_CONFIG]
    return _cuda_key_block_configs()


def _autotuned(name: str, prune: dict):
    """Autotune decorator of kernel ``name`` over :func:`_key_block_configs` (kernels/_autotune.py)."""
    preferred = _INTERPRETER_CONFIG if interpreter_enabled() else PREFERRED_MODE_CONFIGS[name]
    return autotune(_key_block_configs(), preferred, _AUTOTUNE_KEY, prune["early_config_prune"])


def _tile_limit_pruner(max_tile: int, max_tile_4_warps: int | None = None, min_tile_128_head: int = 0):
    """Autotune pruner dropping tiles that spill registers on sm_90 (seen with ``ptxas -v`` on the
    bf16 kernels): key tile x padded head dim above ``max_tile``, and 4 warps with a 128-wide head
    or with a key tile x head dim above ``max_tile_4_warps`` (default ``max_tile``). Also drops key
    tiles wider than all the keys of a row (``BLOCK_N > S + R``, or ``> S`` without latents): such a
    tile is mostly padding (the smallest, 32, always stays). ``min_tile_128_head``: smallest key tile
    kept for a 128-wide head (the dk/dv kernel with 32-key tiles spilled at Dh 128)."""
    max_tile_4_warps = max_tile if max_tile_4_warps is None else max_tile_4_warps

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        block_d = kwargs["BLOCK_D"]
        keys = named_args["num_media"] + (named_args["num_queries"] if kwargs["HAS_LATENTS"] else 0)
        fitting = [c for c in configs if c.kwargs["BLOCK_N"] <= max(keys, 32)] or configs[:1]
        kept = [
            c for c in fitting
            if c.kwargs["BLOCK_N"] * block_d <= max_tile
            and (c.num_warps >= 8 or (block_d <= 64 and c.kwargs["BLOCK_N"] * block_d <= max_tile_4_warps))
            and (block_d < 128 or c.kwargs["BLOCK_N"] >= min_tile_128_head)
        ]
        return kept or fitting[:1]

    return {"early_config_prune": prune}


def _query_block(num_queries: int) -> int:
    """Query tile: the next power of two >= R, at least 16 (tl.dot), at most 64."""
    return min(64, max(16, next_power_of_2(num_queries)))


_PRUNE = _tile_limit_pruner(64 * 128)
_PRUNE_FUSED = _tile_limit_pruner(64 * 64)  # the fused backward also holds dq and q, do, o tiles
# dk/dv keep two fp32 [BLOCK_N, BLOCK_D] accumulators: 128 x 64 on 4 warps spilled ~800 bytes; at
# Dh 128, 32-key tiles on 8 warps spilled 4 bytes without latents (sm_90a, 2026-12-01) while
# 64-key tiles compiled spill-free in every latents / mask / 32- or 64-row query tile variant.
_PRUNE_DKDV = _tile_limit_pruner(64 * 128, max_tile_4_warps=64 * 64, min_tile_128_head=64)
# ``media_bucket`` = next power of two of S (a kernel argument the kernels do not read): each new S
# within a bucket reuses the tuned config instead of retuning.
_AUTOTUNE_KEY = ["num_queries", "media_bucket", "HEAD_DIM", "HAS_LATENTS", "HAS_MASK", "PRECISION"]


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_key_block(
    p_k, p_v, p_mask, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
    i_n, num_keys,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Keys and values ``[BLOCK_N, BLOCK_D]`` of rows i_n .. i_n + BLOCK_N (zeros outside), and which rows count.

    Returns ``(b_k, b_v, m_n)``; ``m_n`` ``[BLOCK_N]`` is False past ``num_keys`` and, with
    ``HAS_MASK``, where the uint8 mask at ``p_mask`` is 0 (padding).
    """
    o_n = i_n + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < num_keys
    m_kv = m_n[:, None] & (o_d < HEAD_DIM)[None, :]
    b_k = tl.load(p_k + o_n[:, None] * stride_kn + o_d[None, :] * stride_kd, mask=m_kv, other=0.0)
    b_v = tl.load(p_v + o_n[:, None] * stride_vn + o_d[None, :] * stride_vd, mask=m_kv, other=0.0)
    if HAS_MASK:
        m_n = m_n & (tl.load(p_mask + o_n * stride_mask_n, mask=m_n, other=0) != 0)
    return b_k, b_v, m_n


@triton.jit
def _fwd_source(
    b_acc, b_l, b_m, b_q,
    p_k, p_v, p_mask,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
    num_keys, qk_scale,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax pass over one key source (``num_keys`` rows at p_k / p_v, this batch and head)."""
    for i_n in range(0, num_keys, BLOCK_N):
        b_k, b_v, m_n = _load_key_block(
            p_k, p_v, p_mask, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
            i_n, num_keys, HAS_MASK, HEAD_DIM, BLOCK_N, BLOCK_D,
        )
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))  # [BLOCK_M]
        b_alpha = tl.exp2(b_m - b_m_new)  # [BLOCK_M]
        b_p = tl.exp2(b_s - b_m_new[:, None])  # [BLOCK_M, BLOCK_N]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        b_m = b_m_new
    return b_acc, b_l, b_m


@_autotuned("fwd", _PRUNE)
@triton.jit
def _resampler_fwd_kernel(
    q, k_media, v_media, k_latents, v_latents, media_mask, out, lse,
    stride_qb, stride_qr, stride_qh, stride_qd,
    stride_kmb, stride_kmn, stride_kmh, stride_kmd,
    stride_vmb, stride_vmn, stride_vmh, stride_vmd,
    stride_klb, stride_kln, stride_klh, stride_kld,
    stride_vlb, stride_vln, stride_vlh, stride_vld,
    stride_maskb, stride_maskn,
    stride_ob, stride_or, stride_oh, stride_od,
    num_heads, num_queries, num_media, media_bucket, qk_scale,
    HAS_LATENTS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = softmax(q [k_media; k_latents]^T) [v_media; v_latents] for one (batch x head, query block).

    q, out ``[B, R, H, Dh]``; k/v_media ``[B, S, H, Dh]``; k/v_latents ``[B, R, H, Dh]``;
    media_mask uint8 ``[B, S]``; lse fp32 ``[B, H, R]`` (natural log, -inf for empty rows).
    ``qk_scale`` = softmax_scale * log2(e).
    """
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_b = i_bh // num_heads
    i_h = i_bh % num_heads
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < num_queries
    m_md = m_m[:, None] & (o_d < HEAD_DIM)[None, :]

    p_q = q + i_b * stride_qb + i_h * stride_qh
    b_q = tl.load(p_q + o_m[:, None] * stride_qr + o_d[None, :] * stride_qd, mask=m_md, other=0.0)  # [BLOCK_M, BLOCK_D]

    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_m = tl.full([BLOCK_M], M_FLOOR, dtype=tl.float32)
    b_acc, b_l, b_m = _fwd_source(
        b_acc, b_l, b_m, b_q,
        k_media + i_b * stride_kmb + i_h * stride_kmh, v_media + i_b * stride_vmb + i_h * stride_vmh,
        media_mask + i_b * stride_maskb,
        stride_kmn, stride_kmd, stride_vmn, stride_vmd, stride_maskn,
        num_media, qk_scale, HAS_MASK, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION,
    )
    if HAS_LATENTS:
        b_acc, b_l, b_m = _fwd_source(
            b_acc, b_l, b_m, b_q,
            k_latents + i_b * stride_klb + i_h * stride_klh, v_latents + i_b * stride_vlb + i_h * stride_vlh,
            media_mask,
            stride_kln, stride_kld, stride_vln, stride_vld, 0,
            num_queries, qk_scale, False, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION,
        )

    m_row = b_l > 0.0  # [BLOCK_M] rows that attended at least one key
    b_o = b_acc / tl.where(m_row, b_l, 1.0)[:, None]
    b_lse = tl.where(m_row, (b_m + tl.log2(tl.where(m_row, b_l, 1.0))) / LOG2E, float("-inf"))
    p_o = out + i_b * stride_ob + i_h * stride_oh
    tl.store(p_o + o_m[:, None] * stride_or + o_d[None, :] * stride_od, b_o.to(out.dtype.element_ty), mask=m_md)
    tl.store(lse + i_bh * num_queries + o_m, b_lse, mask=m_m)


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_lse_log2(p_lse, o_m, m_m):
    """LSE of rows o_m in log2 units; +inf for empty or out-of-range rows, so exp2(s - lse) = 0 there."""
    b_lse = tl.load(p_lse + o_m, mask=m_m, other=float("inf"))
    return tl.where(b_lse == float("-inf"), float("inf"), b_lse * LOG2E)


@triton.jit
def _dq_source(
    b_dq, b_q, b_do, b_lse2, b_delta,
    p_k, p_v, p_mask,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
    num_keys, qk_scale,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Accumulate dS @ K (unscaled) over one key source into b_dq ``[BLOCK_M, BLOCK_D]``."""
    for i_n in range(0, num_keys, BLOCK_N):
        b_k, b_v, m_n = _load_key_block(
            p_k, p_v, p_mask, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
            i_n, num_keys, HAS_MASK, HEAD_DIM, BLOCK_N, BLOCK_D,
        )
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        b_p = tl.exp2(b_s - b_lse2[:, None])  # [BLOCK_M, BLOCK_N]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    return b_dq


@_autotuned("dq", _PRUNE)
@triton.jit
def _resampler_bwd_dq_kernel(
    q, k_media, v_media, k_latents, v_latents, media_mask, out, do, lse, delta, dq,
    stride_qb, stride_qr, stride_qh, stride_qd,
    stride_kmb, stride_kmn, stride_kmh, stride_kmd,
    stride_vmb, stride_vmn, stride_vmh, stride_vmd,
    stride_klb, stride_kln, stride_klh, stride_kld,
    stride_vlb, stride_vln, stride_vlh, stride_vld,
    stride_maskb, stride_maskn,
    stride_ob, stride_or, stride_oh, stride_od,
    stride_dob, stride_dor, stride_doh, stride_dod,
    stride_dqb, stride_dqr, stride_dqh, stride_dqd,
    num_heads, num_queries, num_media, media_bucket, qk_scale, softmax_scale,
    HAS_LATENTS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """delta = rowsum(o * do) (stored, fp32 ``[B, H, R]``) and dq ``[B, R, H, Dh]`` for one query block."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_m = tl.program_id(1).to(tl.int64)
    i_b = i_bh // num_heads
    i_h = i_bh % num_heads
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < num_queries
    m_md = m_m[:, None] & (o_d < HEAD_DIM)[None, :]

    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qr + o_d[None, :] * stride_qd,
                  mask=m_md, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_o = tl.load(out + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_or + o_d[None, :] * stride_od,
                  mask=m_md, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + o_m[:, None] * stride_dor + o_d[None, :] * stride_dod,
                   mask=m_md, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(delta + i_bh * num_queries + o_m, b_delta, mask=m_m)
    b_lse2 = _load_lse_log2(lse + i_bh * num_queries, o_m, m_m)  # [BLOCK_M]

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_dq = _dq_source(
        b_dq, b_q, b_do, b_lse2, b_delta,
        k_media + i_b * stride_kmb + i_h * stride_kmh, v_media + i_b * stride_vmb + i_h * stride_vmh,
        media_mask + i_b * stride_maskb,
        stride_kmn, stride_kmd, stride_vmn, stride_vmd, stride_maskn,
        num_media, qk_scale, HAS_MASK, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION,
    )
    if HAS_LATENTS:
        b_dq = _dq_source(
            b_dq, b_q, b_do, b_lse2, b_delta,
            k_latents + i_b * stride_klb + i_h * stride_klh, v_latents + i_b * stride_vlb + i_h * stride_vlh,
            media_mask,
            stride_kln, stride_kld, stride_vln, stride_vld, 0,
            num_queries, qk_scale, False, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION,
        )
    p_dq = dq + i_b * stride_dqb + i_h * stride_dqh
    tl.store(p_dq + o_m[:, None] * stride_dqr + o_d[None, :] * stride_dqd,
             (b_dq * softmax_scale).to(dq.dtype.element_ty), mask=m_md)


@triton.jit
def _dkdv_tile(
    p_k, p_v, p_dk, p_dv, p_mask, p_q, p_do, p_lse, p_delta,
    stride_kn, stride_kd, stride_vn, stride_vd,
    stride_dkn, stride_dkd, stride_dvn, stride_dvd, stride_mask_n,
    stride_qr, stride_qd, stride_dor, stride_dod,
    i_n, num_keys, num_queries, qk_scale, softmax_scale,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk, dv of the key rows ``i_n .. i_n + BLOCK_N`` of one source, iterating all R queries."""
    b_k, b_v, m_n = _load_key_block(
        p_k, p_v, p_mask, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
        i_n, num_keys, HAS_MASK, HEAD_DIM, BLOCK_N, BLOCK_D,
    )
    o_n = i_n + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    m_kv = (o_n < num_keys)[:, None] & m_d[None, :]

    b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i_m in range(0, num_queries, BLOCK_M):
        o_m = i_m + tl.arange(0, BLOCK_M)
        m_m = o_m < num_queries
        m_md = m_m[:, None] & m_d[None, :]
        # [BLOCK_M, BLOCK_D] each
        b_q = tl.load(p_q + o_m[:, None] * stride_qr + o_d[None, :] * stride_qd, mask=m_md, other=0.0)
        b_do = tl.load(p_do + o_m[:, None] * stride_dor + o_d[None, :] * stride_dod, mask=m_md, other=0.0)
        b_lse2 = _load_lse_log2(p_lse, o_m, m_m)  # [BLOCK_M]
        b_delta = tl.load(p_delta + o_m, mask=m_m, other=0.0)  # [BLOCK_M]
        b_st = tl.dot(b_k, tl.trans(b_q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        b_st = tl.where(m_n[:, None], b_st, float("-inf"))
        b_pt = tl.exp2(b_st - b_lse2[None, :])  # [BLOCK_N, BLOCK_M]
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q, input_precision=PRECISION)
    tl.store(p_dk + o_n[:, None] * stride_dkn + o_d[None, :] * stride_dkd,
             (b_dk * softmax_scale).to(p_dk.dtype.element_ty), mask=m_kv)
    tl.store(p_dv + o_n[:, None] * stride_dvn + o_d[None, :] * stride_dvd, b_dv.to(p_dv.dtype.element_ty), mask=m_kv)


@_autotuned("dkdv", _PRUNE_DKDV)
@triton.jit
def _resampler_bwd_dkdv_kernel(
    q, k_media, v_media, k_latents, v_latents, media_mask, do, lse, delta,
    dk_media, dv_media, dk_latents, dv_latents,
    stride_qb, stride_qr, stride_qh, stride_qd,
    stride_kmb, stride_kmn, stride_kmh, stride_kmd,
    stride_vmb, stride_vmn, stride_vmh, stride_vmd,
    stride_klb, stride_kln, stride_klh, stride_kld,
    stride_vlb, stride_vln, stride_vlh, stride_vld,
    stride_maskb, stride_maskn,
    stride_dob, stride_dor, stride_doh, stride_dod,
    stride_dkmb, stride_dkmn, stride_dkmh, stride_dkmd,
    stride_dvmb, stride_dvmn, stride_dvmh, stride_dvmd,
    stride_dklb, stride_dkln, stride_dklh, stride_dkld,
    stride_dvlb, stride_dvln, stride_dvlh, stride_dvld,
    num_heads, num_queries, num_media, media_bucket, qk_scale, softmax_scale,
    HAS_LATENTS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dk/dv of one key block: programs 0 .. cdiv(S, BLOCK_N) - 1 of axis 1 own media blocks, the rest latent blocks."""
    i_bh = tl.program_id(0).to(tl.int64)
    i_nb = tl.program_id(1)
    i_b = i_bh // num_heads
    i_h = i_bh % num_heads
    num_media_blocks = tl.cdiv(num_media, BLOCK_N)
    p_q = q + i_b * stride_qb + i_h * stride_qh
    p_do = do + i_b * stride_dob + i_h * stride_doh
    p_lse = lse + i_bh * num_queries
    p_delta = delta + i_bh * num_queries
    if i_nb < num_media_blocks:
        _dkdv_tile(
            k_media + i_b * stride_kmb + i_h * stride_kmh, v_media + i_b * stride_vmb + i_h * stride_vmh,
            dk_media + i_b * stride_dkmb + i_h * stride_dkmh, dv_media + i_b * stride_dvmb + i_h * stride_dvmh,
            media_mask + i_b * stride_maskb, p_q, p_do, p_lse, p_delta,
            stride_kmn, stride_kmd, stride_vmn, stride_vmd,
            stride_dkmn, stride_dkmd, stride_dvmn, stride_dvmd, stride_maskn,
            stride_qr, stride_qd, stride_dor, stride_dod,
            i_nb * BLOCK_N, num_media, num_queries, qk_scale, softmax_scale,
            HAS_MASK, HEAD_DIM, PRECISION, BLOCK_M, BLOCK_D, BLOCK_N,
        )
    elif HAS_LATENTS:
        _dkdv_tile(
            k_latents + i_b * stride_klb + i_h * stride_klh, v_latents + i_b * stride_vlb + i_h * stride_vlh,
            dk_latents + i_b * stride_dklb + i_h * stride_dklh, dv_latents + i_b * stride_dvlb + i_h * stride_dvlh,
            media_mask, p_q, p_do, p_lse, p_delta,
            stride_kln, stride_kld, stride_vln, stride_vld,
            stride_dkln, stride_dkld, stride_dvln, stride_dvld, 0,
            stride_qr, stride_qd, stride_dor, stride_dod,
            (i_nb - num_media_blocks) * BLOCK_N, num_queries, num_queries, qk_scale, softmax_scale,
            False, HEAD_DIM, PRECISION, BLOCK_M, BLOCK_D, BLOCK_N,
        )


@triton.jit
def _fused_bwd_source(
    b_dq, b_q, b_do, b_lse2, b_delta,
    p_k, p_v, p_dk, p_dv, p_mask,
    stride_kn, stride_kd, stride_vn, stride_vd,
    stride_dkn, stride_dkd, stride_dvn, stride_dvd, stride_mask_n,
    num_keys, qk_scale, softmax_scale,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """All queries of one (batch, head) against one key source: store dk, dv per key block, return dq + dS @ K."""
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    for i_n in range(0, num_keys, BLOCK_N):
        b_k, b_v, m_n = _load_key_block(
            p_k, p_v, p_mask, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n,
            i_n, num_keys, HAS_MASK, HEAD_DIM, BLOCK_N, BLOCK_D,
        )
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        b_p = tl.exp2(b_s - b_lse2[:, None])  # [BLOCK_M, BLOCK_N]
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        b_ds = (b_p * (b_dp - b_delta[:, None])).to(b_k.dtype)  # [BLOCK_M, BLOCK_N]
        b_dv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=PRECISION)  # [BLOCK_N, BLOCK_D]
        b_dk = tl.dot(tl.trans(b_ds), b_q, input_precision=PRECISION) * softmax_scale  # [BLOCK_N, BLOCK_D]
        b_dq += tl.dot(b_ds, b_k, input_precision=PRECISION)
        o_n = i_n + tl.arange(0, BLOCK_N)
        m_kv = (o_n < num_keys)[:, None] & m_d[None, :]
        tl.store(p_dk + o_n[:, None] * stride_dkn + o_d[None, :] * stride_dkd, b_dk.to(p_dk.dtype.element_ty),
                 mask=m_kv)
        tl.store(p_dv + o_n[:, None] * stride_dvn + o_d[None, :] * stride_dvd, b_dv.to(p_dv.dtype.element_ty),
                 mask=m_kv)
    return b_dq


@_autotuned("fused", _PRUNE_FUSED)
@triton.jit
def _resampler_bwd_fused_kernel(
    q, k_media, v_media, k_latents, v_latents, media_mask, out, do, lse,
    dq, dk_media, dv_media, dk_latents, dv_latents,
    stride_qb, stride_qr, stride_qh, stride_qd,
    stride_kmb, stride_kmn, stride_kmh, stride_kmd,
    stride_vmb, stride_vmn, stride_vmh, stride_vmd,
    stride_klb, stride_kln, stride_klh, stride_kld,
    stride_vlb, stride_vln, stride_vlh, stride_vld,
    stride_maskb, stride_maskn,
    stride_ob, stride_or, stride_oh, stride_od,
    stride_dob, stride_dor, stride_doh, stride_dod,
    stride_dqb, stride_dqr, stride_dqh, stride_dqd,
    stride_dkmb, stride_dkmn, stride_dkmh, stride_dkmd,
    stride_dvmb, stride_dvmn, stride_dvmh, stride_dvmd,
    stride_dklb, stride_dkln, stride_dklh, stride_dkld,
    stride_dvlb, stride_dvln, stride_dvlh, stride_dvld,
    num_heads, num_queries, num_media, media_bucket, qk_scale, softmax_scale,
    HAS_LATENTS: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Whole backward of one (batch, head) when its R queries fit one block (R <= BLOCK_M).

    One program owns every gradient element of its (batch, head): dk/dv of each key block are
    stored as the loop passes it, dq stays in registers. Each input is read once; no atomics.
    """
    i_bh = tl.program_id(0).to(tl.int64)
    i_b = i_bh // num_heads
    i_h = i_bh % num_heads
    o_m = tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_m = o_m < num_queries
    m_md = m_m[:, None] & (o_d < HEAD_DIM)[None, :]

    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qr + o_d[None, :] * stride_qd,
                  mask=m_md, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_o = tl.load(out + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_or + o_d[None, :] * stride_od,
                  mask=m_md, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + o_m[:, None] * stride_dor + o_d[None, :] * stride_dod,
                   mask=m_md, other=0.0)  # [BLOCK_M, BLOCK_D]
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)  # [BLOCK_M]
    b_lse2 = _load_lse_log2(lse + i_bh * num_queries, o_m, m_m)  # [BLOCK_M]

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    b_dq = _fused_bwd_source(
        b_dq, b_q, b_do, b_lse2, b_delta,
        k_media + i_b * stride_kmb + i_h * stride_kmh, v_media + i_b * stride_vmb + i_h * stride_vmh,
        dk_media + i_b * stride_dkmb + i_h * stride_dkmh, dv_media + i_b * stride_dvmb + i_h * stride_dvmh,
        media_mask + i_b * stride_maskb,
        stride_kmn, stride_kmd, stride_vmn, stride_vmd,
        stride_dkmn, stride_dkmd, stride_dvmn, stride_dvmd, stride_maskn,
        num_media, qk_scale, softmax_scale, HAS_MASK, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION,
    )
    if HAS_LATENTS:
        b_dq = _fused_bwd_source(
            b_dq, b_q, b_do, b_lse2, b_delta,
            k_latents + i_b * stride_klb + i_h * stride_klh, v_latents + i_b * stride_vlb + i_h * stride_vlh,
            dk_latents + i_b * stride_dklb + i_h * stride_dklh, dv_latents + i_b * stride_dvlb + i_h * stride_dvlh,
            media_mask,
            stride_kln, stride_kld, stride_vln, stride_vld,
            stride_dkln, stride_dkld, stride_dvln, stride_dvld, 0,
            num_queries, qk_scale, softmax_scale, False, HEAD_DIM, BLOCK_N, BLOCK_D, PRECISION,
        )
    p_dq = dq + i_b * stride_dqb + i_h * stride_dqh
    tl.store(p_dq + o_m[:, None] * stride_dqr + o_d[None, :] * stride_dqd,
             (b_dq * softmax_scale).to(dq.dtype.element_ty), mask=m_md)


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------


def _mask_arg(media_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(pointer tensor, batch stride, token stride) of the mask; a dummy when there is none."""
    if media_mask is None:
        return q, 0, 0
    mask = media_mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1)


def _latent_args(k_latents: torch.Tensor | None, v_latents: torch.Tensor | None, q: torch.Tensor):
    """(k_latents, v_latents, their 8 strides), or q as a never-read stand-in when there are none."""
    if k_latents is None:
        return q, q, (0,) * 8
    return k_latents, v_latents, (*k_latents.stride(), *v_latents.stride())


def resampler_attention_forward(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor | None,
    v_latents: torch.Tensor | None,
    media_mask: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on validated inputs.

    Returns:
        ``out`` ``[B, R, H, Dh]`` in q's dtype and ``lse`` fp32 ``[B, H, R]`` (natural log, -inf for
        a query with nothing to attend).
    """
    batch, num_queries, heads, head_dim = q.shape
    num_media = k_media.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(batch, heads, num_queries, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    k_lat, v_lat, latent_strides = _latent_args(k_latents, v_latents, q)
    mask, stride_maskb, stride_maskn = _mask_arg(media_mask, q)
    block_m = _query_block(num_queries)
    grid = (batch * heads, cdiv(num_queries, block_m))
    _resampler_fwd_kernel[grid](
        q, k_media, v_media, k_lat, v_lat, mask, out, lse,
        *q.stride(), *k_media.stride(), *v_media.stride(), *latent_strides,
        stride_maskb, stride_maskn, *out.stride(),
        heads, num_queries, num_media, next_power_of_2(num_media), softmax_scale * _LOG2E,
        HAS_LATENTS=k_latents is not None, HAS_MASK=media_mask is not None, HEAD_DIM=head_dim,
        PRECISION=dot_precision(q.dtype), BLOCK_M=block_m, BLOCK_D=max(16, next_power_of_2(head_dim)),
    )
    return out, lse


def _backward_plan(num_queries: int, programs: int, device: torch.device) -> str:
    """``"fused"`` or ``"split"`` backward (:func:`_backward_choice` with the device's SM count)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    return _backward_choice(num_queries, programs, sms)


def _backward_choice(num_queries: int, programs: int, sms: int) -> str:
    """``"fused"`` or ``"split"``.

    Fused (one program per (batch, head), every input read once, 5 matmuls per key block) needs
    all R queries in one block (R <= 64) and enough (batch, head) programs to fill the GPU (at
    least two per SM; ``sms = 0``: no GPU to fill, the interpreter). Otherwise split: a dq grid
    over query blocks and a dk/dv grid over key blocks of both sources (more programs, 7 matmuls
    per key block).
    """
    if num_queries > _query_block(num_queries):
        return "split"
    if programs < 2 * sms:
        return "split"
    return "fused"


# The configs the plan (and the sm_90a compile check) assume the autotuner picks on an H100 for
# bf16 when the pruner keeps them (else the first it keeps); the autotuner may choose another.
PREFERRED_CONFIGS = {
    "fwd": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "dq": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "dkdv": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "fused": {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
}
H100_SMS = 132


def planned_config(name: str, head_dim: int, num_media: int, num_queries: int, with_latents: bool) -> dict:
    """The preferred config of kernel ``name`` if its pruner keeps it from the CUDA space, else the first kept."""
    tuned = {"fwd": _resampler_fwd_kernel, "dq": _resampler_bwd_dq_kernel, "dkdv": _resampler_bwd_dkdv_kernel,
             "fused": _resampler_bwd_fused_kernel}[name]
    kept = tuned.early_config_prune(_cuda_key_block_configs(), {"num_media": num_media, "num_queries": num_queries},
                                    BLOCK_D=max(16, next_power_of_2(head_dim)), HAS_LATENTS=with_latents)
    kept = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in kept]
    return PREFERRED_CONFIGS[name] if PREFERRED_CONFIGS[name] in kept else kept[0]


def resampler_attention_plan(batch: int, media: int, latents: int, heads: int, head_dim: int,
                             with_latents: bool = True, dtype: torch.dtype = torch.bfloat16,
                             configs: dict | None = None, sms: int = H100_SMS) -> OpPlan:
    """Exact launches, tiles, FLOPs and modelled HBM bytes of one forward + backward.

    Args:
        batch, media, latents, heads, head_dim: B (samples x images), S, R, H, Dh.
        with_latents: Perceiver form (keys = [media; latents]); False: Q-Former form.
        dtype: input dtype (bytes model).
        configs: ``{"fwd" | "dq" | "dkdv" | "fused": {"BLOCK_N", ...}}`` overriding the assumed
            configs (tests pass the interpreter's); default :func:`planned_config`.
        sms: SM count for the fused / split choice (H100: 132; 0 = the interpreter's choice).

    Tiles are key-tile iterations summed over programs (the split dk/dv kernel's are query tiles).
    Bytes count every tile load and store as HBM traffic (masked rows are not loaded).
    """
    elem = torch.empty(0, dtype=dtype).element_size()
    block_d = max(16, next_power_of_2(head_dim))
    block_m = _query_block(latents)
    bh = batch * heads
    row = head_dim * elem
    latent_keys = latents if with_latents else 0
    keys = media + latent_keys
    pairs = bh * latents * keys

    def config(name):
        if configs is not None and name in configs:
            return configs[name]
        return planned_config(name, head_dim, media, latents, with_latents)

    def key_tiles(block_n):
        return cdiv(media, block_n) + (cdiv(latents, block_n) if with_latents else 0)

    query_blocks = cdiv(latents, block_m)
    launches = []
    fwd = config("fwd")
    tiles = bh * query_blocks * key_tiles(fwd["BLOCK_N"])
    launches.append(KernelLaunch(
        "_resampler_fwd_kernel", (bh, query_blocks), {**fwd, "BLOCK_M": block_m}, tiles,
        executed_flops=4 * tiles * block_m * fwd["BLOCK_N"] * block_d, useful_flops=4 * pairs * head_dim,
        hbm_bytes=bh * latents * (2 * row + 4) + bh * query_blocks * 2 * keys * row))
    choice = _backward_choice(latents, bh, sms)
    if choice == "fused":
        fused = config("fused")
        tiles = bh * key_tiles(fused["BLOCK_N"])
        launches.append(KernelLaunch(
            "_resampler_bwd_fused_kernel", (bh,), {**fused, "BLOCK_M": block_m}, tiles,
            executed_flops=10 * tiles * block_m * fused["BLOCK_N"] * block_d, useful_flops=10 * pairs * head_dim,
            hbm_bytes=bh * latents * (4 * row + 4) + bh * 4 * keys * row))
    else:
        dq = config("dq")
        tiles = bh * query_blocks * key_tiles(dq["BLOCK_N"])
        launches.append(KernelLaunch(
            "_resampler_bwd_dq_kernel", (bh, query_blocks), {**dq, "BLOCK_M": block_m}, tiles,
            executed_flops=6 * tiles * block_m * dq["BLOCK_N"] * block_d, useful_flops=6 * pairs * head_dim,
            hbm_bytes=bh * latents * (4 * row + 8) + bh * query_blocks * 2 * keys * row))
        dkdv = config("dkdv")
        blocks = key_tiles(dkdv["BLOCK_N"])
        tiles = bh * blocks * query_blocks
        launches.append(KernelLaunch(
            "_resampler_bwd_dkdv_kernel", (bh, blocks), {**dkdv, "BLOCK_M": block_m}, tiles,
            executed_flops=8 * tiles * block_m * dkdv["BLOCK_N"] * block_d, useful_flops=8 * pairs * head_dim,
            hbm_bytes=bh * blocks * latents * (2 * row + 8) + bh * 4 * keys * row))
    q_bytes = bh * latents * row
    kv_bytes = bh * keys * row
    return OpPlan(
        op="resampler",
        shape=dict(B=batch, S=media, R=latents, H=heads, Dh=head_dim, form="perceiver" if with_latents else "qformer"),
        mode="fwd_bwd", launches=launches, floor_flops=14 * pairs * head_dim,
        floor_bytes=6 * q_bytes + 6 * kv_bytes,
        peak_extra_bytes=bh * latents * 4 * (2 if choice == "split" else 1),
        notes=[f"backward: {choice} (fused needs R <= 64 and B x H >= 2 x {sms} SMs)",
               "bytes: every tile load/store counted as HBM traffic; floor = q, k, v (both sources), o forward "
               "and q, o, do, dq, k, v, dk, dv backward once each"])


def resampler_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor | None,
    v_latents: torch.Tensor | None,
    media_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
) -> list[torch.Tensor]:
    """Launch the backward: the fused kernel, or the dq kernel (which also stores delta) then the dk/dv kernel.

    :func:`_backward_plan` picks one; both give the same gradients (up to rounding).

    Returns:
        ``[dq, dk_media, dv_media]`` plus ``[dk_latents, dv_latents]`` when there are latents, in
        the input dtype, contiguous. ``grad_out`` may have any strides (also 0).
    """
    batch, num_queries, heads, head_dim = q.shape
    num_media = k_media.shape[1]
    has_latents = k_latents is not None
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk_media = torch.empty(k_media.shape, dtype=q.dtype, device=q.device)
    dv_media = torch.empty(k_media.shape, dtype=q.dtype, device=q.device)
    grads = [dq, dk_media, dv_media]
    if has_latents:
        grads += [torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(2)]
    if dq.numel() == 0:
        return [g.zero_() for g in grads]
    dk_lat, dv_lat, dlatent_strides = _latent_args(*(grads[3:] if has_latents else (None, None)), q)
    k_lat, v_lat, latent_strides = _latent_args(k_latents, v_latents, q)
    mask, stride_maskb, stride_maskn = _mask_arg(media_mask, q)
    constants = dict(
        HAS_LATENTS=has_latents, HAS_MASK=media_mask is not None, HEAD_DIM=head_dim,
        PRECISION=dot_precision(q.dtype), BLOCK_M=_query_block(num_queries),
        BLOCK_D=max(16, next_power_of_2(head_dim)),
    )
    qk_scale = softmax_scale * _LOG2E

    if _backward_plan(num_queries, batch * heads, q.device) == "fused":
        _resampler_bwd_fused_kernel[(batch * heads,)](
            q, k_media, v_media, k_lat, v_lat, mask, out, grad_out, lse,
            dq, dk_media, dv_media, dk_lat, dv_lat,
            *q.stride(), *k_media.stride(), *v_media.stride(), *latent_strides,
            stride_maskb, stride_maskn, *out.stride(), *grad_out.stride(), *dq.stride(),
            *dk_media.stride(), *dv_media.stride(), *dlatent_strides,
            heads, num_queries, num_media, next_power_of_2(num_media), qk_scale, softmax_scale, **constants,
        )
        return grads

    delta = torch.empty(batch, heads, num_queries, dtype=torch.float32, device=q.device)
    grid_dq = (batch * heads, cdiv(num_queries, constants["BLOCK_M"]))
    _resampler_bwd_dq_kernel[grid_dq](
        q, k_media, v_media, k_lat, v_lat, mask, out, grad_out, lse, delta, dq,
        *q.stride(), *k_media.stride(), *v_media.stride(), *latent_strides,
        stride_maskb, stride_maskn, *out.stride(), *grad_out.stride(), *dq.stride(),
        heads, num_queries, num_media, next_power_of_2(num_media), qk_scale, softmax_scale, **constants,
    )

    def grid_dkdv(meta):
        latent_blocks = cdiv(num_queries, meta["BLOCK_N"]) if has_latents else 0
        return (batch * heads, cdiv(num_media, meta["BLOCK_N"]) + latent_blocks)

    _resampler_bwd_dkdv_kernel[grid_dkdv](
        q, k_media, v_media, k_lat, v_lat, mask, grad_out, lse, delta,
        dk_media, dv_media, dk_lat, dv_lat,
        *q.stride(), *k_media.stride(), *v_media.stride(), *latent_strides,
        stride_maskb, stride_maskn, *grad_out.stride(),
        *dk_media.stride(), *dv_media.stride(), *dlatent_strides,
        heads, num_queries, num_media, next_power_of_2(num_media), qk_scale, softmax_scale, **constants,
    )
    return grads


# ----------------------------------------------------------------------------------------------
# custom ops + autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("vlmcore::resampler_attention_fwd", mutates_args=())
def _resampler_attention_fwd_op(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor | None,
    v_latents: torch.Tensor | None,
    media_mask: torch.Tensor | None,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused forward: ``(out [B, R, H, Dh], lse fp32 [B, H, R])``."""
    return resampler_attention_forward(q, k_media, v_media, k_latents, v_latents, media_mask, softmax_scale)


@_resampler_attention_fwd_op.register_fake
def _(q, k_media, v_media, k_latents, v_latents, media_mask, softmax_scale):
    batch, num_queries, heads, _ = q.shape
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        q.new_empty((batch, heads, num_queries), dtype=torch.float32),
    )


@torch.library.custom_op("vlmcore::resampler_attention_bwd", mutates_args=())
def _resampler_attention_bwd_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor | None,
    v_latents: torch.Tensor | None,
    media_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
) -> list[torch.Tensor]:
    """Fused backward: ``[dq, dk_media, dv_media]`` (+ ``[dk_latents, dv_latents]`` with latents)."""
    return resampler_attention_backward(
        grad_out, q, k_media, v_media, k_latents, v_latents, media_mask, out, lse, softmax_scale
    )


@_resampler_attention_bwd_op.register_fake
def _(grad_out, q, k_media, v_media, k_latents, v_latents, media_mask, out, lse, softmax_scale):
    grads = [q.new_empty(q.shape), k_media.new_empty(k_media.shape), k_media.new_empty(k_media.shape)]
    if k_latents is not None:
        grads += [q.new_empty(q.shape), q.new_empty(q.shape)]
    return grads


def _setup_context(ctx, inputs, output):
    q, k_media, v_media, k_latents, v_latents, media_mask, softmax_scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k_media, v_media, k_latents, v_latents, media_mask, out, lse)
    ctx.softmax_scale = softmax_scale


def _backward(ctx, grad_out, grad_lse):
    q, k_media, v_media, k_latents, v_latents, media_mask, out, lse = ctx.saved_tensors
    grads = _resampler_attention_bwd_op(
        grad_out, q, k_media, v_media, k_latents, v_latents, media_mask, out, lse, ctx.softmax_scale
    )
    dk_latents, dv_latents = (grads[3], grads[4]) if k_latents is not None else (None, None)
    return grads[0], grads[1], grads[2], dk_latents, dv_latents, None, None


_resampler_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _ResamplerAttention(torch.autograd.Function):
    """The eager path: the same launchers as the custom ops, without their dispatcher round trips
    (the custom ops stay for ``torch.compile`` and ``opcheck``)."""

    @staticmethod
    def forward(ctx, q, k_media, v_media, k_latents, v_latents, media_mask, softmax_scale):
        out, lse = resampler_attention_forward(q, k_media, v_media, k_latents, v_latents, media_mask, softmax_scale)
        ctx.save_for_backward(q, k_media, v_media, k_latents, v_latents, media_mask, out, lse)
        ctx.softmax_scale = softmax_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k_media, v_media, k_latents, v_latents, media_mask, out, lse = ctx.saved_tensors
        grads = resampler_attention_backward(
            grad_out, q, k_media, v_media, k_latents, v_latents, media_mask, out, lse, ctx.softmax_scale
        )
        dk_latents, dv_latents = (grads[3], grads[4]) if k_latents is not None else (None, None)
        return grads[0], grads[1], grads[2], dk_latents, dv_latents, None, None


# ----------------------------------------------------------------------------------------------
# public op
# ----------------------------------------------------------------------------------------------


def _validate(q, k_media, v_media, k_latents, v_latents, media_mask, softmax_scale) -> float:
    check_float_tensor("q", q, 4)
    check_float_tensor("k_media", k_media, 4)
    check_float_tensor("v_media", v_media, 4)
    check_same("k_media", k_media, "q", q)
    check_same("v_media", v_media, "q", q)
    batch, num_latents, heads, head_dim = q.shape
    if k_media.shape != v_media.shape:
        raise ValueError(
            f"k_media and v_media must have the same shape, got {tuple(k_media.shape)} and {tuple(v_media.shape)}"
        )
    if k_media.shape[0] != batch or k_media.shape[2:] != (heads, head_dim):
        raise ValueError(
            f"k_media must be [B, S, H, Dh] with B={batch}, H={heads}, Dh={head_dim}, got {tuple(k_media.shape)}"
        )
    if k_media.shape[1] < 1:
        raise ValueError("k_media must have at least one media token (S >= 1)")
    if head_dim < 1:
        raise ValueError(f"q must have a head dim Dh >= 1, got shape {tuple(q.shape)}")
    if (k_latents is None) != (v_latents is None):
        raise ValueError("k_latents and v_latents must both be tensors or both be None")
    if k_latents is not None:
        check_float_tensor("k_latents", k_latents, 4)
        check_float_tensor("v_latents", v_latents, 4)
        check_same("k_latents", k_latents, "q", q)
        check_same("v_latents", v_latents, "q", q)
        for name, t in (("k_latents", k_latents), ("v_latents", v_latents)):
            if t.shape != q.shape:
                raise ValueError(f"{name} must have q's shape [B, R, H, Dh] = {tuple(q.shape)}, got {tuple(t.shape)}")
    if media_mask is not None:
        if not isinstance(media_mask, torch.Tensor) or media_mask.dtype != torch.bool:
            raise TypeError("media_mask must be a bool tensor [B, S] (True = attend)")
        if tuple(media_mask.shape) != (batch, k_media.shape[1]):
            raise ValueError(
                f"media_mask must have shape [B, S] = {(batch, k_media.shape[1])}, got {tuple(media_mask.shape)}"
            )
        if media_mask.device != q.device:
            raise ValueError(f"media_mask is on {media_mask.device} but q is on {q.device}")
    return check_softmax_scale(softmax_scale, head_dim)


def resampler_attention(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor | None = None,
    v_latents: torch.Tensor | None = None,
    *,
    media_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q [k_media; k_latents]^T * scale) [v_media; v_latents]`` without the concat.

    Args:
        q: ``[B, R, H, Dh]`` latent queries (B = samples x images).
        k_media, v_media: ``[B, S, H, Dh]`` media keys/values.
        k_latents, v_latents: ``[B, R, H, Dh]`` latent keys/values, or None (Q-Former form).
        media_mask: optional bool ``[B, S]``; False = padding token, not attended. A query with
            nothing to attend gets zeros (and zero gradients).
        softmax_scale: default ``Dh ** -0.5``.

    Any strides are accepted (e.g. ``k, v = to_kv(x).view(B, S, 2, H, Dh).unbind(2)``). The Triton
    path (CUDA tensors, or ``with vlmcore.kernels.backend("triton")``) supports ``Dh <= 128``; eager calls go
    through an ``autograd.Function``, ``torch.compile`` traces the ``vlmcore::resampler_attention_*`` ops.

    Returns:
        ``[B, R, H, Dh]`` in q's dtype.

    Example::

        q = torch.randn(640, 64, 8, 64, device="cuda", dtype=torch.bfloat16)
        k = v = torch.randn(640, 257, 8, 64, device="cuda", dtype=torch.bfloat16)
        out = resampler_attention(q, k, v, q, q)   # latents attend to [media; latents]
    """
    scale = _validate(q, k_media, v_media, k_latents, v_latents, media_mask, softmax_scale)
    if use_triton(q):
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            raise TypeError(
                "q is bfloat16 on CPU: the Triton interpreter computes bfloat16 dots wrongly; use float32 / "
                "float16, or vlmcore.kernels.backend('reference') on CPU"
            )
        if q.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(
                f"the Triton resampler_attention kernel supports head dims Dh <= {MAX_HEAD_DIM}, got "
                f"q.shape[-1] = {q.shape[-1]}; use vlmcore.kernels.backend('reference')"
            )
        if torch.compiler.is_compiling():
            out, _ = _resampler_attention_fwd_op(q, k_media, v_media, k_latents, v_latents, media_mask, scale)
            return out
        return _ResamplerAttention.apply(q, k_media, v_media, k_latents, v_latents, media_mask, scale)
    return resampler_attention_reference(
        q, k_media, v_media, k_latents, v_latents, media_mask=media_mask, softmax_scale=scale
    )
