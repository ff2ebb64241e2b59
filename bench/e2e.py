"""End-to-end training steps: the same model on vlmcore's kernels and on the reference ops.

(a) Flamingo over a frozen Llama-shaped LM built from a config (random weights, no download):
    about 1B parameters on a GPU (hidden 2048, 16 layers), a gated cross-attention block every 4
    layers, 5 images x 64 latents per sample, text length 512, ViT-L-sized visual tokens
    (257 x 1024) given as inputs through a pass-through vision encoder.
(b) CLIP at large batch (32768 pairs on a GPU): pooled ViT-L-sized image features (1024) given
    as inputs, a 2-layer text transformer over 32 tokens, the fused contrastive loss.

One step = forward, backward, ``AdamW.step`` over the trainable parameters (the bridge for
Flamingo; everything but the frozen image features for CLIP), parameters in the run's dtype.
Provider ``vlmcore`` runs every op through its Triton kernel (``backend("triton")``), provider
``reference`` runs the same model and inputs under ``backend("reference")``.

Rows: ``mode=train_step`` with ms per step, throughput (tokens/s for Flamingo, samples/s for CLIP)
and peak memory (total allocated at the step's peak: weights, optimizer state, activations);
``mode=max_batch`` with the largest batch that fit (doubling, then bisection, bounded in time and
in probes; GPU only). Tiny configs on CPU / with ``--quick``.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from vlmcore.kernels import backend

from .harness import RunContext, first_line, free_memory, is_oom, synchronize, time_call
from .results import dtype_name

OP_FLAMINGO, OP_CLIP = "e2e_flamingo", "e2e_clip"
PROVIDERS = (("vlmcore", "triton"), ("reference", "reference"))

FLAMINGO_GPU = dict(hidden=2048, layers=16, heads=16, intermediate=5632, vocab=32000, every=4, images=5,
                    latents=64, resampler_depth=6, dim_head=64, xattn_heads=8, vis_tokens=257, vis_dim=1024,
                    length=512, batch=8, max_batch=512)
FLAMINGO_QUICK = dict(hidden=64, layers=4, heads=4, intermediate=128, vocab=128, every=4, images=2,
                      latents=16, resampler_depth=1, dim_head=32, xattn_heads=2, vis_tokens=17, vis_dim=32,
                      length=32, batch=2, max_batch=2)
CLIP_GPU = dict(embed=768, image_width=1024, text_width=512, text_depth=2, text_heads=8, context=32, vocab=49408,
                batch=32768, max_batch=1 << 21)
CLIP_QUICK = dict(embed=32, image_width=48, text_width=32, text_depth=1, text_heads=2, context=8, vocab=64,
                  batch=64, max_batch=64)
MAX_BATCH_PROBES = 8


class PrecomputedTokens(nn.Module):
    """A vision "encoder" that passes precomputed tokens through.

    Flamingo reshapes ``vision_x [B, T, F, C, H, W]`` to ``[N, C, H, W]`` before its encoder; the
    benchmark feeds tokens as ``[B, T, F, v, D, 1]`` and this returns ``[N, v, D]`` (and, as the
    pooled form CLIP uses, ``[N, D]`` inputs unchanged).
    """

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.pooled_width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 0] if x.dim() == 4 else x

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return x


def build_flamingo(cfg: dict, device: torch.device, dtype: torch.dtype):
    """The Flamingo model of ``cfg`` over a randomly initialized Llama (frozen), on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmcore import Flamingo

    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["heads"], max_position_embeddings=max(2048, cfg["length"]))
    with torch.device(device):
        lang_model = LlamaForCausalLM(config).to(dtype)
        model = Flamingo(PrecomputedTokens(cfg["vis_dim"]), lang_model, media_token_id=cfg["vocab"] - 1,
                         vis_dim=cfg["vis_dim"], cross_attn_every_n_layers=cfg["every"],
                         num_latents=cfg["latents"], resampler_depth=cfg["resampler_depth"],
                         dim_head=cfg["dim_head"], heads=cfg["xattn_heads"])
    with torch.no_grad():  # open the gates a little: at 0 the blocks would be skipped by the gradient
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(0.1)
            block.ff_gate.fill_(0.1)
    return model


def flamingo_batch(cfg: dict, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """Visual tokens, text with ``<image>`` tokens evenly spaced (the first at position 0), labels."""
    generator = torch.Generator(device=device).manual_seed(batch)
    media_id, length, images = cfg["vocab"] - 1, cfg["length"], cfg["images"]
    vision_x = torch.randn(batch, images, 1, cfg["vis_tokens"], cfg["vis_dim"], 1, device=device,
                           generator=generator).to(dtype)
    lang_x = torch.randint(0, media_id, (batch, length), device=device, generator=generator)
    lang_x[:, torch.arange(images) * length // images] = media_id
    labels = lang_x.masked_fill(lang_x == media_id, -100)
    return {"vision_x": vision_x, "lang_x": lang_x, "attention_mask": torch.ones_like(lang_x), "labels": labels}


def build_clip(cfg: dict, device: torch.device, dtype: torch.dtype):
    from vlmcore import CLIP

    with torch.device(device):
        model = CLIP(cfg["embed"], vision_encoder=PrecomputedTokens(cfg["image_width"]), vocab_size=cfg["vocab"],
                     context_length=cfg["context"], text_width=cfg["text_width"], text_depth=cfg["text_depth"],
                     text_heads=cfg["text_heads"])
    return model.to(dtype)


def clip_batch(cfg: dict, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator(device=device).manual_seed(batch)
    images = torch.randn(batch, cfg["image_width"], device=device, generator=generator).to(dtype)
    tokens = torch.randint(1, cfg["vocab"], (batch, cfg["context"]), device=device, generator=generator)
    return {"images": images, "tokens": tokens}


def _flamingo_loss(model, inputs):
    return model(**inputs).loss


def _clip_loss(model, inputs):
    return model(inputs["images"], inputs["tokens"])["loss"]


def make_step(model: nn.Module, loss_fn, inputs: dict, device: torch.device):
    """One training step closure: zero grads, forward, backward, AdamW step (the optimizer lives in it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model, inputs).backward()
        optimizer.step()

    return step


def _probe_step(step, device: torch.device) -> tuple[float, float]:
    """One timed step: ``(total CUDA memory allocated at its peak in MiB (NaN on CPU), wall ms)``."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3
    return (torch.cuda.max_memory_allocated(device) / 2**20 if cuda else math.nan), wall_ms


def _fits(model, loss_fn, make_inputs, batch: int, device: torch.device) -> bool:
    step = inputs = None
    try:
        inputs = make_inputs(batch)
        step = make_step(model, loss_fn, inputs, device)
        step()
        synchronize(device)
        return True
    except Exception as error:
        if is_oom(error):
            return False
        raise
    finally:
        del step, inputs
        model.zero_grad(set_to_none=True)
        free_memory(device)


def largest_batch(model, loss_fn, make_inputs, start: int, cap: int, device: torch.device, deadline: float):
    """Largest batch whose step fits: double from ``start`` until OOM or ``cap``, then bisect.

    Returns ``(batch, note)``; bounded by :data:`MAX_BATCH_PROBES` probes and ``deadline``.
    """
    fit, failed, probes = 0, None, 0
    batch = start
    while probes < MAX_BATCH_PROBES and time.monotonic() < deadline:
        probes += 1
        if _fits(model, loss_fn, make_inputs, batch, device):
            fit = batch
            if failed is None:
                if batch >= cap:
                    return fit, f"fits at the cap {cap}"
                batch = min(2 * batch, cap)
                continue
        else:
            failed = batch
        if failed is not None:
            if failed - fit <= max(1, fit // 16):
                return fit, f"OOM at {failed} ({probes} probes)"
            batch = (fit + failed) // 2 if fit else max(1, failed // 2)
    bound = f"OOM at {failed}" if failed is not None else "no OOM yet"
    return fit, f"search stopped after {probes} probes ({bound}): lower bound"


def _run_model(op: str, unit_name: str, build, make_batch, loss_fn, cfg: dict, items_per_sample: int,
               ctx: RunContext) -> None:
    shape_keys = ("batch", "length", "images", "hidden", "layers") if op == OP_FLAMINGO else (
        "batch", "embed", "text_depth", "context")
    shape = " ".join(f"{key}={cfg[key]}" for key in shape_keys)
    dtype = dtype_name(ctx.dtype)
    model = None
    try:
        model = build(cfg, ctx.device, ctx.dtype)
    except Exception as error:
        status = "oom" if is_oom(error) else "error"
        for provider, _ in PROVIDERS:
            ctx.emit(op, provider, shape, "train_step", status, dtype=dtype, notes=f"model build: {first_line(error)}")
        return
    for provider, backend_name in PROVIDERS:
        if ctx.out_of_time():
            ctx.emit(op, provider, shape, "train_step", "skipped", dtype=dtype, x=cfg["batch"],
                     notes="time budget of this run spent")
            continue
        fields, status = {}, "ok"
        try:
            with backend(backend_name):
                inputs = make_batch(cfg, cfg["batch"], ctx.device, ctx.dtype)
                step = make_step(model, loss_fn, inputs, ctx.device)
                step()  # warm-up: compile, autotune, optimizer state
                peak, probe = _probe_step(step, ctx.device)
                (p50, p20, p80), how = time_call(step, [], ctx, probe)
            fields = dict(ms_p50=p50, ms_p20=p20, ms_p80=p80, peak_mib=peak,
                          throughput=cfg["batch"] * items_per_sample / (p50 / 1e3), unit=unit_name,
                          notes=f"{how}; peak = total allocated (weights, optimizer, activations)")
        except Exception as error:
            status = "oom" if is_oom(error) else "error"
            fields = {"notes": first_line(error)}
        finally:
            step = inputs = None
            model.zero_grad(set_to_none=True)
            free_memory(ctx.device)
        ctx.emit(op, provider, shape, "train_step", status, dtype=dtype, x=cfg["batch"], **fields)
    if not ctx.cuda:
        return
    for index, (provider, backend_name) in enumerate(PROVIDERS):
        # what is left of this op's budget, shared by the providers still to search
        deadline = time.monotonic() + max(0.0, ctx.deadline - time.monotonic()) / (len(PROVIDERS) - index)
        if ctx.out_of_time():
            ctx.emit(op, provider, shape, "max_batch", "skipped", dtype=dtype, notes="time budget of this run spent")
            continue
        try:
            with backend(backend_name):
                batch, note = largest_batch(model, loss_fn, lambda b: make_batch(cfg, b, ctx.device, ctx.dtype),
                                            cfg["batch"], cfg["max_batch"], ctx.device, deadline)
            ctx.emit(op, provider, shape, "max_batch", "ok", dtype=dtype, x=batch, notes=note)
        except Exception as error:
            ctx.emit(op, provider, shape, "max_batch", "error", dtype=dtype, notes=first_line(error))
    del model
    free_memory(ctx.device)


def _models_missing() -> str | None:
    try:
        import vlmcore

        missing = [name for name in ("Flamingo", "CLIP") if not hasattr(vlmcore, name)]
    except Exception as error:
        return f"vlmcore models do not import: {type(error).__name__}: {error}"
    if missing:
        return f"vlmcore has no {', '.join(missing)} in this checkout"
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        return f"transformers not importable ({error}); the Flamingo LM is built from a transformers config"
    return None


def run(ctx: RunContext) -> None:
    reason = _models_missing()
    quick = ctx.quick or not ctx.cuda
    flamingo_cfg = FLAMINGO_QUICK if quick else FLAMINGO_GPU
    clip_cfg = CLIP_QUICK if quick else CLIP_GPU
    if reason is not None:
        for op in (OP_FLAMINGO, OP_CLIP):
            for provider, _ in PROVIDERS:
                ctx.emit(op, provider, "", "train_step", "unavailable", notes=reason)
        return
    op_deadline = ctx.deadline
    remaining = op_deadline - time.monotonic()
    if math.isfinite(remaining):  # Flamingo gets 60% of e2e's budget, CLIP the rest
        ctx.deadline = time.monotonic() + 0.6 * remaining
    _run_model(OP_FLAMINGO, "tokens/s", build_flamingo, flamingo_batch, _flamingo_loss, flamingo_cfg,
               flamingo_cfg["length"], ctx)
    ctx.deadline = op_deadline
    _run_model(OP_CLIP, "samples/s", build_clip, clip_batch, _clip_loss, clip_cfg, 1, ctx)
