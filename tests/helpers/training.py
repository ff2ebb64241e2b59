"""In-process training helpers: the tiny shapes data, the trainer argv, metrics.jsonl readers."""

from __future__ import annotations

import datetime
import io
import json
import os
import tarfile
from importlib import resources

from vlmcore.train.data.tokenizer import train_word_tokenizer
from vlmcore.train.tools import shapes

CONFIGS = resources.files("vlmcore.train") / "configs"


def make_train_data(out) -> None:
    """The shapes set of the in-process trainings (+ its tokenizer and a shard of broken samples) in ``out``."""
    shapes.make_shapes(str(out), n_train=192, n_eval=48, n_docs=64, image_size=32, shard_size=48, seed=2)
    train_word_tokenizer(str(out / "captions.txt"), str(out / "tokenizer.json"))
    # A shard of broken samples, mixed into the training shards of the CLIP run.
    good = tarfile.open(out / "train-000000.tar")
    png = good.extractfile(good.getmembers()[0]).read()
    with tarfile.open(out / "bad-000000.tar", "w") as tar:
        for key, ext, payload in [("b0", "png", png[:50]), ("b0", "txt", b"a red circle"), ("b1", "png", png),
                                  ("b2", "txt", b"\xff\xfe")]:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def train_argv(task, data, out_dir, *extra):
    return ["--config", str(CONFIGS / f"{task}_tiny.yaml"), f"out_dir={out_dir}", "data.shapes=null",
            f"tokenizer.path={data}/tokenizer.json", "tokenizer.train_from_shapes=false",
            f"data.eval.shards={data}/eval-000000.tar", "data.eval.batch_size=48", "progress_bar=false",
            "model.vision={image_size: 16, patch_size: 8, width: 32, depth: 1, heads: 2}", *extra]


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
