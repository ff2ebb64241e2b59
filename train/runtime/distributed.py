"""Process-group set-up and the few collectives the trainer needs.

Under a launcher (``deepspeed``, ``torchrun``) the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) is set and :func:`init` joins that group. Called
in-process without one (``vlmcore.train.main([...])`` from Python or a test), it starts a group of
world size 1 on a free local port. The backend is DeepSpeed's choice for the accelerator: NCCL on
CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CollectiveTimeoutError(RuntimeError):
    """A collective waited longer than ``collective_timeout_s`` for a rank that did not arrive."""


def init(local_rank: int | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join (or start) the process group; returns this process's rank, world size and device.

    ``timeout_s`` bounds every collective (the backend's default is 30 minutes); it applies when this
    call creates the group."""
    import deepspeed

    if not dist.is_initialized():
        if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(verbose=False, **timeout)
    if local_rank is None or local_rank < 0:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def local_world_size() -> int:
    """Ranks on this node: ``LOCAL_WORLD_SIZE`` (torchrun), ``LOCAL_SIZE`` (the deepspeed launcher),
    else ``WORLD_SIZE`` (one node), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "WORLD_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_threads() -> tuple[int, str]:
    """Set this rank's intra-op threads; returns ``(threads, why)`` for the log.

    ``OMP_NUM_THREADS`` in the environment wins (the user's choice; torchrun sets it to 1 when it
    starts several ranks, the deepspeed launcher to the cores per rank under
    ``--bind_cores_to_rank``). Otherwise each rank takes ``max(1, cores // local ranks)``: by
    default torch gives every process all cores, and N ranks on one node would run N x cores
    threads (measured on the 2-core machine, 2026-12-01: a CLIP run went from 45 to 357 samples/s).
    The plain ``deepspeed --num_gpus N`` launcher sets no ``OMP_NUM_THREADS`` (checked with
    DeepSpeed 0.19.8 on CPU).
    """
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if explicit.isdigit() and int(explicit) >= 1:
        threads = int(explicit)
        torch.set_num_threads(threads)
        return threads, f"OMP_NUM_THREADS={explicit} from the environment"
    cores, ranks = available_cores(), local_world_size()
    threads = max(1, cores // ranks)
    torch.set_num_threads(threads)
    return threads, f"{cores} cores // {ranks} local rank(s); set OMP_NUM_THREADS to override"


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (fp64, one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_sum_(values: torch.Tensor) -> torch.Tensor:
    """Sum ``values`` over all ranks in place, on its device (nothing is read back); returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def data_parallel_group():
    """The group the contrastive loss gathers over (None in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


STEP_KEY = "vlmcore/step/{rank}"


def _store():
    """The process group's key-value store (None without a group of several ranks)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.distributed_c10d._get_default_store()


def report_step(step: int) -> None:
    """Publish the step this rank has reached (one store write), for :func:`lagging_ranks`."""
    store = _store()
    if store is not None:
        store.set(STEP_KEY.format(rank=dist.get_rank()), str(step))


def lagging_ranks() -> dict[int, int]:
    """``{rank: its last reported step}`` of the ranks behind the furthest one ({} when unknown).

    The store is served by a thread of rank 0's process, so it answers even while a rank is stalled."""
    store, steps = _store(), {}
    if store is None:
        return {}
    try:
        for rank in range(dist.get_world_size()):
            key = STEP_KEY.format(rank=rank)
            steps[rank] = int(store.get(key)) if store.check([key]) else 0
    except (RuntimeError, ValueError):  # the store's host (rank 0) is gone
        return {}
    furthest = max(steps.values(), default=0)
    return {rank: step for rank, step in steps.items() if step < furthest}


def _is_timeout(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, (RuntimeError, dist.DistBackendError)) and ("timed out" in text or "timeout" in text)


@contextlib.contextmanager
def timeouts_explained(timeout_s: float):
    """Turn a backend's collective timeout into a :class:`CollectiveTimeoutError` that says what
    happened and names the ranks that did not arrive (those whose last :func:`report_step` is behind).
    NCCL's watchdog aborts the process instead: its own log names the collective."""
    try:
        yield
    except Exception as e:
        if not _is_timeout(e) or not dist.is_initialized():
            raise
        behind = lagging_ranks()
        who = (", ".join(f"rank {r} (last at step {s})" for r, s in sorted(behind.items())) + " did not arrive"
               if behind else "the rank that did not arrive is unknown")
        raise CollectiveTimeoutError(
            f"rank {dist.get_rank()}: a collective waited more than collective_timeout_s={timeout_s:g} s for the "
            f"other ranks; {who}. A rank is stalled (a hung data read, a deadlock, a slow disk) or far slower than "
            f"the others; raise collective_timeout_s if that is expected. Backend: {e}") from e
