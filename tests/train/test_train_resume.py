"""Checkpoints without the frozen towers, resume by data position, fail fast on unusable data:
in-process trainings (one rank, DeepSpeed on gloo) on tiny shapes data."""

import json
import os
import shutil

import pytest
import torch
from helpers.training import train_argv
from vlmcore.train import main
from vlmcore.train.data.pipeline import NoUsableSamplesError
from vlmcore.train.runtime import checkpoint

# An LM much larger than the trainable parts (so that a checkpoint holding it could not be smaller than it).
WIDE_LM = ("model.lm={config: {model_type: llama, hidden_size: 32, intermediate_size: 1024, num_hidden_layers: 2, "
           "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 64}}")
# train_argv options of these trainings: no evaluation, a frozen 16-wide tower
RUN = {"eval_batch_size": None,
       "vision": "model.vision={image_size: 16, patch_size: 8, width: 16, depth: 1, heads: 2, freeze: true}"}
SMALL_FLAMINGO = "model.flamingo={cross_attn_every_n_layers: 2, num_latents: 2, dim_head: 8, heads: 2, ff_mult: 1}"


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _frozen_names(task, argv):
    from vlmcore.train.config import load_config
    from vlmcore.train.data.tokenizer import Tokenizer
    from vlmcore.train.tasks import get_task

    cfg = load_config(argv[1], argv[2:])
    model = get_task(task)(cfg, Tokenizer(cfg.tokenizer.path, cfg.tokenizer.context_length)).build_model(torch.float32)
    frozen = {n: p.numel() * p.element_size() for n, p in model.named_parameters() if not p.requires_grad}
    lm_bytes = sum(p.numel() * p.element_size() for p in model.lang_model.parameters())
    return frozen, lm_bytes


def _saved_tensor_names(tag_dir):
    names = set()
    for name in os.listdir(tag_dir):
        if name.endswith(".pt") and not name.startswith("trainer_"):
            state = torch.load(os.path.join(tag_dir, name), weights_only=False, map_location="cpu")
            names |= set(state.get("module") or {}) | set(state.get("frozen_param_fragments") or {})
    return names


def _resume_from(src_out, dst_out, tag):
    """A copy of ``src_out``'s checkpoint ``tag`` as the latest of a fresh run directory."""
    os.makedirs(dst_out / "checkpoints")
    shutil.copytree(src_out / "checkpoints" / tag, dst_out / "checkpoints" / tag)
    (dst_out / "checkpoints" / "latest").write_text(tag)


@pytest.mark.parametrize("task,zero", [("flamingo", 2), ("frozen", 3)])
def test_checkpoint_holds_no_frozen_tensor_and_resumes_exactly(data, tmp_path, task, zero):
    train = ([f"data.train.0.shards={data}/docs-*.tar", f"data.train.1.shards={data}/train-*.tar",
              "data.train.0.batch_size=4", "data.train.1.batch_size=4", "tokenizer.context_length=24", SMALL_FLAMINGO]
             if task == "flamingo" else
             [f"data.train.0.shards={data}/train-*.tar", "data.train.0.batch_size=4", "tokenizer.context_length=16"])
    common = [WIDE_LM, *train, "max_steps=4", "save_every=2", f"deepspeed.zero_optimization.stage={zero}",
              "optim.lr=3e-3", "data.train.0.shuffle_buffer=8"]
    full = tmp_path / "full"
    argv = train_argv(task, data, full, *common, **RUN)
    main(argv)
    reference = _losses(full)

    tag_dir = full / "checkpoints" / "step_00000002"
    frozen, lm_bytes = _frozen_names(task, argv)
    assert frozen and not (_saved_tensor_names(tag_dir) & set(frozen))  # no frozen tensor in DeepSpeed's files
    size = sum(os.path.getsize(tag_dir / f) for f in os.listdir(tag_dir))
    assert size < lm_bytes, (size, lm_bytes)
    fingerprint = json.loads((tag_dir / checkpoint.FINGERPRINT).read_text())
    assert fingerprint["tensors"] == len(frozen) and fingerprint["bytes"] == sum(frozen.values())

    resumed = tmp_path / "resumed"
    _resume_from(full, resumed, "step_00000002")
    main(train_argv(task, data, resumed, *common, "resume=latest", **RUN))
    assert _losses(resumed) == {3: reference[3], 4: reference[4]}  # bitwise: fp32, same data order

    # Another frozen LM (same shapes, other weights): refused before any step, saying what differs.
    changed = tmp_path / "changed"
    _resume_from(full, changed, "step_00000002")
    other_lm = WIDE_LM.replace("max_position_embeddings: 64", "max_position_embeddings: 64, initializer_range: 0.5")
    with pytest.raises(checkpoint.FrozenModelMismatchError, match=r"last frozen tensor '[^']*lm_head.weight': sha256"):
        main(train_argv(task, data, changed, *common, "resume=latest", other_lm, **RUN))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_a_shard_with_no_usable_sample_stops_with_the_reason(data, tmp_path, workers):
    # Documents fed to a pairs dataset (a kind mismatch): the run ends within seconds, with the error
    # raised in the main process even when DataLoader workers read the shards. (No wall-time bound here:
    # DeepSpeed's first start in a process can wait minutes for its op build; the stream-level test times it.)
    out = tmp_path / "mismatch"
    with pytest.raises(NoUsableSamplesError) as err:
        main(train_argv("clip", data, out, "max_steps=3", "save_every=0", f"data.train.0.shards={data}/docs-*.tar",
                        "data.train.0.name=web", "data.train.0.batch_size=4", f"data.num_workers={workers}",
                        "data.max_consecutive_bad_samples=1000", "model.clip.text={width: 16, depth: 1, heads: 2}",
                        "model.clip.embed_dim=16", "tokenizer.context_length=12", "model.vision.freeze=false", **RUN))
    message = str(err.value)
    assert message.startswith("dataset 'web': 0 of 1000 samples usable in a row")
    assert "1000 kind_mismatch" in message and "set kind: interleaved" in message and "docs-0000" in message
