"""BLIP (vlmcore/blip/) against Hugging Face transformers' BLIP built from tiny configs at random
init with the same weights: ITM logits, ITC similarities, decoder logits, the LM loss and its
gradients, generation; on the reference path and on the Triton path (interpreter)."""

from __future__ import annotations

import pytest
import torch
import vlmcore.kernels as K
from helpers.numerics import assert_close

from vlmcore.blip import BLIP, MEDConfig, blip_vision_encoder

transformers = pytest.importorskip("transformers")

VOCAB, BOS, SEP, PAD = 64, 60, 2, 0


def tiny_hf_config(**text_overrides):
    text = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                max_position_embeddings=24, encoder_hidden_size=48, bos_token_id=BOS, sep_token_id=SEP,
                pad_token_id=PAD, eos_token_id=SEP, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text.update(text_overrides)
    vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, image_size=32,
                  patch_size=8)
    return transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=24)


def ours_from(config) -> BLIP:
    vision = config.vision_config
    encoder = blip_vision_encoder(hidden_size=vision.hidden_size, num_hidden_layers=vision.num_hidden_layers,
                                  num_attention_heads=vision.num_attention_heads,
                                  intermediate_size=vision.intermediate_size, image_size=vision.image_size,
                                  patch_size=vision.patch_size)
    return BLIP(encoder, MEDConfig.from_hf(config.text_config), embed_dim=config.image_text_hidden_size).eval()


def batch(b=3, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, 3, 32, 32, generator=g)
    ids = torch.randint(3, 50, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, length - 2:] = 0  # right padding in one row
    ids[1, length - 2:] = PAD
    return images, ids, mask


@pytest.fixture(scope="module")
def retrieval_pair():
    torch.manual_seed(0)
    config = tiny_hf_config()
    hf = transformers.BlipForImageTextRetrieval(config).eval()
    ours = ours_from(config)
    untouched = ours.load_hf_retrieval_state_dict(hf.state_dict())
    return hf, ours, untouched


@pytest.fixture(scope="module")
def captioning_pair():
    torch.manual_seed(1)
    config = tiny_hf_config(label_smoothing=0.1)
    hf = transformers.BlipForConditionalGeneration(config).eval()
    ours = ours_from(config)
    untouched = ours.load_hf_captioning_state_dict(hf.state_dict())
    return hf, ours, untouched


def test_retrieval_load_reports_the_untouched_weights(retrieval_pair):
    _, _, untouched = retrieval_pair
    assert "temp" in untouched
    assert any(".decoder_attention." in k for k in untouched)
    assert any(k.startswith("lm_head.") for k in untouched)
    assert not any(k.startswith(("visual_encoder.", "itm_head.", "vision_proj.")) for k in untouched)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_itm_logits_and_itc_similarity_match_hf(retrieval_pair, path):
    hf, ours, _ = retrieval_pair
    images, ids, mask = batch()
    with torch.no_grad():
        hf_itm = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=True).itm_score
        hf_sim = hf(input_ids=ids, pixel_values=images, attention_mask=mask, use_itm_head=False).itm_score
        with K.backend(path):
            itm = ours.itm_logits(ours.encode_image(images), ids, mask, replace_first_token=False)
            sim = ours.itc_similarity(images, ids, mask)
    assert_close(itm, hf_itm, atol=2e-5, rtol=2e-5, name="itm logits")
    assert_close(sim, hf_sim, atol=2e-5, rtol=2e-5, name="itc similarity")


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_decoder_logits_loss_and_gradients_match_hf(captioning_pair, path):
    hf, ours, _ = captioning_pair
    images, ids, mask = batch(seed=3)
    ids[:, 0] = BOS
    labels = ids.masked_fill(mask == 0, -100)
    hf.zero_grad()
    out = hf(pixel_values=images, input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    ours.zero_grad()
    with K.backend(path):
        embeds = ours.encode_image(images)
        logits = ours.decoder_logits(embeds, ids, mask)
        loss = ours.lm_loss(embeds, ids, mask, prompt_length=0, label_smoothing=0.1)
    loss.backward()
    assert_close(logits, out.logits, atol=3e-5, rtol=3e-5, name="decoder logits")
    assert_close(loss, out.loss, atol=1e-5, rtol=1e-5, name="lm loss")
    hf_params = dict(hf.named_parameters())
    for ours_name, hf_name in [
        ("text_encoder.encoder.layer.0.crossattention.self.key.weight",
         "text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"),
        ("text_encoder.encoder.layer.1.decoder_attention.self.query.weight",
         "text_decoder.bert.encoder.layer.1.attention.self.query.weight"),
        ("text_encoder.embeddings.word_embeddings.weight", "text_decoder.bert.embeddings.word_embeddings.weight"),
        ("visual_encoder.model.encoder.layers.0.self_attn.qkv.weight",
         "vision_model.encoder.layers.0.self_attn.qkv.weight"),
    ]:
        assert_close(dict(ours.named_parameters())[ours_name].grad, hf_params[hf_name].grad, atol=1e-5, rtol=1e-4,
                     name=ours_name)


def test_prompt_is_excluded_from_the_lm_loss(captioning_pair):
    _, ours, _ = captioning_pair
    images, ids, mask = batch(seed=4)
    embeds = ours.encode_image(images)
    with torch.no_grad():
        full = ours.lm_loss(embeds, ids, mask, prompt_length=0)
        prompted = ours.lm_loss(embeds, ids, mask, prompt_length=3)
        # a manual version: targets from position 3 on only
        dec = ids.clone()
        dec[:, 0] = BOS
        logits = ours.decoder_logits(embeds, dec, mask)[:, :-1].float()
        target = dec[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        target[:, :2] = -100
        manual = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), label_smoothing=0.1)
    assert_close(prompted, manual, atol=1e-6, rtol=1e-6, name="prompted loss")
    assert not torch.allclose(full, prompted)


@pytest.mark.parametrize("kwargs", [dict(num_beams=1, do_sample=False, max_length=12, min_length=6),
                                    dict(num_beams=3, do_sample=False, max_length=12, min_length=8,
                                         repetition_penalty=1.5)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_matches_hf(captioning_pair, kwargs, use_cache):
    hf, ours, _ = captioning_pair
    images, _, _ = batch(b=2, seed=5)
    prompt = [11, 12, 13]
    hf_ids = torch.tensor([[101] + prompt + [SEP]] * 2)
    with torch.no_grad():
        expected = hf.generate(pixel_values=images, input_ids=hf_ids, **kwargs)
        got = ours.generate(images, prompt_ids=prompt, use_cache=use_cache, **kwargs)
    assert torch.equal(got, expected[:, 1 + len(prompt):]), (got, expected)


def test_nucleus_sampling_is_seeded_and_respects_lengths(captioning_pair):
    _, ours, _ = captioning_pair
    images, _, _ = batch(b=2, seed=6)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        with torch.no_grad():
            runs.append(ours.generate(images, prompt_ids=[11], do_sample=True, top_p=0.9, max_length=10,
                                      min_length=5, num_return_sequences=2))
    assert torch.equal(runs[0], runs[1])
    assert runs[0].shape[0] == 4
    assert runs[0].shape[1] <= 10 - 2
    # min_length: no SEP before position min_length (prompt included)
    first_sep = [(row == SEP).nonzero() for row in runs[0]]
    assert all(len(pos) == 0 or int(pos[0]) + 2 >= 5 for pos in first_sep)


def test_load_refuses_mismatches_by_name(retrieval_pair, captioning_pair):
    hf, ours, _ = retrieval_pair
    sd = dict(hf.state_dict())
    sd["text_encoder.encoder.layer.9.attention.self.query.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match="layer.9"):
        ours.load_hf_retrieval_state_dict(sd)
    sd = dict(hf.state_dict())
    del sd["itm_head.bias"]
    with pytest.raises(ValueError, match="itm_head.bias"):
        ours.load_hf_retrieval_state_dict(sd)
    sd = dict(hf.state_dict())
    sd["vision_proj.weight"] = torch.zeros(5, 48)
    with pytest.raises(ValueError, match="vision_proj.weight"):
        ours.load_hf_retrieval_state_dict(sd)
    with pytest.raises(ValueError, match="BlipForConditionalGeneration"):
        ours.load_hf_captioning_state_dict(hf.state_dict())


def test_bad_inputs_name_the_argument(retrieval_pair):
    _, ours, _ = retrieval_pair
    images, ids, mask = batch()
    embeds = ours.encode_image(images)
    with pytest.raises(ValueError, match="image_embeds"):
        ours.itm_logits(embeds[:, :, :5], ids, mask)
    with pytest.raises(ValueError, match="attention_mask"):
        ours.text_features(ids, mask[:, :3])
    with pytest.raises(TypeError, match="input_ids"):
        ours.text_features(ids.float())
    with pytest.raises(ValueError, match="image_mask"):
        ours.itm_logits(embeds, ids, mask, image_mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="prompt_length"):
        ours.lm_loss(embeds, ids, mask, prompt_length=-1)
    with pytest.raises(ValueError, match="encoder_width"):
        BLIP(ours.visual_encoder, MEDConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64, encoder_width=40,
                                            bos_token_id=BOS, enc_token_id=BOS + 1, sep_token_id=SEP))


def test_image_padding_mask_hides_tokens(retrieval_pair):
    _, ours, _ = retrieval_pair
    images, ids, mask = batch()
    with torch.no_grad():
        embeds = ours.encode_image(images)
        image_mask = torch.ones(embeds.shape[:2], dtype=torch.bool)
        image_mask[:, -4:] = False
        masked = ours.itm_logits(embeds, ids, mask, image_mask=image_mask)
        garbage = embeds.clone()
        garbage[:, -4:] = 1e3
        masked_garbage = ours.itm_logits(garbage, ids, mask, image_mask=image_mask)
        cut = ours.itm_logits(embeds[:, :-4], ids, mask)
    assert_close(masked, cut, atol=1e-5, rtol=1e-5, name="masked vs cut")
    assert_close(masked_garbage, cut, atol=1e-5, rtol=1e-5, name="masked tokens ignored")
