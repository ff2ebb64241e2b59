"""Benchmark of one ViLBERT co-attention block (both directions, masks on both sides), fwd + bwd.

Providers: ``vlmcore`` (:class:`vlmcore.CoAttentionLayer`, both attentions through the fused
resampler kernel with the other stream's padding mask), ``reference`` (the same layer with the
plain-PyTorch reference op), ``sdpa`` (the same layer and weights, attention by
``scaled_dot_product_attention`` with a boolean key mask: what a PyTorch user writes).

Shapes (ANCHORS.md §6): ViLBERT pre-training (B 512, 36 regions, 36 text tokens) and a
long-region fine-tuning shape (B 64, 101 regions, 128 tokens); visual 1024 wide, text 768,
co-attention 1024 = 8 heads x 128. Every sample has its last two regions and last text token
padded (a real batch is padded).

Floors: the block's matmul FLOPs (6 projections to the co-attention width, 2 back, 2 feed-forwards
per stream, both attention directions: 4 Lq Lk W per direction forward); backward 2x forward.
Bytes: both streams' inputs, outputs and their gradients once, and every weight (+ its gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmcore.vilbert import CoAttentionLayer

from . import providers as peers
from .harness import Case, Gate, Provider, RunContext, run_op

OP = "vilbert_coattn"
# (B, regions, text tokens, visual width, text width, co-attention width, heads, v / t FFN widths)
GPU_SHAPES = (
    (512, 36, 36, 1024, 768, 1024, 8, 1024, 3072),
    (64, 101, 128, 1024, 768, 1024, 8, 1024, 3072),
)
QUICK_SHAPES = ((4, 7, 6, 32, 32, 32, 2, 48, 64),)


def floors(batch, regions, length, v_width, t_width, bi_width, heads, v_ffn, t_ffn, element_size):
    v_tokens, t_tokens = batch * regions, batch * length
    linear = (v_tokens * (3 * v_width * bi_width + bi_width * v_width + 2 * v_width * v_ffn)
              + t_tokens * (3 * t_width * bi_width + bi_width * t_width + 2 * t_width * t_ffn))
    attention = 2 * batch * regions * length * bi_width  # scores + weighted sum, per direction
    fwd = 2.0 * linear + 2.0 * 2 * attention
    weights = (3 * (v_width + t_width) * bi_width + bi_width * (v_width + t_width) + 2 * v_width * v_ffn
               + 2 * t_width * t_ffn)
    activations = v_tokens * v_width + t_tokens * t_width
    flops = {"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}
    nbytes = {"fwd": (2.0 * activations + weights) * element_size,
              "bwd": (2.0 * activations + 2.0 * weights) * element_size,
              "fwd_bwd": (4.0 * activations + 2.0 * weights) * element_size}
    return flops, nbytes


def make_case(batch, regions, length, v_width, t_width, bi_width, heads, v_ffn, t_ffn, ctx: RunContext) -> Case:
    def make_inputs():
        torch.manual_seed(batch * regions + length)
        layer = CoAttentionLayer(v_width, t_width, bi_width, heads, v_ffn, t_ffn, dropout=0.0, eps=1e-12)
        layer = layer.to(ctx.device, ctx.dtype)
        visual = torch.randn(batch, regions, v_width, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        text = torch.randn(batch, length, t_width, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
        visual_mask = torch.ones(batch, regions, dtype=torch.bool, device=ctx.device)
        visual_mask[:, -2:] = False
        text_mask = torch.ones(batch, length, dtype=torch.bool, device=ctx.device)
        text_mask[:, -1] = False
        return {"layer": layer, "visual": visual, "visual_mask": visual_mask, "text": text, "text_mask": text_mask}

    flops, nbytes = floors(batch, regions, length, v_width, t_width, bi_width, heads, v_ffn, t_ffn,
                           torch.tensor([], dtype=ctx.dtype).element_size())
    shape = f"B={batch} R={regions} L={length} Wv={v_width} Wt={t_width} Wbi={bi_width} H={heads}"
    return Case(shape=shape, x=regions, make_inputs=make_inputs, flops=flops, bytes=nbytes)


def sdpa_attend(q, k, v, key_mask, heads):
    """:func:`vlmcore.vilbert.attend`'s contract on ``scaled_dot_product_attention`` with a bool mask."""
    b, lq, width = q.shape
    q, k, v = (t.view(b, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, lq, width)


def _block(attention):
    def build(case, inputs):
        layer = inputs["layer"]
        if attention is not None:
            layer.attention = attention

        def fn():
            visual, text = layer(inputs["visual"], inputs["visual_mask"], inputs["text"], inputs["text_mask"])
            return torch.cat([visual.flatten(), text.flatten()])

        return fn

    return build


PROVIDERS = [
    Provider("vlmcore", _block(None), backend="triton"),
    Provider("reference", _block(None), backend="reference"),
    Provider("sdpa", _block(sdpa_attend), check=peers.check_sdpa),
]


def cases(ctx: RunContext) -> list[Case]:
    shapes = QUICK_SHAPES if ctx.quick else GPU_SHAPES
    return [make_case(*shape, ctx) for shape in shapes]


def run(ctx: RunContext) -> None:
    """Gated against the reference op on the same layer (its weights are in the run's dtype)."""
    run_op(OP, cases(ctx), PROVIDERS, ctx, gate=Gate(PROVIDERS[1], upcast=False))
