"""vlmcore.kernels: fused Triton ops with autograd, each beside its plain-PyTorch reference.

Ops (one file each): :func:`contrastive_loss`, :func:`masked_cross_attention` (+
:func:`media_index_from_locations`), :func:`resampler_attention`. References:
:mod:`vlmcore.kernels.reference`. Backend switch: :func:`backend`, :func:`get_backend`,
``$VLMCORE_BACKEND`` (see :mod:`vlmcore.kernels._backend`).

This package imports nothing else of vlmcore.
"""

from ._backend import BACKENDS, backend, enable_interpreter_without_cuda, get_backend

# Before any @triton.jit below is decorated: without CUDA, kernels can only run in the interpreter.
enable_interpreter_without_cuda()

from .contrastive import all_gather_with_grad, contrastive_loss  # noqa: E402
from .masked_cross_attention import masked_cross_attention, media_index_from_locations  # noqa: E402
from .resampler_attention import resampler_attention  # noqa: E402

__all__ = [
    "BACKENDS",
    "all_gather_with_grad",
    "backend",
    "contrastive_loss",
    "get_backend",
    "masked_cross_attention",
    "media_index_from_locations",
    "resampler_attention",
]
