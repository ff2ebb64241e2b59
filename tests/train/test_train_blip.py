"""The BLIP trainer tasks in-process (one rank, DeepSpeed on gloo) on tiny shapes data: pre-training
learns and its out_dir is a BLIP checkpoint; retrieval and captioning fine-tune from it; the GPU
example config has BLIP's ViT-B/16 / BERT-base sizes and builds; bad configs are refused."""

from __future__ import annotations

import json
import os
from importlib import resources

import pytest
import torch
from helpers.training import train_argv
from vlmcore.train import main
from vlmcore.train.config import ConfigError, load_config
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks import get_task

from vlmcore.blip import load_blip

CONFIGS = resources.files("vlmcore.train") / "configs"
# train_argv options and settings of these trainings
RUN = {"eval_batch_size": 24, "train_batch_size": 16, "context_length": 12}
SETTINGS = ("save_every=0", "optim.lr=2e-3", "optim.warmup_steps=2")
TINY_TEXT = "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}"


@pytest.fixture(scope="module")
def data(shapes_dataset):
    # Not the shared set: pre-training must lower the LM loss by 0.1 within 24 steps, as checked on this one.
    return shapes_dataset(n_train=192, n_eval=48, n_docs=8, image_size=32, shard_size=96, seed=3)


def _steps(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        lines = [json.loads(line) for line in f]
    return [x for x in lines if "loss" in x]


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("blip_pre") / "run"
    result = main(train_argv("blip_pretrain", data, out, *SETTINGS, "max_steps=24", "eval_every=24",
                             f"model.blip_pretrain.text={TINY_TEXT}", "model.blip_pretrain.embed_dim=16",
                             "model.blip_pretrain.queue_size=64", "model.blip_pretrain.alpha_ramp_steps=10",
                             "model.blip_pretrain.k_test=4", **RUN))
    return out, result


def test_pretrain_learns_and_exports_a_blip_checkpoint(pretrained, data):
    out, result = pretrained
    steps = _steps(out)
    assert len(steps) == 24
    for key in ("itc", "itm", "lm", "itm_acc", "temperature", "alpha"):
        assert all(s.get(key) is not None for s in steps), key
    assert steps[0]["alpha"] == 0.0 and steps[-1]["alpha"] == pytest.approx(0.4)  # the ramp
    first, last = sum(s["lm"] for s in steps[:4]) / 4, sum(s["lm"] for s in steps[-4:]) / 4
    assert last < first - 0.1
    assert {"i2t_R@1", "t2i_R@5", "caption_token_acc", "blind_token_acc"} <= set(result)
    assert 0 <= result["i2t_R@1"] <= 1
    model = load_blip(str(out), momentum=None)  # the run folder is a checkpoint (CapFilt reads it)
    assert model.config.vocab_size == Tokenizer(str(data / "tokenizer.json")).vocab_size + 3


def test_retrieval_and_caption_fine_tune_from_the_pretrained_run(pretrained, data, tmp_path):
    pre, _ = pretrained
    common = (f"={TINY_TEXT}", "=16")
    ret = main(train_argv("blip_retrieval", data, tmp_path / "ret", *SETTINGS, "max_steps=4", "eval_every=0",
                          f"model.blip_retrieval.text{common[0]}", f"model.blip_retrieval.embed_dim{common[1]}",
                          "model.blip_retrieval.queue_size=64", "model.blip_retrieval.k_test=4",
                          f"model.blip_retrieval.init={pre}", **RUN))
    assert "i2t_R@1" in ret and "caption_token_acc" not in ret
    assert {"itc", "itm"} <= set(_steps(tmp_path / "ret")[0]) and "lm" not in _steps(tmp_path / "ret")[0]
    cap = main(train_argv("blip_caption", data, tmp_path / "cap", *SETTINGS, "max_steps=4", "eval_every=0",
                          f"model.blip_caption.text{common[0]}", f"model.blip_caption.embed_dim{common[1]}",
                          f"model.blip_caption.init={pre}", **RUN))
    assert "caption_token_acc" in cap and "i2t_R@1" not in cap
    assert load_blip(str(tmp_path / "cap")).momentum is None  # a captioner: no momentum encoders


def test_gpu_example_config_has_blip_base_sizes_and_builds():
    cfg = load_config(str(CONFIGS / "blip_pretrain_vit_b16.yaml"))
    v, c = cfg.model.vision, cfg.model.blip_pretrain
    assert (v.image_size, v.patch_size, v.width, v.depth, v.heads) == (224, 16, 768, 12, 12)
    assert (c.text.hidden_size, c.text.num_hidden_layers, c.text.intermediate_size) == (768, 12, 3072)
    assert (c.embed_dim, c.queue_size, c.momentum, c.alpha) == (256, 57600, 0.995, 0.4)
    assert cfg.precision == "bf16"

    class FakeTokenizer:  # the BERT tokenizer's sizes, without the files
        vocab_size, pad_token_id, eos_token_id, context_length = 30522, 0, 102, 30

    task = get_task("blip_pretrain")(cfg, FakeTokenizer())
    with torch.device("meta"):  # shapes only: 224 M + momentum copies, no memory
        model = task.build_model(torch.float32)
    assert model.visual_encoder.num_tokens == 197
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 200e6 < trainable < 260e6, trainable  # ViT-B/16 (86 M) + BERT-base MED with decoder SA (~140 M)
    assert model.image_queue.shape == (57600, 256)


def test_bad_blip_configs_are_refused(data, tmp_path):
    with pytest.raises(ConfigError) as err:
        main(train_argv("blip_pretrain", data, tmp_path / "x", *SETTINGS, "model.blip_pretrain.alpha=2.0",
                        "model.blip_pretrain.temperature=0.9", "deepspeed.zero_optimization.stage=3",
                        "model.blip_pretrain.init=/nowhere", **RUN))
    text = str(err.value)
    for needle in ("model.blip_pretrain.alpha", "model.blip_pretrain.temperature",
                   "deepspeed.zero_optimization.stage", "model.blip_pretrain.init"):
        assert needle in text, text


def test_image_ids_come_from_the_json_else_the_image_bytes(data):
    """COCO-style ``image_id`` in KEY.json groups captions of one image; without it, identical image
    bytes share an id; negative ids (reserved for empty queue slots) are bad samples."""
    from vlmcore.train.data.blip_text import BlipText
    from vlmcore.train.data.pipeline import BadSample, read_tar
    from vlmcore.train.tasks.blip_common import BlipEncoder

    encoder = BlipEncoder(BlipText(Tokenizer(str(data / "tokenizer.json"), 12)), 16, "")
    sample = next(read_tar(str(data / "train-000000.tar")))
    with_id = dict(sample, json=json.dumps({"image_id": 41}).encode())
    assert int(encoder(with_id)["image_ids"]) == 41
    hashed = [int(encoder(dict(sample, json=b"{}", __key__=k))["image_ids"]) for k in ("a", "b")]
    assert hashed[0] == hashed[1] >= 0  # same bytes, same id
    other = next(s for i, s in enumerate(read_tar(str(data / "train-000000.tar"))) if i == 1)
    assert int(encoder(dict(other, json=b"{}"))["image_ids"]) != hashed[0]
    with pytest.raises(BadSample, match="image_id -100") as bad:
        encoder(dict(sample, json=json.dumps({"image_id": -100}).encode()))
    assert bad.value.reason == "json_error"
