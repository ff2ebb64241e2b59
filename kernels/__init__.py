"""vlmcore.kernels: fused Triton ops with autograd, each beside its plain-PyTorch reference.

Ops (one file each): :func:`contrastive_loss`, :func:`sigmoid_contrastive_loss`,
:func:`momentum_contrastive_loss`, :func:`masked_cross_attention` (+
:func:`media_index_from_locations`), :func:`resampler_attention`. The differentiable all-gather
they share: :func:`all_gather_with_grad` (:mod:`vlmcore.kernels._distributed`, the one home of the
all-gathers). References: :mod:`vlmcore.kernels.reference`. Backend switch: :func:`backend`,
:func:`get_backend`, :data:`BACKENDS`, ``$VLMCORE_BACKEND`` (see :mod:`vlmcore.kernels._backend`).
One page per op in the repository's ``docs/ops/``.

This package imports nothing else of vlmcore.
"""

if __name__ == "kernels":
    # This folder is installed as ``vlmcore.kernels`` (setup.py's package_dir), but whenever the
    # repository root is on sys.path (``python -m ...``, ``python -c ...``, ``python -m pytest``
    # started there) it is ALSO found as a top-level ``kernels``: the name of Hugging Face's PyPI
    # package, which transformers >= 5.25 imports from every model module. Running our op files
    # under that name would both break transformers (it needs the real package) and register the
    # ``vlmcore::`` custom ops a second time. So, imported under that name, this file steps aside:
    # it loads the first ``kernels`` found on sys.path outside this checkout and puts it in
    # sys.modules in its place (the import statement returns ``sys.modules["kernels"]``), or
    # fails as a missing module when there is none (older transformers then see no hub kernels).
    # The Makefile also runs every command with PYTHONSAFEPATH=1, so ``make test`` / ``make demo``
    # never put the root on sys.path at all; this guard covers the commands users type themselves.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the repository's kernels/ folder is vlmcore.kernels, "
            "not the PyPI package 'kernels')",
            name="kernels",
        )
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _real
    _spec.loader.exec_module(_real)
else:
    from ._backend import BACKENDS, backend, enable_interpreter_without_cuda, get_backend

    # Before any @triton.jit below is decorated: without CUDA, kernels only run in the interpreter.
    enable_interpreter_without_cuda()

    from ._distributed import all_gather_with_grad
    from .contrastive import contrastive_loss
    from .masked_cross_attention import masked_cross_attention, media_index_from_locations
    from .momentum_contrastive import momentum_contrastive_loss
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
        "momentum_contrastive_loss",
        "resampler_attention",
        "sigmoid_contrastive_loss",
    ]
