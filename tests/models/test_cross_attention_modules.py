"""MaskedCrossAttention / GatedCrossAttentionBlock vs a plain-PyTorch OpenFlamingo-style module.

The reference modules below follow OpenFlamingo's math (einsum over ALL media tokens + a time
mask) and parameter names; ours load their state dicts strictly and must give the same outputs
and gradients. One documented difference: in ``all_previous`` mode, OpenFlamingo lets tokens
before the first image attend every image uniformly; vlmcore gives them zero in both modes, so
the reference zeroes those rows in both modes.
"""

import pytest
import torch
from helpers.numerics import assert_close
from torch import nn
from vlmcore.kernels import backend, media_index_from_locations

import vlmcore


class RefMaskedCrossAttention(nn.Module):
    def __init__(self, dim, dim_visual, dim_head, heads, only_attend_immediate_media):
        super().__init__()
        inner = dim_head * heads
        self.heads, self.scale = heads, dim_head**-0.5
        self.only_immediate = only_attend_immediate_media
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, media, media_locations, use_cached_media=False):
        b, length, _ = x.shape
        num_media, r = media.shape[1:3]
        h = self.heads
        q = self.to_q(self.norm(x))
        k, v = self.to_kv(media.reshape(b, num_media * r, -1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))  # [b, h, n, d]
        sim = (q * self.scale) @ k.transpose(-1, -2)  # [b, h, L, M*R]
        text_time = media_locations.long().cumsum(dim=-1)  # [b, L]
        if use_cached_media:
            text_time = media_locations.long().sum(dim=-1, keepdim=True).expand(b, length)
        media_time = (torch.arange(num_media) + 1).repeat_interleave(r)  # [M*R]
        if self.only_immediate:
            mask = text_time[:, None, :, None] == media_time[None, None, None, :]
        else:
            mask = text_time[:, None, :, None] >= media_time[None, None, None, :]
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1).masked_fill((text_time == 0)[:, None, :, None], 0.0)
        out = (attn @ v).transpose(1, 2).reshape(b, length, -1)
        return self.to_out(out)


class RefGatedBlock(nn.Module):
    def __init__(self, dim, dim_visual, dim_head, heads, ff_mult, only_attend_immediate_media):
        super().__init__()
        self.attn = RefMaskedCrossAttention(dim, dim_visual, dim_head, heads, only_attend_immediate_media)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                                nn.Linear(dim * ff_mult, dim, bias=False))
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x, media, media_locations, use_cached_media=False):
        x = self.attn(x, media, media_locations, use_cached_media) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


DIM, DIM_VISUAL, DIM_HEAD, HEADS = 24, 20, 8, 3


def _locations(length, positions_per_sample):
    loc = torch.zeros(len(positions_per_sample), length, dtype=torch.bool)
    for b, positions in enumerate(positions_per_sample):
        loc[b, positions] = True
    return loc


def _grads(module, *tensors):
    named = {n: p.grad.clone() for n, p in module.named_parameters()}
    return named, [t.grad.clone() for t in tensors]


def _compare(ours, ref, x, media, run_ours, run_ref, grad_atol=2e-5):
    x1, m1 = x.clone().requires_grad_(), media.clone().requires_grad_()
    x2, m2 = x.clone().requires_grad_(), media.clone().requires_grad_()
    out = run_ours(ours, x1, m1)
    expected = run_ref(ref, x2, m2)
    assert_close(out, expected, name="output", atol=2e-5, rtol=1e-4)
    weight = torch.randn_like(expected)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    g_ours, (gx1, gm1) = _grads(ours, x1, m1)
    g_ref, (gx2, gm2) = _grads(ref, x2, m2)
    assert set(g_ours) == set(g_ref)
    for name in g_ref:
        assert_close(g_ours[name], g_ref[name], name=f"grad {name}", atol=grad_atol, rtol=1e-4)
    assert_close(gx1, gx2, name="grad x", atol=grad_atol, rtol=1e-4)
    assert_close(gm1, gm2, name="grad media", atol=grad_atol, rtol=1e-4)


@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all_previous"])
def test_masked_cross_attention_matches_openflamingo(immediate):
    ref = RefMaskedCrossAttention(DIM, DIM_VISUAL, DIM_HEAD, HEADS, immediate)
    ours = vlmcore.MaskedCrossAttention(DIM, DIM_VISUAL, dim_head=DIM_HEAD, heads=HEADS,
                                        only_attend_immediate_media=immediate)
    ours.load_state_dict(ref.state_dict(), strict=True)
    # sample 0: text before the first image, 3 images; sample 1: image at 0, only 1 of the 3 images used;
    # sample 2: no image at all (all-text row -> zero attention).
    locations = _locations(13, [[2, 6, 11], [0], []])
    x, media = torch.randn(3, 13, DIM), torch.randn(3, 3, 5, DIM_VISUAL)
    _compare(ours, ref, x, media,
             lambda m, a, b: m(a, b, media_locations=locations),
             lambda m, a, b: m(a, b, locations))


def test_masked_cross_attention_cached_media_and_index_forms():
    ref = RefMaskedCrossAttention(DIM, DIM_VISUAL, DIM_HEAD, HEADS, True)
    ours = vlmcore.MaskedCrossAttention(DIM, DIM_VISUAL, dim_head=DIM_HEAD, heads=HEADS)
    ours.load_state_dict(ref.state_dict())
    locations = _locations(7, [[1, 4], [3]])
    x, media = torch.randn(2, 7, DIM), torch.randn(2, 2, 4, DIM_VISUAL)
    _compare(ours, ref, x, media,
             lambda m, a, b: m(a, b, media_locations=locations, use_cached_media=True),
             lambda m, a, b: m(a, b, locations, use_cached_media=True))
    with torch.no_grad():
        by_locations = ours(x, media, media_locations=locations)
        by_index = ours(x, media, media_index=media_index_from_locations(locations))
        # neither form: every token attends the last image (= cached form with a mark on the last image)
        implicit = ours(x, media)
        explicit = ours(x, media, media_index=torch.full((2, 7), 1))
    assert torch.equal(by_locations, by_index)
    assert torch.equal(implicit, explicit)


@pytest.mark.parametrize("bad", [2, -2], ids=["too_large", "below_minus_one"])
def test_masked_cross_attention_rejects_out_of_range_index(bad):
    ours = vlmcore.MaskedCrossAttention(DIM, DIM_VISUAL, dim_head=DIM_HEAD, heads=HEADS)
    index = torch.zeros(1, 5, dtype=torch.int64)
    index[0, 3] = bad
    with pytest.raises(ValueError, match="media_index"):
        ours(torch.randn(1, 5, DIM), torch.randn(1, 2, 3, DIM_VISUAL), media_index=index)
    # more <image> marks than images, through media_locations
    with pytest.raises(ValueError, match="media_index"):
        every_token_an_image = torch.ones(1, 5, dtype=torch.bool)
        ours(torch.randn(1, 5, DIM), torch.randn(1, 2, 3, DIM_VISUAL), media_locations=every_token_an_image)


def test_masked_cross_attention_rejects_bad_shapes():
    ours = vlmcore.MaskedCrossAttention(DIM, DIM_VISUAL, dim_head=DIM_HEAD, heads=HEADS)
    with pytest.raises(ValueError, match="media"):
        ours(torch.randn(2, 5, DIM), torch.randn(1, 2, 3, DIM_VISUAL))
    with pytest.raises(ValueError, match="x must be"):
        ours(torch.randn(5, DIM), torch.randn(1, 2, 3, DIM_VISUAL))


def test_gated_block_is_identity_at_init():
    block = vlmcore.GatedCrossAttentionBlock(DIM, DIM_VISUAL, dim_head=DIM_HEAD, heads=HEADS)
    assert block.attn_gate.shape == (1,) and block.ff_gate.shape == (1,)
    x = torch.randn(2, 9, DIM, requires_grad=True)
    out = block(x, torch.randn(2, 2, 4, DIM_VISUAL), media_locations=_locations(9, [[0, 5], [3]]))
    assert torch.equal(out, x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    # at gates 0 only the gates themselves get a gradient
    assert block.attn_gate.grad.abs().item() > 0 and block.ff_gate.grad.abs().item() > 0
    assert all(float(p.grad.abs().max()) == 0.0 for n, p in block.named_parameters() if "gate" not in n)


@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all_previous"])
def test_gated_block_matches_openflamingo(immediate):
    ref = RefGatedBlock(DIM, DIM_VISUAL, DIM_HEAD, HEADS, 2, immediate)
    with torch.no_grad():
        ref.attn_gate.fill_(0.7)
        ref.ff_gate.fill_(-0.4)
    ours = vlmcore.GatedCrossAttentionBlock(DIM, DIM_VISUAL, dim_head=DIM_HEAD, heads=HEADS, ff_mult=2,
                                            only_attend_immediate_media=immediate)
    ours.load_state_dict(ref.state_dict(), strict=True)
    locations = _locations(11, [[3, 4, 9], [0, 10]])
    x, media = torch.randn(2, 11, DIM), torch.randn(2, 3, 6, DIM_VISUAL)
    _compare(ours, ref, x, media,
             lambda m, a, b: m(a, b, media_locations=locations),
             lambda m, a, b: m(a, b, locations))


def test_gated_block_triton_backend_agrees_with_reference(device):
    """Tiny shape: the triton backend runs the kernel in the interpreter on CPU, compiled on CUDA."""
    block = vlmcore.GatedCrossAttentionBlock(32, 16, dim_head=16, heads=2, ff_mult=2).to(device)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
        block.ff_gate.fill_(0.5)
    locations = _locations(9, [[1, 6], [4]]).to(device)
    x, media = torch.randn(2, 9, 32, device=device), torch.randn(2, 2, 5, 16, device=device)
    results = {}
    for name in ("reference", "triton"):
        block.zero_grad()
        xi = x.clone().requires_grad_()
        with backend(name):
            out = block(xi, media, media_locations=locations)
        out.square().sum().backward()
        results[name] = (out.detach(), xi.grad, block.attn.to_kv.weight.grad.clone())
    for got, expected, what in zip(results["triton"], results["reference"], ("output", "grad x", "grad to_kv")):
        assert_close(got, expected, name=what, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arg", ["dim", "dim_visual", "dim_head", "heads"])
@pytest.mark.parametrize("value", [0, -1])
def test_masked_cross_attention_rejects_bad_sizes(arg, value):
    sizes = dict(dim=DIM, dim_visual=DIM_VISUAL, dim_head=DIM_HEAD, heads=HEADS)
    sizes[arg] = value
    with pytest.raises(ValueError, match=arg):
        vlmcore.MaskedCrossAttention(**sizes)


def test_gated_block_rejects_bad_ff_mult():
    with pytest.raises(ValueError, match="ff_mult"):
        vlmcore.GatedCrossAttentionBlock(DIM, DIM_VISUAL, dim_head=DIM_HEAD, heads=HEADS, ff_mult=0)


def test_masked_cross_attention_rejects_wrong_widths_and_locations():
    ours = vlmcore.MaskedCrossAttention(DIM, DIM_VISUAL, dim_head=DIM_HEAD, heads=HEADS)
    x, media = torch.randn(2, 5, DIM), torch.randn(2, 2, 3, DIM_VISUAL)
    with pytest.raises(ValueError, match="x must be .*dim=24"):
        ours(torch.randn(2, 5, DIM + 1), media)
    with pytest.raises(ValueError, match="dim_visual=20"):
        ours(x, torch.randn(2, 2, 3, DIM_VISUAL + 1))
    with pytest.raises(ValueError, match="media_locations"):
        ours(x, media, media_locations=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="media_locations"):
        ours(x, media, media_locations=torch.full((2, 5), 0.5))
    with pytest.raises(TypeError, match="x and media"):
        ours(x.numpy(), media)
