"""CPU microbenchmarks (pytest-benchmark) of the reference paths at small shapes.

Run with ``make bench-cpu`` (``pytest bench/cpu_microbench.py --benchmark-only``); kept out of the
default test run (``testpaths = tests``). They watch the plain-PyTorch references that are the
CPU path of every op and the baseline of the GPU benchmarks: forward + backward, fp32.
"""

import pytest
import torch
import torch.nn.functional as F
from vlmcore.kernels import backend, contrastive_loss, masked_cross_attention, resampler_attention


def _leaves(*shapes):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=generator).requires_grad_() for shape in shapes]


def _fwd_bwd(fn, leaves):
    def step():
        for leaf in leaves:
            leaf.grad = None
        out = fn()
        out.backward(torch.ones_like(out))

    return step


@pytest.mark.parametrize("n", [256, 1024])
def test_contrastive_reference(benchmark, n):
    image, text = (F.normalize(t.detach(), dim=-1).requires_grad_() for t in _leaves((n, 128), (n, 128)))
    scale = torch.tensor(14.3, requires_grad=True)
    with backend("reference"):
        benchmark(_fwd_bwd(lambda: contrastive_loss(image, text, scale), [image, text, scale]))


@pytest.mark.parametrize("mode", ["immediate", "all_previous"])
def test_masked_cross_attention_reference(benchmark, mode):
    batch, length, num_media, tokens, heads, head_dim = 2, 256, 5, 64, 4, 64
    q, k, v = _leaves((batch, length, heads, head_dim), (batch, num_media * tokens, heads, head_dim),
                      (batch, num_media * tokens, heads, head_dim))
    index = (torch.arange(length) * num_media // length).expand(batch, length).contiguous()
    with backend("reference"):
        benchmark(_fwd_bwd(lambda: masked_cross_attention(q, k, v, index, tokens, mode=mode), [q, k, v]))


@pytest.mark.parametrize("with_latents", [True, False])
def test_resampler_attention_reference(benchmark, with_latents):
    batch, media, latents, heads, head_dim = 16, 257, 64, 4, 64
    q, k_media, v_media, k_latents, v_latents = _leaves(
        (batch, latents, heads, head_dim), (batch, media, heads, head_dim), (batch, media, heads, head_dim),
        (batch, latents, heads, head_dim), (batch, latents, heads, head_dim))
    latent_kv = (k_latents, v_latents) if with_latents else (None, None)
    leaves = [q, k_media, v_media] + ([k_latents, v_latents] if with_latents else [])
    with backend("reference"):
        benchmark(_fwd_bwd(lambda: resampler_attention(q, k_media, v_media, *latent_kv), leaves))
