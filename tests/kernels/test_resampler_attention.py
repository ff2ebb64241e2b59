"""resampler_attention: the fused Triton kernel against the concat reference.

The kernel tests run on the ``device`` fixture: compiled kernels on CUDA tensors when a GPU is
present, else the Triton interpreter on CPU tensors (fp32 and fp16 only: the interpreter gets
bf16 wrong, so bf16 joins the low-precision sweep on CUDA only).

Every comparison checks the output AND the gradients of q, k_media, v_media (and k_latents,
v_latents when present) against the plain-PyTorch reference run on fp32 copies of the inputs,
on the same device.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import triton
from helpers.numerics import assert_close, count_interpreter_dots, run_sm90_compile_check
from vlmcore.kernels import resampler_attention
from vlmcore.kernels.reference import resampler_attention_reference
from vlmcore.kernels.resampler_attention import resampler_attention_forward

from vlmcore import kernels

FWD_OP = torch.ops.vlmcore.resampler_attention_fwd
# The op module itself (the package attribute of the same name is the function).
OP_MODULE = importlib.import_module("vlmcore.kernels.resampler_attention")
# 16-bit input dtypes compared against the fp32 reference (bf16 only where it is computed right).
LOW_PRECISION_DTYPES = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


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


def make_inputs(batch, media, queries, heads, head_dim, *, device, dtype=torch.float32, latents=True):
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


def padding_mask(batch, media, *, device, empty_rows=()):
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


@pytest.mark.parametrize(("media", "queries"), [(197, 32), (257, 35), (197, 40)],
                         ids=["blip2_qformer_224px", "blip_text_257", "blip_text_197"])
def test_qformer_and_blip_shapes(media, queries, device, nan_poisoned_empty, backward_plan):
    """The no-latents form as BLIP-2's Q-Former (32 queries) and BLIP's text cross-attention
    (text lengths 30-40) use it: S = 197 / 257 image tokens, R not a power of two, padded keys."""
    mask = padding_mask(1, media, device=device)
    check_against_reference(make_inputs(1, media, queries, 1, 64, latents=False, device=device), media_mask=mask)


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("latents", [True, False], ids=["latents", "qformer"])
@pytest.mark.parametrize("queries", [1, 5, 64])
@pytest.mark.parametrize("media", [1, 17, 257, 1025])
def test_matches_reference_over_sequence_lengths(
    media, queries, latents, masked, device, nan_poisoned_empty, backward_plan
):
    batch, heads = (1, 1) if media > 257 else (2, 2)
    mask = padding_mask(batch, media, device=device) if masked else None
    inputs = make_inputs(batch, media, queries, heads, 32, latents=latents, device=device)
    check_against_reference(inputs, media_mask=mask)


@pytest.mark.parametrize("latents", [True, False], ids=["latents", "qformer"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
def test_matches_reference_over_head_dims(head_dim, latents, device, nan_poisoned_empty, backward_plan):
    check_against_reference(make_inputs(2, 40, 5, 2, head_dim, latents=latents, device=device))


def test_more_queries_than_one_block(device, nan_poisoned_empty):
    """R = 100 > 64: several query blocks in the forward / dq grid and in the dk/dv query loop."""
    check_against_reference(make_inputs(1, 33, 100, 2, 32, device=device))


@pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=str)
@pytest.mark.parametrize(
    ("media", "queries", "head_dim", "latents", "masked"),
    [(17, 5, 32, False, False), (40, 64, 64, True, True), (257, 5, 96, True, False), (33, 1, 128, False, True)],
)
def test_low_precision_matches_reference(
    media, queries, head_dim, latents, masked, dtype, device, nan_poisoned_empty, backward_plan
):
    inputs = make_inputs(2, media, queries, 2, head_dim, dtype=dtype, latents=latents, device=device)
    mask = padding_mask(2, media, device=device) if masked else None
    check_against_reference(inputs, media_mask=mask)


def test_softmax_scale_is_used(device, nan_poisoned_empty):
    inputs = make_inputs(2, 17, 5, 2, 32, device=device)
    out, _ = check_against_reference(inputs, softmax_scale=0.05)
    with kernels.backend("triton"):
        default = resampler_attention(**inputs)
    assert not torch.allclose(out, default)


# ------------------------------------------------------------------------------------------------
# padding masks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("latents", [True, False], ids=["latents", "qformer"])
@pytest.mark.parametrize("media", [17, 70])
def test_padding_mask_matches_reference(media, latents, device, nan_poisoned_empty, backward_plan):
    inputs = make_inputs(3, media, 5, 2, 32, latents=latents, device=device)
    mask = padding_mask(3, media, device=device)
    _, grads = check_against_reference(inputs, media_mask=mask)
    padded = ~mask[:, :, None, None]
    assert grads["k_media"].masked_select(padded).abs().max() == 0
    assert grads["v_media"].masked_select(padded).abs().max() == 0


def test_fully_masked_media_without_latents_gives_zeros_and_zero_grads(device, nan_poisoned_empty, backward_plan):
    """Q-Former form with an all-padding sample: nothing to attend -> zero output, zero grads, no NaN."""
    inputs = make_inputs(3, 20, 5, 2, 32, latents=False, device=device)
    mask = padding_mask(3, 20, empty_rows=(1,), device=device)
    out, grads = check_against_reference(inputs, media_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert torch.equal(grad[1], torch.zeros_like(grad[1])), name
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0


def test_fully_masked_media_with_latents_attends_latents_only(device, nan_poisoned_empty, backward_plan):
    inputs = make_inputs(3, 20, 5, 2, 32, latents=True, device=device)
    mask = padding_mask(3, 20, empty_rows=(0,), device=device)
    out, grads = check_against_reference(inputs, media_mask=mask)
    only_latents = resampler_attention_reference(
        inputs["q"][:1], inputs["k_latents"][:1], inputs["v_latents"][:1]
    )
    assert_close(out[:1], only_latents, name="out of the all-padding sample")
    assert torch.equal(grads["k_media"][0], torch.zeros_like(grads["k_media"][0]))
    assert torch.equal(grads["v_media"][0], torch.zeros_like(grads["v_media"][0]))


def test_lse_is_saved_and_minus_inf_for_empty_rows(device, nan_poisoned_empty):
    inputs = make_inputs(2, 20, 5, 2, 32, latents=False, device=device)
    mask = padding_mask(2, 20, empty_rows=(1,), device=device)
    out, lse = FWD_OP(inputs["q"], inputs["k_media"], inputs["v_media"], None, None, mask, 0.25)
    scores = torch.einsum("bqhd,bkhd->bhqk", inputs["q"], inputs["k_media"]) * 0.25
    expected = torch.logsumexp(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    assert lse.shape == (2, 2, 5) and lse.dtype == torch.float32
    assert_close(lse, expected, name="lse")
    assert torch.isneginf(lse[1]).all()


# ------------------------------------------------------------------------------------------------
# strides, determinism, autograd / compile plumbing
# ------------------------------------------------------------------------------------------------


def test_non_contiguous_views_and_expanded_grad(device, nan_poisoned_empty, backward_plan):
    """Views of projection outputs (no copies), a transposed mask, and a stride-0 incoming gradient."""
    batch, media, queries, heads, head_dim = 2, 19, 6, 2, 32
    kv = torch.randn(batch, media, 2 * heads * head_dim, device=device)
    k_media, v_media = kv.view(batch, media, 2, heads, head_dim).unbind(2)
    latent_qkv = torch.randn(batch, queries, heads, 3, head_dim, device=device)
    q, k_latents, v_latents = latent_qkv.unbind(3)
    mask = (torch.rand(media, batch, device=device) > 0.3).t()
    inputs = {"q": q, "k_media": k_media, "v_media": v_media, "k_latents": k_latents, "v_latents": v_latents}
    assert not any(t.is_contiguous() for t in inputs.values()) and not mask.is_contiguous()
    grad_out = torch.ones((), device=device).expand(batch, queries, heads, head_dim)
    check_against_reference(inputs, media_mask=mask, grad_out=grad_out)


def test_deterministic(device, nan_poisoned_empty, backward_plan):
    inputs = make_inputs(2, 70, 64, 2, 64, device=device)
    mask = padding_mask(2, 70, device=device)
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


@pytest.mark.gpu
def test_backward_plan_on_cuda_needs_two_programs_per_sm(device):
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    assert OP_MODULE._backward_plan(64, 2 * sms, device) == "fused"
    assert OP_MODULE._backward_plan(64, 2 * sms - 1, device) == "split"
    assert OP_MODULE._backward_plan(65, 100 * sms, device) == "split"


def test_autotune_pruner_drops_spilling_tiles():
    configs = [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps) for block_n in (32, 64, 128) for warps in (4, 8)
    ]
    shape = {"num_media": 257, "num_queries": 64}
    prune = OP_MODULE._tile_limit_pruner(64 * 128)["early_config_prune"]
    assert prune(configs, shape, BLOCK_D=64, HAS_LATENTS=True) == configs
    kept = prune(configs, shape, BLOCK_D=128, HAS_LATENTS=True)
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == [(32, 8), (64, 8)]
    fused = OP_MODULE._tile_limit_pruner(64 * 64)["early_config_prune"]
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in fused(configs, shape, BLOCK_D=128, HAS_LATENTS=True)] == [
        (32, 8)]
    dkdv = OP_MODULE._PRUNE_DKDV["early_config_prune"]
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in dkdv(configs, shape, BLOCK_D=64, HAS_LATENTS=True)] == [
        (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in dkdv(configs, shape, BLOCK_D=128, HAS_LATENTS=True)] == [
        (64, 8)]


def test_autotune_pruner_drops_key_tiles_wider_than_the_keys():
    """BLOCK_N > S + R (S without latents) is mostly padding: dropped; 32 always stays."""
    configs = [triton.Config({"BLOCK_N": block_n}, num_warps=8) for block_n in (32, 64, 128)]
    prune = OP_MODULE._tile_limit_pruner(64 * 128)["early_config_prune"]

    def tiles(media, queries, latents):
        kept = prune(configs, {"num_media": media, "num_queries": queries}, BLOCK_D=64, HAS_LATENTS=latents)
        return [c.kwargs["BLOCK_N"] for c in kept]

    assert tiles(40, 16, True) == [32]  # 56 keys
    assert tiles(40, 30, True) == [32, 64]  # 70 keys
    assert tiles(100, 30, False) == [32, 64]
    assert tiles(5, 3, False) == [32]
    assert tiles(197, 32, False) == [32, 64, 128]


def test_autotune_key_buckets_the_media_tokens():
    """The key holds next_power_of_2(S), not S: S = 197 and 257 ... 512 share a tuned config."""
    key = OP_MODULE._AUTOTUNE_KEY
    assert "num_media" not in key and "media_bucket" in key
    for tuned in (OP_MODULE._resampler_fwd_kernel, OP_MODULE._resampler_bwd_fused_kernel,
                  OP_MODULE._resampler_bwd_dq_kernel, OP_MODULE._resampler_bwd_dkdv_kernel):
        assert "media_bucket" in tuned.fn.arg_names and tuned.keys == key


def test_kernels_compile_for_h100():
    """Every kernel (forward, dq, dk/dv, fused backward) compiles to an sm_90a cubin with Triton's GPU
    passes and bundled ptxas (no GPU needed), on a subset of the CUDA autotune configs that the
    kernels' own pruners keep: bf16 at Dh 64, 128 and 96 (padded to 128), with and without latents
    and mask, and each kernel's preferred config (the plan's) in the Perceiver and the 32-query
    Q-Former form. Each fits the H100's 227 KB of shared memory, runs its products on tensor cores,
    spills no register, and reports its registers and CTAs per SM.
    ``python tests/helpers/compile_checks/resampler_compile_check.py all`` compiles every surviving config."""
    rows = run_sm90_compile_check("resampler_compile_check.py", timeout=600)
    assert {row["kernel"] for row in rows} == {"fwd", "dq", "dkdv", "fused"}
    for kernel in ("fwd", "dq", "dkdv", "fused"):
        mine = [row for row in rows if row["kernel"] == kernel]
        assert {row["head_dim"] for row in mine} == {64, 96, 128}, kernel
        assert {(row["latents"], row["mask"]) for row in mine} == {
            (True, True), (True, False), (False, True), (False, False)}, kernel
        assert {row["config"]["num_warps"] for row in mine} == {4, 8}, kernel
    for row in rows:
        assert row["cubin"] > 0 and 0 < row["shared"] <= 227 * 1024, row
        assert row["wgmma"] + row["mma"] > 0, row
        assert row["spill_bytes"] == 0, row
        assert 0 < row["registers"] <= 255 and row["ctas_per_sm"] >= 1, row
    # Every kernel's preferred config, in the Perceiver form (64-row query tile) and the Q-Former
    # form with 32 queries (32-row query tile: mma.sync tensor-core tiles, below wgmma's 64 rows).
    preferred = {(row["kernel"], row["head_dim"], row["block_m"]) for row in rows if row["preferred"]}
    assert preferred >= {(k, d, m) for k in ("fwd", "dq", "dkdv", "fused") for d in (64, 128) for m in (32, 64)}
    for row in rows:  # the dk/dv kernel's products have the key tile as rows: wgmma at 64 keys
        if row["block_m"] == 32 and row["kernel"] != "dkdv":
            assert row["mma"] > 0, row


def test_auto_backend_on_cpu_runs_the_reference(monkeypatch):
    """Explicit CPU tensors (on a GPU machine too): ``auto`` sends them to the reference."""
    monkeypatch.delenv("VLMCORE_BACKEND", raising=False)
    inputs = make_inputs(2, 17, 5, 2, 32, device="cpu")
    assert torch.equal(resampler_attention(**inputs), resampler_attention_reference(**inputs))


@pytest.mark.parametrize("latents", [True, False], ids=["latents", "qformer"])
def test_opcheck(latents, device):
    inputs = make_inputs(2, 17, 5, 2, 32, latents=latents, device=device)
    mask = padding_mask(2, 17, device=device) if latents else None
    args = (*inputs.values(), mask, 0.2)
    torch.library.opcheck(FWD_OP, args)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile(compile_backend, device):
    """The custom op and the public function trace with fullgraph (fake + autograd registrations)."""
    inputs = make_inputs(2, 17, 5, 2, 32, device=device)
    mask = padding_mask(2, 17, device=device)
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


def test_empty_batch(device):
    inputs = make_inputs(0, 17, 5, 2, 32, device=device)
    with kernels.backend("triton"):
        out = resampler_attention(**inputs)
    assert out.shape == (0, 5, 2, 32)
    out, lse = resampler_attention_forward(*inputs.values(), None, 0.1)
    assert out.shape == (0, 5, 2, 32) and lse.shape == (0, 2, 5)


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


def _bad(device, **changes):
    inputs = make_inputs(2, 17, 5, 2, 32, device=device)
    inputs.update(changes)
    return inputs


def _randn(*shape, dtype=torch.float32):
    """A tensor built later, on the test's device (no device work at collection time)."""
    return lambda device: torch.randn(*shape, dtype=dtype, device=device)


# (input changes, call kwargs, error, message): tensors are deferred builders taking the device.
BAD_INPUTS = [
    ({"q": lambda device: [[1.0]]}, {}, TypeError, "q"),
    ({"q": lambda device: torch.zeros(2, 5, 2, 32, dtype=torch.int32, device=device)}, {}, TypeError, "q"),
    ({"k_media": _randn(2, 17, 2, 32, dtype=torch.float16)}, {}, TypeError, "k_media"),
    ({"v_media": _randn(2, 16, 2, 32)}, {}, ValueError, "v_media"),
    ({"k_media": _randn(2, 17, 3, 32), "v_media": _randn(2, 17, 3, 32)}, {}, ValueError, "k_media"),
    ({"k_media": _randn(2, 0, 2, 32), "v_media": _randn(2, 0, 2, 32)}, {}, ValueError, "k_media"),
    ({"k_media": _randn(17, 2, 32), "v_media": _randn(17, 2, 32)}, {}, ValueError, "k_media"),
    ({"v_latents": lambda device: None}, {}, ValueError, "k_latents and v_latents"),
    ({"k_latents": _randn(2, 6, 2, 32)}, {}, ValueError, "k_latents"),
    ({"v_latents": _randn(2, 5, 2, 32, dtype=torch.float64)}, {}, TypeError, "v_latents"),
    ({}, {"media_mask": _randn(2, 17)}, TypeError, "media_mask"),
    ({}, {"media_mask": lambda device: torch.ones(2, 16, dtype=torch.bool, device=device)}, ValueError, "media_mask"),
    ({}, {"softmax_scale": lambda device: 0.0}, ValueError, "softmax_scale"),
    ({}, {"softmax_scale": lambda device: float("nan")}, ValueError, "softmax_scale"),
]


@pytest.mark.parametrize(("changes", "kwargs", "error", "match"), BAD_INPUTS)
def test_bad_inputs_raise_naming_the_argument(changes, kwargs, error, match, device):
    inputs = _bad(device, **{name: build(device) for name, build in changes.items()})
    kwargs = {name: build(device) for name, build in kwargs.items()}
    with kernels.backend("triton"):
        with pytest.raises(error, match=match):
            resampler_attention(**inputs, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["k_media", "v_media", "k_latents", "v_latents", "media_mask"])
def test_input_on_another_device_raises_naming_it(name, device):
    """One CPU tensor among CUDA inputs is refused by name, before any kernel launch."""
    inputs = make_inputs(2, 17, 5, 2, 32, device=device)
    kwargs = {"media_mask": padding_mask(2, 17, device=device)}
    if name == "media_mask":
        kwargs[name] = kwargs[name].cpu()
    else:
        inputs[name] = inputs[name].cpu()
    with kernels.backend("triton"):
        with pytest.raises(ValueError, match=name):
            resampler_attention(**inputs, **kwargs)


@pytest.mark.interpreter
def test_bf16_in_the_interpreter_is_refused():
    """The Triton interpreter gets bfloat16 dots wrong (errors of 1e8 seen): refuse instead of lying."""
    inputs = make_inputs(1, 17, 5, 1, 32, dtype=torch.bfloat16, device="cpu")
    with kernels.backend("triton"):
        with pytest.raises(TypeError, match="bfloat16"):
            resampler_attention(**inputs)


def test_head_dim_above_kernel_limit_is_a_clear_error(device):
    inputs = make_inputs(1, 3, 2, 1, 160, device=device)
    with kernels.backend("triton"):
        with pytest.raises(ValueError, match="head dims"):
            resampler_attention(**inputs)
    with kernels.backend("reference"):
        assert resampler_attention(**inputs).shape == (1, 2, 1, 160)


# ------------------------------------------------------------------------------------------------
# GPU only: anchor shapes (too big for the interpreter), odd shapes in every dtype incl. bf16
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
@pytest.mark.parametrize(("batch", "media", "queries", "heads", "head_dim", "latents", "dtype"), [
    (640, 257, 64, 8, 64, True, torch.bfloat16),  # OpenFlamingo, ViT-L/14 (fused by default)
    (64, 257, 32, 12, 64, False, torch.bfloat16),  # BLIP-2 Q-Former cross-attention
    (16, 257, 64, 8, 128, True, torch.float32),  # fp32 products, 128-wide heads
], ids=["openflamingo", "qformer", "fp32-dh128"])
def test_gpu_split_backward_at_anchor_shapes(batch, media, queries, heads, head_dim, latents, dtype, monkeypatch):
    """The split backward (dq kernel, then dk/dv over both key sources) where the plan would pick the
    fused one: the anchor shapes otherwise never run it on a GPU."""
    monkeypatch.setattr(OP_MODULE, "_backward_plan", lambda *args: "split")
    inputs = make_inputs(batch, media, queries, heads, head_dim, dtype=dtype, latents=latents, device="cuda")
    check_against_reference(inputs, media_mask=padding_mask(batch, media, empty_rows=(1,), device="cuda"))


@pytest.mark.gpu
def test_gpu_deterministic():
    inputs = make_inputs(64, 257, 64, 8, 64, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn_like(inputs["q"])
    first = run(resampler_attention, inputs, grad_out)
    second = run(resampler_attention, inputs, grad_out)
    assert torch.equal(first[0], second[0])
    for name in first[1]:
        assert torch.equal(first[1][name], second[1][name]), name


# ------------------------------------------------------------------------------------------------
# the launch plan against the interpreter, and at the ANCHORS shapes
# ------------------------------------------------------------------------------------------------

RESAMPLER_KERNELS = {"_resampler_fwd_kernel": "_resampler_fwd_kernel",
                     "_resampler_bwd_fused_kernel": "_resampler_bwd_fused_kernel",
                     "_resampler_bwd_dq_kernel": "_resampler_bwd_dq_kernel",
                     "_resampler_bwd_dkdv_kernel": "_resampler_bwd_dkdv_kernel"}
# tl.dot calls per inner tile: forward (S, PV), fused (S, dP, dV, dK, dQ), dq (S, dP, dQ), dk/dv (S, dV, dP, dK).
RESAMPLER_DOTS = {"_resampler_fwd_kernel": 2, "_resampler_bwd_fused_kernel": 5, "_resampler_bwd_dq_kernel": 3,
                  "_resampler_bwd_dkdv_kernel": 4}


@pytest.mark.interpreter
@pytest.mark.parametrize(("media", "queries", "latents"), [(70, 20, True), (45, 100, True), (33, 35, False)])
def test_plan_tiles_equal_interpreter_tiles(media, queries, latents, monkeypatch, device):
    """The plan's tiles (the launchers' grids and loops) equal the tiles the interpreter runs:
    fused backward (R <= 64), split backward (R = 100: several query blocks), Q-Former form."""
    inputs = make_inputs(2, media, queries, 1, 16, latents=latents, device=device)
    config = {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    plan = OP_MODULE.resampler_attention_plan(2, media, queries, 1, 16, with_latents=latents, dtype=torch.float32,
                                              configs=dict.fromkeys(("fwd", "dq", "dkdv", "fused"), config), sms=0)
    grad_out = torch.randn_like(inputs["q"])

    def run_kernel():
        with kernels.backend("triton"):
            run(resampler_attention, inputs, grad_out)

    counts = count_interpreter_dots(monkeypatch, OP_MODULE, RESAMPLER_KERNELS, run_kernel)
    planned = dict.fromkeys(RESAMPLER_DOTS, 0)
    for launch in plan.launches:
        planned[launch.kernel] = RESAMPLER_DOTS[launch.kernel] * launch.tiles
    assert counts == planned
    assert plan.notes[0].startswith("backward: fused") == (queries <= 64)


def test_plan_at_anchor_shapes():
    """bf16, CUDA configs, H100: the fused backward; OpenFlamingo's shape within 20% of its byte floor."""
    plan = OP_MODULE.resampler_attention_plan(640, 257, 64, 8, 64)
    assert [launch.kernel for launch in plan.launches] == ["_resampler_fwd_kernel", "_resampler_bwd_fused_kernel"]
    assert plan.hbm_bytes <= 1.2 * plan.floor_bytes
    assert plan.useful_flops == plan.floor_flops
    for shape in ((256, 1025, 64, 16, 64, True), (256, 257, 32, 12, 64, False)):
        plan = OP_MODULE.resampler_attention_plan(*shape)
        assert plan.hbm_bytes <= 1.2 * plan.floor_bytes and plan.num_launches == 2
