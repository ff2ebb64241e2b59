"""Trainer configuration: shipped configs validate; bad configs fail early with every problem listed."""

import os
import subprocess
import sys
from importlib import resources

import pytest
import yaml
from vlmcore.train.config import ConfigError, apply_overrides, load_config, parse_config

CONFIGS = resources.files("vlmcore.train") / "configs"
SHIPPED = ["clip_tiny.yaml", "flamingo_tiny.yaml", "frozen_tiny.yaml", "clip_vit_b16.yaml", "openflamingo_3b.yaml",
           "blip_pretrain_tiny.yaml", "blip_retrieval_tiny.yaml", "blip_caption_tiny.yaml",
           "blip_pretrain_vit_b16.yaml"]


def _raw(name: str) -> dict:
    with open(CONFIGS / name, encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_validate(name):
    cfg = load_config(str(CONFIGS / name))
    assert cfg.task in ("clip", "flamingo", "frozen", "blip_pretrain", "blip_retrieval", "blip_caption")
    assert cfg.max_steps > 0 and cfg.data.train


def test_gpu_examples_have_the_expected_scale():
    clip = load_config(str(CONFIGS / "clip_vit_b16.yaml"))
    assert (clip.model.vision.image_size, clip.model.vision.patch_size, clip.model.vision.width) == (224, 16, 768)
    assert clip.precision == "bf16"
    fl = load_config(str(CONFIGS / "openflamingo_3b.yaml"))
    assert fl.model.lm.path and fl.model.vision.freeze
    assert [d.weight for d in fl.data.train] == [1.0, 0.2]
    assert fl.model.flamingo.num_latents == 64


def test_every_problem_is_reported_at_once():
    raw = _raw("flamingo_tiny.yaml")
    raw["max_stepz"] = 3  # unknown key
    raw["max_steps"] = "ten"  # wrong type
    raw["optim"]["lr"] = -1.0  # impossible value (reported once the types are right)
    raw["data"]["train"][0]["kind"] = "videos"  # not an allowed value
    raw["model"]["vision"]["colour"] = 1  # unknown nested key
    del raw["out_dir"]  # required
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    for needle in ("max_stepz: unknown key", "max_steps: expected an integer", "data.train.0.kind: must be one of",
                   "model.vision.colour: unknown key", "out_dir: required key is missing"):
        assert needle in text, text
    assert len(err.value.problems) == 5  # lr's value is checked once the config can be built


def test_value_constraints_are_reported_together():
    raw = _raw("clip_tiny.yaml")
    raw["optim"]["lr"] = 0.0
    raw["model"]["vision"]["patch_size"] = 7  # 32 is not a multiple of 7
    raw["deepspeed"]["zero_optimization"]["stage"] = 5
    raw["deepspeed"]["train_batch_size"] = 64  # owned by the trainer
    raw["keep_last"] = 0
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    for needle in ("optim.lr: must be > 0", "model.vision.image_size: 32 is not a multiple of patch_size 7",
                   "deepspeed.zero_optimization.stage", "deepspeed.train_batch_size", "keep_last: must be >= 1"):
        assert needle in text, text


def test_task_consistency():
    raw = _raw("flamingo_tiny.yaml")
    raw["task"] = "clip"
    with pytest.raises(ConfigError, match="trains on image-text pairs only"):
        parse_config(raw)
    raw = _raw("frozen_tiny.yaml")
    raw["model"]["lm"] = {"path": "/x", "config": {"model_type": "llama"}}
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        parse_config(raw)


def test_overrides():
    cfg = load_config(str(CONFIGS / "flamingo_tiny.yaml"),
                      ["max_steps=7", "data.train.1.weight=0.2", "deepspeed.zero_optimization.stage=3",
                       "model.lm={path: /models/lm}", "resume=latest"])
    assert cfg.max_steps == 7 and cfg.data.train[1].weight == 0.2 and cfg.resume == "latest"
    assert cfg.deepspeed["zero_optimization"]["stage"] == 3 and cfg.model.lm.path == "/models/lm"
    with pytest.raises(ConfigError, match="does not name a place"):
        apply_overrides({"data": {"train": []}}, ["data.train.3.weight=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["max_steps"])
    with pytest.raises(ConfigError, match="max_steps: must be >= 1"):
        load_config(str(CONFIGS / "clip_tiny.yaml"), ["max_steps=0"])


def test_deepspeed_section_from_a_json_file(tmp_path):
    from vlmcore.train.deepspeed_config import deepspeed_dict

    good = tmp_path / "ds.json"
    good.write_text('{"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}')
    cfg = load_config(str(CONFIGS / "clip_tiny.yaml"), [f"deepspeed={good}"])
    assert deepspeed_dict(cfg)["zero_optimization"]["stage"] == 3
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(CONFIGS / "clip_tiny.yaml"), [f"deepspeed={tmp_path / 'missing.json'}"])
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 4}}')
    with pytest.raises(ConfigError, match="stage"):
        deepspeed_dict(load_config(str(CONFIGS / "clip_tiny.yaml"), [f"deepspeed={bad}"]))


def test_cli_rejects_a_bad_config_before_any_work(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: clip\nout_dir: x\nmax_steps: -1\nbogus: 1\n")
    proc = subprocess.run([sys.executable, "-m", "vlmcore.train", "--config", str(bad)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    for needle in ("bogus: unknown key", "data: required key is missing", "tokenizer: required key is missing"):
        assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()
