"""The ``siglip`` trainer task: registry, shipped configs (tiny and the B/16 GPU example, validated
here, not run), the local/ring/gather choice, and tiny in-process trainings (one rank, DeepSpeed on
gloo) in which the loss falls and the logit bias learns."""


import pytest
import torch
from helpers.training import CONFIGS, loss_falls, read_metrics, train_argv
from vlmcore.train import main
from vlmcore.train.config import ConfigError, load_config
from vlmcore.train.tasks import get_task


def test_registered():
    task = get_task("siglip")
    assert task.name == "siglip" and task.data_kinds == ("pairs",)


def test_shipped_configs_validate_at_the_expected_scale():
    tiny = load_config(str(CONFIGS / "siglip_tiny.yaml"))
    assert tiny.task == "siglip" and tiny.model.siglip.dist_impl == "ring"
    b16 = load_config(str(CONFIGS / "siglip_vit_b16.yaml"))
    vision, siglip = b16.model.vision, b16.model.siglip
    assert (vision.image_size, vision.patch_size, vision.width, vision.depth, vision.heads) == (224, 16, 768, 12, 12)
    assert (siglip.embed_dim, siglip.text.width, siglip.text.depth, siglip.text.heads) == (768, 768, 12, 12)
    assert (siglip.init_scale, siglip.init_bias) == (10.0, -10.0)
    assert b16.tokenizer.context_length == 64 and b16.precision == "bf16"
    assert b16.data.train[0].batch_size == 4096


def test_bad_values_are_reported():
    with pytest.raises(ConfigError) as error:
        load_config(str(CONFIGS / "siglip_tiny.yaml"),
                    ["model.siglip.dist_impl=allgather", "model.siglip.init_scale=0", "model.siglip.embed_dim=0"])
    text = str(error.value)
    assert "model.siglip.dist_impl" in text and "model.siglip.init_scale" in text and "model.siglip.embed_dim" in text


@pytest.mark.parametrize("dist_impl,passed", [("local", False), ("ring", True), ("gather", True)])
def test_dist_impl_decides_whether_the_group_reaches_the_loss(dist_impl, passed):
    """``local`` keeps each rank to its own batch: the model is called without the group."""
    cfg = load_config(str(CONFIGS / "siglip_tiny.yaml"), [f"model.siglip.dist_impl={dist_impl}"])
    task = get_task("siglip").__new__(get_task("siglip"))
    task.cfg, task.config = cfg, cfg.model.siglip
    seen = []

    def model(images, tokens, group=None):
        seen.append(group)
        return {"loss": torch.zeros(()), "logit_scale": torch.ones(()), "logit_bias": torch.zeros(())}

    group = object()
    task.loss(model, {"images": torch.zeros(1, 3, 4, 4), "tokens": torch.zeros(1, 2, dtype=torch.int64)},
              torch.device("cpu"), group)
    assert seen == [group if passed else None]


def test_siglip_trains(data, tmp_path):
    dist_impl = "ring"
    out = tmp_path / "siglip"
    result = main(train_argv("siglip", data, out, "max_steps=24", "save_every=0", "eval_every=24",
                        f"data.train.0.shards={data}/train-*.tar",
                        "data.train.0.batch_size=24", "model.siglip.text={width: 32, depth: 1, heads: 2}",
                        "model.siglip.embed_dim=32", f"model.siglip.dist_impl={dist_impl}",
                        "tokenizer.context_length=12", "optim.lr=3e-3", "optim.warmup_steps=2"))
    steps, evals = read_metrics(out)
    assert [s["step"] for s in steps] == list(range(1, 25))
    assert all(s["logit_bias"] is not None and s["logit_scale"] is not None for s in steps)
    assert steps[-1]["logit_bias"] != steps[0]["logit_bias"]
    assert loss_falls(steps)
    assert [e["step"] for e in evals] == [24] and 0 <= result["zero_shot_top1"] <= 1
    assert (out / "trainable.safetensors").is_file() and (out / "vision.safetensors").is_file()
