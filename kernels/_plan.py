"""Launch plans: the exact work a kernel op does for one shape, computed on the host.

Each op file exposes a planning function (e.g. ``contrastive_plan(...)``) that its launchers use
themselves to choose grids, tiles and windows, and that returns an :class:`OpPlan`. Because the
launchers and ``python -m vlmcore.bench plan`` read the same function, the plan cannot drift from
what runs; tests also compare its tile counts with the tiles the Triton interpreter executes.

Nothing here needs a GPU: FLOPs and bytes are counted, not measured. Times derived from a plan
(:meth:`OpPlan.predicted_ms`) are predictions at given ceilings, never results.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch (or ``count`` identical ones) of an op.

    Args:
        kernel: the ``@triton.jit`` function's name, or ``"torch.mm"``-style for library calls.
        grid: program grid of one launch.
        config: the preferred config (constexpr tiles, ``num_warps``, ``num_stages``).
        tiles: inner tiles one launch executes in all (programs x loop iterations), the unit the
            interpreter instrumentation counts.
        executed_flops: tensor-core FLOPs of one launch, tile padding and masked tiles included.
        useful_flops: FLOPs of the math itself in one launch (no padding, no masked-out work).
        hbm_bytes: modelled HBM traffic of one launch (reads + writes).
        count: how many times this launch happens (e.g. one per row window).
        evidence: sm_90a compile facts of this config where an op supplies them (``registers``,
            ``spill_bytes``, ``ctas_per_sm``, ``shared``), joined in by the bench plan.
    """

    kernel: str
    grid: tuple[int, ...]
    config: dict
    tiles: int
    executed_flops: int
    useful_flops: int
    hbm_bytes: int
    count: int = 1
    evidence: dict | None = None


@dataclass
class OpPlan:
    """All launches of one op call (forward + backward unless ``mode`` says otherwise).

    Args:
        op: op name as in the benchmarks (``contrastive``, ``masked_xattn``, ...).
        shape: the shape's parameters.
        mode: ``fwd``, ``bwd`` or ``fwd_bwd``.
        launches: every launch, in order.
        floor_flops: the FLOPs no implementation of the op can avoid (ANCHORS.md).
        floor_bytes: the compulsory HBM traffic (inputs, outputs and gradients once each).
        peak_extra_bytes: the most temporary memory alive at once beyond inputs, outputs and
            input gradients (buffers, windows, statistics).
        notes: free-form facts of the plan (window size, chosen path, ...).
    """

    op: str
    shape: dict
    mode: str
    launches: list[KernelLaunch]
    floor_flops: int
    floor_bytes: int
    peak_extra_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def executed_flops(self) -> int:
        return sum(launch.executed_flops * launch.count for launch in self.launches)

    @property
    def useful_flops(self) -> int:
        return sum(launch.useful_flops * launch.count for launch in self.launches)

    @property
    def hbm_bytes(self) -> int:
        return sum(launch.hbm_bytes * launch.count for launch in self.launches)

    @property
    def num_launches(self) -> int:
        return sum(launch.count for launch in self.launches)

    def predicted_ms(self, matmul_flops_per_s: float, copy_bytes_per_s: float,
                     launch_us: tuple[float, float] = (3.0, 6.0),
                     efficiency: tuple[float, float] = (0.85, 0.55)) -> tuple[float, float]:
        """``(low, high)`` milliseconds at the given ceilings: a prediction, never a result.

        Low: compute and traffic fully overlapped at ``efficiency[0]`` of the ceilings, plus
        ``launch_us[0]`` per launch. High: compute and traffic serialized at ``efficiency[1]``,
        plus ``launch_us[1]`` per launch.
        """
        compute = self.executed_flops / matmul_flops_per_s
        traffic = self.hbm_bytes / copy_bytes_per_s
        low = max(compute, traffic) / efficiency[0] + self.num_launches * launch_us[0] * 1e-6
        high = (compute + traffic) / efficiency[1] + self.num_launches * launch_us[1] * 1e-6
        return low * 1e3, high * 1e3
