"""``optim.accum_freq`` (OpenCLIP's exact large-batch accumulation, train/runtime/feature_cache.py): k
micro-batches of b give the loss and every gradient of one batch of k x b, for CLIP and SigLIP, on one
rank (with dropout replayed from the saved RNG states) and on two gloo ranks; the logit scale and bias
get their gradient once, not k times; a vlmcore-train run with accum_freq 2 ends with the parameters of
the run with the batch twice as large; the config rules."""

import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
from helpers.accum_freq import CPU, big_batch, micro_batches, micro_forwards, model_and_task, scheme
from helpers.numerics import assert_close
from helpers.training import launch_two_ranks, read_metrics, train_argv
from vlmcore.train import ConfigError, main, tasks
from vlmcore.train.config import load_config
from vlmcore.train.runtime import trainer as trainer_module
from vlmcore.train.runtime.engine import build_ds_config
from vlmcore.train.runtime.schedule import samples_per_step
from vlmcore.train.runtime.trainer import NonFiniteLossError
from vlmcore.train.tasks.clip import ClipTask

CONFIGS = resources.files("vlmcore.train") / "configs"
WORKER = Path(__file__).parents[1] / "helpers" / "workers" / "accum_freq_worker.py"
LOSSES = ["clip", "siglip"]
K, B = 3, 4
TOL = {"atol": 1e-5, "rtol": 1e-5}
CRITERION = {"clip": ["criterion.logit_scale"], "siglip": ["criterion.logit_scale", "criterion.logit_bias"]}


def _assert_same(got, expected, what: str) -> None:
    """``(loss, metrics, gradients)`` triples equal to fp32 tolerance; the same parameters got gradients."""
    assert_close(got[0], expected[0], name=f"{what} loss", **TOL)
    for key, value in expected[1].items():
        assert_close(got[1][key], value, name=f"{what} {key}", **TOL)
    assert got[2].keys() == expected[2].keys(), what
    for name, grad in expected[2].items():
        assert_close(got[2][name], grad, name=f"{what} d {name}", **TOL)


@pytest.mark.parametrize("loss", LOSSES)
def test_loss_from_features_is_the_loss(loss):
    model, task = model_and_task(loss)
    batch = micro_batches(1, 6, seed=1)
    expected = big_batch(task, model, batch)
    got = micro_forwards(task, model, batch)
    _assert_same(got, expected, loss)
    assert set(CRITERION[loss]) <= expected[2].keys()


@pytest.mark.parametrize("loss", LOSSES)
def test_k_micro_batches_equal_one_batch_of_k_times_b(loss):
    model, task = model_and_task(loss)
    batches = micro_batches(K, B, seed=2)
    got = scheme(task, model, batches)
    expected = big_batch(task, model, batches)
    _assert_same(got, expected, loss)
    assert len(expected[2]) == len(list(model.parameters()))  # towers, projections, scale (and bias)


@pytest.mark.parametrize("loss", LOSSES)
def test_dropout_is_replayed_and_the_rng_ends_where_plain_forwards_leave_it(loss):
    model, task = model_and_task(loss, dropout=True)
    batches = micro_batches(K, B, seed=3)
    once, again = (task.features(model, batches[0], CPU)["image_features"] for _ in range(2))
    assert not torch.allclose(once, again)  # the dropout draws: a recompute without the replay would differ
    torch.manual_seed(7)
    expected = micro_forwards(task, model, batches)
    rng_after_forwards = torch.get_rng_state()
    torch.manual_seed(7)
    got = scheme(task, model, batches)
    _assert_same(got, expected, loss)
    assert torch.equal(torch.get_rng_state(), rng_after_forwards)


@pytest.mark.parametrize("loss", LOSSES)
def test_logit_scale_and_bias_get_their_gradient_once_not_k_times(loss):
    model, task = model_and_task(loss)
    batches = micro_batches(K, B, seed=4)
    expected = big_batch(task, model, batches)[2]
    exact = scheme(task, model, batches)[2]
    every_pass = scheme(task, model, batches, criterion_grad_in_every_pass=True)[2]  # OpenCLIP's loop
    for name in CRITERION[loss]:
        assert_close(exact[name], expected[name], name=name, **TOL)
        assert_close(every_pass[name], K * expected[name], name=f"{name} given in every pass", **TOL)
        assert (expected[name].abs() > 1e-4).all(), name  # k times it is then measurably wrong
    for name in expected:  # the towers' gradients do not depend on where the criterion's come from
        if name not in CRITERION[loss]:
            assert_close(every_pass[name], exact[name], name=name, **TOL)


@pytest.mark.distributed
def test_two_gloo_ranks_equal_one_batch_per_rank(tmp_path):
    from helpers.workers.accum_freq_worker import CASES

    env = dict(os.environ, OMP_NUM_THREADS="1", VLMCORE_BACKEND="reference")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(tmp_path / "init"),
                               str(tmp_path / f"rank{rank}.pt")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert results.keys() == CASES.keys()
        for case, got in results.items():
            (big_loss, big_grads), (loss, grads) = got["big"], got["scheme"]
            assert_close(loss, big_loss, name=f"rank {rank} {case} loss", **TOL)
            assert grads.keys() == big_grads.keys()
            for name, grad in big_grads.items():
                assert_close(grads[name], grad, name=f"rank {rank} {case} d {name}", **TOL)


def _cfg(task, *extra):
    return load_config(str(CONFIGS / f"{task}_tiny.yaml"), ["out_dir=x", *extra])


def test_config_rules():
    for task in LOSSES:
        cfg = _cfg(task, "optim.accum_freq=4")
        assert build_ds_config(cfg, "fp32")["gradient_accumulation_steps"] == 4
        assert samples_per_step(cfg, 2) == cfg.data.train[0].batch_size * 2 * 4
    with pytest.raises(ConfigError, match=r"optim.accum_freq: 2 replaces optim.accumulation_steps"):
        _cfg("clip", "optim.accum_freq=2", "optim.accumulation_steps=2")
    with pytest.raises(ConfigError, match=r"optim.accum_freq: task 'frozen' has no features step"):
        _cfg("frozen", "optim.accum_freq=2")
    two = "data.train=[{shards: a.tar, batch_size: 4}, {shards: b.tar, batch_size: 4}]"
    with pytest.raises(ConfigError, match=r"optim.accum_freq: needs exactly one data.train dataset .*, got 2"):
        _cfg("clip", "optim.accum_freq=2", two)
    with pytest.raises(ConfigError, match=r"zero_optimization.stage: 3 is not available with optim.accum_freq"):
        _cfg("siglip", "optim.accum_freq=2", "deepspeed.zero_optimization.stage=3")
    with pytest.raises(ConfigError, match=r"optim.accum_freq"):
        _cfg("clip", "optim.accum_freq=0")
    _cfg("clip", "deepspeed.zero_optimization.stage=3")  # accum_freq 1: ZeRO-3 as before


SMALL = ["model.clip.text={width: 16, depth: 1, heads: 2}", "model.clip.embed_dim=16", "tokenizer.context_length=12",
         "save_every=0"]


def test_vlmcore_train_accum_freq_2_ends_with_the_parameters_of_the_double_batch(data, tmp_path):
    from safetensors.torch import load_file

    common = [f"data.train.0.shards={data}/eval-000000.tar", "data.train.0.resampled=false",
              "data.train.0.shuffle_buffer=0", *SMALL, "max_steps=3", "seed=3"]
    main(train_argv("clip", data, tmp_path / "big", *common, "data.train.0.batch_size=8", eval_batch_size=None))
    main(train_argv("clip", data, tmp_path / "freq", *common, "data.train.0.batch_size=4", "optim.accum_freq=2",
                    eval_batch_size=None))
    big, freq = (read_metrics(tmp_path / name)[0] for name in ("big", "freq"))
    assert len(big) == len(freq) == 3
    for b, f in zip(big, freq):
        assert f["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert f["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert f["logit_scale"] == pytest.approx(b["logit_scale"], rel=1e-6)
        assert f["samples/shapes"] == b["samples/shapes"] == 8
    expected, got = (load_file(tmp_path / name / "trainable.safetensors") for name in ("big", "freq"))
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert_close(got[name], value, name=name, **TOL)


def test_the_step_reads_to_the_host_once(data, tmp_path, monkeypatch):
    step_code = tuple(os.path.dirname(m.__file__) + os.sep for m in (trainer_module, tasks))  # + feature_cache
    reads, by_step_end = [], {}
    for name in ("item", "__float__", "__bool__", "__int__", "tolist", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(step_code):
                reads.append(f"{_name} {caller}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    main(train_argv("clip", data, tmp_path / "sync", *SMALL, "max_steps=4", "log_every=4", "optim.accum_freq=3",
                    train_batch_size=4, eval_batch_size=None),
         on_step_end=[lambda trainer, step: by_step_end.setdefault(step, len(reads))])
    monkeypatch.undo()
    assert len(reads[by_step_end[1]:by_step_end[3]]) == 2, reads  # steps 2 and 3: the stats' tolist each
    steps, _ = read_metrics(tmp_path / "sync")
    assert [s["step"] for s in steps] == [4] and steps[0]["samples/shapes"] == 12


def test_a_nonfinite_loss_stops_the_run(data, tmp_path, monkeypatch):
    # The k backwards fill one DeepSpeed window: a step cannot be skipped (as with accumulation_steps).
    real = ClipTask.loss_from_features
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] > 2 else loss), metrics

    monkeypatch.setattr(ClipTask, "loss_from_features", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 2, .* optim.accum_freq > 1"):
        main(train_argv("clip", data, tmp_path / "nan", *SMALL, "max_steps=4", "optim.accum_freq=2",
                        train_batch_size=4, eval_batch_size=None))
    assert calls["n"] == 4  # two passes a step


DRIVER = """
import json, sys
from vlmcore.train import main

for argv in json.load(open(sys.argv[-1])):  # the launcher puts --local_rank=N first
    main(argv)
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_zero2_through_deepspeed(data, tmp_path):
    """vlmcore-train on 2 ranks (deepspeed launcher, ZeRO-2): accum_freq 2 x 4 a rank ends with the
    parameters of batches of 8 a rank."""
    from safetensors.torch import load_file

    common = [f"data.train.0.shards={data}/train-*.tar", "data.train.0.resampled=false",
              "data.train.0.shuffle_buffer=0", *SMALL, "max_steps=3", "seed=3", "deepspeed.zero_optimization.stage=2"]
    runs = [train_argv("clip", data, tmp_path / "big", *common, "data.train.0.batch_size=8", eval_batch_size=None),
            train_argv("clip", data, tmp_path / "freq", *common, "data.train.0.batch_size=4", "optim.accum_freq=2",
                       eval_batch_size=None)]
    launch_two_ranks(tmp_path, DRIVER, runs)
    big, freq = (read_metrics(tmp_path / name)[0] for name in ("big", "freq"))
    assert len(big) == len(freq) == 3
    for b, f in zip(big, freq):
        assert f["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert f["samples/shapes"] == b["samples/shapes"] == 16  # 8 per rank
    expected, got = (load_file(tmp_path / name / "trainable.safetensors") for name in ("big", "freq"))
    for name, value in expected.items():
        assert_close(got[name], value, name=name, **TOL)
