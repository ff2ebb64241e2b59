"""Bundled ImageNet-1k metadata (1000 names, 80 + 7 templates, wnids) and ``zero_shot: imagenet`` of
the clip / siglip tasks, which then need no classes file."""

from importlib import resources

import pytest
from vlmcore.train.config import ConfigError, load_config
from vlmcore.train.tasks import get_task

from vlmcore.eval.zero_shot import imagenet_metadata, zero_shot_classes

CONFIGS = resources.files("vlmcore.train") / "configs"


def test_imagenet_metadata_has_1000_classes_and_the_openai_templates():
    meta = imagenet_metadata()
    assert len(meta["classnames"]) == 1000  # "missile" and "sunglasses" appear twice in OpenAI's list, as released
    assert len(meta["wnids"]) == 1000 and meta["wnids"] == sorted(set(meta["wnids"]))
    assert meta["wnids"][0] == "n01440764" and meta["classnames"][0] == "tench"  # class index 0
    assert meta["classnames"][207] == "Golden Retriever"
    assert len(meta["templates"]) == 80 and len(meta["simple_templates"]) == 7
    assert meta["templates"][0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in meta["templates"] + meta["simple_templates"])
    assert zero_shot_classes("imagenet_simple")["templates"] == meta["simple_templates"]
    with pytest.raises(ValueError, match="unknown zero-shot class set 'cifar10'"):
        zero_shot_classes("cifar10")


@pytest.mark.parametrize("config, task", [("clip_tiny.yaml", "clip"), ("siglip_tiny.yaml", "siglip")])
def test_zero_shot_imagenet_needs_no_classes_file(config, task):
    cfg = load_config(str(CONFIGS / config), ["out_dir=x", f"model.{task}.zero_shot=imagenet",
                                              "data.eval.classes=/nowhere/classes.json"])
    classes = get_task(task)(cfg, tokenizer=None).zero_shot_classes()
    assert len(classes["classnames"]) == 1000 and len(classes["templates"]) == 80
    with pytest.raises(ConfigError, match=f"model.{task}.zero_shot"):
        load_config(str(CONFIGS / config), ["out_dir=x", f"model.{task}.zero_shot=cifar10"])
