"""Fused SigLIP (pairwise sigmoid) contrastive loss that never builds the n x n logits.

Public op: :func:`sigmoid_contrastive_loss`; planning function: :func:`sigmoid_contrastive_plan`.

Math (OpenCLIP ``SigLipLoss``): x = image rows ``[m, d]``, y = text rows ``[N, d]``, s = logit scale
(already exponentiated), b = logit bias, ``l_ij = s x_i.y_j + b``, ``z_ij = +1`` for a positive pair
(the diagonal, or equal group ids), ``-1`` otherwise, ``loss = (1/n) sum_ij softplus(-z_ij l_ij)`` with
n the LOCAL batch (the rows of x). With ``G'_ij = sigmoid(l_ij) - [positive]`` (= dL/dl times n):
``dx = (s/n) G' y``, ``dy = (s/n) G'^T x``, ``ds = (1/n) sum G' * (x y^T)``, ``db = (1/n) sum G'``.

The loss is a scalar and G' depends on l alone, so the forward pass forms every gradient at once and
backward only multiplies them by the incoming gradient: the minimum work, 6 n^2 d FLOPs (one logits
pass, two gradient products), with no recomputation. The matrix is walked in windows of at most
``WINDOW`` x ``WINDOW`` (rows x columns; G' of one window = 128 MiB in bf16), row windows outer,
column windows inner, in a fixed order:

1. ``_sigmoid_scores_kernel`` (a program per [BLOCK_M, BLOCK_N] tile of the window): the X tile in
   fp32, the softplus loss, G' stored once in the input dtype, and per-(column tile, row) partial
   sums of the loss, of G' X and of G' (fp32; each slot has one writer);
2. ``_window_matmul_kernel`` twice: ``dx_win += (s/n) G' y[cols]`` into the fp32 ``[R, d]``
   accumulator of the current row window (cast to the input dtype when its last column window is
   done), and ``dy_acc[cols] += (s/n) G'^T x[rows]`` into the fp32 ``[N, d]`` text accumulator.
   Square windows keep both reductions long (K = 8192), so the products are compute bound and the
   fp32 accumulators' traffic stays ~1/4 of the G' traffic at any n.

No float atomics and fixed reduction orders: reruns are bit-identical. Statistics are fp32 (a
log1p that keeps its low bits for the many tiny negative-pair terms; sigmoid and G' from one
``exp(-|l|)`` without cancellation). Matrix products run in the input dtype with fp32 accumulation
(fp32 inputs: IEEE fp32). Offsets are int64. A side that needs no gradient (frozen tower, or no
grad mode) skips its product; with no gradient at all G' is not even written.

Extra memory beyond inputs and their gradients: the fp32 ``[N, d]`` text accumulator, the fp32
``[R, d]`` image-window accumulator, one G' window and O(n) partials. The gradients are held from
forward to backward (they are the input gradients).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from ._backend import interpreter_enabled, use_triton
from ._checks import check_float_tensor, check_same, check_scalar, dot_precision
from ._distributed import all_gather_no_grad, all_gather_with_grad
from ._plan import KernelLaunch, OpPlan
from .reference import sigmoid_contrastive_loss_reference

# Rows and columns of one G' window (a multiple of every tile below). 8192 x 8192 = 128 MiB in bf16.
WINDOW = 8192
# Positive pairs of a block: none (a remote rank's text block), the diagonal (offset), or equal ids.
POSITIVES_NONE, POSITIVES_DIAGONAL, POSITIVES_IDS = 0, 1, 2
DIST_IMPLS = ("ring", "gather")

# Preferred configs (fixed: the plan and the launch read the same table; compile-checked for sm_90a).
# Scores: 128 x 64 tiles (a 128 x 128 fp32 tile plus the sigmoid epilogue spills at 8 warps on sm_90a).
_SCORES_CONFIG = {
    "16bit": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
    "fp32": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 2},
    "interpreter": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32, "num_warps": 4, "num_stages": 1},
}
_MATMUL_CONFIG = {
    "16bit": {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    "fp32": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2},
    "interpreter": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
}
_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _sigmoid_scores_kernel(
    p_x, p_y, p_sb, p_xid, p_yid, p_g, p_part,
    row0, win_rows, col0, win_cols, d, stride_x, stride_y, stride_g, positive_offset,
    POSITIVES: tl.constexpr, WRITE_G: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of the window rows ``[row0, row0 + win_rows)`` x columns
    ``[col0, col0 + win_cols)`` of x against y.

    x ``[m, d]``, y ``[N, d]`` (feature stride 1); sb fp32 ``[2]`` = (s, b); xid ``[m]`` / yid ``[N]``
    int64 group ids (POSITIVES == 2). Writes G' = sigmoid(l) - [positive] to g ``[win_rows, win_cols]``
    (WRITE_G, input dtype) and row partials to part fp32 ``[3, n_col_tiles, win_rows]``:
    (sum softplus(-z l), sum G' X, sum G') over this tile's columns (the last two only with WRITE_G).
    """
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    n_col_tiles = tl.num_programs(1)
    o_w = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows inside the window
    m_m = o_w < win_rows
    o_m = row0 + o_w  # rows of x
    o_c = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns inside the window
    m_n = o_c < win_cols
    o_n = col0 + o_c  # rows of y
    m_mn = m_m[:, None] & m_n[None, :]
    o_xm = o_m.to(tl.int64) * stride_x  # [BLOCK_M]
    o_yn = o_n.to(tl.int64) * stride_y  # [BLOCK_N]
    b_x = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # X = x y^T
    for i_k in range(0, d, BLOCK_D):
        o_k = i_k + tl.arange(0, BLOCK_D)
        m_k = o_k < d
        b_a = tl.load(p_x + o_xm[:, None] + o_k[None, :], mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_b = tl.load(p_y + o_yn[:, None] + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_x = tl.dot(b_a, tl.trans(b_b), b_x, input_precision=PRECISION)
    scale = tl.load(p_sb)
    bias = tl.load(p_sb + 1)
    b_l = b_x * scale + bias  # [BLOCK_M, BLOCK_N] logits
    if POSITIVES == 1:
        m_pos = o_n[None, :] == (o_m + positive_offset)[:, None]
    elif POSITIVES == 2:
        b_xid = tl.load(p_xid + o_m, mask=m_m, other=-1)
        b_yid = tl.load(p_yid + o_n, mask=m_n, other=-1)
        m_pos = (b_xid[:, None] == b_yid[None, :]) & m_mn
    else:
        m_pos = (o_n[None, :] < 0) & (o_m[:, None] < 0)  # no positives (shape [BLOCK_M, BLOCK_N])
    b_u = tl.exp(-tl.abs(b_l))  # in (0, 1]: both sigmoid and softplus from it, no overflow
    b_w = 1.0 + b_u
    # log1p(u) keeping the low bits of tiny u (most terms: negatives at l ~ b = -10 give u ~ 4.5e-5)
    b_log1p = tl.where(b_w == 1.0, b_u, tl.log(b_w) * b_u / tl.where(b_w == 1.0, 1.0, b_w - 1.0))
    b_t = tl.where(m_pos, b_l, -b_l)  # z l
    b_loss = tl.where(m_mn, tl.maximum(-b_t, 0.0) + b_log1p, 0.0)  # -log sigmoid(z l)
    o_part = i_n.to(tl.int64) * win_rows + o_w
    part_stride = n_col_tiles.to(tl.int64) * win_rows
    tl.store(p_part + o_part, tl.sum(b_loss, 1), mask=m_m)
    if WRITE_G:
        b_big = tl.where(b_l >= 0.0, 1.0, b_u)  # sigmoid(l) = b_big / w, sigmoid(-l) = b_small / w
        b_small = tl.where(b_l >= 0.0, b_u, 1.0)
        b_g = tl.where(m_pos, -b_small, b_big) / b_w  # sigmoid(l) - [positive], no cancellation
        b_g = tl.where(m_mn, b_g, 0.0)
        p_gt = p_g + o_w.to(tl.int64)[:, None] * stride_g + o_c[None, :]
        tl.store(p_gt, b_g.to(p_g.dtype.element_ty), mask=m_mn)
        tl.store(p_part + part_stride + o_part, tl.sum(b_g * b_x, 1), mask=m_m)
        tl.store(p_part + 2 * part_stride + o_part, tl.sum(b_g, 1), mask=m_m)


@triton.jit
def _window_matmul_kernel(
    p_a, p_b, p_c, p_alpha, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``C += alpha A B``: one [BLOCK_M, BLOCK_N] tile of the fp32 accumulator C.

    A ``[M, K]`` and B ``[K, N]`` in the input dtype with any strides (G' or G'^T of a window, x or y
    rows); C ``[M, N]`` fp32 row-major; alpha fp32 ``[1]``. The reduction runs in fp32 over the whole
    K in order; each C element has one writer.
    """
    i_m = tl.program_id(0)
    i_n = tl.program_id(1)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    o_am = o_m.to(tl.int64) * stride_am
    o_bn = o_n.to(tl.int64) * stride_bn
    b_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i_k in range(0, K, BLOCK_K):
        o_k = (i_k + tl.arange(0, BLOCK_K)).to(tl.int64)
        m_k = o_k < K
        b_a = tl.load(p_a + o_am[:, None] + o_k[None, :] * stride_ak, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_b = tl.load(p_b + o_k[:, None] * stride_bk + o_bn[None, :], mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_acc = tl.dot(b_a, b_b, b_acc, input_precision=PRECISION)
    m_mn = m_m[:, None] & m_n[None, :]
    p_ct = p_c + o_m.to(tl.int64)[:, None] * stride_cm + o_n[None, :]
    b_acc = b_acc * tl.load(p_alpha) + tl.load(p_ct, mask=m_mn, other=0.0)
    tl.store(p_ct, b_acc, mask=m_mn)


# ----------------------------------------------------------------------------------------------
# plan (the launchers read their windows, grids and configs from here)
# ----------------------------------------------------------------------------------------------


def _config_key(dtype: str, device: str) -> str:
    if device == "interpreter":
        return "interpreter"
    return "fp32" if dtype == "fp32" else "16bit"


def _windows(size: int) -> list[tuple[int, int]]:
    """``(start, length)`` of the windows of ``size`` rows (or columns), ``WINDOW`` each, the last shorter."""
    return [(start, min(WINDOW, size - start)) for start in range(0, size, WINDOW)]


def _window_steps(n: int, n_cols: int, d: int, dtype: str, with_image: bool, with_text: bool, with_params: bool,
                  device: str):
    """Every window pair in launch order: ``(row0, win_rows, col0, win_cols, launches)``.

    ``launches`` are the :class:`KernelLaunch` of that window (scores, then the image product, then
    the text product, each only when needed), with the grids and configs the launcher uses.
    """
    elem = _DTYPE_BYTES[dtype]
    key = _config_key(dtype, device)
    scores_cfg, mm_cfg = _SCORES_CONFIG[key], _MATMUL_CONFIG[key]
    bm, bn, bd = scores_cfg["BLOCK_M"], scores_cfg["BLOCK_N"], scores_cfg["BLOCK_D"]
    mbm, mbn, mbk = mm_cfg["BLOCK_M"], mm_cfg["BLOCK_N"], mm_cfg["BLOCK_K"]
    with_grad = with_image or with_text or with_params
    d_pad = triton.cdiv(d, bd) * bd

    def product(rows: int, k: int, side: str, hbm_bytes: int) -> KernelLaunch:
        grid = (triton.cdiv(rows, mbm), triton.cdiv(d, mbn))
        k_steps = triton.cdiv(k, mbk)
        return KernelLaunch(
            kernel="_window_matmul_kernel", grid=grid, config={**mm_cfg, "side": side},
            tiles=grid[0] * grid[1] * k_steps, executed_flops=2 * grid[0] * mbm * grid[1] * mbn * k_steps * mbk,
            useful_flops=2 * rows * k * d, hbm_bytes=hbm_bytes)

    for row0, win_rows in _windows(n):
        for col0, win_cols in _windows(n_cols):
            grid = (triton.cdiv(win_rows, bm), triton.cdiv(win_cols, bn))
            g_bytes = win_rows * win_cols * elem
            launches = [KernelLaunch(
                kernel="_sigmoid_scores_kernel", grid=grid,
                config={**scores_cfg, "WRITE_G": with_grad, "window": (win_rows, win_cols)},
                tiles=grid[0] * grid[1] * triton.cdiv(d, bd),
                executed_flops=2 * grid[0] * bm * grid[1] * bn * d_pad, useful_flops=2 * win_rows * win_cols * d,
                hbm_bytes=(win_rows + win_cols) * d * elem + (g_bytes if with_grad else 0)
                + 3 * grid[1] * win_rows * 4)]
            if with_image:  # dx_win += alpha G' y[cols]: [R, C] x [C, d]
                launches.append(product(win_rows, win_cols, "image",
                                        g_bytes + win_cols * d * elem + 2 * win_rows * d * 4))
            if with_text:  # dy_acc[cols] += alpha G'^T x[rows]: [C, R] x [R, d]
                launches.append(product(win_cols, win_rows, "text",
                                        g_bytes + win_rows * d * elem + 2 * win_cols * d * 4))
            yield row0, win_rows, col0, win_cols, launches


def sigmoid_contrastive_plan(n: int, d: int, dtype: str = "bf16", n_cols: int | None = None,
                             with_image: bool = True, with_text: bool = True, with_params: bool = True,
                             device: str = "cuda") -> OpPlan:
    """The launches of one forward (which also forms every gradient) of x ``[n, d]`` against y ``[N, d]``.

    Args:
        n, d: rows of x and the feature width; ``n_cols`` = N (default n).
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (the inputs').
        with_image, with_text: whether that side's gradient is formed (False: frozen tower).
        with_params: whether the logit scale / bias gradients are formed (they need G' too).
        device: ``"cuda"`` (the sm_90 preferred configs) or ``"interpreter"`` (the CPU test tiles).

    The launcher walks the same :func:`_window_steps`. Launches are in launch order, consecutive
    identical window pairs merged with ``count``. FLOPs count the tensor-core work (tile padding in
    ``executed_flops``). HBM bytes model a window as: its x rows and y rows read once by the scores
    kernel (its column tiles are the slow grid axis, so a y tile stays in L2 while all row tiles of
    the window use it), G' written once and read once per product, the products' other operand read
    once, their fp32 accumulator tiles read and written once. Backward launches nothing but the
    scaling of the saved gradients (not counted).
    """
    n_cols = n if n_cols is None else n_cols
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}")
    elem = _DTYPE_BYTES[dtype]
    steps = [tuple(step[4]) for step in _window_steps(n, n_cols, d, dtype, with_image, with_text, with_params,
                                                       device)]
    launches: list[KernelLaunch] = []
    start = 0
    while start < len(steps):  # run-length merge of identical consecutive window pairs
        end = start
        while end < len(steps) and steps[end] == steps[start]:
            end += 1
        launches += [dataclasses.replace(launch, count=end - start) for launch in steps[start]]
        start = end
    with_grad = with_image or with_text or with_params
    products = int(with_image) + int(with_text)
    floor_flops = 2 * n * n_cols * d * (1 + products)
    grads_bytes = (n * d * elem if with_image else 0) + (n_cols * d * elem if with_text else 0)
    floor_bytes = (n + n_cols) * d * elem + grads_bytes
    rows, cols = min(WINDOW, n), min(WINDOW, n_cols)
    window_bytes = rows * cols * elem if with_grad else 0
    partial_bytes = 3 * triton.cdiv(cols, _SCORES_CONFIG[_config_key(dtype, device)]["BLOCK_N"]) * rows * 4
    accumulators = (n_cols * d * 4 if with_text else 0) + (rows * d * 4 if with_image else 0)
    notes = [f"G' windows of {rows} x {cols} ({window_bytes / 2**20:.0f} MiB), {len(steps)} windows",
             f"fp32 accumulators {accumulators / 2**20:.0f} MiB (text [N, d], image window [R, d])",
             "backward: only scales the saved gradients by the incoming gradient (no launch counted)"]
    shape = {"n": n, "d": d, "dtype": dtype, **({"n_cols": n_cols} if n_cols != n else {})}
    return OpPlan(op="sigmoid", shape=shape, mode="fwd_bwd", launches=launches, floor_flops=floor_flops,
                  floor_bytes=floor_bytes, peak_extra_bytes=window_bytes + partial_bytes + accumulators, notes=notes)


# ----------------------------------------------------------------------------------------------
# host launchers
# ----------------------------------------------------------------------------------------------


def _launch(kernel, grid: tuple[int, ...], args: tuple, config: dict, **constexprs) -> None:
    meta = {k: v for k, v in config.items() if k.startswith("BLOCK_")}
    if interpreter_enabled():
        kernel[grid](*args, **constexprs, **meta)
    else:
        kernel[grid](*args, **constexprs, **meta, num_warps=config["num_warps"], num_stages=config["num_stages"])


def _block_forward(x: torch.Tensor, y: torch.Tensor, scale_bias: torch.Tensor, x_ids: torch.Tensor | None,
                   y_ids: torch.Tensor | None, positives: int, positive_offset: int, norm: int,
                   with_x: bool, with_y: bool, with_params: bool = True):
    """Loss and gradients (at upstream 1) of one block: x ``[m, d]`` rows against y ``[N, d]`` columns.

    Returns ``(loss fp32 [], dx [m, d] or None, dy [N, d] or None, ds fp32 [], db fp32 [])``, all
    divided by ``norm`` (the local batch); dx, dy in the input dtype. Without ``with_params`` (and no
    side's gradient) G' is not formed and ds, db are 0.
    """
    x, y = x.contiguous(), y.contiguous()
    m, d = x.shape
    n_cols = y.shape[0]
    dtype = _DTYPE_NAMES[x.dtype]
    device = "interpreter" if interpreter_enabled() else "cuda"
    key = _config_key(dtype, device)
    scores_cfg, mm_cfg = _SCORES_CONFIG[key], _MATMUL_CONFIG[key]
    with_grad = with_x or with_y or with_params
    precision = dot_precision(x.dtype)
    f32 = {"device": x.device, "dtype": torch.float32}
    alpha = (scale_bias[:1] / norm).contiguous()  # s / n: dx = alpha G' y, dy = alpha G'^T x
    dx = torch.empty_like(x) if with_x else None
    dy_acc = torch.zeros((n_cols, d), **f32) if with_y else None
    steps = list(_window_steps(m, n_cols, d, dtype, with_x, with_y, with_params, device))
    totals = torch.empty((len(steps), 3), **f32)
    rows, cols = min(WINDOW, m), min(WINDOW, n_cols)
    g = torch.empty((rows, cols), device=x.device, dtype=x.dtype) if with_grad else totals
    dx_win = torch.empty((rows, d), **f32) if with_x else totals
    x_ids = x_ids if x_ids is not None else totals  # stand-in pointers are never read
    y_ids = y_ids if y_ids is not None else totals
    for i_step, (row0, win_rows, col0, win_cols, launches) in enumerate(steps):
        scores, *products = launches
        if with_x and col0 == 0:
            dx_win.zero_()
        part = torch.empty((3, scores.grid[1], win_rows), **f32)
        if not with_grad:
            part[1:].zero_()  # the kernel writes only the loss partials
        _launch(_sigmoid_scores_kernel, scores.grid,
                (x, y, scale_bias, x_ids, y_ids, g, part, row0, win_rows, col0, win_cols, d, x.stride(0),
                 y.stride(0), win_cols, positive_offset),
                scores_cfg, POSITIVES=positives, WRITE_G=with_grad, PRECISION=precision)
        totals[i_step] = part.sum(dim=(1, 2))
        for launch in products:
            if launch.config["side"] == "image":  # dx_win += alpha G' y[cols] ([R, C] x [C, d])
                args = (g, y[col0:col0 + win_cols], dx_win, alpha, win_rows, d, win_cols,
                        win_cols, 1, y.stride(0), 1, dx_win.stride(0))
            else:  # dy_acc[cols] += alpha G'^T x[rows] ([C, R] x [R, d])
                args = (g, x[row0:row0 + win_rows], dy_acc[col0:col0 + win_cols], alpha, win_cols, d, win_rows,
                        1, win_cols, x.stride(0), 1, dy_acc.stride(0))
            _launch(_window_matmul_kernel, launch.grid, args, mm_cfg, PRECISION=precision)
        if with_x and col0 + win_cols == n_cols:  # this row window is complete: one rounding
            dx[row0:row0 + win_rows] = dx_win[:win_rows]
    loss, sum_gx, sum_g = (totals.sum(0) / norm).unbind(0)
    dy = dy_acc.to(y.dtype) if with_y else None
    return loss, dx, dy, sum_gx, sum_g


def _scale_bias_vector(logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
    """(s, b) as an fp32 ``[2]`` device tensor (read by the kernels: no host sync)."""
    return torch.cat([logit_scale.detach().reshape(1), logit_bias.detach().reshape(1)]).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# custom op + autograd
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("vlmcore::sigmoid_contrastive_loss", mutates_args=())
def _sigmoid_op(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
    image_ids: torch.Tensor | None, text_ids: torch.Tensor | None, positives: int, positive_offset: int,
    norm: int, with_image: bool, with_text: bool, with_params: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of image ``[m, d]`` rows against text ``[N, d]`` columns and its gradients at upstream 1.

    Returns ``(loss fp32 [], d_image [m, d] or [0], d_text [N, d] or [0], d_scale fp32 [], d_bias fp32 [])``.
    """
    loss, dx, dy, ds, db = _block_forward(image, text, _scale_bias_vector(logit_scale, logit_bias), image_ids,
                                          text_ids, positives, positive_offset, norm, with_image, with_text,
                                          with_params)
    return (loss, dx if with_image else image.new_empty(0), dy if with_text else text.new_empty(0),
            ds.clone(), db.clone())


@_sigmoid_op.register_fake
def _(image, text, logit_scale, logit_bias, image_ids, text_ids, positives, positive_offset, norm,
      with_image, with_text, with_params):
    f32 = torch.float32
    return (image.new_empty((), dtype=f32), torch.empty_like(image) if with_image else image.new_empty(0),
            torch.empty_like(text) if with_text else text.new_empty(0),
            image.new_empty((), dtype=f32), image.new_empty((), dtype=f32))


def _setup_context(ctx, inputs, output):
    _, d_image, d_text, d_scale, d_bias = output
    ctx.mark_non_differentiable(d_image, d_text, d_scale, d_bias)
    ctx.save_for_backward(d_image, d_text, d_scale, d_bias)
    ctx.scale_meta = (inputs[2].dtype, inputs[2].shape, inputs[3].dtype, inputs[3].shape)
    ctx.formed = inputs[9:12]  # (with_image, with_text, with_params) the forward was told


def _backward(ctx, grad_loss, *unused):
    d_image, d_text, d_scale, d_bias = ctx.saved_tensors
    need_image, need_text, need_scale, need_bias = ctx.needs_input_grad[:4]
    scale_dtype, scale_shape, bias_dtype, bias_shape = ctx.scale_meta
    grad = grad_loss.reshape(())
    for needed, formed, name in zip((need_image, need_text, need_scale or need_bias), ctx.formed,
                                    ("image", "text", "logit scale / bias")):
        if needed and not formed:
            raise RuntimeError(f"a {name} gradient was requested but the forward was told none is needed; "
                               "set requires_grad before calling the loss")
    # gradients were formed for an upstream of 1; a loss of 1 (or a power-of-2 loss scale) is exact
    return (d_image * grad if need_image else None, d_text * grad if need_text else None,
            (d_scale * grad).reshape(scale_shape).to(scale_dtype) if need_scale else None,
            (d_bias * grad).reshape(bias_shape).to(bias_dtype) if need_bias else None,
            None, None, None, None, None, None, None, None)


_sigmoid_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# distributed: the ring (text blocks travel, exchange overlapped with scoring)
# ----------------------------------------------------------------------------------------------


def _triton_block(x, y, scale_bias, x_ids, y_ids, positives, positive_offset, norm, with_x, with_y, with_params):
    """One block through the Triton launchers (see :func:`_block_forward`)."""
    return _block_forward(x, y, scale_bias, x_ids, y_ids, positives, positive_offset, norm, with_x, with_y,
                          with_params)


def _reference_block(x, y, scale_bias, x_ids, y_ids, positives, positive_offset, norm, with_x, with_y, with_params):
    """One block through the reference (materialized logits) and autograd, same returns as the kernels'."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(with_x)
        yr = y.detach().requires_grad_(with_y)
        sb = scale_bias.detach().clone().requires_grad_()
        loss = sigmoid_contrastive_loss_reference(
            xr, yr, sb[0], sb[1], image_group_ids=x_ids if positives == POSITIVES_IDS else None,
            text_group_ids=y_ids if positives == POSITIVES_IDS else None, positive_offset=positive_offset,
            negatives_only=positives == POSITIVES_NONE, normalizer=norm)
        wanted = [t for t, need in ((xr, with_x), (yr, with_y)) if need] + [sb]
        grads = list(torch.autograd.grad(loss, wanted))
    dx = grads.pop(0) if with_x else None
    dy = grads.pop(0) if with_y else None
    d_sb = grads.pop(0)
    return loss.detach(), dx, dy, d_sb[0], d_sb[1]


def _exchange(tensors: list[torch.Tensor], send_to: int, recv_from: int, group) -> tuple[list, list]:
    """Post isend of ``tensors`` to ``send_to`` and irecv of same-shaped buffers from ``recv_from``."""
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, send_to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, recv_from, group) for r in received]
    return received, dist.batch_isend_irecv(ops)


class _SigmoidRing(torch.autograd.Function):
    """OpenCLIP's distributed SigLIP loss on this rank, text blocks passed around a ring.

    Step k (0 .. W-1) scores the local images against the text block of rank ``r - k``: with
    positives at step 0 (or, with group ids, wherever ids are equal), negatives only otherwise. The
    exchange for step k + 1 is posted (isend/irecv) BEFORE step k is scored, so the transfer overlaps
    the compute. Each step forms its gradients at once (the loss is a scalar): image gradients sum
    locally in fp32; the text-gradient partial of a remote block is kept, and in backward, scaled by
    this rank's incoming gradient, travels back the other way around the ring, each rank adding its
    partial to the fp32 buffer of that block on its way home (fixed order: deterministic).
    """

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, image_ids, text_ids, group, with_image, with_text,
                with_params, block_fn):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        right, left = ranks[(rank + 1) % world], ranks[(rank - 1) % world]
        scale_bias = _scale_bias_vector(logit_scale, logit_bias)
        norm = image.shape[0]
        has_ids = image_ids is not None
        current = [text.contiguous()] + ([text_ids] if has_ids else [])
        d_image = torch.zeros(image.shape, device=image.device, dtype=torch.float32) if with_image else None
        losses, d_scales, d_biases, d_text_parts = [], [], [], []
        for step in range(world):
            pending = None
            if step < world - 1:  # post the next block's transfer before scoring this one
                received, pending = _exchange(current, right, left, group)
            positives = POSITIVES_IDS if has_ids else (POSITIVES_DIAGONAL if step == 0 else POSITIVES_NONE)
            loss, dx, dy, ds, db = block_fn(image, current[0], scale_bias, image_ids,
                                            current[1] if has_ids else None, positives, 0, norm, with_image,
                                            with_text, with_params)
            losses.append(loss)
            d_scales.append(ds)
            d_biases.append(db)
            if with_image:
                d_image += dx.float()
            if with_text:
                d_text_parts.append(dy)
            if pending is not None:
                for request in pending:
                    request.wait()
                current = received
        ctx.group, ctx.right, ctx.left, ctx.world = group, right, left, world
        ctx.with_image, ctx.with_text = with_image, with_text
        ctx.scale_meta = (logit_scale.dtype, logit_scale.shape, logit_bias.dtype, logit_bias.shape)
        ctx.text_dtype = text.dtype
        saved = [d_image.to(image.dtype) if with_image else image.new_empty(0), torch.stack(d_scales).sum(),
                 torch.stack(d_biases).sum()] + d_text_parts
        ctx.save_for_backward(*saved)
        return torch.stack(losses).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        d_image, d_scale, d_bias, *d_text_parts = ctx.saved_tensors
        scale_dtype, scale_shape, bias_dtype, bias_shape = ctx.scale_meta
        grad = grad_loss.reshape(())
        d_text = None
        if ctx.with_text:
            # d_text_parts[k] belongs to the text block of rank r - k. The buffer of block q starts at
            # rank q - 1 (k = W - 1) and moves left, each rank adding its partial, until it reaches q.
            buffer = None
            for k in range(ctx.world - 1, 0, -1):
                part = d_text_parts[k].float() * grad
                buffer = part if buffer is None else buffer + part
                (buffer,), requests = _exchange([buffer], ctx.left, ctx.right, ctx.group)
                for request in requests:
                    request.wait()
            d_text = d_text_parts[0].float() * grad
            if buffer is not None:
                d_text = d_text + buffer
            d_text = d_text.to(ctx.text_dtype)
        return (d_image * grad if ctx.with_image else None, d_text,
                (d_scale * grad).reshape(scale_shape).to(scale_dtype),
                (d_bias * grad).reshape(bias_shape).to(bias_dtype), None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# public op (validation, distributed strategies, dispatch)
# ----------------------------------------------------------------------------------------------


def _check_ids(name: str, ids: object, rows: int, features: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != rows:
        raise ValueError(f"{name} must have shape [{rows}] (one id per feature row), got {tuple(ids.shape)}")
    if ids.device != features.device:
        raise ValueError(f"{name} is on {ids.device} but image_features is on {features.device}")
    return ids.to(torch.int64).contiguous()


def _validate(image, text, logit_scale, logit_bias, image_ids, text_ids, group, dist_impl, negatives_only):
    check_float_tensor("image_features", image, 2)
    check_float_tensor("text_features", text, 2)
    check_same("text_features", text, "image_features", image)
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"image_features {tuple(image.shape)} and text_features {tuple(text.shape)} must have "
                         "the same feature width d")
    if image.shape[0] == 0 or text.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image_features {tuple(image.shape)} and text_features {tuple(text.shape)} must be "
                         "non-empty [n, d] batches")
    check_scalar("logit_scale", logit_scale, image)
    check_scalar("logit_bias", logit_bias, image)
    if (image_ids is None) != (text_ids is None):
        raise ValueError("image_group_ids and text_group_ids must be given together (pairs with equal ids "
                         "are the positives)")
    if image_ids is not None:
        image_ids = _check_ids("image_group_ids", image_ids, image.shape[0], image)
        text_ids = _check_ids("text_group_ids", text_ids, text.shape[0], image)
    elif image.shape[0] != text.shape[0]:
        raise ValueError(f"image_features {tuple(image.shape)} and text_features {tuple(text.shape)} must have "
                         "the same number of rows (row i of each is a pair) unless group ids are given")
    if not isinstance(negatives_only, bool):
        raise TypeError(f"negatives_only must be a bool, got {type(negatives_only).__name__}")
    if negatives_only and image_ids is not None:
        raise ValueError("negatives_only=True scores a block with no positives; it takes no group ids")
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"dist_impl must be one of {DIST_IMPLS}, got {dist_impl!r}")
    if group is not None:
        if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
        if not dist.is_initialized():
            raise ValueError("group was given but torch.distributed is not initialized")
        if negatives_only:
            raise ValueError("negatives_only=True is a single-block option; it cannot be combined with group")
    return image_ids, text_ids


def sigmoid_contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    image_group_ids: torch.Tensor | None = None,
    text_group_ids: torch.Tensor | None = None,
    group=None,
    dist_impl: str = "ring",
    negatives_only: bool = False,
    output_dict: bool = False,
):
    """SigLIP pairwise sigmoid loss ``-(1/n) sum_ij log sigmoid(z_ij (s x_i.y_j + b))``.

    Equal in value and in the gradients of all four inputs to OpenCLIP's ``SigLipLoss`` in one process;
    with ``group`` set, to ``SigLipLoss(rank=r, world_size=W)`` on rank r (its ``bidir``/``shift``
    exchange and its ``gather`` implementation give the same numbers): local images against every
    rank's text, positives in the local block only, divided by the LOCAL batch n. Summed over ranks
    this is W times the one-process loss on the concatenated batch, so DDP's averaged gradients equal
    that one-process loss's gradients.

    Args:
        image_features: ``[n, d]`` x, fp32/fp16/bf16, normalized by the caller.
        text_features: ``[n, d]`` y (``[N, d]`` with group ids), same dtype and device.
        logit_scale: 0-dim s (already exponentiated, as OpenCLIP passes ``logit_scale.exp()``).
        logit_bias: 0-dim b.
        image_group_ids, text_group_ids: optional integer ``[n]`` / ``[N]``; pairs with equal ids are
            positives (several captions per image: SigLIP+). Ids are compared across ranks too
            (use dataset-wide ids). All-unique matching ids give the plain loss.
        group: a ``torch.distributed`` process group (or ``dist.group.WORLD``); None = one process.
        dist_impl: ``"ring"`` (text blocks travel rank to rank with isend/irecv overlapped with the
            scoring; text-gradient partials travel back in backward) or ``"gather"`` (one
            differentiable all-gather of the text, then one block against all of it).
        negatives_only: one process only: no positive pair (a block of another rank's text).
        output_dict: return ``{"loss": loss}`` (OpenCLIP's key is ``contrastive_loss``).

    Returns:
        fp32 scalar loss (or the dict).

    Backend (``vlmcore.kernels.backend``): the Triton kernels (module docstring) for CUDA tensors or
    when forced: never the logits, bit-reproducible, gradients formed in the forward; otherwise
    :func:`~vlmcore.kernels.reference.sigmoid_contrastive_loss_reference` (materialized fp32 logits).
    bf16 under the Triton backend on CPU is refused (the interpreter gets bf16 products wrong).

    Example::

        loss = sigmoid_contrastive_loss(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), t.exp(), b)
    """
    image_ids, text_ids = _validate(image_features, text_features, logit_scale, logit_bias, image_group_ids,
                                    text_group_ids, group, dist_impl, negatives_only)
    triton_path = use_triton(image_features)
    if triton_path and image_features.device.type == "cpu" and image_features.dtype == torch.bfloat16:
        raise TypeError("image_features is bfloat16 on CPU: the Triton interpreter computes bfloat16 dots "
                        "wrongly; use float32 / float16 on CPU, or CUDA tensors")
    grad_on = torch.is_grad_enabled()
    with_image = grad_on and image_features.requires_grad
    with_text = grad_on and text_features.requires_grad
    with_params = grad_on and (logit_scale.requires_grad or logit_bias.requires_grad)
    n = image_features.shape[0]
    if group is not None and dist_impl == "ring":
        block_fn = _triton_block if triton_path else _reference_block
        loss = _SigmoidRing.apply(image_features, text_features, logit_scale, logit_bias, image_ids, text_ids,
                                  group, with_image, with_text, with_params, block_fn)
        return {"loss": loss} if output_dict else loss
    positive_offset = 0
    if group is not None:  # gather
        if image_ids is None:
            positive_offset = dist.get_rank(group) * n
        else:
            text_ids = all_gather_no_grad(text_ids, group)
        text_features = all_gather_with_grad(text_features, group)
        with_text = grad_on and text_features.requires_grad
    if negatives_only:
        positives = POSITIVES_NONE
    else:
        positives = POSITIVES_DIAGONAL if image_ids is None else POSITIVES_IDS
    if triton_path:
        loss = _sigmoid_op(image_features, text_features, logit_scale, logit_bias, image_ids, text_ids, positives,
                           positive_offset, n, with_image, with_text, with_params)[0]
    else:
        loss = sigmoid_contrastive_loss_reference(
            image_features, text_features, logit_scale, logit_bias, image_group_ids=image_ids,
            text_group_ids=text_ids, positive_offset=positive_offset, negatives_only=negatives_only, normalizer=n)
    return {"loss": loss} if output_dict else loss
