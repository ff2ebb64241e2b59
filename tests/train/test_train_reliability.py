"""Nothing lost, nothing executed, nothing silently wrong: the trainer state is no pickle, a damaged
checkpoint is named with the way forward, resume keeps the run's history, a full disk says so."""

import errno
import json
import os
import pickle

import pytest
from helpers.training import read_metrics, train_argv
from vlmcore.train import main
from vlmcore.train.runtime import checkpoint, state_file
from vlmcore.train.runtime.metrics import MetricsLogger


class FakeEngine:
    """DeepSpeed's save / load of one file per tag; the save can fail with an OSError."""

    def __init__(self, fail: OSError | None = None):
        self.fail, self.loaded = fail, []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "w") as f:
            f.write("weights" * 100)
        if self.fail is not None:
            raise self.fail

    def load_checkpoint(self, load_dir, tag, **kwargs):
        self.loaded.append(tag)
        return os.path.join(load_dir, tag), {}


def _saved(ckpt, steps):
    for step in steps:
        state = {"step": step, "nonfinite_steps": 0, "rng": checkpoint.rng_state(), "data": {}}
        checkpoint.save(FakeEngine(), str(ckpt), step, state, keep_last=5, rank=0)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_trainer_state_is_no_pickle_and_an_old_pickle_is_never_loaded(tmp_path):
    _saved(tmp_path / "ckpt", [2])
    tag_dir = tmp_path / "ckpt" / "step_00000002"
    assert not [n for n in os.listdir(tag_dir) if n.startswith("trainer_") and n.endswith(".pt")]
    assert state_file.read(str(tag_dir / "trainer_rank00000.safetensors"))["step"] == 2

    # An old-style trainer_rank00000.pt whose pickle runs a command: refused by name, never unpickled.
    os.remove(tag_dir / "trainer_rank00000.safetensors")
    marker = tmp_path / "pwned"
    with open(tag_dir / "trainer_rank00000.pt", "wb") as f:
        pickle.dump(RunsCode(marker), f)
    engine = FakeEngine()
    with pytest.raises(checkpoint.CheckpointError, match=r"step_00000002.*trainer_rank00000\.pt.*old pickle format"):
        checkpoint.load(engine, str(tmp_path / "ckpt"), "step_00000002", rank=0)
    assert not marker.exists() and engine.loaded == []


def test_damaged_checkpoints_name_tag_and_file_and_offer_the_previous_tag(tmp_path):
    ckpt = tmp_path / "ckpt"
    _saved(ckpt, [2, 4])
    newest = ckpt / "step_00000004"
    model_file = newest / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:10])  # truncated
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(FakeEngine(), str(ckpt), "step_00000004", rank=0)
    text = str(info.value)
    assert "'step_00000004'" in text and "mp_rank_00_model_states.pt has 10 bytes" in text
    assert "resume=step_00000002" in text and info.value.previous == "step_00000002"

    os.remove(model_file)
    with pytest.raises(checkpoint.CheckpointError, match=r"mp_rank_00_model_states.pt is missing.*step_00000002"):
        checkpoint.load(FakeEngine(), str(ckpt), "step_00000004", rank=0)

    # A truncated trainer state (the bare "OSError: [Errno 22]") names its file.
    _saved(ckpt, [6])
    state = ckpt / "step_00000006" / "trainer_rank00000.safetensors"
    state.write_bytes(state.read_bytes()[:40])
    with pytest.raises(checkpoint.CheckpointError, match=r"trainer_rank00000.safetensors has 40 bytes"):
        checkpoint.load(FakeEngine(), str(ckpt), "step_00000006", rank=0)
    (ckpt / "step_00000006" / checkpoint.COMPLETE).write_text("")  # an older marker without sizes
    with pytest.raises(checkpoint.CheckpointError, match=r"trainer_rank00000.safetensors: not a readable trainer"):
        checkpoint.load(FakeEngine(), str(ckpt), "step_00000006", rank=0)

    # resume: latest -> the damaged newest one: an error, or with the fallback option the previous whole one.
    with pytest.raises(checkpoint.CheckpointError, match="resume_fallback"):
        checkpoint.resume(FakeEngine(), str(ckpt), "latest", 0, None, fallback=False)
    engine = FakeEngine()
    tag, loaded, notes = checkpoint.resume(engine, str(ckpt), "latest", 0, None, fallback=True)
    assert (tag, loaded["step"], engine.loaded) == ("step_00000002", 2, ["step_00000002"])
    assert "Falling back to step_00000002" in notes[0]

    # The newest folder deleted by hand: not "resume with the same number of ranks".
    (ckpt / "latest").write_text("step_00000008")
    with pytest.raises(checkpoint.CheckpointError, match=r"step_00000008.*does not exist.*step_00000002"):
        checkpoint.resume(FakeEngine(), str(ckpt), "latest", 0, None, fallback=False)


def test_latest_missing_resolves_to_the_newest_complete_tag_and_no_complete_tag_is_an_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    _saved(ckpt, [2, 4])
    os.remove(ckpt / "latest")
    tag, note = checkpoint.resolve_resume(str(ckpt), "latest")
    assert tag == "step_00000004" and "latest is missing" in note
    for tag in ("step_00000002", "step_00000004"):
        os.remove(ckpt / tag / checkpoint.COMPLETE)
    with pytest.raises(checkpoint.CheckpointError, match="none is complete"):
        checkpoint.resolve_resume(str(ckpt), "latest")


def test_disk_full_during_a_save_says_so_and_removes_the_partial_folder(tmp_path):
    ckpt = tmp_path / "ckpt"
    _saved(ckpt, [2])
    full = FakeEngine(fail=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(checkpoint.CheckpointSaveError, match="no space left.*step_00000002 is still resumable"):
        checkpoint.save(full, str(ckpt), 4, {"step": 4}, keep_last=5, rank=0)
    assert sorted(os.listdir(ckpt)) == ["latest", "step_00000002"]
    assert checkpoint.verify(str(ckpt), "step_00000002", 0, 1) == []


def test_a_torn_metrics_line_is_dropped_and_earlier_lines_are_kept(tmp_path):
    lines = [json.dumps({"step": s, "time": "2026-12-06T00:00:00+00:00", "loss": 1.0}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 4, "ti')
    log = MetricsLogger(str(tmp_path), True, total_steps=6, start_step=2, progress_bar=False, resume_step=2)
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])


def test_resume_without_latest_and_with_a_torn_line_keeps_the_whole_history(data, tmp_path, capsys):
    out = tmp_path / "run"
    common = [f"data.train.0.shards={data}/train-*.tar", "save_every=2", "data.eval=null"]
    main(train_argv("clip", data, out, *common, "max_steps=4"))
    os.remove(out / "checkpoints" / "latest")  # a copied run, a hand-deleted file
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 5, "time": "2026-')  # a write torn by a kill / a full disk
    main(train_argv("clip", data, out, *common, "max_steps=6", "resume=latest"))
    steps, _ = read_metrics(out)
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]  # history intact, no restart from step 0
    logged = capsys.readouterr().out
    assert "latest is missing: resuming from the newest complete checkpoint step_00000004" in logged
    assert "torn last line" in logged


def _tar_bytes(samples) -> bytes:
    """A tar of ``(key, ext, bytes)`` members, in memory."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, ext, payload in samples:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _member_offsets(tar_bytes: bytes) -> list[tuple[int, int]]:
    """(header offset, data offset) of every member; only a reader knows them (a writer leaves them 0)."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return [(m.offset, m.offset_data) for m in tar.getmembers()]


def _write_shard(path, samples, truncated: bool = False):
    """A tar of ``(key, ext, bytes)`` members; ``truncated``: cut 100 bytes into its last member's data."""
    data = _tar_bytes(samples)
    end = _member_offsets(data)[-1][1] + 100 if truncated else None
    path.write_bytes(data[:end])


def _eval_pairs(data, n):
    import tarfile

    with tarfile.open(data / "eval-000000.tar") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        return [(m.name.split(".", 1)[0], m.name.split(".", 1)[1], tar.extractfile(m).read()) for m in members][:n]


def _eval_task(name, data, eval_shard, *extra):
    """(config, task, its model, one-rank DistInfo) of task ``name``'s tiny config evaluating ``eval_shard``."""
    import torch
    from vlmcore.train.config import load_config
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.runtime.distributed import DistInfo
    from vlmcore.train.tasks import get_task

    argv = train_argv(name, data, "unused", f"data.eval.shards={eval_shard}", *extra)
    cfg = load_config(argv[1], argv[2:])
    task = get_task(name)(cfg, Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length, media_tokens=False))
    return cfg, task, task.build_model(torch.float32), DistInfo(0, 1, 0, torch.device("cpu"))


def _clip_task(data, eval_shard, *extra):
    return _eval_task("clip", data, eval_shard, *extra)


def test_evaluation_counts_what_it_drops_and_refuses_zero_usable_samples(data, tmp_path, capsys):
    good = _eval_pairs(data, 24)  # 8 usable pairs (png, txt, json)
    no_caption = [(f"nc{i}", "png", good[0][2]) for i in range(3)]
    _write_shard(tmp_path / "mixed.tar", good + no_caption)
    _write_shard(tmp_path / "cut.tar", [("cut", "png", good[0][2] * 4)], truncated=True)
    _, task, model, info = _clip_task(data, f"[{tmp_path}/mixed.tar, {tmp_path}/cut.tar]")
    results = task.run_evaluation(model, info, zero_stage=0)
    assert results["eval_skipped/missing_caption"] == 3 and results["eval_skipped/unreadable_shard"] == 1
    assert results["eval_usable_samples"] == 8 and results["eval_skipped_samples"] == 4

    log = MetricsLogger(str(tmp_path / "out"), True, total_steps=1, progress_bar=False)
    log.log_eval(1, results)
    log.close()
    assert "warning: evaluation at step 1 skipped" in capsys.readouterr().out
    _, evals = read_metrics(tmp_path / "out")
    assert evals[0]["eval"]["eval_skipped/missing_caption"] == 3

    from vlmcore.train.data.eval_counts import EvalDataError

    empty = tmp_path / "empty.tar"
    _write_shard(empty, [])
    _, task, model, info = _clip_task(data, empty)
    with pytest.raises(EvalDataError, match="0 usable samples.*hold no sample"):
        task.run_evaluation(model, info, zero_stage=0)


def test_validation_samples_more_than_the_first_eval_record(data, tmp_path):
    from vlmcore.train.config import ConfigError
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.validate import validate_inputs

    good = _eval_pairs(data, 3)
    shard = tmp_path / "one-good.tar"
    _write_shard(shard, good + [(f"nc{i}", "png", good[0][2]) for i in range(15)])
    cfg, *_ = _clip_task(data, shard)
    with pytest.raises(ConfigError, match=r"15 of the first 16 eval samples are not usable.*15 missing_caption"):
        validate_inputs(cfg, lambda: Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length))


def _huge_png() -> bytes:
    """A 13000 x 13000 PNG of 20 KB (one colour compresses): decoded, 0.5 GB in RGB and seconds."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (13000, 13000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_above_the_pixel_cap_is_skipped_undecoded_and_the_cap_is_configurable(data, tmp_path):
    import time

    from vlmcore.train.data.eval_counts import EvalDataError
    from vlmcore.train.data.pipeline import SKIP_REASONS, BadSample, decode_image

    huge = _huge_png()
    started = time.perf_counter()
    with pytest.raises(BadSample, match="169000000 pixels") as refused:
        decode_image(huge, 16)
    assert refused.value.reason == "image_too_large" and "image_too_large" in SKIP_REASONS
    assert time.perf_counter() - started < 1.0  # its header only: decoding it takes seconds
    with pytest.raises(BadSample, match=r"image of 13000 x 13000 = 169000000 pixels is above the cap of 100000000"):
        decode_image(huge, 16, max_pixels=100_000_000)  # PIL's own guard follows the cap: no DecompressionBomb

    good = _eval_pairs(data, 24)  # 8 usable 32 x 32 pairs
    shard = tmp_path / "huge.tar"
    _write_shard(shard, good + [("huge", "png", huge), ("huge", "txt", b"a big square")])
    _, task, model, info = _clip_task(data, shard)
    results = task.run_evaluation(model, info, zero_stage=0)
    assert results["eval_skipped/image_too_large"] == 1 and results["eval_usable_samples"] == 8
    _, task, model, info = _clip_task(data, shard, "data.max_image_pixels=1000")  # 32 x 32 is above it too
    with pytest.raises(EvalDataError, match="all 9 skipped: 9 image_too_large"):
        task.run_evaluation(model, info, zero_stage=0)


@pytest.mark.parametrize("cut", ["in b.png's data", "between b.png and b.txt", "in b.txt's header"])
@pytest.mark.parametrize("streamed", [False, True])
def test_a_truncated_shard_keeps_the_samples_before_the_cut_and_counts_the_cut_one(tmp_path, cut, streamed):
    from vlmcore.train.data.pipeline import BadSample, pair_fields, read_tar

    whole = _tar_bytes([("a", "png", b"x" * 600), ("a", "txt", b"a cap"), ("b", "png", b"y" * 3000),
                        ("b", "txt", b"b cap")])
    (_, _), (_, _), (_, png_data), (txt_header, _) = _member_offsets(whole)
    end = {"in b.png's data": png_data + 100, "between b.png and b.txt": txt_header,
           "in b.txt's header": txt_header + 100}[cut]
    path = tmp_path / "cut.tar"
    path.write_bytes(whole[:end])
    url = f"pipe:cat {path}" if streamed else str(path)

    samples = read_tar(url)
    first, damage = next(samples), next(samples)
    with pytest.raises(StopIteration) as end_of_shard:
        next(samples)
    assert (first["__key__"], first["png"], first["txt"]) == ("a", b"x" * 600, b"a cap")
    assert damage["__offset__"] == 1 and damage["__reason__"] == "unreadable_shard"  # b, never yielded in part
    assert end_of_shard.value.value == 2
    with pytest.raises(BadSample) as skipped:
        pair_fields(damage)
    assert skipped.value.reason == "unreadable_shard" and str(path) in str(skipped.value)


@pytest.mark.parametrize("name", ["blip_retrieval", "blip2_stage1", "blip2_stage2"])
def test_blip_evaluation_of_no_usable_sample_is_the_clear_eval_error(data, tmp_path, name):
    from vlmcore.train.data.eval_counts import EvalDataError

    frozen = ["model.vision.freeze=true"] if name.startswith("blip2") else []  # BLIP-2 keeps its tower frozen
    empty = tmp_path / "empty.tar"
    _write_shard(empty, [])
    _, task, model, info = _eval_task(name, data, empty, *frozen)
    with pytest.raises(EvalDataError, match="0 usable samples.*hold no sample"):
        task.run_evaluation(model, info, zero_stage=0)
    # every eval image is above the cap: all unusable (the BLIP encoders honour data.max_image_pixels)
    _, task, model, info = _eval_task(name, data, f"{data}/eval-000000.tar", "data.max_image_pixels=1000", *frozen)
    with pytest.raises(EvalDataError, match=r"all \d+ skipped: \d+ image_too_large"):
        task.run_evaluation(model, info, zero_stage=0)


def test_a_context_length_that_would_hang_the_run_fails_before_training(data, tmp_path):
    from vlmcore.train.config import ConfigError

    with pytest.raises(ConfigError, match=r"tokenizer.context_length: must be in \[4, 65536\], got 100000"):
        main(train_argv("clip", data, tmp_path / "out", "tokenizer.context_length=100000"))
    lm = ("model.lm={config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
          "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}}")
    with pytest.raises(ConfigError, match=r"context_length: 100 is above the language model's max_position_embeddings"):
        main(train_argv("frozen", data, tmp_path / "out", lm, "tokenizer.context_length=100"))
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_a_stalled_rank_stops_the_run_within_the_collective_timeout(data, tmp_path):
    """Two gloo ranks under the deepspeed launcher; rank 1 sleeps (alive) after step 1: rank 0 stops
    with a message naming it, in far less than the backend's 30 minutes or the hour rank 1 sleeps."""
    import subprocess
    import sys
    import time

    from vlmcore.train.runtime.distributed import _free_port

    argv = train_argv("clip", data, tmp_path / "out", f"data.train.0.shards={data}/train-*.tar", "data.eval=null",
                      "max_steps=4", "collective_timeout_s=10")
    # The fault is a hook the driver installs: the last rank sleeps (alive, silent) after step 1.
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import time\nfrom vlmcore.train import main\n\n\n"
        "def stall_last_rank(trainer, step):\n"
        "    if step == 1 and trainer.info.rank == trainer.info.world_size - 1:\n"
        "        time.sleep(3600)\n\n\n"
        f"main({argv!r}, on_step_end=[stall_last_rank])\n")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    started = time.monotonic()
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(_free_port()), str(driver)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "CollectiveTimeoutError" in output and "collective_timeout_s=10 s" in output, output[-3000:]
    assert "rank 1 (last at step 1) did not arrive" in output, output[-3000:]
    assert elapsed < 400, elapsed  # start-up (~15-60 s on 2 shared cores) + the 10 s bound, not 30 min
