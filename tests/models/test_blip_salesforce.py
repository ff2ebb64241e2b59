"""BLIP.load_salesforce_state_dict (vlmcore/blip/convert.py): the original salesforce/BLIP ``.pth`` names.

The salesforce state dicts here are random tensors under the names and shapes that salesforce's
own modules produce (``models/vit.py``: timm-0.4 ViT; ``models/med.py``: BERT with
``crossattention``, ``BertLMHeadModel``; ``models/blip_pretrain.py``, ``blip_retrieval.py``,
``blip.py``: heads, momentum copies, queues; the ties of ``tie_encoder_decoder_weights`` and of the
LM head), listed below from that code. The oracle is Hugging Face: transformers' converter
(``convert_blip_original_pytorch_to_hf.py``, not shipped in the 5.x wheel and importing salesforce's
code at module level, so its ``rename_key`` rules are restated in :func:`to_hf_names`) turns the
salesforce names into ``BlipForImageTextRetrieval`` / ``BlipForConditionalGeneration`` names; those
classes load them strictly, and our model loaded from the salesforce names must give the same ITM
logits, ITC similarities and decoder logits, and the same parameters as our HF loaders."""

from __future__ import annotations

import re

import pytest
import torch
from helpers.numerics import assert_close
from helpers.salesforce_blip import (
    BOS,
    EMBED,
    IMAGE,
    PAD,
    PATCH,
    QUEUE,
    SEP,
    T_DEPTH,
    T_MLP,
    T_POS,
    T_WIDTH,
    V_DEPTH,
    V_MLP,
    V_WIDTH,
    VOCAB,
    salesforce_state_dict,
)

from vlmcore.blip import (
    BLIP,
    MEDConfig,
    blip_from_salesforce,
    blip_vision_encoder,
    load_blip,
    read_salesforce_checkpoint,
    salesforce_blip_spec,
    save_blip,
)

transformers = pytest.importorskip("transformers")


# -- the salesforce names, from salesforce/BLIP's model code ------------------------------------


# -- the HF oracle -----------------------------------------------------------------------------

# transformers' convert_blip_original_pytorch_to_hf.rename_key, rule by rule (applied in this order)
HF_RENAME_RULES = [(r"visual_encoder", "vision_model.encoder"), (r"blocks", "layers"), (r"attn", "self_attn"),
                   (r"norm1", "layer_norm1"), (r"norm2", "layer_norm2"), (r"encoder\.norm", "post_layernorm"),
                   (r"encoder\.patch_embed\.proj", "embeddings.patch_embedding"),
                   (r"encoder\.pos_embed", "embeddings.position_embedding"),
                   (r"encoder\.cls_token", "embeddings.class_embedding"), (r"self_attn\.proj", "self_attn.projection")]


def to_hf_names(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The converter's renaming of the entries under ``prefixes`` (what the HF class has: no momentum
    copies, queues or temp; transformers 5 keeps ``position_ids`` out of its state dicts)."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefixes) and not key.endswith("position_ids"):
            for pattern, replacement in HF_RENAME_RULES:
                key = re.sub(pattern, replacement, key)
            out[key] = value
    return out


def hf_config(image_size: int = IMAGE):
    text = dict(vocab_size=VOCAB, hidden_size=T_WIDTH, num_hidden_layers=T_DEPTH, num_attention_heads=2,
                intermediate_size=T_MLP, max_position_embeddings=T_POS, encoder_hidden_size=V_WIDTH,
                bos_token_id=BOS, sep_token_id=SEP, pad_token_id=PAD, eos_token_id=SEP, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    vision = dict(hidden_size=V_WIDTH, num_hidden_layers=V_DEPTH, num_attention_heads=2, intermediate_size=V_MLP,
                  image_size=image_size, patch_size=PATCH, layer_norm_eps=1e-6)
    return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=EMBED)


def ours(momentum=0.995, image_size: int = IMAGE, layer_norm_eps: float = 1e-6) -> BLIP:
    torch.manual_seed(123)
    config = hf_config(image_size)
    encoder = blip_vision_encoder(hidden_size=V_WIDTH, num_hidden_layers=V_DEPTH, num_attention_heads=2,
                                  intermediate_size=V_MLP, image_size=image_size, patch_size=PATCH,
                                  layer_norm_eps=layer_norm_eps)
    return BLIP(encoder, MEDConfig.from_hf(config.text_config), embed_dim=EMBED, momentum=momentum,
                queue_size=QUEUE).eval()


def hf_model(cls, state):
    model = cls(hf_config()).eval()
    model.load_state_dict(state, strict=True)  # every HF name covered: the salesforce name list is complete
    return model


def batch(b=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, IMAGE, IMAGE, generator=g)
    ids = torch.randint(3, 50, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, length - 2:] = 0
    ids[1, length - 2:] = PAD
    return images, ids, mask


def online_state(model: BLIP) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.",
                                 "image_queue", "text_queue", "idx_queue", "queue_ptr"))}


def assert_same_parameters(a: BLIP, b: BLIP, names) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for name in names:
        assert torch.equal(sa[name], sb[name]), name


def check_retrieval_outputs(model: BLIP, state):
    hf = hf_model(transformers.BlipForImageTextRetrieval,
                  to_hf_names(state, ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")))
    images, ids, mask = batch()
    with torch.no_grad():
        hf_itm = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=True).itm_score
        hf_sim = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=False).itm_score
        itm = model.itm_logits(model.encode_image(images), ids, mask, replace_first_token=False)
        sim = model.itc_similarity(images, ids, mask)
    assert_close(itm, hf_itm, atol=2e-5, rtol=2e-5, name="itm logits")
    assert_close(sim, hf_sim, atol=2e-5, rtol=2e-5, name="itc similarity")


def check_decoder_outputs(model: BLIP, state):
    hf = hf_model(transformers.BlipForConditionalGeneration,
                  to_hf_names(state, ("visual_encoder.", "text_decoder.")))
    images, ids, mask = batch(seed=3)
    ids[:, 0] = BOS
    with torch.no_grad():
        hf_logits = hf(pixel_values=images, input_ids=ids, attention_mask=mask).logits
        logits = model.decoder_logits(model.encode_image(images), ids, mask)
    assert_close(logits, hf_logits, atol=3e-5, rtol=3e-5, name="decoder logits")


# -- tests ------------------------------------------------------------------------------------


def test_retrieval_checkpoint_equals_hf_converter_path_and_hf_outputs():
    state = salesforce_state_dict("retrieval")
    model = ours()
    untouched = model.load_salesforce_state_dict(state)
    assert any(".decoder_attention." in k for k in untouched) and any(k.startswith("lm_head.") for k in untouched)
    assert "temp" not in untouched and model.temp.item() == pytest.approx(0.05)
    via_hf = ours()
    via_hf.load_hf_retrieval_state_dict(
        to_hf_names(state, ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")))
    covered = [k for k in online_state(model) if k not in untouched and k != "temp"]
    assert len(covered) > 80
    assert_same_parameters(model, via_hf, covered)
    check_retrieval_outputs(model, state)


def test_momentum_copies_and_queues_land_transposed():
    state = salesforce_state_dict("retrieval")
    model = ours()
    model.load_salesforce_state_dict(state)
    own = model.state_dict()
    assert torch.equal(own["image_queue"], state["image_queue"].T)
    assert torch.equal(own["text_queue"], state["text_queue"].T)
    assert torch.equal(own["idx_queue"], state["idx_queue"][0])
    assert torch.equal(own["queue_ptr"], state["ptr_queue"])
    for ours_name, sf_name in [
        ("visual_encoder_m.model.embeddings.position_embedding", "visual_encoder_m.pos_embed"),
        ("visual_encoder_m.model.encoder.layers.1.self_attn.projection.weight",
         "visual_encoder_m.blocks.1.attn.proj.weight"),
        ("visual_encoder_m.model.post_layernorm.bias", "visual_encoder_m.norm.bias"),
        ("text_encoder_m.encoder.layer.0.crossattention.self.key.weight",
         "text_encoder_m.encoder.layer.0.crossattention.self.key.weight"),
        ("vision_proj_m.weight", "vision_proj_m.weight"), ("text_proj_m.bias", "text_proj_m.bias"),
    ]:
        assert torch.equal(own[ours_name], state[sf_name]), ours_name
        online = ours_name.replace("_m.", ".", 1)
        assert not torch.equal(own[ours_name], own[online]), f"{ours_name} was copied from the online model"
    # the momentum text encoder's (unused) decoder self-attention is kept a copy of the online one
    name = "encoder.layer.1.decoder_attention.self.value.weight"
    assert torch.equal(own["text_encoder_m." + name], own["text_encoder." + name])
    # the features the momentum encoders compute are salesforce's momentum model's: check against HF on *_m
    momentum_as_online = {k.replace("_m.", ".", 1): v for k, v in state.items() if k.startswith(
        ("visual_encoder_m.", "text_encoder_m.", "vision_proj_m.", "text_proj_m."))}
    momentum_as_online.update({k: state[k] for k in ("itm_head.weight", "itm_head.bias")})
    hf = hf_model(transformers.BlipForImageTextRetrieval, to_hf_names(
        momentum_as_online, ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")))
    images, ids, mask = batch()
    with torch.no_grad():
        image_m, text_m = model.momentum_features(images, ids, mask)
        hf_sim = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=False).itm_score
    assert_close(image_m @ text_m.T, hf_sim, atol=2e-5, rtol=2e-5, name="momentum similarity")


def test_caption_checkpoint_equals_hf_converter_path_and_hf_decoder():
    state = salesforce_state_dict("caption", seed=1)
    model = ours(momentum=None)
    untouched = model.load_salesforce_state_dict(state)
    assert any(".attention.self." in k and ".decoder_attention." not in k for k in untouched)
    assert not any(k.startswith(("lm_head.", "visual_encoder.")) for k in untouched)
    via_hf = ours(momentum=None)
    via_hf.load_hf_captioning_state_dict(to_hf_names(state, ("visual_encoder.", "text_decoder.")))
    assert_same_parameters(model, via_hf, [k for k in online_state(model) if k not in untouched])
    check_decoder_outputs(model, state)


def test_pretrain_checkpoint_loads_everything_and_matches_both_hf_heads():
    state = salesforce_state_dict("pretrain", seed=2)
    model = ours()
    assert model.load_salesforce_state_dict(state) == []
    assert torch.equal(model.queue_ptr, state["queue_ptr"])
    assert (model.idx_queue == -100).all()  # pre-training queues carry no image ids
    check_retrieval_outputs(model, state)
    check_decoder_outputs(model, state)


def test_pretrain_decoder_copy_that_differs_from_the_encoder_raises():
    state = salesforce_state_dict("pretrain", seed=2)
    key = "text_decoder.bert.encoder.layer.1.crossattention.self.key.weight"
    state[key] = state[key] + 1.0
    with pytest.raises(ValueError, match=re.escape(key)):
        ours().load_salesforce_state_dict(state)
    state = salesforce_state_dict("caption")
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"] + 1.0
    with pytest.raises(ValueError, match="predictions.decoder.bias"):
        ours().load_salesforce_state_dict(state)


def test_unknown_missing_and_mis_shaped_keys_raise_naming_them():
    base = salesforce_state_dict("retrieval")
    state = dict(base, **{"text_encoder.pooler.dense.weight": torch.zeros(T_WIDTH, T_WIDTH)})
    with pytest.raises(ValueError, match=re.escape("text_encoder.pooler.dense.weight")):
        ours().load_salesforce_state_dict(state)
    state = {k: v for k, v in base.items() if k != "visual_encoder.blocks.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=re.escape("visual_encoder.model.encoder.layers.1.mlp.fc2.bias")):
        ours().load_salesforce_state_dict(state)
    state = {k: v for k, v in base.items() if k != "text_proj_m.weight"}
    with pytest.raises(ValueError, match=re.escape("text_proj_m.weight")):
        ours().load_salesforce_state_dict(state)
    state = dict(base, **{"itm_head.weight": torch.zeros(3, T_WIDTH)})
    with pytest.raises(ValueError, match=re.escape("itm_head.weight")):
        ours().load_salesforce_state_dict(state)
    state = dict(base, image_queue=torch.zeros(EMBED, QUEUE + 1))
    with pytest.raises(ValueError, match="image_queue"):
        ours().load_salesforce_state_dict(state)
    state = salesforce_state_dict("retrieval", image_size=48)  # a 384 px checkpoint in a 224 px model, scaled down
    with pytest.raises(ValueError, match="interpolate_pos_embed=True") as error:
        ours().load_salesforce_state_dict(state)
    assert "'visual_encoder.pos_embed: checkpoint (1, 37, 48) != model (1, 17, 48)" in str(error.value)
    state = dict(base, **{"text_encoder.embeddings.position_ids": torch.arange(T_POS).flip(0)[None]})
    with pytest.raises(ValueError, match="position_ids"):
        ours().load_salesforce_state_dict(state)


def test_momentum_entries_need_a_momentum_model_or_load_momentum_false():
    state = salesforce_state_dict("retrieval")
    with pytest.raises(ValueError, match="load_momentum=False"):
        ours(momentum=None).load_salesforce_state_dict(state)
    inference = ours(momentum=None)
    inference.load_salesforce_state_dict(state, load_momentum=False)
    check_retrieval_outputs(inference, state)
    # load_momentum=False into a momentum model: the momentum encoders become copies of the online ones
    model = ours()
    queue_before = model.image_queue.clone()
    model.load_salesforce_state_dict(state, load_momentum=False)
    assert torch.equal(model.vision_proj_m.weight, model.vision_proj.weight)
    assert torch.equal(model.image_queue, queue_before)


def test_vision_eps_other_than_blip_vit_raises():
    with pytest.raises(ValueError, match="layer_norm_eps"):
        ours(layer_norm_eps=1e-5).load_salesforce_state_dict(salesforce_state_dict("caption"))


def test_interpolated_pos_embed_matches_hf_interpolate_pos_encoding():
    """A 32 px checkpoint (4x4 patches) into a 48 px model (6x6), as salesforce's load_checkpoint resizes
    224 px pre-training weights for 384 px fine-tuning; HF's interpolate_pos_encoding is the same bicubic resize."""
    state = salesforce_state_dict("retrieval", seed=4)
    model = ours(image_size=48)
    model.load_salesforce_state_dict(state, interpolate_pos_embed=True)
    hf = hf_model(transformers.BlipForImageTextRetrieval,
                  to_hf_names(state, ("visual_encoder.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")))
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf.vision_model(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state
        assert_close(model.encode_image(images), expected, atol=2e-5, rtol=2e-5, name="image tokens")
        embeddings = hf.vision_model.embeddings  # the momentum tower's pos_embed is resized the same way
        embeddings.position_embedding.copy_(state["visual_encoder_m.pos_embed"])
        expected_m = embeddings.interpolate_pos_encoding(torch.zeros(1, 37, V_WIDTH), 48, 48)
    assert_close(model.visual_encoder_m.model.embeddings.position_embedding, expected_m, atol=1e-6, rtol=1e-6,
                 name="momentum pos_embed")


def test_read_salesforce_checkpoint(tmp_path):
    state = salesforce_state_dict("caption")
    path = tmp_path / "model_base_caption.pth"
    torch.save({"model": state, "epoch": 3, "config": {"image_size": 32, "lr": 1e-5}}, path)
    loaded = read_salesforce_checkpoint(str(path))
    assert set(loaded) == set(state)
    model = ours(momentum=None)
    model.load_salesforce_checkpoint(str(path))
    check_decoder_outputs(model, state)


TINY_TEXT = dict(num_attention_heads=2, bos_token_id=BOS, enc_token_id=BOS + 1, sep_token_id=SEP, pad_token_id=PAD)


def test_spec_from_the_weights_builds_a_model_that_loads_and_matches_hf(tmp_path):
    state = salesforce_state_dict("retrieval", seed=6)
    spec = salesforce_blip_spec(state, vision_heads=2, text_overrides=TINY_TEXT)
    assert spec["vision"] == {"kind": "hf_blip", "hidden_size": V_WIDTH, "num_hidden_layers": V_DEPTH,
                              "num_attention_heads": 2, "intermediate_size": V_MLP, "image_size": IMAGE,
                              "patch_size": PATCH, "layer_norm_eps": 1e-6}
    assert {k: spec["text"][k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                                         "max_position_embeddings", "encoder_width")} == {
        "vocab_size": VOCAB, "hidden_size": T_WIDTH, "num_hidden_layers": T_DEPTH, "intermediate_size": T_MLP,
        "max_position_embeddings": T_POS, "encoder_width": V_WIDTH}
    assert (spec["momentum"], spec["queue_size"], spec["embed_dim"]) == (0.995, QUEUE, EMBED)
    path = tmp_path / "model_base_retrieval.pth"
    torch.save({"model": state}, path)
    model = blip_from_salesforce(str(path), vision_heads=2, text_overrides=TINY_TEXT)
    assert torch.equal(model.image_queue, state["image_queue"].T)
    check_retrieval_outputs(model, state)
    save_blip(model, str(tmp_path / "saved"))  # the spec is build_blip's: the vlmcore checkpoint round-trips
    check_retrieval_outputs(load_blip(str(tmp_path / "saved")), state)
    # another resolution: pos_embed interpolated (4x4 -> 6x6 patches), the rest loads as is
    bigger = blip_from_salesforce(state, image_size=48, vision_heads=2, text_overrides=TINY_TEXT)
    assert bigger.visual_encoder.model.embeddings.position_embedding.shape == (1, 37, V_WIDTH)
    caption = salesforce_blip_spec(salesforce_state_dict("caption"), vision_heads=2, text_overrides=TINY_TEXT)
    assert caption["momentum"] is None and caption["text"]["vocab_size"] == VOCAB


def test_spec_needs_head_counts_when_widths_are_not_multiples_of_64():
    state = salesforce_state_dict("caption")
    with pytest.raises(ValueError, match="ViT width 48"):
        salesforce_blip_spec(state, text_overrides=TINY_TEXT)
    with pytest.raises(ValueError, match="text width 32"):
        salesforce_blip_spec(state, vision_heads=2, text_overrides={k: v for k, v in TINY_TEXT.items()
                                                                    if k != "num_attention_heads"})
    with pytest.raises(ValueError, match="visual_encoder.cls_token"):
        salesforce_blip_spec({"vision_proj.weight": torch.zeros(2, 2)})
