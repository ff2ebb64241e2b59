"""The OpenCLIP / OpenFlamingo trainer features, each behind a config key: lr schedules, epochs and
train_num_samples, fp16 (CUDA only), LiT locking, CLIP activation checkpointing, OpenFlamingo's loss
masking, CLIP on a dataset mixture, gradient accumulation (exact for the LM loss), threads per rank."""

import json
import math
import os
import tarfile
from importlib import resources

import pytest
import torch
from helpers.training import train_argv
from vlmcore.train import ConfigError, main
from vlmcore.train.config import load_config
from vlmcore.train.data.pipeline import IGNORE_INDEX
from vlmcore.train.data.tokenizer import MEDIA, Tokenizer
from vlmcore.train.runtime import distributed
from vlmcore.train.runtime.engine import build_ds_config, resolve_precision
from vlmcore.train.runtime.schedule import lr_lambda, resolve_max_steps, samples_per_step
from vlmcore.train.tasks import get_task

CONFIGS = resources.files("vlmcore.train") / "configs"
VISION = "model.vision={image_size: 16, patch_size: 8, width: 32, depth: 2, heads: 2}"
RUN = {"eval_batch_size": None, "vision": VISION}  # the trainings here: no evaluation, a 2-block tower
TEXT = ["model.clip.text={width: 32, depth: 2, heads: 2}", "model.clip.embed_dim=32", "tokenizer.context_length=12"]
TINY_LM = ("model.lm={config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
           "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}}")


def _cfg(data, task="clip", *extra):
    return load_config(str(CONFIGS / f"{task}_tiny.yaml"), [
        "out_dir=x", "data.shapes=null", "tokenizer.train_from_shapes=false", f"tokenizer.path={data}/tokenizer.json",
        f"data.eval.shards={data}/eval-000000.tar", VISION, *extra])


def _steps(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_schedules(data):
    def factors(schedule, **optim):
        extra = [f"optim.{k}={v}" for k, v in optim.items()]
        cfg = _cfg(data, "clip", "max_steps=100", f"optim.schedule={schedule}", "optim.warmup_steps=10", *extra)
        f = lr_lambda(cfg)
        return [f(s) for s in range(100)]

    for schedule in ("cosine", "linear", "constant", "warmup_constant_cooldown"):
        lr = factors(schedule)
        assert lr[:10] == pytest.approx([(s + 1) / 10 for s in range(10)]), schedule  # the same warmup
        assert lr[10] == pytest.approx(1.0), schedule
    assert factors("constant")[99] == 1.0
    linear = factors("linear", min_lr_ratio=0.1)
    assert linear[55] == pytest.approx(1 - 0.9 * 45 / 90) and linear[99] == pytest.approx(0.1 + 0.9 / 90)
    cosine = factors("cosine", min_lr_ratio=0.0)
    assert cosine[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    wsd = factors("warmup_constant_cooldown", cooldown_fraction=0.2, min_lr_ratio=0.0)
    assert wsd[10:80] == [1.0] * 70  # constant until the last 20 steps
    assert wsd[80] == pytest.approx(1 - 1 / 20) and wsd[89] == pytest.approx(0.5) and wsd[99] == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="optim.schedule: must be one of"):
        _cfg(data, "clip", "optim.schedule=step")
    with pytest.raises(ConfigError, match="optim.cooldown_fraction: must be in"):
        _cfg(data, "clip", "optim.cooldown_fraction=0")


def test_epochs_and_train_num_samples_give_the_steps(data):
    cfg = _cfg(data, "clip", "max_steps=0", "epochs=3", "train_num_samples=1000", "data.train.0.batch_size=8",
               "optim.accumulation_steps=2")
    # OpenCLIP: ceil(1000 / (8 per rank x 2 ranks)) = 63 batches per epoch, // accum 2 ... here the global batch
    # of one optimizer step is 8 x 2 ranks x 2 micro-batches = 32: ceil(1000 / 32) = 32 steps per epoch.
    assert samples_per_step(cfg, 2) == 32 and resolve_max_steps(cfg, 2) == 3 * 32
    assert resolve_max_steps(cfg, 1) == 3 * math.ceil(1000 / 16)
    with pytest.raises(ConfigError, match="give either max_steps or epochs"):
        _cfg(data, "clip", "max_steps=5", "epochs=1", "train_num_samples=10")
    with pytest.raises(ConfigError, match="train_num_samples: must be >= 1 with epochs set"):
        _cfg(data, "clip", "max_steps=0", "epochs=2")


def test_fp16_is_cuda_only_with_dynamic_loss_scaling(data):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = _cfg(data, "clip", "precision=fp16", "deepspeed.fp16={loss_scale_window: 200}")
    with pytest.raises(ValueError, match="precision: fp16 needs a CUDA device"):
        resolve_precision(cfg, torch.device("cpu"))
    assert resolve_precision(cfg, torch.device("cuda")) == "fp16"
    ds = build_ds_config(cfg, "fp16")
    assert ds["fp16"] == {"loss_scale": 0, "loss_scale_window": 200, "enabled": True} and not ds["bf16"]["enabled"]
    fp16 = DeepSpeedConfig(ds).float16_config  # DeepSpeed's reading: dynamic scaling (loss_scale 0)
    assert fp16.enabled and fp16.loss_scale == 0 and fp16.loss_scale_window == 200
    assert build_ds_config(_cfg(data, "clip"), "fp32")["fp16"] == {"enabled": False}
    with pytest.raises(ConfigError, match="deepspeed.fp16.enabled: the trainer's precision decides"):
        _cfg(data, "clip", "deepspeed.fp16={enabled: true}")


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lit_locking_leaves_the_last_blocks_trainable(data):
    tok = Tokenizer(str(data / "tokenizer.json"), 12)
    build = lambda *extra: get_task("clip")(_cfg(data, "clip", *TEXT, *extra), tok).build_model(torch.float32)  # noqa: E731
    names = _trainable(build("model.vision.freeze=true"))  # OpenCLIP --lock-image: the tower is frozen
    assert not any(n.startswith("visual.") for n in names) and "image_projection.weight" in names
    names = _trainable(build("model.vision.freeze=true", "model.vision.unlocked_layers=1"))
    visual = {n.split(".")[1] + ("." + n.split(".")[2] if n.split(".")[1] == "blocks" else "") for n in names
              if n.startswith("visual.")}
    assert visual == {"blocks.1", "ln_post"}  # the last block and what follows it
    names = _trainable(build("model.clip.text.lock=true"))  # --lock-text: tower and projection frozen
    assert not any(n.startswith(("text.", "text_projection")) for n in names) and "visual.conv1.weight" in names
    names = _trainable(build("model.clip.text.lock=true", "model.clip.text.unlocked_layers=2"))
    assert {n for n in names if n.startswith("text")} == {n for n, _ in build().named_parameters()
                                                        if n.startswith(("text.blocks", "text.ln_final", "text_proj"))}
    with pytest.raises(ConfigError, match="unlocked_layers: must be in \\[0, depth=2\\]"):
        _cfg(data, "clip", *TEXT, "model.clip.text.lock=true", "model.clip.text.unlocked_layers=3")
    with pytest.raises(ConfigError, match="model.vision.unlocked_layers: only meaningful with model.vision.freeze"):
        _cfg(data, "clip", "model.vision.unlocked_layers=1")


def test_clip_gradient_checkpointing_gives_the_same_gradients(data):
    tok = Tokenizer(str(data / "tokenizer.json"), 12)
    grads = []
    for flag in ("false", "true"):
        torch.manual_seed(0)
        cfg = _cfg(data, "clip", *TEXT, f"model.gradient_checkpointing={flag}")
        task = get_task("clip")(cfg, tok)
        model = task.build_model(torch.float32)
        torch.manual_seed(1)
        batch = {"images": torch.randn(4, 3, 16, 16), "tokens": tok(["a red circle", "a blue square", "a", "b"])}
        loss, _ = task.loss(model, batch, torch.device("cpu"))
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()  # parameter names unchanged (vision.safetensors stays loadable)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_flamingo_loss_masking_before_the_first_image(data):
    tok = Tokenizer(str(data / "tokenizer.json"), 24)
    cfg = _cfg(data, "flamingo", TINY_LM, "tokenizer.context_length=24")
    doc = {"__key__": "d0", "json": json.dumps({"text_list": ["a red circle", "a blue square"], "image_info": [
        {"image_name": "img0.png", "matched_text_index": 1}]}).encode()}
    with tarfile.open(data / "train-000000.tar") as tar:
        doc["img0.png"] = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".png"))).read()
    plain = get_task("flamingo")(cfg, tok).encoder("interleaved", 1)(doc)
    cfg = _cfg(data, "flamingo", TINY_LM, "tokenizer.context_length=24",
               "model.flamingo.mask_text_before_first_image=true")
    masked = get_task("flamingo")(cfg, tok).encoder("interleaved", 1)(doc)
    first = int((plain["input_ids"] == tok.media_token_id).nonzero()[0, 0])
    assert first == len(tok.encode("a red circle")) and tok.decode(plain["input_ids"][first:first + 1]).strip() == MEDIA
    assert (plain["labels"][:first] != IGNORE_INDEX).all() and (masked["labels"][:first] == IGNORE_INDEX).all()
    assert torch.equal(masked["labels"][first:], plain["labels"][first:])


def test_clip_trains_on_a_weighted_mixture(data, tmp_path):
    out = tmp_path / "mix"
    main(train_argv("clip", data, out, "save_every=0", *TEXT, "max_steps=3",
                    f"data.train=[{{name: a, shards: '{data}/train-*.tar', batch_size: 8}}, "
                    f"{{name: b, shards: '{data}/eval-*.tar', batch_size: 4, weight: 0.5}}]", **RUN))
    steps = _steps(out)
    assert len(steps) == 3
    for s in steps:  # one contrastive loss per dataset, summed with the weights
        assert s["loss"] == pytest.approx(s["loss/a"] + 0.5 * s["loss/b"], rel=1e-5)
        assert s["samples/a"] == 8 and s["samples/b"] == 4 and "logit_scale/a" in s and "i2t_acc/b" in s


def test_accumulation_equals_one_big_batch_for_the_lm_loss(data, tmp_path):
    # The eval captions all have the same length ("a <colour> <shape>"): the token-mean LM loss of a
    # batch of 8 is then exactly the mean of the losses of its two halves.
    common = [f"data.train.0.shards={data}/eval-000000.tar", "data.train.0.resampled=false",
              "data.train.0.shuffle_buffer=0", TINY_LM, "tokenizer.context_length=16", "max_steps=3",
              "deepspeed.zero_optimization.stage=0", "optim.lr=1e-3", "seed=3"]
    main(train_argv("frozen", data, tmp_path / "big", "save_every=0", *common, "data.train.0.batch_size=8", **RUN))
    main(train_argv("frozen", data, tmp_path / "acc", "save_every=0", *common, "data.train.0.batch_size=4",
                    "optim.accumulation_steps=2", **RUN))
    big, acc = _steps(tmp_path / "big"), _steps(tmp_path / "acc")
    for b, a in zip(big, acc):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["samples/pairs"] == b["samples/pairs"] == 8
    assert len(big) == len(acc) == 3


def test_threads_per_rank(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(distributed, "available_cores", lambda: 16)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setenv("LOCAL_SIZE", "4")  # what the deepspeed launcher sets
        assert distributed.configure_threads() == (4, "16 cores // 4 local rank(s); set OMP_NUM_THREADS to override")
        assert torch.get_num_threads() == 4
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # torchrun; more ranks than cores: at least 1
        assert distributed.configure_threads()[0] == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's value wins
        assert distributed.configure_threads() == (3, "OMP_NUM_THREADS=3 from the environment")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
