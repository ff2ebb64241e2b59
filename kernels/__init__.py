"""vlmcore.kernels: fused Triton ops with autograd, each beside its plain-PyTorch reference.

Ops (one file each): :func:`contrastive_loss`, :func:`masked_cross_attention` (+
:func:`media_index_from_locations`), :func:`resampler_attention`. References:
:mod:`vlmcore.kernels.reference`. Backend switch: :func:`backend`, :func:`get_backend`,
``$VLMCORE_BACKEND`` (see :mod:`vlmcore.kernels._backend`).

This package imports nothing else of vlmcore.
"""

if __name__ != "vlmcore.kernels":
    # This folder is also reachable as a top-level ``kernels`` package whenever the repository root
    # is on sys.path (``python -m ...`` or pytest started there). transformers probes for the
    # unrelated PyPI ``kernels`` package by importing that name; executing our op files a second
    # time under ``kernels.*`` would re-register the ``vlmcore::`` custom ops and destroy the first
    # registrations (seen: "no schema registered", std::bad_alloc in later op calls). Hand out the
    # one real module instead, so every op is registered exactly once.
    import importlib
    import sys

    sys.modules[__name__] = importlib.import_module("vlmcore.kernels")
else:
    from ._backend import BACKENDS, backend, enable_interpreter_without_cuda, get_backend

    # Before any @triton.jit below is decorated: without CUDA, kernels only run in the interpreter.
    enable_interpreter_without_cuda()

    from .contrastive import all_gather_with_grad, contrastive_loss
    from .masked_cross_attention import masked_cross_attention, media_index_from_locations
    from .resampler_attention import resampler_attention
    from .sigmoid_contrastive import sigmoid_contrastive_loss

    __all__ = [
        "BACKENDS",
        "all_gather_with_grad",
        "backend",
        "contrastive_loss",
        "get_backend",
        "masked_cross_attention",
        "media_index_from_locations",
        "resampler_attention",
        "sigmoid_contrastive_loss",
    ]
