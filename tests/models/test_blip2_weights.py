"""BLIP-2 whole models from and to Hugging Face (``vlmcore.blip2.hf``), tiny OPT model, fp32:

- a ``save_pretrained`` directory -> :class:`vlmcore.Blip2LM`: HF's logits and loss (1e-5);
- a removed and an extra key: one :class:`~vlmcore.checkpoint_keys.CheckpointKeysError` naming both;
- our model -> ``export_hf_blip2`` -> ``from_pretrained`` with no missing / unexpected key -> equal logits;
- a tower HF has no class for is refused by name;
- stage 1: a ``Blip2ForImageTextRetrieval`` directory -> :class:`vlmcore.Blip2Stage1`: HF's ITM logits and
  ITC similarities (1e-5), a removed + an extra key in one report, a ``Blip2ForConditionalGeneration``
  directory loads its query path (the stage-1 heads stay at init, by the allow-list), and the export
  round-trips through ``from_pretrained``.
"""

import pytest
import torch
from helpers.numerics import assert_close
from helpers.tiny_blip2 import (
    VISION_WIDTH,
    caption_batch,
    hf_retrieval_outputs,
    retrieval_batch,
    stage1_outputs,
    tiny_hf_blip2,
    tiny_hf_blip2_retrieval,
)
from helpers.tiny_lm import VOCAB, tiny_lm
from safetensors.torch import load_file, save_file
from transformers.models.blip_2.modeling_blip_2 import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval
from transformers.utils import logging as hf_logging

import vlmcore
from vlmcore.blip2 import Blip2LM, QFormer
from vlmcore.blip2.hf import (
    blip2_lm_from_hf,
    blip2_stage1_from_hf,
    blip2_vision_from_hf,
    export_hf_blip2,
    export_hf_blip2_stage1,
    load_hf_blip2,
)
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


STAGE1_VOCAB = 40


@pytest.fixture(scope="module")
def retrieval_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("blip2_itm")
    tiny_hf_blip2_retrieval(STAGE1_VOCAB).save_pretrained(path)
    return path


def _stage1(path, source="test"):
    return blip2_stage1_from_hf(str(path), source=source, dec_token_id=STAGE1_VOCAB - 1).eval()


def test_stage1_from_a_retrieval_directory_gives_hf_itm_and_itc(retrieval_dir):
    hf = Blip2ForImageTextRetrieval.from_pretrained(retrieval_dir).eval()
    ours = _stage1(retrieval_dir)
    batch = retrieval_batch(STAGE1_VOCAB)
    (itm, itc), (hf_itm, hf_itc) = stage1_outputs(ours, *batch), hf_retrieval_outputs(hf, *batch)
    assert_close(itm, hf_itm, atol=1e-5, rtol=1e-5, name="ITM logits")
    assert_close(itc, hf_itc, atol=1e-5, rtol=1e-5, name="ITC similarities")
    assert itc.shape == (3, 3) and ours.vision_proj.out_features == 8


def _copy_config(source, target):
    for name in ("config.json", "generation_config.json"):
        if (source / name).exists():
            (target / name).write_bytes((source / name).read_bytes())


def test_stage1_removed_and_extra_keys_are_one_report(retrieval_dir, tmp_path):
    _copy_config(retrieval_dir, tmp_path)
    state = load_file(str(retrieval_dir / "model.safetensors"))
    del state["itm_head.bias"]
    state["qformer.extra.weight"] = torch.zeros(2)
    state["text_projection.weight"] = torch.zeros(9, 32)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointKeysError, match=r"^init .* missing 1 keys: itm_head\.bias; unexpected 1 keys: "
                       r"qformer\.extra\.weight; mis-shaped 1 keys: text_projection\.weight: \(9, 32\) vs ours "
                       r"\(8, 32\)$") as err:
        _stage1(tmp_path, source=f"init {tmp_path}")
    assert err.value.missing == ["itm_head.bias"] and err.value.unexpected == ["qformer.extra.weight"]


def test_stage1_from_a_captioning_directory_loads_the_query_path(hf_dir):
    hf = Blip2ForConditionalGeneration.from_pretrained(hf_dir).eval()
    ours = blip2_stage1_from_hf(str(hf_dir), source="test", dec_token_id=VOCAB - 1).eval()
    assert ours.qformer.vocab_size == hf.config.qformer_config.vocab_size
    images = caption_batch(VOCAB, IMAGE_TOKEN)[0]
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=images, return_dict=True).qformer_outputs.last_hidden_state
        got = ours.qformer.encode_image(ours.image_embeddings(images, None))
    assert_close(got, expected, atol=1e-5, rtol=1e-5, name="query outputs")


def test_stage1_refuses_a_directory_of_another_family(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "blip", "architectures": ["BlipForImageTextRetrieval"]}')
    with pytest.raises(ValueError, match=r"init x: a BLIP-2 stage-1 init .*Blip2ForImageTextRetrieval.*"
                       r"model_type 'blip'"):
        blip2_stage1_from_hf(str(tmp_path), source="init x", dec_token_id=1)


def test_stage1_export_round_trips_through_from_pretrained(retrieval_dir, tmp_path):
    ours = _stage1(retrieval_dir)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking Q-Former and heads, different from the directory's
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    export_hf_blip2_stage1(ours, str(tmp_path))
    peer, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    batch = retrieval_batch(STAGE1_VOCAB, seed=2)
    (itm, itc), (hf_itm, hf_itc) = stage1_outputs(ours, *batch), hf_retrieval_outputs(peer.eval(), *batch)
    assert_close(itm, hf_itm, atol=1e-5, rtol=1e-5, name="ITM logits after export")
    assert_close(itc, hf_itc, atol=1e-5, rtol=1e-5, name="ITC similarities after export")


def test_stage1_export_refuses_a_tower_hf_has_no_class_for(tmp_path):
    qformer = QFormer(VISION_WIDTH, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                      num_query_tokens=4, vocab_size=40, max_position_embeddings=16)
    model = vlmcore.Blip2Stage1(qformer, vlmcore.VisionTransformer(8, 4, VISION_WIDTH, 1, 2), embed_dim=8,
                                dec_token_id=39)
    with pytest.raises(ValueError, match="HF BLIP-2 holds a Blip2VisionModel.*VisionTransformer"):
        export_hf_blip2_stage1(model, str(tmp_path))
