"""Everything a run reads is checked before DeepSpeed starts (one ConfigError for all), DeepSpeed's own
config keys are checked against DeepSpeed, and CLIP eval data without labels gets retrieval metrics."""

import io
import json
import os
import tarfile
from importlib import resources

import pytest
from helpers.training import dataset_view, train_argv
from vlmcore.train import ConfigError, main
from vlmcore.train.config import load_config, parse_config
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.deepspeed_config import deepspeed_keys
from vlmcore.train.validate import shard_problems, validate_inputs

CONFIGS = resources.files("vlmcore.train") / "configs"
RUN = {"eval_batch_size": 16, "train_batch_size": 8}  # train_argv options of the trainings here
TINY = ["model.vision={image_size: 16, patch_size: 8, width: 32, depth: 1, heads: 2}",
        "model.clip.text={width: 32, depth: 1, heads: 2}", "model.clip.embed_dim=32", "tokenizer.context_length=12",
        "progress_bar=false", "data.shapes=null", "tokenizer.train_from_shapes=false"]


@pytest.fixture(scope="module")
def data(shapes_dataset, tmp_path_factory):
    # Not the shared set: the evaluations must count its 40 held-out pairs. A view, to add plain/ beside it.
    out = dataset_view(shapes_dataset(n_train=64, n_eval=40, n_docs=16, image_size=16, shard_size=64, seed=4),
                       tmp_path_factory.mktemp("validate") / "shapes")
    # img2dataset-style eval shard: KEY.png + KEY.txt, no KEY.json (hence no label), no classes.json beside it
    os.makedirs(out / "plain")
    with tarfile.open(out / "eval-000000.tar") as src, tarfile.open(out / "plain" / "eval-000000.tar", "w") as dst:
        for member in src.getmembers():
            if not member.name.endswith(".json"):
                dst.addfile(member, src.extractfile(member))
    return out


def _cfg(data, *extra):
    return load_config(str(CONFIGS / "clip_tiny.yaml"), [
        "out_dir=x", f"tokenizer.path={data}/tokenizer.json", f"data.train.0.shards={data}/train-*.tar",
        f"data.eval.shards={data}/eval-000000.tar", *TINY, *extra])


def _problems(cfg) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate_inputs(cfg, lambda: Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length))
    return err.value.problems


def test_valid_inputs_pass_and_return_the_tokenizer(data):
    cfg = _cfg(data)
    tok = validate_inputs(cfg, lambda: Tokenizer(cfg.tokenizer.path, 12))
    assert tok.vocab_size > 10


def test_every_missing_path_is_listed_in_one_error(data, tmp_path):
    (tmp_path / "not_an_lm").mkdir()
    cfg = load_config(str(CONFIGS / "frozen_tiny.yaml"), [
        "out_dir=x", "data.shapes=null", "tokenizer.train_from_shapes=false", f"tokenizer.path={tmp_path}/tok.json",
        f"data.train.0.shards=[{data}/train-000000.tar, '{tmp_path}/gone-{{000..002}}.tar']",
        f"data.eval.shards={tmp_path}/eval-*.tar", f"data.eval.classes={tmp_path}/classes.json",
        f"model.lm={{path: {tmp_path}/not_an_lm}}", f"model.vision.init={tmp_path}/vision.safetensors"])
    problems = _problems(cfg)
    text = "\n".join(problems)
    for needle in ("data.train.0.shards: 3 of 4 shard(s) missing", "gone-001.tar",
                   "data.eval.shards: 1 of 1 shard(s) missing", "eval-*.tar (no match)",
                   f"data.eval.classes: '{tmp_path}/classes.json' does not exist",
                   f"tokenizer.path: '{tmp_path}/tok.json' does not exist",
                   "model.lm.path: directory", "has no config.json",
                   "model.vision.init:"):
        assert needle in text, text
    assert len(problems) == 6
    # An LM path that is not a directory at all (transformers would say "Repo id must be in the form ...").
    cfg = load_config(str(CONFIGS / "frozen_tiny.yaml"), [
        "out_dir=x", "data.shapes=null", "tokenizer.train_from_shapes=false", f"tokenizer.path={data}/tokenizer.json",
        f"data.train.0.shards={data}/train-*.tar", "data.eval=null", "model.lm={path: /models/llama-7b}"])
    assert _problems(cfg) == ["model.lm.path: '/models/llama-7b' is not a directory (a local Hugging Face model "
                              "directory is expected; nothing is downloaded)"]


def test_tokenizer_directory_without_tokenizer_files(data, tmp_path):
    cfg = _cfg(data, f"tokenizer.path={tmp_path}")
    assert _problems(cfg) == [f"tokenizer.path: directory '{tmp_path}' holds no tokenizer file (tokenizer.json, "
                              "tokenizer_config.json, vocab.json, tokenizer.model, vocab.txt)"]


def test_remote_shard_specs_are_accepted_unchecked(tmp_path):
    assert shard_problems("pipe:curl -s https://host/shard-{000..009}.tar", "x") == []
    assert shard_problems(["https://host/a.tar", "s3://bucket/b.tar"], "x") == []
    assert shard_problems([f"{tmp_path}/a.tar", "pipe:cat b.tar"], "x") == [
        f"x: 1 of 2 shard(s) missing: {tmp_path}/a.tar"]


def test_eval_sample_fields_are_checked_on_the_first_sample(data, tmp_path):
    # Zero-shot asked for (classes given) but the samples carry no label.
    cfg = _cfg(data, f"data.eval.shards={data}/plain/eval-000000.tar", f"data.eval.classes={data}/classes.json")
    (problem,) = _problems(cfg)
    assert problem.startswith("data.eval.classes: zero-shot needs an integer 'label'")
    # A classes file that is not one.
    (tmp_path / "classes.json").write_text(json.dumps({"classnames": []}))
    (problem,) = _problems(_cfg(data, f"data.eval.classes={tmp_path}/classes.json"))
    assert "is not a valid classes file" in problem
    # An eval shard whose samples the task cannot use (no image member).
    with tarfile.open(tmp_path / "noimage.tar", "w") as tar:
        info = tarfile.TarInfo("k0.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cat"))
    (problem,) = _problems(_cfg(data, f"data.eval.shards={tmp_path}/noimage.tar"))
    assert "the first sample" in problem and "is not usable by task 'clip'" in problem
    assert "missing image member" in problem


def test_missing_classes_file_fails_before_training_starts(data, tmp_path, monkeypatch):
    import deepspeed

    def no_engine(*args, **kwargs):
        raise AssertionError("deepspeed.initialize must not be reached")

    monkeypatch.setattr(deepspeed, "initialize", no_engine)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="data.eval.classes: .*does not exist"):
        main(["--config", str(CONFIGS / "clip_tiny.yaml"), f"out_dir={out}", f"tokenizer.path={data}/tokenizer.json",
              f"data.train.0.shards={data}/train-*.tar", f"data.eval.shards={data}/eval-000000.tar",
              f"data.eval.classes={tmp_path}/missing.json", "max_steps=2", *TINY])
    assert not os.path.exists(out / "metrics.jsonl")


def test_clip_eval_without_labels_reports_retrieval_metrics(data, tmp_path):
    out = tmp_path / "run"
    result = main(train_argv("clip", data, out, "save_every=0", *TINY, "max_steps=2",
                             eval_shards=f"{data}/plain/eval-000000.tar", **RUN))
    assert "zero_shot_top1" not in result and result["eval_samples"] == 40
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert 0 <= result[key] <= 1, key
    assert result["i2t_R@1"] <= result["i2t_R@5"] <= result["i2t_R@10"]
    # With labels and classes.json beside the shard: both zero-shot and retrieval.
    result = main(train_argv("clip", data, f"{out}2", "save_every=0", *TINY, "max_steps=1", **RUN))
    assert result["zero_shot_samples"] == 40 and 0 <= result["zero_shot_top1"] <= 1 and "t2i_R@1" in result


def test_deepspeed_keys_come_from_deepspeed_with_a_hint():
    top, zero = deepspeed_keys()
    assert {"zero_optimization", "optimizer", "scheduler", "gradient_clipping", "bf16", "fp16",
            "activation_checkpointing", "flops_profiler", "tensorboard"} <= top
    assert {"stage", "offload_optimizer", "overlap_comm", "stage3_param_persistence_threshold"} <= zero
    raw = yaml_raw("clip_tiny.yaml")
    raw["deepspeed"] = {"zero_optimisation": {"stage": 3}, "gradient_clipping": 1.0,
                        "zero_optimization": {"stage": 2, "overlap_com": True}, "amp": {"enabled": True}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = str(err.value)
    assert "deepspeed.zero_optimisation: not a DeepSpeed config key; did you mean 'zero_optimization'?" in text
    assert "deepspeed.zero_optimization.overlap_com: not a DeepSpeed config key; did you mean 'overlap_comm'?" in text
    assert "deepspeed.amp: removed from DeepSpeed" in text
    assert len(err.value.problems) == 3


def test_deepspeed_typo_in_a_json_file_is_caught_too(data, tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimisation": {"stage": 3}}))
    cfg = _cfg(data, f"deepspeed={tmp_path}/ds.json")
    from vlmcore.train.deepspeed_config import deepspeed_dict

    with pytest.raises(ConfigError, match="did you mean 'zero_optimization'"):
        deepspeed_dict(cfg)


def yaml_raw(name):
    import yaml

    with open(CONFIGS / name, encoding="utf-8") as f:
        return yaml.safe_load(f)
