"""PerceiverAttention / PerceiverResampler vs a plain-PyTorch OpenFlamingo-style module.

The reference builds the concat ``[media; latents]`` and projects it with one ``to_kv`` as
OpenFlamingo does; ours projects the two parts separately and runs the fused op. Same weights
(loaded strictly by name), same outputs and gradients.
"""

import pytest
import torch
from helpers.numerics import assert_close
from torch import nn
from vlmcore.kernels import backend

import vlmcore


def _ff(dim, mult):
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class RefPerceiverAttention(nn.Module):
    def __init__(self, dim, dim_head, heads):
        super().__init__()
        inner = dim_head * heads
        self.heads, self.scale = heads, dim_head**-0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm_media(x), self.norm_latents(latents)
        b, t, r, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        q, k, v = (u.reshape(b, t, u.shape[2], self.heads, -1).transpose(2, 3) for u in (q, k, v))  # [b, t, h, n, d]
        sim = (q * self.scale) @ k.transpose(-1, -2)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(2, 3).reshape(b, t, r, -1))


class RefPerceiverResampler(nn.Module):
    def __init__(self, dim, depth, dim_head, heads, num_latents, max_num_media, max_num_frames, ff_mult):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(max_num_frames, dim))
        self.media_time_embs = nn.Parameter(torch.randn(max_num_media, 1, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([RefPerceiverAttention(dim, dim_head, heads), _ff(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        b, t, f, v, d = x.shape
        x = x + self.frame_embs[:f].reshape(1, 1, f, 1, d)
        x = x.reshape(b, t, f * v, d) + self.media_time_embs[:t]
        latents = self.latents.expand(b, t, -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)


DIM, HEADS, DIM_HEAD = 24, 3, 8


def _resampler_pair(**overrides):
    cfg = dict(dim=DIM, depth=2, dim_head=DIM_HEAD, heads=HEADS, num_latents=5, max_num_media=4, max_num_frames=3,
               ff_mult=2)
    cfg.update(overrides)
    ref = RefPerceiverResampler(**cfg)
    ours = vlmcore.PerceiverResampler(**cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _run_with_grads(module, x, weight):
    x = x.clone().requires_grad_()
    out = module(x)
    (out * weight).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def test_perceiver_attention_matches_openflamingo():
    ref = RefPerceiverAttention(DIM, DIM_HEAD, HEADS)
    ours = vlmcore.PerceiverAttention(DIM, dim_head=DIM_HEAD, heads=HEADS)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, latents = torch.randn(2, 3, 17, DIM), torch.randn(2, 3, 5, DIM)
    weight = torch.randn(2, 3, 5, DIM)
    grads = []
    for module in (ours, ref):
        xi, li = x.clone().requires_grad_(), latents.clone().requires_grad_()
        out = module(xi, li)
        (out * weight).sum().backward()
        grads.append((out.detach(), xi.grad, li.grad, {n: p.grad for n, p in module.named_parameters()}))
    (o1, gx1, gl1, p1), (o2, gx2, gl2, p2) = grads
    assert_close(o1, o2, name="output", atol=2e-5)
    assert_close(gx1, gx2, name="grad x", atol=2e-5)
    assert_close(gl1, gl2, name="grad latents", atol=2e-5)
    for name in p2:
        assert_close(p1[name], p2[name], name=f"grad {name}", atol=5e-5)


@pytest.mark.parametrize("shape", [(2, 3, 2, 7), (1, 1, 1, 1), (2, 4, 3, 5)],
                         ids=["frames", "single_token", "max_sizes"])
def test_resampler_matches_openflamingo(shape):
    ours, ref = _resampler_pair()
    x = torch.randn(*shape, DIM)
    weight = torch.randn(shape[0], shape[1], 5, DIM)
    o1, gx1, p1 = _run_with_grads(ours, x, weight)
    o2, gx2, p2 = _run_with_grads(ref, x, weight)
    assert o1.shape == (shape[0], shape[1], 5, DIM)
    assert_close(o1, o2, name="output", atol=5e-5)
    assert_close(gx1, gx2, name="grad x", atol=5e-5)
    assert set(p1) == set(p2)
    for name in p2:
        assert_close(p1[name], p2[name], name=f"grad {name}", atol=2e-4)


def test_resampler_without_time_embeddings_has_none():
    resampler = vlmcore.PerceiverResampler(DIM, depth=1, dim_head=DIM_HEAD, heads=HEADS, num_latents=3)
    assert resampler.frame_embs is None and resampler.media_time_embs is None
    assert resampler(torch.randn(2, 5, 2, 4, DIM)).shape == (2, 5, 3, DIM)


def test_resampler_media_mask_equals_dropping_the_padding():
    ours, _ = _resampler_pair()
    x = torch.randn(1, 2, 1, 9, DIM)
    mask = torch.ones(1, 2, 9, dtype=torch.bool)
    mask[0, 1, 6:] = False  # media 1: only its first 6 tokens are real
    with torch.no_grad():
        masked = ours(x, media_mask=mask)
        full_first = ours(x[:, :1])
        # media 0 is kept in front so that media 1 keeps its media-time embedding
        both_truncated = ours(x[:, :, :, :6])
    assert_close(masked[:, 0], full_first[:, 0], name="unmasked media", atol=1e-5)
    assert_close(masked[:, 1], both_truncated[:, 1], name="masked media", atol=1e-5)


def test_resampler_gradient_checkpointing_same_result():
    ours, _ = _resampler_pair()
    x, weight = torch.randn(2, 2, 2, 7, DIM), torch.randn(2, 2, 5, DIM)
    o1, gx1, p1 = _run_with_grads(ours, x, weight)
    ours.zero_grad()
    ours.gradient_checkpointing = True
    o2, gx2, p2 = _run_with_grads(ours, x, weight)
    assert torch.equal(o1, o2)
    assert_close(gx2, gx1, name="grad x", atol=1e-6)
    for name in p1:
        assert_close(p2[name], p1[name], name=f"grad {name}", atol=1e-6)


def test_resampler_rejects_too_many_frames_or_media():
    ours, _ = _resampler_pair()
    with pytest.raises(ValueError, match="max_num_frames"):
        ours(torch.randn(1, 1, 4, 2, DIM))
    with pytest.raises(ValueError, match="max_num_media"):
        ours(torch.randn(1, 5, 1, 2, DIM))
    with pytest.raises(ValueError, match=r"\[B, T, F, v, dim\]"):
        ours(torch.randn(1, 2, DIM))


def test_resampler_triton_backend_agrees_with_reference(device):
    """Tiny shape: the triton backend runs the kernel in the interpreter on CPU, compiled on CUDA."""
    resampler = vlmcore.PerceiverResampler(32, depth=1, dim_head=16, heads=2, num_latents=4, ff_mult=1).to(device)
    x = torch.randn(2, 1, 1, 6, 32, device=device)
    weight = torch.randn(2, 1, 4, 32, device=device)
    results = {}
    for name in ("reference", "triton"):
        resampler.zero_grad()
        with backend(name):
            results[name] = _run_with_grads(resampler, x, weight)
    o1, gx1, p1 = results["triton"]
    o2, gx2, p2 = results["reference"]
    assert_close(o1, o2, name="output", atol=1e-4)
    assert_close(gx1, gx2, name="grad x", atol=1e-4)
    assert_close(p1["latents"], p2["latents"], name="grad latents", atol=1e-4)


@pytest.mark.parametrize("arg", ["dim", "depth", "dim_head", "heads", "num_latents", "max_num_media",
                                 "max_num_frames"])
def test_resampler_rejects_nonpositive_sizes(arg):
    sizes = dict(dim=DIM, depth=1, dim_head=DIM_HEAD, heads=HEADS, num_latents=4)
    sizes[arg] = 0
    with pytest.raises(ValueError, match=arg):
        vlmcore.PerceiverResampler(**sizes)


def test_resampler_rejects_wrong_feature_dim_rank_and_mask():
    ours, _ = _resampler_pair()
    with pytest.raises(ValueError, match=f"dim={DIM}"):
        ours(torch.randn(1, 2, 1, 3, DIM + 1))
    with pytest.raises(ValueError, match=r"\[B, T, F, v, dim\]"):
        ours(torch.randn(1, 2, 3, DIM))  # 4-D: the frame axis is missing
    with pytest.raises(TypeError, match="x must be"):
        ours([[1.0]])
    with pytest.raises(ValueError, match="media_mask"):
        ours(torch.randn(1, 2, 1, 3, DIM), media_mask=torch.ones(1, 2, 4, dtype=torch.bool))
    attn = vlmcore.PerceiverAttention(DIM, dim_head=DIM_HEAD, heads=HEADS)
    with pytest.raises(ValueError, match="latents"):
        attn(torch.randn(1, 2, 3, DIM), torch.randn(1, 2, 4, DIM - 1))
