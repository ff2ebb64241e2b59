"""The ``vilbert`` and ``vlbert`` trainer tasks: in-process trainings on the shapes region features,
their configs, the region encoder's bad samples, and the eval metrics."""

from __future__ import annotations

import io
import json
import tarfile
from importlib import resources

import numpy as np
import pytest
import torch
import yaml
from vlmcore.train import main, tasks
from vlmcore.train.config import ConfigError, load_config
from vlmcore.train.data.pipeline import BadSample, read_tar
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks.vilbert import RegionPairEncoder, bert_special_ids

CONFIGS = resources.files("vlmcore.train") / "configs"


def _config(tmp_path, regions, task: str, **extra) -> str:
    with open(CONFIGS / f"{task}_tiny.yaml", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    config.update({"out_dir": str(tmp_path / task), "max_steps": 3, "save_every": 0, "eval_every": 0,
                   "progress_bar": False})
    config["data"]["train"][0].update(shards=f"{regions}/regions-train-000000.tar", batch_size=8, shuffle_buffer=0)
    config["data"]["eval"] = {"shards": f"{regions}/regions-eval-000000.tar", "batch_size": 12}
    config["tokenizer"]["path"] = f"{regions}/tokenizer.json"
    section = config["model"][task]
    section.update(v_feature_size=32, hidden_size=32, intermediate_size=48, num_attention_heads=2, **extra)
    if task == "vilbert":
        section.update(v_hidden_size=32, v_intermediate_size=48, bi_hidden_size=32, v_num_attention_heads=2,
                       bi_num_attention_heads=2)
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _steps(run_dir):
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [line for line in map(json.loads, f) if "loss" in line]


def test_registry_has_the_region_tasks():
    assert {"vilbert", "vlbert"} <= set(tasks.task_names())
    for name in ("vilbert", "vlbert"):
        assert tasks.get_task(name).name == name


def test_vilbert_trains_and_evaluates(tmp_path, regions):
    result = main(["--config", _config(tmp_path, regions, "vilbert")])
    counts = {"eval_usable_samples", "eval_skipped_samples"}  # every evaluation counts what it used / skipped
    assert set(result) - counts == {"alignment_acc", "i2t_r1", "t2i_r1", "eval_samples"}
    assert result["eval_skipped_samples"] == 0
    assert result["eval_samples"] == 24 and 0 <= result["alignment_acc"] <= 1
    steps = _steps(tmp_path / "vilbert")
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert all(np.isfinite(s["loss"]) and {"mlm_loss", "region_loss", "alignment_loss", "alignment_acc"} <= set(s)
               for s in steps)
    assert (tmp_path / "vilbert" / "trainable.safetensors").is_file()


def test_vlbert_trains_and_evaluates(tmp_path, regions):
    result = main(["--config", _config(tmp_path, regions, "vlbert")])
    counts = {"eval_usable_samples", "eval_skipped_samples"}  # every evaluation counts what it used / skipped
    assert set(result) - counts == {"mlm_acc", "masked_region_acc", "eval_masked_tokens", "eval_masked_regions"}
    assert result["eval_skipped_samples"] == 0
    assert result["eval_masked_tokens"] > 0 and result["eval_masked_regions"] > 0
    assert all({"mlm_loss", "region_loss"} <= set(s) for s in _steps(tmp_path / "vlbert"))


def test_region_task_configs_are_validated(tmp_path, regions):
    path = _config(tmp_path, regions, "vilbert")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["model.vilbert.mlm_probability=1.5", "model.vilbert.bi_hidden_size=33",
                           "model.vilbert.v_featur_size=4"])
    text = str(err.value)
    assert "model.vilbert.mlm_probability: must be in (0, 1)" in text
    assert "bi_hidden_size=33 is not divisible" in text
    assert "model.vilbert.v_featur_size: unknown key" in text
    assert load_config(str(CONFIGS / "vilbert_tiny.yaml")).model.vilbert.max_regions == 10
    assert load_config(str(CONFIGS / "vlbert_tiny.yaml")).task == "vlbert"


def test_region_encoder_layout_and_bad_samples(regions):
    tok = Tokenizer(f"{regions}/tokenizer.json", 14)
    cfg = tasks.get_task("vilbert").Config(v_feature_size=32, max_regions=6)
    encoder = RegionPairEncoder(tok, cfg)
    sample = next(read_tar(f"{regions}/regions-eval-000000.tar"))
    out = encoder(sample)
    cls_id, sep_id, mask_id = bert_special_ids(tok)
    ids = out["input_ids"].tolist()
    n = int(out["attention_mask"].sum())
    assert ids[0] == cls_id and ids[n - 1] == sep_id and tok.decode(ids[1:n - 1]) == sample["txt"].decode()
    assert mask_id not in ids
    assert out["region_features"].shape == (6, 32) and out["region_mask"].dtype == torch.bool
    with pytest.raises(BadSample, match="no region features"):
        encoder({k: v for k, v in sample.items() if k != "npz"})
    with pytest.raises(BadSample, match=r"features must be \[R, 64\], got \[9, 32\]"):
        RegionPairEncoder(tok, tasks.get_task("vilbert").Config(v_feature_size=64))(sample)
    with pytest.raises(BadSample, match="empty caption"):
        encoder({**sample, "txt": b"  "})


def test_bad_region_samples_are_skipped_and_training_goes_on(tmp_path, regions):
    """A shard with broken npz members between good samples trains; the bad ones are counted."""
    good = list(read_tar(f"{regions}/regions-train-000000.tar"))[:24]
    shard = tmp_path / "mixed.tar"
    with tarfile.open(shard, "w") as tar:
        for i, sample in enumerate(good):
            members = {"npz": b"garbage" if i % 4 == 0 else sample["npz"], "txt": sample["txt"]}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    path = _config(tmp_path, regions, "vilbert")
    main(["--config", path, f"data.train.0.shards={shard}", "data.eval=null", "max_steps=2"])
    steps = _steps(tmp_path / "vilbert")
    assert steps[-1]["skipped_samples"] > 0
