"""The step reads its numbers to the host once: counted host reads over N optimizer steps of an
in-process CLIP run (two datasets, two micro-batches a step), StepStats' one-tensor round trip, and
on a GPU the step's own code under ``torch.cuda.set_sync_debug_mode("error")``."""

import os
import sys

import pytest
import torch
from helpers.training import read_metrics, train_argv
from vlmcore.train import main, tasks
from vlmcore.train.runtime import stats as stats_module
from vlmcore.train.runtime import trainer as trainer_module
from vlmcore.train.runtime.stats import StepAccumulator, StepStats

READS = ("item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy")
# The step's own code: the trainer and the tasks' losses. Libraries below them (DeepSpeed, torch's
# optimizer, the kernels' CPU-only argument checks) and the data pipeline counting tokens of the CPU batch
# are not ours to decide here; on a GPU, test_step_code_never_waits_for_the_device covers the device side.
STEP_CODE = tuple(os.path.dirname(m.__file__) + os.sep for m in (trainer_module, tasks))
N = 4


def _two_dataset_clip(data, out, *extra):
    return train_argv("clip", data, out, "save_every=0", "eval_every=0", "data.eval=null",
                      "optim.accumulation_steps=2", "model.clip.text={width: 16, depth: 1, heads: 2}",
                      "model.clip.embed_dim=16", "tokenizer.context_length=12",
                      f"data.train=[{{name: a, shards: '{data}/train-*.tar', batch_size: 4}}, "
                      f"{{name: b, shards: '{data}/train-*.tar', batch_size: 4, weight: 0.5}}]", *extra)


def _count_reads(monkeypatch, reads: list[str]) -> None:
    """Make every tensor read in :data:`READS` called from the step's code append ``file:line`` to ``reads``."""
    for name in READS:
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(STEP_CODE):
                reads.append(f"{_name} {caller.f_code.co_filename}:{caller.f_lineno}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)


def test_one_host_read_per_optimizer_step(data, tmp_path, monkeypatch):
    # Before the Trainer (the loop of one function) this setup read 24 numbers per step: a bool and a
    # float of the loss, a float of every loss and metric, an all-reduce per micro-batch, the grad norm.
    reads: list[str] = []
    read_by_step_end: dict[int, int] = {}
    _count_reads(monkeypatch, reads)
    out = tmp_path / "sync"
    main(_two_dataset_clip(data, out, f"max_steps={N + 2}", f"log_every={N}"),
         on_step_end=[lambda trainer, step: read_by_step_end.setdefault(step, len(reads))])
    monkeypatch.undo()
    window = reads[read_by_step_end[1]:read_by_step_end[N + 1]]  # steps 2 .. N + 1: one logged (step N)
    assert len(window) <= N + 2, window
    steps, _ = read_metrics(out)
    assert [s["step"] for s in steps] == [N, N + 2]
    assert all(s["samples/a"] == s["samples/b"] == 8 and s["grad_norm"] is not None for s in steps)


def test_step_stats_round_trip_through_one_tensor():
    accumulator = StepAccumulator(2, torch.device("cpu"))
    one = torch.tensor(1.0)
    accumulator.add(0, one * 1.5, [one, one], [one * 3, 4.0], samples=[4, 2], tokens=10)
    accumulator.add(1, one * float("nan"), [one, one * float("nan")], [one * 5, 6.0], samples=[4, 2], tokens=7)
    stats = accumulator.finish(skipped=[0, 1, 2, 3])
    flat = stats.to_tensor()
    assert flat.dtype == stats_module.STATS_DTYPE and flat.shape == (2 + 1 + 2 + 2 + 2 + 1 + 4,)
    host = StepStats.from_tensor(flat.tolist(), layout=stats)
    assert host.nonfinite == [0.0, 1.0] and host.loss == 1.5 and host.dataset_losses == [1.0, 1.0]
    assert host.metrics == [3.0, 4.0] and host.samples == [8.0, 4.0] and host.tokens == 17.0
    assert host.skipped == [0.0, 1.0, 2.0, 3.0]
    again = StepStats.from_tensor(flat, layout=stats)
    assert all(torch.equal(getattr(again, f), getattr(stats, f).reshape(getattr(again, f).shape))
               for f in ("nonfinite", "loss", "metrics", "skipped"))
    with pytest.raises(ValueError, match="values for a layout of"):
        StepStats.from_tensor(flat.tolist()[:-1], layout=stats)


@pytest.mark.gpu
def test_step_code_never_waits_for_the_device(data, tmp_path, monkeypatch):
    """The step's forward, its statistics and their reduction, under sync debug mode "error" (the one
    read, ``tolist`` of the reduced stats, and DeepSpeed's own backward / step run outside it)."""
    pytest.importorskip("deepspeed")

    def no_sync(fn):
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return wrapped

    monkeypatch.setattr(trainer_module, "mixture_loss", no_sync(trainer_module.mixture_loss))
    monkeypatch.setattr(StepAccumulator, "add", no_sync(StepAccumulator.add))
    monkeypatch.setattr(StepAccumulator, "finish", no_sync(StepAccumulator.finish))
    monkeypatch.setattr(trainer_module.distributed, "all_reduce_sum_",
                        no_sync(trainer_module.distributed.all_reduce_sum_))
    out = tmp_path / "gpu"
    main(_two_dataset_clip(data, out, "max_steps=3", "precision=fp32", "deepspeed.zero_optimization.stage=0"))
    steps, _ = read_metrics(out)
    assert [s["step"] for s in steps] == [1, 2, 3] and all(s["loss"] is not None for s in steps)
