"""Flamingo trained on video clips through ``vlmcore-train``: real mp4 members (PyAV's encoder) and the
frames layout, mixed with image-text pairs, on 1 rank in-process and on 2 gloo ranks; corrupt clips
are counted skips (``skipped/<dataset>/bad_video`` in metrics.jsonl)."""

import json
import math
import os
import subprocess
import sys

import pytest
from helpers.training import dataset_view, read_metrics, train_argv
from vlmcore.train import main
from vlmcore.train.data.pipeline import read_tar
from vlmcore.train.data.tar_writer import ShardWriter
from vlmcore.train.data.tokenizer import train_word_tokenizer
from vlmcore.train.tools.shape_drawing import CLASSNAMES, DIRECTIONS
from vlmcore.train.tools.video_shapes import make_video_shapes

pytest.importorskip("av")

TINY_LM = ("model.lm={config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
           "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}}")
CLIP = {"n_train": 32, "n_eval": 4, "num_frames": 6, "image_size": 16, "shard_size": 8}


def _with_a_corrupt_clip_per_shard(src_dir, out_dir):
    """The clips of ``src_dir``'s training shards rewritten into shards of 8 whose first clip is cut short
    (every rank that reads a shard meets one)."""
    writer = ShardWriter(str(out_dir), "clips", 8)
    samples = [s for name in sorted(os.listdir(src_dir)) if name.startswith("video-train-")
               for s in read_tar(os.path.join(src_dir, name))]
    for i, sample in enumerate(samples):
        members = {k: v for k, v in sample.items() if not k.startswith("__")}
        if i % 8 == 0:
            members["mp4"] = members["mp4"][: len(members["mp4"]) // 3]
        writer.write(sample["__key__"], members)
    writer.close()


@pytest.fixture(scope="module")
def videos(data, tmp_path_factory):
    """mp4 clips (a corrupt one per shard), frames-layout clips and the shared shapes pairs, with a word
    tokenizer that knows every caption word of both sets."""
    out = dataset_view(data, tmp_path_factory.mktemp("video") / "set")
    make_video_shapes(str(out / "mp4"), **CLIP, seed=1, video_format="mp4")
    make_video_shapes(str(out / "frames"), **CLIP, seed=2, video_format="frames")
    _with_a_corrupt_clip_per_shard(out / "mp4", out)
    words = (out / "captions.txt").read_text() + "".join(f"a {c} moving {d}\n" for c in CLASSNAMES for d in DIRECTIONS)
    (out / "words.txt").write_text(words)
    train_word_tokenizer(str(out / "words.txt"), str(out / "video_tokenizer.json"))
    return out


def _argv(videos, out_dir, *extra):
    datasets = (f"data.train=[{{name: clips, kind: video, shards: '{videos}/clips-*.tar', num_frames: 4, batch_size: 4,"
                f" resampled: false, shuffle_buffer: 0}}, {{name: frames, kind: video, shards: "
                f"'{videos}/frames/video-train-*.tar', num_frames: 3, batch_size: 4, shuffle_buffer: 0}}, "
                f"{{name: pairs, kind: pairs, shards: '{videos}/train-*.tar', batch_size: 4, weight: 0.2}}]")
    return train_argv("flamingo", videos, out_dir, datasets, TINY_LM, "model.flamingo.max_num_frames=4",
                      "model.flamingo.num_latents=4", "save_every=0", "optim.lr=3e-3", *extra,
                      tokenizer=f"{videos}/video_tokenizer.json", eval_batch_size=None, context_length=16)


def _check_run(out_dir, steps_expected, ranks):
    steps, _ = read_metrics(out_dir)
    assert [s["step"] for s in steps] == list(range(1, steps_expected + 1))
    assert all(math.isfinite(s["loss"]) and math.isfinite(s["loss/clips"]) for s in steps)
    last = steps[-1]
    # samples/<dataset> is per step, summed over ranks: one batch of 4 per dataset and rank
    assert last["samples/clips"] == last["samples/frames"] == last["samples/pairs"] == 4 * ranks
    assert last["skipped/clips/bad_video"] >= ranks  # every rank read a shard with a corrupt clip
    assert not any(k.startswith("skipped/frames/") or k.startswith("skipped/pairs/") for k in last)
    return steps


def test_video_mixture_trains_on_one_rank(videos, tmp_path):
    main(_argv(videos, tmp_path / "run", "max_steps=10"))
    steps = _check_run(tmp_path / "run", 10, ranks=1)
    assert sum(s["loss/clips"] for s in steps[-3:]) < sum(s["loss/clips"] for s in steps[:3])


DRIVER = """
import json, sys
from vlmcore.train import main

main(json.load(open(sys.argv[-1])))  # the launcher puts --local_rank=N first
"""


@pytest.mark.distributed
@pytest.mark.slow
def test_video_mixture_trains_on_two_gloo_ranks(videos, tmp_path):
    driver, spec = tmp_path / "driver.py", tmp_path / "argv.json"
    driver.write_text(DRIVER)
    spec.write_text(json.dumps(_argv(videos, tmp_path / "run", "max_steps=6", "deepspeed.zero_optimization.stage=2")))
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    from vlmcore.train.runtime.distributed import _free_port

    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(driver), str(spec)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _check_run(tmp_path / "run", 6, ranks=2)
