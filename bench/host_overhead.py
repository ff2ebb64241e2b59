"""``python -m vlmcore.bench host-overhead``: the host (Python) cost of one eager forward + backward.

Measurable on CPU: every Triton launch of an op module is replaced by a no-op that still evaluates
the launch grid (so the launcher's own planning runs), and one eager forward + backward of the op
at the small ANCHORS shape is timed next to one trivial eager torch op (``x.add(1)`` on a
one-element tensor) in the same process. The ratio says how many trivial ops' worth of host time
the call costs; on a GPU that host time is the floor under the op's wall time when it is
launch-bound. The machine is shared: the op and the trivial op take turns in short rounds, and
each figure is the minimum over ``repeats`` rounds of the mean over the round's calls.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from triton.runtime.jit import KernelInterface

from vlmcore import kernels


class _NoLaunch:
    """Stands in for a ``@triton.jit`` / ``triton.autotune`` kernel: ``kernel[grid](*args)`` evaluates
    a callable grid with the first config's meta-parameters and launches nothing."""

    def __init__(self, kernel: KernelInterface):
        self.configs = getattr(kernel, "configs", None)  # launchers may read the autotune space
        self._meta = dict(self.configs[0].kwargs) if self.configs else {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if callable(grid):
                grid({**kwargs, **self._meta})

        return launch


def _stubbed(value):
    """``value`` with its kernel objects replaced by :class:`_NoLaunch`: a kernel, or a dict holding
    kernels (the contrastive loss keeps one autotuner per dot precision); None for anything else."""
    if isinstance(value, KernelInterface):
        return _NoLaunch(value)
    if isinstance(value, dict) and value and all(isinstance(item, KernelInterface) for item in value.values()):
        return {key: _NoLaunch(item) for key, item in value.items()}
    return None


@contextlib.contextmanager
def no_launches(module) -> Iterator[None]:
    """Within the block, every kernel object at ``module``'s top level, or in a dict there, launches
    nothing (the launchers read them from the module at call time)."""
    stubs = {name: stub for name, value in vars(module).items() if (stub := _stubbed(value)) is not None}
    saved = {name: getattr(module, name) for name in stubs}
    try:
        for name, stub in stubs.items():
            setattr(module, name, stub)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def _interleaved_times(fns: list[Callable[[], object]], inner: list[int], repeats: int) -> list[float]:
    """Seconds per call of each function: rounds of ``inner[i]`` calls, the functions taking turns
    (so that all see the same machine load), minimum over ``repeats`` rounds of each round's mean."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(inner[i]):
                fn()
            best[i] = min(best[i], (time.perf_counter() - start) / inner[i])
    return best


@dataclass
class HostOverhead:
    op: str
    shape: str
    op_us: float
    trivial_us: float

    @property
    def ratio(self) -> float:
        return self.op_us / self.trivial_us

    def line(self) -> str:
        return (f"{self.op} [{self.shape}]: eager fwd+bwd with no-op launches {self.op_us:.1f} us; "
                f"trivial eager op {self.trivial_us:.2f} us; ratio {self.ratio:.1f}x")


def _fwd_bwd_step(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad: torch.Tensor):
    def step():
        for leaf in leaves:
            leaf.grad = None
        fn().backward(grad)

    return step


def _masked_case():
    from vlmcore.kernels import masked_cross_attention

    from .masked_xattn import ANCHOR_SHAPES, media_index_layout

    batch, length, num_media, tokens, heads, head_dim, attend = ANCHOR_SHAPES[0]
    q = torch.randn(batch, length, heads, head_dim, requires_grad=True)
    k = torch.randn(batch, num_media * tokens, heads, head_dim, requires_grad=True)
    v = torch.randn(batch, num_media * tokens, heads, head_dim, requires_grad=True)
    index = media_index_layout(batch, length, num_media)
    step = _fwd_bwd_step(lambda: masked_cross_attention(q, k, v, index, tokens, mode=attend), [q, k, v],
                         torch.ones_like(q))
    shape = f"B={batch} L={length} M={num_media} R={tokens} H={heads} Dh={head_dim} {attend} fp32"
    return "vlmcore.kernels.masked_cross_attention", shape, step


def _resampler_case():
    from vlmcore.kernels import resampler_attention

    from .resampler import GPU_SHAPES

    batch, media, latents, heads, head_dim, with_latents = GPU_SHAPES[0]
    q, k_lat, v_lat = (torch.randn(batch, latents, heads, head_dim, requires_grad=True) for _ in range(3))
    k_media, v_media = (torch.randn(batch, media, heads, head_dim, requires_grad=True) for _ in range(2))
    step = _fwd_bwd_step(lambda: resampler_attention(q, k_media, v_media, k_lat, v_lat),
                         [q, k_media, v_media, k_lat, v_lat], torch.ones_like(q))
    shape = f"B={batch} S={media} R={latents} H={heads} Dh={head_dim} perceiver fp32"
    return "vlmcore.kernels.resampler_attention", shape, step


CASES = {"masked_xattn": _masked_case, "resampler": _resampler_case}


def measure(op: str, inner: int = 10, repeats: int = 50) -> HostOverhead:
    """Host time of one eager forward + backward of ``op`` (launches stubbed) and of a trivial op."""
    if op not in CASES:
        raise ValueError(f"op must be one of {sorted(CASES)}, got {op!r}")
    module_name, shape, step = CASES[op]()
    module = importlib.import_module(module_name)
    tiny = torch.zeros(1)
    with kernels.backend("triton"), no_launches(module):
        op_s, trivial_s = _interleaved_times([step, lambda: tiny.add(1)], [inner, inner * 20], repeats)
    return HostOverhead(op, shape, op_s * 1e6, trivial_s * 1e6)


def main(op: str | None, inner: int, repeats: int) -> None:
    for name in [op] if op else sorted(CASES):
        print(measure(name, inner, repeats).line())
