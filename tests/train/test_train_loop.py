"""In-process trainings (one rank, DeepSpeed on gloo) on tiny shapes data: every task learns;
mixture weights; bad samples counted; non-finite losses skipped, then abort with a checkpoint."""

import json
import os

import pytest
import torch
from helpers.training import loss_falls, read_metrics, reject_constant, train_argv
from vlmcore.train import NonFiniteLossError, main
from vlmcore.train.config import parse_config
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.runtime.engine import build_ds_config
from vlmcore.train.runtime.trainer import mixture_loss
from vlmcore.train.tasks import get_task

import vlmcore

TINY_LM = ("model.lm={config: {model_type: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, "
           "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}}")
_TINY_RAW = {"task": "clip", "out_dir": "x", "max_steps": 1, "tokenizer": {"path": "t.json"},
             "data": {"train": [{"shards": "a.tar", "batch_size": 4}]}}


def test_clip_trains_and_counts_bad_samples(data, tmp_path):
    out = tmp_path / "clip"
    result = main(train_argv("clip", data, out, "max_steps=30", "save_every=0", "eval_every=15",
                        f"data.train.0.shards=[{data}/bad-000000.tar, '{data}/train-*.tar']",
                        "data.train.0.batch_size=24", "data.train.0.resampled=false", "data.train.0.shuffle_buffer=0",
                        "model.clip.text={width: 32, depth: 1, heads: 2}", "model.clip.embed_dim=32",
                        "tokenizer.context_length=12", "optim.lr=3e-3", "optim.warmup_steps=2"))
    steps, evals = read_metrics(out)
    assert [s["step"] for s in steps] == list(range(1, 31))
    for key in ("loss", "lr", "samples_per_s", "tokens_per_s", "grad_norm", "skipped_samples", "logit_scale",
                "i2t_acc", "t2i_acc", "samples/shapes"):
        assert all(s[key] is not None for s in steps), key
    assert all(s["samples/shapes"] == 24 for s in steps) and 1 < steps[-1]["logit_scale"] <= 100
    # The bad shard (3 broken samples) is read once per epoch; the count is cumulative.
    skipped = [s["skipped_samples"] for s in steps]
    assert skipped[-1] >= 3 and skipped[-1] % 3 == 0 and skipped == sorted(skipped)
    assert steps[0]["samples_per_s"] > 0 and steps[0]["tokens_per_s"] > steps[0]["samples_per_s"]
    assert loss_falls(steps)
    assert [e["step"] for e in evals] == [15, 30] and 0 <= result["zero_shot_top1"] <= 1
    assert os.path.isfile(out / "trainable.safetensors") and os.path.isfile(out / "vision.safetensors")
    from safetensors.torch import load_file

    vit = vlmcore.VisionTransformer(16, 8, 32, 1, 2)
    vit.load_state_dict(load_file(str(out / "vision.safetensors")))  # usable as model.vision.init
    assert open(out / "checkpoints" / "latest").read() == "step_00000030"


def test_flamingo_mixture_trains_with_weighted_losses_and_activation_checkpointing(data, tmp_path):
    out = tmp_path / "flamingo"
    main(train_argv("flamingo", data, out, "max_steps=25", "save_every=0", "eval_every=0", TINY_LM,
               f"data.train.0.shards={data}/docs-*.tar", f"data.train.1.shards={data}/train-*.tar",
               "data.train.0.batch_size=4", "data.train.1.batch_size=8", "data.train.1.weight=0.2",
               "tokenizer.context_length=32", "model.flamingo.num_latents=4", "optim.lr=3e-3",
               "model.gradient_checkpointing=true"))
    steps, evals = read_metrics(out)
    for s in steps:  # the logged loss is the weighted sum of one batch of each dataset
        assert s["loss"] == pytest.approx(1.0 * s["loss/docs"] + 0.2 * s["loss/pairs"], rel=1e-5)
        assert s["samples_per_s"] > 0
    assert loss_falls(steps)
    assert set(evals[-1]["eval"]) >= {"caption_token_acc", "blind_token_acc"}


def test_frozen_trains_with_zero1_over_a_local_lm_directory(data, tmp_path):
    # The LM comes from a directory (save_pretrained), here written by the demo's LM pre-training.
    from vlmcore.train.tools.demo import pretrain_lm

    tok = Tokenizer(str(data / "tokenizer.json"), 16)
    lm_config = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
    loss = pretrain_lm(str(data / "captions.txt"), tok, lm_config, str(tmp_path / "lm"), steps=3, batch_size=8)
    assert loss == loss and os.path.isfile(tmp_path / "lm" / "config.json")
    out = tmp_path / "frozen"
    main(train_argv("frozen", data, out, "max_steps=25", "save_every=0", "eval_every=0",
                    f"model.lm={{path: {tmp_path}/lm}}",
               f"data.train.0.shards={data}/train-*.tar", "data.train.0.batch_size=8",
               "tokenizer.context_length=16", "optim.lr=3e-3", "deepspeed.zero_optimization.stage=1"))
    steps, _ = read_metrics(out)
    assert loss_falls(steps)


def test_mixture_gradient_is_the_weighted_sum(data):
    tok = Tokenizer(str(data / "tokenizer.json"), 12)
    torch.manual_seed(0)
    model = vlmcore.CLIP(16, image_size=16, patch_size=8, vision_width=16, vision_depth=1, vision_heads=2,
                         vocab_size=tok.vocab_size, context_length=12, text_width=16, text_depth=1, text_heads=2,
                         pad_token_id=tok.pad_token_id, eot_token_id=tok.eos_token_id)
    batches = [{"images": torch.randn(6, 3, 16, 16), "tokens": tok([f"a red circle {i}" for i in range(6)])}
               for _ in range(2)]
    weights = [1.0, 0.2]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    task = get_task("clip")(parse_config(_TINY_RAW), tok)
    total, parts, _ = mixture_loss(task, model, batches, weights, torch.device("cpu"))
    combined = grads(total)
    separate = [grads(mixture_loss(task, model, [b], [1.0], torch.device("cpu"))[0]) for b in batches]
    for g, g0, g1 in zip(combined, *separate):
        torch.testing.assert_close(g, weights[0] * g0 + weights[1] * g1, rtol=1e-5, atol=1e-6)
    expected = weights[0] * float(parts[0].detach()) + weights[1] * float(parts[1].detach())
    assert float(total.detach()) == pytest.approx(expected, rel=1e-6)


def test_nonfinite_losses_are_skipped_then_abort_zero0(data, tmp_path, monkeypatch):
    frozen = get_task("frozen")
    real = frozen.loss
    calls = {"n": 0}
    nan_calls = {3} | set(range(6, 100))  # step 3, then every step from 6 on

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] in nan_calls else loss), metrics

    monkeypatch.setattr(frozen, "loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="non-finite for 3 steps in a row"):
        main(train_argv("frozen", data, out, "max_steps=20", "save_every=0", "eval_every=0", TINY_LM,
                   f"data.train.0.shards={data}/train-*.tar", "data.train.0.batch_size=4",
                   "tokenizer.context_length=16", "max_nonfinite_steps=3", "deepspeed.zero_optimization.stage=0"))
    steps, _ = read_metrics(out)
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert [s["nonfinite_steps"] for s in steps] == [0, 0, 1, 1, 1, 2, 3, 4]
    assert steps[2]["grad_norm"] is None and steps[3]["grad_norm"] is not None  # step 3 skipped, 4 trained
    # The NaN loss is written as null and flagged (strict JSON, checked by _metrics).
    assert steps[2]["loss"] is None and steps[2]["nonfinite"] == ["loss"] and "nonfinite" not in steps[3]
    with pytest.raises(ValueError, match="not strict JSON: NaN"):  # the parser used above does reject NaN
        json.loads('{"loss": NaN}', parse_constant=reject_constant)
    assert open(out / "checkpoints" / "latest").read() == "step_00000008"


def _trainable_copy(trainer):
    """This rank's copy of every trainable parameter (its ZeRO-3 partition, where partitioned)."""
    return {n: getattr(p, "ds_tensor", p).detach().clone() for n, p in trainer.module.named_parameters()
            if p.requires_grad}


@pytest.mark.parametrize("zero", [2, 3])
def test_a_skipped_step_leaves_no_gradient_behind(data, tmp_path, monkeypatch, zero):
    # Backward runs before the step knows its loss is non-finite: the skip must drop those gradients
    # (ZeRO keeps its own reduced copies) so that the next step starts clean.
    frozen = get_task("frozen")
    real = frozen.loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = real(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 3 else loss), metrics

    monkeypatch.setattr(frozen, "loss", poisoned)
    params = {}
    out = tmp_path / f"skip{zero}"
    main(train_argv("frozen", data, out, "max_steps=5", "save_every=0", "eval_every=0", "data.eval=null", TINY_LM,
                    f"data.train.0.shards={data}/train-*.tar", "data.train.0.batch_size=4",
                    "tokenizer.context_length=16", f"deepspeed.zero_optimization.stage={zero}"),
         on_step_end=[lambda trainer, step: params.setdefault(step, _trainable_copy(trainer))])
    steps, _ = read_metrics(out)
    assert [s["nonfinite_steps"] for s in steps] == [0, 0, 1, 1, 1]
    assert steps[2]["grad_norm"] is None and all(s["loss"] is not None for s in steps[3:])
    assert all(torch.equal(params[3][n], params[2][n]) for n in params[2])  # nothing applied at step 3
    assert all(torch.isfinite(p).all() for p in params[5].values())
    assert any(not torch.equal(params[4][n], params[3][n]) for n in params[3])  # step 4 trained


def test_precision_decides_the_deepspeed_bf16_section():
    from deepspeed.runtime.config import DeepSpeedConfig

    raw = {**_TINY_RAW, "deepspeed": {"zero_optimization": {"stage": 2}, "bfloat16": {"enabled": True}}}
    cfg = parse_config(raw)
    fp32 = build_ds_config(cfg, "fp32")  # precision auto on CPU: a bf16 section must not win
    assert DeepSpeedConfig(fp32).bfloat16_config.enabled is False
    bf16 = build_ds_config(cfg, "bf16")  # auto on CUDA: a valid DeepSpeed 0.19.8 bf16 config
    assert bf16["bf16"] == {"enabled": True}
    parsed = DeepSpeedConfig(bf16)
    assert parsed.bfloat16_config.enabled is True and parsed.zero_optimization_stage == 2


def test_progress_bar_counts_steps_not_log_lines(tmp_path):
    from vlmcore.train.runtime.metrics import MetricsLogger

    log = MetricsLogger(str(tmp_path), True, total_steps=30, progress_bar=True)
    for step in (10, 20, 30):  # log_every=10
        log.log_step({"step": step, "loss": 1.0, "lr": 1e-3})
    assert log._bar.n == 30
    log.close()
    resumed = MetricsLogger(str(tmp_path), True, total_steps=30, start_step=20, progress_bar=True, resume_step=20)
    resumed.log_step({"step": 30, "loss": 1.0, "lr": 1e-3})
    assert resumed._bar.n == 30
    resumed.close()


def test_lm_directory_is_loaded_in_the_training_precision(data, tmp_path):
    # A bf16 checkpoint (as most LMs ship) must not make an fp32 run's model (and bridge) bf16.
    from transformers import AutoConfig, AutoModelForCausalLM
    from vlmcore.train.config import load_config

    tok = Tokenizer(str(data / "tokenizer.json"), 16)
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=tok.vocab_size)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "lm")
    argv = train_argv("flamingo", data, tmp_path / "out", f"model.lm={{path: {tmp_path}/lm}}",
                      "tokenizer.context_length=16")
    cfg = load_config(argv[1], argv[2:])
    model = get_task(cfg.task)(cfg, tok).build_model(torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.dtype for p in model.lang_model.parameters()} == {torch.float32}
