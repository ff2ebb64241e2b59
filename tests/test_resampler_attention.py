"""resampler_attention: the fused Triton kernel (interpreter on CPU) against the concat reference.

Every comparison checks the output AND the gradients of q, k_media, v_media (and k_latents,
v_latents when present) against the plain-PyTorch reference run on fp32 copies of the inputs.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
from utils import assert_close
from vlmcore.kernels import resampler_attention
from vlmcore.kernels.reference import resampler_attention_reference
from vlmcore.kernels.resampler_attention import resampler_attention_forward

from vlmcore import kernels

FWD_OP = torch.ops.vlmcore.resampler_attention_fwd
# The op module itself (the package attribute of the same name is the function).
OP_MODULE = importlib.import_module("vlmcore.kernels.resampler_attention")


@pytest.fixture(params=["fused", "split"])
def backward_plan(request, monkeypatch):
    """Run the test with each backward: fused (whenever R <= 64) and split (always)."""
    if request.param == "split":
        monkeypatch.setattr(OP_MODULE, "_backward_plan", lambda *args: "split")
    else:
        monkeypatch.setattr(
            OP_MODULE, "_backward_plan", lambda num_queries, *args: "fused" if num_queries <= 64 else "split"
        )
    return request.param


def make_inputs(batch, media, queries, heads, head_dim, *, dtype=torch.float32, latents=True, device="cpu"):
    """q ``[B, R, H, Dh]``, k/v_media ``[B, S, H, Dh]``, k/v_latents ``[B, R, H, Dh]`` (or None)."""

    def rand(n):
        return torch.randn(batch, n, heads, head_dim, dtype=dtype, device=device)

    return {
        "q": rand(queries),
        "k_media": rand(media),
        "v_media": rand(media),
        "k_latents": rand(queries) if latents else None,
        "v_latents": rand(queries) if latents else None,
    }


def padding_mask(batch, media, *, empty_rows=(), device="cpu"):
    """Random bool ``[B, S]`` mask (about 30% padding); rows in ``empty_rows`` are all padding."""
    mask = torch.rand(batch, media, device=device) > 0.3
    mask[:, 0] = True
    for row in empty_rows:
        mask[row] = False
    return mask


def run(fn, inputs, grad_out, *, fp32=False, **kwargs):
    """Output and gradients of ``fn`` (w.r.t. every tensor input), optionally on fp32 copies."""
    leaves = {
        name: (t.detach().float() if fp32 else t.detach()).requires_grad_() if t is not None else None
        for name, t in inputs.items()
    }
    out = fn(**leaves, **kwargs)
    grad_out = grad_out.float() if fp32 else grad_out
    tensors = [t for t in leaves.values() if t is not None]
    grads = torch.autograd.grad(out, tensors, grad_out)
    names = [name for name, t in leaves.items() if t is not None]
    return out, dict(zip(names, grads))


def check_against_reference(inputs, *, media_mask=None, softmax_scale=None, grad_out=None):
    """Run the kernel (forced Triton backend) and the fp32 reference; compare output and all grads."""
    dtype = inputs["q"].dtype
    if grad_out is None:
        grad_out = torch.randn_like(inputs["q"])
    with kernels.backend("triton"):
        out, grads = run(resampler_attention, inputs, grad_out, media_mask=media_mask, softmax_scale=softmax_scale)
    ref_out, ref_grads = run(
        resampler_attention_reference, inputs, grad_out, fp32=True, media_mask=media_mask, softmax_scale=softmax_scale
    )
    assert out.dtype == dtype and out.shape == inputs["q"].shape
    assert_close(out, ref_out, dtype=dtype, name="out")
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert grads[name].dtype == dtype
        assert_close(grads[name], ref_grads[name], dtype=dtype, grad=True, name=f"d{name}")
    return out, grads


# ------------------------------------------------------------------------------------------------
# outputs and gradients vs the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("latents", [True, False], ids=["latents", "qformer"])
@pytest.mark.parametrize("queries", [1, 5, 64])
@pytest.mark.parametrize("media", [1, 17, 257, 1025])
def test_matches_reference_over_sequence_lengths(media, queries, latents, masked, nan_poisoned_empty, backward_plan):
    batch, heads = (1, 1) if media > 257 else (2, 2)
    mask = padding_mask(batch, media) if masked else None
    check_against_reference(make_inputs(batch, media, queries, heads, 32, latents=latents), media_mask=mask)


@pytest.mark.parametrize("latents", [True, False], ids=["latents", "qformer"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_matches_reference_over_head_dims(head_dim, latents, nan_poisoned_empty, backward_plan):
    check_against_reference(make_inputs(2, 40, 5, 2, head_dim, latents=latents))


def test_more_queries_than_one_block(nan_poisoned_empty):
    """R = 100 > 64: several query blocks in the forward / dq grid and in the dk/dv query loop."""
    check_against_reference(make_inputs(1, 33, 100, 2, 32))


@pytest.mark.parametrize(
    ("media", "queries", "head_dim", "latents", "masked"),
    [(17, 5, 32, False, False), (40, 64, 64, True, True), (257, 5, 96, True, False), (33, 1, 128, False, True)],
)
def test_fp16_matches_reference(media, queries, head_dim, latents, masked, nan_poisoned_empty, backward_plan):
    inputs = make_inputs(2, media, queries, 2, head_dim, dtype=torch.float16, latents=latents)
    mask = padding_mask(2, media) if masked else None
    check_against_reference(inputs, media_mask=mask)


def test_softmax_scale_is_used(nan_poisoned_empty):
    inputs = make_inputs(2, 17, 5, 2, 32)
    out, _ = check_against_reference(inputs, softmax_scale=0.05)
    with kernels.backend("triton"):
        default = resampler_attention(**inputs)
    assert not torch.allclose(out, default)


# ------------------------------------------------------------------------------------------------
# padding masks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latents", [True, False], ids=["latents", "qformer"])
@pytest.mark.parametrize("media", [17, 70])
def test_padding_mask_matches_reference(media, latents, nan_poisoned_empty, backward_plan):
    inputs = make_inputs(3, media, 5, 2, 32, latents=latents)
    mask = padding_mask(3, media)
    _, grads = check_against_reference(inputs, media_mask=mask)
    padded = ~mask[:, :, None, None]
    assert grads["k_media"].masked_select(padded).abs().max() == 0
    assert grads["v_media"].masked_select(padded).abs().max() == 0


def test_fully_masked_media_without_latents_gives_zeros_and_zero_grads(nan_poisoned_empty, backward_plan):
    """Q-Former form with an all-padding sample: nothing to attend -> zero output, zero grads, no NaN."""
    inputs = make_inputs(3, 20, 5, 2, 32, latents=False)
    mask = padding_mask(3, 20, empty_rows=(1,))
    out, grads = check_against_reference(inputs, media_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert torch.equal(grad[1], torch.zeros_like(grad[1])), name
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0


def test_fully_masked_media_with_latents_attends_latents_only(nan_poisoned_empty, backward_plan):
    inputs = make_inputs(3, 20, 5, 2, 32, latents=True)
    mask = padding_mask(3, 20, empty_rows=(0,))
    out, grads = check_against_reference(inputs, media_mask=mask)
    only_latents = resampler_attention_reference(
        inputs["q"][:1], inputs["k_latents"][:1], inputs["v_latents"][:1]
    )
    assert_close(out[:1], only_latents, name="out of the all-padding sample")
    assert torch.equal(grads["k_media"][0], torch.zeros_like(grads["k_media"][0]))
    assert torch.equal(grads["v_media"][0], torch.zeros_like(grads["v_media"][0]))


def test_lse_is_saved_and_minus_inf_for_empty_rows(nan_poisoned_empty):
    inputs = make_inputs(2, 20, 5, 2, 32, latents=False)
    mask = padding_mask(2, 20, empty_rows=(1,))
    out, lse = FWD_OP(inputs["q"], inputs["k_media"], inputs["v_media"], None, None, mask, 0.25)
    scores = torch.einsum("bqhd,bkhd->bhqk", inputs["q"], inputs["k_media"]) * 0.25
    expected = torch.logsumexp(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    assert lse.shape == (2, 2, 5) and lse.dtype == torch.float32
    assert_close(lse, expected, name="lse")
    assert torch.isneginf(lse[1]).all()


# ------------------------------------------------------------------------------------------------
# strides, determinism, autograd / compile plumbing
# ------------------------------------------------------------------------------------------------


def test_non_contiguous_views_and_expanded_grad(nan_poisoned_empty, backward_plan):
    """Views of projection outputs (no copies), a transposed mask, and a stride-0 incoming gradient."""
    batch, media, queries, heads, head_dim = 2, 19, 6, 2, 32
    kv = torch.randn(batch, media, 2 * heads * head_dim)
    k_media, v_media = kv.view(batch, media, 2, heads, head_dim).unbind(2)
    latent_qkv = torch.randn(batch, queries, heads, 3, head_dim)
    q, k_latents, v_latents = latent_qkv.unbind(3)
    mask = (torch.rand(media, batch) > 0.3).t()
    inputs = {"q": q, "k_media": k_media, "v_media": v_media, "k_latents": k_latents, "v_latents": v_latents}
    assert not any(t.is_contiguous() for t in inputs.values()) and not mask.is_contiguous()
    grad_out = torch.ones(()).expand(batch, queries, heads, head_dim)
    check_against_reference(inputs, media_mask=mask, grad_out=grad_out)


def test_deterministic(nan_poisoned_empty, backward_plan):
    inputs = make_inputs(2, 70, 64, 2, 64)
    mask = padding_mask(2, 70)
    grad_out = torch.randn_like(inputs["q"])
    with kernels.backend("triton"):
        first = run(resampler_attention, inputs, grad_out, media_mask=mask)
        second = run(resampler_attention, inputs, grad_out, media_mask=mask)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


def test_backward_plan():
    cpu = torch.device("cpu")
    assert OP_MODULE._backward_plan(64, 4, cpu) == "fused"
    assert OP_MODULE._backward_plan(1, 1, cpu) == "fused"
    assert OP_MODULE._backward_plan(65, 4096, cpu) == "split"


def test_autotune_pruner_drops_spilling_tiles():
    configs = [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps) for block_n in (32, 64, 128) for warps in (4, 8)
    ]
    prune = OP_MODULE._tile_limit_pruner(64 * 128)["early_config_prune"]
    assert prune(configs, {}, BLOCK_D=64) == configs
    kept = prune(configs, {}, BLOCK_D=128)
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == [(32, 8), (64, 8)]
    fused = OP_MODULE._tile_limit_pruner(64 * 64)["early_config_prune"]
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in fused(configs, {}, BLOCK_D=128)] == [(32, 8)]


def test_auto_backend_on_cpu_runs_the_reference(monkeypatch):
    monkeypatch.delenv("VLMCORE_BACKEND", raising=False)
    inputs = make_inputs(2, 17, 5, 2, 32)
    assert torch.equal(resampler_attention(**inputs), resampler_attention_reference(**inputs))


@pytest.mark.parametrize("latents", [True, False], ids=["latents", "qformer"])
def test_opcheck(latents):
    inputs = make_inputs(2, 17, 5, 2, 32, latents=latents)
    mask = padding_mask(2, 17) if latents else None
    args = (*inputs.values(), mask, 0.2)
    torch.library.opcheck(FWD_OP, args)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile(compile_backend):
    """The custom op and the public function trace with fullgraph (fake + autograd registrations)."""
    inputs = make_inputs(2, 17, 5, 2, 32)
    mask = padding_mask(2, 17)
    grad_out = torch.randn_like(inputs["q"])

    def op_only(q, k_media, v_media, k_latents, v_latents, media_mask):
        return FWD_OP(q, k_media, v_media, k_latents, v_latents, media_mask, 32**-0.5)[0]

    def public(q, k_media, v_media, k_latents, v_latents, media_mask):
        return resampler_attention(q, k_media, v_media, k_latents, v_latents, media_mask=media_mask)

    ref_out, ref_grads = run(resampler_attention_reference, inputs, grad_out, media_mask=mask)
    compiled_op = torch.compile(op_only, backend=compile_backend, fullgraph=True)
    compiled_public = torch.compile(public, backend=compile_backend, fullgraph=True)
    with kernels.backend("triton"):
        for fn in (compiled_op, compiled_public):
            out, grads = run(fn, inputs, grad_out, media_mask=mask)
            assert_close(out, ref_out, name="compiled out")
            for name in grads:
                assert_close(grads[name], ref_grads[name], grad=True, name=f"compiled d{name}")
        qformer = {**inputs, "k_latents": None, "v_latents": None}
        out, _ = run(compiled_op, qformer, grad_out, media_mask=None)
        assert_close(out, resampler_attention_reference(**qformer), name="compiled Q-Former out")


def test_empty_batch():
    inputs = make_inputs(0, 17, 5, 2, 32)
    with kernels.backend("triton"):
        out = resampler_attention(**inputs)
    assert out.shape == (0, 5, 2, 32)
    out, lse = resampler_attention_forward(*inputs.values(), None, 0.1)
    assert out.shape == (0, 5, 2, 32) and lse.shape == (0, 2, 5)


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


def _bad(**changes):
    inputs = make_inputs(2, 17, 5, 2, 32)
    inputs.update(changes)
    return inputs


@pytest.mark.parametrize(
    ("inputs", "kwargs", "error", "match"),
    [
        (_bad(q=[[1.0]]), {}, TypeError, "q"),
        (_bad(q=torch.zeros(2, 5, 2, 32, dtype=torch.int32)), {}, TypeError, "q"),
        (_bad(k_media=torch.randn(2, 17, 2, 32, dtype=torch.float16)), {}, TypeError, "k_media"),
        (_bad(v_media=torch.randn(2, 16, 2, 32)), {}, ValueError, "v_media"),
        (_bad(k_media=torch.randn(2, 17, 3, 32), v_media=torch.randn(2, 17, 3, 32)), {}, ValueError, "k_media"),
        (_bad(k_media=torch.randn(2, 0, 2, 32), v_media=torch.randn(2, 0, 2, 32)), {}, ValueError, "k_media"),
        (_bad(k_media=torch.randn(17, 2, 32), v_media=torch.randn(17, 2, 32)), {}, ValueError, "k_media"),
        (_bad(v_latents=None), {}, ValueError, "k_latents and v_latents"),
        (_bad(k_latents=torch.randn(2, 6, 2, 32)), {}, ValueError, "k_latents"),
        (_bad(v_latents=torch.randn(2, 5, 2, 32, dtype=torch.float64)), {}, TypeError, "v_latents"),
        (_bad(), {"media_mask": torch.ones(2, 17)}, TypeError, "media_mask"),
        (_bad(), {"media_mask": torch.ones(2, 16, dtype=torch.bool)}, ValueError, "media_mask"),
        (_bad(), {"softmax_scale": 0.0}, ValueError, "softmax_scale"),
        (_bad(), {"softmax_scale": float("nan")}, ValueError, "softmax_scale"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(inputs, kwargs, error, match):
    with kernels.backend("triton"):
        with pytest.raises(error, match=match):
            resampler_attention(**inputs, **kwargs)


def test_bf16_in_the_interpreter_is_refused():
    """The Triton interpreter gets bfloat16 dots wrong (errors of 1e8 seen): refuse instead of lying."""
    inputs = make_inputs(1, 17, 5, 1, 32, dtype=torch.bfloat16)
    with kernels.backend("triton"):
        with pytest.raises(TypeError, match="bfloat16"):
            resampler_attention(**inputs)


def test_head_dim_above_kernel_limit_is_a_clear_error():
    inputs = make_inputs(1, 3, 2, 1, 160)
    with kernels.backend("triton"):
        with pytest.raises(ValueError, match="head dims"):
            resampler_attention(**inputs)
    with kernels.backend("reference"):
        assert resampler_attention(**inputs).shape == (1, 2, 1, 160)


# ------------------------------------------------------------------------------------------------
# GPU (bf16 only runs correctly on a real GPU)
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("batch", "media", "queries", "heads", "head_dim", "latents"),
    [
        (640, 257, 64, 8, 64, True),  # OpenFlamingo, ViT-L/14
        (256, 1025, 64, 16, 64, True),  # 448 px ViT-H/14 class
        (64, 257, 32, 12, 64, False),  # BLIP-2 Q-Former cross-attention
    ],
    ids=["openflamingo", "vit-h-448", "qformer"],
)
def test_gpu_bf16_anchor_shapes(batch, media, queries, heads, head_dim, latents):
    inputs = make_inputs(batch, media, queries, heads, head_dim, dtype=torch.bfloat16, latents=latents, device="cuda")
    mask = padding_mask(batch, media, empty_rows=(1,), device="cuda")
    check_against_reference(inputs, media_mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 96, 128])
def test_gpu_odd_shapes(dtype, head_dim, backward_plan):
    inputs = make_inputs(5, 131, 37, 3, head_dim, dtype=dtype, device="cuda")
    mask = padding_mask(5, 131, empty_rows=(2,), device="cuda")
    check_against_reference(inputs, media_mask=mask)


@pytest.mark.gpu
def test_gpu_deterministic():
    inputs = make_inputs(64, 257, 64, 8, 64, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn_like(inputs["q"])
    first = run(resampler_attention, inputs, grad_out)
    second = run(resampler_attention, inputs, grad_out)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name
