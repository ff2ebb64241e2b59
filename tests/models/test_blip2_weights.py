"""BLIP-2 whole models from and to Hugging Face (``vlmcore.blip2.hf``), tiny OPT model, fp32:

- a ``save_pretrained`` directory -> :class:`vlmcore.Blip2LM`: HF's logits and loss (1e-5);
- a removed and an extra key: one :class:`~vlmcore.checkpoint_keys.CheckpointKeysError` naming both;
- our model -> ``export_hf_blip2`` -> ``from_pretrained`` with no missing / unexpected key -> equal logits;
- a tower HF has no class for is refused by name.
"""

import pytest
import torch
from helpers.numerics import assert_close
from helpers.tiny_blip2 import VISION_WIDTH, caption_batch, tiny_hf_blip2
from helpers.tiny_lm import VOCAB, tiny_lm
from safetensors.torch import load_file, save_file
from transformers.models.blip_2.modeling_blip_2 import Blip2ForConditionalGeneration
from transformers.utils import logging as hf_logging

import vlmcore
from vlmcore.blip2 import Blip2LM, QFormer
from vlmcore.blip2.hf import blip2_lm_from_hf, blip2_vision_from_hf, export_hf_blip2, load_hf_blip2
from vlmcore.checkpoint_keys import CheckpointKeysError

hf_logging.set_verbosity_error()
IMAGE_TOKEN = VOCAB - 1


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("blip2_hf")
    tiny_hf_blip2(VOCAB, IMAGE_TOKEN).save_pretrained(path)
    return path


def _outputs(model, batch, hf: bool):
    images, input_ids, mask, labels = batch
    with torch.no_grad():
        if hf:
            return model(pixel_values=images, input_ids=input_ids, attention_mask=mask, labels=labels)
        return model(images, input_ids, mask, labels)


def test_directory_loads_with_hf_outputs(hf_dir):
    hf = Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    ours = blip2_lm_from_hf(load_hf_blip2(str(hf_dir), source="test"), image_token_id=IMAGE_TOKEN).eval()
    batch = caption_batch(VOCAB, IMAGE_TOKEN)
    expected, got = _outputs(hf, batch, hf=True), _outputs(ours, batch, hf=False)
    assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5, name="logits")
    assert_close(got.loss, expected.loss, atol=1e-5, rtol=1e-5, name="loss")
    tower = blip2_vision_from_hf(str(hf_dir))
    assert torch.equal(tower.embeddings.patch_embedding.weight, hf.vision_model.embeddings.patch_embedding.weight)


def test_removed_and_extra_keys_are_one_report(hf_dir, tmp_path):
    for name in ("config.json", "generation_config.json"):
        if (hf_dir / name).exists():
            (tmp_path / name).write_bytes((hf_dir / name).read_bytes())
    state = load_file(str(hf_dir / "model.safetensors"))
    del state["qformer.encoder.layer.1.output_query.dense.bias"]
    state["qformer.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointKeysError, match=r"^init .* missing 1 keys: qformer\.encoder\.layer\.1\.output_query"
                       r"\.dense\.bias; unexpected 1 keys: qformer\.extra\.weight") as err:
        load_hf_blip2(str(tmp_path), source=f"init {tmp_path}")
    assert err.value.missing == ["qformer.encoder.layer.1.output_query.dense.bias"]


def test_export_round_trips_through_from_pretrained(hf_dir, tmp_path):
    ours = blip2_lm_from_hf(load_hf_blip2(str(hf_dir), source="test"), image_token_id=IMAGE_TOKEN).eval()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking bridge, different from the directory's
        for p in ours.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    export_hf_blip2(ours, str(tmp_path))
    peer, info = Blip2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    batch = caption_batch(VOCAB, IMAGE_TOKEN, seed=2)
    expected, got = _outputs(peer.eval(), batch, hf=True), _outputs(ours, batch, hf=False)
    assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5, name="logits after export")
    assert peer.config.image_token_index == IMAGE_TOKEN


def test_export_refuses_a_tower_hf_has_no_class_for(tmp_path):
    qformer = QFormer(VISION_WIDTH, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                      num_query_tokens=4, vocab_size=40, max_position_embeddings=16)
    model = Blip2LM(qformer, tiny_lm("opt"), vlmcore.VisionTransformer(8, 4, VISION_WIDTH, 1, 2))
    with pytest.raises(ValueError, match="HF BLIP-2 holds a Blip2VisionModel.*VisionTransformer"):
        export_hf_blip2(model, str(tmp_path))
