"""Config ``init`` per family: the peer's checkpoint loads through the task's ``build_model`` (same
outputs as the source model), and a checkpoint with a removed or an extra key is refused by one
report naming the key (:class:`vlmcore.checkpoint_keys.CheckpointKeysError`)."""

import pytest
import torch
from helpers.export_peers import flamingo_overrides, openflamingo_training_checkpoint, trained_looking
from helpers.training import train_argv
from vlmcore.train.config import load_config
from vlmcore.train.data.tokenizer import Tokenizer
from vlmcore.train.tasks import get_task

from vlmcore.checkpoint_keys import CheckpointKeysError

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def data(shapes_dataset):
    return shapes_dataset(n_train=64, n_eval=16, n_docs=16, image_size=32, shard_size=32, seed=4)


def build(data, task, tmp_path, *overrides):
    """(task, model) of ``configs/<task>_tiny.yaml`` with the overrides, built under seed 0 (same frozen parts)."""
    argv = train_argv(task, data, tmp_path / "out", *overrides, eval_batch_size=None, context_length=12)
    cfg = load_config(argv[1], argv[2:])
    task_cls = get_task(cfg.task)
    torch.manual_seed(0)
    task = task_cls(cfg, Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length, kind=cfg.tokenizer.type,
                                   media_tokens=task_cls.media_tokens))
    return task, task.build_model(torch.float32).eval()


def flamingo_batch(tok):
    lang_x = torch.randint(4, tok.vocab_size, (2, 9))
    lang_x[:, [0, 5]] = tok.media_token_id
    return torch.randn(2, 2, 1, 3, 16, 16), lang_x


def test_flamingo_init_loads_an_openflamingo_checkpoint(data, tmp_path):
    _, source = build(data, "flamingo", tmp_path, *flamingo_overrides(data))
    trained_looking(source, [n for n, p in source.named_parameters() if p.requires_grad])
    state = openflamingo_training_checkpoint(source, tmp_path / "checkpoint.pt")
    task, loaded = build(data, "flamingo", tmp_path, *flamingo_overrides(data),
                         f"model.flamingo.init={tmp_path}/checkpoint.pt")
    vision_x, lang_x = flamingo_batch(task.tok)
    with torch.no_grad():
        assert torch.equal(loaded(vision_x, lang_x).logits, source(vision_x, lang_x).logits)

    removed = dict(state)
    del removed["module.perceiver.latents"]
    torch.save({"model_state_dict": removed}, tmp_path / "removed.pt")
    with pytest.raises(CheckpointKeysError, match=r"missing 1 keys: perceiver\.latents") as err:
        build(data, "flamingo", tmp_path, *flamingo_overrides(data), f"model.flamingo.init={tmp_path}/removed.pt")
    assert "model.flamingo.init" in str(err.value)
    extra = {**state, "module.perceiver_extra.weight": torch.zeros(2)}
    torch.save({"model_state_dict": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointKeysError, match=r"unexpected 1 keys: perceiver_extra\.weight"):
        build(data, "flamingo", tmp_path, *flamingo_overrides(data), f"model.flamingo.init={tmp_path}/extra.pt")
