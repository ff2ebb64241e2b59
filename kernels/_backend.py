"""Which implementation an op runs: the Triton kernel or the plain-PyTorch reference.

Resolution, read at every call (so a ``with backend(...)`` block takes effect immediately):

1. the innermost ``with vlmcore.kernels.backend(name):`` block, if any;
2. otherwise the ``VLMCORE_BACKEND`` environment variable (``auto`` when unset);
3. ``auto`` means: CUDA tensors run the Triton kernel, CPU tensors run the reference.

``triton`` forces the kernel. On a machine without CUDA the kernel then runs on CPU tensors in the
Triton interpreter: ``vlmcore.kernels`` sets ``TRITON_INTERPRET=1`` before any kernel is defined
when CUDA is absent (the interpreter is chosen when ``@triton.jit`` decorates a function). This is
how the test suite checks the real kernels on CPU. ``reference`` forces the plain-PyTorch math.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "VLMCORE_BACKEND"

# Stack of names forced by nested ``backend()`` blocks (innermost last). A plain module-level list,
# not a ContextVar, so that ``torch.compile(fullgraph=True)`` can trace the dispatch (dynamo guards
# on the list, so entering another block recompiles instead of reusing a stale choice).
_forced: list[str] = []


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The backend name in force here: the innermost ``backend()`` block, else ``$VLMCORE_BACKEND``, else ``auto``."""
    if _forced:
        return _forced[-1]
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"environment variable {ENV_VAR}")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force ``"triton"``, ``"reference"`` or ``"auto"`` for every op called inside the block.

    Example::

        with vlmcore.kernels.backend("reference"):
            loss = contrastive_loss(img, txt, scale)   # plain PyTorch, even on CUDA
    """
    _forced.append(_check_name(name, "backend name"))
    try:
        yield
    finally:
        _forced.pop()


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op whose main input is ``tensor`` runs its Triton kernel under the current backend."""
    name = get_backend()
    if name == "triton":
        if tensor.device.type == "cpu" and not interpreter_enabled():
            raise RuntimeError(
                "backend 'triton' was forced for CPU tensors, but the Triton interpreter is off "
                "(TRITON_INTERPRET was not set when vlmcore.kernels was imported). Move the inputs to "
                "CUDA, or set TRITON_INTERPRET=1 before importing vlmcore."
            )
        return True
    if name == "reference":
        return False
    return tensor.device.type == "cuda"


def interpreter_enabled() -> bool:
    """True when Triton kernels defined by vlmcore run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def enable_interpreter_without_cuda() -> None:
    """Turn the Triton interpreter on when this process has no CUDA device and nobody chose.

    Must run before any ``@triton.jit`` in vlmcore is decorated, i.e. before the op modules import.
    """
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
