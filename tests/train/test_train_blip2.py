"""Trainer tasks ``blip2_stage1`` and ``blip2_stage2``: the shipped configs validate, bad sections fail
by name, and a few in-process steps of each (stage 2 from stage 1's weights) train, evaluate and export."""

import json
import os
from importlib import resources

import pytest
import torch
import yaml
from safetensors.torch import load_file
from vlmcore.train import main, tasks
from vlmcore.train.config import ConfigError, load_config
from vlmcore.train.data.tokenizer import Tokenizer

CONFIGS = resources.files("vlmcore.train") / "configs"
SHIPPED = ["blip2_stage1_tiny.yaml", "blip2_stage2_tiny.yaml", "blip2_stage1_eva_vitg.yaml",
           "blip2_stage2_opt2.7b.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_blip2_configs_validate(name):
    cfg = load_config(str(CONFIGS / name))
    assert cfg.task in ("blip2_stage1", "blip2_stage2")
    assert tasks.get_task(cfg.task).name == cfg.task


def test_gpu_configs_have_the_paper_shapes():
    s1 = load_config(str(CONFIGS / "blip2_stage1_eva_vitg.yaml"))
    q = s1.model.blip2_stage1.qformer
    shape = (q.hidden_size, q.num_layers, q.num_heads, q.num_query_tokens, q.cross_attention_freq)
    assert shape == (768, 12, 12, 32, 2)
    assert s1.model.vision.width == 1408 and (s1.model.vision.image_size // s1.model.vision.patch_size) ** 2 + 1 == 257
    assert s1.data.train[0].batch_size == 100 and s1.model.blip2_stage1.embed_dim == 256
    s2 = load_config(str(CONFIGS / "blip2_stage2_opt2.7b.yaml"))
    assert s2.model.lm.path and s2.model.blip2_stage2.stage1_init.endswith("trainable.safetensors")


def test_bad_blip2_sections_fail_by_name():
    with pytest.raises(ConfigError) as err:
        load_config(str(CONFIGS / "blip2_stage1_tiny.yaml"),
                    ["model.blip2_stage1.qformer.num_heads=3", "model.blip2_stage1.eval_k=0",
                     "model.vision.freeze=false", "model.blip2_stage1.qformer.max_position_embeddings=8"])
    text = str(err.value)
    for expected in ("model.blip2_stage1.qformer.hidden_size: 64 is not divisible by num_heads 3",
                     "model.blip2_stage1.eval_k: must be >= 1", "model.vision.freeze: task 'blip2_stage1' keeps",
                     "tokenizer.context_length: 16 exceeds model.blip2_stage1.qformer.max_position_embeddings (8)"):
        assert expected in text, text
    with pytest.raises(ConfigError, match="model.lm: task 'blip2_stage2' needs a language model"):
        load_config(str(CONFIGS / "blip2_stage2_tiny.yaml"), ["model.lm=null"])
    with pytest.raises(ConfigError, match="model.blip2_stage2.qformr: unknown key"):
        load_config(str(CONFIGS / "blip2_stage2_tiny.yaml"), ["model.blip2_stage2.qformr={}"])


@pytest.fixture(scope="module")
def tiny_data(shapes_dataset):
    # Not the shared set: stage 1's evaluation must count its 12 held-out pairs.
    return shapes_dataset(n_train=32, n_eval=12, n_docs=4, image_size=16, shard_size=32, seed=0)


def _config(tmp_path, data, name, out, **model):
    raw = yaml.safe_load((CONFIGS / name).read_text())
    raw.update({"out_dir": str(tmp_path / out), "max_steps": 3, "eval_every": 0, "save_every": 0,
                "progress_bar": False})
    raw["data"] = {"train": [{"shards": f"{data}/train-000000.tar", "batch_size": 4, "shuffle_buffer": 0}],
                   "eval": {"shards": f"{data}/eval-000000.tar", "batch_size": 6}}
    raw["tokenizer"] = {"path": str(data / "tokenizer.json"), "context_length": raw["tokenizer"]["context_length"]}
    raw["model"]["vision"] = {"image_size": 16, "patch_size": 8, "width": 16, "depth": 1, "heads": 2, "freeze": True}
    for key, value in model.items():
        raw["model"][raw["task"]][key] = value
    raw["model"][raw["task"]]["qformer"] = {"hidden_size": 32, "num_layers": 2, "num_heads": 2,
                                            "intermediate_size": 48, "num_query_tokens": 4,
                                            "max_position_embeddings": 32}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_stage1_then_stage2_train_in_process(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setenv("VLMCORE_BACKEND", "reference")  # the kernels are covered by their own tests
    result = main(["--config", str(_config(tmp_path, tiny_data, "blip2_stage1_tiny.yaml", "s1", eval_k=4))])
    for key in ("itc_i2t_R@1", "itc_t2i_R@10", "itm_i2t_R@1", "itm_t2i_R@5"):
        assert 0.0 <= result[key] <= 1.0, result
    assert result["eval_samples"] == 12
    with open(tmp_path / "s1" / "metrics.jsonl", encoding="utf-8") as f:
        steps = [line for line in map(json.loads, f) if "loss" in line]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert s["loss_itc"] > 0 and s["loss_itm"] > 0 and s["loss_itg"] > 0 and 0 < s["temperature"] <= 0.5
    stage1 = tmp_path / "s1" / "trainable.safetensors"
    weights = load_file(str(stage1))
    assert "qformer.query_tokens" in weights and "itm_head.weight" in weights
    assert not any(k.startswith("vision_encoder.") for k in weights)

    result = main(["--config", str(_config(tmp_path, tiny_data, "blip2_stage2_tiny.yaml", "s2",
                                           stage1_init=str(stage1)))])
    assert set(result) >= {"caption_token_acc", "blind_token_acc", "eval_tokens"} and result["eval_tokens"] > 0
    exported = load_file(str(tmp_path / "s2" / "trainable.safetensors"))
    assert "language_projection.weight" in exported and not any(k.startswith("lang_model.") for k in exported)
    assert os.path.isfile(tmp_path / "s2" / "eval.json")
    missing = load_config(str(_config(tmp_path, tiny_data, "blip2_stage2_tiny.yaml", "s3",
                                      stage1_init=str(tmp_path / "missing.safetensors"))))
    task = tasks.get_task("blip2_stage2")(missing, Tokenizer(str(tiny_data / "tokenizer.json"), 24))
    with pytest.raises(ValueError, match="stage1_init.*does not exist"):
        task.build_model(torch.float32)
