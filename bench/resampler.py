"""Benchmark of the Perceiver-resampler / Q-Former cross-attention.

Providers: ``vlmcore`` (reads media and latent keys in one fused kernel, no concat), ``reference``
(OpenFlamingo ``PerceiverAttention`` math: concat, einsum, softmax), ``sdpa`` (concat, then
``scaled_dot_product_attention`` forced to the flash backend; the concat is inside the timed call
because the public implementations build it every layer).

Floors: P = B H R (S + R) pairs (Q-Former form: B H R S); forward 4 P Dh FLOPs, backward 10 P Dh,
both 14 P Dh. Bytes: q, k/v of both sources and o once forward; q, o, do, dq and every k, v, dk, dv
once otherwise.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from vlmcore.kernels import resampler_attention
from vlmcore.kernels.reference import resampler_attention_reference

from . import providers as peers
from .harness import Case, Gate, Provider, RunContext, run_op

OP = "resampler"
# (B = samples x images, S media tokens, R latents, H, Dh, latents in the keys)
GPU_SHAPES = (
    (640, 257, 64, 8, 64, True),    # OpenFlamingo, ViT-L/14
    (256, 1025, 64, 16, 64, True),  # 448 px ViT-H/14 class
    (256, 257, 32, 12, 64, False),  # BLIP-2 Q-Former cross-attention: 32 queries over 257 tokens
)
QUICK_SHAPES = ((4, 33, 16, 2, 32, True), (4, 33, 16, 2, 32, False))
# The ANCHORS shapes (and BLIP-2's Q-Former) for ``python -m vlmcore.bench plan``.
PLAN_SHAPES = [dict(zip(("batch", "media", "latents", "heads", "head_dim", "with_latents"), shape))
               for shape in GPU_SHAPES]


def floors(batch, media_tokens, latents, heads, head_dim, with_latents, element_size):
    keys = media_tokens + (latents if with_latents else 0)
    pairs = float(batch * heads * latents * keys)
    q_elems = batch * latents * heads * head_dim
    kv_elems = batch * keys * heads * head_dim  # per k or v
    flops = {"fwd": 4 * pairs * head_dim, "bwd": 10 * pairs * head_dim, "fwd_bwd": 14 * pairs * head_dim}
    nbytes = {"fwd": (2.0 * q_elems + 2.0 * kv_elems) * element_size,
              "bwd": (4.0 * q_elems + 4.0 * kv_elems) * element_size,
              "fwd_bwd": (4.0 * q_elems + 4.0 * kv_elems) * element_size}
    return flops, nbytes


def make_case(batch, media_tokens, latents, heads, head_dim, with_latents, ctx: RunContext,
              with_mask: bool = False) -> Case:
    """One shape; ``with_mask``: every other sample has its last quarter of media tokens padded
    (the GPU tests' masked form; the benchmark rows run unmasked, as SDPA's flash backend must)."""

    def make_inputs():
        generator = torch.Generator(device=ctx.device).manual_seed(batch * media_tokens + latents)

        def rand(*shape):
            return torch.randn(*shape, device=ctx.device, generator=generator).to(ctx.dtype).requires_grad_()

        inputs = {"q": rand(batch, latents, heads, head_dim),
                  "k_media": rand(batch, media_tokens, heads, head_dim),
                  "v_media": rand(batch, media_tokens, heads, head_dim)}
        if with_latents:
            inputs["k_latents"] = rand(batch, latents, heads, head_dim)
            inputs["v_latents"] = rand(batch, latents, heads, head_dim)
        if with_mask:
            mask = torch.ones(batch, media_tokens, dtype=torch.bool, device=ctx.device)
            mask[::2, media_tokens - media_tokens // 4:] = False
            inputs["media_mask"] = mask
        return inputs

    flops, nbytes = floors(batch, media_tokens, latents, heads, head_dim, with_latents,
                           torch.tensor([], dtype=ctx.dtype).element_size())
    form = "perceiver" if with_latents else "qformer"
    shape = f"B={batch} S={media_tokens} R={latents} H={heads} Dh={head_dim} form={form}"
    shape += " masked" if with_mask else ""
    return Case(shape=shape, x=media_tokens, make_inputs=make_inputs, flops=flops, bytes=nbytes)


def _args(inputs):
    return (inputs["q"], inputs["k_media"], inputs["v_media"], inputs.get("k_latents"), inputs.get("v_latents"))


def _vlmcore(case, inputs):
    args = _args(inputs)
    return lambda: resampler_attention(*args, media_mask=inputs.get("media_mask"))


def _reference(case, inputs):
    args = _args(inputs)
    return lambda: resampler_attention_reference(*args, media_mask=inputs.get("media_mask"))


def _sdpa(case, inputs):
    q, k_media, v_media, k_latents, v_latents = _args(inputs)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fn():
        keys, values = k_media, v_media
        if k_latents is not None:
            keys, values = torch.cat([k_media, k_latents], dim=1), torch.cat([v_media, v_latents], dim=1)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)).transpose(1, 2)

    return fn


PROVIDERS = [
    Provider("vlmcore", _vlmcore, backend="triton"),
    Provider("reference", _reference, backend="reference"),
    Provider("sdpa", _sdpa, check=peers.check_sdpa),
]


def cases(ctx: RunContext) -> list[Case]:
    shapes = QUICK_SHAPES if ctx.quick else GPU_SHAPES
    return [make_case(*shape, ctx) for shape in shapes]


def run(ctx: RunContext) -> None:
    run_op(OP, cases(ctx), PROVIDERS, ctx, gate=Gate(PROVIDERS[1]))
