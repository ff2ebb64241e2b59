"""Benchmark of the SigLIP pairwise sigmoid loss.

Providers:

- ``vlmcore``: :func:`vlmcore.kernels.sigmoid_contrastive_loss` (never the logits; gradients formed
  in the forward, so its ``fwd`` row includes the gradient products when inputs need gradients, and
  its ``bwd`` row is only the scaling of the saved gradients);
- ``reference``: OpenCLIP ``SigLipLoss`` math, the n x n logits materialized in fp32 (ours:
  :func:`vlmcore.kernels.reference.sigmoid_contrastive_loss_reference`, its oracle);
- ``openclip_chunked``: the same math evaluated the way OpenCLIP's distributed ``SigLipLoss`` walks
  blocks (``_loss`` of the diagonal block, then ``negative_only`` blocks), here over column chunks of
  ``CHUNK`` in one process: smaller temporaries, but autograd keeps every chunk's fp32 logits alive;
- ``siglip_kernel``: PyPI ``siglip-kernel`` 0.1.1 ``fused_siglip_loss`` (optional peer, CUDA only;
  written as unavailable with the reason otherwise). It takes the log-scale t' itself.

Every provider gets the same leaves: features, the log-scale t' (s = exp t') and the bias b.
Floors: forward 2 n^2 d (the loss alone), backward 4 n^2 d (two gradient products), forward +
backward 6 n^2 d (ANCHORS.md section 4). Bytes: features read once (2 n d elements) forward; read
once and their gradients written once (4 n d) otherwise.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from vlmcore.kernels import sigmoid_contrastive_loss
from vlmcore.kernels.reference import sigmoid_contrastive_loss_reference

from .harness import Case, Gate, Provider, RunContext, Unavailable, run_op

OP = "sigmoid"
GPU_SIZES = (8192, 32768, 65536, 131072)
QUICK_SIZES = (48, 96)
HUGE_N = 1_048_576  # "runs on one GPU" (issue 12), vlmcore only
DIM = 768
QUICK_DIM = 32
CHUNK = 8192
GATE_MAX_N = 32768  # larger n are gated here: the fp32 reference's logits grow as n^2
QUICK_CHUNK = 32


def floors(n: int, d: int, element_size: int) -> tuple[dict[str, float], dict[str, float]]:
    """Minimum FLOPs and bytes per mode for n pairs of d-dim features."""
    flops = {"fwd": 2.0 * n * n * d, "bwd": 4.0 * n * n * d, "fwd_bwd": 6.0 * n * n * d}
    nbytes = {"fwd": 2.0 * n * d * element_size, "bwd": 4.0 * n * d * element_size,
              "fwd_bwd": 4.0 * n * d * element_size}
    return flops, nbytes


def make_case(n: int, d: int, ctx: RunContext) -> Case:
    def make_inputs():
        generator = torch.Generator(device=ctx.device).manual_seed(n)
        image = torch.randn(n, d, device=ctx.device, generator=generator)
        text = image + 0.5 * torch.randn(n, d, device=ctx.device, generator=generator)
        return {
            "image": F.normalize(image, dim=-1).to(ctx.dtype).requires_grad_(),
            "text": F.normalize(text, dim=-1).to(ctx.dtype).requires_grad_(),
            "log_scale": torch.tensor(math.log(10.0), device=ctx.device).requires_grad_(),
            "bias": torch.tensor(-10.0, device=ctx.device).requires_grad_(),
        }

    flops, nbytes = floors(n, d, torch.tensor([], dtype=ctx.dtype).element_size())
    meta = {"chunk": QUICK_CHUNK if ctx.quick else CHUNK}
    if n > GATE_MAX_N:
        meta["gate_case"] = make_case(GATE_MAX_N, d, ctx)
    return Case(shape=f"n={n} d={d}", x=n, make_inputs=make_inputs, flops=flops, bytes=nbytes, meta=meta)


def _vlmcore(case, inputs):
    return lambda: sigmoid_contrastive_loss(inputs["image"], inputs["text"], inputs["log_scale"].exp(),
                                            inputs["bias"])


def _reference(case, inputs):
    return lambda: sigmoid_contrastive_loss_reference(inputs["image"], inputs["text"], inputs["log_scale"].exp(),
                                                      inputs["bias"])


def chunked_loss(image, text, scale, bias, chunk: int) -> torch.Tensor:
    """OpenCLIP's block walk in one process: column chunks of ``chunk``, each block's ``_loss`` summed
    (positives only where the chunk holds the diagonal), divided by the local batch."""
    n = image.shape[0]
    total = image.new_zeros((), dtype=torch.float32)
    for start in range(0, text.shape[0], chunk):
        block = text[start:start + chunk]
        total = total + sigmoid_contrastive_loss_reference(image, block, scale, bias, positive_offset=-start,
                                                           normalizer=n)
    return total


def _openclip_chunked(case, inputs):
    return lambda: chunked_loss(inputs["image"], inputs["text"], inputs["log_scale"].exp(), inputs["bias"],
                                case.meta["chunk"])


def load_siglip_kernel():
    try:
        from siglip_kernel import fused_siglip_loss
    except Exception as error:
        raise Unavailable(f"siglip_kernel not importable (PyPI siglip-kernel): {type(error).__name__}: "
                          f"{error}") from error
    return fused_siglip_loss


def check_siglip_kernel(device: torch.device) -> None:
    load_siglip_kernel()
    if device.type != "cuda":
        raise Unavailable(f"siglip-kernel runs on CUDA only (this run is on {device.type})")


def _siglip_kernel(case, inputs):
    fused_siglip_loss = load_siglip_kernel()
    return lambda: fused_siglip_loss(inputs["image"], inputs["text"], inputs["log_scale"], inputs["bias"])


PROVIDERS = [
    Provider("vlmcore", _vlmcore, backend="triton"),
    Provider("reference", _reference, backend="reference"),
    Provider("openclip_chunked", _openclip_chunked, backend="reference"),
    Provider("siglip_kernel", _siglip_kernel, check=check_siglip_kernel),
]
GATE = Gate(PROVIDERS[1])


def cases(ctx: RunContext) -> list[Case]:
    if ctx.quick:
        return [make_case(n, QUICK_DIM, ctx) for n in QUICK_SIZES]
    return [make_case(n, DIM, ctx) for n in GPU_SIZES]


def run(ctx: RunContext) -> None:
    """vlmcore over every n first (then n = 1,048,576 on a GPU, as the contrastive benchmark does),
    then the peers (their largest shapes are the ones a spent time budget writes as ``skipped``)."""
    op_cases = cases(ctx)
    run_op(OP, op_cases, PROVIDERS[:1], ctx, gate=GATE)
    if ctx.cuda and not ctx.quick:
        _run_huge(ctx)
    run_op(OP, op_cases, PROVIDERS[1:], ctx)


def _run_huge(ctx: RunContext) -> None:
    """n = 2^20 forward + backward, vlmcore only, predicted from the largest measured n first."""
    shape = f"n={HUGE_N} d={DIM}"
    measured = [r for r in ctx.rows if r["op"] == OP and r["provider"] == "vlmcore" and r["mode"] == "fwd_bwd"
                and r["status"] == "ok"]
    if not measured:
        ctx.emit(OP, "vlmcore", shape, "fwd_bwd", "skipped", x=HUGE_N,
                 notes="no smaller fwd_bwd result to predict from")
        return
    largest = max(measured, key=lambda r: float(r["x"]))
    predicted_s = float(largest["ms_p50"]) / 1e3 * (HUGE_N / float(largest["x"])) ** 2
    remaining = ctx.deadline - time.monotonic()
    if 3 * predicted_s > remaining:
        ctx.emit(OP, "vlmcore", shape, "fwd_bwd", "skipped", x=HUGE_N,
                 notes=f"predicted {predicted_s:.1f} s per call, x3 calls > {remaining:.0f} s left in the budget")
        return
    saved_modes = ctx.modes
    ctx.modes = ("fwd_bwd",)
    try:
        run_op(OP, [make_case(HUGE_N, DIM, ctx)], PROVIDERS[:1], ctx, gate=GATE)
    finally:
        ctx.modes = saved_modes
