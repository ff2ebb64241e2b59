"""In-process training helpers: the tiny shapes data (and views of it), the trainer argv, metrics.jsonl readers."""

from __future__ import annotations

import datetime
import io
import json
import os
import pathlib
import tarfile
from importlib import resources

from vlmcore.train.data.tokenizer import train_word_tokenizer
from vlmcore.train.tools import shapes

CONFIGS = resources.files("vlmcore.train") / "configs"


# The shapes set of the in-process trainings, shared by every test that needs no other sizes: the
# trainings of test_train_loop / test_train_siglip assert that their losses fall on exactly this set.
TRAIN_SHAPES = {"n_train": 192, "n_eval": 48, "n_docs": 64, "image_size": 32, "shard_size": 48, "seed": 2}
TINY_VISION = "model.vision={image_size: 16, patch_size: 8, width: 32, depth: 1, heads: 2}"


def make_train_data(out, shapes_params: dict) -> None:
    """A shapes set (``make_shapes`` with ``shapes_params``) in ``out``, with its word tokenizer
    (tokenizer.json) and a shard of broken samples (bad-000000.tar, read by no ``train-*`` pattern)."""
    shapes.make_shapes(str(out), **shapes_params)
    train_word_tokenizer(str(out / "captions.txt"), str(out / "tokenizer.json"))
    with tarfile.open(out / "train-000000.tar") as good:
        png = good.extractfile(good.getmembers()[0]).read()
    with tarfile.open(out / "bad-000000.tar", "w") as tar:
        for key, ext, payload in [("b0", "png", png[:50]), ("b0", "txt", b"a red circle"), ("b1", "png", png),
                                  ("b2", "txt", b"\xff\xfe")]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def file_states(directory) -> dict[str, tuple[int, int]]:
    """Every file under ``directory``: relative path -> (size, modification time in ns)."""
    root = pathlib.Path(directory)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def dataset_view(dataset, out):
    """``out`` holding a link to every entry of the shared set ``dataset``: a test adds its own files
    (a derived shard) there and never into the shared set. The links must only be read."""
    out = pathlib.Path(out)
    out.mkdir(parents=True)
    for entry in pathlib.Path(dataset).iterdir():
        (out / entry.name).symlink_to(entry)
    return out


def train_argv(task, data, out_dir, *extra, tokenizer=None, eval_shards=None, eval_batch_size=48,
               train_batch_size=None, context_length=None, vision=TINY_VISION):
    """vlmcore-train arguments: ``configs/<task>_tiny.yaml`` writing to ``out_dir``, on the shapes set ``data``
    (never built by the trainer), then the ``extra`` overrides (they win).

    tokenizer: the tokenizer path; default ``data``'s word tokenizer.
    eval_shards / eval_batch_size: the evaluation; default ``data``'s first eval shard; a batch size of
        None means no evaluation at all (``data.eval=null``, ``eval_every=0``).
    train_batch_size: when given, ``data.train.0`` reads ``data``'s train shards in batches of that size.
    context_length: when given, ``tokenizer.context_length``.
    vision: the ``model.vision`` override; None keeps the config's tower.
    """
    argv = ["--config", str(CONFIGS / f"{task}_tiny.yaml"), f"out_dir={out_dir}", "data.shapes=null",
            f"tokenizer.path={tokenizer or f'{data}/tokenizer.json'}", "tokenizer.train_from_shapes=false",
            "progress_bar=false"]
    if eval_batch_size is None:
        argv += ["data.eval=null", "eval_every=0"]
    else:
        argv += [f"data.eval.shards={eval_shards or f'{data}/eval-000000.tar'}",
                 f"data.eval.batch_size={eval_batch_size}"]
    if train_batch_size is not None:
        argv += [f"data.train.0.shards={data}/train-*.tar", f"data.train.0.batch_size={train_batch_size}"]
    if context_length is not None:
        argv.append(f"tokenizer.context_length={context_length}")
    return argv + ([vision] if vision else []) + list(extra)


def reject_constant(constant):
    raise ValueError(f"metrics.jsonl is not strict JSON: {constant}")


def read_metrics(out_dir):
    """The step and eval records; every line must be strict JSON (no NaN / Infinity) with a UTC time."""
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line, parse_constant=reject_constant) for line in f]
    for line in lines:
        assert datetime.datetime.fromisoformat(line["time"]).utcoffset() == datetime.timedelta(0)
    return [x for x in lines if "loss" in x], [x for x in lines if "eval" in x]


def loss_falls(steps, k=4):
    losses = [s["loss"] for s in steps]
    return sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.05


def launch_two_ranks(tmp_path, driver: str, runs: list[list[str]]) -> None:
    """Run the Python script ``driver`` on 2 gloo ranks under the deepspeed launcher, in ``tmp_path``, with the
    argv lists ``runs`` in ``runs.json`` (its last argument); fails with the ranks' output if it fails."""
    import subprocess
    import sys

    from vlmcore.train.runtime.distributed import _free_port

    (pathlib.Path(tmp_path) / "driver.py").write_text(driver)
    (pathlib.Path(tmp_path) / "runs.json").write_text(json.dumps(runs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(_free_port()), "driver.py", "runs.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
