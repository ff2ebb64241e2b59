"""Shard specs: local paths keep their existence check; pipe: / s3 / http(s) URLs and OpenCLIP's
``a::b`` lists are streamed; a broken stream is skipped and counted, never fatal, never a hang."""

import io
import json
import os
import subprocess
import tarfile
import time
from importlib import resources

import pytest
from vlmcore.train import main
from vlmcore.train.data.pipeline import read_tar
from vlmcore.train.data.shards import ShardStreamError, expand_shard_spec, open_shard

CONFIGS = resources.files("vlmcore.train") / "configs"


def write_shard(path, n, start=0):
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            for ext, payload in (("txt", f"caption {i}".encode()), ("json", json.dumps({"i": i}).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def test_spec_expansion(tmp_path):
    a, b = write_shard(tmp_path / "a-0.tar", 1), write_shard(tmp_path / "a-1.tar", 1)
    assert expand_shard_spec(f"{tmp_path}/a-{{0..1}}.tar") == [a, b]
    assert expand_shard_spec(f"{tmp_path}/a-*.tar") == [a, b]
    assert expand_shard_spec(f"{a}::{b}") == [a, b]  # OpenCLIP's '::' list
    assert expand_shard_spec([f"file://{a}", f"pipe:cat {b}"]) == [a, f"pipe:cat {b}"]
    assert expand_shard_spec("s3://bucket/x-{0..1}.tar") == ["pipe:aws s3 cp s3://bucket/x-0.tar -",
                                                             "pipe:aws s3 cp s3://bucket/x-1.tar -"]
    [curl] = expand_shard_spec("https://host/data/x.tar?sig=a&b=c")
    assert curl.startswith("pipe:curl -s -L --fail") and curl.endswith("'https://host/data/x.tar?sig=a&b=c'")
    with pytest.raises(ValueError, match="1 of 2 file"):
        expand_shard_spec(f"{a}::{tmp_path}/missing.tar")
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        expand_shard_spec("gs://bucket/x.tar")
    with pytest.raises(ValueError, match="empty pipe command"):
        expand_shard_spec("pipe:")


def test_pipe_stream_gives_the_same_samples_as_the_file(tmp_path):
    path = write_shard(tmp_path / "s.tar", 5)
    local = [{k: v for k, v in s.items() if k != "__url__"} for s in read_tar(path)]
    piped = [{k: v for k, v in s.items() if k != "__url__"} for s in read_tar(f"pipe:cat {path}")]
    assert len(local) == 5 and piped == local


@pytest.mark.parametrize("command,good", [
    ("cat {path}; exit 3", 5),  # the whole tar, then a failure: 5 samples and one error
    ("false", 0),  # nothing at all
    ("head -c 2000 {path}", None),  # a truncated tar
    ("cat {path}.missing", 0),
])
def test_broken_stream_is_one_counted_error(tmp_path, command, good):
    path = write_shard(tmp_path / "s.tar", 5)
    samples = list(read_tar("pipe:" + command.format(path=path)))
    errors = [s for s in samples if "__error__" in s]
    assert len(errors) == 1 and samples[-1] is errors[0]
    if good is not None:
        assert len(samples) - 1 == good
    else:
        assert len(samples) - 1 < 5


def test_exit_status_is_reported_with_stderr(tmp_path):
    path = write_shard(tmp_path / "s.tar", 1)
    with pytest.raises(ShardStreamError, match="status 7: boom"):
        with open_shard(f"pipe:cat {path}; echo boom >&2; exit 7") as stream:
            stream.read()


def test_abandoned_stream_is_killed_not_waited_for(tmp_path):
    path = write_shard(tmp_path / "s.tar", 3)
    marker = tmp_path / "pid"
    samples = read_tar(f"pipe:echo $$ > {marker}; cat {path}; sleep 600")
    start = time.monotonic()
    next(samples)
    samples.close()  # the reader stops mid-shard
    assert time.monotonic() - start < 10
    pid = int(marker.read_text())
    # The whole process group is gone: signalling it fails (the orphaned `sleep` is reaped by init
    # shortly after its SIGKILL, hence the short wait).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


@pytest.fixture(scope="module")
def pair_shards(shapes_dataset):
    # Not the shared set: 96 pairs in 3 shards of 32, so that 8 steps of 16 reach the failing pipe.
    return shapes_dataset(n_train=96, n_eval=16, n_docs=8, image_size=16, shard_size=32, seed=3)


def test_clip_trains_from_pipe_and_double_colon_specs(pair_shards, tmp_path):
    d = pair_shards
    out = tmp_path / "run"
    spec = f"['pipe:cat {d}/train-000000.tar', '{d}/train-000001.tar::{d}/train-000002.tar', 'pipe:exit 1']"
    main(["--config", str(CONFIGS / "clip_tiny.yaml"), f"out_dir={out}", "data.shapes=null", "data.eval=null",
          f"tokenizer.path={d}/tokenizer.json", "tokenizer.train_from_shapes=false", "tokenizer.context_length=12",
          "progress_bar=false", "max_steps=8", "save_every=0", "eval_every=0",
          "model.vision={image_size: 16, patch_size: 8, width: 32, depth: 1, heads: 2}",
          "model.clip={embed_dim: 32, text: {width: 32, depth: 1, heads: 2}}",
          f"data.train.0.shards={spec}", "data.train.0.batch_size=16", "data.train.0.resampled=false",
          "data.train.0.shuffle_buffer=0"])
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        steps = [json.loads(line) for line in f if '"loss"' in line]
    assert [s["step"] for s in steps] == list(range(1, 9))
    # 96 samples per epoch = 6 batches of 16: by step 8 the failing pipe was read in epoch 1 (and maybe 2).
    assert steps[-1]["skipped_samples"] >= 1
    leftover = subprocess.run(["pgrep", "-f", f"cat {d}/train-000000.tar"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
