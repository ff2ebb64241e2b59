"""Peers vlmcore is measured against, and why each one can or cannot run on this machine.

Every ``check_*`` raises :class:`~vlmcore.bench.harness.Unavailable` with the reason (not installed,
needs CUDA, its extensions do not load, ...); the benchmark writes that reason into the CSV instead
of dropping the provider. The ``load_*`` functions return the callable to benchmark.
"""

from __future__ import annotations

import functools

import torch

from .harness import Unavailable


def _needs_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Unavailable(f"{what} runs on CUDA only (this run is on {device.type})")


def check_sdpa(device: torch.device) -> None:
    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        raise Unavailable(f"torch {torch.__version__} has no scaled_dot_product_attention")


def check_flex_attention(device: torch.device) -> None:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as error:
        raise Unavailable(f"torch {torch.__version__} has no flex_attention ({error})") from error


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    """``torch.compile(flex_attention)``: the form FlexAttention is meant to be used (and fast) in."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    # One compile per benchmark shape: keep dynamo from falling back to eager after 8 of them.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return torch.compile(flex_attention, dynamic=False)


def load_varlen():
    """FlashAttention-2 varlen: ``(name, fn(q, k, v, cu_q, cu_k, max_q, max_k))``.

    The ``flash_attn`` package's ``flash_attn_varlen_func`` when importable, else torch's own
    ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 inside torch).
    """
    try:
        from flash_attn import flash_attn_varlen_func

        return "flash_attn.flash_attn_varlen_func", flash_attn_varlen_func
    except ImportError as flash_error:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError as torch_error:
            raise Unavailable(
                f"flash_attn not importable ({flash_error}) and torch {torch.__version__} has no "
                f"torch.nn.attention.varlen ({torch_error})"
            ) from torch_error
        return "torch.nn.attention.varlen.varlen_attn", varlen_attn


def check_varlen(device: torch.device) -> None:
    load_varlen()
    _needs_cuda(device, "FlashAttention varlen")


def load_xformers():
    """``(memory_efficient_attention, BlockDiagonalMask)`` from xformers."""
    try:
        from xformers.ops import memory_efficient_attention
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask
    except Exception as error:  # ImportError, or its extensions failing at import
        raise Unavailable(f"xformers not importable: {type(error).__name__}: {error}") from error
    return memory_efficient_attention, BlockDiagonalMask


def check_xformers(device: torch.device) -> None:
    """xformers importable, on CUDA, and its fused attention operator actually runs (a tiny call)."""
    attention, block_diagonal = load_xformers()
    _needs_cuda(device, "xformers memory_efficient_attention")
    q = torch.randn(1, 16, 1, 64, device=device, dtype=torch.float16)
    try:
        attention(q, q, q, attn_bias=block_diagonal.from_seqlens([8, 8], [8, 8]))
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0]
        version = _version("xformers")
        raise Unavailable(f"xformers {version} cannot run here: {type(error).__name__}: {first}") from error


def load_inf_cl():
    try:
        from inf_cl import cal_inf_loss
    except Exception as error:
        raise Unavailable(f"inf_cl not importable (PyPI inf-cl): {type(error).__name__}: {error}") from error
    return cal_inf_loss


def check_inf_cl(device: torch.device) -> None:
    load_inf_cl()
    _needs_cuda(device, "Inf-CL (Triton kernels asserting CUDA tensors)")


def load_memeff():
    """memeff's ``MemoryEfficientCLIPLoss`` (PyPI ``memeff``: Triton, FlashAttention-shaped backward)."""
    try:
        from memeff import MemoryEfficientCLIPLoss
    except Exception as error:
        raise Unavailable(f"memeff not importable (PyPI memeff 0.3.1): {type(error).__name__}: {error}") from error
    return MemoryEfficientCLIPLoss


def check_memeff(device: torch.device) -> None:
    load_memeff()
    _needs_cuda(device, "memeff (Triton kernels on CUDA tensors)")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception:
        return "?"

