"""Checkpoint bookkeeping without DeepSpeed: ``latest`` moves only after a complete save, a crash
mid-save leaves the previous checkpoint as ``latest``, pruning keeps the last K; the frozen-model
fingerprint names what differs."""

import os

import pytest
import torch
from vlmcore.train.runtime import checkpoint, state_file


class FakeEngine:
    """Writes one file per tag, like ``DeepSpeedEngine.save_checkpoint``; can crash half-way."""

    def __init__(self, crash=False):
        self.crash = crash

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        assert save_latest is False  # the trainer owns 'latest'
        assert exclude_frozen_parameters is True  # frozen towers are rebuilt from the config
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "model_states.pt"), "w") as f:
            f.write("partial")
        if self.crash:
            raise RuntimeError("disk full")


def test_latest_is_written_last_and_old_checkpoints_are_pruned(tmp_path):
    ckpt = str(tmp_path)
    for step in (2, 4, 6):
        checkpoint.save(FakeEngine(), ckpt, step, {"step": step, "rng": checkpoint.rng_state()}, keep_last=2, rank=0)
    assert checkpoint.read_latest(ckpt) == "step_00000006"
    assert sorted(os.listdir(ckpt)) == ["latest", "step_00000004", "step_00000006"]
    state = state_file.read(os.path.join(ckpt, "step_00000006", "trainer_rank00000.safetensors"))
    assert state["step"] == 6

    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(FakeEngine(crash=True), ckpt, 8, {"step": 8}, keep_last=2, rank=0)
    assert checkpoint.read_latest(ckpt) == "step_00000006"  # the crash did not touch 'latest'
    assert checkpoint.resolve_tag(ckpt, "latest") == "step_00000006"
    # The next good save prunes the incomplete step_00000008 leftovers.
    checkpoint.save(FakeEngine(), ckpt, 10, {"step": 10}, keep_last=2, rank=0)
    assert sorted(os.listdir(ckpt)) == ["latest", "step_00000006", "step_00000010"]


def test_prune_drops_incomplete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        os.makedirs(tmp_path / checkpoint.tag_for(step))
        if step != 3:  # step 3 crashed mid-save
            (tmp_path / checkpoint.tag_for(step) / checkpoint.COMPLETE).write_text("")
    (tmp_path / "latest").write_text("step_00000002")
    checkpoint.prune(str(tmp_path), keep_last=5)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001", "step_00000002"]


def test_resolve_tag_and_rng_roundtrip(tmp_path):
    assert checkpoint.resolve_tag(str(tmp_path), "latest") is None  # nothing to resume: fresh start
    with pytest.raises(ValueError, match="not found"):
        checkpoint.resolve_tag(str(tmp_path), "step_00000009")
    state = checkpoint.rng_state()
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def _frozen_model(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    return model


def test_frozen_fingerprint_names_what_differs(tmp_path):
    model = _frozen_model(0)
    fp = checkpoint.frozen_fingerprint(model, {"model.lm.path": "/models/lm"})
    assert (fp["tensors"], fp["numel"], fp["bytes"]) == (4, 4 * 8 + 8 + 8 * 8 + 8, 4 * 112)
    assert fp["first"]["name"] == "0.weight" and fp["last"]["name"] == "1.bias"  # the trainable layer is not in it
    checkpoint.save(FakeEngine(), str(tmp_path), 2, {"step": 2}, keep_last=2, rank=0, fingerprint=fp)
    checkpoint.check_fingerprint(str(tmp_path), "step_00000002", checkpoint.frozen_fingerprint(
        _frozen_model(0), {"model.lm.path": "/models/lm"}))  # rebuilt identically: accepted

    with pytest.raises(checkpoint.FrozenModelMismatchError, match=r"first frozen tensor '0.weight': sha256"):
        checkpoint.check_fingerprint(str(tmp_path), "step_00000002", checkpoint.frozen_fingerprint(
            _frozen_model(1), {"model.lm.path": "/models/lm"}))  # other weights
    other = _frozen_model(0)
    other[2].requires_grad_(False)  # one more frozen layer
    with pytest.raises(checkpoint.FrozenModelMismatchError) as err:
        checkpoint.check_fingerprint(str(tmp_path), "step_00000002",
                                     checkpoint.frozen_fingerprint(other, {"model.lm.path": "/models/lm2"}))
    message = str(err.value)
    assert "model.lm.path: checkpoint '/models/lm', now '/models/lm2'" in message
    assert "frozen tensors: checkpoint 4, now 6" in message and "last frozen tensor '1.bias'" in message
