"""Task registry and protocol: the registered tasks, errors for unknown tasks and section keys, and a
new task (one class here, one registry entry) that trains through ``main()`` touching no other file."""

import json
import os
from dataclasses import dataclass
from importlib import resources

import pytest
import yaml
from torch import nn
from vlmcore.train import main, tasks
from vlmcore.train.config import KIND_NAMES, ConfigError, load_config, parse_config
from vlmcore.train.data.pipeline import decode_image, eval_batches, pair_fields
from vlmcore.train.runtime.distributed import all_reduce_sum

CONFIGS = resources.files("vlmcore.train") / "configs"


def test_registry_lists_the_tasks_and_loads_them_lazily():
    assert {"clip", "flamingo", "frozen"} <= set(tasks.task_names())
    for name in ("clip", "flamingo", "frozen"):
        task_cls = tasks.get_task(name)
        assert issubclass(task_cls, tasks.Task) and task_cls.name == name
    for name in tasks.task_names():  # every task trains on data kinds the config knows
        assert set(tasks.get_task(name).data_kinds) <= set(KIND_NAMES), name


def test_unknown_task_names_the_registered_ones():
    with pytest.raises(tasks.UnknownTaskError, match="unknown task 'clipp' \\(registered: .*clip, flamingo, frozen"):
        tasks.get_task("clipp")
    with pytest.raises(ConfigError, match="task: unknown task 'clipp' \\(registered: .*clip, flamingo, frozen"):
        load_config(str(CONFIGS / "clip_tiny.yaml"), ["task=clipp"])


def test_task_sections_reject_unknown_keys_and_bad_values():
    with pytest.raises(ConfigError) as err:
        load_config(str(CONFIGS / "flamingo_tiny.yaml"), ["model.flamingo.num_latentz=4", "model.flamingo.heads=0"])
    text = str(err.value)
    assert "model.flamingo.num_latentz: unknown key" in text and "model.flamingo.heads: must be >= 1" in text
    with pytest.raises(ConfigError, match="model.clip.text.widht: unknown key"):
        load_config(str(CONFIGS / "clip_tiny.yaml"), ["model.clip.text.widht=32"])
    # Another task's section is not part of this task's schema.
    with pytest.raises(ConfigError, match="model.frozen: unknown key"):
        load_config(str(CONFIGS / "clip_tiny.yaml"), ["model.frozen={num_prefix_tokens: 2}"])
    cfg = load_config(str(CONFIGS / "clip_tiny.yaml"), ["model.clip.embed_dim=32"])
    assert cfg.model.clip.embed_dim == 32 and cfg.model.clip.text.width == 64


# ------------------------------------------------------------------ a new task, defined only here


@dataclass
class ToyConfig:
    width: int = 8

    def check(self, where: str) -> list[str]:
        return [] if self.width >= 1 else [f"{where}.width: must be >= 1, got {self.width}"]


class ToyEncoder:
    def __init__(self, tok, image_size):
        self.tok, self.image_size = tok, image_size

    def __call__(self, sample):
        image, caption = pair_fields(sample)
        return {"images": decode_image(image, self.image_size), "tokens": self.tok([caption])[0]}


class ToyModel(nn.Module):
    """Regresses a bag-of-words embedding of the caption from the mean colour of the image."""

    def __init__(self, vocab_size: int, width: int):
        super().__init__()
        self.colour = nn.Linear(3, width)
        self.words = nn.EmbeddingBag(vocab_size, width)

    def forward(self, images, tokens):
        return (self.colour(images.mean(dim=(2, 3))) - self.words(tokens)).pow(2).mean()


class ToyTask(tasks.Task):
    name = "toy"
    Config = ToyConfig
    data_kinds = ("pairs",)

    def build_model(self, dtype):
        return ToyModel(self.tok.vocab_size, self.config.width).to(dtype)

    def encoder(self, kind, max_images):
        return ToyEncoder(self.tok, self.cfg.model.vision.image_size)

    def loss(self, model, batch, device, group=None):
        loss = model(batch["images"].to(device), batch["tokens"].to(device)).float()
        return loss, {"toy_metric": 1.5}

    def evaluate(self, module, ctx):
        info = ctx.info
        total = n = 0.0
        for batch, _ in eval_batches(ctx.shards, ctx.encoder, ctx.eval.batch_size, info.rank, info.world_size):
            total += float(module(batch["images"].to(info.device, ctx.dtype), batch["tokens"].to(info.device)))
            n += 1
        total, n = all_reduce_sum([total, n], info.device)
        return {"toy_eval_loss": total / max(n, 1)}


def test_a_new_task_is_one_class_plus_one_registry_line(data, tmp_path, monkeypatch):
    monkeypatch.setitem(tasks.REGISTRY, "toy", ToyTask)
    config = {
        "task": "toy", "out_dir": str(tmp_path / "run"), "max_steps": 2, "progress_bar": False,
        "data": {"train": [{"shards": f"{data}/train-000000.tar", "batch_size": 4, "shuffle_buffer": 0}],
                 "eval": {"shards": f"{data}/eval-000000.tar", "batch_size": 4}},
        "tokenizer": {"path": str(data / "tokenizer.json"), "context_length": 8},
        "model": {"vision": {"image_size": 16, "patch_size": 8, "width": 8, "depth": 1, "heads": 1},
                  "toy": {"width": 4}},
        "deepspeed": {"zero_optimization": {"stage": 1}},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="model.toy.width: must be >= 1"):
        parse_config({**config, "model": {"toy": {"width": 0}}})
    with pytest.raises(ConfigError, match="data.train: task 'toy' trains on image-text pairs only"):
        parse_config({**config, "data": {"train": [{"shards": "x.tar", "kind": "interleaved"}]}})

    result = main(["--config", str(path)])
    # Every evaluation also reports what it used and what it skipped (issue 26: drops are counted).
    assert set(result) - {"eval_usable_samples", "eval_skipped_samples"} == {"toy_eval_loss"}
    assert result["toy_eval_loss"] > 0 and result["eval_skipped_samples"] == 0 and result["eval_usable_samples"] > 0
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
        steps = [line for line in map(json.loads, f) if "loss" in line]
    assert [s["step"] for s in steps] == [1, 2] and all(s["toy_metric"] == 1.5 for s in steps)
    assert all(s["tokens_per_s"] > 0 for s in steps)  # the default batch_tokens counts "tokens"
    assert os.path.isfile(tmp_path / "run" / "trainable.safetensors")
    with open(tmp_path / "run" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["model"]["toy"] == {"width": 4}


def test_clip_retrieval_counts_identical_captions_as_one_candidate():
    """Without repeated captions the CLIP eval's recall is the plain one; with repeats (the shapes eval set
    says "a red circle" 20 times) identical captions are one candidate instead of 20 tied ones."""
    import torch
    from vlmcore.train.tasks.clip import _retrieval_over_distinct_captions

    import vlmcore

    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.1 * torch.randn(6, 8), dim=-1)
    distinct_tokens = torch.arange(6)[:, None].repeat(1, 4)
    assert _retrieval_over_distinct_captions(images, texts, distinct_tokens) == vlmcore.retrieval_metrics(images, texts)
    # Three captions, each shared by two images: a caption's text features are the same for both.
    tokens = torch.tensor([[1], [1], [2], [2], [3], [3]])
    shared = torch.nn.functional.normalize(images[0::2] + images[1::2], dim=-1).repeat_interleave(2, dim=0)
    tied = vlmcore.retrieval_metrics(images, shared)
    merged = _retrieval_over_distinct_captions(images, shared, tokens)
    assert merged["i2t_R@1"] > tied["i2t_R@1"] and merged["i2t_R@5"] == 1.0 and merged["t2i_R@5"] == 1.0
