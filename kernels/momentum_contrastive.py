"""ITC with momentum distillation (ALBEF / BLIP), fused: the ``[b, b + Q]`` logits are never stored.

Public op: :func:`momentum_contrastive_loss`. One direction (image -> text, say) is

    z = rows @ cols^T / temp                     online logits     [b, N]   (N = b + Q columns)
    t = alpha * softmax(rows_m @ cols^T / temp) + (1 - alpha) * y
    y = onehot(i + label_offset)      or, with image ids,      y_ij = [row_ids_i == col_ids_j] / k_i
    loss_i = -sum_j t_ij log_softmax(z_i)_j = lse(z_i) - alpha * E_{q_i}[z_i] - (1 - alpha) sum_j y_ij z_ij

with ``rows`` the online features, ``rows_m`` the momentum features of the same samples and
``cols`` = [momentum batch; queue] of the other modality. With ids (BLIP ``blip_retrieval.py``)
every column carrying the row's image id is a positive, ``k_i >= 1`` of them (the row's own
momentum column is one); the hard term is then ``(1 - alpha) * sum_{j positive} z_ij / k_i``.
Targets are constants (BLIP computes them under ``no_grad``): gradients flow to ``rows`` and to
``temp`` only.

Triton path, one op direction at a time (the symmetric loss is two calls):

- forward ``_momentum_distill_fwd_kernel``: one program per block of rows. It loads the online
  and the momentum row tiles once and walks the column tiles; each column tile feeds two matmuls
  (online and momentum scores) and three online reductions in fp32: the LSE of z, the LSE of the
  momentum scores, and ``sum_j exp(zm_j - max) z_j`` (the soft-target expectation of z, rescaled
  like the softmax sum). With ids (constexpr ``HAS_IDS``; off: the label-column path, no id loads)
  a first walk over the int64 column ids alone (no features) counts each row's positives ``k_i``
  and the main walk loads each tile's ids again to sum z over the positives (8 bytes per column
  per pass; counting inside the main walk spilled the fp32 variant on sm_90). Stores per row: the
  loss, ``lse(z)``, ``lse(zm)`` and, with ids, ``k_i`` (fp32).
- backward ``_momentum_distill_bwd_kernel``: one program per block of rows recomputes both score
  tiles, forms ``softmax(z) - t`` (with ids, ``t``'s hard part is ``(1 - alpha) / k_i`` on the
  positives, from the stored counts) and accumulates ``d rows`` in fp32 registers, plus the per-row
  ``sum_j (p - t)_ij (r_i . c_j)`` for the temperature gradient (summed on the host in a fixed
  order). Like the other ops, it casts ``p - t`` to the input dtype for the product BEFORE any
  scaling: the incoming gradient g_i multiplies the fp32 sums at the end (scaled first, fp16 lost
  the negatives' gradients at BLIP's queue length).

Every output element is written by exactly one program and no atomics are used: bit-identical
runs. Extra memory O(b). Embedding width ``e <= 256`` on the Triton path (BLIP / ALBEF use 256).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._backend import interpreter_enabled, use_triton
from ._checks import check_float_tensor, check_same, dot_precision
from .reference import momentum_contrastive_loss_reference

MAX_EMBED_DIM = 256
# Running-max floor: finite, so exp(m_old - m_new) stays finite before any valid column is seen.
M_FLOOR = tl.constexpr(-1.0e30)


_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)
# The preferred config (``VLMCORE_AUTOTUNE=preferred``): the first one both pruners keep at e = 256,
# compiled for sm_90a in every dtype by the compile check; kept at every BLOCK_E, with or without ids.
PREFERRED_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=2)


def _cuda_configs() -> list[triton.Config]:
    """Row x column tiles of the CUDA autotune space (pruned per launch by the embedding tile)."""
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m in (32, 64)
        for block_n in (32, 64)
        for warps in (4, 8)
        for stages in (2, 3)
    ]


def _configs() -> list[triton.Config]:
    """The CUDA space on CUDA; one small config in the interpreter."""
    return [_INTERPRETER_CONFIG] if interpreter_enabled() else _cuda_configs()


def _preferred() -> triton.Config:
    return _INTERPRETER_CONFIG if interpreter_enabled() else PREFERRED_CONFIG


def _prune(configs, named_args, **kwargs):
    """Keep tiles whose two row tiles and the column tile stay within a register budget on sm_90:
    (2 BLOCK_M + BLOCK_N) x BLOCK_E <= 192 x 256 elements, and 8 warps for BLOCK_E = 256."""
    block_e = kwargs["BLOCK_E"]
    kept = [c for c in configs
            if (2 * c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * block_e <= 192 * 256
            and (block_e <= 128 or c.num_warps == 8)]
    return kept or configs[:1]


def _prune_backward(configs, named_args, **kwargs):
    """:func:`_prune`, and with ids at e > 128 no ``[64, 64]`` tile: with the id comparison that tile
    spilled 192-292 bytes at 255 registers (bf16, e = 256, 2-3 stages; without ids 32-36 bytes;
    tests/helpers/compile_checks/momentum_contrastive_compile_check.py)."""
    kept = _prune(configs, named_args, **kwargs)
    if kwargs.get("HAS_IDS") and kwargs["BLOCK_E"] > 128:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 64 * 64] or kept[:1]
    return kept


_AUTOTUNE_KEY = ["size_bucket", "BLOCK_E", "PRECISION", "HAS_IDS"]


@triton.jit
def _score_tiles(b_r, b_rm, p_cols, stride_c, o_n, m_n, o_e, m_e, scale, PRECISION: tl.constexpr):
    """Column tile ``[BLOCK_N, BLOCK_E]`` and the raw and scaled online / momentum scores against it."""
    b_c = tl.load(p_cols + o_n[:, None] * stride_c + o_e[None, :], mask=m_n[:, None] & m_e[None, :], other=0.0)
    b_dot = tl.dot(b_r, tl.trans(b_c), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N] fp32
    b_z = b_dot * scale
    b_zm = tl.dot(b_rm, tl.trans(b_c), input_precision=PRECISION) * scale
    return b_c, b_dot, b_z, b_zm


@autotune(_configs(), _preferred(), _AUTOTUNE_KEY, _prune)
@triton.jit
def _momentum_distill_fwd_kernel(
    p_rows, p_rows_m, p_cols, p_scale, p_loss, p_lse, p_lse_m, p_row_ids, p_col_ids, p_count,
    n_rows, n_cols, e, stride_r, stride_rm, stride_c, label_offset, alpha, size_bucket,
    BLOCK_E: tl.constexpr, PRECISION: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < n_rows
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < e
    m_re = m_m[:, None] & m_e[None, :]
    b_r = tl.load(p_rows + o_m[:, None] * stride_r + o_e[None, :], mask=m_re, other=0.0)  # [BLOCK_M, BLOCK_E]
    b_rm = tl.load(p_rows_m + o_m[:, None] * stride_rm + o_e[None, :], mask=m_re, other=0.0)
    scale = tl.load(p_scale)
    label = o_m + label_offset  # [BLOCK_M]
    b_max = tl.full([BLOCK_M], M_FLOOR, tl.float32)
    b_sum = tl.zeros([BLOCK_M], tl.float32)
    b_max_m = tl.full([BLOCK_M], M_FLOOR, tl.float32)
    b_sum_m = tl.zeros([BLOCK_M], tl.float32)
    b_expect = tl.zeros([BLOCK_M], tl.float32)  # sum_j exp(zm_j - max_m) z_j
    b_target = tl.zeros([BLOCK_M], tl.float32)  # z at the label column (with ids: summed over the positives)
    b_count = tl.zeros([BLOCK_M], tl.float32)  # positive columns per row (ids only)
    if HAS_IDS:
        b_row_ids = tl.load(p_row_ids + o_m, mask=m_m, other=0)  # int64 [BLOCK_M]
        # Counted in its own id-only pass, the count stays out of the score tiles' layout: counted in the
        # main walk it made ptxas spill the fp32 [32, 32] variant (4-7 KB; momentum_contrastive_compile_check.py).
        for i_n in range(0, n_cols, BLOCK_N):
            o_n = i_n + tl.arange(0, BLOCK_N).to(tl.int64)
            m_n = o_n < n_cols
            b_col_ids = tl.load(p_col_ids + o_n, mask=m_n, other=0)
            b_count += tl.sum(((b_col_ids[None, :] == b_row_ids[:, None]) & m_n[None, :]).to(tl.float32), 1)
    for i_n in range(0, n_cols, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < n_cols
        _, _, b_z, b_zm = _score_tiles(b_r, b_rm, p_cols, stride_c, o_n, m_n, o_e, m_e, scale, PRECISION)
        b_z_valid = tl.where(m_n[None, :], b_z, float("-inf"))
        b_zm_valid = tl.where(m_n[None, :], b_zm, float("-inf"))
        b_max_new = tl.maximum(b_max, tl.max(b_z_valid, 1))
        b_sum = b_sum * tl.exp(b_max - b_max_new) + tl.sum(tl.exp(b_z_valid - b_max_new[:, None]), 1)
        b_max = b_max_new
        b_max_m_new = tl.maximum(b_max_m, tl.max(b_zm_valid, 1))
        b_rescale = tl.exp(b_max_m - b_max_m_new)
        b_q = tl.exp(b_zm_valid - b_max_m_new[:, None])  # 0 on invalid columns
        b_sum_m = b_sum_m * b_rescale + tl.sum(b_q, 1)
        b_expect = b_expect * b_rescale + tl.sum(b_q * tl.where(m_n[None, :], b_z, 0.0), 1)
        b_max_m = b_max_m_new
        if HAS_IDS:
            b_col_ids = tl.load(p_col_ids + o_n, mask=m_n, other=0)  # int64 [BLOCK_N]
            b_pos = (b_col_ids[None, :] == b_row_ids[:, None]) & m_n[None, :]
            b_target += tl.sum(tl.where(b_pos, b_z, 0.0), 1)
        else:
            b_target += tl.sum(tl.where(o_n[None, :] == label[:, None], b_z, 0.0), 1)
    b_lse = b_max + tl.log(b_sum)
    b_lse_m = b_max_m + tl.log(b_sum_m)
    if HAS_IDS:
        # mean z over the positives; every valid row has >= 1 (rows past n_rows: 1, not 0 / 0)
        b_target = b_target / tl.where(m_m, b_count, 1.0)
    b_loss = b_lse - alpha * (b_expect / b_sum_m) - (1.0 - alpha) * b_target
    tl.store(p_loss + o_m, b_loss, mask=m_m)
    tl.store(p_lse + o_m, b_lse, mask=m_m)
    tl.store(p_lse_m + o_m, b_lse_m, mask=m_m)
    if HAS_IDS:
        tl.store(p_count + o_m, b_count, mask=m_m)


@autotune(_configs(), _preferred(), _AUTOTUNE_KEY, _prune_backward)
@triton.jit
def _momentum_distill_bwd_kernel(
    p_rows, p_rows_m, p_cols, p_scale, p_lse, p_lse_m, p_grad, p_drows, p_dscale_rows, p_row_ids, p_col_ids,
    p_count, n_rows, n_cols, e, stride_r, stride_rm, stride_c, stride_dr, label_offset, alpha, size_bucket,
    BLOCK_E: tl.constexpr, PRECISION: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < n_rows
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < e
    m_re = m_m[:, None] & m_e[None, :]
    b_r = tl.load(p_rows + o_m[:, None] * stride_r + o_e[None, :], mask=m_re, other=0.0)
    b_rm = tl.load(p_rows_m + o_m[:, None] * stride_rm + o_e[None, :], mask=m_re, other=0.0)
    scale = tl.load(p_scale)
    b_lse = tl.load(p_lse + o_m, mask=m_m, other=0.0)
    b_lse_m = tl.load(p_lse_m + o_m, mask=m_m, other=0.0)
    b_g = tl.load(p_grad + o_m, mask=m_m, other=0.0)  # dL/dloss_i
    label = o_m + label_offset
    if HAS_IDS:
        b_row_ids = tl.load(p_row_ids + o_m, mask=m_m, other=0)
        b_hard = (1.0 - alpha) / tl.load(p_count + o_m, mask=m_m, other=1.0)  # hard target per positive
    b_dr = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    b_ds = tl.zeros([BLOCK_M], tl.float32)
    for i_n in range(0, n_cols, BLOCK_N):
        o_n = i_n + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < n_cols
        b_c, b_dot, b_z, b_zm = _score_tiles(b_r, b_rm, p_cols, stride_c, o_n, m_n, o_e, m_e, scale, PRECISION)
        b_p = tl.exp(b_z - b_lse[:, None])
        if HAS_IDS:
            b_col_ids = tl.load(p_col_ids + o_n, mask=m_n, other=0)
            b_t = alpha * tl.exp(b_zm - b_lse_m[:, None]) + tl.where(b_col_ids[None, :] == b_row_ids[:, None],
                                                                     b_hard[:, None], 0.0)
        else:
            b_t = alpha * tl.exp(b_zm - b_lse_m[:, None]) + tl.where(o_n[None, :] == label[:, None], 1.0 - alpha,
                                                                     0.0)
        b_delta = tl.where(m_n[None, :] & m_m[:, None], b_p - b_t, 0.0)  # dL/dz / g_i [BLOCK_M, BLOCK_N]
        b_ds += tl.sum(b_delta * b_dot, 1)
        b_dr += tl.dot(b_delta.to(b_c.dtype), b_c, input_precision=PRECISION)
    # The incoming gradient (~1 / (2 b)) scales the fp32 results, never the 16-bit dot operand: at
    # BLIP's 57,856 columns p * g is ~3e-8, below half of fp16's smallest subnormal (it would round to 0).
    b_dr = b_dr * (scale * b_g)[:, None]
    b_ds = b_ds * b_g
    tl.store(p_drows + o_m[:, None] * stride_dr + o_e[None, :], b_dr.to(p_drows.dtype.element_ty), mask=m_re)
    tl.store(p_dscale_rows + o_m, b_ds, mask=m_m)


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------


def _meta(rows: torch.Tensor, cols: torch.Tensor, row_ids: torch.Tensor | None) -> dict:
    """Autotune key and compile-time sizes: column-count bucket, padded embedding tile, dot precision,
    whether the targets come from image ids."""
    return dict(size_bucket=triton.next_power_of_2(cols.shape[0]),
                BLOCK_E=max(16, triton.next_power_of_2(rows.shape[1])), PRECISION=dot_precision(rows.dtype),
                HAS_IDS=row_ids is not None)


def _grid(n_rows: int):
    return lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),)


def momentum_distill_forward(rows, rows_m, cols, scale, alpha: float, label_offset: int, row_ids=None,
                             col_ids=None):
    """Per-row losses, ``lse(z)``, ``lse(zm)`` and the positive counts (fp32 ``[b]`` each; the counts
    are ``[0]`` without ids) on contiguous validated inputs; ``row_ids`` / ``col_ids`` int64 ``[b]`` /
    ``[N]`` or None."""
    n_rows, e = rows.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=rows.device)
    lse = torch.empty_like(loss)
    lse_m = torch.empty_like(loss)
    count = torch.empty(n_rows if row_ids is not None else 0, dtype=torch.float32, device=rows.device)
    _momentum_distill_fwd_kernel[_grid(n_rows)](
        rows, rows_m, cols, scale, loss, lse, lse_m, row_ids, col_ids, count if row_ids is not None else None,
        n_rows, cols.shape[0], e, rows.stride(0), rows_m.stride(0), cols.stride(0), label_offset, float(alpha),
        **_meta(rows, cols, row_ids),
    )
    return loss, lse, lse_m, count


def momentum_distill_backward(grad_rows, rows, rows_m, cols, scale, lse, lse_m, alpha: float, label_offset: int,
                              row_ids=None, col_ids=None, count=None):
    """``(d rows [b, e] in the rows' dtype, sum_j dL/dz_ij (r_i . c_j) per row, fp32 [b])``."""
    n_rows, e = rows.shape
    d_rows = torch.empty_like(rows)
    ds_rows = torch.empty(n_rows, dtype=torch.float32, device=rows.device)
    _momentum_distill_bwd_kernel[_grid(n_rows)](
        rows, rows_m, cols, scale, lse, lse_m, grad_rows, d_rows, ds_rows, row_ids, col_ids, count,
        n_rows, cols.shape[0], e, rows.stride(0), rows_m.stride(0), cols.stride(0), d_rows.stride(0),
        label_offset, float(alpha), **_meta(rows, cols, row_ids),
    )
    return d_rows, ds_rows


# ----------------------------------------------------------------------------------------------
# custom op
# ----------------------------------------------------------------------------------------------


def _scale_of(temperature: torch.Tensor) -> torch.Tensor:
    """``1 / temp`` as an fp32 ``[1]`` tensor (what the kernels read)."""
    return (1.0 / temperature.detach().float()).reshape(1)


def _contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


@torch.library.custom_op("vlmcore::momentum_distill_rows", mutates_args=())
def _rows_op(rows: torch.Tensor, rows_m: torch.Tensor, cols: torch.Tensor, temperature: torch.Tensor,
             alpha: float, label_offset: int, row_ids: torch.Tensor | None = None,
             col_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One direction: ``(per-row loss, lse(z), lse(zm), positives per row)``, fp32 ``[b]`` each; the
    positive counts are ``[0]`` without ids (module docstring). ``row_ids`` / ``col_ids``: int64
    ``[b]`` / ``[N]`` (both or neither)."""
    rows, rows_m, cols = rows.contiguous(), rows_m.contiguous(), cols.contiguous()
    return momentum_distill_forward(rows, rows_m, cols, _scale_of(temperature), alpha, label_offset,
                                    _contiguous_or_none(row_ids), _contiguous_or_none(col_ids))


@_rows_op.register_fake
def _(rows, rows_m, cols, temperature, alpha, label_offset, row_ids=None, col_ids=None):
    n = rows.shape[0]
    per_row = tuple(rows.new_empty(n, dtype=torch.float32) for _ in range(3))
    return per_row + (rows.new_empty(n if row_ids is not None else 0, dtype=torch.float32),)


@torch.library.custom_op("vlmcore::momentum_distill_rows_backward", mutates_args=())
def _rows_backward_op(grad: torch.Tensor, rows: torch.Tensor, rows_m: torch.Tensor, cols: torch.Tensor,
                      temperature: torch.Tensor, lse: torch.Tensor, lse_m: torch.Tensor, alpha: float,
                      label_offset: int, row_ids: torch.Tensor | None = None, col_ids: torch.Tensor | None = None,
                      count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d rows, d temperature)`` of ``sum_i grad_i loss_i``; ``count``: the forward's positives per row
    (with ids)."""
    rows, rows_m, cols = rows.contiguous(), rows_m.contiguous(), cols.contiguous()
    grad = grad.detach().float().contiguous()  # may arrive expanded (stride 0) from a mean / sum
    scale = _scale_of(temperature)
    d_rows, ds_rows = momentum_distill_backward(grad, rows, rows_m, cols, scale, lse, lse_m, alpha, label_offset,
                                                _contiguous_or_none(row_ids), _contiguous_or_none(col_ids),
                                                _contiguous_or_none(count))
    # z = s * dot with s = 1 / temp: dL/dtemp = -s^2 * sum_ij dL/dz_ij dot_ij
    d_temp = (-(scale * scale) * ds_rows.sum()).reshape(temperature.shape).to(temperature.dtype)
    return d_rows, d_temp


@_rows_backward_op.register_fake
def _(grad, rows, rows_m, cols, temperature, lse, lse_m, alpha, label_offset, row_ids=None, col_ids=None,
      count=None):
    return torch.empty_like(rows), torch.empty_like(temperature)


def _setup_context(ctx, inputs, output):
    rows, rows_m, cols, temperature, alpha, label_offset, row_ids, col_ids = inputs
    _, lse, lse_m, count = output
    ctx.mark_non_differentiable(lse, lse_m, count)
    ctx.save_for_backward(rows, rows_m, cols, temperature, lse, lse_m, row_ids, col_ids, count)
    ctx.alpha = alpha
    ctx.label_offset = label_offset


def _backward(ctx, grad_loss, grad_lse, grad_lse_m, grad_count):
    rows, rows_m, cols, temperature, lse, lse_m, row_ids, col_ids, count = ctx.saved_tensors
    has_ids = row_ids is not None
    d_rows, d_temp = _rows_backward_op(grad_loss, rows, rows_m, cols, temperature, lse, lse_m, ctx.alpha,
                                       ctx.label_offset, row_ids, col_ids, count if has_ids else None)
    need_rows, _, _, need_temp = ctx.needs_input_grad[:4]
    return (d_rows if need_rows else None, None, None, d_temp if need_temp else None, None, None, None, None)


_rows_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def _validate(name: str, rows, rows_m, queue, queue_name: str, triton_path: bool) -> None:
    check_float_tensor(name, rows, 2)
    check_float_tensor(name + "_m", rows_m, 2)
    check_same(name + "_m", rows_m, name, rows)
    if rows.shape != rows_m.shape:
        raise ValueError(f"{name}_m {tuple(rows_m.shape)} must have the shape of {name} {tuple(rows.shape)}")
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [b, e] batch, got {tuple(rows.shape)}")
    if queue is not None:
        check_float_tensor(queue_name, queue, 2)
        check_same(queue_name, queue, name, rows)
        if queue.shape[1] != rows.shape[1]:
            raise ValueError(f"{queue_name} must be [Q, e={rows.shape[1]}], got {tuple(queue.shape)}")
    if triton_path:
        if rows.dtype == torch.bfloat16 and rows.device.type == "cpu":
            raise TypeError(f"{name} is bfloat16 on CPU: the Triton interpreter computes bf16 wrongly; use "
                            "float32/float16 on CPU or the reference backend")
        if rows.shape[1] > MAX_EMBED_DIM:
            raise ValueError(f"{name} has e={rows.shape[1]} features; the Triton path supports e <= {MAX_EMBED_DIM}")


def _column_ids(ids, queue_ids, features: torch.Tensor, queue) -> torch.Tensor | None:
    """``[ids; queue_ids]`` (int64 ``[b + Q]``) after validating both, or None without ids."""
    b = features.shape[0]
    if ids is None:
        if queue_ids is not None:
            raise ValueError("queue_ids is given without ids; pass the batch's ids too (or neither)")
        return None
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or tuple(ids.shape) != (b,):
        raise TypeError(f"ids must be an int64 tensor of shape [{b}], got "
                        f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__} "
                        f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else ''}")
    if ids.device != features.device:
        raise ValueError(f"ids is on {ids.device}, image_features on {features.device}")
    q = 0 if queue is None else queue.shape[0]
    if q == 0:
        if queue_ids is not None and queue_ids.numel():
            raise ValueError(f"queue_ids has {queue_ids.numel()} entries but there is no queue")
        return ids
    if not isinstance(queue_ids, torch.Tensor) or queue_ids.dtype != torch.int64 or tuple(queue_ids.shape) != (q,):
        raise TypeError(f"queue_ids must be an int64 tensor of shape [Q={q}] (one id per queued entry) when ids "
                        f"and the queues are given, got {queue_ids if queue_ids is None else tuple(queue_ids.shape)}")
    if queue_ids.device != features.device:
        raise ValueError(f"queue_ids is on {queue_ids.device}, image_features on {features.device}")
    return torch.cat([ids, queue_ids])


def momentum_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_features_m: torch.Tensor,
    text_features_m: torch.Tensor,
    temperature: torch.Tensor,
    alpha: float,
    *,
    image_queue: torch.Tensor | None = None,
    text_queue: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    queue_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """BLIP's ITC loss with momentum distillation, ``(loss_i2t + loss_t2i) / 2``, an fp32 scalar.

    Args:
        image_features, text_features: ``[b, e]`` online features (normalized by the caller).
        image_features_m, text_features_m: ``[b, e]`` momentum-encoder features of the same samples.
        temperature: 0-dim positive tensor (logits = similarities / temperature); gets a gradient.
        alpha: distillation weight in [0, 1] (0 = plain one-hot InfoNCE against the columns).
        image_queue, text_queue: ``[Q, e]`` queued momentum features (or None): the columns are
            ``[image_features_m; image_queue]`` for t2i and ``[text_features_m; text_queue]`` for i2t.
        ids: int64 ``[b]`` image ids of the batch (BLIP ``blip_retrieval.py``), or None. With ids,
            every column whose id equals the row's is a positive (a COCO image's other captions):
            the one-hot target becomes ``[ids_i == column_ids_j] / #positives_i``.
        queue_ids: int64 ``[Q]`` ids of the queued entries; required with ``ids`` and the queues
            (BLIP fills an empty queue's ids with -100, which matches no sample).

    Targets for i2t: ``alpha * softmax(image_features_m @ cols_t^T / temp) + (1 - alpha) *
    onehot(i)`` (or the id positives above, the same ids in both directions); likewise t2i. The
    momentum features and the queues are constants (no gradient), as in BLIP. Gradients flow to
    ``image_features``, ``text_features`` and ``temperature``.

    Backend: Triton (module docstring; ``[b, b + Q]`` logits never stored) for CUDA tensors or when
    forced, else :func:`~vlmcore.kernels.reference.momentum_contrastive_loss_reference`.
    """
    triton_path = use_triton(image_features) if isinstance(image_features, torch.Tensor) else False
    _validate("image_features", image_features, image_features_m, image_queue, "image_queue", triton_path)
    _validate("text_features", text_features, text_features_m, text_queue, "text_queue", triton_path)
    check_same("text_features", text_features, "image_features", image_features)
    if image_features.shape != text_features.shape:
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} must have the same [b, e] shape")
    if (image_queue is None) != (text_queue is None):
        raise ValueError("image_queue and text_queue must both be given or both be None")
    if not isinstance(temperature, torch.Tensor) or temperature.numel() != 1 or temperature.dim() > 1:
        raise TypeError(f"temperature must be a 0-dim tensor, got {temperature!r}")
    if not temperature.dtype.is_floating_point or temperature.device != image_features.device:
        raise TypeError(f"temperature must be a floating tensor on {image_features.device}, "
                        f"got {temperature.dtype} on {temperature.device}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
    alpha = float(alpha)
    column_ids = _column_ids(ids, queue_ids, image_features, image_queue)
    cols_text = text_features_m.detach()
    cols_image = image_features_m.detach()
    if text_queue is not None:
        cols_text = torch.cat([cols_text, text_queue.detach()])
        cols_image = torch.cat([cols_image, image_queue.detach()])
    if not triton_path:
        return momentum_contrastive_loss_reference(image_features, text_features, image_features_m.detach(),
                                                   text_features_m.detach(), cols_image, cols_text, temperature,
                                                   alpha, ids=ids, column_ids=column_ids)
    # both directions share the ids: image i's captions and image i are one sample
    loss_i2t = _rows_op(image_features, image_features_m.detach(), cols_text, temperature, alpha, 0, ids,
                        column_ids)[0]
    loss_t2i = _rows_op(text_features, text_features_m.detach(), cols_image, temperature, alpha, 0, ids,
                        column_ids)[0]
    return (loss_i2t.mean() + loss_t2i.mean()) / 2

