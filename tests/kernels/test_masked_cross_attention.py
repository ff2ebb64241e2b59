"""Masked per-image cross-attention: the block-sparse Triton kernels vs the plain-PyTorch reference.

Tensors live on the ``device`` fixture: CUDA when present (the compiled kernels, fp32, fp16 and
bf16), else CPU, where the kernels run in the Triton interpreter (fp32 and fp16; bf16 is wrong
there). The reference runs on fp32 copies on the same device. Outputs AND gradients of q, k, v are
compared in both modes.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
from helpers.numerics import assert_close, count_interpreter_dots, run_sm90_compile_check, tolerance
from vlmcore.kernels import masked_cross_attention, media_index_from_locations
from vlmcore.kernels.reference import masked_cross_attention_reference

from vlmcore import kernels

# The module itself (the package attribute of the same name is the public function).
mxa = importlib.import_module("vlmcore.kernels.masked_cross_attention")
MODES = ("immediate", "all_previous")
# bf16 only where the kernels are compiled: the interpreter computes bf16 wrong.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def make_media_index(length: int, images: list[int], first_at: list[int] | None, device: torch.device) -> torch.Tensor:
    """int64 ``[B, L]`` from random image positions: sample b has ``images[b]`` images, none before ``first_at[b]``."""
    first_at = first_at or [0] * len(images)
    locations = torch.zeros(len(images), length, dtype=torch.bool, device=device)
    for b, (count, start) in enumerate(zip(images, first_at)):
        positions = torch.randperm(length - start, device=device)[:count] + start
        locations[b, positions] = True
    return media_index_from_locations(locations)


def make_qkv(batch, length, heads, head_dim, num_media, r, dtype, device):
    q = torch.randn(batch, length, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(batch, num_media * r, heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(batch, num_media * r, heads, head_dim, dtype=dtype, device=device)
    return q, k, v


def run_kernel(q, k, v, media_index, r, mode, grad_out, **kwargs):
    """Triton forward + backward: ``(out, dq, dk, dv)``."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with kernels.backend("triton"):
        out = masked_cross_attention(q, k, v, media_index, r, mode=mode, **kwargs)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def run_reference(q, k, v, media_index, r, mode, grad_out, upcast=True, **kwargs):
    """Reference forward + backward (on fp32 copies unless ``upcast=False``): ``(out, dq, dk, dv)``."""
    dtype = torch.float32 if upcast else q.dtype
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = masked_cross_attention_reference(q, k, v, media_index, r, mode=mode, **kwargs)
    out.backward(grad_out.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


def check_against_reference(q, k, v, media_index, r, mode, **kwargs):
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    got = run_kernel(q, k, v, media_index, r, mode, grad_out, **kwargs)
    want = run_reference(q, k, v, media_index, r, mode, grad_out, **kwargs)
    dtype = q.dtype
    assert got[0].dtype == dtype
    assert_close(got[0], want[0], dtype=dtype, name="out")
    for name, g, w in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        assert_close(g, w, dtype=dtype, grad=True, name=name)
    return got


# ------------------------------------------------------------------------------------------------
# correctness vs the reference
# ------------------------------------------------------------------------------------------------

# name: (B, L, H, Dh, M, R, images per sample, first image position per sample, dtype)
CASES = {
    "text_before_first_image": (2, 45, 2, 32, 3, 5, [3, 2], [12, 30], torch.float32),
    "one_image": (2, 40, 2, 64, 1, 64, [1, 1], [0, 9], torch.float32),
    "six_images_fewer_in_one_sample": (2, 67, 2, 64, 6, 17, [6, 3], [0, 5], torch.float16),
    "thirty_three_images": (1, 90, 1, 32, 33, 3, [33], [2], torch.float32),
    "all_text": (2, 33, 2, 32, 2, 5, [0, 0], [0, 0], torch.float32),
    "one_sample_without_images": (2, 40, 2, 32, 3, 5, [3, 0], [5, 0], torch.float16),
    "odd_l_and_r": (3, 29, 1, 32, 4, 7, [4, 1, 2], [3, 0, 11], torch.float16),
    "r_one": (1, 35, 2, 32, 20, 1, [20], [0], torch.float32),
}


# Each case in its own dtype; where bf16 is tested (CUDA), each case in bf16 as well.
CASE_PARAMS = [pytest.param(case, CASES[case][-1], id=case) for case in CASES]
if torch.bfloat16 in DTYPES:
    CASE_PARAMS += [pytest.param(case, torch.bfloat16, id=f"{case}-bf16") for case in CASES]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case, dtype", CASE_PARAMS)
def test_matches_reference(case, dtype, mode, device, nan_poisoned_empty):
    batch, length, heads, head_dim, num_media, r, images, first_at, _ = CASES[case]
    media_index = make_media_index(length, images, first_at, device)
    q, k, v = make_qkv(batch, length, heads, head_dim, num_media, r, dtype, device)
    out, dq, _, _ = check_against_reference(q, k, v, media_index, r, mode)
    # Rows that attend nothing: exactly zero output and gradient.
    empty = media_index < 0
    assert torch.all(out[empty] == 0) and torch.all(dq[empty] == 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_head_dims(head_dim, dtype, mode, device, nan_poisoned_empty):
    media_index = make_media_index(37, [3, 2], [4, 0], device)
    q, k, v = make_qkv(2, 37, 2, head_dim, 3, 17, dtype, device)
    check_against_reference(q, k, v, media_index, 17, mode)


@pytest.mark.parametrize("head_dim", [8, 256])
def test_unusual_head_dims(head_dim, device):
    """Below the 16-wide tl.dot minimum (padded) and the widest the kernels take."""
    media_index = make_media_index(21, [2], [2], device)
    q, k, v = make_qkv(1, 21, 1, head_dim, 2, 5, torch.float32, device)
    check_against_reference(q, k, v, media_index, 5, "immediate")


@pytest.mark.parametrize("mode", MODES)
def test_softmax_scale(mode, device):
    media_index = make_media_index(30, [2], [3], device)
    q, k, v = make_qkv(1, 30, 2, 32, 2, 5, torch.float32, device)
    check_against_reference(q, k, v, media_index, 5, mode, softmax_scale=0.37)


@pytest.mark.parametrize(
    "block_m, block_n", [(16, 64), (64, 16), (16, 16)], ids=["bm16-bn64", "bm64-bn16", "bm16-bn16"]
)
@pytest.mark.parametrize("mode", MODES)
def test_other_tile_sizes(block_m, block_n, mode, monkeypatch, device):
    """The kernels are tile-size generic (CUDA autotunes over several); check other tiles here.

    With a single config the autotuner launches it directly (no tuning, no cached choice), on CUDA too."""
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4, num_stages=1)
    for tuned in (mxa._fwd_kernel, mxa._dq_kernel, mxa._kv_kernel):
        monkeypatch.setattr(tuned, "configs", [config])
    media_index = make_media_index(53, [5, 2], [6, 0], device)
    q, k, v = make_qkv(2, 53, 1, 32, 5, 9, torch.float32, device)
    check_against_reference(q, k, v, media_index, 9, mode)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_views(mode, device):
    """q, k, v as views of projection outputs (no copy), a head-major transpose, and stride_d != 1."""
    batch, length, heads, head_dim, num_media, r = 2, 31, 2, 32, 3, 5
    qkv = torch.randn(batch, length, 3 * heads * head_dim, device=device)
    q = qkv[..., : heads * head_dim].view(batch, length, heads, head_dim)
    kv = torch.randn(batch, num_media * r, 2 * heads * head_dim, device=device)
    k = kv[..., : heads * head_dim].view(batch, num_media * r, heads, head_dim)
    v = kv[..., heads * head_dim :].view(batch, num_media * r, heads, head_dim)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    media_index = make_media_index(length, [3, 2], [2, 7], device)
    check_against_reference(q, k, v, media_index, r, mode)

    q_t = torch.randn(batch, heads, length, head_dim, device=device).transpose(1, 2)
    k_t = torch.randn(batch, num_media * r, heads, 2 * head_dim, device=device)[..., ::2]
    v_t = torch.randn(batch, heads, num_media * r, head_dim, device=device).transpose(1, 2)
    check_against_reference(q_t, k_t, v_t, media_index, r, mode)


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_and_expanded_grad_out(mode, device):
    """Backward reads grad_out through its strides (stride-0 from .sum(), or a transposed view)."""
    media_index = make_media_index(29, [2], [3], device)
    q, k, v = make_qkv(1, 29, 2, 32, 2, 5, torch.float32, device)
    weight = torch.randn(1, 2, 29, 32, device=device).transpose(1, 2)  # grad_out = this non-contiguous view
    for reduce in (lambda o: o.sum(), lambda o: (o * weight).sum()):
        grads = []
        for use_kernel in (True, False):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            with kernels.backend("triton" if use_kernel else "reference"):
                reduce(masked_cross_attention(*leaves, media_index, 5, mode=mode)).backward()
            grads.append([t.grad for t in leaves])
        for name, g, w in zip(("dq", "dk", "dv"), *grads):
            assert_close(g, w, grad=True, name=name)


@pytest.mark.parametrize("mode", MODES)
def test_out_of_range_indices_select_nothing_and_stay_in_bounds(mode, device):
    """Indices >= M or < -1 attend nothing; k/v rows outside the tensors (NaN here) are never read."""
    batch, length, heads, head_dim, num_media, r = 2, 40, 2, 32, 3, 5
    rows = num_media * r
    # k and v live in the middle of NaN-filled buffers: any read outside them poisons the result.
    k_buf = torch.full((batch, rows + 2 * r, heads, head_dim), float("nan"), device=device)
    v_buf = torch.full((batch, rows + 2 * r, heads, head_dim), float("nan"), device=device)
    k_buf[:, r : r + rows] = torch.randn(batch, rows, heads, head_dim, device=device)
    v_buf[:, r : r + rows] = torch.randn(batch, rows, heads, head_dim, device=device)
    k, v = k_buf[:, r : r + rows], v_buf[:, r : r + rows]
    q = torch.randn(batch, length, heads, head_dim, device=device)
    media_index = make_media_index(length, [3, 3], [0, 4], device)
    bad = torch.tensor([num_media, num_media + 7, -2, -(2**40), 2**40, 2**32 + 1], device=device)
    positions = torch.randperm(length, device=device)[: bad.numel()]
    media_index[0, positions] = bad
    media_index[1, :5] = num_media
    out, dq, dk, dv = check_against_reference(q, k, v, media_index, r, mode)
    assert torch.all(out[0, positions] == 0) and torch.all(dq[0, positions] == 0)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("mode", MODES)
def test_non_monotone_media_index(mode, device):
    batch, length, num_media, r = 2, 47, 5, 7
    media_index = torch.randint(-1, num_media, (batch, length), device=device)
    q, k, v = make_qkv(batch, length, 2, 32, num_media, r, torch.float32, device)
    check_against_reference(q, k, v, media_index.to(torch.int32), r, mode)


def test_cached_media_index(device, nan_poisoned_empty):
    """Generation with cached media: every token attends the last image."""
    locations = torch.zeros(2, 26, dtype=torch.bool, device=device)
    locations[0, [3, 9]] = True
    locations[1, 20] = True
    media_index = media_index_from_locations(locations, use_cached_media=True)
    q, k, v = make_qkv(2, 26, 2, 32, 2, 5, torch.float16, device)
    check_against_reference(q, k, v, media_index, 5, "immediate")


def test_no_media_rows(device):
    """M = 0 (k and v have no rows): everything attends nothing."""
    q = torch.randn(2, 9, 2, 32, device=device, requires_grad=True)
    k = torch.randn(2, 0, 2, 32, device=device, requires_grad=True)
    v = torch.randn(2, 0, 2, 32, device=device, requires_grad=True)
    media_index = torch.full((2, 9), -1, device=device)
    with kernels.backend("triton"):
        out = masked_cross_attention(q, k, v, media_index, 4)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(q.grad, torch.zeros_like(q)) and k.grad.shape == k.shape


@pytest.mark.parametrize("mode", MODES)
def test_deterministic(mode, device):
    media_index = make_media_index(61, [6, 4], [0, 10], device)
    q, k, v = make_qkv(2, 61, 2, 32, 6, 9, torch.float16, device)
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=device)
    first = run_kernel(q, k, v, media_index, 9, mode, grad_out)
    second = run_kernel(q, k, v, media_index, 9, mode, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_media_spans(device):
    """The span-table kernel: first / last referencing position per image, then the monotone flag."""
    media_index = torch.tensor([[-1, 0, 0, 2, 2, 7], [1, 1, -1, 0, -5, 1], [-1, -1, 0, 1, 1, 9]], device=device)
    spans = mxa._media_spans(media_index, 3, immediate=True)
    # Index 7 / 9 / -5 are out of range: clamped to -1, which breaks monotonicity in rows 0 and 2.
    assert spans.tolist() == [[1, 6, 3, 2, -1, 4, 0], [3, 0, 6, 3, 5, -1, 0], [2, 3, 6, 2, 4, -1, 0]]
    assert torch.equal(spans, mxa.media_spans_reference(media_index, 3, immediate=True))
    spans = mxa._media_spans(media_index, 3, immediate=False)
    assert spans[:, :6].tolist() == [[1, 3, 3, 4, 4, 4], [0, 0, 6, 5, 5, -1], [2, 3, 6, 4, 4, -1]]
    assert torch.equal(spans[:, :6], mxa.media_spans_reference(media_index, 3, immediate=False)[:, :6])
    monotone = torch.tensor([[-1, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 0], [-1, -1, -1, -1, -1, -1]], device=device)
    assert mxa._media_spans(monotone, 3, immediate=True)[:, -1].tolist() == [1, 1, 1]
    # More images than one span program holds (32) and more text than one chunk (128).
    long_index = make_media_index(300, [40, 3], [0, 100], device)
    long_index[1, 250] = 0  # one descent
    assert torch.equal(mxa._media_spans(long_index, 41, immediate=True),
                       mxa.media_spans_reference(long_index, 41, immediate=True))


# ------------------------------------------------------------------------------------------------
# dispatch, torch.library, torch.compile
# ------------------------------------------------------------------------------------------------


def test_dispatch(monkeypatch, device):
    calls = []
    real_forward = mxa._forward
    monkeypatch.setattr(mxa, "_forward", lambda *a: calls.append(1) or real_forward(*a))
    media_index = make_media_index(20, [2], [0], device)
    q, k, v = make_qkv(1, 20, 1, 32, 2, 4, torch.float32, device)
    masked_cross_attention(q.cpu(), k.cpu(), v.cpu(), media_index.cpu(), 4)  # auto on CPU tensors: the reference
    assert calls == []
    if device.type == "cuda":
        masked_cross_attention(q, k, v, media_index, 4)  # auto on CUDA tensors: the kernel
        assert calls == [1]
        calls.clear()
    with kernels.backend("triton"):
        masked_cross_attention(q, k, v, media_index, 4)
        assert calls == [1]
        big = torch.randn(1, 20, 1, mxa.MAX_KERNEL_HEAD_DIM + 8, device=device)
        kb = torch.randn(1, 8, 1, mxa.MAX_KERNEL_HEAD_DIM + 8, device=device)
        out = masked_cross_attention(big, kb, kb, media_index, 4)  # too wide for the kernel: reference
        assert calls == [1]
    assert_close(out, masked_cross_attention_reference(big, kb, kb, media_index, 4))


def test_opcheck(device):
    media_index = make_media_index(21, [2], [3], device)
    q, k, v = make_qkv(1, 21, 1, 32, 2, 5, torch.float32, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(
        torch.ops.vlmcore.masked_cross_attention_fwd.default, (q, k, v, media_index, 5, "immediate", 0.2)
    )
    out, lse = torch.ops.vlmcore.masked_cross_attention_fwd(q, k, v, media_index, 5, "all_previous", 0.2)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.vlmcore.masked_cross_attention_bwd.default,
        (grad_out, q.detach(), k.detach(), v.detach(), media_index, out.detach(), lse, 5, "all_previous", 0.2),
    )


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile(compile_backend, device):
    """The op traces with fullgraph (fake + autograd registrations); the public function compiles too
    (with a graph break at the backend switch, whose ContextVar dynamo does not trace)."""
    media_index = make_media_index(25, [2], [1], device)
    q, k, v = make_qkv(1, 25, 2, 32, 2, 5, torch.float32, device)

    def op_only(q, k, v, media_index):
        out, _ = torch.ops.vlmcore.masked_cross_attention_fwd(q * 2.0, k, v, media_index, 5, "immediate", 0.3)
        return out.square().sum()

    def public(q, k, v, media_index):
        return masked_cross_attention(q * 2.0, k, v, media_index, 5, softmax_scale=0.3).square().sum()

    def loss_and_grads(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with kernels.backend("triton"):
            loss = fn(*leaves, media_index)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    eager = loss_and_grads(public)
    for compiled in (torch.compile(op_only, backend=compile_backend, fullgraph=True),
                     torch.compile(public, backend=compile_backend)):
        for a, b in zip(loss_and_grads(compiled), eager):
            assert torch.equal(a, b)


def test_cuda_autotune_space():
    """The CUDA configs: power-of-two tiles >= 16 (tl.dot), and the pruner keeps some but drops oversize ones;
    with ONE_PASS the kv pruner keeps only key tiles that hold a whole image."""
    for name, tuned in (("fwd", mxa._fwd_kernel), ("kv", mxa._kv_kernel)):
        configs = mxa._CUDA_CONFIGS[name]
        for config in configs:
            for tile in (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]):
                assert tile >= 16 and tile & (tile - 1) == 0
        for dtype, block_d in ((torch.bfloat16, 32), (torch.bfloat16, 128), (torch.float32, 128)):
            args = {"q_ptr": torch.empty(0, dtype=dtype), "R": 64}
            kept = tuned.early_config_prune(configs, args, BLOCK_D=block_d, ONE_PASS=False)
            assert 0 < len(kept) <= len(configs)
        kept = tuned.early_config_prune(configs, {"q_ptr": torch.empty(0, dtype=torch.float32), "R": 64},
                                        BLOCK_D=256, ONE_PASS=False)
        assert len(kept) < len(configs)
    args = {"q_ptr": torch.empty(0, dtype=torch.bfloat16), "R": 100}
    kept = mxa._kv_kernel.early_config_prune(mxa._CUDA_CONFIGS["kv"], args, BLOCK_D=64, ONE_PASS=True)
    assert kept and all(c.kwargs["BLOCK_N"] >= 100 for c in kept)
    assert mxa._one_pass("immediate", 128, mxa._CUDA_CONFIGS["kv"])
    assert not mxa._one_pass("immediate", 129, mxa._CUDA_CONFIGS["kv"])
    assert not mxa._one_pass("all_previous", 64, mxa._CUDA_CONFIGS["kv"])


def test_kernels_compile_for_sm90():
    """Without a GPU: the real compiler lowers the bf16 kernels to sm_90a cubins; no preferred config
    and no checked heaviest kv config spills; registers and CTAs per SM are reported (the plan
    prints them); tensor-core instructions are used."""
    rows = run_sm90_compile_check("masked_compile_check.py", timeout=900)
    assert {(r["kernel"], r["head_dim"], r["one_pass"]) for r in rows if r["preferred"]} == {
        (kernel, head_dim, one_pass) for head_dim in (64, 128)
        for kernel, one_pass in (("fwd", False), ("dq", True), ("kv", True), ("kv", False))}
    for row in rows:
        assert row["spill_bytes"] == 0, row
        assert 0 < row["registers"] <= 255 and row["ctas_per_sm"] >= 1, row
        assert row["shared"] <= 227 * 1024 and row["wgmma"] + row["mma"] > 0, row


# ------------------------------------------------------------------------------------------------
# validation and media_index_from_locations
# ------------------------------------------------------------------------------------------------


def _good(device):
    q, k, v = make_qkv(2, 8, 2, 16, 2, 3, torch.float32, device)
    return q, k, v, torch.zeros(2, 8, dtype=torch.long, device=device)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must be 4-D"),
        (lambda a: {**a, "k": a["k"].half()}, TypeError, "k has dtype"),
        (lambda a: {**a, "v": a["v"][:, :3]}, ValueError, "k and v"),
        (lambda a: {**a, "q": a["q"].long()}, TypeError, "q must be float"),
        (lambda a: {**a, "k": a["k"][:, :, :1], "v": a["v"][:, :, :1]}, ValueError, "k must be"),
        (lambda a: {**a, "k": a["k"][:, :5], "v": a["v"][:, :5]}, ValueError, "tokens_per_media"),
        (lambda a: {**a, "tokens_per_media": 0}, ValueError, "tokens_per_media"),
        (lambda a: {**a, "tokens_per_media": True}, ValueError, "tokens_per_media"),
        (lambda a: {**a, "media_index": a["media_index"].float()}, TypeError, "media_index"),
        (lambda a: {**a, "media_index": a["media_index"].bool()}, TypeError, "media_index"),
        (lambda a: {**a, "media_index": a["media_index"][:, :5]}, ValueError, "media_index"),
        (lambda a: {**a, "mode": "causal"}, ValueError, "mode"),
        (lambda a: {**a, "softmax_scale": -1.0}, ValueError, "softmax_scale"),
    ],
)
def test_bad_inputs(change, error, match, device):
    q, k, v, media_index = _good(device)
    args = change(dict(q=q, k=k, v=v, media_index=media_index, tokens_per_media=3, mode="immediate",
                       softmax_scale=None))
    for name in ("triton", "reference"):
        with kernels.backend(name), pytest.raises(error, match=match):
            masked_cross_attention(args["q"], args["k"], args["v"], args["media_index"], args["tokens_per_media"],
                                   mode=args["mode"], softmax_scale=args["softmax_scale"])


def test_media_index_from_locations(device):
    locations = torch.tensor([[0, 1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 1]], dtype=torch.bool,
                             device=device)
    assert media_index_from_locations(locations).tolist() == [
        [-1, 0, 0, 0, 1, 2, 2],
        [-1, -1, -1, -1, -1, -1, -1],
        [0, 0, 0, 0, 0, 0, 1],
    ]
    cached = media_index_from_locations(locations, use_cached_media=True)
    assert cached.tolist() == [[2] * 7, [-1] * 7, [1] * 7]
    assert cached.dtype == torch.int64 and cached.is_contiguous()
    with pytest.raises(ValueError, match="media_locations"):
        media_index_from_locations(locations[0])
    with pytest.raises(ValueError, match="media_locations"):
        media_index_from_locations([[True]])


# ------------------------------------------------------------------------------------------------
# GPU: bf16 at the ANCHORS shapes (skipped without CUDA)
# ------------------------------------------------------------------------------------------------

ANCHOR_SHAPES = {
    "openflamingo9b": (16, 512, 5, 64, 8, 64),
    "long_interleaved": (4, 4096, 32, 64, 32, 128),
}


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max())


def check_gpu_against_reference(q, k, v, media_index, r, mode):
    """Kernel error vs the fp32 reference: at most ~2x the error of the reference run in q's dtype (+ tolerance)."""
    grad_out = torch.randn(q.shape, dtype=q.dtype, device=q.device)
    got = run_kernel(q, k, v, media_index, r, mode, grad_out)
    want = run_reference(q, k, v, media_index, r, mode, grad_out)
    low = run_reference(q, k, v, media_index, r, mode, grad_out, upcast=False)
    for name, g, w, lo in zip(("out", "dq", "dk", "dv"), got, want, low):
        atol, rtol = tolerance(q.dtype, grad=name != "out")
        assert torch.isfinite(g).all(), name
        bound = 2 * _error(lo, w) + atol + rtol * float(w.abs().max())
        assert _error(g, w) <= bound, (name, _error(g, w), _error(lo, w))
    empty = media_index < 0
    assert torch.all(got[0][empty] == 0) and torch.all(got[1][empty] == 0)
    again = run_kernel(q, k, v, media_index, r, mode, grad_out)  # deterministic: no atomics
    for a, b in zip(got, again):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(ANCHOR_SHAPES))
def test_gpu_bf16_anchor_shapes(shape, mode, device):
    batch, length, num_media, r, heads, head_dim = ANCHOR_SHAPES[shape]
    media_index = make_media_index(length, [num_media] * (batch - 1) + [num_media // 2],
                                   [length // 10] + [0] * (batch - 1), device)
    q, k, v = make_qkv(batch, length, heads, head_dim, num_media, r, torch.bfloat16, device)
    check_gpu_against_reference(q, k, v, media_index, r, mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_fp32_anchor_shape(head_dim, mode, device):
    """fp32 (IEEE products unless TF32 is allowed) at the OpenFlamingo anchor shape, both media
    modes (``all_previous``: every earlier image, the two-pass backward), heads up to 128 wide."""
    batch, length, num_media, r, heads, _ = ANCHOR_SHAPES["openflamingo9b"]
    media_index = make_media_index(length, [num_media] * batch, [length // 10] + [0] * (batch - 1), device)
    q, k, v = make_qkv(batch, length, heads, head_dim, num_media, r, torch.float32, device)
    check_gpu_against_reference(q, k, v, media_index, r, mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [32, 96])
def test_gpu_odd_shapes(head_dim, dtype, mode, device):
    """Odd L and R, a sample without images, strided views, non-monotone rows appended."""
    media_index = make_media_index(777, [9, 3, 0], [50, 0, 0], device)
    media_index[1, -40:] = torch.randint(-1, 9, (40,), device=device)
    kv = torch.randn(3, 9 * 17, 2 * 4 * head_dim, dtype=dtype, device=device)
    k, v = kv.view(3, 9 * 17, 2, 4, head_dim).unbind(2)
    q = torch.randn(3, 4, 777, head_dim, dtype=dtype, device=device).transpose(1, 2)
    check_gpu_against_reference(q, k, v, media_index, 17, mode)


# ------------------------------------------------------------------------------------------------
# the launch plan against the interpreter, and at the ANCHORS shapes
# ------------------------------------------------------------------------------------------------

# tl.dot calls per inner tile: forward (S, PV), dQ (S, dP, dQ), kv (S, dV, dP, dK; + dQ in one pass).
DOTS_PER_TILE = {"_mxa_fwd_kernel": 2, "_mxa_bwd_dq_kernel": 3, "_mxa_bwd_kv_kernel": 4}


MASKED_KERNELS = {"_fwd_kernel": "_mxa_fwd_kernel", "_dq_kernel": "_mxa_bwd_dq_kernel",
                  "_kv_kernel": "_mxa_bwd_kv_kernel"}


def planned_dots(plan) -> dict:
    """tl.dot calls the plan implies per kernel (one-pass kv tiles add one dot each)."""
    dots = {}
    for launch in plan.launches:
        if launch.kernel not in DOTS_PER_TILE:
            continue
        dots[launch.kernel] = DOTS_PER_TILE[launch.kernel] * launch.tiles
        if launch.kernel == "_mxa_bwd_kv_kernel":
            tile_flops = 2 * launch.config["BLOCK_M"] * launch.config["BLOCK_N"] * mxa._block_d(plan.shape["Dh"])
            dots[launch.kernel] += (launch.executed_flops - 4 * launch.tiles * tile_flops) // tile_flops
    return dots


@pytest.mark.interpreter
@pytest.mark.parametrize("layout, mode, tokens", [
    ("monotone", "immediate", 5), ("monotone", "immediate", 40), ("monotone_tail_descent", "immediate", 9),
    ("non_monotone", "immediate", 9), ("monotone", "all_previous", 9), ("non_monotone", "all_previous", 5),
])
def test_plan_tiles_equal_interpreter_tiles(layout, mode, tokens, monkeypatch, device):
    """The plan's tile counts (what the launchers' grids and loops imply) equal the tiles the
    interpreter runs, for monotone samples (one-pass backward), a sample with one descent (two
    passes), random indices, in both modes, with R below, near and above the 32-row key tile."""
    batch, length, heads, head_dim, num_media = 2, 70, 2, 16, 4
    media_index = make_media_index(length, [4, 3], [0, 9], device)
    if layout == "monotone_tail_descent":
        media_index[1, -3] = 0
    elif layout == "non_monotone":
        media_index = torch.randint(-1, num_media, (batch, length), device=device)
    q, k, v = make_qkv(batch, length, heads, head_dim, num_media, tokens, torch.float32, device)
    configs = {name: {**mxa._INTERPRETER_CONFIG, "num_warps": 4, "num_stages": 1} for name in ("fwd", "dq", "kv")}
    plan = mxa.masked_cross_attention_plan(batch, length, num_media, tokens, heads, head_dim, mode=mode,
                                           media_index=media_index, dtype=torch.float32, configs=configs)
    grad_out = torch.randn(q.shape, device=device)
    got = []
    counts = count_interpreter_dots(monkeypatch, mxa, MASKED_KERNELS,
                                    lambda: got.extend(run_kernel(q, k, v, media_index, tokens, mode, grad_out)))
    assert counts == planned_dots(plan)
    # One sample on the one-pass backward and one on two passes in the same launch: still exact.
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, run_reference(q, k, v, media_index, tokens, mode, grad_out)):
        assert_close(g, w, grad=name != "out", name=name)
    one_pass_samples = int(plan.notes[0].split("; ")[1].split(" of ")[0])
    assert one_pass_samples == (2 if layout == "monotone" and mode == "immediate" and tokens <= 32 else
                                1 if layout == "monotone_tail_descent" and mode == "immediate" and tokens <= 32
                                else 0)


def test_plan_at_anchor_shapes():
    """The ANCHORS shapes (bf16, CUDA configs, monotone layout): every sample takes the one-pass
    backward, the long shape's backward moves at most 0.9 GB (its floor is 0.81 GB) and no more
    than 1.2x the compulsory bytes forward + backward; useful FLOPs = the floor."""
    for shape in ANCHOR_SHAPES.values():
        batch, length, num_media, tokens, heads, head_dim = shape
        plan = mxa.masked_cross_attention_plan(batch, length, num_media, tokens, heads, head_dim)
        assert plan.num_launches == 4
        assert f"{batch} of {batch} samples take the one-pass backward" in plan.notes[0]
        assert plan.useful_flops == plan.floor_flops
        assert plan.hbm_bytes <= 1.2 * plan.floor_bytes
        # B x H on grid axis 0 (2^31 - 1 programs), blocks on axis 1 (65535).
        assert all(launch.grid[0] == batch * heads for launch in plan.launches if launch.kernel != "_mxa_spans_kernel")
    assert mxa._query_grid(70000, 100, 64) == (70000, 2) and mxa._kv_grid(70000, 3, 64, 128) == (70000, 2)
    plan = mxa.masked_cross_attention_plan(*ANCHOR_SHAPES["long_interleaved"])
    backward_bytes = sum(launch.hbm_bytes for launch in plan.launches[1:])
    assert backward_bytes <= 0.9e9
    assert plan.hbm_bytes <= 1.25e9


def test_host_overhead_benchmark_runs(capsys):
    """``python -m vlmcore.bench host-overhead`` times the eager fwd+bwd with no kernel launched."""
    from vlmcore.bench import host_overhead
    from vlmcore.bench.__main__ import main

    launched = []
    real = host_overhead._NoLaunch.__getitem__
    host_overhead._NoLaunch.__getitem__ = lambda self, grid: launched.append(1) or real(self, grid)
    try:
        result = host_overhead.measure("masked_xattn", inner=2, repeats=1)
    finally:
        host_overhead._NoLaunch.__getitem__ = real
    assert len(launched) == 3 * 4  # warm-up + 2 timed calls, 4 launches each, all stubbed
    assert result.op_us > 0 and result.trivial_us > 0 and result.ratio == result.op_us / result.trivial_us
    assert isinstance(mxa._fwd_kernel, triton.runtime.Autotuner)  # the real kernels are back
    assert main(["host-overhead", "--op", "masked_xattn", "--inner", "1", "--repeats", "1"]) == 0
    assert "ratio" in capsys.readouterr().out
    with pytest.raises(ValueError, match="op must be one of"):
        host_overhead.measure("contrastive")


@pytest.mark.interpreter
def test_bf16_in_the_interpreter_is_refused():
    """bf16 CPU tensors under backend("triton"): a TypeError naming q (the interpreter computes bf16
    dots wrongly: error ~8e8 before this check existed); the reference still takes bf16."""
    media_index = make_media_index(12, [1], [0], torch.device("cpu"))
    q, k, v = make_qkv(1, 12, 1, 16, 1, 4, torch.bfloat16, torch.device("cpu"))
    with kernels.backend("triton"), pytest.raises(TypeError, match="q is bfloat16 on CPU"):
        masked_cross_attention(q, k, v, media_index, 4)
    with kernels.backend("reference"):
        assert masked_cross_attention(q, k, v, media_index, 4).dtype == torch.bfloat16
