"""Dataset mixtures (``optim.mixture``, ``optim.mixture_backward``; train/runtime/mixture.py): one backward
per dataset gives the joint gradients at the activation memory of the largest dataset; round_robin and
sample read the datasets in the documented order and odds; resume is bit-exact in every mode.
In-process trainings (one rank, DeepSpeed on gloo) on the tiny shapes set."""

import json
import math
import os
import shutil

import pytest
import torch
from helpers.numerics import assert_close
from helpers.training import launch_two_ranks, read_metrics, train_argv
from vlmcore.train import main
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.runtime.mixture import MixturePolicy
from vlmcore.train.runtime.trainer import NonFiniteLossError, Trainer, seed_everything
from vlmcore.train.tasks import get_task
from vlmcore.train.tasks.run_loader import read_run_config

TINY_LM = ("model.lm={config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
           "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}}")
SMALL_FLAMINGO = "model.flamingo={cross_attn_every_n_layers: 1, num_latents: 2, dim_head: 8, heads: 2, ff_mult: 1}"
FROZEN_TOWER = "model.vision={image_size: 16, patch_size: 8, width: 16, depth: 1, heads: 2, freeze: true}"
RUN = {"eval_batch_size": None, "vision": FROZEN_TOWER}
CLIP_TEXT = ["model.clip.text={width: 16, depth: 1, heads: 2}", "model.clip.embed_dim=16",
             "tokenizer.context_length=12"]


def _flamingo_mixture(data, out, sizes, *extra):
    """A Flamingo run on three datasets (documents, two pair sets) of batch ``sizes`` and weights 1, 0.5, 0.2."""
    docs, pairs, more = sizes
    mixture = (f"data.train=[{{name: docs, kind: interleaved, shards: '{data}/docs-*.tar', batch_size: {docs}, "
               f"max_images: 2}}, {{name: pairs, shards: '{data}/train-*.tar', batch_size: {pairs}, weight: 0.5}}, "
               f"{{name: more, shards: '{data}/eval-*.tar', batch_size: {more}, weight: 0.2}}]")
    return train_argv("flamingo", data, out, TINY_LM, SMALL_FLAMINGO, mixture, "tokenizer.context_length=20",
                      "save_every=0", "optim.lr=1e-3", "seed=5", *extra, **RUN)


def _clip_mixture(data, out, *extra, weights=(1.0, 1.0, 1.0)):
    """A CLIP run on three pair datasets a, b, c of batches 2, 3, 4 (told apart by their ``samples/<name>``)."""
    mixture = ", ".join(f"{{name: {n}, shards: '{data}/{s}-*.tar', batch_size: {b}, weight: {w}}}"
                        for n, s, b, w in zip("abc", ("train", "eval", "train"), (2, 3, 4), weights))
    return train_argv("clip", data, out, *CLIP_TEXT, f"data.train=[{mixture}]", "model.vision.freeze=false",
                      "optim.lr=3e-3", "data.train.0.shuffle_buffer=8", *extra, **RUN)


def _capture_gradients(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Every step's full trainable gradients (all-reduced, gathered from ZeRO's partitions), read after
    the step's last backward and before its update."""
    from deepspeed.utils import safe_get_full_grad

    captured, real = [], Trainer.apply_or_skip

    def apply_or_skip(self, step, stats):
        captured.append({n: safe_get_full_grad(p).clone() for n, p in self.module.named_parameters()
                         if p.requires_grad})
        return real(self, step, stats)

    monkeypatch.setattr(Trainer, "apply_or_skip", apply_or_skip)
    return captured


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_per_dataset_backward_gives_the_joint_gradients(data, tmp_path, monkeypatch, zero):
    grads, updates = {}, {}
    for backward in ("joint", "per_dataset"):
        captured = _capture_gradients(monkeypatch)
        # DeepSpeed's optimizer steps after each of ours: its boundary is our step's last backward.
        counted = updates.setdefault(backward, [])
        main(_flamingo_mixture(data, tmp_path / backward, (2, 3, 4), "max_steps=2",
                               f"deepspeed.zero_optimization.stage={zero}", f"optim.mixture_backward={backward}"),
             on_step_end=[lambda trainer, step, counted=counted: counted.append((step, trainer.engine.global_steps))])
        grads[backward] = captured
        monkeypatch.undo()
    assert updates["joint"] == updates["per_dataset"] == [(1, 1), (2, 2)]
    for step, (joint, per_dataset) in enumerate(zip(grads["joint"], grads["per_dataset"]), start=1):
        assert joint.keys() == per_dataset.keys() and len(joint) > 10
        assert any(g.abs().max() > 0 for g in joint.values())
        for name in joint:  # step 2 also checks that step 1's update was the same
            assert_close(per_dataset[name], joint[name], atol=1e-5, rtol=1e-5, name=f"step {step} {name}")
    steps = {b: read_metrics(tmp_path / b)[0] for b in grads}
    for joint, per_dataset in zip(steps["joint"], steps["per_dataset"]):
        for key in ("loss", "loss/docs", "loss/pairs", "loss/more"):
            assert per_dataset[key] == pytest.approx(joint[key], rel=1e-5)


@pytest.mark.parametrize("zero,per_step", [(1, 1), (2, 3)])
def test_gradient_reductions_per_step_under_per_dataset(data, tmp_path, monkeypatch, zero, per_step):
    """ZeRO-1 reduces once per step, at the boundary; ZeRO-2 reduce-scatters after every backward (how
    DeepSpeed keeps only its partition of the gradients; it refuses ``no_sync`` there): one reduction per
    dataset and step, the communication price of per_dataset under ZeRO-2 (and ZeRO-3)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    calls, real = [], DeepSpeedZeroOptimizer.average_tensor
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "average_tensor",
                        lambda self, *args, **kwargs: calls.append(1) or real(self, *args, **kwargs))
    main(_flamingo_mixture(data, tmp_path / "run", (2, 3, 4), "max_steps=2",
                           f"deepspeed.zero_optimization.stage={zero}", "optim.mixture_backward=per_dataset"))
    assert len(calls) == 2 * per_step


class SavedActivations:
    """The bytes autograd holds for backward, counted as they come and go.

    ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor a forward saves for its backward
    (the activation memory) and, through the lifetime of the packed object, when its graph frees it.
    A tensor counts with its whole storage, once however many views of it are saved; the storages of
    parameters and buffers are left out (resident whatever the backward schedule). These are real
    bytes held by real tensors, whatever the allocator (CPU has no peak-memory counter like CUDA's).
    """

    def __init__(self):
        self.resident: set[int] = set()
        self.storages: dict[int, list[int]] = {}  # data_ptr -> [bytes, packed objects holding it]
        self.alive = self.peak = 0
        self.at_backward: list[int] = []  # bytes alive as each backward starts

    def pack(self, tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in self.resident:
            entry = self.storages.setdefault(ptr, [tensor.untyped_storage().nbytes(), 0])
            if entry[1] == 0:
                self.alive += entry[0]
                self.peak = max(self.peak, self.alive)
            entry[1] += 1
        return _Packed(self, ptr, tensor)

    def release(self, ptr):
        entry = self.storages.get(ptr)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.alive -= entry[0]
                del self.storages[ptr]


class _Packed:
    def __init__(self, meter, ptr, tensor):
        self.meter, self.ptr, self.tensor = meter, ptr, tensor

    def __del__(self):
        self.meter.release(self.ptr)


def _measure_activations(monkeypatch, argv) -> SavedActivations:
    meter = SavedActivations()
    build, backward = Trainer._build_engine, None

    def build_engine(self):
        nonlocal backward
        build(self)
        meter.resident = {t.untyped_storage().data_ptr() for t in (*self.module.parameters(), *self.module.buffers())}
        real = self.engine.backward

        def counted_backward(loss, **kwargs):
            meter.at_backward.append(meter.alive)
            return real(loss, **kwargs)

        self.engine.backward = counted_backward

    monkeypatch.setattr(Trainer, "_build_engine", build_engine)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda packed: packed.tensor):
        main(argv)
    monkeypatch.undo()
    return meter


def test_per_dataset_peak_is_the_largest_datasets_not_the_sum(data, tmp_path, monkeypatch):
    sizes = (1, 2, 16)  # the third dataset dominates
    joint = _measure_activations(monkeypatch, _flamingo_mixture(data, tmp_path / "joint", sizes, "max_steps=1"))
    per_dataset = _measure_activations(monkeypatch, _flamingo_mixture(data, tmp_path / "per", sizes, "max_steps=1",
                                                                       "optim.mixture_backward=per_dataset"))
    each = per_dataset.at_backward  # one graph alive at each backward: the bytes of each dataset alone
    assert len(each) == 3 and len(joint.at_backward) == 1 and max(each) == each[2]
    print(f"saved activations, batches {sizes}: per dataset {each} B; per_dataset peak {per_dataset.peak} B, "
          f"joint peak {joint.peak} B")
    # The joint graph is the three graphs together (same batches, same seed): its peak is their sum; the
    # weighted sum of three scalars saves nothing of size. 1 %: room for a few small shared tensors.
    assert joint.peak == pytest.approx(sum(each), rel=0.01)
    # per_dataset frees each graph in its backward before the next forward: the peak is the largest graph.
    assert per_dataset.peak == pytest.approx(each[2], rel=0.01)
    assert per_dataset.peak < 0.9 * joint.peak
    assert per_dataset.alive == joint.alive == 0  # every saved tensor was freed by its backward


def _visits(steps, names="abc"):
    """Per step, the datasets read (``samples/<name>`` > 0), checked against the per-dataset losses logged."""
    out = []
    for s in steps:
        read = [n for n in names if s[f"samples/{n}"] > 0]
        assert sorted(k for k in s if k.startswith("loss/")) == [f"loss/{n}" for n in read]  # no fake 0 losses
        out.append("".join(read))
    return out


def test_round_robin_reads_one_dataset_per_step_in_order(data, tmp_path):
    out = tmp_path / "rr"
    main(_clip_mixture(data, out, "max_steps=5", "save_every=0", "optim.mixture=round_robin",
                       weights=(1.0, 0.5, 0.25)))
    steps, _ = read_metrics(out)
    assert _visits(steps) == ["a", "b", "c", "a", "b"]
    assert [s[f"samples/{v}"] for s, v in zip(steps, "abcab")] == [2, 3, 4, 2, 3]
    for s, (v, w) in zip(steps, zip("abcab", (1.0, 0.5, 0.25, 1.0, 0.5))):
        assert s["loss"] == pytest.approx(w * s[f"loss/{v}"], rel=1e-6)  # weight stays the loss weight
        assert f"i2t_acc/{v}" in s and sum(k.startswith("i2t_acc/") for k in s) == 1


def test_sample_draws_datasets_by_weight(data, tmp_path):
    weights = (6.0, 3.0, 1.0)
    n = 60
    out = tmp_path / "sample"
    main(_clip_mixture(data, out, f"max_steps={n}", "save_every=0", "optim.mixture=sample", "seed=7",
                       weights=weights))
    steps, _ = read_metrics(out)
    visits = _visits(steps)
    # The documented draws: the policy's generator seeded with the run's seed, one draw per step.
    policy = MixturePolicy("sample", "joint", list(weights), seed=7)
    assert visits == ["abc"[policy.visit(step)[0]] for step in range(1, n + 1)]
    for name, w in zip("abc", weights):
        p = w / sum(weights)
        assert abs(visits.count(name) - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (name, visits.count(name))
    for s, v in zip(steps, visits):
        assert s["loss"] == pytest.approx(s[f"loss/{v}"], rel=1e-6)  # the weight was the odds: loss unweighted


def test_sample_odds_over_many_draws_and_the_state_round_trip():
    weights = [0.6, 0.3, 0.1]
    policy = MixturePolicy("sample", "joint", weights, seed=0)
    draws = [policy.visit(s)[0] for s in range(1, 20001)]
    for i, w in enumerate(weights):
        assert abs(draws.count(i) - 20000 * w) <= 4 * math.sqrt(20000 * w * (1 - w)), (i, draws.count(i))
    state = policy.state_dict()
    ahead = [policy.visit(s)[0] for s in range(20001, 20101)]
    resumed = MixturePolicy("sample", "joint", weights, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.visit(s)[0] for s in range(20001, 20101)] == ahead
    assert MixturePolicy("round_robin", "per_dataset", weights, 0).backwards_per_micro_batch == 1
    assert MixturePolicy("accumulate", "per_dataset", weights, 0).backwards_per_micro_batch == 3
    assert MixturePolicy("accumulate", "per_dataset", weights, 0).backward_groups([0, 1, 2]) == [[0], [1], [2]]
    assert MixturePolicy("accumulate", "joint", weights, 0).backward_groups([0, 1, 2]) == [[0, 1, 2]]


def _step_records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: {k: v for k, v in r.items() if k not in ("time", "samples_per_s", "tokens_per_s")}
                for r in map(json.loads, f) if "loss" in r}


@pytest.mark.parametrize("mode", [("optim.mixture_backward=per_dataset", "deepspeed.zero_optimization.stage=2"),
                                  ("optim.mixture=round_robin",), ("optim.mixture=sample",)],
                         ids=["per_dataset", "round_robin", "sample"])
def test_resume_is_bit_exact_in_each_mixture_mode(data, tmp_path, mode):
    common = ["max_steps=6", "save_every=2", "keep_last=3", "seed=3", *mode]
    full = tmp_path / "full"
    main(_clip_mixture(data, full, *common, weights=(1.0, 0.5, 0.5)))
    reference = _step_records(full)

    resumed = tmp_path / "resumed"
    os.makedirs(resumed / "checkpoints")  # as if killed after step 2: its checkpoint is the latest
    shutil.copytree(full / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    main(_clip_mixture(data, resumed, *common, "resume=latest", weights=(1.0, 0.5, 0.5)))
    # Bitwise: the same datasets read, the same losses, the same gradient norms (fp32, same data order).
    assert _step_records(resumed) == {s: reference[s] for s in (3, 4, 5, 6)}


def test_a_nonfinite_loss_skips_a_one_backward_step_and_stops_a_per_dataset_one(data, tmp_path, monkeypatch):
    clip = get_task("clip")
    real, calls = clip.loss, {"n": 0}

    def poisoned(*args, **kwargs):  # the second loss of the run is NaN
        calls["n"] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 2 else loss), metrics

    monkeypatch.setattr(clip, "loss", poisoned)
    out = tmp_path / "rr"  # round_robin: one backward a step, so step 2 is skipped and the run goes on
    main(_clip_mixture(data, out, "max_steps=3", "save_every=0", "optim.mixture=round_robin"))
    steps, _ = read_metrics(out)
    assert [s["nonfinite_steps"] for s in steps] == [0, 1, 1] and steps[1]["loss"] is None
    assert steps[1]["samples/b"] == 3 and "loss/b" not in steps[1] and steps[2]["loss/c"] is not None

    calls["n"] = 0  # per_dataset: DeepSpeed has counted dataset a's backward when b's loss turns out NaN
    with pytest.raises(NonFiniteLossError, match="optim.mixture_backward: per_dataset or optim.accum_freq > 1 a "):
        main(_clip_mixture(data, tmp_path / "per", "max_steps=3", "save_every=0",
                           "optim.mixture_backward=per_dataset"))



DRIVER = """
import json, os, sys
import torch
from deepspeed.utils import safe_get_full_grad
from vlmcore.train import main
from vlmcore.train.runtime.trainer import Trainer

captured, real = [], Trainer.apply_or_skip

def apply_or_skip(self, step, stats):  # the step's full reduced gradients: after its last backward, before its update
    captured.append({n: safe_get_full_grad(p).clone() for n, p in self.module.named_parameters() if p.requires_grad})
    return real(self, step, stats)

Trainer.apply_or_skip = apply_or_skip
for argv in json.load(open(sys.argv[-1])):  # the launcher puts --local_rank=N first
    main(argv)
    out_dir = next(a.removeprefix("out_dir=") for a in argv if a.startswith("out_dir="))
    torch.save(captured, os.path.join(out_dir, f"gradients{os.environ['RANK']}.pt"))
    captured.clear()
"""


def _initial_parameters(run_dir) -> dict[str, torch.Tensor]:
    """Rank 0's parameters before the run's first step: its task's model, built after the trainer's seeding."""
    cfg = read_run_config(str(run_dir))
    seed_everything(cfg.seed)
    task_cls = get_task(cfg.task)
    tok = Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length, kind=cfg.tokenizer.type,
                    media_tokens=task_cls.media_tokens)
    return {name: p.detach() for name, p in task_cls(cfg, tok).build_model(torch.float32).named_parameters()}


def _assert_same_gradients(joint, per_dataset, task: str) -> None:
    """Every rank's and step's saved gradients of the ``per_dataset`` run equal the ``joint`` run's (not all 0)."""
    for rank in (0, 1):
        grads = [torch.load(run / f"gradients{rank}.pt", weights_only=True) for run in (joint, per_dataset)]
        assert len(grads[0]) == len(grads[1]) == 2
        for step, (a, b) in enumerate(zip(*grads), start=1):
            assert a.keys() == b.keys() and any(g.abs().max() > 0 for g in a.values())
            for name in a:
                assert_close(b[name], a[name], atol=1e-5, rtol=1e-5, name=f"{task} rank {rank} step {step} {name}")


@pytest.mark.distributed
@pytest.mark.slow  # one launch of 2 ranks, four 2-step trainings: 40 s here when idle, ~5 min when busy
def test_per_dataset_equals_joint_on_two_ranks_zero2(data, tmp_path):
    """vlmcore-train on 2 gloo ranks (deepspeed launcher, ZeRO-2, which reduce-scatters after every
    backward): per_dataset has joint's reduced gradients on every rank and step, and ends 2 steps with joint's
    parameters and losses, for Flamingo on three datasets and for CLIP on three (its loss gathers features
    over the ranks inside each backward)."""
    from safetensors.torch import load_file

    builders = {"flamingo": lambda out, *extra: _flamingo_mixture(data, out, (2, 3, 4), *extra),
                "clip": lambda out, *extra: _clip_mixture(data, out, *extra)}
    launch_two_ranks(tmp_path, DRIVER, [build(tmp_path / f"{task}_{backward}", "max_steps=2", "save_every=0",
                                       "optim.warmup_steps=1", "deepspeed.zero_optimization.stage=2",
                                       f"optim.mixture_backward={backward}")
                                 for task, build in builders.items() for backward in ("joint", "per_dataset")])
    for task in builders:
        joint, per_dataset = (tmp_path / f"{task}_{backward}" for backward in ("joint", "per_dataset"))
        steps = {run: read_metrics(run)[0] for run in (joint, per_dataset)}
        assert [s["step"] for s in steps[joint]] == [s["step"] for s in steps[per_dataset]] == [1, 2]
        names = [k for k in steps[joint][0] if k == "loss" or k.startswith("loss/")]
        assert len(names) == 4  # the total and one per dataset
        for a, b in zip(steps[joint], steps[per_dataset]):
            for key in names:
                assert b[key] == pytest.approx(a[key], rel=1e-5), f"{task} step {a['step']} {key}"
        _assert_same_gradients(joint, per_dataset, task)
        expected, got = load_file(joint / "trainable.safetensors"), load_file(per_dataset / "trainable.safetensors")
        assert expected.keys() == got.keys() and len(expected) > 10
        for name, value in expected.items():
            assert_close(got[name], value, atol=1e-5, rtol=1e-5, name=f"{task} {name}")
        # The run trained from rank 0's initial parameters: they moved, by Adam's steps of about lr (not by
        # the distance between two random initializations).
        initial = _initial_parameters(joint)
        moved = max(float((value - initial[name]).abs().max()) for name, value in expected.items())
        assert 0 < moved < 0.05, moved
