"""Benchmark of Flamingo masked per-image cross-attention.

Providers: ``vlmcore`` (block-sparse kernel), ``reference`` (OpenFlamingo einsum over every media
token + mask), ``sdpa`` (``scaled_dot_product_attention`` with a boolean mask), ``flex_attention``
(compiled, block mask built once per batch; on the first anchor shape only unless half of the
op's time budget is left: it compiles once per shape), ``flash_attn`` (FlashAttention-2 varlen, one segment
per sample x image: the ``flash_attn`` package, else torch's ``varlen_attn``), ``xformers``
(``BlockDiagonalMask``). Masks, sequence offsets and block masks are per-batch work done in
``build``, outside the timed call; gathering and zero-filling tokens that have no image is inside.

Layout of the benchmark batches: M images per sample evenly spaced, the first at position 0, so
image j owns text positions [j L / M, (j + 1) L / M) and every token has an image.

Floors: with P = (query, key) pairs that must be scored (``immediate``: R per token and head;
``all_previous``: R (index + 1)), forward 4 P Dh FLOPs, backward 10 P Dh, both 14 P Dh. Bytes:
q, k, v, o once forward (2 |q| + 2 |k|); q, o, do, dq, k, v, dk, dv once otherwise (4 |q| + 4 |k|).
"""

from __future__ import annotations

import torch
from vlmcore.kernels import masked_cross_attention
from vlmcore.kernels.reference import masked_cross_attention_reference

from . import providers as peers
from .harness import Case, Gate, Provider, RunContext, Unavailable, Unsupported, run_op

OP = "masked_xattn"
# (B, L, M, R, H, Dh, attend)
ANCHOR_SHAPES = (
    (16, 512, 5, 64, 8, 64, "immediate"),     # OpenFlamingo-9B training
    (4, 4096, 32, 64, 32, 128, "immediate"),  # long interleaved documents
)
# The ANCHORS shapes for ``python -m vlmcore.bench plan`` (keyword arguments of
# masked_cross_attention_plan; media layout: its default, image j owns positions [j L / M, (j + 1) L / M)).
PLAN_SHAPES = [dict(zip(("batch", "length", "num_media", "tokens", "heads", "head_dim", "mode"), shape))
               for shape in ANCHOR_SHAPES]
SWEEP_IMAGES = (1, 6, 16, 33)  # images per sample, on the OpenFlamingo-9B shape
ALL_PREVIOUS_SHAPES = ((16, 512, 5, 64, 8, 64, "all_previous"),)
QUICK_SHAPES = ((2, 48, 3, 16, 2, 32, "immediate"), (2, 48, 3, 16, 2, 32, "all_previous"))


def media_index_layout(batch: int, length: int, num_media: int) -> torch.Tensor:
    """int64 ``[B, L]``: image j owns positions ``[j L / M, (j + 1) L / M)``; every token has an image."""
    return (torch.arange(length) * num_media // length).expand(batch, length).contiguous()


def floors(media_index: torch.Tensor, num_media: int, tokens: int, heads: int, head_dim: int, attend: str,
           element_size: int) -> tuple[dict[str, float], dict[str, float]]:
    """Minimum FLOPs and bytes per mode (see the module docstring)."""
    valid = media_index >= 0
    keys_per_query = tokens if attend == "immediate" else tokens * (media_index + 1)
    pairs = float((valid * keys_per_query).sum()) * heads
    q_elems = media_index.numel() * heads * head_dim
    k_elems = media_index.shape[0] * num_media * tokens * heads * head_dim
    flops = {"fwd": 4 * pairs * head_dim, "bwd": 10 * pairs * head_dim, "fwd_bwd": 14 * pairs * head_dim}
    nbytes = {"fwd": 2.0 * (q_elems + k_elems) * element_size,
              "bwd": 4.0 * (q_elems + k_elems) * element_size,
              "fwd_bwd": 4.0 * (q_elems + k_elems) * element_size}
    return flops, nbytes


def make_case(batch, length, num_media, tokens, heads, head_dim, attend, ctx: RunContext, x=None) -> Case:
    index = media_index_layout(batch, length, num_media)

    def make_inputs():
        generator = torch.Generator(device=ctx.device).manual_seed(batch * length + num_media)

        def rand(*shape):
            return torch.randn(*shape, device=ctx.device, generator=generator).to(ctx.dtype).requires_grad_()

        return {
            "q": rand(batch, length, heads, head_dim),
            "k": rand(batch, num_media * tokens, heads, head_dim),
            "v": rand(batch, num_media * tokens, heads, head_dim),
            "media_index": index.to(ctx.device),
        }

    flops, nbytes = floors(index, num_media, tokens, heads, head_dim, attend,
                           torch.tensor([], dtype=ctx.dtype).element_size())
    shape = f"B={batch} L={length} M={num_media} R={tokens} H={heads} Dh={head_dim} attend={attend}"
    return Case(shape=shape, x=num_media if x is None else x, make_inputs=make_inputs, flops=flops, bytes=nbytes,
                meta={"R": tokens, "M": num_media, "attend": attend})


def _vlmcore(case, inputs):
    q, k, v, index = inputs["q"], inputs["k"], inputs["v"], inputs["media_index"]
    return lambda: masked_cross_attention(q, k, v, index, case.meta["R"], mode=case.meta["attend"])


def _reference(case, inputs):
    q, k, v, index = inputs["q"], inputs["k"], inputs["v"], inputs["media_index"]
    return lambda: masked_cross_attention_reference(q, k, v, index, case.meta["R"], mode=case.meta["attend"])


def allowed_keys(media_index: torch.Tensor, num_keys: int, tokens: int, attend: str) -> torch.Tensor:
    """bool ``[B, 1, L, M*R]``: which keys each query may attend (the dense mask SDPA needs)."""
    media_of_key = torch.arange(num_keys, device=media_index.device) // tokens
    index = media_index[:, :, None]
    allowed = media_of_key == index if attend == "immediate" else media_of_key <= index
    return (allowed & (index >= 0))[:, None]


def _sdpa(case, inputs):
    q, k, v, index = inputs["q"], inputs["k"], inputs["v"], inputs["media_index"]
    if bool((index < 0).any()):
        raise Unsupported("SDPA gives NaN for queries with no key (tokens before the first image)")
    mask = allowed_keys(index, k.shape[1], case.meta["R"], case.meta["attend"])
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return lambda: sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)


def block_mask(case, inputs):
    """FlexAttention block mask of the case's batch (built once, outside the timed region)."""
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, index = inputs["q"], inputs["k"], inputs["media_index"]
    tokens, immediate = case.meta["R"], case.meta["attend"] == "immediate"

    def mask_mod(b, h, q_idx, kv_idx):
        media = index[b, q_idx]
        key_media = kv_idx // tokens
        return ((key_media == media) if immediate else (key_media <= media)) & (media >= 0)

    return create_block_mask(mask_mod, q.shape[0], None, q.shape[1], k.shape[1], device=q.device)


def _check_flex(device: torch.device) -> None:
    peers.check_flex_attention(device)
    if device.type != "cuda":
        raise Unavailable(f"FlexAttention has no backward on CPU (torch {torch.__version__}); measured on CUDA only")


def _flex(case, inputs):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    mask = block_mask(case, inputs)
    flex = peers.compiled_flex_attention()
    return lambda: flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask).transpose(1, 2)


def varlen_segments(media_index: torch.Tensor, num_media: int, tokens: int):
    """One attention segment per (sample, image), as FlashAttention varlen / xformers want them.

    Returns ``(rows, q_lengths, cu_q, cu_k, max_q)``: ``rows`` the flat ``[B*L]`` positions that have
    an image (None when all do), ``q_lengths`` the query count of each segment (python ints),
    ``cu_q`` / ``cu_k`` int32 cumulative offsets (keys: R per image), ``max_q`` the longest segment.
    """
    batch = media_index.shape[0]
    flat = media_index.reshape(-1)
    valid = flat >= 0
    rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
    sample = torch.arange(batch, device=flat.device).repeat_interleave(media_index.shape[1])
    segment = (sample * num_media + flat)[valid]
    q_lengths = torch.bincount(segment, minlength=batch * num_media)
    cu_q = torch.zeros(batch * num_media + 1, dtype=torch.int32, device=flat.device)
    cu_q[1:] = q_lengths.cumsum(0)
    cu_k = torch.arange(batch * num_media + 1, dtype=torch.int32, device=flat.device) * tokens
    return rows, q_lengths.tolist(), cu_q, cu_k, int(q_lengths.max())


def _packed(q, k, v, rows):
    """``[B, L, H, Dh]`` queries packed to ``[T, H, Dh]`` (only rows with an image) and an unpacker."""
    batch, length, heads, head_dim = q.shape
    flat_q = q.reshape(batch * length, heads, head_dim)
    k_packed, v_packed = k.reshape(-1, heads, head_dim), v.reshape(-1, heads, head_dim)
    if rows is None:
        return flat_q, k_packed, v_packed, lambda out: out.reshape(batch, length, heads, head_dim)

    def unpack(out):
        full = out.new_zeros(batch * length, heads, head_dim).index_copy(0, rows, out)
        return full.reshape(batch, length, heads, head_dim)

    return flat_q.index_select(0, rows), k_packed, v_packed, unpack


def _varlen(case, inputs):
    if case.meta["attend"] != "immediate":
        raise Unsupported("varlen segments express attend=immediate only (all_previous keys overlap)")
    _name, varlen = peers.load_varlen()
    q, k, v, index = inputs["q"], inputs["k"], inputs["v"], inputs["media_index"]
    tokens = case.meta["R"]
    rows, _lengths, cu_q, cu_k, max_q = varlen_segments(index, case.meta["M"], tokens)

    def fn():
        q_packed, k_packed, v_packed, unpack = _packed(q, k, v, rows)
        return unpack(varlen(q_packed, k_packed, v_packed, cu_q, cu_k, max_q, tokens))

    return fn


def _xformers(case, inputs):
    if case.meta["attend"] != "immediate":
        raise Unsupported("BlockDiagonalMask expresses attend=immediate only")
    attention, block_diagonal = peers.load_xformers()
    q, k, v, index = inputs["q"], inputs["k"], inputs["v"], inputs["media_index"]
    tokens = case.meta["R"]
    rows, lengths, _cu_q, _cu_k, _max_q = varlen_segments(index, case.meta["M"], tokens)
    bias = block_diagonal.from_seqlens(lengths, [tokens] * len(lengths))

    def fn():
        q_packed, k_packed, v_packed, unpack = _packed(q, k, v, rows)
        return unpack(attention(q_packed[None], k_packed[None], v_packed[None], attn_bias=bias)[0])

    return fn


PROVIDERS = [
    Provider("vlmcore", _vlmcore, backend="triton"),
    Provider("reference", _reference, backend="reference"),
    Provider("sdpa", _sdpa, check=peers.check_sdpa),
    Provider("flex_attention", _flex, check=_check_flex, anchor_only=True),
    Provider("flash_attn", _varlen, check=peers.check_varlen),
    Provider("xformers", _xformers, check=peers.check_xformers),
]


def cases(ctx: RunContext) -> list[Case]:
    if ctx.quick:
        return [make_case(*shape, ctx) for shape in QUICK_SHAPES]
    batch, length, _m, tokens, heads, head_dim, attend = ANCHOR_SHAPES[0]
    sweep = [make_case(batch, length, m, tokens, heads, head_dim, attend, ctx) for m in SWEEP_IMAGES]
    return ([make_case(*shape, ctx) for shape in ANCHOR_SHAPES] + sweep
            + [make_case(*shape, ctx) for shape in ALL_PREVIOUS_SHAPES])


def run(ctx: RunContext) -> None:
    run_op(OP, cases(ctx), PROVIDERS, ctx, gate=Gate(PROVIDERS[1]))
