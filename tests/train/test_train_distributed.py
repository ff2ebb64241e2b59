"""Two CPU ranks under the ``deepspeed`` launcher (gloo, fp32): ZeRO-2 and ZeRO-3 for every task,
and a run killed with SIGKILL after a checkpoint that resumes to exactly the uninterrupted losses.

Three launches in all (each costs ~15 s of start-up): several trainings share one launch through a
small driver script that calls ``vlmcore.train.main`` in turn.
"""

import json
import os
import subprocess
import sys
import tarfile

import pytest
from helpers.training import dataset_view, train_argv

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DRIVER = """
import json, os, signal, sys
from vlmcore.train import main

def sigkill_rank0_after(kill_step):
    def hook(trainer, step):  # after the step's checkpoint, as a crash would come
        if step == kill_step and trainer.info.is_main:
            os.kill(os.getpid(), signal.SIGKILL)
    return hook

spec = json.load(open(sys.argv[-1]))  # the launcher puts --local_rank=N first
hooks = [sigkill_rank0_after(spec["sigkill_after_step"])] if spec["sigkill_after_step"] else []
for argv in spec["runs"]:
    main(argv, on_step_end=hooks)
"""
TINY_LM = ("model.lm={config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
           "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}}")
ZERO3 = "deepspeed={zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}, gradient_clipping: 1.0}"
ODD_EVAL = ["data.eval.shards={data}/odd-000000.tar", "data.eval.batch_size=12"]  # uneven eval batches per rank


def _launch(tmp_path, name, runs, timeout=400, sigkill_after_step=0):
    """The trainings ``runs`` (argv lists) in turn on two ranks; with ``sigkill_after_step``, rank 0 kills
    itself with SIGKILL right after that step (a hook the driver installs)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    spec = tmp_path / f"{name}.json"
    spec.write_text(json.dumps({"runs": runs, "sigkill_after_step": sigkill_after_step}))
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    from vlmcore.train.runtime.distributed import _free_port

    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(driver), str(spec)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def _steps(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def _evals(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r["eval"] for r in map(json.loads, f) if "eval" in r]


@pytest.fixture(scope="module")
def data(shapes_dataset, tmp_path_factory):
    # Not the shared set: the losses of the two-rank trainings must fall on this one (8 shards of 32, 4 a rank).
    # A view, to add the odd eval shard beside it.
    out = dataset_view(shapes_dataset(n_train=256, n_eval=48, n_docs=64, image_size=32, shard_size=32, seed=3),
                       tmp_path_factory.mktemp("distributed") / "shapes")
    # 25 held-out pairs: with batches of 12 over 2 ranks, rank 0 runs 2 eval batches and rank 1 only 1.
    with tarfile.open(out / "eval-000000.tar") as src, tarfile.open(out / "odd-000000.tar", "w") as dst:
        for member in src.getmembers():
            if int(member.name.split(".")[0].removeprefix("eval")) < 25:
                dst.addfile(member, src.extractfile(member))
    return out


def _clip(data, out_dir, *extra):
    return train_argv("clip", data, out_dir, eval_batch_size=24) + [
        f"data.train.0.shards={data}/train-*.tar", "data.train.0.batch_size=8", "data.train.0.resampled=false",
        "data.train.0.shuffle_buffer=32", "model.clip.text={width: 32, depth: 1, heads: 2}", "model.clip.embed_dim=32",
        "tokenizer.context_length=12", "max_steps=8", "save_every=2", "keep_last=2", "eval_every=0",
        "optim.lr=3e-3", "optim.warmup_steps=2", *extra]


def _accumulation(data, out_dir, *extra):
    """Frozen on the fixed-length eval captions, no shuffling: the same samples whatever the batch size."""
    return train_argv("frozen", data, out_dir, eval_batch_size=24) + [
        TINY_LM, f"data.train.0.shards={data}/eval-000000.tar", "data.train.0.resampled=false",
        "data.train.0.shuffle_buffer=0", "tokenizer.context_length=16", "max_steps=3", "save_every=0",
        "data.eval=null", "optim.lr=1e-3", "deepspeed.zero_optimization.stage=2", *extra]


def _falls(steps, k=3):
    losses = [s["loss"] for s in steps]
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


def test_two_ranks_zero2_zero3_and_exact_resume(data, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    fl3, fr3, clip3 = tmp_path / "flamingo_z3", tmp_path / "frozen_z3", tmp_path / "clip_z3"
    acc1, acc2 = tmp_path / "batch8", tmp_path / "accumulated4x2"
    proc = _launch(tmp_path, "first", [
        _clip(data, full),
        train_argv("flamingo", data, fl3, eval_batch_size=24) + [
            ZERO3, TINY_LM, f"data.train.0.shards={data}/docs-*.tar", f"data.train.1.shards={data}/train-*.tar",
            "data.train.0.batch_size=4", "data.train.1.batch_size=8", "data.train.1.weight=0.2",
            "tokenizer.context_length=32", "model.flamingo.num_latents=4", "max_steps=12", "save_every=6",
            "model.gradient_checkpointing=true",
            "eval_every=0", "optim.lr=3e-3", *(a.format(data=data) for a in ODD_EVAL)],
        train_argv("frozen", data, fr3, eval_batch_size=24) + [
            ZERO3, TINY_LM, f"data.train.0.shards={data}/train-*.tar", "data.train.0.batch_size=8",
            "tokenizer.context_length=16", "max_steps=12", "save_every=0", "eval_every=0", "optim.lr=3e-3"],
        _clip(data, clip3, ZERO3, "max_steps=6", "save_every=0", *(a.format(data=data) for a in ODD_EVAL)),
        _accumulation(data, acc1, "data.train.0.batch_size=8"),
        _accumulation(data, acc2, "data.train.0.batch_size=4", "optim.accumulation_steps=2"),
    ])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # ZeRO-2 CLIP: checkpoints kept (last 2), latest, trainable weights.
    reference = _steps(full)
    assert [s["step"] for s in reference] == list(range(1, 9)) and _falls(reference)
    ckpts = sorted(p for p in os.listdir(full / "checkpoints") if p.startswith("step_"))
    assert ckpts == ["step_00000006", "step_00000008"]
    assert (full / "checkpoints" / "latest").read_text() == "step_00000008"
    # ZeRO-3 (frozen weights partitioned too): every task trains and evaluates.
    for out in (fl3, fr3):
        assert _falls(_steps(out)), out
        assert os.path.isfile(out / "trainable.safetensors")
    assert 0 <= _evals(fl3)[-1]["caption_token_acc"] <= 1 and 0 <= _evals(clip3)[-1]["zero_shot_top1"] <= 1
    assert len(_steps(clip3)) == 6
    # ZeRO-3 evaluation with more batches on one rank than on the other: no hang, every sample counted.
    assert _evals(clip3)[-1]["eval_samples"] == 25

    # Gradient accumulation over 2 ranks (ZeRO-2): 2 micro-batches of 4 == one batch of 8 for the LM loss
    # (the eval captions all have the same token count), step after step.
    big, accumulated = _steps(acc1), _steps(acc2)
    assert len(big) == len(accumulated) == 3
    for b, a in zip(big, accumulated):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["samples/pairs"] == b["samples/pairs"] == 16  # 8 per rank

    # Killed with SIGKILL right after step 5 (last checkpoint: step 4), then resumed.
    proc = _launch(tmp_path, "killed", [_clip(data, killed)], sigkill_after_step=5)
    assert proc.returncode != 0
    assert (killed / "checkpoints" / "latest").read_text() == "step_00000004"
    proc = _launch(tmp_path, "resumed", [_clip(data, killed, "resume=latest")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = _steps(killed)
    assert [s["step"] for s in resumed] == list(range(1, 9))
    assert [s["loss"] for s in resumed] == [s["loss"] for s in reference]  # bitwise: fp32, same data order
    assert [s["lr"] for s in resumed] == [s["lr"] for s in reference]
